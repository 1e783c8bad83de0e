"""What a smaller rag_search_k saves and costs in retrieval (claim X2): search time and recall@k for two k values.

The profiles' requests pack chunks in an oracle order (the gold topic first), so their prompts show what k costs in
prompt tokens but not what it costs in recall. Here the RAG pipeline (`kit.studies.rag.pipeline`) retrieves for
real, with the same chunks the requests are built from (`profiles.request_inputs`): the bundled embedding model, its
on-disk cache (a rerun embeds nothing) and an exact FAISS index.

- recall@k: a gold topic among the top k chunks' documents (the RAG study's `recall_at_k`), per question, over the
  shipped questions (dev and holdout);
- search time: embed the question (no cache) + search, as a RAG server pays it per request, the k values
  alternated question by question so drift lands on both alike.
"""
from __future__ import annotations

import os
from typing import Sequence

from kit.studies.autotune.profiles import request_inputs
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
            "timed_region": "embed the question (no cache) + exact FAISS search, per request"}


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
