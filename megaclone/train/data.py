"""Training data through megatron-core's own dataset code: a byte tokenizer, the bundled corpus,
indexed-dataset writing and GPT datasets.

The byte tokenizer is Megatron-LM's ``NullTokenizer`` with ``--vocab-size 256`` seen from the data
side: token ids are UTF-8 bytes 0..255 and the end-of-document id is 256, so data written here trains
in Megatron-LM with ``--tokenizer-type NullTokenizer --vocab-size 256`` unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import sysconfig
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from megaclone.errors import MegacloneError
from megaclone.formats import destination

BYTE_VOCAB = 256  # ids 0..255; the end-of-document id is BYTE_VOCAB
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".html", ".xml", ".csv")


class ByteTokenizer:
    """UTF-8 bytes as token ids, one end-of-document id after them; no padding id in the data.

    Provides what megatron-core's GPTDataset asks of a tokenizer (``eod``, ``pad``, ``vocab_size``,
    ``unique_identifiers``) and what a Megatron-LM checkpoint's args record (``tokenizer_type``).
    """

    tokenizer_type = "NullTokenizer"
    eod = BYTE_VOCAB
    pad = -1  # never a data id: GPTDataset masks nothing but its own sequence padding
    vocab_size = BYTE_VOCAB + 1

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict({"class": "megaclone.train.data.ByteTokenizer", "vocab_size": self.vocab_size})

    def tokenize(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def training_flags(self) -> dict:
        """The Megatron-LM flags (as args fields) that read this data the same way."""
        return {"tokenizer_type": self.tokenizer_type, "vocab_size": BYTE_VOCAB}


TOKENIZERS = {"byte": ByteTokenizer}


def get_tokenizer(name: str) -> ByteTokenizer:
    if name not in TOKENIZERS:
        raise MegacloneError(f"unknown tokenizer {name!r}", f"use one of: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus() -> list[Path]:
    """Every ``*.py`` of this Python's standard library (not site-packages), sorted by path."""
    root = stdlib_root()
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.parts and "__pycache__" not in p.parts and p.is_file())


