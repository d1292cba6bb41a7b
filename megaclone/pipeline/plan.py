"""Per-rank planner: for each destination slice a rank owns, exactly which source boxes it reads.

A box is any rectangle of a source global tensor, one per contiguous run of needed indices; each
kind of source reads boxes its own way (formats.torch_dist: torch DCP's reader; formats.hf.reader:
safetensors slices; formats.legacy: memory-mapped files), behind the one ``Source.read``. Pure index
math: no files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from megaclone.formats.base import Box, BoxRead
from megaclone.pipeline.index_maps import NO_SOURCE, DimMap
from megaclone.pipeline.rules import ParamRule, Role, dst_slice


@dataclass(frozen=True)
class SliceTask:
    """One destination slice (a parameter, one layer of it) and the source it needs: the rows and
    columns of source layer ``src_layer``, or nothing when the slice is ``zero`` (an output projection
    of a layer added by identity depth growth) or a router (no source). Per-expert tensors have one
    task per expert, whose ``rule`` is that expert's (``ParamRule.for_expert``)."""

    rule: ParamRule
    layer: Optional[int]  # destination layer; None for parameters outside the layer stack
    src_layer: Optional[int]  # the source layer it reads (None exactly when ``layer`` is)
    dst_rows: np.ndarray
    dst_cols: Optional[np.ndarray]
    src_rows: np.ndarray  # sorted unique source rows needed (none when zero)
    src_cols: Optional[np.ndarray]  # sorted unique source cols needed (None for vectors)
    zero: bool = False
    expert: Optional[int] = None  # the expert (global index) of a per-expert tensor

    def __post_init__(self):
        if (self.expert is None) != (not self.rule.tensor.experts):
            raise ValueError(f"{self.rule.key}: an expert index is set exactly for per-expert tensors")
        if (self.layer is None) != (self.src_layer is None) or (self.layer is None) == self.rule.per_layer:
            raise ValueError(f"{self.rule.key}: destination layer {self.layer} and source layer {self.src_layer} "
                             "must both be set exactly for a per-layer parameter")
        if self.zero and len(self.src_rows):
            raise ValueError(f"{self.rule.key}: a zero slice reads no source")

    @property
    def boxes(self) -> list[list[Box]]:
        """Boxes covering (src_rows x src_cols) exactly: one list per row run, one box per col run."""
        row_runs = contiguous_runs(self.src_rows)
        if self.src_cols is None:
            return [[Box((o,), (n,))] for o, n in row_runs]
        col_runs = contiguous_runs(self.src_cols)
        return [[Box((ro, co), (rn, cn)) for co, cn in col_runs] for ro, rn in row_runs]

    @property
    def box_read(self) -> BoxRead:
        """Every box of the task, row runs first, in one request."""
        boxes = tuple(box for row in self.boxes for box in row)
        if self.rule.source_experts:  # one source expert's matrix: its index leads every box
            e = self.rule.source_expert(self.expert)
            boxes = tuple(Box((e,) + b.offsets, (1,) + b.lengths) for b in boxes)
        return BoxRead(self.rule.source_key, self.src_layer, boxes)

    @property
    def dst_numel(self) -> int:
        return len(self.dst_rows) * (1 if self.dst_cols is None else len(self.dst_cols))


def contiguous_runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Cover sorted unique indices exactly with maximal (offset, length) runs of consecutive indices."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    return [(int(run[0]), len(run)) for run in np.split(indices, breaks)]


def _needed(dim_map, dst_indices: np.ndarray) -> np.ndarray:
    src, _ = dim_map(dst_indices)
    return np.unique(src[src != NO_SOURCE])


