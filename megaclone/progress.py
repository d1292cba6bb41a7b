"""Rank-0 progress (tqdm) and the end-of-run summary of an expansion."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megaclone.cli import human_bytes
from megaclone.pipeline.plan import SliceTask


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
    from megaclone.formats.iterations import directory_bytes

    columns = {  # header: the cell of one rank's report
        "rank": lambda r: str(r.rank),
        "slices": lambda r: str(r.slices),
        "read": lambda r: human_bytes(r.bytes_read),
        "shard": lambda r: human_bytes(r.bytes_computed),
        **{f"{phase} s": lambda r, phase=phase: f"{r.seconds.get(phase, 0):.2f}"
           for phase in ("read", "compute", "write", "total")},
        "RSS at start": lambda r: human_bytes(r.peak_rss.get("baseline", 0)),
        "peak RSS": lambda r: human_bytes(r.peak_rss.get("self", 0)),
    }
    note = "\nRSS: the rank's resident memory."
    if forked_writers:  # a Megatron destination: dist_checkpointing forks writer processes
        columns["peak PSS with helpers"] = lambda r: human_bytes(r.peak_rss.get("tree", 0))
        note += (" PSS with helpers: the rank and the writer processes dist_checkpointing forks, shared pages "
                 "split between them (what the job costs the node).")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for cell in columns.values()) + " |" for r in reports]
    lines.append(note)
    if save is not None:
        lines.append(f"wrote {human_bytes(directory_bytes(Path(save)))} to {save} "
                     f"in {max(r.seconds.get('total', 0) for r in reports):.1f} s")
    return "\n".join(lines)
