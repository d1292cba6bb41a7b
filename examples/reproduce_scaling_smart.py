#!/usr/bin/env python
"""Reproduce "Scaling Smart" (Samragh et al., 2024) in miniature on this machine's CPU.

    python examples/reproduce_scaling_smart.py            # about 75 minutes on 2 cores
    python examples/reproduce_scaling_smart.py --quick --out runs/repro-quick --results runs/repro-quick/results

1. byte-level data from the Python standard library, cut into three disjoint document sets
   (tools/preprocess_data.py): validation, the source's training stream, the targets' stream;
2. a small Llama-like source trained from scratch on about three times the targets' tokens
   (at least 25 per parameter; examples/pretrain_gpt.py);
3. grown 2x in width with each variant (tools/expand_sharded.py);
4. every target (the clones and a same-shape random-init model) trained with the same recipe: peak
   lr half the source's, linear warm-up, cosine decay, hidden and attention dropout 0.1; paired seeds
   (one seed fixes the data order, the dropout masks, the noise and the random init) for the main
   variants, one seed for the side runs (noisy diagonal, symmetric with dropout 0, symmetric at the
   source's lr, clones of the source at a third and two thirds of its training, and a 4x clone of a
   half-width source trained on the same tokens);
5. speedups against the random-init model of the same seed, the paper's Figure 5 and 6 measures,
   figures, a claims table and a JSON of everything.

Every stage is the user-facing command, run as a subprocess and recorded in the JSON; up to --jobs
stages run at once; a stage whose output is complete is skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAIN = ("random-init", "symmetric", "noisy-symmetric", "diagonal")  # paired seeds
CLONES = ("symmetric", "noisy-symmetric", "diagonal", "noisy-diagonal")
BASELINE = "random-init"

# Source shape (Llama-like: GQA, SwiGLU, RMSNorm, RoPE, untied); the targets are 2x in every width.
SIZES = {
    "default": dict(num_layers=4, hidden_size=64, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=172,
                    make_vocab_size_divisible_by=8, seq_length=128, micro_batch_size=32, global_batch_size=32,
                    source_iters=1350, train_iters=450, eval_interval=15, eval_iters=6, snapshots=6, seeds=3,
                    valid_documents=50, source_documents=650),
    "quick": dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                  make_vocab_size_divisible_by=128, seq_length=32, micro_batch_size=4, global_batch_size=8,
                  source_iters=30, train_iters=20, eval_interval=5, eval_iters=2, snapshots=2, seeds=2,
                  valid_documents=10, source_documents=60),
}
SOURCE_LR = dict(lr=2e-3, min_lr=2e-4)
TARGET_LR = dict(lr=1e-3, min_lr=1e-4)  # half the source's peak, as the paper's targets
RECIPE = dict(lr_decay_style="cosine", weight_decay=0.05, adam_beta1=0.9, adam_beta2=0.99, clip_grad=1.0,
              hidden_dropout=0.1, attention_dropout=0.1)
SOURCE_SEED = 1234
FINAL_EVALS = 5  # the target loss: the random-init model's last evaluations averaged
# Crossings are read from the raw curves, linearly interpolated between evaluations (1: no smoothing).
# A trailing mean over 5 evaluations (the method until 2026-12-06) lags both curves by about two
# evaluations and pulls every speedup toward 1; paper.speedup_by_method shows the method's weight.
SMOOTHING = 1


def flags(**kwargs) -> list[str]:
    out = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


def half_width(size: dict, tp: int) -> dict:
    """The smaller source of Figure 9: half the hidden size, heads and FFN, query groups halved where
    they can be (one per TP rank at least); its 4x clone has the targets' shape, its query groups
    grown by what the targets need (--query-group-factor)."""
    return {**size, "hidden_size": size["hidden_size"] // 2, "num_attention_heads": size["num_attention_heads"] // 2,
            "num_query_groups": max(tp, size["num_query_groups"] // 2), "ffn_hidden_size": size["ffn_hidden_size"] // 2}


def shape_flags(size: dict, factor: int = 1) -> list[str]:
    return flags(num_layers=size["num_layers"], hidden_size=size["hidden_size"] * factor,
                 num_attention_heads=size["num_attention_heads"] * factor, group_query_attention=True,
                 num_query_groups=size["num_query_groups"] * factor, ffn_hidden_size=size["ffn_hidden_size"] * factor,
                 kv_channels=size["hidden_size"] // size["num_attention_heads"], swiglu=True,
                 normalization="RMSNorm", position_embedding_type="rope", disable_bias_linear=True,
                 untie_embeddings_and_output_weights=True, max_position_embeddings=size["seq_length"],
                 make_vocab_size_divisible_by=size["make_vocab_size_divisible_by"])


def train_flags(size: dict, data: dict[str, Path], seed: int, iters: int, save: Path, log_json: Path, tp: int,
                schedule: dict = TARGET_LR, **overrides) -> list[str]:
    return flags(**{**dict(
        tensor_model_parallel_size=tp, seq_length=size["seq_length"], train_data_path=data["train"],
        valid_data_path=data["valid"], micro_batch_size=size["micro_batch_size"],
        global_batch_size=size["global_batch_size"], train_iters=iters, lr_warmup_iters=max(1, iters // 20),
        eval_interval=size["eval_interval"], eval_iters=size["eval_iters"], log_interval=max(1, iters // 10),
        seed=seed, save=save, save_interval=max(1, iters // size["snapshots"]), log_json=log_json, no_progress=True,
        **schedule, **RECIPE), **overrides})


@dataclass
class Stage:
    name: str
    cmd: list[str]
    done: bool
    after: tuple[str, ...] = ()
    torchrun: bool = True


@dataclass
class Stages:
    """Runs stages (each a user-facing command) up to ``jobs`` at a time, in list order as their
    dependencies finish; records every command and its seconds."""

    out: Path
    tp: int
    jobs: int
    commands: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.timings = self.out / "stage_seconds.json"  # kept across reruns that skip finished stages
        if self.timings.exists():
            self.seconds = json.loads(self.timings.read_text())

    def command(self, stage: Stage) -> list[str]:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.tp)]
                    if stage.torchrun else [sys.executable])
        shown = (f"torchrun --nproc_per_node {self.tp}" if stage.torchrun else "python")
        self.commands[stage.name] = shown + " " + " ".join(stage.cmd).replace(str(ROOT) + os.sep, "")
        return launcher + stage.cmd

    def run(self, stages: list[Stage]) -> None:
        threads = str(max(1, (os.cpu_count() or 1) // (self.jobs * self.tp)))
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": threads}
        finished = {s.name for s in stages if s.done}
        for s in stages:
            self.command(s)
            if s.done:
                print(f"[{s.name}] already complete, skipped", flush=True)
        waiting = [s for s in stages if not s.done]
        running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
        try:
            while waiting or running:
                for s in [s for s in waiting if set(s.after) <= finished][: self.jobs - len(running)]:
                    waiting.remove(s)
                    log = self.out / "logs" / f"{s.name}.log"
                    log.parent.mkdir(parents=True, exist_ok=True)
                    print(f"[{s.name}] {self.commands[s.name]}", flush=True)
                    with open(log, "w") as fh:
                        proc = subprocess.Popen(self.command(s), cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
                    running[s.name] = (proc, time.perf_counter(), log)
                time.sleep(0.5)
                for name, (proc, t0, log) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    del running[name]
                    self.seconds[name] = time.perf_counter() - t0
                    self.timings.write_text(json.dumps(self.seconds, indent=1))
                    if proc.returncode != 0:
                        sys.exit(f"stage {name} failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
                    finished.add(name)
                    print(f"[{name}] done in {self.seconds[name]:.0f} s", flush=True)
                if waiting and not running and not any(set(s.after) <= finished for s in waiting):
                    raise RuntimeError(f"stages wait on nothing that can finish: {[s.name for s in waiting]}")
        finally:
            for proc, _, _ in running.values():
                proc.terminate()
                proc.wait()


def finished(log_json: Path, iters: int) -> bool:
    if not log_json.exists():
        return False
    train = json.loads(log_json.read_text())["train"]
    return bool(train) and train[-1]["iteration"] == iters


@dataclass(frozen=True)
class Run:
    """One target training run: what it starts from and how it differs from the common recipe."""

    name: str  # "<variant>-s<seed>" or a side run's name
    variant: str  # the clone variant, or "random-init"
    seed: int
    start: Optional[str] = None  # the expansion stage it loads; None for random init
    overrides: tuple = ()  # (flag, value) pairs over the recipe


def plan_runs(size: dict) -> list[Run]:
    seeds = range(1, size["seeds"] + 1)
    runs = [Run(f"{v}-s{s}", v, s, None if v == BASELINE else expansion(v, s)) for s in seeds for v in MAIN]
    runs += [Run("noisy-diagonal-s1", "noisy-diagonal", 1, expansion("noisy-diagonal", 1)),
             Run("symmetric-dropout0-s1", "symmetric", 1, expansion("symmetric", 1),
                 (("hidden_dropout", 0.0), ("attention_dropout", 0.0))),
             Run("symmetric-source-lr-s1", "symmetric", 1, expansion("symmetric", 1), tuple(SOURCE_LR.items()))]
    runs += [Run(f"symmetric-from-{stage}-s1", "symmetric", 1, f"expand-symmetric-from-{stage}")
             for stage in ("third", "two-thirds")]
    runs.append(Run("symmetric-4x-s1", "symmetric", 1, FOUR_X))
    return runs


FOUR_X = "expand-symmetric-4x"  # Figure 9: the half-width source grown 4x to the targets' shape


def expansion(variant: str, seed: int) -> str:
    """Noiseless variants are deterministic: one expansion serves every seed."""
    return f"expand-{variant}" + (f"-s{seed}" if variant.startswith("noisy") else "")


def source_iteration(size: dict, stage: str) -> int:
    return {"third": 1, "two-thirds": 2, "full": 3}[stage] * size["source_iters"] // 3


def data_stages(out: Path, size: dict) -> tuple[dict[str, Path], list[Stage]]:
    """The three disjoint datasets (validation, the source's stream, the targets') and their stages."""
    data = {name: out / "data" / name for name in ("valid", "source", "target")}
    skip = {"valid": 0, "source": size["valid_documents"], "target": size["valid_documents"] + size["source_documents"]}
    count = {"valid": size["valid_documents"], "source": size["source_documents"], "target": None}
    return data, [Stage(f"data-{name}", ["tools/preprocess_data.py", "--output-prefix", str(prefix), "--seed",
                                         str(SOURCE_SEED), *flags(skip_documents=skip[name], max_documents=count[name])],
                        done=Path(f"{prefix}.idx").exists(), torchrun=False) for name, prefix in data.items()]


def plan_stages(args, size: dict, runs: list[Run]) -> list[Stage]:
    out, tp = args.out, args.tp
    data, stages = data_stages(out, size)
    small = half_width(size, tp)

    def train_source(name: str, shape: dict, snapshots: int) -> Stage:
        """A source trained from scratch on the source stream at the source's schedule."""
        log_json = out / f"{name}.json"
        return Stage(f"train-{name}", ["examples/pretrain_gpt.py", *shape_flags(shape), *train_flags(
            shape, {"train": data["source"], "valid": data["valid"]}, SOURCE_SEED, size["source_iters"], out / name,
            log_json, tp, schedule=SOURCE_LR, save_interval=size["source_iters"] // snapshots)],
            done=finished(log_json, size["source_iters"]), after=("data-source", "data-valid"))

    stages += [train_source("source", size, snapshots=3), train_source("small-source", small, snapshots=1)]
    expansions: dict[str, tuple[str, int, Path, list[str], str]] = {}
    for run in runs:
        if run.start == FOUR_X:
            groups = size["num_query_groups"] * 2 // small["num_query_groups"]
            expansions[FOUR_X] = (run.variant, run.seed, out / "small-source" / f"iter_{size['source_iters']:07d}",
                                  ["--factor", "4", "--query-group-factor", str(groups)], "train-small-source")
        elif run.start and run.start not in expansions:
            stage = run.start.removeprefix("expand-symmetric-from-") if "-from-" in run.start else "full"
            expansions[run.start] = (run.variant, run.seed, out / "source" / f"iter_{source_iteration(size, stage):07d}",
                                     ["--factor", "2"], "train-source")
    for name, (variant, seed, load, growth, after) in expansions.items():
        wide = out / "expanded" / name.removeprefix("expand-")
        stages.append(Stage(name, ["tools/expand_sharded.py", "--load", str(load), "--save", str(wide), "--tp", str(tp),
                                   *growth, "--variant", variant, "--seed", str(seed), "--no-progress", "--overwrite"],
                            done=(wide / "latest_checkpointed_iteration.txt").exists(), after=(after,)))
    target_data = {"train": data["target"], "valid": data["valid"]}
    # the source is the critical path: random-init runs go first to use the other job slots meanwhile
    for run in sorted(runs, key=lambda r: r.start is not None):
        log_json = out / "runs" / f"{run.name}.json"
        common = train_flags(size, target_data, run.seed, size["train_iters"], out / "runs" / run.name, log_json, tp,
                             **dict(run.overrides))
        if run.start is None:
            cmd, after = [*shape_flags(size, factor=2), *common], ("data-target", "data-valid")
        elif run.overrides and "hidden_dropout" in dict(run.overrides):
            # --use-checkpoint-args forces the checkpoint's dropout (as Megatron-LM does): give the shape instead
            cmd, after = ["--load", str(expanded(out, run)), "--finetune", *shape_flags(size, 2), *common], (run.start,)
        else:
            cmd, after = ["--load", str(expanded(out, run)), "--finetune", "--use-checkpoint-args", *common], (run.start,)
        stages.append(Stage(f"train-{run.name}", ["examples/pretrain_gpt.py", *cmd],
                            done=finished(log_json, size["train_iters"]), after=after + ("data-target", "data-valid")))
    return stages


def expanded(out: Path, run: Run) -> Path:
    return out / "expanded" / run.start.removeprefix("expand-")


def _curve(history: dict) -> list[tuple[float, float]]:
    return [(v["tokens"], v["lm_loss"]) for v in history["valid"]]


def run_curve(out: Path, name: str) -> list[tuple[float, float]]:
    """A run's validation curve, (tokens, loss) points, from its --log-json."""
    return _curve(json.loads((out / "runs" / f"{name}.json").read_text()))


def stored_curves(report: dict) -> dict[str, list[tuple[float, float]]]:
    """A stored report's validation curves as (tokens, loss) points."""
    return {n: [(p["tokens"], p["lm_loss"]) for p in c] for n, c in report["valid_curves"].items()}


def curve_records(curve: list[tuple[float, float]]) -> list[dict]:
    """(tokens, loss) points as a report stores them."""
    return [{"tokens": t, "lm_loss": loss} for t, loss in curve]


def _bands(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float, float, float]]:
    """(tokens, mean, min, max) over seeds at each evaluation (all seeds evaluate at the same tokens)."""
    import numpy as np

    losses = np.array([[loss for _, loss in c] for c in curves])
    return [(t, float(m), float(lo), float(hi)) for (t, _), m, lo, hi in
            zip(curves[0], losses.mean(0), losses.min(0), losses.max(0))]


def analyse(args, size: dict, runs: list[Run], stages: Stages) -> dict:
    """Speedups with their seed spread, symmetry over training, spectra; figures, claims and the JSON."""
    import numpy as np
    import torch

    from megaclone.formats import torch_dist
    from megaclone.study import plots
    from megaclone.study import paper
    from megaclone.shape.layout import MLP
    from megaclone.pipeline.rules import param_rules
    from megaclone.runtime import init_distributed
    from megaclone.shape.spec import ModelSpec

    init_distributed("cpu")
    out, res = args.out, args.results
    histories = {r.name: json.loads((out / "runs" / f"{r.name}.json").read_text()) for r in runs}
    curves = {name: _curve(h) for name, h in histories.items()}
    by_name = {r.name: r for r in runs}
    results = {}
    for r in runs:
        base = f"{BASELINE}-s{r.seed}"
        results[r.name] = {"variant": r.variant, "seed": r.seed, "start": r.start, "overrides": dict(r.overrides),
                           **paper.speedup(curves[base], curves[r.name], FINAL_EVALS, SMOOTHING),
                           "initial_loss": curves[r.name][0][1],
                           "final_loss": paper.final_loss(curves[r.name], FINAL_EVALS),
                           "early_bump": paper.early_bump(curves[r.name]),
                           "first_train_loss": histories[r.name]["train"][0]["lm_loss"],
                           "source_check": histories[r.name].get("source_check")}
    groups: dict[str, list[str]] = {}
    for r in runs:
        groups.setdefault(r.variant if r.name == f"{r.variant}-s{r.seed}" else r.name.rsplit("-s", 1)[0], []).append(r.name)
    summary = {g: {"runs": names, "speedup": paper.spread([results[n]["speedup"] for n in names],
                                                            sum(results[n]["from_start"] for n in names)),
                   "final_loss": paper.spread([results[n]["final_loss"] for n in names])}
               for g, names in groups.items()}

    src_path = torch_dist.find_checkpoint(out / "source")
    src_spec = ModelSpec.from_args(torch_dist.read_common(src_path)["args"])
    wide_path = torch_dist.find_checkpoint(out / "expanded" / "symmetric")
    rules = param_rules(src_spec, ModelSpec.from_args(torch_dist.read_common(wide_path)["args"]))

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        return {k: v for k, v in torch_dist.load_plain_tensors(path).items()
                if isinstance(v, torch.Tensor) and not k.startswith("optimizer")}

    tokens_per_iter = size["global_batch_size"] * size["seq_length"]
    symmetry: dict[str, list[dict]] = {}
    for r in runs:
        points = [] if r.start is None else [(0, paper.group_row_cosines(rules, tensors(torch_dist.find_checkpoint(expanded(out, r)))))]
        for it_dir in sorted((out / "runs" / r.name).glob("iter_*")):
            points.append((int(it_dir.name[5:]) * tokens_per_iter, paper.group_row_cosines(rules, tensors(it_dir))))
        symmetry[r.name] = [{"tokens": t, **c} for t, c in points]

    key = MLP + "linear_fc2.weight"  # cloned on both axes: the paper's Figure 6 case
    init_std = 0.02 / (2 * size["num_layers"]) ** 0.5  # megatron-core's scaled init of output projections
    shape = tensors(wide_path)[key][0].shape
    spectra = {
        "source": paper.singular_values(tensors(src_path)[key][0]),
        "symmetric clone at init": paper.singular_values(tensors(wide_path)[key][0]),
        "symmetric clone trained": paper.singular_values(tensors(torch_dist.find_checkpoint(out / "runs" / "symmetric-s1"))[key][0]),
        "random-init at init": paper.singular_values(torch.randn(shape, generator=torch.Generator().manual_seed(1)) * init_std),
        "random-init trained": paper.singular_values(tensors(torch_dist.find_checkpoint(out / "runs" / "random-init-s1"))[key][0]),
    }
    ranks = {name: paper.rank_above(sv) for name, sv in spectra.items()}

    main_bands = {v: _bands([curves[n] for n in summary[v]["runs"]]) for v in MAIN}
    target = float(np.mean([results[n]["target_loss"] for n in summary[BASELINE]["runs"]]))
    fig_runs = ["symmetric-s1", "noisy-symmetric-s1", "diagonal-s1", "noisy-diagonal-s1", "symmetric-dropout0-s1",
                "random-init-s1"]
    figures = {
        "loss": plots.loss_bands({**{f"{v} (mean, seed range)": b for v, b in main_bands.items()},
                                  **{n: _bands([curves[n]]) for n in ("noisy-diagonal-s1", "symmetric-dropout0-s1",
                                                                     "symmetric-source-lr-s1")}},
                                 target, res / "scaling_smart_loss.png", f"{size['seeds']} paired seeds"),
        "symmetry": plots.symmetry_groups(
            {g: {n: [(p["tokens"], p[g]) for p in symmetry[n] if g in p] for n in fig_runs} for g in paper.SYMMETRY_GROUPS},
            res / "scaling_smart_symmetry.png"),
        "spectrum": plots.spectra(spectra, "layer 0 linear_fc2: before and after training",
                                  res / "scaling_smart_spectrum.png"),
        "base_quality": plots.loss_bands({n: _bands([curves[n]]) for n in ("symmetric-from-third-s1",
                                          "symmetric-from-two-thirds-s1", "symmetric-s1", "symmetric-4x-s1",
                                          "random-init-s1")},
                                         target, res / "scaling_smart_base_quality.png",
                                         "clones of the source at 1/3, 2/3, all of its training; 4x from a "
                                         "half-width source (seed 1)"),
    }
    source_history = json.loads((out / "source.json").read_text())
    src_params = _count(tensors(src_path))
    report = {
        "paper": "Samragh et al., Scaling Smart: Accelerating Large Language Model Pre-Training with Small "
                 "Model Initialization (2024); reports 2.2x-4x",
        "settings": {"size": "quick" if args.quick else "default", "tp": args.tp, "jobs": args.jobs, "factor": 2,
                     **size, "source_schedule": SOURCE_LR, "target_schedule": TARGET_LR, **RECIPE,
                     "source_seed": SOURCE_SEED, "final_evals": FINAL_EVALS, "smoothing": SMOOTHING,
                     "tokens_per_iteration": tokens_per_iter,
                     "source_tokens": size["source_iters"] * tokens_per_iter,
                     "target_tokens": size["train_iters"] * tokens_per_iter,
                     "source_parameters": src_params,
                     "source_tokens_per_parameter": size["source_iters"] * tokens_per_iter / src_params,
                     "wide_parameters": _count(tensors(wide_path))},
        "commands": stages.commands,
        "stage_seconds": stages.seconds,
        "source_valid_curve": _curve(source_history),
        "runs": results,
        "variants": summary,
        "valid_curves": {n: curve_records(c) for n, c in curves.items()},
        "symmetry": symmetry,
        "spectrum": {"key": key, "layer": 0, "rank_above_1e-3": ranks, **{n: v.tolist() for n, v in spectra.items()}},
        "figures": {k: str(v.relative_to(res)) for k, v in figures.items()},
    }
    report["claims"] = claims(report, by_name)
    (res / "scaling_smart.json").write_text(json.dumps(report, indent=1))
    (res / "scaling_smart.md").write_text(markdown(report))
    return report


def _count(tensors: dict) -> int:
    return int(sum(v.numel() for v in tensors.values()))


def _fmt(s: dict, unit: str = "x", digits: int = 2) -> str:
    if s["mean"] is None:
        parts = [f"{s['from_start']} of {s['n']} seeds at the target before training"] if s["from_start"] else []
        parts += [f"{s['missing']} of {s['n']} never reached it"] if s["missing"] else []
        known = s["n"] - s["from_start"] - s["missing"]
        parts += [f"{known} at {s['min']:.{digits}f}-{s['max']:.{digits}f}{unit}"] if known else []
        return "; ".join(parts)
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}{unit} (1 seed)"
    return f"{s['mean']:.{digits}f}{unit} ± {s['std']:.{digits}f} (range {s['min']:.{digits}f}-{s['max']:.{digits}f}, {s['n']} seeds)"


