"""Verdicts: effect sizes with bootstrap intervals, and the one verdicts.json schema every study writes.

A verdict is a claim about the world, so it follows the interval, not the point estimate. One rule, six labels:
- supported: the interval excludes "no change" on the side the guide claims;
- refuted: the interval excludes "no change" on the other side;
- no meaningful effect: the whole interval lies inside the claim's equivalence band (`BANDS`, stated with why);
- inconclusive: none of these: the interval is too wide to tell. The verdict says about how many more samples per
  side would decide it at the observed spread (`samples_to_decide`);
- mixed: conditions disagree (per depth, per prompt length, per metric): `combine` keeps one sub-verdict per
  condition and says what the result depends on;
- not testable here: with the reason (e.g. "this llama.cpp build has no GPU offload").
A decided label is flagged `borderline` when the same samples at 99 % confidence would give another label: the
label a rerun is most likely to flip.
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
NO_EFFECT = "no meaningful effect"
INCONCLUSIVE = "inconclusive"
MIXED = "mixed"
NOT_TESTABLE = "not testable here"
VERDICTS = (SUPPORTED, REFUTED, NO_EFFECT, INCONCLUSIVE, MIXED, NOT_TESTABLE)
DECIDED = (SUPPORTED, REFUTED, NO_EFFECT)
CLAIM_IDS = ("G1", "G2", "G3", "M1", "M2", "C1", "C2", "Q1", "Q2", "R1", "R2", "R3", "R4",
             "S1", "S2", "O1", "O2", "O3", "P1", "P2", "X1", "X2", "X3", "X4")
UNSTABLE_CV = 0.10
BORDERLINE_CONFIDENCE = 0.99   # a decided label that this confidence would not give is flagged borderline
SAMPLES_CAP = 10_000           # samples_to_decide stops counting here
MIN_SAMPLES = 3   # fewest values per side for a bootstrap interval; a study may ask for more, never fewer
VERDICTS_FILE = "verdicts.json"


@dataclass(frozen=True)
class Band:
    """An equivalence band: effects within no change +- `width` (a fraction) are too small to act on."""
    width: float
    why: str


_SPEED = Band(0.05, "a speed ratio within +-5 %: the same engine comparison moved by 3-7 % between sweeps on the "
                    "kit's reference 2-core machine, and a smaller gain is not worth a setting change")
_LATENCY = Band(0.05, "a time ratio within +-5 %: below the run-to-run spread of streamed requests on the kit's "
                      "reference 2-core machine, and below what a user of a RAG server notices")
_LOAD = Band(0.10, "a load-time ratio within +-10 %: cold and warm loads of a small file vary by more than 5 % "
                   "with the page cache and the disk's other tenants")
_QUALITY = Band(0.01, "a perplexity ratio within +-1 %: smaller than the gap between adjacent quantization types "
                      "on the bundled model")
BANDS: dict[str, Band] = {
    **{c: _SPEED for c in ("G1", "G2", "G3", "C1", "C2", "Q1", "S1", "O1", "X1", "X2", "X3")},
    **{c: _LATENCY for c in ("M1", "R1", "R2", "R3", "R4", "S2")},
    **{c: _LOAD for c in ("O2", "O3")},
    "M2": _QUALITY,
    "P2": Band(0.10, "the share of a request's time a profile attributes within +-10 %: cProfile's own overhead "
                     "is of that order"),
}


def band_of(claim: str) -> Band | None:
    """The claim's stated equivalence band, or None where its verdict is not a ratio against no change."""
    return BANDS.get(claim)


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
    band: float | None = None         # the equivalence band used (+- fraction around no change)
    band_why: str = ""
    confidence: float = 0.95          # of the interval (lower than 95 % never; higher after adaptive looks)
    borderline: bool = False          # at 99 % confidence the same samples would give another label
    samples_to_decide: int | None = None   # inconclusive: about this many samples per side would decide it
    conditions: list[dict] = field(default_factory=list)   # sub-verdicts, one per condition (mixed, combine)
    depends_on: str = ""              # what the conditions differ in (depth, prompt length, metric ...)
    higher_is_better: bool | None = None   # which way the effect, a ratio against 1, is better; None: not a ratio

    def __post_init__(self) -> None:
        if self.claim not in CLAIM_IDS:
            raise ValueError(f"unknown claim id {self.claim!r}; known: {', '.join(CLAIM_IDS)}")
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} must be one of {VERDICTS}")
        if self.verdict == NOT_TESTABLE and not self.reason:
            raise ValueError("a 'not testable here' verdict needs a reason")
        if self.verdict == MIXED and not self.conditions:
            raise ValueError("a 'mixed' verdict needs its conditions")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        """A verdicts.json entry back as a Verdict (unknown keys ignored, so older files still read)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    def effect_text(self, digits: int = 3) -> str:
        """'ratio 1.234, 95 % CI 1.100-1.350', or why there is no effect to state."""
        if self.effect is None or self.ci_low is None:
            return f"no interval: {self.reason or self.verdict}"
        return f"ratio {self.effect:.{digits}f}, 95 % CI {self.ci_low:.{digits}f}-{self.ci_high:.{digits}f}"

    def label(self) -> str:
        """The label as a reader sees it: 'supported (borderline)', 'inconclusive: ~40 samples per side would
        decide it'."""
        if self.verdict == INCONCLUSIVE and self.samples_to_decide:
            if self.samples_to_decide >= SAMPLES_CAP:
                return (f"{INCONCLUSIVE}: over {SAMPLES_CAP} samples per side would be needed at this spread (the "
                        "effect sits on no change or on the band's edge)")
            return f"{INCONCLUSIVE}: about {self.samples_to_decide} samples per side would decide it"
        return f"{self.verdict} (borderline)" if self.borderline else self.verdict

    def __str__(self) -> str:
        ci = f" [{self.ci_low:.3g}, {self.ci_high:.3g}]" if self.ci_low is not None else ""
        eff = f" effect {self.effect:.3g}{ci}" if self.effect is not None else ""
        return f"{self.claim}: {self.label()}{eff}. {self.summary or self.reason}".strip()


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