def collect_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named directly, plus text files (by suffix) under named directories, sorted and unique."""
    found: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.add(path.resolve())
        elif path.is_dir():
            found.update(p.resolve() for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        else:
            raise MegacloneError(f"input {path} does not exist", "pass existing files or directories to --input")
    if not found:
        raise MegacloneError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {list(map(str, inputs))}",
                             "pass files directly, or directories that hold text files")
    return sorted(found)


def shuffled_documents(files: Sequence[Path], seed: int) -> list[Path]:
    """A fixed-seed shuffle, so a contiguous --split draws validation documents from the whole corpus."""
    order = list(files)
    random.Random(seed).shuffle(order)
    return order


@dataclass(frozen=True)
class DatasetStats:
    prefix: Path
    documents: int
    tokens: int
    skipped: tuple[tuple[Path, str], ...] = ()  # (file, why): empty, not UTF-8, unreadable


def write_indexed_dataset(files: Sequence[Path], prefix: str | Path, tokenizer: ByteTokenizer,
                          sources: Sequence[str | Path] = (), overwrite: bool = False,
                          progress: bool = False) -> DatasetStats:
    """Write ``prefix.bin`` / ``prefix.idx`` with megatron-core's IndexedDatasetBuilder: one document
    per file, its tokens followed by the end-of-document id. Written to temporary names first and
    renamed, so a failure leaves no dataset that looks complete (nor a directory it created)."""
    prefix = Path(prefix)
    outputs = [Path(f"{prefix}{suffix}") for suffix in (".bin", ".idx")]
    destination.guard_files(outputs, [Path(s) for s in sources], overwrite, "--output-prefix")
    created = [p for p in reversed(prefix.parents) if not p.exists()]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _write_indexed_dataset(files, prefix, tokenizer, progress)
    except BaseException:
        for suffix in (".bin", ".idx"):
            prefix.with_name(f"{prefix.name}.partial{suffix}").unlink(missing_ok=True)
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def preprocess(prefix: str | Path, inputs: Sequence[str | Path] = (), tokenizer: str = "byte", seed: int = 1234,
               skip_documents: int = 0, max_documents: Optional[int] = None, overwrite: bool = False,
               progress: bool = False) -> DatasetStats:
    """What ``tools/preprocess_data.py`` does: the files under ``inputs`` (default: this Python's
    standard library), shuffled by ``seed``, the first ``skip_documents`` dropped and at most
    ``max_documents`` kept, written as one Megatron indexed dataset at ``prefix``."""
    byte_tokenizer = get_tokenizer(tokenizer)
    files = collect_files(inputs) if inputs else stdlib_corpus()
    files = shuffled_documents(files, seed)[skip_documents:][:max_documents]
    return write_indexed_dataset(files, prefix, byte_tokenizer, sources=list(inputs) or [stdlib_root()],
                                 overwrite=overwrite, progress=progress)


def _write_indexed_dataset(files: Sequence[Path], prefix: Path, tokenizer: ByteTokenizer,
                           progress: bool = False) -> DatasetStats:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tmp = prefix.with_name(prefix.name + ".partial")
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    documents = tokens = 0
    skipped: list[tuple[Path, str]] = []
    if progress:
        from tqdm import tqdm

        files = tqdm(files, desc="documents", unit="file", dynamic_ncols=True)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            skipped.append((path, "not UTF-8"))
            continue
        except OSError as exc:
            skipped.append((path, f"unreadable: {exc.strerror or exc}"))
            continue
        ids = tokenizer.tokenize(text)
        if ids.size == 0:
            skipped.append((path, "empty"))
            continue
        builder.add_document(torch.from_numpy(np.append(ids, tokenizer.eod).astype(np.int64)), [ids.size + 1])
        documents += 1
        tokens += ids.size + 1
    if documents == 0:
        Path(f"{tmp}.bin").unlink(missing_ok=True)
        raise MegacloneError("no input file held UTF-8 text", "pass text files (source code, prose)")
    builder.finalize(f"{tmp}.idx")
    for suffix in (".bin", ".idx"):
        Path(f"{tmp}{suffix}").replace(f"{prefix}{suffix}")
    return DatasetStats(prefix, documents, tokens, tuple(skipped))


def check_dataset(prefix: str | Path) -> None:
    prefix = Path(prefix)
    missing = [s for s in (".bin", ".idx") if not Path(f"{prefix}{s}").is_file()]
    if missing:
        raise MegacloneError(f"dataset {prefix} lacks {', '.join(prefix.name + s for s in missing)}",
                             "write it with tools/preprocess_data.py --output-prefix " + str(prefix))


SPLIT_NAMES = ("training", "validation", "test")


def _split_matrix(split: str) -> list:
    """megatron-core's own parsing of ``--split`` into (begin, end) fractions, None for a zero weight."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def documents_per_split(documents: int, split: str) -> list[int]:
    """How many documents megatron-core's dataset builder gives each split of a dataset of
    ``documents`` (its rounding of the split's book-ends)."""
    return [0 if bounds is None else int(round(bounds[1] * documents)) - int(round(bounds[0] * documents))
            for bounds in _split_matrix(split)]


