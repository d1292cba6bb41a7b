"""Process start-up: rank discovery (torchrun or mpirun), device and backend choice, CPU shims.

Nothing here knows about cloning or checkpoints. Every tool calls :func:`init_distributed` once, then
:func:`init_parallel` for each tensor-parallel layout it needs.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from megaclone import launch

T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank in the world, the device for tensors and the backend."""

    rank: int
    world_size: int
    device: torch.device
    backend: str
    launcher: str  # "torchrun", "mpirun" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: Optional[str] = None) -> tuple[torch.device, str]:
    """CUDA with NCCL when a GPU is visible, else CPU with gloo; ``requested`` ('cpu'/'cuda') overrides."""
    kind = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        torch.cuda.set_device(launch.local_rank() % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device()), "nccl"
    global _cpu
    _cpu = True
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    return torch.device("cpu"), "gloo"


_cpu = False  # set by init_distributed on a CPU run: init_parallel then installs the CPU RNG tracker


def _install_cpu_rng_tracker() -> None:
    """Let megatron-core run models without a GPU (docs/design.md, "CPU"); with the torch.cuda shims
    init_distributed installs (the current device is the CPU, synchronize a no-op).

    megatron-core's RNG tracker keeps named CUDA generator states; on CPU it keeps CPU generator states
    instead, so dropout inside tensor-parallel regions (attention) draws different masks on each TP
    rank, as on GPUs, while the default state stays shared. Installed with the first model-parallel
    layout, so a job that builds no megatron-core model (``--save-hf``) never imports megatron-core.
    """
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.CudaRNGStatesTracker.add = _cpu_tracker_add  # type: ignore[method-assign]
    tp_random.CudaRNGStatesTracker.fork = _cpu_tracker_fork  # type: ignore[method-assign]


def _cpu_tracker_add(self, name: str, seed: int) -> None:
    """megatron-core's ``CudaRNGStatesTracker.add`` over a CPU generator state."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    self.seeds_.add(seed)
    self.states_[name] = torch.Generator().manual_seed(seed).get_state()


@contextlib.contextmanager
def _cpu_tracker_fork(self, name: str = "model-parallel-rng"):
    """Draw from the named CPU state inside the block, then restore the default one. A tracker nobody
    seeded (the expander and verifier build models without dropout) forks to the default state."""
    if not self.states_:
        yield
        return
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    default = torch.get_rng_state()
    torch.set_rng_state(self.states_[name])
    try:
        yield
    finally:
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(default)


def _mpi_world() -> Optional[tuple[int, int]]:
    """(rank, world) from mpi4py when launched by mpirun/mpiexec, else None."""
    if not launch.mpi():
        return None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm.Get_rank(), comm.Get_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PR_SET_PDEATHSIG = 1
_forking_pid: Optional[int] = None


def _before_fork() -> None:
    """Record who forks, and freeze the cyclic garbage collector's objects: a child's collections
    then skip the objects it shares with its parent instead of writing to each one's header, which
    copied nearly every page of the parent's heap into every forked writer (measured: 55% of a test
    job's page faults, most of its system time). Frozen objects are still freed by reference counting;
    only reference cycles among them stay."""
    global _forking_pid
    _forking_pid = os.getpid()
    gc.freeze()


def _die_with_parent() -> None:
    """In a freshly forked child: ask the kernel for SIGKILL when the parent dies."""
    libc = _libc()
    if libc is None or libc.prctl(_PR_SET_PDEATHSIG, 9) != 0:
        return
    if os.getppid() != _forking_pid:  # the parent died before the request took effect
        os._exit(1)


_children_bound = False


def bind_children_to_this_process() -> None:
    """Every process this one forks from now on (dist_checkpointing's writers) is killed when this
    one dies, however it dies. Without it a writer of a SIGKILLed rank can wait forever on a queue
    nobody reads, holding the launcher's output pipe. Linux only; a no-op elsewhere. The kernel
    signals on the exit of the forking *thread*: the writers are forked by the rank's main thread."""
    global _children_bound
    if _children_bound or not hasattr(os, "register_at_fork"):
        return
    os.register_at_fork(before=_before_fork, after_in_child=_die_with_parent)
    _children_bound = True


def init_distributed(device: Optional[str] = None, timeout_minutes: float = 10.0) -> Runtime:
    """Join (or create) the default process group.

    torchrun supplies RANK/WORLD_SIZE/MASTER_ADDR; srun supplies rank and world, and every task
    computes the same rendezvous from the step (megaclone.launch); under mpirun mpi4py supplies rank
    and world and rank 0 broadcasts a rendezvous address; a plain ``python`` start is a world of one.
    Collectives time out after ``timeout_minutes`` so a dead peer turns into an error rather than a hang.
    """
    bind_children_to_this_process()
    dev, backend = pick_device(device)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if dist.is_initialized():
        return Runtime(dist.get_rank(), dist.get_world_size(), dev, backend, "existing")
    launcher = launch.name()
    if launcher == "torchrun":
        dist.init_process_group(backend, timeout=timeout)
    elif launcher == "srun":
        dist.init_process_group(backend, init_method=launch.slurm_rendezvous(), rank=launch.rank(),
                                world_size=launch.world_size(), timeout=timeout)
    else:
        mpi = _mpi_world()
        if mpi is not None:
            from mpi4py import MPI

            rank, world = mpi
            addr = MPI.COMM_WORLD.bcast(
                f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{_free_port()}" if rank == 0 else None,
                root=0,
            )
        else:
            rank, world, addr, launcher = 0, 1, f"tcp://127.0.0.1:{_free_port()}", "single"
        dist.init_process_group(backend, init_method=addr, rank=rank, world_size=world, timeout=timeout)
    return Runtime(dist.get_rank(), dist.get_world_size(), dev, backend, launcher)


_current: Optional[tuple[int, int, int]] = None


def init_parallel(tensor_parallel: int, pipeline_parallel: int = 1, expert_parallel: int = 1) -> None:
    """(Re)initialize megatron-core's parallel state with the given TP (and PP, and EP: the expert-
    parallel size, experts split over TP too); the rest of the world is DP. A no-op when that layout
    is already set. Switching destroys the old groups first:
    megatron-core's destroy_model_parallel only forgets them, and every forgotten gloo group keeps its
    threads.
    """
    global _current
    from megatron.core import parallel_state

    if _cpu:
        _install_cpu_rng_tracker()
    layout = (tensor_parallel, pipeline_parallel, expert_parallel)
    ranks, world = tensor_parallel * pipeline_parallel * expert_parallel, dist.get_world_size()
    if world % ranks:  # megatron-core's own refusal is a RuntimeError traceback on every rank
        from megaclone.errors import MegacloneError

        named = " x ".join(f"{n} {v}" for n, v in zip(("TP", "PP", "EP"), layout) if v > 1 or n == "TP")
        raise MegacloneError(f"{named} needs a multiple of {ranks} processes, but this job has {world}",
                             f"launch with torchrun --nproc_per_node {ranks} (or mpirun -n {ranks})")
    if parallel_state.model_parallel_is_initialized():
        if _current == layout:
            return
        _destroy_groups(parallel_state)
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
        expert_model_parallel_size=expert_parallel, create_gloo_process_groups=False,
    )
    _current = layout


