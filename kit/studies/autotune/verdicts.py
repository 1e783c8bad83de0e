"""Notebook 85's verdicts, X1-X4, through kit.verdicts (compare, from_interval, combine; each claim's band).

X1: the guide's speed profile against its quality profile (RAG-shaped request, e2e time), by compare.
X2: tuned against baseline, decomposed: decode tokens/s, TTFT, end-to-end time and RAG search time, each against
    the guide's claimed ratio (its own sub-verdict), combined per metric; with which change produced each gain and
    what the shorter prompt costs in recall.
X3: the tuner's winner against the guide's good settings (modelled request time), by compare; where the tuner kept
    the start, its best contender against it.
X4: the tuner run again under a memory limit and a quality floor derived from the measurements so that both bind
    (`tuner.x4_limits`): did it refuse what broke them, with the numbers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import pandas as pd

from kit.config import Settings
from kit.studies.autotune.profiles import GUIDE_PROFILE_NAMES
from kit.studies.autotune.retrieval import recall_cost
from kit.studies.autotune.tuner import (
    TuneResult, changes_quality, describe, num, samples_of, settings_diff, settings_key,
)
from kit.verdicts import (
    NOT_TESTABLE, REFUTED, SUPPORTED, Verdict, bootstrap_ratio, combine, compare, evidence_path, from_interval,
    not_testable, paired_log_ratio, too_few,
)

if TYPE_CHECKING:  # the study's result type, for annotations only (study.py imports verdicts' users)
    from kit.studies.autotune.study import AutotuneResult

# the guide's claimed gains after optimisation (section "Ожидаемые результаты"): tuned / baseline
GUIDE_CLAIMED_RATIOS = {
    "decode tokens/s": {"ratio": 1.50, "higher_is_better": True, "text": "+50-75 % (15-20 -> 25-35 t/s)"},
    "TTFT": {"ratio": 0.50, "higher_is_better": False, "text": "-50 % (2-3 s -> 1-1.5 s)"},
    "RAG search time": {"ratio": 0.50, "higher_is_better": False, "text": "-50 % (300-500 -> 150-250 ms)"},
}
E2E = "end-to-end time"
REQUEST_SETTINGS = ("rag_search_k", "max_context_length", "temperature", "max_tokens")


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
                hint="profile_repetitions (request e2e time, guide speed vs quality profile)")
    if v.verdict == NOT_TESTABLE:
        return v
    med = {n: {"ttft_ms": num(m.get("request", {}).get("ttft_ms")),
               "tokens_per_s": num(m.get("request", {}).get("median_ts")),
               "e2e_ms": num(m.get("request", {}).get("e2e_ms")),
               "prompt_tokens": num(m.get("request", {}).get("n_prompt"))} for n, m in guide_measured.items()}
    v.details = {"profiles": med, "notes": notes or {}}
    return v


# ---- X2 ---------------------------------------------------------------------------------------------------------
def against_claim(name: str, candidate: Sequence[float], baseline: Sequence[float], claimed_ratio: float,
                  higher_is_better: bool, metric: str, claimed_text: str = "") -> Verdict:
    """One X2 condition: the tuned / baseline ratio's interval against the guide's claimed ratio (decide with
    no_change = the claimed ratio: supported where the interval lies on the better side of it, refuted on the
    other, inconclusive where it straddles it). details["vs_no_change"]: the same samples against no change."""
    few = too_few("X2", len(candidate), len(baseline), f"the repetitions ({name})")
    if few:
        few.metric = metric
        return few
    point, lo, hi = bootstrap_ratio(candidate, baseline)
    plain = compare("X2", candidate, baseline, higher_is_better=higher_is_better, claimed="better", metric=metric)
    v = from_interval("X2", point, lo, hi, claimed="better", higher_is_better=higher_is_better,
                      no_change=claimed_ratio, metric=metric, n_candidate=len(candidate), n_baseline=len(baseline),
                      unstable=plain.unstable)
    better = "higher" if higher_is_better else "lower"
    v.summary = (f"{name} x{point:.3g} (95 % CI {lo:.3g}-{hi:.3g}, n={len(candidate)} vs {len(baseline)}) against "
                 f"the claimed x{claimed_ratio:.3g}{' (' + claimed_text + ')' if claimed_text else ''}; against no "
                 f"change: {plain.label()}")
    v.details = {"claimed_ratio": claimed_ratio, "claimed": claimed_text, "better": better,
                 "vs_no_change": {"verdict": plain.verdict, "label": plain.label(), "band": plain.band}}
    return v


def implied_e2e_ratio(baseline: dict) -> float | None:
    """The end-to-end ratio the guide's two claims imply for the baseline's request: TTFT x0.5 and the decode
    part (e2e - TTFT) at x1.5 the tokens/s."""
    req = baseline.get("request", {})
    ttft, e2e = num(req.get("ttft_ms")), num(req.get("e2e_ms"))
    if not ttft or not e2e or e2e <= ttft:
        return None
    return round((0.5 * ttft + (e2e - ttft) / 1.5) / e2e, 4)


def decode_ts(request: dict) -> list[float]:
    """Per-request decode tokens/s (1000 / mean ITL) from a request row (`kit.measure.requests_row`)."""
    return [1000.0 / x for x in samples_of(request, "samples_decode_ms_per_token") if x > 0]


def speed_conditions(baseline: dict, tuned: dict, where: str = "", ttft_note: str = "") -> dict[str, Verdict]:
    """X2's decode tokens/s and TTFT conditions from two request rows (tuned / baseline against the guide's ratios);
    `where` and `ttft_note` qualify the metric text (the served study: "served, ")."""
    cl = GUIDE_CLAIMED_RATIOS
    return {
        "decode tokens/s": against_claim("decode tokens/s", decode_ts(tuned), decode_ts(baseline),
                                         cl["decode tokens/s"]["ratio"], True,
                                         f"decode tokens/s ratio (1000 / mean ITL per request), {where}tuned / "
                                         "baseline", cl["decode tokens/s"]["text"]),
        "TTFT": against_claim("TTFT", samples_of(tuned, "samples_ttft_ms"), samples_of(baseline, "samples_ttft_ms"),
                              cl["TTFT"]["ratio"], False, f"TTFT ratio, {where}tuned / baseline{ttft_note}",
                              cl["TTFT"]["text"]),
    }


def _ratio(a, b) -> float | None:
    a, b = num(a), num(b)
    return round(a / b, 4) if a and b else None


def x2_attribution(baseline: dict, tuned: dict) -> dict:
    """Which change produced each gain: the settings that differ (engine vs request), the prompt tokens each sends,
    and the engine's pp / tg ratios at the workload (same prompt for both, so they hold the engine settings alone)."""
    sb, st = baseline["settings"], tuned["settings"]
    diff = settings_diff(st, sb)
    request_keys = set(Settings.group("request")) | set(Settings.group("rag")) | set(Settings.group("service"))
    engine = {k: {"baseline": getattr(sb, k), "tuned": v} for k, v in diff.items() if k not in request_keys}
    request = {k: {"baseline": getattr(sb, k), "tuned": v} for k, v in diff.items() if k in request_keys}
    rb, rt = baseline.get("request", {}), tuned.get("request", {})
    tokens = {"baseline": num(rb.get("n_prompt")), "tuned": num(rt.get("n_prompt")),
              "ratio": _ratio(rt.get("n_prompt"), rb.get("n_prompt"))}
    pp_ratio = _ratio(tuned.get("pp", {}).get("median_ts"), baseline.get("pp", {}).get("median_ts"))
    tg_ratio = _ratio(tuned.get("tg", {}).get("median_ts"), baseline.get("tg", {}).get("median_ts"))
    expected_ttft = round(tokens["ratio"] / pp_ratio, 4) if tokens["ratio"] and pp_ratio else None
    return {"engine_settings": engine, "request_settings": request, "prompt_tokens": tokens,
            "engine_pp_ratio": pp_ratio, "engine_tg_ratio": tg_ratio, "ttft_expected_ratio": expected_ttft,
            "generated_tokens": {"baseline": num(rb.get("n_gen_tokens_mean")),
                                 "tuned": num(rt.get("n_gen_tokens_mean"))}}


