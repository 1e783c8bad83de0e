"""Verdicts on X1-X4, every one through kit.verdicts (compare / from_interval / not_testable / too_few).

X1: the guide's speed profile against its quality profile (RAG-shaped request, e2e time).
X2: tuned against baseline on this machine, judged against the guide's claimed +50 % tokens/s (the interval of
    the tokens/s ratio against 1.5 by kit.verdicts' one rule), with TTFT and RAG search ratios beside it.
X3: the tuner's confirmed best against the guide's good settings (modelled request time).
X4: the fastest quality-changing candidate's per-chunk perplexity against the reference, and the refusals.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import pandas as pd

from kit.studies.autotune.profiles import GUIDE_PROFILE_NAMES, rag_search_samples
from kit.studies.autotune.tuner import TuneResult, changes_quality, describe, num, samples_of
from kit.verdicts import (
    NOT_TESTABLE, REFUTED, SUPPORTED, Verdict, compare, evidence_path, from_interval, not_testable, too_few,
)

if TYPE_CHECKING:  # the study's result type, for annotations only (study.py imports verdicts' users)
    from kit.studies.autotune.study import AutotuneResult

# the guide's claimed gains after optimisation (section "Ожидаемые результаты"): tuned / baseline
GUIDE_CLAIMED_RATIOS = {
    "tokens_per_s": {"low": 1.50, "high": 1.75, "higher_is_better": True, "text": "+50-75 %"},
    "ttft": {"low": 0.50, "high": 0.50, "higher_is_better": False, "text": "-50 %"},
    "rag_search": {"low": 0.50, "high": 0.50, "higher_is_better": False, "text": "-50 %"},
}


def _req_samples(m: dict, col: str) -> list[float]:
    return samples_of(m.get("request", {}), col)


def x1_verdict(guide_measured: dict[str, dict], notes: dict[str, list] | None = None,
               evidence: Sequence[str] = ()) -> Verdict:
    """X1: the guide's speed profile is faster than its quality profile (RAG-shaped request, e2e time)."""
    a = _req_samples(guide_measured.get("speed", {}), "samples_e2e_ms")
    b = _req_samples(guide_measured.get("quality", {}), "samples_e2e_ms")
    if not a or not b:
        return not_testable("X1", "the guide's speed or quality profile produced no request samples "
                            "(see the profile rows' status and error)", evidence=evidence)
    v = compare("X1", a, b, higher_is_better=False, claimed="better", evidence=evidence,
                metric="request e2e time ratio, guide .env.speed / .env.quality (RAG-shaped prompt)",
                hint="the repetitions (request e2e time, guide speed vs quality profile)")
    if v.verdict == NOT_TESTABLE:
        return v
    med = {n: {"ttft_ms": num(m.get("request", {}).get("ttft_ms")),
               "tokens_per_s": num(m.get("request", {}).get("median_ts")),
               "e2e_ms": num(m.get("request", {}).get("e2e_ms")),
               "prompt_tokens": num(m.get("request", {}).get("n_prompt"))} for n, m in guide_measured.items()}
    v.details = {"profiles": med, "notes": notes or {}}
    return v


def _x2_ratios(baseline: dict, tuned: dict, rag_samples: dict[int, list[float]] | None, baseline_k: int,
               tuned_k: int | None) -> dict[str, Verdict]:
    """Each measured ratio, tuned / baseline, as compare() labels it against no change."""
    metrics = {}
    for name, (col, hib) in {"tokens_per_s": ("samples_ts", True), "ttft": ("samples_ttft_ms", False)}.items():
        c, b = _req_samples(tuned, col), _req_samples(baseline, col)
        if c and b:
            metrics[name] = compare("X2", c, b, higher_is_better=hib, claimed="better", metric=name)
    if rag_samples and tuned_k in rag_samples and baseline_k in rag_samples and tuned_k != baseline_k:
        metrics["rag_search"] = compare("X2", rag_samples[tuned_k], rag_samples[baseline_k], higher_is_better=False,
                                        claimed="better", metric="rag_search")
    return metrics