def check_splits(prefixes: Sequence[str], split: str, sampled: Sequence[bool]) -> None:
    """Refuse a ``--split`` that megatron-core cannot build from: a split with a weight is built
    whether or not it is sampled, and one without documents spins forever (its peers then wait out
    their collective timeout); a sampled split needs a weight."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    weighted = [bounds is not None for bounds in _split_matrix(split)]
    unweighted = [SPLIT_NAMES[i] for i in range(3) if sampled[i] and not weighted[i]]
    if unweighted:
        raise MegacloneError(f"--split {split} gives the {' and '.join(unweighted)} split no share, but it is sampled",
                             "give it a weight (e.g. --split 98,2,0), or --eval-iters 0 to skip validation")
    for prefix in prefixes:
        documents = len(IndexedDataset(str(prefix), mmap=True).document_indices) - 1
        counts = documents_per_split(documents, split)
        empty = [SPLIT_NAMES[i] for i, n in enumerate(counts) if weighted[i] and n == 0]
        if empty:
            shares = ", ".join(f"{name} {n}" for name, n in zip(SPLIT_NAMES, counts))
            them = "them" if len(empty) > 1 else "it"
            raise MegacloneError(
                f"--split {split} over {prefix} ({documents} documents) gives {shares} documents: the "
                f"{' and '.join(empty)} split{'s have' if len(empty) > 1 else ' has'} a weight but no document",
                f"give {them} a larger share (for {documents} documents, e.g. --split "
                f"{_fitting_split(documents, weighted)}), a weight of 0 if unused, or add documents",
            )


def _fitting_split(documents: int, weighted: Sequence[bool]) -> str:
    """A simple split that gives every weighted split at least one document (the suggestion above)."""
    weights = [1 if w else 0 for w in weighted]
    if documents < sum(weights):
        return ",".join(map(str, weights)) + " with more documents"
    weights[0] = max(1, documents - sum(weights[1:]))
    return ",".join(map(str, weights))


@dataclass(frozen=True)
class DataSource:
    """Megatron-LM's two ways of naming data: one blend (``--data-path``) cut into training,
    validation and test documents by ``--split``, or one blend per split (``--train-data-path``,
    ``--valid-data-path``, ``--test-data-path``), each used whole. Exactly one is given."""

    data_path: Optional[tuple[str, ...]] = None
    split: Optional[str] = None
    per_split: Optional[tuple[Optional[tuple[str, ...]], ...]] = None  # training, validation, test

    def __post_init__(self):
        if (self.data_path is None) == (self.per_split is None or not any(self.per_split)):
            raise MegacloneError(
                "no data" if self.data_path is None else "both --data-path and per-split data paths given",
                "pass --data-path PREFIX (cut by --split), or --train-data-path/--valid-data-path/--test-data-path")
        if self.per_split is not None and len(self.per_split) != 3:
            raise ValueError("per_split holds one entry per split: training, validation, test")

    def blends(self) -> list:
        """megatron-core's parse of every blend named (None for a split given no path)."""
        from megatron.core.datasets.utils import get_blend_from_list

        paths = [self.data_path] if self.data_path is not None else self.per_split
        return [get_blend_from_list(list(p)) if p else None for p in paths]

    def files(self) -> list[Path]:
        return [Path(f"{prefix}{suffix}") for blend in self.blends() if blend for prefix in blend[0]
                for suffix in (".bin", ".idx")]

    def check(self, sampled: Sequence[bool]) -> None:
        """Every named dataset exists, and every split the run samples has documents to draw from."""
        for blend in self.blends():
            for prefix in blend[0] if blend else ():
                check_dataset(prefix)
        if self.data_path is not None:
            check_splits(self.blends()[0][0], self.split, sampled)
            return
        flags = ("--train-data-path", "--valid-data-path", "--test-data-path")
        missing = [flags[i] for i in range(3) if sampled[i] and not self.per_split[i]]
        if missing:
            raise MegacloneError(f"the run samples the {' and '.join(SPLIT_NAMES[flags.index(f)] for f in missing)} "
                                 f"split but {' and '.join(missing)} is not given",
                                 f"pass {' '.join(missing)} PREFIX, or --eval-iters 0 to skip validation")


def build_gpt_datasets(
    source: DataSource,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    tokenizer: ByteTokenizer,
    cache: Optional[Path] = None,
    valid_seed: Optional[int] = None,
):
    """(train, valid, test) GPTDatasets from Megatron-LM-style data flags (see ``DataSource``).
    Built on every rank (every rank reads data here; there is no pipeline). Megatron-LM shuffles every
    split with ``seed``; with ``valid_seed`` the validation and test samples are drawn with it instead,
    so runs that differ in their training seed are validated on the same samples."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    source.check([n > 0 for n in num_samples])
    blends = source.blends()
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blends[0] if source.data_path is not None else None,
        blend_per_split=blends if source.per_split is not None else None,
        split=source.split if source.data_path is not None else None,
        path_to_cache=str(cache) if cache else None,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()
    if valid_seed is not None and valid_seed != seed:
        config = dataclasses.replace(config, random_seed=valid_seed)
        _, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()
    return train, valid, test
