"""Profiling one request (claim P2): where the time of a streamed chat completion goes, and what cProfile can see.

cProfile records Python function calls and calls of C *builtins*; a ctypes foreign function (every llama.cpp
call llama-cpp-python makes: `llama_decode`, `llama_sampler_sample`, `llama_token_to_piece`, ...) is neither,
so its time appears as *self time* of the Python function that made the call (for decoding,
`llama_cpp/_internals.py:decode`) and never under its own name. Inside the native call (matrix products,
attention, the thread pool) cProfile sees nothing at all.

This module profiles one request three ways, on the same prompt and seed (so the same tokens are generated):
1. without a profiler (the wall time the profiler must be judged against),
2. with plain cProfile, as the guide suggests (top 20 by cumulative time),
3. with cProfile and every llama.cpp ctypes function wrapped in a thin Python function named after it
   (`expose_native_calls`), so each native call is an entry of its own and the split between llama.cpp and
   Python can be read straight off the profile.
The llama-bench-style engine speed (`kit.measure.bench_engine`, test tg) runs in the same trial, in the same
process, so the gap between engine speed and end-to-end speed is measured on one model load.
"""
from __future__ import annotations

import contextlib
import cProfile
import ctypes
import os
import pstats
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import llama_cpp
import llama_cpp.llama_cpp as low
import pandas as pd

from kit.config import SAMPLING_KEYS, ChatStudyConfig, Settings, SettingsError, check_rule, param
from kit.data import load_prompts
from kit.measure import Test, requests_row, stream_chat, tg
from kit.paths import REPO_ROOT
from kit.results import load_results
from kit.sweep import run_sweep, split_out_dir
from kit.verdicts import bootstrap_ratio, compare, not_testable, too_few

PROFILE_KIND = "kit.studies.profiling:profile_test"
NATIVE_FILE = "<llama.cpp native>"
PLAIN_PROF = "request.prof"
NATIVE_PROF = "request_native.prof"
TIMED_REGION = ("one streamed chat completion from a fresh prompt cache (kit.measure.stream_chat), three times per "
                "repetition on the same prompt and seed: unprofiled, under cProfile, under cProfile with llama.cpp's "
                "ctypes functions exposed as named entries")
# Native function name prefix -> category. The first match wins.
NATIVE_GROUPS = (
    ("llama_decode", "llama.cpp: llama_decode"),
    ("llama_sampler_", "llama.cpp: sampling"),
    ("llama_tokenize", "llama.cpp: tokenize"),
    ("llama_token_to_piece", "llama.cpp: detokenize"),
    ("llama_detokenize", "llama.cpp: detokenize"),
)
CATEGORY_ORDER = ("llama.cpp: llama_decode", "llama.cpp: sampling", "llama.cpp: tokenize", "llama.cpp: detokenize",
                  "llama.cpp: other native calls", "llama_cpp: _internals.py (self time; hides native calls)",
                  "llama_cpp: Python (generate loop, chat format, tokenizer)", "jinja2: chat template",
                  "numpy", "kit", "other Python and builtins")
KIT_DIR = REPO_ROOT / "kit"
# P2 needs a profile that accounts for the request: below this share of its wall time, the split is not checkable
MIN_PROFILE_COVERAGE = 0.9


# ---- making native calls visible ---------------------------------------------------------------------------------
def _native_namespaces() -> list:
    return [low, llama_cpp]


def _wrap(fn, name: str):
    def call(*args):
        return fn(*args)

    # one profile entry per native function: (NATIVE_FILE, 0, name)
    call.__code__ = call.__code__.replace(co_name=name, co_qualname=name, co_filename=NATIVE_FILE, co_firstlineno=1)
    call.__name__ = call.__qualname__ = name
    call.__wrapped_native__ = fn
    return call


@contextlib.contextmanager
def expose_native_calls():
    """Within the block, every llama.cpp ctypes function is called through a Python function of the same name.

    llama-cpp-python looks its native functions up as module attributes at call time (`llama_cpp.llama_decode`),
    so replacing the attributes reaches every call site. The cost is one extra Python call per native call
    (measured: compare the profiled wall times with and without it). Restored on exit.
    """
    patched = []
    try:
        for ns in _native_namespaces():
            for name, obj in list(vars(ns).items()):
                if name.startswith("llama_") and isinstance(obj, ctypes._CFuncPtr):
                    setattr(ns, name, _wrap(obj, name))
                    patched.append((ns, name, obj))
        yield len(patched)
    finally:
        for ns, name, obj in reversed(patched):
            setattr(ns, name, obj)


