"""GPT pretraining on megatron-core with tensor and data parallelism, for continuing from a clone.

One training step: every data-parallel rank runs its micro-batches of the global batch through the
GPTModel (vocab-parallel cross entropy), gradients are averaged over the data-parallel group, clipped
by their global norm (tensor-parallel duplicates counted once), and AdamW steps under megatron-core's
OptimizerParamScheduler. Sample order follows Megatron-LM's pretraining sampler, so a resumed run sees
the batches an uninterrupted one would. The optimizer is torch's AdamW with Megatron-LM's parameter
groups on every device: megatron-core 0.16.1's optimizer classes allocate on 'cuda' unconditionally
(docs/design.md, "CPU"); its checkpoint layout is kept (see train_state).
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
import torch.distributed as dist

from . import checkpoint as ckpt_io
from . import data as data_io
from . import destination
from . import train_args
from . import train_state
from .errors import MegacloneError
from .model import build_gpt, causal_mask, model_sharded_state_dict
from .precision import MainWeights, loss_scale_of, training_dtype
from .runtime import Runtime, init_parallel
from .source import Source, not_function_preserving, open_any_source
from .spec import ModelSpec


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


def param_groups(model: torch.nn.Module, main: Optional[MainWeights] = None) -> list[dict]:
    """Megatron-LM's default groups: no weight decay on biases and 1-D parameters (norms); with
    ``main``, of the fp32 main copies the optimizer steps under mixed precision."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.dim() == 1 else decay).append(
            param if main is None else main.of(param))
    return [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace,
                    main: Optional[MainWeights] = None) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, main), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_eps, weight_decay=args.weight_decay)


