"""Context size and KV cache: the guide's claims M1 (n_ctx) and M2 ("KV-cache optimization").

Parts of one study (`ContextStudy`), each a sweep through `kit.sweep.run_sweep` (one child process per config):
- allocated: the same short prompt at every n_ctx: memory after loading (test `kit.measure:memory_probe`),
  TTFT (engine: a prompt of `prompt_tokens` + the first generated token, `pp<N>+tg1`), tg t/s. Anything that
  changes here is the cost of *allocating* a context.
- fill: a prompt that fills `fill_fraction` of each n_ctx (up to `fill_max_n_ctx`): TTFT of a full context.
- depth: one n_ctx, tg and pp after `depth` tokens already sit in the KV cache: the cost of *using* a context.
- kv: KV cache types for K and V at one n_ctx: memory, tg at a depth, pp, and quality against the f16 cache
  (perplexity and KL divergence on held-out text, `kit.quality`). A quantized V cache needs flash attention,
  so every type runs with flash_attn=True and f16 runs both with and without it: the fair baseline is f16 + FA.
- rope: the guide's rope_freq_base override against the model's own value: perplexity and KL divergence.

Quality verdicts use a paired bootstrap over perplexity chunks (the same text for both), see
`kit.verdicts.paired_log_ratio`, labelled by the one rule (`kit.verdicts.from_interval`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from kit.config import KV_CACHE_TYPES, Settings, SettingsError, StudyConfig, StudyConfigError, check_rule, param
from kit.measure import Test, pp, tg
from kit.models import model_card
from kit.paths import DEFAULT_MODEL
from kit.plots import median_plot, panel_figure, samples_long
from kit.quality import ensure_reference, reference_path
from kit.results import ci_label, compared_samples, load_results, median_table, ok_rows, pooled_samples
from kit.sweep import Adaptive, run_sweep
from kit.verdicts import (INCONCLUSIVE, MIXED, NO_EFFECT, REFUTED, SUPPORTED, combine, compare, from_interval,
                          looks_note, median_ci, not_testable, paired_log_ratio, rows_confidence)

GUIDE_N_CTX = (2048, 4096, 8192, 16384)
GUIDE_MODEL_PROPERTIES = {"n_ctx_train": 131072, "rope_freq_base": 10000.0}
PARTS = ("allocated", "fill", "depth", "kv", "rope")
MEMORY_PROBE = "kit.measure:memory_probe"
QUALITY_TEST = "kit.quality:kld_test"


def ppl_ratio_verdict(claim: str, candidate_chunk_nll, baseline_chunk_nll, claimed: str = "same", metric: str = "",
                      evidence=(), summary: str = ""):
    """A Verdict on perplexity (lower is better) from paired chunks: the paired log ratio's interval, labelled by
    kit.verdicts' one rule (from_interval -> decide)."""
    point, lo, hi = paired_log_ratio(candidate_chunk_nll, baseline_chunk_nll)
    auto = (f"{metric or 'perplexity ratio'}: {abs(point - 1) * 100:.1f} % {'higher' if point > 1 else 'lower'} "
            f"(95 % CI {lo:.3f}-{hi:.3f}, paired over {len(candidate_chunk_nll)} chunks)")
    return from_interval(claim, point, lo, hi, claimed=claimed, higher_is_better=False, metric=metric,
                         summary=summary or auto, evidence=evidence, n_candidate=len(candidate_chunk_nll),
                         n_baseline=len(baseline_chunk_nll))


