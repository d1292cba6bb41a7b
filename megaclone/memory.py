"""Peak memory of a rank, sampled: its own RSS, and the proportional set size (PSS) of the rank and
its helper processes together.

``dist_checkpointing.save`` starts helper processes (a multiprocessing manager, forked writers); a
benchmark that counts only the rank itself would flatter it, so both figures are kept. Forked
writers share the rank's pages copy-on-write, so summing RSS would count those pages twice; PSS
splits each shared page among its sharers and sums correctly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import psutil


@dataclass
class PeakMemory:
    """Sampled maxima in bytes; ``baseline`` is the RSS when sampling started (after imports)."""

    baseline: int = 0
    self_peak: int = 0
    tree_peak: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self, interval_s: float = 0.05, tree_every: int = 20) -> "PeakMemory":
        """Sample RSS every ``interval_s`` (cheap: /proc/pid/statm) and the helper-inclusive PSS every
        ``tree_every`` samples (reading smaps costs milliseconds per process)."""
        proc = psutil.Process()
        self.baseline = proc.memory_info().rss

        def sample() -> None:
            tick = 0
            while not self._stop.is_set():
                self.sample_once(proc, tree=tick % tree_every == 0)
                tick += 1
                self._stop.wait(interval_s)

        self.sample_once(proc, tree=False)  # no helpers yet; smaps is read from the first tick on
        self._thread = threading.Thread(target=sample, name="megaclone-rss", daemon=True)
        self._thread.start()
        return self

    def sample_once(self, proc: psutil.Process | None = None, tree: bool = True) -> None:
        proc = proc or psutil.Process()
        try:
            own = proc.memory_info().rss
            self.self_peak = max(self.self_peak, own)
            if not tree:
                return
            total = _pss(proc)
            for child in proc.children(recursive=True):
                try:
                    total += _pss(child)
                except psutil.Error:
                    pass
        except psutil.Error:
            return
        self.tree_peak = max(self.tree_peak, total)
        self.samples += 1

    def stop(self) -> dict[str, int]:
        """End sampling (idempotent: a ``finally`` may call it again) and return the peaks."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample_once()
        return {"baseline": self.baseline, "self": self.self_peak, "tree": self.tree_peak}


def _pss(proc: psutil.Process) -> int:
    info = proc.memory_full_info()
    return getattr(info, "pss", info.rss)
