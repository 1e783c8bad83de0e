"""GPU offload (claim G1: raise n_gpu_layers as far as VRAM allows) and the machine report of notebook 00.

- `offload_support()`: can this build and machine offload layers and measure VRAM? If not, the one-line reason.
- `LayerProbe` / `ContextProbe`: the real probes for `kit.gpu.find_optimal_gpu_layers` / `find_max_context`:
  each attempt is `kit.sweep.run_trial` (a child process), so an out-of-memory load is a failed probe, not a
  dead notebook. They report the VRAM the attempt added (sampler peak minus the baseline taken before loading).
- `find_optimal_gpu_layers(model, ...)` / `find_max_context(model, n_gpu_layers, ...)`: those searches with the
  real probes, refusing with "not testable here" where the build cannot offload.
- `GpuLayersStudy` + `run_gpu_layers` + `layer_table` / `verdict_gpu_layers` / `plot_gpu_layers`: notebook 10.
- `EnvironmentStudy` + `run_environment_report` + `plot_roofline`: notebook 00 (hardware, build, model card,
  measured memory bandwidth and the decode roofline against a measured tg).

llama.cpp counts the output layer as one more offloadable layer: n_gpu_layers = n_layers + 1 puts every
layer on the GPU (llama-model.cpp: i_gpu_start = n_layer + 1 - n_gpu_layers), so the sweeps go to n_layers + 1.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from kit.config import Settings, SettingsError
from kit.measure import DEFAULT_REPETITIONS, Test, pp, tg

CLAIM = "G1"
NOT_TESTABLE_NO_OFFLOAD = "not testable here: this build has no GPU offload"
NOT_TESTABLE_NO_DEVICE = "not testable here: no NVIDIA GPU visible to NVML, so VRAM cannot be measured"
GUIDE_BASELINE_LAYERS = 30  # the guide's "good settings" n_gpu_layers
OOM_PATTERN = re.compile(r"out of memory|failed to allocate|cudaMalloc|ErrorOutOfDeviceMemory|"
                         r"unable to allocate|insufficient memory", re.I)


# ---- can this machine offload? -------------------------------------------------------------------------------
def offload_support(nvml: Any = None, build_supports: bool | None = None) -> dict:
    """Whether G1 can be measured here: a build with GPU offload and an NVML device to read VRAM from.

    Returns {"testable", "build_gpu_offload", "gpus", "reason"}; reason is "" when testable, else one line
    starting with "not testable here".
    """
    from kit import gpu

    build = gpu.build_supports_gpu_offload() if build_supports is None else bool(build_supports)
    gpus = gpu.gpu_inventory(nvml)
    usable = [g for g in gpus if "free_mb" in g]
    if not build:
        reason = NOT_TESTABLE_NO_OFFLOAD
    elif not usable:
        reason = NOT_TESTABLE_NO_DEVICE
    else:
        reason = ""
    return {"testable": not reason, "build_gpu_offload": build, "gpus": gpus, "reason": reason}


def offload_statement(support: dict) -> str:
    """The sentence the environment report prints about GPU offload."""
    if not support["build_gpu_offload"]:
        gpus = support.get("gpus") or []
        extra = (f" (a GPU is present: {', '.join(g.get('name', '?') for g in gpus)}; this llama.cpp build cannot "
                 "use it - install a CUDA/Metal/Vulkan build of llama-cpp-python)") if gpus else ""
        return f"This build has no GPU offload{extra}: n_gpu_layers is silently ignored and every layer runs on the CPU."
    if not support["testable"]:
        return ("This build can offload to a GPU, but no NVIDIA GPU is visible to NVML here, so VRAM cannot be "
                "measured and the GPU studies are not testable.")
    names = ", ".join(f"{g['name']} ({g['total_mb']:.0f} MiB)" for g in support["gpus"] if "total_mb" in g)
    return f"This build can offload to a GPU: {names}."


# ---- probes --------------------------------------------------------------------------------------------------
def _num(x) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if f != f else f


def summarise_probe_rows(rows: Sequence[dict]) -> dict:
    """One probe result from a trial's rows: status ('ok', 'oom', or the failing row's status), the VRAM the
    trial added (peak minus baseline, MiB), the device peak, RSS, speeds and the error text."""
    rows = list(rows)
    bad = next((r for r in rows if r.get("status") != "ok"), None)
    status = "ok" if rows and bad is None else (bad or {}).get("status", "error")
    error = (bad or {}).get("error")
    if status != "ok" and error and OOM_PATTERN.search(str(error)):
        status = "oom"
    added = [(_num(r.get("vram_peak_mb")), _num(r.get("vram_baseline_mb"))) for r in rows]
    added = [p - b for p, b in added if p is not None and b is not None]
    peaks = [_num(r.get("vram_peak_mb")) for r in rows]
    peaks = [p for p in peaks if p is not None]
    rss = [_num(r.get("rss_peak_mb")) for r in rows]
    rss = [x for x in rss if x is not None]
    out = {"status": status,
           "vram_peak_mb": round(max(added), 1) if added else None,
           "vram_device_peak_mb": max(peaks) if peaks else None,
           "rss_peak_mb": max(rss) if rss else None,
           "error": error}
    for r in rows:
        if r.get("status") == "ok" and r.get("test_kind") in ("pp", "tg"):
            out[f"{r['test_kind']}_ts"] = r.get("median_ts")
    return out


def _default_runner() -> Callable:
    from kit.sweep import run_trial

    return run_trial


@dataclass
class LayerProbe:
    """probe(n_gpu_layers) -> {"status", "vram_peak_mb" (added by the trial), ...}, one child process each.

    `runner` has kit.sweep.run_trial's signature; tests pass a fake one. Every result is kept in `results`.
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
        runner = self.runner or _default_runner()
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


