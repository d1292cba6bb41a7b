"""Weight-level verification: a clone's stored tensors against its source, by the clone's definition.

The logit check (check.logits) proves the function; it cannot see a change below its tolerance, nor a
change the function does not see (two heads swapped consistently). This check reads every stored
destination tensor-layer and the source tensor-layer it was grown from, and compares them by the
definition of the variant the clone records, computed here from the index maps alone (which source
element and which output/input copy each destination element is), never through the expander's
planner, reader plan or clone rules:

- exact variants: every destination element equals its source element divided by the fan-in copies
  (symmetric), or undivided on the diagonal copy and zero off it (diagonal), rounded as the clone
  computes (in fp32, or fp64 for an fp64 source): bit for bit;
- noisy variants: elements outside the perturbed linears as above; inside, input copies 2p and 2p+1
  differ from that value by opposite amounts (to rounding), an odd last copy not at all, and each
  noise block (head, SwiGLU half or matrix; output copy; input copy) measures the recorded SNR against
  the cloned block W_S/c_in within ``snr_tol_db``;
- depth: each destination layer is the source layer the recorded ``--depth-placement`` maps it to;
  under ``--depth-init identity`` the residual outputs of added copies are zero;
- experts: the first G experts are the G slices of the grown dense MLP (the second projection times
  G), every further expert is bit for bit the one holding its slice, and the router's rows tie
  within each virtual group of G experts (or are zero). Under noise, a granular expert's second
  projection holds one copy of a pair (its partner lies in another expert): its noise is checked
  by power, the cancellation by the logit check.

Tensor-layers are dealt to the ranks (largest first); each reads its share in row chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megaclone.errors import NotComparable
from megaclone.formats.base import Box, BoxRead, Source
from megaclone.formats.hf.reader import open_hf_source
from megaclone.formats.source import open_megatron_source
from megaclone.pipeline.clone import Variant
from megaclone.pipeline.index_maps import NO_SOURCE, layer_map
from megaclone.pipeline.rules import ParamRule, Role, param_rules
from megaclone.runtime import agree, deal, gathered
from megaclone.shape.request import Depth

# Destination elements per read: bounds the float64 working set of one chunk.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Mismatch:
    """The first destination element of a tensor-layer that breaks the clone's definition."""

    key: str
    layer: Optional[int]
    expert: Optional[int]
    index: tuple[int, ...]
    out_copy: int
    in_copy: Optional[int]
    expected: float
    found: float
    why: str

    def line(self) -> str:
        where = (self.key + ("" if self.layer is None else f" layer {self.layer}")
                 + ("" if self.expert is None else f" expert {self.expert}"))
        copy = f"output copy {self.out_copy}" + ("" if self.in_copy is None else f", input copy {self.in_copy}")
        return (f"{where} [{', '.join(map(str, self.index))}] ({copy}): {self.why}: expected {self.expected!r}, "
                f"found {self.found!r}")


@dataclass
class WeightReport:
    """One rank's share: tensor-layers checked, the first mismatch of each failing one, and the range of
    the measured SNR over every noise block (noisy variants)."""

    rank: int
    checked: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    snr_db: Optional[tuple[float, float]] = None

    @property
    def ok(self) -> bool:
        return not self.mismatches


@dataclass(frozen=True)
class CloneDefinition:
    """What the clone record says the destination is (the factors follow from the two shapes)."""

    variant: Variant
    snr_db: float
    depth: Depth
    router_init: str = "random"


def definition_of(destination: Source) -> CloneDefinition:
    record = destination.clone_record
    if record is None:
        raise NotComparable(f"{destination.path} holds no megaclone record: it was not written by megaclone (or was "
                             "trained since), so there is no clone definition to check its weights against",
                             "check the checkpoint megaclone wrote, or compare logits only (--no-weights)")
    return CloneDefinition(Variant(record["variant"]), float(record["snr_db"]), Depth(**record.get("depth", {})),
                           (record.get("experts") or {}).get("router_init", "random"))


def _rows_cols(rule: ParamRule, rows: np.ndarray):
    """(source row, output copy) of destination ``rows`` and (source col, input copy) of every column."""
    src_rows, out_copy = rule.rows(rows)
    if rule.cols is None:
        return src_rows, out_copy, None, None
    src_cols, in_copy = rule.cols(np.arange(rule.cols.dst_size))
    return src_rows, out_copy, src_cols, in_copy


