"""The one destination guard every writer uses: expand, export, make_source, preprocess, the trainer.

A writer may only fill a destination that

* does not overlap any of its sources, in either direction (the destination inside a source, a
  source inside the destination, or the same directory reached through a symlink), and
* is empty, or holds nothing but an earlier output of the same kind and ``overwrite`` was asked for.

"An earlier output" is recognized entry by entry from the names megaclone and megatron-core write
(a Megatron checkpoint's tracker file, ``iter_NNNNNNN``/``release`` directories holding torch_dist
or legacy files; a Hugging Face directory's config, safetensors shards, index and tokenizer files;
an indexed dataset's ``.bin``/``.idx`` pair). Anything else, a symlink included, is a user's file:
the guard refuses and names it; ``--overwrite`` never removes it. All checks happen before the first
removal, and the tracker file goes first, so a half-cleared directory never looks like a checkpoint.

Concurrent writers are kept apart by an exclusive ``flock`` on the destination directory itself,
held by the writing job's rank 0 until it publishes (the kernel drops it if the process dies).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from megaclone.errors import MegacloneError

TRACKER = "latest_checkpointed_iteration.txt"


class Kind(enum.Enum):
    """What a destination directory holds when a writer of ours has filled it."""

    MEGATRON = "Megatron checkpoint"
    HF = "Hugging Face model"


_ITERATION_DIR = re.compile(r"(iter_\d{7}|release)")
_TORCH_DIST_FILES = re.compile(r"(metadata\.json|common\.pt|\.metadata|__\d+_\d+\.distcp)")
_LEGACY_RANK_DIR = re.compile(r"mp_rank_\d{2}(_\d{3})?")
_LEGACY_FILES = re.compile(r"(model_optim_rng|distrib_optim)\.pt")
_HF_FILES = re.compile(
    r"(config\.json|config\.json\.tmp|generation_config\.json|model\.safetensors|model-\d{5}-of-\d{5}\.safetensors"
    r"|model\.safetensors\.index\.json|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json"
    r"|vocab\.json|merges\.txt|tokenizer\.model|added_tokens\.json)"
)
_INDEXED_DATASET_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core's indexed dataset .idx header


@dataclass(frozen=True)
class Destination:
    """A checked destination: ``removable`` lists the entries of an earlier output that
    :func:`clear` removes (empty for an empty or new directory)."""

    path: Path
    kind: Kind
    removable: tuple[Path, ...] = ()

    def __post_init__(self):
        for entry in self.removable:
            if entry.parent != self.path:
                raise ValueError(f"{entry} is not an entry of {self.path}")


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return _resolved(Path(a)) == _resolved(Path(b))


def check_no_overlap(dst: Path, sources: Iterable[Path], flag: str = "--save") -> None:
    """Refuse ``dst`` when it is a source, lies inside one, or holds one (symlinks resolved)."""
    d = _resolved(dst)
    for src in sources:
        s = _resolved(Path(src))
        if d == s or s in d.parents or d in s.parents:
            where = "is" if d == s else "is inside" if s in d.parents else "contains"
            raise MegacloneError(
                f"{flag} {dst} {where} the source {src}; a source is never written to or removed",
                f"choose a {flag} directory outside {src}",
            )


def _stranger_in_iteration_dir(path: Path) -> Optional[Path]:
    """The first entry of an iteration directory that neither torch_dist nor the legacy format writes."""
    for entry in sorted(path.iterdir()):
        if entry.is_symlink():
            return entry
        if entry.is_file() and _TORCH_DIST_FILES.fullmatch(entry.name):
            continue
        if entry.is_dir() and _LEGACY_RANK_DIR.fullmatch(entry.name):
            for inner in sorted(entry.iterdir()):
                if inner.is_symlink() or not inner.is_file() or not _LEGACY_FILES.fullmatch(inner.name):
                    return inner
            continue
        return entry
    return None


def _stranger(entry: Path, kind: Kind) -> Optional[Path]:
    """``entry`` (or the first thing inside it) when it is not part of an output of ``kind``."""
    if entry.is_symlink():
        return entry
    if kind is Kind.MEGATRON:
        if entry.is_file() and entry.name in (TRACKER, TRACKER + ".tmp"):
            return None
        if entry.is_dir() and _ITERATION_DIR.fullmatch(entry.name):
            return _stranger_in_iteration_dir(entry)
        return entry
    if entry.is_file() and _HF_FILES.fullmatch(entry.name):
        return None
    return entry


def check_writable(dst: str | os.PathLike, flag: str = "--save") -> None:
    """``dst`` can be written: an existing directory this process may write into, or a path whose nearest
    existing ancestor it may create it in. Every writer checks it before its work (the trainer's
    ``--save`` too, which used to train the whole run and then fail)."""
    dst = Path(dst)
    if dst.is_symlink() and not dst.exists():
        raise MegacloneError(f"{flag} {dst} is a broken symlink", "point it at a directory, or choose another path")
    if dst.exists():
        if not dst.is_dir():
            raise MegacloneError(f"{flag} {dst} exists and is not a directory", "choose a directory path")
        if not os.access(dst, os.W_OK | os.X_OK):
            raise MegacloneError(f"{flag} {dst} is not writable", "choose a directory you can write to")
        return
    parent = Path(os.path.abspath(dst)).parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MegacloneError(f"{flag} {dst}: cannot create it, {parent} is not writable",
                             "choose a directory you can write to")


def guard(dst: str | os.PathLike, kind: Kind, sources: Sequence[str | os.PathLike] = (),
          overwrite: bool = False, flag: str = "--save") -> Destination:
    """Check ``dst`` for a writer of ``kind``; nothing is touched. Raises MegacloneError naming the
    problem and the fix."""
    dst = Path(dst)
    check_no_overlap(dst, [Path(s) for s in sources], flag)
    check_writable(dst, flag)
    if not dst.exists():
        return Destination(dst, kind)
    entries = sorted(dst.iterdir())
    if not entries:
        return Destination(dst, kind)
    if not overwrite:
        raise MegacloneError(f"{flag} {dst} is not empty",
                             "pass --overwrite to replace the output of an earlier run, or choose an empty directory")
    strangers = [s for s in (_stranger(e, kind) for e in entries) if s is not None]
    if strangers:
        names = ", ".join(str(s.relative_to(dst)) for s in strangers[:5])
        raise MegacloneError(
            f"{flag} {dst} holds files that are not part of a {kind.value} ({names}); "
            "--overwrite only replaces what an earlier run wrote",
            "move those files away, or choose another directory",
        )
    return Destination(dst, kind, tuple(entries))


def clear(dest: Destination) -> None:
    """Remove the earlier output :func:`guard` recognized: the tracker (or HF config) first, so no
    half-removed output looks complete; then the rest. Creates the directory."""
    dest.path.mkdir(parents=True, exist_ok=True)
    first = {TRACKER, "config.json"}
    for entry in sorted(dest.removable, key=lambda e: e.name not in first):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


def guard_files(outputs: Sequence[Path], sources: Sequence[Path], overwrite: bool, flag: str) -> None:
    """The same rules for a writer of single files (an indexed dataset's ``.bin``/``.idx``): no
    output inside or equal to a source, and existing outputs replaced only with ``overwrite`` and only
    when they are an indexed dataset."""
    for out in outputs:
        check_no_overlap(out, sources, flag)
    existing = [o for o in outputs if o.exists() or o.is_symlink()]
    if existing and not overwrite:
        raise MegacloneError(f"{flag} would replace {', '.join(map(str, existing))}",
                             "pass --overwrite to replace an earlier dataset, or choose another prefix")
    for out in existing:
        if out.is_symlink() or not out.is_file():
            raise MegacloneError(f"{out} is not a regular file", "choose another prefix")
    idx = [o for o in outputs if o.suffix == ".idx" and o.exists()]
    for path in idx:
        with open(path, "rb") as f:
            if f.read(len(_INDEXED_DATASET_MAGIC)) != _INDEXED_DATASET_MAGIC:
                raise MegacloneError(f"{path} exists and is not a Megatron indexed dataset; --overwrite only "
                                     "replaces an earlier dataset", "choose another prefix")


class DestinationLock:
    """An exclusive, non-blocking ``flock`` on the destination directory (taken by one process of a
    job). A second job writing to the same directory is refused instead of mixing its files in."""

    def __init__(self, path: Path):
        import fcntl

        self.path = path
        self.created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise MegacloneError(f"another job is writing to {path}",
                                     "wait for it to finish, or choose another destination") from exc
            raise

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __del__(self):
        self.release()


def claim(dst: str | os.PathLike, kind: Kind, sources: Sequence[str | os.PathLike] = (),
          overwrite: bool = False, flag: str = "--save") -> tuple[Destination, DestinationLock]:
    """Lock ``dst`` and check it under the lock (one process of a job calls this, after every
    process ran :func:`guard`): a job that finished between the check and the lock is seen."""
    lock = DestinationLock(Path(dst))
    try:
        return guard(dst, kind, sources, overwrite, flag), lock
    except BaseException:
        lock.release()
        if lock.created:
            with contextlib.suppress(OSError):
                Path(dst).rmdir()
        raise


class Claim:
    """A job's hold on its destination, taken by every process together (:meth:`take`): checked on
    every process, locked and checked again by rank 0. :meth:`clear` removes an earlier output only
    when the job is ready to write (after its own checks of the source passed); leaving the ``with``
    block releases the lock, and on failure removes the directory if the claim created it and it is
    still empty."""

    def __init__(self, dest: Optional[Destination], lock: Optional[DestinationLock]):
        self.dest, self.lock = dest, lock

    @classmethod
    def take(cls, dst: str | os.PathLike, kind: Kind, sources: Sequence[str | os.PathLike] = (),
             overwrite: bool = False, flag: str = "--save") -> "Claim":
        import torch.distributed as dist

        from megaclone.runtime import agree

        agree(lambda: guard(dst, kind, sources, overwrite, flag))
        dest, lock = agree(lambda: claim(dst, kind, sources, overwrite, flag) if dist.get_rank() == 0
                           else (None, None))
        return cls(dest, lock)

    def clear(self) -> None:
        """Rank 0 removes the earlier output; every process waits for it."""
        import torch.distributed as dist

        if self.dest is not None:
            clear(self.dest)
        dist.barrier()

    def release(self, failed: bool = False) -> None:
        if self.lock is None:
            return
        self.lock.release()
        if failed and self.lock.created:
            with contextlib.suppress(OSError):
                self.lock.path.rmdir()  # only if still empty
        self.lock = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None)