def _attribution_words(att: dict, recall: dict | None, decode_effect: float | None = None) -> str:
    eng = ", ".join(f"{k} {d['baseline']} -> {d['tuned']}" for k, d in att["engine_settings"].items()) or "none"
    req = ", ".join(f"{k} {d['baseline']} -> {d['tuned']}" for k, d in att["request_settings"].items()) or "none"
    tok = att["prompt_tokens"]
    words = [f"Engine settings changed: {eng}; request settings changed: {req}."]
    if att["engine_tg_ratio"]:
        words.append(f"Decode: engine tg x{att['engine_tg_ratio']:.3g} at the same depth (the engine settings)"
                     + (f"; the request's x{decode_effect:.3g} leaves x{decode_effect / att['engine_tg_ratio']:.3g} "
                        f"to decoding after a shorter prompt and to sampling" if decode_effect else "") + ".")
    if tok["ratio"] and att["engine_pp_ratio"]:
        words.append(f"TTFT: the prompt is {tok['tuned']:.0f} vs {tok['baseline']:.0f} tokens (x{tok['ratio']:.3g}, "
                     f"the smaller k and budget) and engine prompt processing x{att['engine_pp_ratio']:.3g} as fast "
                     f"(threads, batch): x{att['ttft_expected_ratio']:.3g} expected from the two.")
    if recall:
        words.append(f"The shorter prompt costs recall: recall@{recall['k_small']} {recall['recall_small']:.3f} vs "
                     f"recall@{recall['k_large']} {recall['recall_large']:.3f} (difference "
                     f"{recall['difference']:+.3f}, 95 % CI {recall['ci_low']:+.3f} to {recall['ci_high']:+.3f}, "
                     f"{recall['n_questions']} questions; {recall.get('source', '')}).")
    return " ".join(words)


