"""--grow-optimizer: a training checkpoint's Adam moments grown with the weights (pipeline.optimizer),
and the trainer's --clone-adam-scaling. The exactness test of the derivation (docs/training.md,
"Growing the optimizer state"): with dropout 0, a symmetric clone resumed with its grown moments and
the per-tensor scaling takes its source's own AdamW step (weight decay, an active clip and a large
eps included): after one more step on the same batch the clone's logits are the source's after that
step, to rounding. Without the scaling, the same step moves the clone elsewhere. In this process (a
world of one, gloo); the trainer's own optimizer, step, checkpoint save and load."""

import argparse
import dataclasses

import pytest
import torch

from megaclone.formats import torch_dist
from megaclone.model import build_gpt, causal_logits, model_sharded_state_dict
from megaclone.pipeline.expand import expand
from megaclone.sample import checkpoint_args, perturb_
from megaclone.shape import presets
from megaclone.shape.request import Factors
from megaclone.shape.spec import Experts, ModelSpec
from megaclone.train.state import load_training_checkpoint, save_training_checkpoint
from megaclone.train.step import build_optimizer, build_scheduler, train_step

RECIPE = dict(lr=3e-3, min_lr=3e-4, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-4, weight_decay=0.1, clip_grad=0.05,
              lr_warmup_init=0.0, lr_warmup_iters=1, lr_decay_iters=10, lr_decay_style="cosine", train_iters=10,
              global_batch_size=2, micro_batch_size=2, num_experts=None)


def batch(vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (2, 17), generator=g)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 16),
            "position_ids": torch.arange(16).expand(2, 16)}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def world():
    from megaclone.runtime import init_distributed, init_parallel

    init_distributed("cpu")
    init_parallel(1)


