"""The RAG study (notebook 60, claims R1-R4): its config `RagStudy`, the run in phases, and its rows on disk.

`run_rag_study(study)` runs one phase after another, each writing its part under study.out_path:
1. corpus, chunks and questions (`load_inputs`);
2. R3: the embedding cache cold (an empty temporary folder) then warm (`cache_phase` -> cache.jsonl);
3. the study's own vectors from the project cache (`project_vectors`);
4. retrieval metrics for every question x k x budget (`retrieval_phase` -> retrieval.jsonl);
5. HNSW against exact search (`hnsw_phase` -> hnsw.jsonl);
6. R1: search latency against k (`latency_phase` -> latency.jsonl);
7. answers by the bundled LLM for every answer_k x answer_budget (`answer_plans`, `answer_n_ctx`,
   `answer_phase` -> answers.jsonl, resumable through answer_requests.jsonl), then R4's concurrency runs
   (`concurrency_phase` -> concurrency.jsonl: rounds of batches at 1 and 2 concurrent queries, more of them while
   `r4_compare` is inconclusive), and the run's facts (`write_meta` -> meta.json).

Every prompt the LLM answers is built by kit.studies.rag.pipeline.rag_messages, the same function the autotune
profiles' RAG-shaped requests use.

Timed regions (stated again in every row's `timed_region`):
- search: query embedding (SentenceTransformer.encode of one question, no cache) + FAISS search, in-process;
- faiss: the index.search call alone;
- answer: stream_chat from the call to its last chunk (template, tokenize, prompt processing, sampling);
  prompt cache reset per request, so each request pays its full prompt processing.

Why the answers run in-process and not in a child per configuration (kit.sweep): the configurations of this
study differ only in the prompt (k, budget), never in the model's load settings, so one model load serves them
all, and R4 needs what a server has: one model shared by concurrent requests behind a lock, with retrieval
threads beside it. llama.cpp's log goes to a file (kit.measure.load_model -> kit.logs.llama_log_to_file).
`answer_test` is the same measurement as a kit.sweep test kind ("kit.studies.rag.study:answer_test"), for
anyone who wants it isolated per load setting.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kit.config import Settings, StudyConfig, check_rule, param
from kit.environment import process_provenance, save_environment
from kit.measure import load_model, requests_row, stream_chat
from kit.models import chat_format_for, model_card
from kit.paths import DEFAULT_MODEL, RAG_QUESTIONS_FILE, REPO_ROOT, resolve
from kit.results import append_rows, read_rows
from kit.verdicts import DECIDED, Verdict, from_interval, looks_confidence, paired_log_ratio, too_few
from kit.studies.rag.pipeline import (DEFAULT_CACHE_DIR, PYDOC_CORPUS, Chunk, Document, Embedder, EmbeddingCache,
                                      LlamaTokenCounter, Question, Retriever, answer_chunk_ids, build_messages,
                                      chunk_documents, embed_texts, format_chunk, gold_position, hit_at_k,
                                      is_correct, load_corpus, load_questions, ndcg_at_k, pack_context,
                                      prefix_token_counts, rag_messages, recall_at_k, reciprocal_rank, text_key,
                                      wilson_interval)

# The guide's section 5 and its "expected results" (claims R1, R2, X2).
GUIDE = {"k_before": 8, "k_after": 5, "max_context_length": 4000, "concurrent_rag_queries": 2,
         "search_ms_before": (300.0, 500.0), "search_ms_after": (150.0, 250.0)}
PARTS = ("retrieval", "hnsw", "latency", "cache", "answers", "concurrency")
WARMUP_QUESTION = "What is a generator?"
MIN_RAG_SAMPLES = 5  # a few answered questions or concurrent queries: fewer than five per side says nothing
R4_LEVELS = (GUIDE["concurrent_rag_queries"], 1)   # R4 compares the guide's 2 concurrent queries with 1


# ---- the study's configuration -------------------------------------------------------------------------------------------
@dataclass
class RagStudy(StudyConfig):
    """Every parameter of notebooks/60_rag.ipynb (its defaults are what `make study` runs), validated first."""

    model: str = param(DEFAULT_MODEL, "bundled LLM name or a path to any GGUF")
    corpus: str = param(PYDOC_CORPUS, "the stdlib language reference, or a folder of .txt/.md files")
    corpus_topics: list[str] = param([], "document ids to keep; an empty list keeps the whole corpus")
    questions_path: str = param(str(RAG_QUESTIONS_FILE.relative_to(REPO_ROOT)),
                                "QA set: id, question, topics, answer, split")
    chunk_size: int = param(800, "characters per chunk", ge=50)
    chunk_overlap: int = param(100, "characters shared by neighbouring chunks", ge=0)
    k_values: list[int] = param([1, 2, 3, 5, 8, 10], "chunks retrieved (retrieval metrics and search latency)",
                                ge=1, nonempty=True)
    budgets: list[int] = param([250, 500, 1000, 2000, 4000, 6000], "context budgets in LLM tokens (the guide: 4000)",
                               ge=1, nonempty=True)
    hnsw_m: int = param(16, "HNSW graph degree for the approximate-index comparison", ge=2)
    hnsw_ef_search: list[int] = param([1, 4, 16, 64], "HNSW efSearch values compared with exact search",
                                      ge=1, nonempty=True)
    repetitions: int = param(5, "timed repetitions (search latency, retrieval throughput)", ge=1)
    n_latency_questions: int = param(12, "dev questions timed for search latency, per k and repetition", ge=1)
    answer_k: list[int] = param([0, 5, 8], "k values the LLM answers with; 0 means no context (closed book)",
                                ge=0, nonempty=True)
    answer_budgets: list[int] = param([500, 4000, 6000], "budgets the LLM answers with", ge=1, nonempty=True)
    n_answer_questions: int = param(4, "dev questions the LLM answers (the expensive part)", ge=0)
    max_tokens: int = param(32, "answer length cap", ge=1)
    concurrency: list[int] = param([1, 2, 4], "concurrent RAG queries (R4)", ge=1, nonempty=True)
    n_concurrency_queries: int = param(3, "queries submitted at once per concurrency level", ge=1)
    concurrency_k: int = param(3, "k used in the concurrency runs", ge=1)
    concurrency_rounds: int = param(5, "rounds of batches at 1 and 2 concurrent queries per look of R4 (the first "
                                       "round runs every level)", ge=1)
    concurrency_looks: int = param(3, "R4's looks: while 2 against 1 is inconclusive, another block of "
                                      "concurrency_rounds runs, up to this many blocks (each look at confidence "
                                      "1 - 0.05/looks)", ge=1)
    concurrency_max_s: float = param(150.0, "seconds R4's extra blocks may take in all; no block starts after", ge=0)
    measure_cold_cache: bool = param(True, "time a cold (empty, temporary) and a warm embedding cache (R3)")
    embedding_batch_size: int = param(32, "texts per embedding batch", ge=1)
    cache_dir: str = param(DEFAULT_CACHE_DIR, "the project's embedding cache")
    seed: int = param(0, "seed of the random order of k values in the latency runs")
    out_dir: str = param("outputs/60_rag", "where rows, figures and verdicts go")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("k_values", "budgets", "answer_k", "answer_budgets", "concurrency", "hnsw_ef_search"):
            setattr(self, name, sorted(set(getattr(self, name))))

    def check(self) -> None:
        check_rule(self.chunk_overlap < self.chunk_size,
                   f"chunk_overlap={self.chunk_overlap} must be smaller than chunk_size={self.chunk_size}")
        check_rule(self.corpus == PYDOC_CORPUS or resolve(self.corpus).is_dir(),
                   f"corpus={self.corpus!r} is neither {PYDOC_CORPUS!r} nor an existing folder")
        empty = [n for n in ("model", "questions_path", "cache_dir", "out_dir") if not getattr(self, n)]
        check_rule(not empty, f"{', '.join(empty)} must be a non-empty string")
        chat_format_for(self.model)  # a model whose answers would all end at once: one error before any work

    @property
    def k_max(self) -> int:
        return max(self.k_values + [k for k in self.answer_k if k] + [self.concurrency_k,
                                                                       GUIDE["k_before"], GUIDE["k_after"]])


# ---- the study's rows on disk --------------------------------------------------------------------------------------------
@dataclass
class RagStudyResult:
    out_dir: str
    meta: dict
    retrieval: pd.DataFrame      # one row per question x k x budget (dev and holdout)
    hnsw: pd.DataFrame           # one row per question x ef_search x k
    latency: pd.DataFrame        # one row per search call (R1)
    cache: pd.DataFrame          # one row per embedding batch / query, cold and warm (R3)
    answers: pd.DataFrame        # one row per question x answer_k x answer_budget (shared prompts measured once)
    concurrency: pd.DataFrame    # one row per query x concurrency level x stage (R4)


def load_rag_results(out_dir: str | os.PathLike) -> RagStudyResult:
    """Read a finished (or partial) study back from its files: report notebooks never re-measure."""
    out = resolve(out_dir)
    meta_p = out / "meta.json"
    meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
    parts = {p: pd.DataFrame(read_rows(out / f"{p}.jsonl")) for p in PARTS}
    return RagStudyResult(out_dir=str(out), meta=meta, **parts)


def row_provenance(card: dict, embedder: Embedder) -> dict:
    """What every row carries: the build and machine of this process (kit.environment.process_provenance), the
    LLM file and the embedding model. The study measures in-process, so this process measured its rows (answers
    resumed from answer_requests.jsonl keep the provenance of the process that measured them)."""
    return {**process_provenance(), "model_filename": card["file_name"], "model_sha256": card["sha256"],
            "embedding_model": embedder.model_id}


def write_part(out: Path, name: str, rows: list[dict], provenance: dict | None = None) -> None:
    """Replace out/<name>.jsonl with these rows (atomic rename): the cheap parts are measured again each run.
    provenance fills the columns a row does not carry itself."""
    p = out / f"{name}.jsonl"
    tmp = p.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as fh:
        for r in rows:
            extra = {k: v for k, v in (provenance or {}).items() if k not in r}
            fh.write(json.dumps({**r, **extra}, default=str) + "\n")
    os.replace(tmp, p)


def say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[rag {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- the run -------------------------------------------------------------------------------------------------------------
@dataclass
class RagInputs:
    docs: list[Document]
    chunks: list[Chunk]
    questions: list[Question]      # dev and holdout, gold topic in the corpus
    dev: list[Question]
    gold: dict[str, set[str]]      # question id -> gold chunk ids


@dataclass
class Rankings:
    ranking: dict[str, list[int]] = field(default_factory=dict)   # question id -> chunk rows, best first (k_max)
    prefix: dict[str, list[int]] = field(default_factory=dict)    # question id -> prefix_token_counts


def run_rag_study(study: RagStudy, progress: bool = True) -> RagStudyResult:
    """Run the whole study; every part's rows go to study.out_path/<part>.jsonl, the run's facts to meta.json.

    Answers already measured for the same prompt, model and max_tokens (answer_requests.jsonl) are reused, so an
    interrupted run resumes where it stopped; the cheap parts are measured again.
    """
    out = study.out_path
    out.mkdir(parents=True, exist_ok=True)
    env = save_environment(out)
    card = model_card(study.model).to_dict()
    t_study = time.perf_counter()
    inputs = load_inputs(study, progress)
    embedder = Embedder(batch_size=study.embedding_batch_size)
    save = functools.partial(write_part, out, provenance=row_provenance(card, embedder))
    cache_rows, seed_vectors = cache_phase(study, inputs, embedder, progress)
    save("cache", cache_rows)
    chunk_vecs, qvec, project_cache = project_vectors(study, inputs, embedder, seed_vectors, progress)
    retriever = Retriever(inputs.chunks, chunk_vecs, embedder, "flat")
    counter = LlamaTokenCounter(study.model)
    try:
        retrieval_rows, rankings = retrieval_phase(study, inputs, retriever, qvec, counter, progress)
        save("retrieval", retrieval_rows)
        save("hnsw", hnsw_phase(study, inputs, chunk_vecs, embedder, qvec, rankings))
        save("latency", latency_phase(study, inputs, retriever, progress))
        plans = answer_plans(study, inputs, rankings, counter)
        n_ctx = answer_n_ctx(study, inputs, plans, rankings, counter, card)
        conc_q = inputs.dev[:study.n_concurrency_queries]
        lm = load_model(answer_settings(study, n_ctx)) if (plans or conc_q) else None
        try:
            save("answers", answer_phase(lm, plans, card, study, out, progress) if plans else [])
            save("concurrency", concurrency_phase(lm, retriever, counter, conc_q, study, progress) if conc_q else [])
        finally:
            if lm is not None:
                lm.close()
        chunk_tokens = statistics.median(counter(format_chunk(c, 1)) for c in inputs.chunks)
    finally:
        counter.close()
    facts = {"embedding_dim": int(chunk_vecs.shape[1]), "project_cache": project_cache, "llm_n_ctx": n_ctx,
             "index_build_ms": retriever.build_ms, "chunk_tokens_median": chunk_tokens}
    write_meta(study, inputs, embedder, card, env, facts, time.perf_counter() - t_study, out, progress)
    return load_rag_results(out)


def load_inputs(study: RagStudy, progress: bool) -> RagInputs:
    """Phase 1: the corpus, its chunks, and the questions whose gold topic is in it."""
    docs = load_corpus(study.corpus, study.corpus_topics or None)
    chunks = chunk_documents(docs, study.chunk_size, study.chunk_overlap)
    questions = load_questions(study.questions_path, "all", {d.doc_id for d in docs})
    dev = [q for q in questions if q.split == "dev"]
    if not dev:
        raise ValueError("no dev question has a gold topic in this corpus (check corpus_topics)")
    say(progress, f"{len(docs)} documents, {len(chunks)} chunks, {len(dev)} dev + {len(questions) - len(dev)} "
                  "holdout questions")
    gold = {q.id: answer_chunk_ids(q, chunks) for q in questions}
    return RagInputs(docs, chunks, questions, dev, gold)


CACHE_TIMED_REGION = ("per batch: sha256 of each text + cache lookup + encode of the missing texts "
                      "(model load excluded); query: the same for one question")


def cache_phase(study: RagStudy, inputs: RagInputs, embedder: Embedder, progress: bool):
    """Phase 2 (R3): the embedding cache cold (a fresh temporary folder), then warm (a new cache object reading
    that folder, as a restart would). Returns the cache rows and (texts, vectors) to seed the project cache
    (None when measure_cold_cache is off)."""
    rows: list[dict] = []
    seed_vectors = None
    if study.measure_cold_cache:
        texts = [c.text for c in inputs.chunks]
        tmp = Path(tempfile.mkdtemp(prefix="kit-rag-cache-"))
        # at least ~10 timed batches, so that R3's interval has samples even on a small corpus
        batch = max(1, min(study.embedding_batch_size, len(texts) // 10))
        try:
            embedder.load()  # its load is reported apart: the cold/warm times are embedding work only
            for phase in ("cold", "warm"):
                say(progress, f"embedding cache {phase} run")
                phase_rows, vectors = cache_run(phase, tmp, texts, inputs.questions, embedder, batch)
                rows += phase_rows
            seed_vectors = (texts + [q.question for q in inputs.questions], vectors)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [{**r, "timed_region": CACHE_TIMED_REGION} for r in rows], seed_vectors


def cache_run(phase: str, folder: Path, texts: list[str], questions: list[Question], embedder: Embedder,
              batch_size: int) -> tuple[list[dict], list]:
    """One cold or warm pass: the corpus in timed batches, then each question alone; rows and all vectors."""
    n_texts0 = embedder.n_texts
    t0 = time.perf_counter()
    cache = EmbeddingCache(folder, embedder.model_id)
    open_ms = (time.perf_counter() - t0) * 1e3
    batch_rows: list[dict] = []
    corpus_vecs, st = embed_texts(texts, embedder, cache, batch_size=batch_size, on_batch=batch_rows.append)
    rows = [{"phase": phase, "what": "corpus", **r} for r in batch_rows]
    q_ms, q_vecs = [], []
    for q in questions:
        t1 = time.perf_counter()
        qv, _ = embed_texts([q.question], embedder, cache, flush=False)
        q_ms.append((time.perf_counter() - t1) * 1e3)
        q_vecs.append(qv[0])
    t1 = time.perf_counter()
    n_q_stored = cache.flush()
    q_store_ms = (time.perf_counter() - t1) * 1e3
    rows += [{"phase": phase, "what": "query", "question_id": q.id, "n_texts": 1, "batch_ms": ms}
             for q, ms in zip(questions, q_ms)]
    rows.append({"phase": phase, "what": "total", "open_ms": open_ms, "load_ms": cache.load_ms,
                 "corpus_embed_ms": st["embed_ms"], "corpus_store_ms": st["store_ms"],
                 "query_embed_ms": sum(q_ms), "query_store_ms": q_store_ms,
                 "n_texts_encoded": embedder.n_texts - n_texts0, "n_chunks": len(texts),
                 "n_queries": len(questions), "n_stored": st["n_stored"] + n_q_stored,
                 "cache_bytes": sum(p.stat().st_size for p in cache.path.glob("*") if p.is_file())})
    return rows, list(corpus_vecs) + q_vecs


def project_vectors(study: RagStudy, inputs: RagInputs, embedder: Embedder, seed_vectors, progress: bool):
    """Phase 3: the study's own vectors from the project cache (seeded with what the R3 run just computed with
    the same model, so nothing is encoded twice). Returns (chunk vectors, {question id: vector}, cache stats)."""
    t0 = time.perf_counter()
    pcache = EmbeddingCache(study.cache_dir, embedder.model_id)
    if seed_vectors is not None:
        pcache.put([text_key(t) for t in seed_vectors[0]], seed_vectors[1])
        pcache.flush()
    chunk_vecs, st_chunks = embed_texts([c.text for c in inputs.chunks], embedder, pcache)
    qvecs, st_q = embed_texts([q.question for q in inputs.questions], embedder, pcache)
    stats = {"cache_dir": study.cache_dir, "n_embedded": st_chunks["n_embedded"] + st_q["n_embedded"],
             "n_cached": st_chunks["n_cached"] + st_q["n_cached"], "seconds": round(time.perf_counter() - t0, 3)}
    say(progress, f"project cache {study.cache_dir}: {stats}")
    return chunk_vecs, {q.id: qvecs[i] for i, q in enumerate(inputs.questions)}, stats


def retrieval_phase(study: RagStudy, inputs: RagInputs, retriever: Retriever, qvec: dict, counter,
                    progress: bool) -> tuple[list[dict], Rankings]:
    """Phase 4: every question (dev and holdout), every k x budget, exact search: retrieval metrics and where the
    gold chunk lands in the packed context. Returns the rows and each question's ranking."""
    say(progress, "retrieval metrics and context packing")
    kmax = min(study.k_max, len(inputs.chunks))
    budgets = sorted(set(study.budgets) | set(study.answer_budgets))
    rankings, rows = Rankings(), []
    for q in inputs.questions:
        _, ids = retriever.search(qvec[q.id], kmax)
        ranked = [int(i) for i in ids[0] if i >= 0]
        rchunks = [inputs.chunks[i] for i in ranked]
        rankings.ranking[q.id] = ranked
        rankings.prefix[q.id] = prefix_token_counts(rchunks, counter)
        for k in study.k_values:
            rows += retrieval_rows(q, k, rchunks, rankings.prefix[q.id], inputs.gold[q.id], budgets, counter)
    return rows, rankings


