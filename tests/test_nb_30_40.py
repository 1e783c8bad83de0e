"""Smoke runs of notebooks 30 (context, KV cache) and 40 (threads, system) with tiny parameters on the real model."""
from __future__ import annotations

from pathlib import Path

import pytest

pm = pytest.importorskip("papermill")

from kit.results import load_results  # noqa: E402
from kit.verdicts import NOT_TESTABLE, VERDICTS, verdicts_by_claim  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent



def test_notebook_30_context_kv(tmp_path, run_notebook):
    out = tmp_path / "30_context_kv"
    run_notebook("30_context_kv", {
        "repetitions": 3, "n_ctx_values": [256, 512, 16384], "prompt_tokens": 32, "n_gen": 8,
        "fill_fraction": 0.5, "fill_max_n_ctx": 256, "fill_repetitions": 1, "depths": [0, 128],
        "depth_repetitions": 2, "kv_types": ["f16", "q4_0"], "kv_n_ctx": 256, "kv_depth": 64,
        "ppl_n_ctx": 64, "ppl_chunks": 3,
    }, out)
    df, v = load_results(out), verdicts_by_claim(out)
    assert (df["status"] == "ok").all(), df.loc[df["status"] != "ok", ["test", "error"]].to_string()
    assert set(df["part"]) == {"allocated", "fill", "depth", "kv", "rope"}
    # 16384 > n_ctx_train (8192): not run, and said so
    assert set(df.loc[df["part"] == "allocated", "n_ctx"]) == {256, 512}
    assert "16384" in v["M1"]["summary"] and "n_ctx_train" in v["M1"]["summary"]
    tg = df[(df["part"] == "allocated") & (df["test_kind"] == "tg")]
    assert all(5 < t < 5000 for t in tg["median_ts"]), tg["median_ts"].tolist()
    mem = df[df["test_kind"] == "kit.measure:memory_probe"]
    assert (mem["rss_anon_mb"] > 0).all()
    q = df[df["test_kind"] == "kit.quality:kld_test"]
    assert len(q) == 4  # f16 FA (reference), f16 no FA, q4_0 FA, rope 10000
    assert all(1 < p < 1000 for p in q["ppl"])
    ref = q[(q["type_k"] == "f16") & q["flash_attn"] & q["rope_freq_base"].isna()]
    assert float(ref["kld_mean"].iloc[0]) < 1e-3  # the reference scored against itself
    assert (q["type_v"] == "q4_0").sum() == 1 and bool(q.loc[q["type_v"] == "q4_0", "flash_attn"].iloc[0])
    for claim in ("M1", "M2"):
        assert v[claim]["verdict"] in VERDICTS
    assert v["M1"]["ci_low"] is not None and v["M2"]["ci_low"] is not None
    assert "rope_freq_base" in v["M2"]["metric"]
    assert list((out / "figures").glob("*.png"))


def test_notebook_40_threads_system(tmp_path, run_notebook):
    out = tmp_path / "40_threads_system"
    run_notebook("40_threads_system", {
        "repetitions": 3, "n_ctx": 128, "n_gen": 8, "n_prompt": 32, "load_repetitions": 3,
        "mmap_values": [True, False], "mlock_values": [False], "first_prompt": 8,
    }, out)
    df, v = load_results(out), verdicts_by_claim(out)
    assert (df["status"] == "ok").all(), df.loc[df["status"] != "ok", ["test", "error"]].to_string()
    from kit.environment import numa_nodes
    from kit.studies.threads_system import cpu_topology

    parts = set(df["part"])
    assert {"threads", "priority", "loading"} <= parts
    threads = df[df["part"] == "threads"]
    assert set(threads["n_threads"]) >= {1, cpu_topology()["logical"]}
    assert set(threads["test_kind"]) == {"tg", "pp"}
    assert len(df[df["part"] == "priority"]) == 6
    loading = df[df["part"] == "loading"]
    assert len(loading) == 3 * 2 * 2  # reps x mmap x cache
    assert (loading["load_ms"] > 0).all() and (loading["first_decode_ms"] > 0).all()
    cold = loading[loading["cache"] == "cold"]
    warm = loading[loading["cache"] == "warm"]
    assert (warm["residency"] > 0.9).all()
    assert cold["cold_ok"].all(), cold["residency"].tolist()
    for claim in ("C1", "C2", "O1", "O2", "O3"):
        assert v[claim]["verdict"] in VERDICTS, claim
    if len(numa_nodes()) <= 1:
        assert v["C2"]["verdict"] == NOT_TESTABLE and "NUMA node" in v["C2"]["reason"]
    assert v["C1"]["ci_low"] is not None and "pp" in v["C1"]["details"]
    assert v["O3"]["verdict"] != NOT_TESTABLE
    assert v["O2"]["details"]["memory_settings"]["swappiness"] is not None
    assert list((out / "figures").glob("*.png"))
