"""The layout catalogue: every tensor a megatron-core GPTModel of a given shape stores.

``catalogue(spec)`` is the one list of tensors: each entry's torch_dist key (layers stacked on a
leading axis under ``decoder.layers.``), its shape, and how megatron-core partitions it over tensor
parallelism; pipeline parallelism splits the layer axis into equal stages. Readers, writers, export,
the verifier and the clone rules (``pipeline.rules.param_rules``) all list tensors from it. Pure data.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional, Sequence

import numpy as np

from megaclone.shape.spec import ModelSpec

LAYERS = "decoder.layers."  # prefix of the per-layer tensors, stacked on a leading layer axis
ATTENTION = LAYERS + "self_attention."
MLP = LAYERS + "mlp."
EXPERTS = MLP + "experts.experts."  # megatron-core's key for every expert layout (sequential or grouped GEMM)
ROUTER = MLP + "router.weight"
SHARED = MLP + "shared_experts."  # megatron-core's SharedExpertMLP (moe_shared_expert_intermediate_size)

# Transformer Engine layer specs fuse each pre-norm into the next linear (the keys below); megatron-core's
# local spec (the one that runs on CPU) keeps it a module of its own: its state-dict names, per layer.
# torch_dist keys are the same for both; legacy files use the module names of the spec that saved them.
LOCAL_SPEC_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


class Split(Enum):
    """Megatron's tensor-parallel partitioning of a parameter."""

    COLUMN = "column"  # output rows split (linear_qkv, linear_fc1, output_layer)
    VOCAB = "vocab"  # embedding rows split (word embeddings)
    ROW = "row"  # input columns split (linear_proj, linear_fc2)
    REPLICATED = "replicated"  # norms, row-parallel biases, position embeddings

    @property
    def axis(self) -> Optional[int]:
        return {Split.COLUMN: 0, Split.VOCAB: 0, Split.ROW: 1}.get(self)


@dataclass(frozen=True)
class Tensor:
    """One stored tensor of a GPT: key, shape (one layer's when ``per_layer``), TP split.

    ``parts``: equal parts of the split axis, each divided over TP on its own (2 for SwiGLU's
    ``linear_fc1``, [gate; up]). ``residual_output``: a layer writes through it into the residual
    stream (its attention output and second MLP projection, with their biases). ``experts``: one
    such tensor per expert (a mixture-of-experts MLP), stacked on an axis after the layer axis that
    expert parallelism splits; 0 for every other tensor.
    """

    key: str
    shape: tuple[int, ...]
    split: Split
    per_layer: bool
    parts: int = 1
    residual_output: bool = False
    experts: int = 0

    def __post_init__(self):
        if self.experts and not self.per_layer:
            raise ValueError(f"{self.key}: experts live in the layer stack")
        if self.per_layer != self.key.startswith(LAYERS):
            raise ValueError(f"{self.key}: per-layer tensors, and only they, live under {LAYERS!r}")
        axis = self.split.axis
        if axis is not None and (axis >= len(self.shape) or self.shape[axis] % self.parts):
            raise ValueError(f"{self.key}: {self.parts} parts do not split axis {axis} of {self.shape}")

    def layers(self, num_layers: int) -> Sequence[Optional[int]]:
        """The layer indices it is stored for: every layer, or None once for a tensor outside the stack."""
        return range(num_layers) if self.per_layer else [None]

    def stored_shape(self, num_layers: int) -> tuple[int, ...]:
        """The global shape on disk: the layer axis first for per-layer tensors."""
        return ((num_layers,) if self.per_layer else ()) + ((self.experts,) if self.experts else ()) + self.shape

    def expert_ids(self, ep: int = 1, ep_rank: int = 0) -> Sequence[Optional[int]]:
        """The experts EP rank ``ep_rank`` holds (a contiguous 1/ep of them), or None once for a tensor
        that is not per expert."""
        if not self.experts:
            return [None]
        local = self.experts // ep
        return range(ep_rank * local, (ep_rank + 1) * local)

    def local_shape(self, tp: int) -> tuple[int, ...]:
        """One TP rank's shape (of one layer)."""
        shape = list(self.shape)
        if self.split.axis is not None:
            shape[self.split.axis] //= tp
        return tuple(shape)


def norm_names(spec: ModelSpec) -> list[str]:
    return ["weight"] + (["bias"] if spec.normalization == "LayerNorm" else [])


