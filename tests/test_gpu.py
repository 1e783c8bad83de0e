"""Tests for kit.gpu (NVML inventory and sampler) and kit.search's pure bisections against a fake NVML, plus the
real pynvml on a GPU-less machine."""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
import types
from dataclasses import dataclass
from typing import Any

import pytest

from kit import gpu, search

MIB = 1024 * 1024


class FakeNVMLError(Exception):
    """Like pynvml.NVMLError: carries an NVML return code, str() is the message."""

    def __init__(self, value: int, message: str = "Unknown Error") -> None:
        super().__init__(message)
        self.value = value


@dataclass
class FakeMemory:
    total: int
    free: int
    used: int


@dataclass
class FakeUtilization:
    gpu: int
    memory: int


class FakeNvml:
    """A pynvml stand-in for ``n_devices`` GPUs of 8192 MiB.

    Utilisation, used memory and power change on every call, and every value
    handed out is logged in ``reported`` so tests can compare the sampler's
    summary with exactly what "the GPU" said. ``fail_calls`` maps a method
    name to the call numbers (0-based) on which it raises NVMLError.
    """

    NVMLError = FakeNVMLError
    UTIL_SEQUENCE = (5, 40, 85, 100, 60, 20, 0, 75)

    def __init__(
        self,
        n_devices: int = 1,
        total_mb: int = 8192,
        base_used_mb: int = 1024,
        fail_calls: dict[str, set[int]] | None = None,
        fail_after: int | None = None,
    ) -> None:
        self.n_devices = n_devices
        self.total_mb = total_mb
        self.base_used_mb = base_used_mb
        self.fail_calls = fail_calls or {}
        self.fail_after = fail_after  # every sampling call from this count on fails
        self.calls: dict[str, int] = {}
        self.reported: dict[str, list[float]] = {"util": [], "used_mb": [], "power_w": []}
        self.init_count = 0
        self.shutdown_count = 0
        self._lock = threading.Lock()

    def _tick(self, name: str) -> int:
        with self._lock:
            n = self.calls.get(name, 0)
            self.calls[name] = n + 1
        if n in self.fail_calls.get(name, set()):
            raise FakeNVMLError(15, "GPU is lost")
        if (
            self.fail_after is not None
            and name.startswith("nvmlDeviceGet")
            and n >= self.fail_after
        ):
            raise FakeNVMLError(15, "GPU is lost")
        return n

    def nvmlInit(self) -> None:
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self.shutdown_count += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        return self.n_devices

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[str, int]:
        if not 0 <= index < self.n_devices:
            raise FakeNVMLError(2, "Invalid Argument")
        return ("handle", index)

    def nvmlDeviceGetName(self, handle: tuple[str, int]) -> bytes:
        return b"NVIDIA GeForce RTX 4060"  # old pynvml releases return bytes

    def nvmlDeviceGetMemoryInfo(self, handle: tuple[str, int]) -> FakeMemory:
        n = self._tick("nvmlDeviceGetMemoryInfo")
        used_mb = self.base_used_mb + 256 * (n % 12)  # grows, then drops back
        self.reported["used_mb"].append(used_mb)
        used = used_mb * MIB
        return FakeMemory(total=self.total_mb * MIB, free=self.total_mb * MIB - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: tuple[str, int]) -> FakeUtilization:
        n = self._tick("nvmlDeviceGetUtilizationRates")
        util = self.UTIL_SEQUENCE[n % len(self.UTIL_SEQUENCE)]
        self.reported["util"].append(util)
        return FakeUtilization(gpu=util, memory=util // 2)

    def nvmlDeviceGetPowerUsage(self, handle: tuple[str, int]) -> int:
        n = self._tick("nvmlDeviceGetPowerUsage")
        milliwatts = 30_000 + 7_500 * (n % 9)
        self.reported["power_w"].append(milliwatts / 1000)
        return milliwatts


class NoGpuNvml(FakeNvml):
    """pynvml on a machine without an NVIDIA driver: nvmlInit raises."""

    def nvmlInit(self) -> None:
        raise FakeNVMLError(9, "Driver Not Loaded")

    def nvmlDeviceGetCount(self) -> int:  # pragma: no cover - must never be reached
        raise AssertionError("queried a device after a failed nvmlInit")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _wait_for_reads(fake: FakeNvml, n: int, timeout_s: float = 10.0) -> None:
    """Let the sampler run until the fake has served n memory reads (not a fixed sleep,
    so a loaded CI machine cannot make the test flaky)."""
    deadline = time.monotonic() + timeout_s
    while fake.calls.get("nvmlDeviceGetMemoryInfo", 0) < n:
        assert time.monotonic() < deadline, "sampler made no progress"
        time.sleep(0.005)


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "GpuSampler"]


