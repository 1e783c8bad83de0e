"""kit.studies.rag: chunking, the embedding cache, retrieval metrics, context packing, index rebuilding, config checks."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from kit.config import StudyConfigError
from kit.studies import rag as R
from kit.verdicts import INCONCLUSIVE, NO_EFFECT, NOT_TESTABLE, REFUTED, SUPPORTED, compare


# ---- chunking -----------------------------------------------------------------------------------------------------
TEXT = ("The try statement specifies exception handlers and/or cleanup code for a group of statements. "
        "If no exception occurs in the try clause, no exception handler is executed.\n\n") * 12


@pytest.mark.parametrize("size,overlap", [(200, 0), (200, 50), (800, 100), (97, 96)])
def test_chunks_respect_size_overlap_and_cover_the_text(size, overlap):
    chunks = R.chunk_text(TEXT, size, overlap)
    assert chunks, "no chunks"
    for s, e, t in chunks:
        assert t and t.strip() == t, "empty or unstripped chunk"
        assert len(t) <= size
        assert TEXT[s:e] == t, "offsets do not point at the chunk"
    for (s0, e0, _), (s1, e1, _) in zip(chunks, chunks[1:]):
        assert s1 > s0, "no progress"
        assert e0 - s1 <= overlap, "overlap larger than asked"
    covered = np.zeros(len(TEXT), bool)
    for s, e, _ in chunks:
        covered[s:e] = True
    missing = [i for i, ch in enumerate(TEXT) if not covered[i] and not ch.isspace()]
    assert not missing, f"characters in no chunk: {missing[:10]}"


def test_chunks_overlap_when_asked_and_do_not_cut_words():
    chunks = R.chunk_text(TEXT, 300, 80)
    assert any(e0 > s1 for (_, e0, _), (s1, _, _) in zip(chunks, chunks[1:])), "overlap=80 produced no overlap"
    words = set(TEXT.split())
    for _, _, t in chunks:
        assert t.split()[0] in words and t.split()[-1] in words, f"a word was cut: {t[:30]!r}...{t[-30:]!r}"


def test_chunking_is_deterministic_and_drops_whitespace_only_windows():
    assert R.chunk_text(TEXT, 250, 40) == R.chunk_text(TEXT, 250, 40)
    assert R.chunk_text("   \n\n   ", 100, 10) == []
    assert R.chunk_text("short", 100, 10) == [(0, 5, "short")]
    with pytest.raises(ValueError):
        R.chunk_text(TEXT, 100, 100)
    with pytest.raises(ValueError):
        R.chunk_text(TEXT, 0, 0)


def test_corpus_chunks_and_question_set_line_up():
    docs = R.load_corpus()
    assert len(docs) == 79
    chunks = R.chunk_documents(docs, 800, 100)
    assert chunks == R.chunk_documents(docs, 800, 100)
    by_id = {d.doc_id: d.text for d in docs}
    assert all(by_id[c.doc_id][c.start:c.end] == c.text and 0 < len(c.text) <= 800 for c in chunks)
    assert len({c.chunk_id for c in chunks}) == len(chunks)
    qs = R.load_questions(split="all")
    assert len(qs) == 122 and {q.split for q in qs} == {"dev", "holdout"}
    assert len(R.load_questions(split="holdout")) == 20
    for q in qs:  # every question has a gold chunk that holds its answer
        gold = R.answer_chunk_ids(q, chunks)
        assert gold and all(cid.split("#")[0] in q.topics for cid in gold)
    sub = R.load_corpus(topics=["try", "with"])
    assert {d.doc_id for d in sub} == {"try", "with"}
    assert all({"try", "with"} & set(q.topics) for q in R.load_questions(doc_ids=["try", "with"]))
    with pytest.raises(ValueError):
        R.load_corpus(topics=["no-such-topic"])


def test_folder_corpus(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\nSome markdown text.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("plain text file")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01")
    docs = R.load_corpus(str(tmp_path))
    assert [d.doc_id for d in docs] == ["a.md", "sub/b.txt"]


# ---- embedding cache ---------------------------------------------------------------------------------------------------
class FakeEmbedder:
    """Deterministic vectors from the text hash; counts what it encodes."""

    def __init__(self, dim: int = 8):
        self.model_id = "fake-embedder-1"
        self.batch_size = 4
        self.dim = dim
        self.n_calls = 0
        self.n_texts = 0

    def encode(self, texts):
        self.n_calls += 1
        self.n_texts += len(texts)
        rows = []
        for t in texts:
            seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows)


def test_cache_second_run_embeds_nothing_and_returns_identical_vectors(tmp_path):
    texts = [f"chunk number {i}" for i in range(11)]
    emb = FakeEmbedder()
    cache = R.EmbeddingCache(tmp_path, emb.model_id)
    v1, st1 = R.embed_texts(texts, emb, cache)
    assert st1["n_embedded"] == 11 and emb.n_texts == 11 and emb.n_calls == 3  # batches of 4

    emb2 = FakeEmbedder()
    cache2 = R.EmbeddingCache(tmp_path, emb2.model_id)  # a new process would do this: read from disk
    assert len(cache2) == 11
    v2, st2 = R.embed_texts(texts, emb2, cache2)
    assert emb2.n_calls == 0 and emb2.n_texts == 0 and st2["n_embedded"] == 0 and st2["n_cached"] == 11
    assert np.array_equal(v1, v2) and v2.dtype == np.float32

    # only new texts are encoded, in input order
    v3, st3 = R.embed_texts(texts[:3] + ["a new one"], emb2, cache2)
    assert st3["n_embedded"] == 1 and emb2.n_texts == 1
    assert np.array_equal(v3[:3], v1[:3])

    # open formats only: .npy readable without pickle, keys as JSON
    files = sorted(p.name for p in cache2.path.iterdir())
    assert all(f.endswith((".npy", ".json")) for f in files), files
    for p in cache2.path.glob("vectors-*.npy"):
        arr = np.load(p, allow_pickle=False)
        keys = json.loads(p.with_name(p.name.replace("vectors-", "keys-").replace(".npy", ".json")).read_text())
        assert arr.shape == (len(keys), 8)


def test_cache_is_keyed_by_model_and_ignores_interrupted_writes(tmp_path):
    emb = FakeEmbedder()
    R.embed_texts(["x", "y"], emb, R.EmbeddingCache(tmp_path, emb.model_id))
    other = R.EmbeddingCache(tmp_path, "another-model-2")
    assert len(other) == 0, "vectors of one model served for another"
    # a vectors file without its keys file (killed mid-write) is not read
    np.save(tmp_path / emb.model_id / "vectors-999.npy", np.zeros((5, 8), np.float32))
    assert len(R.EmbeddingCache(tmp_path, emb.model_id)) == 2
    with pytest.raises(ValueError):
        R.EmbeddingCache(tmp_path, "../escape")


def test_cache_compacts_many_shards(tmp_path):
    emb = FakeEmbedder()
    cache = R.EmbeddingCache(tmp_path, emb.model_id)
    for i in range(R.EmbeddingCache.MAX_SHARDS + 3):
        R.embed_texts([f"t{i}"], emb, cache)
    assert cache.n_shards <= R.EmbeddingCache.MAX_SHARDS
    again = R.EmbeddingCache(tmp_path, emb.model_id)
    assert len(again) == R.EmbeddingCache.MAX_SHARDS + 3


def test_real_embedder_and_cache(tmp_path):
    emb = R.Embedder()
    texts = ["The with statement wraps a block with context manager methods.", "Generators yield values."]
    v, st = R.embed_texts(texts, emb, R.EmbeddingCache(tmp_path, emb.model_id))
    assert v.shape == (2, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    emb2 = R.Embedder()
    v2, st2 = R.embed_texts(texts, emb2, R.EmbeddingCache(tmp_path, emb2.model_id))
    assert emb2.n_calls == 0 and not emb2.loaded, "a warm cache must not even load the model"
    assert np.array_equal(v, v2)
    assert emb.model_id == emb2.model_id and emb.model_id.startswith("all-MiniLM-L6-v2-")


# ---- metrics ----------------------------------------------------------------------------------------------------------------
def test_metrics_on_hand_made_rankings():
    ranked = ["a", "b", "c", "d", "e"]
    assert R.hit_at_k(ranked, {"c"}, 2) == 0.0
    assert R.hit_at_k(ranked, {"c"}, 3) == 1.0
    assert R.recall_at_k(ranked, {"b", "e", "z"}, 5) == pytest.approx(2 / 3)
    assert R.recall_at_k(ranked, {"b", "e"}, 2) == pytest.approx(1 / 2)
    assert R.reciprocal_rank(ranked, {"c", "e"}) == pytest.approx(1 / 3)
    assert R.reciprocal_rank(ranked, {"e"}, k=3) == 0.0
    assert R.ndcg_at_k(ranked, {"a"}, 5) == pytest.approx(1.0)
    assert R.ndcg_at_k(ranked, {"b"}, 5) == pytest.approx(1 / math.log2(3))
    # two relevant at ranks 1 and 3: DCG = 1 + 1/log2(4); ideal = 1 + 1/log2(3)
    assert R.ndcg_at_k(ranked, {"a", "c"}, 5) == pytest.approx((1 + 0.5) / (1 + 1 / math.log2(3)))
    assert R.ndcg_at_k(ranked, {"z"}, 5) == 0.0
    # document labels repeat (two chunks of one document): the repeat gains nothing
    docs = ["try", "try", "with"]
    assert R.ndcg_at_k(docs, {"try"}, 3) == pytest.approx(1.0)
    assert R.ndcg_at_k(docs, {"try", "with"}, 3) == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))
    assert R.recall_at_k(docs, {"try", "with"}, 2) == 0.5


def test_wilson_interval_and_answer_check():
    lo, hi = R.wilson_interval(0, 12)
    assert lo == 0.0 and 0.2 < hi < 0.3
    lo, hi = R.wilson_interval(6, 12)
    assert lo < 0.5 < hi and hi - lo < 0.6
    assert R.wilson_interval(12, 12)[1] == 1.0
    assert R.is_correct("It raises a  TypeError.", "typeerror")
    assert R.is_correct("Use __ENTER__\nand exit", "__enter__")
    assert not R.is_correct("ValueError", "TypeError")
    assert not R.is_correct(None, "x")
    d, lo, hi = R.bootstrap_mean_diff([1, 1, 1, 1], [0, 0, 0, 0])
    assert d == 1 and lo == 1 and hi == 1


# ---- context packing -----------------------------------------------------------------------------------------------------------
def _chunks(n: int, words: int = 10) -> list:
    return [R.Chunk(f"doc{i}#0", f"doc{i}", 0, 0, 0, " ".join(f"w{i}" for _ in range(words))) for i in range(n)]


def word_count(text: str) -> int:
    return len(text.split())


def test_packing_stays_within_budget_and_records_offsets():
    ranked = _chunks(5)                      # each formatted chunk: "[r] (docI)" + 10 words = 12 "tokens"
    packed = R.pack_context(ranked, 30, word_count)
    assert packed.n_tokens <= 30 and packed.n_tokens == word_count(packed.text)
    assert [c.rank for c in packed.included] == [1, 2]
    assert [c.token_offset for c in packed.included] == [0, 12]
    assert packed.dropped_ranks == [3, 4, 5]
    full = R.pack_context(ranked, 10_000, word_count)
    assert len(full.included) == 5 and full.dropped_ranks == []
    assert R.pack_context(ranked, 5, word_count).included == []

    ids = [c.chunk_id for c in ranked]
    assert R.gold_position(packed, ids, {"doc1#0"}) == {"gold_status": "in_context", "gold_rank": 2,
                                                         "gold_token_offset": 12}
    assert R.gold_position(packed, ids, {"doc4#0"})["gold_status"] == "dropped_by_budget"
    assert R.gold_position(packed, ids, {"doc4#0"})["gold_rank"] == 5
    assert R.gold_position(packed, ids, {"elsewhere#3"})["gold_status"] == "not_retrieved"


def test_packing_with_the_llm_tokenizer():
    counter = R.LlamaTokenCounter("smollm2-135m")
    try:
        docs = R.load_corpus(topics=["try", "with"])
        ranked = R.chunk_documents(docs, 800, 100)[:8]
        for budget in (150, 400, 1000, 4000):
            packed = R.pack_context(ranked, budget, counter)
            exact = len(counter.tokenize(packed.text))
            assert exact == packed.n_tokens <= budget
            for a, b in zip(packed.included, packed.included[1:]):
                assert b.token_offset == a.token_offset + a.n_tokens
            if packed.dropped_ranks:  # the next chunk really would not have fitted
                nxt = R.pack_context(ranked[:len(packed.included) + 1], 10**6, counter)
                assert nxt.n_tokens > budget
        # the LLM's tokens, not characters: 800 characters are far fewer than 800 tokens
        assert 100 < counter(ranked[0].text) < 400
    finally:
        counter.close()


# ---- index: rebuilt from vectors, never read from a file --------------------------------------------------------------------------
def test_index_is_rebuilt_from_cached_vectors_not_loaded(tmp_path, monkeypatch):
    import faiss

    def refuse(*a, **k):
        raise AssertionError("faiss.read_index must not be used: rebuild from the cached vectors")

    monkeypatch.setattr(faiss, "read_index", refuse)
    emb = FakeEmbedder(dim=16)
    texts = [f"passage {i}" for i in range(40)]
    R.embed_texts(texts, emb, R.EmbeddingCache(tmp_path, emb.model_id))
    vecs, st = R.embed_texts(texts, FakeEmbedder(dim=16), R.EmbeddingCache(tmp_path, emb.model_id))
    assert st["n_embedded"] == 0
    chunks = [R.Chunk(f"d{i}#0", f"d{i}", 0, 0, 0, t) for i, t in enumerate(texts)]
    retr = R.Retriever(chunks, vecs, emb, "flat")
    q = vecs[7] + 0.01
    _, ids = retr.search(q, 5)
    brute = list(np.argsort(-(vecs @ (q / 1.0)))[:5])
    assert list(ids[0]) == brute and ids[0][0] == 7
    assert not list(tmp_path.rglob("*.index")) and not list(tmp_path.rglob("*.faiss")), "an index file was written"
    # HNSW with a generous efSearch finds the same neighbours on a small set
    h = R.Retriever(chunks, vecs, emb, "hnsw", hnsw_m=8, ef_search=64)
    assert list(h.search(q, 5)[1][0]) == brute
    assert retr.search(q, 100)[1].shape == (1, 40)  # k beyond the corpus is clipped
    with pytest.raises(ValueError):
        R.build_index(vecs, "ivf")


def test_retrieve_times_embedding_and_search(tmp_path):
    emb = FakeEmbedder(dim=16)
    texts = [f"passage {i}" for i in range(10)]
    vecs, _ = R.embed_texts(texts, emb)
    chunks = [R.Chunk(f"d{i}#0", f"d{i}", 0, 0, 0, t) for i, t in enumerate(texts)]
    r = R.Retriever(chunks, vecs, emb).retrieve("passage 3", 4)
    assert r.ids[0] == 3 and len(r.ids) == 4 and r.embed_ms > 0 and r.search_ms > 0
    assert r.scores == sorted(r.scores, reverse=True)


# ---- configuration ---------------------------------------------------------------------------------------------------------------
def test_config_validation():
    cfg = R.RagStudy(k_values=[8, 5, 5, 1])
    assert cfg.k_values == [1, 5, 8]
    assert cfg.out_path.is_absolute() and cfg.out_path.name == "60_rag"
    for bad in ({"k_values": [0, 5]}, {"k_values": []}, {"budgets": ["4000"]}, {"chunk_overlap": 900},
                {"concurrency": [0]}, {"n_answer_questions": -1}, {"corpus": "/no/such/folder"},
                {"repetitions": True}, {"repetitions": "abc"}, {"cache_dir": ""}, {"corpus_topics": "try"}):
        with pytest.raises(StudyConfigError):
            R.RagStudy(**bad)
    with pytest.raises(TypeError):
        R.RagStudy(rag_k=5)  # a typo fails, it is not silently ignored
    with pytest.raises(StudyConfigError, match="did you mean 'k_values'"):
        R.RagStudy.from_params({"k_value": [1]})
    assert set(R.RagStudy.help()) == set(R.RagStudy.defaults()) and all(R.RagStudy.help().values())


def test_pareto_front():
    import pandas as pd

    t = pd.DataFrame({"ttft": [100, 200, 300, 150], "acc": [0.1, 0.5, 0.4, 0.1]})
    assert R.pareto_front(t, "ttft", "acc") == [True, True, False, False]


# ---- verdict logic on synthetic rows (no measurement) ------------------------------------------------------------------------
def _conc_rows(gap1, gap2, rounds: int = 6, looks: int = 1, planned: int = 1, stop: str = "decided",
               noise=(1.0, 1.004, 0.996)) -> list[dict]:
    """Concurrency rows as concurrency_phase writes them: retrieval batches, then per round a batch per level whose
    requests carry the gap each closed (question i's gap: gap1[i] at 1 concurrent query, gap2[i] at 2) and the
    batch's wall time; round r's batch at 2 concurrent takes noise[r % len(noise)] times its gaps' sum."""
    rows = [{"stage": "retrieval", "concurrency": c, "repetition": r, "throughput_qps": 30.0 + r, "latency_ms": 30.0}
            for c in (1, 2) for r in range(5)]
    for rnd in range(rounds):
        for c, gaps in ((1, gap1), (2, gap2)):
            wall = sum(gaps) * (1 + 0.002 * rnd) * (noise[rnd % len(noise)] if c == 2 else 1.0)
            rows += [{"stage": "rag", "concurrency": c, "repetition": rnd, "question_id": f"q{i}",
                      "gap_s": g * (1 + 0.002 * rnd), "batch_wall_s": wall, "latency_ms": 1000.0 * g * c,
                      "throughput_qps": len(gaps) / wall, "looks": looks, "looks_planned": planned,
                      "looks_stop": stop, "extra_rounds_s": 0.0}
                     for i, g in enumerate(gaps)]
    return rows


def _synthetic_result(tmp_path, search_k5, search_k8, gap1, gap2, **conc):
    import pandas as pd

    rng = np.random.default_rng(0)
    latency = [{"question_id": f"q{i}", "k": k, "repetition": 0, "embed_ms": v - 0.05, "faiss_ms": 0.05,
                "search_ms": v}
               for k, base in ((5, search_k5), (8, search_k8)) for i, v in enumerate(base + rng.normal(0, 0.5, 40))]
    retrieval = [{"question_id": f"q{i}", "split": "dev", "k": k, "budget": b, "recall_at_k": float(k == 8 or i % 2),
                  "n_dropped": int(b < 1000), "context_tokens": min(b, 190 * k), "topic_in_context": float(b >= 1000),
                  "mrr": 1.0, "ndcg": 1.0, "answer_chunk_recall": 1.0, "gold_status": "in_context",
                  "gold_token_offset": 0, "n_in_context": k}
                 for i in range(20) for k in (5, 8) for b in (500, 4000, 6000)]
    answers = [{"question_id": f"q{i}", "k": k, "budget": b, "status": "ok", "correct": bool(i % 3 == 0),
                "ttft_ms": (100 + 4 * min(b, 190 * k)) * (1 + 0.01 * i), "e2e_ms": 5000.0, "n_prompt_tokens": 190 * k,
                "prompt_key": f"{i}-{k}-{min(b, 190 * k)}", "gold_status": "in_context"}
               for i in range(12) for k in (5, 8) for b in (500, 4000, 6000)]
    cache = ([{"phase": "cold", "what": "corpus", "batch_ms": 1500 + 10 * i} for i in range(20)]
             + [{"phase": "warm", "what": "corpus", "batch_ms": 0.05 + 0.001 * i} for i in range(20)]
             + [{"phase": p, "what": "query", "batch_ms": (20.0 if p == "cold" else 0.01) + 0.1 * i}
                for p in ("cold", "warm") for i in range(20)]
             + [{"phase": p, "what": "total", "corpus_embed_ms": 30000.0 if p == "cold" else 1.0,
                 "n_texts_encoded": 700 if p == "cold" else 0} for p in ("cold", "warm")])
    conc = _conc_rows(gap1, gap2, **conc)
    return R.RagStudyResult(str(tmp_path), {}, pd.DataFrame(retrieval), pd.DataFrame(), pd.DataFrame(latency),
                            pd.DataFrame(cache), pd.DataFrame(answers), pd.DataFrame(conc))


def test_verdicts_follow_the_data(tmp_path):
    # the same questions at both levels: the pairing removes their differences (2 s to 4 s a request here)
    gaps = [2.0, 3.0, 4.0]
    same = _synthetic_result(tmp_path, 30.0, 30.0, gaps, [g * 1.01 for g in gaps])
    v = {x.claim: x for x in R.rag_verdicts(same)}
    assert all(x.band == 0.05 and x.band_why for x in v.values())  # the claims' stated band (kit.verdicts.BANDS)
    assert v["R1"].verdict == NO_EFFECT  # the whole interval inside +-5 %
    assert v["R2"].verdict == NO_EFFECT and v["R2"].details["identical_prompts"]
    assert v["R3"].verdict == SUPPORTED
    assert v["R4"].verdict == NO_EFFECT and v["R4"].effect == pytest.approx(1.01, abs=0.002)
    assert v["R4"].n_candidate == v["R4"].n_baseline == 6 and v["R4"].details["rounds"] == 6
    assert "TTFT" in v["R1"].summary and "recall" in v["R1"].summary and "6 rounds" in v["R4"].summary

    faster = _synthetic_result(tmp_path, 15.0, 30.0, gaps, [g * 0.5 for g in gaps])
    v = {x.claim: x for x in R.rag_verdicts(faster)}
    assert v["R1"].verdict == SUPPORTED and v["R1"].effect < 0.6
    assert v["R4"].verdict == SUPPORTED and v["R4"].effect == pytest.approx(0.5, abs=0.01)

    slower = _synthetic_result(tmp_path, 45.0, 30.0, gaps, [g * 1.5 for g in gaps])
    v = {x.claim: x for x in R.rag_verdicts(slower)}
    assert v["R1"].verdict == REFUTED and v["R4"].verdict == REFUTED

    # two rounds: too few batch pairs for any interval, and the reason names what to raise
    few = R.r4_verdict(_synthetic_result(tmp_path, 30.0, 30.0, gaps, gaps, rounds=2))
    assert few.verdict == NOT_TESTABLE and "too few" in few.reason and "concurrency_rounds" in few.reason


def test_r4_too_wide_an_interval_is_inconclusive_and_says_what_would_decide_it(tmp_path):
    # the R4: ratios spread from x0.64 to x1.8 around x1.1 cannot tell a loss from a gain
    gaps = [2.0, 3.0, 4.0]
    wide = _synthetic_result(tmp_path, 30.0, 30.0, gaps, gaps, rounds=6, looks=3, planned=3, stop="schedule",
                             noise=(0.64, 1.12, 1.8))
    v = R.r4_verdict(wide)
    assert v.verdict == INCONCLUSIVE and v.ci_low < 1 < v.ci_high
    assert v.confidence == pytest.approx(1 - 0.05 / 3)  # three planned looks: Bonferroni
    assert v.samples_to_decide and v.samples_to_decide > 6 and v.label().startswith("inconclusive: about")
    assert v.details["looks"] == 3 and v.details["rounds_to_decide"] >= 3
    assert "last planned look" in v.summary and "rounds would decide it" in v.summary
    # the same spread, stopped by the time cap
    capped = _synthetic_result(tmp_path, 30.0, 30.0, gaps, gaps, rounds=6, looks=2, planned=3, stop="time cap",
                               noise=(0.64, 1.12, 1.8))
    assert "concurrency_max_s" in R.r4_verdict(capped).summary


def test_r2_with_identical_prompts_is_exactly_no_change(tmp_path):
    """The 4000-token budget never binds at k=8 in the synthetic rows (190 tokens a chunk): same prompts, ratio 1."""
    v = R.r2_verdict(_synthetic_result(tmp_path, 30.0, 30.0, [3.0] * 6, [3.0] * 6))
    assert (v.effect, v.ci_low, v.ci_high) == (1.0, 1.0, 1.0) and v.verdict == NO_EFFECT
    assert v.n_candidate == v.n_baseline == 12
    # the binding budget (500 tokens) is priced: a shorter TTFT, and the gold topics it drops
    assert v.details["small_budget"] == 500 and v.details["ttft_ratio_small"] < 0.5
    assert v.details["gold_topic_in_context_diff"][0] == pytest.approx(-1.0)
    assert v.evidence[0] == f"{tmp_path.name}/answers.jsonl"


def test_rag_messages_is_the_one_prompt_builder():
    counter = R.LlamaTokenCounter()
    try:
        chunks = R.chunk_documents(R.load_corpus(topics=["try", "with"]), 800, 100)
        q = R.load_questions(doc_ids=["try"])[0]
        gold = R.answer_chunk_ids(q, chunks)
        messages, info = R.rag_messages(q, chunks, 3, 10_000, counter, gold_ids=gold)
        assert messages[0]["content"] == R.SYSTEM_PROMPT and q.question in messages[1]["content"]
        assert info["n_in_context"] == 3 and info["chunk_ids"] == [c.chunk_id for c in chunks[:3]]
        assert info["context_tokens"] == len(counter.tokenize(info["packed"].text))
        assert messages == R.build_messages(q.question, info["packed"].text)
        tight, info2 = R.rag_messages(q.question, chunks, 3, info["context_tokens"] - 1, counter)
        assert info2["n_in_context"] == 2 and info2["n_dropped"] == 1 and info2["context_cut"]
        closed, info0 = R.rag_messages({"question": q.question}, chunks, 0, 4000, counter, gold_ids=gold)
        assert "Context" not in closed[1]["content"] and info0["gold_status"] == "closed_book"
    finally:
        counter.close()


def test_answer_test_runs_as_a_sweep_test_kind(tmp_path):
    from kit.config import Settings
    from kit.measure import Test, load_model, resolve_test_fn

    test = Test("kit.studies.rag.study:answer_test", n_gen=8,
                params={"k": 2, "budget": 300, "n_questions": 2, "chunk_size": 300, "chunk_overlap": 50,
                        "corpus_topics": ["pass", "break", "while"], "cache_dir": str(tmp_path)})
    fn = resolve_test_fn(test.kind)
    assert fn is R.answer_test
    lm = load_model(Settings(n_ctx=1024, temperature=0.0))
    try:
        row = fn(lm, test, 1)
    finally:
        lm.close()
    assert row["n_questions"] == 2 and row["k"] == 2 and row["budget"] == 300 and row["n_requests"] == 2
    assert row["ttft_ms"] > 0 and len(row["samples_e2e_ms"]) == 2 and 0 < row["n_prompt"] < 300 + 200
    assert all(e >= t for e, t in zip(row["samples_e2e_ms"], row["samples_ttft_ms"]))
    assert row["accuracy"] in (0.0, 0.5, 1.0) and row["accuracy_ci"][0] <= row["accuracy"] <= row["accuracy_ci"][1]


def test_r1_pairs_back_to_back_searches(tmp_path):
    """Questions whose embedding takes 10 to 50 ms: k=5 and k=8 of one question and repetition run back to back,
    so the pairing removes the question; unpaired medians of the same values could not decide."""
    import pandas as pd

    rng = np.random.default_rng(1)
    base = rng.uniform(10, 50, 30)
    lat = [{"question_id": f"q{i}", "k": k, "repetition": rep, "embed_ms": b, "faiss_ms": 0.05,
            "search_ms": b * (1 + rng.normal(0, 0.01))}
           for rep in range(2) for i, b in enumerate(base) for k in (5, 8)]
    res = _synthetic_result(tmp_path, 30.0, 30.0, [2.0, 3.0, 4.0], [2.0, 3.0, 4.0])
    res = R.RagStudyResult(res.out_dir, res.meta, res.retrieval, res.hnsw, pd.DataFrame(lat), res.cache,
                           res.answers, res.concurrency)
    v = R.r1_verdict(res)
    assert v.verdict == NO_EFFECT and v.n_candidate == 60 and "paired" in v.metric
    assert v.ci_high - v.ci_low < 0.02
    d = pd.DataFrame(lat)
    unpaired = compare("R1", d[d.k == 5]["search_ms"].tolist(), d[d.k == 8]["search_ms"].tolist(),
                       higher_is_better=False)
    assert unpaired.verdict == INCONCLUSIVE