def expected_exact(rule: ParamRule, source: torch.Tensor, rows: np.ndarray, definition: CloneDefinition,
                   dtype: torch.dtype) -> torch.Tensor:
    """The exact clone's values at destination ``rows`` (every column), from the whole source
    tensor-layer: the variant's definition, rounded as the clone rounds (divided in fp32, fp64 for an
    fp64 source, then cast to the destination's dtype)."""
    work = torch.float64 if source.dtype == torch.float64 else torch.float32
    src_rows, out_copy, src_cols, in_copy = _rows_cols(rule, rows)
    have_row = torch.from_numpy(src_rows != NO_SOURCE)
    values = source.to(work)[torch.from_numpy(np.maximum(src_rows, 0))]
    if src_cols is not None:
        values = values[:, torch.from_numpy(np.maximum(src_cols, 0))]
        values = values * torch.from_numpy(src_cols != NO_SOURCE)[None, :]
    values = values * (have_row[:, None] if values.dim() == 2 else have_row)
    diagonal = definition.variant.diagonal and rule.diagonal_applies
    if rule.role in (Role.VECTOR, Role.EMBEDDING) and rule.divisor != 1:
        values = (values + rule.offset) / rule.divisor - rule.offset if rule.offset else values / rule.divisor
    elif rule.role is Role.MATRIX and not diagonal and rule.c_in != 1:
        values = values / rule.c_in
    if diagonal:
        values = values * torch.from_numpy(out_copy[:, None] == in_copy[None, :])
    if rule.gain != 1:
        values = values * rule.gain
    return values.to(dtype)


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    """Position of the first True of ``mask`` (row-major)."""
    return tuple(int(i) for i in np.unravel_index(int(torch.nonzero(mask.flatten())[0]), tuple(mask.shape)))


def _mismatch(rule: ParamRule, layer: Optional[int], expert: Optional[int], rows: np.ndarray, at: tuple[int, ...],
              found: torch.Tensor, expected: torch.Tensor, why: str) -> Mismatch:
    """A mismatch at chunk position ``at`` (row within ``rows``, column), in destination coordinates."""
    row = int(rows[at[0]])
    in_copy = None if len(at) < 2 or rule.cols is None else int(rule.cols(np.array([at[1]]))[1][0])
    out_copy = 0 if rule.role is Role.ROUTER else int(rule.rows(np.array([row]))[1][0])
    return Mismatch(rule.key, layer, expert, (row,) + at[1:], out_copy, in_copy, float(expected[at]),
                    float(found[at]), why)