# ---- reading a profile ---------------------------------------------------------------------------------------------
def short_name(key: tuple) -> str:
    """pstats key (file, line, function) -> 'llama_cpp/llama.py:854(generate)', no machine-specific prefix."""
    file, line, func = key
    if file == NATIVE_FILE:
        return f"[native] {func}"
    if file == "~":
        return func
    p = file.replace(os.sep, "/")
    for marker in ("site-packages/", "dist-packages/"):
        if marker in p:
            p = p.split(marker, 1)[1]
            break
    else:
        root = str(REPO_ROOT).replace(os.sep, "/") + "/"
        if p.startswith(root):
            p = p[len(root):]
        elif "/lib/python" in p:
            p = "stdlib/" + p.split("/lib/python", 1)[1].split("/", 1)[-1]
    return f"{p}:{line}({func})"


def categorize(key: tuple) -> str:
    file, _, func = key
    if file == NATIVE_FILE:
        for prefix, cat in NATIVE_GROUPS:
            if func.startswith(prefix):
                return cat
        return "llama.cpp: other native calls"
    p = file.replace(os.sep, "/")
    if "/llama_cpp/_internals.py" in p:
        return "llama_cpp: _internals.py (self time; hides native calls)"
    if "/llama_cpp/" in p:
        return "llama_cpp: Python (generate loop, chat format, tokenizer)"
    if "/jinja2/" in p:
        return "jinja2: chat template"
    if "/numpy/" in p or "numpy" in func:
        return "numpy"
    if p.endswith(".py") and Path(file).resolve().is_relative_to(KIT_DIR):
        return "kit"
    return "other Python and builtins"


def breakdown(stats: pstats.Stats) -> dict[str, float]:
    """Self time (tottime, ms) summed per category: the categories partition the profile's total time."""
    out = dict.fromkeys(CATEGORY_ORDER, 0.0)
    for key, (_, _, tt, _, _) in stats.stats.items():
        out[categorize(key)] += tt * 1e3
    return {k: round(v, 3) for k, v in out.items()}


def self_time_ms(stats: pstats.Stats, file_suffix: str, func: str) -> float | None:
    """Self time of one function (e.g. ('llama_cpp/_internals.py', 'decode')), ms; None if it never ran."""
    total, found = 0.0, False
    for (file, _, name), (_, _, tt, _, _) in stats.stats.items():
        if name == func and file.replace(os.sep, "/").endswith(file_suffix):
            total += tt
            found = True
    return round(total * 1e3, 3) if found else None


def top_functions(stats: pstats.Stats | str | os.PathLike, n: int = 20, sort: str = "cumulative"):
    """The top n entries by cumulative (or 'tottime') time as a DataFrame, with each entry's category."""
    st = stats if isinstance(stats, pstats.Stats) else pstats.Stats(str(stats))
    total = st.total_tt or 1.0
    rows = []
    for key, (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"function": short_name(key), "category": categorize(key), "ncalls": nc, "primitive_calls": cc,
                     "tottime_s": round(tt, 6), "cumtime_s": round(ct, 6), "percall_cum_ms": round(ct / nc * 1e3, 4)
                     if nc else None, "cum_share": round(ct / total, 4), "self_share": round(tt / total, 4)})
    col = {"cumulative": "cumtime_s", "tottime": "tottime_s"}[sort]
    df = pd.DataFrame(rows).sort_values([col, "ncalls"], ascending=[False, True]).head(n).reset_index(drop=True)
    df.index = df.index + 1
    return df


# ---- the sweep test kind ---------------------------------------------------------------------------------------
def _profiled(lm, prompt: str, sampling: dict, native: bool) -> tuple[dict, pstats.Stats]:
    prof = cProfile.Profile()
    with expose_native_calls() if native else contextlib.nullcontext():
        prof.enable()
        try:
            out = stream_chat(lm, prompt, **sampling)
        finally:
            prof.disable()
    return out, pstats.Stats(prof)


