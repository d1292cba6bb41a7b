"""GPT pretraining on megatron-core with tensor and data parallelism, for continuing from a clone.

One training step: every data-parallel rank runs its micro-batches of the global batch through the
GPTModel (vocab-parallel cross entropy), gradients are averaged over the data-parallel group, clipped
by their global norm (tensor-parallel duplicates counted once), and AdamW steps under megatron-core's
OptimizerParamScheduler. Sample order follows Megatron-LM's pretraining sampler, so a resumed run sees
the batches an uninterrupted one would. The optimizer is torch's AdamW with Megatron-LM's parameter
groups on every device (megatron-core's optimizer classes need CUDA tensors: docs/design.md, "CPU");
megatron-core's checkpoint layout of its non-distributed optimizers is kept (train.state).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megaclone.errors import MegacloneError
from megaclone.formats import destination, iterations, torch_dist
from megaclone.formats.source import open_source
from megaclone.model import build_gpt, model_sharded_state_dict
from megaclone.pipeline.optimizer import missing_moments
from megaclone.reference import default_tolerance
from megaclone.runtime import Runtime, init_parallel
from megaclone.shape.request import not_function_preserving
from megaclone.shape.spec import ModelSpec
from megaclone.train import args as train_args
from megaclone.train import data as data_io
from megaclone.train import state as train_state
from megaclone.train.loss import evaluate, source_loss
from megaclone.train.precision import MainWeights, loss_scale_of, training_dtype
from megaclone.train.step import (
    build_optimizer,
    build_scheduler,
    first_batch_loss,
    micro_batches,
    train_step,
)


@dataclass
class History:
    """What a run logs: per-iteration training metrics, validation points, the source check."""

    settings: dict
    train: list[dict] = field(default_factory=list)
    valid: list[dict] = field(default_factory=list)
    source_check: Optional[dict] = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- model, optimizer, schedule


def model_spec(args: argparse.Namespace) -> ModelSpec:
    return dataclasses.replace(ModelSpec.from_args(args), tensor_parallel=args.tensor_model_parallel_size)


# ---------------------------------------------------------------- batches and losses


# ---------------------------------------------------------------- one step


# ---------------------------------------------------------------- the source check


# ---------------------------------------------------------------- the run


@dataclass
class Loaded:
    iteration: int = 0
    consumed_samples: int = 0


def _checkpoint_to_load(args) -> Optional[Path]:
    if not args.load:
        return None
    root = Path(args.load)
    if args.ckpt_step is not None:
        path = root / iterations.iteration_dirname(args.ckpt_step)
        if not (path / "metadata.json").exists():
            raise MegacloneError(f"--ckpt-step {args.ckpt_step}: {path} is not a checkpoint",
                                 f"pick an iteration saved under {root}")
        return path
    if not (root / iterations.LATEST).exists() and not (root / "metadata.json").exists():
        return None  # Megatron-LM starts from random weights when --load holds no checkpoint
    return torch_dist.find_checkpoint(root)


def prepare_args(args: argparse.Namespace, world_size: int) -> tuple[argparse.Namespace, Optional[Path]]:
    """Apply --use-checkpoint-args and derive Megatron-LM's computed fields; validate."""
    path = _checkpoint_to_load(args)
    if args.load and path is None and (args.finetune or args.use_checkpoint_args):
        flag = "--finetune" if args.finetune else "--use-checkpoint-args"
        raise MegacloneError(f"{flag} but --load {args.load} holds no checkpoint (no {iterations.LATEST})",
                             "point --load at a checkpoint (e.g. the --save of tools/expand_sharded.py)")
    if args.save:  # training adds iterations to --save and removes nothing; resuming saves into --load
        data = train_args.data_source(args).files()
        load = [Path(args.load)] if args.load and not destination.same_path(args.load, args.save) else []
        destination.check_no_overlap(Path(args.save), load + data)
    saved_padded = None
    if path is not None:
        # through the reader expand uses: damaged or truncated files, args that contradict the weights
        # and a missing optimizer state are refused here, before any model is built
        checkpoint = torch_dist.open_torch_dist_source(path)
        _check_resumable(args, checkpoint)
        saved = checkpoint.args
        if args.use_checkpoint_args:
            train_args.apply_checkpoint_args(args, saved)
        saved_padded = getattr(saved, "padded_vocab_size", None)
    train_args.finalize(args, world_size)
    if saved_padded and saved_padded % args.tensor_model_parallel_size == 0:
        # Keep the stored vocabulary rows: Megatron-LM would re-pad for this TP and load a truncated
        # or zero-extended output layer, which changes the softmax over padding ids.
        args.padded_vocab_size = saved_padded
    byte_vocab = data_io.ByteTokenizer.vocab_size
    if args.padded_vocab_size < byte_vocab:
        raise MegacloneError(
            f"the model's vocabulary ({args.padded_vocab_size} rows) is smaller than the byte data's ({byte_vocab} ids)",
            "this trainer reads tools/preprocess_data.py's byte data; train models with another tokenizer in Megatron-LM")
    return args, path


