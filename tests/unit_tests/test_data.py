"""tools/preprocess_data.py and the GPT datasets built on its output, checked against the raw bytes."""

import sys

import numpy as np
import pytest
from util import run

from megaclone.errors import MegacloneError
from megaclone.train import data


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
    assert "empty.txt: empty" in proc.stdout and "blob.txt: not UTF-8" in proc.stdout
    assert "--tokenizer-type NullTokenizer --vocab-size 256" in proc.stdout
    assert not list(tmp_path.glob("*.partial*"))
    ds = IndexedDataset(str(tmp_path / "ds"))
    got = sorted(bytes(ds[i][:-1].astype(np.uint8)) for i in range(len(ds)))
    assert got == sorted(t.encode("utf-8") for t in texts.values())
    assert all(int(ds[i][-1]) == data.BYTE_VOCAB for i in range(len(ds)))


def _is_window_of(ids: list[int], documents: list[bytes]) -> bool:
    """Whether ``ids`` is a contiguous window of some concatenation of the documents, each followed by
    eod, in any order: split at eod, the first piece ends a document, the middle pieces are whole
    documents and the last one starts a document (one piece alone lies inside a document)."""
    pieces = bytes(0 if t == data.BYTE_VOCAB else t for t in ids).split(b"\x00")
    if len(pieces) == 1:
        return any(pieces[0] in d for d in documents)
    return (any(d.endswith(pieces[0]) for d in documents) and all(p in documents for p in pieces[1:-1])
            and any(d.startswith(pieces[-1]) for d in documents))


def DS(tmp_path) -> tuple[str, ...]:
    return (str(tmp_path / "ds"),)


@pytest.mark.parametrize("seed", [4, 7, 8])
def test_gpt_samples_are_windows_of_the_token_stream(corpus, tmp_path, seed):
    root, texts = corpus
    files = data.collect_files([root])
    data.write_indexed_dataset(files, tmp_path / "ds", data.ByteTokenizer())
    documents = [t.encode("utf-8") for t in texts.values()]
    train, valid, _ = data.build_gpt_datasets(data.DataSource(DS(tmp_path), "2,1,0"), 32, seed, (20, 5, 0),
                                              data.ByteTokenizer(), tmp_path / "cache")
    assert len(train) >= 20 and len(valid) >= 5
    for i in range(20):
        s = train[i]
        ids = s["tokens"].tolist() + [s["labels"][-1].item()]
        assert s["labels"][:-1].tolist() == ids[1:-1]
        assert _is_window_of(ids, documents), f"sample {i} is not a contiguous window of the documents"
        assert s["loss_mask"].sum() == 32
    assert not _is_window_of(list(b"x * 2\nplain"), documents), "the window check can fail"


def test_a_validation_seed_gives_every_training_seed_the_same_validation_samples(corpus, tmp_path):
    """--valid-seed: the validation samples no longer follow the training seed (Megatron-LM shuffles
    every split with --seed), while the training samples still do."""
    root, _ = corpus
    data.write_indexed_dataset(data.collect_files([root]), tmp_path / "ds", data.ByteTokenizer())

    def samples(seed, valid_seed):
        train, valid, _ = data.build_gpt_datasets(data.DataSource(DS(tmp_path), "2,1,0"), 32, seed, (20, 5, 0),
                                                  data.ByteTokenizer(), valid_seed=valid_seed)
        return ([train[i]["tokens"].tolist() for i in range(5)], [valid[i]["tokens"].tolist() for i in range(5)])

    (train_a, valid_a), (train_b, valid_b) = samples(4, 99), samples(7, 99)
    assert valid_a == valid_b and train_a != train_b
    assert samples(4, None)[1] != samples(7, None)[1]  # without it, Megatron-LM's single seed


