"""kit.studies.serving_queue: the queue server and load generators (against a fake and the real model), M/G/1 maths, P1 verdict."""
from __future__ import annotations

import statistics
import time

import pytest

import pandas as pd

from kit.config import Settings, SettingsError, StudyConfigError
from kit.data import load_prompts
from kit.measure import Test as KitTest, load_model
from kit.studies import serving_queue
from kit.verdicts import NOT_TESTABLE, SUPPORTED


# ---- queueing maths --------------------------------------------------------------------------------------------------
def test_pollaczek_khinchine_md1():
    # M/D/1, service 1 s, lambda 0.5/s: Wq = lambda E[S^2] / (2 (1 - rho)) = 0.5 s
    assert serving_queue.pk_queue_ms(0.5, [1000.0] * 10) == pytest.approx(500.0)
    # exponential-like spread waits longer than deterministic service at the same mean
    assert serving_queue.pk_queue_ms(0.5, [200.0, 1800.0]) > 500.0
    assert serving_queue.pk_queue_ms(1.0, [1000.0]) is None  # rho = 1: no steady state
    assert serving_queue.pk_queue_ms(0.5, []) is None


# ---- the server against a fake model: the queue discipline itself -------------------------------------------------------
SERVICE_S = 0.03


@pytest.fixture
def fake_chat(monkeypatch):
    def chat(lm, prompt, **kw):
        t0 = time.perf_counter()
        time.sleep(SERVICE_S)
        return {"text": "x", "finish_reason": "length", "ttft_ms": 5.0, "itl_ms": [1.0, 1.0],
                "e2e_ms": (time.perf_counter() - t0) * 1e3, "n_prompt_tokens": 10, "n_gen_tokens": 3,
                "n_chunks": 3, "engine_pp_ms": 1.0, "engine_tg_ms": 1.0}

    monkeypatch.setattr(serving_queue, "stream_chat", chat)
    return chat


def test_closed_loop_serves_one_at_a_time_in_order(fake_chat):
    prompts = [{"id": "a", "prompt": "A"}, {"id": "b", "prompt": "B"}]
    with serving_queue.ModelServer(lm=None) as srv:
        tickets = serving_queue.closed_loop(srv, prompts, clients=4, requests_per_client=3)
    assert len(tickets) == 12 and all(t.done.is_set() for t in tickets)
    by_start = sorted(tickets, key=lambda t: t.t_start)
    for a, b in zip(by_start, by_start[1:]):
        assert b.t_start >= a.t_end  # never two requests in service at once
    assert [t.index for t in by_start] == sorted(t.index for t in tickets)  # FIFO
    recs = [t.record(min(t.t_submit for t in tickets)) for t in tickets]
    for r in recs:
        assert r["e2e_ms"] == pytest.approx(r["queue_ms"] + r["service_ms"], abs=0.01)
        assert r["ttft_ms"] >= r["queue_ms"]
    # 4 clients, one server: a request waits for about the 3 others ahead of it
    assert statistics.median(r["queue_ms"] for r in recs) > 1.5 * SERVICE_S * 1e3


def test_poisson_overload_builds_a_queue(fake_chat):
    prompts = [{"id": "a", "prompt": "A"}]
    with serving_queue.ModelServer(lm=None) as srv:
        tickets = serving_queue.poisson_arrivals(srv, prompts, rate_rps=10 / SERVICE_S, n_requests=12, seed=1)
    q = [t.record(tickets[0].t_submit)["queue_ms"] for t in tickets]
    assert q[0] < SERVICE_S * 1e3  # the first finds an idle server
    assert q[-1] > 5 * SERVICE_S * 1e3  # arrivals at 10x the service rate pile up
    row = serving_queue.queue_row([t.record(tickets[0].t_submit) for t in tickets], wall_s=1.0)
    assert row["queue_p50_ms"] <= row["queue_p95_ms"] <= row["queue_p99_ms"]
    assert row["n_failed"] == 0 and len(row["samples_queue_ms"]) == 12
    # kit.measure.requests_row's columns, on the client's clock: TTFT includes the wait in the queue
    assert row["ttft_ms"] == pytest.approx(row["ttft_p50_ms"]) and row["ttft_ms"] > row["queue_p50_ms"]
    assert row["samples_ts"] == [1000.0] * 12 and row["decode_ms_per_token"] == 1.0  # ITL 1 ms each
    assert row["throughput_rps"] == 12.0 and row["throughput_ts"] == 36.0


