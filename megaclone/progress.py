"""Rank-0 progress (tqdm) and the end-of-run summary of an expansion."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .cli import human_bytes
from .plan import SliceTask


class ExpandProgress:
    """A progress bar over destination slices: current parameter and bytes computed so far."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.bytes = 0
        self.enabled = enabled

    def update(self, task: SliceTask, nbytes: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(desc="cloning", unit=" slices", dynamic_ncols=True)
        self.bytes += nbytes
        layer = "" if task.layer is None else f"[{task.layer}]"
        self.bar.set_postfix_str(f"{task.rule.key}{layer} {human_bytes(self.bytes)}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_table(reports, save: Optional[str | Path] = None, forked_writers: bool = True) -> str:
    """Markdown table: per rank slices, bytes read and computed, phase seconds, peak RSS (and the
    PSS of the writer processes dist_checkpointing forks, for a Megatron destination)."""
    from .checkpoint import directory_bytes

    lines = [
        "| rank | slices | read | shard | read s | compute s | write s | total s | RSS at start | peak RSS "
        "| peak PSS with helpers |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        s = r.seconds
        lines.append(
            f"| {r.rank} | {r.slices} | {human_bytes(r.bytes_read)} | {human_bytes(r.bytes_computed)} | "
            f"{s.get('read', 0):.2f} | {s.get('compute', 0):.2f} | {s.get('write', 0):.2f} | "
            f"{s.get('total', 0):.2f} | {human_bytes(r.peak_rss.get('baseline', 0))} | "
            f"{human_bytes(r.peak_rss.get('self', 0))} | {human_bytes(r.peak_rss.get('tree', 0))} |"
        )
    if forked_writers:
        lines.append("\nRSS: the rank's resident memory. PSS with helpers: the rank and the writer processes "
                     "dist_checkpointing forks, shared pages split between them (what the job costs the node).")
    else:  # a Hugging Face destination: each rank writes its shard itself
        lines = [line.rsplit("|", 2)[0] + "|" for line in lines]
        lines.append("\nRSS: the rank's resident memory.")
    if save is not None:
        lines.append(f"wrote {human_bytes(directory_bytes(Path(save)))} to {save} "
                     f"in {max(r.seconds.get('total', 0) for r in reports):.1f} s")
    return "\n".join(lines)
