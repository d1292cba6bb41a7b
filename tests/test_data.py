"""tools/preprocess_data.py and the GPT datasets built on its output, checked against the raw bytes."""

import sys

import numpy as np
import pytest

from megaclone import data
from util import run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    texts = {
        "a.py": "def f(x):\n    return x * 2\n" * 40,
        "notes/b.md": "# Notes\nUnicode too: café, naïve, 東京.\n" * 30,
        "c.txt": "plain text " * 200,
    }
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "empty.txt").write_text("")
    (root / "blob.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
    (root / "image.png").write_bytes(b"\x89PNG not text")  # not a text suffix: never read
    return root, texts


def _preprocess(*args):
    return run([sys.executable, "tools/preprocess_data.py", *map(str, args)])


def test_documents_are_the_files_bytes_then_eod(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    root, texts = corpus
    proc = _preprocess("--input", root, "--output-prefix", tmp_path / "ds")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 documents" in proc.stdout and "2 skipped" in proc.stdout
    assert "--tokenizer-type NullTokenizer --vocab-size 256" in proc.stdout
    assert not list(tmp_path.glob("*.partial*"))
    ds = IndexedDataset(str(tmp_path / "ds"))
    got = sorted(bytes(ds[i][:-1].astype(np.uint8)) for i in range(len(ds)))
    assert got == sorted(t.encode("utf-8") for t in texts.values())
    assert all(int(ds[i][-1]) == data.BYTE_VOCAB for i in range(len(ds)))


def test_gpt_samples_are_windows_of_the_token_stream(corpus, tmp_path):
    root, texts = corpus
    files = data.collect_files([root])
    data.write_indexed_dataset(files, tmp_path / "ds", data.ByteTokenizer())
    stream = b"".join(t.encode("utf-8") + b"\x00" for t in texts.values())  # \x00 stands in for eod here
    train, valid, _ = data.build_gpt_datasets([str(tmp_path / "ds")], "2,1,0", 32, 7, (20, 5, 0),
                                              data.ByteTokenizer(), tmp_path / "cache")
    assert len(train) >= 20 and len(valid) >= 5
    for i in range(20):
        s = train[i]
        ids = s["tokens"].tolist() + [s["labels"][-1].item()]
        assert s["labels"][:-1].tolist() == ids[1:-1]
        window = bytes(0 if t == data.BYTE_VOCAB else t for t in ids)
        assert window in stream, f"sample {i} is not a contiguous window of the documents"
        assert s["loss_mask"].sum() == 32


def test_default_corpus_is_the_standard_library():
    files = data.stdlib_corpus()
    names = {f.name for f in files}
    assert {"os.py", "argparse.py", "functools.py"} <= names
    assert not any("site-packages" in f.parts for f in files)
    assert data.shuffled_documents(files, 1) == data.shuffled_documents(files, 1) != files


def test_bad_input_is_refused_before_writing(tmp_path):
    proc = _preprocess("--input", tmp_path / "missing", "--output-prefix", tmp_path / "out")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.png").write_bytes(b"\x89PNG")
    proc = _preprocess("--input", tmp_path / "bin", "--output-prefix", tmp_path / "out")
    assert proc.returncode == 2 and "no text files" in proc.stderr
    assert not list(tmp_path.glob("out*"))