def x2_verdict(baseline: dict, tuned: dict, retrieval: dict | None = None, baseline_k: int = 8,
               tuned_k: int | None = None, evidence: Sequence[str] = ()) -> Verdict:
    """X2: baseline vs tuned on this machine, decomposed: decode tokens/s (1000 / each request's mean ITL), TTFT,
    end-to-end time (against the ratio the guide's two claims imply) and RAG search time (retrieval at each
    profile's k), each against the guide's claimed ratio; combined per metric (`combine`: one label where they
    agree, else mixed). details: which change produced each gain, and the recall the smaller k costs."""
    cl = GUIDE_CLAIMED_RATIOS
    conds = speed_conditions(baseline.get("request", {}), tuned.get("request", {}), ttft_note=" (RAG-shaped request)")
    implied = implied_e2e_ratio(baseline)
    if implied is None:
        conds[E2E] = not_testable("X2", "the baseline has no TTFT and e2e time to imply the guide's e2e ratio from")
    else:
        conds[E2E] = against_claim(E2E, _req_samples(tuned, "samples_e2e_ms"), _req_samples(baseline, "samples_e2e_ms"),
                                   implied, False, "end-to-end time ratio, tuned / baseline (RAG-shaped request)",
                                   f"implied by TTFT x0.5 and tokens/s x1.5: x{implied:.3g}")
    search = (retrieval or {}).get("search_ms", {})
    recall = None
    if tuned_k is None or tuned_k == baseline_k:
        conds["RAG search time"] = not_testable("X2", f"the tuned profile keeps the baseline's rag_search_k="
                                                f"{baseline_k}: nothing in it changes retrieval")
    elif tuned_k not in search or baseline_k not in search:
        conds["RAG search time"] = not_testable("X2", "retrieval was not timed at both k values")
    else:
        conds["RAG search time"] = against_claim(
            "RAG search time", search[tuned_k], search[baseline_k], cl["RAG search time"]["ratio"], False,
            f"RAG search time ratio (embed the question + exact search), k={tuned_k} / k={baseline_k}",
            cl["RAG search time"]["text"])
        recall = recall_cost(retrieval, tuned_k, baseline_k)
        if recall:
            recall["source"] = f"{retrieval.get('source')}, {retrieval.get('chunk_chars')}-character chunks"
    att = x2_attribution(baseline, tuned)
    v = combine("X2", conds, depends_on="metric", headline="decode tokens/s", evidence=evidence,
                details={"attribution": att, "recall": recall, "implied_e2e_ratio": implied,
                         "baseline": describe(baseline["settings"]), "tuned": describe(tuned["settings"]),
                         "baseline_k": baseline_k, "tuned_k": tuned_k})
    v.summary = v.summary + " " + _attribution_words(att, recall, conds["decode tokens/s"].effect)
    return v


