#!/usr/bin/env python
"""How long an exact symmetric clone stays symmetric, with and without dropout.

    python examples/symmetry_breaking.py --out runs/symmetry      # a few minutes on 2 cores

Trains a small Llama-like source (the reproduction's quick shape) on the bundled corpus, grows it 2x
with the exact symmetric variant, and trains the clone twice with identical data and settings but for
dropout (0, then Megatron-LM's 0.1 for hidden and attention), saving every --every iterations. For each
checkpoint it prints the paper's Figure 5 measure: the mean over rows of the cosine similarity between
a row of clone block (0, 0) and the same row of block (1, 1), per kind of matrix. 1.0 means the two
copies still compute the same features. Every stage is the user command (tools/, examples/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce_scaling_smart as repro  # noqa: E402

KINDS = {"qkv": "linear_qkv.weight", "proj": "linear_proj.weight", "fc1": "linear_fc1.weight",
         "fc2": "linear_fc2.weight", "output": "output_layer.weight"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/symmetry"), help="working directory")
    p.add_argument("--iters", type=int, default=100, help="training iterations of each clone (default 100)")
    p.add_argument("--source-iters", type=int, default=100, help="training iterations of the source (default 100)")
    p.add_argument("--every", type=int, default=10, help="checkpoint interval (default 10)")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def symmetry(root: Path, iteration: int | None, rules) -> dict[str, float]:
    """Mean per-row cosine between the clone's copies, per kind of matrix, at one checkpoint."""
    import numpy as np

    from megaclone.formats import iterations

    from megaclone.formats import torch_dist
    from megaclone.study import paper

    path = torch_dist.find_checkpoint(root) if iteration is None else root / iterations.iteration_dirname(iteration)
    tensors = torch_dist.load_plain_tensors(path)
    out = {}
    for kind, suffix in KINDS.items():
        values = []
        for rule in rules:
            if rule.key.endswith(suffix):
                stored = tensors[rule.key]
                for w in (stored if rule.per_layer else [stored]):
                    values += paper.row_cosines(rule, w)
        out[kind] = float(np.mean(values))
    return out


def main() -> int:
    args = parse_args()
    from megaclone.pipeline.rules import param_rules
    from megaclone.formats.torch_dist import open_torch_dist_source

    size = dict(repro.SIZES["quick"], snapshots=max(1, args.iters // args.every))
    out = args.out.resolve()
    stages = repro.Stages(out, tp=2)
    data = out / "data" / "stdlib"
    stages.run("data", ["tools/preprocess_data.py", "--output-prefix", str(data), "--seed", str(args.seed)],
               done=Path(f"{data}.idx").exists(), torchrun=False)
    src_json = out / "source.json"
    stages.run("train-source", ["examples/pretrain_gpt.py", *repro.shape_flags(size),
                                *repro.train_flags(size, data, args.seed, args.source_iters, out / "source",
                                                   src_json, 2)],
               done=repro.finished(src_json, args.source_iters))
    wide = out / "symmetric"
    stages.run("expand", ["tools/expand_sharded.py", "--load", str(out / "source"), "--save", str(wide), "--tp", "2",
                          "--factor", "2", "--no-progress", "--overwrite"],
               done=(wide / "latest_checkpointed_iteration.txt").exists())
    report = {}
    for dropout in ("0.0", "0.1"):
        name = f"dropout-{dropout}"
        log_json = out / f"{name}.json"
        # the shape is given explicitly (no --use-checkpoint-args), so the dropouts are these, not the source's
        train = repro.train_flags(size, data, args.seed, args.iters, out / name, log_json, 2)
        for flag in ("--hidden-dropout", "--attention-dropout"):
            train[train.index(flag) + 1] = dropout
        stages.run(f"train-{name}", ["examples/pretrain_gpt.py", "--load", str(wide), "--finetune",
                                     *repro.shape_flags(size, factor=2), *train],
                   done=repro.finished(log_json, args.iters))
    from megaclone.runtime import init_distributed

    init_distributed("cpu")  # a world of one reads the checkpoints through megatron-core
    src_spec = open_torch_dist_source(out / "source").spec
    rules = param_rules(src_spec, open_torch_dist_source(wide).spec)
    for dropout in ("0.0", "0.1"):
        name = f"dropout-{dropout}"
        points = [(0, symmetry(wide, None, rules))]
        points += [(it, symmetry(out / name, it, rules)) for it in range(args.every, args.iters + 1, args.every)]
        report[name] = points
    print("mean per-row cosine between the clone's copies (1.0: identical)")
    print("| dropout | iteration | " + " | ".join(KINDS) + " |")
    print("|---|---:|" + "---:|" * len(KINDS))
    for name, points in report.items():
        for it, values in points:
            print(f"| {name[8:]} | {it} | " + " | ".join(f"{values[k]:.6f}" for k in KINDS) + " |")
    (out / "symmetry.json").write_text(json.dumps({"commands": stages.commands, "points": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
