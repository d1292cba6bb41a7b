"""Losses the trainer reports: validation loss, and the source's own loss on the clone's first
batch (the check that training starts from the source's function).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from megaclone.formats import Format
from megaclone.formats.base import Source
from megaclone.train.step import mean_over, micro_batch_loss, micro_batches


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
    if source.format is Format.HF:
        losses = _hf_source_losses(source.path, batches, args.padded_vocab_size, device)
    else:
        losses = _megatron_source_losses(source, batches, args.padded_vocab_size, device)
    return sum(losses) / len(losses)


def _masked_mean(per_token: torch.Tensor, batch: dict, device) -> float:
    mask = batch["loss_mask"].to(device)
    return float((per_token * mask).sum() / mask.sum().clamp(min=1))


def _megatron_source_losses(source: Source, batches: list[dict], padded_vocab: int, device) -> list[float]:
    from megatron.core import parallel_state

    from megaclone.reference import load_source_model
    from megaclone.model import causal_logits

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
    from megaclone.reference import hf_model

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
