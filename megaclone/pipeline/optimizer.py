"""Growing a training checkpoint's Adam state with its weights (``--grow-optimizer``).

The source's first and second moments (``optimizer.state.exp_avg.<key>``, ``exp_avg_sq``, the layout
the trainer saves: megatron-core's FP32Optimizer) are read by box like any tensor and grown with the
weights' own index maps, each multiplied as its tensor's gradient scales under the clone (s for the
first moment, s^2 for the second; ``rules.gradient_scale``); Adam's step count is kept. With the
per-tensor settings the record carries (``adam_scaling``: each tensor's a and s), the trainer's
``--clone-adam-scaling`` then makes a symmetric clone's Adam step the source's own (docs/training.md,
"Growing the optimizer state").
"""

from __future__ import annotations

import dataclasses

import torch

from megaclone.errors import MegacloneError
from megaclone.formats import torch_dist
from megaclone.formats.base import Source
from megaclone.pipeline.rules import ParamRule, clone_scale, gradient_scale, moment_rules, param_rules
from megaclone.shape.layout import catalogue
from megaclone.shape.request import Depth
from megaclone.shape.spec import ModelSpec

MOMENTS = (("exp_avg", 1), ("exp_avg_sq", 2))


def check_growable(source: Source, depth: Depth, experts, legacy: bool) -> float:
    """Refuse, before anything is written, a source or a growth whose optimizer state this cannot grow;
    returns the source's Adam step count."""
    what = f"--grow-optimizer: {source.path}"
    if depth.factor > 1 or experts is not None or legacy:
        raise MegacloneError(f"{what}: only width growth into torch_dist grows the optimizer state (added layers and "
                             "new experts have no source moments)", "leave out --depth-factor, --num-experts and "
                             "--save-format torch, or --grow-optimizer")
    missing = [t.key for t in catalogue(source.spec) for state, _ in MOMENTS
               if f"optimizer.state.{state}.{t.key}" not in source.tensors]
    if missing:
        raise MegacloneError(f"{what} holds no Adam moments for {missing[0]} (and {len(missing) - 1} more)",
                             "load a training checkpoint saved with its optimizer (examples/pretrain_gpt.py --save)")
    if any(k.startswith("optimizer.state.fp32_param.") for k in source.tensors):
        raise MegacloneError(f"{what} was trained in mixed precision (fp32 main weights beside the moments), "
                             "which --grow-optimizer does not grow yet", "grow an fp32-trained checkpoint's optimizer")
    step = torch_dist.read_common(source.path).get("optimizer", {}).get("state", {}).get("common_step")
    if step is None:
        raise MegacloneError(f"{what} records no Adam step count (common_step)", "load a training checkpoint")
    return float(step)


def adam_scaling(src: ModelSpec, dst: ModelSpec) -> dict[str, list[float]]:
    """Per tensor key, [a, s]: the clone's value scale and gradient scale (what --clone-adam-scaling reads)."""
    return {r.key: [clone_scale(r), gradient_scale(r)] for r in param_rules(src, dst)}


def grown_adam_state(model, model_sd: dict, step: float, rules: list[ParamRule], fill) -> dict:
    """The destination's Adam state in the trainer's layout (keyed by ``model_sd``, the model's own
    tensors): a torch AdamW over ``model`` in the trainer's parameter groups, each moment filled by
    ``fill(slots, moment_rules)`` (the expander's own fill) with the source's moments grown by the
    weights' ``rules``, its step count the source's."""
    from megaclone.model import model_sharded_state_dict, parameter_slots
    from megaclone.train.state import init_adam_state, optimizer_sharded_state_dict
    from megaclone.train.step import param_groups

    optimizer = torch.optim.AdamW(param_groups(model))
    init_adam_state(optimizer)
    params = {(p.data_ptr(), p.shape): p for p in model.parameters()}
    for state, power in MOMENTS:
        on_state = {}  # the model's state dict, each parameter's tensor replaced by its moment
        for key, item in model_sharded_state_dict(model).items():
            data = getattr(item, "data", None)
            if isinstance(data, torch.Tensor) and (data.data_ptr(), data.shape) in params:
                item = dataclasses.replace(item, data=optimizer.state[params[data.data_ptr(), data.shape]][state])
            on_state[key] = item
        fill(parameter_slots(on_state), moment_rules(rules, state, power))
    for p in optimizer.state:
        optimizer.state[p]["step"] = torch.tensor(step)
    return optimizer_sharded_state_dict(optimizer, model_sd)