def _x2_table(metrics: dict[str, Verdict], rag_samples, baseline_k: int, tuned_k: int | None) -> dict:
    table = {}
    for name, v in metrics.items():
        cl = GUIDE_CLAIMED_RATIOS[name]
        table[name] = {"effect": v.effect, "ci_low": v.ci_low, "ci_high": v.ci_high, "verdict": v.verdict,
                       "claimed": cl["text"], "claimed_ratio_low": cl["low"], "claimed_ratio_high": cl["high"]}
    if "rag_search" not in table:
        table["rag_search"] = {"verdict": "not run", "claimed": GUIDE_CLAIMED_RATIOS["rag_search"]["text"],
                               "reason": "outputs/60_rag has no retrieval-time samples for both k values"
                               if rag_samples is None or tuned_k != baseline_k else
                               "the tuned profile keeps the baseline's rag_search_k"}
    return table


def _x2_words(head: Verdict, label: str, table: dict) -> str:
    words = (f"tuned / baseline tokens/s {head.effect:.3g} (95 % CI {head.ci_low:.3g}-{head.ci_high:.3g}); "
             f"the guide claims 1.50-1.75")
    if label == REFUTED and head.verdict == SUPPORTED:
        words += ": faster, but by less than the claimed +50 %"
    elif label == REFUTED:
        words += ": not faster by the claimed +50 %"
    elif label != SUPPORTED and head.verdict == SUPPORTED:
        words += ": faster; the interval does not settle whether by +50 %"
    for name in ("ttft", "rag_search"):
        t = table[name]
        if t.get("effect") is not None:
            words += f"; {name} ratio {t['effect']:.3g} [{t['ci_low']:.3g}, {t['ci_high']:.3g}] (claimed 0.5)"
    return words


def x2_verdict(baseline: dict, tuned: dict, rag_samples: dict[int, list[float]] | None = None,
               baseline_k: int = 8, tuned_k: int | None = None, evidence: Sequence[str] = ()) -> Verdict:
    """X2: baseline vs tuned on this machine (t/s, TTFT, RAG search), beside the guide's +50-75 % / -50 % / -50 %.

    The label: the tokens/s ratio's interval against the guide's claimed 1.5 (kit.verdicts.decide with
    no_change=1.5): supported above it, refuted below it, no measurable effect where it straddles 1.5."""
    c, b = _req_samples(tuned, "samples_ts"), _req_samples(baseline, "samples_ts")
    few = too_few("X2", len(c), len(b), "the repetitions (generated tokens/s, tuned vs baseline)", evidence)
    if few:
        return few
    metrics = _x2_ratios(baseline, tuned, rag_samples, baseline_k, tuned_k)
    table = _x2_table(metrics, rag_samples, baseline_k, tuned_k)
    head = metrics["tokens_per_s"]
    claimed = GUIDE_CLAIMED_RATIOS["tokens_per_s"]["low"]
    v = from_interval("X2", head.effect, head.ci_low, head.ci_high, claimed="better", no_change=claimed,
                      metric="generated tokens/s ratio, tuned / baseline (RAG-shaped streamed request)",
                      n_candidate=head.n_candidate, n_baseline=head.n_baseline, evidence=evidence,
                      reason=head.reason, unstable=head.unstable, details={"ratios": table})
    v.summary = _x2_words(head, v.verdict, table)
    return v


def x3_verdict(result: TuneResult, evidence: Sequence[str] = ()) -> Verdict:
    """X3: benchmark_settings finds settings faster than the guide's good settings (request time)."""
    best, start = result.confirmed_for(result.best), result.confirmed_for(result.start)
    gpu = result.gpu_layers.get("reason", "")
    if best is None or start is None or not best.samples_request_s or not start.samples_request_s:
        return not_testable("X3", "the confirmation trials of the start or the tuned configuration failed",
                            evidence=evidence)
    kept = best.settings == start.settings
    v = compare("X3", best.samples_request_s, start.samples_request_s, higher_is_better=False,
                claimed="better", evidence=evidence, hint="the repetitions (request time, tuned vs start)",
                metric="request time ratio, tuned / guide's good settings" if kept else
                "request time ratio (n_prompt/pp + n_gen/tg), tuned / guide's good settings")
    if v.verdict == NOT_TESTABLE:
        v.details = {"find_optimal_gpu_layers": gpu, "steps": result.steps}
        return v
    if kept:
        v.summary = ("the tuner kept the guide's good settings: nothing it screened beat them by more than "
                     f"the {100 * result.min_gain:.0f} % step; " + v.summary)
    dflt = result.confirmed_for(result.defaults)
    vs_defaults = None
    if dflt is not None:
        d = compare("X3", best.samples_request_s, dflt.samples_request_s, higher_is_better=False)
        if d.verdict != NOT_TESTABLE:
            vs_defaults = {"effect": d.effect, "ci_low": d.ci_low, "ci_high": d.ci_high, "verdict": d.verdict,
                           "metric": "request time ratio, tuned / llama-cpp-python defaults"}
    v.details = {"tuned": describe(result.best), "start": describe(result.start),
                 "llama_defaults": describe(result.defaults), "vs_llama_defaults": vs_defaults,
                 "find_optimal_gpu_layers": gpu, "steps": result.steps,
                 "n_screened": len(result.screened), "n_confirmed": len(result.confirmed)}
    if gpu.startswith("not testable"):
        v.reason = (v.reason + "; " if v.reason else "") + f"find_optimal_gpu_layers: {gpu}"
    return v