def retrieval_rows(q: Question, k: int, rchunks: list[Chunk], prefix: list[int], gold: set[str],
                   budgets: list[int], counter) -> list[dict]:
    """One question at one k: its rank metrics (document level) and, per budget, the packed context."""
    docs_ranked = [c.doc_id for c in rchunks]
    cids = [c.chunk_id for c in rchunks]
    base = {"question_id": q.id, "split": q.split, "k": k,
            "recall_at_k": hit_at_k(docs_ranked, q.topics, k),
            "gold_topic_coverage": recall_at_k(docs_ranked, q.topics, k),
            "mrr": reciprocal_rank(docs_ranked, q.topics, k),
            "ndcg": ndcg_at_k(docs_ranked, q.topics, k),
            "answer_chunk_recall": hit_at_k(cids, gold, k)}
    rows = []
    for b in budgets:
        packed = pack_context(rchunks[:k], b, counter, prefix[:k + 1])
        in_context = [c.doc_id for c in packed.included]
        rows.append({**base, "budget": b, "n_in_context": len(packed.included),
                     "n_dropped": len(packed.dropped_ranks), "context_tokens": packed.n_tokens,
                     "topic_in_context": hit_at_k(in_context, q.topics, len(in_context)),
                     **gold_position(packed, cids[:k], gold)})
    return rows


