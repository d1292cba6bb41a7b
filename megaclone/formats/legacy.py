"""Megatron-LM's legacy checkpoints (``--ckpt-format torch``): ``mp_rank_XX[_YYY]/model_optim_rng.pt``,
one file per TP rank and pipeline stage. Read as a ``Source`` (memory-mapped, so a box touches only
the pages it covers), loaded into a model as Megatron-LM does, and written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from megaclone.errors import MegacloneError, reading, writing
from megaclone.formats import Format, unpickling
from megaclone.formats.base import Box, BoxRead, Source, TensorMeta, keyed_runs
from megaclone.formats.iterations import (
    LATEST,
    iteration_dirname,
    publish,
    read_tracker,
)
from megaclone.shape.layout import LAYERS, LOCAL_SPEC_NAMES, Split, catalogue, owner_of
from megaclone.shape.spec import ModelSpec


def legacy_files(path: Path) -> dict[tuple[int, int], Path]:
    """(tp rank, pp stage) -> model_optim_rng.pt of a legacy iteration directory."""
    files = {}
    for d in path.glob("mp_rank_*"):
        parts = d.name.split("_")[2:]
        tp_rank, stage = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
        files[(tp_rank, stage)] = d / "model_optim_rng.pt"
    return files


def legacy_dir(root: Path) -> Path:
    root = Path(root)
    if any(root.glob("mp_rank_*")):
        return root
    if not (root / LATEST).exists():
        raise MegacloneError(f"{root} has no {LATEST} and no mp_rank_* directories",
                             "point --load at the directory Megatron-LM saved into with --ckpt-format torch")
    return root / iteration_dirname(read_tracker(root))


def open_legacy_source(root: str | Path, vocab_size: Optional[int] = None) -> Source:
    """A legacy Megatron-LM checkpoint of a megatron-core GPT model (``mp_rank_XX[_YYY]/
    model_optim_rng.pt``, any TP and PP, local or Transformer Engine module names). Files are opened
    memory-mapped, so a box touches only the pages it covers."""
    path = legacy_dir(Path(root))
    files = legacy_files(path)
    if not files:
        raise MegacloneError(f"{path} holds no mp_rank_*/model_optim_rng.pt", "pass a legacy (torch) checkpoint")
    cache: dict[Path, dict] = {}

    def state(tp_rank: int, stage: int) -> dict:
        f = files.get((tp_rank, stage))
        if f is None or not f.exists():
            raise MegacloneError(f"{path} lacks the file of TP rank {tp_rank}, stage {stage}",
                                 "copy the complete checkpoint directory")
        if f not in cache:
            with reading(f):
                cache[f] = unpickling.load(f, mmap=True)
        return cache[f]

    first = state(0, 0)
    if "model" not in first or "args" not in first:
        raise MegacloneError(f"{files[(0, 0)]} holds no 'model' or 'args'",
                             "only Megatron-LM training checkpoints (megatron-core models) are supported")
    args = first["args"]
    spec = ModelSpec.from_args(args, vocab_size=vocab_size)
    tp = getattr(args, "tensor_model_parallel_size", 1)
    pp = getattr(args, "pipeline_model_parallel_size", 1)
    if set(files) != {(r, s) for r in range(tp) for s in range(pp)}:
        raise MegacloneError(f"{path} has files for {sorted(files)}, but its args say TP {tp} x PP {pp}",
                             "copy the complete checkpoint directory")
    per_stage = spec.num_layers // pp
    entries = {t.key: t for t in catalogue(spec)}

    def local_tensor(key: str, layer: Optional[int], tp_rank: int) -> torch.Tensor:
        stage = 0 if key.startswith("embedding.") else pp - 1 if layer is None else layer // per_stage
        model = state(tp_rank, stage)["model"]
        if layer is None:
            names = [key]
        else:
            suffix = key[len(LAYERS):]
            prefix = f"{LAYERS}{layer % per_stage}."
            names = [prefix + suffix] + ([prefix + LOCAL_SPEC_NAMES[suffix]] if suffix in LOCAL_SPEC_NAMES else [])
        for name in names:
            if name in model:
                return model[name]
        raise MegacloneError(f"{path}: no {' or '.join(names)} in TP rank {tp_rank}, stage {stage}",
                             "the checkpoint args do not match its weights")

    def read_box(key: str, layer: Optional[int], box: Box) -> torch.Tensor:
        entry = entries[key]
        axis = entry.split.axis
        if axis is None:
            t = local_tensor(key, layer, 0)
            return t[tuple(slice(o, o + n) for o, n in zip(box.offsets, box.lengths))].clone()
        size = entry.shape[axis]
        index = np.arange(box.offsets[axis], box.offsets[axis] + box.lengths[axis])
        rank, local = owner_of(index, size, entry.parts, tp)
        pieces = []
        for a, b in keyed_runs(rank, local):
            sl = [slice(o, o + n) for o, n in zip(box.offsets, box.lengths)]
            sl[axis] = slice(int(local[a]), int(local[b - 1]) + 1)
            pieces.append(local_tensor(key, layer, int(rank[a]))[tuple(sl)])
        return torch.cat(pieces, dim=axis).clone()

    dtype = local_tensor("embedding.word_embeddings.weight", None, 0).dtype
    tensors = {}
    for key, entry in entries.items():
        tensors[key] = TensorMeta(entry.stored_shape(spec.num_layers), dtype)
        for layer in entry.layers(spec.num_layers):
            for tp_rank in range(tp if entry.split is not Split.REPLICATED else 1):
                t = local_tensor(key, layer, tp_rank)
                expected = entry.local_shape(tp)
                if tuple(t.shape) != expected or t.dtype != dtype:
                    raise MegacloneError(
                        f"{path}: {key} (layer {layer}, TP rank {tp_rank}) is {tuple(t.shape)} {t.dtype}, but the args "
                        f"imply {tuple(expected)} {dtype}", "the checkpoint args do not match its weights")

    def read(r: BoxRead) -> list[torch.Tensor]:
        return [read_box(r.key, r.layer, box) for box in r.boxes]

    return Source(path, spec, args, tensors, dtype, read, format=Format.LEGACY, clone_record=first.get("megaclone"))


def load_legacy_model(model: torch.nn.Module, path: Path, spec: ModelSpec, pipeline: int = 1) -> None:
    """Megatron-LM's legacy load: this TP rank's files (every pipeline stage joined), strict."""
    from megatron.core import parallel_state

    state = legacy_model_state(path, parallel_state.get_tensor_model_parallel_rank(), pipeline,
                                       spec.num_layers // pipeline)
    if spec.tied:  # the last stage keeps a copy of the embedding as the output layer; one stage shares it
        state.pop("output_layer.weight", None)
    model.load_state_dict(state, strict=True)


def legacy_file(ckpt: Path, tp_rank: int, stage: int = 0, pipeline: int = 1) -> Path:
    """Megatron-LM's --ckpt-format torch file of one (TP rank, pipeline stage)."""
    name = f"mp_rank_{tp_rank:02d}" + (f"_{stage:03d}" if pipeline > 1 else "")
    return ckpt / name / "model_optim_rng.pt"


