"""Verdicts: effect sizes with bootstrap intervals, and the one verdicts.json schema every study writes.

A verdict is a claim about the world, so it follows the interval, not the point estimate:
- supported: the interval excludes "no change" on the side the guide claims;
- refuted: the interval excludes "no change" on the other side;
- no measurable effect: the interval contains "no change" (or lies inside a stated equivalence band);
- not testable here: with the reason (e.g. "this llama.cpp build has no GPU offload").
"""
from __future__ import annotations

import json
import math
import os
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence
import pandas as pd

from kit.paths import resolve as resolve_path

SUPPORTED = "supported"
REFUTED = "refuted"
NO_EFFECT = "no measurable effect"
NOT_TESTABLE = "not testable here"
VERDICTS = (SUPPORTED, REFUTED, NO_EFFECT, NOT_TESTABLE)
CLAIM_IDS = ("G1", "G2", "G3", "M1", "M2", "C1", "C2", "Q1", "Q2", "R1", "R2", "R3", "R4",
             "S1", "S2", "O1", "O2", "O3", "P1", "P2", "X1", "X2", "X3", "X4")
UNSTABLE_CV = 0.10
MIN_SAMPLES = 3   # fewest values per side for a bootstrap interval; a study may ask for more, never fewer
VERDICTS_FILE = "verdicts.json"


@dataclass
class Verdict:
    claim: str
    verdict: str
    summary: str = ""                 # one sentence a reader can act on
    effect: float | None = None       # ratio of medians, candidate / baseline (or a stated metric)
    ci_low: float | None = None
    ci_high: float | None = None
    metric: str = ""                  # what the effect measures, e.g. "tg t/s ratio, fa on / off, depth 2048"
    evidence: list[str] = field(default_factory=list)   # figure / table / results paths, relative to outputs/
    reason: str = ""                  # why not testable, or what limits the verdict
    unstable: bool = False            # a compared sample set had CV >= 10 %
    n_baseline: int = 0
    n_candidate: int = 0
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.claim not in CLAIM_IDS:
            raise ValueError(f"unknown claim id {self.claim!r}; known: {', '.join(CLAIM_IDS)}")
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} must be one of {VERDICTS}")
        if self.verdict == NOT_TESTABLE and not self.reason:
            raise ValueError("a 'not testable here' verdict needs a reason")

    def to_dict(self) -> dict:
        return asdict(self)

    def effect_text(self, digits: int = 3) -> str:
        """'ratio 1.234, 95 % CI 1.100-1.350', or why there is no effect to state."""
        if self.effect is None or self.ci_low is None:
            return f"no interval: {self.reason or self.verdict}"
        return f"ratio {self.effect:.{digits}f}, 95 % CI {self.ci_low:.{digits}f}-{self.ci_high:.{digits}f}"

    def __str__(self) -> str:
        ci = f" [{self.ci_low:.3g}, {self.ci_high:.3g}]" if self.ci_low is not None else ""
        eff = f" effect {self.effect:.3g}{ci}" if self.effect is not None else ""
        return f"{self.claim}: {self.verdict}{eff}. {self.summary or self.reason}".strip()


def cv(samples: Sequence[float]) -> float | None:
    xs = [float(x) for x in samples]
    if len(xs) < 2 or statistics.fmean(xs) == 0:
        return None
    return statistics.stdev(xs) / abs(statistics.fmean(xs))


