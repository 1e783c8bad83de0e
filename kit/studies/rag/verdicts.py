"""R1-R4 from the RAG study's rows: one function per claim, each labelled by kit.verdicts' one rule with the claim's
stated band (kit.verdicts.BANDS: +-5 % for these time ratios).

Every comparison goes through kit.verdicts.compare(min_samples=MIN_RAG_SAMPLES, hint=<the parameter>), or for R4
the study's paired comparison (kit.studies.rag.study.r4_compare, the one the run's adaptive rounds stop on): an
interval of 2-4 samples (a few answered questions, a few concurrent queries) says nothing, so fewer than five per side
is "not testable here" (kit.verdicts.too_few), naming the study parameter to raise. An interval too wide to place
inside or outside the band is "inconclusive", with about how many samples would decide it. Where the two conditions
of R2 are the very same prompts (the 4000-token budget never bound), their effect is exactly 1 by construction:
kit.verdicts.from_interval(1, 1, 1) says so through the same rule. Beside its label, each verdict states what the
setting does change (TTFT, recall, re-embedding time, retrieval throughput), in its summary and details.
"""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import math

from kit.verdicts import (INCONCLUSIVE, NO_EFFECT, REFUTED, SUPPORTED, Verdict, bootstrap_ratio, compare,
                          evidence_path, from_interval, not_testable, paired_log_ratio, too_few)
from kit.studies.rag.pipeline import bootstrap_mean_diff
from kit.studies.rag.study import GUIDE, MIN_RAG_SAMPLES, R4_LEVELS, RagStudyResult, r4_compare

K_AFTER, K_BEFORE, BUDGET = GUIDE["k_after"], GUIDE["k_before"], GUIDE["max_context_length"]


def rag_verdicts(result: RagStudyResult, equivalence: float | None = None) -> list[Verdict]:
    """R1-R4 from the measured rows, each with its interval and what it costs in quality. equivalence: None takes
    each claim's stated band (kit.verdicts.BANDS)."""
    return [r1_verdict(result, equivalence), r2_verdict(result, equivalence), r3_verdict(result, equivalence),
            r4_verdict(result, equivalence)]


def evidence(result: RagStudyResult, *names: str) -> list[str]:
    """Files of the study folder as verdict evidence (relative to the outputs root)."""
    return [evidence_path(Path(result.out_dir) / n, result.out_dir) for n in names]


def paired(df, key_col: str, cond_col: str, a, b, value: str) -> tuple[list[float], list[float]]:
    """Values of `value` for condition a and b, aligned on key_col (keys present in both)."""
    return paired_frames(df[df[cond_col] == a], df[df[cond_col] == b], key_col, value)


def paired_frames(da, db, key_col: str, value: str) -> tuple[list[float], list[float]]:
    """Values of `value` in two frames, aligned on key_col (keys present in both)."""
    sa, sb = da.set_index(key_col)[value], db.set_index(key_col)[value]
    keys = [k for k in sa.index if k in sb.index]
    return [float(sa[k]) for k in keys], [float(sb[k]) for k in keys]


def with_findings(v: Verdict, words: list[str], details: dict) -> Verdict:
    """The verdict with what else was measured added to its summary and details (its label untouched)."""
    return dataclasses.replace(v, summary="; ".join([v.summary] + [w for w in words if w]),
                               details={**v.details, **details})


