"""Depth growth in one torchrun group of 4 ranks: every case expanded by the library, verified per rank.

Sources: a Llama-like model (RMSNorm, SwiGLU, grouped queries, RoPE) saved at TP 2 and a GPT-2-like
one (LayerNorm, biases, learned positions) at TP 1. Each case grows width and/or depth at a
destination TP (other ranks are data-parallel replicas) and is checked three ways:

- per-rank logits against the source's (megatron-core loads both; identity init only);
- every stored tensor, read back by megatron-core's ``load_plain_tensors`` (on every rank: it is a
  collective), against an independent
  reference: the block-algebra width clone, then layers copied and zeroed by hand (tests/reference.py);
- a destination declared for PP 2 run as a two-stage pipeline (tests/pp_worker.py).

A stack clone is refused by the verifier as not comparable; requests the pipeline size cannot split
are refused before anything is written. Writes results.json.

    torchrun --nproc_per_node 4 tests/workers.py OUT_DIR depth
"""

import dataclasses
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megaclone.formats import torch_dist  # noqa: E402
from megaclone import sample  # noqa: E402
from megaclone.shape import presets  # noqa: E402
from megaclone.pipeline.clone import CloneConfig, Variant  # noqa: E402
from megaclone.pipeline.index_maps import layer_map  # noqa: E402
from megaclone.errors import MegacloneError, NotComparable  # noqa: E402
from megaclone.pipeline.expand import expand  # noqa: E402
from megaclone.model import build_gpt, causal_logits, load_model  # noqa: E402
from megaclone.runtime import init_distributed, init_parallel  # noqa: E402
from megaclone.shape.request import Depth, Factors, grown_spec  # noqa: E402
from megaclone.shape.spec import ModelSpec  # noqa: E402
from megaclone.check.logits import verify  # noqa: E402
from e2e_worker import plain_tensors  # noqa: E402
from pp_worker import pipeline_logits  # noqa: E402
from reference import deepen_reference, expand_reference  # noqa: E402

# (name, source, width factor, depth, destination TP, variant, save format, declared PP)
CASES = [
    ("llama-w2-d2-interleave-tp4", "llama", 2, Depth(2), 4, "symmetric", "torch_dist", 1),
    ("llama-w2-d3-top-tp2", "llama", 2, Depth(3, "identity", "top"), 2, "symmetric", "torch_dist", 1),
    ("llama-w1-d2-top-tp1", "llama", 1, Depth(2, "identity", "top"), 1, "symmetric", "torch_dist", 1),
    ("llama-w2-d2-diagonal-tp2", "llama", 2, Depth(2), 2, "diagonal", "torch_dist", 1),
    ("llama-w2-d2-noisy-tp4", "llama", 2, Depth(2), 4, "noisy-symmetric", "torch_dist", 1),
    ("gpt2-w2-d2-interleave-tp4", "gpt2", 2, Depth(2), 4, "symmetric", "torch_dist", 1),
    ("gpt2-w1-d3-interleave-tp2", "gpt2", 1, Depth(3), 2, "symmetric", "torch_dist", 1),
    ("gpt2-w2-d2-top-legacy-tp2", "gpt2", 2, Depth(2, "identity", "top"), 2, "symmetric", "torch", 1),
    ("llama-w2-d2-pp2", "llama", 2, Depth(2), 2, "symmetric", "torch_dist", 2),
    ("llama-w1-d2-stack-tp2", "llama", 1, Depth(2, "stack"), 2, "symmetric", "torch_dist", 1),
]


def structure_error(src_path: Path, dst_path: Path, s: ModelSpec, factor: int, depth: Depth, variant: str) -> float:
    """Largest |stored - reference| over every tensor of the destination (vocab rows cut to the real
    vocab: padding rows depend on the TP); the reference is built from megatron-core's view of the
    source, never through megaclone."""
    src = plain_tensors(src_path)
    dst = plain_tensors(dst_path)
    wide = grown_spec(s, Factors.uniform(factor), 1)
    ref = deepen_reference(expand_reference(src, s, wide, variant), s.num_layers, depth.factor, depth.placement,
                           depth.init)
    if set(dst) != set(ref):
        raise AssertionError(f"keys differ: {sorted(set(dst) ^ set(ref))}")
    worst = 0.0
    for key, want in ref.items():
        got = dst[key]
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            got, want = got[: s.vocab_size], want[: s.vocab_size]
        if got.shape != want.shape:
            raise AssertionError(f"{key}: stored {tuple(got.shape)}, reference {tuple(want.shape)}")
        worst = max(worst, float((got.float() - want.float()).abs().max()))
    return worst