# ----------------------------------------------------------------- availability


def test_nvml_available_with_and_without_gpu() -> None:
    assert gpu.nvml_available(FakeNvml()) is True
    assert gpu.nvml_available(FakeNvml(n_devices=0)) is False
    assert gpu.nvml_available(NoGpuNvml()) is False


def test_nvml_sessions_are_balanced() -> None:
    fake = FakeNvml()
    gpu.nvml_available(fake)
    gpu.gpu_inventory(fake)
    with gpu.GpuSampler(interval_s=0.01, nvml=fake):
        time.sleep(0.03)
    assert fake.init_count == fake.shutdown_count == 3


# -------------------------------------------------------------------- inventory


def test_inventory_with_gpu() -> None:
    inv = gpu.gpu_inventory(FakeNvml(n_devices=2, base_used_mb=1024))
    assert [d["index"] for d in inv] == [0, 1]
    first = inv[0]
    assert first["name"] == "NVIDIA GeForce RTX 4060"  # bytes decoded
    assert first["total_mb"] == 8192
    assert first["used_mb"] == 1024
    assert first["free_mb"] == 8192 - 1024
    assert first["driver_version"] == "550.54.15"


def test_inventory_without_gpu() -> None:
    assert gpu.gpu_inventory(NoGpuNvml()) == []
    assert gpu.gpu_inventory(FakeNvml(n_devices=0)) == []


def test_inventory_records_a_failing_device() -> None:
    inv = gpu.gpu_inventory(FakeNvml(n_devices=2, fail_calls={"nvmlDeviceGetMemoryInfo": {1}}))
    assert inv[0]["total_mb"] == 8192
    assert inv[1]["index"] == 1 and "GPU is lost" in inv[1]["error"]


# ---------------------------------------------------------------------- sampler


def test_sampler_summary_matches_what_the_gpu_reported() -> None:
    fake = FakeNvml()
    with gpu.GpuSampler(interval_s=0.01, nvml=fake) as sampler:
        _wait_for_reads(fake, 8)
    s = sampler.summary
    rep = fake.reported
    assert s["gpu_samples"] == len(rep["util"]) == len(sampler.samples) >= 8
    assert s["gpu_util_pct"] == pytest.approx(_mean(rep["util"]), abs=0.01)
    assert s["gpu_util_max_pct"] == max(rep["util"])
    assert s["vram_peak_mb"] == max(rep["used_mb"])
    assert s["vram_baseline_mb"] == rep["used_mb"][0] == 1024
    assert s["gpu_power_w"] == pytest.approx(_mean(rep["power_w"]), abs=0.01)
    assert s["gpu_error"] is None
    assert set(s) == set(gpu.SUMMARY_KEYS)
    times = [row["t_s"] for row in sampler.samples]
    assert times == sorted(times)


