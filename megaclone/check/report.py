"""Both checks of a clone, run and reported as one verdict: the logits per rank (``check.logits``)
and the stored weights against the clone's recorded definition (``check.weights``).

``tools/verify_logits.py`` and ``tools/expand_sharded.py --verify`` print exactly these lines; the
verdict is False only if a check ran and failed (a clone that is not comparable by design, or a
checkpoint without a megaclone record, is said so and passes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from megaclone.check.logits import verify, verify_hf
from megaclone.check.weights import check_weights
from megaclone.errors import NotComparable


def prove(
    src: Optional[str | Path],
    dst: Optional[str | Path],
    say: Callable[[str], None],
    *,
    src_hf: Optional[str | Path] = None,
    dst_hf: Optional[str | Path] = None,
    tokens: Optional[torch.Tensor] = None,
    tol: Optional[float] = None,
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
    batch: int = 2,
    seq_length: int = 32,
    weights: bool = True,
    snr_tol_db: float = 0.05,
) -> bool:
    """Check ``dst`` (a Megatron checkpoint) or ``dst_hf`` against ``src`` or ``src_hf``, every rank of
    the job taking part; ``say`` prints a line once (rank 0). The weights are checked for a Megatron
    destination only (they are read against its clone record)."""
    logits_ok = True
    inputs = dict(tokens=tokens, tol=tol, device=device, seed=seed, batch=batch, seq_length=seq_length)
    try:
        results = verify_hf(src_hf, dst_hf, **inputs) if dst_hf else verify(src, dst, src_hf=src_hf, **inputs)
    except NotComparable as exc:  # by design, not a failure: say so and compare nothing
        say(f"NOT COMPARED: {exc.problem}")
    else:
        for r in results:
            say(r.line())
        logits_ok = all(r.ok for r in results)
        broken = [r for r in results if r.non_finite]
        if broken:
            say(f"FAIL: {len(broken)} of {len(results)} ranks compute non-finite logits; the first: rank "
                f"{broken[0].rank}: {broken[0].non_finite}")
        else:
            worst = max(results, key=lambda r: r.max_rel)
            say(f"{'PASS' if logits_ok else 'FAIL'}: {len(results)} ranks, worst max rel diff {worst.max_rel:.3e} "
                f"(rank {worst.rank}), tolerance {worst.tol:.0e}")
    if not weights or dst_hf:
        return logits_ok
    try:
        reports = check_weights(src or src_hf, dst, snr_tol_db, hf=src_hf is not None)
    except NotComparable as exc:
        say(f"weights: NOT CHECKED: {exc.problem}")
        return logits_ok
    for r in reports:
        for m in r.mismatches:
            say(f"weights: rank {r.rank}: {m.line()}")
    checked, failed = sum(r.checked for r in reports), sum(len(r.mismatches) for r in reports)
    snrs = [r.snr_db for r in reports if r.snr_db]
    noise = f", noise blocks at {min(a for a, _ in snrs):.4f} to {max(b for _, b in snrs):.4f} dB" if snrs else ""
    if failed:
        say(f"weights: FAIL: {failed} of {checked} tensor-layers differ from the clone's definition")
    else:
        say(f"weights: PASS: {checked} tensor-layers on {len(reports)} ranks are the clone the checkpoint records"
            f"{noise}")
    return logits_ok and not failed
