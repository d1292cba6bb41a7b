"""The one exception type a user sees: it names the problem and how to fix it."""

import contextlib
import os
from typing import Iterator


class MegacloneError(Exception):
    """Bad input or a broken checkpoint, detected before anything is written."""

    def __init__(self, problem: str, fix: str = "", local: bool = False):
        self.problem = problem
        self.fix = fix
        self.local = local  # raised on this process alone (the others may not know): it reports it itself
        super().__init__(f"{problem}" + (f"\n  fix: {fix}" if fix else ""))


class NotComparable(MegacloneError):
    """Nothing to prove by design: a clone that does not compute its source's function (no logit check),
    or a checkpoint the weight check has no clone definition for."""


def code_in_checkpoint(what: "str | os.PathLike", name: str) -> MegacloneError:
    """The refusal of a pickled object outside the allowlist (megaclone.formats.unpickling)."""
    return MegacloneError(
        f"{what} holds a pickled {name}, which megaclone does not unpickle: a checkpoint holds tensors, args and "
        "RNG states, and unpickling anything else can run code from the file",
        "use a checkpoint written by Megatron-LM or megaclone; only if you trust this file and the software that "
        "wrote it, pass --trust-checkpoint-code")


@contextlib.contextmanager
def refusing_code(path: "str | os.PathLike", what: str = "") -> Iterator[None]:
    """Turn the refusal of a pickled global while reading ``path`` into a MegacloneError naming both
    (torch DCP reports it wrapped in its CheckpointException, a BaseException)."""
    from megaclone.formats.unpickling import refused_global

    try:
        yield
    except (KeyboardInterrupt, SystemExit, MegacloneError):
        raise
    except BaseException as exc:
        name = refused_global(exc)
        if name is None:
            raise
        raise code_in_checkpoint(what or path, name) from None


@contextlib.contextmanager
def reading(path: "str | os.PathLike", what: str = "") -> Iterator[None]:
    """Turn a failure to read or parse ``path`` (missing, truncated, garbage, a pickled object outside
    the allowlist) into a MegacloneError that names the file. A MegacloneError raised inside passes
    through unchanged."""
    try:
        with refusing_code(path, what):
            yield
    except (KeyboardInterrupt, SystemExit, MegacloneError):
        raise
    except BaseException as raised:
        exc = _dcp_failure(raised) or raised
        if not isinstance(exc, Exception):
            raise
        if isinstance(exc, FileNotFoundError):
            raise MegacloneError(f"{what or path} is missing ({exc.filename or path})",
                                 "copy the complete directory again") from raised
        # torch.load, json, pickle and safetensors each raise their own kinds
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise MegacloneError(f"cannot read {what or path}: {type(exc).__name__}: {detail}",
                             "the file is damaged or incomplete: copy or save it again") from raised


def _dcp_failures(exc: BaseException) -> "dict | None":
    """The per-rank failures torch DCP's CheckpointException (a BaseException) carries; None for any
    other exception."""
    failures = getattr(exc, "failures", None)
    return failures if type(exc).__name__ == "CheckpointException" and isinstance(failures, dict) else None


def _dcp_failure(exc: BaseException) -> "BaseException | None":
    """The error under torch DCP's CheckpointException: what went wrong reading, e.g. the
    FileNotFoundError of a missing shard file."""
    failures = _dcp_failures(exc)
    if not failures:
        return None
    first = next(iter(failures.values()))  # (exception, stack summary), or a _WrappedException before torch 2.6
    return first[0] if isinstance(first, tuple) else getattr(first, "exc", first)


# Write failures that say where the output cannot go, by errno: the cause and the fix of each.
_WRITE_FAILURES = {
    "ENOSPC": ("the disk holding {root} is full", "free space there or write elsewhere"),
    "EDQUOT": ("the disk quota for {root} is used up", "free space within the quota or write elsewhere"),
    "EFBIG": ("a file under {root} reached the file-size limit (ulimit -f, or the filesystem's largest file)",
              "raise the limit (ulimit -f unlimited) or write to a filesystem that takes larger files"),
    "EROFS": ("{root} is on a read-only filesystem", "write elsewhere"),
    "EIO": ("the disk holding {root} reported an I/O error", "check the disk, then write elsewhere"),
}


def _at_file_size_limit(partial: "str | os.PathLike") -> bool:
    """A file of ``partial`` has reached this process's file-size limit (a forked writer reports the
    failed write as a position mismatch of torch's zip writer, without the EFBIG)."""
    import resource
    from pathlib import Path

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit == resource.RLIM_INFINITY:
        return False
    path = Path(partial)
    files = [path] if path.is_file() else path.rglob("*") if path.is_dir() else []
    return any(f.is_file() and f.stat().st_size >= limit for f in files)


def _write_failure(exc: BaseException, where: "str | os.PathLike",
                   partial: "str | os.PathLike") -> "tuple[str, str] | None":
    """Why a write failed for lack of room or a limit, as (problem, fix), or None for any other failure.
    Writers in forked processes report their OSError only as text, and torch's zip writer reports a
    short write as a position mismatch, so the message text and the free space decide too."""
    import errno
    import shutil

    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    def said(name: str) -> tuple[str, str]:
        problem, fix = _WRITE_FAILURES[name]
        return problem.format(root=where), fix

    for name in _WRITE_FAILURES:
        code = getattr(errno, name)
        if any(isinstance(e, OSError) and e.errno == code or os.strerror(code) in repr(e) for e in chain):
            return said(name)
    if _at_file_size_limit(partial):
        return said("EFBIG")
    try:
        if shutil.disk_usage(where).free < (1 << 20):
            return said("ENOSPC")
    except OSError:
        pass
    return None


def _failed_on_another_rank(exc: BaseException) -> bool:
    """torch DCP's save failed on other ranks only: it raises a CheckpointException on every rank,
    with the failures of the ranks they happened on (none of this one's)."""
    failures = _dcp_failures(exc)
    return failures is not None and not failures


@contextlib.contextmanager
def writing(root: "str | os.PathLike", partial: "str | os.PathLike", needed: int = 0) -> Iterator[None]:
    """Turn a write under ``root`` that failed for lack of room or a limit (a full disk, a quota, a
    file-size limit, a read-only or failing disk) into one error saying which, after removing
    ``partial`` (the unpublished files of this write, a file or a directory)."""
    import shutil

    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch DCP's CheckpointException derives from BaseException
        failure = _write_failure(exc, root, partial)
        if failure is None:
            if _failed_on_another_rank(exc):
                raise MegacloneError(f"writing {partial} failed; rank 0 gathers every rank's failure and reports "
                                     "it, and nothing was published", "see rank 0's error", local=True) from None
            raise
        partial = os.fspath(partial)
        if os.path.isdir(partial):
            shutil.rmtree(partial, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(partial)
        problem, fix = failure
        size = f" (this output needs about {needed / 2**20:.1f} MiB)" if needed else ""
        raise MegacloneError(f"{problem}; the partial output {partial} was removed, nothing was published",
                             f"{fix}{size}", local=True) from exc
