"""Reading a Hugging Face directory as a ``Source``: config.json through the family registry, tensors
through safetensors ``get_slice`` (only the rows and columns a box covers), checked against the
layout before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    import torch

from megaclone.errors import MegacloneError, reading
from megaclone.formats import Format
from megaclone.formats.base import Box, BoxRead, Source, TensorMeta, keyed_runs
from megaclone.formats.hf.configs import check_config
from megaclone.formats.hf.mapping import HFTensor
from megaclone.formats.hf.registry import family_of
from megaclone.shape.layout import catalogue
from megaclone.shape.spec import ModelSpec, pad_vocab


def open_hf_source(root: str | Path, vocab_size: Optional[int] = None) -> Source:
    """A Hugging Face ``save_pretrained`` directory (config.json + safetensors) of a supported family,
    seen as a TP-1 Megatron checkpoint: same keys and shapes, rows read straight from the HF files."""
    root = Path(root)
    if not root.is_dir():
        raise MegacloneError(f"--load-hf {root} is not a directory", "pass a save_pretrained directory")
    args = read_args(root)
    spec = ModelSpec.from_args(args, vocab_size=vocab_size)
    family = family_of(args.hf_model_type)
    layout = family.layout(spec)
    files = SafetensorsDir(root)
    expected = catalogue(spec)
    missing = [t.key for t in expected if t.key not in layout]
    if missing:
        raise AssertionError(f"{family.name} layout lacks {missing}")
    _check_layer_count(files, layout, spec)  # before anything proportional to the claimed count
    _check_hf_names(files, {n.format(i=i) for t in expected for e in _experts_of(t) for n in _at(layout[t.key], e).names
                            for i in t.layers(spec.num_layers)}, family.name)
    dtypes = set()
    for tensor in expected:
        dtypes |= _check_hf_shapes(files, layout[tensor.key], tensor, spec)
    if len(dtypes) != 1:
        raise MegacloneError(f"the HF tensors mix dtypes {sorted(map(str, dtypes))}", "save the model in one dtype")
    dtype = dtypes.pop()
    tensors = {t.key: TensorMeta(t.stored_shape(spec.num_layers), dtype) for t in expected}

    def read(r: BoxRead) -> list[torch.Tensor]:
        return [read_box(files, layout[r.key], r.layer, box, dtype) for box in r.boxes]

    return Source(root, spec, args, tensors, dtype, read, format=Format.HF)


def _check_layer_count(files: SafetensorsDir, layout: dict[str, HFTensor], spec: ModelSpec) -> None:
    """config.json's layer count is the one the stored tensors hold (a claim of a billion layers must not
    build a billion names first)."""
    import re

    pattern = next((name for t in layout.values() for name in t.names if "{i}" in name and "{e}" not in name), None)
    if pattern is None:
        return
    regex = re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(\d+)"))
    found = {int(m.group(1)) for name in files.files if (m := regex.fullmatch(name))}
    stored = max(found) + 1 if found else 0
    if stored != spec.num_layers:
        raise MegacloneError(f"{files.root / 'config.json'} declares {spec.num_layers} layers, but the safetensors "
                             f"files hold {stored} ({pattern.format(i='N')})",
                             "correct num_hidden_layers in config.json, or copy the complete model")


def _check_hf_names(files: SafetensorsDir, used: set[str], family: str) -> None:
    """The files hold exactly the tensors the import reads (nanoGPT's ``from_pretrained`` rule): a
    tensor it needs and cannot find, or one it would leave unread (a feature this importer does not
    model, whose weights would be lost without a word), is refused by name."""
    stored = {name for name in files.files if not name.endswith(NON_PARAMETER_BUFFERS)}
    for names, problem, fix in (
        (sorted(used - stored), "lacks tensors its config.json implies",
         "the safetensors files do not match config.json: save the model again with save_pretrained"),
        (sorted(stored - used), "holds tensors the import would not read",
         f"they belong to a feature megaclone's {family} import does not model; it would drop them silently. "
         "Use a model without them, or convert them into the model's own weights first"),
    ):
        if names:
            shown = ", ".join(repr(n) for n in names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            raise MegacloneError(f"{files.root} {problem}: {shown}", fix)


def _experts_of(tensor) -> list[Optional[int]]:
    """The experts of a per-expert Megatron tensor, or [None]."""
    return list(range(tensor.experts)) if tensor.experts else [None]


def _at(t: HFTensor, expert: Optional[int]) -> HFTensor:
    return t if expert is None else t.for_expert(expert)


def _check_hf_shapes(files: SafetensorsDir, t: HFTensor, tensor, spec: ModelSpec) -> set[torch.dtype]:
    """Every HF tensor behind one Megatron tensor exists with the shape config.json implies; their dtypes."""
    if t.per_expert:
        return set().union(*(_check_hf_shapes(files, t.for_expert(e), dataclasses.replace(tensor, experts=0), spec)
                             for e in range(tensor.experts)))
    dtypes = set()
    part, row = t.row_map(np.arange(tensor.shape[0]))
    for p, name in enumerate(t.names):
        rows = int(row[part == p].max()) + 1 if (part == p).any() else 0
        expected = (rows,) + tensor.shape[1:]
        if t.transposed and len(expected) == 2:
            expected = expected[::-1]
        layer_names = [name.format(i=i) for i in tensor.layers(spec.num_layers)]
        for n in layer_names:
            shape, dtype = files.shape_dtype(n)
            if shape != expected:
                raise MegacloneError(f"HF tensor {n!r} has shape {shape}, but config.json implies {expected}",
                                     "the safetensors files do not match config.json")
            dtypes.add(dtype)
    return dtypes


DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}  # safetensors -> torch


# Buffers that older transformers versions saved beside the weights (causal masks, RoPE frequencies):
# recomputed by every model, never imported.
NON_PARAMETER_BUFFERS = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias",
                         "rotary_emb.inv_freq")


class SafetensorsDir:
    """The ``*.safetensors`` files of an HF directory (single file or sharded with an index)."""

    def __init__(self, root: Path):
        self.root = root
        index = root / "model.safetensors.index.json"
        if index.exists():
            with reading(index):
                self.files = {name: root / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        elif (root / "model.safetensors").exists():
            from safetensors import safe_open

            with reading(root / "model.safetensors"), safe_open(root / "model.safetensors", framework="pt") as f:
                self.files = {name: root / "model.safetensors" for name in f.keys()}
        else:
            raise MegacloneError(f"{root} holds no model.safetensors or model.safetensors.index.json",
                                 "save the model with save_pretrained(..., safe_serialization=True)")
        self._open: dict[Path, object] = {}

    def handle(self, name: str):
        from safetensors import safe_open

        if name not in self.files:
            raise MegacloneError(f"{self.root} has no tensor {name!r}", "the files do not match config.json")
        path = self.files[name]
        if path not in self._open:
            with reading(path, f"{path} (holding {name!r})"):
                self._open[path] = safe_open(str(path), framework="pt").__enter__()
        return self._open[path]

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        s = self.handle(name).get_slice(name)
        import torch

        if s.get_dtype() not in DTYPES:
            raise MegacloneError(f"HF tensor {name!r} in {self.files[name]} is stored as {s.get_dtype()}, which "
                                 f"megaclone does not read (only {', '.join(DTYPES)})",
                                 "save the model's weights in a floating-point dtype")
        return tuple(s.get_shape()), getattr(torch, DTYPES[s.get_dtype()])


def read_box(files: SafetensorsDir, t: HFTensor, layer: Optional[int], box: Box, dtype: torch.dtype) -> torch.Tensor:
    """One box of a Megatron tensor from the HF files, reading only the rows and columns it covers."""
    import torch

    if t.per_expert:  # the box leads with the expert axis: one HF tensor per expert
        inner = Box(box.offsets[1:], box.lengths[1:])
        first, count = box.offsets[0], box.lengths[0]
        return torch.stack([read_box(files, t.for_expert(e), layer, inner, dtype) for e in range(first, first + count)])
    if t.constant is not None:
        return torch.full(box.lengths, t.constant, dtype=dtype)
    rows = np.arange(box.offsets[0], box.offsets[0] + box.lengths[0])
    part, hrow = t.row_map(rows)
    names = [n.format(i=layer) for n in t.names]
    out = torch.zeros(box.lengths, dtype=dtype)
    cols = None if len(box.lengths) == 1 else slice(box.offsets[1], box.offsets[1] + box.lengths[1])
    for a, b in keyed_runs(part, hrow):
        if part[a] < 0:
            continue
        name = names[part[a]]
        sl = files.handle(name).get_slice(name)
        r = slice(int(hrow[a]), int(hrow[b - 1]) + 1)
        if cols is None:
            out[a:b] = sl[r]
        elif t.transposed:
            out[a:b] = sl[cols, r].T
        else:
            out[a:b] = sl[r, cols]
    return out


def read_config(root: Path) -> dict:
    path = root / "config.json"
    if not path.exists():
        raise MegacloneError(f"{root} has no config.json", "point --load-hf at a save_pretrained directory")
    with reading(path):
        config = json.loads(path.read_text())
    return check_config(config, str(path))


def read_args(root: Path, make_vocab_size_divisible_by: int = 128) -> argparse.Namespace:
    """Megatron-LM args for an HF model (TP 1), with the tokenizer it came with."""
    config = read_config(root)
    family = family_of(config.get("model_type"))
    try:
        fields = family.args_from_config(config)
    except KeyError as exc:
        raise MegacloneError(f"{root / 'config.json'} lacks {exc.args[0]!r}, which {family.name} models need",
                             "save the model again with save_pretrained (its config.json names every size)") from None
    vocab = config["vocab_size"]
    args = argparse.Namespace(**fields)
    args.vocab_size = vocab
    args.padded_vocab_size = pad_vocab(vocab, make_vocab_size_divisible_by, 1)
    args.make_vocab_size_divisible_by = make_vocab_size_divisible_by
    args.tensor_model_parallel_size = 1
    args.pipeline_model_parallel_size = 1
    args.seq_length = fields["max_position_embeddings"]
    args.tokenizer_type = "HuggingFaceTokenizer"
    args.tokenizer_model = str(root.resolve())
    args.hf_model_type = config["model_type"]
    args.ckpt_format = "torch_dist"
    return args
