"""Pipeline parallelism and legacy sources (tests/pp_worker.py, 4 ranks): a PP source reads like any
other; a destination declared for PP 2 loads in megatron-core at TP 2 x PP 2 and, run as a two-stage
pipeline, gives the source's logits; legacy --ckpt-format torch sources, with and without PP, clone
exactly."""


import pytest

pytestmark = pytest.mark.slow  # torchrun jobs


@pytest.fixture(scope="module")
def results(four_rank_results):
    return four_rank_results["pp"]


def test_pipeline_parallel_source_expands_and_verifies(results):
    assert results["source_pp"] == 2
    assert results["verify_max_rel"] <= 1e-5


def test_destination_runs_as_a_two_stage_pipeline(results):
    assert results["dst_args_pp"] == 2
    assert results["pipeline_max_rel"] <= 1e-5


def test_pipeline_size_must_divide_the_layers(results):
    assert "--pp 3 does not divide the 2 layers" in results["pp3_error"]
    assert not results["pp3_wrote"]


@pytest.mark.parametrize("case", ["legacy-tp2-pp2", "legacy-tp2-pp1-te"])
def test_legacy_torch_source_expands_to_a_clone_of_its_torch_dist_twin(results, case):
    """The same model saved in Megatron-LM's legacy format (mp_rank_TT[_PPP], local or Transformer
    Engine module names) and in torch_dist: the clone of the legacy one matches both, and so does its
    clone grown 2x in depth too. The legacy reference is loaded by megatron-core (load_state_dict,
    strict), not by megaclone's reader."""
    worst = {ref: results[f"{case}-vs-{ref}"] for ref in ("twin", "legacy", "twin-deep")}
    assert max(worst.values()) <= 1e-5, worst


def test_legacy_torch_destination_loads_per_rank_and_verifies(results):
    for case in ("legacy-tp2-pp2", "legacy-tp2-pp1-te"):
        assert results[f"{case}-legacy-dst-files"] == 4
        assert results[f"{case}-legacy-dst-vs-twin"] <= 1e-5