def build_scheduler(optimizer, args: argparse.Namespace):
    """megatron-core's scheduler, counted in samples as Megatron-LM counts it with --train-iters."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = args.global_batch_size
    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs, lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant",
    )


# ---------------------------------------------------------------- batches and losses


def micro_batches(dataset, first_sample: int, args: argparse.Namespace, dp_rank: int) -> list[dict]:
    """This DP rank's micro-batches of the global batch starting at ``first_sample`` (Megatron-LM's
    sampler: each block of micro x DP consecutive samples is split across DP ranks in order)."""
    mbs, dp = args.micro_batch_size, args.data_parallel_size
    out = []
    for m in range(args.global_batch_size // (mbs * dp)):
        start = first_sample + m * mbs * dp + dp_rank * mbs
        items = [dataset[i] for i in range(start, start + mbs)]
        out.append({k: torch.stack([it[k] for it in items]) for k in ("tokens", "labels", "loss_mask", "position_ids")})
    return out


def micro_batch_loss(model, batch: dict, device: torch.device) -> torch.Tensor:
    """Masked mean of the per-token cross entropy over one micro-batch."""
    tokens = batch["tokens"].to(device)
    per_token = model(tokens, batch["position_ids"].to(device), causal_mask(tokens.shape[1], device),
                      labels=batch["labels"].to(device))
    mask = batch["loss_mask"].to(device)
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1)


def mean_over(group, value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
        t /= dist.get_world_size(group)
    return float(t)


# ---------------------------------------------------------------- one step


def average_gradients(params: list[torch.nn.Parameter], dp_group, expert_dp_group=None) -> None:
    """The gradient of the loss averaged over data-parallel ranks: each parameter's gradient summed over
    its replicas and divided by the DP size. An expert's replicas (megatron-core marks them
    ``allreduce=False``) are the expert-data-parallel group, but its gradient already holds every EP
    rank's tokens, so it is divided by the same DP size (as Megatron's DDP scales it)."""
    dp = dist.get_world_size(dp_group)
    for p in params:
        if p.grad is None:
            continue
        group = dp_group if getattr(p, "allreduce", True) or expert_dp_group is None else expert_dp_group
        if dist.get_world_size(group) > 1:
            dist.all_reduce(p.grad, group=group)
        if dp > 1:
            p.grad /= dp


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, tp_group, expert_group=None) -> float:
    """Global L2 norm over the model (TP-split parameters summed over the TP group, replicated ones
    counted once); grads are scaled down when it exceeds ``max_norm`` (0 disables clipping)."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    def square_sum(dense: bool) -> torch.Tensor:
        sq = torch.zeros(1, dtype=torch.float64, device=params[0].device)
        for p in params:
            if (p.grad is not None and param_is_not_tensor_parallel_duplicate(p)
                    and getattr(p, "allreduce", True) == dense):
                sq += p.grad.detach().double().pow(2).sum()
        return sq

    sq = square_sum(dense=True)
    dist.all_reduce(sq, group=tp_group)
    if expert_group is not None:  # each expert lives on one EP rank, split over the expert TP ranks
        experts = square_sum(dense=False)
        dist.all_reduce(experts, group=expert_group)
        sq += experts
    norm = float(sq.sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


@dataclass
class StepResult:
    loss: float  # LM loss, mean over the global batch
    grad_norm: float  # before clipping; nan on a skipped step
    aux: Optional[float]  # load-balancing loss of a mixture of experts
    skipped: bool = False  # fp16: the gradients overflowed, nothing was applied


def train_step(model, optimizer, scheduler, batches: list[dict], args, device, main: Optional[MainWeights] = None,
               scale=None) -> StepResult:
    """Forward/backward over this rank's micro-batches, DP-average, clip, step. megatron-core's MoE
    layer adds the load-balancing gradient itself (scaled as the LM loss is); the LM loss reported
    excludes it. Under mixed precision (``main``) the gradients move to the fp32 main weights, which
    the optimizer steps and which are rounded back into the model; with a loss ``scale`` (fp16) the
    loss is multiplied by it and the gradients divided, and a step whose gradients overflow on any
    rank is skipped (the scheduler does not advance, as in Megatron-LM)."""
    from megatron.core import parallel_state

    moe = bool(args.num_experts)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    if moe:
        _start_aux_losses(len(batches), device)
    factor = scale.scale if scale is not None else 1.0
    total = 0.0
    for batch in batches:
        loss = micro_batch_loss(model, batch, device)
        (loss * (factor / len(batches))).backward()
        total += float(loss.detach()) / len(batches)
    if main is not None:
        main.take_gradients(1.0 / factor)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    average_gradients(params, parallel_state.get_data_parallel_group(),
                      parallel_state.get_expert_data_parallel_group() if moe else None)
    dp = parallel_state.get_data_parallel_group()
    aux = _aux_loss(len(batches))
    aux = None if aux is None else mean_over(dp, aux)
    if scale is not None:
        overflowed = main.overflowed()
        scale.update(overflowed)
        if overflowed:
            optimizer.zero_grad(set_to_none=True)
            return StepResult(mean_over(dp, total), float("nan"), aux, skipped=True)
    grad_norm = clip_grad_norm(params, args.clip_grad, parallel_state.get_tensor_model_parallel_group(),
                               parallel_state.get_expert_tensor_and_model_parallel_group() if moe else None)
    optimizer.step()
    if main is not None:
        main.to_model()
    scheduler.step(increment=args.global_batch_size)
    return StepResult(mean_over(dp, total), grad_norm, aux)


def _start_aux_losses(micro_batches: int, device) -> None:
    """Scale the load-balancing gradient as each micro-batch's LM loss is (1/micro-batches), as
    Megatron-LM does, and forget the previous step's logged values."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, clear_aux_losses_tracker

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / micro_batches, device=device))
    clear_aux_losses_tracker()


def _aux_loss(micro_batches: int) -> Optional[float]:
    """This rank's load-balancing loss of the step (mean over layers and micro-batches), unweighted by
    its coefficient; None when no layer computed one (coefficient 0)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracked = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
    return None if tracked is None else float(tracked["values"].float().mean()) / micro_batches


@torch.no_grad()
def first_batch_loss(model, batches: list[dict], device) -> float:
    """The model's mean loss over one global batch in eval mode (no dropout), without a step."""
    from megatron.core import parallel_state

    model.eval()
    total = sum(float(micro_batch_loss(model, batch, device)) for batch in batches) / len(batches)
    return mean_over(parallel_state.get_data_parallel_group(), total)


@torch.no_grad()
def evaluate(model, dataset, args, device) -> float:
    """Mean loss over the first ``eval_iters`` global batches of the validation split (the same
    samples at every evaluation, so curves compare without sampling noise)."""
    from megatron.core import parallel_state

    model.eval()
    dp_rank = parallel_state.get_data_parallel_rank()
    losses = []
    for it in range(args.eval_iters):
        for batch in micro_batches(dataset, it * args.global_batch_size, args, dp_rank):
            losses.append(float(micro_batch_loss(model, batch, device)))
    return mean_over(parallel_state.get_data_parallel_group(), sum(losses) / max(len(losses), 1))


# ---------------------------------------------------------------- the source check


def padded_cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor, extra_zero_logits: int,
                         tp_group) -> torch.Tensor:
    """Per-token cross entropy of vocab-parallel logits [b, s, V/TP] with ``extra_zero_logits`` more
    vocabulary entries of logit 0 appended: the function a model computes once its vocabulary is
    padded further with zero rows (as a clone's is when its TP needs more padding)."""
    from megatron.core import parallel_state

    logits = local_logits.float()
    width = logits.shape[-1]
    top = logits.max(dim=-1).values
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
    if extra_zero_logits:
        top = top.clamp(min=0.0)
    total = (logits - top.unsqueeze(-1)).exp().sum(dim=-1)
    dist.all_reduce(total, group=tp_group)
    total = total + extra_zero_logits * (-top).exp()
    start = parallel_state.get_tensor_model_parallel_rank() * width
    mine = (labels >= start) & (labels < start + width)
    target = logits.gather(-1, (labels - start).clamp(0, width - 1).unsqueeze(-1)).squeeze(-1) * mine
    dist.all_reduce(target, group=tp_group)
    return top + total.log() - target


