#!/usr/bin/env python
"""megaclone's --save-hf against the authors' cloning code (apple/ml-hypercloning), tensor by tensor.

    python tools/compare_authors.py --reference-repo /path/to/ml-hypercloning \\
        --reference-python /path/to/venv-with-transformers-4.47/bin/python --out runs/compare-authors

For each family: a small model built with transformers' own class (hidden 64, 2 layers, 4 heads in 2
key/value groups, every weight perturbed, fp32) is grown 2x (hidden, heads, FFN; symmetric, no noise)
by the authors' ``clone_<family>`` in their own interpreter (their code runs on transformers older
than 4.48; read from the repository given, never copied into megaclone) and by megaclone's
``--save-hf`` here. Prints, per family, how many of the authors' tensors megaclone's output holds bit
for bit, each one that differs with its largest difference, and the relative logit difference of
megaclone's output against the small model in transformers. Writes JSON.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# family: (transformers config class, its arguments, the authors' module and function)
SMALL = dict(vocab_size=256, num_hidden_layers=2, max_position_embeddings=128, hidden_size=64, intermediate_size=128,
             num_attention_heads=4)
FAMILIES = {
    "pythia": ("GPTNeoXConfig", dict(SMALL, use_parallel_residual=True, rotary_pct=0.25), "pythia_cloning", "clone_pythia"),
    "gemma": ("GemmaConfig", dict(SMALL, num_key_value_heads=2, head_dim=16), "gemma_cloning", "clone_gemma"),
    "gemma2": ("Gemma2Config", dict(SMALL, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                    sliding_window=8), "gemma_cloning", "clone_gemma2"),
    "llama": ("LlamaConfig", dict(SMALL, num_key_value_heads=2), "llama_cloning", "clone_llama"),
}

REFERENCE = """
import importlib, sys, types, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
repo, module, function, src, dst = sys.argv[1:6]
package = types.ModuleType("hypercloning")  # their __init__ imports every family (OLMo's needs ai2-olmo)
package.__path__ = [repo + "/hypercloning"]
sys.modules["hypercloning"] = package
clone = getattr(importlib.import_module("hypercloning." + module), function)
model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
wide = clone(model, embedding_dim_multiplier=2, up_project_multiplier=2)
save_file({k: v.detach().float().contiguous().clone() for k, v in wide.state_dict().items()}, dst)
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-repo", type=Path, required=True, help="a checkout of apple/ml-hypercloning")
    p.add_argument("--reference-python", required=True, help="an interpreter with transformers < 4.48 for their code")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "compare-authors")
    p.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES))
    return p.parse_args(argv)


def small_model(root: Path, family: str, seed: int) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    config_class, kwargs, _, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**kwargs))
    with torch.no_grad():
        for p in model.parameters():  # norms and biases too
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(root))


def compare(ours: dict, theirs: dict) -> tuple[list[str], dict[str, float]]:
    """Names held bit for bit, and the largest difference of each name that differs (or is missing)."""
    same, differ = [], {}
    for name, mine in sorted(ours.items()):
        other = theirs.get(name)
        if other is not None and other.shape == mine.shape and bool((other == mine).all()):
            same.append(name)
        else:
            differ[name] = float("nan") if other is None or other.shape != mine.shape else \
                float((other - mine).abs().max())
    return same, differ


def main() -> int:
    args = parse_args()
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megaclone.pipeline.to_hf import expand_to_hf
    from megaclone.runtime import init_distributed
    from megaclone.shape.request import Factors

    init_distributed("cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for seed, family in enumerate(args.families):
        src, ours, theirs = args.out / f"{family}-small", args.out / f"{family}-megaclone", args.out / f"{family}-authors.safetensors"
        small_model(src, family, seed)
        _, _, module, function = FAMILIES[family]
        subprocess.run([args.reference_python, "-c", REFERENCE, str(args.reference_repo), module, function, str(src),
                        str(theirs)], check=True)
        expand_to_hf(src, ours, Factors.uniform(2), overwrite=True)
        mine = {}
        for f in sorted(ours.glob("*.safetensors")):
            mine.update(load_file(str(f)))
        same, differ = compare(mine, load_file(str(theirs)))
        tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = AutoModelForCausalLM.from_pretrained(str(src)).eval()(tokens).logits
            found = AutoModelForCausalLM.from_pretrained(str(ours)).eval()(tokens).logits
        rel = float((found - expected).abs().max() / expected.abs().max())
        results[family] = {"tensors": len(mine), "bit_identical": len(same), "differ": differ, "logits_rel": rel}
        print(f"{family}: {len(same)}/{len(mine)} tensors bit-identical to the authors' clone; "
              f"megaclone's logits vs the small model: {rel:.2e}")
        for name, diff in differ.items():
            print(f"    differs: {name} (max |difference| {diff:.3g})")
    (args.out / "compare_authors.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
