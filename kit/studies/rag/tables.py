"""The RAG study's tables, from its rows (kit.studies.rag.study.load_rag_results): what notebook 60 displays.

Medians with 95 % bootstrap intervals come from kit.results.median_table, means from kit.verdicts.mean_ci,
accuracies with Wilson intervals (kit.studies.rag.pipeline.wilson_interval).
"""
from __future__ import annotations

import statistics
from typing import Sequence

import pandas as pd

from kit.results import median_table
from kit.verdicts import mean_ci
from kit.studies.rag.pipeline import wilson_interval
from kit.studies.rag.study import GUIDE, RagStudyResult

QUALITY = ("recall_at_k", "answer_chunk_recall", "mrr", "ndcg")


def interval_text(lo, hi, digits: int = 2) -> str:
    """'[lo, hi]', or '[nan, nan]' where there is no interval (fewer than two values)."""
    if lo is None or hi is None:
        return "[nan, nan]"
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def mean_columns(g: pd.DataFrame, metrics: Sequence[str]) -> dict:
    """<metric> (mean, 3 digits) and <metric>_ci (bootstrap 95 %) for each metric of one group."""
    row = {}
    for m in metrics:
        mean, lo, hi = mean_ci(g[m].tolist())
        row[m] = None if mean is None else round(mean, 3)
        row[f"{m}_ci"] = interval_text(lo, hi)
    return row


def retrieval_table(result: RagStudyResult, split: str = "dev") -> pd.DataFrame:
    """Per k (budget-independent metrics, means with bootstrap 95 % CI over questions) + search latency."""
    df = result.retrieval
    if df.empty:
        return pd.DataFrame()
    d = df[(df["split"] == split) & (df["budget"] == df["budget"].max())]
    lat = median_table(result.latency, "k", ["embed_ms", "faiss_ms", "search_ms"]).set_index("k") \
        if not result.latency.empty else pd.DataFrame()
    rows = []
    for k, g in d.groupby("k"):
        row = {"k": int(k), "n_questions": len(g), **mean_columns(g, QUALITY),
               "context_tokens (no budget)": round(float(g["context_tokens"].median()))}
        if k in lat.index:
            for m in ("embed_ms", "faiss_ms", "search_ms"):
                row[f"{m} median"] = round(lat.loc[k, m], 3)
            row["search_ms 95% CI"] = interval_text(lat.loc[k, "search_ms_lo"], lat.loc[k, "search_ms_hi"], 1)
        rows.append(row)
    return pd.DataFrame(rows)


def budget_table(result: RagStudyResult, split: str = "dev") -> pd.DataFrame:
    """k x budget: how many chunks the budget lets in, context tokens, and where the gold chunk ended up."""
    df = result.retrieval
    if df.empty:
        return pd.DataFrame()
    rows = []
    for (k, b), g in df[df["split"] == split].groupby(["k", "budget"]):
        n = len(g)
        offsets = g["gold_token_offset"].dropna()
        rows.append({"k": int(k), "budget": int(b), "chunks_in_context": round(float(g["n_in_context"].mean()), 2),
                     "context_tokens_median": round(float(g["context_tokens"].median())),
                     "context_tokens_max": int(g["context_tokens"].max()),
                     "gold_in_context": round((g["gold_status"] == "in_context").sum() / n, 3),
                     "gold_dropped_by_budget": round((g["gold_status"] == "dropped_by_budget").sum() / n, 3),
                     "gold_token_offset_median": round(float(offsets.median())) if len(offsets) else None,
                     "budget_binds": bool((g["n_dropped"] > 0).any())})
    return pd.DataFrame(rows)