# ---- the study --------------------------------------------------------------------------------------------------
@dataclass
class ContextStudy(StudyConfig):
    """n_ctx (M1) and KV cache / RoPE (M2). Validated on construction; the model card is read in check()."""

    model: str = param(DEFAULT_MODEL, "bundled model name or a path to any GGUF")
    repetitions: int = param(5, "timed runs per test after one warm-up (allocated and KV parts)", ge=1)
    out_dir: str = param("outputs/30_context_kv", "rows, figures and verdicts go here")
    n_ctx_values: list[int] = param([1024, 4096, 8192, 16384], "allocated contexts (the guide's, plus 1024)",
                                    ge=1, nonempty=True)
    allow_beyond_train: bool = param(False, "also run n_ctx above the model's n_ctx_train (llama.cpp allows it; "
                                            "quality suffers)")
    n_threads: int = param(0, "generation threads, 0 means the llama-cpp-python default", ge=0)
    prompt_tokens: int = param(128, "the fixed prompt for TTFT and pp", ge=1)
    n_gen: int = param(32, "generated tokens per tg test", ge=1)
    fill_fraction: float = param(0.9, "fill prompts use this share of n_ctx", gt=0, le=1)
    fill_max_n_ctx: int = param(1024, "fill prompts only up to this n_ctx (their cost grows with n_ctx squared)",
                                ge=1)
    fill_repetitions: int = param(2, "repetitions of the fill prompts", ge=1)
    depth_n_ctx: int = param(0, "n_ctx of the depth part, 0 means the largest n_ctx run", ge=0)
    depths: list[int] = param([0, 1024], "tokens already in the KV cache before tg / pp", ge=0, nonempty=True)
    depth_repetitions: int = param(5, "repetitions of the depth tests (the depth is filled once per test)", ge=1)
    kv_types: list[str] = param(["f16", "q8_0", "q4_0"], "KV cache types, the same for K and V (f16 included: "
                                                         "the baseline)", choices=KV_CACHE_TYPES, nonempty=True)
    kv_n_ctx: int = param(2048, "n_ctx of the KV and RoPE parts", ge=1)
    kv_depth: int = param(256, "tg of the KV part runs after this many tokens, where the KV type matters", ge=0)
    rope_freq_bases: list[float] = param([10000.0], "RoPE base overrides to score (the guide's 10000)", gt=0)
    ppl_n_ctx: int = param(256, "perplexity chunk size (tokens)", ge=1)
    ppl_chunks: int = param(3, "perplexity chunks of held-out text", ge=1)
    timeout_s: float = param(900.0, "seconds one trial may take before its child is killed", gt=0)
    looks: int = param(5, "blocks of `repetitions` rounds at most while M1's comparison is inconclusive (1: none "
                          "added); every look and the verdict at the Bonferroni confidence 1 - 0.05/looks", ge=1, le=10)
    looks_max_s: float = param(120.0, "seconds of added rounds at most", ge=0)

    def check(self) -> None:
        """Cross-field rules; reads the model card and derives n_ctx_run, beyond_train and depth_ctx."""
        check_rule("f16" in self.kv_types, "kv_types must include 'f16': it is the baseline every other type is "
                                           "compared with")
        self.rope_freq_bases = [float(b) for b in self.rope_freq_bases]
        self.card = model_card(self.model)
        train = self.card.n_ctx_train
        self.beyond_train = sorted(n for n in set(self.n_ctx_values) if train and n > train)
        self.n_ctx_run = sorted(set(self.n_ctx_values)) if self.allow_beyond_train else \
            sorted(n for n in set(self.n_ctx_values) if not (train and n > train))
        check_rule(bool(self.n_ctx_run), f"every n_ctx in {self.n_ctx_values} exceeds the model's n_ctx_train="
                                         f"{train}; allow_beyond_train=True runs them anyway")
        smallest = min(self.n_ctx_run)
        check_rule(self.prompt_tokens + 1 <= smallest and self.n_gen <= smallest,
                   f"prompt_tokens + 1 = {self.prompt_tokens + 1} and n_gen = {self.n_gen} must fit the smallest "
                   f"n_ctx ({smallest})")
        self.depth_ctx = self.depth_n_ctx or max(self.n_ctx_run)
        longest = max(self.prompt_tokens, self.n_gen)
        check_rule(max(self.depths) + longest <= self.depth_ctx,
                   f"the deepest depth test needs {max(self.depths) + longest} tokens; depth_n_ctx={self.depth_ctx} "
                   f"(drop depths above {self.depth_ctx - longest})")
        check_rule(self.kv_depth + self.n_gen <= self.kv_n_ctx and self.prompt_tokens <= self.kv_n_ctx
                   and self.ppl_n_ctx <= self.kv_n_ctx,
                   f"kv_n_ctx={self.kv_n_ctx} must hold kv_depth + n_gen, prompt_tokens and ppl_n_ctx")
        try:
            for n in self.n_ctx_run:  # every configuration the settings' way (types, model)
                self.settings(n_ctx=n)
        except SettingsError as exc:
            raise StudyConfigError(f"{type(self).__name__}: {exc}") from None

    # -- paths
    def reference_path(self) -> Path:
        return reference_path(self.card.path, self.ppl_n_ctx, self.ppl_chunks, cache_dir=self.out_path / "cache",
                              tag="kv-f16-fa")

    # -- configurations and tests
    def settings(self, **changes) -> Settings:
        base = Settings(model=self.model, n_threads=self.n_threads or None)
        return base.replace(**changes)

    def fill_prompt(self, n_ctx: int) -> int:
        return max(1, int(n_ctx * self.fill_fraction) - 1)

    def ttft_test(self, n_prompt: int) -> Test:
        """The engine's time to first token: a prompt, then one generated token (llama-bench's pp<N>+tg1)."""
        return Test("pg", n_prompt=n_prompt, n_gen=1)

    def allocated_plan(self):
        configs = [self.settings(n_ctx=n) for n in self.n_ctx_run]
        tests = [Test(MEMORY_PROBE), self.ttft_test(self.prompt_tokens), tg(self.n_gen)]
        return configs, _tagged(tests, "allocated")

    def fill_plans(self):
        """[(config, [test])] for each n_ctx up to fill_max_n_ctx."""
        return [(self.settings(n_ctx=n), _tagged([self.ttft_test(self.fill_prompt(n))], "fill"))
                for n in self.n_ctx_run if n <= self.fill_max_n_ctx]

    def depth_plan(self):
        tests = []
        for d in sorted(set(self.depths)):
            tests += [tg(self.n_gen, depth=d), pp(self.prompt_tokens, depth=d)]
        return [self.settings(n_ctx=self.depth_ctx)], _tagged(tests, "depth")

    def kv_configs(self) -> list[Settings]:
        """f16 with flash attention first (the quality reference), f16 without, then every other type with FA."""
        out = [self.settings(n_ctx=self.kv_n_ctx, flash_attn=True), self.settings(n_ctx=self.kv_n_ctx)]
        for t in self.kv_types:
            if t == "f16":
                continue
            out.append(self.settings(n_ctx=self.kv_n_ctx, type_k=t, type_v=t, flash_attn=True))
        return out

    def quality_test(self) -> Test:
        return Test(QUALITY_TEST, n_prompt=self.ppl_n_ctx,
                    params={"reference_logits": str(self.reference_path()), "n_ctx": self.ppl_n_ctx,
                            "n_chunks": self.ppl_chunks, "reference_sha256": self.card.sha256, "create": False})

    def kv_tests(self) -> list[Test]:
        return _tagged([Test(MEMORY_PROBE), tg(self.n_gen, depth=self.kv_depth),
                        pp(self.prompt_tokens)], "kv") + [self.quality_test()]

    def rope_configs(self) -> list[Settings]:
        return [self.settings(n_ctx=self.kv_n_ctx, flash_attn=True, rope_freq_base=b) for b in self.rope_freq_bases]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(n_ctx_run=self.n_ctx_run, beyond_train=self.beyond_train, depth_ctx=self.depth_ctx)
        return d


