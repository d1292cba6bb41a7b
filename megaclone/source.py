"""Sources of an expansion: a Megatron torch_dist checkpoint or a Hugging Face directory, validated
before anything is written, each able to read any box of any Megatron tensor.

``Source.read(key, layer, boxes)`` returns the boxes of one Megatron tensor (one layer of a stacked
one). For torch_dist it is one collective ``dist_checkpointing.load`` (every rank calls it, even with
no boxes); for Hugging Face it is local safetensors ``get_slice`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import checkpoint as ckpt_io
from . import hf
from .errors import MegacloneError
from .partition import param_rules
from .plan import Box
from .spec import ModelSpec

Reader = Callable[[str, Optional[int], Sequence[Box]], list[torch.Tensor]]


@dataclass(frozen=True)
class Source:
    """A validated source: where it is, its spec and Megatron args, every tensor's global shape and
    dtype (torch_dist naming), and how to read boxes of them."""

    path: Path
    spec: ModelSpec
    args: object
    tensors: dict[str, ckpt_io.TensorMeta]
    dtype: torch.dtype
    read: Reader
    kind: str = "torch_dist"


def _expected_shape(spec: ModelSpec, rule) -> tuple[int, ...]:
    return ((spec.num_layers,) if rule.per_layer else ()) + rule.src_shape


def open_source(root: str | Path, vocab_size: Optional[int] = None) -> Source:
    """A Megatron-LM torch_dist checkpoint: args present, every tensor the model needs stored with the
    shape its args imply, every shard file present and complete."""
    path = ckpt_io.find_checkpoint(root)
    common = ckpt_io.read_common(path)
    spec = ModelSpec.from_args(common["args"], vocab_size=vocab_size)
    tensors = ckpt_io.read_tensor_metadata(path)
    ckpt_io.check_storage(path)
    rules = param_rules(spec, spec)
    for rule in rules:
        meta = tensors.get(rule.key)
        if meta is None:
            raise MegacloneError(
                f"the source checkpoint {path} has no tensor {rule.key!r}, which its args imply",
                "check that the args in common.pt describe the saved model (e.g. swiglu, add_bias_linear, "
                "position_embedding_type, untie_embeddings_and_output_weights)",
            )
        if meta.shape != _expected_shape(spec, rule):
            raise MegacloneError(
                f"source tensor {rule.key!r} has shape {meta.shape}, but the checkpoint args imply "
                f"{_expected_shape(spec, rule)}",
                "the checkpoint args do not match its weights; fix the args or re-save the checkpoint",
            )
    dtypes = {tensors[r.key].dtype for r in rules}
    if len(dtypes) != 1:
        raise MegacloneError(f"source parameters mix dtypes {sorted(map(str, dtypes))}", "save the source in one dtype")

    def read(key: str, layer: Optional[int], boxes: Sequence[Box]) -> list[torch.Tensor]:
        return ckpt_io.read_boxes(path, key, tensors[key], layer, boxes)

    return Source(path, spec, common["args"], tensors, dtypes.pop(), read)


def open_hf_source(root: str | Path, vocab_size: Optional[int] = None) -> Source:
    """A Hugging Face ``save_pretrained`` directory (config.json + safetensors) of a supported family,
    seen as a TP-1 Megatron checkpoint: same keys and shapes, rows read straight from the HF files."""
    root = Path(root)
    if not root.is_dir():
        raise MegacloneError(f"--load-hf {root} is not a directory", "pass a save_pretrained directory")
    args = hf.megatron_args(root)
    spec = ModelSpec.from_args(args, vocab_size=vocab_size)
    family = hf.family_of(args.hf_model_type)
    layout = family.layout(spec)
    files = hf.SafetensorsDir(root)
    rules = param_rules(spec, spec)
    missing = [r.key for r in rules if r.key not in layout]
    if missing:
        raise AssertionError(f"{family.name} layout lacks {missing}")
    for rule in rules:
        _check_hf_shapes(files, layout[rule.key], rule, spec)
    dtype = hf.check_files(files, {r.key: layout[r.key] for r in rules}, spec)
    tensors = {r.key: ckpt_io.TensorMeta(_expected_shape(spec, r), dtype) for r in rules}

    def read(key: str, layer: Optional[int], boxes: Sequence[Box]) -> list[torch.Tensor]:
        return [hf.read_box(files, layout[key], layer, box, dtype) for box in boxes]

    return Source(root, spec, args, tensors, dtype, read, kind="hf")


def _check_hf_shapes(files: hf.SafetensorsDir, t: hf.HFTensor, rule, spec: ModelSpec) -> None:
    part, row = t.row_map(np.arange(rule.src_shape[0]))
    for p, name in enumerate(t.names):
        rows = int(row[part == p].max()) + 1 if (part == p).any() else 0
        expected = (rows,) + rule.src_shape[1:]
        if t.transposed and len(expected) == 2:
            expected = expected[::-1]
        layer_names = [name.format(i=i) for i in range(spec.num_layers)] if rule.per_layer else [name]
        for n in layer_names:
            shape, _ = files.shape_dtype(n)
            if shape != expected:
                raise MegacloneError(f"HF tensor {n!r} has shape {shape}, but config.json implies {expected}",
                                     "the safetensors files do not match config.json")