def _check_resumable(args: argparse.Namespace, checkpoint) -> None:
    """A resume that loads the optimizer (neither --finetune nor --no-load-optim) needs its state."""
    if args.finetune or args.no_load_optim:
        return
    missing = missing_moments(checkpoint)
    if missing:
        raise MegacloneError(f"--load {args.load} holds no optimizer state for {missing[0]} (and {len(missing) - 1} "
                             "more), which resuming a run loads",
                             "pass --finetune to start training from its weights at iteration 0 (a grown clone), or "
                             "--no-load-optim to keep its iteration with a fresh optimizer")


def clone_scaling(args: argparse.Namespace, load_path: Optional[Path]) -> Optional[dict]:
    """The per-tensor (a, s) of --clone-adam-scaling (s None for --clone-lr-scaling), from the loaded
    clone's record; refuses a run it cannot apply to."""
    if not (args.clone_adam_scaling or args.clone_lr_scaling):
        return None
    if args.clone_adam_scaling and args.clone_lr_scaling:
        raise MegacloneError("--clone-adam-scaling already scales the lr", "pass one of the two")
    record = torch_dist.read_common(load_path).get("megaclone") if load_path is not None else None
    if not record or "adam_scaling" not in record:
        raise MegacloneError(f"--clone-{'adam' if args.clone_adam_scaling else 'lr'}-scaling needs a clone's per-tensor "
                             "scales, which --load does not record", "--load the --save of tools/expand_sharded.py")
    if args.clone_adam_scaling and (args.finetune or args.no_load_optim or not record.get("grown_optimizer")):
        raise MegacloneError("--clone-adam-scaling applies to a clone whose optimizer state was grown with it, "
                             "resumed with that state", "--load the --save of tools/expand_sharded.py "
                             "--grow-optimizer, without --finetune or --no-load-optim (or use --clone-lr-scaling)")
    scales = {key: tuple(value) for key, value in record["adam_scaling"].items()}
    return scales if args.clone_adam_scaling else {key: (a, None) for key, (a, _) in scales.items()}


def _print(rt: Runtime, text: str) -> None:
    if rt.is_main:
        print(text, flush=True)


