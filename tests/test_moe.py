"""Dense to mixture-of-experts upcycling (tests/moe_worker.py, one torchrun of 4 ranks): experts from
the whole or granular slices of the (grown) dense MLP, at TP x EP = 2 x 2, 1 x 4, 4 x 1 and 1 x 2 (data
parallel), with width and depth growth and every router setting that preserves the function. The
upcycled model's per-rank logits (megatron-core's MoE layer) equal the dense source's; its parameters
equal megatron-core's own run-time upcycling of the same dense model; bad requests are refused before
anything is written."""

import pytest

from moe_worker import CASES, has_oracle
from util import run_worker


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_worker("moe_worker.py", 4, tmp_path_factory.mktemp("moe"), timeout=1200)


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
    ("moe-source", "already a mixture of 4 experts"),
])
def test_requests_that_cannot_be_upcycled_exactly_are_refused_before_writing(results, name, words):
    refused = results["refused"][name]
    assert refused["error"] is not None and words in refused["error"]
    assert not refused["wrote"]