def profile_test(lm, test: Test, repetitions: int) -> dict:
    """Profile one request `repetitions` times (unprofiled / cProfile / cProfile with native calls exposed).

    test.params: prompt, prompt_id, prof_dir (where request.prof and request_native.prof of the first
    repetition go), and sampling overrides (SAMPLING_KEYS). Same seed every time: the same tokens each run.
    """
    p = dict(test.params)
    prompt, prompt_id = p.pop("prompt"), p.pop("prompt_id", "")
    prof_dir = Path(p.pop("prof_dir"))
    unknown = set(p) - set(SAMPLING_KEYS)
    if unknown:
        raise SettingsError(f"profile_test: unknown params {sorted(unknown)}")
    s = lm.settings.replace(**p)
    sampling = {k: getattr(s, k) for k in SAMPLING_KEYS}
    sampling["seed"] = s.seed
    stream_chat(lm, prompt, **sampling)  # warm-up: the same request, untimed
    runs, plains = [], []
    for r in range(repetitions):
        # the three variants in a rotating order, so drift on a shared machine does not favour one of them
        done: dict = {}
        for variant in ("plain", "cprofile", "native")[r % 3:] + ("plain", "cprofile", "native")[:r % 3]:
            if variant == "plain":
                done[variant] = (stream_chat(lm, prompt, **sampling), None)
            else:
                done[variant] = _profiled(lm, prompt, sampling, native=variant == "native")
        plain, (prof_out, prof_stats), (nat_out, nat_stats) = done["plain"][0], done["cprofile"], done["native"]
        if r == 0:
            prof_dir.mkdir(parents=True, exist_ok=True)
            prof_stats.dump_stats(str(prof_dir / PLAIN_PROF))
            nat_stats.dump_stats(str(prof_dir / NATIVE_PROF))
        runs.append(_run_record(plain, prof_out, prof_stats, nat_out, nat_stats))
        plains.append(plain)
    return _profile_row(runs, plains, prompt_id, sampling, repetitions, prof_dir)


def _run_record(plain, prof_out, prof_stats, nat_out, nat_stats) -> dict:
    """One repetition: the three variants' wall times and what each profile says (the unprofiled request's
    timings become row columns in _profile_row, through kit.measure.requests_row)."""
    nat = breakdown(nat_stats)
    engine_ms = lambda o: o["engine_pp_ms"] + o["engine_tg_ms"]  # noqa: E731 - llama.cpp's own decode timer
    return {
        "n_gen_tokens": plain["n_gen_tokens"],
        "n_prompt_tokens": plain["n_prompt_tokens"],
        "same_tokens": plain["n_gen_tokens"] == prof_out["n_gen_tokens"] == nat_out["n_gen_tokens"],
        "wall_ms": round(plain["e2e_ms"], 3),
        "wall_cprofile_ms": round(prof_out["e2e_ms"], 3),
        "wall_native_ms": round(nat_out["e2e_ms"], 3),
        "engine_pp_ms": round(plain["engine_pp_ms"], 3),
        "engine_tg_ms": round(plain["engine_tg_ms"], 3),
        # plain cProfile: the profile's total, and the self time of the wrapper that calls llama_decode
        "cprofile_total_ms": round(prof_stats.total_tt * 1e3, 3),
        "cprofile_decode_self_ms": self_time_ms(prof_stats, "llama_cpp/_internals.py", "decode"),
        "cprofile_engine_ms": round(engine_ms(prof_out), 3),
        "cprofile_n_functions": len(prof_stats.stats),
        # exposed native calls
        "native_total_ms": round(nat_stats.total_tt * 1e3, 3),
        "native_engine_ms": round(engine_ms(nat_out), 3),
        "native_engine_pp_ms": round(nat_out["engine_pp_ms"], 3),
        "native_breakdown_ms": nat,
        "native_calls": sum(v[1] for k, v in nat_stats.stats.items() if k[0] == NATIVE_FILE),
    }