def answer_table(result: RagStudyResult) -> pd.DataFrame:
    """Per answer_k x budget: accuracy with Wilson 95 % CI, TTFT and e2e medians with CIs, prompt tokens,
    gold topic in the context (from the retrieval rows), and whether the row is on the TTFT/accuracy Pareto front."""
    df = result.answers
    if df.empty:
        return pd.DataFrame()
    ok = df[df["status"] == "ok"]
    times = median_table(ok, ["k", "budget"], ["ttft_ms", "e2e_ms"], samples=False).set_index(["k", "budget"])
    rows = []
    for (k, b), g in ok.groupby(["k", "budget"]):
        n, s = len(g), int(g["correct"].sum())
        lo, hi = wilson_interval(s, n)
        t = times.loc[(k, b)]
        rows.append({"k": int(k), "budget": int(b), "n": n, "accuracy": round(s / n, 3), "acc_low": round(lo, 3),
                     "acc_high": round(hi, 3), "ttft_ms": round_or_nan(t["ttft_ms"], 1),
                     "ttft_low": round_or_nan(t["ttft_ms_lo"], 1), "ttft_high": round_or_nan(t["ttft_ms_hi"], 1),
                     "e2e_ms": round_or_nan(t["e2e_ms"], 1), "e2e_low": round_or_nan(t["e2e_ms_lo"], 1),
                     "e2e_high": round_or_nan(t["e2e_ms_hi"], 1),
                     "prompt_tokens": round(float(g["n_prompt_tokens"].median())),
                     "gold_in_context": round(float((g["gold_status"] == "in_context").mean()), 3),
                     "recall_dev": recall_dev(result.retrieval, int(k), int(b))})
    t = pd.DataFrame(rows)
    t["pareto"] = pareto_front(t, "ttft_ms", "accuracy")
    return t


def round_or_nan(x, digits: int) -> float:
    """A table cell: rounded, NaN where kit.verdicts gives no value (None), so the column stays numeric."""
    return float("nan") if x is None or x != x else round(float(x), digits)


def recall_dev(rec: pd.DataFrame, k: int, budget: int) -> float | None:
    """Gold topic in the packed context (dev mean) at k x budget; 0 closed book; None off the retrieval grid."""
    if not k:
        return 0.0
    if rec.empty:
        return None
    r = rec[(rec["split"] == "dev") & (rec["k"] == k) & (rec["budget"] == budget)]
    return None if r.empty else round(float(r["topic_in_context"].mean()), 3)


def pareto_front(df: pd.DataFrame, cost: str, value: str) -> list[bool]:
    """True for rows no other row beats (lower or equal cost and higher or equal value, one of them strictly)."""
    pts = list(zip(df[cost].tolist(), df[value].tolist()))
    out = []
    for i, (c, v) in enumerate(pts):
        dominated = any((c2 <= c and v2 >= v) and (c2 < c or v2 > v) for j, (c2, v2) in enumerate(pts) if j != i)
        out.append(not dominated)
    return out


def cache_table(result: RagStudyResult) -> pd.DataFrame:
    """R3: cold vs warm, corpus and queries: totals, per-batch / per-query medians, texts encoded."""
    df = result.cache
    if df.empty:
        return pd.DataFrame()
    rows = []
    for phase in ("cold", "warm"):
        tot = df[(df["phase"] == phase) & (df["what"] == "total")]
        if tot.empty:
            continue
        t = tot.iloc[0]
        corpus = df[(df["phase"] == phase) & (df["what"] == "corpus")]["batch_ms"].tolist()
        query = df[(df["phase"] == phase) & (df["what"] == "query")]["batch_ms"].tolist()
        rows.append({"phase": phase, "corpus_s": round(t["corpus_embed_ms"] / 1e3, 3),
                     "corpus_batch_ms_median": round(statistics.median(corpus), 2) if corpus else None,
                     "queries_s": round(t["query_embed_ms"] / 1e3, 3),
                     "query_ms_median": round(statistics.median(query), 3) if query else None,
                     "cache_open_ms": round(t["open_ms"], 1),
                     "store_ms": round(t["corpus_store_ms"] + t["query_store_ms"], 1),
                     "texts_encoded": int(t["n_texts_encoded"]), "chunks": int(t["n_chunks"]),
                     "queries": int(t["n_queries"]), "cache_MB": round(t["cache_bytes"] / 2**20, 2)})
    return pd.DataFrame(rows)


