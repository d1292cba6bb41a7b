"""Measurements for the "Scaling Smart" reproduction: tokens to reach a loss, speedup, how symmetric
the clone blocks of a weight still are, and singular-value spectra. Pure tensors; no files.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from megaclone.pipeline.index_maps import NO_SOURCE
from megaclone.pipeline.rules import ParamRule, Role
from megaclone.shape.layout import ATTENTION, MLP


def tokens_to_reach(curve: Sequence[tuple[float, float]], target: float) -> Optional[float]:
    """First token count at which a validation curve [(tokens, loss), ...] reaches ``target``,
    linearly interpolated between evaluations; None if it never does."""
    prev = None
    for tokens, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(tokens)
            (t0, l0) = prev
            return float(t0 + (tokens - t0) * (l0 - target) / (l0 - loss))
        prev = (tokens, loss)
    return None


def smoothed(curve: Sequence[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """Trailing moving average of the losses over ``window`` evaluations (fewer at the start), at the
    same token counts: crossings read from it are not decided by one noisy evaluation."""
    losses = [loss for _, loss in curve]
    return [(tokens, float(np.mean(losses[max(0, i + 1 - window): i + 1]))) for i, (tokens, _) in enumerate(curve)]


def final_loss(curve: Sequence[tuple[float, float]], last: int = 1) -> float:
    """Mean of the last ``last`` evaluations of a curve."""
    return float(np.mean([loss for _, loss in curve[-last:]]))


def speedup(baseline: Sequence[tuple[float, float]], run: Sequence[tuple[float, float]], last: int = 1,
            window: int = 1) -> dict:
    """The paper's measure: tokens the baseline needs to reach its own final loss, divided by the
    tokens ``run`` needs to reach that loss. The target is the baseline's last ``last`` evaluations
    averaged; both crossings are read from curves smoothed over ``window`` evaluations.
    A run already at the target before training (``from_start``) needs no tokens: its speedup is
    unbounded and reported as None with that flag, never as a number."""
    target = final_loss(baseline, last)
    base_tokens = tokens_to_reach(smoothed(baseline, window), target)
    run_tokens = tokens_to_reach(smoothed(run, window), target)
    return {"target_loss": target, "baseline_tokens": base_tokens, "tokens_to_target": run_tokens,
            "from_start": run_tokens == 0.0,
            "speedup": None if not (run_tokens and base_tokens) else base_tokens / run_tokens}


def centred(curve: Sequence[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """Centred moving average of the losses over ``window`` evaluations (odd; fewer at the ends): no lag,
    unlike the trailing mean, whose crossings come about (window - 1) / 2 evaluations late."""
    losses = [loss for _, loss in curve]
    h = window // 2
    return [(tokens, float(np.mean(losses[max(0, i - h): i + h + 1]))) for i, (tokens, _) in enumerate(curve)]


CROSSINGS = {  # how a crossing of the target is read; "raw" is the headline's
    "raw": lambda curve: list(curve),
    "centred-3": lambda curve: centred(curve, 3),
    "centred-5": lambda curve: centred(curve, 5),
    "trailing-5": lambda curve: smoothed(curve, 5),
}


def speedup_by_method(baseline: Sequence[tuple[float, float]], run: Sequence[tuple[float, float]],
                      last: int) -> dict[str, Optional[float]]:
    """:func:`speedup` with the crossings read each way of :data:`CROSSINGS` (the target always the
    baseline's last ``last`` evaluations averaged): how far the number depends on the method."""
    target = final_loss(baseline, last)
    out = {}
    for name, read in CROSSINGS.items():
        base, tokens = tokens_to_reach(read(baseline), target), tokens_to_reach(read(run), target)
        out[name] = None if not (base and tokens) else base / tokens
    return out


def effective_rank(singular: Sequence[float]) -> float:
    """exp of the entropy of the singular values normalized to sum 1 (Roy and Vetterli): n for a flat
    spectrum, 1 for a single direction; unlike a count above a threshold, a weak half lowers it."""
    s = np.asarray(singular, dtype=np.float64)
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def lower_half_energy(singular: Sequence[float]) -> float:
    """The share of sum s^2 held by the smaller half of the singular values."""
    s = np.sort(np.asarray(singular, dtype=np.float64))[::-1]
    return float((s[len(s) // 2:] ** 2).sum() / (s ** 2).sum())


def _blocks(dim, size: int) -> dict[int, np.ndarray]:
    """Destination indices of each clone block along one axis, ordered by source index."""
    src, block = dim(np.arange(size))
    out = {}
    for b in np.unique(block):
        idx = np.nonzero((block == b) & (src != NO_SOURCE))[0]
        out[int(b)] = idx[np.argsort(src[idx], kind="stable")]
    return out


def clone_block_cosines(rule: ParamRule, weight: torch.Tensor) -> list[float]:
    """Cosine similarity between clone block (0, 0) of a destination matrix and each diagonal copy
    (b, b) for b >= 1 (indices taken mod each axis' factor). 1.0 means the copies are identical: the
    clone has not used its extra width yet. Works on any tensor of the destination's shape."""
    if rule.cols is None or rule.role not in (Role.MATRIX, Role.EMBEDDING):
        return []
    rows, cols = _blocks(rule.rows, rule.rows.dst_size), _blocks(rule.cols, rule.cols.dst_size)
    n = max(len(rows), len(cols))
    w = weight.double()
    first = w[rows[0]][:, cols[0]].flatten()
    out = []
    for b in range(1, n):
        other = w[rows[b % len(rows)]][:, cols[b % len(cols)]].flatten()
        out.append(float(torch.nn.functional.cosine_similarity(first, other, dim=0)))
    return out


def row_cosines(rule: ParamRule, weight: torch.Tensor) -> list[float]:
    """The paper's Figure 5 measure: for each diagonal copy (b, b), b >= 1, the mean over rows of the
    cosine similarity between a row of clone block (0, 0) and the same row of block (b, b). 1.0: the
    copies compute the same features; a random matrix sits near 0."""
    if rule.cols is None or rule.role not in (Role.MATRIX, Role.EMBEDDING):
        return []
    rows, cols = _blocks(rule.rows, rule.rows.dst_size), _blocks(rule.cols, rule.cols.dst_size)
    w = weight.double()
    first = w[rows[0]][:, cols[0]]
    return [float(torch.nn.functional.cosine_similarity(
                first, w[rows[b % len(rows)]][:, cols[b % len(cols)]], dim=1).mean())
            for b in range(1, max(len(rows), len(cols)))]


# The paper's Figure 5 groups: attention (fused q/k/v), feed-forward (both MLP matrices), unembedding.
SYMMETRY_GROUPS = {
    "qkv": (ATTENTION + "linear_qkv.weight",),
    "ffn": (MLP + "linear_fc1.weight", MLP + "linear_fc2.weight"),
    "output": ("output_layer.weight",),
}


def group_row_cosines(rules: Sequence[ParamRule], tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """``row_cosines`` averaged over the layers and copies of each Figure 5 group's matrices."""
    by_key = {rule.key: rule for rule in rules}
    out = {}
    for group, keys in SYMMETRY_GROUPS.items():
        values = []
        for key in keys:
            if key not in tensors or key not in by_key:
                continue
            stored = tensors[key]
            for w in [stored[i] for i in range(stored.shape[0])] if by_key[key].per_layer else [stored]:
                values += row_cosines(by_key[key], w)
        if values:
            out[group] = float(np.mean(values))
    return out


def spread(values: Sequence[Optional[float]], from_start: int = 0) -> dict:
    """Mean, sample standard deviation, range and count over seeds. A seed without a value (None:
    the target never reached, or reached before training, counted in ``from_start``) makes the
    mean None: its speedup is unknown or unbounded, not a number to average."""
    known = [v for v in values if v is not None]
    if len(known) < len(values) or not known:
        return {"mean": None, "std": None, "min": min(known, default=None), "max": max(known, default=None),
                "n": len(values), "missing": len(values) - len(known) - from_start, "from_start": from_start}
    return {"mean": float(np.mean(known)), "std": float(np.std(known, ddof=1)) if len(known) > 1 else 0.0,
            "min": float(min(known)), "max": float(max(known)), "n": len(known), "missing": 0, "from_start": 0}


def rank_above(singular: Sequence[float], relative: float = 1e-3) -> int:
    """Singular values above ``relative`` times the largest: the paper's Figure 6 reads "rank" off the
    spectrum, where a symmetric clone's second half sits at rounding level."""
    singular = np.asarray(singular)
    return int((singular > relative * singular.max()).sum())


def early_bump(curve: Sequence[tuple[float, float]], fraction: float = 0.25) -> float:
    """How far the validation loss rises above its starting value within the first ``fraction`` of
    training (0 when it never does): the paper's early forgetting of a cloned model."""
    end = curve[-1][0] * fraction
    return max(0.0, max(loss for tokens, loss in curve if tokens <= end) - curve[0][1])


def recovery_tokens(curve: Sequence[tuple[float, float]]) -> Optional[float]:
    """Tokens at which a validation curve that rose above its starting loss is first back at or below
    it: the end of the early bump. 0 when it never rose; None when it never came back."""
    start = curve[0][1]
    risen = False
    for tokens, loss in curve[1:]:
        if loss > start:
            risen = True
        elif risen:
            return float(tokens)
    return None if risen else 0.0


def singular_values(weight: torch.Tensor) -> np.ndarray:
    return torch.linalg.svdvals(weight.double()).numpy()
