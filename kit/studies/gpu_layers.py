"""Notebook 10, claim G1: raise n_gpu_layers as far as VRAM allows.

- `GpuLayersStudy`: the config (layer sweep, the search probes' short test, the VRAM limit).
- `run_gpu_layers(study)`: where offload works, `kit.search.find_optimal_gpu_layers` (bisection over
  child-process probes), `kit.search.find_max_context` at the best count, then the sweep over layer counts;
  elsewhere the CPU baseline (n_gpu_layers=0) only. The searches go to gpu_search.json.
- `layer_table` / `probes_table` / `plot_gpu_layers` / `verdict_gpu_layers` / `recommendation`: what the
  notebook shows and concludes.

llama.cpp counts the output layer as one more offloadable layer: n_gpu_layers = n_layers + 1 puts every
layer on the GPU, so the sweep goes to n_layers + 1 (see kit.search).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import matplotlib.pyplot as plt
import pandas as pd

from kit.config import Settings, StudyConfig, check_rule, param
from kit.measure import Test, pp, tg
from kit.models import model_card
from kit.plots import setup
from kit.results import median_table, pooled_samples
from kit.search import (find_max_context, find_optimal_gpu_layers, not_testable_search, offload_statement,
                        offload_support, summarise_probe_rows)
from kit.sweep import planned_rows, run_sweep
from kit.verdicts import NOT_TESTABLE, SUPPORTED, Verdict, combine, compare, not_testable, ratio_of, ratio_text

CLAIM = "G1"
GUIDE_BASELINE_LAYERS = 30  # the guide's "good settings" n_gpu_layers
TABLE_COLUMNS = ["n_gpu_layers", "status", "pp_ts", "pp_ts_lo", "pp_ts_hi", "tg_ts", "tg_ts_lo", "tg_ts_hi",
                 "ttft_ms", "ttft_ms_lo", "ttft_ms_hi", "vram_added_mb", "vram_source", "vram_nvml_mb",
                 "vram_llama_mb", "vram_llama_kv_mb", "rss_peak_mb", "load_ms", "error"]
PROBE_COLUMNS = ["n_gpu_layers", "status", "vram_peak_mb", "fits", "over_limit"]


@dataclass
class GpuLayersStudy(StudyConfig):
    """Configuration of notebook 10: n_gpu_layers from 0 to all layers, the layer search, the context search."""

    out_dir: str = param("outputs/10_gpu_layers", "where rows, figures and verdicts go")
    layer_step: int = param(5, "sweep n_gpu_layers 0, step, 2*step, ... (+ 30 and all layers)", ge=1)
    n_prompt: int = param(256, "pp test length (TTFT is its prompt time)", ge=1)
    n_gen: int = param(64, "tg test length", ge=1)
    n_ctx: int = param(2048, "context size held fixed in the sweep", ge=1)
    n_batch: int = param(512, "logical batch size held fixed in the sweep", ge=1)
    n_ubatch: int = param(512, "micro-batch size held fixed in the sweep", ge=1)
    vram_limit_mb: float = param(0.0, "VRAM budget for the search; 0 means free VRAM now minus margin_mb", ge=0)
    margin_mb: float = param(512.0, "headroom kept free when the limit is the free VRAM", ge=0)
    probe_n_prompt: int = param(64, "pp length of each search probe", ge=1)
    probe_n_gen: int = param(16, "tg length of each search probe", ge=1)
    ctx_candidates: list[int] = param([], "context sizes for the context search; empty means powers of two up "
                                          "to n_ctx_train", ge=1)
    timeout_s: float = param(600.0, "seconds before a trial's child process is killed", gt=0)

    def check(self) -> None:
        self.base_settings()  # n_ubatch > n_batch and other bad settings fail here, not in the first trial
        for what, need in (("pp + tg test", self.n_prompt + self.n_gen),
                           ("probe test", self.probe_n_prompt + self.probe_n_gen)):
            check_rule(need <= self.n_ctx, f"n_ctx={self.n_ctx} is smaller than the {what} ({need} tokens)")

    def card(self):
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


@dataclass
class GpuLayersRun:
    rows: Any                      # DataFrame of this plan's rows
    support: dict
    layer_counts: list
    search: dict
    ctx_search: dict
    n_layers: int

    def statement(self) -> str:
        """Whether offload was measured, and which layer counts ran."""
        head = self.support["reason"] or offload_statement(self.support)
        return f"{head}\nlayer counts measured: {self.layer_counts}"

    def search_statement(self) -> str:
        s, c = self.search, self.ctx_search
        return (f"layer search: {s['reason']} | best n_gpu_layers: {s['best_n_gpu_layers']} | VRAM limit (MiB): "
                f"{s['vram_limit_mb']}\ncontext search: {c['reason']} | largest n_ctx: {c['best_n_ctx']}")

    def figure_note(self) -> str:
        return "" if self.support["testable"] else "CPU baseline only: " + self.support["reason"]


# ---- running ---------------------------------------------------------------------------------------------------
def _searches(study: GpuLayersStudy, support: dict, nvml: Any, runner: Callable | None,
              log_file: str) -> tuple[dict, dict]:
    """The layer search, then the context search at the best layer count."""
    common = dict(base=study.base_settings(), timeout_s=study.timeout_s, nvml=nvml, support=support,
                  runner=runner, log_file=log_file)
    search = find_optimal_gpu_layers(study.model, study.vram_limit, study.margin_mb, tests=study.probe_tests(),
                                     **common)
    best = search["best_n_gpu_layers"]
    if best is None:
        return search, not_testable_search("best_n_ctx", "no layer count fits")
    return search, find_max_context(study.model, best, study.ctx_candidates or None, study.vram_limit,
                                    study.margin_mb, **common)


def run_gpu_layers(study: GpuLayersStudy, progress: bool = True, nvml: Any = None, support: dict | None = None,
                   runner: Callable | None = None) -> GpuLayersRun:
    """Notebook 10's run: where offload works, the layer search, the context search at the best count, and the
    sweep over layer counts; elsewhere the CPU baseline (n_gpu_layers=0) only. Searches go to gpu_search.json
    under the study's out_dir."""
    out = study.out_path
    out.mkdir(parents=True, exist_ok=True)
    card = study.card()
    support = support or offload_support(nvml)
    if support["testable"]:
        search, ctx_search = _searches(study, support, nvml, runner, str(out / "llama.log"))
        counts = study.layer_counts(card.n_layers)
    else:
        search = not_testable_search("best_n_gpu_layers", support["reason"], n_layers=card.n_layers + 1)
        ctx_search = not_testable_search("best_n_ctx", support["reason"])
        counts = [0]
    (out / "gpu_search.json").write_text(json.dumps({"support": support, "layers": search, "context": ctx_search},
                                                    indent=2, default=str))
    configs, tests = [study.base_settings().replace(n_gpu_layers=k) for k in counts], study.tests()
    # with real offload the layer counts are measured back to back: live children would share the GPU's memory
    df = run_sweep(out.name, configs, tests, study.repetitions, out_root=out.parent, timeout_s=study.timeout_s,
                   progress=progress, extra={"claim": CLAIM}, interleave=False if support.get("testable") else None)
    df = planned_rows(df, configs, tests, study.repetitions)
    return GpuLayersRun(df, support, counts, search, ctx_search, card.n_layers)


