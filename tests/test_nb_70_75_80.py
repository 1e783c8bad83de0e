"""Smoke runs of notebooks 70 (generation), 75 (serving queue) and 80 (profiling) with tiny parameters, real model."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

pm = pytest.importorskip("papermill")

from kit.results import load_results  # noqa: E402
from kit.verdicts import VERDICTS, verdicts_by_claim  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent



def test_notebook_70_generation(tmp_path, run_notebook):
    out = tmp_path / "70_generation"
    run_notebook("70_generation", {
        "n_ctx": 256, "n_prompts": 2, "sweep_max_tokens": 12, "temperatures": [0.0], "top_ps": [], "top_ks": [0],
        "repeat_penalties": [], "caps": [8, 24], "s2_cap": 24, "n_cap_prompts": 2, "n_unlimited_prompts": 1,
        "repetitions": 2, "cap_repetitions": 3,
    }, out)
    df, v = load_results(out), verdicts_by_claim(out)
    assert (df["status"] == "ok").all(), df.loc[df["status"] != "ok", ["label", "error"]].to_string()
    assert set(df["label"]) == {"guide", "default", "temperature=0.0", "top_k=0", "max_tokens=8", "max_tokens=24",
                                "max_tokens=unlimited"}
    assert all(5 < t < 5000 for t in df["median_ts"]), df["median_ts"].tolist()
    caps = df[df["part"] == "max_tokens"].set_index("label")
    assert caps.loc["max_tokens=8", "truncation_rate"] == 1.0  # 8 tokens answer none of these prompts
    assert caps.loc["max_tokens=unlimited", "n_gen_tokens_mean"] > 24
    assert set(v) == {"S1", "S2"}
    for claim in ("S1", "S2"):
        assert v[claim]["verdict"] in VERDICTS and v[claim]["ci_low"] is not None, v[claim]
        assert v[claim]["evidence"] and not Path(v[claim]["evidence"][0]).is_absolute()
    assert "truncation_rate_cap_all_prompts" in v["S2"]["details"]
    assert len(list((out / "figures").glob("*.png"))) == 2


def test_notebook_75_serving_queue(tmp_path, run_notebook):
    out = tmp_path / "75_serving_queue"
    run_notebook("75_serving_queue", {
        "n_ctx": 512, "n_prompts": 2, "max_tokens": 6, "clients": [1, 3], "rhos": [2.0], "poisson_requests": 6,
        "calibration_requests": 1, "repetitions": 2,
    }, out)
    df, v = load_results(out), verdicts_by_claim(out)
    assert (df["status"] == "ok").all(), df.loc[df["status"] != "ok", ["label", "error"]].to_string()
    closed = df[df["mode"] == "closed"].set_index("clients")
    assert closed.loc[1, "n_requests"] == 2 and closed.loc[3, "n_requests"] == 6
    # one model, one sequence at a time: three clients wait, one client never does
    assert closed.loc[3, "queue_p50_ms"] > closed.loc[1, "queue_p95_ms"]
    for col in ("median_ts", "ttft_ms", "rss_peak_mb", "queue_p50_ms", "gpu_util_pct", "throughput_ts"):
        assert col in df.columns
    assert v["P1"]["verdict"] in VERDICTS and v["P1"]["ci_low"] is not None
    assert list((out / "figures").glob("*.png"))


def test_notebook_80_profiling(tmp_path, run_notebook):
    out = tmp_path / "80_profiling"
    run_notebook("80_profiling", {"n_ctx": 512, "max_tokens": 12, "repetitions": 3}, out)
    df, v = load_results(out), verdicts_by_claim(out)
    assert (df["status"] == "ok").all(), df.loc[df["status"] != "ok", ["test", "error"]].to_string()
    assert set(df["test_kind"]) == {"tg", "kit.studies.profiling:profile_test"}
    assert (out / "request.prof").exists() and (out / "request_native.prof").exists()
    top = pd.read_csv(out / "top20_cumulative.csv")
    assert len(top) == 20 and top["cumtime_s"].is_monotonic_decreasing
    assert v["P2"]["verdict"] in VERDICTS and v["P2"]["ci_low"] is not None
    assert 0.9 < v["P2"]["details"]["profile_coverage_of_wall"] < 1.1
    assert list((out / "figures").glob("*.png"))