def _tagged(tests: list[Test], part: str) -> list[Test]:
    """The part's name in each test's params: parts measure in separate trials and never share a resume key
    (the same settings and test in two parts would otherwise be run once and filed under the first part)."""
    return [Test(t.kind, t.n_prompt, t.n_gen, t.n_depth, {**t.params, "part": part}) for t in tests]


# ---- what the guide calls settings but the model decides ---------------------------------------------------------
def guide_setting_check() -> dict:
    """Try the guide's n_ctx_train as a setting: Settings refuses it, with the reason."""
    try:
        Settings().replace(n_ctx_train=GUIDE_MODEL_PROPERTIES["n_ctx_train"])
    except SettingsError as exc:
        return {"setting": "n_ctx_train", "accepted": False, "message": str(exc)}
    return {"setting": "n_ctx_train", "accepted": True, "message": ""}


def model_properties_table(study: ContextStudy):
    """The guide's n_ctx_train / rope_freq_base next to the model's own values from its GGUF metadata."""
    c = study.card
    rows = [
        {"property": "n_ctx_train", "guide": f"{GUIDE_MODEL_PROPERTIES['n_ctx_train']:g}",
         "model (GGUF)": f"{c.n_ctx_train:g}",
         "what it means": "the context length the model was trained on; a property of the file, not a setting. "
                          f"n_ctx above {c.n_ctx_train} runs (llama.cpp warns) but positions past it were never "
                          "trained: quality degrades unless RoPE scaling is configured"},
        {"property": "rope_freq_base", "guide": f"{GUIDE_MODEL_PROPERTIES['rope_freq_base']:g}",
         "model (GGUF)": f"{c.rope_freq_base:g}" if c.rope_freq_base else "not set (llama.cpp default 10000)",
         "what it means": "the RoPE base the model was trained with; overriding it changes every position's "
                          "encoding (see the perplexity table)"},
    ]
    return pd.DataFrame(rows)


def beyond_train_note(study: ContextStudy) -> str:
    if not study.beyond_train:
        return ""
    ran = "were run as asked (allow_beyond_train=True)" if study.allow_beyond_train else \
        "were not run (allow_beyond_train=False)"
    return (f"n_ctx {', '.join(map(str, study.beyond_train))} exceed this model's n_ctx_train="
            f"{study.card.n_ctx_train} and {ran}. llama.cpp would allocate such a context (with a warning "
            f"'n_ctx_seq > n_ctx_train'), but positions past {study.card.n_ctx_train} are outside what the model "
            f"was trained on: without RoPE scaling (YaRN / linear) its output degrades there, so for this model "
            f"the guide's 16384 buys memory cost and quality damage, not usable context.")


# ---- running ----------------------------------------------------------------------------------------------------
def _sweep(study: ContextStudy, configs, tests, repetitions: int, part: str, progress: bool,
           adaptive: Adaptive | None = None):
    out = study.out_path
    return run_sweep(out.name, configs, tests, repetitions=repetitions, out_root=out.parent,
                     timeout_s=study.timeout_s, progress=progress, extra={"part": part}, adaptive=adaptive)