def test_a_failing_request_is_recorded_and_the_server_goes_on(monkeypatch):
    calls = []

    def chat(lm, prompt, **kw):
        calls.append(prompt)
        if prompt == "bad":
            raise RuntimeError("boom")
        return {"ttft_ms": 1.0, "itl_ms": [], "e2e_ms": 1.0, "n_prompt_tokens": 1, "n_gen_tokens": 1,
                "finish_reason": "stop"}

    monkeypatch.setattr(serving_queue, "stream_chat", chat)
    with serving_queue.ModelServer(lm=None) as srv:
        bad, good = srv.submit("bad").wait(5), srv.submit("good").wait(5)
    assert "boom" in bad.error and good.error is None and calls == ["bad", "good"]


# ---- config --------------------------------------------------------------------------------------------------------------
def test_study_validation():
    with pytest.raises(StudyConfigError, match="clients"):
        serving_queue.ServingStudy(clients=[0])
    with pytest.raises(StudyConfigError, match="rhos"):
        serving_queue.ServingStudy(rhos=[-1])
    with pytest.raises(StudyConfigError, match="temperature"):
        serving_queue.ServingStudy(temperature=-0.5)
    with pytest.raises(StudyConfigError, match="nothing to run"):
        serving_queue.ServingStudy(clients=[], rhos=[])
    with pytest.raises(StudyConfigError, match="max_tokens"):
        serving_queue.ServingStudy(max_tokens=512, n_ctx=512)
    st = serving_queue.ServingStudy()  # the notebook's defaults
    assert [t.params["clients"] for t in st.closed_tests()] == [1, 2, 4]
    assert [t.params["rho"] for t in st.poisson_tests()] == [0.5, 0.9, 1.2]
    assert st.max_tokens == 32 and st.poisson_requests == 10


# ---- the real model --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    m = load_model(Settings(n_ctx=512, temperature=0.0, max_tokens=6))
    yield m
    m.close()


def test_queue_test_closed_loop_on_the_real_model(lm):
    t = KitTest(serving_queue.QUEUE_KIND, params={"mode": "closed", "clients": 2, "prompts": load_prompts(n=2)})
    row = serving_queue.queue_test(lm, t, repetitions=2)
    assert row["n_requests"] == 4 and row["n_failed"] == 0
    assert row["clients"] == 2 and row["temperature"] == 0.0 and row["max_tokens"] == 6
    reqs = row["requests"]
    assert all(r["n_gen_tokens"] and r["n_gen_tokens"] <= 6 for r in reqs)
    # with two clients and one model, some request waited for most of another's service
    assert max(r["queue_ms"] for r in reqs) > 0.3 * statistics.median(r["service_ms"] for r in reqs)
    assert 0 < row["throughput_rps"] and 0 < row["median_ts"] < 5000
    with pytest.raises(SettingsError, match="mode"):
        serving_queue.queue_test(lm, KitTest(serving_queue.QUEUE_KIND, params={"mode": "burst"}), 1)


def test_study_rows_carry_p1_metrics(tmp_path):
    st = serving_queue.ServingStudy(n_ctx=512, n_prompts=2, max_tokens=6, clients=[2], rhos=[2.0], poisson_requests=5,
                              calibration_requests=1, repetitions=2, out_dir=str(tmp_path / "75_serving_queue"))
    df = serving_queue.run_serving_study(st, progress=False)
    assert (df["status"] == "ok").all(), df[["label", "error"]].to_string()
    cov = serving_queue.metric_coverage(df)
    assert cov["present"].all(), cov.to_string()
    filled = dict(zip(cov["metric"], cov["filled_share"]))
    assert filled["tokens/s"] == filled["TTFT"] == filled["memory"] == filled["queue time"] == 1.0
    status = dict(zip(cov["metric"], cov["status"]))
    gpu_here = bool(df["gpu_info"].fillna("").str.strip().ne("").any())
    # without an NVIDIA GPU the GPU columns are empty and say why; with one, NVML fills them
    assert status["GPU utilisation"] == status["GPU memory"] == ("filled" if gpu_here else "explained"), cov.to_string()
    pois = df[df["mode"] == "poisson"].iloc[0]
    assert pois["service_rate_rps"] > 0 and pois["rho_measured"] > 0.5
    assert len(pois["calibration_service_ms"]) == 1
    v = serving_queue.p1_verdict(df)
    # a coverage verdict on real rows: every metric recorded, filled or explained; queue time is evidence
    assert v.verdict == SUPPORTED, v.reason
    assert v.effect is None and {r["status"] for r in v.details["coverage"]} <= {"filled", "explained"}
    assert v.details["heaviest_load"] == "poisson, rho=2.0"
    q = v.details["queue_over_service_at_heaviest_load"]
    assert q["ratio"] == pytest.approx(statistics.median(pois["samples_queue_ms"])
                                       / statistics.median(pois["samples_service_ms"]), abs=1e-4)
    assert q["ci"][0] <= q["ratio"] <= q["ci"][1] and "queue time" in v.summary
    across = serving_queue.coverage_across_studies(tmp_path)
    assert list(across["study"]) == ["75_serving_queue"]


