"""Batch size, micro-batch and flash attention: the guide's GPU advice G3 (n_batch=1024, n_ubatch=512) and
G2 (LLAMACPP_FLASH_ATTN=true), measured on whatever this machine and build can run.

Two parts, one study config (`BatchFlashStudy`):
- the n_batch x n_ubatch grid at several prompt lengths: prompt tokens/s and TTFT (G3);
- flash attention off/on at several context depths, as llama-bench's `-d`: pp and tg (G2).

TTFT here is the engine's prompt-processing time for n_prompt tokens (the `pp` test's timed region). A
server's TTFT adds the chat template, tokenization and one decode step for the first token; those do not
depend on n_batch or n_ubatch, which only change how the prompt is cut into llama_decode calls and graph
computations, so the pp time is the part these settings can move, measured without the fixed parts' noise.

Depth tests are the core engine tests at a depth (`kit.measure.pp(n, depth=d)`): the context is filled once per
test, untimed, and rolled back to the depth before every repetition, as llama-bench caches its depth state.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Sequence

from kit.sweep import planned_rows  # noqa: F401 - part of this module's API (tests, offload)
from kit.verdicts import compare, evidence_path, median_ci  # noqa: F401 - evidence_path is used by the notebooks
from kit.config import Settings, SettingsError
from kit.measure import DEFAULT_REPETITIONS, Test, pp, tg

CLAIM_BATCH = "G3"
CLAIM_FLASH = "G2"
NO_GPU_OFFLOAD = "this build has no GPU offload"


# ---- tests ------------------------------------------------------------------------------------------------------
def depth_test(mode: str, n: int, depth: int) -> Test:
    """A pp or tg test at a context depth (the depth filled once per test, rolled back before each repetition)."""
    if mode not in ("pp", "tg"):
        raise ValueError("mode must be 'pp' or 'tg'")
    return pp(n, depth=depth) if mode == "pp" else tg(n, depth=depth)


# ---- statistics shared by the tables ---------------------------------------------------------------------------
def _as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, float) and math.isnan(v):
        return []
    return list(v)


def ubatch_plan(n_prompt: int, n_batch: int, n_ubatch: int) -> tuple[int, tuple[int, ...]]:
    """(llama_decode calls, micro-batch sizes in order) for a prompt: what the settings really change."""
    calls, sizes, done = 0, [], 0
    while done < n_prompt:
        n = min(n_batch, n_prompt - done)
        calls += 1
        left = n
        while left > 0:
            sizes.append(min(n_ubatch, left))
            left -= sizes[-1]
        done += n
    return calls, tuple(sizes)


def _plan_label(sizes: tuple[int, ...]) -> str:
    out, i = [], 0
    while i < len(sizes):
        j = i
        while j < len(sizes) and sizes[j] == sizes[i]:
            j += 1
        out.append(f"{j - i}x{sizes[i]}")
        i = j
    return "+".join(out)


# ---- the study config ------------------------------------------------------------------------------------------
def _positive_ints(name: str, values, allow_zero: bool = False) -> list[int]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise SettingsError(f"{name} must be a list of integers, got {values!r}")
    values = list(values)
    if not values:
        raise SettingsError(f"{name} must not be empty")
    lo = 0 if allow_zero else 1
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise SettingsError(f"{name}: {v!r} is not an integer >= {lo}")
    if len(set(values)) != len(values):
        raise SettingsError(f"{name} has duplicates: {values}")
    return values


def _pair(name: str, value) -> tuple[int, int]:
    v = tuple(value)
    if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        raise SettingsError(f"{name} must be [n_batch, n_ubatch] (two positive integers), got {value!r}")
    return v  # type: ignore[return-value]


@dataclass
class BatchFlashStudy:
    """Configuration of notebook 20: the n_batch x n_ubatch grid (G3) and flash attention at depths (G2)."""

    model: str = "smollm2-135m"
    repetitions: int = DEFAULT_REPETITIONS
    # G3 grid
    n_batch: list = field(default_factory=lambda: [128, 256, 512, 1024])
    n_ubatch: list = field(default_factory=lambda: [128, 256, 512])
    prompt_lengths: list = field(default_factory=lambda: [256, 1024])
    batch_n_ctx: int = 0              # 0 = the longest prompt (n_batch above it is clamped by llama.cpp)
    baseline_batch: tuple = (512, 512)   # the guide's "good settings" n_batch/n_ubatch
    guide_batch: tuple = (1024, 512)     # the guide's GPU advice
    # G2 flash attention
    depths: list = field(default_factory=lambda: [0, 1024, 2048])
    fa_n_prompt: int = 128
    fa_n_gen: int = 32
    fa_n_batch: int = 512
    fa_n_ubatch: int = 512
    # held fixed in both parts
    n_threads: int | None = None
    n_threads_batch: int | None = None
    timeout_s: float = 600

    def __post_init__(self) -> None:
        self.n_batch = _positive_ints("n_batch", self.n_batch)
        self.n_ubatch = _positive_ints("n_ubatch", self.n_ubatch)
        self.prompt_lengths = _positive_ints("prompt_lengths", self.prompt_lengths)
        self.depths = _positive_ints("depths", self.depths, allow_zero=True)
        self.baseline_batch = _pair("baseline_batch", self.baseline_batch)
        self.guide_batch = _pair("guide_batch", self.guide_batch)
        for name in ("repetitions", "fa_n_prompt", "fa_n_gen", "fa_n_batch", "fa_n_ubatch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SettingsError(f"{name}={v!r} must be a positive integer")
        if isinstance(self.batch_n_ctx, bool) or not isinstance(self.batch_n_ctx, int) or self.batch_n_ctx < 0:
            raise SettingsError(f"batch_n_ctx={self.batch_n_ctx!r} must be an integer >= 0 (0 = the longest prompt)")
        if self.batch_n_ctx and self.batch_n_ctx < max(self.prompt_lengths):
            raise SettingsError(f"batch_n_ctx={self.batch_n_ctx} cannot hold the longest prompt "
                                f"({max(self.prompt_lengths)} tokens)")
        for name, pair in (("baseline_batch", self.baseline_batch), ("guide_batch", self.guide_batch)):
            if pair[0] not in self.n_batch or pair[1] not in self.n_ubatch:
                raise SettingsError(f"{name}={list(pair)} must be in the grid (n_batch {self.n_batch}, "
                                    f"n_ubatch {self.n_ubatch}) or G3 cannot be compared")
            if pair[1] > pair[0]:
                raise SettingsError(f"{name}={list(pair)}: n_ubatch > n_batch is not a valid configuration")
        if self.timeout_s <= 0:
            raise SettingsError("timeout_s must be > 0")
        # typos and bad values in the fixed settings fail here, not in the first trial
        self.batch_base()
        self.flash_base()

    # ---- G3 ---------------------------------------------------------------------------------------------------
    @property
    def batch_ctx(self) -> int:
        return self.batch_n_ctx or max(self.prompt_lengths)

    def batch_base(self) -> Settings:
        return Settings(model=self.model, n_ctx=self.batch_ctx, n_threads=self.n_threads,
                        n_threads_batch=self.n_threads_batch)

    def batch_configs(self) -> list[Settings]:
        """The grid; combinations our validation rejects (n_ubatch > n_batch) are in `.skipped`."""
        from kit.sweep import grid

        return grid(self.batch_base(), skip_invalid=True, n_batch=self.n_batch, n_ubatch=self.n_ubatch)

    def skipped_combos(self):
        import pandas as pd

        rows = [{"n_batch": c["n_batch"], "n_ubatch": c["n_ubatch"], "why": e.split(":")[0] + ": rejected "
                 "(llama.cpp would silently run n_ubatch = n_batch, a duplicate of another cell)"}
                for c, e in self.batch_configs().skipped]
        return pd.DataFrame(rows, columns=["n_batch", "n_ubatch", "why"])

    def batch_tests(self) -> list[Test]:
        return [pp(n) for n in self.prompt_lengths]

    # ---- G2 ---------------------------------------------------------------------------------------------------
    @property
    def flash_ctx(self) -> int:
        return max(self.depths) + max(self.fa_n_prompt, self.fa_n_gen)

    def flash_base(self) -> Settings:
        return Settings(model=self.model, n_ctx=self.flash_ctx, n_batch=self.fa_n_batch, n_ubatch=self.fa_n_ubatch,
                        n_threads=self.n_threads, n_threads_batch=self.n_threads_batch)

    def flash_configs(self) -> list[Settings]:
        base = self.flash_base()
        return [base.replace(flash_attn=False), base.replace(flash_attn=True)]

    def flash_tests(self) -> list[Test]:
        out = []
        for d in self.depths:
            out.append(depth_test("pp", self.fa_n_prompt, d))
            out.append(depth_test("tg", self.fa_n_gen, d))
        return out

    def to_dict(self) -> dict:
        return asdict(self)


# ---- running ---------------------------------------------------------------------------------------------------
def _run_part(study: BatchFlashStudy, out_dir, configs, tests, claim: str, part: str, progress: bool):
    from kit.sweep import run_sweep, split_out_dir

    name, root = split_out_dir(out_dir)
    df = run_sweep(name, configs, tests, study.repetitions, out_root=root, timeout_s=study.timeout_s,
                   progress=progress, extra={"claim": claim, "part": part})
    return planned_rows(df, configs, tests, study.repetitions)


def run_batch_grid(study: BatchFlashStudy, out_dir: str | os.PathLike, progress: bool = True):
    """G3: every (n_batch, n_ubatch) of the grid x every prompt length; rows of this plan as a DataFrame."""
    return _run_part(study, out_dir, study.batch_configs(), study.batch_tests(), CLAIM_BATCH, "batch_grid", progress)


def run_flash_attn(study: BatchFlashStudy, out_dir: str | os.PathLike, progress: bool = True):
    """G2: flash attention off and on, pp and tg at every depth; rows of this plan as a DataFrame."""
    return _run_part(study, out_dir, study.flash_configs(), study.flash_tests(), CLAIM_FLASH, "flash_attn", progress)


# ---- analysis: G3 ------------------------------------------------------------------------------------------------
def _ttft_ms(row) -> list[float]:
    return [ns / 1e6 for ns in _as_list(row.get("samples_ns"))]


def batch_table(df):
    """One row per prompt length x (n_batch, n_ubatch): effective values, the llama_decode/micro-batch plan,
    pp t/s and TTFT (= pp time for the prompt) as medians with 95 % bootstrap intervals, and duplicates:
    `clamped` says which value llama.cpp changed (n_batch is clamped to n_ctx), `duplicate_of` names the cell
    with the same effective settings, `same_work_as` the cell whose prompt is cut into the same decode calls and
    micro-batches (identical work at this prompt length, though the labels differ)."""
    import pandas as pd

    cols = ["n_prompt", "n_batch", "n_ubatch", "n_batch_effective", "n_ubatch_effective", "decode_calls",
            "ubatches", "status", "pp_ts", "pp_ts_lo", "pp_ts_hi", "ttft_ms", "ttft_ms_lo", "ttft_ms_hi", "cv",
            "clamped", "duplicate_of", "same_work_as", "n_samples"]
    if df is None or df.empty:
        return pd.DataFrame(columns=cols)
    out = []
    for _, r in df.iterrows():
        r = r.to_dict()
        nb_eff = r.get("n_batch_effective")
        nub_eff = r.get("n_ubatch_effective")
        ok = r.get("status") == "ok"
        nb_e = int(nb_eff) if ok and nb_eff == nb_eff and nb_eff is not None else None
        nub_e = int(nub_eff) if ok and nub_eff == nub_eff and nub_eff is not None else None
        calls, sizes = ubatch_plan(int(r["n_prompt"]), nb_e, nub_e) if nb_e and nub_e else (None, ())
        med, lo, hi = median_ci(_as_list(r.get("samples_ts"))) if ok else (None, None, None)
        tmed, tlo, thi = median_ci(_ttft_ms(r)) if ok else (None, None, None)
        out.append({"n_prompt": int(r["n_prompt"]), "n_batch": int(r["n_batch"]), "n_ubatch": int(r["n_ubatch"]),
                    "n_batch_effective": nb_e, "n_ubatch_effective": nub_e, "decode_calls": calls,
                    "ubatches": _plan_label(sizes) if sizes else None, "_sizes": sizes, "status": r.get("status"),
                    "pp_ts": med, "pp_ts_lo": lo, "pp_ts_hi": hi, "ttft_ms": tmed, "ttft_ms_lo": tlo,
                    "ttft_ms_hi": thi, "cv": r.get("cv") if ok else None,
                    "n_samples": len(_as_list(r.get("samples_ts"))) if ok else 0})
    t = pd.DataFrame(out).sort_values(["n_prompt", "n_batch", "n_ubatch"]).reset_index(drop=True)
    clamped, same = [], []
    first_eff: dict = {}
    first_plan: dict = {}
    for _, r in t.iterrows():
        label = f"{r['n_batch']}/{r['n_ubatch']}"
        if r["n_batch_effective"] is None or pd.isna(r["n_batch_effective"]):
            clamped.append(None)
            same.append(None)
            continue
        ek = (r["n_prompt"], r["n_batch_effective"], r["n_ubatch_effective"])
        pk = (r["n_prompt"], r["decode_calls"], r["_sizes"])
        clamped.append(first_eff.get(ek))
        same.append(first_plan.get(pk))
        first_eff.setdefault(ek, label)
        first_plan.setdefault(pk, label)
    t["clamped"] = [
        "; ".join(f"{name} {a}->{int(b)}" for name, a, b in (("n_batch", r.n_batch, r.n_batch_effective),
                                                             ("n_ubatch", r.n_ubatch, r.n_ubatch_effective))
                  if b == b and b is not None and int(a) != int(b)) or None
        for r in t.itertuples()]
    t["duplicate_of"] = clamped
    t["same_work_as"] = same
    return t[cols]


def _samples(df, **match) -> list[float]:
    sel = df
    for k, v in match.items():
        sel = sel[sel[k] == v]
    sel = sel[sel["status"] == "ok"]
    return [float(x) for r in sel["samples_ts"] for x in _as_list(r)]


MIN_SAMPLES = 3  # fewer timed samples per side give a degenerate bootstrap interval: no verdict from that


def _ratio(v) -> float | None:
    return v.effect if v.effect is not None else (v.details or {}).get("point_ratio")


def _fmt(verdict: str, ratio, lo, hi) -> str:
    """'x1.234 [1.100, 1.350] supported', or the point ratio marked as such when there is no interval."""
    if ratio is None:
        return verdict
    if lo is None:
        return f"x{ratio:.3f} (point estimate, no interval) {verdict}"
    return f"x{ratio:.3f} [{lo:.3f}, {hi:.3f}] {verdict}"


def _gpu_scope(gpu_offload: bool | None) -> str:
    if gpu_offload is None:
        from kit.gpu import build_supports_gpu_offload

        gpu_offload = build_supports_gpu_offload()
    if gpu_offload:
        return ""
    return (f"Measured on the CPU ({NO_GPU_OFFLOAD}); the guide gives this as GPU advice, and the GPU part of the "
            f"claim is not testable here.")


def verdict_batch(df, study: BatchFlashStudy, evidence: Sequence[str] = (), gpu_offload: bool | None = None):
    """G3: pp t/s of the guide's 1024/512 against the 512/512 baseline, at the longest prompt (where the two cut
    the prompt differently); every prompt length's comparison is kept in `details`."""
    from kit.verdicts import not_testable

    gb, gu = study.guide_batch
    bb, bu = study.baseline_batch
    table = batch_table(df)
    per_prompt, primary = [], None
    for n in sorted(study.prompt_lengths):
        cand = _samples(df, n_prompt=n, n_batch=gb, n_ubatch=gu, test_kind="pp")
        base = _samples(df, n_prompt=n, n_batch=bb, n_ubatch=bu, test_kind="pp")
        if not cand or not base:
            continue
        v = compare(CLAIM_BATCH, cand, base,
                            metric=f"pp{n} t/s ratio, n_batch/n_ubatch {gb}/{gu} over {bb}/{bu}", evidence=evidence)
        plans = table[(table.n_prompt == n) & (((table.n_batch == gb) & (table.n_ubatch == gu)) |
                                               ((table.n_batch == bb) & (table.n_ubatch == bu)))]
        same_work = plans["ubatches"].nunique() == 1 and plans["decode_calls"].nunique() == 1
        per_prompt.append({"n_prompt": n, "verdict": v.verdict, "effect": _ratio(v), "ci_low": v.ci_low,
                           "ci_high": v.ci_high, "same_work": bool(same_work), "unstable": v.unstable})
        primary = v
    if primary is None:
        return not_testable(CLAIM_BATCH, f"no successful rows for {gb}/{gu} and {bb}/{bu}: see the results' "
                                         "error column", evidence=evidence)
    scope = _gpu_scope(gpu_offload)
    n_main = per_prompt[-1]["n_prompt"]
    others = "; ".join(f"pp{p['n_prompt']}: {_fmt(p['verdict'], p['effect'], p['ci_low'], p['ci_high'])}"
                       + (" (identical work: same decode calls and micro-batches)" if p["same_work"] else "")
                       for p in per_prompt)
    shaky = " Samples unstable (CV >= 10 %): repeat on a quiet machine before acting on it." if primary.unstable else ""
    primary.summary = (f"{gb}/{gu} against {bb}/{bu} at a {n_main}-token prompt: prompt t/s "
                       f"{_fmt(primary.verdict, _ratio(primary), primary.ci_low, primary.ci_high)}. "
                       f"Per prompt length: {others}.{shaky} {scope}").strip()
    primary.reason = "; ".join(x for x in (primary.reason, scope) if x)
    primary.details = {**(primary.details or {}), "per_prompt": per_prompt, "scope": "cpu" if scope else "gpu",
                       "ttft_definition": "engine prompt-processing time for n_prompt tokens"}
    return primary


