#!/usr/bin/env python
"""Benchmark megaclone against the naive full-materialization path, the write floor and the disk.

    python tools/bench_expand.py --out runs/bench --tps 1 2 4 8 --repeat 3

Builds a source (default: the ~94M-parameter 'bench' preset, random weights), then for each
destination TP runs each mode (megaclone, naive, floor, disk; see megaclone/study/bench.py) in its own
torchrun and reports wall time (start-up, validate, build, read, compute, write), CPU seconds,
bytes, throughput and peak RSS per rank, sampled with psutil, with and without the writer processes
dist_checkpointing forks. With --repeat the modes are interleaved and the median run is shown.
Prints a markdown table and writes JSON.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

T_PROCESS = time.time()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("megaclone", "naive", "floor", "disk")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("worker", help="one measured run (under torchrun)")
    w.add_argument("--mode", choices=MODES, required=True)
    w.add_argument("--load", required=True)
    w.add_argument("--save", required=True)
    w.add_argument("--tp", type=int, required=True)
    w.add_argument("--factor", type=int, default=2)
    w.add_argument("--report", required=True)
    w.add_argument("--depth-factor", type=int, default=1)
    w.add_argument("--num-experts", type=int)
    w.add_argument("--ep", type=int, default=1)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--preset", default="bench")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--src-tp", type=int, default=2)
    p.add_argument("--num-layers", type=int, help="override the preset's layers (to check time vs size)")
    p.add_argument("--tps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--factor", type=int, default=2, help="width factor (hidden, heads, FFN)")
    p.add_argument("--depth-factor", type=int, default=1, help="also stack this many layers per source layer")
    p.add_argument("--num-experts", type=int, help="also upcycle every MLP to this many experts (top-2, EP 1)")
    p.add_argument("--ep", type=int, default=1, help="the destination's expert-parallel size (an MoE source: "
                                                     "processes = TP x EP)")
    p.add_argument("--dd", action="store_true", help="also measure the disk's raw write speed (dd, 2 GiB, "
                                                     "conv=fdatasync) in the same run")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the source's dtype")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--repeat", type=int, default=1, help="runs per mode and TP; the table shows the median")
    p.add_argument("--json", help="results file (default OUT/bench.json)")
    return p.parse_args(argv)


def worker(args) -> int:
    import dataclasses

    import torch.distributed as dist

    from megaclone.study import bench
    from megaclone.pipeline.expand import expand
    from megaclone.runtime import init_distributed
    from megaclone.shape.request import Depth, Factors
    from megaclone.shape.spec import Experts

    init_distributed("cpu")
    ready = time.time()
    factors = Factors.uniform(args.factor)
    depth = Depth(args.depth_factor)
    experts = Experts(args.num_experts, 2) if args.num_experts else None
    if args.mode == "megaclone":
        report = expand(args.load, args.save, factors, args.tp, overwrite=True, depth=depth,
                        experts=experts, expert_parallel=args.ep)[dist.get_rank()]
    elif args.mode == "naive":
        report = bench.naive_expand(Path(args.load), Path(args.save), factors, args.tp)
    else:
        report = bench.write_floor(Path(args.load), Path(args.save), factors, args.tp, raw=args.mode == "disk",
                                   depth=depth, experts=experts, expert_parallel=args.ep)
    report.seconds["start-up"] = ready - T_PROCESS
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, dataclasses.asdict(report))
    if dist.get_rank() == 0:
        Path(args.report).write_text(json.dumps(reports))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def torchrun(n, *args) -> bool:
    """Run a torchrun job; False if it was stopped before the machine ran out of memory."""
    from megaclone.memory import run_measured

    from megaclone.launch import torchrun_command

    cmd = torchrun_command(n, *args)
    done = run_measured(cmd, cwd=ROOT)
    if done.out_of_memory:
        print(f"stopped before the machine ran out of memory (peak {gib(done.peak_tree_rss):.1f} GiB of the job)",
              flush=True)
        return False
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.output[-8000:]}")
    return True


def dd_write_speed(where: Path) -> float:
    """The disk's raw sequential write speed in GB/s: dd of 2 GiB of zeros, flushed (conv=fdatasync)."""
    import re
    import subprocess

    target = where / "dd.bin"
    done = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", "count=2048", "conv=fdatasync"],
                          capture_output=True, text=True)
    target.unlink(missing_ok=True)
    seconds = float(re.search(r"copied, ([\d.]+) s", done.stderr).group(1))
    return 2**31 / seconds / 1e9


def gib(n):
    return n / 2**30