def plan_rank(rules: list[ParamRule], layers: DimMap, tp: int, rank: int,
              zero_added_outputs: bool = False, ep: int = 1, ep_rank: int = 0,
              zero_added_layers: bool = False) -> Iterator[SliceTask]:
    """The slices TP rank ``rank`` (of EP rank ``ep_rank``) computes, parameter by parameter,
    destination layer by layer, expert by expert (its own experts only), in a fixed order. ``layers``
    maps a destination layer to (source layer, copy); with ``zero_added_outputs`` the residual
    outputs of every copy but the first are zero slices, with ``zero_added_layers`` every tensor of
    them (an added layer's optimizer state: it has no history)."""
    src_layer, copy = layers(np.arange(layers.dst_size))
    none = np.empty(0, dtype=np.int64)
    for shared in rules:
        rows, cols = dst_slice(shared, tp, rank)
        mine = []  # (expert, its rule, the source rows and columns it reads)
        for expert in shared.tensor.expert_ids(ep, ep_rank):
            rule = shared.for_expert(expert)
            reads = rule.role is not Role.ROUTER
            src_rows = _needed(rule.rows, rows) if reads else none
            src_cols = None if cols is None else _needed(rule.cols, cols) if reads else none
            mine.append((expert, rule, src_rows, src_cols))
        if not shared.per_layer:
            for expert, rule, src_rows, src_cols in mine:
                yield SliceTask(rule, None, None, rows, cols, src_rows, src_cols)
            continue
        # layer-major: the experts of a layer (slices of one dense layer) read the same source one after another
        for layer in range(layers.dst_size):
            for expert, rule, src_rows, src_cols in mine:
                if copy[layer] > 0 and (zero_added_layers or zero_added_outputs and rule.residual_output):
                    yield SliceTask(rule, layer, int(src_layer[layer]), rows, cols, none,
                                    None if cols is None else none, zero=True, expert=expert)
                else:
                    yield SliceTask(rule, layer, int(src_layer[layer]), rows, cols, src_rows, src_cols, expert=expert)


# Elements per read of the signal-power pass: bounds its working set.
POWER_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class PowerChunk:
    """Rows of one noise block of one source matrix-layer whose sum of squares one rank computes."""

    index: int  # position in the global chunk order, the same for every world size
    read: BoxRead
    block: int


def power_chunks(rules: list, num_layers: int) -> list[PowerChunk]:
    """Every noisy matrix-layer cut into row chunks inside its noise blocks, in a fixed order that
    depends on the model only: dealt round-robin to ranks, their float64 sums added exactly
    (math.fsum), every layout gets the same block powers bit for bit."""
    chunks: list[PowerChunk] = []
    for rule in rules:
        if not rule.noise_unit or rule.c_in < 2:
            continue
        cols = rule.src_shape[1]
        step = max(1, min(rule.noise_unit, POWER_CHUNK_ELEMENTS // cols))
        per_expert = rule.rows.src_size // rule.noise_unit  # an MoE source's experts: blocks one after another
        for layer in rule.tensor.layers(num_layers):
            for block in range(rule.noise_blocks):
                expert, first = divmod(block, per_expert)
                first *= rule.noise_unit
                for start in range(first, first + rule.noise_unit, step):
                    rows = min(step, first + rule.noise_unit - start)
                    box = (Box((expert, start, 0), (1, rows, cols)) if rule.source_experts
                           else Box((start, 0), (rows, cols)))
                    chunks.append(PowerChunk(len(chunks), BoxRead(rule.source_key, layer, (box,)), block))
    return chunks


@dataclass(frozen=True)
class DrawChunk:
    """Source rows of one noise block (unit, output block, pair) of one destination matrix-layer whose
    noise draws one rank squares and sums: the measure that scales the block to its exact SNR."""

    index: int  # position in the global chunk order, the same for every world size
    key: str  # the destination tensor (the noise stream is keyed by it and the destination layer)
    layer: int  # destination layer
    unit: int
    block: int
    pair: int
    rows: tuple[int, int]  # [start, stop) source rows, inside the unit


def draw_chunks(rules: list, dst_layers: int) -> list[DrawChunk]:
    """Every noise block of every noisy destination matrix-layer cut into row chunks, in a fixed
    order that depends on the model only: dealt round-robin to ranks, their float64 sums added
    exactly (math.fsum), every layout gets the same scales bit for bit."""
    chunks: list[DrawChunk] = []
    for rule in rules:
        if not rule.noise_unit or rule.c_in < 2:
            continue
        step = max(1, min(rule.noise_unit, POWER_CHUNK_ELEMENTS // rule.cols.src_size))
        for layer in rule.tensor.layers(dst_layers):
            for unit in range(rule.noise_blocks):
                first = unit * rule.noise_unit
                for block in range(rule.c_out):
                    for pair in range(rule.c_in // 2):
                        for start in range(first, first + rule.noise_unit, step):
                            stop = min(start + step, first + rule.noise_unit)
                            chunks.append(DrawChunk(len(chunks), rule.key, layer, unit, block, pair, (start, stop)))
    return chunks
