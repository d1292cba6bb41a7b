"""The trainer refuses what it would otherwise find out late, before building a model: an unwritable
--save (it trained the whole run, then crashed), a resume of a checkpoint without optimizer state
(megatron-core's KeyError), and damaged or truncated checkpoint files (AssertionError, EOFError),
each through the readers expand uses, as one MegacloneError. In this process (a world of one)."""

import shutil

import pytest
from util import tmpfs

from megaclone.errors import MegacloneError
from megaclone.train.args import build_parser, refuse_early
from megaclone.train.loop import prepare_args

TRAIN = ["--data-path", "unused", "--seq-length", "8", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3"]


def parsed(*flags: str):
    return build_parser().parse_args([*flags, *TRAIN])


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A grown clone: weights and args, no optimizer state."""
    from megaclone import sample
    from megaclone.pipeline.expand import expand
    from megaclone.runtime import init_distributed
    from megaclone.shape import presets
    from megaclone.shape.request import Factors

    init_distributed("cpu")
    root = tmp_path_factory.mktemp("trainer")
    sample.make_source(root / "src", presets.preset_spec("llama", 1), train_steps=0)
    expand(root / "src", root / "wide", Factors.uniform(2), 1)
    return root / "wide"


def test_an_unwritable_save_is_refused_before_torch(tmp_path):
    with tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        with pytest.raises(MegacloneError, match="cannot create it, .* is not writable"):
            refuse_early(parsed("--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2",
                                "--save", str(ro / "run")), 1)


def test_resuming_a_checkpoint_without_optimizer_state_names_finetune(clone):
    with pytest.raises(MegacloneError, match="holds no optimizer state") as info:
        prepare_args(parsed("--load", str(clone), "--use-checkpoint-args"), 1)
    assert "--finetune" in info.value.fix and "--no-load-optim" in info.value.fix
    prepare_args(parsed("--load", str(clone), "--use-checkpoint-args", "--finetune"), 1)  # the documented way


@pytest.mark.parametrize("damage,said", [
    (lambda ckpt: (ckpt / ".metadata").write_bytes(b"garbage"), "cannot read"),
    (lambda ckpt: _truncate(max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)), "truncated|incomplete|damaged"),
])
def test_damaged_checkpoint_files_are_refused_in_one_line(clone, tmp_path, damage, said):
    bad = tmp_path / "bad"
    shutil.copytree(clone, bad)
    damage(bad / "iter_0000000")
    with pytest.raises(MegacloneError, match=said):
        prepare_args(parsed("--load", str(bad), "--use-checkpoint-args", "--finetune"), 1)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
