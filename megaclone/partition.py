"""What each GPTModel parameter is, how Megatron partitions it over TP, and how it is cloned.

``param_rules(src, dst)`` lists every parameter of the destination model with its on-disk key
(megatron-core torch_dist keys, layers stacked on a leading axis), the index maps of its axes and
its tensor-parallel split. Pure data: shapes and maps only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

import numpy as np

from .index_maps import Concat, DimMap, GroupedHeads, GroupedQKV, Pad, Tile
from .spec import ModelSpec


class Split(Enum):
    """Megatron's tensor-parallel partitioning of a parameter."""

    COLUMN = "column"  # output rows split (linear_qkv, linear_fc1, output_layer)
    VOCAB = "vocab"  # embedding rows split (word embeddings)
    ROW = "row"  # input columns split (linear_proj, linear_fc2)
    REPLICATED = "replicated"  # norms, row-parallel biases, position embeddings

    @property
    def axis(self) -> Optional[int]:
        return {Split.COLUMN: 0, Split.VOCAB: 0, Split.ROW: 1}.get(self)


class Role(Enum):
    """How values are cloned (docs/design.md, "Clone rules")."""

    MATRIX = "matrix"  # W_D[i, j] = W_S[i', j'] / c_in (+ noise), or the diagonal variant
    EMBEDDING = "embedding"  # a lookup table: tiled along hidden, never scaled
    VECTOR = "vector"  # bias / norm: tiled, divided only by ``divisor``


@dataclass(frozen=True)
class ParamRule:
    """One destination parameter: key on disk, axis maps, TP split and clone role."""

    key: str
    rows: DimMap
    cols: Optional[DimMap]  # None for vectors
    split: Split
    role: Role
    per_layer: bool
    divisor: int = 1  # vectors only (the tied final norm is divided by n)
    # Noisy variants: source rows per noise block (one head of q, k or v; one SwiGLU half; a whole
    # matrix otherwise), the unit whose signal power sets the noise scale; 0 = never perturbed.
    noise_unit: int = 0
    # Written into the residual stream by a layer (its attention output and second MLP projection,
    # with their biases): zero in a layer added by identity depth growth.
    residual_output: bool = False

    def __post_init__(self):
        if self.noise_unit and (self.role is not Role.MATRIX or self.rows.src_size % self.noise_unit):
            raise ValueError(f"{self.key}: noise blocks of {self.noise_unit} rows do not tile {self.rows.src_size}")

    @property
    def src_shape(self) -> tuple[int, ...]:
        return (self.rows.src_size,) if self.cols is None else (self.rows.src_size, self.cols.src_size)

    @property
    def dst_shape(self) -> tuple[int, ...]:
        return (self.rows.dst_size,) if self.cols is None else (self.rows.dst_size, self.cols.dst_size)

    @property
    def c_in(self) -> int:
        """Clone factor of the input dimension: the number of input blocks each output reads."""
        return 1 if self.cols is None or self.role is not Role.MATRIX else self.cols.factor

    @property
    def c_out(self) -> int:
        return self.rows.factor

    @property
    def diagonal_applies(self) -> bool:
        """The paper's diagonal variants are defined for matrices cloned on both axes by one factor;
        every other matrix (the output layer, unequal hidden and head/FFN factors, a fused QKV whose
        key/value rows grow less than its query rows) stays symmetric."""
        return self.role is Role.MATRIX and self.c_out == self.c_in > 1 and not isinstance(self.rows, GroupedQKV)

    @property
    def noise_blocks(self) -> int:
        return self.rows.src_size // self.noise_unit if self.noise_unit else 0

    @property
    def parts(self) -> int:
        """Equal parts of the split axis, each divided over TP (2 for SwiGLU fc1: gate and up)."""
        dim = self.rows if self.split.axis == 0 else self.cols
        return dim.parts if isinstance(dim, Concat) else 1


