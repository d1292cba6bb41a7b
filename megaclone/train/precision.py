"""Mixed-precision training as Megatron-LM's --bf16 and --fp16 do it.

The model's weights are half precision; the optimizer steps fp32 *main* copies of them (so Adam's
state is fp32 too), and after each step the main weights are rounded back into the model. A step's
gradients, computed in half precision, are copied onto the main weights in fp32 before they are
averaged, clipped and applied. fp16 also scales the loss by a dynamic factor so small gradients do
not underflow: a step whose gradients overflow is skipped and the factor backs off (after
``hysteresis`` such steps), and it grows after ``window`` clean steps (Megatron-LM's
DynamicGradScaler; ``--loss-scale`` fixes it instead). bf16 has fp32's exponent range and needs none.

Megatron-LM saves the main weights beside the Adam moments (``optimizer.state.fp32_param.<key>``) and
the scaler's state (``grad_scaler``); train_state writes and reads them in that layout.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def training_dtype(args: argparse.Namespace) -> torch.dtype:
    """The model weights' dtype the flags ask for (Megatron-LM's --bf16 / --fp16; fp32 otherwise)."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


@dataclass
class DynamicLossScale:
    """Megatron-LM's DynamicGradScaler: back off by ``backoff`` after ``hysteresis`` overflowing steps
    (never below ``min_scale``), grow by ``growth`` after ``window`` clean steps in a row."""

    scale: float
    min_scale: float = 1.0
    growth: float = 2.0
    backoff: float = 0.5
    window: int = 1000
    hysteresis: int = 2
    growth_tracker: int = 0
    hysteresis_tracker: int = 2

    def update(self, overflowed: bool) -> None:
        if overflowed:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff, self.min_scale)
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.window:
            self.growth_tracker = 0
            self.hysteresis_tracker = self.hysteresis
            self.scale *= self.growth

    def state_dict(self) -> dict:  # Megatron-LM's keys
        return {"scale": torch.tensor([self.scale]), "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])


@dataclass
class ConstantLossScale:
    """--loss-scale S: the loss times S on every step; an overflowing step is still skipped."""

    scale: float

    def update(self, overflowed: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": torch.tensor([self.scale])}

    def load_state_dict(self, state: dict) -> None:
        pass


def loss_scale_of(args: argparse.Namespace):
    """The loss scaling fp16 trains with (None for bf16 and fp32)."""
    if not args.fp16:
        return None
    if args.loss_scale is not None:
        return ConstantLossScale(args.loss_scale)
    return DynamicLossScale(args.initial_loss_scale, args.min_loss_scale, window=args.loss_scale_window,
                            hysteresis=args.hysteresis, hysteresis_tracker=args.hysteresis)


class MainWeights:
    """fp32 main copies of a half-precision model's parameters, in the optimizer's place.

    Each copy carries its parameter's tensor-parallel attributes and expert flag, so gradient
    averaging and the TP-aware norm treat it as they would the parameter."""

    def __init__(self, model_params: list[torch.nn.Parameter]):
        from megatron.core.tensor_parallel import copy_tensor_model_parallel_attributes

        self.main: dict[torch.nn.Parameter, torch.nn.Parameter] = {}
        self._model_of: dict[int, torch.nn.Parameter] = {}
        for p in model_params:
            main = torch.nn.Parameter(p.detach().float().clone())
            copy_tensor_model_parallel_attributes(main, p)
            if hasattr(p, "allreduce"):
                main.allreduce = p.allreduce
            self.main[p] = main
            self._model_of[id(main)] = p

    def of(self, param: torch.nn.Parameter) -> torch.nn.Parameter:
        """The main copy of a model parameter."""
        return self.main[param]

    def model_of(self, main: torch.nn.Parameter) -> torch.nn.Parameter:
        """The model parameter a main copy belongs to."""
        return self._model_of[id(main)]

    def take_gradients(self, unscale: float) -> None:
        """Main gradients = the model's, in fp32, times ``unscale`` (1 / the loss scale, a power of two:
        exact); the model's are released."""
        for p, main in self.main.items():
            main.grad = None if p.grad is None else p.grad.float().mul_(unscale)
            p.grad = None

    def overflowed(self) -> bool:
        """Whether any rank's main gradients hold an inf or NaN (a collective over the world)."""
        local = any(not torch.isfinite(m.grad).all() for m in self.main.values() if m.grad is not None)
        flag = torch.tensor([1.0 if local else 0.0], device=next(iter(self.main.values())).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @torch.no_grad()
    def to_model(self) -> None:
        """Round the main weights into the model's (after a step)."""
        for p, main in self.main.items():
            p.copy_(main)

    @torch.no_grad()
    def from_model(self) -> None:
        """Main weights = the model's (after the model was loaded without an optimizer state)."""
        for p, main in self.main.items():
            main.copy_(p)
