"""Clone rules per tensor, and which indices of a tensor a TP rank owns.

``param_rules(src, dst)`` attaches to every tensor of the destination's layout catalogue
(``layout.catalogue``) the index maps of its axes and its clone role, from one declarative table.
Pure data: shapes and maps only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum
from typing import Optional

import numpy as np

from megaclone.pipeline.index_maps import (
    Concat,
    DimMap,
    ExpertSlice,
    GroupedHeads,
    GroupedQKV,
    Pad,
    Repeat,
    Tile,
)
from megaclone.shape.layout import (
    ATTENTION,
    EXPERTS,
    MLP,
    ROUTER,
    SHARED,
    Split,
    Tensor,
    catalogue,
    norm_names,
)
from megaclone.shape.spec import ModelSpec


OPTIMIZER_STATE = "optimizer.state."  # the trainer's optimizer tensors: optimizer.state.<state>.<parameter key>


def optimizer_state_key(state: str, key: str) -> str:
    """The stored key of optimizer state ``state`` (exp_avg, exp_avg_sq, fp32_param) of parameter ``key``."""
    return f"{OPTIMIZER_STATE}{state}.{key}"


class Role(Enum):
    """How values are cloned (docs/design.md, "Clone rules")."""

    MATRIX = "matrix"  # W_D[i, j] = W_S[i', j'] / c_in (+ noise), or the diagonal variant
    EMBEDDING = "embedding"  # a lookup table: tiled along hidden, never scaled
    VECTOR = "vector"  # bias / norm: tiled, divided only by ``divisor``
    ROUTER = "router"  # a MoE router: no source; seeded rows shared by each virtual group of experts, or zero


@dataclass(frozen=True)
class ParamRule:
    """How one destination tensor (its catalogue entry) is cloned: the index maps of its axes and its
    clone role."""

    tensor: Tensor  # the destination's catalogue entry
    rows: DimMap
    cols: Optional[DimMap]  # None for vectors
    role: Role
    divisor: float = 1  # vectors and embeddings: the tied final norm by n, a scaled embedding by sqrt(n)
    offset: float = 0  # a norm that scales by (offset + w) (Gemma's 1 + w): the divisor applies to offset + w
    # Noisy variants: source rows per noise block (one head of q, k or v; one SwiGLU half; a whole
    # matrix otherwise), the unit whose signal power sets the noise scale; 0 = never perturbed.
    noise_unit: int = 0
    source: Optional[str] = None  # the source tensor it reads, when not its own key (experts read the dense MLP)
    gain: int = 1  # matrices: the clone is multiplied by it last (a granular expert's second projection: G)
    slices: int = 1  # per-expert tensors: G, the dense FFN slices; expert e holds slice e mod G
    source_experts: int = 0  # per-expert tensors of an MoE source: its number of experts (0: a dense source)
    # Noise coordinates of an MoE source's expert: its source expert's rows follow the ones before it, so
    # each expert draws its own noise and has its own noise blocks (0 for every other rule)
    noise_offset: int = 0

    def __post_init__(self):
        if self.dst_shape != self.tensor.shape:
            raise ValueError(f"{self.key}: the maps give {self.dst_shape}, the catalogue {self.tensor.shape}")
        if self.noise_unit and (self.role is not Role.MATRIX or self.rows.src_size % self.noise_unit):
            raise ValueError(f"{self.key}: noise blocks of {self.noise_unit} rows do not tile {self.rows.src_size}")

    @property
    def key(self) -> str:
        return self.tensor.key

    @property
    def source_key(self) -> str:
        return self.source or self.tensor.key

    def for_expert(self, expert: Optional[int]) -> "ParamRule":
        """The rule of one expert of a per-expert tensor (its slice of the FFN it is cut from, and for an MoE
        source its source expert's noise coordinates); itself otherwise."""
        if expert is None:
            return self
        rule = self
        if self.source_experts:
            rule = dataclasses.replace(rule, noise_offset=self.source_expert(expert) * self.rows.src_size)
        if self.slices == 1:
            return rule
        s = expert % self.slices
        pick = lambda m: dataclasses.replace(m, slice=s) if isinstance(m, ExpertSlice) else m  # noqa: E731
        return dataclasses.replace(rule, rows=pick(rule.rows), cols=None if rule.cols is None else pick(rule.cols))

    def source_expert(self, expert: int) -> int:
        """The source expert that destination ``expert`` clones (an MoE source: the same expert)."""
        return expert // (self.tensor.experts // self.source_experts)

    @property
    def optimizer_state(self) -> Optional[str]:
        """The optimizer state this rule reads (exp_avg, exp_avg_sq, fp32_param); None for a weight."""
        key = self.source_key
        return key[len(OPTIMIZER_STATE):].split(".", 1)[0] if key.startswith(OPTIMIZER_STATE) else None

    @property
    def split(self) -> Split:
        return self.tensor.split

    @property
    def per_layer(self) -> bool:
        return self.tensor.per_layer

    @property
    def residual_output(self) -> bool:
        return self.tensor.residual_output

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
        return (self.role is Role.MATRIX and self.c_out == self.c_in > 1 and not isinstance(self.rows, GroupedQKV)
                and self.key != ROUTER)  # a router's row copies serve more experts, not output copies

    @property
    def noise_blocks(self) -> int:
        """Noise blocks of one layer: an MoE source's experts each have their own, one after another."""
        per = self.rows.src_size // self.noise_unit if self.noise_unit else 0
        return per * max(1, self.source_experts)

    @property
    def parts(self) -> int:
        return self.tensor.parts


def param_rules(src: ModelSpec, dst: ModelSpec) -> list[ParamRule]:
    """Every tensor of ``dst`` (a grown ``src``; layout.catalogue) with the maps that clone it."""
    n = dst.hidden_size // src.hidden_size
    k = dst.num_attention_heads // src.num_attention_heads
    m = dst.ffn_hidden_size // src.ffn_hidden_size
    g = dst.num_query_groups // src.num_query_groups
    hidden = Tile(src.hidden_size, n)
    if g == k:  # whole query groups (their q, k and v rows) repeat
        qkv = Tile(src.num_query_groups * src.qkv_rows_per_group, k, unit=src.qkv_rows_per_group)
        heads = Tile(src.num_attention_heads * src.kv_channels, k, unit=src.kv_channels)
    else:  # the new heads join the groups
        heads = GroupedHeads(src.num_query_groups, src.heads_per_group, src.kv_channels, k, g)
        qkv = GroupedQKV(heads)
    ffn = Tile(src.ffn_hidden_size, m)
    fc1 = Concat(ffn, 2) if src.swiglu else ffn
    vocab = Pad(src.padded_vocab_size, dst.padded_vocab_size)
    positions = Pad(src.max_position_embeddings, dst.max_position_embeddings)
    # key -> (rows, cols, role, noise unit): noise per head of q/k/v, per SwiGLU half, else the whole
    # matrix, as the authors' code clones q/k/v per head and every other linear whole
    rules = {
        "embedding.word_embeddings.weight": (vocab, hidden, Role.EMBEDDING, 0),
        "embedding.position_embeddings.weight": (positions, hidden, Role.EMBEDDING, 0),
        f"{ATTENTION}linear_qkv.weight": (qkv, hidden, Role.MATRIX, src.kv_channels),
        f"{ATTENTION}linear_qkv.bias": (qkv, None, Role.VECTOR, 0),
        f"{ATTENTION}linear_proj.weight": (hidden, heads, Role.MATRIX, src.hidden_size),
        f"{ATTENTION}linear_proj.bias": (hidden, None, Role.VECTOR, 0),
        f"{MLP}linear_fc1.weight": (fc1, hidden, Role.MATRIX, src.ffn_hidden_size),
        f"{MLP}linear_fc1.bias": (fc1, None, Role.VECTOR, 0),
        f"{MLP}linear_fc2.weight": (hidden, ffn, Role.MATRIX, src.hidden_size),
        f"{MLP}linear_fc2.bias": (hidden, None, Role.VECTOR, 0),
        "output_layer.weight": (vocab, hidden, Role.MATRIX, 0),
    }
    extra: dict[str, dict] = {}
    if src.experts:  # an MoE source: each expert is width-cloned like a dense MLP, from its own source expert
        fe = Tile(src.experts.ffn_hidden_size, m)
        copies = dst.experts.num // src.experts.num  # experts per source expert (more experts: G > 1)
        slices = fe.dst_size // dst.experts.ffn_hidden_size  # slices of a grown source expert
        parts = 2 if src.swiglu else 1
        # the router's input columns are cloned like any input (1/n each), so its logits, and so the top-k
        # choice and the gates, are the source's; with more experts each source row serves its G experts
        rules[ROUTER] = (Repeat(src.experts.num, copies), hidden, Role.MATRIX, 0)
        rules[f"{EXPERTS}linear_fc1.weight"] = (ExpertSlice(Concat(fe, 2) if src.swiglu else fe, parts,
                                                            dst.experts.ffn_hidden_size), hidden, Role.MATRIX,
                                                src.experts.ffn_hidden_size)
        rules[f"{EXPERTS}linear_fc2.weight"] = (hidden, ExpertSlice(fe, 1, dst.experts.ffn_hidden_size), Role.MATRIX,
                                                src.hidden_size)
        if src.experts.shared_ffn_hidden_size:  # the shared expert: a dense MLP; its gate a one-row router
            fs = Tile(src.experts.shared_ffn_hidden_size, m)
            rules[f"{SHARED}linear_fc1.weight"] = (Concat(fs, 2) if src.swiglu else fs, hidden, Role.MATRIX,
                                                   src.experts.shared_ffn_hidden_size)
            rules[f"{SHARED}linear_fc2.weight"] = (hidden, fs, Role.MATRIX, src.hidden_size)
            rules[f"{SHARED}gate_weight"] = (Tile(1, 1), hidden, Role.MATRIX, 0)
        extra[f"{EXPERTS}linear_fc1.weight"] = dict(source_experts=src.experts.num, slices=slices)
        extra[f"{EXPERTS}linear_fc2.weight"] = dict(source_experts=src.experts.num, slices=slices, gain=slices)
    elif dst.experts:  # upcycling: every expert holds a slice of the grown dense MLP (slice 0 here, see for_expert)
        f, parts = dst.experts.ffn_hidden_size, 2 if src.swiglu else 1
        slices = dst.experts.granularity(dst.ffn_hidden_size)
        rules[ROUTER] = (Tile(dst.experts.num, 1), hidden, Role.ROUTER, 0)
        rules[f"{EXPERTS}linear_fc1.weight"] = (ExpertSlice(fc1, parts, f), hidden, Role.MATRIX, src.ffn_hidden_size)
        rules[f"{EXPERTS}linear_fc2.weight"] = (hidden, ExpertSlice(ffn, 1, f), Role.MATRIX, src.hidden_size)
        extra[f"{EXPERTS}linear_fc1.weight"] = dict(source=f"{MLP}linear_fc1.weight", slices=slices)
        extra[f"{EXPERTS}linear_fc2.weight"] = dict(source=f"{MLP}linear_fc2.weight", slices=slices, gain=slices)
        extra[ROUTER] = dict(slices=slices)
    if src.qk_norm_over_projection:  # over all heads (groups for k): the heads repeat, so their statistics stay
        keys = Tile(src.num_query_groups * src.kv_channels, g, unit=src.kv_channels)
        qk_norms = {"q": heads, "k": keys}
    else:  # per-head norms: a head's channels do not grow
        qk_norms = {"q": Tile(src.kv_channels, 1), "k": Tile(src.kv_channels, 1)}
    for name in norm_names(src):
        for which, rows in qk_norms.items():
            rules[f"{ATTENTION}{which}_layernorm.{name}"] = (rows, None, Role.VECTOR, 0)
        for key in (f"{ATTENTION}linear_qkv.layer_norm_{name}", f"{MLP}linear_fc1.layer_norm_{name}",
                    f"{ATTENTION}linear_proj.post_layernorm_{name}", f"{MLP}linear_fc2.post_layernorm_{name}",
                    f"decoder.final_layernorm.{name}"):
            rules[key] = (hidden, None, Role.VECTOR, 0)
    # A scaled embedding (Gemma: x sqrt(hidden)) would grow by sqrt(n) with the hidden size: the clone divides
    # the table by sqrt(n), as the authors' code does. Tied, the output layer reads that table, so the final
    # norm carries what is left of the 1/n (1/sqrt(n)); a (1 + w) norm carries it on 1 + w.
    embedding_divisor = math.sqrt(n) if src.scaled_embedding else 1
    offset = 1.0 if src.zero_centered_norms else 0.0
    out = []
    for tensor in catalogue(dst):
        rows, cols, role, noise_unit = rules[tensor.key]
        divisor, shift = 1, 0.0
        if tensor.key.startswith("embedding.word_embeddings."):
            divisor = embedding_divisor
        elif src.tied and tensor.key.startswith("decoder.final_layernorm."):
            divisor = n / embedding_divisor  # the output layer reuses the embedding: the final norm carries the rest
            shift = offset if tensor.key.endswith(".weight") else 0.0
        out.append(ParamRule(tensor, rows, cols, role, divisor, shift, noise_unit, **extra.get(tensor.key, {})))
    return out


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




def clone_scale(rule: ParamRule) -> float:
    """a: the factor on a source value in each of its copies under the symmetric definition (a matrix's
    1/c_in times its gain; a vector's or embedding's 1/divisor)."""
    if rule.role is Role.MATRIX:
        return rule.gain / rule.c_in
    if rule.role in (Role.VECTOR, Role.EMBEDDING):
        return 1.0 / rule.divisor
    raise ValueError(f"{rule.key}: a {rule.role.value} has no source values to scale")


def gradient_scale(rule: ParamRule) -> float:
    """s, with g_D = s * g_S at every copy, when the clone's activations are copies of the source's.

    A source value copied m times (m = c_out x c_in; a vector's or embedding's copies along its cloned
    axes) at a x its value enters the grown function through every copy alike, L_D(copies of a w) =
    L_S(w); the chain rule gives g_S = a * (sum of the m copies' gradients) = a m g_D, so s = 1/(a m).
    A symmetric matrix gets 1/c_out, a tiled norm 1/n, a tied final norm (a = 1/n, m = n) 1, the
    output layer (rows not cloned) 1. (docs/training.md, "Growing the optimizer state")"""
    copies = rule.rows.factor * (rule.cols.factor if rule.cols is not None else 1)
    return 1.0 / (clone_scale(rule) * copies)


def moment_rules(rules: list[ParamRule], state: str, power: int) -> list[ParamRule]:
    """Rules that grow an Adam moment of every tensor (``state`` exp_avg with ``power`` 1, exp_avg_sq
    with 2) from the source's (the optimizer's key, ``optimizer.state.<state>.<key>``): tiled like
    the weights and multiplied by s**power; no fan-in division, no diagonal mask, no noise."""
    return [dataclasses.replace(r, role=Role.VECTOR, divisor=1.0 / gradient_scale(r) ** power, offset=0.0,
                                noise_unit=0, gain=1, source=optimizer_state_key(state, r.source_key))
            for r in rules]
