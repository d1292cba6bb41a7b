"""Writing a Hugging Face directory from full Megatron tensors: the row maps run backwards, safetensors
shards dealt across ranks, config.json written last (it marks the directory complete).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megaclone import stopping
from megaclone.errors import MegacloneError, writing
from megaclone.formats import hf
from megaclone.formats.hf.mapping import HFTensor
from megaclone.runtime import gathered
from megaclone.shape.layout import catalogue
from megaclone.shape.spec import ModelSpec

CONFIG = "config.json"


def check_constant(t: HFTensor, key: str, layer: Optional[int], full: torch.Tensor, model_type: str) -> None:
    """Refuse to export a tensor the HF model keeps constant (has no parameter for) once it differs."""
    if t.constant is not None and not bool((full == t.constant).all()):
        where = key + ("" if layer is None else f" (layer {layer})")
        raise MegacloneError(
            f"{where} is no longer {t.constant:g} everywhere, but transformers' {model_type} has no parameter for "
            "it (a non-parametric norm): exporting would change the function",
            "keep the model in Megatron; a width-grown tied model carries 1/n in its final norm and cannot be "
            "exported to such a family")


def hf_tensors_from(t: HFTensor, layer: Optional[int], full: torch.Tensor) -> dict[str, torch.Tensor]:
    """The HF tensors one full Megatron tensor (one layer of it) holds: the row maps run backwards.
    A constant holds none (``check_constant`` first)."""
    import torch

    if t.per_expert:  # full is experts x rows x cols: one HF tensor per expert
        return {name: value for e in range(full.shape[0]) for name, value in
                hf_tensors_from(t.for_expert(e), layer, full[e]).items()}
    part, hrow = t.row_map(np.arange(full.shape[0]))
    out = {}
    for p, name in enumerate(t.names):
        sel = np.nonzero(part == p)[0]
        rows = int(hrow[sel].max()) + 1 if len(sel) else 0
        piece = full.new_zeros((rows,) + tuple(full.shape[1:]))  # rows no Megatron row maps to stay zero
        piece[torch.from_numpy(hrow[sel])] = full[torch.from_numpy(sel)]
        out[name.format(i=layer)] = (piece.T if t.transposed and piece.dim() == 2 else piece).contiguous()
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json")


def shard_name(rank: int, world: int) -> str:
    return "model.safetensors" if world == 1 else f"model-{rank + 1:05d}-of-{world:05d}.safetensors"


# config.json fields that describe the file or the run that wrote it, not the model: never carried over
NOT_CARRIED = ("architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path")


def hf_config(spec: ModelSpec, model_type: str, dtype: torch.dtype, base: Optional[dict] = None,
              src_layer_of: Optional[Sequence[int]] = None):
    """transformers' config for ``spec``: the family's shape fields over ``base`` (the source's config.json,
    growing HF to HF), whose other fields (token ids, soft-capping, windows...) pass through unchanged; a
    per-layer list (``layer_types``) follows each destination layer's source layer (``src_layer_of``)."""
    try:
        from transformers import AutoConfig
    except ImportError as exc:
        raise MegacloneError("export needs transformers for config.json", "pip install transformers") from exc
    family = hf.family_of(model_type)
    fields = family.config_from_spec(spec, model_type)
    if base is not None:
        carried = {k: v for k, v in base.items() if k not in NOT_CARRIED}
        if src_layer_of is not None and isinstance(carried.get("layer_types"), list):
            carried["layer_types"] = [carried["layer_types"][int(i)] for i in src_layer_of]
        fields = {**carried, **fields}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.architectures = [family.model_types[model_type]]
    # transformers 4.56 renamed torch_dtype to dtype (and warns on the old name); older ones know torch_dtype only
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)
    return config