def test_a_split_without_documents_is_refused_not_spun_on(corpus, tmp_path):
    """megatron-core's builder spins on a sampled split with no documents (training hung until the
    peers' collective timeout); the trainer refuses it before building."""
    from megaclone.errors import MegacloneError

    root, _ = corpus
    data.write_indexed_dataset(data.collect_files([root]), tmp_path / "ds", data.ByteTokenizer())
    assert data.documents_per_split(3, "98,2,0") == [3, 0, 0]
    with pytest.raises(MegacloneError, match=r"--split 98,2,0 .*\(3 documents\) gives training 3, validation 0, "
                                             r"test 0 documents: the validation split has a weight but no document") as info:
        data.build_gpt_datasets(data.DataSource(DS(tmp_path), "98,2,0"), 32, 1, (20, 0, 0), data.ByteTokenizer())
    assert "--split 2,1,0" in info.value.fix
    with pytest.raises(MegacloneError, match="gives the validation split no share, but it is sampled"):
        data.build_gpt_datasets(data.DataSource(DS(tmp_path), "1,0,0"), 32, 1, (20, 5, 0), data.ByteTokenizer())
    train, valid, _ = data.build_gpt_datasets(data.DataSource(DS(tmp_path), "1,0,0"), 32, 1, (20, 0, 0),
                                              data.ByteTokenizer(), tmp_path / "cache")
    assert len(train) >= 20 and valid is None  # a split of weight 0 is not built


def test_per_split_paths_draw_each_split_from_its_own_documents(corpus, tmp_path):
    """--train-data-path / --valid-data-path (Megatron-LM's flags): every training sample is a window of
    the training files only, every validation sample of the validation files only (the reproduction
    trains source and clones on disjoint documents this way)."""
    from megaclone.errors import MegacloneError

    root, texts = corpus
    files = data.collect_files([root])
    names = sorted(texts)
    train_files = [f for f in files if f.name in names[:2]]
    valid_files = [f for f in files if f.name not in names[:2]]
    data.write_indexed_dataset(train_files, tmp_path / "train", data.ByteTokenizer())
    data.write_indexed_dataset(valid_files, tmp_path / "valid", data.ByteTokenizer())
    docs = lambda fs: [f.read_bytes() for f in fs]  # noqa: E731
    source = data.DataSource(per_split=((str(tmp_path / "train"),), (str(tmp_path / "valid"),), None))
    train, valid, test = data.build_gpt_datasets(source, 32, 3, (20, 5, 0), data.ByteTokenizer(), tmp_path / "cache")
    assert test is None
    for dataset, own, other in ((train, train_files, valid_files), (valid, valid_files, train_files)):
        for i in range(5):
            s = dataset[i]
            ids = s["tokens"].tolist() + [s["labels"][-1].item()]
            assert _is_window_of(ids, docs(own)) and not _is_window_of(ids, docs(other))
    assert {p.name for p in source.files()} == {"train.bin", "train.idx", "valid.bin", "valid.idx"}
    with pytest.raises(MegacloneError, match="--valid-data-path is not given"):
        data.build_gpt_datasets(data.DataSource(per_split=((str(tmp_path / "train"),), None, None)), 32, 3,
                                (20, 5, 0), data.ByteTokenizer())
    with pytest.raises(MegacloneError, match="both --data-path and per-split"):
        data.DataSource((str(tmp_path / "train"),), "1,0,0", ((str(tmp_path / "train"),), None, None))


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


def test_outputs_are_guarded_like_every_destination(corpus, tmp_path):
    """In process (the tool's exit status 2 and printed lines are test_documents_...'s): the same
    guard as every destination, before anything is written."""
    root, _ = corpus
    with pytest.raises(MegacloneError, match="is inside the source"):
        data.preprocess(root / "ds", [root])
    assert not list(root.glob("ds*"))
    data.preprocess(tmp_path / "ds", [root])
    with pytest.raises(MegacloneError, match="pass --overwrite"):
        data.preprocess(tmp_path / "ds", [root])
    data.preprocess(tmp_path / "ds", [root], overwrite=True)
    (tmp_path / "mine.idx").write_text("my index of things")
    with pytest.raises(MegacloneError, match="not a Megatron indexed dataset"):
        data.preprocess(tmp_path / "mine", [root], overwrite=True)
    assert (tmp_path / "mine.idx").read_text() == "my index of things"


def test_a_refusal_leaves_no_directory_behind(tmp_path):
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "x.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(MegacloneError, match="no input file held UTF-8 text"):
        data.preprocess(tmp_path / "new" / "deeper" / "ds", [tmp_path / "blobs"])
    assert not (tmp_path / "new").exists()
