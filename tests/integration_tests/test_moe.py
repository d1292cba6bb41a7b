"""Dense to mixture-of-experts upcycling (tests/moe_worker.py, one torchrun of 4 ranks): experts from
the whole or granular slices of the (grown) dense MLP, at TP x EP = 2 x 2, 1 x 4, 4 x 1 and 1 x 2 (data
parallel), with width and depth growth and every router setting that preserves the function. The
upcycled model's per-rank logits (megatron-core's MoE layer) equal the dense source's; its parameters
equal megatron-core's own run-time upcycling of the same dense model; bad requests are refused before
anything is written."""

import pytest
from moe_worker import CASES, GROWN_OPTIMIZER_LAYOUTS, MOE_SOURCE_CASES, has_oracle

pytestmark = pytest.mark.slow  # torchrun jobs


@pytest.fixture(scope="module")
def results(four_rank_results):
    return four_rank_results["moe"]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_upcycled_model_gives_the_dense_source_logits_on_every_rank(results, case):
    assert results["cases"][case]["max_rel"] <= 1e-5


@pytest.mark.parametrize("case", [c[0] for c in CASES if has_oracle(c[4], c[5])])
def test_parameters_equal_megatron_cores_own_upcycling(results, case):
    record = results["cases"][case]
    assert record["oracle_max_abs"] <= 1e-6 if "granular" in case else record["oracle_max_abs"] == 0.0


@pytest.mark.parametrize("case", [c[0] for c in CASES if c[2].router_init == "random"])
def test_the_router_gives_each_group_of_slices_one_row(results, case):
    """Top-k then picks whole groups of the G slices of one copy of the dense MLP."""
    assert results["cases"][case]["router_groups"]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_every_expert_is_written_and_the_args_describe_the_mixture(results, case):
    _, factor, experts, _, depth, _ = next(c for c in CASES if c[0] == case)
    record = results["cases"][case]
    assert record["experts_written"] == list(range(experts.num))
    args = record["args"]
    assert (args["num_experts"], args["moe_router_topk"], args["expert_model_parallel_size"]) == (
        experts.num, experts.topk, experts.parallel)
    assert args["moe_ffn_hidden_size"] == (experts.ffn_hidden_size or 96 * factor)
    assert args["num_layers"] == 2 * depth.factor and args["hidden_size"] == 64 * factor
    assert args["moe_router_pre_softmax"] == experts.pre_softmax


@pytest.mark.parametrize("name, words", [
    ("ep-does-not-fit-world", "world size 4 is not a multiple of --tp 4 x --ep 2"),
    ("granular-topk", "top-2 cannot pick whole groups of the 4 slices"),
    ("granular-size", "--moe-ffn-hidden-size 100 does not divide the FFN hidden size 192"),
    ("legacy-format", "--save-format torch does not write mixture-of-experts"),
    ("bias-source", "upcycling a model with linear biases"),
    ("moe-source", "--num-experts 6 is not a multiple of the source's 4 experts"),
])
def test_requests_that_cannot_be_upcycled_exactly_are_refused_before_writing(results, name, words):
    refused = results["refused"][name]
    assert refused["error"] is not None and words in refused["error"]
    assert not refused["wrote"]


def test_a_trained_mixture_is_saved_with_both_norm_keys_and_resumes(tmp_path):
    """The trainer's save (world of one, in this process) also stores the pre-MLP norm under the key a
    Transformer Engine MoE layer loads; the optimizer state stays keyed by the local spec's key, so the
    checkpoint resumes with its optimizer."""
    import dataclasses

    import torch

    from megaclone.formats import torch_dist
    from megaclone.model import build_gpt, model_sharded_state_dict
    from megaclone.runtime import init_distributed, init_parallel
    from megaclone.shape import presets
    from megaclone.shape.spec import Experts
    from megaclone.train.state import load_training_checkpoint, save_training_checkpoint

    init_distributed("cpu")
    init_parallel(1)
    spec = dataclasses.replace(presets.preset_spec("llama", 1), experts=Experts(4, 2, ffn_hidden_size=96))
    model = build_gpt(spec, initialize=True)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():  # a step, so the optimizer has state to save
        p.grad = torch.full_like(p, 0.1)
    optimizer.step()
    path = save_training_checkpoint(tmp_path, 1, model_sharded_state_dict(model), spec.to_args(), optimizer)
    stored = torch_dist.read_tensor_metadata(path)
    local, te = "decoder.layers.mlp.linear_fc1.layer_norm_weight", "decoder.layers.pre_mlp_layernorm.weight"
    assert local in stored and te in stored
    assert f"optimizer.state.exp_avg.{local}" in stored and f"optimizer.state.exp_avg.{te}" not in stored
    fresh = build_gpt(spec, initialize=True)
    resumed = torch.optim.AdamW(fresh.parameters())
    load_training_checkpoint(path, fresh, fresh.sharded_state_dict(), resumed)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", [c[0] for c in MOE_SOURCE_CASES])
def test_a_grown_mixture_of_experts_gives_its_sources_logits_on_every_rank(results, case):
    """An MoE source (its experts drawn apart, or megaclone's own upcycled output) grown 2x in width (and
    depth), at another TP x EP: megatron-core's MoE layer computes the source's logits on every rank, and
    every stored expert, router and shared tensor is the clone of its own source tensor."""
    record = results["cases"][case]
    more = next(c[7] for c in MOE_SOURCE_CASES if c[0] == case)
    assert record["max_rel"] <= 1e-5
    assert record["experts_written"] == list(range(more.num if more else 4))
    assert record["weights_checked"] > 0 and record["weight_mismatches"] == []
    if "depth" not in case:  # the top-k choices are compared layer for layer
        assert all(compared > 0 and differ == 0 for compared, differ in record["routes"])


@pytest.mark.parametrize("layout", [name for name, _, _ in GROWN_OPTIMIZER_LAYOUTS[1:]])
def test_a_mixtures_grown_optimizer_state_is_the_same_at_every_layout(results, layout):
    """--grow-optimizer from a trained mixture at TP 2 x EP 2 and TP 1 x EP 4 writes the weights and every
    Adam moment (experts, router, the rest) the TP 1 x EP 1 expansion writes."""
    record = results["grown_optimizer"][layout]
    assert record["differ"] == []
    moments = [k for k in record["compared"] if k.startswith("optimizer.state.exp_avg")]
    assert any(".experts." in k for k in moments) and any(".router." in k for k in moments)