def _m1_adaptive(study: ContextStudy) -> Adaptive | None:
    """More interleaved rounds for M1's pair (the n_ctx values `_m1_sizes` compares) while it is inconclusive."""
    have = sorted(set(study.n_ctx_run))
    if len(have) < 2:
        return None
    small, large = (4096, 8192) if {4096, 8192} <= set(have) else (have[-2], have[-1])
    return Adaptive("M1", [(study.settings(n_ctx=small), study.settings(n_ctx=large))], looks=study.looks,
                    max_s=study.looks_max_s, paired=True)


def run_context_study(study: ContextStudy, parts: tuple = PARTS, progress: bool = True):
    """Run the parts in order (kv before rope: it holds the quality reference); returns all rows as a DataFrame."""
    for p in parts:
        if p not in PARTS:
            raise SettingsError(f"unknown part {p!r}; parts: {', '.join(PARTS)}")
    if "allocated" in parts:
        _sweep(study, *study.allocated_plan(), study.repetitions, "allocated", progress, _m1_adaptive(study))
    if "fill" in parts:
        for config, tests in study.fill_plans():
            _sweep(study, [config], tests, study.fill_repetitions, "fill", progress)
    if "depth" in parts:
        _sweep(study, *study.depth_plan(), study.depth_repetitions, "depth", progress)
    if "kv" in parts or "rope" in parts:
        # the reference log-probs: f16 KV with flash attention, the model's own RoPE, written once in this process
        ensure_reference(study.kv_configs()[0], path=study.reference_path(), n_ctx=study.ppl_n_ctx,
                         n_chunks=study.ppl_chunks)
    if "kv" in parts:
        _sweep(study, study.kv_configs(), study.kv_tests(), study.repetitions, "kv", progress)
    if "rope" in parts:
        _sweep(study, study.rope_configs(), [study.quality_test()], 1, "rope", progress)
    return load_results(study.out_path)


# ---- analysis ---------------------------------------------------------------------------------------------------
def _ttft_rows(rows):
    """pg rows with their time-to-first-token samples in ms (samples_ttft_ms, from the engine's samples_ns)."""
    if rows.empty:
        return rows
    return rows.assign(samples_ttft_ms=[[ns / 1e6 for ns in xs] if isinstance(xs, list) else None
                                        for xs in rows["samples_ns"]])


def _medians(rows, by: str, col: str, name: str, ci_name: str) -> dict:
    """{group: {name: median, ci_name: "[lo, hi]"}} of a samples column, through kit.results.median_table."""
    t = median_table(rows, by, col)
    return {r[by]: {name: r[col], ci_name: ci_label(r[f"{col}_lo"], r[f"{col}_hi"])} for _, r in t.iterrows()}


def allocated_table(df, study: ContextStudy):
    """Per allocated n_ctx, same prompt: load time, KV size (computed) vs measured anonymous memory, TTFT, tg."""
    d = ok_rows(df, "allocated")
    if d.empty:
        return pd.DataFrame()
    ttft = _medians(_ttft_rows(d[d["test_kind"] == "pg"]), "n_ctx", "samples_ttft_ms", "ttft_ms", "ttft_ci")
    gen = _medians(d[d["test_kind"] == "tg"], "n_ctx", "samples_ts", "tg_ts", "tg_ci")
    rows = []
    for n, g in d.groupby("n_ctx"):
        mem = g[g["test_kind"] == MEMORY_PROBE]
        eff = int(g["n_ctx_effective"].iloc[0]) if "n_ctx_effective" in g else int(n)
        rows.append({
            "n_ctx": int(n), "n_ctx_effective": eff,
            "load_ms": round(float(g["load_ms"].iloc[0]), 1),
            "kv_mib_computed": round(study.card.kv_cache_bytes(eff) / 2**20, 1),
            "rss_anon_mb": float(mem["rss_anon_mb"].iloc[0]) if not mem.empty else None,
            **ttft.get(n, {"ttft_ms": None, "ttft_ci": ""}), **gen.get(n, {"tg_ts": None, "tg_ci": ""}),
            "prompt_tokens": study.prompt_tokens,
        })
    t = pd.DataFrame(rows)
    if t["rss_anon_mb"].notna().any():
        base = t.iloc[0]
        t["kv_mib_vs_smallest"] = (t["kv_mib_computed"] - base["kv_mib_computed"]).round(1)
        t["rss_anon_vs_smallest"] = (t["rss_anon_mb"] - base["rss_anon_mb"]).round(1)
    return t


def fill_table(df):
    """Per n_ctx up to fill_max_n_ctx: TTFT of a prompt filling that context, and its prompt speed."""
    t = median_table(_ttft_rows(ok_rows(df, "fill")), ["n_ctx", "n_prompt"], "samples_ttft_ms")
    rows = []
    for _, r in t.iterrows():
        med = r["samples_ttft_ms"]
        rows.append({"n_ctx": int(r["n_ctx"]), "prompt_tokens": int(r["n_prompt"]), "ttft_ms": med,
                     "ttft_ci": ci_label(r["samples_ttft_ms_lo"], r["samples_ttft_ms_hi"]),
                     "prompt_ts": round(int(r["n_prompt"]) / (med / 1e3), 1) if med else None})
    return pd.DataFrame(rows)