def param_rules(src: ModelSpec, dst: ModelSpec) -> list[ParamRule]:
    """Every parameter of ``dst`` (a grown ``src``) in Megatron's torch_dist naming, in a fixed order."""
    n = dst.hidden_size // src.hidden_size
    k = dst.num_attention_heads // src.num_attention_heads
    m = dst.ffn_hidden_size // src.ffn_hidden_size
    hidden = Tile(src.hidden_size, n)
    g = dst.num_query_groups // src.num_query_groups
    if g == k:  # whole query groups (their q, k and v rows) repeat
        qkv = Tile(src.num_query_groups * src.qkv_rows_per_group, k, unit=src.qkv_rows_per_group)
        heads = Tile(src.num_attention_heads * src.kv_channels, k, unit=src.kv_channels)
    else:  # the new heads join the groups
        heads = GroupedHeads(src.num_query_groups, src.heads_per_group, src.kv_channels, k, g)
        qkv = GroupedQKV(heads)
    ffn = Tile(src.ffn_hidden_size, m)
    fc1 = Concat(ffn, 2) if src.swiglu else ffn
    vocab = Pad(src.padded_vocab_size, dst.padded_vocab_size)
    layer = "decoder.layers."
    norm_names = ["weight"] + (["bias"] if src.normalization == "LayerNorm" else [])

    rules = [ParamRule("embedding.word_embeddings.weight", vocab, hidden, Split.VOCAB, Role.EMBEDDING, False)]
    if src.position_embedding_type == "learned_absolute":
        positions = Pad(src.max_position_embeddings, dst.max_position_embeddings)
        rules.append(
            ParamRule("embedding.position_embeddings.weight", positions, hidden, Split.REPLICATED, Role.EMBEDDING, False)
        )
    rules += _sublayer(f"{layer}self_attention.", "linear_qkv", qkv, "linear_proj", heads, hidden, norm_names,
                       src.has_qkv_bias, src.add_bias_linear, first_noise_unit=src.kv_channels)
    rules += _sublayer(f"{layer}mlp.", "linear_fc1", fc1, "linear_fc2", ffn, hidden, norm_names,
                       src.add_bias_linear, src.add_bias_linear, first_noise_unit=src.ffn_hidden_size)
    # Tied: the output layer reuses the unscaled embedding, so the final norm carries the 1/n.
    final_divisor = n if src.tied else 1
    for name in norm_names:
        rules.append(
            ParamRule(f"decoder.final_layernorm.{name}", hidden, None, Split.REPLICATED, Role.VECTOR, False, final_divisor)
        )
    if not src.tied:
        rules.append(ParamRule("output_layer.weight", vocab, hidden, Split.COLUMN, Role.MATRIX, False))
    return rules


def _sublayer(prefix: str, first: str, first_rows: DimMap, second: str, second_cols: DimMap, hidden: DimMap,
              norm_names: list[str], first_bias: bool, second_bias: bool, first_noise_unit: int) -> list[ParamRule]:
    """Attention or MLP as Megatron stores it: the pre-norm fused into a column-parallel linear
    (hidden -> first_rows), then a row-parallel linear (second_cols -> hidden). The first linear's noise
    blocks are ``first_noise_unit`` rows (a head; a SwiGLU half), the second's its whole matrix, as the
    authors' code clones q/k/v per head and every other linear whole."""
    rules = [ParamRule(f"{prefix}{first}.layer_norm_{name}", hidden, None, Split.REPLICATED, Role.VECTOR, True)
             for name in norm_names]
    rules.append(ParamRule(f"{prefix}{first}.weight", first_rows, hidden, Split.COLUMN, Role.MATRIX, True,
                           noise_unit=first_noise_unit))
    if first_bias:
        rules.append(ParamRule(f"{prefix}{first}.bias", first_rows, None, Split.COLUMN, Role.VECTOR, True))
    rules.append(ParamRule(f"{prefix}{second}.weight", hidden, second_cols, Split.ROW, Role.MATRIX, True,
                           noise_unit=hidden.src_size, residual_output=True))
    if second_bias:
        rules.append(ParamRule(f"{prefix}{second}.bias", hidden, None, Split.REPLICATED, Role.VECTOR, True,
                               residual_output=True))
    return rules


def owned_indices(size: int, parts: int, tp: int, rank: int) -> np.ndarray:
    """Indices along a split axis that TP rank ``rank`` holds: its 1/tp of each of ``parts`` parts."""
    part = size // parts
    chunk = part // tp
    return np.concatenate([np.arange(p * part + rank * chunk, p * part + (rank + 1) * chunk) for p in range(parts)])


def dst_slice(rule: ParamRule, tp: int, rank: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Destination (row, column) indices rank ``rank`` owns, in the order of its local tensor."""
    rows = np.arange(rule.rows.dst_size)
    cols = None if rule.cols is None else np.arange(rule.cols.dst_size)
    if rule.split.axis == 0:
        rows = owned_indices(rule.rows.dst_size, rule.parts, tp, rank)
    elif rule.split.axis == 1:
        cols = owned_indices(rule.cols.dst_size, rule.parts, tp, rank)
    return rows, cols


def owner_of(index: np.ndarray, size: int, parts: int, tp: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`owned_indices`: (TP rank, index in that rank's local tensor) of global indices."""
    part_size = size // parts
    chunk = part_size // tp
    part, within = np.divmod(index, part_size)
    rank, offset = np.divmod(within, chunk)
    return rank, part * chunk + offset
