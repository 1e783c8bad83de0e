"""Notebook 00: the machine, the build, the model card, and the decode roofline against a measured tg.

- `EnvironmentStudy`: the config (a quick pp + tg measurement; the RAM bandwidth buffer).
- `run_environment_report(study)`: captures the environment fresh, writes environment.json and model_card.json
  under the study's out_dir, measures pp/tg once (kit.sweep, a child process), and adds the decode roofline
  (read bandwidth / weight bytes per token) to environment.json.
- `EnvironmentReport.summary_table()` / `.card_table()`, `roofline_statement(report)`, `plot_roofline(report)`:
  what the notebook shows. No claim verdicts.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import matplotlib.pyplot as plt
import pandas as pd

from kit.config import Settings, StudyConfig, check_rule, param
from kit.environment import capture_environment, decode_roofline, memory_bandwidth_gbs
from kit.measure import Test, pp, tg
from kit.models import model_card, resolve_model
from kit.paths import DEFAULT_MODEL
from kit.plots import setup
from kit.results import median_table
from kit.search import offload_statement, offload_support
from kit.sweep import planned_rows, run_sweep

CARD_FIELDS = ("name", "architecture", "model_type", "file_type", "n_layers", "n_ctx_train", "rope_freq_base",
               "n_embd", "n_head", "n_head_kv", "head_dim", "n_vocab", "size_bytes", "n_params", "bits_per_weight",
               "read_per_token_bytes", "tied_embeddings", "layer_bytes_mean", "has_chat_template", "chat_markers",
               "sha256")
ROOFLINE_NOTE = ("bound = read bandwidth / weight bytes per token; KV-cache reads (small at short context) and "
                 "compute are ignored; the bandwidth is one thread's, as is llama-cpp-python's default tg thread "
                 "count on 2 cores (cpu_count // 2)")


@dataclass
class EnvironmentStudy(StudyConfig):
    """Configuration of notebook 00: a quick pp + tg measurement to set against the decode roofline."""

    out_dir: str = param("outputs/00_environment", "where environment.json, model_card.json, rows and figures go")
    n_prompt: int = param(512, "prompt length of the pp test", ge=1)
    n_gen: int = param(128, "tokens generated in the tg test", ge=1)
    n_ctx: int = param(1024, "context size for the measurement", ge=1)
    bandwidth_mb: int = param(256, "buffer for the RAM bandwidth measurement (MiB, far above any CPU cache)", ge=1)
    timeout_s: float = param(600.0, "seconds before a measurement's child process is killed", gt=0)

    def check(self) -> None:
        need = max(self.n_prompt, self.n_gen)
        check_rule(need <= self.n_ctx, f"n_ctx={self.n_ctx} is smaller than the pp or tg test ({need} tokens)")

    def settings(self) -> Settings:
        return Settings(model=self.model, n_ctx=self.n_ctx)

    def tests(self) -> list[Test]:
        return [pp(self.n_prompt), tg(self.n_gen)]


def weights_read_per_token(model: str = DEFAULT_MODEL) -> dict:
    """Bytes of weights a dense decode step reads: every tensor once, except the token embedding when a separate
    output matrix exists (then only one embedding row is read). Tied embeddings are read in full (as output)."""
    reader = gguf.GGUFReader(str(resolve_model(model)), "r")
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


def ci_text(ci) -> str:
    lo, hi = ci if ci else (None, None)
    return "no interval: one sample" if lo is None else f"95 % CI {lo:.1f}-{hi:.1f}"


@dataclass
class EnvironmentReport:
    environment: dict
    card: dict
    roofline: dict
    rows: Any
    support: dict
    out_path: Path

    def summary_table(self) -> pd.DataFrame:
        e, c, r = self.environment, self.card, self.roofline
        tg_text = (f"{r['tg_measured_ts']:.1f} t/s ({ci_text(r['tg_ci'])}), "
                   f"{r['tg_fraction_of_bound'] * 100:.0f} % of the bound" if r.get("tg_measured_ts") else "failed")
        items = [
            ("CPU", f"{e.get('cpu_info')} ({e.get('cpu_physical_cores')} physical / {e.get('cpu_logical_cores')} "
                    f"logical cores, {e.get('cpu_affinity')} usable)"),
            ("RAM", f"{e.get('ram_total_mb')} MiB total, {e.get('ram_available_mb')} MiB available"),
            ("NUMA nodes", len(e.get("numa_nodes") or []) or 1),
            ("OS / Python", f"{e.get('os')} / Python {e.get('python')}"),
            ("llama-cpp-python", e.get("llama_cpp_python")),
            ("GPU offload", offload_statement(self.support)),
            ("GPUs (NVML)", ", ".join(g.get("name", "?") for g in e.get("gpus") or []) or "none"),
            ("devices (llama.cpp)", ", ".join(
                f"{d['name']}: {d['description']} ({d['free_mb']:.0f} of {d['total_mb']:.0f} MiB free)"
                + (" [software device]" if d.get("software") else "")
                for d in e.get("devices") or [] if d.get("name")) or "none besides the CPU"),
            ("model", f"{c['name']} ({c['model_type']}), {c['n_layers']} layers, n_ctx_train {c['n_ctx_train']}, "
                      f"rope_freq_base {c['rope_freq_base']}"),
            ("model file", f"{c['file_name']}, {c['size_bytes'] / 2**20:.1f} MiB, {c['bits_per_weight']:.2f} bits/weight"),
            ("weights read per token", f"{r['read_per_token_bytes'] / 2**20:.1f} MiB"
                                       f"{' (tied embeddings: output reads token_embd)' if r['tied_embeddings'] else ''}"),
            ("RAM read bandwidth", f"{r['mem_read_gbs']} GB/s (one thread, numpy sum of {r['buffer_mb']} MiB)"),
            ("decode roofline", f"{r['tg_upper_bound_ts']:.1f} t/s upper bound"),
            ("measured tg", tg_text),
            ("measured pp", f"{r['pp_measured_ts']:.1f} t/s" if r.get("pp_measured_ts") else "failed"),
        ]
        return pd.DataFrame(items, columns=["item", "value"])

    def card_table(self) -> pd.DataFrame:
        """The model card's main fields (GGUF metadata plus the weight bytes read per token), one per row."""
        return pd.Series({k: self.card.get(k) for k in CARD_FIELDS}, name="model card").to_frame()


