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


def _disk_full(exc: BaseException, where: "str | os.PathLike") -> bool:
    """Whether a failed write ran out of space (writers in forked processes report it only as text;
    torch's zip writer reports a short write as a position mismatch, so the free space decides too)."""
    import errno
    import shutil

    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in repr(e) for e in chain):
        return True
    try:
        return shutil.disk_usage(where).free < (1 << 20)
    except OSError:
        return False


def _failed_on_another_rank(exc: BaseException) -> bool:
    """torch DCP's save failed on other ranks only: it raises a CheckpointException on every rank,
    with the failures of the ranks they happened on (none of this one's)."""
    failures = _dcp_failures(exc)
    return failures is not None and not failures


@contextlib.contextmanager
def writing(root: "str | os.PathLike", partial: "str | os.PathLike", needed: int = 0) -> Iterator[None]:
    """Turn a write that failed for lack of space under ``root`` into an error saying the disk is full,
    after removing ``partial`` (the unpublished files of this write, a file or a directory)."""
    import shutil

    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch DCP's CheckpointException derives from BaseException
        if not _disk_full(exc, root):
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
        size = f" (this output needs about {needed / 2**20:.1f} MiB)" if needed else ""
        raise MegacloneError(f"the disk holding {root} is full; the partial output {partial} was removed",
                             f"free space there or write elsewhere{size}", local=True) from exc
