"""A mixture-of-experts source grown in width and depth, in this process (a world of one; the TP x EP
layouts are tests/moe_worker.py's): its logits through megatron-core's MoE layer are the source's, one
corrupted expert element fails the weight check naming the expert, and what megaclone does not grow
from an MoE source yet is refused before anything is written."""

import dataclasses
import shutil

import pytest
from util import overwrite_stored_value

from megaclone import sample
from megaclone.check.logits import verify
from megaclone.check.weights import check_weights
from megaclone.errors import MegacloneError
from megaclone.pipeline.clone import CloneConfig, Variant
from megaclone.pipeline.expand import expand
from megaclone.shape import presets
from megaclone.shape.request import Depth, Factors
from megaclone.shape.spec import Experts

FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """Four experts of FFN 48, each drawn on its own, top-2 softmax routing; grown 2x in width."""
    from megaclone.runtime import init_distributed

    init_distributed("cpu")
    root = tmp_path_factory.mktemp("moe-source")
    spec = dataclasses.replace(presets.preset_spec("llama", 1), experts=Experts(4, 2, ffn_hidden_size=48))
    sample.make_source(root / "src", spec, train_steps=0)
    expand(root / "src", root / "wide", Factors.uniform(2), 1)
    return root


@pytest.mark.parametrize("depth", [Depth(), Depth(2)])
def test_a_grown_mixture_computes_its_sources_logits(moe, tmp_path, depth):
    dst = moe / "wide" if depth.factor == 1 else tmp_path / "deep"
    if depth.factor > 1:
        expand(moe / "src", dst, Factors.uniform(2), 1, depth=depth)
    [r] = verify(moe / "src", dst)
    assert r.ok and r.max_rel < 1e-5, r.line()
    [w] = check_weights(moe / "src", dst)
    assert w.ok and w.checked > 0


