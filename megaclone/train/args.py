"""Megatron-LM's command-line flags for GPT pretraining, the subset megaclone's trainer supports.

Flag names, defaults and derived fields follow Megatron-LM (``megatron/training/arguments.py``), so a
command written for one runs on the other, and the args a checkpoint carries are the ones
Megatron-LM's ``--use-checkpoint-args`` reads back.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Optional, Sequence

from megaclone.cli import add_trust_flag
from megaclone.errors import MegacloneError
from megaclone.shape.spec import pad_vocab

if TYPE_CHECKING:  # data imports numpy; --help must not
    from megaclone.train.data import DataSource

# What Megatron-LM's --use-checkpoint-args (load_args_from_checkpoint in megatron/training/
# checkpointing.py, read at NVIDIA/Megatron-LM 0032978f, checkpoint_version 3.0) takes from a
# checkpoint: the first group only where the command line left the flag unset, the second always.
CHECKPOINT_ARGS_IF_UNSET = (
    "num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads", "kv_channels",
    "max_position_embeddings", "tokenizer_type", "padded_vocab_size",
)
CHECKPOINT_ARGS_FORCED = (
    "num_query_groups", "group_query_attention", "position_embedding_type", "add_position_embedding",
    "use_rotary_position_embeddings", "rotary_percent", "rotary_interleaved", "add_bias_linear", "add_qkv_bias",
    "squared_relu",
    "swiglu", "untie_embeddings_and_output_weights", "apply_layernorm_1p", "normalization",
    "apply_query_key_layer_scaling", "rotary_base", "attention_dropout", "hidden_dropout",
    "tensor_model_parallel_size", "pipeline_model_parallel_size",
)
# Shape fields megaclone's trainer also takes (Megatron-LM leaves them to the command line), the
# mixture of experts' shape and router among them (the expert-parallel size as the TP size: forced).
CHECKPOINT_ARGS_EXTRA = ("norm_epsilon", "make_vocab_size_divisible_by", "vocab_size", "qk_layernorm", "relu",
                         "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_router_pre_softmax",
                         "moe_router_score_function", "expert_model_parallel_size", "moe_router_init")
# Training settings of a mixture of experts: from the checkpoint only where the command line left them unset.
CHECKPOINT_MOE_IF_UNSET = ("moe_router_load_balancing_type", "moe_aux_loss_coeff")
# The weights' precision (Megatron-LM's --bf16 / --fp16): from the checkpoint when the command line names neither.
CHECKPOINT_PRECISION = ("bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Megatron GPT pretraining on megatron-core (Megatron-LM flag names).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model (ignored for fields --use-checkpoint-args reads)")
    g.add_argument("--num-layers", type=int, help="transformer layers")
    g.add_argument("--hidden-size", type=int, help="model width")
    g.add_argument("--ffn-hidden-size", type=int, help="MLP width (default 4 x hidden)")
    g.add_argument("--num-attention-heads", type=int, help="attention heads")
    g.add_argument("--group-query-attention", action="store_true", help="use --num-query-groups key/value heads")
    g.add_argument("--num-query-groups", type=int, default=1, help="key/value heads with --group-query-attention")
    g.add_argument("--kv-channels", type=int, help="head dimension (default hidden / heads)")
    g.add_argument("--max-position-embeddings", type=int, help="default: --seq-length")
    g.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=["learned_absolute", "rope", "none"], help="positions: learned table (GPT-2) or RoPE")
    g.add_argument("--rotary-base", type=int, default=10000, help="RoPE base")
    g.add_argument("--rotary-percent", type=float, default=1.0, help="fraction of the head dimension RoPE rotates")
    g.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"], help="norm layers")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, help="epsilon of LayerNorm/RMSNorm")
    g.add_argument("--swiglu", action="store_true", help="gated SiLU MLP (Llama)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", help="separate output layer")
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear", help="no biases in linear layers")
    g.add_argument("--add-qkv-bias", action="store_true", help="biases on q/k/v only (Qwen2)")
    g.add_argument("--qk-layernorm", action="store_true", help="a norm over each query and key head (Qwen3)")
    g.add_argument("--relu", action="store_true",
                   help="plain ReLU MLP (OPT; megaclone's flag: Megatron-LM has none and would train GeLU)")
    g.add_argument("--init-method-std", type=float, default=0.02, help="std of the random initialization")
    g.add_argument("--hidden-dropout", type=float, default=0.1,
                   help="dropout after attention and MLP (Megatron-LM's default; it also breaks a symmetric "
                        "clone's symmetry)")
    g.add_argument("--attention-dropout", type=float, default=0.1,
                   help="dropout of attention probabilities, drawn per tensor-parallel rank as Megatron-LM does")
    g.add_argument("--tokenizer-type", default="NullTokenizer", choices=["NullTokenizer"],
                   help="NullTokenizer --vocab-size 256 reads tools/preprocess_data.py's byte data")
    g.add_argument("--vocab-size", type=int, default=256, help="NullTokenizer ids before its end-of-document id")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="vocabulary padding multiple (times TP)")

    g = p.add_argument_group("mixture of experts (megatron-core's MoE layer; taken from an upcycled --load "
                             "with --use-checkpoint-args)")
    g.add_argument("--num-experts", type=int, help="experts per MoE layer (default: dense MLPs)")
    g.add_argument("--moe-router-topk", type=int, default=2, help="experts per token")
    g.add_argument("--moe-ffn-hidden-size", type=int, help="an expert's FFN size (default --ffn-hidden-size)")
    g.add_argument("--moe-router-pre-softmax", action="store_true", help="softmax over all experts before top-k")
    g.add_argument("--moe-router-score-function", default="softmax", choices=["softmax"],
                   help="router scores (megaclone's MoE spec holds the function-preserving softmax only)")
    g.add_argument("--moe-router-load-balancing-type", choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "none"],
                   help="load-balancing loss (default aux_loss)")
    g.add_argument("--moe-aux-loss-coeff", type=float, help="weight of the load-balancing loss (default 0.0); "
                                                            "the loss is logged apart from the LM loss")
    g.add_argument("--moe-token-dispatcher-type", default="allgather", choices=["allgather"],
                   help="token dispatcher (all-to-all builds a CUDA stream: megaclone's trainer uses allgather)")
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="accepted for Megatron-LM commands; the experts run sequentially here (same checkpoint keys)")

    g = p.add_argument_group("parallelism and data")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size; the rest of the world is data parallel")
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="EP size: experts split over it (ranks = TP x EP x expert data parallel)")
    g.add_argument("--data-path", nargs="+", help="dataset prefixes (tools/preprocess_data.py), or weight prefix pairs")
    g.add_argument("--split", default="969,30,1", help="train,validation,test weights over each dataset's documents")
    for split in ("train", "valid", "test"):
        g.add_argument(f"--{split}-data-path", nargs="+",
                       help=f"the {split} split's own dataset prefixes, used whole (instead of --data-path)")
    g.add_argument("--seq-length", type=int, required=True, help="tokens per sample")
    g.add_argument("--micro-batch-size", type=int, required=True, help="samples per forward pass and rank")
    g.add_argument("--global-batch-size", type=int, help="samples per step (default micro x data parallel)")
    g.add_argument("--seed", type=int, default=1234, help="initialization, dropout and data-order seed")
    g.add_argument("--data-cache-path", help="where megatron-core caches dataset indices")

    g = p.add_argument_group("optimization")
    g.add_argument("--train-iters", type=int, required=True, help="optimizer steps in total")
    g.add_argument("--lr", type=float, required=True, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--lr-decay-style", default="linear", choices=["constant", "linear", "cosine", "inverse-square-root"], help="shape of the decay after warm-up")
    g.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warm-up from --lr-warmup-init")
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="learning rate of the first step with warm-up (Megatron-LM: 0)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases and norms)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip (0: off)")

    g = p.add_argument_group("mixed precision (Megatron-LM's)")
    half = g.add_mutually_exclusive_group()
    half.add_argument("--bf16", action="store_true",
                      help="bf16 model weights, fp32 main weights and Adam state; the checkpoint holds bf16 weights")
    half.add_argument("--fp16", action="store_true", help="fp16 model weights as --bf16, with loss scaling")
    g.add_argument("--loss-scale", type=float, help="fp16: a constant loss scale (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32, help="fp16: the dynamic scale's start")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="fp16: the dynamic scale's floor")
    g.add_argument("--loss-scale-window", type=int, default=1000, help="fp16: clean steps before the scale doubles")
    g.add_argument("--hysteresis", type=int, default=2, help="fp16: overflowing steps before the scale halves")

    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--load", help="checkpoint root to start from (a training run, or tools/expand_sharded.py --save)")
    g.add_argument("--save", help="checkpoint root to save into (Megatron-LM torch_dist layout)")
    g.add_argument("--save-interval", type=int, help="save every N iterations (default: at the end)")
    g.add_argument("--finetune", action="store_true",
                   help="load model weights only; start at iteration 0 with a fresh optimizer")
    g.add_argument("--use-checkpoint-args", action="store_true", help="take the model shape, TP size and dropouts from --load, as Megatron-LM does")
    g.add_argument("--ckpt-format", default="torch_dist", choices=["torch_dist"], help="checkpoint format")
    g.add_argument("--ckpt-step", type=int, help="load this iteration instead of the latest")
    g.add_argument("--no-load-optim", action="store_true", help="resume without the optimizer state")
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler", action="store_true",
                   dest="override_opt_param_scheduler",
                   help="on a resume, take the schedule's settings (lr, min lr, warm-up, decay) from these flags "
                        "instead of the checkpoint; its position (samples consumed) is still the checkpoint's")
    g.add_argument("--eval-interval", type=int, default=1000, help="validate every N iterations")
    g.add_argument("--eval-iters", type=int, default=100, help="validation batches (0: no validation)")
    g.add_argument("--log-interval", type=int, default=100, help="print a line every N iterations")

    g = p.add_argument_group("megaclone (not Megatron-LM flags)")
    g.add_argument("--log-json", help="write the loss history (train and validation) to this JSON file")
    g.add_argument("--valid-seed", type=int,
                   help="shuffle the validation samples with this seed (default: --seed, as Megatron-LM), so runs "
                        "of different seeds validate on the same samples")
    g.add_argument("--clone-lr-scaling", action="store_true",
                   help="with --load of a clone: each tensor's lr (and min lr) x a and weight decay / a, a being "
                        "the clone's value scale of the tensor (1/c_in for a matrix: the muP rule for Adam); "
                        "the optimizer may be fresh (--finetune)")
    g.add_argument("--clone-adam-scaling", action="store_true",
                   help="with --load of a clone grown with --grow-optimizer (and no --finetune): per-tensor AdamW "
                        "settings that make a symmetric clone's step its source's (lr and min lr x a, eps x s, "
                        "weight decay / a, the clip norm measured as the source's; a, s: each tensor's value and "
                        "gradient scale, from the clone's record)")
    g.add_argument("--no-source-check", action="store_true",
                   help="skip the source model's loss on the first batch (an expanded --load)")
    g.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when a GPU is visible")
    g.add_argument("--timeout-minutes", type=float, default=10.0, help="collective timeout: a dead or stopped peer becomes an error")
    g.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")
    add_trust_flag(g)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def apply_checkpoint_args(args: argparse.Namespace, saved: argparse.Namespace) -> None:
    """--use-checkpoint-args as Megatron-LM applies it (a value the checkpoint lacks or holds as None
    changes nothing); the tensor-parallel size, too, comes from the checkpoint."""
    for name in CHECKPOINT_ARGS_IF_UNSET + CHECKPOINT_MOE_IF_UNSET + CHECKPOINT_ARGS_FORCED + CHECKPOINT_ARGS_EXTRA:
        value = getattr(saved, name, None)
        forced = name not in CHECKPOINT_ARGS_IF_UNSET + CHECKPOINT_MOE_IF_UNSET
        if value is not None and (forced or getattr(args, name, None) is None):
            setattr(args, name, value)
    if not (args.bf16 or args.fp16):
        for name in CHECKPOINT_PRECISION:
            setattr(args, name, bool(getattr(saved, name, False)))


def data_source(args: argparse.Namespace) -> DataSource:
    """The data the flags name: --data-path cut by --split, or one path per split."""
    from megaclone.train.data import DataSource

    def paths(value):
        return tuple(value) if value else None

    per_split = (paths(args.train_data_path), paths(args.valid_data_path), paths(args.test_data_path))
    if not args.data_path and not any(per_split):
        raise MegacloneError("no --data-path", "write data with tools/preprocess_data.py and pass its prefix")
    return DataSource(paths(args.data_path), args.split, per_split if any(per_split) else None)


def refuse_early(args: argparse.Namespace, world_size: Optional[int]) -> None:
    """The refusals the flags alone decide, made before torch is imported (the launcher's world size,
    where its environment says it: megaclone.launch): what --use-checkpoint-args would fill in is left
    to :func:`finalize`."""
    if args.load and not os.path.exists(args.load) and (args.finetune or args.use_checkpoint_args):
        raise MegacloneError(f"--load {args.load} does not exist",
                             "pass the directory tools/expand_sharded.py --save or a training run wrote")
    if args.save:
        from megaclone.formats.destination import check_writable

        check_writable(args.save)
    if not args.use_checkpoint_args:
        if world_size is not None:
            _check_world(args, world_size)
        _check_shape_given(args)


def _check_world(args: argparse.Namespace, world_size: int) -> None:
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    if world_size % (tp * ep):
        raise MegacloneError(f"world size {world_size} is not a multiple of --tensor-model-parallel-size {tp}"
                             + (f" x --expert-model-parallel-size {ep}" if ep > 1 else ""),
                             f"launch a multiple of {tp * ep} processes")


def _check_shape_given(args: argparse.Namespace) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in ("num_layers", "hidden_size", "num_attention_heads")
               if getattr(args, n) is None]
    if missing:
        raise MegacloneError(f"no model shape: {', '.join(missing)} not given",
                             "pass the shape flags, or --load a checkpoint with --use-checkpoint-args")


def finalize(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Validate and derive Megatron-LM's computed fields (data-parallel size, batch, padded vocab)."""
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    _check_world(args, world_size)
    if ep > 1 and not args.num_experts:
        raise MegacloneError(f"--expert-model-parallel-size {ep} without --num-experts",
                             "pass --num-experts, or load an upcycled checkpoint with --use-checkpoint-args")
    if args.num_experts and tp > 1:
        raise MegacloneError(
            f"a mixture of experts at tensor-parallel size {tp}: megatron-core trains MoE layers with TP > 1 only "
            "under sequence parallelism (its MoE layer raises otherwise), and its local-spec norms, the ones that "
            "run without Transformer Engine or Apex, refuse sequence parallelism",
            "train at --tensor-model-parallel-size 1 (expand with --tp 1 --ep N), or in Megatron-LM with Transformer "
            "Engine and --sequence-parallel")
    if args.num_experts and args.add_bias_linear:
        raise MegacloneError(
            "a mixture of experts with linear biases: megatron-core's sequential experts (the layout without "
            "Transformer Engine or grouped GEMM) add each expert's bias in place to the output of a custom autograd "
            "function, which torch refuses on the first forward step", "pass --disable-bias-linear")
    if args.moe_router_load_balancing_type is None:
        args.moe_router_load_balancing_type = "aux_loss"
    if args.moe_aux_loss_coeff is None:
        args.moe_aux_loss_coeff = 0.0
    args.world_size = world_size
    args.data_parallel_size = world_size // tp
    args.pipeline_model_parallel_size = 1
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        raise MegacloneError(
            f"--global-batch-size {args.global_batch_size} is not a multiple of micro batch x data parallel "
            f"= {per_step}", "pick a global batch size that is a multiple of that")
    _check_shape_given(args)
    data_source(args)  # refuses no data, and both ways of naming it
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        raise MegacloneError(f"--seq-length {args.seq_length} exceeds max_position_embeddings "
                             f"{args.max_position_embeddings}", "use a shorter --seq-length")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.kv_channels is None:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    # NullTokenizer's vocabulary is --vocab-size ids plus its end-of-document id
    args.padded_vocab_size = pad_vocab(args.vocab_size + 1, args.make_vocab_size_divisible_by, tp)
    args.lr_decay_iters = args.lr_decay_iters or args.train_iters
    args.save_interval = args.save_interval or args.train_iters
    if args.lr_warmup_iters >= args.lr_decay_iters:
        raise MegacloneError(f"--lr-warmup-iters {args.lr_warmup_iters} is not below the decay length "
                             f"{args.lr_decay_iters}", "use fewer warm-up iterations")
    if args.bf16 and args.fp16:  # both from a checkpoint's args
        raise MegacloneError("both bf16 and fp16 are set", "pass one of --bf16 and --fp16")
    args.params_dtype = "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"
    return args