def concurrency_table(result: RagStudyResult) -> pd.DataFrame:
    """R4: per concurrency level, retrieval-only and full-RAG throughput (median over the rounds run at that level)
    and per-query latency."""
    df = result.concurrency
    if df.empty:
        return pd.DataFrame()
    ret = df[df["stage"] == "retrieval"]
    per_batch = ret.groupby(["concurrency", "repetition"], as_index=False)["throughput_qps"].first()
    thr = median_table(per_batch, "concurrency", "throughput_qps").set_index("concurrency")
    lat = median_table(ret, "concurrency", "latency_ms").set_index("concurrency")
    rows = []
    for c in sorted(df["concurrency"].unique()):
        rag = df[(df["concurrency"] == c) & (df["stage"] == "rag")]
        row = {"concurrency": int(c), "retrieval_qps": round_or_nan(thr.loc[c, "throughput_qps"], 2),
               "retrieval_qps_ci": interval_text(thr.loc[c, "throughput_qps_lo"], thr.loc[c, "throughput_qps_hi"], 1),
               "retrieval_latency_ms": round_or_nan(lat.loc[c, "latency_ms"], 1),
               "retrieval_latency_ci": interval_text(lat.loc[c, "latency_ms_lo"], lat.loc[c, "latency_ms_hi"], 1)}
        if not rag.empty:
            per_round = rag.groupby("repetition")["throughput_qps"].first()
            row.update({"rag_rounds": len(per_round), "rag_qps": round(float(per_round.median()), 3),
                        "rag_latency_ms_median": round(float(rag["latency_ms"].median())),
                        "rag_queue_ms_median": round(float(rag["queue_ms"].median())),
                        "rag_retrieval_ms_median": round(float(rag["retrieval_ms"].median()), 1),
                        "rag_generation_ms_median": round(float(rag["generation_ms"].median())),
                        "rag_ttft_ms_median": round(float(rag["ttft_ms"].median()))})
        rows.append(row)
    return pd.DataFrame(rows)


def guide_table(result: RagStudyResult) -> pd.DataFrame:
    """The guide's expected RAG search times beside ours (k=8 -> k=5)."""
    lat = result.latency
    med = median_table(lat, "k", ["search_ms", "faiss_ms"]).set_index("k") if not lat.empty else pd.DataFrame()
    rows = []
    for label, k, guide in (("before (k=8)", GUIDE["k_before"], GUIDE["search_ms_before"]),
                            ("after (k=5)", GUIDE["k_after"], GUIDE["search_ms_after"])):
        m = med.loc[k] if k in med.index else None
        rows.append({"setting": label, "guide_search_ms": f"{guide[0]:g}-{guide[1]:g}",
                     "our_search_ms_median": round_or_nan(m["search_ms"], 2) if m is not None else float("nan"),
                     "our_95%_CI": interval_text(m["search_ms_lo"], m["search_ms_hi"]) if m is not None
                     else "[nan, nan]",
                     "of which faiss_ms": round_or_nan(m["faiss_ms"], 4) if m is not None else None,
                     "n": int(m["n"]) if m is not None else 0})
    return pd.DataFrame(rows)


def holdout_table(result: RagStudyResult, k: int | None = None, budget: int | None = None) -> pd.DataFrame:
    """The final check: dev vs holdout retrieval at one setting (default: the guide's k=5, budget 4000)."""
    df = result.retrieval
    if df.empty:
        return pd.DataFrame()
    k = k or (GUIDE["k_after"] if (df["k"] == GUIDE["k_after"]).any() else int(df["k"].max()))
    budget = budget or (GUIDE["max_context_length"] if (df["budget"] == GUIDE["max_context_length"]).any()
                        else int(df["budget"].max()))
    rows = [{"split": split, "k": k, "budget": budget, "n": len(g),
             **mean_columns(g, ("recall_at_k", "mrr", "ndcg", "topic_in_context"))}
            for split, g in df[(df["k"] == k) & (df["budget"] == budget)].groupby("split")]
    return pd.DataFrame(rows)


def hnsw_table(result: RagStudyResult) -> pd.DataFrame:
    """HNSW against exact search per efSearch x k: overlap with the exact top k, recall, search time."""
    df = result.hnsw
    if df.empty:
        return pd.DataFrame()
    g = df.groupby(["ef_search", "k"]).agg(overlap_with_exact=("overlap_with_exact", "mean"),
                                           recall_at_k=("recall_at_k", "mean"),
                                           exact_recall_at_k=("exact_recall_at_k", "mean"),
                                           search_ms_per_query=("search_ms_per_query", "first"),
                                           build_ms=("build_ms", "first")).reset_index()
    return g.round(4)
