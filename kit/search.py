""""What fits": the largest n_gpu_layers, and the largest context, that load and run within a VRAM limit.

Two layers, each with one name:
- the pure bisections `bisect_gpu_layers(probe, n_layers, ...)` and `bisect_context(probe, candidates, ...)`:
  they take any probe callable (tests pass a fake one) and cost at most 1 + ceil(log2(len)) probes;
- `find_optimal_gpu_layers(model, vram_limit_mb, ...)` (the guide's name) and `find_max_context(model, ...)`:
  those bisections wired to the real probes, `LayerProbe` / `ContextProbe`, where each attempt is
  `kit.sweep.run_trial` (a child process), so an out-of-memory load is a failed probe, not a dead notebook.
  They report the VRAM the attempt added (sampler peak minus the baseline taken before loading), and refuse
  with "not testable here: ..." where the build cannot offload or no NVIDIA GPU is visible (`offload_support`).

llama.cpp counts the output layer as one more offloadable layer: n_gpu_layers = n_layers + 1 puts every
layer on the GPU (llama-model.cpp: i_gpu_start = n_layer + 1 - n_gpu_layers), so the layer search goes to
n_layers + 1. Core module: used by notebook 10 (kit.studies.gpu_layers) and the autotuner (85).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kit import gpu, sweep
from kit.config import Settings
from kit.measure import Test, pp, tg
from kit.models import model_card
from kit.paths import DEFAULT_MODEL
from kit.results import as_float

NOT_TESTABLE_NO_GPU = "not testable here: no GPU"
NOT_TESTABLE_NO_OFFLOAD = "not testable here: this build has no GPU offload"
NOT_TESTABLE_NO_DEVICE = ("not testable here: this build can offload, but neither NVML nor llama.cpp's backends see a "
                          "device to offload to (on Vulkan, CPU-type devices such as llvmpipe need "
                          "GGML_VK_VISIBLE_DEVICES)")
OOM_PATTERN = re.compile(r"out of memory|failed to allocate|cudaMalloc|ErrorOutOfDeviceMemory|"
                         r"unable to allocate|insufficient memory", re.I)


# ---- the pure bisections -------------------------------------------------------------------------------------
def largest_fitting(candidates: Sequence[Any], fits: Callable[[Any], bool]) -> int | None:
    """Index of the largest candidate that fits, or None if none does.

    Assumes `candidates` is sorted so that fitting is monotone (if one fits, every earlier one fits). Tries the
    last candidate first, since "all of it fits" is the common answer on a big GPU and costs a single probe;
    otherwise bisects, so the search costs at most 1 + ceil(log2(len)) probes.
    """
    if not candidates:
        return None
    hi = len(candidates) - 1  # known (after this probe) not to fit
    if fits(candidates[hi]):
        return hi
    lo = -1  # index known to fit; -1 = none yet
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            lo = mid
        else:
            hi = mid
    return lo if lo >= 0 else None


def resolve_vram_limit(vram_limit_mb: float | None, margin_mb: float = 512, nvml: Any = None,
                       devices: list[dict] | None = None) -> float | None:
    """Explicit limit, else free VRAM of device 0 minus margin: NVML's reading where NVML sees a GPU, else the
    first device of llama.cpp's backends (`kit.gpu.backend_devices`); None without a device."""
    if vram_limit_mb is not None:
        return float(vram_limit_mb)
    inventory = gpu.gpu_inventory(nvml)
    if inventory and "free_mb" in inventory[0]:
        return round(inventory[0]["free_mb"] - margin_mb, 1)
    devices = gpu.backend_devices() if devices is None else devices
    usable = [d for d in devices if d.get("total_mb")]
    if not usable:
        return None
    return round(usable[0]["free_mb"] - margin_mb, 1)


def _search(key: str, candidates: Sequence[int], probe: Callable[[int], dict[str, Any]],
            vram_limit_mb: float) -> tuple[int | None, list[dict[str, Any]]]:
    """Run the bisection with `probe` and record every attempt under `key`."""
    probes: list[dict[str, Any]] = []

    def fits(value: int) -> bool:
        result = probe(value) or {}
        status = result.get("status")
        peak = result.get("vram_peak_mb")
        over = status == "ok" and peak is not None and float(peak) > vram_limit_mb
        ok = status == "ok" and not over
        probes.append({key: value, "status": status, "vram_peak_mb": peak, "fits": ok, "over_limit": over})
        return ok

    index = largest_fitting(candidates, fits)
    return (candidates[index] if index is not None else None), probes


