"""One training step on megatron-core: micro-batches through the GPTModel (vocab-parallel cross
entropy), gradients averaged over data parallel, clipped by their global norm (tensor-parallel
duplicates counted once), then AdamW under megatron-core's OptimizerParamScheduler.

The optimizer is torch's AdamW with Megatron-LM's parameter groups on every device: megatron-core
0.16.1's optimizer classes allocate on 'cuda' unconditionally (docs/design.md, "CPU").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megaclone.model import causal_mask
from megaclone.train.precision import MainWeights


def param_groups(model: torch.nn.Module, main: Optional[MainWeights] = None,
                 scaling: Optional[dict[str, tuple[float, float]]] = None,
                 args: Optional[argparse.Namespace] = None) -> list[dict]:
    """Megatron-LM's default groups: no weight decay on biases and 1-D parameters (norms); with
    ``main``, of the fp32 main copies the optimizer steps under mixed precision.

    With ``scaling`` (tensor key -> (a, s), a clone's record: pipeline.optimizer.adam_scaling), one
    group per (decay, a, s): max and min lr x a, eps x s, weight decay / a, and each parameter's
    ``clip_weight`` a / s, so that Adam's step on a symmetric clone is a times the source's on every
    copy (its function's step) and the clip norm is the source's (docs/training.md). With s None
    (--clone-lr-scaling, a fresh optimizer) the lr and weight decay alone."""
    keys = _parameter_keys(model) if scaling is not None else {}
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if name.endswith(".bias") or param.dim() == 1 else 1.0
        a, s = scaling[keys[param.data_ptr()]] if scaling is not None else (1.0, None)
        group = groups.get((decay, a, s))
        if group is None:
            group = groups[(decay, a, s)] = {"params": [], "wd_mult": decay / a}
            if scaling is not None:
                group.update(max_lr=args.lr * a, min_lr=args.min_lr * a)
            if s is not None:
                group["eps"] = args.adam_eps * s
        stepped = param if main is None else main.of(param)
        if s is not None:
            stepped.clip_weight = a / s
        group["params"].append(stepped)
    return list(groups.values())


def _parameter_keys(model: torch.nn.Module) -> dict[int, str]:
    """Each parameter's torch_dist key (its layer axis dropped), by storage address."""
    return {item.data.data_ptr(): item.key for item in model.sharded_state_dict().values()
            if isinstance(getattr(item, "data", None), torch.Tensor) and hasattr(item, "key")}


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace, main: Optional[MainWeights] = None,
                    scaling: Optional[dict[str, tuple[float, float]]] = None) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, main, scaling, args), lr=args.lr,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, weight_decay=args.weight_decay)


def build_scheduler(optimizer, args: argparse.Namespace):
    """megatron-core's scheduler, counted in samples as Megatron-LM counts it with --train-iters."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = args.global_batch_size
    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs, lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant",
        override_opt_param_scheduler=bool(getattr(args, "override_opt_param_scheduler", False)),
    )


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
    counted once, each weighted by its ``clip_weight``, 1 unless a clone's scaling set it); grads are
    scaled down when it exceeds ``max_norm`` (0 disables clipping)."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    def square_sum(dense: bool) -> torch.Tensor:
        sq = torch.zeros(1, dtype=torch.float64, device=params[0].device)
        for p in params:
            if (p.grad is not None and param_is_not_tensor_parallel_duplicate(p)
                    and getattr(p, "allreduce", True) == dense):
                sq += p.grad.detach().double().pow(2).sum() * getattr(p, "clip_weight", 1.0)
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
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        clear_aux_losses_tracker,
    )

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / micro_batches, device=device))
    clear_aux_losses_tracker()


def _aux_loss(micro_batches: int) -> Optional[float]:
    """This rank's load-balancing loss of the step (mean over layers and micro-batches), unweighted by
    its coefficient; None when no layer computed one (coefficient 0)."""
    from megatron.core.transformer.moe.moe_utils import (
        get_moe_layer_wise_logging_tracker,
    )

    tracked = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
    return None if tracked is None else float(tracked["values"].float().mean()) / micro_batches


@torch.no_grad()
def first_batch_loss(model, batches: list[dict], device) -> float:
    """The model's mean loss over one global batch in eval mode (no dropout), without a step."""
    from megatron.core import parallel_state

    model.eval()
    total = sum(float(micro_batch_loss(model, batch, device)) for batch in batches) / len(batches)
    return mean_over(parallel_state.get_data_parallel_group(), total)