def test_one_corrupted_expert_element_fails_the_weight_check_naming_the_expert(moe, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(moe / "wide", bad)
    overwrite_stored_value(bad, FC1, 5, 7.0, offset=(0, 2, 0, 0))  # layer 0, expert 2, row 0, column 5
    [w] = check_weights(moe / "src", bad)
    [m] = w.mismatches
    assert (m.key, m.layer, m.expert, m.index) == (FC1, 0, 2, (0, 5)), m.line()


@pytest.mark.parametrize("experts,factor,variant", [
    (Experts(8, 4), 2, "symmetric"),  # each expert's grown FFN cut in 2 slices
    (Experts(8, 4, ffn_hidden_size=24), 1, "diagonal"),
    (Experts(16, 8, ffn_hidden_size=48), 2, "diagonal"),  # 2 slices, each held by 2 experts
    (Experts(8, 4, ffn_hidden_size=48), 1, "symmetric"),  # 2 whole copies of each expert
], ids=["8-halves-w2", "8-halves", "16-halves-twice-w2", "8-copies"])
def test_more_experts_from_a_mixture_compute_its_logits(moe, tmp_path, experts, factor, variant):
    """E -> G x E: G experts per source expert, top-k x G, the router row copied to the G experts, each
    slice's second projection times the number of slices (docs/design.md, "More experts from a mixture")."""
    dst = tmp_path / "more"
    expand(moe / "src", dst, Factors.uniform(factor), 1, CloneConfig(Variant(variant)), experts=experts)
    [r] = verify(moe / "src", dst)
    assert r.ok and r.max_rel < 1e-5 and r.routes[0] > 0, r.line()
    [w] = check_weights(moe / "src", dst)
    assert w.ok, [m.line() for m in w.mismatches]


@pytest.mark.parametrize("router", [dict(score_function="sigmoid"), dict(pre_softmax=True)], ids=["sigmoid", "pre-softmax"])
def test_width_growth_keeps_any_router(tmp_path, router):
    """Sigmoid scores (DeepSeek-V3-like) and softmax before a top-2 of 4 (Qwen2-MoE-like): the router's
    logits are the source's, so whatever it computes from them is too."""
    spec = dataclasses.replace(presets.preset_spec("llama", 1), experts=Experts(4, 2, ffn_hidden_size=48, **router))
    sample.make_source(tmp_path / "src", spec, train_steps=0)
    expand(tmp_path / "src", tmp_path / "wide", Factors.uniform(2), 1)
    [r] = verify(tmp_path / "src", tmp_path / "wide")
    assert r.ok and r.routes[1] == 0, r.line()
    if "score_function" in router:  # sigmoid scores of slices do not add up to the expert's
        with pytest.raises(MegacloneError, match="slices do not add up"):
            expand(tmp_path / "src", tmp_path / "more", Factors.uniform(2), 1, experts=Experts(8, 4))
    else:  # softmax over every slice weighs each p_e / 2, the second projection's 2 restores it
        expand(tmp_path / "src", tmp_path / "more", Factors.uniform(2), 1, experts=Experts(8, 4))
        [r] = verify(tmp_path / "src", tmp_path / "more")
        assert r.ok and r.routes[1] == 0, r.line()


@pytest.mark.parametrize("kwargs,said", [
    (dict(experts=Experts(8, 2)), "top-2 does not pick whole groups of the 2 experts"),
    (dict(experts=Experts(6, 3)), "--num-experts 6 is not a multiple of the source's 4 experts"),
    (dict(experts=Experts(8, 4, ffn_hidden_size=36)), "an expert FFN of 36 does not cut"),
    (dict(experts=Experts(8, 4), grow_optimizer=True), r"new experts \(upcycled, or more from a mixture\)"),
])
def test_what_is_not_grown_from_a_mixture_yet_is_refused_before_writing(moe, tmp_path, kwargs, said):
    with pytest.raises(MegacloneError, match=said):
        expand(moe / "src", tmp_path / "d", Factors.uniform(2), kwargs.pop("tp", 1), **kwargs)
    assert not (tmp_path / "d").exists()


def test_the_logit_check_compares_the_top_k_choices(moe, tmp_path):
    [r] = verify(moe / "src", moe / "wide")
    assert r.routes[0] > 0 and r.routes[1] == 0, r.line()
    assert f"top-k experts: {r.routes[0]} of {r.routes[0]} token-layers as the source's" in r.line()
    bad = tmp_path / "bad"
    shutil.copytree(moe / "wide", bad)
    overwrite_stored_value(bad, "decoder.layers.mlp.router.weight", 0, 50.0)  # expert 0 of layer 0 pulls
    [r] = verify(moe / "src", bad)
    assert r.routes[1] > 0 and not r.ok, r.line()


@pytest.mark.parametrize("gate", [False, True], ids=["shared-expert", "gated-shared-expert"])
@pytest.mark.parametrize("growth", ["width", "depth", "experts"])
def test_a_shared_expert_grows_with_the_mixture(tmp_path_factory, gate, growth):
    """megatron-core's shared expert (a dense MLP every token passes), with and without its sigmoid gate
    (Qwen2-MoE's): a dense MLP's clone, and its gate a one-row router whose input columns are cloned."""
    root = tmp_path_factory.mktemp(f"shared-{gate}")
    if not (root / "src").exists():
        experts = Experts(4, 2, ffn_hidden_size=48, shared_ffn_hidden_size=64, shared_gate=gate)
        sample.make_source(root / "src", dataclasses.replace(presets.preset_spec("llama", 1), experts=experts),
                           train_steps=0)
    kwargs = {"depth": dict(depth=Depth(2)), "experts": dict(experts=Experts(8, 4))}.get(growth, {})
    expand(root / "src", root / growth, Factors.uniform(2), 1, **kwargs)
    [r] = verify(root / "src", root / growth)
    assert r.ok and r.max_rel < 1e-5, r.line()
    [w] = check_weights(root / "src", root / growth)
    assert w.ok and w.checked == {"width": 21, "depth": 39, "experts": 21}[growth] + 2 * gate * (1 + (growth == "depth"))


def test_ep_without_experts_is_refused_for_a_dense_source(moe, tmp_path):
    from megaclone.shape.request import grown_spec

    dense = presets.preset_spec("llama", 1)
    with pytest.raises(MegacloneError, match="--ep 2 splits experts, but the source is dense"):
        grown_spec(dense, Factors.uniform(2), 1, expert_parallel=2)


@pytest.mark.parametrize("variant", ["noisy-symmetric", "noisy-diagonal"])
def test_noise_goes_per_expert_block(moe, tmp_path, variant):
    """The noisy variants on an MoE source: each expert draws its own zero-sum noise, scaled per expert
    block to the requested SNR against that expert's cloned block W_S / c_in (measured here from the
    stored fc2 of the noisy clone, its exact variant and the symmetric clone: every expert, output and
    input copy), and the logits stay the source's."""
    import torch

    from megaclone.formats import torch_dist

    def fc2(name, v):
        expand(moe / "src", tmp_path / name, Factors.uniform(2), 1, CloneConfig(Variant(v), seed=3))
        key = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
        return torch_dist.load_plain_tensors(torch_dist.find_checkpoint(tmp_path / name))[key][0].double()

    noisy, exact, symmetric = fc2("noisy", variant), fc2("exact", variant.removeprefix("noisy-")), fc2("sym", "symmetric")
    [r] = verify(moe / "src", tmp_path / "noisy")
    assert r.ok and r.routes[1] == 0, r.line()
    h, f = 64, noisy.shape[2] // 2  # hidden 64 grown 2x; the expert's FFN in 2 input copies
    for e in range(noisy.shape[0]):
        for b in range(2):
            for j in range(2):
                block = (slice(b * h, (b + 1) * h), slice(j * f, (j + 1) * f))
                power = symmetric[e][block].square().mean()  # the cloned block W_S / c_in (times the gain)
                noise = (noisy[e][block] - exact[e][block]).square().mean()
                assert abs(10 * torch.log10(power / noise) - 10.0) < 1e-3, (e, b, j, float(10 * torch.log10(power / noise)))
    first, second = noisy[0] - exact[0], noisy[2] - exact[2]  # two source experts' noise: drawn apart
    assert torch.nn.functional.cosine_similarity(first.flatten(), second.flatten(), dim=0).abs() < 0.2
    [w] = check_weights(moe / "src", tmp_path / "noisy")
    assert w.ok and w.snr_db is not None and abs(w.snr_db[0] - 10) < 1e-3 and abs(w.snr_db[1] - 10) < 1e-3


def test_noisy_more_experts_keep_the_function(moe, tmp_path):
    """E -> 2E with noise: the experts holding slices of one source expert carry its noise blocks
    between them (the weight check measures each block's SNR over the experts that hold it)."""
    expand(moe / "src", tmp_path / "more", Factors.uniform(2), 1, CloneConfig(Variant.NOISY_SYMMETRIC, seed=3),
           experts=Experts(8, 4))
    [r] = verify(moe / "src", tmp_path / "more")
    assert r.ok and r.routes[1] == 0, r.line()
    [w] = check_weights(moe / "src", tmp_path / "more")
    assert w.ok and abs(w.snr_db[0] - 10) < 1e-3 and abs(w.snr_db[1] - 10) < 1e-3, [m.line() for m in w.mismatches]


@pytest.mark.slow
def test_the_trainer_continues_a_grown_mixture(tmp_path):
    """examples/pretrain_gpt.py on a grown MoE source (a world of one, TP 1): the clone's first-batch loss
    equals the source's within fp32's tolerance, and each iteration prints the load-balancing loss."""
    import subprocess
    import sys

    from util import ROOT

    from megaclone.runtime import init_distributed
    from megaclone.train.data import preprocess

    init_distributed("cpu")
    experts = Experts(4, 2, ffn_hidden_size=48, aux_loss_coeff=0.01)
    sample.make_source(tmp_path / "src", dataclasses.replace(presets.preset_spec("llama", 1), experts=experts),
                       train_steps=0)
    expand(tmp_path / "src", tmp_path / "wide", Factors.uniform(2), 1)
    preprocess(tmp_path / "data", seed=1234, max_documents=20)
    proc = subprocess.run([sys.executable, "examples/pretrain_gpt.py", "--load", str(tmp_path / "wide"), "--finetune",
                           "--use-checkpoint-args", "--data-path", str(tmp_path / "data"), "--split", "100,0,0",
                           "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
                           "--train-iters", "2", "--eval-iters", "0", "--lr", "1e-4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "within the fp32 tolerance" in proc.stdout, proc.stdout[-2000:]
    assert "load balancing loss" in proc.stdout, proc.stdout[-2000:]
