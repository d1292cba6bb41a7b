"""Per-rank planner: for each destination slice a rank owns, exactly which source boxes it reads.

A box is a rectangle of a source global tensor on megatron-core's grid (on every axis its offset is
a multiple of its extent), so ``dist_checkpointing.load`` can read it directly. Pure index math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from .index_maps import NO_SOURCE
from .partition import ParamRule, dst_slice


@dataclass(frozen=True)
class Box:
    """A grid-aligned rectangle of a source tensor: per-axis (offset, length), layer axis excluded."""

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.lengths))


@dataclass(frozen=True)
class SliceTask:
    """One destination slice (a parameter, one layer of it) and the source it needs."""

    rule: ParamRule
    layer: Optional[int]  # None for parameters outside the layer stack
    dst_rows: np.ndarray
    dst_cols: Optional[np.ndarray]
    src_rows: np.ndarray  # sorted unique source rows needed
    src_cols: Optional[np.ndarray]  # sorted unique source cols needed (None for vectors)

    @property
    def boxes(self) -> list[list[Box]]:
        """Boxes covering (src_rows x src_cols) exactly: one list per row run, one box per col run."""
        row_runs = grid_runs(self.src_rows)
        if self.src_cols is None:
            return [[Box((o,), (n,))] for o, n in row_runs]
        col_runs = grid_runs(self.src_cols)
        return [[Box((ro, co), (rn, cn)) for co, cn in col_runs] for ro, rn in row_runs]

    @property
    def dst_numel(self) -> int:
        return len(self.dst_rows) * (1 if self.dst_cols is None else len(self.dst_cols))


def _largest_divisor_at_most(value: int, limit: int) -> int:
    """Largest d with value % d == 0 and d <= limit (value > 0, limit >= 1)."""
    best = 1
    d = 1
    while d * d <= value:
        if value % d == 0:
            for cand in (d, value // d):
                if best < cand <= limit:
                    best = cand
        d += 1
    return best


def grid_runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Cover sorted unique indices exactly with (offset, length) runs where offset % length == 0.

    Contiguous stretches are cut greedily into the longest grid-aligned runs, so the common cases
    (a whole axis, one TP shard of it, a group of heads) are a single run.
    """
    runs: list[tuple[int, int]] = []
    if len(indices) == 0:
        return runs
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    for stretch in np.split(indices, breaks):
        start, stop = int(stretch[0]), int(stretch[-1]) + 1
        while start < stop:
            length = stop - start if start == 0 else _largest_divisor_at_most(start, stop - start)
            runs.append((start, length))
            start += length
    return runs


def _needed(dim_map, dst_indices: np.ndarray) -> np.ndarray:
    src, _ = dim_map(dst_indices)
    return np.unique(src[src != NO_SOURCE])


def plan_rank(rules: list[ParamRule], num_layers: int, tp: int, rank: int) -> Iterator[SliceTask]:
    """The slices TP rank ``rank`` computes, parameter by parameter, layer by layer, in a fixed order."""
    for rule in rules:
        rows, cols = dst_slice(rule, tp, rank)
        src_rows = _needed(rule.rows, rows)
        src_cols = None if cols is None else _needed(rule.cols, cols)
        for layer in range(num_layers) if rule.per_layer else [None]:
            yield SliceTask(rule, layer, rows, cols, src_rows, src_cols)