def _reason(found: Any, largest: Any, probes: list[dict[str, Any]], what: str) -> str:
    """One line for the notebook: what was found and why nothing larger."""
    if found is None:
        last = probes[-1]
        cause = (f"over the VRAM limit: {last['vram_peak_mb']} MiB" if last.get("over_limit") else last["status"])
        return f"nothing fits: even {what}={last[what]} failed ({cause})"
    if found == largest:
        return f"all fits: {what}={found}"
    first_fail = min((p for p in probes if p[what] > found), key=lambda p: p[what])
    cause = "over the VRAM limit" if first_fail["over_limit"] else first_fail["status"]
    return f"largest that fits: {what}={found}; {what}={first_fail[what]}: {cause}"


def bisect_gpu_layers(probe: Callable[[int], dict[str, Any]], n_layers: int, vram_limit_mb: float | None = None,
                      margin_mb: float = 512, nvml: Any = None) -> dict[str, Any]:
    """Largest `n_gpu_layers` in [0, n_layers] for which `probe` succeeds.

    `probe(n)` runs the model with n_gpu_layers=n and returns at least {"status": "ok" | <anything else>},
    optionally `vram_peak_mb`. A successful probe whose vram_peak_mb exceeds the limit counts as not fitting.
    The default limit is device 0's free VRAM (measured now) minus `margin_mb`, so a probe should report the
    VRAM the attempt itself added (sampler peak minus baseline), not the device total.

    Returns `best_n_gpu_layers` (None if even 0 layers failed), `n_layers`, `vram_limit_mb`, every `probes`
    entry (for plotting) and `reason`. Without a GPU and without an explicit limit nothing is probed and the
    answer is 0 layers, "not testable here: no GPU".
    """
    if n_layers < 0:
        raise ValueError("n_layers must be >= 0")
    limit = resolve_vram_limit(vram_limit_mb, margin_mb, nvml)
    if limit is None:
        return {"best_n_gpu_layers": 0, "n_layers": n_layers, "vram_limit_mb": None, "probes": [],
                "reason": NOT_TESTABLE_NO_GPU}
    best, probes = _search("n_gpu_layers", range(n_layers + 1), probe, limit)
    return {"best_n_gpu_layers": best, "n_layers": n_layers, "vram_limit_mb": limit, "probes": probes,
            "reason": _reason(best, n_layers, probes, "n_gpu_layers")}


def bisect_context(probe_ctx: Callable[[int], dict[str, Any]], n_ctx_candidates: Sequence[int],
                   vram_limit_mb: float | None = None, margin_mb: float = 512, nvml: Any = None) -> dict[str, Any]:
    """Largest context size in `n_ctx_candidates` for which `probe_ctx` fits.

    Same contract and search as `bisect_gpu_layers`; the caller fixes the layer count inside `probe_ctx`.
    Candidates are deduplicated and sorted (the KV cache grows with n_ctx, so fitting is monotone).
    Returns `best_n_ctx` (None if none fits, or without a GPU), `n_ctx_candidates`, `vram_limit_mb`, `probes`
    and `reason`.
    """
    candidates = sorted({int(c) for c in n_ctx_candidates})
    if not candidates:
        raise ValueError("n_ctx_candidates is empty")
    limit = resolve_vram_limit(vram_limit_mb, margin_mb, nvml)
    if limit is None:
        return {"best_n_ctx": None, "n_ctx_candidates": candidates, "vram_limit_mb": None, "probes": [],
                "reason": NOT_TESTABLE_NO_GPU}
    best, probes = _search("n_ctx", candidates, probe_ctx, limit)
    return {"best_n_ctx": best, "n_ctx_candidates": candidates, "vram_limit_mb": limit, "probes": probes,
            "reason": _reason(best, candidates[-1], probes, "n_ctx")}


# ---- can this machine offload? -------------------------------------------------------------------------------
def offload_support(nvml: Any = None, build_supports: bool | None = None, devices: list[dict] | None = None) -> dict:
    """Whether GPU offload can be measured here: a build with GPU offload and a device whose memory can be read,
    through NVML (NVIDIA) or llama.cpp's own backend device API (any backend: Vulkan, CUDA, Metal, ROCm, SYCL).

    Returns {"testable", "build_gpu_offload", "gpus" (NVML), "devices" (llama.cpp's), "software" (every device
    is a software one, e.g. llvmpipe), "reason"}; reason is "" when testable, else one line starting with
    "not testable here".
    """
    build = gpu.build_supports_gpu_offload() if build_supports is None else bool(build_supports)
    gpus = gpu.gpu_inventory(nvml)
    nvml_usable = [g for g in gpus if "free_mb" in g]
    if devices is None:
        # llama.cpp's device list only where NVML sees nothing: asking a CUDA backend for memory creates a CUDA
        # context in this (parent) process, which would hold VRAM the trials' readings then include
        devices = gpu.backend_devices() if build and not nvml_usable else []
    usable = nvml_usable + [d for d in devices if d.get("total_mb")]
    if not build:
        reason = NOT_TESTABLE_NO_OFFLOAD
    elif not usable:
        reason = NOT_TESTABLE_NO_DEVICE
    else:
        reason = ""
    software = bool(devices) and not gpus and all(d.get("software") for d in devices if d.get("total_mb"))
    return {"testable": not reason, "build_gpu_offload": build, "gpus": gpus, "devices": devices,
            "software": software, "reason": reason}


