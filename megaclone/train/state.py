"""Training checkpoints in Megatron-LM's torch_dist layout: model, optimizer, scheduler, RNG, args.

The state dict mirrors Megatron-LM's ``generate_state_dict``; the optimizer part is built with
megatron-core's own sharding helpers in the layout of its ``FP32Optimizer`` (``optimizer.state.
exp_avg.<param key>``, ``exp_avg_sq``, one ``common_step``), or under mixed precision of its
``Float16OptimizerWithFloat16Params`` (the same, plus ``optimizer.state.fp32_param.<param key>``), so
optimizer state reshards across TP like the weights. Nothing here knows about cloning.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from megaclone.formats import torch_dist
from megaclone.model import save_megatron


def optimizer_sharded_state_dict(optimizer: torch.optim.Optimizer, model_sd: dict, main=None, scale=None) -> dict:
    """AdamW state as ShardedTensors keyed like the parameters they belong to. With ``main`` (mixed
    precision: the optimizer steps fp32 main copies) Megatron-LM's Float16OptimizerWithFloat16Params
    layout: the AdamW state under ``optimizer``, the main weights as ``optimizer.state.fp32_param.<key>``
    under ``fp32_from_fp16_params``, and the loss scale's state (fp16) under ``grad_scaler``."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    id_map = get_param_id_to_sharded_param_map(model_sd, params if main is None else [main.model_of(p) for p in params])
    steps = {float(s["step"]) for s in state["state"].values() if "step" in s}
    if len(steps) > 1:
        raise ValueError(f"optimizer steps differ per parameter: {sorted(steps)}")
    fp32 = None if main is None else [
        [make_sharded_optimizer_tensor(id_map[i], params[i], prefix="optimizer.state.fp32_param")
         for i in group["params"]] for group in state["param_groups"]]
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    if steps:
        state["state"]["common_step"] = steps.pop()
    if main is None:
        return state
    out = {"optimizer": state, "fp32_from_fp16_params": fp32}
    if scale is not None:
        out["grad_scaler"] = scale.state_dict()
    return out


def init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate AdamW's per-parameter state (as after one step), so a load has tensors to fill."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def restore_optimizer(optimizer: torch.optim.Optimizer, loaded: dict, main=None, scale=None) -> None:
    """Put a loaded optimizer state (optimizer_sharded_state_dict's layout) in place: the AdamW state,
    and under mixed precision the fp32 main weights (the model keeps its own loaded weights) and the
    loss scale's state."""
    if main is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        with torch.no_grad():
            for group, saved in zip(optimizer.state_dict()["param_groups"], loaded["fp32_from_fp16_params"]):
                for i, tensor in zip(group["params"], saved):
                    params[i].copy_(tensor)
        if scale is not None and "grad_scaler" in loaded:
            scale.load_state_dict(loaded["grad_scaler"])
        loaded = loaded["optimizer"]
    # by parameter, not by group: the groups are this run's (its flags, or a clone's per-tensor scaling),
    # as Megatron-LM takes betas, eps and the schedule from the current flags on a resume
    step = loaded["state"].pop("common_step", None)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, saved in loaded["state"].items():
        state = optimizer.state[params[i]]
        for name, value in saved.items():
            state[name] = value.to(device=params[i].device, dtype=params[i].dtype) if torch.is_tensor(value) else value
        if step is not None:
            state["step"] = torch.tensor(float(step))


def rng_state_object():
    """Per-rank RNG state as Megatron-LM saves it (one ShardedObject per (PP, TP) rank, DP replicas):
    Python, numpy and torch generators and megatron-core's tracker states (attention dropout)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing import ShardedObject

    rng = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}]
    return ShardedObject("rng_state", rng,
                         (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank())


def save_training_checkpoint(
    root: Path,
    iteration: int,
    model_sd: dict,
    args: argparse.Namespace,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    extra: Optional[dict] = None,
    main=None,
    scale=None,
) -> Path:
    """Save ``iter_<iteration>`` under ``root`` and point the tracker file at it (all ranks); under
    mixed precision the fp32 main weights (``main``) and the loss scale (``scale``) with the optimizer."""
    state = {"rng_state": rng_state_object(), "num_floating_point_operations_so_far": 0.0}
    if optimizer is not None:
        state["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd, main, scale)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state.update(extra or {})
    return save_megatron(Path(root), iteration, model_sd, args, state)


def load_training_checkpoint(path: Path, model, model_sd: dict, optimizer: Optional[torch.optim.Optimizer] = None,
                             rng: bool = False, main=None, scale=None) -> dict:
    """Load weights (resharding to the current TP) and, if given, the optimizer state; with ``rng``
    (a resume at the saved TP, as Megatron-LM restores it) this rank's RNG states too, so dropout
    draws the masks an uninterrupted run would. Returns the checkpoint's common state."""
    request: dict = {"model": model_sd}
    if optimizer is not None:
        init_adam_state(optimizer)
        request["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd, main, scale)
        # the saved groups' settings are not restored (restore_optimizer): not asked for, so a run whose
        # groups differ from the saved ones (a clone's per-tensor scaling) loads the same state
        (request["optimizer"].get("optimizer") or request["optimizer"]).pop("param_groups")
    if rng:
        request["rng_state"] = rng_state_object()
    loaded = torch_dist.load(request, Path(path), validate_access_integrity=False)
    model.load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        restore_optimizer(optimizer, loaded["optimizer"], main, scale)
    if rng:
        restore_rng(loaded["rng_state"][0])
    return loaded


def restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    if state.get("rng_tracker_states"):
        tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])