def test_sampler_sums_memory_and_power_over_devices() -> None:
    fake = FakeNvml(n_devices=2)
    with gpu.GpuSampler(interval_s=0.5, nvml=fake) as sampler:
        pass  # only the baseline sample: one read per device
    assert sampler.summary["gpu_samples"] == 1
    assert sampler.summary["vram_baseline_mb"] == sum(fake.reported["used_mb"])
    assert sampler.summary["gpu_power_w"] == pytest.approx(sum(fake.reported["power_w"]))
    assert sampler.summary["gpu_util_pct"] == pytest.approx(_mean(fake.reported["util"]))


def test_sampler_selected_device_only() -> None:
    fake = FakeNvml(n_devices=2)
    with gpu.GpuSampler(interval_s=0.5, devices=[1], nvml=fake) as sampler:
        pass
    assert fake.calls["nvmlDeviceGetMemoryInfo"] == 1
    assert sampler.summary["vram_baseline_mb"] == fake.reported["used_mb"][0]


def test_sampler_without_gpu_is_a_noop_with_empty_columns() -> None:
    fake = NoGpuNvml()
    with gpu.GpuSampler(interval_s=0.01, nvml=fake) as sampler:
        assert not _sampler_threads()
        result = sum(range(1000))
    assert result == 499500
    assert sampler.summary == dict.fromkeys(gpu.SUMMARY_KEYS)
    assert sampler.samples == []


def test_sampler_survives_an_nvml_error_mid_run() -> None:
    fake = FakeNvml(
        fail_calls={"nvmlDeviceGetUtilizationRates": {2}, "nvmlDeviceGetPowerUsage": {3, 4}}
    )
    done = False
    with gpu.GpuSampler(interval_s=0.01, nvml=fake) as sampler:
        _wait_for_reads(fake, 8)
        done = True
    assert done
    s = sampler.summary
    assert "GPU is lost" in s["gpu_error"] and "(3 errors)" in s["gpu_error"]
    # sampling went on after the failures, and the failed reads are simply missing
    assert fake.calls["nvmlDeviceGetUtilizationRates"] >= 8
    assert s["gpu_samples"] == fake.calls["nvmlDeviceGetMemoryInfo"]
    assert s["gpu_util_pct"] == pytest.approx(_mean(fake.reported["util"]), abs=0.01)
    assert s["gpu_power_w"] == pytest.approx(_mean(fake.reported["power_w"]), abs=0.01)
    assert s["vram_peak_mb"] == max(fake.reported["used_mb"])


def test_sampler_survives_the_gpu_disappearing() -> None:
    fake = FakeNvml(fail_after=3)  # every read from the 4th sample on fails
    with gpu.GpuSampler(interval_s=0.01, nvml=fake) as sampler:
        _wait_for_reads(fake, 6)
    s = sampler.summary
    assert s["gpu_samples"] == 3
    assert s["vram_peak_mb"] == max(fake.reported["used_mb"])
    assert "GPU is lost" in s["gpu_error"]
    assert not _sampler_threads()


def test_sampler_does_not_swallow_the_works_exception() -> None:
    with pytest.raises(KeyError), gpu.GpuSampler(interval_s=0.01, nvml=FakeNvml()):
        raise KeyError("boom")
    assert not _sampler_threads()


def test_sampler_thread_stops_promptly() -> None:
    fake = FakeNvml()
    start = time.monotonic()
    with gpu.GpuSampler(interval_s=5.0, nvml=fake) as sampler:
        assert len(_sampler_threads()) == 1
    assert time.monotonic() - start < 0.5
    assert not _sampler_threads()
    assert sampler.summary["gpu_samples"] == 1  # the baseline only


# ------------------------------------------------------------ layer search


def oom_above(k: int) -> tuple[Any, list[int]]:
    """A probe that succeeds up to k layers and "OOMs" above; logs each call."""
    calls: list[int] = []

    def probe(n: int) -> dict[str, Any]:
        calls.append(n)
        return {"status": "ok" if n <= k else "oom", "vram_peak_mb": None}

    return probe, calls


