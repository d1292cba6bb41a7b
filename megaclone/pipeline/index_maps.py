"""HyperCloning index maps: which source index (and which clone block) feeds each destination index.

A map sends a destination index ``i`` along one axis of a parameter to ``(src, block)``: the source
index it copies and the clone block it belongs to (0 .. factor-1). ``src == -1`` marks a destination
index with no source (vocabulary rows past the source's padded vocab): those values are zero.
Pure numpy; no tensors, files or processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    from megaclone.shape.request import Depth

NO_SOURCE = -1


@dataclass(frozen=True)
class Tile:
    """Blockwise clone in units of ``unit``: D unit u copies S unit ``u mod (src/unit)``.

    unit=1 is the hidden or FFN map (i -> i mod h); unit=head_dim is the attention-head map;
    unit=rows-per-query-group is the fused-QKV map (whole groups, q/k/v rows inside unchanged).
    """

    src_size: int
    factor: int
    unit: int = 1

    @property
    def dst_size(self) -> int:
        return self.src_size * self.factor

    def __call__(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        units = self.src_size // self.unit
        u, e = np.divmod(i, self.unit)
        block, su = np.divmod(u, units)
        return su * self.unit + e, block


@dataclass(frozen=True)
class Pad:
    """Identity onto a source axis of ``src_size``, zero past it (vocab rows; positions)."""

    src_size: int
    dst_size: int
    factor: int = 1

    def __call__(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        src = np.where(i < self.src_size, i, NO_SOURCE)
        return src, np.zeros_like(i)


@dataclass(frozen=True)
class Concat:
    """Axis made of equal parts stacked (SwiGLU fc1 = [gate; up]); each part follows ``part``."""

    part: Tile
    parts: int

    @property
    def src_size(self) -> int:
        return self.part.src_size * self.parts

    @property
    def dst_size(self) -> int:
        return self.part.dst_size * self.parts

    @property
    def factor(self) -> int:
        return self.part.factor

    def __call__(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        which, local = np.divmod(i, self.part.dst_size)
        src, block = self.part(local)
        return src + which * self.part.src_size, block


@dataclass(frozen=True)
class GroupedHeads:
    """Attention heads (``head_dim`` indices each) when heads grow by ``heads_factor`` but query
    groups only by ``groups_factor`` (a divisor of it): the extra heads join the existing groups.

    Destination group j copies source group j mod G (copy ``b = j // G``); its query head r copies
    the source group's head r mod hpg (copy ``c = r // hpg``), and belongs to clone block
    ``b * heads_factor / groups_factor + c``, so every source head is copied once per block, and each
    copy attends with keys and values copied from its own source head's group.
    ``groups_factor == heads_factor`` is the plain ``Tile`` of whole heads.
    """

    groups: int  # source query groups (G)
    heads_per_group: int  # source query heads per group (hpg)
    head_dim: int
    heads_factor: int
    groups_factor: int

    def __post_init__(self):
        if self.groups_factor < 1 or self.heads_factor % self.groups_factor:
            raise ValueError(f"the query-group factor {self.groups_factor} must divide the head factor {self.heads_factor}")

    @property
    def src_size(self) -> int:
        return self.groups * self.heads_per_group * self.head_dim

    @property
    def dst_size(self) -> int:
        return self.src_size * self.heads_factor

    @property
    def factor(self) -> int:
        return self.heads_factor

    @property
    def dst_heads_per_group(self) -> int:
        return self.heads_per_group * self.heads_factor // self.groups_factor

    def head(self, group: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source head, block) of query head ``r`` of destination group ``group``."""
        b, source_group = np.divmod(group, self.groups)
        c, h = np.divmod(r, self.heads_per_group)
        return source_group * self.heads_per_group + h, b * (self.heads_factor // self.groups_factor) + c

    def __call__(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t, e = np.divmod(i, self.head_dim)
        group, r = np.divmod(t, self.dst_heads_per_group)
        head, block = self.head(group, r)
        return head * self.head_dim + e, block


@dataclass(frozen=True)
class GroupedQKV:
    """Megatron's fused QKV rows (per group: its query heads, one key head, one value head) under
    ``heads``: query rows follow ``heads``, a destination group's key and value rows copy its source
    group's (block ``j // G``, below the query blocks' range)."""

    heads: GroupedHeads

    @property
    def src_rows_per_group(self) -> int:
        return (self.heads.heads_per_group + 2) * self.heads.head_dim

    @property
    def src_size(self) -> int:
        return self.heads.groups * self.src_rows_per_group

    @property
    def dst_size(self) -> int:
        return self.heads.groups * self.heads.groups_factor * (self.heads.dst_heads_per_group + 2) * self.heads.head_dim

    @property
    def factor(self) -> int:
        return self.heads.heads_factor

    def __call__(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hd, hpg_dst = self.heads.head_dim, self.heads.dst_heads_per_group
        group, within = np.divmod(i, (hpg_dst + 2) * hd)
        r, e = np.divmod(within, hd)
        head, q_block = self.heads.head(group, np.minimum(r, hpg_dst - 1))
        kv_block, source_group = np.divmod(group, self.heads.groups)
        query = r < hpg_dst
        src_in_group = np.where(query, head % self.heads.heads_per_group, self.heads.heads_per_group + r - hpg_dst)
        src = source_group * self.src_rows_per_group + src_in_group * hd + e
        return src, np.where(query, q_block, kv_block)


@dataclass(frozen=True)
class Repeat:
    """Each source index repeated ``factor`` times in place: D index i copies S index ``i div factor``,
    copy ``i mod factor`` (the layer axis under interleaved depth growth: every source layer followed
    by its copies). ``Tile`` is the other order (the whole source axis repeated)."""

    src_size: int
    factor: int

    @property
    def dst_size(self) -> int:
        return self.src_size * self.factor

    def __call__(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.divmod(i, self.factor)


@dataclass(frozen=True)
class ExpertSlice:
    """One expert's FFN axis under upcycling: slice ``slice`` (of ``inner.dst_size / parts / size``)
    of the dense FFN axis ``inner``, cut the same way in each of its ``parts`` (SwiGLU's gate and up).
    D index i (part p, offset r) reads inner index ``p * dense + slice * size + r``."""

    inner: Union[Tile, Concat]
    parts: int
    size: int  # the expert's FFN hidden size
    slice: int = 0

    def __post_init__(self):
        dense = self.inner.dst_size // self.parts
        if dense % self.size or not 0 <= self.slice < dense // self.size:
            raise ValueError(f"slice {self.slice} of {self.size} does not lie in a dense FFN of {dense}")

    @property
    def src_size(self) -> int:
        return self.inner.src_size

    @property
    def dst_size(self) -> int:
        return self.parts * self.size

    @property
    def factor(self) -> int:
        return self.inner.factor

    def __call__(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        part, r = np.divmod(i, self.size)
        return self.inner(part * (self.inner.dst_size // self.parts) + self.slice * self.size + r)


DimMap = Union[Tile, Pad, Concat, GroupedHeads, GroupedQKV, Repeat, ExpertSlice]


def layer_map(depth: "Depth", src_layers: int) -> DimMap:
    """Destination layer -> (source layer, copy); copy 0 is the source layer's own place."""
    return Repeat(src_layers, depth.factor) if depth.placement == "interleave" else Tile(src_layers, depth.factor)