def _not_testable_search(key: str, reason: str, **extra) -> dict:
    return {key: 0 if key == "best_n_gpu_layers" else None, **extra, "vram_limit_mb": None, "probes": [],
            "reason": reason, "testable": False}


def find_optimal_gpu_layers(model: str = "smollm2-135m", vram_limit_mb: float | None = None, margin_mb: float = 512,
                            base: Settings | None = None, tests: Sequence[Test] | None = None,
                            timeout_s: float = 300, nvml: Any = None, support: dict | None = None,
                            runner: Callable | None = None, log_file: str | None = None) -> dict:
    """The largest n_gpu_layers (0 .. n_layers + 1) that loads and runs a short pp + tg within the VRAM limit
    (default: free VRAM now minus `margin_mb`), by bisection over child-process probes (kit.gpu's search).

    Where the build cannot offload (or no GPU is visible) nothing runs: best 0, reason "not testable here: ...".
    """
    from kit import gpu
    from kit.models import model_card

    card = model_card(model)
    support = support or offload_support(nvml)
    n_max = card.n_layers + 1
    if not support["testable"]:
        return _not_testable_search("best_n_gpu_layers", support["reason"], n_layers=n_max)
    base = (base or Settings(model=model, n_ctx=512)).replace(model=model)
    probe = LayerProbe(card.path, base, list(tests or [pp(64), tg(16)]), timeout_s=timeout_s, runner=runner,
                       log_file=log_file)
    res = gpu.find_optimal_gpu_layers(probe, n_max, vram_limit_mb=vram_limit_mb, margin_mb=margin_mb, nvml=nvml)
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


def find_max_context(model: str = "smollm2-135m", n_gpu_layers: int = 0, candidates: Sequence[int] | None = None,
                     vram_limit_mb: float | None = None, margin_mb: float = 512, base: Settings | None = None,
                     timeout_s: float = 300, nvml: Any = None, support: dict | None = None,
                     runner: Callable | None = None, log_file: str | None = None) -> dict:
    """The largest n_ctx among `candidates` (default: powers of two up to n_ctx_train) that still fits at
    `n_gpu_layers`, by the same bisection over child-process probes."""
    from kit import gpu
    from kit.models import model_card

    card = model_card(model)
    cands = sorted(set(candidates or context_candidates(card.n_ctx_train)))
    support = support or offload_support(nvml)
    if not support["testable"]:
        return _not_testable_search("best_n_ctx", support["reason"], n_ctx_candidates=cands,
                                    n_gpu_layers=n_gpu_layers)
    base = (base or Settings(model=model)).replace(model=model, n_gpu_layers=int(n_gpu_layers))
    probe = ContextProbe(card.path, base, [pp(64)], timeout_s=timeout_s, runner=runner, log_file=log_file)
    res = gpu.find_max_context(probe, cands, vram_limit_mb=vram_limit_mb, margin_mb=margin_mb, nvml=nvml)
    res.update(testable=True, n_gpu_layers=int(n_gpu_layers), probe_results=probe.results)
    return res