# ---- R1: k 8 -> 5 "speeds up search" ---------------------------------------------------------------------------------
def r1_verdict(result: RagStudyResult, equivalence: float | None = None) -> Verdict:
    """Search latency (query embedding + exact FAISS search) at k=5 against k=8; beside it, what k changes."""
    lat = result.latency
    if lat.empty or not {K_AFTER, K_BEFORE} <= set(lat["k"]):
        return not_testable("R1", f"search latency was not measured at k={K_AFTER} and k={K_BEFORE}")
    lat = lat.assign(pair=lat["question_id"].astype(str) + "#" + lat["repetition"].astype(str))
    c, b = paired(lat, "pair", "k", K_AFTER, K_BEFORE, "search_ms")
    c, b = [x for x, y in zip(c, b) if x > 0 and y > 0], [y for x, y in zip(c, b) if x > 0 and y > 0]
    metric = (f"RAG search latency (query embedding + exact FAISS search), k={K_AFTER} / k={K_BEFORE}, paired by "
              "question and repetition (the two searches run back to back)")
    v = too_few("R1", len(c), len(b), "n_latency_questions or repetitions",
                evidence(result, "latency.jsonl", "figures/retrieval_vs_k.png"), MIN_RAG_SAMPLES)
    if v is not None:
        v.metric = metric
    else:
        point, lo, hi = paired_log_ratio([math.log(x) for x in c], [math.log(y) for y in b])
        v = from_interval("R1", point, lo, hi, claimed="better", higher_is_better=False, equivalence=equivalence,
                          metric=metric, n_candidate=len(c), n_baseline=len(b),
                          evidence=evidence(result, "latency.jsonl", "figures/retrieval_vs_k.png"))
        v.summary = (f"search at k={K_AFTER} takes {point:.3f}x the time at k={K_BEFORE} (95 % CI {lo:.3f}-"
                     f"{hi:.3f}, {len(c)} pairs of back-to-back searches): {v.label()}")
    fa = statistics.median(lat[lat["k"] == K_AFTER]["faiss_ms"])
    fb = statistics.median(lat[lat["k"] == K_BEFORE]["faiss_ms"])
    details = {f"search_ms_median_k{K_AFTER}": statistics.median(c) if c else None,
               f"search_ms_median_k{K_BEFORE}": statistics.median(b) if b else None,
               f"faiss_ms_median_k{K_AFTER}": fa, f"faiss_ms_median_k{K_BEFORE}": fb,
               "guide_search_ms_before": GUIDE["search_ms_before"], "guide_search_ms_after": GUIDE["search_ms_after"]}
    words = [f"FAISS itself takes {fa:.3f} vs {fb:.3f} ms, the query embedding is the rest",
             r1_ttft_words(result, details), r1_recall_words(result, details)]
    return with_findings(v, words, details)


def r1_ttft_words(result: RagStudyResult, details: dict) -> str:
    """What k does change: TTFT and accuracy at the guide's budget, paired by question."""
    ans = result.answers
    if ans.empty or not {K_AFTER, K_BEFORE} <= set(ans["k"]) or not (ans["budget"] == BUDGET).any():
        return ""
    a = ans[(ans["status"] == "ok") & (ans["budget"] == BUDGET)]
    t5, t8 = paired(a, "question_id", "k", K_AFTER, K_BEFORE, "ttft_ms")
    if not t5:
        return ""
    p, lo, hi = bootstrap_ratio(t5, t8)
    acc5, acc8 = paired(a, "question_id", "k", K_AFTER, K_BEFORE, "correct")
    details.update(ttft_ratio_k5_k8=p, ttft_ratio_ci=(lo, hi), n_answer_questions=len(t5),
                   accuracy_k5=statistics.fmean(acc5), accuracy_k8=statistics.fmean(acc8))
    return (f"What k does change: TTFT k={K_AFTER}/k={K_BEFORE} = {p:.2f} (95 % CI {lo:.2f}-{hi:.2f}), "
            f"accuracy {statistics.fmean(acc5):.2f} vs {statistics.fmean(acc8):.2f} (n={len(t5)})")


def r1_recall_words(result: RagStudyResult, details: dict) -> str:
    """Recall@5 against recall@8 (dev, largest budget), paired by question."""
    rec = result.retrieval
    if rec.empty or not {K_AFTER, K_BEFORE} <= set(rec["k"]):
        return ""
    r = rec[(rec["split"] == "dev") & (rec["budget"] == rec["budget"].max())]
    r5, r8 = paired(r, "question_id", "k", K_AFTER, K_BEFORE, "recall_at_k")
    d, lo, hi = bootstrap_mean_diff(r5, r8)
    details.update(recall_k5=statistics.fmean(r5), recall_k8=statistics.fmean(r8), recall_diff_ci=(d, lo, hi))
    return (f"recall@{K_AFTER} {statistics.fmean(r5):.2f} vs recall@{K_BEFORE} {statistics.fmean(r8):.2f} "
            f"(difference {d:+.3f}, 95 % CI {lo:+.3f} to {hi:+.3f})")