# ---- analysis: G2 ------------------------------------------------------------------------------------------------
def _mode(row) -> str:
    return "pp" if int(row.get("n_prompt") or 0) > 0 and int(row.get("n_gen") or 0) == 0 else "tg"


def flash_table(df):
    """Per depth x test (pp/tg) x flash_attn: median t/s with its 95 % interval."""
    import pandas as pd

    cols = ["test", "n_depth", "flash_attn", "status", "median_ts", "ts_lo", "ts_hi", "cv", "n_samples"]
    if df is None or df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for _, r in df.iterrows():
        r = r.to_dict()
        ok = r.get("status") == "ok"
        med, lo, hi = median_ci(_as_list(r.get("samples_ts"))) if ok else (None, None, None)
        n = int(r.get("n_prompt") or 0) or int(r.get("n_gen") or 0)
        rows.append({"test": f"{_mode(r)}{n}", "n_depth": int(r.get("n_depth") or 0),
                     "flash_attn": bool(r["flash_attn"]), "status": r.get("status"), "median_ts": med,
                     "ts_lo": lo, "ts_hi": hi, "cv": r.get("cv") if ok else None,
                     "n_samples": len(_as_list(r.get("samples_ts"))) if ok else 0})
    return pd.DataFrame(rows).sort_values(["test", "n_depth", "flash_attn"]).reset_index(drop=True)[cols]