# ---- tables ----------------------------------------------------------------------------------------------------
def _medians(rows, col: str, name: str) -> pd.DataFrame:
    """Median and 95 % interval of `col` per n_gpu_layers, as columns name, name_lo, name_hi."""
    t = median_table(rows, "n_gpu_layers", col)
    return t.rename(columns={col: name, f"{col}_lo": f"{name}_lo", f"{col}_hi": f"{name}_hi"}).drop(columns="n")


def _layer_record(k: int, g: pd.DataFrame) -> dict:
    """Status, error and memory of one layer count's rows."""
    bad = g[g.status != "ok"]
    ok = g[g.status == "ok"]
    probe = summarise_probe_rows(ok.to_dict("records")) if not ok.empty else {}
    return {"n_gpu_layers": int(k), "status": "ok" if bad.empty else str(bad.iloc[0]["status"]),
            "error": None if bad.empty else bad.iloc[0].get("error"),
            "vram_added_mb": probe.get("vram_peak_mb"), "vram_source": probe.get("vram_source"),
            "vram_nvml_mb": probe.get("vram_nvml_mb"), "vram_llama_mb": probe.get("vram_llama_mb"),
            "vram_llama_kv_mb": _max(ok, "vram_llama_kv_mb"), "rss_peak_mb": probe.get("rss_peak_mb")}