def hnsw_phase(study: RagStudy, inputs: RagInputs, chunk_vecs, embedder: Embedder, qvec: dict,
               rankings: Rankings) -> list[dict]:
    """Phase 5: HNSW against exact search on the dev questions, per efSearch: the recall it costs here."""
    dev, chunks = inputs.dev, inputs.chunks
    kmax = min(study.k_max, len(chunks))
    dev_mat = np.stack([qvec[q.id] for q in dev])
    rows = []
    for ef in study.hnsw_ef_search:
        h = Retriever(chunks, chunk_vecs, embedder, "hnsw", hnsw_m=study.hnsw_m, ef_search=ef)
        t1 = time.perf_counter()
        _, hids = h.search(dev_mat, kmax)
        search_ms = (time.perf_counter() - t1) * 1e3 / len(dev)
        for qi, q in enumerate(dev):
            exact = rankings.ranking[q.id]
            approx = [int(i) for i in hids[qi] if i >= 0]
            rows += [{"question_id": q.id, "ef_search": ef, "hnsw_m": study.hnsw_m, "k": k,
                      "overlap_with_exact": len(set(exact[:k]) & set(approx[:k])) / min(k, len(exact)),
                      "recall_at_k": hit_at_k([chunks[i].doc_id for i in approx], q.topics, k),
                      "exact_recall_at_k": hit_at_k([chunks[i].doc_id for i in exact], q.topics, k),
                      "build_ms": h.build_ms, "search_ms_per_query": search_ms}
                     for k in study.k_values if k <= kmax]
    return rows


