"""Dense to mixture-of-experts upcycling in one torchrun group of 4 ranks (TP x EP x DP as megatron-core
arranges them), every case expanded by the library and checked against megatron-core itself:

- per-rank logits of the upcycled model (megatron-core's MoE layer computing them) against the dense
  source's (``verify``);
- every parameter of each rank's MoE model, loaded by megatron-core, against megatron-core's own
  run-time upcycling (``upcycling_utils.upcycle_state_dict``) of the dense model: the source itself
  for width factor 1, megaclone's dense width clone otherwise (which tests/depth_worker.py and the
  end-to-end tests check against the block-algebra reference). For granular experts megatron-core
  spreads the factor G over fc1 and fc2 (G^(1/3) each with SwiGLU), megaclone puts it on fc2 alone
  (exact: SiLU is not homogeneous); the comparison undoes each side's scale;
- which experts each rank wrote (EP) and the args Megatron-LM reads;
- requests that cannot be upcycled exactly are refused before anything is written.

    torchrun --nproc_per_node 4 tests/workers.py OUT_DIR moe
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
from megaclone.errors import MegacloneError  # noqa: E402
from megaclone.pipeline.expand import expand  # noqa: E402
from megaclone.model import build_gpt, load_model  # noqa: E402
from megaclone.runtime import init_distributed, init_parallel  # noqa: E402
from megaclone.shape.request import Depth, Factors  # noqa: E402
from megaclone.shape.spec import Experts, ModelSpec  # noqa: E402
from megaclone.check.logits import verify  # noqa: E402
from megaclone.check.weights import check_weights  # noqa: E402
from e2e_worker import plain_tensors  # noqa: E402

# (name, width factor, experts, TP, depth, variant)
CASES = [
    ("w1-e4-k2-tp2-ep2", 1, Experts(4, 2, parallel=2), 2, Depth(), "symmetric"),
    ("w2-e4-k2-tp2-ep2", 2, Experts(4, 2, parallel=2), 2, Depth(), "symmetric"),
    # G = 4: a width-2 clone's FFN is two copies of the source's, so only G > 2 makes its slices differ
    ("w2-e8-k4-granular4-tp2-ep2", 2, Experts(8, 4, ffn_hidden_size=48, parallel=2), 2, Depth(), "symmetric"),
    ("w2-e8-k4-granular2-tp1-ep4", 2, Experts(8, 4, ffn_hidden_size=96, parallel=4), 1, Depth(), "diagonal"),
    ("w1-e4-k2-granular2-noisy-tp2-ep2", 1, Experts(4, 2, ffn_hidden_size=48, parallel=2), 2, Depth(),
     "noisy-symmetric"),
    ("w2-e4-k2-depth2-zero-router-tp4-ep1", 2, Experts(4, 2, router_init="zero"), 4, Depth(2), "symmetric"),
    ("w1-e4-k4-pre-softmax-tp1-ep2", 1, Experts(4, 4, parallel=2, pre_softmax=True), 1, Depth(), "symmetric"),
]

SCALED = ("linear_fc1.weight", "linear_fc2.weight")

# Growing a mixture-of-experts source (each expert drawn on its own, so a mixed-up expert shows):
# (name, source, width factor, TP, EP, depth, variant, more experts); "upcycled" is w2-e4-k2-tp2-ep2 above.
MOE_SOURCE_CASES = [
    ("moe-src-w2-tp2-ep2", "moe-source", 2, 2, 2, Depth(), "symmetric", None),  # TP 2 x EP 1 -> TP 2 x EP 2
    ("moe-src-w2-depth2-tp1-ep4", "moe-source", 2, 1, 4, Depth(2), "diagonal", None),
    ("upcycled-w2-tp4-ep1", "w2-e4-k2-tp2-ep2", 2, 4, 1, Depth(), "symmetric", None),  # EP 2 -> 1
    ("upcycled-w2-tp1-ep2", "w2-e4-k2-tp2-ep2", 2, 1, 2, Depth(), "symmetric", None),  # EP 2 -> 2, TP 2 -> 1
    ("moe-src-e8-k4-w2-tp2-ep2", "moe-source", 2, 2, 2, Depth(), "symmetric", Experts(8, 4, parallel=2)),
    ("moe-src-noisy-w2-tp2-ep2", "moe-source", 2, 2, 2, Depth(), "noisy-diagonal", None),  # per-expert noise blocks
]


def has_oracle(depth: Depth, variant: str) -> bool:
    """megatron-core's upcycling has no noise, diagonal variant or depth growth to compare with."""
    return depth.factor == 1 and variant == "symmetric"

VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")