def depth_table(df):
    """tg and pp t/s per depth (tokens already in the KV cache) at the depth part's n_ctx."""
    d = ok_rows(df, "depth")
    if d.empty:
        return pd.DataFrame()
    t = median_table(d, ["test_kind", "n_depth"], "samples_ts")
    rows = [{"test": r["test_kind"], "depth": int(r["n_depth"]), "n_ctx": int(d["n_ctx"].iloc[0]),
             "median_ts": r["samples_ts"], "ci": ci_label(r["samples_ts_lo"], r["samples_ts_hi"])}
            for _, r in t.iterrows()]
    return pd.DataFrame(rows).sort_values(["test", "depth"]).reset_index(drop=True)


def _kv_label(r) -> str:
    fa = "FA" if bool(r["flash_attn"]) else "no FA"
    return f"K {r['type_k']} / V {r['type_v']}, {fa}"


def _quality_rows(df, part: str):
    d = ok_rows(df, part)
    return d[d["test_kind"] == QUALITY_TEST] if not d.empty else d


def _reference_quality(df):
    """The quality row of the reference: f16 K and V with flash attention, the model's own RoPE (kv part)."""
    q = _quality_rows(df, "kv")
    if q.empty:
        return q
    return q[(q["type_k"] == "f16") & (q["type_v"] == "f16") & (q["flash_attn"] == True)]  # noqa: E712


def _kv_row(g, study: ContextStudy, key, ref_nll) -> dict:
    """One KV configuration's row of kv_table."""
    tk, tv, fa = key
    eff = int(g["n_ctx_effective"].iloc[0])
    mem = g[g["test_kind"] == MEMORY_PROBE]
    tg_m, tg_lo, tg_hi = median_ci(pooled_samples(g[g["test_kind"] == "tg"]))
    pp_m, pp_lo, pp_hi = median_ci(pooled_samples(g[g["test_kind"] == "pp"]))
    qq = g[g["test_kind"] == QUALITY_TEST]
    r = {"kv": _kv_label({"type_k": tk, "type_v": tv, "flash_attn": fa}), "type_k": tk, "type_v": tv,
         "flash_attn": bool(fa), "n_ctx": eff,
         "kv_mib_computed": round(study.card.kv_cache_bytes(eff, tk, tv) / 2**20, 1),
         "rss_anon_mb": float(mem["rss_anon_mb"].iloc[0]) if not mem.empty else None,
         f"tg_ts@d{study.kv_depth}": tg_m, "tg_ci": ci_label(tg_lo, tg_hi), "pp_ts": pp_m,
         "pp_ci": ci_label(pp_lo, pp_hi)}
    if not qq.empty:
        x = qq.iloc[0]
        r.update(ppl=x["ppl"], ppl_stderr=x["ppl_stderr"], kld_mean=x["kld_mean"],
                 top1_agree_pct=x["top1_agree_pct"],
                 ln_ppl_ratio=x["ln_ppl_ratio"], ln_ppl_ratio_stderr=x["ln_ppl_ratio_stderr"])
        if ref_nll is not None:
            pt, lo, hi = paired_log_ratio(x["chunk_nll"], ref_nll)
            r.update(ppl_ratio_vs_f16fa=round(pt, 4), ppl_ratio_ci=ci_label(lo, hi, 4))
    return r


def kv_table(df, study: ContextStudy):
    """Per KV configuration: KV size computed and measured, tg at depth, pp, perplexity, KLD, top-1 agreement,
    and the paired perplexity ratio to f16 + FA with its interval."""
    d = ok_rows(df, "kv")
    if d.empty:
        return pd.DataFrame()
    ref = _reference_quality(df)
    ref_nll = ref["chunk_nll"].iloc[0] if not ref.empty else None
    t = pd.DataFrame([_kv_row(g, study, key, ref_nll)
                      for key, g in d.groupby(["type_k", "type_v", "flash_attn"], sort=False)])
    base = t[(t["type_k"] == "f16") & (t["type_v"] == "f16") & t["flash_attn"]]
    if not base.empty and t["rss_anon_mb"].notna().any():
        base_mem = base.iloc[0]
        t["kv_mib_saved_computed"] = (base_mem["kv_mib_computed"] - t["kv_mib_computed"]).round(1)
        t["rss_anon_saved_mb"] = (base_mem["rss_anon_mb"] - t["rss_anon_mb"]).round(1)
    return t