# ---- R2: MAX_CONTEXT_LENGTH=4000 against a larger budget, at the guide's k=8 ----------------------------------------
def r2_verdict(result: RagStudyResult, equivalence: float | None = None) -> Verdict:
    """TTFT at the 4000-token budget against the largest budget, k=8; where a smaller budget binds, its price."""
    ans = result.answers
    if ans.empty or not (ans["budget"] == BUDGET).any() or ans["budget"].max() <= BUDGET or K_BEFORE not in set(ans["k"]):
        return not_testable("R2", f"answers were not measured at budget {BUDGET} and a larger budget at k={K_BEFORE} "
                                  "(answer_budgets / answer_k parameters)")
    big = int(ans["budget"].max())
    a = ans[(ans["status"] == "ok") & (ans["k"] == K_BEFORE)]
    c, b = paired(a, "question_id", "budget", BUDGET, big, "ttft_ms")
    same = a[a["budget"] == BUDGET]["prompt_key"].tolist() == a[a["budget"] == big]["prompt_key"].tolist()
    r = result.retrieval[result.retrieval["split"] == "dev"]
    at_kb = r[(r["k"] == K_BEFORE) & (r["budget"] == r["budget"].max())]
    max_tokens_kb = int(at_kb["context_tokens"].max()) if not at_kb.empty else None
    metric = f"TTFT, context budget {BUDGET} / {big} tokens, k={K_BEFORE}"
    ev = evidence(result, "answers.jsonl", "retrieval.jsonl", "figures/budget.png", "figures/pareto.png")
    words = []
    if same and c:
        words.append(f"the {BUDGET}-token budget never bound at k={K_BEFORE}: the largest packed context was "
                     f"{max_tokens_kb} tokens, so prompts were identical and the guide's limit changes nothing here")
        v = from_interval("R2", 1.0, 1.0, 1.0, claimed="better", higher_is_better=False, equivalence=equivalence,
                          metric=metric, n_candidate=len(c), n_baseline=len(b), evidence=ev,
                          summary=f"{metric}: identical prompts on both sides (n={len(c)}), ratio 1 by construction")
    else:
        v = compare("R2", c, b, min_samples=MIN_RAG_SAMPLES, hint="n_answer_questions", higher_is_better=False,
                    claimed="better", equivalence=equivalence, metric=metric, evidence=ev)
    details = {f"budget_binds_at_{BUDGET}_for_any_k": bool(((r["budget"] == BUDGET) & (r["n_dropped"] > 0)).any()),
               f"max_context_tokens_at_k{K_BEFORE}": max_tokens_kb, "identical_prompts": same}
    words.append(r2_binding_words(a, r, big, details))
    return with_findings(v, words, details)


def r2_binding_words(a, r, big: int, details: dict) -> str:
    """Where a budget smaller than the guide's binds: its TTFT gain and the gold topics it loses, at k=8."""
    small = sorted(x for x in set(a["budget"]) if x < BUDGET)
    if not small or not (r["k"] == K_BEFORE).any() or small[0] not in set(r["budget"]):
        return ""
    s = small[0]
    c2, b2 = paired(a, "question_id", "budget", s, big, "ttft_ms")
    if not c2:
        return ""
    p, lo, hi = bootstrap_ratio(c2, b2)
    rs = r[(r["k"] == K_BEFORE) & (r["budget"] == s)]
    rb = r[(r["k"] == K_BEFORE) & (r["budget"] == r["budget"].max())]
    g1, g0 = paired_frames(rs, rb, "question_id", "topic_in_context")
    dd, dlo, dhi = bootstrap_mean_diff(g1, g0)
    details.update(small_budget=s, ttft_ratio_small=p, ttft_ratio_small_ci=(lo, hi),
                   gold_topic_in_context_diff=(dd, dlo, dhi))
    return (f"a budget that binds ({s} tokens) cuts TTFT to {p:.2f}x (95 % CI {lo:.2f}-{hi:.2f}) "
            f"and changes 'gold topic in context' by {dd:+.2f} (95 % CI {dlo:+.2f} to {dhi:+.2f})")


# ---- R3: the embedding cache -------------------------------------------------------------------------------------------
def r3_verdict(result: RagStudyResult, equivalence: float | None = None) -> Verdict:
    """Corpus embedding time per batch, warm cache against cold; beside it, a repeated query and the totals."""
    cache = result.cache
    if cache.empty or not {"cold", "warm"} <= set(cache["phase"]):
        return not_testable("R3", "the cold/warm cache runs were not measured (measure_cold_cache=False)")

    def batch_ms(phase: str, what: str) -> list[float]:
        return cache[(cache["phase"] == phase) & (cache["what"] == what)]["batch_ms"].tolist()

    cold, warm = batch_ms("cold", "corpus"), batch_ms("warm", "corpus")
    v = compare("R3", warm, cold, min_samples=MIN_RAG_SAMPLES, hint="corpus_topics (more documents)",
                higher_is_better=False, claimed="better", equivalence=equivalence,
                metric="corpus embedding time per batch, warm cache / cold (empty) cache",
                evidence=evidence(result, "cache.jsonl", "figures/cache_concurrency.png"))
    tot = cache[cache["what"] == "total"].set_index("phase")
    details = {"corpus_cold_s": tot.loc["cold", "corpus_embed_ms"] / 1e3,
               "corpus_warm_s": tot.loc["warm", "corpus_embed_ms"] / 1e3,
               "texts_encoded_warm": int(tot.loc["warm", "n_texts_encoded"])}
    words = []
    if cold and warm:
        details["corpus_batch_speedup"] = statistics.median(cold) / max(statistics.median(warm), 1e-9)
        words.append(f"a warm batch is {details['corpus_batch_speedup']:,.0f}x faster. Whole corpus "
                     f"{details['corpus_cold_s']:.1f} s cold -> {details['corpus_warm_s']:.3f} s warm "
                     f"({details['texts_encoded_warm']} texts encoded on the warm run)")
    qc, qw = batch_ms("cold", "query"), batch_ms("warm", "query")
    if qc and qw:
        qp, qlo, qhi = bootstrap_ratio(qw, qc)
        details.update(query_ratio=qp, query_ratio_ci=(qlo, qhi))
        words.append(f"a repeated query {qp:.4f}x (95 % CI {qlo:.4f}-{qhi:.4f}) of a new one. A new question still "
                     "needs its embedding: the cache helps re-indexing and repeated questions only")
    return with_findings(v, words, details)