def offload_statement(support: dict) -> str:
    """The one sentence notebooks 00 and 10 print about GPU offload, from `offload_support()`."""
    if not support["build_gpu_offload"]:
        gpus = support.get("gpus") or []
        extra = (f" (a GPU is present: {', '.join(g.get('name', '?') for g in gpus)}; this llama.cpp build cannot "
                 "use it - install a CUDA/Metal/Vulkan build of llama-cpp-python)") if gpus else ""
        return f"This build has no GPU offload{extra}: n_gpu_layers is silently ignored and every layer runs on the CPU."
    if not support["testable"]:
        return "This build can offload to a GPU, " + support["reason"].split(": ", 1)[-1] + "."
    names = [f"{g['name']} ({g['total_mb']:.0f} MiB, NVML)" for g in support["gpus"] if "total_mb" in g]
    names += [f"{d['name']}: {d['description']} ({d['total_mb']:.0f} MiB, llama.cpp)"
              for d in support.get("devices") or [] if d.get("total_mb")]
    text = f"This build can offload to a GPU: {', '.join(names)}."
    if support.get("software"):
        text += f" It is {gpu.SOFTWARE_NOTE}."
    return text


# ---- probes --------------------------------------------------------------------------------------------------
def _present(rows: Sequence[dict], col: str) -> list[float]:
    return [v for v in (as_float(r.get(col)) for r in rows) if v is not None]


def vram_added(rows: Sequence[dict]) -> dict:
    """The device memory a trial's rows say it took, MiB: NVML's reading where there is one (peak minus the
    baseline before loading: what the device really lost), else what llama.cpp says it allocated on its devices
    (weights, KV cache, compute buffers). {"vram_mb", "vram_source" ('nvml', 'llama.cpp' or None),
    "vram_nvml_mb", "vram_llama_mb"}; the probes and the tuner's memory limit both use it."""
    added = [(as_float(r.get("vram_peak_mb")), as_float(r.get("vram_baseline_mb"))) for r in rows]
    added = [p - b for p, b in added if p is not None and b is not None]
    llama = _present(rows, "vram_llama_mb")
    nvml_mb = round(max(added), 1) if added else None
    llama_mb = round(max(llama), 1) if llama else None
    return {"vram_mb": nvml_mb if nvml_mb is not None else llama_mb,
            "vram_source": "nvml" if added else ("llama.cpp" if llama else None),
            "vram_nvml_mb": nvml_mb, "vram_llama_mb": llama_mb}


def summarise_probe_rows(rows: Sequence[dict]) -> dict:
    """One probe result from a trial's rows: status ('ok', 'oom', or the failing row's status), the VRAM the
    trial added (`vram_added`), the device peak, RSS, speeds and the error text."""
    rows = list(rows)
    bad = next((r for r in rows if r.get("status") != "ok"), None)
    status = "ok" if rows and bad is None else (bad or {}).get("status", "error")
    error = (bad or {}).get("error")
    if status != "ok" and error and OOM_PATTERN.search(str(error)):
        status = "oom"
    peaks, rss = _present(rows, "vram_peak_mb"), _present(rows, "rss_peak_mb")
    vram = vram_added(rows)
    out = {"status": status,
           "vram_peak_mb": vram["vram_mb"],
           "vram_source": vram["vram_source"],
           "vram_nvml_mb": vram["vram_nvml_mb"],
           "vram_llama_mb": vram["vram_llama_mb"],
           "vram_device_peak_mb": max(peaks) if peaks else None,
           "rss_peak_mb": max(rss) if rss else None,
           "error": error}
    for r in rows:
        if r.get("status") == "ok" and r.get("test_kind") in ("pp", "tg"):
            out[f"{r['test_kind']}_ts"] = r.get("median_ts")
    return out


