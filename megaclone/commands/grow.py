"""Grow a Megatron GPT checkpoint in width with HyperCloning (and in depth), one process per destination
TP rank.

    torchrun --nproc_per_node 8 tools/expand_sharded.py --load small_ckpt --save wide_ckpt --tp 8 --factor 2 --verify
    torchrun --nproc_per_node 4 tools/expand_sharded.py --load small_ckpt --save big_ckpt --tp 4 --factor 2 --depth-factor 2
    torchrun --nproc_per_node 2 tools/expand_sharded.py --load-hf hf_model_dir --save-hf wide_hf_dir --factor 2
    torchrun --nproc_per_node 4 tools/expand_sharded.py --load-hf hf_model_dir --save wide_ckpt --tp 4 --factor 2
    torchrun --nproc_per_node 4 tools/expand_sharded.py --load small_ckpt --save moe_ckpt --tp 2 --ep 2 --factor 2 \
        --num-experts 4 --moe-router-topk 2
    mpirun -n 8 python tools/expand_sharded.py --load small_ckpt --save wide_ckpt --tp 8 --factor 2
"""

import argparse


from megaclone import cli  # torch-free: flags parse before any heavy import
from megaclone.formats import Format, hf


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="source checkpoint root as Megatron-LM writes it (torch_dist, or legacy "
                                    "--ckpt-format torch files), or one of its iteration directories")
    src.add_argument("--load-hf", help="source Hugging Face directory (config.json + safetensors), model_type "
                                       f"{', '.join(hf.model_types())}; --factor 1 converts without growing")
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--save", help="destination checkpoint root (created; must be empty)")
    dst.add_argument("--save-hf", help="instead of --save, with --load-hf: write the grown model as a Hugging Face "
                                      "directory, each rank one safetensors shard (any number of ranks; no --tp)")
    p.add_argument("--tp", "--tensor-model-parallel-size", type=int,
                   help="destination tensor-parallel size = world size (required with --save)")
    p.add_argument("--factor", type=int, default=2, help="growth factor for hidden, heads and FFN (default 2)")
    p.add_argument("--hidden-factor", type=int, help="override the hidden-size factor")
    p.add_argument("--head-factor", type=int, help="override the attention heads factor")
    p.add_argument("--query-group-factor", type=int,
                   help="query groups (key/value heads) factor, a divisor of the head factor (default: the head "
                        "factor; 1 keeps the groups, e.g. a multi-query model's single KV head)")
    p.add_argument("--ffn-factor", type=int, help="override the FFN factor")
    p.add_argument("--depth-factor", type=int, default=1,
                   help="layers per source layer in the destination (default 1: no depth growth)")
    p.add_argument("--depth-init", choices=["identity", "stack"], default="identity",
                   help="identity (default): an added layer copies its source layer with its attention output "
                        "and second MLP projections zero, so the model computes the source's function; stack: "
                        "exact copies (G_stack), a different function that the verifier does not compare")
    p.add_argument("--depth-placement", choices=["interleave", "top"], default="interleave",
                   help="interleave (default): each source layer followed by its copies; top: the whole source "
                        "stack repeated")
    moe = p.add_argument_group("mixture of experts (upcycling every MLP; Megatron-LM's flag names)")
    moe.add_argument("--num-experts", type=int, help="experts per layer (default: none, the MLPs stay dense)")
    moe.add_argument("--moe-router-topk", type=int, help="experts per token (default 2)")
    moe.add_argument("--moe-ffn-hidden-size", type=int,
                     help="an expert's FFN size: a divisor of the (grown) FFN, G = FFN / it slices per copy of the "
                          "dense MLP (granular experts; default: the whole FFN, G = 1)")
    moe.add_argument("--ep", "--expert-model-parallel-size", type=int, default=1,
                     help="expert-parallel size of the destination (upcycled with --num-experts, or an MoE source's experts): "
                          "ranks = --tp x --ep, each writes num-experts / ep experts")
    moe.add_argument("--moe-grouped-gemm", action="store_true",
                     help="record moe_grouped_gemm for Megatron-LM (the torch_dist keys are the same)")
    moe.add_argument("--moe-router-init", choices=["random", "zero"], default="random",
                     help="random (default): seeded rows, one per group of G experts; zero: every expert ties "
                          "(G = 1 only, or top-k = all experts)")
    moe.add_argument("--moe-router-pre-softmax", action="store_true",
                     help="softmax before top-k (function-preserving only when top-k is every expert; refused else)")
    moe.add_argument("--moe-router-score-function", default="softmax",
                     help="softmax (default); sigmoid is refused: it does not preserve the function")
    moe.add_argument("--moe-router-load-balancing-type", default="aux_loss",
                     help="aux_loss (default), seq_aux_loss, global_aux_loss or none; sinkhorn is refused")
    moe.add_argument("--moe-aux-loss-coeff", type=float, default=0.0,
                     help="recorded for Megatron-LM training (default 0.0, Megatron-LM's)")
    p.add_argument("--variant", default="symmetric",
                   choices=["symmetric", "noisy-symmetric", "diagonal", "noisy-diagonal"],
                   help="clone variant (README, Variants): symmetric (default; exact copies, needs dropout to "
                        "separate), noisy-symmetric, diagonal, noisy-diagonal")
    p.add_argument("--snr-db", type=float, default=10.0, help="signal-to-noise ratio of the noisy variants (dB)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (noise never depends on rank or layout)")
    p.add_argument("--vocab-size", type=int, help="true vocabulary size (default: args.vocab_size, else padded)")
    p.add_argument("--pp", "--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline size the destination's args declare for Megatron-LM (default 1; the "
                        "torch_dist bytes are the same for any pipeline size)")
    p.add_argument("--save-format", choices=[f.value for f in Format if f is not Format.HF], default="torch_dist",
                   help="torch_dist (default), or Megatron-LM's legacy torch format (mp_rank_TT/"
                        "model_optim_rng.pt, local-spec module names, pipeline size 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="destination dtype (default: the source's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier checkpoint at --save (only files a checkpoint consists of are removed)")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="copy NaN/Inf source values instead of refusing the source (default: refuse)")
    p.add_argument("--grow-optimizer", action="store_true",
                   help="grow a training checkpoint's Adam moments with the weights (scaled as each tensor's "
                        "gradient scales under the clone) and keep its step count; the clone continues the source's "
                        "run (iteration, samples, learning-rate schedule)")
    p.add_argument("--restart-schedule", action="store_true",
                   help="with --grow-optimizer: the clone starts at iteration 0 with no schedule state, so the "
                        "trainer resumes it (grown moments loaded) on a new schedule from its flags")
    p.add_argument("--verify", action="store_true",
                   help="then check the destination as tools/verify_logits.py does (logits per rank, stored "
                        "weights), in the same processes: one launch instead of two; exit status 1 if a check fails")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")
    cli.add_device_flags(p)
    cli.add_trust_flag(p)
    args = cli.parse(p, argv)
    if args.save and args.tp is None:
        p.error("--save needs --tp (the destination tensor-parallel size, = the number of processes)")
    if args.save_hf and not args.load_hf:
        p.error("--save-hf grows a Hugging Face model: give its directory with --load-hf")
    if args.save_hf and args.num_experts:
        p.error("--num-experts writes a mixture of experts, which megaclone keeps in Megatron: use --save")
    if args.save_hf and (args.tp is not None or args.pp != 1 or args.save_format != "torch_dist" or args.vocab_size):
        p.error("--tp, --pp, --save-format and --vocab-size describe a Megatron destination; leave them out with "
                "--save-hf (any number of processes)")
    if args.grow_optimizer and (args.save_hf or args.load_hf):
        p.error("--grow-optimizer grows a Megatron training checkpoint's Adam state into a Megatron checkpoint: "
                "use --load and --save")
    if args.restart_schedule and not args.grow_optimizer:
        p.error("--restart-schedule restarts a grown optimizer's run: pass --grow-optimizer too (a clone without "
                "it starts at iteration 0 anyway, with --finetune)")
    if args.moe_router_topk is not None and args.num_experts is None:
        p.error("--moe-router-topk chooses among experts, but no --num-experts was given: pass --num-experts E, "
                "or leave out --moe-router-topk")
    if args.moe_router_topk is None:
        args.moe_router_topk = 2
    refuse_early(args)
    return args


def refuse_early(args: argparse.Namespace) -> None:
    """What flags and paths alone refuse, before torch is imported (the library checks all of it again,
    with the rest, once the source is open)."""
    import math

    from megaclone.formats import destination
    from megaclone.errors import MegacloneError

    src_flag, src = ("--load", args.load) if args.load else ("--load-hf", args.load_hf)
    cli.require_paths((src_flag, src))
    for flag in ("factor", "hidden_factor", "head_factor", "query_group_factor", "ffn_factor", "depth_factor", "tp"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise MegacloneError(f"--{flag.replace('_', '-')} {value}: must be a positive integer",
                                 f"pass --{flag.replace('_', '-')} 1 or more")
    if not math.isfinite(args.snr_db):
        raise MegacloneError(f"--snr-db {args.snr_db} is not a finite number", "pass a level in dB, e.g. --snr-db 10")
    dst_flag, dst = ("--save", args.save) if args.save else ("--save-hf", args.save_hf)
    kind = destination.Kind.MEGATRON if args.save else destination.Kind.HF
    destination.guard(dst, kind, sources=[src], overwrite=args.overwrite, flag=dst_flag)


def main() -> int:
    args = parse_args()
    import torch
    import torch.distributed as dist

    from megaclone.pipeline.clone import CloneConfig, Variant
    from megaclone.pipeline.expand import expand
    from megaclone.pipeline.to_hf import expand_to_hf
    from megaclone.progress import ExpandProgress, summary_table
    from megaclone.runtime import init_distributed
    from megaclone.shape.request import Depth, Factors
    from megaclone.shape.spec import Experts

    rt = init_distributed(args.device, args.timeout_minutes)
    experts = None
    if args.num_experts is not None:
        experts = Experts(num=args.num_experts, topk=args.moe_router_topk, ffn_hidden_size=args.moe_ffn_hidden_size,
                          parallel=args.ep, grouped_gemm=args.moe_grouped_gemm, router_init=args.moe_router_init,
                          pre_softmax=args.moe_router_pre_softmax, score_function=args.moe_router_score_function,
                          load_balancing_type=args.moe_router_load_balancing_type,
                          aux_loss_coeff=args.moe_aux_loss_coeff)
    factors = Factors(args.hidden_factor or args.factor, args.head_factor or args.factor,
                      args.ffn_factor or args.factor, args.query_group_factor)
    cfg = CloneConfig(Variant(args.variant), args.snr_db, args.seed)
    depth = Depth(args.depth_factor, args.depth_init, args.depth_placement)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    progress = ExpandProgress(enabled=rt.is_main and not args.no_progress)
    if args.save_hf:
        reports = expand_to_hf(args.load_hf, args.save_hf, factors, cfg, depth, overwrite=args.overwrite, dtype=dtype,
                               on_slice=progress.update, allow_non_finite=args.allow_non_finite)
    else:
        reports = expand(
            args.load or args.load_hf, args.save, factors, args.tp, cfg,
            overwrite=args.overwrite, vocab_size=args.vocab_size, device=rt.device, on_slice=progress.update,
            load_format=Format.HF if args.load_hf else None, dtype=dtype, pp=args.pp,
            save_format=args.save_format, allow_non_finite=args.allow_non_finite, depth=depth, experts=experts,
            grow_optimizer=args.grow_optimizer, expert_parallel=1 if experts else args.ep,
            restart_schedule=args.restart_schedule,
        )
    progress.close()
    if rt.is_main:
        print(summary_table(reports, args.save or args.save_hf, forked_writers=args.save is not None), flush=True)
    dist.barrier()
    if not args.verify:
        return 0
    from megaclone.check.report import prove

    ok = prove(args.load, args.save, cli.rank0_print, src_hf=args.load_hf, dst_hf=args.save_hf, device=rt.device)
    return 0 if ok else 1

