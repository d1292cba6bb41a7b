"""A Megatron checkpoint directory: ``iter_NNNNNNN`` (or ``release``) directories and the tracker,
``latest_checkpointed_iteration.txt``, written last: a directory without it is not a complete
checkpoint. Format-independent (torch_dist and legacy files alike).
"""

from __future__ import annotations

import os
from pathlib import Path
from megaclone.errors import MegacloneError
from megaclone.formats.destination import TRACKER

LATEST = TRACKER  # latest_checkpointed_iteration.txt


CHECKPOINT_VERSION = 3.0


def iteration_dirname(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def read_tracker(root: Path) -> int | str:
    """The iteration ``<root>/latest_checkpointed_iteration.txt`` names: an int, or ``"release"``.
    The one parser of the tracker file."""
    latest = root / LATEST
    try:
        text = latest.read_text().strip()
    except FileNotFoundError:
        raise MegacloneError(
            f"{root} has no {LATEST}: it is not a complete Megatron-LM checkpoint",
            "point at the directory training saved into, or at one of its iter_NNNNNNN directories",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MegacloneError(f"cannot read {latest}: {exc}", "the checkpoint is damaged: save it again") from None
    if text == "release":
        return text
    if not text.isdigit():
        raise MegacloneError(
            f"{latest} holds {text[:40]!r}, not an iteration number or 'release'",
            "the tracker file is damaged: write the iteration to load into it (e.g. 1000), or pass an "
            "iter_NNNNNNN directory",
        )
    return int(text)


def publish(root: Path, iteration: int) -> None:
    """Every rank has written its part: rank 0 writes the tracker file (a collective; a stop signal
    lands before it, and nothing is published, or after it)."""
    from megaclone import stopping

    stopping.commit(lambda: mark_latest(root, iteration), str(root))


def mark_latest(root: Path, iteration: int | str) -> None:
    """Publish the checkpoint: atomically write the tracker file that makes it loadable."""
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(str(iteration))
    os.replace(tmp, root / LATEST)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