def x4_verdict(result: TuneResult, evidence: Sequence[str] = ()) -> Verdict:
    """X4: "aggressive settings may cost quality" - the fastest quality-changing candidate's per-chunk perplexity
    against the reference (paired ratios), and the tuner's refusals as the record of what it turned down."""
    ref = result.screened[0] if result.screened else None
    qc = [c for c in result.screened[1:] if c.samples_ppl and ref is not None and ref.samples_ppl
          and changes_quality(c.settings, ref.settings)]
    refused = [r for r in result.refusals if r["reason"] in ("quality", "memory")]
    details = {"refusals": refused, "n_refused_faster": sum(1 for r in refused if r["faster"]),
               "max_ppl_ratio": result.constraints.max_ppl_ratio, "ram_limit_mb": result.constraints.ram_limit_mb}
    if not qc:
        return not_testable("X4", "no quality-changing setting (quantized KV cache, other model file) was screened",
                            evidence=evidence, **details)
    # the most aggressive: the fastest of them
    c = min(qc, key=lambda x: x.score_s if x.score_s is not None else float("inf"))
    ratios = [a / b for a, b in zip(c.samples_ppl, ref.samples_ppl) if b]
    v = compare("X4", ratios, [1.0] * len(ratios), higher_is_better=False, claimed="worse", evidence=evidence,
                metric=f"perplexity ratio per chunk (paired), {c.label()} / reference",
                hint="the perplexity chunks (ppl_chunks)")
    if v.verdict == NOT_TESTABLE:
        v.details = {**v.details, **details}
        return v
    faster = [r for r in refused if r["faster"]]
    words = (f"{c.change}: perplexity {100 * (v.effect - 1):+.2f} % (95 % CI {v.ci_low:.4f}-{v.ci_high:.4f}, "
             f"{len(ratios)} paired chunks). The tuner refused {len(faster)} faster setting(s) for quality or memory")
    if faster:
        words += ": " + "; ".join(f"{r['change']} ({r['reason']}: {r['detail']})" for r in faster[:3])
    v.summary = words
    v.details = details
    return v


def autotune_verdicts(result: "AutotuneResult", figure: str | None = None) -> list[Verdict]:
    """X1-X4 of one study run, with its figure, autotune.json and profiles.csv as evidence."""
    out = result.study.out_path
    files = [p for p in (figure, result.tune.path, result.profiles_csv) if p]
    ev = [evidence_path(p, out) for p in files]
    guide = {n: result.measured[f"guide_{n}"] for n in GUIDE_PROFILE_NAMES}
    return [
        x1_verdict(guide, result.guide_notes, evidence=ev),
        x2_verdict(result.measured["baseline"], result.measured["kit_speed"], rag_search_samples(out.parent),
                   baseline_k=result.tune.start.rag_search_k, tuned_k=result.kit_profiles["speed"].rag_search_k,
                   evidence=ev),
        x3_verdict(result.tune, evidence=ev),
        x4_verdict(result.tune, evidence=ev),
    ]


def x2_ratio_table(vs: Sequence[Verdict]):
    """X2's measured ratios beside the guide's claimed ones, one row per metric (empty where X2 has none)."""
    x2 = next((v for v in vs if v.claim == "X2"), None)
    return pd.DataFrame(x2.details.get("ratios", {}) if x2 else {}).T
