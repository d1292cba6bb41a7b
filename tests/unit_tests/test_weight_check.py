"""The weight check (megaclone.check.weights) passes every variant's clean clone and fails what the
logit check cannot see: one weight scaled by 1.01, two heads swapped consistently (the function is
unchanged), noise that does not cancel. In this process, a world of one."""

import shutil

import pytest
from util import edit_stored_chunk

from megaclone import sample
from megaclone.check.logits import verify
from megaclone.check.weights import check_weights
from megaclone.pipeline.clone import CloneConfig, Variant
from megaclone.pipeline.expand import expand
from megaclone.shape import presets
from megaclone.shape.request import Depth, Factors
from megaclone.shape.spec import Experts

FC2 = "decoder.layers.mlp.linear_fc2.weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from megaclone.runtime import init_distributed

    init_distributed("cpu")
    root = tmp_path_factory.mktemp("weights") / "src"
    sample.make_source(root, presets.preset_spec("llama", 1), train_steps=1)  # 16 heads in 8 groups
    return root


@pytest.fixture(scope="module")
def clone(source):
    dst = source.parent / "wide"
    expand(source, dst, Factors.uniform(2), 1)
    return dst


CASES = [(variant, 2, Depth(), None) for variant in Variant] + [
    (Variant.NOISY_DIAGONAL, 3, Depth(), None),
    (Variant.NOISY_SYMMETRIC, 2, Depth(2, "identity", "interleave"), None),
    (Variant.SYMMETRIC, 1, Depth(2, "stack", "top"), None),
    # 8 experts of a quarter of the grown FFN each (G = 4), noisy; 4 whole-MLP experts under identity depth
    (Variant.NOISY_SYMMETRIC, 2, Depth(), Experts(8, 4, ffn_hidden_size=48)),
    (Variant.DIAGONAL, 2, Depth(2), Experts(4, 2, router_init="zero")),
]


@pytest.mark.parametrize("variant,factor,depth,experts", CASES, ids=lambda c: getattr(c, "value", str(c)))
def test_every_clean_clone_passes(source, tmp_path, variant, factor, depth, experts):
    dst = tmp_path / "wide"
    expand(source, dst, Factors.uniform(factor), 1, CloneConfig(variant, seed=4), depth=depth, experts=experts)
    [report] = check_weights(source, dst)
    assert report.ok, [m.line() for m in report.mismatches]
    # embedding, output layer, final norm; 6 a layer (a mixture: 2 norms, qkv, proj, router, 2 expert tensors)
    assert report.checked == 3 + (6 if experts is None else 7) * 2 * depth.factor
    if variant.noisy:
        low, high = report.snr_db
        assert 10 - 0.05 < low <= high < 10 + 0.05, report.snr_db


def _edit_layer_0(root, key, edit):
    """``edit`` applied in place to layer 0 of a stacked matrix (stored [1, rows, cols] at TP 1)."""
    edit_stored_chunk(root, key, lambda stored: edit(stored[0]))


def _damaged(clone, tmp_path, key, edit):
    bad = tmp_path / "bad"
    shutil.copytree(clone, bad)
    _edit_layer_0(bad, key, edit)
    return bad


def test_one_weight_scaled_by_1_01_fails_with_its_place(source, clone, tmp_path):
    def scale(t):
        t[5, 7] *= 1.01

    bad = _damaged(clone, tmp_path, FC2, scale)
    [report] = check_weights(source, bad)
    [mismatch] = report.mismatches
    assert (mismatch.key, mismatch.layer, mismatch.index, mismatch.out_copy, mismatch.in_copy) == (FC2, 0, (5, 7), 0, 0)
    assert mismatch.found == pytest.approx(mismatch.expected * 1.01, rel=1e-6)
    assert "decoder.layers.mlp.linear_fc2.weight layer 0 [5, 7]" in mismatch.line()


def test_two_heads_swapped_keep_the_logits_and_fail_the_weights(source, clone, tmp_path):
    """Query heads 0 and 1 share group 0's key and value: swapping their q rows and their columns of
    the output projection computes the same function, so the logit check passes; the heads are no
    longer the copies the clone defines."""
    from megaclone.formats import torch_dist

    head = torch_dist.read_common(torch_dist.find_checkpoint(clone))["args"].kv_channels  # rows per head

    def swap_rows(t):
        t[:head], t[head:2 * head] = t[head:2 * head].clone(), t[:head].clone()

    def swap_cols(t):
        t[:, :head], t[:, head:2 * head] = t[:, head:2 * head].clone(), t[:, :head].clone()

    bad = _damaged(clone, tmp_path, QKV, swap_rows)
    _edit_layer_0(bad, PROJ, swap_cols)
    [logits] = verify(source, bad)
    assert logits.ok, logits.line()
    [report] = check_weights(source, bad)
    assert {m.key for m in report.mismatches} == {QKV, PROJ}
    assert all(m.layer == 0 for m in report.mismatches)


def test_noise_that_does_not_cancel_fails(source, tmp_path):
    dst = tmp_path / "noisy"
    expand(source, dst, Factors.uniform(2), 1, CloneConfig(Variant.NOISY_SYMMETRIC, seed=4))

    def unbalance(t):
        t[3, 2] += 0.01  # input copy 0 of row 3 only: its pair no longer sums to the clone's values

    bad = _damaged(dst, tmp_path, FC2, unbalance)
    [report] = check_weights(source, bad)
    [mismatch] = report.mismatches
    assert (mismatch.key, mismatch.index[0]) == (FC2, 3) and "does not cancel" in mismatch.why


def test_a_checkpoint_megaclone_did_not_write_is_refused(source):
    from megaclone.errors import NotComparable

    with pytest.raises(NotComparable, match="holds no megaclone record"):
        check_weights(source, source)


def test_an_expert_off_its_slice_fails_with_its_number(source, tmp_path):
    dst = tmp_path / "moe"
    expand(source, dst, Factors.uniform(2), 1, experts=Experts(4, 2, ffn_hidden_size=96))  # G = 2

    def scale(t):  # layer 0, expert 0 of the stored [layer, expert, rows, cols] tensor
        t[0, 0, 2, 3] *= 1.01

    edit_stored_chunk(dst, "decoder.layers.mlp.experts.experts.linear_fc1.weight", scale)
    [report] = check_weights(source, dst)
    [mismatch] = report.mismatches
    assert (mismatch.layer, mismatch.expert, mismatch.index) == (0, 0, (2, 3)), mismatch.line()
    assert "expert 0" in mismatch.line()
