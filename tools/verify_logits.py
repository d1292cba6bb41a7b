#!/usr/bin/env python
"""Prove per rank that an expanded checkpoint computes the source model's logits.

    torchrun --nproc_per_node 8 tools/verify_logits.py --src small_ckpt --dst wide_ckpt
    torchrun --nproc_per_node 4 tools/verify_logits.py --src-hf hf_model_dir --dst wide_ckpt

One process per destination TP rank; each compares its own vocab slice. Exit status 1 if any rank
exceeds the tolerance (relative: max |D - S| / max |S| over the rank's slice of the real vocab). A
clone that is not function-preserving by design (--depth-init stack) is not compared: NOT COMPARED
and the reason, exit status 0.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", help="source (small) checkpoint root")
    src.add_argument("--src-hf", help="source Hugging Face directory, run by transformers itself")
    p.add_argument("--dst", required=True, help="destination (expanded) checkpoint root")
    p.add_argument("--text", help="UTF-8 text file to feed as byte tokens (default: random tokens)")
    p.add_argument("--batch", type=int, default=2, help="sequences of random or --text tokens (default 2)")
    p.add_argument("--seq-length", type=int, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    p.add_argument("--tol", type=float, help="relative tolerance (default from dtype: 1e-5 for fp32)")
    cli.add_device_flags(p)
    cli.add_trust_flag(p)
    args = cli.parse(p, argv)
    cli.require_paths(("--src", args.src), ("--src-hf", args.src_hf), ("--dst", args.dst), ("--text", args.text))
    return args


def main() -> int:
    args = parse_args()
    from megaclone.errors import NotComparable
    from megaclone.runtime import init_distributed
    from megaclone.verify import text_tokens, verify

    rt = init_distributed(args.device, args.timeout_minutes)
    tokens = text_tokens(args.text, args.batch, args.seq_length) if args.text else None
    try:
        results = verify(args.src, args.dst, tokens=tokens, tol=args.tol, device=rt.device, seed=args.seed,
                         batch=args.batch, seq_length=args.seq_length, src_hf=args.src_hf)
    except NotComparable as exc:  # by design, not a failure: say so and compare nothing
        cli.rank0_print(f"NOT COMPARED: {exc.problem}")
        return 0
    for r in results:
        cli.rank0_print(r.line())
    ok = all(r.ok for r in results)
    worst = max(results, key=lambda r: r.max_rel)
    cli.rank0_print(f"{'PASS' if ok else 'FAIL'}: {len(results)} ranks, worst max rel diff {worst.max_rel:.3e} "
                    f"(rank {worst.rank}), tolerance {worst.tol:.0e}")
    return 0 if ok else 1


if __name__ == "__main__":
    from megaclone import cli

    cli.run(main)