def _profile_row(runs: list[dict], plains: list[dict], prompt_id: str, sampling: dict, repetitions: int,
                 prof_dir: Path) -> dict:
    """The row: kit.measure.requests_row of the unprofiled requests (tokens/s = 1000 / mean ITL), then the
    profiles' medians over the repetitions."""
    med = lambda xs: round(statistics.median(xs), 4) if xs else None  # noqa: E731
    cats = list(CATEGORY_ORDER)
    bd = {c: med([r["native_breakdown_ms"][c] for r in runs]) for c in cats}
    total = med([r["native_total_ms"] for r in runs])
    return {
        "label": f"profile {prompt_id}",
        "prompt_id": prompt_id,
        **sampling,
        **requests_row(plains, speed="decode"),
        "n_gen": sampling.get("max_tokens") or 0,
        "n_depth": 0,
        "repetitions": repetitions,
        "n_gen_tokens": runs[0]["n_gen_tokens"] if runs else None,
        "samples_wall_ms": [r["wall_ms"] for r in runs],
        "samples_wall_cprofile_ms": [r["wall_cprofile_ms"] for r in runs],
        "samples_wall_native_ms": [r["wall_native_ms"] for r in runs],
        "samples_cprofile_decode_self_ms": [r["cprofile_decode_self_ms"] for r in runs],
        "samples_cprofile_engine_ms": [r["cprofile_engine_ms"] for r in runs],
        "samples_cprofile_decode_ratio": [round(r["cprofile_decode_self_ms"] / r["cprofile_engine_ms"], 5)
                                          for r in runs if r["cprofile_decode_self_ms"] and r["cprofile_engine_ms"]],
        "native_engine_pp_ms": med([r["native_engine_pp_ms"] for r in runs]),
        "samples_cprofile_coverage": [round(r["cprofile_total_ms"] / r["wall_cprofile_ms"], 4) for r in runs],
        "native_breakdown_ms": bd,
        "native_breakdown_share": {c: round(v / total, 4) if total else None for c, v in bd.items()},
        "native_total_ms": total,
        "runs": runs,
        "all_same_tokens": all(r["same_tokens"] for r in runs),
        "prof_files": [str(prof_dir / PLAIN_PROF), str(prof_dir / NATIVE_PROF)],
        "timed_region": TIMED_REGION,
    }


# ---- the study --------------------------------------------------------------------------------------------------
@dataclass
class ProfilingStudy(ChatStudyConfig):
    """Parameters of notebooks/80_profiling, validated before anything runs."""

    prompt_index: int = param(0, "which prompt of the prompt set to profile (0-based)", ge=0)
    max_tokens: int = param(64, "tokens to generate (and the engine tg test's length)", ge=2)
    temperature: float = param(0.8, "sampling temperature of the profiled request (llama-cpp-python's default)", ge=0)
    repetitions: int = param(5, "profiled requests per variant; the engine test's repetitions too", ge=1)
    top_n: int = param(20, "rows of the top table (by cumulative time)", ge=1)
    chat_format: str | None = param(None, "llama-cpp-python chat format (None: the GGUF's template, or one chosen "
                                          "from the vocabulary when it has none)")
    timeout_s: float = param(900.0, "wall-clock limit of the trial (child process), seconds", gt=0)
    out_dir: str = param("outputs/80_profiling", "rows, .prof files, CSV, figures and verdicts.json go here")

    def check(self) -> None:
        n_file = len(load_prompts(self.prompts_file))
        check_rule(self.prompt_index < n_file, f"prompt_index={self.prompt_index} must be 0..{n_file - 1}")
        check_rule(self.max_tokens < self.n_ctx, f"max_tokens={self.max_tokens} must be < n_ctx={self.n_ctx}")
        self.settings()

    def settings(self) -> Settings:
        return Settings(model=self.model, n_ctx=self.n_ctx, n_threads=self.n_threads, temperature=self.temperature,
                        max_tokens=self.max_tokens, chat_format=self.chat_format)

    def prompt(self) -> dict:
        return load_prompts(self.prompts_file)[self.prompt_index]

    def tests(self) -> list[Test]:
        p = self.prompt()
        return [tg(self.max_tokens),
                Test(PROFILE_KIND, n_gen=self.max_tokens,
                     params={"prompt": p["prompt"], "prompt_id": p["id"], "prof_dir": str(self.out_path)})]


def run_profiling_study(study: ProfilingStudy, progress: bool = True):
    """One trial: llama-bench-style tg, then the profiled request; writes the top-n CSV. Returns all rows."""
    name, root = split_out_dir(study.out_path)
    run_sweep(name, study.settings(), study.tests(), repetitions=study.repetitions, out_root=root,
              timeout_s=study.timeout_s, progress=progress, extra={"claim": "P2"})
    df = load_results(study.out_path)
    out = study.out_path
    if (out / PLAIN_PROF).exists():
        top_functions(out / PLAIN_PROF, study.top_n).to_csv(out / f"top{study.top_n}_cumulative.csv",
                                                            index_label="rank")
        top_functions(out / NATIVE_PROF, study.top_n, sort="tottime").to_csv(
            out / f"top{study.top_n}_native_tottime.csv", index_label="rank")
    return df