# ---- notebook 10: the study -----------------------------------------------------------------------------------
def _int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise SettingsError(f"{name}={v!r} must be an integer >= {lo}")
    return v


@dataclass
class GpuLayersStudy:
    """Configuration of notebook 10: n_gpu_layers from 0 to all layers, the layer search, the context search."""

    model: str = "smollm2-135m"
    repetitions: int = DEFAULT_REPETITIONS
    layer_step: int = 5                # sweep 0, step, 2 step, ... plus the guide's 30 and all layers
    n_prompt: int = 512                # pp test (and TTFT = its prompt time)
    n_gen: int = 128                   # tg test
    n_ctx: int = 2048
    n_batch: int = 512
    n_ubatch: int = 512
    vram_limit_mb: float = 0.0         # 0 = free VRAM now minus margin_mb
    margin_mb: float = 512.0
    probe_n_prompt: int = 64           # the short test each search probe runs
    probe_n_gen: int = 16
    ctx_candidates: list = field(default_factory=list)  # empty = powers of two up to n_ctx_train
    timeout_s: float = 600

    def __post_init__(self) -> None:
        _int("repetitions", self.repetitions, 1)
        _int("layer_step", self.layer_step, 1)
        for name in ("n_prompt", "n_gen", "probe_n_prompt", "probe_n_gen"):
            _int(name, getattr(self, name), 1)
        if not isinstance(self.vram_limit_mb, (int, float)) or isinstance(self.vram_limit_mb, bool) \
                or self.vram_limit_mb < 0:
            raise SettingsError(f"vram_limit_mb={self.vram_limit_mb!r} must be >= 0 (0 = free VRAM minus margin)")
        if not isinstance(self.margin_mb, (int, float)) or self.margin_mb < 0:
            raise SettingsError(f"margin_mb={self.margin_mb!r} must be >= 0")
        for c in self.ctx_candidates:
            _int("ctx_candidates entry", c, 1)
        if self.timeout_s <= 0:
            raise SettingsError("timeout_s must be > 0")
        self.base_settings().check_fits(self.n_prompt + self.n_gen, what="pp + tg test")
        self.base_settings().check_fits(self.probe_n_prompt + self.probe_n_gen, what="probe test")

    def card(self):
        from kit.models import model_card

        return model_card(self.model)

    def base_settings(self) -> Settings:
        return Settings(model=self.model, n_ctx=self.n_ctx, n_batch=self.n_batch, n_ubatch=self.n_ubatch)

    def layer_counts(self, n_layers: int) -> list[int]:
        """0, step, 2*step, ... , the guide's 30 (if below the top) and n_layers + 1 (every layer incl. output)."""
        top = n_layers + 1
        counts = set(range(0, top + 1, self.layer_step)) | {top}
        if GUIDE_BASELINE_LAYERS < top:
            counts.add(GUIDE_BASELINE_LAYERS)
        return sorted(counts)

    def tests(self) -> list[Test]:
        return [pp(self.n_prompt), tg(self.n_gen)]

    def probe_tests(self) -> list[Test]:
        return [pp(self.probe_n_prompt), tg(self.probe_n_gen)]

    @property
    def vram_limit(self) -> float | None:
        return float(self.vram_limit_mb) or None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GpuLayersRun:
    rows: Any                      # DataFrame of this plan's rows
    support: dict
    layer_counts: list
    search: dict
    ctx_search: dict
    n_layers: int