def _max(rows: pd.DataFrame, col: str) -> float | None:
    vals = pd.to_numeric(rows[col], errors="coerce").dropna() if col in rows else pd.Series(dtype=float)
    return float(vals.max()) if not vals.empty else None


def layer_table(df) -> pd.DataFrame:
    """Per n_gpu_layers: pp and tg t/s (median, 95 % CI), TTFT (= pp time of the prompt), device memory (NVML's
    added VRAM where NVML sees the GPU, llama.cpp's allocated model + KV + compute buffers on the device for any
    backend; `vram_added_mb` is the first of the two there is, `vram_source` says which), RSS, load."""
    if df is None or df.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    t = pd.DataFrame([_layer_record(k, g) for k, g in df.groupby("n_gpu_layers", sort=True)])
    ok = df[df.status == "ok"]
    if not ok.empty:
        prompt = ok[ok.test_kind == "pp"]
        prompt = prompt.assign(ttft_ms=[[x / 1e6 for x in s] for s in prompt["samples_ns"]])
        parts = [_medians(ok[ok.test_kind == kind], "samples_ts", f"{kind}_ts") for kind in ("pp", "tg")]
        parts += [_medians(prompt, "ttft_ms", "ttft_ms"), median_table(ok, "n_gpu_layers", "load_ms")[
            ["n_gpu_layers", "load_ms"]]]
        for part in parts:
            if not part.empty:
                t = t.merge(part.astype({"n_gpu_layers": int}), on="n_gpu_layers", how="left")
    return t.reindex(columns=TABLE_COLUMNS)


def probes_table(search: dict) -> pd.DataFrame:
    """Every probe of the layer search: the count tried, its status, the VRAM it added, whether it fit."""
    probes = search.get("probes") or []
    return pd.DataFrame(probes, columns=None if probes else PROBE_COLUMNS)


# ---- verdict ---------------------------------------------------------------------------------------------------
def _cpu_baseline(table: pd.DataFrame) -> dict:
    base = table[table.n_gpu_layers == 0]
    if base.empty:
        return {}
    b = base.iloc[0]
    return {"cpu_baseline_pp_ts": b["pp_ts"], "cpu_baseline_tg_ts": b["tg_ts"],
            "cpu_baseline_ttft_ms": b["ttft_ms"], "cpu_baseline_rss_mb": b["rss_peak_mb"]}


def _compared_counts(run: GpuLayersRun, table: pd.DataFrame) -> tuple[int, int] | str:
    """(largest swept count that ran within the limit, the guide's 30 or 0 to compare with), or why none."""
    best = run.search.get("best_n_gpu_layers")
    fits = table[(table.status == "ok") & (table.n_gpu_layers <= (best if best is not None else -1))]
    if fits.empty:
        return f"no swept layer count ran within the VRAM limit ({run.search.get('reason')})"
    cand_k = int(fits.n_gpu_layers.max())
    guide_fits = GUIDE_BASELINE_LAYERS < cand_k and GUIDE_BASELINE_LAYERS in set(fits.n_gpu_layers)
    base_k = GUIDE_BASELINE_LAYERS if guide_fits else 0
    if cand_k == base_k:
        return f"only n_gpu_layers={cand_k} fits: nothing to compare"
    return cand_k, base_k