# ---- analysis ---------------------------------------------------------------------------------------------------------
def _ok(df, kind: str):
    m = df[(df["status"] == "ok") & (df["test_kind"] == kind)]
    return None if m.empty else m.iloc[-1]


def split_table(df):
    """Where one request's time goes (cProfile with native calls exposed): ms, share, and ms per generated token."""
    row = _ok(df, PROFILE_KIND)
    if row is None:
        return pd.DataFrame()
    n = row["n_gen_tokens"] or 1
    total = row["native_total_ms"] or 1.0
    out = []
    for c, ms in row["native_breakdown_ms"].items():
        if not ms:
            continue
        if c == "llama.cpp: llama_decode":
            # llama.cpp's own prompt timer splits the one entry into prompt processing and generation
            pp = min(row.get("native_engine_pp_ms") or 0.0, ms)
            out.append({"category": "llama.cpp: llama_decode, prompt processing", "ms": round(pp, 3),
                        "share": round(pp / total, 4), "ms_per_token": None})
            c, ms = "llama.cpp: llama_decode, generation", round(ms - pp, 3)
        out.append({"category": c, "ms": ms, "share": round(ms / total, 4), "ms_per_token": round(ms / n, 4)})
    return pd.DataFrame(out).sort_values("ms", ascending=False).reset_index(drop=True)


def gap_table(df):
    """Engine speed (llama-bench tg) against end-to-end speed, in ms per generated token, and what fills the gap."""
    eng, row = _ok(df, "tg"), _ok(df, PROFILE_KIND)
    if eng is None or row is None:
        return pd.DataFrame()
    n = row["n_gen_tokens"] or 1
    bd = row["native_breakdown_ms"]
    per_tok = lambda c: round(bd[c] / n, 4)  # noqa: E731
    python = sum(v for c, v in bd.items() if not c.startswith("llama.cpp"))
    lines = [
        ("engine: llama-bench tg (random tokens, 1-token decodes, depth 0)", round(1e3 / eng["median_ts"], 4),
         f"{eng['median_ts']:.1f} t/s"),
        ("engine: llama_decode per token inside the request (llama.cpp timer)", row["engine_decode_ms_per_token"], ""),
        ("end to end: mean inter-token latency (unprofiled)", row["decode_ms_per_token"], f"{row['median_ts']:.1f} t/s"),
        ("  of which, from the profile: llama_decode (prompt processing excluded)",
         round((bd["llama.cpp: llama_decode"] - (row["native_engine_pp_ms"] or 0)) / n, 4),
         "profile's llama_decode minus llama.cpp's prompt time, / tokens"),
        ("  sampling (llama_sampler_* in llama.cpp)", per_tok("llama.cpp: sampling"), ""),
        ("  detokenize (llama_token_to_piece)", per_tok("llama.cpp: detokenize"), ""),
        ("  other llama.cpp calls", per_tok("llama.cpp: other native calls"), ""),
        ("  Python: llama_cpp, kit, jinja2, numpy, other", round(python / n, 4), ""),
    ]
    return pd.DataFrame(lines, columns=["what", "ms_per_token", "note"])


