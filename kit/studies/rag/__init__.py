"""RAG study (notebook 60, claims R1-R4 of data/claims.md): what retrieval k, the context budget, an embedding
cache and concurrent queries buy, and cost.

What is where:
- pipeline.py  the RAG prompt pipeline, shared with the autotune profiles: corpus (pydoc_data.topics or a
               folder), chunking, questions, retrieval metrics, embeddings + their on-disk cache, the FAISS index
               and Retriever, context packing in LLM tokens, and `rag_messages(question, chunks|retriever, k,
               budget_tokens, count_tokens) -> (messages, info)`, the one builder of a RAG-shaped request;
- study.py     `RagStudy` (every parameter of the notebook, validated), `run_rag_study(study)` in phases,
               `load_rag_results(out_dir)`, and `answer_test` (test kind "kit.studies.rag.study:answer_test");
- tables.py    the tables notebook 60 displays;
- figures.py   its four figures (plot_retrieval, plot_budget, plot_pareto, plot_cache_concurrency);
- verdicts.py  r1_verdict ... r4_verdict, and rag_verdicts(result) = all four.

This module re-exports the names notebooks and tests use (`from kit.studies import rag; rag.RagStudy(...)`).
The figure functions load on first use: seaborn and scipy take seconds to import, and the trial children that
import this package (answer_test, the autotune profiles' RAG requests via kit.studies.rag.pipeline) never draw.
"""
from __future__ import annotations

from kit.studies.rag.pipeline import (DEFAULT_CACHE_DIR, EMBEDDING_MODEL_NAME, PYDOC_CORPUS, SYSTEM_PROMPT, Chunk,
                                      Document, Embedder, EmbeddingCache, LlamaTokenCounter, PackedContext, Question,
                                      Retrieval, Retriever, answer_chunk_ids, bootstrap_mean_diff, build_index,
                                      build_messages, chunk_documents, chunk_text, embed_texts, gold_position,
                                      hit_at_k, is_correct, load_corpus, load_questions, ndcg_at_k, pack_context,
                                      prefix_token_counts, rag_messages, recall_at_k, reciprocal_rank,
                                      wilson_interval)
from kit.studies.rag.study import GUIDE, PARTS, RagStudy, RagStudyResult, answer_test, load_rag_results, run_rag_study
from kit.studies.rag.tables import (answer_table, budget_table, cache_table, concurrency_table, guide_table,
                                    hnsw_table, holdout_table, pareto_front, retrieval_table)
from kit.studies.rag.verdicts import r1_verdict, r2_verdict, r3_verdict, r4_verdict, rag_verdicts

__all__ = [
    "DEFAULT_CACHE_DIR", "EMBEDDING_MODEL_NAME", "PYDOC_CORPUS", "SYSTEM_PROMPT", "Chunk", "Document", "Embedder",
    "EmbeddingCache", "LlamaTokenCounter", "PackedContext", "Question", "Retrieval", "Retriever", "answer_chunk_ids",
    "bootstrap_mean_diff", "build_index", "build_messages", "chunk_documents", "chunk_text", "embed_texts",
    "gold_position", "hit_at_k", "is_correct", "load_corpus", "load_questions", "ndcg_at_k", "pack_context",
    "prefix_token_counts", "rag_messages", "recall_at_k", "reciprocal_rank", "wilson_interval",
    "GUIDE", "PARTS", "RagStudy", "RagStudyResult", "answer_test", "load_rag_results", "run_rag_study",
    "answer_table", "budget_table", "cache_table", "concurrency_table", "guide_table", "hnsw_table", "holdout_table",
    "pareto_front", "retrieval_table",
    "plot_budget", "plot_cache_concurrency", "plot_pareto", "plot_retrieval",
    "r1_verdict", "r2_verdict", "r3_verdict", "r4_verdict", "rag_verdicts",
]

FIGURES = ("plot_budget", "plot_cache_concurrency", "plot_pareto", "plot_retrieval")


def __getattr__(name: str):
    """rag.plot_* from kit.studies.rag.figures, imported on first use (see the module docstring)."""
    if name in FIGURES:
        from kit.studies.rag import figures  # lazy: seaborn/scipy take seconds, trial children never draw
        return getattr(figures, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