def flash_comparisons(df, evidence: Sequence[str] = ()):
    """Flash on over off, per test and depth: a list of Verdicts (claim G2) in a stable order."""
    out = []
    if df is None or df.empty:
        return out
    d = df.assign(_mode=[_mode(r) for r in df.to_dict("records")])
    for mode in ("pp", "tg"):
        for depth in sorted(d.loc[d._mode == mode, "n_depth"].dropna().unique()):
            sel = d[(d._mode == mode) & (d.n_depth == depth)]
            on = _samples(sel, flash_attn=True)
            off = _samples(sel, flash_attn=False)
            if not on or not off:
                continue
            v = compare(CLAIM_FLASH, on, off, evidence=evidence,
                                metric=f"{mode} t/s ratio, flash_attn on / off, depth {int(depth)}")
            v.details = {**(v.details or {}), "test": mode, "n_depth": int(depth)}
            out.append(v)
    return out


def comparisons_table(verdicts):
    import pandas as pd

    return pd.DataFrame([{"test": v.details.get("test"), "n_depth": v.details.get("n_depth"), "ratio": _ratio(v),
                          "ci_low": v.ci_low, "ci_high": v.ci_high, "verdict": v.verdict, "unstable": v.unstable}
                         for v in verdicts],
                        columns=["test", "n_depth", "ratio", "ci_low", "ci_high", "verdict", "unstable"])