def x2_ratio_table(vs: Sequence[Verdict]):
    """X2's conditions: the measured ratio with its interval beside the guide's claimed one, and each label."""
    x2 = next((v for v in vs if v.claim == "X2"), None)
    rows = []
    for c in (x2.conditions if x2 else []):
        d = c.get("details") or {}
        rows.append({"metric": c["condition"], "ratio": c.get("effect"), "ci_low": c.get("ci_low"),
                     "ci_high": c.get("ci_high"), "claimed": d.get("claimed_ratio"), "guide": d.get("claimed"),
                     "verdict": Verdict.from_dict({k: v for k, v in c.items() if k != "condition"}).label(),
                     "vs no change": (d.get("vs_no_change") or {}).get("label"),
                     "reason": c.get("reason")})
    return pd.DataFrame(rows)


# ---- X3 ---------------------------------------------------------------------------------------------------------
def x3_verdict(result: TuneResult, evidence: Sequence[str] = ()) -> Verdict:
    """X3: benchmark_settings finds settings faster than the guide's good settings (request time, compare with
    X3's band). Where the tuner kept the start, its best feasible confirmed contender is compared instead, and the
    label follows that comparison (a kept start is "no meaningful effect" or "inconclusive", never relabelled)."""
    start = result.confirmed_for(result.start)
    gpu = result.gpu_layers.get("reason", "")
    others = [c for c in result.confirmed if c.settings not in (result.start, result.defaults)
              and c.samples_request_s and c.status == "ok"]
    if result.kept_start:
        refused = {r["settings"] for r in result.refusals}
        feasible = [c for c in others if c.label() not in refused]
        cand = min(feasible, key=lambda c: c.score_s) if feasible else None
    else:
        cand = result.confirmed_for(result.best)
    if cand is None or start is None or not cand.samples_request_s or not start.samples_request_s:
        return not_testable("X3", "no confirmed configuration to compare with the guide's good settings (the "
                            "confirmation trials failed, or nothing feasible was screened)", evidence=evidence,
                            steps=result.steps)
    v = compare("X3", cand.samples_request_s, start.samples_request_s, higher_is_better=False,
                claimed="better", evidence=evidence, hint="repetitions (request time, tuned vs start)",
                confidence=result.confidence,
                metric=("request time ratio (n_prompt/pp + n_gen/tg), " +
                        ("the best contender / the guide's good settings (kept)" if result.kept_start else
                         "tuned / the guide's good settings")))
    if v.verdict == NOT_TESTABLE:
        v.details = {"find_optimal_gpu_layers": gpu, "steps": result.steps}
        return v
    if result.kept_start:
        v.summary = (f"the tuner kept the guide's good settings ({result.why_best}); its best contender "
                     f"{describe(cand.settings)}: " + v.summary)
    else:
        v.summary = f"tuned {describe(result.best)} ({result.why_best}): " + v.summary
    dflt = result.confirmed_for(result.defaults)
    vs_defaults = None
    if dflt is not None and dflt.samples_request_s:
        d = compare("X3", cand.samples_request_s, dflt.samples_request_s, higher_is_better=False,
                    confidence=result.confidence)
        if d.verdict != NOT_TESTABLE:
            vs_defaults = {"effect": d.effect, "ci_low": d.ci_low, "ci_high": d.ci_high, "label": d.label(),
                           "metric": "request time ratio, tuned / llama-cpp-python defaults"}
    v.details = {"tuned": describe(result.best), "start": describe(result.start), "kept_start": result.kept_start,
                 "llama_defaults": describe(result.defaults), "vs_llama_defaults": vs_defaults,
                 "find_optimal_gpu_layers": gpu, "steps": result.steps, "decisions": result.decisions,
                 "within_noise": result.within_noise,
                 "n_screened": len(result.screened), "n_confirmed": len(result.confirmed),
                 "confirm_looks": cand.looks, "confirm_looks_planned": result.confirm_looks,
                 "confirm_extra_s": result.confirm_extra_s}
    if result.confirm_looks > 1:
        v.summary += (f"; confirmed in {cand.looks} of {result.confirm_looks} planned blocks of "
                      f"{result.repetitions} repetitions (every look at {result.confidence:.1%} confidence)")
    if gpu.startswith("not testable"):
        v.reason = (v.reason + "; " if v.reason else "") + f"find_optimal_gpu_layers: {gpu}"
    return v


