"""notebooks/60_rag.ipynb: its parameters cell against RagStudy, and a smoke run (quick.json's "60_rag": a corpus
subset, few questions, the real embedding model and LLM) through conftest's run_notebook."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import nbformat
import pytest

from kit.paths import NOTEBOOKS_DIR
from kit.studies import rag
from kit.studies.rag.study import r4_compare
from kit.studies.rag.verdicts import K_AFTER, K_BEFORE
from kit.verdicts import DECIDED, INCONCLUSIVE, NO_EFFECT, NOT_TESTABLE, SUPPORTED, decide, looks_confidence

NOTEBOOK = NOTEBOOKS_DIR / "60_rag.ipynb"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_parameters_cell_is_the_study_defaults():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    lines = [ln for ln in params[0].source.splitlines() if ln.strip()]
    assert all("#" in ln for ln in lines), "every parameter needs a comment papermill can parse"
    cell = {n.target.id: (ast.literal_eval(n.value), ast.unparse(n.annotation))
            for n in ast.parse(params[0].source).body}
    defaults = rag.RagStudy.defaults()
    assert {k: v for k, (v, _) in cell.items()} == defaults
    assert all(t == type(defaults[k]).__name__ for k, (_, t) in cell.items())
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    assert not any("def " in c.source or "class " in c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.notebook
def test_notebook_smoke(run_notebook, tmp_path):
    cache_dir = tmp_path / "cache"
    run = run_notebook("60_rag", cache_dir=str(cache_dir))
    out = run.out

    verdicts = {v["claim"]: v for v in json.loads((out / "verdicts.json").read_text())["verdicts"]}
    assert set(verdicts) == {"R1", "R2", "R3", "R4"}
    # a warm cache is orders of magnitude faster than encoding: the one verdict the data must support anywhere
    r3 = verdicts["R3"]
    assert r3["verdict"] == SUPPORTED and r3["details"]["texts_encoded_warm"] == 0 and r3["ci_high"] < 0.1
    assert all(v["band"] == 0.05 and v["band_why"] for v in verdicts.values() if v["verdict"] != NOT_TESTABLE)
    # R1: 2 questions x 2 repetitions of each k = 4 samples per side, fewer than compare(min_samples=5) wants
    assert verdicts["R1"]["verdict"] == NOT_TESTABLE and "too few" in verdicts["R1"]["reason"]
    assert verdicts["R1"]["details"]["recall_k5"] <= verdicts["R1"]["details"]["recall_k8"]
    # R2: the 4000-token budget never binds at k=8 with 300-character chunks: identical prompts, ratio exactly 1
    r2 = verdicts["R2"]
    assert r2["details"]["identical_prompts"] and (r2["effect"], r2["ci_low"], r2["ci_high"]) == (1.0, 1.0, 1.0)
    assert r2["verdict"] == NO_EFFECT and r2["details"]["small_budget"] == 100
    assert all(e.startswith(out.name + "/") for v in verdicts.values() for e in v["evidence"])

    for name in ("retrieval_vs_k", "budget", "pareto", "cache_concurrency"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000

    retrieval = _read_jsonl(out / "retrieval.jsonl")
    assert retrieval and all(0 <= r["recall_at_k"] <= 1 and 0 <= r["mrr"] <= 1 and 0 <= r["ndcg"] <= 1
                             for r in retrieval)
    assert all(r["context_tokens"] <= r["budget"] for r in retrieval)
    assert {r["gold_status"] for r in retrieval} <= {"in_context", "dropped_by_budget", "not_retrieved"}
    assert any(r["n_dropped"] > 0 for r in retrieval if r["budget"] == 100), "a 100-token budget must bind"
    # recall cannot fall as k grows (same question, same ranking)
    by_q: dict = {}
    for r in retrieval:
        if r["budget"] == 4000:
            by_q.setdefault(r["question_id"], {})[r["k"]] = r["recall_at_k"]
    assert by_q and all(d[1] <= d[K_AFTER] <= d[K_BEFORE] for d in by_q.values())

    answers = [r for r in _read_jsonl(out / "answers.jsonl") if r["status"] == "ok"]
    assert answers and all(r["ttft_ms"] > 0 and r["e2e_ms"] >= r["ttft_ms"] and r["n_gen_tokens"] <= 8
                           for r in answers)
    toks = {(r["k"], r["budget"]): r["n_prompt_tokens"] for r in answers}
    assert toks[(0, 0)] < toks[(5, 4000)] < toks[(8, 4000)], "more chunks must mean a longer prompt"
    # identical prompts (4000 and 6000 at k=8) were measured once and shared
    shared = {(r["k"], r["budget"]): r["prompt_key"] for r in answers}
    assert shared[(8, 4000)] == shared[(8, 6000)] and any(r["shared_prompt"] for r in answers)

    latency = _read_jsonl(out / "latency.jsonl")
    # every row names the build, machine and models that measured it
    assert all(r["build_commit"] and r["cpu_info"] and len(r["model_sha256"]) == 64 and r["embedding_model"]
               for r in retrieval + answers + latency)
    assert {K_AFTER, K_BEFORE} <= {r["k"] for r in latency} and all(r["search_ms"] > r["faiss_ms"] > 0
                                                                    for r in latency)
    conc = _read_jsonl(out / "concurrency.jsonl")
    assert {r["concurrency"] for r in conc} == {1, 2}
    rag_rows = [r for r in conc if r["stage"] == "rag"]
    assert rag_rows and all(r["queue_ms"] >= 0 and r["latency_ms"] >= r["generation_ms"] > 0 for r in rag_rows)
    # R4 in rounds (quick.json: blocks of 5 rounds, at most 2 looks): 2 queries per level and round, and the gaps
    # between completions add up to the batch's time
    rounds = sorted({r["repetition"] for r in rag_rows})
    looks = rag_rows[0]["looks"]
    assert len(rounds) == 5 * looks and looks in (1, 2) and all(r["looks_planned"] == 2 for r in rag_rows)
    for rnd in rounds:
        for c in (1, 2):
            batch = [r for r in rag_rows if r["repetition"] == rnd and r["concurrency"] == c]
            assert len(batch) == 2 and sum(r["gap_s"] for r in batch) <= batch[0]["batch_wall_s"] + 1e-6
            assert sum(r["gap_s"] for r in batch) == pytest.approx(max(r["done_s"] for r in batch))
    r4 = verdicts["R4"]
    assert r4["confidence"] == pytest.approx(looks_confidence(2)) and r4["n_candidate"] == r4["n_baseline"] == 5 * looks  # one batch pair per round
    assert r4["verdict"] == decide(r4["ci_low"], r4["ci_high"], higher_is_better=False, equivalence=0.05)
    assert r4["effect"] == r4_compare(rag_rows, 2).effect  # the verdict is the comparison the rounds stopped on
    # the rounds stop at the first look that decides; a second look ran only after an undecided first one
    assert (rag_rows[0]["looks_stop"] == "decided") == (r4["verdict"] in DECIDED)
    assert looks == 2 or r4["verdict"] in DECIDED
    assert r4["details"]["rounds"] == len(rounds) and f"{len(rounds)} rounds" in r4["summary"]
    if r4["verdict"] == INCONCLUSIVE:
        assert r4["samples_to_decide"] and "stopped it undecided" in r4["summary"]
    # the project cache was filled from the cold/warm run and needed no second encoding
    meta = json.loads((out / "meta.json").read_text())
    assert meta["project_cache"]["n_embedded"] == 0 and meta["config"]["cache_dir"] == str(cache_dir)
    assert any(cache_dir.rglob("vectors-*.npy"))