# ---- running ---------------------------------------------------------------------------------------------------
def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


def _capture(study: EnvironmentStudy, out: Path, nvml: Any) -> tuple[dict, dict, dict]:
    """Environment (fresh, with the bandwidth), offload support and the model card; both JSON files written."""
    env = capture_environment(bandwidth=False)
    env.update(memory_bandwidth_gbs(size_mb=study.bandwidth_mb))
    support = offload_support(nvml)
    env["gpu_offload_statement"] = offload_statement(support)
    # written before the sweep so the rows' provenance and this report cite the same capture
    _write_json(out / "environment.json", env)
    card = model_card(study.model).to_dict()
    card.update(weights_read_per_token(study.model))
    _write_json(out / "model_card.json", card)
    return env, support, card


def _measure(study: EnvironmentStudy, out: Path, progress: bool):
    configs, tests = [study.settings()], study.tests()
    df = run_sweep(out.name, configs, tests, study.repetitions, out_root=out.parent, timeout_s=study.timeout_s,
                   progress=progress, extra={"part": "environment"})
    return planned_rows(df, configs, tests, study.repetitions)


def _roofline(study: EnvironmentStudy, env: dict, card: dict, df) -> dict:
    """The decode bound from the read bandwidth against the measured tg (median, 95 % CI) and pp."""
    ok = df[df.status == "ok"] if df is not None and not df.empty else pd.DataFrame()
    speeds = median_table(ok, "test_kind", "samples_ts").set_index("test_kind") if not ok.empty else pd.DataFrame()

    def speed(kind: str) -> tuple:
        if kind not in speeds.index:
            return None, None, None
        r = speeds.loc[kind]
        return tuple(None if pd.isna(r[c]) else float(r[c]) for c in ("samples_ts", "samples_ts_lo", "samples_ts_hi"))

    (tg_med, tg_lo, tg_hi), (pp_med, _, _) = speed("tg"), speed("pp")
    bound = decode_roofline(card["read_per_token_bytes"], env["mem_read_gbs"])
    threads = int(ok["n_threads_effective"].iloc[0]) if not ok.empty and "n_threads_effective" in ok else None
    return {"mem_read_gbs": env["mem_read_gbs"], "mem_copy_gbs": env.get("mem_copy_gbs"),
            "buffer_mb": study.bandwidth_mb, "read_per_token_bytes": card["read_per_token_bytes"],
            "tied_embeddings": card["tied_embeddings"], "tg_upper_bound_ts": round(bound, 2),
            "tg_measured_ts": tg_med, "tg_ci": [tg_lo, tg_hi], "pp_measured_ts": pp_med,
            "tg_fraction_of_bound": round(tg_med / bound, 4) if tg_med else None,
            "n_threads_tg": threads, "n_gen": study.n_gen, "note": ROOFLINE_NOTE}


def run_environment_report(study: EnvironmentStudy, progress: bool = True, nvml: Any = None) -> EnvironmentReport:
    """Capture the environment fresh, write environment.json and model_card.json under the study's out_dir,
    measure pp/tg once (kit.sweep), and add the decode roofline (read bandwidth / weight bytes per token) to
    environment.json."""
    out = study.out_path
    out.mkdir(parents=True, exist_ok=True)
    env, support, card = _capture(study, out, nvml)
    df = _measure(study, out, progress)
    roof = _roofline(study, env, card, df)
    env["decode_roofline"] = roof
    _write_json(out / "environment.json", env)
    return EnvironmentReport(env, card, roof, df, support, out)


# ---- what the notebook says and shows --------------------------------------------------------------------------
def roofline_statement(report: EnvironmentReport) -> str:
    """The bound, the measured tg against it, and how to read the fraction."""
    r = report.roofline
    text = (f"Weights read per generated token: {r['read_per_token_bytes'] / 2**20:.1f} MiB; RAM read bandwidth "
            f"{r['mem_read_gbs']} GB/s (one thread) -> decode cannot exceed {r['tg_upper_bound_ts']:.1f} t/s "
            f"on one thread reading from RAM.")
    if r["tg_measured_ts"]:
        text += (f"\nMeasured tg{r['n_gen']}: {r['tg_measured_ts']:.1f} t/s ({ci_text(r['tg_ci'])}) "
                 f"with {r['n_threads_tg']} generation thread(s) = {r['tg_fraction_of_bound'] * 100:.0f} % of the "
                 "bound. Near 100 %: decode is memory-bound here and only fewer bytes per token (a smaller "
                 "quantization) or more bandwidth speed it up; far below: compute, threading or overheads limit it. "
                 "Above 100 %: part of the model is served from CPU caches or several threads read in parallel, so "
                 "the one-thread bound is loose.")
    return text


def plot_roofline(report: EnvironmentReport):
    """The decode upper bound from memory bandwidth beside the measured tg (median, 95 % CI)."""
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
