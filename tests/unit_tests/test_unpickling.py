"""No checkpoint runs code when read: every pickle a checkpoint holds (a legacy model_optim_rng.pt,
common.pt, torch DCP's .metadata and its ShardedObject bytes) carries a payload that would create a
marker file, every reader refuses it with an error naming the file and the global, and the marker never
appears. A genuine checkpoint still reads (the other tests read many), and --trust-checkpoint-code lifts
the refusal for a harmless object outside the allowlist.

The payload is built by pickling an object whose ``__reduce__`` names ``os.system``: pickling only
records the call, unpickling would make it.
"""

import argparse
import fractions
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from util import rewrite_common, run, tree_hash

from megaclone import sample
from megaclone.errors import MegacloneError, refusing_code
from megaclone.formats import iterations, legacy, torch_dist, unpickling
from megaclone.formats.source import open_megatron_source
from megaclone.shape import presets


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    from megaclone.runtime import init_distributed

    init_distributed("cpu")
    root = tmp_path_factory.mktemp("unpickling") / "src"
    sample.make_source(root, presets.preset_spec("llama", 1, num_layers=1), train_steps=1)
    return root


@pytest.fixture(scope="module")
def evil(genuine, tmp_path_factory) -> dict:
    """Checkpoints with a payload in each pickle, and the marker file each payload would create."""
    base = tmp_path_factory.mktemp("evil")
    marker = base / "PAYLOAD_RAN"
    it = iterations.iteration_dirname(iterations.read_tracker(genuine))

    legacy = base / "legacy"
    (legacy / it / "mp_rank_00").mkdir(parents=True)
    (legacy / iterations.LATEST).write_text(str(iterations.read_tracker(genuine)))
    torch.save({"args": argparse.Namespace(tensor_model_parallel_size=Payload(marker)), "model": {}},
               legacy / it / "mp_rank_00" / "model_optim_rng.pt")

    common = base / "common"
    shutil.copytree(genuine, common)
    rewrite_common(common / it, lambda state: setattr(state["args"], "hidden_size", Payload(marker)))

    metadata = base / "metadata"
    shutil.copytree(genuine, metadata)
    (metadata / it / ".metadata").write_bytes(pickle.dumps(Payload(marker)))

    return {"marker": marker, "legacy": legacy, "common": common, "metadata": metadata,
            "hashes": {name: tree_hash(path) for name, path in
                       (("legacy", legacy), ("common", common), ("metadata", metadata))}}


def refused(evil, call, file: str) -> MegacloneError:
    with pytest.raises(MegacloneError, match="posix.system") as info:
        call()
    assert file in str(info.value) and "--trust-checkpoint-code" in info.value.fix
    assert not evil["marker"].exists(), "the payload ran"
    return info.value


@pytest.mark.parametrize("kind,file", [("legacy", "model_optim_rng.pt"), ("common", "common.pt"),
                                       ("metadata", ".metadata")])
def test_every_pickle_of_a_source_is_refused(evil, kind, file):
    refused(evil, lambda: open_megatron_source(evil[kind]), file)
    assert tree_hash(evil[kind]) == evil["hashes"][kind]


def test_legacy_model_state_is_refused(evil):
    ckpt = evil["legacy"] / iterations.iteration_dirname(iterations.read_tracker(evil["legacy"]))
    refused(evil, lambda: legacy.legacy_model_state(ckpt, 0, 1, 1), "model_optim_rng.pt")


def test_a_sharded_object_payload_is_refused(genuine, evil, tmp_path):
    """torch DCP loads ShardedObjects (the RNG state) with weights_only=False of its own accord."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject

    ckpt = tmp_path / "obj"
    ckpt.mkdir()
    dist_checkpointing.save({"rng_state": ShardedObject("rng_state", [Payload(evil["marker"])], (1,), (0,))},
                            str(ckpt))
    request = {"rng_state": ShardedObject("rng_state", None, (1,), (0,))}
    refused(evil, lambda: _load_refusing(ckpt, request), str(ckpt))


def _load_refusing(ckpt, request):
    from megatron.core import dist_checkpointing

    with refusing_code(ckpt):
        dist_checkpointing.load(request, str(ckpt))


def test_genuine_rng_state_loads(genuine):
    """The RNG state megaclone and Megatron-LM save (numpy arrays, tuples, tensors) is on the allowlist."""
    from megatron.core import dist_checkpointing

    from megaclone.train.state import rng_state_object

    path = torch_dist.find_checkpoint(genuine)
    loaded = dist_checkpointing.load({"rng_state": rng_state_object()}, str(path))
    assert loaded["rng_state"][0]["np_rng_state"][0] == "MT19937"


def test_trust_flag_lifts_the_refusal(tmp_path):
    """A harmless object outside the allowlist: refused by default, read when trusted."""
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"args": argparse.Namespace(ratio=fractions.Fraction(1, 3)), "model": {}}, path)
    with pytest.raises(Exception, match="fractions.Fraction"):
        unpickling.load(path)
    unpickling.trust_checkpoint_code()
    try:
        assert unpickling.load(path)["args"].ratio == fractions.Fraction(1, 3)
    finally:
        unpickling.trust_checkpoint_code(False)


@pytest.mark.slow
@pytest.mark.parametrize("tool,kind,file", [
    ("expand_sharded.py", "legacy", "model_optim_rng.pt"),
    ("verify_logits.py", "metadata", ".metadata"),
    ("export_hf.py", "common", "common.pt"),
    ("inspect_checkpoint.py", "common", "common.pt"),
    ("pretrain_gpt.py", "common", "common.pt"),
])
def test_every_tool_refuses_a_payload(evil, tmp_path, tool, kind, file):
    src = evil[kind]
    # one process, no launcher (a world of one): each tool reads the source the same way under torchrun
    flags = {"expand_sharded.py": ["--load", src, "--save", tmp_path / "out", "--tp", "1", "--no-progress"],
             "verify_logits.py": ["--src", src, "--dst", src],
             "export_hf.py": ["--load", src, "--save", tmp_path / "out"],
             "inspect_checkpoint.py": [src],
             "pretrain_gpt.py": ["--load", src, "--use-checkpoint-args", "--data-path", tmp_path / "none",
                                 "--train-iters", "1", "--seq-length", "8", "--micro-batch-size", "1", "--lr", "1e-4"]}
    script = f"examples/{tool}" if tool == "pretrain_gpt.py" else f"tools/{tool}"
    proc = run([sys.executable, script, *flags[tool]])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "posix.system" in out and file in out, out[-3000:]
    assert "error: " in proc.stderr, out[-3000:]
    assert not evil["marker"].exists(), "the payload ran"
    assert not (tmp_path / "out" / iterations.LATEST).exists()
