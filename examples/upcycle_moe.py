#!/usr/bin/env python
"""Dense to mixture-of-experts upcycling, measured on this machine's CPU: does the upcycled model keep
the dense model's head start, and how does it compare with training the dense model on?

    python examples/upcycle_moe.py                       # about 17 minutes on 2 cores
    python examples/upcycle_moe.py --quick --out runs/moe-quick --results runs/moe-quick/results

1. byte-level data from the Python standard library in three disjoint document sets (validation,
   the source's stream, the arms' stream; tools/preprocess_data.py, as examples/reproduce_scaling_smart.py);
2. the small Llama-like source of that reproduction trained from scratch (examples/pretrain_gpt.py);
3. upcycled to 4 experts, top-2, over EP 2 (tools/expand_sharded.py --num-experts 4 --moe-router-topk 2);
4. three arms trained on the same tokens with the same recipe and seeds, each at TP 1 x 2 ranks:
   the dense model trained on ("dense"), the upcycled mixture ("upcycled"), and a mixture of the same
   shape from random init ("random-init MoE"); the mixtures with Megatron's load-balancing loss
   (coefficient 0.01, logged apart);
5. validation loss curves, a table (examples/results/upcycle_moe.md) and a JSON of everything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import reproduce_scaling_smart as repro  # noqa: E402

EXPERTS, TOPK, EP, AUX = 4, 2, 2, 0.01
SIZES = {
    "default": dict(repro.SIZES["default"], micro_batch_size=16, source_iters=400, train_iters=150, eval_interval=15,
                    eval_iters=4, seeds=3),
    "quick": dict(repro.SIZES["quick"], source_iters=30, train_iters=10, eval_interval=5, eval_iters=2, seeds=2),
}
ARMS = ("dense", "upcycled", "random-init MoE")
MOE_FLAGS = ["--num-experts", str(EXPERTS), "--moe-router-topk", str(TOPK)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny run (the tests' size)")
    p.add_argument("--out", type=Path, default=Path("runs/moe"), help="working directory (resumable)")
    p.add_argument("--results", type=Path, default=ROOT / "examples" / "results", help="where the table and JSON go")
    return p.parse_args(argv)


def run(cmd: list, n: int, log: dict, name: str, done: bool = False) -> None:
    """One user-facing command (under torchrun when ``n`` > 1), recorded; run unless ``done`` (an
    earlier, interrupted invocation finished it: its seconds stay in OUT/stages.json)."""
    cmd = [str(c) for c in cmd]
    log["commands"][name] = " ".join(([f"torchrun --nproc_per_node {n}"] if n > 1 else ["python"]) + cmd)
    if done:
        return
    full = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(n)] if n > 1 else []) + cmd
    t0 = time.time()
    proc = subprocess.run(full, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode:
        sys.exit(f"{name} failed: {' '.join(full)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    log["seconds"][name] = round(time.time() - t0, 1)
    print(f"{name}: {log['seconds'][name]:.0f} s", flush=True)


def finished(log_json: Path, iters: int) -> bool:
    return log_json.exists() and any(r["iteration"] == iters for r in json.loads(log_json.read_text())["train"])


def main() -> int:
    args = parse_args()
    size = SIZES["quick" if args.quick else "default"]
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log: dict = {"size": size, "experts": EXPERTS, "topk": TOPK, "ep": EP, "aux_loss_coeff": AUX,
                 "commands": {}, "seconds": {}, "runs": {}}
    data = {name: out / "data" / name for name in ("valid", "source", "target")}
    skip = {"valid": 0, "source": size["valid_documents"], "target": size["valid_documents"] + size["source_documents"]}
    count = {"valid": size["valid_documents"], "source": size["source_documents"], "target": None}
    stages = out / "stages.json"
    if stages.exists():
        log["seconds"].update(json.loads(stages.read_text()))
    for name, prefix in data.items():
        run(["tools/preprocess_data.py", "--output-prefix", prefix, "--seed", repro.SOURCE_SEED,
             *repro.flags(skip_documents=skip[name], max_documents=count[name])], 1, log, f"data-{name}",
            done=Path(f"{prefix}.idx").exists())
    source = out / "source"
    run(["examples/pretrain_gpt.py", *repro.shape_flags(size), *repro.train_flags(
        size, {"train": data["source"], "valid": data["valid"]}, repro.SOURCE_SEED, size["source_iters"], source,
        out / "source.json", 1, schedule=repro.SOURCE_LR, save_interval=size["source_iters"])], 2, log, "train-source",
        done=finished(out / "source.json", size["source_iters"]))
    upcycled = out / "upcycled"
    run(["tools/expand_sharded.py", "--load", source, "--save", upcycled, "--tp", 1, "--ep", EP, "--factor", 1,
         *MOE_FLAGS, "--moe-aux-loss-coeff", AUX, "--no-progress", "--overwrite"], EP, log, "upcycle",
        done=(upcycled / "latest_checkpointed_iteration.txt").exists())
    stages.write_text(json.dumps(log["seconds"]))
    target = {"train": data["target"], "valid": data["valid"]}
    for seed in range(1, size["seeds"] + 1):
        for arm in ARMS:
            name = f"{arm.replace(' ', '-')}-s{seed}"
            log_json = out / f"{name}.json"
            start = {"dense": ["--load", source, "--finetune", "--use-checkpoint-args"],
                     "upcycled": ["--load", upcycled, "--finetune", "--use-checkpoint-args"],
                     "random-init MoE": [*repro.shape_flags(size), *MOE_FLAGS,
                                         "--expert-model-parallel-size", EP]}[arm]
            aux = [] if arm == "dense" else ["--moe-aux-loss-coeff", AUX]
            run(["examples/pretrain_gpt.py", *start, *aux, *repro.train_flags(
                size, target, seed, size["train_iters"], out / name, log_json, 1,
                save_interval=size["train_iters"])], 2, log, f"train-{name}", done=finished(log_json, size["train_iters"]))
            stages.write_text(json.dumps(log["seconds"]))
            log["runs"][name] = json.loads(log_json.read_text())
    write_results(args.results, log, size)
    return 0


def final_loss(history: dict, n: int = 3) -> float:
    """The mean of the last ``n`` validation losses."""
    return statistics.fmean(v["lm_loss"] for v in history["valid"][-n:])


def write_results(results: Path, log: dict, size: dict) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "upcycle_moe.json").write_text(json.dumps(log, indent=1))
    seeds = range(1, size["seeds"] + 1)
    lines = ["| arm | first validation loss | final validation loss (mean of last 3) | per seed | load-balancing loss, last step |",
             "|---|---:|---:|---|---:|"]
    for arm in ARMS:
        runs = [log["runs"][f"{arm.replace(' ', '-')}-s{s}"] for s in seeds]
        finals = [final_loss(r) for r in runs]
        firsts = [r["valid"][0]["lm_loss"] for r in runs]
        aux = [r["train"][-1].get("load_balancing_loss") for r in runs]
        spread = f" ± {statistics.stdev(finals):.4f}" if len(finals) > 1 else ""
        lines.append(f"| {arm} | {statistics.fmean(firsts):.4f} | {statistics.fmean(finals):.4f}{spread} | "
                     + ", ".join(f"{f:.4f}" for f in finals) + " | "
                     + (", ".join(f"{a:.4f}" for a in aux) if aux[0] is not None else "-") + " |")
    final = {arm: [final_loss(log["runs"][f"{arm.replace(' ', '-')}-s{s}"]) for s in seeds] for arm in ARMS}
    paired = [d - u for d, u in zip(final["dense"], final["upcycled"])]
    text = (f"# Upcycling to {EXPERTS} experts (top-{TOPK}) against the dense model and a random-init mixture\n\n"
            f"Same tokens ({size['train_iters']} iterations x {size['global_batch_size']} x {size['seq_length']}), "
            f"same recipe, seeds {list(seeds)}; generated by examples/upcycle_moe.py.\n\n" + "\n".join(lines) + "\n\n"
            "Final validation loss, dense minus upcycled, paired by seed: " + ", ".join(f"{p:+.4f}" for p in paired)
            + f" (range {min(paired):+.4f} to {max(paired):+.4f}).\n")
    log["paired_dense_minus_upcycled"] = paired
    (results / "upcycle_moe.json").write_text(json.dumps(log, indent=1))
    (results / "upcycle_moe.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
