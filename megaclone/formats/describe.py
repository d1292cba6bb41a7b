"""Read-only summary of a checkpoint: its args and every stored tensor (shape, dtype, sha256).

A torch_dist checkpoint is listed as stored, optimizer state included, with torch alone (its common
state and DCP metadata); a legacy or Hugging Face one through the reader every job uses
(``formats.source.open_source``), as the Megatron tensors it holds."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from megaclone.formats import torch_dist
from megaclone.shape.layout import LAYERS

SHAPE_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "group_query_attention", "kv_channels", "padded_vocab_size", "tensor_model_parallel_size",
              "swiglu", "normalization", "position_embedding_type", "untie_embeddings_and_output_weights")
MOE_ARGS = ("num_experts", "moe_router_topk", "moe_ffn_hidden_size", "expert_model_parallel_size",
            "moe_router_pre_softmax", "moe_router_load_balancing_type", "moe_aux_loss_coeff")


def tensor_digests(root: str | Path) -> dict[str, str]:
    """sha256 of every stored tensor's bytes (all ranks call it: loading is collective)."""
    loaded = torch_dist.load_plain_tensors(torch_dist.find_checkpoint(root))
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in sorted(loaded.items()) if isinstance(v, torch.Tensor)}


def describe(root: str | Path, digests: bool = False) -> str:
    if not torch_dist.is_torch_dist(root):
        return _describe_source(root, digests)
    path = torch_dist.find_checkpoint(root)
    common = torch_dist.read_common(path)
    args = common["args"]
    lines = [f"{path}  iteration {common.get('iteration')}  checkpoint_version {common.get('checkpoint_version')}"]
    shown = SHAPE_ARGS + (MOE_ARGS if getattr(args, "num_experts", None) else ())
    lines += [f"  {name} = {getattr(args, name, None)!r}" for name in shown]
    sums = tensor_digests(root) if digests else {}
    for key, meta in sorted(torch_dist.read_tensor_metadata(path).items()):
        lines.append(f"  {key:60s} {str(meta.shape):20s} {str(meta.dtype):15s} {sums.get(key, '')}")
    return "\n".join(lines)


def _describe_source(root: str | Path, digests: bool) -> str:
    from megaclone.formats.base import Box, BoxRead
    from megaclone.formats.source import open_source

    source = open_source(root)
    lines = [f"{source.path}  format {source.format.value}"]
    shown = SHAPE_ARGS + (MOE_ARGS if getattr(source.args, "num_experts", None) else ())
    lines += [f"  {name} = {getattr(source.args, name, None)!r}" for name in shown]
    for key, meta in sorted(source.tensors.items()):
        digest = ""
        if digests:
            per_layer = key.startswith(LAYERS)
            layers, whole = (range(meta.shape[0]), meta.shape[1:]) if per_layer else ([None], meta.shape)
            h = hashlib.sha256()
            for layer in layers:
                [t] = source.read(BoxRead(key, layer, (Box.whole(whole),)))
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
            digest = h.hexdigest()
        lines.append(f"  {key:60s} {str(meta.shape):20s} {str(meta.dtype):15s} {digest}")
    return "\n".join(lines)
