"""The one exception type a user sees: it names the problem and how to fix it."""

import contextlib
import os
from typing import Iterator


class MegacloneError(Exception):
    """Bad input or a broken checkpoint, detected before anything is written."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f"\n  fix: {fix}" if fix else ""))


@contextlib.contextmanager
def reading(path: "str | os.PathLike", what: str = "") -> Iterator[None]:
    """Turn a failure to read or parse ``path`` (missing, truncated, garbage) into a MegacloneError that
    names the file. A MegacloneError raised inside passes through unchanged."""
    try:
        yield
    except MegacloneError:
        raise
    except FileNotFoundError as exc:
        raise MegacloneError(f"{what or path} is missing ({exc.filename or path})",
                             "copy the complete directory again") from exc
    except Exception as exc:  # torch.load, json, pickle and safetensors each raise their own kinds
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise MegacloneError(f"cannot read {what or path}: {type(exc).__name__}: {detail}",
                             "the file is damaged or incomplete: copy or save it again") from exc