# ---- X4 ---------------------------------------------------------------------------------------------------------
def _check(ok: bool, summary: str, metric: str, details: dict, **numbers) -> Verdict:
    """A condition of X4: what the tuner did with configurations over a limit (refused them: supported; chose
    one: refuted). A behaviour, not a ratio: no interval to decide; the numbers go in the summary and details."""
    return Verdict(claim="X4", verdict=SUPPORTED if ok else REFUTED, summary=summary, metric=metric,
                   details=details, **numbers)


def memory_condition(run: TuneResult, limits: dict) -> Verdict:
    """Did the constrained run refuse every configuration whose peak RSS exceeded the limit, and stay under it?"""
    limit = limits.get("ram_limit_mb")
    if limit is None:
        return not_testable("X4", f"no memory limit could bind: {limits.get('ram_why')}")
    measured = [c for c in run.screened + run.confirmed if c.rss_peak_mb is not None and c.status == "ok"]
    over = {settings_key(c.settings): c for c in measured if c.rss_peak_mb > limit}
    if not over:
        top = max((c.rss_peak_mb for c in measured), default=None)
        return not_testable("X4", f"no limit bound: every configuration of the constrained run stayed under "
                            f"{limit:.0f} MB (largest peak RSS {top} MB)")
    chosen = run.candidate_for(run.best)
    rss = chosen.rss_peak_mb if chosen is not None else None
    refused = [r for r in run.refusals if r["reason"] == "memory"]
    ok = rss is not None and rss <= limit and settings_key(run.best) not in over
    listing = "; ".join(f"{c.label()} {c.rss_peak_mb:.0f} MB" for c in over.values())
    summary = (f"memory limit {limit:.0f} MB ({limits.get('ram_why')}): {len(over)} configuration(s) over it "
               f"({listing}); {len(refused)} refusal(s) for memory, {sum(r['faster'] for r in refused)} of a faster "
               f"setting; {'chose' if ok else 'yet chose'} {describe(run.best)} at peak RSS "
               f"{rss if rss is None else round(rss)} MB")
    return _check(ok, summary, "peak RSS of the configurations over the limit: refused or chosen",
                  {"ram_limit_mb": limit, "over": {c.label(): c.rss_peak_mb for c in over.values()},
                   "chosen_rss_mb": rss, "refusals": refused})


def _quality_costs(run: TuneResult) -> list[dict]:
    """Every quality-changing candidate's perplexity ratio to the reference, paired chunk by chunk, with its
    95 % interval (what the claim "aggressive settings may cost quality" means in numbers)."""
    ref = run.screened[0] if run.screened else None
    out = []
    for c in run.screened[1:]:
        if ref is None or not c.samples_nll or len(c.samples_nll) != len(ref.samples_nll):
            continue
        if not changes_quality(c.settings, ref.settings):
            continue
        point, lo, hi = paired_log_ratio(c.samples_nll, ref.samples_nll)
        out.append({"settings": c.label(), "change": c.change, "ppl_ratio": round(point, 5),
                    "ci_low": round(lo, 5), "ci_high": round(hi, 5), "n_chunks": len(c.samples_nll)})
    return out