def max_probes(n_candidates: int) -> int:
    return 1 + math.ceil(math.log2(n_candidates))


@pytest.mark.parametrize("n_layers", [1, 32, 80])
@pytest.mark.parametrize("k_frac", [0.0, 0.03, 0.5, 0.97, 1.0])
def test_layer_search_finds_exact_threshold(n_layers: int, k_frac: float) -> None:
    k = round(k_frac * n_layers)
    probe, calls = oom_above(k)
    res = search.bisect_gpu_layers(probe, n_layers, vram_limit_mb=1e9)
    assert res["best_n_gpu_layers"] == k
    assert calls[0] == n_layers  # all layers are tried first
    assert len(calls) == len(res["probes"]) <= max_probes(n_layers + 1)
    assert len(set(calls)) == len(calls)
    for p in res["probes"]:
        assert p["fits"] == (p["n_gpu_layers"] <= k)
        assert p["status"] == ("ok" if p["fits"] else "oom")


def test_layer_search_all_layers_fit_costs_one_probe() -> None:
    probe, calls = oom_above(99)
    res = search.bisect_gpu_layers(probe, 40, vram_limit_mb=1e9)
    assert res["best_n_gpu_layers"] == 40 and calls == [40]
    assert res["reason"].startswith("all fits")


def test_layer_search_nothing_fits() -> None:
    probe, _ = oom_above(-1)
    res = search.bisect_gpu_layers(probe, 32, vram_limit_mb=1e9)
    assert res["best_n_gpu_layers"] is None
    assert res["probes"][-1]["n_gpu_layers"] == 0
    assert "nothing fits" in res["reason"]


def test_layer_search_other_failures_count_as_not_fitting() -> None:
    def probe(n: int) -> dict[str, Any]:
        return {"status": "ok" if n <= 10 else ("crashed" if n % 2 else "timeout")}

    res = search.bisect_gpu_layers(probe, 32, vram_limit_mb=1e9)
    assert res["best_n_gpu_layers"] == 10


def vram_growing(base_mb: float, per_layer_mb: float) -> Any:
    """A probe that always runs but needs more VRAM per offloaded layer."""

    def probe(n: int) -> dict[str, Any]:
        return {"status": "ok", "vram_peak_mb": base_mb + per_layer_mb * n}

    return probe


def test_layer_search_respects_explicit_vram_limit() -> None:
    res = search.bisect_gpu_layers(vram_growing(300, 200), 32, vram_limit_mb=4000)
    assert res["best_n_gpu_layers"] == 18  # 300 + 200*18 = 3900 <= 4000 < 4100
    assert res["vram_limit_mb"] == 4000
    over = [p for p in res["probes"] if p["over_limit"]]
    assert over and all(p["status"] == "ok" and not p["fits"] for p in over)
    assert "over the VRAM limit" in res["reason"]
    assert len(res["probes"]) <= max_probes(33)


def test_layer_search_default_limit_is_free_vram_minus_margin() -> None:
    fake = FakeNvml(total_mb=8192, base_used_mb=1024)  # 7168 MiB free
    res = search.bisect_gpu_layers(vram_growing(500, 200), 40, margin_mb=512, nvml=fake)
    assert res["vram_limit_mb"] == 7168 - 512
    assert res["best_n_gpu_layers"] == 30  # 500 + 200*30 = 6500 <= 6656 < 6700


def test_layer_search_without_gpu_is_not_testable() -> None:
    probe, calls = oom_above(10)
    res = search.bisect_gpu_layers(probe, 32, nvml=NoGpuNvml())
    assert res == {
        "best_n_gpu_layers": 0,
        "n_layers": 32,
        "vram_limit_mb": None,
        "probes": [],
        "reason": "not testable here: no GPU",
    }
    assert calls == []


# ---------------------------------------------------------- context search

CTX = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]


