"""The verifier can fail: a damaged embedding row of any id, or a damaged output padding row (Megatron's
loss covers the padded vocabulary), is caught. Runs in this process as a world of one."""

import shutil

import pytest
from util import overwrite_stored_value

from megaclone import sample
from megaclone.check.logits import verify
from megaclone.pipeline.expand import expand
from megaclone.shape import presets
from megaclone.shape.request import Factors


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from megaclone.runtime import init_distributed

    init_distributed("cpu")
    root = tmp_path_factory.mktemp("verify")
    spec = presets.preset_spec("llama", 1)  # vocab 300, padded 304 at TP 1
    sample.make_source(root / "src", spec, train_steps=1)
    expand(root / "src", root / "dst", Factors.uniform(2), 1)
    return root / "src", root / "dst", spec


def _damaged(pair, tmp_path, key, row):
    src, dst, spec = pair
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    overwrite_stored_value(bad, key, row * 2 * spec.hidden_size, 1e3)  # the destination's hidden is 2h
    return src, bad


def test_the_clone_passes_on_every_column(pair):
    src, dst, spec = pair
    [r] = verify(src, dst)
    assert r.ok and r.max_rel < 1e-5
    assert (r.vocab_start, r.vocab_stop, r.padded_stop) == (0, 300, 304)
    assert r.tokens >= spec.vocab_size  # every id is an input somewhere


def test_a_damaged_embedding_row_of_any_id_fails(pair, tmp_path):
    import torch

    # an id the default random tokens (batch 2 x 32, seed 0) never show: only the coverage finds it
    drawn = set(torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0)).flatten().tolist())
    unseen = max(set(range(300)) - drawn)
    src, bad = _damaged(pair, tmp_path, "embedding.word_embeddings.weight", unseen)
    [r] = verify(src, bad, seed=0)
    assert not r.ok


def test_a_damaged_output_padding_row_fails(pair, tmp_path):
    src, bad = _damaged(pair, tmp_path, "output_layer.weight", 301)
    [r] = verify(src, bad)
    assert not r.ok


def test_non_finite_logits_fail_and_name_the_first_position(pair, tmp_path):
    """A NaN weight cloned on purpose (--allow-non-finite): both models' logits are NaN, their difference
    NaN, and a maximum over it had read 0 ('max abs diff 0.000e+00 ... PASS')."""
    from megaclone.check.report import prove
    from megaclone.check.weights import check_weights

    src, _, _ = pair
    nan_src = tmp_path / "nan-src"
    shutil.copytree(src, nan_src)
    overwrite_stored_value(nan_src, "decoder.layers.mlp.linear_fc2.weight", 0, float("nan"))
    expand(nan_src, tmp_path / "nan-dst", Factors.uniform(2), 1, allow_non_finite=True)
    [r] = verify(nan_src, tmp_path / "nan-dst")
    assert not r.ok and r.non_finite.startswith("the source logits are not finite (nan) at sequence 0, position 0")
    said = []
    assert not prove(nan_src, tmp_path / "nan-dst", said.append)
    assert any(line.startswith("FAIL: 1 of 1 ranks compute non-finite logits; the first: rank 0:") for line in said)
    [report] = check_weights(nan_src, tmp_path / "nan-dst")
    assert [m.why for m in report.mismatches] == ["not finite"]
    assert report.mismatches[0].key == "decoder.layers.mlp.linear_fc2.weight" and report.mismatches[0].layer == 0


def test_non_finite_hugging_face_logits_fail(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megaclone.check.logits import verify_hf

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "hf")
    [r] = verify_hf(tmp_path / "hf", tmp_path / "hf")
    assert not r.ok and "logits are not finite" in r.non_finite
