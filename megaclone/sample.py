"""Small source models for the bundled default, examples and tests.

``make_source`` builds a real megatron-core GPTModel at a given TP, gives it non-trivial weights
(scaled random init, perturbed norms and biases, optionally a few AdamW steps) and saves it in
Megatron-LM's layout. Two presets cover the supported feature space.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from megaclone.shape.spec import ModelSpec


def checkpoint_args(spec: ModelSpec, **extra) -> argparse.Namespace:
    """A Megatron-LM-style args Namespace, with Megatron-LM's own conventions for MHA and kv_channels."""
    args = spec.to_args()
    args.group_query_attention = spec.num_query_groups != spec.num_attention_heads
    if not args.group_query_attention:
        args.num_query_groups = 1  # Megatron-LM's default when GQA is off
    args.seq_length = spec.max_position_embeddings
    args.tokenizer_type = "NullTokenizer"
    args.vocab_size = spec.vocab_size - 1  # NullTokenizer's vocabulary is vocab_size ids plus its eod id
    args.ckpt_format = "torch_dist"
    args.bf16 = False
    args.fp16 = False
    for key, value in extra.items():
        setattr(args, key, value)
    return args


def perturb_(model, generator: torch.Generator, scale: float = 0.3) -> None:
    """Make norms and biases non-trivial (a fresh init has weight 1 and bias 0, which hides bugs)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                noise = torch.randn(param.shape, generator=generator) * scale
                param.add_(noise.to(param.dtype))


def train_steps_(model, spec: ModelSpec, steps: int, generator: torch.Generator, lr: float = 3e-3) -> list[float]:
    """A few AdamW steps on random tokens so weights leave their init distribution."""
    from megaclone.model import causal_mask

    if steps <= 0:
        return []
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    seq = min(32, spec.max_position_embeddings)
    for _ in range(steps):
        tokens = torch.randint(0, spec.vocab_size, (4, seq + 1), generator=generator)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        positions = torch.arange(seq).unsqueeze(0).expand_as(inputs)
        loss = model(inputs, positions, causal_mask(seq), labels=labels).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def save_like_megatron_lm(model, args: argparse.Namespace, root: Path, iteration: int) -> Path:
    """Save as Megatron-LM's training loop does, not as megaclone's expander does: the model's own
    sharded state dict (no Transformer Engine extras), RNG state, a scheduler state, and args holding
    non-plain values (``params_dtype``). Sources made this way test megaclone on checkpoints it did
    not write itself."""
    from megaclone.train.state import save_training_checkpoint as save

    scheduler = {"max_lr": 3e-3, "min_lr": 0.0, "num_steps": iteration, "decay_style": "cosine"}
    return save(Path(root), iteration, model.sharded_state_dict(), args,
                extra={"opt_param_scheduler": scheduler})


def make_source(root: Path, spec: ModelSpec, seed: int = 1234, train_steps: int = 3,
                dtype: torch.dtype = torch.float32, args_overrides: Optional[dict] = None,
                pipeline_parallel: int = 1) -> Path:
    """Build, perturb, briefly train and save a source model at ``spec.tensor_parallel`` (all ranks);
    with ``pipeline_parallel`` > 1 every stage saves its layers (no training: a step needs a schedule)."""
    from megatron.core import parallel_state

    from megaclone.model import build_gpt
    from megaclone.runtime import init_parallel

    init_parallel(spec.tensor_parallel, pipeline_parallel)
    torch.manual_seed(seed + parallel_state.get_tensor_model_parallel_rank())
    model = build_gpt(spec, dtype=torch.float32, initialize=True)
    gen = torch.Generator().manual_seed(seed + 7919 * parallel_state.get_tensor_model_parallel_rank())
    perturb_(model, gen)
    if pipeline_parallel == 1:
        train_steps_(model, spec, train_steps, gen)
    if dtype != torch.float32:
        model = model.to(dtype)
    args = checkpoint_args(spec, pipeline_model_parallel_size=pipeline_parallel, **(args_overrides or {}))
    args.bf16, args.fp16 = dtype == torch.bfloat16, dtype == torch.float16
    args.params_dtype = dtype  # Megatron-LM stores a torch.dtype here
    save_like_megatron_lm(model, args, Path(root), iteration=train_steps or 1)
    return Path(root)



