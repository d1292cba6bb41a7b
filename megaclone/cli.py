"""The commands' shell (megaclone/commands, and the tools/ shims over them): flag parsing with typo
hints, error reporting and rank-0 printing.

A command parses its flags and calls the library; this module turns a MegacloneError into one
``error:``/``fix:`` message and exit code 2, a lost peer into exit 3, and keeps output to rank 0; how a
rank stops on a signal is megaclone.stopping's. It imports no torch at module level, so a command
parses its flags (and answers --help) before the heavy imports.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from typing import Callable, Optional, Sequence

from megaclone import stopping
from megaclone.errors import MegacloneError
from megaclone.launch import (
    rank as launch_rank,  # before any process group: from the launcher's environment
)
from megaclone.stopping import EXIT_BAD_INPUT, record_for_launcher

EXIT_PEER_LOST = 3

# megatron-core warns at import about missing Transformer Engine/Apex and torch DCP about deprecated
# entry points megatron-core calls; none of it is actionable for a user of these tools.
for _module in (r"megatron\..*", r"torch\.distributed\..*", r"torch\.nn\..*"):
    warnings.filterwarnings("ignore", module=_module)

# ... and logs, by logger and message: megatron-core 0.19's GPTModel deprecation (megaclone builds the
# GPTModel that Megatron-LM trains), its async-save deprecation (printed for every synchronous save),
# and a CUDA build of torch on a machine without a GPU.
_NOT_ACTIONABLE = {
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
    "torch.utils.cpp_extension": "No CUDA runtime is found",
}
for _name, _prefix in _NOT_ACTIONABLE.items():
    logging.getLogger(_name).addFilter(lambda record, prefix=_prefix: not str(record.msg).startswith(prefix))


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags on every process; only rank 0 prints --help or a usage error (all exit alike). Flags
    are matched whole (no prefix matching: ``--num-expert`` is a typo, not ``--num-experts``); a usage
    error is one ``error:``/``fix:`` pair naming the closest real flag of each mistyped one (``--help``
    has the usage)."""
    words = list(sys.argv[1:] if argv is None else argv)

    def error(message: str):
        hints = _closest_flags(parser, words)
        fix = (f"did you mean: {', '.join(hints)}? " if hints else "") + f"(every flag: {parser.prog} --help)"
        record_for_launcher(f"error: {message}\n  fix: {fix}")
        _let_rank0_speak()
        sys.stderr.write(f"error: {message}\n  fix: {fix}\n")
        sys.exit(EXIT_BAD_INPUT)

    parser.error = error
    parser.allow_abbrev = False
    if launch_rank() == 0:
        args = parser.parse_args(words)
    else:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            args = parser.parse_args(words)
    if getattr(args, "trust_checkpoint_code", False):
        from megaclone.formats.unpickling import trust_checkpoint_code

        trust_checkpoint_code()
    return args


def _closest_flags(parser: argparse.ArgumentParser, words: Sequence[str]) -> list[str]:
    """'--facter -> --factor' for each flag among ``words`` that the parser does not know and that is
    close to one it does (a misspelled required flag included, which argparse reports as missing)."""
    import difflib

    known = [flag for flag in parser._option_string_actions if flag.startswith("--")]
    hints = []
    for word in words:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and flag not in known and (close := difflib.get_close_matches(flag, known, n=1,
                                                                                               cutoff=0.6)):
            hints.append(f"{flag} -> {close[0]}")
    return hints


def require_paths(*flags_and_paths: tuple[str, Optional[str]]) -> None:
    """Refuse, before any heavy import, an input path that does not exist (``None``: flag not given)."""
    for flag, path in flags_and_paths:
        if path is not None and not os.path.exists(path):
            raise MegacloneError(f"{flag} {path} does not exist", "pass the directory the checkpoint or model "
                                                                  "was saved into")


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    """``--trust-checkpoint-code`` for a tool that reads checkpoints (megaclone.formats.unpickling)."""
    parser.add_argument("--trust-checkpoint-code", action="store_true",
                        help="unpickle any object a checkpoint holds, which can run code from the file; only for a "
                             "trusted checkpoint that holds more than tensors, args and RNG states (default: refuse)")