def legacy_model_state(ckpt: Path, tp_rank: int, pipeline: int, layers_per_stage: int) -> dict[str, Any]:
    """One TP rank's model state dict of a legacy checkpoint, its pipeline stages joined as Megatron-LM
    numbers layers within a stage (stage s's layer i is global layer s * layers_per_stage + i), with
    local-spec module names and no Transformer Engine ``_extra_state``: what a local-spec GPTModel of
    the same TP and pipeline size 1 loads with ``load_state_dict(strict=True)``."""
    import re

    state: dict[str, Any] = {}
    for stage in range(pipeline):
        file = legacy_file(ckpt, tp_rank, stage, pipeline)
        with reading(file):
            model = unpickling.load(file)["model"]
        for key, value in model.items():
            if key.endswith("._extra_state"):
                continue
            m = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
            if m:
                suffix = LOCAL_SPEC_NAMES.get(m.group(2), m.group(2))
                key = f"{LAYERS}{stage * layers_per_stage + int(m.group(1))}.{suffix}"
            state[key] = value
    return state


def save_legacy_checkpoint(root: Path, iteration: int, state: dict[str, Any], tp_rank: int, writer: bool) -> Path:
    """Save in Megatron-LM's legacy layout (``iter_NNNNNNN/mp_rank_TT/model_optim_rng.pt``, one
    ``torch.save`` per TP rank; ``writer`` is False on data-parallel replicas), then publish it with
    the tracker file once every rank has finished, as :func:`save_checkpoint` does."""
    import torch

    path = Path(root) / iteration_dirname(iteration)
    if writer:
        target = legacy_file(path, tp_rank)
        with writing(root, target.parent):
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, target)
    publish(Path(root), iteration)
    return path
