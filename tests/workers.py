"""Run several 4-rank test workers in ONE torchrun process group, paying start-up once.

Each ``tests/<name>_worker.py`` exposes ``main(out)``, which writes ``out/results.json``; this runner
joins the process group, calls the named workers in order, each in its own ``OUT_DIR/<name>``, and
tears the group down at the end (a worker never does: the next one reuses the group).

    torchrun --nproc_per_node 4 tests/workers.py OUT_DIR e2e depth moe pp hf
"""

import importlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch.distributed as dist  # noqa: E402

from megaclone.runtime import init_distributed  # noqa: E402

NAMES = ("e2e", "depth", "moe", "pp", "hf")


def main(out: Path, names: list[str]) -> None:
    rt = init_distributed()
    for name in names:
        if name not in NAMES:
            raise SystemExit(f"unknown worker {name!r}; known: {', '.join(NAMES)}")
        where = out / name
        if rt.is_main:
            where.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        t0 = time.time()
        importlib.import_module(f"{name}_worker").main(where)
        dist.barrier()
        if rt.is_main:
            print(f"worker {name}: {time.time() - t0:.1f} s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
