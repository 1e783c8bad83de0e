"""Smoke runs of notebooks 30 (context, KV cache) and 40 (threads, system) with quick.json's parameters on the
real model, through conftest's run_notebook."""
from __future__ import annotations

import pytest

from kit.environment import numa_nodes
from kit.models import model_card
from kit.paths import DEFAULT_MODEL
from kit.results import load_results
from kit.studies.threads_system import cpu_topology
from kit.verdicts import DECIDED, MIXED, NOT_TESTABLE, decide, verdicts_by_claim

pytestmark = pytest.mark.notebook


def _label_follows_interval(v: dict, **rule) -> bool:
    """The verdict is the one rule's label for the interval it reports."""
    return v["verdict"] == decide(v["ci_low"], v["ci_high"], **rule)


def test_notebook_30_context_kv(run_notebook):
    # 16384 on top of the smoke grid: above this model's n_ctx_train, so not run, and said so
    run = run_notebook("30_context_kv", n_ctx_values=[256, 512, 16384])
    out = run.out
    df, v = load_results(out), verdicts_by_claim(out)
    assert (df["status"] == "ok").all(), df.loc[df["status"] != "ok", ["test", "error"]].to_string()
    assert set(df["part"]) == {"allocated", "fill", "depth", "kv", "rope"}
    assert set(df.loc[df["part"] == "allocated", "n_ctx"]) == {256, 512}
    assert 16384 > model_card(DEFAULT_MODEL).n_ctx_train
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
    # M1: tg and TTFT at n_ctx 256 against 512 with the same prompt: ratios near 1, each labelled by its interval
    # and the +-5 % band, combined (mixed when they disagree)
    m1 = {c["condition"]: c for c in v["M1"]["conditions"]}
    assert set(m1) == {"tg t/s", "TTFT"} and v["M1"]["effect"] == m1["tg t/s"]["effect"]
    assert 0.5 < v["M1"]["effect"] < 2 and _label_follows_interval(m1["tg t/s"], claimed="better", equivalence=0.05)
    assert _label_follows_interval(m1["TTFT"], claimed="better", higher_is_better=False, equivalence=0.05)
    assert v["M1"]["verdict"] == (m1["tg t/s"]["verdict"] if m1["tg t/s"]["verdict"] == m1["TTFT"]["verdict"]
                                  else "mixed")
    assert v["M1"]["details"]["n_ctx_small"] == 256 and v["M1"]["details"]["kv_mib_saved"] > 0
    # the used context (depth 256 against 0): quick.json's 2 depth repetitions are under MIN_SAMPLES, and M1 says so
    used = v["M1"]["details"]["used_tg"]
    assert used["metric"] == "tg t/s at depth 256 / depth 0 (n_ctx 512)"
    assert used["verdict"] == NOT_TESTABLE and "too few samples" in used["reason"]
    # M2: the guide's rope_freq_base against the model's own, a paired perplexity ratio (lower is better)
    assert "rope_freq_base" in v["M2"]["metric"] and 0.5 < v["M2"]["effect"] < 100
    assert _label_follows_interval(v["M2"], claimed="better", higher_is_better=False, equivalence=0.01)
    assert [k["kv"] for k in v["M2"]["details"]["kv_types"]] == ["K q4_0 / V q4_0, FA"]
    assert v["M2"]["details"]["kv_types"][0]["same_quality_as_f16"].split(":")[0].split(" (")[0] in (
        "supported", "refuted", "inconclusive")
    assert v["M1"]["evidence"] == ["30_context_kv/figures/context_kv.png"]
    assert (out / "figures" / "context_kv.png").stat().st_size > 0


