"""Verdicts follow the interval, not the point estimate."""
import json
import random

import pytest

from kit.verdicts import (BANDS, INCONCLUSIVE, MIXED, NO_EFFECT, NOT_TESTABLE, REFUTED, SUPPORTED, Verdict,
                          bootstrap_ratio, combine, compare, decide, from_interval, looks_confidence, not_testable,
                          read_verdicts, samples_to_decide, verdict_table, write_verdicts)


def noisy(mean, sd, n=7, seed=0):
    rng = random.Random(seed)
    return [rng.gauss(mean, sd) for _ in range(n)]


def test_clear_improvement_is_supported_and_clear_loss_refuted():
    base = noisy(100, 1)
    assert compare("G2", noisy(120, 1, seed=1), base).verdict == SUPPORTED
    assert compare("G2", noisy(80, 1, seed=1), base).verdict == REFUTED
    # lower is better (latency): a drop supports the claim
    assert compare("R1", noisy(80, 1, seed=1), base, higher_is_better=False).verdict == SUPPORTED


def test_a_wide_interval_is_inconclusive_with_the_samples_that_would_decide_it():
    v = compare("C1", noisy(100, 10, seed=1), noisy(101, 10, seed=2))
    assert v.verdict == INCONCLUSIVE and v.ci_low < 0.95 and v.ci_high > 1.05  # wider than C1's +-5 % band
    assert v.unstable  # CV of 10 % is flagged
    assert v.samples_to_decide and v.samples_to_decide > 7 and "samples per side" in v.label()
    # the R4 example: x1.12 [0.64, 1.80] from 3 per side cannot tell a loss from a gain
    r4 = from_interval("R4", 1.12, 0.64, 1.80, higher_is_better=False, n_candidate=3, n_baseline=3)
    assert r4.verdict == INCONCLUSIVE and r4.samples_to_decide > 3


def test_equivalence_band_and_claimed_same():
    base = noisy(100, 0.5)
    cand = noisy(101, 0.5, seed=3)  # a real but tiny 1 % change
    assert compare("S1", cand, base, equivalence=0.0).verdict == SUPPORTED
    assert compare("S1", cand, base, equivalence=0.03).verdict == NO_EFFECT
    assert compare("S1", cand, base, claimed="same", equivalence=0.03).verdict == SUPPORTED
    assert compare("S1", noisy(150, 0.5), base, claimed="same", equivalence=0.03).verdict == REFUTED
    # the claim's own band when none is passed, stated with why
    v = compare("G3", cand, base)
    assert v.band == BANDS["G3"].width and v.band_why and v.verdict == NO_EFFECT


def test_the_rule_on_intervals():
    assert decide(1.02, 1.20) == SUPPORTED and decide(0.80, 0.98) == REFUTED
    assert decide(0.98, 1.03, equivalence=0.05) == NO_EFFECT
    assert decide(0.98, 1.03) == INCONCLUSIVE            # no band: containing 1 says nothing
    assert decide(0.90, 1.03, equivalence=0.05) == INCONCLUSIVE
    assert decide(0.80, 0.90, higher_is_better=False) == SUPPORTED
    assert decide(0.97, 1.02, claimed="same", equivalence=0.05) == SUPPORTED
    assert decide(0.90, 1.02, claimed="same", equivalence=0.05) == INCONCLUSIVE
    assert decide(-0.1, 0.5, no_change=0.0) == INCONCLUSIVE and decide(0.2, 0.5, no_change=0.0) == SUPPORTED


def test_borderline_when_99_percent_would_not_decide():
    near = from_interval("G2", 1.03, 1.002, 1.06, equivalence=0.0)
    far = from_interval("G2", 1.30, 1.20, 1.40, equivalence=0.0)
    assert near.verdict == SUPPORTED and near.borderline and "borderline" in near.label()
    assert far.verdict == SUPPORTED and not far.borderline


def test_samples_to_decide_shrinks_with_the_effect_size():
    big = samples_to_decide(1.3, 0.9, 1.8, n=5)
    small = samples_to_decide(1.05, 0.8, 1.3, n=5)
    assert 5 < big < small
    assert samples_to_decide(1.0, 0.9, 1.1, n=5) is None          # on no change with no band: never
    assert samples_to_decide(1.0, 0.9, 1.1, n=5, equivalence=0.05) > 5  # but the band can be reached


