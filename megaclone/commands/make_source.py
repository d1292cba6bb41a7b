"""Build a small trained GPT source checkpoint in Megatron-LM's layout (the bundled default).

    torchrun --nproc_per_node 2 tools/make_source.py --save runs/small --tp 2

A real megatron-core GPTModel: initialized, norms and biases perturbed, trained a few AdamW steps on
random tokens, saved with dist_checkpointing exactly as Megatron-LM training saves (torch_dist).
"""

import argparse


from megaclone import cli  # torch-free: flags parse before any heavy import
from megaclone.shape.presets import PRESETS  # torch-free too


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save", required=True, help="checkpoint root to write (Megatron-LM torch_dist layout)")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="source shape (megaclone/shape/presets.py; default: default)")
    p.add_argument("--tp", type=int, help="tensor-parallel size of the source (default: world size)")
    p.add_argument("--train-steps", type=int, default=20, help="AdamW steps on random tokens (default 20)")
    p.add_argument("--vocab-size", type=int, default=300, help="true vocabulary size (default 300)")
    p.add_argument("--num-layers", type=int, help="override the preset's number of layers")
    p.add_argument("--seed", type=int, default=1234, help="initialization and data seed (default 1234)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier checkpoint at --save")
    cli.add_device_flags(p)
    return cli.parse(p, argv)


def main() -> int:
    args = parse_args()
    from pathlib import Path

    import torch

    from megaclone.formats import destination
    from megaclone import sample
    from megaclone.shape import presets
    from megaclone.runtime import init_distributed

    rt = init_distributed(args.device, args.timeout_minutes)
    tp = args.tp or rt.world_size
    save = Path(args.save)
    overrides = {"num_layers": args.num_layers} if args.num_layers else {}
    spec = presets.preset_spec(args.preset, tp, vocab_size=args.vocab_size, **overrides)
    with destination.Claim.take(save, destination.Kind.MEGATRON, overwrite=args.overwrite) as claim:
        claim.clear()
        sample.make_source(save, spec, seed=args.seed, train_steps=args.train_steps, dtype=getattr(torch, args.dtype))
    cli.rank0_print(f"saved a {args.preset} source ({spec.num_layers} layers, hidden {spec.hidden_size}, "
                    f"{spec.num_attention_heads} heads / {spec.num_query_groups} groups, ffn {spec.ffn_hidden_size}, "
                    f"vocab {spec.vocab_size}) at TP {tp} to {save}")
    return 0