def rope_table(df, study: ContextStudy):
    """Perplexity and KLD at the model's own RoPE base and at each override, with the paired ratio to the own."""
    ref = _reference_quality(df)
    rows = []
    if not ref.empty:
        x = ref.iloc[0]
        rows.append({"rope_freq_base": study.card.rope_freq_base, "source": "model's own (GGUF)", "ppl": x["ppl"],
                     "ppl_stderr": x["ppl_stderr"], "kld_mean": x["kld_mean"], "top1_agree_pct": x["top1_agree_pct"],
                     "ppl_ratio": 1.0, "ppl_ratio_ci": ""})
    for _, x in _quality_rows(df, "rope").iterrows():
        r = {"rope_freq_base": x["rope_freq_base"], "source": "override", "ppl": x["ppl"],
             "ppl_stderr": x["ppl_stderr"], "kld_mean": x["kld_mean"], "top1_agree_pct": x["top1_agree_pct"]}
        if not ref.empty:
            pt, lo, hi = paired_log_ratio(x["chunk_nll"], ref.iloc[0]["chunk_nll"])
            r.update(ppl_ratio=round(pt, 4), ppl_ratio_ci=ci_label(lo, hi, 4))
        rows.append(r)
    return pd.DataFrame(rows)


# ---- verdicts ---------------------------------------------------------------------------------------------------
def _m1_sizes(d) -> tuple[int, int] | None:
    """The smaller and larger allocated n_ctx M1 compares: the guide's 4096 / 8192 if run, else the largest two."""
    have = sorted(int(n) for n in d["n_ctx"].unique()) if not d.empty else []
    if 4096 in have and 8192 in have:
        return 4096, 8192
    return (have[-2], have[-1]) if len(have) >= 2 else None


def _used_context(df, study: ContextStudy, confidence: float = 0.95) -> tuple[dict, list[str]]:
    """tg and pp at the deepest against the shallowest depth: details and sentences for M1 (evidence, not
    conditions: a smaller allocation does not shorten the context a request uses)."""
    dd = ok_rows(df, "depth")
    details, words = {}, []
    depths = sorted(int(x) for x in dd["n_depth"].unique()) if not dd.empty else []
    if len(depths) < 2:
        return details, words
    lo_d, hi_d = depths[0], depths[-1]
    for kind in ("tg", "pp"):
        a = dd[(dd["test_kind"] == kind) & (dd["n_depth"] == hi_d)]
        b = dd[(dd["test_kind"] == kind) & (dd["n_depth"] == lo_d)]
        if a.empty or b.empty:
            continue
        ca, cb, paired = compared_samples(a, b)
        u = compare("M1", ca, cb, claimed="worse", confidence=confidence, paired=paired,
                    metric=f"{kind} t/s at depth {hi_d} / depth {lo_d} (n_ctx {study.depth_ctx})")
        details[f"used_{kind}"] = u.to_dict()
        words.append(f"Using the context: {kind} at depth {hi_d} against depth {lo_d}: {u.label()}, "
                     f"{u.effect_text(2)}.")
    return details, words


_M1_CONCLUSION = {
    NO_EFFECT: "Allocating less context changed speed at the same prompt by less than the band: what it saves is "
               "memory; a smaller n_ctx is faster only through the shorter prompts it forces.",
    SUPPORTED: "Here the smaller allocation was faster at the same prompt, and it saves memory.",
    REFUTED: "Here the smaller allocation was slower at the same prompt.",
    INCONCLUSIVE: "The intervals are too wide to tell a gain from a loss at the same prompt: raise repetitions.",
    MIXED: "Speed and TTFT disagree at the same prompt: see each condition.",
}