def _let_rank0_speak() -> None:
    """Before a refusal every rank makes on its own (flags, paths: no process group yet), the other
    ranks wait a moment: torchrun stops the job at the first exit, which could otherwise be a rank
    that prints nothing, killing rank 0 before it prints the message. The launcher's SIGTERM during the
    wait ends the rank quietly with the refusal's status (stopping.refusing)."""
    if launch_rank() != 0:
        import time

        with stopping.refusing():
            time.sleep(2.0)


def rank0_print(*args, **kwargs) -> None:
    dist = _initialized_dist()
    if (dist.get_rank() if dist is not None else launch_rank()) == 0:
        print(*args, **kwargs, flush=True)


def _lost_peer(exc: BaseException) -> bool:
    """A collective that failed because another process died or stopped answering (gloo and NCCL
    report it as a RuntimeError subclass naming a timeout or a closed connection)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("timed out", "timeout", "connection closed by peer", "connection reset by peer"))


def run(main: Callable[[], int]) -> None:
    """Run a tool's main; a MegacloneError prints 'error: ...' (once) and exits 2; a peer that died or
    hangs prints one 'error: ...' line per rank that noticed and exits 3; SIGINT and SIGTERM print one
    line per rank and exit 130 and 143, whenever they land, and so does the death of the launcher
    (megaclone.stopping: nothing is published, a checkpoint appears only whole)."""
    stopping.install()
    try:
        code = main()
    except BrokenPipeError:  # the reader of our output went away (`... | head`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        os._exit(141)  # 128 + SIGPIPE, what a shell tool killed by it reports
    except KeyboardInterrupt:  # raised only before the handlers are in place
        stopping.end(130, "interrupted")
    except MegacloneError as exc:
        if exc.local:  # this process alone knows: it reports, and the launcher stops the others
            print(f"error: rank {launch_rank()}: {exc}", file=sys.stderr, flush=True)
            record_for_launcher(f"error: rank {launch_rank()}: {exc}")
            os._exit(EXIT_BAD_INPUT)
        rank0_print(f"error: {exc}", file=sys.stderr)
        record_for_launcher(f"error: {exc}")
        if _initialized_dist() is None:
            _let_rank0_speak()
        code = EXIT_BAD_INPUT
    except Exception as exc:
        if not _lost_peer(exc):
            raise
        dist = _initialized_dist()
        rank = dist.get_rank() if dist is not None else launch_rank()
        message = (f"error: rank {rank}: another process of this job died or stopped answering "
                   f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})\n"
                   "  fix: look for the first failure in the launcher's report (a killed or stuck process); "
                   "nothing was published, rerun with --overwrite")
        print(message, file=sys.stderr, flush=True)
        record_for_launcher(message)
        os._exit(EXIT_PEER_LOST)  # the process group cannot be torn down with a peer gone
    dist = _initialized_dist()
    if dist is None:
        sys.exit(code)
    dist.destroy_process_group()
    _exit_without_finalization(code)


def _exit_without_finalization(code: int) -> None:
    """Exit once the work is done and published, skipping the interpreter's teardown: gloo's worker
    threads can still be joinable then, and a finished job died with SIGABRT ('terminate called
    without an active exception') and a non-zero status after writing its checkpoint."""
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)


def _initialized_dist():
    """torch.distributed if a process group is up (never imports torch itself: --help stays light)."""
    if "torch.distributed" not in sys.modules:
        return None
    dist = sys.modules["torch.distributed"]
    return dist if dist.is_initialized() else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda (NCCL) when a GPU is visible, else cpu (gloo)")
    parser.add_argument("--timeout-minutes", type=float, default=10.0,
                        help="collective timeout: a dead peer becomes an error after this long (default 10)")