@pytest.mark.parametrize("threshold_index", [-1, 0, 3, 7, 8])
def test_context_search_finds_exact_threshold(threshold_index: int) -> None:
    limit_ctx = CTX[threshold_index] if threshold_index >= 0 else 0
    calls: list[int] = []

    def probe(n_ctx: int) -> dict[str, Any]:
        calls.append(n_ctx)
        return {"status": "ok" if n_ctx <= limit_ctx else "oom"}

    shuffled = [4096, 512, 131072, 1024, 65536, 2048, 16384, 8192, 32768, 4096]
    res = search.bisect_context(probe, shuffled, vram_limit_mb=1e9)
    assert res["n_ctx_candidates"] == CTX  # sorted, deduplicated
    assert res["best_n_ctx"] == (limit_ctx or None)
    assert calls[0] == CTX[-1]
    assert len(calls) <= max_probes(len(CTX))
    assert [p["n_ctx"] for p in res["probes"]] == calls


def test_context_search_respects_vram_limit() -> None:
    # 2000 MiB of weights plus a KV cache of 0.125 MiB per token
    res = search.bisect_context(
        lambda c: {"status": "ok", "vram_peak_mb": 2000 + c / 8}, CTX, vram_limit_mb=6500
    )
    assert res["best_n_ctx"] == 32768  # 2000 + 4096 = 6096; 65536 -> 10192
    assert "over the VRAM limit" in res["reason"]


def test_context_search_default_limit_and_no_gpu() -> None:
    probe = lambda c: {"status": "ok", "vram_peak_mb": 2000 + c / 8}  # noqa: E731
    res = search.bisect_context(probe, CTX, nvml=FakeNvml(base_used_mb=1024), margin_mb=512)
    assert res["vram_limit_mb"] == 6656 and res["best_n_ctx"] == 32768
    res = search.bisect_context(probe, CTX, nvml=NoGpuNvml())
    assert res["best_n_ctx"] is None and res["probes"] == []
    assert res["reason"] == "not testable here: no GPU"


def test_bisection_helper_is_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = search.largest_fitting

    def spy(candidates: Any, fits: Any) -> Any:
        seen.append(len(candidates))
        return real(candidates, fits)

    monkeypatch.setattr(search, "largest_fitting", spy)
    search.bisect_gpu_layers(oom_above(5)[0], 32, vram_limit_mb=1e9)
    search.bisect_context(lambda c: {"status": "ok"}, CTX, vram_limit_mb=1e9)
    assert seen == [33, len(CTX)]


# ------------------------------------------------------------- llama.cpp build


