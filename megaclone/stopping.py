"""How a rank stops: on SIGINT or SIGTERM, or when its launcher dies, at any moment, never half-published.

A Python signal handler that raises is not enough: the exception can be swallowed (inside an at-fork
hook, a ``__del__``, any code that catches BaseException), and it runs only between bytecodes of the
main thread, which may sit in a collective for minutes. So the handler only notes the signal, and the
C-level handler also writes it to a wakeup socket that a *watcher thread* reads: the watcher ends the
process at once with one line. The same thread polls the parent's pid: torchrun starts its workers in
sessions of their own, so a SIGKILLed launcher sends them nothing, and a rank must notice by itself.

Publishing (the tracker file of a Megatron checkpoint, ``config.json`` of a Hugging Face directory)
is the one step the watcher waits for. :func:`commit` runs it under a lock, and only if no stop was
asked for: a stop lands either before the commit (nothing is published) or after it (the output is
whole, and the message says so).

Nothing here imports torch: the tools install it before their heavy imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional

from megaclone import launch

EXIT_BAD_INPUT = 2
_CODES = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}
PARENT_POLL_SECONDS = 0.5

# Fault injection for the crash-safety tests: MEGACLONE_FAULT_INJECT="<action>-<point>:<rank>" (or
# "<point>:<rank>" for SIGKILL) makes that rank act at that point; see :func:`fault_point`.
FAULT_ENV = "MEGACLONE_FAULT_INJECT"


class _State:
    """What the watcher needs to know; changed only under ``lock`` (an RLock: the main thread may end the
    process from inside :func:`commit`)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.requested: Optional[int] = None  # the first stop signal noticed
        self.published: Optional[str] = None  # what this rank published, once it has
        self.refusing = False  # a refusal is being reported: a stop now ends quietly with its exit status
        self.installed = False
        self.parent: Optional[int] = None  # the launcher's pid, where this process watches it
        self.sockets: tuple = ()  # the wakeup socket pair, open for the process's life


_state = _State()


def record_for_launcher(message: str) -> None:
    """Hand ``message`` to torchrun's error file, so the launcher's failure report repeats this
    process's one-line error instead of a link to its documentation."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    with contextlib.suppress(OSError), open(path, "w") as f:
        json.dump({"message": message, "timestamp": str(int(time.time()))}, f)


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return launch.rank()


def end(code: int, what: str) -> None:
    """End this process now with ``code`` and one line naming the rank and ``what`` happened. Waits for a
    commit in progress, so the line tells the truth about publication."""
    with _state.lock:
        if _state.refusing:
            _exit(EXIT_BAD_INPUT)
        done = (f"after publishing {_state.published} (it is complete)" if _state.published
                else "nothing was published")
        message = f"error: rank {_rank()}: {what}; {done}"
        with contextlib.suppress(Exception):
            print(message, file=sys.stderr, flush=True)
        record_for_launcher(message)
        _exit(code)


def _exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _noted(signum: int, frame) -> None:
    """The Python-level handler: note the signal (the watcher ends the process)."""
    if _state.requested is None:
        _state.requested = signum


def _end_for(signum: int) -> None:
    code, what = _CODES.get(signal.Signals(signum), (143, "terminated"))
    end(code, what)


def _watch(wakeup: socket.socket) -> None:
    """The watcher thread: end the process on a stop signal or when its launcher is gone."""
    while True:
        ready, _, _ = select.select([wakeup], [], [], PARENT_POLL_SECONDS)
        if ready:
            for signum in wakeup.recv(64):
                if signum in _CODES:
                    _noted(signum, None)
                    _end_for(signum)
        _end_if_orphaned()


def _end_if_orphaned() -> None:
    if _state.parent is not None and os.getppid() != _state.parent:
        end(143, f"the launcher (pid {_state.parent}) died")


def _in_child() -> None:
    """A forked child (a checkpoint writer) dies by the default action of a signal and tells no watcher."""
    for signum in _CODES:
        signal.signal(signum, signal.SIG_DFL)
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)


def install(watch_parent: Optional[bool] = None) -> None:
    """Take over SIGINT and SIGTERM for this process and start the watcher (once; main thread only).
    ``watch_parent`` (default: when a launcher started this process) also ends the process when its
    parent dies."""
    if _state.installed:
        return
    _state.installed = True
    if watch_parent is None:
        watch_parent = launch.name() != "single"
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    for signum in _CODES:
        signal.signal(signum, _noted)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    os.register_at_fork(before=lambda: fault_point("fork"), after_in_child=_in_child)
    _state.parent = os.getppid() if watch_parent else None
    threading.Thread(target=_watch, args=(reader,), name="megaclone-stop", daemon=True).start()
    _state.sockets = (reader, writer)


def stop_requested() -> bool:
    return _state.requested is not None


@contextlib.contextmanager
def refusing():
    """While a refusal is reported (the other ranks wait for rank 0 to print it), a stop signal ends the
    process quietly with the refusal's status instead of a second message."""
    _state.refusing = True
    try:
        yield
    finally:
        _state.refusing = False


def commit(publish: Callable[[], None], what: str) -> None:
    """Every rank has written its part: rank 0 runs ``publish`` (the write that makes ``what`` complete)
    unless a stop was asked for first; every rank waits for it. A collective."""
    import torch.distributed as dist

    fault_point("write")
    dist.barrier()
    if dist.get_rank() == 0:
        fault_point("publish")
        with _state.lock:
            if _state.requested is not None:
                _end_for(_state.requested)
            _end_if_orphaned()  # a launcher that died since the last poll
            publish()
            _state.published = what
    dist.barrier()


def fault_point(point: str) -> None:
    """Act at ``point`` if MEGACLONE_FAULT_INJECT asks it of this rank: "<point>:<rank>" SIGKILLs the
    rank; "stop-<point>" SIGSTOPs it (a stuck filesystem); "interrupt-<point>" and "terminate-<point>"
    send SIGINT and SIGTERM to its process group (Ctrl-C in a terminal, a scheduler cancelling the job);
    "sigint-<point>" and "sigterm-<point>" to this process alone (a launcher stopping its workers);
    "killlauncher-<point>" SIGKILLs the process group of this rank's parent (the launcher, mid-job)."""
    wanted = os.environ.get(FAULT_ENV, "")
    if not wanted.endswith(f"{point}:{_rank()}"):
        return
    action = wanted[: -len(f"{point}:{_rank()}")].rstrip("-")
    if action == "":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action in ("interrupt", "terminate"):
        os.killpg(os.getpgid(0), signal.SIGINT if action == "interrupt" else signal.SIGTERM)
    elif action in ("sigint", "sigterm"):
        os.kill(os.getpid(), signal.SIGINT if action == "sigint" else signal.SIGTERM)
    elif action == "killlauncher":
        os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