def claims(report: dict, runs: dict) -> list[dict]:
    """The paper's claims, each with the measured figure and a status decided by a stated rule."""
    from megaclone.study import paper

    v, r, sym = report["variants"], report["runs"], report["symmetry"]
    out = []

    def claim(text: str, measured: str, status: str, rule: str) -> None:
        out.append({"claim": text, "measured": measured, "status": status, "rule": rule})

    clones = [c for c in CLONES if c in v]
    means = {c: v[c]["speedup"]["mean"] for c in clones}
    measured = "; ".join(f"{c} {_fmt(v[c]['speedup'])}" for c in clones)
    reached = [m for m in means.values() if m is not None]
    in_range = bool(reached) and len(reached) == len(means) and all(2.2 <= m <= 4.0 for m in reached)
    unbounded = all(r[n]["from_start"] for c in clones for n in v[c]["runs"])
    claim("2.2x-4x fewer tokens to the random-init model's final accuracy", measured,
          "inconclusive" if unbounded else "reproduced" if in_range else "contradicted",
          "every clone variant's mean speedup within 2.2-4; when every clone is at the target before "
          "training, the speedup has no finite value and the claim is inconclusive")
    beats = all(r[n]["from_start"] or (r[n]["speedup"] is not None and r[n]["speedup"] > 1)
                for c in clones for n in v[c]["runs"])
    claim("every variant beats random init", measured, "reproduced" if beats else "contradicted",
          "every seed of every clone variant has speedup > 1 (or is at the target before training)")
    # Rank by speedup; where some are unbounded or unknown (a clone at the target before training),
    # by final loss instead (lower is better), each with its seed range.
    trio = ("symmetric", "noisy-symmetric", "diagonal")
    by_speedup = all(means.get(c) is not None for c in trio)
    score = {c: v[c]["speedup"] if by_speedup else
             {k: (-x if isinstance(x, float) and k in ("mean", "min", "max") else x)
              for k, x in v[c]["final_loss"].items()} for c in trio}
    lo = {c: min(score[c]["min"], score[c]["max"]) for c in trio}
    hi = {c: max(score[c]["min"], score[c]["max"]) for c in trio}
    ranked = sorted(trio, key=lambda c: -score[c]["mean"])
    best = ("symmetric", "noisy-symmetric")
    separated = all(lo[c] > hi["diagonal"] for c in best)
    reversed_ = all(hi[c] < lo["diagonal"] for c in best)
    claim("ranking: symmetric and noisy symmetric best, diagonal worst (Figure 7)",
          ("by speedup: " if by_speedup else "by final loss (speedups unbounded): ") + " > ".join(
              f"{c} {_fmt(v[c]['speedup'] if by_speedup else v[c]['final_loss'], 'x' if by_speedup else '', 2 if by_speedup else 4)}"
              for c in ranked),
          "reproduced" if separated else "contradicted" if reversed_ else "inconclusive",
          "seed ranges of symmetric and noisy symmetric entirely better than diagonal's (reproduced) or "
          "entirely worse (contradicted); overlapping ranges are inconclusive")
    d0, d1 = "symmetric-dropout0-s1", "symmetric-s1"
    kept = min(p[g] for p in sym[d0] for g in scaling_groups(p))
    decayed = {g: sym[d1][-1][g] for g in scaling_groups(sym[d1][-1])}
    claim("symmetry decays in training (dropout breaks it; Figure 5)",
          f"dropout 0.1: final row cosine {', '.join(f'{g} {c:.4f}' for g, c in decayed.items())}; "
          f"dropout 0: lowest {kept:.12f}",
          "reproduced" if kept > 1 - 1e-9 and all(c < 0.999 for c in decayed.values()) else "contradicted",
          "dropout 0 stays at cosine 1 within 1e-9, dropout 0.1 falls below 0.999 in every group")
    spectra = report["spectrum"]
    ranks = spectra["rank_above_1e-3"]
    full = min(len(spectra["symmetric clone at init"]), len(spectra["random-init trained"]))
    eff = {k: paper.effective_rank(spectra[k]) for k in ("symmetric clone trained", "random-init trained")}
    low = {k: paper.lower_half_energy(spectra[k]) for k in ("symmetric clone trained", "random-init trained")}
    uses = eff["symmetric clone trained"] >= 0.9 * eff["random-init trained"] and \
        low["symmetric clone trained"] >= 0.5 * low["random-init trained"]
    claim("a symmetric clone starts at half rank and reaches full rank in training (Figure 6)",
          f"linear_fc2: singular values above 1e-3 of the largest: source {ranks['source']}, clone at init "
          f"{ranks['symmetric clone at init']}, trained {ranks['symmetric clone trained']} of {full}; effective "
          f"rank (entropy) trained clone {eff['symmetric clone trained']:.1f} against random init's "
          f"{eff['random-init trained']:.1f}; energy in the lower half {100 * low['symmetric clone trained']:.1f}% "
          f"against {100 * low['random-init trained']:.1f}%",
          "reproduced" if ranks["symmetric clone at init"] == ranks["source"] and uses else "contradicted",
          "clone at init has the source's rank (above 1e-3), and the trained clone uses its width as a model "
          "trained from scratch does: effective rank at least 0.9 of the random-init model's and at least half "
          "of its energy in the lower half of the spectrum (a count above 1e-3 alone passes a half that "
          "stays weak)")
    bump_half, bump_src = r["symmetric-s1"]["early_bump"], r["symmetric-source-lr-s1"]["early_bump"]
    recovered = r["symmetric-source-lr-s1"]["final_loss"] < r["symmetric-source-lr-s1"]["initial_loss"]
    claim("early forgetting, then recovery; larger with a larger learning rate",
          f"rise of validation loss above its start in the first quarter: {bump_half:.4f} at half the source's "
          f"lr, {bump_src:.4f} at the source's lr (1 seed)",
          "reproduced" if bump_src > bump_half >= 0 and bump_src > 0 and recovered else "contradicted",
          "a rise at the source's lr, larger than at half of it, and a final loss below the start")
    base = [r[n]["final_loss"] for n in ("symmetric-from-third-s1", "symmetric-from-two-thirds-s1", "symmetric-s1")]
    claim("a better-trained base gives a better clone (Figure 8)",
          "final loss from the source at 1/3, 2/3, all of its training: " + ", ".join(f"{b:.4f}" for b in base)
          + f" (1 seed; seed spread of symmetric's final loss {v['symmetric']['final_loss']['max'] - v['symmetric']['final_loss']['min']:.4f})",
          "reproduced" if base[0] > base[1] > base[2] else "contradicted",
          "final loss falls as the base trains longer")
    two, four = r["symmetric-s1"]["final_loss"], r["symmetric-4x-s1"]["final_loss"]
    claim("a bigger base helps (Figure 9: 4x from a smaller source against 2x)",
          f"final loss {two:.4f} grown 2x from the source, {four:.4f} grown 4x from a half-width source trained on "
          f"the same tokens (1 seed; seed spread of symmetric's final loss "
          f"{v['symmetric']['final_loss']['max'] - v['symmetric']['final_loss']['min']:.4f})",
          "reproduced" if two < four else "contradicted", "the 2x clone of the bigger source ends lower")
    return out