def run_gpu_layers(study: GpuLayersStudy, out_dir: str | os.PathLike, progress: bool = True, nvml: Any = None,
                   support: dict | None = None, runner: Callable | None = None) -> GpuLayersRun:
    """Notebook 10's run: where offload works, the layer search, the context search at the best count, and the
    sweep over layer counts; elsewhere the CPU baseline (n_gpu_layers=0) only. Searches go to gpu_search.json."""
    from kit.sweep import planned_rows
    from kit.sweep import run_sweep

    out = Path(out_dir)
    card = study.card()
    support = support or offload_support(nvml)
    log_file = str((out / "llama.log").resolve())
    out.mkdir(parents=True, exist_ok=True)
    if support["testable"]:
        search = find_optimal_gpu_layers(study.model, study.vram_limit, study.margin_mb, base=study.base_settings(),
                                         tests=study.probe_tests(), timeout_s=study.timeout_s, nvml=nvml,
                                         support=support, runner=runner, log_file=log_file)
        best = search["best_n_gpu_layers"]
        ctx_search = (find_max_context(study.model, best, study.ctx_candidates or None, study.vram_limit,
                                       study.margin_mb, base=study.base_settings(), timeout_s=study.timeout_s,
                                       nvml=nvml, support=support, runner=runner, log_file=log_file)
                      if best is not None else _not_testable_search("best_n_ctx", "no layer count fits"))
        counts = study.layer_counts(card.n_layers)
    else:
        search = _not_testable_search("best_n_gpu_layers", support["reason"], n_layers=card.n_layers + 1)
        ctx_search = _not_testable_search("best_n_ctx", support["reason"])
        counts = [0]
    (out / "gpu_search.json").write_text(json.dumps({"support": support, "layers": search, "context": ctx_search},
                                                    indent=2, default=str))
    configs = [study.base_settings().replace(n_gpu_layers=k) for k in counts]
    name = out.name
    # with real offload the layer counts are measured back to back: live children would share the GPU's memory
    df = run_sweep(name, configs, study.tests(), study.repetitions, out_root=out.parent, timeout_s=study.timeout_s,
                   progress=progress, extra={"claim": CLAIM}, interleave=False if support.get("testable") else None)
    df = planned_rows(df, configs, study.tests(), study.repetitions)
    return GpuLayersRun(df, support, counts, search, ctx_search, card.n_layers)


def layer_table(df):
    """Per n_gpu_layers: pp and tg t/s (median, 95 % CI), TTFT (= pp time of the prompt), VRAM added, RSS, load."""
    import pandas as pd

    from kit.studies.batch_flash_attn import _as_list
    from kit.verdicts import median_ci

    cols = ["n_gpu_layers", "status", "pp_ts", "pp_ts_lo", "pp_ts_hi", "tg_ts", "tg_ts_lo", "tg_ts_hi",
            "ttft_ms", "ttft_ms_lo", "ttft_ms_hi", "vram_added_mb", "rss_peak_mb", "load_ms", "error"]
    if df is None or df.empty:
        return pd.DataFrame(columns=cols)
    out = []
    for k, g in df.groupby("n_gpu_layers", sort=True):
        rec: dict = {"n_gpu_layers": int(k)}
        bad = g[g.status != "ok"]
        rec["status"] = "ok" if bad.empty else str(bad.iloc[0]["status"])
        rec["error"] = None if bad.empty else bad.iloc[0].get("error")
        for kind in ("pp", "tg"):
            r = g[(g.test_kind == kind) & (g.status == "ok")]
            samples = [x for s in r["samples_ts"] for x in _as_list(s)]
            rec[f"{kind}_ts"], rec[f"{kind}_ts_lo"], rec[f"{kind}_ts_hi"] = median_ci(samples)
            if kind == "pp":
                ns = [x / 1e6 for s in r["samples_ns"] for x in _as_list(s)]
                rec["ttft_ms"], rec["ttft_ms_lo"], rec["ttft_ms_hi"] = median_ci(ns)
        ok = g[g.status == "ok"]
        probe = summarise_probe_rows(ok.to_dict("records")) if not ok.empty else {}
        rec["vram_added_mb"] = probe.get("vram_peak_mb")
        rec["rss_peak_mb"] = probe.get("rss_peak_mb")
        rec["load_ms"] = _num(ok["load_ms"].median()) if "load_ms" in ok and not ok.empty else None
        out.append(rec)
    return pd.DataFrame(out, columns=cols)


def probes_table(search: dict):
    import pandas as pd

    return pd.DataFrame(search.get("probes") or [],
                        columns=None if search.get("probes") else ["n_gpu_layers", "status", "vram_peak_mb", "fits",
                                                                    "over_limit"])