def m1_verdict(df, study: ContextStudy, evidence=(), confidence: float | None = None):
    """M1: the same prompt at a smaller allocated n_ctx (4096) against a larger one (8192): one sub-verdict for tg
    t/s and one for TTFT, combined (`kit.verdicts.combine`, mixed when they disagree; the effect shown is tg's).
    The used-context (depth) effect and the KV memory saved are evidence in details and the summary.
    confidence: None takes the allocated rows' (`rows_confidence`: higher after adaptive looks)."""
    d = ok_rows(df, "allocated")
    confidence = confidence or rows_confidence(d)
    sizes = _m1_sizes(d)
    if sizes is None:
        have = sorted(int(n) for n in d["n_ctx"].unique()) if not d.empty else []
        return not_testable("M1", f"need two allocated n_ctx values with rows (have {have})", list(evidence))
    small, large = sizes
    gs, gl = d[d["n_ctx"] == small], d[d["n_ctx"] == large]
    ts, tl, paired = compared_samples(gs[gs["test_kind"] == "tg"], gl[gl["test_kind"] == "tg"])
    tgv = compare("M1", ts, tl, claimed="better", evidence=list(evidence), confidence=confidence, paired=paired,
                  metric=f"tg t/s, same prompt, n_ctx {small} / {large} (allocated only)")
    fs, fl, paired = compared_samples(_ttft_rows(gs[gs["test_kind"] == "pg"]), _ttft_rows(gl[gl["test_kind"] == "pg"]),
                                      "samples_ttft_ms")
    ttft = compare("M1", fs, fl, higher_is_better=False, claimed="better", confidence=confidence, paired=paired,
                   metric=f"TTFT ms ({study.prompt_tokens}-token prompt), n_ctx {small} / {large}")
    kv_saved = (study.card.kv_cache_bytes(large) - study.card.kv_cache_bytes(small)) / 2**20
    used, used_words = _used_context(df, study)
    v = combine("M1", {"tg t/s": tgv, "TTFT": ttft}, depends_on="metric (tg t/s, TTFT)", headline="tg t/s",
                evidence=list(evidence),
                details={"ttft": ttft.to_dict(), "kv_mib_saved": round(kv_saved, 1), "n_ctx_small": small,
                         "n_ctx_large": large, **used})
    words = [f"Allocating n_ctx={small} instead of {large} with the same prompt: tg {tgv.label()} "
             f"({tgv.effect_text()}), TTFT {ttft.label()} ({ttft.effect_text()}); it saves {kv_saved:.0f} MiB of "
             f"f16 KV cache."]
    words += used_words
    if v.verdict in _M1_CONCLUSION:
        words.append(_M1_CONCLUSION[v.verdict])
    if v.unstable:
        words.append("Samples unstable (CV >= 10 %): repeat on a quieter machine.")
    capped = looks_note(d, "M1") if INCONCLUSIVE in (tgv.verdict, ttft.verdict) else ""
    if capped:
        words.append(capped)
    note = beyond_train_note(study)
    if note:
        words.append(note)
        v.details["beyond_train"] = note
    v.summary = " ".join(words)
    return v


def _kv_levers(df, study: ContextStudy) -> tuple[list[dict], list[str]]:
    """The real KV levers (type_k / type_v) against f16: rows for M2's details and one sentence each, with the
    perplexity cost labelled by the one rule ("same" as f16 + FA within M2's band)."""
    kt = kv_table(df, study)
    kv, words = [], []
    if kt.empty or "ppl_ratio_vs_f16fa" not in kt:
        return kv, words
    ref = _reference_quality(df)
    ref_nll = ref["chunk_nll"].iloc[0] if not ref.empty else None
    q = _quality_rows(df, "kv")
    for _, r in kt.iterrows():
        if r["type_k"] == "f16" and r["type_v"] == "f16":
            continue
        mine = q[(q["type_k"] == r["type_k"]) & (q["type_v"] == r["type_v"]) & (q["flash_attn"] == r["flash_attn"])]
        label = ""
        if ref_nll is not None and not mine.empty:
            label = ppl_ratio_verdict("M2", mine["chunk_nll"].iloc[0], ref_nll, claimed="same",
                                      metric=f"perplexity ratio, KV {r['type_k']} / f16 + FA").label()
        kv.append({"kv": r["kv"], "kv_mib": r["kv_mib_computed"], "kv_mib_saved": r.get("kv_mib_saved_computed"),
                   "ppl_ratio": r["ppl_ratio_vs_f16fa"], "ppl_ratio_ci": r["ppl_ratio_ci"],
                   "same_quality_as_f16": label, "kld_mean": r["kld_mean"],
                   "tg_ts": r[f"tg_ts@d{study.kv_depth}"]})
        words.append(f"KV {r['type_k']}: saves {r.get('kv_mib_saved_computed', float('nan')):.0f} MiB at n_ctx "
                     f"{r['n_ctx']}, perplexity x{r['ppl_ratio_vs_f16fa']:.4f} {r['ppl_ratio_ci']} (same quality "
                     f"as f16: {label or 'no reference'}), KLD {r['kld_mean']:.4g}.")
    return kv, words


def _rope_outcome(v, study: ContextStudy) -> str:
    """What the rope verdict's label means for a reader (the label is the rule's; this only words it)."""
    if v.verdict == REFUTED:
        return "it damages this model: do not set it; leave rope_freq_base to the model."
    if v.verdict == SUPPORTED:
        return (f"lower perplexity on {study.ppl_n_ctx}-token chunks; RoPE acts over long distances, so check at "
                f"longer chunks (ppl_n_ctx) before trusting an override the model was not trained with.")
    if v.verdict == NO_EFFECT:
        return (f"no meaningful change (within +-{v.band:.0%}) on {study.ppl_n_ctx}-token chunks: the override "
                f"buys nothing here.")
    return (f"{v.label()}: the interval is too wide to tell on {study.ppl_n_ctx}-token chunks; raise ppl_chunks.")


