"""The reproduction's arithmetic against hand computations: target, smoothing, crossings, speedup,
and the paper's per-row symmetry measure."""

import pytest
import torch

from megaclone.pipeline.rules import param_rules
from megaclone.shape import presets
from megaclone.shape.request import Factors, grown_spec
from megaclone.study import paper

BASELINE = [(0, 5.0), (100, 4.0), (200, 3.0), (300, 2.5), (400, 2.1), (500, 1.9)]
RUN = [(0, 3.0), (100, 2.4), (200, 1.8), (300, 1.7)]


def test_speedup_against_a_hand_computation():
    # target = (2.1 + 1.9) / 2 = 2.0; baseline crosses it at 400 + 100 * (2.1 - 2.0) / (2.1 - 1.9) = 450;
    # the run at 100 + 100 * (2.4 - 2.0) / (2.4 - 1.8) = 166.67: speedup 450 / 166.67 = 2.7
    r = paper.speedup(BASELINE, RUN, last=2)
    assert r["target_loss"] == pytest.approx(2.0)
    assert r["baseline_tokens"] == pytest.approx(450.0)
    assert r["tokens_to_target"] == pytest.approx(500 / 3)
    assert r["speedup"] == pytest.approx(2.7)


def test_smoothed_crossings_against_a_hand_computation():
    # window 2: baseline (400, 2.3), (500, 2.0) -> reaches 2.0 exactly at 500;
    # run (100, 2.7), (200, 2.1), (300, 1.75) -> 200 + 100 * (2.1 - 2.0) / (2.1 - 1.75) = 228.57
    assert paper.smoothed(RUN, 2) == [(0, 3.0), (100, 2.7), (200, pytest.approx(2.1)), (300, pytest.approx(1.75))]
    r = paper.speedup(BASELINE, RUN, last=2, window=2)
    assert r["baseline_tokens"] == pytest.approx(500.0)
    assert r["tokens_to_target"] == pytest.approx(200 + 100 * 0.1 / 0.35)
    assert r["speedup"] == pytest.approx(500.0 / (200 + 100 * 0.1 / 0.35))


def test_a_run_that_never_reaches_the_target_has_no_speedup():
    assert paper.speedup(BASELINE, [(0, 3.0), (100, 2.5)], last=2)["speedup"] is None


def test_a_run_at_the_target_before_training_is_flagged_not_averaged():
    r = paper.speedup(BASELINE, [(0, 1.5), (100, 1.4)], last=2)
    assert r["from_start"] and r["tokens_to_target"] == 0.0 and r["speedup"] is None
    assert not paper.speedup(BASELINE, RUN, last=2)["from_start"]


def test_seed_spread_against_a_hand_computation():
    # 2, 3, 4: mean 3, sample std sqrt(((-1)^2 + 0 + 1^2) / 2) = 1
    assert paper.spread([2.0, 3.0, 4.0]) == {"mean": 3.0, "std": 1.0, "min": 2.0, "max": 4.0, "n": 3,
                                                "missing": 0, "from_start": 0}
    s = paper.spread([2.0, None, None], from_start=1)
    assert s["mean"] is None and s["missing"] == 1 and s["from_start"] == 1 and s["min"] == 2.0


def test_rank_above_and_early_bump_against_hand_computations():
    assert paper.rank_above([10.0, 1.0, 0.011, 0.009]) == 3  # above 1e-3 * 10 = 0.01
    # start 3.0; first quarter of 400 tokens = up to 100: max 3.2, so a rise of 0.2 (the 3.5 comes later)
    assert paper.early_bump([(0, 3.0), (50, 3.2), (100, 3.1), (200, 3.5), (400, 2.0)]) == pytest.approx(0.2)
    assert paper.early_bump([(0, 3.0), (100, 2.9), (400, 2.0)]) == 0.0


def test_row_cosines_measure_how_alike_the_copies_are():
    s = presets.preset_spec("llama", 1)
    rule = next(r for r in param_rules(s, grown_spec(s, Factors.uniform(2), 1)) if r.key.endswith("linear_fc2.weight"))
    w = torch.randn(rule.rows.src_size, rule.cols.src_size, dtype=torch.float64)
    symmetric = w.repeat(2, 2) / 2
    assert paper.row_cosines(rule, symmetric) == [pytest.approx(1.0)]
    flipped = torch.cat([torch.cat([w, w], 1), torch.cat([-w, -w], 1)])  # block (1, 1) = -(0, 0)
    assert paper.row_cosines(rule, flipped) == [pytest.approx(-1.0)]
    [random] = paper.row_cosines(rule, torch.randn(symmetric.shape, dtype=torch.float64))
    assert abs(random) < 0.2


