"""Pipeline parallelism in one torchrun group of 4 ranks (TP 2 x PP 2 where a layout needs it).

1. A source saved by megatron-core at TP 2 x PP 2 (each stage saving its own layers) is expanded
   like any other and verified per rank against itself at PP 1.
2. The destination, declared for PP 2, is loaded by megatron-core at TP 2 x PP 2, stage by stage
   (strict), and run as a two-stage pipeline (activations sent from stage 0 to stage 1): the last
   stage's logits equal the PP-1 source's. Writes results.json.
"""

import dataclasses
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megaclone.formats import torch_dist  # noqa: E402
from megaclone import sample  # noqa: E402
from megaclone.shape import presets  # noqa: E402
from megaclone.pipeline.expand import expand  # noqa: E402
from megaclone.model import build_gpt, causal_logits, causal_mask, load_model  # noqa: E402
from megaclone.runtime import init_distributed, init_parallel  # noqa: E402
from megaclone.shape.request import Depth, Factors  # noqa: E402
from megaclone.shape.spec import ModelSpec  # noqa: E402
from megaclone.check.logits import verify  # noqa: E402


def pipeline_logits(spec: ModelSpec, path: Path, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits (gathered over TP) from a TP 2 x PP 2 pipeline; None on stage-0 ranks."""
    from megatron.core import parallel_state as ps

    init_parallel(2, 2)
    spec = dataclasses.replace(spec, tensor_parallel=2)
    model = build_gpt(spec)
    load_model(model, path)
    model.eval()
    batch, seq = tokens.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    with torch.no_grad():
        if ps.is_pipeline_first_stage():
            hidden = model(tokens, positions, causal_mask(seq))
            dist.send(hidden.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        hidden = torch.empty(seq, batch, spec.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
        local = model(tokens, positions, causal_mask(seq)).float()
    parts = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def main(out: Path) -> None:
    rt = init_distributed()
    results = {}
    spec = presets.preset_spec("llama", 2)
    src = out / "src-tp2-pp2"
    sample.make_source(src, spec, train_steps=0, pipeline_parallel=2)
    results["source_pp"] = torch_dist.read_common(torch_dist.find_checkpoint(src))["args"].pipeline_model_parallel_size

    dst = out / "wide-pp2"
    expand(src, dst, Factors.uniform(2), 4, overwrite=True, pp=2)
    results["verify_max_rel"] = max(r.max_rel for r in verify(src, dst))
    dst_args = torch_dist.read_common(torch_dist.find_checkpoint(dst))["args"]
    results["dst_args_pp"] = dst_args.pipeline_model_parallel_size
    from megaclone.errors import MegacloneError

    try:
        expand(src, out / "wide-pp3", Factors.uniform(2), 4, pp=3)
    except MegacloneError as exc:
        results["pp3_error"] = str(exc)
    results["pp3_wrote"] = (out / "wide-pp3").exists()

    tokens = torch.randint(0, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    init_parallel(2)
    reference = causal_logits(build_and_load(spec, src), tokens).float()
    parts = [torch.empty_like(reference) for _ in range(2)]
    from megatron.core import parallel_state as ps

    dist.all_gather(parts, reference, group=ps.get_tensor_model_parallel_group())
    reference = torch.cat(parts, dim=-1)[..., : spec.vocab_size]
    wide = ModelSpec.from_args(dst_args)
    logits = pipeline_logits(wide, torch_dist.find_checkpoint(dst), tokens)
    rel = torch.tensor([0.0])
    if logits is not None:
        rel[0] = ((logits[..., : spec.vocab_size] - reference).abs().max() / reference.abs().max()).item()
    dist.all_reduce(rel, op=dist.ReduceOp.MAX)
    results["pipeline_max_rel"] = float(rel)
    results.update(legacy_cases(out, spec))
    if rt.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()


def save_legacy(model, args, root: Path, te_names: bool) -> None:
    """Megatron-LM's --ckpt-format torch layout: iter_NNNNNNN/mp_rank_TT[_PPP]/model_optim_rng.pt with
    the model's state dict (local-spec names, or Transformer Engine names for the fused norms)."""
    from megatron.core import parallel_state as ps

    from megaclone.shape.layout import LOCAL_SPEC_NAMES

    tp_rank, stage = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    name = f"mp_rank_{tp_rank:02d}" + (f"_{stage:03d}" if ps.get_pipeline_model_parallel_world_size() > 1 else "")
    state = model.state_dict()
    if te_names:
        local_to_te = {v: k for k, v in LOCAL_SPEC_NAMES.items()}
        renamed = {}
        for key, value in state.items():
            for local, te in local_to_te.items():
                if key.endswith("." + local):
                    key = key[: -len(local)] + te
            renamed[key] = value
        state = renamed
    path = root / "iter_0000001" / name / "model_optim_rng.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if ps.get_data_parallel_rank() == 0:
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 1, "model": state}, path)
    dist.barrier()
    if dist.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text("1")
    dist.barrier()