def _follows_band_rule(v: dict, **rule) -> bool:
    """A verdict of notebook 40 is the one rule's label for its interval and its claim's band; a combined one is the
    label its testable conditions share (each following its own interval), else mixed."""
    if v.get("conditions"):
        labels = {c["verdict"] for c in v["conditions"] if c["verdict"] != NOT_TESTABLE}
        return all(_follows_band_rule(c, **rule) for c in v["conditions"] if c["verdict"] != NOT_TESTABLE) and \
            v["verdict"] == (labels.pop() if len(labels) == 1 else MIXED)
    return v["verdict"] == decide(v["ci_low"], v["ci_high"], equivalence=v["band"], **rule)


def test_notebook_40_threads_system(run_notebook):
    run = run_notebook("40_threads_system")
    out = run.out
    df, v = load_results(out), verdicts_by_claim(out)
    assert (df["status"] == "ok").all(), df.loc[df["status"] != "ok", ["test", "error"]].to_string()
    assert {"threads", "priority", "loading"} <= set(df["part"])
    threads = df[df["part"] == "threads"]
    assert set(threads["n_threads"]) >= {1, cpu_topology()["logical"]}
    assert set(threads["test_kind"]) == {"tg", "pp"}
    priority = df[df["part"] == "priority"]
    assert len(priority) == 6 and set(priority["test_kind"]) == {"kit.studies.threads_system:niced_bench"}
    loading = df[df["part"] == "loading"]
    assert set(loading["test_kind"]) == {"kit.studies.threads_system:load_probe"}
    assert (loading["load_ms"] > 0).all() and (loading["first_decode_ms"] > 0).all()
    cold = loading[loading["cache"] == "cold"]
    warm = loading[loading["cache"] == "warm"]
    assert (warm["residency"] > 0.9).all()
    assert cold["cold_ok"].all(), cold["residency"].tolist()
    # C1: all threads against the physical cores (or the best other count), per test, with the speed band
    c1 = v["C1"]
    assert [c["condition"].split(" (")[0] for c in c1["conditions"]] == ["generation", "prompt processing"]
    assert c1["band"] == 0.05 and 0.05 < c1["effect"] < 20 and _follows_band_rule(c1, claimed="better")
    if len(numa_nodes()) <= 1:
        assert v["C2"]["verdict"] == NOT_TESTABLE and "NUMA node" in v["C2"]["reason"]
    # O1: a competing load slows generation down; raised priority (or its no-root proxy) per place of the load,
    # one verdict per condition, combined
    o1 = v["O1"]
    assert o1["details"]["load_slowdown"]["effect"] < 1 and len(o1["conditions"]) == 3
    assert "where the competing load runs" in o1["depends_on"] and _follows_band_rule(o1, claimed="better")
    assert v["O2"]["verdict"] == NOT_TESTABLE and "swappiness" in v["O2"]["reason"]
    assert v["O2"]["details"]["memory_settings"]["swappiness"] is not None
    # O3: warm / cold load time on a schedule of looks (quick.json: at most 2 blocks of 3 loads): the base loads of
    # every condition, then blocks of O3's pair (mmap on, mlock off) only while undecided
    o3 = v["O3"]
    assert o3["verdict"] != NOT_TESTABLE and 0 < o3["effect"] < 1.5 and o3["band"] == 0.10
    assert _follows_band_rule(o3, claimed="better", higher_is_better=False)
    looks = o3["details"]["looks"]
    assert looks in (1, 2) and o3["details"]["looks_planned"] == 2 and o3["confidence"] == pytest.approx(0.975)
    assert len(loading) == 3 * 2 * 2 + (looks - 1) * 3 * 2  # reps x mmap x cache, then the extra blocks
    pair = loading[(loading["use_mmap"] == True) & (loading["use_mlock"] == False)]  # noqa: E712
    assert o3["details"]["loads_cold"] == (pair["cache"] == "cold").sum() == 3 * looks
    assert (o3["details"]["looks_stop"] == "decided") == (o3["verdict"] in DECIDED)
    assert looks == 2 or o3["verdict"] in DECIDED  # a second block ran only after an undecided first look
    assert (out / "figures" / "threads_system.png").stat().st_size > 0
