"""Growing a training checkpoint's Adam state with its weights (``--grow-optimizer``).

The source's first and second moments (``optimizer.state.exp_avg.<key>``, ``exp_avg_sq``, the layout
the trainer saves: megatron-core's FP32Optimizer) are read by box like any tensor and grown with the
weights' own index maps, each multiplied as its tensor's gradient scales under the clone (s for the
first moment, s^2 for the second; ``rules.gradient_scale``); Adam's step count is kept. A run in
mixed precision (Float16OptimizerWithFloat16Params: ``optimizer.state.fp32_param.<key>`` beside the
moments) has its fp32 main weights grown by the weights' own rules (they are the weights), and the
half-precision weights are then derived from them by rounding, as the optimizer does after each step;
fp16's loss-scaler state is carried over. The run's place (iteration, samples consumed, the learning
rate schedule) is the source's, so the trainer continues it (``continuation``). With the
per-tensor settings the record carries (``adam_scaling``: each tensor's a and s), the trainer's
``--clone-adam-scaling`` then makes a symmetric clone's Adam step the source's own (docs/training.md,
"Growing the optimizer state").
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megaclone.errors import MegacloneError
from megaclone.formats import torch_dist
from megaclone.formats.base import Source
from megaclone.pipeline.rules import ParamRule, clone_scale, gradient_scale, moment_rules, optimizer_state_key
from megaclone.shape.layout import catalogue
from megaclone.shape.request import Depth

MOMENTS = (("exp_avg", 1), ("exp_avg_sq", 2))
MAIN = "fp32_param"  # the optimizer state of a mixed-precision run's fp32 main weights


def check_growable(source: Source, depth: Depth, experts, legacy: bool) -> float:
    """Refuse, before anything is written, a source or a growth whose optimizer state this cannot grow;
    returns the source's Adam step count."""
    what = f"--grow-optimizer: {source.path}"
    if experts is not None or legacy:
        raise MegacloneError(f"{what}: new experts (upcycled, or more from a mixture) and --save-format torch take no "
                             "grown optimizer state (a router row shared by copies makes no step exact)",
                             "leave out --num-experts and --save-format torch, or --grow-optimizer")
    missing = missing_moments(source)
    if missing:
        raise MegacloneError(f"{what} holds no Adam moments for {missing[0]} (and {len(missing) - 1} more)",
                             "load a training checkpoint saved with its optimizer (examples/pretrain_gpt.py --save)")
    if mixed_precision(source):
        missing = [t.key for t in catalogue(source.spec) if optimizer_state_key(MAIN, t.key) not in source.tensors]
        if missing:
            raise MegacloneError(f"{what} holds fp32 main weights for some tensors but not for {missing[0]}",
                                 "load a complete training checkpoint")
    optimizer = torch_dist.read_common(source.path).get("optimizer", {})
    step = (optimizer.get("optimizer", optimizer)).get("state", {}).get("common_step")
    if step is None:
        raise MegacloneError(f"{what} records no Adam step count (common_step)", "load a training checkpoint")
    return float(step)


def missing_moments(source: Source) -> list[str]:
    """The parameters of ``source``'s model (its catalogue: the tensors the model trains, not the
    copies a checkpoint also stores for Transformer Engine) whose Adam moments it does not hold, a key
    per missing moment; none for a training checkpoint saved with its optimizer."""
    return [t.key for t in catalogue(source.spec) for state, _ in MOMENTS
            if optimizer_state_key(state, t.key) not in source.tensors]


def mixed_precision(source: Source) -> bool:
    """Whether a training checkpoint was saved in mixed precision (fp32 main weights beside the moments)."""
    return any(k.startswith(optimizer_state_key(MAIN, "")) for k in source.tensors)


def main_weight_rules(rules: list[ParamRule]) -> list[ParamRule]:
    """The weights' own rules, reading the source's fp32 main weights instead of its half-precision ones."""
    return [dataclasses.replace(r, source=optimizer_state_key(MAIN, r.source_key)) for r in rules]