def verdict_gpu_layers(run: GpuLayersRun, evidence: Sequence[str] = ()):
    """G1. Not testable without offload (the CPU baseline goes in `details`). With a GPU: tg t/s at the largest
    swept layer count that ran within the VRAM limit against the guide's 30 layers (or against 0 layers when
    30 is not below it); pp in `details`."""
    from kit.studies.batch_flash_attn import _fmt, _ratio
    from kit.verdicts import compare
    from kit.verdicts import not_testable

    table = layer_table(run.rows)
    if not run.support["testable"]:
        base = table[table.n_gpu_layers == 0]
        details = {}
        if not base.empty:
            b = base.iloc[0]
            details = {"cpu_baseline_pp_ts": b["pp_ts"], "cpu_baseline_tg_ts": b["tg_ts"],
                       "cpu_baseline_ttft_ms": b["ttft_ms"], "cpu_baseline_rss_mb": b["rss_peak_mb"]}
        return not_testable(CLAIM, run.support["reason"], evidence=evidence, **details)
    best = run.search.get("best_n_gpu_layers")
    fits = table[(table.status == "ok") & (table.n_gpu_layers <= (best if best is not None else -1))]
    if fits.empty:
        return not_testable(CLAIM, f"no swept layer count ran within the VRAM limit ({run.search.get('reason')})",
                            evidence=evidence)
    cand_k = int(fits.n_gpu_layers.max())
    base_k = GUIDE_BASELINE_LAYERS if GUIDE_BASELINE_LAYERS < cand_k and GUIDE_BASELINE_LAYERS in set(fits.n_gpu_layers) \
        else 0
    if cand_k == base_k:
        return not_testable(CLAIM, f"only n_gpu_layers={cand_k} fits: nothing to compare", evidence=evidence)
    rows = run.rows[run.rows.status == "ok"]

    def samples(k, kind):
        from kit.studies.batch_flash_attn import _as_list

        r = rows[(rows.n_gpu_layers == k) & (rows.test_kind == kind)]
        return [float(x) for s in r["samples_ts"] for x in _as_list(s)]

    v = compare(CLAIM, samples(cand_k, "tg"), samples(base_k, "tg"), evidence=evidence,
                        metric=f"tg t/s ratio, n_gpu_layers {cand_k} (largest that fits) over {base_k}")
    vp = compare(CLAIM, samples(cand_k, "pp"), samples(base_k, "pp"), metric="pp")
    v.summary = (f"{cand_k} layers (the most that fit: {run.search.get('reason')}) against {base_k}: tg "
                 f"{_fmt(v.verdict, _ratio(v), v.ci_low, v.ci_high)}; pp {_fmt(vp.verdict, _ratio(vp), vp.ci_low, vp.ci_high)}.")
    v.details = {**(v.details or {}), "best_n_gpu_layers": best, "candidate_layers": cand_k, "baseline_layers": base_k,
                 "pp_ratio": _ratio(vp), "pp_ci": [vp.ci_low, vp.ci_high], "pp_verdict": vp.verdict,
                 "max_context_at_best": run.ctx_search.get("best_n_ctx"), "vram_limit_mb": run.search.get("vram_limit_mb")}
    return v


def plot_gpu_layers(table, title_note: str = ""):
    """t/s, TTFT and memory against n_gpu_layers (median and 95 % CI)."""
    import matplotlib.pyplot as plt

    from kit.plots import setup

    setup()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    t = table[table.status == "ok"].sort_values("n_gpu_layers")
    x = t.n_gpu_layers.astype(float)
    single = len(t) <= 1
    style = dict(marker="o", capsize=3, linestyle="none" if single else "-")
    for kind in ("pp", "tg"):
        y = t[f"{kind}_ts"].astype(float)
        err = [y - t[f"{kind}_ts_lo"].astype(float), t[f"{kind}_ts_hi"].astype(float) - y]
        axes[0].errorbar(x, y, yerr=err, label=f"{kind} t/s", **style)
    axes[0].set(xlabel="n_gpu_layers", ylabel="tokens/s", title="speed (median, 95 % CI)")
    axes[0].legend()
    y = t.ttft_ms.astype(float)
    axes[1].errorbar(x, y, yerr=[y - t.ttft_ms_lo.astype(float), t.ttft_ms_hi.astype(float) - y], **style)
    axes[1].set(xlabel="n_gpu_layers", ylabel="ms", title="TTFT (prompt processing time)")
    axes[2].plot(x, t.rss_peak_mb.astype(float), marker="o", label="RAM: peak RSS")
    if t.vram_added_mb.notna().any():
        axes[2].plot(x, t.vram_added_mb.astype(float), marker="s", label="VRAM added")
    axes[2].set(xlabel="n_gpu_layers", ylabel="MiB", title="memory")
    axes[2].legend()
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_ylim(bottom=0)
        if single:
            ax.set_xlim(-1, max(1.0, float(x.max()) + 1) if len(x) else 1)
    if title_note:
        fig.suptitle(title_note)
    fig.tight_layout()
    return fig