def bootstrap_paired_ratio(candidate: Sequence[float], baseline: Sequence[float], n_boot: int = 4000,
                           confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Median of per-round ratios (candidate_i / baseline_i) and its percentile bootstrap interval, resampling
    rounds: for samples the sweep interleaved round by round (`kit.results.interleaved_pairs`). The median, like
    the ratio of medians for independent samples, is not moved by one disturbed round."""
    c, b = [float(x) for x in candidate], [float(x) for x in baseline]
    if len(c) != len(b) or not c:
        raise ValueError(f"paired rounds needed: {len(c)} vs {len(b)}")
    if any(x <= 0 for x in c + b):
        raise ValueError("a per-round ratio needs positive samples")
    return bootstrap_ci([x / y for x, y in zip(c, b)], statistics.median, confidence=confidence, n_boot=n_boot,
                        seed=seed)


def decide(lo: float, hi: float, *, claimed: str = "better", higher_is_better: bool = True,
           equivalence: float = 0.0, no_change: float = 1.0) -> str:
    """The one verdict rule: the label an interval [lo, hi] of an effect (a ratio, no change = 1) earns.

    claimed: "better" (the guide says the change helps), "worse" (it says the change costs), or "same".
    equivalence: the band around no change (0.05 = +-5 %) inside which a whole interval is "no meaningful effect".
    "better"/"worse": inside the band -> no meaningful effect; else excluding no change on the claimed side ->
    supported, on the other side -> refuted; else inconclusive. "same": inside the band -> supported; entirely
    outside it -> refuted; else inconclusive.
    Every study's verdict goes through here, directly or through compare()/from_interval()."""
    if claimed not in ("better", "worse", "same"):
        raise ValueError("claimed must be 'better', 'worse' or 'same'")
    lo_band, hi_band = no_change * (1 - equivalence), no_change * (1 + equivalence)
    if no_change < 0:
        lo_band, hi_band = hi_band, lo_band
    if no_change == 0:
        lo_band, hi_band = -equivalence, equivalence
    inside = lo >= lo_band and hi <= hi_band
    if claimed == "same":
        if inside:
            return SUPPORTED
        return REFUTED if (lo > hi_band or hi < lo_band) else INCONCLUSIVE
    if inside and (equivalence > 0 or lo == hi == no_change):
        return NO_EFFECT
    up, down = lo > no_change, hi < no_change
    improved = up if higher_is_better else down
    worsened = down if higher_is_better else up
    if improved:
        return SUPPORTED if claimed == "better" else REFUTED
    if worsened:
        return REFUTED if claimed == "better" else SUPPORTED
    return INCONCLUSIVE


def widen(point: float, lo: float, hi: float, confidence: float = 0.95, to: float = BORDERLINE_CONFIDENCE,
          no_change: float = 1.0) -> tuple[float, float]:
    """An interval at `confidence` stretched about its point to confidence `to`, by the ratio of the normal
    quantiles (on the log scale for a ratio, on the plain scale for an effect whose no change is 0)."""
    f = _z(to) / _z(confidence)
    if no_change > 0 and min(point, lo, hi) > 0:
        lp = math.log(point)
        return math.exp(lp - f * (lp - math.log(lo))), math.exp(lp + f * (math.log(hi) - lp))
    return point - f * (point - lo), point + f * (hi - point)


def _z(confidence: float) -> float:
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def samples_to_decide(point: float, lo: float, hi: float, n: int, equivalence: float = 0.0,
                      no_change: float = 1.0, cap: int = SAMPLES_CAP) -> int | None:
    """About how many samples per side an interval like [lo, hi] from n per side needs to be decided, at the same
    spread: its half-width shrinks like 1/sqrt(n), and it decides once it excludes no change or fits in the band,
    whichever comes first. None when neither can happen (the point is on no change and there is no band)."""
    if n < 1 or no_change <= 0 or min(point, lo, hi) <= 0:
        return None
    p = math.log(point / no_change)
    half = (math.log(hi) - math.log(lo)) / 2
    target = max(abs(p), math.log(1 + equivalence) - abs(p) if equivalence else 0.0)
    if target <= 0 or half <= 0:
        return None
    return min(cap, max(n + 1, math.ceil(n * (half / target) ** 2)))


def _label(claim: str, point: float, lo: float, hi: float, n: int, *, claimed: str, higher_is_better: bool,
           equivalence: float, no_change: float, confidence: float) -> tuple[str, bool, int | None]:
    """decide() plus the two things a reader needs beside it: borderline, and samples to decide."""
    verdict = decide(lo, hi, claimed=claimed, higher_is_better=higher_is_better, equivalence=equivalence,
                     no_change=no_change)
    borderline, need = False, None
    if verdict in DECIDED and lo != hi and confidence < BORDERLINE_CONFIDENCE:
        wlo, whi = widen(point, lo, hi, confidence, no_change=no_change)
        borderline = decide(wlo, whi, claimed=claimed, higher_is_better=higher_is_better, equivalence=equivalence,
                            no_change=no_change) != verdict
    if verdict == INCONCLUSIVE and n:
        need = samples_to_decide(point, lo, hi, n, equivalence, no_change)
    return verdict, borderline, need


def _band(claim: str, equivalence: float | None) -> tuple[float, str]:
    if equivalence is not None:
        b = band_of(claim)
        return equivalence, (b.why if b and b.width == equivalence else "")
    b = band_of(claim)
    return (b.width, b.why) if b else (0.0, "")


def compare(claim: str, candidate: Sequence[float], baseline: Sequence[float], *, higher_is_better: bool = True,
            claimed: str = "better", metric: str = "", equivalence: float | None = None, evidence: Sequence[str] = (),
            summary: str = "", seed: int = 0, min_samples: int = MIN_SAMPLES,
            hint: str = "the repetitions", confidence: float = 0.95, paired: bool = False) -> Verdict:
    """Verdict on "candidate is <claimed> than baseline" from raw samples.

    claimed: "better" (the guide says the change helps), "worse" (it says the change costs), or "same".
    equivalence: the band around 1 (e.g. 0.05 = +-5 %) inside which a whole interval is no meaningful effect;
    None takes the claim's stated band (`BANDS`). confidence: of the bootstrap interval (raised after adaptive
    looks, `looks_confidence`).
    Fewer than `min_samples` on either side gives "not testable here": a bootstrap of one or two values
    has no honest interval; `hint` names what to raise for more samples (a study parameter).
    paired: candidate[i] and baseline[i] were measured in the same interleaved round (`kit.results.
    interleaved_pairs`): the effect is the median per-round ratio (`bootstrap_paired_ratio`), else the ratio of
    medians of independent samples (`bootstrap_ratio`).
    """
    if claimed not in ("better", "worse", "same"):
        raise ValueError("claimed must be 'better', 'worse' or 'same'")
    few = too_few(claim, len(candidate), len(baseline), hint, evidence, min_samples,
                  point_ratio=_point_ratio(candidate, baseline))
    if few is not None:
        few.metric = metric
        return few
    eq, why = _band(claim, equivalence)
    ratio = bootstrap_paired_ratio if paired else bootstrap_ratio
    point, lo, hi = ratio(candidate, baseline, seed=seed, confidence=confidence)
    n = min(len(candidate), len(baseline))
    verdict, borderline, need = _label(claim, point, lo, hi, n, claimed=claimed, higher_is_better=higher_is_better,
                                       equivalence=eq, no_change=1.0, confidence=confidence)
    cvs = [cv(candidate), cv(baseline)]
    unstable = any(x is not None and x >= UNSTABLE_CV for x in cvs)
    direction = "higher" if point > 1 else "lower"
    sizes = f"median of {n} per-round ratios" if paired else f"n={len(candidate)} vs {len(baseline)}"
    auto = (f"{metric or 'metric'}: {abs(point - 1) * 100:.1f} % {direction} "
            f"({confidence_text(confidence)} CI {lo:.3f}-{hi:.3f}, {sizes})")
    if need:
        auto += (f"; about {need} samples per side would decide it at this spread" if need < SAMPLES_CAP else
                 f"; over {SAMPLES_CAP} samples per side would be needed at this spread")
    return Verdict(claim=claim, verdict=verdict, summary=summary or auto, effect=round(point, 4),
                   ci_low=round(lo, 4), ci_high=round(hi, 4), metric=metric, evidence=list(evidence),
                   unstable=unstable, n_baseline=len(baseline), n_candidate=len(candidate),
                   reason="unstable samples (CV >= 10 %): repeat on a quieter machine" if unstable else "",
                   band=eq, band_why=why, confidence=confidence, borderline=borderline, samples_to_decide=need,
                   higher_is_better=higher_is_better, details={"paired_rounds": n} if paired else {})


def from_interval(claim: str, point: float, lo: float, hi: float, *, claimed: str = "better",
                  higher_is_better: bool = True, equivalence: float | None = None, no_change: float = 1.0,
                  metric: str = "", n_candidate: int = 0, n_baseline: int = 0, summary: str = "",
                  evidence: Sequence[str] = (), reason: str = "", unstable: bool = False,
                  details: dict | None = None, confidence: float = 0.95) -> Verdict:
    """A Verdict from an interval a study computed itself (a paired log ratio, a mean difference, a rank
    correlation with no_change=0 ...), labelled by the same rule as compare(): decide()."""
    eq, why = _band(claim, equivalence) if no_change == 1.0 else ((equivalence or 0.0), "")
    n = min(n_candidate, n_baseline) if n_candidate and n_baseline else max(n_candidate, n_baseline)
    verdict, borderline, need = _label(claim, point, lo, hi, n, claimed=claimed, higher_is_better=higher_is_better,
                                       equivalence=eq, no_change=no_change, confidence=confidence)
    return Verdict(claim=claim, verdict=verdict, summary=summary, effect=round(point, 4), ci_low=round(lo, 4),
                   ci_high=round(hi, 4), metric=metric, evidence=list(evidence), reason=reason, unstable=unstable,
                   n_baseline=n_baseline, n_candidate=n_candidate, details=dict(details or {}), band=eq,
                   band_why=why, confidence=confidence, borderline=borderline, samples_to_decide=need,
                   higher_is_better=higher_is_better if no_change == 1.0 else None)


def combine(claim: str, conditions: dict[str, Verdict], depends_on: str, *, headline: str | None = None,
            summary: str = "", evidence: Sequence[str] = (), details: dict | None = None) -> Verdict:
    """One verdict from one sub-verdict per condition ({"tg at depth 0": v, "tg at depth 1024": w, ...}).

    The testable conditions all carry one label -> that label; they differ -> mixed, listing each condition's
    label; none testable -> not testable here, with their reasons. The effect shown is the `headline` condition's
    (default: the first testable one). Borderline when any condition is borderline or inconclusive while
    the others are decided: a rerun may move the whole label."""
    if not conditions:
        raise ValueError("combine needs at least one condition")
    subs = [{"condition": name, **v.to_dict()} for name, v in conditions.items()]
    for sub in subs:
        sub.pop("conditions", None)
    testable = {k: v for k, v in conditions.items() if v.verdict != NOT_TESTABLE}
    listing = "; ".join(f"{k}: {_short_text(v)}" for k, v in conditions.items())
    if not testable:
        reason = "; ".join(f"{k}: {v.reason}" for k, v in conditions.items())
        out = not_testable(claim, reason, evidence=evidence, **(details or {}))
        out.conditions, out.depends_on = subs, depends_on
        return out
    labels = {v.verdict for v in testable.values()}
    head = testable.get(headline) if headline else None
    head = head or next(iter(testable.values()))
    verdict = labels.pop() if len(labels) == 1 else MIXED
    borderline = any(v.borderline for v in testable.values()) or (
        verdict == MIXED and any(v.verdict == INCONCLUSIVE for v in testable.values()))
    text = summary or (f"{'Depends on ' + depends_on + ': ' if verdict == MIXED else ''}{listing}.")
    return Verdict(claim=claim, verdict=verdict, summary=text, effect=head.effect, ci_low=head.ci_low,
                   ci_high=head.ci_high, metric=head.metric, evidence=list(evidence) or head.evidence,
                   unstable=any(v.unstable for v in testable.values()), n_baseline=head.n_baseline,
                   n_candidate=head.n_candidate, details=dict(details or {}), band=head.band, band_why=head.band_why,
                   confidence=head.confidence, borderline=borderline,
                   samples_to_decide=max((v.samples_to_decide or 0 for v in testable.values()), default=0) or None,
                   conditions=subs, depends_on=depends_on, higher_is_better=head.higher_is_better)


def _short_text(v: Verdict) -> str:
    if v.verdict == NOT_TESTABLE:
        return f"not testable ({v.reason})"
    if v.effect is None or v.ci_low is None:
        return v.label()
    return f"{v.label()} x{v.effect:.3g} [{v.ci_low:.3g}, {v.ci_high:.3g}]"


def confidence_text(confidence: float) -> str:
    """'95 %', '98.3 %', '97.5 %'."""
    return f"{confidence * 100:.3g} %"


def looks_confidence(looks: int, confidence: float = 0.95) -> float:
    """The per-look confidence of a fixed schedule of `looks` looks at accumulating samples (Bonferroni): with it,
    stopping at the first look that decides keeps the overall error rate at most 1 - confidence."""
    return 1 - (1 - confidence) / max(1, looks)


def looks_note(rows, claim: str | None = None) -> str:
    """One sentence on what adaptive rounds did, for an undecided verdict: how many blocks ran of the schedule, and
    that the schedule or the time cap, not a decision, ended them (rows' `looks`, `looks_planned`, `looks_capped`).
    "" where the rows ran no adaptive schedule or nothing was capped. claim: only rows whose adaptive schedule was
    that claim's (`adaptive_claim`)."""
    recs = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)
    lk = [r for r in recs if _known(r.get("looks_planned")) and _known(r.get("looks"))
          and (claim is None or r.get("adaptive_claim") in (None, claim) or not _known(r.get("adaptive_claim")))]
    capped = [r for r in lk if r.get("looks_capped") is True or r.get("looks_capped") == 1]
    if not capped:
        return ""
    planned = int(max(r["looks_planned"] for r in lk))
    ran = int(max(r["looks"] for r in capped))
    return (f"Adaptive rounds ran {ran} of {planned} planned blocks of repetitions and stopped undecided at the "
            f"schedule's or the time cap's end (raise looks or looks_max_s, or run on a quieter machine).")


