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


@dataclass(frozen=True)
class Measured:
    """One command run by :func:`run_measured`."""

    wall_s: float
    peak_tree_rss: int  # the largest summed RSS of the command's process tree, sampled
    returncode: int
    output: str  # stdout and stderr, interleaved
    out_of_memory: bool  # stopped because the machine was about to run out of memory


def run_measured(cmd: list, cwd=None, env=None, reserve_bytes: int = 3 << 30, interval_s: float = 0.05) -> Measured:
    """Run ``cmd`` to its end, sampling its process tree's memory; if the machine's available memory
    falls below ``reserve_bytes``, kill the whole tree first (a benchmark of a path that does not fit
    reports that, rather than waking the kernel's OOM killer, which may pick any process)."""
    import contextlib
    import os
    import signal
    import subprocess
    import tempfile
    import time

    for _ in range(600):  # memory a previous command freed can take a moment to come back
        if psutil.virtual_memory().available >= 2 * reserve_bytes:
            break
        time.sleep(0.1)
    with tempfile.TemporaryFile() as log:
        t0 = time.time()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        root, peak, oom = psutil.Process(proc.pid), 0, False
        while proc.poll() is None:
            try:
                tree = [root] + root.children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            if psutil.virtual_memory().available < reserve_bytes:
                oom = True
                tree = [root] + root.children(recursive=True)
                os.killpg(proc.pid, signal.SIGKILL)
                for p in tree:  # forked writers may have left the session: every process of the tree goes
                    with contextlib.suppress(psutil.Error):
                        p.kill()
                psutil.wait_procs(tree, timeout=60)
                proc.wait()
                break
            time.sleep(interval_s)
        wall = time.time() - t0
        log.seek(0)
        return Measured(wall, peak, proc.returncode, log.read().decode(errors="replace"), oom)