def test_combine_mixed_and_agreeing_conditions():
    on_d0 = from_interval("G2", 1.15, 1.10, 1.20)
    on_d1k = from_interval("G2", 0.925, 0.90, 0.95)
    v = combine("G2", {"tg depth 0": on_d0, "tg depth 1024": on_d1k}, depends_on="context depth")
    assert v.verdict == MIXED and "context depth" in v.summary and len(v.conditions) == 2
    assert {c["verdict"] for c in v.conditions} == {SUPPORTED, REFUTED}
    same = combine("G2", {"pp": on_d0, "tg": from_interval("G2", 1.2, 1.1, 1.3)}, depends_on="test")
    assert same.verdict == SUPPORTED and same.effect == on_d0.effect
    nt = combine("G1", {"a": not_testable("G1", "no offload")}, depends_on="x")
    assert nt.verdict == NOT_TESTABLE and "no offload" in nt.reason
    with pytest.raises(ValueError, match="conditions"):
        Verdict("G2", MIXED)


def test_looks_widen_the_interval():
    assert looks_confidence(1) == pytest.approx(0.95) and looks_confidence(3) == pytest.approx(1 - 0.05 / 3)
    a, b = noisy(103, 2, seed=7), noisy(100, 2, seed=8)
    v95, v98 = compare("G2", a, b), compare("G2", a, b, confidence=looks_confidence(3))
    assert v98.ci_low <= v95.ci_low and v98.ci_high >= v95.ci_high and v98.confidence > 0.98


def test_bootstrap_interval_contains_the_point_and_is_deterministic():
    a, b = noisy(110, 3, seed=4), noisy(100, 3, seed=5)
    p, lo, hi = bootstrap_ratio(a, b)
    assert lo <= p <= hi
    assert bootstrap_ratio(a, b) == (p, lo, hi)
    with pytest.raises(ValueError):
        bootstrap_ratio([], b)


def test_schema_round_trip_and_validation(tmp_path):
    v1 = compare("G3", noisy(105, 1), noisy(100, 1), evidence=["figures/g3.png"])
    v2 = not_testable("G1", "this build has no GPU offload")
    path = write_verdicts(tmp_path, [v2, v1])
    data = json.loads(path.read_text())
    assert data["schema"] == 2 and [v["claim"] for v in data["verdicts"]] == ["G1", "G3"]
    assert set(data["verdicts"][0]) == set(Verdict("G1", NOT_TESTABLE, reason="x").to_dict())
    write_verdicts(tmp_path, [not_testable("G3", "replaced")])
    assert read_verdicts(tmp_path)[1]["reason"] == "replaced"
    assert list(verdict_table(read_verdicts(tmp_path))["claim"]) == ["G1", "G3"]
    with pytest.raises(ValueError, match="unknown claim"):
        Verdict("Z9", SUPPORTED)
    with pytest.raises(ValueError, match="needs a reason"):
        Verdict("G1", NOT_TESTABLE)


def test_too_few_samples_is_not_a_verdict():
    v = compare("G2", [120.0, 121.0], [100.0, 100.5])
    assert v.verdict == NOT_TESTABLE and "too few samples" in v.reason


def test_looks_note_says_when_a_cap_not_a_decision_ended_adaptive_rounds():
    from kit.verdicts import looks_note
    rows = [{"looks": 3, "looks_planned": 3, "looks_capped": True, "adaptive_claim": "G3"},
            {"looks": 1, "looks_planned": 3, "looks_capped": False, "adaptive_claim": "G3"},
            {"looks": 2, "looks_planned": 5, "looks_capped": False, "adaptive_claim": "M1"}]
    note = looks_note(rows, "G3")
    assert "ran 3 of 3 planned blocks" in note and "stopped undecided" in note
    assert looks_note(rows, "M1") == ""            # M1's rounds decided: nothing to say
    assert looks_note([{"status": "ok"}]) == ""    # no adaptive schedule at all


def test_paired_rounds_cancel_a_drift_that_independent_samples_count_as_noise():
    # both configurations slow down together round by round (another tenant), the candidate 2 % faster throughout
    rng = random.Random(3)
    drift = [300 * (1 - 0.02 * i) * (1 + rng.gauss(0, 0.003)) for i in range(15)]
    base = [x * (1 + rng.gauss(0, 0.003)) for x in drift]
    cand = [x * 1.02 * (1 + rng.gauss(0, 0.003)) for x in drift]
    loose = compare("G3", cand, base)
    tight = compare("G3", cand, base, paired=True)
    assert loose.verdict == INCONCLUSIVE and loose.samples_to_decide
    assert tight.verdict == NO_EFFECT and 1.0 < tight.ci_low < 1.02 < tight.ci_high < 1.04
    assert tight.details == {"paired_rounds": 15} and "per-round ratios" in tight.summary
    assert (tight.ci_high - tight.ci_low) < (loose.ci_high - loose.ci_low) / 5
    with pytest.raises(ValueError, match="paired rounds"):
        compare("G3", cand, base[:-1], paired=True)
