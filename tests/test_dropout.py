"""Dropout as Megatron-LM draws it (it is what lets a symmetric clone's copies drift apart), and a
resumed run with dropout repeating the uninterrupted one exactly."""

import json
import sys

import pytest
from util import run, run_worker

from megaclone.train.data import preprocess


@pytest.mark.slow
def test_masks_differ_across_tp_ranks_only_inside_tensor_parallel_regions(tmp_path):
    r = run_worker("dropout_worker.py", 2, tmp_path)
    assert r["outside"][0] == r["outside"][1], "the default stream is shared by the TP ranks"
    assert r["after"][0] == r["after"][1]
    assert r["inside"][0] != r["inside"][1], "the tracker's model-parallel stream differs per TP rank"
    assert r["train_differs"] and r["eval_equal"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dropout-data")
    for i in range(12):
        (root / "docs").mkdir(exist_ok=True)
        (root / "docs" / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog " * 40)
    preprocess(root / "ds", [root / "docs"])  # in process: tools/preprocess_data.py is test_data.py's
    return root / "ds"


def _pretrain(data, *extra):
    flags = ["--tensor-model-parallel-size", "2", "--num-layers", "2", "--hidden-size", "32",
             "--num-attention-heads", "4", "--seq-length", "32", "--data-path", data, "--split", "10,2,0",
             "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--lr", "1e-3",
             "--eval-iters", "0", "--save-interval", "2", "--no-progress"]
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "examples/pretrain_gpt.py",
                *flags, *extra])


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory):
    """The uninterrupted run both resumes start from: 4 iterations at global batch 4, saved at 2 and 4."""
    out = tmp_path_factory.mktemp("dropout-whole")
    proc = _pretrain(data, "--save", out / "ckpt", "--log-json", out / "whole.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _losses(path) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in json.loads(path.read_text())["train"]}


@pytest.mark.slow
def test_a_resumed_run_with_dropout_repeats_the_uninterrupted_one(data, whole, tmp_path):
    resumed = _pretrain(data, "--load", whole / "ckpt", "--ckpt-step", "2", "--log-json", tmp_path / "resumed.json")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    loss = {"whole": _losses(whole / "whole.json"), "resumed": _losses(tmp_path / "resumed.json")}
    assert sorted(loss["resumed"]) == [3, 4]
    assert all(loss["resumed"][i] == loss["whole"][i] for i in (3, 4)), loss
    settings = json.loads((whole / "whole.json").read_text())["settings"]
    assert settings["hidden_dropout"] == settings["attention_dropout"] == 0.1  # Megatron-LM's defaults


@pytest.mark.slow
def test_a_resume_with_another_global_batch_size_continues_from_the_samples_consumed(data, whole, tmp_path):
    """Iteration 2 at global batch 4 consumed samples 0-7; resumed at global batch 8, iteration 3 reads
    samples 8-15 and the token counts continue from 8 samples, not from 2 x 8."""
    resumed = _pretrain(data, "--load", whole / "ckpt", "--ckpt-step", "2", "--global-batch-size", "8",
                        "--train-iters", "3", "--log-json", tmp_path / "b.json")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    [record] = json.loads((tmp_path / "b.json").read_text())["train"]
    assert record["iteration"] == 3 and record["tokens"] == (8 + 8) * 32
