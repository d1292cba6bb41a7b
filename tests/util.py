"""Helpers shared by the tests: running the tools as a user would, hashing a directory tree."""

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from megaclone.launch import torchrun_command  # noqa: E402  (the one launch helper, torch-free)

ROOT = Path(__file__).resolve().parents[1]

# the flags of cli_expanded: heads grown 2x while the query groups are kept (the fused QKV is then
# split over the two ranks by whole destination groups, a path uniform growth never takes), noisy
CLI_EXPANSION = ("--tp", "2", "--query-group-factor", "1", "--variant", "noisy-diagonal", "--seed", "3")


def tree_hash(path: Path) -> str:
    """sha256 over every file's relative path and bytes: changes if anything under ``path`` does."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run(cmd, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def torchrun(n: int, tool: str, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node n tools/<tool> args...`` from the repository root."""
    return run(torchrun_command(n, f"tools/{tool}", *args), env=env,
               timeout=timeout)


def tensor_digests(path) -> list[list[str]]:
    """Rows of (key, shape..., dtype, sha256) for every stored tensor, via tools/inspect_checkpoint.py."""
    proc = run([sys.executable, "tools/inspect_checkpoint.py", path, "--digest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line.split() for line in proc.stdout.splitlines() if line.startswith("  ") and "=" not in line]


def run_worker(script: str, nproc: int, out: Path, *args, timeout: int = 1200) -> dict:
    """``torchrun --nproc_per_node nproc tests/<script> out args...``; returns its results.json."""
    import json

    proc = run(torchrun_command(nproc, ROOT / "tests" / script, out, *args), timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return json.loads((out / "results.json").read_text())


def overwrite_stored_value(root, key: str, index: int, value: float, offset: tuple = ()) -> None:
    """Write ``value`` at flat ``index`` of the stored chunk of ``key`` that starts at ``offset`` (0 on
    every axis by default), in place in its torch_dist shard file, the rest untouched."""

    def put(tensor):
        tensor.view(-1)[index] = value

    edit_stored_chunk(root, key, put, offset)


def edit_stored_chunk(root, key: str, edit, offset: tuple = ()) -> None:
    """Apply ``edit`` (in place) to the stored chunk of ``key`` that starts at ``offset`` (default 0 on
    every axis: layer 0 of a stacked tensor; the whole tensor at TP 1) in its torch_dist shard file
    (located through torch DCP's metadata) and write it back at the same size, every other byte untouched."""
    import io

    import torch
    from torch.distributed.checkpoint import FileSystemReader

    from megaclone.formats.torch_dist import find_checkpoint

    ckpt = find_checkpoint(root)
    meta = FileSystemReader(str(ckpt)).read_metadata()
    [info] = [info for i, info in meta.storage_data.items()
              if i.fqn == key and tuple(i.offset) == (tuple(offset) or (0,) * len(i.offset))]
    path = ckpt / info.relative_path
    with open(path, "rb") as f:
        f.seek(info.offset)
        tensor = torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
    edit(tensor)
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    assert len(buffer.getvalue()) == info.length, "a same-size rewrite"
    with open(path, "r+b") as f:
        f.seek(info.offset)
        f.write(buffer.getvalue())


@contextlib.contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``mount`` with ``options`` (a full or read-only disk; mounting needs root, as
    on CI here: the test is skipped elsewhere)."""
    import pytest

    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip(f"cannot mount a tmpfs ({options}) here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def rewrite_common(ckpt: Path, edit) -> Path:
    """Apply ``edit`` to a torch_dist checkpoint's common state (args, iteration, ...) and store it as
    ``common.pt``, the form every megatron-core reads and megaclone reads first; a checkpoint whose
    megatron-core (0.19 on) keeps the state in a ``common_state`` object gets the file beside it.
    Returns the file's path."""
    import torch

    from megaclone.formats import torch_dist

    path = Path(ckpt) / torch_dist.COMMON_FILE
    state = torch.load(path, weights_only=False) if path.exists() else torch_dist.read_common(Path(ckpt))
    edit(state)
    torch.save(state, path)
    return path
