"""The offload path for real, on whatever offloading build and device this machine has: `make gpu-test` runs these
on the Vulkan build over Mesa's llvmpipe (a software Vulkan device, so every machine has one), and they run as they
are on a CUDA build with an NVIDIA GPU. On a CPU-only build they skip; the CPU-side tests of the same code use a fake
NVML (test_gpu.py, test_offload.py).

What runs: llama.cpp's device list and memory (no NVML needed), the device memory a trial's rows carry (model
weights, KV cache, compute buffers, from llama.cpp's own allocation lines), and `find_optimal_gpu_layers` /
`find_max_context` under a memory limit chosen between what 0 layers and all layers take, so that the bisection
meets real over-limit probes and returns the largest count within the limit, and the tuner's GPU-layer step under
the same kind of limit (the largest count that fits, then 0 layers screened against it)."""
from __future__ import annotations

import pytest

from kit import gpu
from kit.config import Settings
from kit.measure import pp, tg
from kit.models import model_card
from kit.paths import DEFAULT_MODEL
from kit.search import find_max_context, find_optimal_gpu_layers, offload_statement, offload_support
from kit.studies.autotune.tuner import Constraints, SearchSpace, Workload, benchmark_settings
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


def test_tuner_gpu_layer_step_under_a_limit(tmp_path):
    card = model_card(DEFAULT_MODEL)
    n_all = card.n_layers + 1
    lo, hi = _trial(1)["vram_llama_mb"], _trial(n_all)["vram_llama_mb"]
    limit = round((lo + hi) / 2, 1)
    # the guide's start (n_gpu_layers 30 = every repeating layer) at a small context, and a request below the
    # 32-token batch at which llama.cpp sends CPU-side matrix products to the device too
    start = Settings(model=DEFAULT_MODEL, n_gpu_layers=card.n_layers, use_mmap=True, n_batch=512, n_ubatch=512,
                     n_ctx=512)
    space = SearchSpace(threads=[], n_batch=[], n_ubatch=[], flash_attn=[], kv_type=[], n_ctx=[],
                        n_gpu_layers=[0, n_all])
    res = benchmark_settings(DEFAULT_MODEL, study="tune_gpu", out_root=tmp_path, space=space,
                             constraints=Constraints(ram_limit_mb=None, vram_limit_mb=limit, max_ppl_ratio=None),
                             workload=Workload(n_prompt=16, n_gen=4, ppl_chunks=2, ppl_chunk_tokens=32),
                             screen_repetitions=1, repetitions=3, confirm_top=1, min_gain=0.05, start=start,
                             progress=False)
    gpu_res = res.gpu_layers
    found = gpu_res["best_n_gpu_layers"]
    assert gpu_res["testable"] and 0 < found < card.n_layers, gpu_res
    assert any(p["over_limit"] and not p["fits"] for p in gpu_res["probes"])
    ref = res.screened[0]
    assert ref.settings.n_gpu_layers == found and ref.status == "ok"
    assert ref.vram_source in ("nvml", "llama.cpp") and 0 < ref.vram_added_mb <= limit, ref
    step = next(s for s in res.steps if s["axis"] == "n_gpu_layers")
    assert step["tried"] == [{"n_gpu_layers": 0}]    # a count above the one found is not screened: it does not fit
    d = step["decision"]
    if d is not None and d["taken"]:
        assert step["changed"] and step["to"].startswith("ngl=0 ") and d["verdict"] == "supported"
    else:
        assert not step["changed"] and step["to"].startswith(f"ngl={found} ")
    # the start offloads more than fits: it breaks the limit, so the winner is a confirmed configuration within it
    start_c = next(c for c in res.confirmed if c.settings == res.start)
    assert start_c.vram_added_mb > limit and res.best != res.start and res.best.n_gpu_layers <= found
    assert "breaks a limit" in res.why_best or "beats the start" in res.why_best
    if SUPPORT["software"]:
        # llvmpipe decodes ~60x slower than the CPU (README): the step must leave it for 0 layers
        assert res.best.n_gpu_layers == 0 and d and d["taken"], (res.steps, res.why_best)