def check_exportable(spec: ModelSpec, model_type: str, what: Path) -> None:
    """Refuse, before anything is written, a model that transformers' ``model_type`` cannot hold."""
    family = hf.family_of(model_type)
    if bool(spec.experts) != family.experts:
        kind = f"a mixture of {spec.experts.num} experts" if spec.experts else "dense"
        raise MegacloneError(f"{what} is {kind}, but transformers' {model_type} is "
                             + ("a mixture of experts" if family.experts else "dense"),
                             "export as a model_type of its kind (--model-type), or keep the model in Megatron")
    if not family.grouped_query and spec.num_query_groups != spec.num_attention_heads:
        raise MegacloneError(
            f"{what} has {spec.num_attention_heads} heads in {spec.num_query_groups} query groups, but "
            f"transformers' {model_type} has no grouped-query attention",
            "keep this model in Megatron, or grow it without --query-group-factor")
    cannot = family.cannot_hold(spec)
    if cannot:
        raise MegacloneError(f"transformers' {model_type} cannot hold {what}: {cannot}",
                             "export as the model_type it came from (--model-type), or keep the model in Megatron")
    unplaced = [t.key for t in catalogue(spec) if t.key not in family.layout(spec)]
    if unplaced:
        raise MegacloneError(f"transformers' {model_type} has no place for {', '.join(unplaced)} of {what}",
                             "export as a model_type that has them (--model-type), or keep the model in Megatron")


def hf_pieces(spec: ModelSpec) -> tuple[list[tuple[str, Optional[int]]], list[int]]:
    """Every (tensor, layer) of the model, with its number of elements: the units dealt to ranks."""
    tensors = [(t, layer) for t in catalogue(spec) for layer in t.layers(spec.num_layers)]
    return [(t.key, layer) for t, layer in tensors], [math.prod(t.shape) * max(1, t.experts) for t, _ in tensors]


def hf_shard(layout: dict[str, HFTensor], model_type: str,
             fulls: Iterable[tuple[str, Optional[int], torch.Tensor]]) -> dict[str, torch.Tensor]:
    """This rank's HF tensors from its full Megatron tensors ``(key, layer, tensor)``, each refused first
    if the family keeps it constant and it is not (:func:`check_constant`)."""
    mine: dict[str, torch.Tensor] = {}
    for key, layer, full in fulls:
        check_constant(layout[key], key, layer, full, model_type)
        mine.update(hf_tensors_from(layout[key], layer, full))
    return mine


def write_claimed_hf(claim, out: Path, make_shard: Callable[[], dict[str, torch.Tensor]], config,
                     tokenizer: Optional[Path]) -> int:
    """The one HF write sequence (export and --save-hf): every rank makes its shard (a refusal on any
    rank stops every rank before an earlier output is removed), the claim clears the destination, then
    :func:`write_hf`. Returns the number of HF tensors written by all ranks."""
    from megaclone.runtime import agree

    mine = agree(make_shard)
    claim.clear()
    return write_hf(out, mine, config, tokenizer)


def write_hf(out: Path, mine: dict[str, torch.Tensor], config, tokenizer: Optional[Path]) -> int:
    """Every rank writes its HF tensors as one safetensors shard; rank 0 then writes the index, the
    tokenizer files and ``config.json`` (``config``, from :func:`hf_config`) last: a directory without it
    is not a loadable model.
    Returns the number of HF tensors written by all ranks."""
    from safetensors.torch import save_file

    rank, world = dist.get_rank(), dist.get_world_size()
    name = shard_name(rank, world)
    nbytes = sum(v.numel() * v.element_size() for v in mine.values())
    with writing(out, out / name, nbytes):
        save_file(mine, str(out / name), metadata={"format": "pt"})
    shares = gathered((sorted(mine), nbytes))
    names = [n for n, _ in shares]

    def publish() -> None:  # rank 0, once every shard is written: config.json last marks it complete
        weight_map = {t: shard_name(r, world) for r, ts in enumerate(names) for t in ts}
        if world > 1:
            index = {"metadata": {"total_size": sum(b for _, b in shares)}, "weight_map": dict(sorted(weight_map.items()))}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for f in TOKENIZER_FILES:
            if tokenizer is not None and tokenizer.is_dir() and (tokenizer / f).exists():
                shutil.copy2(tokenizer / f, out / f)
        partial = out / (CONFIG + ".tmp")
        config.to_json_file(str(partial))
        os.replace(partial, out / CONFIG)

    stopping.commit(publish, str(out))
    return sum(len(n) for n in names)