def restate(report: dict) -> dict:
    """Every speedup of a stored report recomputed from its stored validation curves with the crossings
    read from the raw curves (SMOOTHING), and the claims with them (their figures otherwise stored)."""
    from megaclone.study import paper

    curves = stored_curves(report)
    for name, r in report["runs"].items():
        r.update(paper.speedup(curves[f"{BASELINE}-s{r['seed']}"], curves[name], FINAL_EVALS, SMOOTHING))
    for g in report["variants"].values():
        g["speedup"] = paper.spread([report["runs"][n]["speedup"] for n in g["runs"]],
                                    sum(report["runs"][n]["from_start"] for n in g["runs"]))
    report["settings"]["smoothing"] = SMOOTHING
    report["speedup_methods"] = {n: paper.speedup_by_method(curves[f"{BASELINE}-s{r['seed']}"], curves[n], FINAL_EVALS)
                                 for n, r in report["runs"].items() if r["variant"] != BASELINE and not r["from_start"]}
    report["claims"] = claims(report, {})
    return report


def scaling_groups(point: dict) -> list[str]:
    """The Figure 5 groups a symmetry point holds."""
    from megaclone.study.paper import SYMMETRY_GROUPS

    return [g for g in SYMMETRY_GROUPS if g in point]


def markdown(report: dict) -> str:
    s, v = report["settings"], report["variants"]
    lines = [
        f"Source: {s['source_parameters']:,} parameters, {s['source_tokens']:,} tokens "
        f"({s['source_tokens_per_parameter']:.1f} per parameter). Each target ({s['wide_parameters']:,} parameters): "
        f"{s['target_tokens']:,} tokens from a disjoint document stream, peak lr {s['target_schedule']['lr']} "
        f"(source {s['source_schedule']['lr']}), dropout {s['hidden_dropout']}. Target loss = the same seed's "
        f"random-init final loss (mean of its last {s['final_evals']} evaluations); crossings on a {s['smoothing']}-"
        f"evaluation trailing mean.",
        "",
        "| run | speedup | final valid loss |",
        "|---|---:|---:|",
    ]
    for name, g in v.items():
        lines.append(f"| {name} | {_fmt(g['speedup'])} | {_fmt(g['final_loss'], '', 4)} |")
    lines += ["", "| paper's claim | measured | status |", "|---|---|---|"]
    for c in report["claims"]:
        lines.append(f"| {c['claim']} | {c['measured']} | {c['status']} |")
    return "\n".join(lines) + "\n"