def _destroy_groups(module) -> None:
    """Destroy every process group a module holds in its globals (except the default group)."""
    found: dict[int, dist.ProcessGroup] = {}

    def collect(value, depth=0):
        if isinstance(value, dist.ProcessGroup):
            found[id(value)] = value
        elif depth < 2 and isinstance(value, (list, tuple)):
            for v in value:
                collect(v, depth + 1)
        elif depth < 2 and isinstance(value, dict):
            for v in value.values():
                collect(v, depth + 1)

    for value in vars(module).values():
        collect(value)
    world = dist.distributed_c10d._get_default_group()
    for group in found.values():
        if group is not world:
            dist.destroy_process_group(group)


def gathered(value: T) -> list[T]:
    """``value`` from every rank, in rank order, on every rank (a collective)."""
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def deal(sizes: list[int], world: int) -> list[int]:
    """Owner rank of each piece of work (by size): largest first onto the least-loaded rank. The same on
    every rank (deterministic), so ranks share work without talking (HF writes, the weight check)."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def agree(check: Callable[[], T]) -> T:
    """Run a validation on every rank; if any rank refuses, every rank raises the same error.

    Keeps ranks from diverging (one raising while the others wait in a collective) on bad input.
    """
    from megaclone.errors import MegacloneError

    error: Optional[MegacloneError] = None
    result = None
    try:
        result = check()
    except MegacloneError as exc:
        error = exc
    for found in gathered(None if error is None else (type(error), error.problem, error.fix)):
        if found is not None:
            kind, problem, fix = found
            raise kind(problem, fix)
    return result  # type: ignore[return-value]


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def return_large_frees(threshold: int = 1 << 20) -> None:
    """Serve allocations over ``threshold`` bytes with mmap, so that freeing one hands it back at once.

    glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB); after that,
    freed read buffers and clone working sets of that size stay in the heap and add up in RSS (a
    quarter of the shard at TP 8 in the benchmark). No-op off glibc.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; setting it also stops the dynamic raising


def trim_heap() -> None:
    """Collect garbage and give the heap's free pages back to the OS (e.g. before forking writers)."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (dist_checkpointing's
    forked writers), for accounting where the time of an oversubscribed machine goes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
