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

from .spec import ModelSpec, pad_vocab

# Llama family: GQA, SwiGLU, RMSNorm, RoPE, untied embeddings, no biases.
LLAMA = dict(position_embedding_type="rope", swiglu=True, normalization="RMSNorm", add_bias_linear=False,
             add_qkv_bias=False, untie_embeddings_and_output_weights=True)
# GPT-2 family: MHA, GeLU, LayerNorm, learned positions, tied embeddings, biases.
GPT2 = dict(position_embedding_type="learned_absolute", swiglu=False, normalization="LayerNorm",
            add_bias_linear=True, add_qkv_bias=False, untie_embeddings_and_output_weights=False)

PRESETS: dict[str, dict] = {
    # The bundled default: divisible for TP 8 at factor 2 (heads 8->16, groups 4->8).
    "default": dict(LLAMA, num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                    kv_channels=32, ffn_hidden_size=688),
    # The benchmark's ~94M-parameter source (issue 6's reference shape).
    "bench": dict(LLAMA, num_layers=8, hidden_size=1024, num_attention_heads=16, num_query_groups=8,
                  kv_channels=64, ffn_hidden_size=2816),
    # Test sizes. Attention width (16 x 8) differs from hidden (64) so kv_channels is exercised;
    # factor 3 still divides by TP 8 in both.
    "llama": dict(LLAMA, num_layers=2, hidden_size=64, num_attention_heads=16, num_query_groups=8,
                  kv_channels=8, ffn_hidden_size=96),
    "gpt2": dict(GPT2, num_layers=2, hidden_size=48, num_attention_heads=8, num_query_groups=8,
                 kv_channels=6, ffn_hidden_size=192),
}


def preset_spec(name: str, tp: int, vocab_size: int = 300, seq_length: int = 64,
                make_vocab_size_divisible_by: int = 16, **overrides) -> ModelSpec:
    fields = dict(PRESETS[name], **overrides)
    return ModelSpec(
        vocab_size=vocab_size,
        padded_vocab_size=pad_vocab(vocab_size, make_vocab_size_divisible_by, tp),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_parallel=tp,
        max_position_embeddings=seq_length,
        **fields,
    )


def megatron_args(spec: ModelSpec, **extra) -> argparse.Namespace:
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
    from .model import causal_mask

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


def save_training_checkpoint(model, args: argparse.Namespace, root: Path, iteration: int) -> Path:
    """Save as Megatron-LM's training loop does, not as megaclone's expander does: the model's own
    sharded state dict (no Transformer Engine extras), RNG state, a scheduler state, and args holding
    non-plain values (``params_dtype``). Sources made this way test megaclone on checkpoints it did
    not write itself."""
    from .train_state import save_training_checkpoint as save

    scheduler = {"max_lr": 3e-3, "min_lr": 0.0, "num_steps": iteration, "decay_style": "cosine"}
    return save(Path(root), iteration, model.sharded_state_dict(), args,
                extra={"opt_param_scheduler": scheduler})


def make_source(root: Path, spec: ModelSpec, seed: int = 1234, train_steps: int = 3,
                dtype: torch.dtype = torch.float32, args_overrides: Optional[dict] = None,
                pipeline_parallel: int = 1) -> Path:
    """Build, perturb, briefly train and save a source model at ``spec.tensor_parallel`` (all ranks);
    with ``pipeline_parallel`` > 1 every stage saves its layers (no training: a step needs a schedule)."""
    from megatron.core import parallel_state

    from .model import build_gpt
    from .runtime import init_parallel

    init_parallel(spec.tensor_parallel, pipeline_parallel)
    torch.manual_seed(seed + parallel_state.get_tensor_model_parallel_rank())
    model = build_gpt(spec, dtype=torch.float32, initialize=True)
    gen = torch.Generator().manual_seed(seed + 7919 * parallel_state.get_tensor_model_parallel_rank())
    perturb_(model, gen)
    if pipeline_parallel == 1:
        train_steps_(model, spec, train_steps, gen)
    if dtype != torch.float32:
        model = model.to(dtype)
    args = megatron_args(spec, pipeline_model_parallel_size=pipeline_parallel, **(args_overrides or {}))
    args.bf16, args.fp16 = dtype == torch.bfloat16, dtype == torch.float16
    args.params_dtype = dtype  # Megatron-LM stores a torch.dtype here
    save_training_checkpoint(model, args, Path(root), iteration=train_steps or 1)
    return Path(root)