def catalogue(spec: ModelSpec) -> list[Tensor]:
    """Every tensor of a GPTModel of ``spec`` (megatron-core local or Transformer Engine spec, both
    store these keys), in a fixed order."""
    h, v = spec.hidden_size, spec.padded_vocab_size
    qkv_rows = spec.num_query_groups * spec.qkv_rows_per_group
    heads = spec.num_attention_heads * spec.kv_channels
    fc1_parts = 2 if spec.swiglu else 1
    norms = norm_names(spec)
    out = [Tensor("embedding.word_embeddings.weight", (v, h), Split.VOCAB, False)]
    if spec.position_embedding_type == "learned_absolute":
        out.append(Tensor("embedding.position_embeddings.weight", (spec.max_position_embeddings, h),
                          Split.REPLICATED, False))
    experts = spec.experts
    for prefix, first, rows, parts, first_bias, second, cols, second_bias in (
        (ATTENTION, "linear_qkv", qkv_rows, 1, spec.has_qkv_bias, "linear_proj", heads, spec.add_bias_linear),
        (MLP, "linear_fc1", fc1_parts * spec.ffn_hidden_size, fc1_parts, spec.add_bias_linear, "linear_fc2",
         spec.ffn_hidden_size, spec.add_bias_linear),
    ):
        # a pre-norm fused into a column-parallel linear (hidden -> rows), then a row-parallel one (cols -> hidden)
        if spec.pre_norms:
            out += [Tensor(f"{prefix}{first}.layer_norm_{n}", (h,), Split.REPLICATED, True) for n in norms]
        if prefix == MLP and experts:  # the MoE layer: a router, then each expert's two projections
            f, e = experts.ffn_hidden_size, experts.num
            out += [Tensor(ROUTER, (e, h), Split.REPLICATED, True),
                    Tensor(f"{EXPERTS}linear_fc1.weight", (fc1_parts * f, h), Split.COLUMN, True, fc1_parts, experts=e),
                    Tensor(f"{EXPERTS}linear_fc2.weight", (h, f), Split.ROW, True, residual_output=True, experts=e)]
            if experts.shared_ffn_hidden_size:  # a shared expert: a dense MLP beside the routed ones
                fs = experts.shared_ffn_hidden_size
                out += [Tensor(f"{SHARED}linear_fc1.weight", (fc1_parts * fs, h), Split.COLUMN, True, fc1_parts),
                        Tensor(f"{SHARED}linear_fc2.weight", (h, fs), Split.ROW, True, residual_output=True)]
                if experts.shared_gate:
                    out.append(Tensor(f"{SHARED}gate_weight", (1, h), Split.REPLICATED, True))
            continue
        out.append(Tensor(f"{prefix}{first}.weight", (rows, h), Split.COLUMN, True, parts))
        if first_bias:
            out.append(Tensor(f"{prefix}{first}.bias", (rows,), Split.COLUMN, True, parts))
        if prefix == ATTENTION and spec.qk_layernorm:
            # one norm over a head's channels, shared by all heads; or (OLMo-2) over the whole projection
            widths = ((heads, spec.num_query_groups * spec.kv_channels) if spec.qk_norm_over_projection
                      else (spec.kv_channels, spec.kv_channels))
            split = Split.COLUMN if spec.qk_norm_over_projection else Split.REPLICATED
            out += [Tensor(f"{ATTENTION}{which}_layernorm.{n}", (width,), split, True)
                    for which, width in zip("qk", widths) for n in norms]
        out.append(Tensor(f"{prefix}{second}.weight", (h, cols), Split.ROW, True, residual_output=True))
        if second_bias:
            out.append(Tensor(f"{prefix}{second}.bias", (h,), Split.REPLICATED, True, residual_output=True))
        if spec.post_norms:  # a norm on the branch's output, before the residual add (Hugging Face only)
            out += [Tensor(f"{prefix}{second}.post_layernorm_{n}", (h,), Split.REPLICATED, True) for n in norms]
    out += [Tensor(f"decoder.final_layernorm.{n}", (h,), Split.REPLICATED, False) for n in norms]
    if not spec.tied:
        out.append(Tensor("output_layer.weight", (v, h), Split.COLUMN, False))
    return out


def owner_of(index: np.ndarray, size: int, parts: int, tp: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``pipeline.rules.owned_indices``: (TP rank, index in that rank's local tensor) of global
    indices."""
    part_size = size // parts
    chunk = part_size // tp
    part, within = np.divmod(index, part_size)
    rank, offset = np.divmod(within, chunk)
    return rank, part * chunk + offset
