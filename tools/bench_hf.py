#!/usr/bin/env python
"""Hugging Face to Hugging Face growth, side by side with the authors' code (apple/ml-hypercloning).

    python tools/bench_hf.py --out runs/bench-hf --reference-repo /path/to/ml-hypercloning \\
        --reference-python /path/to/venv-with-transformers-4.47/bin/python --repeat 3

Builds a ~134M-parameter Llama (hidden 768, 12 layers, 12 heads, FFN 2048, vocab 32000, untied,
random weights, fp32, saved by transformers; ``--size llama-1b --dtype bfloat16``: Llama-3.2-1B's
shape, 1.24B -> 4.4B) and grows it 2x (hidden, heads, FFN: ~438M) into an HF
directory, each way in its own process(es), interleaved:

- reference: the authors' ``clone_llama`` on the model loaded by ``from_pretrained``, then
  ``save_pretrained`` (one process; their code runs on transformers older than 4.48, hence its own
  interpreter). Read from the repository given, never copied into megaclone;
- megaclone --save-hf as one plain ``python`` process, and under torchrun at 1 and 2 processes (one
  command, no Megatron checkpoint);
- megaclone import + export at 1 process (``--save`` then ``tools/export_hf.py``), the two-step path.

Wall time includes interpreter start-up and imports; peak memory is the largest resident set of the
whole process tree (sampled every 20 ms with psutil, summed over processes). Each output is checked
against the source's logits in transformers. Prints a markdown table and writes JSON.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SOURCES = {
    "134m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 intermediate_size=2048, vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=False),
    # Llama-3.2-1B's shape (random weights): 1.24B parameters, grown 2x to 4.4B
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, max_position_embeddings=2048,
                     tie_word_embeddings=True),
}

REFERENCE = """
import sys, types, torch
repo, src, dst, dtype = sys.argv[1:5]
package = types.ModuleType("hypercloning")  # their __init__ imports every family (OLMo's needs ai2-olmo)
package.__path__ = [repo + "/hypercloning"]
sys.modules["hypercloning"] = package
from hypercloning.llama_cloning import clone_llama
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=getattr(torch, dtype))
clone_llama(model, embedding_dim_multiplier=2, up_project_multiplier=2).save_pretrained(dst)
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-hf")
    p.add_argument("--reference-repo", type=Path, help="a checkout of apple/ml-hypercloning (omit: megaclone only)")
    p.add_argument("--reference-python", default=sys.executable,
                   help="an interpreter with transformers < 4.48 for the reference (default: this one)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--size", choices=sorted(SOURCES), default="134m", help="the source's shape")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the source's dtype")
    p.add_argument("--modes", nargs="+", help="run only the modes whose names contain one of these words")
    return p.parse_args(argv)


def run_measured(cmd: list, env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak summed RSS of the process tree) of one command; exits on failure."""
    from megaclone.memory import run_measured as run

    done = run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, interval_s=0.02)
    if done.out_of_memory:
        print(f"stopped before the machine ran out of memory (peak {done.peak_tree_rss / 2**30:.1f} GiB): "
              f"{' '.join(map(str, cmd))}", flush=True)
        return float("nan"), done.peak_tree_rss
    if done.returncode:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{done.output[-4000:]}")
    return done.wall_s, done.peak_tree_rss


def torchrun(n: int, *args) -> list:
    from megaclone.launch import torchrun_command

    return torchrun_command(n, *args)


def modes(args, src: Path, out: Path) -> dict[str, list[list]]:
    """Each mode: the commands one run of it takes, writing its HF directory to out/<mode>."""
    grow = ["--load-hf", src, "--factor", 2, "--no-progress", "--overwrite"]
    found = {
        "megaclone --save-hf, python (a world of one, no launcher)": [
            [sys.executable, "tools/expand_sharded.py", *grow, "--save-hf", out / "hf2hf-python"]],
        "megaclone --save-hf, 1 process": [torchrun(1, "tools/expand_sharded.py", *grow, "--save-hf", out / "hf2hf-1")],
        "megaclone --save-hf, 2 processes": [torchrun(2, "tools/expand_sharded.py", *grow, "--save-hf", out / "hf2hf-2")],
        "megaclone import + export, 1 process": [
            torchrun(1, "tools/expand_sharded.py", *grow, "--save", out / "megatron", "--tp", 1),
            torchrun(1, "tools/export_hf.py", "--load", out / "megatron", "--save", out / "two-step", "--overwrite")],
    }
    if args.reference_repo:
        found["reference (authors' clone_llama)"] = [
            [args.reference_python, "-c", REFERENCE, args.reference_repo, src, out / "reference", args.dtype]]
    if args.modes:
        found = {name: cmds for name, cmds in found.items() if any(word in name for word in args.modes)}
    return found


OUTPUT = {"megaclone --save-hf, python (a world of one, no launcher)": "hf2hf-python",
          "megaclone --save-hf, 1 process": "hf2hf-1", "megaclone --save-hf, 2 processes": "hf2hf-2",
          "megaclone import + export, 1 process": "two-step", "reference (authors' clone_llama)": "reference"}


def logits_rel(src: Path, grown: Path, vocab_size: int) -> float:
    """max |grown - source| / max |source| of transformers' logits on fixed random tokens (nan: no output)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not (grown / "config.json").exists():
        return float("nan")
    tokens = torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # in the stored dtype, one model at a time: a 4.4B model in fp32 and its source do not fit in 24 GiB
        a = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto").eval()(tokens).logits.float()
        b = AutoModelForCausalLM.from_pretrained(str(grown), dtype="auto").eval()(tokens).logits.float()
    return float((a - b).abs().max() / a.abs().max())


def main() -> int:
    args = parse_args()
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = args.out
    src = out / "src"
    if not (src / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SOURCES[args.size]))
        model.to(getattr(torch, args.dtype)).save_pretrained(str(src))
        del model
    runs: dict[str, list[tuple[float, int]]] = {}
    for _ in range(args.repeat):
        for name, commands in modes(args, src, out).items():
            measured = [run_measured(cmd) for cmd in commands]
            runs.setdefault(name, []).append((sum(w for w, _ in measured), max(m for _, m in measured)))
    rows = []
    for name, measured in runs.items():
        walls = [w for w, _ in measured]
        rows.append(dict(mode=name, wall_s=walls, median_wall_s=statistics.median(walls),
                         peak_gib=statistics.median(m for _, m in measured) / 2**30,
                         logits_rel=logits_rel(src, out / OUTPUT[name], SOURCES[args.size]["vocab_size"])))
    (out / "bench_hf.json").write_text(json.dumps(rows, indent=1))
    print("| mode | wall s (runs) | median wall s | peak RSS of the process tree, GiB | logits vs source |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        runs_s = ", ".join(f"{w:.1f}" for w in r["wall_s"])
        print(f"| {r['mode']} | {runs_s} | {r['median_wall_s']:.1f} | {r['peak_gib']:.2f} | {r['logits_rel']:.1e} |")
    shutil.rmtree(out / "megatron", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
