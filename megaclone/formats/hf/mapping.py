"""Where a Megatron tensor's rows live in Hugging Face files: ``HFTensor`` (HF tensor names, a row map,
transposed or not, or a constant) and the row maps families build it from.

A row map takes Megatron rows to (part, HF row): which of the HF tensors holds the row and where
(-1 for vocabulary padding). The Megatron side is fixed by megatron-core's GPTModel: fused QKV is
[group x (its query heads, one key, one value) x head_dim], SwiGLU fc1 is [gate; up]. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

RowMap = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # Megatron rows -> (part, HF row)


@dataclass(frozen=True)
class HFTensor:
    """Where one Megatron tensor's rows live: HF tensor names (``{i}`` = layer, ``{e}`` = expert: one HF
    tensor per expert of a per-expert Megatron tensor), a row map, layout.
    With ``constant`` the HF model has no such tensor (OLMo's non-parametric norms): every value is
    that constant on import, and export refuses a model whose values differ from it."""

    names: tuple[str, ...]
    row_map: RowMap
    transposed: bool = False
    constant: Optional[float] = None

    def __post_init__(self):
        if (self.constant is None) == (not self.names):
            raise ValueError("an HF tensor has names, or is a constant with none")

    @property
    def per_expert(self) -> bool:
        return any("{e}" in n for n in self.names)

    def for_expert(self, expert: int) -> "HFTensor":
        """The HF tensors of one expert (``{e}`` filled in, ``{i}`` kept)."""
        return HFTensor(tuple(n.replace("{e}", str(expert)) for n in self.names), self.row_map, self.transposed,
                        self.constant)


def mixture_tensors(mlp: str, router: str, experts: str, names: tuple[str, str, str], s, layer: str) -> dict:
    """A mixture-of-experts MLP's Megatron tensors (a ``layout`` entry each) where the HF model keeps a
    router ``router`` and per-expert gate, up and down projections ``experts.{e}.<name>``, all under
    ``layer`` (``model.layers.{i}.``). ``mlp`` is megatron-core's MLP prefix."""
    gate, up, down = names
    e = layer + experts + ".{e}."
    f = s.experts.ffn_hidden_size
    return {
        mlp + "router.weight": HFTensor((layer + router,), identity(s.experts.num)),
        mlp + "experts.experts.linear_fc1.weight": HFTensor((e + gate, e + up), concat(f)),
        mlp + "experts.experts.linear_fc2.weight": HFTensor((e + down,), identity(s.hidden_size)),
    }


def without_dense_mlp(layout: dict) -> dict:
    """A dense family's layout less its MLP's two projections (a mixture's family puts its experts
    there); the norm before the MLP stays."""
    return {k: v for k, v in layout.items() if ".mlp.linear_fc" not in k or k.endswith("layer_norm_weight")}


def constant(value: float) -> HFTensor:
    return HFTensor((), identity(0), constant=value)


def identity(size: int) -> RowMap:
    """Row r is HF row r; rows past ``size`` (vocabulary padding) have no source."""
    return lambda r: (np.where(r < size, 0, -1), np.where(r < size, r, 0))


def concat(size: int) -> RowMap:
    """Equal parts stacked: [part 0; part 1; ...] (SwiGLU fc1 = [gate; up])."""
    return lambda r: np.divmod(r, size)


def grouped_qkv(heads: int, groups: int, head_dim: int) -> RowMap:
    """Megatron's fused QKV rows -> (0 = query, 1 = key, 2 = value; row in that HF tensor)."""
    per_group = heads // groups
    rows_per_group = (per_group + 2) * head_dim

    def f(r: np.ndarray):
        g, within = np.divmod(r, rows_per_group)
        head, e = np.divmod(within, head_dim)
        part = np.where(head < per_group, 0, np.where(head == per_group, 1, 2))
        row = np.where(part == 0, (g * per_group + head) * head_dim + e, g * head_dim + e)
        return part, row

    return f


def offset(size: int, first: int) -> RowMap:
    """Row r is HF row r + first (OPT's learned positions keep ``first`` = 2 unused rows in front)."""
    return lambda r: (np.where(r < size, 0, -1), np.where(r < size, r + first, 0))


def merged(row_map: RowMap, sizes: Sequence[int]) -> RowMap:
    """Parts laid end to end in one HF tensor (GPT-2's c_attn holds [q_all, k_all, v_all])."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def f(r: np.ndarray):
        part, row = row_map(r)
        return np.zeros_like(part), offsets[part] + row

    return f
