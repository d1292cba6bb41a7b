"""Prove per rank that an expanded checkpoint computes the source model's logits, and that its
stored weights are the clone the checkpoint records.

    torchrun --nproc_per_node 8 tools/verify_logits.py --src small_ckpt --dst wide_ckpt
    torchrun --nproc_per_node 4 tools/verify_logits.py --src-hf hf_model_dir --dst wide_ckpt
    python tools/verify_logits.py --src-hf hf_small --dst-hf hf_wide     # transformers on both sides

Logits: one process per destination TP rank; each compares its own vocab slice. A clone that is not
function-preserving by design (--depth-init stack) is not compared: NOT COMPARED and the reason.
Weights: every stored tensor-layer against the source by the recorded variant's definition (exact
variants bit for bit; noisy ones cancelling in pairs at the recorded SNR; experts their slices), the
tensor-layers dealt to the ranks; a checkpoint with no megaclone record is NOT CHECKED.
Exit status 1 if either check fails (logits: max |D - S| / max |S| over a rank's slice of the real
vocab above the tolerance; weights: any element off its definition).
"""

import argparse


from megaclone import cli  # torch-free: flags parse before any heavy import


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", help="source (small) checkpoint root")
    src.add_argument("--src-hf", help="source Hugging Face directory, run by transformers itself")
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--dst", help="destination (expanded) checkpoint root")
    dst.add_argument("--dst-hf", help="destination Hugging Face directory (with --src-hf: transformers runs both)")
    p.add_argument("--text", help="UTF-8 text file to feed as byte tokens (default: random tokens)")
    p.add_argument("--batch", type=int, default=2, help="sequences of random or --text tokens (default 2)")
    p.add_argument("--seq-length", type=int, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    p.add_argument("--tol", type=float, help="relative tolerance (default from dtype: 1e-5 for fp32)")
    p.add_argument("--no-weights", action="store_true", help="compare logits only, not the stored weights")
    p.add_argument("--snr-tol-db", type=float, default=0.05,
                   help="how far a noise block's measured SNR may be from the recorded one (default 0.05 dB)")
    cli.add_device_flags(p)
    cli.add_trust_flag(p)
    args = cli.parse(p, argv)
    cli.require_paths(("--src", args.src), ("--src-hf", args.src_hf), ("--dst", args.dst), ("--dst-hf", args.dst_hf),
                      ("--text", args.text))
    if args.dst_hf and not args.src_hf:
        p.error("--dst-hf is compared with a Hugging Face source: pass --src-hf (a Megatron destination takes --dst)")
    return args


def main() -> int:
    args = parse_args()
    from megaclone.check.logits import text_tokens
    from megaclone.check.report import prove
    from megaclone.runtime import init_distributed

    rt = init_distributed(args.device, args.timeout_minutes)
    tokens = text_tokens(args.text, args.batch, args.seq_length) if args.text else None
    ok = prove(args.src, args.dst, cli.rank0_print, src_hf=args.src_hf, dst_hf=args.dst_hf, tokens=tokens,
               tol=args.tol, device=rt.device, seed=args.seed, batch=args.batch, seq_length=args.seq_length,
               weights=not args.no_weights, snr_tol_db=args.snr_tol_db)
    return 0 if ok else 1