def verdict_gpu_layers(run: GpuLayersRun, evidence: Sequence[str] = (), confidence: float = 0.95) -> Verdict:
    """G1. Not testable without offload (the CPU baseline goes in `details`). With a GPU: the largest swept layer
    count that ran within the VRAM limit against the guide's 30 layers (or against 0 layers when 30 is not below
    it), one sub-verdict for tg and one for pp, combined (`kit.verdicts.combine`: mixed when they disagree);
    the effect shown is tg's."""
    table = layer_table(run.rows)
    if not run.support["testable"]:
        return not_testable(CLAIM, run.support["reason"], evidence=evidence, **_cpu_baseline(table))
    counts = _compared_counts(run, table)
    if isinstance(counts, str):
        return not_testable(CLAIM, counts, evidence=evidence)
    cand_k, base_k = counts
    rows = run.rows[run.rows.status == "ok"]

    def samples(k: int, kind: str) -> list[float]:
        return pooled_samples(rows[(rows.n_gpu_layers == k) & (rows.test_kind == kind)])

    subs = {kind: compare(CLAIM, samples(cand_k, kind), samples(base_k, kind), evidence=evidence,
                          confidence=confidence,
                          metric=f"{kind} t/s ratio, n_gpu_layers {cand_k} (largest that fits) over {base_k}")
            for kind in ("tg", "pp")}
    vt, vp = subs["tg"], subs["pp"]
    v = combine(CLAIM, subs, depends_on="test (tg, pp)", headline="tg", evidence=evidence,
                details={"best_n_gpu_layers": run.search.get("best_n_gpu_layers"), "candidate_layers": cand_k,
                         "baseline_layers": base_k, "pp_ratio": ratio_of(vp), "pp_ci": [vp.ci_low, vp.ci_high],
                         "pp_verdict": vp.verdict, "max_context_at_best": run.ctx_search.get("best_n_ctx"),
                         "vram_limit_mb": run.search.get("vram_limit_mb")})
    v.summary = (f"{cand_k} layers (the most that fit: {run.search.get('reason')}) against {base_k}: tg "
                 f"{ratio_text(vt)}; pp {ratio_text(vp)}.")
    return v


def recommendation(g1: Verdict, run: GpuLayersRun, study: GpuLayersStudy) -> str:
    """What to set, in one or two sentences: the layer count and context that fit, or the CPU baseline."""
    if g1.verdict != NOT_TESTABLE:
        fit = (f"n_gpu_layers={run.search['best_n_gpu_layers']} (the most that fit in {run.search['vram_limit_mb']} "
               f"MiB); at that count the largest context that fits is n_ctx={run.ctx_search['best_n_ctx']}.")
        if g1.verdict == SUPPORTED:
            return f"Use {fit}"
        return (f"More layers measured {g1.label()} against {g1.details.get('baseline_layers')}: keep the fewer "
                f"layers unless a rerun decides otherwise. The limit is {fit}")
    d = g1.details
    if not d:
        return ""
    return (f"CPU baseline (n_gpu_layers=0): pp{study.n_prompt} {d['cpu_baseline_pp_ts']:.1f} t/s, tg{study.n_gen} "
            f"{d['cpu_baseline_tg_ts']:.1f} t/s, TTFT {d['cpu_baseline_ttft_ms']:.0f} ms, peak RSS "
            f"{d['cpu_baseline_rss_mb']:.0f} MiB. Setting n_gpu_layers on this build changes nothing: "
            "install a GPU build of llama-cpp-python and rerun this notebook on a machine with a GPU.")


# ---- figure ----------------------------------------------------------------------------------------------------
def _errorbar(ax, t: pd.DataFrame, x, col: str, **style) -> None:
    y = t[col].astype(float)
    ax.errorbar(x, y, yerr=[y - t[f"{col}_lo"].astype(float), t[f"{col}_hi"].astype(float) - y], **style)


def plot_gpu_layers(table: pd.DataFrame, title_note: str = ""):
    """t/s, TTFT and memory against n_gpu_layers (median and 95 % CI)."""
    setup()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    t = table[table.status == "ok"].sort_values("n_gpu_layers")
    x = t.n_gpu_layers.astype(float)
    single = len(t) <= 1
    style = dict(marker="o", capsize=3, linestyle="none" if single else "-")
    for kind in ("pp", "tg"):
        _errorbar(axes[0], t, x, f"{kind}_ts", label=f"{kind} t/s", **style)
    axes[0].set(xlabel="n_gpu_layers", ylabel="tokens/s", title="speed (median, 95 % CI)")
    axes[0].legend()
    _errorbar(axes[1], t, x, "ttft_ms", **style)
    axes[1].set(xlabel="n_gpu_layers", ylabel="ms", title="TTFT (prompt processing time)")
    axes[2].plot(x, t.rss_peak_mb.astype(float), marker="o", label="RAM: peak RSS")
    if t.vram_nvml_mb.notna().any():
        axes[2].plot(x, t.vram_nvml_mb.astype(float), marker="s", label="VRAM added (NVML)")
    if t.vram_llama_mb.notna().any():
        axes[2].plot(x, t.vram_llama_mb.astype(float), marker="^", label="device memory allocated (llama.cpp)")
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