def test_build_supports_gpu_offload(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("llama_cpp")
    fake.llama_supports_gpu_offload = lambda: True  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", fake)
    assert gpu.build_supports_gpu_offload() is True
    fake.llama_supports_gpu_offload = lambda: False  # type: ignore[attr-defined]
    assert gpu.build_supports_gpu_offload() is False
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # import fails
    assert gpu.build_supports_gpu_offload() is False


# --------------------------------------------------------------- real pynvml

HAS_NVIDIA = (
    shutil.which("nvidia-smi") is not None
    or os.path.exists("/dev/nvidiactl")
    or os.path.exists("/proc/driver/nvidia/version")
)


@pytest.mark.skipif(HAS_NVIDIA, reason="an NVIDIA driver is present on this machine")
def test_real_pynvml_reports_no_gpu_without_raising() -> None:
    pytest.importorskip("pynvml")
    assert gpu.nvml_available() is False
    assert gpu.gpu_inventory() == []
    with gpu.GpuSampler(interval_s=0.01) as sampler:
        pass
    assert sampler.summary == dict.fromkeys(gpu.SUMMARY_KEYS)
    res = search.bisect_gpu_layers(lambda n: {"status": "ok"}, 32)
    assert res["best_n_gpu_layers"] == 0 and res["reason"] == "not testable here: no GPU"


# ---- llama.cpp's own device accounting (no NVML) ------------------------------------------------------------------
LOAD_LOG = """load_tensors: offloading 30 repeating layers to GPU
load_tensors:   CPU_Mapped model buffer size =    27.25 MiB
load_tensors:      Vulkan0 model buffer size =    64.85 MiB
llama_context: Vulkan_Host  output buffer size =     0.19 MiB
llama_kv_cache:    Vulkan0 KV buffer size =    22.50 MiB
sched_reserve:    Vulkan0 compute buffer size =    36.84 MiB
sched_reserve: Vulkan_Host compute buffer size =     2.13 MiB
~llama_context:    Vulkan0 compute buffer size is  36.8445 MiB, matches expectation of  36.8445 MiB
"""


def test_device_buffers_sum_what_llama_cpp_allocated_on_devices_only():
    d = gpu.device_buffers(LOAD_LOG)
    assert d["vram_llama_model_mb"] == 64.85 and d["vram_llama_kv_mb"] == 22.5
    assert d["vram_llama_compute_mb"] == 36.84   # the destructor's "is ... matches expectation" line is not counted
    assert d["vram_llama_mb"] == round(64.85 + 22.5 + 36.84, 2) and d["vram_llama_devices"] == "Vulkan0"
    # a CPU build, or nothing offloaded: host buffers only -> no device columns
    cpu = gpu.device_buffers("load_tensors:   CPU_Mapped model buffer size =    92.10 MiB\n"
                             "llama_kv_cache:        CPU KV buffer size =     5.62 MiB\n")
    assert set(cpu.values()) == {None}
    two = gpu.device_buffers(LOAD_LOG.replace("Vulkan0 KV", "CUDA1 KV"))
    assert two["vram_llama_devices"] == "Vulkan0,CUDA1" and two["vram_llama_kv_mb"] == 22.5


def test_device_memory_columns_and_offload_support_from_llama_cpp_devices():
    before = [{"index": 1, "name": "Vulkan0", "description": "llvmpipe (LLVM 15.0.6, 256 bits)", "type": "gpu",
               "free_mb": 2048.0, "total_mb": 2048.0, "software": True}]
    after = [{**before[0], "free_mb": 1900.0}]
    cols = gpu.device_memory_columns(before, after)
    assert cols["vram_ggml_used_mb"] == 148.0 and cols["vram_device_software"] is True
    assert cols["vram_device"].startswith("Vulkan0: llvmpipe")
    assert set(gpu.device_memory_columns([], []).values()) == {None}
    assert gpu.is_software_device("llvmpipe (LLVM 15.0.6, 256 bits)") and not gpu.is_software_device("NVIDIA H200")
    sup = search.offload_support(nvml=FakeNvml(n_devices=0), build_supports=True, devices=before)
    assert sup["testable"] and sup["software"] and sup["reason"] == ""
    text = search.offload_statement(sup)
    assert "Vulkan0: llvmpipe" in text and "software device" in text and "says nothing about real GPUs" in text
    assert search.resolve_vram_limit(None, margin_mb=512, nvml=FakeNvml(n_devices=0), devices=before) == 1536.0
    none = search.offload_support(nvml=FakeNvml(n_devices=0), build_supports=True, devices=[])
    assert not none["testable"] and none["reason"] == search.NOT_TESTABLE_NO_DEVICE
    # NVML's reading wins where it has one, llama.cpp's where it has not; both kept
    rows = [{"status": "ok", "test_kind": "pp", "vram_llama_mb": 120.0, "vram_peak_mb": None}]
    assert search.summarise_probe_rows(rows)["vram_peak_mb"] == 120.0
    assert search.summarise_probe_rows(rows)["vram_source"] == "llama.cpp"
    rows[0].update(vram_peak_mb=900.0, vram_baseline_mb=770.0)
    p = search.summarise_probe_rows(rows)
    assert (p["vram_peak_mb"], p["vram_source"], p["vram_llama_mb"]) == (130.0, "nvml", 120.0)
