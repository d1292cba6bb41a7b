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