def measure(args, src: Path, out: Path, tp: int, mode: str) -> dict:
    """One run of one mode at one TP, in its own torchrun: the row of the table."""
    from megaclone.formats.iterations import directory_bytes

    dst, report = out / f"{mode}-tp{tp}", out / f"{mode}-tp{tp}.json"
    t0 = time.time()
    finished = torchrun(tp * args.ep, "tools/bench_expand.py", "worker", "--mode", mode, "--load", src, "--save",
                        dst, "--tp", tp, "--factor", args.factor, "--report", report, "--depth-factor",
                        args.depth_factor, "--ep", args.ep,
                        *(["--num-experts", args.num_experts] if args.num_experts else []))
    wall = time.time() - t0
    if not finished:
        shutil.rmtree(dst, ignore_errors=True)
        return dict(tp=tp, mode=mode, wall_s=wall, out_of_memory=True, total_s=float("nan"))
    ranks = json.loads(report.read_text())
    written = directory_bytes(dst)
    shutil.rmtree(dst)
    sec = lambda k: max(r["seconds"].get(k, 0.0) for r in ranks)  # noqa: E731
    shard = max(r["bytes_computed"] for r in ranks) if mode != "naive" else written / tp
    row = dict(tp=tp, mode=mode, wall_s=wall, startup_s=sec("start-up"), validate_s=sec("validate"),
               build_s=sec("build"), read_s=sec("read"), compute_s=sec("compute"), write_s=sec("write"),
               total_s=sec("total"), cpu_s=sum(r["seconds"].get("cpu", 0.0) for r in ranks), bytes_read=sum(r["bytes_read"] for r in ranks), bytes_written=written,
               throughput_gib_s=gib(written) / max(sec("total"), 1e-9),
               baseline_rss=max(r["peak_rss"]["baseline"] for r in ranks),
               peak_rss=max(r["peak_rss"]["self"] for r in ranks),
               peak_rss_tree=max(r["peak_rss"]["tree"] for r in ranks),
               shard_bytes=shard)
    row["rss_over_baseline_per_shard"] = (row["peak_rss"] - row["baseline_rss"]) / max(shard, 1)
    return row


def main() -> int:
    args = parse_args()
    if args.cmd == "worker":
        return worker(args)
    from megaclone.formats.iterations import LATEST, directory_bytes

    out = Path(args.out)
    src = out / "src"
    if not (src / LATEST).exists():
        print(f"building the {args.preset} source at TP {args.src_tp} ...", flush=True)
        torchrun(args.src_tp, "tools/make_source.py", "--preset", args.preset, "--save", src, "--tp", args.src_tp,
                 "--train-steps", 0, "--vocab-size", args.vocab_size, "--overwrite", "--dtype", args.dtype,
                 *(["--num-layers", args.num_layers] if args.num_layers else []))
    src_bytes = directory_bytes(src)
    if (args.depth_factor > 1 or args.num_experts) and "naive" in args.modes:
        sys.exit("the naive path grows width only: drop naive from --modes with --depth-factor or --num-experts")
    rows = []
    for tp in args.tps:
        runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
        for _ in range(args.repeat):  # modes interleaved, so a slow spell of the machine hits all of them
            for mode in args.modes:
                runs[mode].append(measure(args, src, out, tp, mode))
        for mode, measured in runs.items():
            row = sorted(measured, key=lambda r: r["total_s"])[len(measured) // 2]  # the median run
            row["totals_s"] = [r["total_s"] for r in measured]
            rows.append(row)
            if row.get("out_of_memory"):
                print(f"tp {tp} {mode:9s} stopped after {row['wall_s']:.0f} s: the machine was about to run out of memory",
                      flush=True)
                continue
            print(f"tp {tp} {mode:9s} wall {row['wall_s']:6.1f}s  total {row['total_s']:6.1f}s "
                  f"(runs {', '.join(f'{t:.1f}' for t in row['totals_s'])})  peak {gib(row['peak_rss']):.2f} GiB",
                  flush=True)
    floor = {r["tp"]: r["total_s"] for r in rows if r["mode"] == "floor"}
    print(f"\nsource: {gib(src_bytes):.2f} GiB at TP {args.src_tp}; factor {args.factor}\n")
    print("| TP | mode | wall s | start-up s | validate s | build s | read s | compute s | write s | total s "
          "| x floor | CPU s, all ranks | written GiB | GiB/s | RSS at start GiB | peak RSS GiB | PSS with helpers GiB | shard GiB "
          "| (peak-start)/shard |")
    print("|---:|---|" + "---:|" * 17)
    for r in rows:
        if r.get("out_of_memory"):
            print(f"| {r['tp']} | {r['mode']} | stopped after {r['wall_s']:.0f} s: out of memory |" + " |" * 17)
            continue
        x = r["total_s"] / floor[r["tp"]] if r["tp"] in floor else float("nan")
        print(f"| {r['tp']} | {r['mode']} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | {r['validate_s']:.1f} | "
              f"{r['build_s']:.1f} | {r['read_s']:.1f} | "
              f"{r['compute_s']:.1f} | {r['write_s']:.1f} | {r['total_s']:.1f} | {x:.2f} | {r['cpu_s']:.1f} | "
              f"{gib(r['bytes_written']):.2f} | {r['throughput_gib_s']:.2f} | {gib(r['baseline_rss']):.2f} | "
              f"{gib(r['peak_rss']):.2f} | {gib(r['peak_rss_tree']):.2f} | {gib(r['shard_bytes']):.2f} | "
              f"{r['rss_over_baseline_per_shard']:.2f} |")
    disk = dd_write_speed(out) if args.dd else None
    if disk is not None:
        print(f"\nraw disk write (dd, 2 GiB, conv=fdatasync): {disk:.2f} GB/s")
    Path(args.json or out / "bench.json").write_text(json.dumps(dict(rows=rows, source_bytes=src_bytes,
                                                                     dd_gb_s=disk), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
