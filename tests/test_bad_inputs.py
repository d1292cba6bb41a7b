"""Bad input is refused with an error naming the problem and the fix, before anything is written.

Runs the library in this process as a world of one (gloo), against a real source checkpoint.
"""

import shutil
from pathlib import Path

import pytest
import torch

from megaclone import checkpoint as ckpt_io
from megaclone import toy
from megaclone.errors import MegacloneError
from megaclone.expand import destination_spec, expand
from megaclone.source import open_source
from megaclone.spec import Factors
from util import tree_hash


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from megaclone.runtime import init_distributed

    init_distributed("cpu")
    root = tmp_path_factory.mktemp("bad") / "src"
    toy.make_source(root, toy.preset_spec("llama", 1), train_steps=1)
    before = tree_hash(root)
    yield root
    assert tree_hash(root) == before, "the source checkpoint was modified"


def refused(src, dst, match, **kwargs):
    kwargs.setdefault("factors", Factors.uniform(2))
    kwargs.setdefault("tp", 1)
    before = tree_hash(Path(dst)) if Path(dst).exists() else None
    with pytest.raises(MegacloneError, match=match) as info:
        expand(src, dst, **kwargs)
    assert info.value.fix, "every refusal says how to fix it"
    if before is None:  # nothing that looks like a checkpoint appeared
        assert not (Path(dst) / ckpt_io.LATEST).exists()
    else:  # an existing destination is left exactly as it was
        assert tree_hash(Path(dst)) == before
    return info.value


def copy_of(source, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(source, dst)
    return dst


def test_factor_must_be_a_positive_integer(source, tmp_path):
    refused(source, tmp_path / "d", "factor must be a positive integer", factors=Factors(2, 0, 2))


def test_world_must_hold_whole_tp_groups(source, tmp_path):
    refused(source, tmp_path / "d", "not a multiple of --tp 3", tp=3)


def test_widths_must_divide_by_destination_tp(source):
    src = open_source(source)
    with pytest.raises(MegacloneError, match="16 attention heads, which does not divide by --tp 3"):
        destination_spec(src, Factors(2, 1, 2), 3)
    with pytest.raises(MegacloneError, match="16 query groups, which does not divide by --tp 32"):
        destination_spec(src, Factors(2, 2, 1), 32)
    with pytest.raises(MegacloneError, match="96 FFN hidden size, which does not divide by --tp 64"):
        destination_spec(src, Factors(2, 8, 1), 64)


def test_missing_tracker_file(source, tmp_path):
    src = copy_of(source, tmp_path)
    (src / ckpt_io.LATEST).unlink()
    refused(src, tmp_path / "d", "latest_checkpointed_iteration.txt")


def test_missing_shard_file_is_named(source, tmp_path):
    src = copy_of(source, tmp_path)
    victim = sorted(src.rglob("*.distcp"))[0]
    victim.unlink()
    err = refused(src, tmp_path / "d", "is missing")
    assert victim.name in str(err)


def test_truncated_shard_file_is_named(source, tmp_path):
    src = copy_of(source, tmp_path)
    victim = sorted(src.rglob("*.distcp"))[-1]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    err = refused(src, tmp_path / "d", "truncated")
    assert victim.name in str(err)


def _rewrite_args(src: Path, **changes):
    path = ckpt_io.find_checkpoint(src) / "common.pt"
    common = torch.load(path, weights_only=False)
    for k, v in changes.items():
        setattr(common["args"], k, v)
    torch.save(common, path)


def test_args_that_contradict_the_weights(source, tmp_path):
    src = copy_of(source, tmp_path)
    _rewrite_args(src, ffn_hidden_size=128)
    refused(src, tmp_path / "d", "args imply")


def test_unsupported_model_features(source, tmp_path):
    src = copy_of(source, tmp_path)
    _rewrite_args(src, num_experts=8)
    refused(src, tmp_path / "d", "mixture-of-experts")


def test_non_empty_destination_needs_overwrite(source, tmp_path):
    dst = tmp_path / "d"
    dst.mkdir()
    (dst / ckpt_io.LATEST).write_text("5")
    refused(source, dst, "not empty")
    (dst / "notes.txt").write_text("mine")
    refused(source, dst, "not a checkpoint", overwrite=True)
    assert (dst / "notes.txt").exists()


def test_destination_may_not_overlap_the_source(source):
    refused(source, source, "overlaps the source")
    refused(source, source / "inner", "overlaps the source")


def test_overwrite_replaces_an_old_checkpoint(source, tmp_path):
    dst = tmp_path / "d"
    expand(source, dst, Factors.uniform(2), 1)
    (dst / "iter_0000007").mkdir()
    expand(source, dst, Factors.uniform(2), 1, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["iter_0000000", ckpt_io.LATEST]
