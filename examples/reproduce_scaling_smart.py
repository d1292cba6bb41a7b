#!/usr/bin/env python
"""Reproduce "Scaling Smart" (Samragh et al., 2024) in miniature on this machine's CPU.

    python examples/reproduce_scaling_smart.py                  # about an hour on 2 cores
    python examples/reproduce_scaling_smart.py --quick --out runs/repro-quick --results runs/repro-quick/results

1. byte-level data from the Python standard library (tools/preprocess_data.py);
2. a small Llama-like GPT trained from scratch (examples/pretrain_gpt.py);
3. grown 2x with each variant (tools/expand_sharded.py at --tp);
4. each clone and a same-shape random-init model trained with identical hyperparameters for the same
   number of tokens (AdamW, weight decay 0.05, betas 0.9/0.999, cosine decay);
5. speedup (tokens the random-init model needs to reach its own final validation loss, divided by the
   tokens each clone needs), plots, and a JSON of everything.

Every stage is the user-facing command, run as a subprocess and recorded in the JSON; a stage whose
output is already complete is skipped, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("symmetric", "noisy-symmetric", "diagonal", "noisy-diagonal")
BASELINE = "random-init"

# Source shape (Llama-like: GQA, SwiGLU, RMSNorm, RoPE, untied); the clones are 2x in every width.
SIZES = {
    "default": dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=344, seq_length=256, micro_batch_size=8, global_batch_size=16,
                    source_iters=600, train_iters=600, eval_interval=25, eval_iters=4, snapshots=6),
    "quick": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=128, seq_length=64, micro_batch_size=4, global_batch_size=8,
                  source_iters=30, train_iters=20, eval_interval=5, eval_iters=2, snapshots=2),
}
OPTIM = dict(lr=1e-3, min_lr=1e-4, lr_decay_style="cosine", weight_decay=0.05, adam_beta1=0.9,
             adam_beta2=0.999, clip_grad=1.0, hidden_dropout=0.0, attention_dropout=0.0)


def flags(**kwargs) -> list[str]:
    out = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


def shape_flags(size: dict, factor: int = 1) -> list[str]:
    return flags(num_layers=size["num_layers"], hidden_size=size["hidden_size"] * factor,
                 num_attention_heads=size["num_attention_heads"] * factor, group_query_attention=True,
                 num_query_groups=size["num_query_groups"] * factor, ffn_hidden_size=size["ffn_hidden_size"] * factor,
                 kv_channels=size["hidden_size"] // size["num_attention_heads"], swiglu=True,
                 normalization="RMSNorm", position_embedding_type="rope", disable_bias_linear=True,
                 untie_embeddings_and_output_weights=True, max_position_embeddings=size["seq_length"])


class Stages:
    """Runs each stage's command (unless its output is complete) and records it."""

    def __init__(self, out: Path, tp: int):
        self.out, self.tp = out, tp
        self.commands: dict[str, str] = {}
        self.timings = out / "stage_seconds.json"  # kept across reruns that skip finished stages
        self.seconds: dict[str, float] = json.loads(self.timings.read_text()) if self.timings.exists() else {}

    def run(self, name: str, cmd: list[str], done: bool, torchrun: bool = True) -> None:
        full = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.tp)] if torchrun
                else [sys.executable]) + cmd
        self.commands[name] = " ".join(["torchrun", "--nproc_per_node", str(self.tp)] if torchrun else ["python"]) \
            + " " + " ".join(cmd).replace(str(ROOT) + os.sep, "")
        if done:
            print(f"[{name}] already complete, skipped", flush=True)
            return
        print(f"[{name}] {self.commands[name]}", flush=True)
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            proc = subprocess.run(full, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
        self.seconds[name] = time.perf_counter() - t0
        self.timings.write_text(json.dumps(self.seconds, indent=1))
        if proc.returncode != 0:
            sys.exit(f"stage {name} failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
        print(f"[{name}] done in {self.seconds[name]:.0f} s", flush=True)


def finished(log_json: Path, iters: int) -> bool:
    if not log_json.exists():
        return False
    train = json.loads(log_json.read_text())["train"]
    return bool(train) and train[-1]["iteration"] == iters


def train_flags(size: dict, data: Path, seed: int, iters: int, save: Path, log_json: Path, tp: int) -> list[str]:
    return flags(tensor_model_parallel_size=tp, seq_length=size["seq_length"], data_path=data, split="98,2,0",
                 micro_batch_size=size["micro_batch_size"], global_batch_size=size["global_batch_size"],
                 train_iters=iters, lr_warmup_iters=max(1, iters // 20), eval_interval=size["eval_interval"],
                 eval_iters=size["eval_iters"], log_interval=max(1, iters // 10), seed=seed, save=save,
                 save_interval=max(1, iters // size["snapshots"]), log_json=log_json, **OPTIM)


def run_stages(args, size: dict, stages: Stages) -> dict[str, Path]:
    out = args.out
    data = out / "data" / "stdlib"
    stages.run("data", ["tools/preprocess_data.py", "--output-prefix", str(data), "--seed", str(args.seed)],
               done=Path(f"{data}.idx").exists(), torchrun=False)
    src_json = out / "source.json"
    stages.run("train-source", ["examples/pretrain_gpt.py", *shape_flags(size),
                                *train_flags(size, data, args.seed, size["source_iters"], out / "source", src_json, args.tp)],
               done=finished(src_json, size["source_iters"]))
    runs = {}
    for variant in VARIANTS:
        wide = out / "expanded" / variant
        stages.run(f"expand-{variant}", ["tools/expand_sharded.py", "--load", str(out / "source"), "--save", str(wide),
                                         "--tp", str(args.tp), "--factor", "2", "--variant", variant,
                                         "--seed", str(args.seed), "--no-progress", "--overwrite"],
                   done=(wide / "latest_checkpointed_iteration.txt").exists())
        log_json = out / "runs" / f"{variant}.json"
        stages.run(f"train-{variant}", ["examples/pretrain_gpt.py", "--load", str(wide), "--finetune",
                                        "--use-checkpoint-args",
                                        *train_flags(size, data, args.seed, size["train_iters"], out / "runs" / variant,
                                                     log_json, args.tp)],
                   done=finished(log_json, size["train_iters"]))
        runs[variant] = log_json
    log_json = out / "runs" / f"{BASELINE}.json"
    stages.run(f"train-{BASELINE}", ["examples/pretrain_gpt.py", *shape_flags(size, factor=2),
                                     *train_flags(size, data, args.seed, size["train_iters"], out / "runs" / BASELINE,
                                                  log_json, args.tp)],
               done=finished(log_json, size["train_iters"]))
    runs[BASELINE] = log_json
    return runs


def analyse(args, size: dict, runs: dict[str, Path], stages: Stages) -> dict:
    """Speedup, symmetry over training and spectra at initialization; figures and the JSON."""
    import torch
    from megatron.core import dist_checkpointing

    from megaclone import checkpoint as ckpt_io
    from megaclone import plots, scaling
    from megaclone.partition import param_rules
    from megaclone.runtime import init_distributed
    from megaclone.spec import ModelSpec

    init_distributed("cpu")
    histories = {name: json.loads(path.read_text()) for name, path in runs.items()}
    curves = {name: [(v["tokens"], v["lm_loss"]) for v in h["valid"]] for name, h in histories.items()}
    results = {name: {**scaling.speedup(curves[BASELINE], curves[name]),
                      "initial_loss": curves[name][0][1], "final_loss": curves[name][-1][1],
                      "first_train_loss": histories[name]["train"][0]["lm_loss"],
                      "source_check": histories[name].get("source_check")} for name in runs}

    src_path = ckpt_io.find_checkpoint(args.out / "source")
    src_spec = ModelSpec.from_args(ckpt_io.read_common(src_path)["args"])
    wide_path = ckpt_io.find_checkpoint(args.out / "expanded" / VARIANTS[0])
    rules = param_rules(src_spec, ModelSpec.from_args(ckpt_io.read_common(wide_path)["args"]))

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        return {k: v for k, v in dist_checkpointing.load_plain_tensors(str(path)).items()
                if isinstance(v, torch.Tensor) and not k.startswith("optimizer")}

    symmetry = {}
    tokens_per_iter = size["global_batch_size"] * size["seq_length"]
    for name in runs:
        points = []
        if name != BASELINE:
            points.append((0, scaling.model_symmetry(rules, tensors(ckpt_io.find_checkpoint(args.out / "expanded" / name)))))
        for it_dir in sorted((args.out / "runs" / name).glob("iter_*")):
            points.append((int(it_dir.name[5:]) * tokens_per_iter, scaling.model_symmetry(rules, tensors(it_dir))))
        symmetry[name] = [{"tokens": t, **s} for t, s in points]

    spectrum_key = "decoder.layers.mlp.linear_fc2.weight"
    spectra = {"source": scaling.singular_values(tensors(src_path)[spectrum_key][0])}
    for variant in VARIANTS:
        w = tensors(ckpt_io.find_checkpoint(args.out / "expanded" / variant))[spectrum_key][0]
        spectra[f"{variant} (init)"] = scaling.singular_values(w)

    res = args.results
    figures = {
        "loss": plots.loss_curves(curves, curves[BASELINE][-1][1], res / "scaling_smart_loss.png"),
        "symmetry": plots.symmetry({n: [(p["tokens"], p["all"]) for p in pts] for n, pts in symmetry.items()},
                                   res / "scaling_smart_symmetry.png"),
        "spectrum": plots.spectra(spectra, "layer 0 MLP linear_fc2: source vs 2x clones at initialization",
                                  res / "scaling_smart_spectrum.png"),
    }
    report = {
        "paper": "Samragh et al., Scaling Smart: Accelerating Large Language Model Pre-Training with Small "
                 "Model Initialization (2024); reports 2.2x-4x",
        "settings": {"size": "quick" if args.quick else "default", "tp": args.tp, "seed": args.seed,
                     "factor": 2, **size, **OPTIM,
                     "tokens_per_iteration": tokens_per_iter,
                     "source_tokens": size["source_iters"] * tokens_per_iter,
                     "wide_tokens": size["train_iters"] * tokens_per_iter,
                     "source_parameters": _count(tensors(src_path)),
                     "wide_parameters": _count(tensors(wide_path))},
        "commands": stages.commands,
        "stage_seconds": stages.seconds,
        "source_final_valid_loss": json.loads((args.out / "source.json").read_text())["valid"][-1]["lm_loss"],
        "runs": results,
        "valid_curves": {n: [{"tokens": t, "lm_loss": l} for t, l in c] for n, c in curves.items()},
        "symmetry": symmetry,
        "spectrum": {"key": spectrum_key, "layer": 0, **{n: v.tolist() for n, v in spectra.items()}},
        "figures": {k: str(v.relative_to(res)) for k, v in figures.items()},
    }
    (res / "scaling_smart.json").write_text(json.dumps(report, indent=1))
    (res / "scaling_smart.md").write_text(markdown_table(report))
    return report


def _count(tensors: dict) -> int:
    return int(sum(v.numel() for v in tensors.values()))


def markdown_table(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"Source {s['source_parameters']:,} parameters trained on {s['source_tokens']:,} tokens; each wide model "
        f"({s['wide_parameters']:,} parameters) trained on {s['wide_tokens']:,} tokens, seed {s['seed']}. "
        f"Target = the random-init model's final validation loss.",
        "",
        "| run | first train loss | initial valid loss | final valid loss | tokens to target | speedup |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["runs"].items():
        reach = "not reached" if r["tokens_to_target"] is None else f"{r['tokens_to_target']:,.0f}"
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {name} | {r['first_train_loss']:.4f} | {r['initial_loss']:.4f} | {r['final_loss']:.4f} "
                     f"| {reach} | {sp} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "scaling-smart", help="working directory")
    p.add_argument("--results", type=Path, default=ROOT / "examples" / "results",
                   help="where the JSON, table and figures go")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few iterations (for the tests)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size of every stage (>= 2)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    size = SIZES["quick" if args.quick else "default"]
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    stages = Stages(args.out, args.tp)
    runs = run_stages(args, size, stages)
    report = analyse(args, size, runs, stages)
    print(markdown_table(report))
    print(f"wrote {args.results / 'scaling_smart.json'} and figures {', '.join(report['figures'].values())}")
    return 0


if __name__ == "__main__":
    from megaclone import cli

    cli.run(main)