def p2_verdict(df, evidence: Sequence[str] = (), equivalence: float | None = None):
    """P2: does plain cProfile attribute the request's time, and does it find llama.cpp's share?

    The test: plain cProfile's self time of llama_cpp's `LlamaContext.decode` (the Python wrapper around the
    ctypes call `llama_decode`) against llama.cpp's own decode timer (llama_perf_context) in the same request.
    kit.verdicts.compare, claimed "same", with P2's stated band (kit.verdicts.BANDS: +-10 %, cProfile's own overhead
    is of that order; `equivalence` overrides it): supported when the ratio's 95 % interval lies inside the band,
    refuted when it lies wholly outside, otherwise inconclusive (with about how many repetitions would decide it).
    The test needs a profile that accounts for the request: when plain cProfile covers less than
    MIN_PROFILE_COVERAGE of the wall time, it is not testable here.
    The summary states what cProfile cannot see.
    """
    row = _ok(df, PROFILE_KIND)
    if row is None:
        return not_testable("P2", "no successful profile row", evidence=evidence)
    ratios = row.get("samples_cprofile_decode_ratio") or []
    if not ratios:
        return not_testable("P2", "the plain profile has no llama_cpp/_internals.py:decode entry: this llama-cpp-python "
                                  "version calls llama_decode from elsewhere", evidence=evidence)
    short = too_few("P2", len(ratios), len(ratios), "repetitions", evidence)
    if short:
        return short
    cov = statistics.median(row["samples_cprofile_coverage"])
    if cov < MIN_PROFILE_COVERAGE:
        return not_testable("P2", f"plain cProfile accounts for only {cov:.0%} of the request's wall time (less "
                                  f"than {MIN_PROFILE_COVERAGE:.0%}): its split of the request cannot be checked",
                            evidence=evidence, profile_coverage_of_wall=round(cov, 4))
    # paired: one ratio per profiled request, against 1 (the two clocks agree)
    v = compare("P2", ratios, [1.0] * len(ratios), claimed="same", equivalence=equivalence,
                metric="per request: cProfile self time of llama_cpp _internals.decode / llama.cpp's own decode timer",
                evidence=evidence)
    ovh, o_lo, o_hi = bootstrap_ratio(row["samples_wall_cprofile_ms"], row["samples_wall_ms"])
    nat, n_lo, n_hi = bootstrap_ratio(row["samples_wall_native_ms"], row["samples_wall_ms"])
    share = row["native_breakdown_share"]
    llama_share = sum(x for c, x in share.items() if c.startswith("llama.cpp") and x)
    dec_share = share.get("llama.cpp: llama_decode") or 0
    v.details = {"profile_coverage_of_wall": round(cov, 4), "cprofile_overhead": round(ovh, 4),
                 "cprofile_overhead_ci": [round(o_lo, 4), round(o_hi, 4)], "native_exposed_overhead": round(nat, 4),
                 "native_exposed_overhead_ci": [round(n_lo, 4), round(n_hi, 4)],
                 "llama_cpp_native_share": round(llama_share, 4), "llama_decode_share": round(dec_share, 4),
                 "equivalence": v.band}
    v.summary = (
        f"Plain cProfile accounts for {cov:.0%} of the request's wall time and puts {v.effect:.3f}x llama.cpp's own "
        f"decode time (95 % CI {v.ci_low:.3f}-{v.ci_high:.3f}) on the self time of llama_cpp's Python "
        f"`_internals.decode`: {v.verdict} as a tool to split the time (the claim holds when the two "
        f"clocks agree within +-{v.band:.0%})"
        + (f"; about {v.samples_to_decide} profiled requests (repetitions) would decide it" if v.samples_to_decide
           else "")
        + ". Its limit: a ctypes call is no entry of "
        f"its own, so llama_decode shows up only as a wrapper's self time, and what happens inside it (matmuls, "
        f"attention, threads) is invisible; use llama.cpp's perf counters or llama-bench for that. With the native "
        f"calls exposed, llama.cpp takes {llama_share:.0%} of the request (llama_decode {dec_share:.0%}) and Python "
        f"the rest; the profiler slows the request {ovh:.2f}x ({o_lo:.2f}-{o_hi:.2f}), {nat:.2f}x with native "
        f"calls exposed."
    )
    return v


def plot_split(df):
    """Left: the request's time by category (native calls exposed). Right: ms per token, engine vs end to end."""
    # not at the top: a trial child imports this module for profile_test and must not load matplotlib
    from kit.plots import median_plot, panel_figure  # (start-up time and RSS are measured there, and profiled)

    split, gap = split_table(df), gap_table(df)

    def shares(ax):
        if not split.empty:  # one value per category, a median over the repetitions already
            median_plot(split, x="share", y="category", ax=ax, kind="bar", color="C0")
            for i, (ms, sh) in enumerate(zip(split["ms"], split["share"])):
                ax.text(sh, i, f" {ms:.0f} ms", va="center", fontsize=8)
            ax.set_xlim(0, 1.15)
        ax.set_xlabel("share of the profiled request (self time, median of repetitions)")
        ax.set_ylabel("")

    def speeds(ax):
        if not gap.empty:
            median_plot(gap.iloc[:3], x="ms_per_token", y="what", ax=ax, kind="bar", color="C2")
        ax.set_xlabel("ms per generated token")
        ax.set_ylabel("")

    return panel_figure([("where one request's time goes", shares), ("engine speed vs end-to-end speed", speeds)],
                        ncols=2, figsize=(13, 4.2))