def m2_verdict(df, study: ContextStudy, evidence=()):
    """M2: the guide's values are model properties; the rope override's effect on perplexity decides the verdict
    (`ppl_ratio_verdict`, M2's band); the real KV levers (type_k / type_v) are reported in details and the summary,
    each with its own quality label."""
    c = study.card
    ref = _reference_quality(df)
    rq = _quality_rows(df, "rope")
    g = rq[rq["rope_freq_base"] == GUIDE_MODEL_PROPERTIES["rope_freq_base"]] if not rq.empty else rq
    if g.empty:
        g = rq
    check = guide_setting_check()
    if ref.empty or g.empty:
        return not_testable("M2", "no perplexity rows for the model's own RoPE base and the override",
                            list(evidence), setting_check=check)
    x = g.iloc[0]
    base = x["rope_freq_base"]
    v = ppl_ratio_verdict("M2", x["chunk_nll"], ref.iloc[0]["chunk_nll"], claimed="better", evidence=list(evidence),
                          metric=f"perplexity ratio, rope_freq_base {base:g} (guide) / model's own "
                                 f"({c.rope_freq_base})")
    own = f"{c.rope_freq_base:g}" if c.rope_freq_base else "unset"
    words = [f"n_ctx_train is a property of the model file (this model: {c.n_ctx_train}); the guide's "
             f"{GUIDE_MODEL_PROPERTIES['n_ctx_train']} cannot be set (Settings refuses it). "
             f"Overriding rope_freq_base with the guide's {base:g} (model's own: {own}) changes perplexity by "
             f"a factor {v.effect:.3f} (95 % CI {v.ci_low:.3f}-{v.ci_high:.3f}): " + _rope_outcome(v, study)]
    kv, kv_words = _kv_levers(df, study)
    v.details.update(setting_check=check, kv_types=kv, model_rope_freq_base=c.rope_freq_base,
                     model_n_ctx_train=c.n_ctx_train)
    v.summary = " ".join(words + kv_words)
    return v


# ---- figure -----------------------------------------------------------------------------------------------------
def _panel_allocated(ax, df, study: ContextStudy) -> None:
    a = ok_rows(df, "allocated")
    if a.empty:
        return
    median_plot(samples_long(a[a["test_kind"] == "tg"]), "n_ctx", "samples_ts", ax, color="C0")
    ax.set_ylabel("tg tokens/s", color="C0")
    ax2 = ax.twinx()
    tt = samples_long(a[a["test_kind"] == "pg"], "samples_ns")
    median_plot(tt.assign(ttft_ms=tt["samples_ns"] / 1e6), "n_ctx", "ttft_ms", ax2, color="C3")
    ax2.set_ylabel(f"TTFT ms ({study.prompt_tokens}-token prompt)", color="C3")
    ax2.grid(False)


def _panel_depth(ax, df) -> None:
    dd = ok_rows(df, "depth")
    if not dd.empty:
        median_plot(samples_long(dd), "n_depth", "samples_ts", ax, hue="test_kind")
        ax.set_ylabel("tokens/s")


def _panel_memory(ax, df, study: ContextStudy) -> None:
    t = allocated_table(df, study)
    if t.empty:
        return
    ax.plot(t["n_ctx"], t["kv_mib_computed"], "o-", label="KV cache, computed (f16)")
    if "rss_anon_vs_smallest" in t:
        ax.plot(t["n_ctx"], t["rss_anon_vs_smallest"] + t["kv_mib_computed"].iloc[0], "s--",
                label="anonymous RSS growth (+ smallest KV)")
    ax.set_xlabel("n_ctx")
    ax.set_ylabel("MiB")
    ax.legend()


def _panel_kv(ax, df, study: ContextStudy) -> None:
    k = kv_table(df, study)
    if k.empty or "ppl" not in k:
        return
    for i, r in k.iterrows():
        ax.errorbar(r["kv_mib_computed"], r["ppl"], yerr=r["ppl_stderr"], fmt="o", label=r["kv"], color=f"C{i}")
    r = rope_table(df, study)
    for _, x in r[r["source"] == "override"].iterrows():
        ax.axhline(x["ppl"], ls=":", color="k", label=f"rope_freq_base {x['rope_freq_base']:g} (f16)")
    ax.set_xlabel(f"KV cache MiB at n_ctx {study.kv_n_ctx}")
    ax.set_ylabel("perplexity (held-out text)")
    ax.legend(fontsize=8)


def plot_context(df, study: ContextStudy):
    """Four panels: allocated n_ctx (tg, TTFT), depth (tg, pp), memory (computed KV vs measured), KV types.
    Returns the Figure (save it with kit.plots.save_figure)."""
    return panel_figure([
        ("Allocated n_ctx, same prompt", lambda ax: _panel_allocated(ax, df, study)),
        (f"Used context (depth), n_ctx {study.depth_ctx}", lambda ax: _panel_depth(ax, df)),
        ("Memory against n_ctx", lambda ax: _panel_memory(ax, df, study)),
        ("KV cache type: memory vs quality", lambda ax: _panel_kv(ax, df, study)),
    ], ncols=2, figsize=(12, 8))