# ---- notebook 00: environment, model card, roofline -------------------------------------------------------------
def weights_read_per_token(model: str = "smollm2-135m") -> dict:
    """Bytes of weights a dense decode step reads: every tensor once, except the token embedding when a separate
    output matrix exists (then only one embedding row is read). Tied embeddings are read in full (as output)."""
    import gguf

    from kit.models import resolve_model

    path = resolve_model(model)
    reader = gguf.GGUFReader(str(path), "r")
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    total = sum(sizes.values())
    tied = "output.weight" not in sizes
    read = total
    if not tied and "token_embd.weight" in sizes:
        emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
        n_rows = int(emb.shape[-1]) if len(emb.shape) > 1 else 1
        read = total - sizes["token_embd.weight"] + sizes["token_embd.weight"] // max(n_rows, 1)
    per_layer: dict[int, int] = {}
    for name, n in sizes.items():
        m = re.match(r"blk\.(\d+)\.", name)
        if m:
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + n
    return {"tensor_bytes": total, "read_per_token_bytes": read, "tied_embeddings": tied,
            "layer_bytes_mean": round(sum(per_layer.values()) / len(per_layer)) if per_layer else None,
            "non_layer_bytes": total - sum(per_layer.values())}


@dataclass
class EnvironmentStudy:
    """Configuration of notebook 00: a quick pp + tg measurement to set against the decode roofline."""

    model: str = "smollm2-135m"
    repetitions: int = DEFAULT_REPETITIONS
    n_prompt: int = 512
    n_gen: int = 128
    n_ctx: int = 1024
    bandwidth_mb: int = 256            # buffer for the RAM bandwidth measurement (far above any CPU cache)
    timeout_s: float = 600

    def __post_init__(self) -> None:
        for name in ("repetitions", "n_prompt", "n_gen", "n_ctx", "bandwidth_mb"):
            _int(name, getattr(self, name), 1)
        self.settings().check_fits(max(self.n_prompt, self.n_gen), what="pp or tg test")

    def settings(self) -> Settings:
        return Settings(model=self.model, n_ctx=self.n_ctx)

    def tests(self) -> list[Test]:
        return [pp(self.n_prompt), tg(self.n_gen)]


@dataclass
class EnvironmentReport:
    environment: dict
    card: dict
    roofline: dict
    rows: Any
    support: dict

    def summary_table(self):
        import pandas as pd

        e, c, r = self.environment, self.card, self.roofline
        items = [
            ("CPU", f"{e.get('cpu_info')} ({e.get('cpu_physical_cores')} physical / {e.get('cpu_logical_cores')} "
                    f"logical cores, {e.get('cpu_affinity')} usable)"),
            ("RAM", f"{e.get('ram_total_mb')} MiB total, {e.get('ram_available_mb')} MiB available"),
            ("NUMA nodes", len(e.get("numa_nodes") or []) or 1),
            ("OS / Python", f"{e.get('os')} / Python {e.get('python')}"),
            ("llama-cpp-python", e.get("llama_cpp_python")),
            ("GPU offload", offload_statement(self.support)),
            ("GPUs (NVML)", e.get("gpu_info") or "none"),
            ("model", f"{c['name']} ({c['model_type']}), {c['n_layers']} layers, n_ctx_train {c['n_ctx_train']}, "
                      f"rope_freq_base {c['rope_freq_base']}"),
            ("model file", f"{c['file_name']}, {c['size_bytes'] / 2**20:.1f} MiB, {c['bits_per_weight']:.2f} bits/weight"),
            ("weights read per token", f"{r['read_per_token_bytes'] / 2**20:.1f} MiB"
                                       f"{' (tied embeddings: output reads token_embd)' if r['tied_embeddings'] else ''}"),
            ("RAM read bandwidth", f"{r['mem_read_gbs']} GB/s (one thread, numpy sum of {r['buffer_mb']} MiB)"),
            ("decode roofline", f"{r['tg_upper_bound_ts']:.1f} t/s upper bound"),
            ("measured tg", f"{r['tg_measured_ts']:.1f} t/s ({ci_text(r['tg_ci'])}), "
                            f"{r['tg_fraction_of_bound'] * 100:.0f} % of the bound" if r.get("tg_measured_ts") else "failed"),
            ("measured pp", f"{r['pp_measured_ts']:.1f} t/s" if r.get("pp_measured_ts") else "failed"),
        ]
        return pd.DataFrame(items, columns=["item", "value"])