def source_loss(source: Source, dataset, args, device) -> float:
    """The source model's loss on the first global batch, averaged as the trainer averages it, over
    the destination's padded vocabulary (extra padding ids have logit 0 in a clone).

    A Megatron source runs at the largest TP its shape allows in this world; a Hugging Face source
    runs in transformers itself, so megaclone's HF reader is not on both sides of the comparison.
    Every rank takes the whole global batch (a check on a small model, not a training step)."""
    full = argparse.Namespace(**vars(args))
    full.data_parallel_size = 1  # every rank takes the whole global batch
    batches = micro_batches(dataset, 0, full, 0)
    if source.kind == "hf":
        losses = _hf_source_losses(source.path, batches, args.padded_vocab_size, device)
    else:
        losses = _megatron_source_losses(source, batches, args.padded_vocab_size, device)
    return sum(losses) / len(losses)


def _masked_mean(per_token: torch.Tensor, batch: dict, device) -> float:
    mask = batch["loss_mask"].to(device)
    return float((per_token * mask).sum() / mask.sum().clamp(min=1))


def _megatron_source_losses(source: Source, batches: list[dict], padded_vocab: int, device) -> list[float]:
    from megatron.core import parallel_state

    from .model import causal_logits
    from .verify import load_source_model

    model = load_source_model(source, device)
    extra = max(0, padded_vocab - source.spec.padded_vocab_size)
    losses = []
    for batch in batches:
        logits = causal_logits(model, batch["tokens"].to(device))
        per_token = padded_cross_entropy(logits, batch["labels"].to(device), extra,
                                         parallel_state.get_tensor_model_parallel_group())
        losses.append(_masked_mean(per_token, batch, device))
    return losses


def _hf_source_losses(root: Path, batches: list[dict], padded_vocab: int, device) -> list[float]:
    from .verify import hf_model

    model = hf_model(root, device)
    losses = []
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["tokens"].to(device)).logits.float()
            logits = torch.nn.functional.pad(logits, (0, max(0, padded_vocab - logits.shape[-1])))  # zero rows
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"].to(device),
                                                          reduction="none")
            losses.append(_masked_mean(per_token, batch, device))
    del model
    return losses


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
        path = root / ckpt_io.iteration_dirname(args.ckpt_step)
        if not (path / "metadata.json").exists():
            raise MegacloneError(f"--ckpt-step {args.ckpt_step}: {path} is not a checkpoint",
                                 f"pick an iteration saved under {root}")
        return path
    if not (root / ckpt_io.LATEST).exists() and not (root / "metadata.json").exists():
        return None  # Megatron-LM starts from random weights when --load holds no checkpoint
    return ckpt_io.find_checkpoint(root)


