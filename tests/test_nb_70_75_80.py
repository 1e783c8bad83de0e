"""Smoke runs of notebooks 70 (generation), 75 (serving queue) and 80 (profiling) with quick.json's parameters,
real model, through conftest's run_notebook."""
from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd
import pytest

from kit.paths import NOTEBOOKS_DIR
from kit.results import load_results
from kit.verdicts import decide, verdicts_by_claim

pytestmark = pytest.mark.notebook


def test_notebook_70_generation(run_notebook):
    run = run_notebook("70_generation")
    df, v = load_results(run.out), verdicts_by_claim(run.out)
    assert (df["status"] == "ok").all(), df.loc[df["status"] != "ok", ["label", "error"]].to_string()
    assert set(df["label"]) == {"guide", "default", "temperature=0.0", "top_k=0", "max_tokens=8", "max_tokens=24",
                                "max_tokens=unlimited"}
    assert all(5 < t < 5000 for t in df["median_ts"]), df["median_ts"].tolist()
    # one row per configuration and seed (the configurations alternate within each seed's trial)
    caps = df[df["part"] == "max_tokens"].groupby("label")[["truncation_rate", "n_gen_tokens_mean"]].mean()
    assert df[df["part"] == "max_tokens"].groupby("label")["seed"].nunique().eq(3).all()
    assert caps.loc["max_tokens=8", "truncation_rate"] == 1.0  # 8 tokens answer none of these prompts
    assert caps.loc["max_tokens=unlimited", "n_gen_tokens_mean"] > 24
    assert (df["chat_format_source"] == "gguf").all() and "chat_format_effective" in run.outputs_of(4)
    assert set(v) == {"S1", "S2"}
    s1, s2 = v["S1"], v["S2"]  # 2 prompts x 2 seeds a side; 3 seeds on the one unlimited prompt
    assert s1["verdict"] == decide(s1["ci_low"], s1["ci_high"], equivalence=0.03) and 0.3 < s1["effect"] < 3
    assert s1["details"]["output_tokens_ratio"] == 1.0  # 12 tokens finish no answer: both arms run to the cap
    assert s2["band"] == 0.05  # S2's stated band: the label follows the interval and the band, nothing else
    assert s2["verdict"] == decide(s2["ci_low"], s2["ci_high"], higher_is_better=False, equivalence=s2["band"])
    assert 0 < s2["effect"] < 1  # a cap of 24 tokens cuts answers that run longer unlimited: lower latency
    assert s2["details"]["truncation_rate_cap_all_prompts"] > 0.5
    assert s2["evidence"] and not Path(s2["evidence"][0]).is_absolute()
    assert len(list((run.out / "figures").glob("*.png"))) == 2


def test_notebook_75_serving_queue(run_notebook):
    run = run_notebook("75_serving_queue")
    df, v = load_results(run.out), verdicts_by_claim(run.out)
    assert (df["status"] == "ok").all(), df.loc[df["status"] != "ok", ["label", "error"]].to_string()
    closed = df[df["mode"] == "closed"].set_index("clients")
    assert closed.loc[1, "n_requests"] == 2 and closed.loc[2, "n_requests"] == 4
    # one model, one sequence at a time: two clients wait for each other, one client never does
    assert closed.loc[2, "queue_p50_ms"] > closed.loc[1, "queue_p95_ms"]
    assert df[["median_ts", "ttft_ms", "rss_peak_mb", "queue_p50_ms", "throughput_ts"]].notna().all().all()
    assert "gpu_util_pct" in df.columns
    p1 = v["P1"]  # a coverage verdict: every metric recorded, filled or (GPU columns without a GPU) explained
    assert p1["verdict"] == "supported" and p1["effect"] is None, p1["reason"]
    assert {c["status"] for c in p1["details"]["coverage"]} <= {"filled", "explained"}
    heaviest = df[df["label"] == p1["details"]["heaviest_load"]].iloc[0]
    assert heaviest["mode"] == "poisson"
    q = p1["details"]["queue_over_service_at_heaviest_load"]  # queue time: evidence, not the label
    assert q["ratio"] == pytest.approx(statistics.median(heaviest["samples_queue_ms"])
                                       / statistics.median(heaviest["samples_service_ms"]), abs=1e-4)
    assert list((run.out / "figures").glob("*.png"))


def test_notebook_80_profiling_from_the_notebooks_folder(run_notebook):
    # as JupyterLab runs it: the kernel starts in notebooks/; the prompt file still resolves from the root
    run = run_notebook("80_profiling", cwd=NOTEBOOKS_DIR)
    df, v = load_results(run.out), verdicts_by_claim(run.out)
    assert (df["status"] == "ok").all(), df.loc[df["status"] != "ok", ["test", "error"]].to_string()
    assert set(df["test_kind"]) == {"tg", "kit.studies.profiling:profile_test"}
    assert (run.out / "request.prof").exists() and (run.out / "request_native.prof").exists()
    top = pd.read_csv(run.out / "top10_cumulative.csv")  # quick.json: top_n 10
    assert len(top) == 10 and top["cumtime_s"].is_monotonic_decreasing
    p2 = v["P2"]
    assert p2["band"] == 0.10 and p2["band_why"]  # P2's stated band: "same" within +-10 %
    assert p2["verdict"] == decide(p2["ci_low"], p2["ci_high"], claimed="same", equivalence=p2["band"])
    assert 0.8 < p2["effect"] < 1.25  # cProfile's decode self time is llama.cpp's decode time
    assert 0.9 < p2["details"]["profile_coverage_of_wall"] < 1.1
    assert list((run.out / "figures").glob("*.png"))
    assert not (NOTEBOOKS_DIR / "outputs").exists()