def _unequal(found: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Where two tensors differ, element by element, a NaN equal to a NaN (--allow-non-finite copies them)."""
    return ~((found == expected) | (found.isnan() & expected.isnan()))


def _non_finite(rule: ParamRule, layer: Optional[int], expert: Optional[int], rows: np.ndarray,
                found: torch.Tensor, expected: torch.Tensor) -> Optional[Mismatch]:
    """A stored NaN or infinity fails the check even where the clone's definition says so (a clone of a
    non-finite source, --allow-non-finite): no such model computes a function one can verify."""
    bad = ~torch.isfinite(found)
    return _mismatch(rule, layer, expert, rows, _first(bad), found, expected, "not finite") if bad.any() else None


def _read_rows(destination: Source, rule: ParamRule, layer: Optional[int], expert: Optional[int],
               start: int, n: int) -> torch.Tensor:
    """Destination rows [start, start + n) of one tensor-layer (of one expert), every column."""
    shape = rule.dst_shape
    lead = () if expert is None else (expert,)
    box = Box(lead + (start,) + (0,) * (len(shape) - 1), (1,) * len(lead) + (n,) + tuple(shape[1:]))
    [found] = destination.read(BoxRead(rule.key, layer, (box,)))
    return found.reshape((n,) + tuple(shape[1:]))


def check_router(rule: ParamRule, layer: Optional[int], destination: Source,
                 definition: CloneDefinition) -> Optional[Mismatch]:
    """A router has no source: its rows are drawn, one per virtual group of ``rule.slices`` experts
    (so the experts of a group tie), or all zero with --moe-router-init zero."""
    rows = np.arange(rule.dst_shape[0])
    found = _read_rows(destination, rule, layer, None, 0, len(rows))
    expected = torch.zeros_like(found) if definition.router_init == "zero" else found[rows - rows % rule.slices]
    if (mismatch := _non_finite(rule, layer, None, rows, found, expected)) is not None:
        return mismatch
    differs = found != expected
    if differs.any():
        why = ("not zero (--moe-router-init zero)" if definition.router_init == "zero"
               else f"differs from the first row of its group of {rule.slices} experts, which tie")
        return _mismatch(rule, layer, None, rows, _first(differs), found, expected, why)
    return None


def check_tensor_layer(rule: ParamRule, layer: Optional[int], source: Source, destination: Source,
                       src_layer: Optional[int], zero: bool, definition: CloneDefinition,
                       snr_tol_db: float) -> tuple[Optional[Mismatch], list[float]]:
    """Compare one destination tensor-layer (every expert of a per-expert tensor) with its definition;
    (first mismatch or None, the SNR of every noise block in dB)."""
    if rule.role is Role.ROUTER:
        return check_router(rule, layer, destination, definition), []
    src_shape = source.tensors[rule.source_key].shape
    src_shape = src_shape[1:] if rule.per_layer else src_shape
    [src] = source.read(BoxRead(rule.source_key, src_layer, (Box((0,) * len(src_shape), tuple(src_shape)),)))
    shape = rule.dst_shape
    noisy = definition.variant.noisy and bool(rule.noise_unit) and rule.c_in > 1 and not zero
    step = max(1, CHUNK_ELEMENTS // (shape[1] if len(shape) == 2 else 1))
    noise = present = unit_power = None
    if noisy:  # per (unit, output copy, input copy): sums of the cloned block's and of the noise's squares
        units = rule.noise_blocks
        noise = np.zeros((units, rule.c_out, rule.c_in))
        # elements seen per block (a grouped QKV lacks some copies; an expert holds part of a block)
        present = np.zeros((units, rule.c_out, rule.c_in), dtype=np.int64)
        # the cloned block's power, times a granular expert's gain (its clone and noise both carry it)
        unit_power = (src.double() * rule.gain / rule.c_in).square().reshape(units, -1).mean(dim=1).numpy()
    for expert in range(rule.tensor.experts) if rule.tensor.experts else [None]:
        one = rule.for_expert(expert)
        own = src[rule.source_expert(expert)] if rule.source_experts else src  # an MoE source: its own expert
        for start in range(0, shape[0], step):
            rows = np.arange(start, min(start + step, shape[0]))
            found = _read_rows(destination, rule, layer, expert, start, len(rows))
            if expert is not None and not rule.source_experts and expert >= rule.slices:  # holds expert e mod G's slice
                original = _read_rows(destination, rule, layer, expert % rule.slices, start, len(rows))
                differs = _unequal(found, original)
                if differs.any():
                    return _mismatch(one, layer, expert, rows, _first(differs), found, original,
                                     f"differs from expert {expert % rule.slices}, which holds the same slice"), []
                continue
            expected = torch.zeros_like(found) if zero else expected_exact(one, own, rows, definition, found.dtype)
            if (mismatch := _non_finite(one, layer, expert, rows, found, expected)) is not None:
                return mismatch, []
            if not noisy:
                differs = _unequal(found, expected)
                if differs.any():
                    why = "not zero (an added layer's residual output)" if zero else "differs from the clone's value"
                    return _mismatch(one, layer, expert, rows, _first(differs), found, expected, why), []
                continue
            mismatch = _check_noise_chunk(one, layer, expert, rows, found, expected, noise, present)
            if mismatch is not None:
                return mismatch, []
    if not noisy:
        return None, []
    noised = 2 * (rule.c_in // 2)  # input copies that carry noise
    exists = present[:, :, :noised] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = 10 * np.log10(unit_power[:, None, None] / (noise[:, :, :noised] / present[:, :, :noised]))
    off = (np.abs(snr - definition.snr_db) > snr_tol_db) & exists
    if off.any():
        unit, out_copy, in_copy = (int(i[0]) for i in np.nonzero(off))
        return Mismatch(rule.key, layer, None, (unit * rule.noise_unit,), out_copy, in_copy, definition.snr_db,
                        float(snr[unit, out_copy, in_copy]),
                        f"noise block {unit} (rows of {rule.noise_unit}) measures another SNR in dB than recorded"), []
    return None, snr[exists].ravel().tolist()


def _check_noise_chunk(rule, layer, expert, rows, found, expected, noise, present) -> Optional[Mismatch]:
    """Paired noise on rows ``rows``: copies 2p and 2p+1 perturbed by opposite amounts (to the rounding
    of the stored and the exact values), an odd last copy exact; adds each block's sum of squared
    noise to ``noise`` [unit, output copy, input copy] and its rows to ``present`` (unless None)."""
    found64, expected64 = found.double(), expected.double()
    delta = found64 - expected64
    _, in_copy = rule.cols(np.arange(rule.cols.dst_size))
    src_rows, out_copy = rule.rows(rows)
    eps = torch.finfo(found.dtype).eps
    for p in range(rule.c_in // 2):
        plus, minus = torch.from_numpy(in_copy == 2 * p), torch.from_numpy(in_copy == 2 * p + 1)
        if not plus.any() or not minus.any():  # a granular expert holds one copy of the pair: its power is checked
            continue
        total = (delta[:, plus] + delta[:, minus]).abs()
        bound = eps * (found64[:, plus].abs() + found64[:, minus].abs()
                       + expected64[:, plus].abs() + expected64[:, minus].abs())
        broken = total > bound
        if broken.any():
            r, c = _first(broken)
            at = (r, int(np.flatnonzero(in_copy == 2 * p)[c]))
            return _mismatch(rule, layer, expert, rows, at, found64, expected64,
                             f"the noise of input copies {2 * p} and {2 * p + 1} does not cancel (their sum is "
                             f"{float(total[r, c]):.3e}); the value shown is copy {2 * p}'s")
    if rule.c_in % 2:
        last = in_copy == rule.c_in - 1
        differs = delta[:, torch.from_numpy(last)] != 0
        if differs.any():
            r, c = _first(differs)
            return _mismatch(rule, layer, expert, rows, (r, int(np.flatnonzero(last)[c])), found64, expected64,
                             "the odd last input copy carries noise")
    if noise is None:
        return None
    squares = delta.square()
    unit = (src_rows + rule.noise_offset) // rule.noise_unit  # an MoE source's expert: its own blocks
    for j in range(rule.c_in):
        cols = torch.from_numpy(in_copy == j)
        np.add.at(noise[:, :, j], (unit, out_copy), squares[:, cols].sum(dim=1).numpy())
        np.add.at(present[:, :, j], (unit, out_copy), int(cols.sum()))
    return None


def check_weights(src_root, dst_root, snr_tol_db: float = 0.05, hf: bool = False) -> list[WeightReport]:
    """Every rank checks its share of the destination's tensor-layers against the source (a Megatron
    checkpoint, or with ``hf`` a Hugging Face directory, read through the same Source interface);
    returns every rank's report on every rank. Raises NotComparable (before reading any tensor) for a
    checkpoint megaclone did not write."""

    def validate():
        source = open_hf_source(src_root) if hf else open_megatron_source(src_root)
        destination = open_megatron_source(dst_root)
        return source, destination, definition_of(destination)

    source, destination, definition = agree(validate)
    rules = param_rules(source.spec, destination.spec)
    src_layer_of, copy = layer_map(definition.depth, source.spec.num_layers)(
        np.arange(destination.spec.num_layers))
    work = []
    for rule in rules:
        for layer in rule.tensor.layers(destination.spec.num_layers):
            size = math.prod(rule.dst_shape)
            work.append((size, rule, layer))
    owner = deal([w[0] for w in work], dist.get_world_size())
    report = WeightReport(rank=dist.get_rank())
    snrs: list[float] = []
    identity = definition.depth.init == "identity"
    for (size, rule, layer), who in zip(work, owner):
        if who != report.rank:
            continue
        src_layer = None if layer is None else int(src_layer_of[layer])
        zero = layer is not None and identity and rule.residual_output and int(copy[layer]) > 0
        mismatch, block_snrs = check_tensor_layer(rule, layer, source, destination, src_layer, zero, definition,
                                                  snr_tol_db)
        report.checked += 1
        snrs += block_snrs
        if mismatch is not None:
            report.mismatches.append(mismatch)
    if snrs:
        report.snr_db = (min(snrs), max(snrs))
    return gathered(report)
