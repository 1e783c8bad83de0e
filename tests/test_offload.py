"""kit.search's real probes and searches (find_optimal_gpu_layers, find_max_context) against a fake GPU (fake NVML +
fake trial runner), kit.studies.gpu_layers' config and analysis (G1), the CPU-only path on this machine, and one
real probe on the bundled model."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import pytest

from kit import search, sweep
from kit.gpu import build_supports_gpu_offload
from kit.config import Settings, SettingsError, StudyConfigError
from kit.measure import pp, tg
from kit.models import model_card, resolve_model
from kit.paths import DEFAULT_MODEL
from kit.studies import environment_report, gpu_layers
from kit.verdicts import MIXED, NO_EFFECT, NOT_TESTABLE, SUPPORTED, decide

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
    no_build = search.offload_support(FakeNvml(), build_supports=False)
    assert not no_build["testable"] and no_build["reason"] == search.NOT_TESTABLE_NO_OFFLOAD
    assert "a GPU is present" in search.offload_statement(no_build)
    no_dev = search.offload_support(FakeNvml(driver=False), build_supports=True)
    assert not no_dev["testable"] and no_dev["reason"] == search.NOT_TESTABLE_NO_DEVICE
    assert not search.offload_support(FakeNvml(n_devices=0), build_supports=True)["testable"]
    ok = search.offload_support(FakeNvml(), build_supports=True)
    assert ok["testable"] and ok["reason"] == "" and ok["gpus"][0]["free_mb"] == 7168
    assert "can offload" in search.offload_statement(ok)


def test_this_build_reports_no_gpu_offload() -> None:
    if build_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build can offload")
    s = search.offload_support()
    assert s == {**s, "testable": False, "build_gpu_offload": False,
                 "reason": "not testable here: this build has no GPU offload"}
    assert search.offload_statement(s).startswith("This build has no GPU offload")


# ---- probes -------------------------------------------------------------------------------------------------------
def test_summarise_probe_rows() -> None:
    ok = [{"status": "ok", "test_kind": "pp", "median_ts": 300, "vram_baseline_mb": 1000, "vram_peak_mb": 1800,
           "rss_peak_mb": 400},
          {"status": "ok", "test_kind": "tg", "median_ts": 90, "vram_baseline_mb": 1000, "vram_peak_mb": 2100,
           "rss_peak_mb": 420}]
    s = search.summarise_probe_rows(ok)
    assert s["status"] == "ok" and s["vram_peak_mb"] == 1100 and s["vram_device_peak_mb"] == 2100
    assert s["pp_ts"] == 300 and s["tg_ts"] == 90 and s["rss_peak_mb"] == 420
    oom = search.summarise_probe_rows([{"status": "error", "error": "cudaMalloc failed: out of memory"}])
    assert oom["status"] == "oom" and oom["vram_peak_mb"] is None
    assert search.summarise_probe_rows([ok[0], {"status": "timeout", "error": "no result"}])["status"] == "timeout"
    assert search.summarise_probe_rows([])["status"] == "error"
    cpu = search.summarise_probe_rows([{**ok[0], "vram_peak_mb": None, "vram_baseline_mb": None}])
    assert cpu["status"] == "ok" and cpu["vram_peak_mb"] is None


def test_layer_probe_runs_each_count_in_the_runner() -> None:
    nvml = FakeNvml()
    runner = FakeRunner(nvml)
    probe = search.LayerProbe("/m.gguf", Settings(n_ctx=512), [pp(64), tg(16)], runner=runner)
    r = probe(12)
    assert runner.calls[-1].n_gpu_layers == 12 and runner.calls[-1].n_ctx == 512
    assert r == {**r, "n_gpu_layers": 12, "status": "ok", "vram_peak_mb": pytest.approx(300 + 200 * 12 + 256)}
    assert probe(35)["status"] == "oom"  # 300 + 7000 + 256 > 7168 MiB free
    assert [x["n_gpu_layers"] for x in probe.results] == [12, 35]
    cprobe = search.ContextProbe("/m.gguf", Settings(n_gpu_layers=5), [pp(64)], runner=runner)
    assert cprobe(4096)["n_ctx"] == 4096 and runner.calls[-1].n_ctx == 4096 and runner.calls[-1].n_gpu_layers == 5


def test_find_optimal_gpu_layers_default_limit_with_a_fake_gpu() -> None:
    nvml = FakeNvml(total_mb=8192, used_mb=1024)  # 7168 free, limit 6656 with a 512 margin
    runner = FakeRunner(nvml)
    res = search.find_optimal_gpu_layers(DEFAULT_MODEL, margin_mb=512, base=Settings(n_ctx=512), nvml=nvml,
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
    res = search.find_optimal_gpu_layers(base=Settings(n_ctx=512), vram_limit_mb=1e9, nvml=nvml, support=GPU_OK,
                                          runner=runner)
    assert res["best_n_gpu_layers"] == 22
    assert any(p["status"] == "oom" for p in res["probes"])
    res = search.find_optimal_gpu_layers(base=Settings(n_ctx=512), vram_limit_mb=2000, nvml=nvml, support=GPU_OK,
                                          runner=FakeRunner(nvml, base_mb=500, per_layer_mb=150))
    assert res["best_n_gpu_layers"] == 8  # 500 + 1200 + 256 = 1956 <= 2000 < 2106


def test_find_max_context_with_a_fake_gpu() -> None:
    nvml = FakeNvml(total_mb=8192, used_mb=1024)
    runner = FakeRunner(nvml, base_mb=300, per_layer_mb=200, kv_mb_per_token=0.5)
    res = search.find_max_context(DEFAULT_MODEL, 20, nvml=nvml, support=GPU_OK, runner=runner)
    # 300 + 4000 + 0.5 n_ctx <= 6656 -> n_ctx <= 4712: 4096 of 512 .. 8192
    assert res["n_ctx_candidates"] == [512, 1024, 2048, 4096, 8192]
    assert res["best_n_ctx"] == 4096 and res["n_gpu_layers"] == 20
    assert all(c.n_gpu_layers == 20 for c in runner.calls)


def test_searches_do_nothing_without_offload() -> None:
    runner = FakeRunner(FakeNvml())
    no = search.offload_support(FakeNvml(), build_supports=False)
    res = search.find_optimal_gpu_layers(support=no, runner=runner)
    assert res["best_n_gpu_layers"] == 0 and res["probes"] == [] and not res["testable"]
    assert res["reason"] == search.NOT_TESTABLE_NO_OFFLOAD
    res = search.find_max_context(support=no, runner=runner)
    assert res["best_n_ctx"] is None and res["reason"] == search.NOT_TESTABLE_NO_OFFLOAD
    assert runner.calls == []


def test_context_candidates() -> None:
    assert search.context_candidates(8192) == [512, 1024, 2048, 4096, 8192]
    assert search.context_candidates(3000) == [512, 1024, 2048, 3000]


# ---- the study -------------------------------------------------------------------------------------------------------
def test_study_config_and_layer_counts() -> None:
    s = gpu_layers.GpuLayersStudy()
    assert s.layer_counts(30) == [0, 5, 10, 15, 20, 25, 30, 31]
    assert gpu_layers.GpuLayersStudy(layer_step=7).layer_counts(40) == [0, 7, 14, 21, 28, 30, 35, 41]
    assert gpu_layers.GpuLayersStudy(layer_step=100).layer_counts(30) == [0, 30, 31]
    assert s.vram_limit is None and gpu_layers.GpuLayersStudy(vram_limit_mb=4000).vram_limit == 4000
    with pytest.raises(StudyConfigError, match="layer_step=0 must be >= 1"):
        gpu_layers.GpuLayersStudy(layer_step=0)
    with pytest.raises(StudyConfigError, match="vram_limit_mb=-1 must be >= 0"):
        gpu_layers.GpuLayersStudy(vram_limit_mb=-1)
    with pytest.raises(StudyConfigError, match="n_ctx=64 is smaller than the pp \\+ tg test"):
        gpu_layers.GpuLayersStudy(n_ctx=64)
    with pytest.raises(StudyConfigError, match="n_ctx=300 is smaller than the probe test"):
        gpu_layers.GpuLayersStudy(n_ctx=300, n_prompt=16, n_gen=4, probe_n_prompt=300)
    with pytest.raises(StudyConfigError, match="ctx_candidates"):
        gpu_layers.GpuLayersStudy(ctx_candidates=[512, 0])
    with pytest.raises(StudyConfigError, match="expected float"):
        gpu_layers.GpuLayersStudy(margin_mb="512")
    with pytest.raises(SettingsError, match="n_ubatch"):  # Settings' own rule, before any trial
        gpu_layers.GpuLayersStudy(n_batch=256, n_ubatch=512)


def test_study_defaults_are_the_notebooks() -> None:
    s = gpu_layers.GpuLayersStudy()
    assert (s.n_prompt, s.n_gen, s.n_ctx, s.probe_n_prompt, s.probe_n_gen) == (256, 64, 2048, 64, 16)
    assert s.out_path.is_absolute() and s.out_path.parts[-2:] == ("outputs", "10_gpu_layers")


def test_run_gpu_layers_with_a_fake_gpu(tmp_path, monkeypatch) -> None:
    """The whole GPU path: search, context search, sweep (the sweep's trials go through the fake runner too)."""
    nvml = FakeNvml(total_mb=8192, used_mb=1024)
    runner = FakeRunner(nvml, base_mb=300, per_layer_mb=250)
    monkeypatch.setattr(sweep, "run_trial", runner)
    study = gpu_layers.GpuLayersStudy(layer_step=10, repetitions=5, n_prompt=64, n_gen=16, n_ctx=512,
                                      out_dir=str(tmp_path / "10_gpu_layers"))
    run = gpu_layers.run_gpu_layers(study, progress=False, nvml=nvml, support=GPU_OK, runner=runner)
    # 300 + 250 k + 256 <= 6656 -> k <= 24
    assert run.search["best_n_gpu_layers"] == 24
    assert run.ctx_search["best_n_ctx"] == 512  # 300 + 6000 + 0.5 * 1024 > 6656
    assert run.layer_counts == [0, 10, 20, 30, 31]
    assert (tmp_path / "10_gpu_layers" / "gpu_search.json").exists()
    table = gpu_layers.layer_table(run.rows)
    assert list(table.n_gpu_layers) == [0, 10, 20, 30, 31]
    assert list(table.status) == ["ok", "ok", "ok", "error", "error"]  # 30, 31 layers do not load
    assert table.loc[table.n_gpu_layers == 20, "vram_added_mb"].item() == pytest.approx(300 + 5000 + 256)
    assert table.loc[table.n_gpu_layers == 20, "tg_ts"].item() == pytest.approx(300.0)  # 100 * (1 + 20/10)
    assert table.loc[table.n_gpu_layers == 0, "ttft_ms"].item() == pytest.approx(64 / 300 * 1e3, rel=1e-3)
    assert table.loc[table.n_gpu_layers == 0, "load_ms"].item() == 100.0
    assert pd.isna(table.loc[table.n_gpu_layers == 30, "tg_ts"].item()) and "out of memory" in table.error.iloc[-1]
    v = gpu_layers.verdict_gpu_layers(run)
    assert v.claim == "G1" and v.verdict == SUPPORTED
    assert v.details["candidate_layers"] == 20 and v.details["baseline_layers"] == 0
    assert v.effect == pytest.approx(3.0, rel=0.02)  # (1 + 20/10) / 1: tg, the headline condition
    assert v.details["pp_verdict"] == SUPPORTED and v.details["pp_ratio"] == pytest.approx(3.0, rel=0.02)
    # one sub-verdict per test, each the one rule's label on its own interval and G1's band
    assert [c["condition"] for c in v.conditions] == ["tg", "pp"] and v.depends_on == "test (tg, pp)"
    assert all(c["verdict"] == decide(c["ci_low"], c["ci_high"], equivalence=c["band"]) == SUPPORTED
               and c["band"] == 0.05 for c in v.conditions)
    assert "x3.000 [" in v.summary
    # pp no faster with the layers on the GPU, tg three times faster: mixed, and no "Use ..." advice
    rows = run.rows.copy()
    pp0 = rows[(rows.n_gpu_layers == 0) & (rows.test_kind == "pp")].samples_ts.iloc[0]
    at20 = (rows.n_gpu_layers == 20) & (rows.test_kind == "pp")
    rows.loc[at20, "samples_ts"] = pd.Series([list(pp0)] * int(at20.sum()), index=rows.index[at20])
    mixed = gpu_layers.verdict_gpu_layers(gpu_layers.GpuLayersRun(rows, run.support, run.layer_counts, run.search,
                                                                  run.ctx_search, run.n_layers))
    assert mixed.verdict == MIXED and {c["condition"]: c["verdict"] for c in mixed.conditions} == {
        "tg": SUPPORTED, "pp": NO_EFFECT}
    assert not gpu_layers.recommendation(mixed, run, study).startswith("Use")
    assert gpu_layers.recommendation(v, run, study).startswith("Use n_gpu_layers=24 (the most that fit in 6656.0 MiB)")
    fig = gpu_layers.plot_gpu_layers(table)
    assert len(fig.axes) == 3


def test_verdict_without_offload_keeps_the_cpu_baseline() -> None:
    rows = FakeRunner(FakeNvml())(Settings(n_ctx=512), [pp(64), tg(16)], 5, "/m")
    df = pd.DataFrame([{**r, "n_gpu_layers": 0, "vram_peak_mb": None, "vram_baseline_mb": None} for r in rows])
    support = search.offload_support(FakeNvml(), build_supports=False)
    run = gpu_layers.GpuLayersRun(df, support, [0], {}, {}, N_LAYERS)
    v = gpu_layers.verdict_gpu_layers(run)
    assert v.verdict == NOT_TESTABLE and v.reason == "not testable here: this build has no GPU offload"
    assert v.details["cpu_baseline_tg_ts"] == pytest.approx(100.0) and v.details["cpu_baseline_pp_ts"] == pytest.approx(300.0)
    text = gpu_layers.recommendation(v, run, gpu_layers.GpuLayersStudy(n_prompt=64, n_gen=16))
    assert text.startswith("CPU baseline (n_gpu_layers=0): pp64 300.0 t/s, tg16 100.0 t/s, TTFT 213 ms")
    assert "install a GPU build" in text


# ---- real model ---------------------------------------------------------------------------------------------------
def test_weights_read_per_token_of_the_bundled_model() -> None:
    w = environment_report.weights_read_per_token(DEFAULT_MODEL)
    card = model_card(DEFAULT_MODEL)
    assert w["tied_embeddings"] is True  # SmolLM2 has no output.weight: the embedding is the output matrix
    assert w["read_per_token_bytes"] == w["tensor_bytes"]
    assert 0.9 * card.size_bytes < w["tensor_bytes"] <= card.size_bytes
    assert w["layer_bytes_mean"] * card.n_layers + w["non_layer_bytes"] == pytest.approx(w["tensor_bytes"], rel=1e-3)


def test_real_layer_probe_on_this_machine() -> None:
    """The real probe: a child process loads the model with n_gpu_layers=k and runs a short pp + tg."""
    probe = search.LayerProbe(str(resolve_model(DEFAULT_MODEL)), Settings(n_ctx=256), [pp(16), tg(4)],
                              timeout_s=300)
    r = probe(0)
    assert r["status"] == "ok", r
    assert r["pp_ts"] > 0 and r["tg_ts"] > 0 and r["rss_peak_mb"] > 50
    if not search.offload_support()["testable"]:
        assert r["vram_peak_mb"] is None  # no NVML device: nothing to read
