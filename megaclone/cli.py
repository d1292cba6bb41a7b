"""Shared shell for the command-line tools: error reporting and rank-0 printing.

The tools in tools/ parse flags and call the library; this module only turns a MegacloneError into a
clear message and exit code 2, and keeps output to rank 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable

import torch.distributed as dist

from .errors import MegacloneError

EXIT_BAD_INPUT = 2
EXIT_PEER_LOST = 3

# megatron-core warns at import about missing Transformer Engine/Apex and torch DCP about deprecated
# entry points megatron-core calls; none of it is actionable for a user of these tools.
for _module in (r"megatron\..*", r"torch\.distributed\..*", r"torch\.nn\..*"):
    warnings.filterwarnings("ignore", module=_module)


def rank0_print(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def _lost_peer(exc: BaseException) -> bool:
    """A collective that failed because another process died or stopped answering (gloo and NCCL
    report it as a RuntimeError subclass naming a timeout or a closed connection)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("timed out", "timeout", "connection closed by peer", "connection reset by peer"))


def run(main: Callable[[], int]) -> None:
    """Run a tool's main; a MegacloneError prints 'error: ...' (once) and exits 2; a peer that died or
    hangs prints one 'error: ...' line per rank that noticed and exits 3."""
    try:
        code = main()
    except MegacloneError as exc:
        rank0_print(f"error: {exc}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except Exception as exc:
        if not _lost_peer(exc):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        print(f"error: rank {rank}: another process of this job died or stopped answering "
              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})\n"
              "  fix: look for the first failure in the launcher's report (a killed or stuck process); "
              "nothing was published, rerun with --overwrite", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)  # the process group cannot be torn down with a peer gone
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


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
