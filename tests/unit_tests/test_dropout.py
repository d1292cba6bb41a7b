"""Dropout as Megatron-LM draws it (it is what lets a symmetric clone's copies drift apart). A resumed
run with dropout repeating the uninterrupted one exactly is test_training.py's
test_resume_continues_exactly (a clone trained with dropout 0.1)."""

import pytest
from util import run_worker


@pytest.mark.slow
def test_masks_differ_across_tp_ranks_only_inside_tensor_parallel_regions(tmp_path):
    r = run_worker("dropout_worker.py", 2, tmp_path)
    assert r["outside"][0] == r["outside"][1], "the default stream is shared by the TP ranks"
    assert r["after"][0] == r["after"][1]
    assert r["inside"][0] != r["inside"][1], "the tracker's model-parallel stream differs per TP rank"
    assert r["train_differs"] and r["eval_equal"]


def test_the_trainers_dropouts_default_to_megatron_lms():
    from megaclone.train.args import build_parser

    args = build_parser().parse_args(["--seq-length", "8", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3"])
    assert args.hidden_dropout == args.attention_dropout == 0.1
