"""What a clone is compared against, and how closely: its source as megatron-core loads it (without
megaclone's reader) or as transformers computes it, and the tolerance of each dtype. Below both the
checks and the trainer (its first-batch comparison), which import it; nothing here checks anything.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from megaclone.errors import MegacloneError
from megaclone.formats import Format
from megaclone.formats.base import Source
from megaclone.formats.legacy import load_legacy_model
from megaclone.model import build_gpt, load_model
from megaclone.runtime import init_parallel
from megaclone.shape.spec import feasible_tp


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a comparison computed in ``dtype`` (the logit check, the first-batch loss)."""
    return {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


def load_source_model(source: Source, device) -> torch.nn.Module:
    """The source as megatron-core loads it, without megaclone's reader: a torch_dist checkpoint through
    ``dist_checkpointing`` at the largest TP its shape allows in this world (it reshards), a legacy
    one with ``load_state_dict(strict=True)`` at its own TP. Switches the parallel state to that TP."""
    if source.format is Format.TORCH_DIST:
        tp = feasible_tp(source.spec, dist.get_world_size())
    elif source.format is Format.LEGACY:
        tp = getattr(source.args, "tensor_model_parallel_size", 1)
        if dist.get_world_size() % tp:
            raise MegacloneError(f"the legacy source {source.path} has TP {tp}, which does not divide the "
                                 f"{dist.get_world_size()} processes of this job",
                                 f"launch a multiple of {tp} processes (the trainer: or pass --no-source-check)")
    else:
        raise ValueError(f"{source.format.value} sources are checked through transformers, not megatron-core")
    init_parallel(tp)
    experts = source.spec.experts and dataclasses.replace(source.spec.experts, parallel=1)  # all on every rank
    spec = dataclasses.replace(source.spec, tensor_parallel=tp, experts=experts)
    model = build_gpt(spec, dtype=source.dtype, device=device)
    if source.format is Format.TORCH_DIST:
        load_model(model, source.path)
    else:
        load_legacy_model(model, source.path, spec, getattr(source.args, "pipeline_model_parallel_size", 1))
    return model


def hf_model(root: Path, device) -> torch.nn.Module:
    """transformers' own model of an HF directory, in eval mode (the whole model: a check tool)."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise MegacloneError("checking against a Hugging Face model needs transformers",
                             "pip install transformers") from exc
    hf_logging.disable_progress_bar()  # transformers 5 draws a bar per load: noise in a check's report
    return AutoModelForCausalLM.from_pretrained(str(root)).to(device).eval()
