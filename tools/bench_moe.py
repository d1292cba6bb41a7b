#!/usr/bin/env python
"""Memory per rank of upcycling a dense checkpoint to a mixture of experts: megaclone's sharded
expansion against megatron-core's run-time path (``upcycling_utils.upcycle_state_dict``, as
Megatron-LM's --moe-use-upcycling runs it), on the same dense model and the same TP x EP layout.

    python tools/bench_moe.py --work runs/bench-moe            # the 'bench' preset (~94M), 8 experts, EP 2

Each path runs in its own torchrun and ends with the MoE model's parameters in memory on every rank:
megaclone writes them rank by rank (``expand``); megatron-core's path builds the dense and the MoE
model on every rank, loads the dense checkpoint, upcycles the state dict and loads it into the MoE
model (it does not write a checkpoint: Megatron-LM saves the upcycled model at its first save). Peak
RSS per rank is sampled every 50 ms (megaclone.memory.PeakMemory) from the same point (after imports).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="all", choices=["all", "megaclone", "megatron-core"])
    p.add_argument("--work", default="runs/bench-moe", help="where the source and outputs go")
    p.add_argument("--preset", default="bench", help="source shape (megaclone/shape/presets.py)")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="runs of each path, alternating")
    p.add_argument("--report", help="(worker) where rank 0 writes the per-rank peaks")
    return p.parse_args(argv)


def worker(args) -> int:
    import torch.distributed as dist

    from megaclone.formats import torch_dist
    from megaclone.pipeline.expand import expand
    from megaclone.memory import PeakMemory
    from megaclone.model import build_gpt, load_model
    from megaclone.runtime import init_distributed, init_parallel
    from megaclone.formats.source import open_megatron_source
    from megaclone.shape.request import Factors, grown_spec
    from megaclone.shape.spec import Experts

    init_distributed("cpu")
    src, dst = Path(args.work) / "source", Path(args.work) / "moe"
    experts = Experts(args.num_experts, args.topk, parallel=args.ep)
    t0 = time.perf_counter()
    if args.mode == "megaclone":
        report = expand(src, dst, Factors.uniform(1), args.tp, overwrite=True, experts=experts)[dist.get_rank()]
        peak = report.peak_rss
    else:
        from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

        memory = PeakMemory().start()
        dense_spec = dataclasses.replace(open_megatron_source(src).spec, tensor_parallel=args.tp)
        init_parallel(args.tp, 1, args.ep)
        dense = build_gpt(dense_spec)
        load_model(dense, torch_dist.find_checkpoint(src))
        moe = build_gpt(grown_spec(dense_spec, Factors.uniform(1), args.tp, experts=experts))
        moe.load_state_dict(upcycle_state_dict([moe], [dense])["model"], strict=True)
        peak = memory.stop()
    peaks: list = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, dict(peak, seconds=time.perf_counter() - t0))
    if dist.get_rank() == 0:
        Path(args.report).write_text(json.dumps(peaks))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def torchrun(n: int, *args) -> None:
    from megaclone.launch import torchrun_command

    cmd = torchrun_command(n, *args)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def main() -> int:
    args = parse_args()
    if args.mode != "all":
        return worker(args)
    work = Path(args.work)
    ranks = args.tp * args.ep
    if not (work / "source" / "latest_checkpointed_iteration.txt").exists():
        print(f"building the {args.preset} source ...", flush=True)
        torchrun(1, "tools/make_source.py", "--preset", args.preset, "--save", work / "source", "--train-steps", 0,
                 "--overwrite")
    rows = []
    for i in range(args.repeat):
        for mode in ("megaclone", "megatron-core"):
            report = work / f"{mode}-{i}.json"
            torchrun(ranks, "tools/bench_moe.py", mode, "--work", work, "--num-experts", args.num_experts,
                     "--topk", args.topk, "--tp", args.tp, "--ep", args.ep, "--report", report)
            peaks = json.loads(report.read_text())
            rows.append(dict(mode=mode, run=i, peak_rss=max(p["self"] for p in peaks),
                             baseline=max(p["baseline"] for p in peaks), seconds=max(p["seconds"] for p in peaks)))
            print(f"{mode:>14} run {i}: peak RSS per rank {rows[-1]['peak_rss'] / 2**30:.2f} GiB "
                  f"(after imports {rows[-1]['baseline'] / 2**30:.2f} GiB), {rows[-1]['seconds']:.1f} s", flush=True)
    (work / "bench_moe.json").write_text(json.dumps(rows, indent=1))
    for mode in ("megaclone", "megatron-core"):
        peaks = sorted(r["peak_rss"] / 2**30 for r in rows if r["mode"] == mode)
        print(f"{mode}: peak RSS per rank {peaks[0]:.2f}-{peaks[-1]:.2f} GiB over {len(peaks)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
