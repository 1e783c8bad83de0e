"""What a smaller rag_search_k saves and costs in retrieval (claim X2): search time and recall@k for two k values.

The profiles' requests pack chunks in an oracle order (the gold topic first), so their prompts show what k costs in
prompt tokens but not what it costs in recall. Two sources, the first that holds both k values:

- the RAG study's rows (outputs/60_rag: retrieval.jsonl, latency.jsonl, meta.json), which `make study` writes
  before this study: recall@k per question and search-time samples per k, at its chunking; nothing is measured
  again (`from_rag_study`);
- else the RAG pipeline (`kit.studies.rag.pipeline`) retrieves for real here, with the chunks the requests are built
  from (`profiles.request_inputs`): the bundled embedding model, its on-disk cache (a rerun embeds nothing) and an
  exact FAISS index (`retrieval_cost`).

recall@k: a gold topic among the top k chunks' documents (the RAG study's `recall_at_k`), per question, over the
shipped questions (dev and holdout). Search time: embed the question (no cache) + search, as a RAG server pays it
per request, the k values alternated so drift lands on both alike.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from kit.studies.autotune.profiles import RAG_STUDY, rag_part, request_inputs
from kit.studies.rag.pipeline import (
    Embedder, EmbeddingCache, Retriever, bootstrap_mean_diff, embed_texts, hit_at_k,
)


def retrieval_cost(ks: Sequence[int], *, chunk_chars: int, cache_dir: str | os.PathLike,
                   corpus_topics: Sequence[str] = (), repetitions: int = 3, n_timed: int = 12) -> dict:
    """recall@k per question and search-time samples (ms) for each k; `n_timed` questions are timed
    `repetitions` times each (after one warm-up search)."""
    ks = sorted({int(k) for k in ks if k})
    chunks, questions = request_inputs(chunk_chars, corpus_topics or None, split="all")
    embedder = Embedder()
    cache = EmbeddingCache(cache_dir, embedder.model_id)
    vectors, stats = embed_texts([c.text for c in chunks], embedder, cache)
    retriever = Retriever(chunks, vectors, embedder)
    qvec, _ = embed_texts([q.question for q in questions], embedder, cache)
    _, ids = retriever.search(qvec, max(ks))
    ranked = [[chunks[i].doc_id for i in row if i >= 0] for row in ids]
    recall = {k: [hit_at_k(r, q.topics, k) for r, q in zip(ranked, questions)] for k in ks}
    timed = questions[:n_timed]
    retriever.retrieve(timed[0].question, max(ks))  # warm-up
    search: dict[int, list[float]] = {k: [] for k in ks}
    for rep in range(repetitions):
        for i, q in enumerate(timed):
            for k in (ks if (rep + i) % 2 == 0 else ks[::-1]):
                search[k].append(round(retriever.retrieve(q.question, k).total_ms, 4))
    return {"ks": ks, "recall": recall, "search_ms": search, "question_ids": [q.id for q in questions],
            "n_questions": len(questions), "n_chunks": len(chunks), "chunk_chars": chunk_chars,
            "n_embedded": stats["n_embedded"], "embedding_model": embedder.model_id,
            "source": "measured here (the requests' chunking)",
            "timed_region": "embed the question (no cache) + exact FAISS search, per request"}


def from_rag_study(out_root: str | os.PathLike, ks: Sequence[int]) -> dict | None:
    """recall@k per question and search-time samples per k from the RAG study's rows, or None unless they hold
    every k given (and at least 3 search samples each)."""
    ks = sorted({int(k) for k in ks if k})
    ret, lat = rag_part(out_root, "retrieval"), rag_part(out_root, "latency")
    if ret.empty or lat.empty or not {"k", "question_id", "recall_at_k"} <= set(ret.columns) \
            or not {"k", "search_ms"} <= set(lat.columns):
        return None
    per_q = ret.drop_duplicates(["question_id", "k"]).sort_values("question_id")  # rows repeat per budget
    recall = {k: [float(x) for x in per_q[per_q["k"] == k]["recall_at_k"]] for k in ks}
    search = {k: [round(float(x), 4) for x in lat[lat["k"] == k]["search_ms"].dropna()] for k in ks}
    if any(not recall[k] for k in ks) or any(len(search[k]) < 3 for k in ks) \
            or len({len(recall[k]) for k in ks}) != 1:
        return None
    meta = rag_meta(out_root)
    cfg = meta.get("config", {})
    return {"ks": ks, "recall": recall, "search_ms": search,
            "question_ids": sorted(per_q["question_id"].unique().tolist()), "n_questions": len(recall[ks[0]]),
            "n_chunks": meta.get("n_chunks"), "chunk_chars": cfg.get("chunk_size"),
            "chunk_overlap": cfg.get("chunk_overlap"), "embedding_model": meta.get("embedding_model"),
            "source": f"the RAG study's rows ({RAG_STUDY}/retrieval.jsonl, latency.jsonl), at its chunking",
            "timed_region": "embed the question (no cache) + exact FAISS search, per request (the RAG study's "
                            "latency phase)"}


def recall_cost(cost: dict, k_small: int, k_large: int) -> dict | None:
    """recall@k_small against recall@k_large over the same questions (paired bootstrap of the difference)."""
    rec = cost.get("recall", {}) if cost else {}
    a, b = rec.get(k_small), rec.get(k_large)
    if not a or not b:
        return None
    diff, lo, hi = bootstrap_mean_diff(a, b, paired=True)
    return {"k_small": k_small, "k_large": k_large, "recall_small": round(sum(a) / len(a), 4),
            "recall_large": round(sum(b) / len(b), 4), "difference": round(diff, 4), "ci_low": round(lo, 4),
            "ci_high": round(hi, 4), "n_questions": len(a), "metric": "recall@k: a gold topic among the top k chunks"}


def rag_meta(out_root: str | os.PathLike) -> dict:
    """The RAG study's meta.json (its config, chunk counts, embedding model), {} where absent."""
    p = Path(out_root) / RAG_STUDY / "meta.json"
    return json.loads(p.read_text()) if p.is_file() else {}
