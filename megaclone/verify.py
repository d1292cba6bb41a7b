"""Per-rank function-preservation check: the wide model's logits against the small model's.

Every rank builds the destination GPTModel at its TP and computes its own vocab slice of the logits;
the source model runs at the largest TP its shape allows within the same world, and its logits are
gathered so each rank compares the matching slice over the real vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .errors import MegacloneError
from .model import build_gpt, causal_logits, load_model
from .runtime import agree, init_parallel
from . import checkpoint as ckpt_io
from .source import Source, open_hf_source, open_megatron_source
from .spec import ModelSpec, feasible_tp


@dataclass(frozen=True)
class RankResult:
    """One rank's comparison over vocab ids [vocab_start, vocab_stop)."""

    rank: int
    vocab_start: int
    vocab_stop: int
    max_abs: float
    max_rel: float  # max |D - S| / max |S| over the compared slice
    tol: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tol

    def line(self) -> str:
        verdict = ("ok" if self.ok else "FAIL") + ("" if self.vocab_stop > self.vocab_start else " (padding rows only)")
        return (
            f"rank {self.rank}: vocab [{self.vocab_start}, {self.vocab_stop}) "
            f"max abs diff {self.max_abs:.3e}  max rel diff {self.max_rel:.3e}  (tol {self.tol:.0e}) {verdict}"
        )


def default_tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


def _open(root: Path) -> tuple[Path, ModelSpec, torch.dtype, Source]:
    source = open_megatron_source(root)
    return source.path, source.spec, source.dtype, source


def load_source_model(source: Source, device) -> torch.nn.Module:
    """The source as a GPTModel at the largest TP its shape allows in this world (switches the
    parallel state to it). torch_dist loads through dist_checkpointing; other formats are copied in
    slice by slice (the expander's own path at factor 1, which is the identity)."""
    from megatron.core import parallel_state

    from .clone import CloneConfig
    from .expand import RankReport, fill_rank
    from .model import model_sharded_state_dict, parameter_slots

    tp = feasible_tp(source.spec, dist.get_world_size())
    init_parallel(tp)
    spec = dataclasses.replace(source.spec, tensor_parallel=tp)
    model = build_gpt(spec, dtype=source.dtype, device=device)
    if source.kind == "torch_dist":
        load_model(model, source.path)
    else:
        fill_rank(source, spec, parameter_slots(model_sharded_state_dict(model)), parallel_state.get_tensor_model_parallel_rank(),
                  CloneConfig(), RankReport(rank=dist.get_rank()))
    return model


def _full_logits(source: Source, tokens: torch.Tensor, device) -> torch.Tensor:
    """Logits over the whole padded vocab, computed at the largest feasible TP and gathered."""
    from megatron.core import parallel_state

    model = load_source_model(source, device)
    local = causal_logits(model, tokens).float()
    parts = [torch.empty_like(local) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _hf_logits(root: Path, tokens: torch.Tensor, device) -> torch.Tensor:
    """transformers' own logits for an HF directory (the whole model on every rank: a check tool)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise MegacloneError("verifying against a Hugging Face model needs transformers",
                             "pip install transformers") from exc
    model = AutoModelForCausalLM.from_pretrained(str(root)).to(device).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def _open_hf(root: Path) -> tuple[Path, ModelSpec, torch.dtype, Source]:
    source = open_hf_source(root)
    return source.path, source.spec, source.dtype, source


def verify(
    src_root: Optional[Path],
    dst_root: Path,
    tokens: Optional[torch.Tensor] = None,
    tol: Optional[float] = None,
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
    batch: int = 2,
    seq_length: int = 32,
    src_hf: Optional[Path] = None,
) -> list[RankResult]:
    """Compare per-rank logits with the source's (a Megatron checkpoint, or with ``src_hf`` a Hugging
    Face directory run by transformers itself); returns every rank's result on every rank."""
    from megatron.core import parallel_state

    def validate():
        src = _open_hf(Path(src_hf)) if src_hf is not None else _open(Path(src_root))
        dst = _open(Path(dst_root))
        if dist.get_world_size() % dst[1].tensor_parallel:
            raise MegacloneError(
                f"the destination has TP {dst[1].tensor_parallel}, but the world size is {dist.get_world_size()}",
                f"launch with --nproc_per_node {dst[1].tensor_parallel}",
            )
        return src, dst

    (src_path, src_spec, src_dtype, source), (dst_path, dst_spec, dst_dtype, destination) = agree(validate)
    if tokens is None:
        gen = torch.Generator().manual_seed(seed)
        shape = (batch, min(seq_length, src_spec.max_position_embeddings))
        tokens = torch.randint(0, src_spec.vocab_size, shape, generator=gen)
    if int(tokens.max()) >= src_spec.vocab_size or tokens.shape[1] > src_spec.max_position_embeddings:
        raise MegacloneError(
            f"tokens exceed the model (vocab {src_spec.vocab_size}, positions {src_spec.max_position_embeddings})",
            "use a shorter --seq-length, or text whose byte values fit the vocabulary",
        )
    tokens = tokens.to(device)
    if src_hf is not None:
        reference = _hf_logits(src_path, tokens, device)
    else:
        reference = _full_logits(source, tokens, device)

    init_parallel(dst_spec.tensor_parallel)
    model = build_gpt(dst_spec, dtype=dst_dtype, device=device)
    if destination.kind == "torch":  # Megatron-LM's legacy load: this TP rank's file, strict
        from megatron.core import parallel_state as ps

        file = ckpt_io.legacy_file(dst_path, ps.get_tensor_model_parallel_rank())
        model.load_state_dict(torch.load(file, map_location="cpu", weights_only=False)["model"], strict=True)
    else:
        load_model(model, dst_path)
    local = causal_logits(model, tokens).float()
    rank = parallel_state.get_tensor_model_parallel_rank()
    width = local.shape[-1]
    start, stop = rank * width, min((rank + 1) * width, src_spec.vocab_size, dst_spec.vocab_size)
    stop = max(start, stop)
    expected = reference[..., start:stop]
    diff = (local[..., : stop - start] - expected).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 1.0
    result = RankResult(dist.get_rank(), start, stop, max_abs, max_abs / max(scale, 1e-30),
                        tol if tol is not None else default_tolerance(dst_dtype))
    results: list = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    return results


def text_tokens(path: str | Path, batch: int, seq_length: int) -> torch.Tensor:
    """Byte-level tokens of a UTF-8 file: ``batch`` consecutive windows of ``seq_length`` bytes."""
    data = Path(path).read_bytes()
    need = batch * seq_length
    if len(data) < need:
        raise MegacloneError(f"{path} has {len(data)} bytes, fewer than batch x seq-length = {need}",
                             "pass a longer file or a smaller --batch / --seq-length")
    return torch.tensor(list(data[:need]), dtype=torch.long).view(batch, seq_length)