def oracle_error(dense_spec: ModelSpec, dense_path: Path, moe_spec: ModelSpec, moe_path: Path, g: int) -> float:
    """Largest |ours - megatron-core's upcycling| over this rank's MoE parameters (all ranks' max), both
    models loaded by megatron-core at TP 1 and the checkpoint's EP."""
    from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

    # at TP 1: megatron-core's run-time upcycling slices each TP rank's shard of the dense FFN, so at
    # TP > 1 its granular experts depend on the TP; megaclone's are its TP-1 experts at every TP
    # (megatron-core's loader reshards the checkpoint to TP 1 here)
    init_parallel(1, 1, moe_spec.expert_parallel)
    dense = build_gpt(dataclasses.replace(dense_spec, tensor_parallel=1))
    load_model(dense, torch_dist.find_checkpoint(dense_path))
    moe = build_gpt(dataclasses.replace(moe_spec, tensor_parallel=1))
    load_model(moe, torch_dist.find_checkpoint(moe_path))
    ours = moe.state_dict()
    theirs = upcycle_state_dict([moe], [dense])["model"]
    theirs_scale, ours_fc2_scale = g ** (1 / 3), g  # SwiGLU: megatron-core's (G^(1/3) on each of fc1, fc2)
    worst = torch.zeros(1)
    if set(ours) != set(theirs):
        raise AssertionError(f"keys differ: {sorted(set(ours) ^ set(theirs))}")
    for key, mine in ours.items():
        if not isinstance(mine, torch.Tensor) or key.endswith("_extra_state"):
            continue
        if key.endswith("mlp.router.weight") and g > 1:
            # megatron-core draws rows for E/G groups from a fresh router (its first E/G rows); applied to
            # ours, already grouped, it is not the identity: router_groups checks the grouping instead
            continue
        want = theirs[key]
        if ".experts." in key and key.endswith(SCALED):
            want = want / theirs_scale
            if key.endswith("linear_fc2.weight"):
                mine = mine / ours_fc2_scale
        if key in VOCAB:  # each model keeps the padding rows of the TP it was written at
            mine, want = mine[: moe_spec.vocab_size], want[: moe_spec.vocab_size]
        worst[0] = max(float(worst[0]), float((mine.float() - want.float()).abs().max()))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst[0])


def router_groups(path: Path, g: int) -> bool:
    """Every layer's router gives the G experts of a group (e div G) one row, and groups differ."""
    router = plain_tensors(path)["decoder.layers.mlp.router.weight"]  # layers x experts x hidden
    rows = router.unflatten(1, (-1, g))  # layers x groups x G x hidden
    same = bool((rows == rows[:, :, :1]).all())
    distinct = all(len({tuple(r.tolist()) for r in layer[:, 0]}) == layer.shape[0] for layer in rows)
    return same and distinct


def experts_written(path: Path) -> list[int]:
    """Expert indices whose fc2 rows hold values (each EP rank wrote its own; none is all zero)."""
    fc2 = plain_tensors(path)["decoder.layers.mlp.experts.experts.linear_fc2.weight"]
    return [e for e in range(fc2.shape[1]) if fc2[:, e].abs().sum() > 0]