def bootstrap_ci(samples: Sequence[float], stat=statistics.median, confidence: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> tuple[float | None, float | None, float | None]:
    """(statistic, low, high) with a percentile bootstrap interval. Missing values (None, NaN) are dropped;
    no sample gives (None, None, None); one sample gives the value with no interval (None, None)."""
    xs = [float(x) for x in samples if x is not None and x == x]
    if not xs:
        return None, None, None
    point = stat(xs)
    if len(xs) < 2:
        return point, None, None
    rng = random.Random(seed)
    boots = sorted(stat(rng.choices(xs, k=len(xs))) for _ in range(n_boot))
    alpha = (1 - confidence) / 2
    return point, boots[int(alpha * (n_boot - 1))], boots[int((1 - alpha) * (n_boot - 1))]


def median_ci(samples: Sequence[float], **kw) -> tuple[float | None, float | None, float | None]:
    """Median and its 95 % bootstrap interval: what every table of timings shows."""
    return bootstrap_ci(samples, statistics.median, **kw)


def mean_ci(samples: Sequence[float], **kw) -> tuple[float | None, float | None, float | None]:
    return bootstrap_ci(samples, statistics.fmean, **kw)


def paired_log_ratio(candidate_logs: Sequence[float], baseline_logs: Sequence[float], n_boot: int = 4000,
                     confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """exp(mean paired difference) of per-item logs (e.g. per-chunk NLL -> a perplexity ratio), with a bootstrap
    that resamples pairs together: both runs scored the same items, so the pairing removes item difficulty."""
    c, b = list(candidate_logs), list(baseline_logs)
    if len(c) != len(b) or not c:
        raise ValueError(f"paired items needed: {len(c)} vs {len(b)}")
    d = [x - y for x, y in zip(c, b)]
    point = math.exp(statistics.fmean(d))
    rng = random.Random(seed)
    boots = sorted(math.exp(statistics.fmean(rng.choices(d, k=len(d)))) for _ in range(n_boot))
    a = (1 - confidence) / 2
    return point, boots[int(a * (n_boot - 1))], boots[int((1 - a) * (n_boot - 1))]


def too_few(claim: str, n_candidate: int, n_baseline: int, hint: str = "repetitions", evidence: Sequence[str] = (),
            min_samples: int = MIN_SAMPLES, **details) -> "Verdict | None":
    """'not testable here' when either side has fewer than min_samples values (a bootstrap of one or two values
    has no honest interval), else None."""
    if min(n_candidate, n_baseline) >= min_samples:
        return None
    return not_testable(claim, f"too few samples for an interval ({n_candidate} vs {n_baseline}; at least "
                               f"{min_samples} each): raise {hint}", evidence=evidence,
                        n_candidate=n_candidate, n_baseline=n_baseline, **details)


def evidence_path(path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """A figure or file as verdict evidence: relative to the outputs root (the study folder's parent).
    Relative paths are taken from the repository root (kit.paths.resolve), not the working directory."""
    return os.path.relpath(resolve_path(path).resolve(), resolve_path(out_dir).resolve().parent)


def bootstrap_ratio(candidate: Sequence[float], baseline: Sequence[float], n_boot: int = 4000,
                    confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Ratio of medians (candidate / baseline) and its percentile bootstrap interval (independent resamples)."""
    c, b = [float(x) for x in candidate], [float(x) for x in baseline]
    if not c or not b:
        raise ValueError("both sample sets need at least one value")
    mb = statistics.median(b)
    if mb == 0:
        raise ValueError("baseline median is 0: a ratio is undefined")
    point = statistics.median(c) / mb
    rng = random.Random(seed)
    ratios = []
    for _ in range(n_boot):
        rc = statistics.median(rng.choices(c, k=len(c)))
        rb = statistics.median(rng.choices(b, k=len(b)))
        if rb:
            ratios.append(rc / rb)
    ratios.sort()
    alpha = (1 - confidence) / 2
    lo = ratios[int(alpha * (len(ratios) - 1))]
    hi = ratios[int((1 - alpha) * (len(ratios) - 1))]
    return point, lo, hi


def decide(lo: float, hi: float, *, claimed: str = "better", higher_is_better: bool = True,
           equivalence: float = 0.0, no_change: float = 1.0) -> str:
    """The one verdict rule: the label an interval [lo, hi] of an effect (a ratio, no change = 1) earns.

    claimed: "better" (the guide says the change helps), "worse" (it says the change costs), or "same".
    equivalence: a band around no change (0.02 = +-2 %) inside which a whole interval counts as no effect.
    Every study's verdict goes through here, directly or through compare()."""
    if claimed not in ("better", "worse", "same"):
        raise ValueError("claimed must be 'better', 'worse' or 'same'")
    up = lo > no_change * (1 + equivalence)          # interval entirely above the band
    down = hi < no_change * (1 - equivalence)        # entirely below
    if claimed == "same":
        inside = lo >= no_change * (1 - equivalence) and hi <= no_change * (1 + equivalence)
        return SUPPORTED if inside else (REFUTED if (up or down) else NO_EFFECT)
    improved = up if higher_is_better else down
    worsened = down if higher_is_better else up
    if improved:
        return SUPPORTED if claimed == "better" else REFUTED
    if worsened:
        return REFUTED if claimed == "better" else SUPPORTED
    return NO_EFFECT


def compare(claim: str, candidate: Sequence[float], baseline: Sequence[float], *, higher_is_better: bool = True,
            claimed: str = "better", metric: str = "", equivalence: float = 0.0, evidence: Sequence[str] = (),
            summary: str = "", seed: int = 0, min_samples: int = MIN_SAMPLES,
            hint: str = "the repetitions") -> Verdict:
    """Verdict on "candidate is <claimed> than baseline" from raw samples.

    claimed: "better" (the guide says the change helps), "worse" (it says the change costs), or "same".
    equivalence: a band around 1 (e.g. 0.02 = +-2 %) inside which a whole interval counts as no effect.
    Fewer than `min_samples` on either side gives "not testable here": a bootstrap of one or two values
    has no honest interval; `hint` names what to raise for more samples (a study parameter).
    """
    if claimed not in ("better", "worse", "same"):
        raise ValueError("claimed must be 'better', 'worse' or 'same'")
    few = too_few(claim, len(candidate), len(baseline), hint, evidence, min_samples,
                  point_ratio=_point_ratio(candidate, baseline))
    if few is not None:
        few.metric = metric
        return few
    point, lo, hi = bootstrap_ratio(candidate, baseline, seed=seed)
    verdict = decide(lo, hi, claimed=claimed, higher_is_better=higher_is_better, equivalence=equivalence)
    cvs = [cv(candidate), cv(baseline)]
    unstable = any(x is not None and x >= UNSTABLE_CV for x in cvs)
    direction = "higher" if point > 1 else "lower"
    auto = (f"{metric or 'metric'}: {abs(point - 1) * 100:.1f} % {direction} "
            f"(95 % CI {lo:.3f}-{hi:.3f}, n={len(candidate)} vs {len(baseline)})")
    return Verdict(claim=claim, verdict=verdict, summary=summary or auto, effect=round(point, 4),
                   ci_low=round(lo, 4), ci_high=round(hi, 4), metric=metric, evidence=list(evidence),
                   unstable=unstable, n_baseline=len(baseline), n_candidate=len(candidate),
                   reason="unstable samples (CV >= 10 %): repeat on a quieter machine" if unstable else "")


def from_interval(claim: str, point: float, lo: float, hi: float, *, claimed: str = "better",
                  higher_is_better: bool = True, equivalence: float = 0.0, no_change: float = 1.0, metric: str = "",
                  n_candidate: int = 0, n_baseline: int = 0, summary: str = "", evidence: Sequence[str] = (),
                  reason: str = "", unstable: bool = False, details: dict | None = None) -> Verdict:
    """A Verdict from an interval a study computed itself (a paired log ratio, a mean difference, a rank
    correlation with no_change=0 ...), labelled by the same rule as compare(): decide()."""
    verdict = decide(lo, hi, claimed=claimed, higher_is_better=higher_is_better, equivalence=equivalence,
                     no_change=no_change)
    return Verdict(claim=claim, verdict=verdict, summary=summary, effect=round(point, 4), ci_low=round(lo, 4),
                   ci_high=round(hi, 4), metric=metric, evidence=list(evidence), reason=reason, unstable=unstable,
                   n_baseline=n_baseline, n_candidate=n_candidate, details=dict(details or {}))


def _point_ratio(candidate: Sequence[float], baseline: Sequence[float]) -> float | None:
    if not candidate or not baseline or statistics.median(baseline) == 0:
        return None
    return round(statistics.median(candidate) / statistics.median(baseline), 4)


def not_testable(claim: str, reason: str, evidence: Sequence[str] = (), **details) -> Verdict:
    return Verdict(claim=claim, verdict=NOT_TESTABLE, reason=reason, summary=reason, evidence=list(evidence),
                   details=details)


def write_verdicts(study_dir: str | os.PathLike, verdicts: Sequence[Verdict]) -> Path:
    """Write outputs/<study>/verdicts.json, replacing earlier verdicts of the same claims in that file.
    A relative study_dir is taken from the repository root (kit.paths.resolve)."""
    path = resolve_path(study_dir) / VERDICTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = {v["claim"]: v for v in read_verdicts(path)} if path.exists() else {}
    for v in verdicts:
        existing[v.claim] = v.to_dict()
    ordered = [existing[c] for c in CLAIM_IDS if c in existing]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"schema": 1, "verdicts": ordered}, indent=2, default=str))
    os.replace(tmp, path)
    return path


def read_verdicts(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / VERDICTS_FILE
    return json.loads(p.read_text())["verdicts"]


def verdicts_by_claim(path: str | os.PathLike) -> dict[str, dict]:
    """A study's verdicts.json as {claim: verdict dict}."""
    return {v["claim"]: v for v in read_verdicts(path)}


def ratio_of(v: Verdict) -> float | None:
    """A verdict's ratio: its effect, or the point ratio a "too few samples" verdict keeps in details."""
    return v.effect if v.effect is not None else (v.details or {}).get("point_ratio")


def ratio_text(v: Verdict) -> str:
    """'x1.234 [1.100, 1.350] supported', or the point ratio marked as such when there is no interval."""
    ratio = ratio_of(v)
    if ratio is None:
        return v.verdict
    if v.ci_low is None:
        return f"x{ratio:.3f} (point estimate, no interval) {v.verdict}"
    return f"x{ratio:.3f} [{v.ci_low:.3f}, {v.ci_high:.3f}] {v.verdict}"


def verdict_table(verdicts: Sequence[Verdict | dict]):
    """A DataFrame for display: claim, verdict, effect [CI], summary."""

    rows = []
    for v in verdicts:
        d = v.to_dict() if isinstance(v, Verdict) else v
        ci = f"[{d['ci_low']:.3f}, {d['ci_high']:.3f}]" if d.get("ci_low") is not None else ""
        rows.append({"claim": d["claim"], "verdict": d["verdict"],
                     "effect": d.get("effect"), "95% CI": ci, "summary": d.get("summary") or d.get("reason")})
    return pd.DataFrame(rows)
