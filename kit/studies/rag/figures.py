"""The RAG study's four figures, one frame for all (kit.plots.panel_figure, saved by kit.plots.save_figure under
<out_dir>/figures/): retrieval against k, the context budget, the TTFT/accuracy Pareto front, cache and
concurrency. Each plot function returns (Figure, path); each panel is a function of (result, ax)."""
from __future__ import annotations

from functools import partial

import seaborn as sns

from kit.plots import median_plot, panel_figure, save_figure
from kit.studies.rag.study import GUIDE, RagStudyResult
from kit.studies.rag.tables import answer_table, pareto_front

LINE = {"markersize": 4, "linewidth": 1.2}


def rag_figure(result: RagStudyResult, name: str, panels, figsize: tuple[float, float], out_dir: str | None = None):
    """The shared frame: one row of panels [(title, draw(result, ax))], saved as figures/<name>.png."""
    fig = panel_figure([(title, partial(draw, result)) for title, draw in panels], len(panels), figsize)
    return fig, save_figure(fig, out_dir or result.out_dir, name)


# ---- retrieval against k --------------------------------------------------------------------------------------------
def plot_retrieval(result: RagStudyResult, out_dir: str | None = None):
    """Recall / MRR / nDCG against k (dev, 95 % CI) and search latency against k."""
    return rag_figure(result, "retrieval_vs_k", [
        ("retrieval quality against k (dev, mean, 95 % CI)", quality_panel),
        ("RAG search latency against k (median, 95 % CI)", search_panel),
        ("FAISS exact search alone (median, 95 % CI)", faiss_panel)], (15, 4), out_dir)


def quality_panel(result: RagStudyResult, ax) -> None:
    d = result.retrieval
    if d.empty:
        return
    d = d[(d["split"] == "dev") & (d["budget"] == d["budget"].max())]
    long = d.melt(id_vars=["k"], value_vars=["recall_at_k", "answer_chunk_recall", "mrr", "ndcg"],
                  var_name="metric", value_name="value")
    sns.pointplot(data=long, x="k", y="value", hue="metric", errorbar=("ci", 95), ax=ax, dodge=0.2, **LINE)
    ax.set_ylim(0, 1.02)


def search_panel(result: RagStudyResult, ax) -> None:
    lat = result.latency
    if lat.empty:
        return
    lat_long = lat.melt(id_vars=["k"], value_vars=["search_ms", "embed_ms"], var_name="part", value_name="ms")
    median_plot(lat_long, "k", "ms", ax, hue="part", dodge=0.2, linewidth=1.2)
    for (lo, hi), label, color in ((GUIDE["search_ms_before"], f"guide, k={GUIDE['k_before']}", "C3"),
                                   (GUIDE["search_ms_after"], f"guide, k={GUIDE['k_after']}", "C2")):
        ax.axhspan(lo, hi, color=color, alpha=0.12, label=label)
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)


def faiss_panel(result: RagStudyResult, ax) -> None:
    if result.latency.empty:
        return
    median_plot(result.latency, "k", "faiss_ms", ax, linewidth=1.2)
    ax.set_ylim(bottom=0)


# ---- the context budget -----------------------------------------------------------------------------------------------
def plot_budget(result: RagStudyResult, out_dir: str | None = None):
    """Gold chunk in the context against the budget, one line per k (dev)."""
    return rag_figure(result, "budget", [("gold chunk in the packed context (dev, 95 % CI)", gold_panel),
                                         ("context tokens (LLM tokens, mean)", context_tokens_panel)],
                      (12, 4), out_dir)


def dev_retrieval(result: RagStudyResult):
    d = result.retrieval
    d = d[d["split"] == "dev"].copy()
    d["gold_in_context"] = (d["gold_status"] == "in_context").astype(float)
    return d


def gold_panel(result: RagStudyResult, ax) -> None:
    if result.retrieval.empty:
        return
    sns.pointplot(data=dev_retrieval(result), x="budget", y="gold_in_context", hue="k", errorbar=("ci", 95), ax=ax,
                  dodge=0.3, **LINE)
    ax.set_ylim(0, 1.02)


def context_tokens_panel(result: RagStudyResult, ax) -> None:
    if result.retrieval.empty:
        return
    sns.pointplot(data=dev_retrieval(result), x="budget", y="context_tokens", hue="k", errorbar=None, ax=ax,
                  dodge=0.3, **LINE)