def continuation(source: Source) -> dict:
    """Where the source's run stands, for a destination that continues it: the iteration, the samples
    consumed, the learning-rate schedule's state and the floating-point operations so far (the trainer
    resumes from these without --finetune, as Megatron-LM resumes its own checkpoint)."""
    common = torch_dist.read_common(source.path)
    args = common["args"]
    iteration = int(common.get("iteration", getattr(args, "iteration", 0)) or 0)
    out = {"iteration": iteration,
           "consumed_train_samples": int(getattr(args, "consumed_train_samples", 0) or 0),
           "num_floating_point_operations_so_far": float(common.get("num_floating_point_operations_so_far", 0.0))}
    if "opt_param_scheduler" in common:
        out["opt_param_scheduler"] = common["opt_param_scheduler"]
    scaler = common.get("optimizer", {}).get("grad_scaler")
    if scaler is not None:
        out["grad_scaler"] = scaler
    return out


def adam_scaling(rules: list[ParamRule]) -> dict[str, list[float]]:
    """Per tensor key, [a, s]: the clone's value scale and gradient scale (what --clone-adam-scaling reads)."""
    return {r.key: [clone_scale(r), gradient_scale(r)] for r in rules}


def grown_adam_state(model, model_sd: dict, step: float, rules: list[ParamRule], fill, mixed: bool = False,
                     scaler: Optional[dict] = None) -> dict:
    """The destination's Adam state in the trainer's layout (keyed by ``model_sd``, the model's own
    tensors): a torch AdamW over ``model`` in the trainer's parameter groups, each moment filled by
    ``fill(slots, rules, moments)`` (the expander's own fill) with the source's moments grown by the
    weights' ``rules`` (a layer added by identity depth growth: zero moments, it has no history), its
    step count the source's. With ``mixed`` the AdamW steps fp32 main copies, filled
    first with the source's main weights grown by the weights' rules; the model's half-precision
    weights are then rounded from them (they already hold the clone of the source's half-precision
    weights: for power-of-two factors the two agree bit for bit). ``scaler``: fp16's loss-scale state."""
    from megaclone.model import model_sharded_state_dict, parameter_slots
    from megaclone.train.precision import MainWeights
    from megaclone.train.state import init_adam_state, optimizer_sharded_state_dict
    from megaclone.train.step import param_groups

    main = MainWeights([p for p in model.parameters() if p.requires_grad]) if mixed else None
    optimizer = torch.optim.AdamW(param_groups(model, main))
    init_adam_state(optimizer)
    stepped = {(p.data_ptr(), p.shape): (p if main is None else main.of(p)) for p in model.parameters()}

    def on(tensor_of) -> dict:  # the model's state dict, each parameter's tensor replaced by tensor_of(stepped)
        out = {}
        for key, item in model_sharded_state_dict(model).items():
            data = getattr(item, "data", None)
            if isinstance(data, torch.Tensor) and (data.data_ptr(), data.shape) in stepped:
                tensor = tensor_of(stepped[data.data_ptr(), data.shape])
                typed = {"dtype": tensor.dtype} if hasattr(item, "dtype") else {}  # a factory has none
                item = dataclasses.replace(item, data=tensor, **typed)
            out[key] = item
        return out

    if main is not None:
        fill(parameter_slots(on(lambda p: p.data)), main_weight_rules(rules))
        main.to_model()
    for state, power in MOMENTS:
        fill(parameter_slots(on(lambda p: optimizer.state[p][state])), moment_rules(rules, state, power), moments=True)
    for p in optimizer.state:
        optimizer.state[p]["step"] = torch.tensor(step)
    out = optimizer_sharded_state_dict(optimizer, model_sd, main)
    if scaler is not None:
        out["grad_scaler"] = scaler
    return out
