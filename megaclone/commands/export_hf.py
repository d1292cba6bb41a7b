"""Export a Megatron GPT checkpoint (e.g. a grown one) to a Hugging Face directory transformers loads.

    torchrun --nproc_per_node 4 tools/export_hf.py --load wide_ckpt --save wide_hf
    python tools/export_hf.py --load wide_ckpt --save wide_hf --model-type llama

Any number of processes: each reads its share of the tensors one at a time and writes one safetensors
shard; rank 0 writes the index and, last, config.json. The family comes from the checkpoint (recorded
on Hugging Face import) or from the model's shape; --model-type overrides.
"""

import argparse


from megaclone import cli  # torch-free: flags parse before any heavy import
from megaclone.formats import hf


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Megatron checkpoint root (torch_dist or legacy torch)")
    p.add_argument("--save", required=True, help="Hugging Face output directory")
    p.add_argument("--model-type",
                   help=f"Hugging Face model_type: {', '.join(hf.model_types())} (default: recorded at import, "
                        "else inferred from the shape)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save directory")
    cli.add_device_flags(p)
    cli.add_trust_flag(p)
    args = cli.parse(p, argv)
    cli.require_paths(("--load", args.load))
    from megaclone.formats import destination

    destination.guard(args.save, destination.Kind.HF, sources=[args.load], overwrite=args.overwrite)
    return args


def main() -> int:
    args = parse_args()
    from megaclone.export import export_hf
    from megaclone.runtime import init_distributed

    init_distributed(args.device, args.timeout_minutes)
    info = export_hf(args.load, args.save, args.model_type, args.overwrite)
    cli.rank0_print(f"wrote {info['model_type']} ({info['tensors']} tensors in {info['files']} files) to {args.save}")
    return 0