def pretrain(args: argparse.Namespace, rt: Runtime) -> History:
    from megatron.core import parallel_state

    args, load_path = prepare_args(args, rt.world_size)
    if args.load and load_path is None:  # as Megatron-LM does, but said where it cannot be missed
        _print(rt, f"note: --load {args.load} holds no checkpoint (no {iterations.LATEST}): training starts from "
                   "random weights at iteration 0")
    device = rt.device
    tokenizer = data_io.ByteTokenizer()
    cache = Path(args.data_cache_path) if args.data_cache_path else None
    n_valid = args.eval_iters * args.global_batch_size
    train_ds, valid_ds, _ = data_io.build_gpt_datasets(
        train_args.data_source(args), args.seq_length, args.seed,
        (args.train_iters * args.global_batch_size, n_valid, 0), tokenizer, cache, args.valid_seed)

    history = History(settings={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))})
    loaded = Loaded()
    if load_path is not None and args.finetune and not args.no_source_check:
        meta = torch_dist.read_common(load_path).get("megaclone")
        if meta and (reason := not_function_preserving(meta)) is not None:
            _print(rt, f"not comparing the first-batch loss with the source's: {reason}")
        elif meta and Path(meta["source"]).exists():
            source = open_source(meta["source"], meta.get("source_format"))
            history.source_check = {"source": str(source.path), "variant": meta.get("variant"),
                                    "source_loss": source_loss(source, train_ds, args, device)}
        elif meta:
            _print(rt, f"the source {meta['source']} of this clone is gone; skipping the first-batch loss check")

    init_parallel(args.tensor_model_parallel_size, 1, args.expert_model_parallel_size)
    from megatron.core import tensor_parallel

    torch.manual_seed(args.seed)  # the same on every rank: CPU init builds the full matrix, then slices
    # Megatron-LM's seeding: the default state (hidden dropout on the replicated residual stream) is
    # the same on every TP rank; the tracker's model-parallel state (attention dropout) differs per rank.
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    spec = model_spec(args)
    dtype = training_dtype(args)
    model = build_gpt(spec, dtype=dtype, device=device, initialize=True, init_method_std=args.init_method_std,
                      hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout)
    main = None if dtype == torch.float32 else MainWeights([p for p in model.parameters() if p.requires_grad])
    scale = loss_scale_of(args)
    optimizer = build_optimizer(model, args, main, clone_scaling(args, load_path))
    scheduler = build_scheduler(optimizer, args)

    if load_path is not None:
        with_optim = not (args.finetune or args.no_load_optim)
        saved = torch_dist.read_common(load_path)["args"]
        saved_dtype = training_dtype(argparse.Namespace(bf16=getattr(saved, "bf16", False),
                                                        fp16=getattr(saved, "fp16", False)))
        if with_optim and saved_dtype != dtype:
            raise MegacloneError(f"{load_path} was trained in {saved_dtype}, this run trains in {dtype}: its optimizer "
                                 "state has no place here (mixed precision keeps fp32 main weights beside it)",
                                 "resume at the saved precision, or pass --no-load-optim to start the optimizer afresh")
        with_rng = (not args.finetune and getattr(saved, "tensor_model_parallel_size", None)
                    == args.tensor_model_parallel_size and torch_dist.has_stored(load_path, "rng_state"))
        common = train_state.load_training_checkpoint(load_path, model, model.sharded_state_dict(),
                                                      optimizer if with_optim else None, rng=with_rng, main=main,
                                                      scale=scale if with_optim else None)
        if main is not None and not with_optim:
            main.from_model()
        if not args.finetune:
            loaded.iteration = int(common["iteration"])
            loaded.consumed_samples = int(getattr(common["args"], "consumed_train_samples",
                                                  loaded.iteration * args.global_batch_size))
            if "opt_param_scheduler" in common:
                scheduler.load_state_dict(common["opt_param_scheduler"])
        _print(rt, f"loaded {load_path} ({'weights only, iteration 0' if args.finetune else f'iteration {loaded.iteration}'})")

    _print(rt, f"model: {spec.num_layers} layers, hidden {spec.hidden_size}, heads {spec.num_attention_heads} "
               f"(groups {spec.num_query_groups}), ffn {spec.ffn_hidden_size}, "
               f"{sum(p.numel() for p in model.parameters()):,} parameters on this rank; "
               + (f"{spec.experts.num} experts (top-{spec.experts.topk}, ffn {spec.experts.ffn_hidden_size}) over "
                  f"EP {spec.expert_parallel}; " if spec.experts else "")
               + f"TP {args.tensor_model_parallel_size} x DP {args.data_parallel_size}, {dtype_name(dtype)}, device {device}")
    log = _Logger(rt, args, loaded.iteration)
    dp_rank = parallel_state.get_data_parallel_rank()
    tokens_per_iter = args.global_batch_size * args.seq_length

    def consumed(iteration: int) -> int:
        """Samples seen before ``iteration`` (a resumed run may use another global batch size)."""
        return loaded.consumed_samples + (iteration - loaded.iteration) * args.global_batch_size

    def save(iteration: int) -> None:
        if not args.save:
            return
        saved = argparse.Namespace(**vars(args))
        saved.consumed_train_samples = consumed(iteration)
        saved.iteration = iteration
        train_state.save_training_checkpoint(Path(args.save), iteration, model_sharded_state_dict(model),
                                             saved, optimizer, scheduler, main=main, scale=scale)
        log.note(f"saved iteration {iteration} to {args.save}")

    if args.eval_iters and loaded.iteration == 0:
        history.valid.append({"iteration": 0, "tokens": 0, "lm_loss": evaluate(model, valid_ds, args, device)})
        log.note(f"validation at iteration 0: lm loss {history.valid[-1]['lm_loss']:.4f}")
    iteration = loaded.iteration
    if iteration == 0 and history.source_check is not None:
        # dropout off, as the source's loss is computed: with dropout the training loss of the same
        # function differs by the masks
        check = history.source_check
        check["first_loss"] = first_batch_loss(model, micro_batches(train_ds, 0, args, dp_rank), device)
        check["abs_diff"] = abs(check["first_loss"] - check["source_loss"])
        check["tolerance"] = default_tolerance(dtype) * check["source_loss"]
        check["ok"] = check["abs_diff"] <= check["tolerance"]
        log.note(f"the clone's loss on the first batch (dropout off) {check['first_loss']:.6f}; the source "
                 f"model's on the same batch: {check['source_loss']:.6f} (|diff| {check['abs_diff']:.2e}, "
                 f"{'within' if check['ok'] else 'BEYOND'} the {dtype_name(dtype).split()[0]} tolerance "
                 f"{check['tolerance']:.2e})")
    while iteration < args.train_iters:
        t0 = time.perf_counter()
        batches = micro_batches(train_ds, consumed(iteration), args, dp_rank)
        lr = max(g["lr"] for g in optimizer.param_groups)
        step = train_step(model, optimizer, scheduler, batches, args, device, main, scale)
        iteration += 1
        seconds = time.perf_counter() - t0
        record = {"iteration": iteration, "tokens": consumed(iteration) * args.seq_length, "lm_loss": step.loss,
                  "lr": lr, "grad_norm": step.grad_norm, "tokens_per_s": tokens_per_iter / seconds}
        if step.aux is not None:
            record["load_balancing_loss"] = step.aux
        if scale is not None:
            record["loss_scale"] = scale.scale
            record["skipped"] = step.skipped
        history.train.append(record)
        log.step(record)
        if args.eval_iters and (iteration % args.eval_interval == 0 or iteration == args.train_iters):
            history.valid.append({"iteration": iteration, "tokens": consumed(iteration) * args.seq_length,
                                  "lm_loss": evaluate(model, valid_ds, args, device)})
            log.note(f"validation at iteration {iteration}: lm loss {history.valid[-1]['lm_loss']:.4f}")
        if iteration % args.save_interval == 0 or iteration == args.train_iters:
            save(iteration)
        if rt.is_main and args.log_json:
            write_json(Path(args.log_json), history.to_json())
    log.close()
    if rt.is_main and args.log_json:
        write_json(Path(args.log_json), history.to_json())
    return history


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16 (fp32 main weights)",
            torch.float16: "fp16 (fp32 main weights, loss scaling)"}[dtype]


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


