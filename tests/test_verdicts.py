"""Verdicts follow the interval, not the point estimate."""
import json
import random

import pytest

from kit.verdicts import (NO_EFFECT, NOT_TESTABLE, REFUTED, SUPPORTED, Verdict, bootstrap_ratio, compare,
                          not_testable, read_verdicts, verdict_table, write_verdicts)


def noisy(mean, sd, n=7, seed=0):
    rng = random.Random(seed)
    return [rng.gauss(mean, sd) for _ in range(n)]


def test_clear_improvement_is_supported_and_clear_loss_refuted():
    base = noisy(100, 1)
    assert compare("G2", noisy(120, 1, seed=1), base).verdict == SUPPORTED
    assert compare("G2", noisy(80, 1, seed=1), base).verdict == REFUTED
    # lower is better (latency): a drop supports the claim
    assert compare("R1", noisy(80, 1, seed=1), base, higher_is_better=False).verdict == SUPPORTED


def test_overlapping_noise_is_no_measurable_effect():
    v = compare("C1", noisy(100, 10, seed=1), noisy(101, 10, seed=2))
    assert v.verdict == NO_EFFECT and v.ci_low < 1 < v.ci_high
    assert v.unstable  # CV of 10 % is flagged


def test_equivalence_band_and_claimed_same():
    base = noisy(100, 0.5)
    cand = noisy(101, 0.5, seed=3)  # a real but tiny 1 % change
    assert compare("S1", cand, base).verdict == SUPPORTED
    assert compare("S1", cand, base, equivalence=0.03).verdict == NO_EFFECT
    assert compare("S1", cand, base, claimed="same", equivalence=0.03).verdict == SUPPORTED
    assert compare("S1", noisy(150, 0.5), base, claimed="same", equivalence=0.03).verdict == REFUTED


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
    assert data["schema"] == 1 and [v["claim"] for v in data["verdicts"]] == ["G1", "G3"]
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
