"""Measurements for the "Scaling Smart" reproduction: tokens to reach a loss, speedup, how symmetric
the clone blocks of a weight still are, and singular-value spectra. Pure tensors; no files.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .index_maps import NO_SOURCE
from .partition import ParamRule, Role


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


def speedup(baseline: Sequence[tuple[float, float]], run: Sequence[tuple[float, float]]) -> dict:
    """The paper's measure: tokens the baseline needs to reach its own final loss, divided by the
    tokens ``run`` needs to reach that loss."""
    target = baseline[-1][1]
    base_tokens = tokens_to_reach(baseline, target)
    run_tokens = tokens_to_reach(run, target)
    return {"target_loss": target, "baseline_tokens": base_tokens, "tokens_to_target": run_tokens,
            "speedup": None if not run_tokens else base_tokens / run_tokens}


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


def model_symmetry(rules: Sequence[ParamRule], tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean clone-block cosine per parameter kind (over layers) and over all matrices."""
    per_key: dict[str, list[float]] = {}
    for rule in rules:
        if rule.key not in tensors:
            continue
        stored = tensors[rule.key]
        layers = [stored[i] for i in range(stored.shape[0])] if rule.per_layer else [stored]
        for w in layers:
            per_key.setdefault(rule.key, []).extend(clone_block_cosines(rule, w))
    out = {key: float(np.mean(v)) for key, v in per_key.items() if v}
    if out:
        out["all"] = float(np.mean([c for v in per_key.values() for c in v]))
    return out


def singular_values(weight: torch.Tensor) -> np.ndarray:
    return torch.linalg.svdvals(weight.double()).numpy()
