"""End-to-end: real megatron-core sources, real torchrun ranks, logits per rank, bytes across layouts.

One torchrun launch (4 ranks, gloo) runs the matrix (tests/e2e_worker.py): architectures {Llama-like,
GPT-2-like} x factors {2, 3} x every variant at destination TP 4, and the symmetric and noisy-diagonal
variants also at destination TP 2 and (symmetric, factor 2) from source TP 1 as well as 2.
"""

import pytest

from megaclone.shape import presets
from megaclone.shape.spec import pad_vocab

pytestmark = pytest.mark.slow  # torchrun jobs


@pytest.fixture(scope="module")
def results(four_rank_results):
    return four_rank_results["e2e"]


def test_matrix_is_complete(results):
    seen = {(c["arch"], c["src_tp"], c["dst_tp"], c["variant"], c["factor"]) for c in results["cases"]}
    assert len(seen) == 2 * (8 + 6)  # per arch: factor 2 (4 + 2 + 1 + 1 layouts), factor 3 (2 + 2 + 1 + 1)
    assert {c["dst_tp"] for c in results["cases"]} == {2, 4} and {c["src_tp"] for c in results["cases"]} == {1, 2}
    assert all(c["ranks"] == 4 for c in results["cases"])


def test_every_rank_matches_source_logits(results):
    """Verified at the widest layout of each group; the other layouts are bit-identical to it
    (test_layouts_give_bit_identical_destinations)."""
    verified = [c for c in results["cases"] if c["max_rel"] is not None]
    groups = {(c["arch"], c["variant"], c["factor"], c["src_tp"]) for c in results["cases"]}
    assert {(c["arch"], c["variant"], c["factor"], c["src_tp"]) for c in verified} == groups
    assert all(c["dst_tp"] == 4 for c in verified)
    bad = [c for c in verified if not c["max_rel"] <= 1e-5]
    assert not bad, f"{len(bad)} cases exceed 1e-5 relative: {bad[:3]}"


def test_resharded_source_is_the_same_function(results):
    assert results["notes"]["llama-reshard-max-rel"] < 1e-5
    assert results["notes"]["gpt2-reshard-max-rel"] < 1e-5


def test_layouts_give_bit_identical_destinations(results):
    for group in results["groups"]:
        assert len(set(group["digests"].values())) == 1, (group["arch"], group["variant"], group["factor"],
                                                          group["digests"])


def test_exact_variants_equal_the_block_reference(results):
    for group in results["groups"]:
        # for noisy variants this is the max diff over tensors the noise leaves alone
        assert group["ref_max_diff"] == 0.0, (group["arch"], group["variant"], group["factor"])


def test_noise_cancels_and_has_the_requested_power(results):
    noisy = [g for g in results["groups"] if g["variant"].startswith("noisy")]
    assert noisy
    for group in noisy:
        assert group["zero_sum_max"] < 1e-6
        assert "output_layer.weight" not in group["noise_power_ratio"], "no noise on the output layer"
        # every block is at 10 dB exactly, and 2 * (c // 2) of the c input copies carry noise
        noised = 2 * (group["factor"] // 2) / group["factor"]
        for key, ratio in group["noise_power_ratio"].items():
            assert abs(ratio - noised) < 1e-4, (group["variant"], group["factor"], key, ratio)


def test_reruns_are_bit_identical_and_seed_matters(results):
    rerun = results["rerun"]
    assert rerun["7"][0] == rerun["7"][1]
    assert rerun["8"][0] != rerun["7"][0]


def test_verifier_fails_on_a_checkpoint_that_is_not_a_clone(results):
    assert not results["notes"]["non-clone-all-ok"]
    assert results["notes"]["non-clone-max-rel"] > 1e-2


def _needed_bytes(arch: str, factor: int, src_tp: int, tp: int, rank: int) -> int:
    """What destination TP rank ``rank`` must read of the source, from the shapes alone: a split axis
    of S source indices grown to f*S and cut into TP chunks of c needs min(c, S) distinct source
    indices (the clone tiles the axis); vocabulary rows need their overlap with the source's rows;
    replicated tensors are read whole. fp32, so 4 bytes an element."""
    s = presets.preset_spec(arch, src_tp)  # the source's vocabulary was padded for its own TP
    h, f, L = s.hidden_size, s.ffn_hidden_size, s.num_layers
    qkv = s.num_query_groups * (s.num_attention_heads // s.num_query_groups + 2) * s.kv_channels
    att = s.num_attention_heads * s.kv_channels
    dst_vocab = pad_vocab(s.vocab_size, s.make_vocab_size_divisible_by, tp)
    split = lambda size: min(size * factor // tp, size)  # noqa: E731
    rows = max(0, min((rank + 1) * dst_vocab // tp, s.padded_vocab_size) - rank * dst_vocab // tp)
    fc1_parts = 2 if s.swiglu else 1
    norms = 2 if s.normalization == "LayerNorm" else 1
    per_layer = (split(qkv) * h + split(att) * h + fc1_parts * split(f) * h + split(f) * h + 2 * norms * h)
    if s.add_bias_linear:
        per_layer += split(qkv) + h + fc1_parts * split(f) + h
    total = L * per_layer + rows * h + norms * h
    if not s.tied:
        total += rows * h
    if s.position_embedding_type == "learned_absolute":
        total += s.max_position_embeddings * h
    return 4 * total


def test_each_rank_reads_only_what_its_shard_needs(results):
    """Counted from the boxes each rank asks the reader for, against the analytic need: a planner
    that read whole tensors (or another rank's rows) fails here."""
    cases = [c for c in results["cases"] if c["variant"] == "symmetric"]
    assert cases
    for c in cases:
        for rank, got in enumerate(c["bytes_read"]):
            want = _needed_bytes(c["arch"], c["factor"], c["src_tp"], c["dst_tp"], rank % c["dst_tp"])
            assert got == want, (c["arch"], c["factor"], c["src_tp"], c["dst_tp"], rank, got, want)
