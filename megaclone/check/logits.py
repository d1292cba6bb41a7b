"""Per-rank function-preservation check: the wide model's logits against the small model's.

Every rank builds the destination GPTModel at its TP and computes its own vocab slice of the logits;
the source model runs at the largest TP its shape allows within the same world, and its logits are
gathered so each rank compares the matching slice over the real vocabulary.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megaclone.errors import MegacloneError, NotComparable
from megaclone.formats import Format
from megaclone.formats.base import Source
from megaclone.formats.hf.reader import open_hf_source
from megaclone.formats.legacy import load_legacy_model
from megaclone.formats.source import open_megatron_source
from megaclone.model import build_gpt, causal_logits, load_model
from megaclone.reference import default_tolerance, hf_model, load_source_model
from megaclone.runtime import agree, gathered, init_parallel
from megaclone.shape.request import not_function_preserving
from megaclone.shape.spec import ModelSpec


@dataclass(frozen=True)
class RankResult:
    """One rank's comparison over vocab ids [vocab_start, vocab_stop) of the real vocabulary and
    [vocab_stop, padded_stop) of its padding rows (which Megatron's loss also covers)."""

    rank: int
    vocab_start: int
    vocab_stop: int
    padded_stop: int
    max_abs: float
    max_rel: float  # max |D - S| / max |S| over the compared slice (the whole real vocab's if the slice's is 0)
    tol: float
    tokens: int  # positions compared (every vocabulary id appears among the inputs)
    non_finite: str = ""  # where the first NaN or infinity of either model's logits is ("" if none)
    routes: tuple[int, int] = (0, 0)  # MoE: (token-layer top-k choices compared, how many differ)

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tol and not self.non_finite and not self.routes[1]

    def line(self) -> str:
        if self.non_finite:
            return f"rank {self.rank}: FAIL: {self.non_finite}"
        verdict = ("ok" if self.ok else "FAIL") + ("" if self.vocab_stop > self.vocab_start else " (padding rows only)")
        padding = f" + padding [{self.vocab_stop}, {self.padded_stop})" if self.padded_stop > self.vocab_stop else ""
        compared, differ = self.routes
        routes = f"  top-k experts: {compared - differ} of {compared} token-layers as the source's" if compared else ""
        return (
            f"rank {self.rank}: vocab [{self.vocab_start}, {self.vocab_stop}){padding} "
            f"max abs diff {self.max_abs:.3e}  max rel diff {self.max_rel:.3e}  (tol {self.tol:.0e}){routes} {verdict}"
        )


def first_non_finite(logits: torch.Tensor, whose: str, sequence: int, vocab_offset: int = 0) -> str:
    """'' if every logit is finite, else where the first NaN or infinity is (a difference of NaNs is NaN,
    and a maximum over NaNs hides them, so a check must look for them explicitly)."""
    bad = ~torch.isfinite(logits)
    if not bool(bad.any()):
        return ""
    b, position, column = (int(i) for i in torch.nonzero(bad)[0])
    return (f"the {whose} logits are not finite ({float(logits[b, position, column])}) at sequence {sequence + b}, "
            f"position {position}, vocab id {vocab_offset + column}")


@contextlib.contextmanager
def routes_of(model: torch.nn.Module):
    """Every MoE layer's top-k choice (its router's routing map, tokens x experts) per forward of
    ``model``, in call order: a list filled while the block runs."""
    found: list[torch.Tensor] = []
    hooks = [layer.mlp.router.register_forward_hook(lambda module, inputs, out: found.append(out[1].detach().clone()))
             for layer in model.decoder.layers if hasattr(layer.mlp, "router")]
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()


def routes_differing(source: list[torch.Tensor], clone: list[torch.Tensor]) -> tuple[int, int]:
    """(token-layers compared, how many chose other experts than the source): the clone's expert e
    stands for source expert e div (E_clone / E_source)."""
    compared = differ = 0
    for s, c in zip(source, clone):
        grouped = c.reshape(c.shape[0], s.shape[1], -1).any(dim=-1)
        compared += s.shape[0]
        differ += int((grouped != s).any(dim=-1).sum())
    return compared, differ


def _megatron_reference(source: Source, batches: list[torch.Tensor], device,
                        routes: Optional[list] = None) -> list[torch.Tensor]:
    """The source's logits over its whole padded vocabulary for each batch: the model at the largest
    TP its shape allows in this world, each rank's slice gathered."""
    from megatron.core import parallel_state

    model = load_source_model(source, device)
    group = parallel_state.get_tensor_model_parallel_group()
    out = []
    for tokens in batches:
        with routes_of(model) as found:
            local = causal_logits(model, tokens).float()
        if routes is not None:
            routes.append(found)
        parts = [torch.empty_like(local) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, local, group=group)
        out.append(torch.cat(parts, dim=-1))
    return out


def _hf_reference(root: Path, batches: list[torch.Tensor], device) -> list[torch.Tensor]:
    """transformers' own logits for an HF directory."""
    model = hf_model(root, device)
    with torch.no_grad():
        return [model(tokens).logits.float() for tokens in batches]


def coverage_tokens(vocab_size: int, seq_length: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences [n, seq_length] in which every id below ``vocab_size`` appears (a random order; the
    last sequence topped up with random ids), so every embedding row takes part in the comparison."""
    ids = torch.randperm(vocab_size, generator=generator)
    extra = (-vocab_size) % seq_length
    return torch.cat([ids, torch.randint(0, vocab_size, (extra,), generator=generator)]).view(-1, seq_length)


def _batches(vocab: int, positions: int, tokens: Optional[torch.Tensor], seed: int, batch: int,
             seq_length: int) -> list[torch.Tensor]:
    """What both models are fed: ``tokens`` (random ids below ``vocab`` when None), then sequences
    that hold every id below ``vocab`` (coverage_tokens), in groups of 4 x ``batch``."""
    gen = torch.Generator().manual_seed(seed)
    length = min(seq_length, positions)
    if tokens is None:
        tokens = torch.randint(0, vocab, (batch, length), generator=gen)
    if int(tokens.max()) >= vocab or tokens.shape[1] > positions:
        raise MegacloneError(f"tokens exceed the models (vocab {vocab}, positions {positions})",
                             "use a shorter --seq-length, or text whose byte values fit the vocabulary")
    return [tokens, *coverage_tokens(vocab, length, gen).split(max(1, batch * 4))]


def _rounds(batches: list[torch.Tensor], width: int, budget: int) -> list[list[torch.Tensor]]:
    """Batches grouped so that one group's reference slices ([tokens, width] fp32) fit ``budget``
    bytes; both models are loaded once per group."""
    rounds: list[list[torch.Tensor]] = [[]]
    used = 0
    for b in batches:
        size = b.numel() * width * 4
        if rounds[-1] and used + size > budget:
            rounds.append([])
            used = 0
        rounds[-1].append(b)
        used += size
    return rounds


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
    reference_budget: int = 256 << 20,
) -> list[RankResult]:
    """Compare per-rank logits with the source's (a Megatron checkpoint, or with ``src_hf`` a Hugging
    Face directory run by transformers itself) over ``tokens`` (random by default) and over sequences
    that hold every vocabulary id, on every column of the rank's slice, padding rows included;
    returns every rank's result on every rank. The reference logits are held for this rank's slice
    only, at most ``reference_budget`` bytes at a time (both models are reloaded per such round)."""

    def validate():
        src = open_hf_source(Path(src_hf)) if src_hf is not None else open_megatron_source(Path(src_root))
        dst = open_megatron_source(Path(dst_root))
        if (reason := not_function_preserving(dst.clone_record)) is not None:
            raise NotComparable(reason, "train it and compare losses instead; grow with --depth-init identity "
                                        "for a clone whose logits equal the source's")
        ranks = dst.spec.tensor_parallel * dst.spec.expert_parallel
        if dist.get_world_size() % ranks:
            layout = f"TP {dst.spec.tensor_parallel}" + (f" x EP {dst.spec.expert_parallel}"
                                                          if ranks > dst.spec.tensor_parallel else "")
            raise MegacloneError(f"the destination has {layout}, but the world size is {dist.get_world_size()}",
                                 f"launch with --nproc_per_node {ranks}")
        return src, dst

    source, destination = agree(validate)
    src_spec, dst_spec = source.spec, destination.spec
    vocab = min(src_spec.vocab_size, dst_spec.vocab_size)  # ids both models embed as real tokens
    batches = [t.to(device) for t in
               _batches(vocab, src_spec.max_position_embeddings, tokens, seed, batch, seq_length)]

    dst_tp = dst_spec.tensor_parallel
    width = dst_spec.padded_vocab_size // dst_tp
    start = (dist.get_rank() % dst_tp) * width  # megatron-core's TP rank with PP 1: the fastest-varying index
    real = vocab
    real_stop = min(max(start, real), start + width)
    max_abs, slice_scale, global_scale, compared, non_finite = 0.0, 0.0, 0.0, 0, ""
    # the top-k choices are compared layer for layer where both are mixtures of one depth
    compare_routes = bool(src_spec.experts and dst_spec.experts and src_spec.num_layers == dst_spec.num_layers
                          and src_hf is None)
    routes = (0, 0)
    for group in _rounds(batches, width, reference_budget):
        src_routes: list = []
        full = (_hf_reference(source.path, group, device) if src_hf is not None
                else _megatron_reference(source, group, device, src_routes))
        # the clone's padding rows past the source's are zero rows: logit 0
        expected = [torch.nn.functional.pad(f, (0, max(0, start + width - f.shape[-1])))[..., start:start + width]
                    for f in full]
        global_scale = max([global_scale] + [float(f[..., :real].abs().max()) for f in full])
        del full
        model = _destination_model(destination, dst_spec, destination.dtype, device)
        for b, (tokens_b, exp) in enumerate(zip(group, expected)):
            with routes_of(model) as dst_routes:
                found = causal_logits(model, tokens_b).float()
            if compare_routes:
                routes = tuple(a + d for a, d in zip(routes, routes_differing(src_routes[b], dst_routes)))
            sequence = compared // tokens_b.shape[1]
            non_finite = non_finite or (first_non_finite(exp[..., :real_stop - start], "source", sequence, start)
                                        or first_non_finite(found, "destination", sequence, start))
            diff = (found - exp).abs()
            max_abs = max(max_abs, float(diff.max()))
            slice_scale = max(slice_scale, float(exp.abs().max()))
            compared += tokens_b.numel()
        del model, expected
    scale = slice_scale if slice_scale > 0 else global_scale
    return gathered(RankResult(dist.get_rank(), start, real_stop, start + width, max_abs,
                               max_abs / max(scale, 1e-30), tol if tol is not None else default_tolerance(destination.dtype),
                               compared, non_finite, routes))


def verify_hf(
    src_hf: Path,
    dst_hf: Path,
    tokens: Optional[torch.Tensor] = None,
    tol: Optional[float] = None,
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
    batch: int = 2,
    seq_length: int = 32,
) -> list[RankResult]:
    """A Hugging Face destination against a Hugging Face source, transformers running both whole: the
    same tokens as :func:`verify` (random, and sequences that hold every vocabulary id), the batches
    dealt to the ranks; every rank's result on every rank, each over the whole vocabulary."""

    def validate():
        return open_hf_source(Path(src_hf)), open_hf_source(Path(dst_hf))

    src, dst = agree(validate)
    vocab = min(src.spec.vocab_size, dst.spec.vocab_size)
    batches = _batches(vocab, src.spec.max_position_embeddings, tokens, seed, batch, seq_length)
    mine = batches[dist.get_rank()::dist.get_world_size()]
    max_abs, scale, compared, non_finite = 0.0, 0.0, 0, ""
    if mine:
        expected = _hf_reference(src.path, [b.to(device) for b in mine], device)
        found = _hf_reference(dst.path, [b.to(device) for b in mine], device)
        for b, e, f in zip(mine, expected, found):
            sequence = compared // b.shape[1]
            non_finite = non_finite or (first_non_finite(e[..., :vocab], "source", sequence)
                                        or first_non_finite(f[..., :vocab], "destination", sequence))
            max_abs = max(max_abs, float((f[..., :vocab] - e[..., :vocab]).abs().max()))
            scale = max(scale, float(e[..., :vocab].abs().max()))
            compared += b.numel()
    return gathered(RankResult(dist.get_rank(), 0, vocab, vocab, max_abs, max_abs / max(scale, 1e-30),
                               tol if tol is not None else default_tolerance(dst.dtype), compared, non_finite))


def _destination_model(destination: Source, spec: ModelSpec, dtype: torch.dtype, device) -> torch.nn.Module:
    """The destination as megatron-core loads it at its own TP and EP (switches the parallel state to it)."""
    init_parallel(spec.tensor_parallel, 1, spec.expert_parallel)
    model = build_gpt(spec, dtype=dtype, device=device)
    if destination.format is Format.LEGACY:
        load_legacy_model(model, destination.path, spec)
    else:
        load_model(model, destination.path)
    return model


def text_tokens(path: str | Path, batch: int, seq_length: int) -> torch.Tensor:
    """Byte-level tokens of a UTF-8 file: ``batch`` consecutive windows of ``seq_length`` bytes."""
    data = Path(path).read_bytes()
    need = batch * seq_length
    if len(data) < need:
        raise MegacloneError(f"{path} has {len(data)} bytes, fewer than batch x seq-length = {need}",
                             "pass a longer file or a smaller --batch / --seq-length")
    return torch.tensor(list(data[:need]), dtype=torch.long).view(batch, seq_length)
