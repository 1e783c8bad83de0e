"""The offload path for real, on whatever offloading build and device this machine has: `make gpu-test` runs these
on the Vulkan build over Mesa's llvmpipe (a software Vulkan device, so every machine has one), and they run as they
are on a CUDA build with an NVIDIA GPU. On a CPU-only build they skip; the CPU-side tests of the same code use a fake
NVML (test_gpu.py, test_offload.py).

What runs: llama.cpp's device list and memory (no NVML needed), the device memory a trial's rows carry (model
weights, KV cache, compute buffers, from llama.cpp's own allocation lines), and `find_optimal_gpu_layers` /
`find_max_context` under a memory limit chosen between what 0 layers and all layers take, so that the bisection
meets real over-limit probes and returns the largest count within the limit."""
from __future__ import annotations

import pytest

from kit import gpu
from kit.config import Settings
from kit.measure import pp, tg
from kit.models import model_card
from kit.paths import DEFAULT_MODEL
from kit.search import find_max_context, find_optimal_gpu_layers, offload_statement, offload_support
from kit.sweep import run_trial

SUPPORT = offload_support()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not SUPPORT["testable"], reason="needs an offloading build and a device "
                                                                 "(make vulkan, then make gpu-test)")]
TESTS = [pp(16), tg(4)]


def _trial(n_gpu_layers: int, n_ctx: int = 512) -> dict:
    card = model_card(DEFAULT_MODEL)
    rows = run_trial(Settings(model=DEFAULT_MODEL, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers), TESTS, 1, str(card.path),
                     timeout_s=600)
    assert all(r["status"] == "ok" for r in rows), rows
    return rows[0]


def test_llama_cpp_lists_the_device_and_its_memory_without_nvml():
    devs = gpu.backend_devices()
    assert devs and all(d["total_mb"] > 0 and 0 < d["free_mb"] <= d["total_mb"] for d in devs), devs
    assert SUPPORT["devices"] == devs or SUPPORT["gpus"]
    text = offload_statement(SUPPORT)
    assert devs[0]["name"] in text or SUPPORT["gpus"]
    if devs[0]["software"]:   # llvmpipe: said plainly, never mistaken for a real GPU's speed
        assert SUPPORT["software"] and "software device" in text and "says nothing about real GPUs" in text


def test_rows_carry_device_memory_per_layer_count():
    n_all = model_card(DEFAULT_MODEL).n_layers + 1
    none, half, full = _trial(0), _trial(n_all // 2), _trial(n_all)
    # llama.cpp's allocation lines: weights and KV cache move to the device with the layers
    assert (none["vram_llama_model_mb"] or 0) < half["vram_llama_model_mb"] < full["vram_llama_model_mb"]
    assert (none["vram_llama_kv_mb"] or 0) < half["vram_llama_kv_mb"] < full["vram_llama_kv_mb"]
    size_mb = model_card(DEFAULT_MODEL).size_bytes / 2**20
    assert 0.5 * size_mb < full["vram_llama_model_mb"] <= 1.05 * size_mb   # the whole file's weights, on the device
    assert full["vram_llama_mb"] >= full["vram_llama_model_mb"] + full["vram_llama_kv_mb"]
    assert full["vram_device"] and full["vram_ggml_total_mb"] > 0, {k: v for k, v in full.items() if "vram" in k}
    # a larger context puts a larger KV cache on the device
    assert _trial(n_all, n_ctx=2048)["vram_llama_kv_mb"] > full["vram_llama_kv_mb"]


def test_find_optimal_gpu_layers_meets_the_limit_and_returns_the_largest_count_within_it():
    n_all = model_card(DEFAULT_MODEL).n_layers + 1
    lo = _trial(1)["vram_llama_mb"]
    hi = _trial(n_all)["vram_llama_mb"]
    limit = round((lo + hi) / 2, 1)
    res = find_optimal_gpu_layers(DEFAULT_MODEL, vram_limit_mb=limit, tests=TESTS, base=Settings(n_ctx=512))
    best, probes = res["best_n_gpu_layers"], res["probes"]
    assert res["testable"] and res["vram_limit_mb"] == limit
    assert best is not None and 0 < best < n_all, res
    assert any(p["over_limit"] and not p["fits"] for p in probes), probes   # a real failed probe
    fit = {p["n_gpu_layers"]: p for p in probes}
    assert fit[best]["fits"] and fit[best]["vram_peak_mb"] <= limit
    assert all(p["vram_peak_mb"] > limit for p in probes if p["n_gpu_layers"] > best and p["status"] == "ok")
    assert f"largest that fits: n_gpu_layers={best}" in res["reason"]
    assert all(r["vram_source"] in ("nvml", "llama.cpp") for r in res["probe_results"])


def test_find_max_context_under_a_limit():
    n_all = model_card(DEFAULT_MODEL).n_layers + 1
    small, big = _trial(n_all, 512)["vram_llama_mb"], _trial(n_all, 4096)["vram_llama_mb"]
    limit = round((small + big) / 2, 1)
    res = find_max_context(DEFAULT_MODEL, n_gpu_layers=n_all, candidates=[512, 1024, 2048, 4096], vram_limit_mb=limit)
    assert res["testable"] and res["best_n_ctx"] in (512, 1024, 2048), res
    assert any(p["over_limit"] for p in res["probes"]) and res["best_n_ctx"] < 4096