# ---- the P1 verdict on constructed rows ------------------------------------------------------------------------------------
def _level(label, mode, queue_ms, service_ms, **kw):
    return {"status": "ok", "label": label, "mode": mode, "samples_queue_ms": queue_ms, "samples_service_ms": service_ms,
            "samples_decode_ms_per_token": [10.0, 10.2, 9.9, 10.1], "median_ts": 100.0, "ttft_ms": 50.0,
            "gpu_util_pct": None, "vram_peak_mb": None, "gpu_info": "", "backends": "CPU", "rss_peak_mb": 300.0,
            "queue_p50_ms": statistics.median(queue_ms), "service_p50_ms": statistics.median(service_ms),
            "clients": None, "rho_measured": None, **kw}


LIGHT = ("closed, 1 client(s)", "closed", [0.1, 0.2, 0.1, 0.1], [300.0, 310, 305, 295])


def test_p1_is_a_coverage_verdict_queue_time_is_evidence():
    light = _level(*LIGHT, clients=1)
    busy = _level("poisson, rho=1.2", "poisson", [900.0, 1200, 1500, 1100, 1300], [300.0, 310, 305, 295, 300],
                  rho_measured=1.18)
    calm = _level("poisson, rho=0.3", "poisson", [1.0, 2, 0.5, 3, 1], [300.0, 310, 305, 295, 300], rho_measured=0.3)
    for heavy in (busy, calm):  # whatever the queue did, the label is about what the rows carry
        v = serving_queue.p1_verdict(pd.DataFrame([light, heavy]))
        assert v.verdict == SUPPORTED and v.effect is None and v.details["heaviest_load"] == heavy["label"]
        assert v.details["gpu_columns_empty"] and "no NVIDIA GPU visible to NVML" in v.summary
    q = serving_queue.p1_verdict(pd.DataFrame([light, busy])).details["queue_over_service_at_heaviest_load"]
    assert q["ratio"] == pytest.approx(1200 / 300) and q["ci"][0] > 1
    q = serving_queue.p1_verdict(pd.DataFrame([light, calm])).details["queue_over_service_at_heaviest_load"]
    assert q["ci"][1] < 1


def test_p1_names_every_gap_the_machine_does_not_explain():
    missing = _level(*LIGHT, clients=1)
    del missing["gpu_util_pct"]
    v = serving_queue.p1_verdict(pd.DataFrame([missing]))
    assert v.verdict == NOT_TESTABLE and "GPU utilisation (gpu_util_pct): not recorded" in v.reason
    # a GPU was there (gpu_info names it) but its columns are empty: a gap, not an explanation
    gpu = _level(*LIGHT, clients=1, gpu_info="NVIDIA H100", gpu_error="NVMLError: Unknown Error")
    v = serving_queue.p1_verdict(pd.DataFrame([gpu]))
    assert v.verdict == NOT_TESTABLE and "NVML failed: NVMLError" in v.reason
    # tokens/s empty in one of two rows
    half = [_level(*LIGHT, clients=1), _level(*LIGHT, clients=2, median_ts=None)]
    v = serving_queue.p1_verdict(pd.DataFrame(half))
    assert v.verdict == NOT_TESTABLE and "tokens/s (median_ts): partly filled, empty in 1 of 2 rows" in v.reason
    with_gpu = _level(*LIGHT, clients=1, gpu_info="NVIDIA H100", gpu_util_pct=0.0, vram_peak_mb=500.0,
                      n_gpu_layers=0)
    v = serving_queue.p1_verdict(pd.DataFrame([with_gpu]))
    assert v.verdict == SUPPORTED and "no GPU offload" in v.summary
    v = serving_queue.p1_verdict(pd.DataFrame([{"status": "timeout", "error": "no result within 1 s; killed"}]))
    assert v.verdict == NOT_TESTABLE and "timeout: no result within 1 s" in v.reason
