"""Export a Megatron torch_dist checkpoint to a Hugging Face directory that transformers loads.

Any world size: the (tensor, layer) pieces are dealt to ranks by size; each rank reads its own pieces
one at a time (checkpoint.BoxReader, no collective), turns each into the family's HF tensors and
writes one safetensors shard. Rank 0 writes the index, then ``config.json`` last, after
every shard is on disk: a directory without ``config.json`` is not a loadable model.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt_io
from . import destination, hf
from .errors import MegacloneError, writing
from .layout import catalogue
from .plan import Box, BoxRead
from .runtime import agree, gathered
from .spec import ModelSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json")


def deal(sizes: list[int], world: int) -> list[int]:
    """Owner rank of each piece: largest first onto the least-loaded rank (deterministic)."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def shard_name(rank: int, world: int) -> str:
    return "model.safetensors" if world == 1 else f"model-{rank + 1:05d}-of-{world:05d}.safetensors"


def _hf_config(spec: ModelSpec, model_type: str, dtype: torch.dtype):
    try:
        from transformers import AutoConfig
    except ImportError as exc:
        raise MegacloneError("export needs transformers for config.json", "pip install transformers") from exc
    fields = hf.family_of(model_type).config_from_spec(spec, model_type)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.architectures = [hf.family_of(model_type).model_types[model_type]]
    # transformers 4.56 renamed torch_dtype to dtype (and warns on the old name); older ones know torch_dtype only
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)
    return config


def check_exportable(spec: ModelSpec, model_type: str, what: Path) -> None:
    """Refuse, before anything is written, a model that transformers' ``model_type`` cannot hold."""
    family = hf.family_of(model_type)
    if spec.experts:
        raise MegacloneError(f"{what} is a mixture of {spec.experts.num} experts; megaclone writes dense Hugging "
                             "Face families only", "keep the mixture of experts in Megatron (export and --save-hf take dense models)")
    if not family.grouped_query and spec.num_query_groups != spec.num_attention_heads:
        raise MegacloneError(
            f"{what} has {spec.num_attention_heads} heads in {spec.num_query_groups} query groups, but "
            f"transformers' {model_type} has no grouped-query attention",
            "keep this model in Megatron, or grow it without --query-group-factor")
    unplaced = [t.key for t in catalogue(spec) if t.key not in family.layout(spec)]
    if unplaced:
        raise MegacloneError(f"transformers' {model_type} has no place for {', '.join(unplaced)} of {what}",
                             "export as a model_type that has them (--model-type), or keep the model in Megatron")


def hf_pieces(spec: ModelSpec) -> tuple[list[tuple[str, Optional[int]]], list[int]]:
    """Every (tensor, layer) of the model, with its number of elements: the units dealt to ranks."""
    tensors = [(t, layer) for t in catalogue(spec) for layer in t.layers(spec.num_layers)]
    return [(t.key, layer) for t, layer in tensors], [math.prod(t.shape) for t, _ in tensors]


def write_hf(out: Path, mine: dict[str, torch.Tensor], spec: ModelSpec, model_type: str, dtype: torch.dtype,
             tokenizer: Optional[Path]) -> int:
    """Every rank writes its HF tensors as one safetensors shard; rank 0 then writes the index, the
    tokenizer files and ``config.json`` last (a directory without it is not a loadable model).
    Returns the number of HF tensors written by all ranks."""
    from safetensors.torch import save_file

    rank, world = dist.get_rank(), dist.get_world_size()
    name = shard_name(rank, world)
    nbytes = sum(v.numel() * v.element_size() for v in mine.values())
    with writing(out, out / name, nbytes):
        save_file(mine, str(out / name), metadata={"format": "pt"})
    shares = gathered((sorted(mine), nbytes))
    names = [n for n, _ in shares]
    if rank == 0:
        weight_map = {t: shard_name(r, world) for r, ts in enumerate(names) for t in ts}
        if world > 1:
            index = {"metadata": {"total_size": sum(b for _, b in shares)}, "weight_map": dict(sorted(weight_map.items()))}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for f in TOKENIZER_FILES:
            if tokenizer is not None and tokenizer.is_dir() and (tokenizer / f).exists():
                shutil.copy2(tokenizer / f, out / f)
        _hf_config(spec, model_type, dtype).save_pretrained(str(out))  # last: marks it complete
    dist.barrier()
    return sum(len(n) for n in names)


def export_hf(root: str | Path, out: str | Path, model_type: Optional[str] = None, overwrite: bool = False) -> dict:
    """Write ``out`` (config.json, safetensors shards, index, tokenizer files); all ranks call it."""
    out = Path(out)
    rank, world = dist.get_rank(), dist.get_world_size()

    def validate():
        path = ckpt_io.find_checkpoint(root)
        args = ckpt_io.read_common(path)["args"]
        spec = ModelSpec.from_args(args)
        mtype = model_type or getattr(args, "hf_model_type", None) or hf.infer_model_type(spec)
        check_exportable(spec, mtype, path)
        return path, args, spec, mtype

    path, args, spec, mtype = agree(validate)
    layout = hf.family_of(mtype).layout(spec)
    meta = ckpt_io.read_tensor_metadata(path)
    with destination.Claim.take(out, destination.Kind.HF, [Path(root), path], overwrite) as claim:
        pieces, sizes = hf_pieces(spec)
        reader = ckpt_io.BoxReader(path)

        def read_mine() -> dict[str, torch.Tensor]:
            mine = {}
            for (key, layer), who in zip(pieces, deal(sizes, world)):
                if who != rank:
                    continue
                shape = meta[key].shape[1:] if layer is not None else meta[key].shape
                [full] = reader.read(BoxRead(key, layer, (Box(tuple(0 for _ in shape), tuple(shape)),)))
                hf.check_constant(layout[key], key, layer, full, mtype)
                mine.update(hf.hf_tensors_from(layout[key], layer, full))
            return mine

        mine = agree(read_mine)  # a refusal on any rank stops every rank before an earlier output is removed
        claim.clear()
        tokenizer = Path(args.tokenizer_model) if getattr(args, "tokenizer_model", None) else None
        count = write_hf(out, mine, spec, mtype, meta[pieces[0][0]].dtype, tokenizer)
    return {"model_type": mtype, "tensors": count, "files": world}