# ---- R4: concurrent_rag_queries=2 against 1 -------------------------------------------------------------------------------
R4_WHY = {
    SUPPORTED: "two requests in flight overlap one's retrieval with the other's generation; generation itself stays "
               "serialized by the one model",
    NO_EFFECT: "generation is serialized by the one model, so a second request in flight mostly waits in the queue; "
               "only its retrieval overlaps, a small part of a request",
    REFUTED: "generation is serialized by the one model, and the second request's retrieval competes with the first "
             "one's generation for the same cores",
}


def r4_verdict(result: RagStudyResult, equivalence: float | None = None) -> Verdict:
    """A batch's wall time (1/throughput) at 2 concurrent queries against 1, paired by round (`r4_compare`, at the confidence of the run's schedule of looks); beside it, how many rounds it took,
    retrieval-only throughput and per-request latency."""
    cc = result.concurrency
    if cc.empty or not set(R4_LEVELS) <= set(cc["concurrency"]):
        return not_testable("R4", "concurrency levels 1 and 2 were not both measured")
    rag = cc[cc["stage"] == "rag"]
    last = rag.iloc[-1] if not rag.empty else {}
    planned = int(last.get("looks_planned", 1) or 1)
    v = r4_compare(rag, planned, equivalence=equivalence,
                   evidence=evidence(result, "concurrency.jsonl", "figures/cache_concurrency.png"))
    rounds = int(rag["repetition"].nunique()) if not rag.empty else 0
    looks, stop = int(last.get("looks", 1) or 1), str(last.get("looks_stop", "schedule"))
    ret = cc[cc["stage"] == "retrieval"].groupby(["concurrency", "repetition"])["throughput_qps"].first()
    rp, rlo, rhi = bootstrap_ratio(ret.loc[2].tolist(), ret.loc[1].tolist())
    l1 = rag[rag["concurrency"] == 1]["latency_ms"].tolist()
    l2 = rag[rag["concurrency"] == 2]["latency_ms"].tolist()
    lp, llo, lhi = bootstrap_ratio(l2, l1)
    per_round = max(1, len(rag[(rag["concurrency"] == 1) & (rag["repetition"] == rag["repetition"].min())]))
    details = {"retrieval_throughput_ratio": rp, "retrieval_throughput_ci": (rlo, rhi),
               "rag_latency_ratio": lp, "rag_latency_ci": (llo, lhi), "n_queries": per_round, "rounds": rounds,
               "looks": looks, "looks_planned": planned, "looks_stop": stop,
               "extra_rounds_s": float(last.get("extra_rounds_s", 0.0) or 0.0)}
    took = f"it took {rounds} rounds of {per_round} queries per level, {looks} of {planned} planned looks"
    if v.verdict == INCONCLUSIVE:
        cap = {"time cap": "the time cap (concurrency_max_s)",
               "schedule": "the last planned look (concurrency_looks)"}.get(stop, stop)
        took += f"; {cap} stopped it undecided"
        if v.samples_to_decide:
            details["rounds_to_decide"] = int(v.samples_to_decide)   # one sample per round (r4_pairs)
            took += f" (about {details['rounds_to_decide']} rounds would decide it at this spread)"
    words = [took, f"retrieval-only throughput 2/1 = {rp:.2f}x (95 % CI {rlo:.2f}-{rhi:.2f}); per-request latency "
                   f"2/1 = {lp:.2f}x (95 % CI {llo:.2f}-{lhi:.2f})" + (f": {R4_WHY[v.verdict]}" if v.verdict in R4_WHY
                                                                       else "")]
    return with_findings(v, words, details)
