"""Depth growth end to end (tests/depth_worker.py, one torchrun of 4 ranks): depth 2 and 3, interleave
and top, with and without width growth, at TP 1/2/4, declared PP 2, a legacy destination, every
exact variant and a noisy one; the identity clones' per-rank logits equal the source's, and every
stored tensor equals an independent layer-by-layer reference."""

import pytest
from depth_worker import CASES

pytestmark = pytest.mark.slow  # torchrun jobs


@pytest.fixture(scope="module")
def results(four_rank_results):
    return four_rank_results["depth"]


IDENTITY = [c for c in CASES if c[3].init == "identity"]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_layers_multiply(results, case):
    arch, depth = next((c[1], c[3]) for c in CASES if c[0] == case)
    assert results["cases"][case]["num_layers"] == 2 * depth.factor


@pytest.mark.parametrize("case", [c[0] for c in IDENTITY])
def test_identity_clone_gives_the_source_logits_on_every_rank(results, case):
    assert results["cases"][case]["max_rel"] <= 1e-5


@pytest.mark.parametrize("case", [c[0] for c in CASES if c[6] == "torch_dist" and not c[5].startswith("noisy")])
def test_every_stored_tensor_equals_the_layer_by_layer_reference(results, case):
    """Added layers copy the (widened) source layer they follow; identity zeroes their residual outputs."""
    assert results["cases"][case]["structure_max_abs"] == 0.0


@pytest.mark.parametrize("case", [c[0] for c in CASES if c[6] == "torch_dist"])
def test_added_layers_write_nothing_to_the_residual_stream_under_identity_only(results, case):
    init = next(c[3].init for c in CASES if c[0] == case)
    assert results["cases"][case]["added_layers_are_identity"] == (init == "identity")


def test_a_depth_clone_runs_as_a_two_stage_pipeline(results):
    assert results["cases"]["llama-w2-d2-pp2"]["pipeline_max_rel"] <= 1e-5


def test_the_verifier_does_not_compare_a_stack_clone(results):
    record = results["cases"]["llama-w1-d2-stack-tp2"]
    assert "max_rel" not in record
    assert "--depth-init stack" in record["not_comparable"]


def test_a_pipeline_size_that_does_not_divide_the_grown_layers_is_refused_before_writing(results):
    assert "--pp 3 does not divide the 4 layers (2 x depth factor 2)" in results["pp3_error"]
    assert "--pp 4 does not divide the 6 layers (2 x depth factor 3)" in results["pp4_error"]
    assert not results["pp3_wrote"] and not results["pp4_wrote"]
