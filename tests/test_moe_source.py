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


@pytest.mark.parametrize("kwargs,said", [
    (dict(experts=Experts(8, 2)), "does not add experts to it yet"),
    (dict(cfg=CloneConfig(Variant.NOISY_SYMMETRIC)), "noisy clone and grown optimizer state"),
])
def test_what_is_not_grown_from_a_mixture_yet_is_refused_before_writing(moe, tmp_path, kwargs, said):
    with pytest.raises(MegacloneError, match=said):
        expand(moe / "src", tmp_path / "d", Factors.uniform(2), kwargs.pop("tp", 1), **kwargs)
    assert not (tmp_path / "d").exists()