class _Logger:
    """A tqdm bar on a terminal (rank 0), Megatron-LM-style plain lines every --log-interval otherwise."""

    def __init__(self, rt: Runtime, args, start: int):
        self.rt, self.args = rt, args
        self.bar = None
        if rt.is_main and sys.stdout.isatty() and not args.no_progress:
            from tqdm import tqdm

            self.bar = tqdm(total=args.train_iters, initial=start, desc="training", dynamic_ncols=True)

    def step(self, r: dict) -> None:
        if not self.rt.is_main:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"lm loss {r['lm_loss']:.4f} lr {r['lr']:.2e} {r['tokens_per_s']:.0f} tok/s",
                                     refresh=False)
            self.bar.update(1)
        elif r["iteration"] % self.args.log_interval == 0 or r["iteration"] in (1, self.args.train_iters):
            print(f" iteration {r['iteration']:>7}/{self.args.train_iters} | consumed tokens {r['tokens']:>11,} | "
                  f"lm loss {r['lm_loss']:.6f} | "
                  + (f"load balancing loss {r['load_balancing_loss']:.6f} | " if "load_balancing_loss" in r else "")
                  + f"learning rate {r['lr']:.3e} | grad norm {r['grad_norm']:.3f} | "
                  f"tokens per second {r['tokens_per_s']:.0f}", flush=True)

    def note(self, text: str) -> None:
        if not self.rt.is_main:
            return
        (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