def quality_condition(run: TuneResult, limits: dict) -> Verdict:
    """Did the constrained run refuse every candidate whose perplexity ratio exceeded the floor?"""
    floor = limits.get("max_ppl_ratio")
    if floor is None:
        return not_testable("X4", f"no quality floor could bind: {limits.get('ppl_why')}")
    costs = _quality_costs(run)
    over = [c for c in run.screened[1:] if c.ppl_ratio is not None and c.ppl_ratio > floor]
    if not over:
        return not_testable("X4", f"no limit bound: no candidate of the constrained run exceeded the floor "
                            f"{floor:g} (largest ratio {max((c['ppl_ratio'] for c in costs), default=None)})")
    refused = [r for r in run.refusals if r["reason"] == "quality"]
    chosen_bad = settings_key(run.best) in {settings_key(c.settings) for c in over}
    worst = max(over, key=lambda c: c.ppl_ratio)
    paired = next((q for q in costs if q["settings"] == worst.label()), None)
    listing = "; ".join(f"{c.change} ratio {c.ppl_ratio:.4g}" for c in over)
    summary = (f"quality floor {floor:g} ({limits.get('ppl_why')}): {len(over)} candidate(s) over it ({listing}); "
               f"{len(refused)} refusal(s) for quality, {sum(r['faster'] for r in refused)} of a faster setting; "
               f"{'chose' if not chosen_bad else 'yet chose'} {describe(run.best)}")
    numbers = {}
    if paired:
        numbers = {"effect": paired["ppl_ratio"], "ci_low": paired["ci_low"], "ci_high": paired["ci_high"],
                   "n_candidate": paired["n_chunks"], "n_baseline": paired["n_chunks"], "higher_is_better": False}
        summary += (f". Worst: {worst.change} perplexity x{paired['ppl_ratio']:.4g} (95 % CI {paired['ci_low']:.4g}-"
                    f"{paired['ci_high']:.4g}, {paired['n_chunks']} paired chunks)")
    return _check(not chosen_bad, summary,
                  f"perplexity ratio (paired chunks) of the worst candidate over the floor {floor:g}, refused or "
                  f"chosen", {"max_ppl_ratio": floor, "over": {c.label(): c.ppl_ratio for c in over},
                              "refusals": refused, "quality_costs": costs}, **numbers)


def x4_verdict(run: TuneResult | None, limits: dict, evidence: Sequence[str] = ()) -> Verdict:
    """X4: the tuner, run under a memory limit and a quality floor that bind (`tuner.x4_limits`), refuses what
    breaks them and says so with the numbers. One condition per limit, combined (`combine`, depends on the
    constraint); a limit that binds on nothing is "not testable here" with why, never a claim."""
    if run is None:
        return not_testable("X4", f"the constrained run did not run: memory: {limits.get('ram_why')}; quality: "
                            f"{limits.get('ppl_why')}", evidence=evidence, limits=limits)
    conds = {"memory limit": memory_condition(run, limits), "quality floor": quality_condition(run, limits)}
    v = combine("X4", conds, depends_on="constraint", headline="quality floor", evidence=evidence,
                details={"limits": limits, "chosen": describe(run.best), "start": describe(run.start),
                         "refusals": run.refusals, "quality_costs": _quality_costs(run),
                         "n_refused_faster": sum(1 for r in run.refusals if r["faster"])})
    return v


def autotune_verdicts(result: "AutotuneResult", figure: str | None = None) -> list[Verdict]:
    """X1-X4 of one study run, with its figure, autotune.json and profiles.csv as evidence."""
    out = result.study.out_path
    files = [p for p in (figure, result.tune.path, result.profiles_csv) if p]
    ev = [evidence_path(p, out) for p in files]
    guide = {n: result.measured[f"guide_{n}"] for n in GUIDE_PROFILE_NAMES}
    return [
        x1_verdict(guide, result.guide_notes, evidence=ev),
        x2_verdict(result.measured["baseline"], result.measured["kit_speed"], result.retrieval,
                   baseline_k=result.tune.start.rag_search_k, tuned_k=result.kit_profiles["speed"].rag_search_k,
                   evidence=ev),
        x3_verdict(result.tune, evidence=ev),
        x4_verdict(result.x4, result.x4_limits, evidence=ev),
    ]