def latency_phase(study: RagStudy, inputs: RagInputs, retriever: Retriever, progress: bool) -> list[dict]:
    """Phase 6 (R1): search latency (query embedding, no cache + exact FAISS search) against k, the k values of
    each question and repetition in random order (study.seed)."""
    say(progress, "search latency against k")
    rng = random.Random(study.seed)
    questions = inputs.dev[:study.n_latency_questions]
    for q in questions[:3]:  # warm-up: first calls pay lazy initialisation
        retriever.retrieve(q.question, min(study.k_max, len(inputs.chunks)))
    ks = sorted(set(study.k_values) | {GUIDE["k_before"], GUIDE["k_after"]})
    rows = []
    for rep in range(study.repetitions):
        for q in questions:
            order = ks[:]
            rng.shuffle(order)
            for k in order:
                r = retriever.retrieve(q.question, k)
                rows.append({"question_id": q.id, "k": k, "repetition": rep, "embed_ms": r.embed_ms,
                             "faiss_ms": r.search_ms, "search_ms": r.total_ms,
                             "timed_region": "SentenceTransformer.encode of the question (no cache) + "
                                             "IndexFlatIP.search, in-process"})
    return rows


# ---- answers -------------------------------------------------------------------------------------------------------------
@dataclass
class AnswerPlan:
    question: Question
    k: int
    budget: int
    messages: list[dict]
    info: dict             # rag_messages' info: context_tokens, n_in_context, n_dropped, gold position ...