def ci_text(ci) -> str:
    lo, hi = ci if ci else (None, None)
    return "no interval: one sample" if lo is None else f"95 % CI {lo:.1f}-{hi:.1f}"


def run_environment_report(study: EnvironmentStudy, out_dir: str | os.PathLike, progress: bool = True,
                           nvml: Any = None) -> EnvironmentReport:
    """Capture the environment fresh, write environment.json and model_card.json under out_dir, measure pp/tg
    once (kit.sweep), and add the decode roofline (read bandwidth / weight bytes per token) to environment.json."""
    from kit.studies.batch_flash_attn import _as_list
    from kit.sweep import planned_rows
    from kit.verdicts import median_ci
    from kit.environment import capture_environment, decode_roofline, memory_bandwidth_gbs
    from kit.models import model_card
    from kit.sweep import run_sweep

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = capture_environment(bandwidth=False)
    env.update(memory_bandwidth_gbs(size_mb=study.bandwidth_mb))
    support = offload_support(nvml)
    env["gpu_offload_statement"] = offload_statement(support)
    # written before the sweep so the rows' provenance and this report cite the same capture
    (out / "environment.json").write_text(json.dumps(env, indent=2, default=str))
    card = model_card(study.model).to_dict()
    wr = weights_read_per_token(study.model)
    card.update(wr)
    (out / "model_card.json").write_text(json.dumps(card, indent=2, default=str))

    configs, tests = [study.settings()], study.tests()
    df = run_sweep(out.name, configs, tests, study.repetitions, out_root=out.parent, timeout_s=study.timeout_s,
                   progress=progress, extra={"part": "environment"})
    df = planned_rows(df, configs, tests, study.repetitions)
    ok = df[df.status == "ok"] if not df.empty else df

    def speed(kind):
        r = ok[ok.test_kind == kind] if not ok.empty else ok
        return median_ci([x for s in r["samples_ts"] for x in _as_list(s)]) if not r.empty else (None, None, None)

    tg_med, tg_lo, tg_hi = speed("tg")
    pp_med, _, _ = speed("pp")
    bound = decode_roofline(wr["read_per_token_bytes"], env["mem_read_gbs"])
    threads = int(ok["n_threads_effective"].iloc[0]) if not ok.empty and "n_threads_effective" in ok else None
    roof = {"mem_read_gbs": env["mem_read_gbs"], "mem_copy_gbs": env.get("mem_copy_gbs"),
            "buffer_mb": study.bandwidth_mb, "read_per_token_bytes": wr["read_per_token_bytes"],
            "tied_embeddings": wr["tied_embeddings"], "tg_upper_bound_ts": round(bound, 2),
            "tg_measured_ts": tg_med, "tg_ci": [tg_lo, tg_hi], "pp_measured_ts": pp_med,
            "tg_fraction_of_bound": round(tg_med / bound, 4) if tg_med else None,
            "n_threads_tg": threads, "n_gen": study.n_gen,
            "note": "bound = read bandwidth / weight bytes per token; KV-cache reads (small at short context) and "
                    "compute are ignored; the bandwidth is one thread's, as is llama-cpp-python's default tg thread "
                    "count on 2 cores (cpu_count // 2)"}
    env["decode_roofline"] = roof
    (out / "environment.json").write_text(json.dumps(env, indent=2, default=str))
    return EnvironmentReport(env, card, roof, df, support)


def plot_roofline(report: EnvironmentReport):
    """The decode upper bound from memory bandwidth beside the measured tg (median, 95 % CI)."""
    import matplotlib.pyplot as plt

    from kit.plots import setup

    setup()
    r = report.roofline
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(["roofline bound\n(read BW / bytes per token)"], [r["tg_upper_bound_ts"]], color="#bbbbbb")
    if r.get("tg_measured_ts"):
        lo, hi = r["tg_ci"]
        err = None if lo is None else [[r["tg_measured_ts"] - lo], [hi - r["tg_measured_ts"]]]
        ax.bar([f"measured tg{r['n_gen']}"], [r["tg_measured_ts"]], yerr=err, capsize=5, color="#4c72b0")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"decode roofline: {r['read_per_token_bytes'] / 2**20:.0f} MiB/token at {r['mem_read_gbs']} GB/s")
    fig.tight_layout()
    return fig