def verdict_flash(df, evidence: Sequence[str] = (), gpu_offload: bool | None = None):
    """G2 in one verdict: if every depth and test agrees, that verdict; otherwise the decode (tg) comparison at the
    deepest context, where attention costs most and a server spends its time, with the disagreement stated."""
    from kit.verdicts import not_testable

    comps = flash_comparisons(df, evidence)
    if not comps:
        return not_testable(CLAIM_FLASH, "no successful flash-attention rows: see the results' error column",
                            evidence=evidence)
    kinds = {v.verdict for v in comps}
    tgs = [v for v in comps if v.details["test"] == "tg"] or comps
    primary = max(tgs, key=lambda v: v.details["n_depth"])
    per = "; ".join(f"{v.details['test']} @ d{v.details['n_depth']}: {_fmt(v.verdict, _ratio(v), v.ci_low, v.ci_high)}"
                    for v in comps)
    scope = _gpu_scope(gpu_offload)
    if len(kinds) == 1:
        head = f"flash attention on/off gives the same verdict at every depth and test: {primary.verdict}."
    else:
        head = (f"mixed across depths and tests; the verdict follows decode (tg) at the deepest context "
                f"(depth {primary.details['n_depth']}): {_fmt(primary.verdict, _ratio(primary), primary.ci_low, primary.ci_high)}.")
    shaky = (" Some samples unstable (CV >= 10 %): repeat on a quiet machine before acting on it."
             if any(v.unstable for v in comps) else "")
    primary.summary = f"{head} Per test: {per}.{shaky} {scope}".strip()
    primary.metric = primary.metric + (" (all depths agree)" if len(kinds) == 1 else " (primary; mixed elsewhere)")
    primary.reason = "; ".join(x for x in (primary.reason, scope) if x)
    primary.unstable = any(v.unstable for v in comps)
    primary.details = {**primary.details, "comparisons": comparisons_table(comps).to_dict("records"),
                       "scope": "cpu" if scope else "gpu", "mixed": len(kinds) > 1}
    return primary


