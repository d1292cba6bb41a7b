"""Sources of an expansion: a Megatron torch_dist checkpoint or a Hugging Face directory, validated
before anything is written, each able to read any box of any Megatron tensor.

``Source.read(box_read)`` returns the boxes of one Megatron tensor (one layer of a stacked one), a
tensor per box. Every kind reads locally, each rank on its own: torch DCP's reader for torch_dist
(checkpoint.BoxReader), safetensors ``get_slice`` for Hugging Face, memory-mapped ``torch.load`` for
legacy files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import checkpoint as ckpt_io
from . import hf
from . import unpickling
from .errors import MegacloneError, reading
from .layout import LAYERS, LOCAL_SPEC_NAMES, Split, catalogue
from .partition import owner_of
from .plan import Box, BoxRead, keyed_runs
from .spec import Depth, ModelSpec

Reader = Callable[[BoxRead], list[torch.Tensor]]


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
    clone_record: Optional[dict] = None  # what megaclone recorded if it wrote this checkpoint (factors, depth...)

    @property
    def not_function_preserving(self) -> Optional[str]:
        return not_function_preserving(self.clone_record)


def not_function_preserving(clone_record: Optional[dict]) -> Optional[str]:
    """Why a clone (by the record megaclone wrote with it) does not compute its source's function by
    design; None when it does, or when the checkpoint is not a clone."""
    depth = Depth(**(clone_record or {}).get("depth", {}))
    if depth.function_preserving:
        return None
    return (f"this clone was grown in depth with --depth-init {depth.init} (x{depth.factor}): its added layers are "
            "exact copies that change the function, so its logits are not the source's by design")


def open_source(root: str | Path, vocab_size: Optional[int] = None) -> Source:
    """A Megatron-LM torch_dist checkpoint: args present, every tensor the model needs stored with the
    shape its args imply, every shard file present and complete."""
    path = ckpt_io.find_checkpoint(root)
    common = ckpt_io.read_common(path)
    spec = ModelSpec.from_args(common["args"], vocab_size=vocab_size)
    tensors = ckpt_io.read_tensor_metadata(path)
    ckpt_io.check_storage(path)
    expected = catalogue(spec)
    for tensor in expected:
        meta = tensors.get(tensor.key)
        if meta is None:
            raise MegacloneError(
                f"the source checkpoint {path} has no tensor {tensor.key!r}, which its args imply",
                "check that the args in common.pt describe the saved model (e.g. swiglu, add_bias_linear, "
                "position_embedding_type, untie_embeddings_and_output_weights)",
            )
        if meta.shape != tensor.stored_shape(spec.num_layers):
            raise MegacloneError(
                f"source tensor {tensor.key!r} has shape {meta.shape}, but the checkpoint args imply "
                f"{tensor.stored_shape(spec.num_layers)}",
                "the checkpoint args do not match its weights; fix the args or re-save the checkpoint",
            )
    dtypes = {tensors[t.key].dtype for t in expected}
    if len(dtypes) != 1:
        raise MegacloneError(f"source parameters mix dtypes {sorted(map(str, dtypes))}", "save the source in one dtype")

    return Source(path, spec, common["args"], tensors, dtypes.pop(), ckpt_io.BoxReader(path).read,
                  clone_record=common.get("megaclone"))


def open_hf_source(root: str | Path, vocab_size: Optional[int] = None) -> Source:
    """A Hugging Face ``save_pretrained`` directory (config.json + safetensors) of a supported family,
    seen as a TP-1 Megatron checkpoint: same keys and shapes, rows read straight from the HF files."""
    root = Path(root)
    if not root.is_dir():
        raise MegacloneError(f"--load-hf {root} is not a directory", "pass a save_pretrained directory")
    args = hf.read_args(root)
    spec = ModelSpec.from_args(args, vocab_size=vocab_size)
    family = hf.family_of(args.hf_model_type)
    layout = family.layout(spec)
    files = hf.SafetensorsDir(root)
    expected = catalogue(spec)
    missing = [t.key for t in expected if t.key not in layout]
    if missing:
        raise AssertionError(f"{family.name} layout lacks {missing}")
    _check_hf_names(files, {n.format(i=i) for t in expected for n in layout[t.key].names
                            for i in t.layers(spec.num_layers)}, family.name)
    dtypes = set()
    for tensor in expected:
        dtypes |= _check_hf_shapes(files, layout[tensor.key], tensor, spec)
    if len(dtypes) != 1:
        raise MegacloneError(f"the HF tensors mix dtypes {sorted(map(str, dtypes))}", "save the model in one dtype")
    dtype = dtypes.pop()
    tensors = {t.key: ckpt_io.TensorMeta(t.stored_shape(spec.num_layers), dtype) for t in expected}

    def read(r: BoxRead) -> list[torch.Tensor]:
        return [hf.read_box(files, layout[r.key], r.layer, box, dtype) for box in r.boxes]

    return Source(root, spec, args, tensors, dtype, read, kind="hf")


def _check_hf_names(files: hf.SafetensorsDir, used: set[str], family: str) -> None:
    """The files hold exactly the tensors the import reads (nanoGPT's ``from_pretrained`` rule): a
    tensor it needs and cannot find, or one it would leave unread (a feature this importer does not
    model, whose weights would be lost without a word), is refused by name."""
    stored = {name for name in files.files if not name.endswith(hf.NON_PARAMETER_BUFFERS)}
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


def _check_hf_shapes(files: hf.SafetensorsDir, t: hf.HFTensor, tensor, spec: ModelSpec) -> set[torch.dtype]:
    """Every HF tensor behind one Megatron tensor exists with the shape config.json implies; their dtypes."""
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


# ---------------------------------------------------------------- legacy Megatron-LM (--ckpt-format torch)

def _legacy_files(path: Path) -> dict[tuple[int, int], Path]:
    """(tp rank, pp stage) -> model_optim_rng.pt of a legacy iteration directory."""
    files = {}
    for d in path.glob("mp_rank_*"):
        parts = d.name.split("_")[2:]
        tp_rank, stage = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
        files[(tp_rank, stage)] = d / "model_optim_rng.pt"
    return files


def _legacy_dir(root: Path) -> Path:
    root = Path(root)
    if any(root.glob("mp_rank_*")):
        return root
    if not (root / ckpt_io.LATEST).exists():
        raise MegacloneError(f"{root} has no {ckpt_io.LATEST} and no mp_rank_* directories",
                             "point --load at the directory Megatron-LM saved into with --ckpt-format torch")
    return root / ckpt_io.iteration_dirname(ckpt_io.read_tracker(root))


def open_legacy_source(root: str | Path, vocab_size: Optional[int] = None) -> Source:
    """A legacy Megatron-LM checkpoint of a megatron-core GPT model (``mp_rank_XX[_YYY]/
    model_optim_rng.pt``, any TP and PP, local or Transformer Engine module names). Files are opened
    memory-mapped, so a box touches only the pages it covers."""
    path = _legacy_dir(Path(root))
    files = _legacy_files(path)
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
        tensors[key] = ckpt_io.TensorMeta(entry.stored_shape(spec.num_layers), dtype)
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

    return Source(path, spec, args, tensors, dtype, read, kind="torch", clone_record=first.get("megaclone"))


def open_megatron_source(root: str | Path, vocab_size: Optional[int] = None) -> Source:
    """A Megatron-LM checkpoint in either format: torch_dist (metadata.json) or legacy torch
    (mp_rank_* directories), told apart by what the iteration directory holds."""
    root = Path(root)
    try:
        legacy = any(_legacy_dir(root).glob("mp_rank_*"))
    except MegacloneError:
        legacy = False
    return open_legacy_source(root, vocab_size) if legacy else open_source(root, vocab_size)


def open_any_source(path: str | Path, kind: Optional[str] = None, vocab_size: Optional[int] = None) -> Source:
    """A source by its kind ('hf', 'torch', 'torch_dist'), else by what the path holds."""
    path = Path(path)
    if kind == "hf" or (kind is None and (path / "config.json").exists()):
        return open_hf_source(path, vocab_size)
    return open_megatron_source(path, vocab_size)
