"""HyperCloning index maps: which source index (and which clone block) feeds each destination index.

A map sends a destination index ``i`` along one axis of a parameter to ``(src, block)``: the source
index it copies and the clone block it belongs to (0 .. factor-1). ``src == -1`` marks a destination
index with no source (vocabulary rows past the source's padded vocab): those values are zero.
Pure numpy; no tensors, files or processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

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


DimMap = Union[Tile, Pad, Concat]