# ---- answers: the Pareto front -----------------------------------------------------------------------------------------
def plot_pareto(result: RagStudyResult, out_dir: str | None = None):
    """Answer accuracy (Wilson 95 % CI) and retrieval recall against median TTFT, per k x budget; front drawn."""
    t = answer_table(result)
    n = f"n={int(t['n'].max())} questions per point" if not t.empty else "no answers measured"
    return rag_figure(result, "pareto", [
        (f"answer accuracy vs TTFT ({n})", partial(pareto_panel, t, "accuracy", "acc_low", "acc_high",
                                                   "answer accuracy")),
        ("retrieval recall vs TTFT", partial(pareto_panel, t, "recall_dev", None, None,
                                             "gold topic in the context (dev)"))], (13, 4.5), out_dir)


def pareto_panel(t, col: str, lo: str | None, hi: str | None, ylabel: str, result: RagStudyResult, ax) -> None:
    """One value against median TTFT, with error bars, a label per point and the Pareto front."""
    if t.empty:
        return
    tt = t.dropna(subset=[col])
    xerr = [tt["ttft_ms"] - tt["ttft_low"], tt["ttft_high"] - tt["ttft_ms"]]
    yerr = [tt[col] - tt[lo], tt[hi] - tt[col]] if lo else None
    ax.errorbar(tt["ttft_ms"], tt[col], xerr=xerr, yerr=yerr, fmt="o", ms=4, alpha=0.7, capsize=2)
    labels: dict = {}
    for _, r in tt.iterrows():  # rows sharing one prompt share one point: one label for them
        labels.setdefault((r["ttft_ms"], r[col]), []).append(f"k{r['k']}/b{r['budget']}")
    for (x, y), names in labels.items():
        ax.annotate(", ".join(names), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = tt[pareto_front(tt, "ttft_ms", col)].sort_values("ttft_ms")
    ax.plot(front["ttft_ms"], front[col], "-", color="C3", lw=1, label="Pareto front")
    ax.set_xlabel("TTFT, ms (median, 95 % CI)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower right")


# ---- R3 cache and R4 concurrency ---------------------------------------------------------------------------------------
def plot_cache_concurrency(result: RagStudyResult, out_dir: str | None = None):
    """R3 cold vs warm (log scale) and R4 throughput / latency against concurrency."""
    return rag_figure(result, "cache_concurrency", [
        ("embedding cache: cold vs warm", cache_panel),
        ("throughput against concurrent queries", throughput_panel),
        ("per-query latency (median, 95 % CI)", concurrency_latency_panel)], (15, 4), out_dir)


def cache_panel(result: RagStudyResult, ax) -> None:
    c = result.cache
    if c.empty:
        return
    median_plot(c[c["what"].isin(["corpus", "query"])], "what", "batch_ms", ax, kind="bar", hue="phase")
    ax.set_yscale("log")
    ax.set_ylabel("ms per corpus batch / per query (median)")


def throughput_panel(result: RagStudyResult, ax) -> None:
    cc = result.concurrency
    if cc.empty:
        return
    ret = cc[cc["stage"] == "retrieval"].groupby(["concurrency", "repetition"])["throughput_qps"].first().reset_index()
    median_plot(ret, "concurrency", "throughput_qps", ax, linewidth=1.2, label="retrieval only")
    rag = (cc[cc["stage"] == "rag"].groupby(["concurrency", "repetition"])["throughput_qps"].first()
           .groupby("concurrency").median().reset_index())  # the median over the rounds run at each level
    ax2 = ax.twinx()
    ax2.plot(range(len(rag)), rag["throughput_qps"], "s--", color="C1", label="full RAG (right axis)")
    ax2.set_ylabel("full RAG queries/s")
    ax2.grid(False)
    ax.set_ylabel("retrieval queries/s")
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")


def concurrency_latency_panel(result: RagStudyResult, ax) -> None:
    cc = result.concurrency
    if cc.empty:
        return
    median_plot(cc[cc["stage"].isin(["retrieval", "rag"])], "concurrency", "latency_ms", ax, hue="stage",
                linewidth=1.2)
    ax.set_yscale("log")