def run_case(description: str, out: str, plan_runs, plan_stages, analyse, markdown) -> dict:
    """A reproduction case's command line: parse the flags, run its stages (resuming), analyse, print."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / out, help="working directory")
    p.add_argument("--results", type=Path, default=ROOT / "examples" / "results",
                   help="where the JSON, table and figures go")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few iterations (for the tests)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of every stage")
    p.add_argument("--jobs", type=int, default=2, help="stages run at once (default: this machine's 2 cores)")
    args = p.parse_args()
    size = SIZES["quick" if args.quick else "default"]
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    stages = Stages(args.out, args.tp, args.jobs)
    runs = plan_runs(size)
    stages.run(plan_stages(args, size, runs))
    report = analyse(args, size, runs, stages)
    print(markdown(report))
    return report


def main() -> int:
    if sys.argv[1:] == ["--restate"]:  # recompute the stored report's speedups and claims from its curves
        res = ROOT / "examples" / "results"
        report = restate(json.loads((res / "scaling_smart.json").read_text()))
        (res / "scaling_smart.json").write_text(json.dumps(report, indent=1))
        (res / "scaling_smart.md").write_text(markdown(report))
        print(markdown(report))
        return 0
    report = run_case(__doc__, "scaling-smart", plan_runs, plan_stages, analyse, markdown)
    print(f"wrote scaling_smart.json and figures {', '.join(report['figures'].values())}")
    return 0


if __name__ == "__main__":
    from megaclone import cli

    cli.run(main)
