"""kit.studies.gpu_layers: the real G1 probes and searches against a fake GPU (fake NVML + fake trial runner), the study
config and its analysis, the CPU-only path on this machine, and one real probe on the bundled model."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import pytest

from kit.studies import gpu_layers
from kit.config import Settings, SettingsError
from kit.measure import pp, tg
from kit.verdicts import NOT_TESTABLE, SUPPORTED, VERDICTS

MIB = 1024 * 1024
N_LAYERS = 30  # the bundled model: n_gpu_layers runs 0 .. 31 (output layer included)


# ---- a fake GPU: NVML for the limit, a trial runner that "loads" layers into VRAM -----------------------------------
class FakeNVMLError(Exception):
    pass


@dataclass
class _Mem:
    total: int
    free: int
    used: int


class FakeNvml:
    """pynvml stand-in: one (or no) device with `total_mb`, of which `used_mb` is taken by others."""

    NVMLError = FakeNVMLError

    def __init__(self, total_mb: int = 8192, used_mb: int = 1024, n_devices: int = 1, driver: bool = True):
        self.total_mb, self.used_mb, self.n_devices, self.driver = total_mb, used_mb, n_devices, driver

    def nvmlInit(self):
        if not self.driver:
            raise FakeNVMLError("Driver Not Loaded")

    def nvmlShutdown(self):
        pass

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"

    def nvmlDeviceGetCount(self):
        return self.n_devices

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return "Fake RTX"

    def nvmlDeviceGetMemoryInfo(self, h):
        return _Mem(self.total_mb * MIB, (self.total_mb - self.used_mb) * MIB, self.used_mb * MIB)


class FakeRunner:
    """kit.sweep.run_trial's signature. A trial needs base_mb + per_layer_mb per offloaded layer (+ the KV cache
    when n_ctx grows); above the device's free memory the load fails like a CUDA build does."""

    def __init__(self, nvml: FakeNvml, base_mb=300.0, per_layer_mb=200.0, kv_mb_per_token=0.5):
        self.nvml, self.base_mb, self.per_layer_mb, self.kv = nvml, base_mb, per_layer_mb, kv_mb_per_token
        self.calls: list[Settings] = []

    def need_mb(self, s: Settings) -> float:
        return self.base_mb + self.per_layer_mb * s.n_gpu_layers + self.kv * s.n_ctx

    def __call__(self, settings, tests, repetitions, model_path, timeout_s=600, log_file=None, mem_limit_mb=None):
        self.calls.append(settings)
        need = self.need_mb(settings)
        free = self.nvml.total_mb - self.nvml.used_mb
        rows = []
        if need > free:  # the load fails: like run_trial, one row per test, the first carries the cause
            return [{"status": "error" if i == 0 else "skipped", "test": t.name, "test_kind": t.kind,
                     "n_prompt": t.n_prompt, "n_gen": t.n_gen, "n_depth": 0,
                     "error": "ValueError: Failed to load model | stderr: ggml_backend_cuda_buffer_type_alloc_buffer: "
                              "allocating 2048.00 MiB on device 0: cudaMalloc failed: out of memory"}
                    for i, t in enumerate(tests)]
        for t in tests:
            speed = (100.0 if t.kind == "tg" else 300.0) * (1 + settings.n_gpu_layers / 10)
            samples = [speed * (1 + 0.01 * i) for i in range(-2, 3)][:repetitions] or [speed]
            n = t.n_prompt + t.n_gen
            rows.append({"status": "ok", "error": None, "test": t.name, "test_kind": t.kind, "n_prompt": t.n_prompt,
                         "n_gen": t.n_gen, "n_depth": 0, "samples_ts": samples,
                         "samples_ns": [int(n / x * 1e9) for x in samples], "median_ts": samples[len(samples) // 2],
                         "cv": 0.01, "vram_baseline_mb": float(self.nvml.used_mb),
                         "vram_peak_mb": self.nvml.used_mb + need, "rss_peak_mb": 500.0 - 10 * settings.n_gpu_layers,
                         "load_ms": 100.0, "n_batch_effective": settings.n_batch, "n_ubatch_effective": settings.n_ubatch})
        return rows


GPU_OK = {"testable": True, "build_gpu_offload": True, "gpus": [{"name": "Fake RTX", "free_mb": 7168}], "reason": ""}


# ---- support ------------------------------------------------------------------------------------------------------
def test_offload_support_cases() -> None:
    no_build = offload.offload_support(FakeNvml(), build_supports=False)
    assert not no_build["testable"] and no_build["reason"] == offload.NOT_TESTABLE_NO_OFFLOAD
    assert "a GPU is present" in offload.offload_statement(no_build)
    no_dev = offload.offload_support(FakeNvml(driver=False), build_supports=True)
    assert not no_dev["testable"] and no_dev["reason"] == offload.NOT_TESTABLE_NO_DEVICE
    assert not offload.offload_support(FakeNvml(n_devices=0), build_supports=True)["testable"]
    ok = offload.offload_support(FakeNvml(), build_supports=True)
    assert ok["testable"] and ok["reason"] == "" and ok["gpus"][0]["free_mb"] == 7168
    assert "can offload" in offload.offload_statement(ok)


def test_this_build_reports_no_gpu_offload() -> None:
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build can offload")
    s = offload.offload_support()
    assert s == {**s, "testable": False, "build_gpu_offload": False,
                 "reason": "not testable here: this build has no GPU offload"}
    assert offload.offload_statement(s).startswith("This build has no GPU offload")


# ---- probes -------------------------------------------------------------------------------------------------------
def test_summarise_probe_rows() -> None:
    ok = [{"status": "ok", "test_kind": "pp", "median_ts": 300, "vram_baseline_mb": 1000, "vram_peak_mb": 1800,
           "rss_peak_mb": 400},
          {"status": "ok", "test_kind": "tg", "median_ts": 90, "vram_baseline_mb": 1000, "vram_peak_mb": 2100,
           "rss_peak_mb": 420}]
    s = offload.summarise_probe_rows(ok)
    assert s["status"] == "ok" and s["vram_peak_mb"] == 1100 and s["vram_device_peak_mb"] == 2100
    assert s["pp_ts"] == 300 and s["tg_ts"] == 90 and s["rss_peak_mb"] == 420
    oom = offload.summarise_probe_rows([{"status": "error", "error": "cudaMalloc failed: out of memory"}])
    assert oom["status"] == "oom" and oom["vram_peak_mb"] is None
    assert offload.summarise_probe_rows([ok[0], {"status": "timeout", "error": "no result"}])["status"] == "timeout"
    assert offload.summarise_probe_rows([])["status"] == "error"
    cpu = offload.summarise_probe_rows([{**ok[0], "vram_peak_mb": None, "vram_baseline_mb": None}])
    assert cpu["status"] == "ok" and cpu["vram_peak_mb"] is None


def test_layer_probe_runs_each_count_in_the_runner() -> None:
    nvml = FakeNvml()
    runner = FakeRunner(nvml)
    probe = offload.LayerProbe("/m.gguf", Settings(n_ctx=512), [pp(64), tg(16)], runner=runner)
    r = probe(12)
    assert runner.calls[-1].n_gpu_layers == 12 and runner.calls[-1].n_ctx == 512
    assert r == {**r, "n_gpu_layers": 12, "status": "ok", "vram_peak_mb": pytest.approx(300 + 200 * 12 + 256)}
    assert probe(35)["status"] == "oom"  # 300 + 7000 + 256 > 7168 MiB free
    assert [x["n_gpu_layers"] for x in probe.results] == [12, 35]
    cprobe = offload.ContextProbe("/m.gguf", Settings(n_gpu_layers=5), [pp(64)], runner=runner)
    assert cprobe(4096)["n_ctx"] == 4096 and runner.calls[-1].n_ctx == 4096 and runner.calls[-1].n_gpu_layers == 5


def test_find_optimal_gpu_layers_default_limit_with_a_fake_gpu() -> None:
    nvml = FakeNvml(total_mb=8192, used_mb=1024)  # 7168 free, limit 6656 with a 512 margin
    runner = FakeRunner(nvml)
    res = offload.find_optimal_gpu_layers("smollm2-135m", margin_mb=512, base=Settings(n_ctx=512), nvml=nvml,
                                          support=GPU_OK, runner=runner)
    # 300 + 200 k + 256 <= 6656  ->  k <= 30
    assert res["testable"] and res["vram_limit_mb"] == 6656 and res["best_n_gpu_layers"] == 30
    assert res["n_layers"] == N_LAYERS + 1
    assert len(runner.calls) == len(res["probes"]) <= 1 + math.ceil(math.log2(N_LAYERS + 2))
    assert runner.calls[0].n_gpu_layers == N_LAYERS + 1  # "everything fits" is tried first
    assert "over the VRAM limit" in res["reason"]
    assert len(res["probe_results"]) == len(res["probes"])


def test_find_optimal_gpu_layers_oom_and_explicit_limit() -> None:
    nvml = FakeNvml(total_mb=4096, used_mb=0)
    runner = FakeRunner(nvml, base_mb=500, per_layer_mb=150)
    # physically: 500 + 150 k + 256 <= 4096 -> k <= 22; the failed loads are probes, not errors
    res = offload.find_optimal_gpu_layers(base=Settings(n_ctx=512), vram_limit_mb=1e9, nvml=nvml, support=GPU_OK,
                                          runner=runner)
    assert res["best_n_gpu_layers"] == 22
    assert any(p["status"] == "oom" for p in res["probes"])
    res = offload.find_optimal_gpu_layers(base=Settings(n_ctx=512), vram_limit_mb=2000, nvml=nvml, support=GPU_OK,
                                          runner=FakeRunner(nvml, base_mb=500, per_layer_mb=150))
    assert res["best_n_gpu_layers"] == 8  # 500 + 1200 + 256 = 1956 <= 2000 < 2106


def test_find_max_context_with_a_fake_gpu() -> None:
    nvml = FakeNvml(total_mb=8192, used_mb=1024)
    runner = FakeRunner(nvml, base_mb=300, per_layer_mb=200, kv_mb_per_token=0.5)
    res = offload.find_max_context("smollm2-135m", 20, nvml=nvml, support=GPU_OK, runner=runner)
    # 300 + 4000 + 0.5 n_ctx <= 6656 -> n_ctx <= 4712: 4096 of 512 .. 8192
    assert res["n_ctx_candidates"] == [512, 1024, 2048, 4096, 8192]
    assert res["best_n_ctx"] == 4096 and res["n_gpu_layers"] == 20
    assert all(c.n_gpu_layers == 20 for c in runner.calls)


def test_searches_do_nothing_without_offload() -> None:
    runner = FakeRunner(FakeNvml())
    no = offload.offload_support(FakeNvml(), build_supports=False)
    res = offload.find_optimal_gpu_layers(support=no, runner=runner)
    assert res["best_n_gpu_layers"] == 0 and res["probes"] == [] and not res["testable"]
    assert res["reason"] == offload.NOT_TESTABLE_NO_OFFLOAD
    res = offload.find_max_context(support=no, runner=runner)
    assert res["best_n_ctx"] is None and res["reason"] == offload.NOT_TESTABLE_NO_OFFLOAD
    assert runner.calls == []


def test_context_candidates() -> None:
    assert offload.context_candidates(8192) == [512, 1024, 2048, 4096, 8192]
    assert offload.context_candidates(3000) == [512, 1024, 2048, 3000]


# ---- the study -------------------------------------------------------------------------------------------------------
def test_study_config_and_layer_counts() -> None:
    s = offload.GpuLayersStudy()
    assert s.layer_counts(30) == [0, 5, 10, 15, 20, 25, 30, 31]
    assert offload.GpuLayersStudy(layer_step=7).layer_counts(40) == [0, 7, 14, 21, 28, 30, 35, 41]
    assert offload.GpuLayersStudy(layer_step=100).layer_counts(30) == [0, 30, 31]
    assert s.vram_limit is None and offload.GpuLayersStudy(vram_limit_mb=4000).vram_limit == 4000
    with pytest.raises(SettingsError):
        offload.GpuLayersStudy(layer_step=0)
    with pytest.raises(SettingsError):
        offload.GpuLayersStudy(vram_limit_mb=-1)
    with pytest.raises(SettingsError, match="n_ctx=64"):
        offload.GpuLayersStudy(n_ctx=64)


def test_run_gpu_layers_with_a_fake_gpu(tmp_path, monkeypatch) -> None:
    """The whole GPU path: search, context search, sweep (the sweep's trials go through the fake runner too)."""
    import kit.sweep

    nvml = FakeNvml(total_mb=8192, used_mb=1024)
    runner = FakeRunner(nvml, base_mb=300, per_layer_mb=250)
    monkeypatch.setattr(kit.sweep, "run_trial", runner)
    study = offload.GpuLayersStudy(layer_step=10, repetitions=5, n_prompt=64, n_gen=16, n_ctx=512)
    run = offload.run_gpu_layers(study, tmp_path / "10_gpu_layers", progress=False, nvml=nvml, support=GPU_OK,
                                 runner=runner)
    # 300 + 250 k + 256 <= 6656 -> k <= 24
    assert run.search["best_n_gpu_layers"] == 24
    assert run.ctx_search["best_n_ctx"] == 512  # 300 + 6000 + 0.5 * 1024 > 6656
    assert run.layer_counts == [0, 10, 20, 30, 31]
    assert (tmp_path / "10_gpu_layers" / "gpu_search.json").exists()
    table = offload.layer_table(run.rows)
    assert list(table.n_gpu_layers) == [0, 10, 20, 30, 31]
    assert list(table.status) == ["ok", "ok", "ok", "error", "error"]  # 30, 31 layers do not load
    assert table.loc[table.n_gpu_layers == 20, "vram_added_mb"].item() == pytest.approx(300 + 5000 + 256)
    v = offload.verdict_gpu_layers(run)
    assert v.claim == "G1" and v.verdict == SUPPORTED
    assert v.details["candidate_layers"] == 20 and v.details["baseline_layers"] == 0
    assert v.effect == pytest.approx(3.0, rel=0.02)  # (1 + 20/10) / 1
    fig = offload.plot_gpu_layers(table)
    assert len(fig.axes) == 3


def test_verdict_without_offload_keeps_the_cpu_baseline() -> None:
    rows = FakeRunner(FakeNvml())(Settings(n_ctx=512), [pp(64), tg(16)], 5, "/m")
    df = pd.DataFrame([{**r, "n_gpu_layers": 0, "vram_peak_mb": None, "vram_baseline_mb": None} for r in rows])
    support = offload.offload_support(FakeNvml(), build_supports=False)
    run = offload.GpuLayersRun(df, support, [0], {}, {}, N_LAYERS)
    v = offload.verdict_gpu_layers(run)
    assert v.verdict == NOT_TESTABLE and v.reason == "not testable here: this build has no GPU offload"
    assert v.details["cpu_baseline_tg_ts"] == pytest.approx(100.0) and v.details["cpu_baseline_pp_ts"] == pytest.approx(300.0)
    assert v.verdict in VERDICTS


# ---- real model ---------------------------------------------------------------------------------------------------
def test_weights_read_per_token_of_the_bundled_model() -> None:
    from kit.models import model_card

    w = offload.weights_read_per_token("smollm2-135m")
    card = model_card("smollm2-135m")
    assert w["tied_embeddings"] is True  # SmolLM2 has no output.weight: the embedding is the output matrix
    assert w["read_per_token_bytes"] == w["tensor_bytes"]
    assert 0.9 * card.size_bytes < w["tensor_bytes"] <= card.size_bytes
    assert w["layer_bytes_mean"] * card.n_layers + w["non_layer_bytes"] == pytest.approx(w["tensor_bytes"], rel=1e-3)


def test_real_layer_probe_on_this_machine() -> None:
    """The real probe: a child process loads the model with n_gpu_layers=k and runs a short pp + tg."""
    from kit.models import resolve_model

    probe = offload.LayerProbe(str(resolve_model("smollm2-135m")), Settings(n_ctx=256), [pp(16), tg(4)],
                               timeout_s=300)
    r = probe(0)
    assert r["status"] == "ok", r
    assert r["pp_ts"] > 0 and r["tg_ts"] > 0 and r["rss_peak_mb"] > 50
    if not offload.offload_support()["testable"]:
        assert r["vram_peak_mb"] is None  # no NVML device: nothing to read