def _known(x) -> bool:
    return x is not None and x == x   # not None, not NaN


def rows_confidence(rows) -> float:
    """The confidence a verdict on these rows must use: `looks_confidence` of the largest schedule of looks the
    rows were measured under (column `looks_planned`, written by adaptive sweeps), else 95 %. Takes a DataFrame or
    a list of row dicts."""
    if isinstance(rows, pd.DataFrame):
        planned = rows["looks_planned"].dropna().tolist() if "looks_planned" in rows else []
    else:
        planned = [r.get("looks_planned") for r in rows if r.get("looks_planned") is not None]
    return looks_confidence(int(max(planned))) if planned else 0.95


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
    tmp.write_text(json.dumps({"schema": 2, "verdicts": ordered}, indent=2, default=str))
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


def label_of(d: dict) -> str:
    """A verdicts.json entry's label as a reader sees it (see Verdict.label)."""
    return Verdict.from_dict(d).label()


def ratio_text(v: Verdict) -> str:
    """'x1.234 [1.100, 1.350] supported', or the point ratio marked as such when there is no interval."""
    ratio = ratio_of(v)
    if ratio is None:
        return v.verdict
    if v.ci_low is None:
        return f"x{ratio:.3f} (point estimate, no interval) {v.label()}"
    return f"x{ratio:.3f} [{v.ci_low:.3f}, {v.ci_high:.3f}] {v.label()}"


def verdict_table(verdicts: Sequence[Verdict | dict]):
    """A DataFrame for display: claim, verdict, effect [CI], summary."""

    rows = []
    for v in verdicts:
        v = v if isinstance(v, Verdict) else Verdict.from_dict(v)
        ci = f"[{v.ci_low:.3f}, {v.ci_high:.3f}]" if v.ci_low is not None else ""
        rows.append({"claim": v.claim, "verdict": v.label(), "effect": v.effect, "CI": ci,
                     "band": f"+-{v.band:.0%}" if v.band else "", "summary": v.summary or v.reason})
    return pd.DataFrame(rows)