def answer_plans(study: RagStudy, inputs: RagInputs, rankings: Rankings, counter) -> list[AnswerPlan]:
    """Phase 7a: the prompts of the first n dev questions at every answer_k x answer_budget (closed book, k=0:
    no context, no budget), each built by rag_messages from the question's exact ranking."""
    plans = []
    for q in inputs.dev[:study.n_answer_questions]:
        ranked = [inputs.chunks[i] for i in rankings.ranking[q.id]]
        for k in study.answer_k:
            for b in (study.answer_budgets if k else [0]):
                messages, info = rag_messages(q, ranked, k, b, counter, prefix_counts=rankings.prefix[q.id],
                                              gold_ids=inputs.gold[q.id])
                plans.append(AnswerPlan(q, k, b, messages, info))
    return plans


def answer_n_ctx(study: RagStudy, inputs: RagInputs, plans: list[AnswerPlan], rankings: Rankings, counter,
                 card: dict) -> int:
    """Phase 7b: the context the one model load needs: the longest packed context (answers and concurrency
    runs) + the template and question + max_tokens, rounded up to 256, at most the model's n_ctx_train."""
    max_ctx = max([p.info["context_tokens"] for p in plans] + [0])
    for q in inputs.dev[:study.n_concurrency_queries]:
        prefix = rankings.prefix[q.id]
        max_ctx = max(max_ctx, min(prefix[min(study.concurrency_k, len(prefix) - 1)], GUIDE["max_context_length"]))
    overhead = max(counter(json.dumps(build_messages(q.question, ""))) for q in inputs.dev) + 64
    return min(card["n_ctx_train"], int(math.ceil((max_ctx + overhead + study.max_tokens) / 256) * 256))


def answer_settings(study: RagStudy, n_ctx: int) -> Settings:
    return Settings(model=study.model, n_ctx=n_ctx, temperature=0.0, max_tokens=study.max_tokens, seed=42,
                    rag_search_k=GUIDE["k_after"], max_context_length=GUIDE["max_context_length"])