def _repro():
    import sys

    from util import ROOT

    sys.path.insert(0, str(ROOT / "examples"))
    import reproduce_scaling_smart

    return reproduce_scaling_smart


@pytest.fixture
def stored_report():
    """The reproduction's JSON as it is kept in examples/results (a real run's measurements)."""
    import copy
    import json

    from util import ROOT

    return copy.deepcopy(json.loads((ROOT / "examples" / "results" / "scaling_smart.json").read_text()))


def _statuses(repro, report) -> dict[str, str]:
    return {c["claim"].split(" (")[0].split(":")[0]: c["status"] for c in repro.claims(report, report["runs"])}


def test_each_claim_follows_its_stated_rule(stored_report):
    """The claims table's rules against reports edited so that the expected status is known by hand."""
    repro = _repro()
    r, v = stored_report, stored_report["variants"]
    clones = [c for c in repro.CLONES if c in v]
    for c in clones:  # every clone reached the target, at 3x: the headline holds and every variant wins
        v[c]["speedup"].update(mean=3.0, std=0.1, min=2.9, max=3.1, from_start=0, missing=0)
        for n in v[c]["runs"]:
            r["runs"][n].update(from_start=False, speedup=3.0)
    got = _statuses(repro, r)
    assert got["2.2x-4x fewer tokens to the random-init model's final accuracy"] == "reproduced"
    assert got["every variant beats random init"] == "reproduced"
    v[clones[0]]["speedup"].update(mean=1.5)  # one variant's mean below 2.2
    assert _statuses(repro, r)["2.2x-4x fewer tokens to the random-init model's final accuracy"] == "contradicted"
    for c in clones:  # every clone at the target before training: no finite speedup
        for n in v[c]["runs"]:
            r["runs"][n]["from_start"] = True
    assert _statuses(repro, r)["2.2x-4x fewer tokens to the random-init model's final accuracy"] == "inconclusive"
    # Figure 5: dropout 0 keeps cosine 1, dropout 0.1 falls below 0.999 in every group
    sym = r["symmetry"]
    groups = repro.scaling_groups(sym["symmetric-s1"][-1])
    for point in sym["symmetric-dropout0-s1"]:
        point.update({g: 1.0 for g in groups})
    sym["symmetric-s1"][-1].update({g: 0.99 for g in groups})
    assert _statuses(repro, r)["symmetry decays in training"] == "reproduced"
    sym["symmetric-s1"][-1][groups[0]] = 0.9995
    assert _statuses(repro, r)["symmetry decays in training"] == "contradicted"
    # Figure 8: final loss must fall as the base trains longer
    for name, loss in (("symmetric-from-third-s1", 3.0), ("symmetric-from-two-thirds-s1", 2.9), ("symmetric-s1", 2.8)):
        r["runs"][name]["final_loss"] = loss
    assert _statuses(repro, r)["a better-trained base gives a better clone"] == "reproduced"
    r["runs"]["symmetric-from-third-s1"]["final_loss"] = 2.85
    assert _statuses(repro, r)["a better-trained base gives a better clone"] == "contradicted"


def test_the_table_has_a_row_per_variant_and_claim(stored_report):
    repro = _repro()
    table = repro.markdown(stored_report)
    assert "| paper's claim | measured | status |" in table
    for name, g in stored_report["variants"].items():
        assert f"| {name} | {repro._fmt(g['speedup'])} |" in table
    for c in stored_report["claims"]:
        assert f"| {c['claim']} | {c['measured']} | {c['status']} |" in table
    # the spread format, by hand
    assert repro._fmt({"mean": 3.0, "std": 0.5, "min": 2.5, "max": 3.5, "n": 3}) == "3.00x ± 0.50 (range 2.50-3.50, 3 seeds)"
    assert repro._fmt({"mean": None, "n": 3, "from_start": 3, "missing": 0, "min": None, "max": None}) == \
        "3 of 3 seeds at the target before training"