def main(out: Path) -> None:
    rt = init_distributed()
    results: dict = {"cases": {}}
    spec = presets.preset_spec("llama", 2)
    sample.make_source(out / "llama", spec, train_steps=2)
    expand(out / "llama", out / "dense-w2", Factors.uniform(2), 2)  # the oracle's dense model at factor 2
    dense = {1: (spec, out / "llama"), 2: (ModelSpec.from_args(_args(out / "dense-w2")), out / "dense-w2")}

    for case, factor, experts, tp, depth, variant in CASES:
        dst = out / case
        expand(out / "llama", dst, Factors.uniform(factor), tp, CloneConfig(Variant(variant), seed=5), depth=depth,
               experts=experts)
        args = _args(dst)
        moe_spec = ModelSpec.from_args(args)
        record: dict = {"max_rel": max(r.max_rel for r in verify(out / "llama", dst)),
                        "experts_written": experts_written(dst),
                        "args": {k: getattr(args, k, None) for k in (
                            "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "expert_model_parallel_size",
                            "moe_router_pre_softmax", "moe_router_score_function", "num_layers", "hidden_size")}}
        g = moe_spec.experts.granularity(moe_spec.ffn_hidden_size)
        if experts.router_init == "random":
            record["router_groups"] = router_groups(dst, g)
        if has_oracle(depth, variant):
            dense_spec, dense_path = dense[factor]
            record["oracle_max_abs"] = oracle_error(dense_spec, dense_path, moe_spec, dst, g)
        results["cases"][case] = record
        dist.barrier()

    moe_spec = dataclasses.replace(spec, experts=Experts(4, 2, ffn_hidden_size=48))
    sample.make_source(out / "moe-source", moe_spec, train_steps=0)
    for case, src, factor, tp, ep, depth, variant, more in MOE_SOURCE_CASES:
        dst = out / case
        expand(out / src, dst, Factors.uniform(factor), tp, CloneConfig(Variant(variant), seed=5), depth=depth,
               expert_parallel=1 if more else ep, experts=more)
        weights = check_weights(out / src, dst)
        logits = verify(out / src, dst)
        results["cases"][case] = {
            "max_rel": max(r.max_rel for r in logits),
            "routes": [list(r.routes) for r in logits],
            "experts_written": experts_written(dst),
            "weights_checked": sum(w.checked for w in weights),
            "weight_mismatches": [m.line() for w in weights for m in w.mismatches]}
        dist.barrier()

    results["grown_optimizer"] = grown_optimizer_layouts(out, moe_spec)

    refusals = {
        "ep-does-not-fit-world": dict(factors=Factors.uniform(2), tp=4, experts=Experts(4, 2, parallel=2)),
        "granular-topk": dict(factors=Factors.uniform(2), tp=2, experts=Experts(4, 2, ffn_hidden_size=48)),
        "granular-size": dict(factors=Factors.uniform(2), tp=2, experts=Experts(4, 2, ffn_hidden_size=100)),
        "legacy-format": dict(factors=Factors.uniform(2), tp=2, experts=Experts(4, 2, parallel=2), save_format="torch"),
        "bias-source": dict(factors=Factors.uniform(1), tp=1, experts=Experts(4, 2), src="gpt2"),
        "moe-source": dict(factors=Factors.uniform(1), tp=2, experts=Experts(6, 2, parallel=2),
                           src="w2-e4-k2-tp2-ep2"),
    }
    sample.make_source(out / "gpt2", presets.preset_spec("gpt2", 1), train_steps=1)
    results["refused"] = {}
    for name, flags in refusals.items():
        src = out / flags.pop("src", "llama")
        target = out / f"refused-{name}"
        try:
            expand(src, target, flags.pop("factors"), flags.pop("tp"), **flags)
            message = None
        except MegacloneError as exc:
            message = str(exc)
        results["refused"][name] = {"error": message, "wrote": target.exists()}
    if rt.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()


# --grow-optimizer from a mixture, at other layouts: (name, TP, EP); the first is the reference
GROWN_OPTIMIZER_LAYOUTS = [("grown-optim-tp1-ep1", 1, 1), ("grown-optim-tp2-ep2", 2, 2), ("grown-optim-tp1-ep4", 1, 4)]


def grown_optimizer_layouts(out: Path, moe_spec: ModelSpec) -> dict:
    """A training checkpoint of a mixture (two AdamW steps on the same seeded gradients on every rank, so
    the four data-parallel replicas agree) grown 2x with --grow-optimizer at each layout: the state is
    stored under global keys, so every layout must write the tensors (weights and every moment) that the
    TP 1 x EP 1 expansion writes, whose step tests/unit_tests/test_grown_optimizer.py shows exact.
    Returns, per layout, the keys that differ from the reference's and how many were compared."""
    from megaclone.model import model_sharded_state_dict
    from megaclone.sample import checkpoint_args
    from megaclone.train.state import save_training_checkpoint

    init_parallel(1)
    torch.manual_seed(0)
    model = build_gpt(moe_spec, initialize=True)
    optimizer = torch.optim.AdamW(model.parameters())
    draw = torch.Generator().manual_seed(1)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=draw)
        optimizer.step()
    save_training_checkpoint(out / "moe-trained", 2, model_sharded_state_dict(model), checkpoint_args(moe_spec),
                             optimizer)
    for name, tp, ep in GROWN_OPTIMIZER_LAYOUTS:
        expand(out / "moe-trained", out / name, Factors.uniform(2), tp, expert_parallel=ep, grow_optimizer=True)
    def real_rows(tensors: dict) -> dict:  # the padded vocabulary depends on the TP: its real rows do not
        return {k: v[:moe_spec.vocab_size] if k.endswith(VOCAB) else v for k, v in tensors.items()}

    reference = real_rows(plain_tensors(out / GROWN_OPTIMIZER_LAYOUTS[0][0]))
    layouts = {}
    for name, _, _ in GROWN_OPTIMIZER_LAYOUTS[1:]:
        tensors = real_rows(plain_tensors(out / name))
        layouts[name] = {"compared": sorted(tensors), "differ": sorted(
            k for k in reference if k not in tensors or not torch.equal(tensors[k], reference[k]))}
    return layouts


def _args(root: Path):
    return torch_dist.read_common(torch_dist.find_checkpoint(root))["args"]