def prepare_args(args: argparse.Namespace, world_size: int) -> tuple[argparse.Namespace, Optional[Path]]:
    """Apply --use-checkpoint-args and derive Megatron-LM's computed fields; validate."""
    path = _checkpoint_to_load(args)
    if args.load and path is None and (args.finetune or args.use_checkpoint_args):
        flag = "--finetune" if args.finetune else "--use-checkpoint-args"
        raise MegacloneError(f"{flag} but --load {args.load} holds no checkpoint (no {ckpt_io.LATEST})",
                             "point --load at a checkpoint (e.g. the --save of tools/expand_sharded.py)")
    if args.save:  # training adds iterations to --save and removes nothing; resuming saves into --load
        data = train_args.data_source(args).files()
        load = [Path(args.load)] if args.load and not destination.same_path(args.load, args.save) else []
        destination.check_no_overlap(Path(args.save), load + data)
    saved_padded = None
    if path is not None:
        saved = ckpt_io.read_common(path)["args"]
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


def _print(rt: Runtime, text: str) -> None:
    if rt.is_main:
        print(text, flush=True)


def pretrain(args: argparse.Namespace, rt: Runtime) -> History:
    from megatron.core import parallel_state

    args, load_path = prepare_args(args, rt.world_size)
    if args.load and load_path is None:  # as Megatron-LM does, but said where it cannot be missed
        _print(rt, f"note: --load {args.load} holds no checkpoint (no {ckpt_io.LATEST}): training starts from "
                   "random weights at iteration 0")
    device = rt.device
    tokenizer = data_io.ByteTokenizer()
    cache = Path(args.data_cache_path) if args.data_cache_path else None
    n_valid = args.eval_iters * args.global_batch_size
    train_ds, valid_ds, _ = data_io.build_gpt_datasets(
        train_args.data_source(args), args.seq_length, args.seed,
        (args.train_iters * args.global_batch_size, n_valid, 0), tokenizer, cache)

    history = History(settings={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))})
    loaded = Loaded()
    if load_path is not None and args.finetune and not args.no_source_check:
        meta = ckpt_io.read_common(load_path).get("megaclone")
        if meta and (reason := not_function_preserving(meta)) is not None:
            _print(rt, f"not comparing the first-batch loss with the source's: {reason}")
        elif meta and Path(meta["source"]).exists():
            source = open_any_source(meta["source"], meta.get("source_format"))
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
    optimizer = build_optimizer(model, args, main)
    scheduler = build_scheduler(optimizer, args)

    if load_path is not None:
        with_optim = not (args.finetune or args.no_load_optim)
        saved = ckpt_io.read_common(load_path)["args"]
        saved_dtype = training_dtype(argparse.Namespace(bf16=getattr(saved, "bf16", False),
                                                        fp16=getattr(saved, "fp16", False)))
        if with_optim and saved_dtype != dtype:
            raise MegacloneError(f"{load_path} was trained in {saved_dtype}, this run trains in {dtype}: its optimizer "
                                 "state has no place here (mixed precision keeps fp32 main weights beside it)",
                                 "resume at the saved precision, or pass --no-load-optim to start the optimizer afresh")
        with_rng = (not args.finetune and getattr(saved, "tensor_model_parallel_size", None)
                    == args.tensor_model_parallel_size and ckpt_io.has_stored(load_path, "rng_state"))
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
        check["tolerance"] = FIRST_LOSS_TOLERANCE[dtype] * check["source_loss"]
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


# How far the clone's first-batch loss may be from the source's, relative, by the weights' dtype:
# the same function, computed at that precision (bf16 keeps 8 bits of mantissa).
FIRST_LOSS_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


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