def legacy_cases(out: Path, spec: ModelSpec) -> dict:
    """The same in-memory model saved both ways (legacy torch and torch_dist): the legacy source
    expands to a clone of the torch_dist twin, and verifies against it."""
    from megatron.core import parallel_state as ps

    results = {}
    for tp, pp, te in ((2, 2, False), (2, 1, True)):
        init_parallel(tp, pp)
        torch.manual_seed(21 + ps.get_tensor_model_parallel_rank())
        model = build_gpt(dataclasses.replace(spec, tensor_parallel=tp), initialize=True)
        # identical on data-parallel replicas, different per (TP rank, stage)
        sample.perturb_(model, torch.Generator().manual_seed(5 + 10 * ps.get_pipeline_model_parallel_rank()
                                                          + ps.get_tensor_model_parallel_rank()))
        # as in training, parameters Megatron replicates over TP (norms) are equal on every TP rank
        for param in model.parameters():
            if not getattr(param, "tensor_model_parallel", False):
                dist.broadcast(param.data, ps.get_tensor_model_parallel_src_rank(),
                               group=ps.get_tensor_model_parallel_group())
        args = sample.checkpoint_args(dataclasses.replace(spec, tensor_parallel=tp), pipeline_model_parallel_size=pp)
        name = f"legacy-tp{tp}-pp{pp}" + ("-te" if te else "")
        save_legacy(model, args, out / name, te)
        sample.save_like_megatron_lm(model, args, out / f"{name}-twin", iteration=1)
        dst = out / f"{name}-wide"
        expand(out / name, dst, Factors.uniform(2), 4, overwrite=True)
        results[f"{name}-vs-twin"] = max(r.max_rel for r in verify(out / f"{name}-twin", dst))
        results[f"{name}-vs-legacy"] = max(r.max_rel for r in verify(out / name, dst))
        # grown in depth too: added layers read their source layer from the legacy stage files
        deep = out / f"{name}-wide-deep"
        expand(out / name, deep, Factors.uniform(2), 4, overwrite=True, depth=Depth(2, "identity", "top"))
        results[f"{name}-vs-twin-deep"] = max(r.max_rel for r in verify(out / f"{name}-twin", deep))
        # a legacy destination (--save-format torch): loaded per TP rank with load_state_dict(strict)
        legacy_dst = out / f"{name}-wide-legacy"
        expand(out / name, legacy_dst, Factors.uniform(2), 4, overwrite=True, save_format="torch")
        results[f"{name}-legacy-dst-files"] = len(list(legacy_dst.glob("iter_0000000/mp_rank_*/model_optim_rng.pt")))
        results[f"{name}-legacy-dst-vs-twin"] = max(r.max_rel for r in verify(out / f"{name}-twin", legacy_dst))
    return results


def build_and_load(spec: ModelSpec, root: Path):
    model = build_gpt(dataclasses.replace(spec, tensor_parallel=2))
    load_model(model, torch_dist.find_checkpoint(root))
    return model