# ---- figures -----------------------------------------------------------------------------------------------------
def plot_batch_heatmaps(table):
    """Heatmaps of median prompt t/s and TTFT: n_ubatch (rows) x n_batch (columns), one column per prompt length.
    '=' marks a cell doing the same work as another (same decode calls and micro-batches); blank cells are
    combinations that were skipped (n_ubatch > n_batch) or failed."""
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    from kit.plots import setup

    setup()
    prompts = sorted(table.loc[table["pp_ts"].notna(), "n_prompt"].unique())
    if not prompts:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no successful grid cells: see the table's status and the rows' error column", ha="center")
        return fig
    fig, axes = plt.subplots(2, len(prompts), figsize=(4.6 * len(prompts), 7.5), squeeze=False)
    for j, n in enumerate(prompts):
        t = table[table.n_prompt == n]
        for i, (col, title, cmap) in enumerate((("pp_ts", f"pp{n}: prompt t/s (median)", "viridis"),
                                                 ("ttft_ms", f"pp{n}: TTFT ms (prompt time)", "viridis_r"))):
            piv = t.pivot_table(index="n_ubatch", columns="n_batch", values=col, aggfunc="first")
            dup = {(r.n_ubatch, r.n_batch) for r in t.itertuples() if isinstance(r.same_work_as, str)}
            annot = np.full(piv.shape, "", dtype=object)
            for a, ub in enumerate(piv.index):
                for b, nb in enumerate(piv.columns):
                    v = piv.loc[ub, nb]
                    if v == v and v is not None:
                        mark = "=" if (ub, nb) in dup else ""
                        annot[a, b] = f"{v:.0f}{mark}"
            sns.heatmap(piv.astype(float), annot=annot, fmt="", cmap=cmap, ax=axes[i][j], cbar=True,
                        linewidths=0.5, linecolor="white")
            ran = t.dropna(subset=["n_batch_effective"]).groupby("n_batch")["n_batch_effective"].max()
            axes[i][j].set_xticklabels([f"{nb}" + (f"\n(ran {int(ran[nb])})" if nb in ran and int(ran[nb]) != nb else "")
                                        for nb in piv.columns])
            axes[i][j].set_title(title)
            axes[i][j].invert_yaxis()
    fig.suptitle("n_batch x n_ubatch ('=' same work as another cell at this prompt length; blank = skipped)")
    fig.tight_layout()
    return fig


def plot_flash(df):
    """pp and tg t/s against context depth, flash attention off vs on (median, 95 % CI of the samples)."""
    import matplotlib.pyplot as plt

    from kit.plots import setup, speed_plot

    setup()
    d = df[df.status == "ok"].copy()
    d["mode"] = [_mode(r) for r in d.to_dict("records")]
    d["flash_attn"] = d["flash_attn"].map({True: "on", False: "off"})
    modes = [m for m in ("pp", "tg") if (d["mode"] == m).any()]
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(6 * max(len(modes), 1), 4), squeeze=False)
    for ax, m in zip(axes[0], modes):
        speed_plot(d[d["mode"] == m], x="n_depth", hue="flash_attn", ax=ax,
                   title=f"{m}: t/s against context depth", ylabel=f"{m} tokens/s")
        ax.set_xlabel("context depth (tokens already in the KV cache)")
    fig.tight_layout()
    return fig
