"""Training checkpoints in Megatron-LM's torch_dist layout: model, optimizer, scheduler, RNG, args.

The state dict mirrors Megatron-LM's ``generate_state_dict``; the optimizer part is built with
megatron-core's own sharding helpers in the layout of its ``FP32Optimizer`` (``optimizer.state.
exp_avg.<param key>``, ``exp_avg_sq``, one ``common_step``), so optimizer state reshards across TP
like the weights. Nothing here knows about cloning.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .model import add_te_moe_norm_keys


def optimizer_sharded_state_dict(optimizer: torch.optim.Optimizer, model_sd: dict) -> dict:
    """AdamW state as ShardedTensors keyed like the parameters they belong to."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    id_map = get_param_id_to_sharded_param_map(model_sd, params)
    steps = {float(s["step"]) for s in state["state"].values() if "step" in s}
    if len(steps) > 1:
        raise ValueError(f"optimizer steps differ per parameter: {sorted(steps)}")
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    if steps:
        state["state"]["common_step"] = steps.pop()
    return state


def init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate AdamW's per-parameter state (as after one step), so a load has tensors to fill."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def restore_optimizer(optimizer: torch.optim.Optimizer, loaded: dict) -> None:
    step = loaded["state"].pop("common_step", None)
    if step is not None:
        for param_state in loaded["state"].values():
            param_state["step"] = torch.tensor(float(step))
    optimizer.load_state_dict(loaded)


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
) -> Path:
    """Save ``iter_<iteration>`` under ``root`` and point the tracker file at it (all ranks)."""
    state = {
        "args": args,
        "checkpoint_version": ckpt_io.CHECKPOINT_VERSION,
        "iteration": iteration,
        "model": model_sd,
        "rng_state": rng_state_object(),
        "num_floating_point_operations_so_far": 0.0,
    }
    if optimizer is not None:
        state["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd)
    add_te_moe_norm_keys(model_sd)  # after the optimizer's map: its entries share the norm's tensor
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state.update(extra or {})
    return ckpt_io.save_checkpoint(Path(root), iteration, state)


def load_training_checkpoint(path: Path, model, model_sd: dict,
                             optimizer: Optional[torch.optim.Optimizer] = None, rng: bool = False) -> dict:
    """Load weights (resharding to the current TP) and, if given, the optimizer state; with ``rng``
    (a resume at the saved TP, as Megatron-LM restores it) this rank's RNG states too, so dropout
    draws the masks an uninterrupted run would. Returns the checkpoint's common state."""
    request: dict = {"model": model_sd}
    if optimizer is not None:
        init_adam_state(optimizer)
        request["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd)
    if rng:
        request["rng_state"] = rng_state_object()
    loaded = ckpt_io.load(request, Path(path), validate_access_integrity=False)
    model.load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        restore_optimizer(optimizer, loaded["optimizer"])
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