@dataclass
class LayerProbe:
    """probe(n_gpu_layers) -> {"status", "vram_peak_mb" (added by the trial), ...}, one child process each.

    `runner` has kit.sweep.run_trial's signature (default: kit.sweep.run_trial, looked up at call time); tests
    pass a fake one. Every result is kept in `results`.
    """

    model_path: str
    base: Settings
    tests: list = field(default_factory=lambda: [pp(64), tg(16)])
    repetitions: int = 1
    timeout_s: float = 300
    log_file: str | None = None
    runner: Callable | None = None
    results: list = field(default_factory=list)

    key = "n_gpu_layers"

    def _settings(self, value: int) -> Settings:
        return self.base.replace(n_gpu_layers=int(value))

    def __call__(self, value: int) -> dict:
        runner = self.runner or sweep.run_trial
        rows = runner(self._settings(value), list(self.tests), self.repetitions, self.model_path,
                      timeout_s=self.timeout_s, log_file=self.log_file)
        res = {self.key: int(value), **summarise_probe_rows(rows)}
        self.results.append(res)
        return res


@dataclass
class ContextProbe(LayerProbe):
    """probe(n_ctx) at a fixed n_gpu_layers (in `base`): the KV cache is allocated when the context is created."""

    key = "n_ctx"

    def _settings(self, value: int) -> Settings:
        return self.base.replace(n_ctx=int(value))


# ---- the searches with the real probes -----------------------------------------------------------------------
def not_testable_search(key: str, reason: str, **extra) -> dict:
    """A search result that probed nothing: best 0 layers (or no context), with the reason."""
    return {key: 0 if key == "best_n_gpu_layers" else None, **extra, "vram_limit_mb": None, "probes": [],
            "reason": reason, "testable": False}


def find_optimal_gpu_layers(model: str = DEFAULT_MODEL, vram_limit_mb: float | None = None, margin_mb: float = 512,
                            base: Settings | None = None, tests: Sequence[Test] | None = None,
                            timeout_s: float = 300, nvml: Any = None, support: dict | None = None,
                            runner: Callable | None = None, log_file: str | None = None) -> dict:
    """The largest n_gpu_layers (0 .. n_layers + 1) that loads and runs a short pp + tg within the VRAM limit
    (default: free VRAM now minus `margin_mb`), by `bisect_gpu_layers` over child-process probes.

    Where the build cannot offload (or no GPU is visible) nothing runs: best 0, reason "not testable here: ...".
    """
    card = model_card(model)
    support = support or offload_support(nvml)
    n_max = card.n_layers + 1
    if not support["testable"]:
        return not_testable_search("best_n_gpu_layers", support["reason"], n_layers=n_max)
    base = (base or Settings(model=model, n_ctx=512)).replace(model=model)
    probe = LayerProbe(card.path, base, list(tests or [pp(64), tg(16)]), timeout_s=timeout_s, runner=runner,
                       log_file=log_file)
    res = bisect_gpu_layers(probe, n_max, vram_limit_mb=vram_limit_mb, margin_mb=margin_mb, nvml=nvml)
    res["testable"] = True
    res["probe_results"] = probe.results
    return res


def context_candidates(n_ctx_train: int, start: int = 512) -> list[int]:
    """Powers of two from `start` up to the model's training context (and that context itself)."""
    out, c = [], start
    while c < n_ctx_train:
        out.append(c)
        c *= 2
    out.append(n_ctx_train)
    return sorted(set(out))


def find_max_context(model: str = DEFAULT_MODEL, n_gpu_layers: int = 0, candidates: Sequence[int] | None = None,
                     vram_limit_mb: float | None = None, margin_mb: float = 512, base: Settings | None = None,
                     timeout_s: float = 300, nvml: Any = None, support: dict | None = None,
                     runner: Callable | None = None, log_file: str | None = None) -> dict:
    """The largest n_ctx among `candidates` (default: powers of two up to n_ctx_train) that still fits at
    `n_gpu_layers`, by `bisect_context` over child-process probes."""
    card = model_card(model)
    cands = sorted(set(candidates or context_candidates(card.n_ctx_train)))
    support = support or offload_support(nvml)
    if not support["testable"]:
        return not_testable_search("best_n_ctx", support["reason"], n_ctx_candidates=cands,
                                   n_gpu_layers=n_gpu_layers)
    base = (base or Settings(model=model)).replace(model=model, n_gpu_layers=int(n_gpu_layers))
    probe = ContextProbe(card.path, base, [pp(64)], timeout_s=timeout_s, runner=runner, log_file=log_file)
    res = bisect_context(probe, cands, vram_limit_mb=vram_limit_mb, margin_mb=margin_mb, nvml=nvml)
    res.update(testable=True, n_gpu_layers=int(n_gpu_layers), probe_results=probe.results)
    return res