@pytest.mark.parametrize("preset", ["llama", "gpt2", "llama-moe"])  # untied RMSNorm SwiGLU; tied LayerNorm
def test_a_symmetric_clone_with_grown_moments_takes_its_sources_step(world, tmp_path, preset):  # with biases; top-2 of 4
    spec = presets.preset_spec(preset.removesuffix("-moe"), 1)
    if preset.endswith("-moe"):
        spec = dataclasses.replace(spec, experts=Experts(4, 2, ffn_hidden_size=48))
    args = argparse.Namespace(**{**RECIPE, "num_experts": spec.experts.num if spec.experts else None})
    torch.manual_seed(0)
    small = build_gpt(spec, initialize=True)
    perturb_(small, torch.Generator().manual_seed(1))
    opt, sched = build_optimizer(small, args), build_scheduler(build_optimizer(small, args), args)
    sched = build_scheduler(opt, args)
    for seed in (10, 11):  # Adam has moments and a step count worth growing
        train_step(small, opt, sched, [batch(spec.vocab_size, seed)], args, torch.device("cpu"))
    saved = checkpoint_args(spec, **{k: v for k, v in RECIPE.items() if k != "num_experts"})
    save_training_checkpoint(tmp_path / "small", 2, model_sharded_state_dict(small), saved, opt, sched)
    expand(tmp_path / "small", tmp_path / "wide", Factors.uniform(2), 1, grow_optimizer=True)

    common = torch_dist.read_common(torch_dist.find_checkpoint(tmp_path / "wide"))
    wide_spec = dataclasses.replace(ModelSpec.from_args(common["args"]), tensor_parallel=1)
    scaling = {k: tuple(v) for k, v in common["megaclone"]["adam_scaling"].items()}
    tokens = torch.randint(0, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    step = batch(spec.vocab_size, 12)

    def wide_after_one_step(scaled: bool) -> torch.Tensor:
        wide = build_gpt(wide_spec)
        wide_opt = build_optimizer(wide, args, scaling=scaling if scaled else None)
        load_training_checkpoint(torch_dist.find_checkpoint(tmp_path / "wide"), wide, wide.sharded_state_dict(),
                                 wide_opt)
        assert {float(s["step"]) for s in wide_opt.state.values()} == {2.0}
        wide_sched = build_scheduler(wide_opt, args)
        wide_sched.load_state_dict(sched.state_dict())  # the source's place in the schedule
        assert relative(causal_logits(wide, tokens), causal_logits(small, tokens)) < 1e-5
        result = train_step(wide, wide_opt, wide_sched, [step], args, torch.device("cpu"))
        return causal_logits(wide, tokens), result

    scaled, scaled_step = wide_after_one_step(scaled=True)
    plain, _ = wide_after_one_step(scaled=False)
    small_step = train_step(small, opt, sched, [step], args, torch.device("cpu"))
    expected = causal_logits(small, tokens)
    assert small_step.grad_norm > args.clip_grad  # the clip is active, and measured as the source's
    assert abs(scaled_step.grad_norm - small_step.grad_norm) <= 1e-5 * small_step.grad_norm
    assert relative(scaled, expected) < 1e-5, relative(scaled, expected)
    assert relative(plain, expected) > 1e-3, relative(plain, expected)  # Adam's own settings move it elsewhere


def test_lr_scaling_alone_gives_each_tensor_its_lr_and_decay_and_keeps_adams_eps(world):
    """--clone-lr-scaling (a fresh optimizer): lr and min lr x a and weight decay / a per tensor; eps and
    the clip norm are Adam's own (no grown moments to match)."""
    from megaclone.pipeline.optimizer import adam_scaling
    from megaclone.shape.request import grown_spec

    args = argparse.Namespace(**RECIPE)
    spec = grown_spec(presets.preset_spec("llama", 1), Factors.uniform(2), 1)
    from megaclone.pipeline.rules import param_rules

    scales = adam_scaling(param_rules(presets.preset_spec("llama", 1), spec))
    wide = build_gpt(spec)
    groups = build_optimizer(wide, args, scaling={k: (a, None) for k, (a, _) in scales.items()}).param_groups
    by_a = {round(g["max_lr"] / args.lr, 6) for g in groups}
    assert by_a == {0.5, 1.0}  # matrices read 2 input copies; norms and the embedding none
    for g in groups:
        a = g["max_lr"] / args.lr
        assert g["min_lr"] == pytest.approx(args.min_lr * a) and g["eps"] == args.adam_eps
        assert g["wd_mult"] in (0.0, pytest.approx(1 / a))
        assert not any(hasattr(p, "clip_weight") for p in g["params"])


def trained_checkpoint(root, steps: int):
    """A training checkpoint of the llama preset after ``steps`` AdamW steps (moments and a step count)."""
    args = argparse.Namespace(**RECIPE)
    spec = presets.preset_spec("llama", 1)
    torch.manual_seed(0)
    small = build_gpt(spec, initialize=True)
    opt = build_optimizer(small, args)
    sched = build_scheduler(opt, args)
    for seed in range(10, 10 + steps):
        train_step(small, opt, sched, [batch(spec.vocab_size, seed)], args, torch.device("cpu"))
    save_training_checkpoint(root, steps, model_sharded_state_dict(small), checkpoint_args(spec, **RECIPE), opt, sched)
    return root


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A training checkpoint after one AdamW step."""
    return trained_checkpoint(tmp_path_factory.mktemp("trained") / "small", 1)


@pytest.mark.parametrize("state,value,said", [
    ("exp_avg_sq", -1e-3, "holds 1 negative values; Adam's second moment"),
    ("exp_avg", float("nan"), "holds 1 NaN or infinite values"),
    ("exp_avg_sq", float("inf"), "holds 1 NaN or infinite values"),
])
def test_a_damaged_moment_is_refused_naming_the_moment(trained, tmp_path, state, value, said):
    import shutil

    from util import overwrite_stored_value

    from megaclone.errors import MegacloneError

    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    key = f"optimizer.state.{state}.decoder.layers.mlp.linear_fc2.weight"
    overwrite_stored_value(bad, key, 3, value)
    with pytest.raises(MegacloneError, match=f"the source's {key} \\(layer 0\\) {said}"):
        expand(bad, tmp_path / "wide", Factors.uniform(2), 1, grow_optimizer=True)
    assert not (tmp_path / "wide" / "latest_checkpointed_iteration.txt").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_runs_fp32_main_weights_grow_and_the_clone_takes_its_sources_step(world, tmp_path, dtype):
    """Mixed precision (issue 34): the fp32 main weights of a bf16 or fp16 run are grown as the weights
    are, the half-precision weights are their rounding, the moments grow as in fp32, fp16's loss scale
    (its scale and trackers, mid-window) is carried over, and the clone resumed with
    --clone-adam-scaling takes its source's step: logits equal within bf16's rounding (2e-2 relative,
    the bf16 tolerance of the logit check; measured 1.1e-4), while its fp32 main weights give the
    source's main weights' function to 1e-5 before the step."""
    from megaclone.train.precision import DynamicLossScale, MainWeights

    args = argparse.Namespace(**RECIPE)
    spec = presets.preset_spec("llama", 1)
    torch.manual_seed(0)
    small = build_gpt(spec, initialize=True)
    perturb_(small, torch.Generator().manual_seed(1))
    small = small.to(dtype)
    main = MainWeights([p for p in small.parameters()])
    opt = build_optimizer(small, args, main)
    sched = build_scheduler(opt, args)
    scale = DynamicLossScale(2.0 ** 12, window=3) if dtype == torch.float16 else None
    for seed in (10, 11):
        train_step(small, opt, sched, [batch(spec.vocab_size, seed)], args, torch.device("cpu"), main=main, scale=scale)
    saved = checkpoint_args(spec, **RECIPE)
    saved.bf16, saved.fp16 = dtype == torch.bfloat16, dtype == torch.float16
    save_training_checkpoint(tmp_path / "small", 2, model_sharded_state_dict(small), saved, opt, sched, main=main,
                             scale=scale)
    expand(tmp_path / "small", tmp_path / "wide", Factors.uniform(2), 1, grow_optimizer=True)

    common = torch_dist.read_common(torch_dist.find_checkpoint(tmp_path / "wide"))
    assert common["iteration"] == 2 and "opt_param_scheduler" in common  # the run continues
    wide_spec = dataclasses.replace(ModelSpec.from_args(common["args"]), tensor_parallel=1)
    scaling = {k: tuple(v) for k, v in common["megaclone"]["adam_scaling"].items()}
    wide = build_gpt(wide_spec, dtype=dtype)
    wide_main = MainWeights([p for p in wide.parameters()])
    wide_opt = build_optimizer(wide, args, wide_main, scaling=scaling)
    wide_scale = DynamicLossScale(1.0, window=3) if scale else None
    load_training_checkpoint(torch_dist.find_checkpoint(tmp_path / "wide"), wide, wide.sharded_state_dict(),
                             wide_opt, main=wide_main, scale=wide_scale)
    if scale:  # two clean steps of a window of 3: the next one grows the scale, in both runs
        assert (wide_scale.scale, wide_scale.growth_tracker) == (scale.scale, scale.growth_tracker) == (2.0 ** 12, 2)
    for p, m in wide_main.main.items():  # the half-precision weights are the main weights rounded
        assert torch.equal(p, m.to(dtype))
    tokens = torch.randint(0, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))

    def fp32_logits(model, main_weights) -> torch.Tensor:  # the model's function at its fp32 main weights
        copy = build_gpt(dataclasses.replace(wide_spec if model is wide else spec))
        copy.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=True)
        with torch.no_grad():
            for (name, p), (_, m) in zip(copy.named_parameters(), ((n, main_weights.of(q)) for n, q in
                                                                  model.named_parameters())):
                p.copy_(m)
        return causal_logits(copy, tokens)

    assert relative(fp32_logits(wide, wide_main), fp32_logits(small, main)) < 1e-5
    wide_sched = build_scheduler(wide_opt, args)
    wide_sched.load_state_dict(common["opt_param_scheduler"])
    step = batch(spec.vocab_size, 12)
    train_step(wide, wide_opt, wide_sched, [step], args, torch.device("cpu"), main=wide_main, scale=wide_scale)
    train_step(small, opt, sched, [step], args, torch.device("cpu"), main=main, scale=scale)
    if scale:
        assert wide_scale.scale == scale.scale == 2.0 ** 13
    assert relative(fp32_logits(wide, wide_main), fp32_logits(small, main)) < 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("kind,model,tolerance", [
    ("bf16", ["--bf16"], 1e-2),
    ("moe", ["--disable-bias-linear", "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "48"], 1e-6),
])
def test_a_run_grown_mid_run_continues_its_schedule(tmp_path, kind, model, tolerance):
    """The commands a user runs (a world of one each): a bf16 source, or an fp32 mixture of 4 experts
    (top-2), trains 8 iterations on a cosine schedule, saving at 4; its iteration-4 checkpoint is grown 2x
    with --grow-optimizer; the clone, resumed without --finetune, trains iterations 5-8 at the source's
    learning rates on the source's next batches, its losses within bf16's 1e-2 or fp32's 1e-6 of the
    source's own (with --clone-adam-scaling, its gradient norms the source's too)."""
    import json
    import sys

    from util import run

    from megaclone.train.data import preprocess

    preprocess(tmp_path / "data", seed=1234, max_documents=40)
    recipe = ["--data-path", tmp_path / "data", "--split", "98,2,0", "--seq-length", "32", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--eval-iters", "0", "--lr", "3e-3", "--min-lr", "3e-4",
              "--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--train-iters", "8", "--hidden-dropout", "0",
              "--attention-dropout", "0"]

    def train(*flags, log):
        proc = run([sys.executable, "examples/pretrain_gpt.py", *recipe, *flags, "--log-json", log])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return {r["iteration"]: r for r in json.loads(log.read_text())["train"]}

    source = train("--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--swiglu", *model,
                   "--save", tmp_path / "src", "--save-interval", "4", log=tmp_path / "src.json")
    grown = run([sys.executable, "tools/expand_sharded.py", "--load", tmp_path / "src" / "iter_0000004", "--save",
                 tmp_path / "wide", "--tp", "1", "--factor", "2", "--grow-optimizer", "--no-progress"])
    assert grown.returncode == 0, grown.stderr[-3000:]
    clone = train("--load", tmp_path / "wide", "--use-checkpoint-args", "--clone-adam-scaling",
                  log=tmp_path / "clone.json")
    assert sorted(clone) == [5, 6, 7, 8]  # continued, not restarted
    for i in clone:
        assert clone[i]["lr"] == pytest.approx(source[i]["lr"], rel=1e-12)
        assert abs(clone[i]["lm_loss"] - source[i]["lm_loss"]) <= tolerance * source[i]["lm_loss"]
        assert clone[i]["grad_norm"] == pytest.approx(source[i]["grad_norm"], rel=2 * tolerance)


def test_identity_depth_growth_gives_added_layers_zero_moments(world, tmp_path):
    """Depth (issue 34): each source layer's first copy gets the moments width growth gives it; a layer
    added as an identity gets zero moments (no history) and the source's step count. Its residual
    outputs have nonzero gradients, so no moments can make the clone's next step its source's: that
    step is exact for the symmetric width clone only (docs/training.md)."""
    from megaclone.shape.request import Depth

    trained_checkpoint(tmp_path / "small", 2)
    expand(tmp_path / "small", tmp_path / "wide", Factors.uniform(2), 1, grow_optimizer=True)
    expand(tmp_path / "small", tmp_path / "deep", Factors.uniform(2), 1, grow_optimizer=True, depth=Depth(2))
    wide = torch_dist.load_plain_tensors(torch_dist.find_checkpoint(tmp_path / "wide"))
    deep = torch_dist.load_plain_tensors(torch_dist.find_checkpoint(tmp_path / "deep"))
    stacked = [k for k in deep if k.startswith("optimizer.state.exp_avg") and ".layers." in k]
    assert stacked
    for key in stacked:
        for layer in range(deep[key].shape[0]):  # interleaved: layer 2l is source layer l's first copy
            if layer % 2:
                assert not deep[key][layer].any(), (key, layer)
            else:
                assert torch.equal(deep[key][layer], wide[key][layer // 2]), (key, layer)
    common = torch_dist.read_common(torch_dist.find_checkpoint(tmp_path / "deep"))
    assert (common["optimizer"].get("optimizer", common["optimizer"]))["state"]["common_step"] == 2


def test_a_restarted_schedule_keeps_the_grown_moments_and_starts_at_iteration_0(world, tmp_path):
    """--restart-schedule: the clone is written at iteration 0 (tracker, args, no scheduler state), so
    the trainer resumes it on a new schedule from its flags, with the moments and Adam's step count a
    continuing clone gets; without --grow-optimizer the flag is refused before anything runs."""
    from megaclone.commands import grow

    trained_checkpoint(tmp_path / "small", 2)
    expand(tmp_path / "small", tmp_path / "on", Factors.uniform(2), 1, grow_optimizer=True)
    expand(tmp_path / "small", tmp_path / "new", Factors.uniform(2), 1, grow_optimizer=True, restart_schedule=True)
    assert (tmp_path / "new" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    common = torch_dist.read_common(torch_dist.find_checkpoint(tmp_path / "new"))
    assert common["iteration"] == 0 and "opt_param_scheduler" not in common
    assert (common["args"].iteration, common["args"].consumed_train_samples) == (0, 0)
    assert (common["optimizer"].get("optimizer", common["optimizer"]))["state"]["common_step"] == 2
    assert common["megaclone"]["restart_schedule"] and common["megaclone"]["grown_optimizer"]
    on = torch_dist.load_plain_tensors(torch_dist.find_checkpoint(tmp_path / "on"))
    new = torch_dist.load_plain_tensors(torch_dist.find_checkpoint(tmp_path / "new"))
    assert on.keys() - new.keys() == {"opt_param_scheduler", "num_floating_point_operations_so_far"}
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in new)
    assert all(torch.equal(on[k], new[k]) for k in new if isinstance(new[k], torch.Tensor))  # weights, moments
    with pytest.raises(SystemExit) as stop:
        grow.parse_args(["--load", str(tmp_path / "small"), "--save", str(tmp_path / "x"), "--tp", "1",
                         "--factor", "2", "--restart-schedule"])
    assert stop.value.code == 2 and not (tmp_path / "x").exists()
