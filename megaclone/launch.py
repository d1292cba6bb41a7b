"""Which launcher started this process, read from its environment alone (no torch, no process group).

- torchrun (also under ``srun torchrun``): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``;
- srun, one task per rank: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID`` inside a job
  step (``SLURM_STEP_ID``; a batch script outside ``srun`` is a world of one), the rendezvous on the
  step's first node at a port derived from the job and step ids (``MASTER_ADDR``/``MASTER_PORT``
  override both);
- mpirun / mpiexec: the MPI library's rank variables (the world comes from mpi4py, runtime.py);
- nothing: a world of one.
"""

from __future__ import annotations

import os
import re
from typing import Optional

_MPI_RANK = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
_MPI_LOCAL_RANK = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MPI_LOCALRANK")


def torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def slurm_step() -> bool:
    """Inside an ``srun`` job step (and not under a torchrun that srun started)."""
    return not torchrun() and all(v in os.environ for v in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID"))


def mpi() -> bool:
    return not torchrun() and not slurm_step() and any(v in os.environ for v in _MPI_RANK)


def name() -> str:
    return "torchrun" if torchrun() else "srun" if slurm_step() else "mpirun" if mpi() else "single"


def rank() -> int:
    """This process's global rank as the launcher announces it (0 for a world of one)."""
    if torchrun():
        return int(os.environ["RANK"])
    if slurm_step():
        return int(os.environ["SLURM_PROCID"])
    for var in _MPI_RANK:
        if var in os.environ:
            return int(os.environ[var])
    return 0


def local_rank() -> int:
    """The rank within this node (which GPU a CUDA run takes)."""
    if torchrun():
        return int(os.environ.get("LOCAL_RANK", "0"))
    if slurm_step():
        return int(os.environ.get("SLURM_LOCALID", "0"))
    for var in _MPI_LOCAL_RANK:
        if var in os.environ:
            return int(os.environ[var])
    return 0


def world_size() -> Optional[int]:
    """The number of processes, where the environment says it (None under mpirun: mpi4py knows)."""
    if torchrun():
        return int(os.environ["WORLD_SIZE"])
    if slurm_step():
        return int(os.environ["SLURM_STEP_NUM_TASKS"])
    if mpi():
        for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
            if var in os.environ:
                return int(os.environ[var])
        return None
    return 1


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist expression: 'gpu[07-09,12],cpu3' -> 'gpu07'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    # every bracket group becomes its first value, zero padding kept
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end])


def slurm_rendezvous() -> str:
    """``tcp://host:port`` every task of this srun step computes alike: the step's first node, and a
    port from the job and step ids (so two steps of one job, or two jobs sharing a node, differ)."""
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    host = os.environ.get("MASTER_ADDR") or first_host(nodes)
    job = int(os.environ.get("SLURM_JOB_ID", "0"))
    step = int(os.environ.get("SLURM_STEP_ID", "0"))
    port = int(os.environ.get("MASTER_PORT") or 20000 + (job * 97 + step) % 20000)
    return f"tcp://{host}:{port}"


def torchrun_command(n: int, script, *args) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node n script args...`` with this interpreter, every
    argument a string: the one way the benchmarks and the tests launch a job."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), str(script), *map(str, args)]