def added_layers_are_identity(dst_path: Path, depth: Depth, layers: int) -> bool:
    """Every added layer's attention output and second MLP projection (and biases) are zero."""
    dst = plain_tensors(dst_path)
    src_layer, copy = layer_map(depth, layers)(torch.arange(layers * depth.factor).numpy())
    added = [i for i in range(layers * depth.factor) if copy[i] > 0]
    residual = [k for k in dst if ".linear_proj." in k or ".linear_fc2." in k]
    return bool(added) and all(not dst[k][i].any() for k in residual for i in added)


def source_logits_full(spec: ModelSpec, path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    init_parallel(spec.tensor_parallel)
    model = build_gpt(spec)
    load_model(model, torch_dist.find_checkpoint(path))
    local = causal_logits(model, tokens).float()
    parts = [torch.empty_like(local) for _ in range(spec.tensor_parallel)]
    dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def main(out: Path) -> None:
    rt = init_distributed()
    results: dict = {"cases": {}}
    specs = {"llama": presets.preset_spec("llama", 2), "gpt2": presets.preset_spec("gpt2", 1)}
    for name, spec in specs.items():
        sample.make_source(out / name, spec, train_steps=2)

    for case, arch, factor, depth, tp, variant, save_format, pp in CASES:
        src, dst = out / arch, out / case
        expand(src, dst, Factors.uniform(factor), tp, CloneConfig(Variant(variant), seed=3), overwrite=True,
               depth=depth, save_format=save_format, pp=pp)
        record: dict = {"num_layers": ModelSpec.from_args(_args(dst)).num_layers}
        try:
            record["max_rel"] = max(r.max_rel for r in verify(src, dst))
        except NotComparable as exc:
            record["not_comparable"] = exc.problem
        if save_format == "torch_dist":  # megatron-core's load_plain_tensors is a collective
            s = specs[arch]
            if not variant.startswith("noisy"):
                record["structure_max_abs"] = structure_error(src, dst, s, factor, depth, variant)
            record["added_layers_are_identity"] = added_layers_are_identity(dst, depth, s.num_layers)
        if pp == 2:
            record["pipeline_max_rel"] = pipeline_max_rel(specs[arch], src, dst)
        results["cases"][case] = record
        dist.barrier()

    for flags, where in ((dict(depth=Depth(2), pp=3), "pp3"), (dict(depth=Depth(3), pp=4), "pp4")):
        try:
            expand(out / "llama", out / f"refused-{where}", Factors.uniform(2), 2, **flags)
        except MegacloneError as exc:
            results[f"{where}_error"] = str(exc)
        results[f"{where}_wrote"] = (out / f"refused-{where}").exists()
    if rt.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()


def _args(root: Path):
    for f in sorted(Path(root).rglob("model_optim_rng.pt")):  # a legacy destination
        return torch.load(f, map_location="cpu", weights_only=False)["args"]
    return torch_dist.read_common(torch_dist.find_checkpoint(root))["args"]


def pipeline_max_rel(spec: ModelSpec, src: Path, dst: Path) -> float:
    """The destination (declared PP 2) run as a TP 2 x PP 2 pipeline against the source's logits."""
    tokens = torch.randint(0, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    reference = source_logits_full(dataclasses.replace(spec, tensor_parallel=2), src, tokens)[..., : spec.vocab_size]
    wide = ModelSpec.from_args(_args(dst))
    logits = pipeline_logits(wide, torch_dist.find_checkpoint(dst), tokens)
    rel = torch.tensor([0.0])
    if logits is not None:
        rel[0] = ((logits[..., : spec.vocab_size] - reference).abs().max() / reference.abs().max()).item()
    dist.all_reduce(rel, op=dist.ReduceOp.MAX)
    return float(rel)