def test_recovery_is_the_first_evaluation_back_at_the_start_after_a_rise():
    assert paper.recovery_tokens([(0, 2.0), (10, 2.1), (20, 2.05), (30, 2.0), (40, 1.9)]) == 30.0
    assert paper.recovery_tokens([(0, 2.0), (10, 1.9), (20, 2.01), (30, 1.95)]) == 30.0
    assert paper.recovery_tokens([(0, 2.0), (10, 1.9), (20, 1.8)]) == 0.0  # never rose
    assert paper.recovery_tokens([(0, 2.0), (10, 2.1), (20, 2.2)]) is None  # never came back


def test_the_opt_cases_headline_status_follows_its_stated_rule():
    """examples/scaling_smart_opt.py: the 2.2x-4x row from three paired seeds per variant."""
    import sys

    from megaclone.study import paper
    from util import ROOT

    sys.path.insert(0, str(ROOT / "examples"))
    import scaling_smart_opt as opt

    def status(*per_variant, from_start=0):
        summary = {v: {"speedup": paper.spread(list(s), from_start)} for v, s in zip(opt.CLONES, per_variant)}
        return opt.headline_claim(summary)["status"]

    assert status((2.5, 3.0, 3.5), (2.3, 2.4, 2.6), (3.9, 3.0, 3.1)) == "reproduced"
    assert status((1.5, 1.9, 2.1), (1.2, 1.3, 1.4), (2.0, 2.1, 1.9)) == "contradicted"
    assert status((4.5, 5.0, 4.2), (4.1, 6.0, 4.4), (4.3, 4.2, 4.9)) == "exceeded"
    assert status((1.6, 3.0, 2.2), (2.3, 2.4, 2.6), (3.9, 3.0, 3.1)) == "reproduced"  # means decide, within
    assert status((1.9, 2.0, 2.3), (2.3, 2.4, 2.6), (3.9, 3.0, 3.1)) == "inconclusive"  # one mean below, not all
    assert status((2.5, None, 3.5), (2.3, 2.4, 2.6), (3.9, 3.0, 3.1), from_start=1) == "inconclusive"


def test_the_stored_bump_study_recomputes_from_its_curves_and_commands():
    """examples/results/scaling_smart_opt.json's bump disentangled: every paired difference from the
    stored validation curves, computed here (mean of the last 5 evaluations; the rise is the highest loss
    in the first quarter of the tokens above the first evaluation), and every setting's label against the
    command that ran it (peak lr, warm-up, per-tensor lr, grown Adam, seed)."""
    import json
    import re

    from util import ROOT

    report = json.loads((ROOT / "examples" / "results" / "scaling_smart_opt.json").read_text())
    ladder, curves = report["bump_disentangled"], report["valid_curves"]

    def final(run):
        return sum(p["lm_loss"] for p in curves[run][-5:]) / 5

    def rise(run):
        c = curves[run]
        return max(0.0, max(p["lm_loss"] for p in c if p["tokens"] <= c[-1]["tokens"] / 4) - c[0]["lm_loss"])

    assert {"recipe", "lr-2x", "lr-2x-warmup-4x", "per-tensor-lr-2x", "per-tensor-lr-4x", "grown-adam-2x",
            "grown-adam-4x"} <= set(ladder["settings"])
    for name, g in ladder["settings"].items():
        assert len(g["runs"]) == 3
        for seed, run in enumerate(g["runs"], 1):
            recipe = f"ladder-recipe-s{seed}"
            d = g["minus_recipe"]
            assert d["final_loss"]["per_seed"][seed - 1] == pytest.approx(final(run) - final(recipe), abs=1e-12)
            assert d["early_bump"]["per_seed"][seed - 1] == pytest.approx(rise(run) - rise(recipe), abs=1e-12)
            cmd = ladder["commands"][f"train-{run}"]
            flag = dict(re.findall(r"--(lr|lr-warmup-iters|seed) (\S+)", cmd))
            assert float(flag["lr"]) == pytest.approx(1e-3 * g["lr_multiple"], rel=1e-12)
            assert int(flag["lr-warmup-iters"]) == (88 if "warmup-4x" in name else 22)
            assert int(flag["seed"]) == seed
            assert ("--clone-lr-scaling" in cmd) == name.startswith("per-tensor-lr")
            assert ("--clone-adam-scaling" in cmd) == name.startswith("grown-adam")
            assert ("expanded/symmetric-adam " in cmd) == name.startswith("grown-adam")
            assert ("--finetune" in cmd) != name.startswith("grown-adam")  # grown Adam resumes its state
