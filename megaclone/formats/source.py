"""Opening any checkpoint as a ``Source`` (the one reader interface, ``formats.base``): by the format
asked for, else by what the path holds. Expand, export, verify, the weight check, the trainer's
source check and inspect all open their inputs here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megaclone.errors import MegacloneError
from megaclone.formats import Format
from megaclone.formats.base import Source
from megaclone.formats.hf.reader import open_hf_source
from megaclone.formats.legacy import legacy_dir, open_legacy_source
from megaclone.formats.torch_dist import open_torch_dist_source


def open_megatron_source(root: str | Path, vocab_size: Optional[int] = None) -> Source:
    """A Megatron-LM checkpoint in either format: torch_dist (metadata.json) or legacy torch
    (mp_rank_* directories), told apart by what the iteration directory holds."""
    root = Path(root)
    try:
        legacy = any(legacy_dir(root).glob("mp_rank_*"))
    except MegacloneError:
        legacy = False
    return open_legacy_source(root, vocab_size) if legacy else open_torch_dist_source(root, vocab_size)


def open_source(path: str | Path, format: Optional[Format | str] = None, vocab_size: Optional[int] = None) -> Source:
    """A source in ``format`` (a ``Format`` or its name), else in the format the path holds."""
    path = Path(path)
    format = None if format is None else Format(format)
    if format is Format.HF or (format is None and (path / "config.json").exists()):
        return open_hf_source(path, vocab_size)
    if format is Format.LEGACY:
        return open_legacy_source(path, vocab_size)
    if format is Format.TORCH_DIST:
        return open_torch_dist_source(path, vocab_size)
    return open_megatron_source(path, vocab_size)
