"""The reproduction's arithmetic against hand computations: target, smoothing, crossings, speedup,
and the paper's per-row symmetry measure."""

import pytest
import torch

from megaclone import scaling, toy
from megaclone.partition import param_rules
from megaclone.spec import Factors, grow

BASELINE = [(0, 5.0), (100, 4.0), (200, 3.0), (300, 2.5), (400, 2.1), (500, 1.9)]
RUN = [(0, 3.0), (100, 2.4), (200, 1.8), (300, 1.7)]


def test_speedup_against_a_hand_computation():
    # target = (2.1 + 1.9) / 2 = 2.0; baseline crosses it at 400 + 100 * (2.1 - 2.0) / (2.1 - 1.9) = 450;
    # the run at 100 + 100 * (2.4 - 2.0) / (2.4 - 1.8) = 166.67: speedup 450 / 166.67 = 2.7
    r = scaling.speedup(BASELINE, RUN, last=2)
    assert r["target_loss"] == pytest.approx(2.0)
    assert r["baseline_tokens"] == pytest.approx(450.0)
    assert r["tokens_to_target"] == pytest.approx(500 / 3)
    assert r["speedup"] == pytest.approx(2.7)


def test_smoothed_crossings_against_a_hand_computation():
    # window 2: baseline (400, 2.3), (500, 2.0) -> reaches 2.0 exactly at 500;
    # run (100, 2.7), (200, 2.1), (300, 1.75) -> 200 + 100 * (2.1 - 2.0) / (2.1 - 1.75) = 228.57
    assert scaling.smoothed(RUN, 2) == [(0, 3.0), (100, 2.7), (200, pytest.approx(2.1)), (300, pytest.approx(1.75))]
    r = scaling.speedup(BASELINE, RUN, last=2, window=2)
    assert r["baseline_tokens"] == pytest.approx(500.0)
    assert r["tokens_to_target"] == pytest.approx(200 + 100 * 0.1 / 0.35)
    assert r["speedup"] == pytest.approx(500.0 / (200 + 100 * 0.1 / 0.35))


def test_a_run_that_never_reaches_the_target_has_no_speedup():
    assert scaling.speedup(BASELINE, [(0, 3.0), (100, 2.5)], last=2)["speedup"] is None


def test_a_run_at_the_target_before_training_is_flagged_not_averaged():
    r = scaling.speedup(BASELINE, [(0, 1.5), (100, 1.4)], last=2)
    assert r["from_start"] and r["tokens_to_target"] == 0.0 and r["speedup"] is None
    assert not scaling.speedup(BASELINE, RUN, last=2)["from_start"]


def test_seed_spread_against_a_hand_computation():
    # 2, 3, 4: mean 3, sample std sqrt(((-1)^2 + 0 + 1^2) / 2) = 1
    assert scaling.spread([2.0, 3.0, 4.0]) == {"mean": 3.0, "std": 1.0, "min": 2.0, "max": 4.0, "n": 3,
                                                "missing": 0, "from_start": 0}
    s = scaling.spread([2.0, None, None], from_start=1)
    assert s["mean"] is None and s["missing"] == 1 and s["from_start"] == 1 and s["min"] == 2.0


def test_rank_above_and_early_bump_against_hand_computations():
    assert scaling.rank_above([10.0, 1.0, 0.011, 0.009]) == 3  # above 1e-3 * 10 = 0.01
    # start 3.0; first quarter of 400 tokens = up to 100: max 3.2, so a rise of 0.2 (the 3.5 comes later)
    assert scaling.early_bump([(0, 3.0), (50, 3.2), (100, 3.1), (200, 3.5), (400, 2.0)]) == pytest.approx(0.2)
    assert scaling.early_bump([(0, 3.0), (100, 2.9), (400, 2.0)]) == 0.0


def test_row_cosines_measure_how_alike_the_copies_are():
    s = toy.preset_spec("llama", 1)
    rule = next(r for r in param_rules(s, grow(s, Factors.uniform(2), 1)) if r.key.endswith("linear_fc2.weight"))
    w = torch.randn(rule.rows.src_size, rule.cols.src_size, dtype=torch.float64)
    symmetric = w.repeat(2, 2) / 2
    assert scaling.row_cosines(rule, symmetric) == [pytest.approx(1.0)]
    flipped = torch.cat([torch.cat([w, w], 1), torch.cat([-w, -w], 1)])  # block (1, 1) = -(0, 0)
    assert scaling.row_cosines(rule, flipped) == [pytest.approx(-1.0)]
    [random] = scaling.row_cosines(rule, torch.randn(symmetric.shape, dtype=torch.float64))
    assert abs(random) < 0.2