def answer_key(card: dict, messages: list[dict], max_tokens: int) -> str:
    """A prompt's identity: model hash, messages, max_tokens (identical prompts are measured once)."""
    blob = json.dumps({"model": card["sha256"], "messages": messages, "max_tokens": max_tokens}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


ANSWER_FIELDS = ("text", "finish_reason", "ttft_ms", "e2e_ms", "n_prompt_tokens", "n_gen_tokens", "engine_pp_ms",
                 "engine_tg_ms")


def answer_phase(lm, plans: list[AnswerPlan], card: dict, study: RagStudy, out: Path, progress: bool) -> list[dict]:
    """Phase 7c: each distinct prompt answered once (resumed from answer_requests.jsonl), then one row per plan."""
    n_q = len({p.question.id for p in plans})
    say(progress, f"answers: {n_q} questions x {len(study.answer_k)} k x {len(study.answer_budgets)} budgets "
                  f"(n_ctx {lm.settings.n_ctx})")
    done = answer_requests(lm, plans, card, study.max_tokens, out / "answer_requests.jsonl", progress)
    rows, first_use = [], set()
    for p in plans:
        key = answer_key(card, p.messages, study.max_tokens)
        row = {"question_id": p.question.id, "k": p.k, "budget": p.budget, "prompt_key": key,
               "answer": p.question.answer, "context_tokens": p.info["context_tokens"],
               "n_in_context": p.info["n_in_context"], "n_dropped": p.info["n_dropped"],
               **{c: p.info[c] for c in ("gold_status", "gold_rank", "gold_token_offset")},
               "shared_prompt": key in first_use, "max_tokens": study.max_tokens,
               "timed_region": "stream_chat: create_chat_completion call to last chunk, prompt cache reset"}
        first_use.add(key)
        req = done.get(key)
        if req is None:
            row.update(status="error", error="request failed: see answer_requests.jsonl")
        else:
            row.update(status="ok", error=None, response=req["text"], correct=is_correct(req["text"], p.question.answer),
                       **{c: req[c] for c in ("ttft_ms", "e2e_ms", "n_prompt_tokens", "n_gen_tokens", "finish_reason")},
                       **{c: req[c] for c in process_provenance() if c in req})  # the process that measured it
        rows.append(row)
    return rows


def answer_requests(lm, plans: list[AnswerPlan], card: dict, max_tokens: int, journal: Path,
                    progress: bool) -> dict[str, dict]:
    """The distinct prompts' requests, journaled one by one: {prompt key: request record}. A failed request is a
    record with status 'error', not a lost study; one already answered in the journal is not asked again."""
    done = {r["prompt_key"]: r for r in read_rows(journal) if r.get("status") == "ok"}
    stream_chat(lm, build_messages(WARMUP_QUESTION, ""), max_tokens=4, temperature=0.0)  # warm-up
    unique = {}
    for p in plans:
        unique.setdefault(answer_key(card, p.messages, max_tokens), p)
    todo = [key for key in unique if key not in done]
    t0 = time.perf_counter()
    for n, key in enumerate(todo, 1):
        p = unique[key]
        try:
            r = stream_chat(lm, p.messages, max_tokens=max_tokens, temperature=0.0)
            req = {"prompt_key": key, "status": "ok", "error": None, "question_id": p.question.id,
                   "context_tokens": p.info["context_tokens"], "n_in_context": p.info["n_in_context"],
                   **{c: r[c] for c in ANSWER_FIELDS}, "test_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   **process_provenance()}
        except Exception as exc:  # a failed request is a row, not a lost study
            req = {"prompt_key": key, "status": "error", "error": f"{type(exc).__name__}: {exc}",
                   "question_id": p.question.id}
        append_rows(journal, [req])
        if req["status"] == "ok":
            done[key] = req
        if n % 10 == 0 or n == len(todo):
            say(progress, f"  {n}/{len(todo)} distinct prompts answered ({time.perf_counter() - t0:.0f} s)")
    return done


# ---- R4: concurrent queries ------------------------------------------------------------------------------------------------
def concurrency_phase(lm, retriever: Retriever, counter, questions: list[Question], study: RagStudy,
                      progress: bool) -> list[dict]:
    """Phase 7d (R4): N queries submitted at once to a pool of c workers. Retrieval alone, `repetitions` batches per
    level (throughput samples); then full RAG requests in rounds: the first round runs every level, the others the
    two levels R4 compares (2 and 1), in a random order per round. Looks come after each block of
    `concurrency_rounds` rounds: while `r4_compare` is inconclusive another block runs, up to `concurrency_looks`
    blocks and `concurrency_max_s` seconds of extra blocks (a fixed schedule of looks, every look at
    looks_confidence(concurrency_looks), so stopping at the first decided look keeps the error rate at 5 %).
    Retrieval (embedding + search) runs in parallel threads; generation uses the one model behind a lock, as a
    llama-cpp-python server serializes requests. Rows carry their round and look; the RAG rows say how many looks
    ran (`looks`), of how many planned (`looks_planned`), and whether a cap rather than a decision ended them."""
    say(progress, f"concurrency {study.concurrency} x {len(questions)} queries")
    rows: list[dict] = []
    model_lock = threading.Lock()
    for c in study.concurrency:
        for rep in range(study.repetitions):
            rows += retrieval_batch(retriever, questions, c, rep, study.concurrency_k)
    rng = random.Random(study.seed)
    compared = [c for c in study.concurrency if c in R4_LEVELS]
    both = len(compared) == len(R4_LEVELS)   # without both levels there is no comparison: one round of each level
    planned, per_block = (study.concurrency_looks, study.concurrency_rounds) if both else (1, 1)
    rnd, looks, spent, stop = 0, 0, 0.0, "schedule"
    while looks < planned:
        if looks and spent >= study.concurrency_max_s:
            stop = "time cap"
            break
        t0 = time.perf_counter()
        looks += 1
        for _ in range(per_block):
            levels = list(study.concurrency if rnd == 0 else compared)
            rng.shuffle(levels)
            for c in levels:
                rows += rag_batch(lm, retriever, counter, questions, c, study, model_lock, rnd, looks)
            rnd += 1
        if looks > 1:
            spent += time.perf_counter() - t0
        if r4_compare(rows, planned).verdict in DECIDED:
            stop = "decided"
            break
    for r in rows:
        if r["stage"] == "rag":
            r.update(looks=looks, looks_planned=planned, looks_capped=stop != "decided", looks_stop=stop,
                     extra_rounds_s=round(spent, 1))
    say(progress, f"  R4: {rnd} rounds in {looks} look(s), stopped: {stop}")
    return rows


def retrieval_batch(retriever: Retriever, questions: list[Question], c: int, rep: int, k: int) -> list[dict]:
    """One batch of retrievals on c threads: each query's latency and when it finished."""
    t0 = time.perf_counter()

    def one(q: Question) -> dict:
        s = time.perf_counter()
        r = retriever.retrieve(q.question, k)
        e = time.perf_counter()
        return {"question_id": q.id, "latency_ms": (e - s) * 1e3, "embed_ms": r.embed_ms, "faiss_ms": r.search_ms,
                "done_s": e - t0}

    with ThreadPoolExecutor(max_workers=c) as pool:
        res = list(pool.map(one, questions))
    wall = time.perf_counter() - t0
    return [{"stage": "retrieval", "concurrency": c, "repetition": rep, "batch_wall_s": wall,
             "throughput_qps": len(questions) / wall, **r,
             "timed_region": "submission of the batch to the query's retrieval end"} for r in res]


def rag_batch(lm, retriever: Retriever, counter, questions: list[Question], c: int, study: RagStudy,
              model_lock: threading.Lock, rnd: int = 0, look: int = 1) -> list[dict]:
    """One batch of full RAG requests on c threads (prompts by rag_messages at concurrency_k and the guide's
    budget): a row per request, with `gap_s`, the time from the previous completion in the batch to its own (the
    gaps sum to the batch's wall time: 1/throughput, request by request)."""
    k, budget = study.concurrency_k, GUIDE["max_context_length"]
    t0 = time.perf_counter()

    def one(q: Question) -> dict:
        s = time.perf_counter()
        messages, info = rag_messages(q, retriever, k, budget, counter)
        w0 = time.perf_counter()
        with model_lock:
            w1 = time.perf_counter()
            g = stream_chat(lm, messages, max_tokens=study.max_tokens, temperature=0.0)
        e = time.perf_counter()
        return {"question_id": q.id, "retrieval_ms": info["retrieval_ms"], "queue_ms": (w1 - w0) * 1e3,
                "ttft_ms": g["ttft_ms"], "generation_ms": g["e2e_ms"], "latency_ms": (e - s) * 1e3,
                "n_prompt_tokens": g["n_prompt_tokens"], "n_gen_tokens": g["n_gen_tokens"],
                "correct": is_correct(g["text"], q.answer), "done_s": e - t0}

    with ThreadPoolExecutor(max_workers=c) as pool:
        res = sorted(pool.map(one, questions), key=lambda r: r["done_s"])
    wall = time.perf_counter() - t0
    prev = 0.0
    for r in res:
        r["gap_s"], prev = r["done_s"] - prev, r["done_s"]
    return [{"stage": "rag", "concurrency": c, "repetition": rnd, "look": look, "batch_wall_s": wall,
             "throughput_qps": len(questions) / wall, **r, "k": k, "budget": budget,
             "timed_region": "submission of the batch to the query's last token; generation serialized by one "
                             "model lock; gap_s: from the batch's previous completion to this one"} for r in res]


def r4_pairs(rows) -> tuple[list[float], list[float], int]:
    """The batch wall times of R4's two levels paired by round: (at 2 concurrent, at 1, rounds with both). A batch's
    wall time is the time its queries took in all (1 / throughput); the same questions run at both levels in the
    same round, back to back, so the pairing removes their prompt and answer lengths and slow drift of the machine.
    (Pairing single requests by question would not: at 2 concurrent the order requests complete in changes.)"""
    recs = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else rows
    wall = {(r["concurrency"], r["repetition"]): float(r["batch_wall_s"]) for r in recs
            if r.get("stage") == "rag" and r.get("concurrency") in R4_LEVELS and (r.get("batch_wall_s") or 0) > 0}
    cand, base = R4_LEVELS
    keys = sorted(rnd for (c, rnd) in wall if c == cand and (base, rnd) in wall)
    return [wall[(cand, k)] for k in keys], [wall[(base, k)] for k in keys], len(keys)


def r4_compare(rows, looks: int = 1, evidence=(), equivalence: float | None = None) -> Verdict:
    """R4's comparison: a batch's wall time (1/throughput) at 2 concurrent queries against 1, the geometric mean of
    the per-round ratios (`r4_pairs`) with a bootstrap interval at looks_confidence(looks), labelled with R4's band
    (equivalence None) by kit.verdicts.from_interval."""
    cand, base, n_rounds = r4_pairs(rows)
    metric = (f"wall time of a batch of RAG requests (1/throughput), {R4_LEVELS[0]} concurrent / {R4_LEVELS[1]}, "
              "paired by round")
    few = too_few("R4", len(cand), len(base), "concurrency_rounds or concurrency_looks", evidence,
                  MIN_RAG_SAMPLES, rounds=n_rounds)
    if few is not None:
        few.metric = metric
        return few
    confidence = looks_confidence(looks)
    point, lo, hi = paired_log_ratio([math.log(x) for x in cand], [math.log(x) for x in base], confidence=confidence)
    text = (f"{metric}: {abs(point - 1) * 100:.1f} % {'lower' if point < 1 else 'higher'} ({confidence:.1%} CI "
            f"{lo:.3f}-{hi:.3f}; {n_rounds} rounds)")
    return from_interval("R4", point, lo, hi, claimed="better", higher_is_better=False, metric=metric,
                         equivalence=equivalence,
                         n_candidate=len(cand), n_baseline=len(base), summary=text, evidence=evidence,
                         confidence=confidence, details={"rounds": n_rounds})


def write_meta(study: RagStudy, inputs: RagInputs, embedder: Embedder, card: dict, env: dict, facts: dict,
               seconds: float, out: Path, progress: bool) -> None:
    """The run's facts: config, corpus and chunk sizes, embedding model, LLM, machine, duration (meta.json)."""
    meta = {"config": study.to_dict(), "n_documents": len(inputs.docs), "n_chunks": len(inputs.chunks),
            "chunk_chars_median": statistics.median(len(c.text) for c in inputs.chunks),
            "n_dev": len(inputs.dev), "n_holdout": len(inputs.questions) - len(inputs.dev),
            "embedding_model": embedder.model_id, "embedder_load_s": embedder.load_s, **facts,
            "llm": card["model_type"], "llm_sha256": card["sha256"], "cpu_info": env.get("cpu_info"),
            "study_seconds": round(seconds, 1), "guide": GUIDE}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    say(progress, f"done in {meta['study_seconds']} s")


# ---- as a kit.sweep test kind --------------------------------------------------------------------------------------------------
def answer_test(lm, test, repetitions: int) -> dict:
    """Test("kit.studies.rag.study:answer_test", params={k, budget, n_questions, chunk_size, chunk_overlap,
    corpus_topics, cache_dir, max_tokens}): RAG answers inside a kit.sweep trial's child process (the model loaded
    with the trial's settings); vectors come from the embedding cache; prompts from rag_messages. The request
    columns come from kit.measure.requests_row, plus accuracy with its Wilson interval."""
    p = dict(test.params)
    k, budget = int(p.get("k", GUIDE["k_after"])), int(p.get("budget", GUIDE["max_context_length"]))
    max_tokens = int(p.get("max_tokens", test.n_gen or 48))
    docs = load_corpus(p.get("corpus", PYDOC_CORPUS), p.get("corpus_topics") or None)
    chunks = chunk_documents(docs, int(p.get("chunk_size", 800)), int(p.get("chunk_overlap", 100)))
    qs = load_questions(p.get("questions_path"), p.get("split", "dev"), {d.doc_id for d in docs})
    qs = qs[:int(p.get("n_questions", 12))]
    embedder = Embedder()
    cache = EmbeddingCache(p.get("cache_dir", DEFAULT_CACHE_DIR), embedder.model_id)
    vecs, _ = embed_texts([c.text for c in chunks], embedder, cache)
    qvecs, _ = embed_texts([q.question for q in qs], embedder, cache)
    retriever = Retriever(chunks, vecs, embedder)
    counter = LlamaTokenCounter(llm=lm.llm)
    stream_chat(lm, build_messages(WARMUP_QUESTION, ""), max_tokens=4, temperature=0.0)
    reqs, correct = [], []
    for _ in range(repetitions if p.get("repeat", False) else 1):
        for i, q in enumerate(qs):
            messages, _ = rag_messages(q, retriever, k, budget, counter, query_vector=qvecs[i])
            r = stream_chat(lm, messages, max_tokens=max_tokens, temperature=0.0)
            reqs.append(r)
            correct.append(is_correct(r["text"], q.answer))
    n, s = len(correct), sum(correct)
    lo, hi = wilson_interval(s, n)
    return {**requests_row(reqs), "n_gen": max_tokens, "n_depth": 0, "repetitions": 1, "k": k, "budget": budget,
            "n_questions": n, "accuracy": s / n if n else None, "accuracy_ci": [lo, hi],
            "timed_region": "stream_chat per question (retrieval untimed), prompt cache reset per request"}
