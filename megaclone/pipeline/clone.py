"""Clone rules: the values of a destination slice from the source values it needs.

Given a source piece (the S rows/cols a slice needs) and the slice's destination indices, compute
the slice (docs/design.md, "Clone rules"). No files, no processes: the same function serves every rank and the
full-materialization path alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Optional

import numpy as np
import torch

from megaclone.errors import MegacloneError
from megaclone.pipeline.index_maps import NO_SOURCE
from megaclone.pipeline.noise import (
    draw_sum_of_squares,
    noise_scale,
    paired_noise,
    standard_normal,
    stream_key,
)
from megaclone.pipeline.rules import ParamRule, Role

# Rows of noise generated at once: bounds the float64 working set of a noisy slice.
_NOISE_CHUNK_ELEMENTS = 1 << 21


class Variant(Enum):
    SYMMETRIC = "symmetric"
    NOISY_SYMMETRIC = "noisy-symmetric"
    DIAGONAL = "diagonal"
    NOISY_DIAGONAL = "noisy-diagonal"

    @property
    def noisy(self) -> bool:
        return self in (Variant.NOISY_SYMMETRIC, Variant.NOISY_DIAGONAL)

    @property
    def diagonal(self) -> bool:
        return self in (Variant.DIAGONAL, Variant.NOISY_DIAGONAL)


# Below this signal-to-noise ratio the noise outweighs the weights it perturbs; its exact cancellation
# holds in real arithmetic only, and rounding the perturbed weights loses it as the noise grows (in
# fp32 the logits no longer match to 1e-5 at -15 dB).
SNR_DB_PRESERVING = 0.0


@dataclass(frozen=True)
class CloneConfig:
    variant: Variant = Variant.SYMMETRIC
    snr_db: float = 10.0
    seed: int = 0

    def __post_init__(self):
        if not math.isfinite(self.snr_db):
            raise MegacloneError(f"--snr-db {self.snr_db} is not a finite number of decibels",
                                 "pass a finite SNR, e.g. --snr-db 10 (larger is less noise)")

    def warnings(self, hidden_dropout: Optional[float] = None, attention_dropout: Optional[float] = None) -> list[str]:
        """What the user should know before writing: a request that may not preserve the function, or
        a clone that training cannot tell apart from the source (the dropouts the checkpoint's args
        record, which Megatron-LM's --use-checkpoint-args trains with; None: not recorded)."""
        out = []
        if self.variant.noisy and self.snr_db < SNR_DB_PRESERVING:
            out.append(f"--snr-db {self.snr_db:g}: the noise is stronger than the weights it perturbs; its "
                       "cancellation is exact only before rounding, so the clone may not reproduce the source's "
                       "logits (check with --verify or tools/verify_logits.py, or use "
                       f"--snr-db {SNR_DB_PRESERVING:g} or more)")
        if self.variant is Variant.SYMMETRIC and hidden_dropout == 0 and attention_dropout == 0:
            out.append("the exact symmetric clone with dropout 0 (as the source's args record) never separates "
                       "its copies: gradients keep them equal, so the wide model trains as the small one. Use "
                       "--variant noisy-symmetric, or train with dropout (--hidden-dropout 0.1 "
                       "--attention-dropout 0.1 instead of --use-checkpoint-args' values)")
        return out


@dataclass(frozen=True)
class SourcePiece:
    """Source values ``data`` at S rows ``rows`` (sorted) and S cols ``cols`` (sorted; None for vectors)."""

    data: torch.Tensor
    rows: np.ndarray
    cols: Optional[np.ndarray]


def _positions(wanted: np.ndarray, have: np.ndarray) -> np.ndarray:
    """Position of each wanted source index inside the sorted ``have`` (NO_SOURCE -> 0, masked later)."""
    pos = np.searchsorted(have, np.maximum(wanted, 0))
    found = (pos < len(have)) & (have[np.minimum(pos, len(have) - 1)] == wanted) if len(have) else False
    ok = (wanted == NO_SOURCE) | found
    if not ok.all():
        raise AssertionError("source piece lacks indices the destination slice needs")
    return np.where(wanted == NO_SOURCE, 0, pos)


def clone_slice(
    rule: ParamRule,
    layer: int,
    piece: SourcePiece,
    dst_rows: np.ndarray,
    dst_cols: Optional[np.ndarray],
    cfg: CloneConfig,
    out: Optional[torch.Tensor] = None,
    scale: Optional[np.ndarray] = None,
) -> torch.Tensor:
    """Destination values at (dst_rows x dst_cols) of ``rule``, in the source's dtype.

    ``scale`` (noisy variants): the factor on the draws of each noise block of this layer, [units,
    c_out, pairs] (:func:`noise_scales`, which ``expand`` computes over the whole model, across ranks).

    With ``out`` (the destination parameter) the slice is computed in place there: the gather writes
    straight into it and the scaling is in place, so no second slice-sized buffer exists (fp32/fp64,
    and bf16/fp16 from a source of that dtype when no noise or gain adds a second rounding).

    Invariant: for the exact variants, the result equals the corresponding slice of the fully
    materialized clone; for every variant it depends only on (cfg, rule.key, layer, indices).
    """
    src_rows, out_block = rule.rows(dst_rows)
    src_cols, in_block = rule.cols(dst_cols) if rule.cols is not None else (None, None)
    noisy = cfg.variant.noisy and rule.noise_unit and rule.c_in > 1
    work = torch.float64 if piece.data.dtype == torch.float64 else torch.float32
    divisor = _uniform_divisor(rule, cfg)
    shifted = bool(rule.offset) and divisor != 1  # a (offset + w) norm: ((offset + w) / divisor) - offset
    if out is not None and out.dtype == piece.data.dtype and not noisy and rule.gain == 1 and not shifted:
        # one rounding either way: torch divides a bf16/fp16 element in fp32 and rounds it once, as the
        # widened path would, and the diagonal mask (0 or 1) is exact, so the slice is computed in place
        work = out.dtype
    in_place = out is not None and out.dtype == work
    values = _gather(piece, src_rows, src_cols, work, 1 if shifted else divisor, out if in_place else None)
    if shifted:
        values.add_(rule.offset).div_(divisor).sub_(rule.offset)

    if cfg.variant.diagonal and rule.diagonal_applies:
        # output block b reads exactly input block b, unscaled
        keep = (in_block[None, :] == out_block[:, None])
        values.mul_(torch.from_numpy(keep).to(values.dtype))
    if noisy:
        if scale is None:
            raise ValueError(f"{rule.key}: the noisy variants need the scale of each noise block")
        values.add_(_noise(rule, layer, cfg, src_rows, out_block, src_cols, in_block, scale).to(values.dtype))
    if rule.gain != 1:
        values.mul_(rule.gain)
    if out is None:
        return values.to(piece.data.dtype)
    if not in_place:
        out.copy_(values)
    return out


def router_slice(rule: ParamRule, layer: int, dst_rows: np.ndarray, dst_cols: np.ndarray, cfg: CloneConfig,
                 std: float, out: torch.Tensor) -> torch.Tensor:
    """A MoE router's rows ``dst_rows`` (experts) at columns ``dst_cols``, into ``out``: N(0, std^2)
    drawn per (virtual group, column) from the seeded stream of (router, layer), so the ``rule.slices``
    experts of one group (e div G) get one row, equal logits, and top-k picks whole groups; std 0: zero.
    Depends only on (cfg.seed, layer, indices): every rank and layout draws the same router."""
    if std == 0:
        return out.zero_()
    groups = (dst_rows // rule.slices).astype(np.uint64)[:, None]
    counters = groups * np.uint64(rule.cols.dst_size) + dst_cols.astype(np.uint64)[None, :]
    values = std * standard_normal(stream_key(cfg.seed, rule.key, layer), counters)
    return out.copy_(torch.from_numpy(values))


def _uniform_divisor(rule: ParamRule, cfg: CloneConfig) -> float:
    """What every value of the slice is divided by: a vector's divisor, or the fan-in copies of a
    matrix under the symmetric variants (the diagonal ones keep one block unscaled instead)."""
    if rule.role in (Role.VECTOR, Role.EMBEDDING):
        return rule.divisor
    if rule.role is Role.MATRIX and not (cfg.variant.diagonal and rule.diagonal_applies):
        return rule.c_in
    return 1


def _gather(piece: SourcePiece, src_rows: np.ndarray, src_cols: Optional[np.ndarray], work: torch.dtype,
            divisor: float = 1, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """values[r, c] = S[src_rows[r], src_cols[c]] / divisor in ``work`` dtype (into ``out`` if given);
    rows with NO_SOURCE are zero.

    HyperCloning maps are tilings, so consecutive destination indices read consecutive source indices
    except where a tile wraps: the gather is a few block copies (memcpy speed), not an
    element-by-element index, and the division is done as each block is written.
    """
    shape = (len(src_rows),) + (() if src_cols is None else (len(src_cols),))
    if out is None:
        out = torch.empty(shape, dtype=work)
    if len(piece.rows) == 0:
        return out.zero_()
    # divide in the work dtype (a bf16 source is widened first, then divided, as a full clone would)
    data = piece.data if piece.data.dtype == work or divisor == 1 else piece.data.to(work)

    def put(block: torch.Tensor, values: torch.Tensor) -> None:
        block.copy_(values) if divisor == 1 else torch.div(values, divisor, out=block)

    row_runs = _runs(_positions(src_rows, piece.rows), src_rows == NO_SOURCE)
    if src_cols is None:
        for d, s, n in row_runs:
            out[d:d + n].zero_() if s < 0 else put(out[d:d + n], data[s:s + n])
        return out
    col_runs = _runs(_positions(src_cols, piece.cols), src_cols == NO_SOURCE)
    for dr, sr, nr in row_runs:
        for dc, sc, nc in col_runs:
            block = out[dr:dr + nr, dc:dc + nc]
            block.zero_() if sr < 0 or sc < 0 else put(block, data[sr:sr + nr, sc:sc + nc])
    return out


def _runs(positions: np.ndarray, missing: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of destination indices that read consecutive piece positions (or are all
    missing), as (destination start, piece start or -1 when missing, length)."""
    if len(positions) == 0:
        return []
    follows = np.zeros(len(positions), dtype=bool)
    follows[1:] = np.where(missing[1:], missing[:-1], ~missing[:-1] & (positions[1:] == positions[:-1] + 1))
    starts = np.flatnonzero(~follows)
    ends = np.append(starts[1:], len(positions))
    return [(int(a), -1 if missing[a] else int(positions[a]), int(b - a)) for a, b in zip(starts, ends)]


def chunk_sum_of_squares(rule: ParamRule, chunk, cfg: CloneConfig) -> float:
    """Sum of the squared draws of one :class:`plan.DrawChunk` of ``rule`` (before scaling)."""
    return draw_sum_of_squares(stream_key(cfg.seed, rule.key, chunk.layer), np.arange(*chunk.rows), chunk.block,
                               chunk.pair, rule.cols.src_size, rule.c_out, rule.c_in)


def noise_scales(rules: list[ParamRule], chunks: list, sums: dict[int, float], signal_powers: dict,
                 src_layer_of: np.ndarray, cfg: CloneConfig) -> dict[tuple[str, int], np.ndarray]:
    """The factor on each noise block's draws, per (destination key, destination layer): [units,
    c_out, pairs], from every chunk's sum of squared draws (``sums``, by chunk index) and the source's
    mean W_S^2 per noise block (``signal_powers``, by (source key, source layer)). Sums are added
    exactly (math.fsum), so the scales do not depend on who computed which chunk."""
    by_key = {r.key: r for r in rules}
    parts: dict[tuple[str, int], dict[tuple[int, int, int], list[float]]] = {}
    for chunk in chunks:
        parts.setdefault((chunk.key, chunk.layer), {}).setdefault((chunk.unit, chunk.block, chunk.pair), []).append(
            sums[chunk.index])
    out = {}
    for (key, layer), blocks in parts.items():
        rule = by_key[key]
        mean_square = np.zeros((rule.noise_blocks, rule.c_out, rule.c_in // 2))
        for (unit, block, pair), values in blocks.items():
            mean_square[unit, block, pair] = math.fsum(values) / (rule.noise_unit * rule.cols.src_size)
        power = signal_powers[(rule.source_key, int(src_layer_of[layer]))]
        out[(key, layer)] = noise_scale(power, mean_square, rule.c_in, cfg.snr_db)
    return out


def _noise(rule, layer, cfg, src_rows, out_block, src_cols, in_block, scale) -> torch.Tensor:
    """The noise of a slice: paired draws times the scale of each element's (unit, output block, pair)."""
    key = stream_key(cfg.seed, rule.key, layer)
    src_rows = np.where(src_rows >= 0, src_rows + rule.noise_offset, src_rows)  # an MoE source's expert
    unit = np.maximum(src_rows, 0) // rule.noise_unit
    pair = np.minimum(in_block // 2, max(rule.c_in // 2 - 1, 0))
    rows_per_chunk = max(1, _NOISE_CHUNK_ELEMENTS // len(src_cols))
    chunks = []
    for start in range(0, len(src_rows), rows_per_chunk):
        sl = slice(start, start + rows_per_chunk)
        draws = paired_noise(key, src_rows[sl], out_block[sl], src_cols, in_block, rule.cols.src_size, rule.c_out,
                             rule.c_in)
        chunks.append(draws * scale[unit[sl, None], out_block[sl, None], pair[None, :]])
    return torch.from_numpy(np.concatenate(chunks, axis=0))
