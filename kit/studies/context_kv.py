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

Quality verdicts use a paired bootstrap over perplexity chunks (the same text for both), see `kit.verdicts.paired_log_ratio`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from kit.verdicts import median_ci, paired_log_ratio
from kit.results import ok_rows as _ok, pooled_samples as _samples
from kit.sweep import StudyLocation
from kit.config import KV_CACHE_TYPES, Settings, SettingsError
from kit.measure import Test, pp, tg

GUIDE_N_CTX = (2048, 4096, 8192, 16384)
GUIDE_MODEL_PROPERTIES = {"n_ctx_train": 131072, "rope_freq_base": 10000.0}


# ---- small statistics used by the context and system studies ------------------------------------------------------
def ppl_verdict(claim: str, candidate_chunk_nll, baseline_chunk_nll, claimed: str = "same", metric: str = "",
                evidence=(), summary: str = ""):
    """A kit.verdicts.Verdict on perplexity (lower is better) from paired chunks: supported / refuted / no effect."""
    from kit.verdicts import NO_EFFECT, REFUTED, SUPPORTED, Verdict

    point, lo, hi = paired_log_ratio(candidate_chunk_nll, baseline_chunk_nll)
    worse, better = lo > 1, hi < 1
    if claimed == "same":
        verdict = REFUTED if (worse or better) else NO_EFFECT
    elif claimed == "better":
        verdict = SUPPORTED if better else (REFUTED if worse else NO_EFFECT)
    else:
        verdict = SUPPORTED if worse else (REFUTED if better else NO_EFFECT)
    auto = (f"{metric or 'perplexity ratio'}: {abs(point - 1) * 100:.1f} % {'higher' if point > 1 else 'lower'} "
            f"(95 % CI {lo:.3f}-{hi:.3f}, paired over {len(candidate_chunk_nll)} chunks)")
    return Verdict(claim=claim, verdict=verdict, summary=summary or auto, effect=round(point, 4),
                   ci_low=round(lo, 4), ci_high=round(hi, 4), metric=metric, evidence=list(evidence),
                   n_baseline=len(baseline_chunk_nll), n_candidate=len(candidate_chunk_nll))


# ---- the study --------------------------------------------------------------------------------------------------
@dataclass
class ContextStudy(StudyLocation):
    """n_ctx (M1) and KV cache / RoPE (M2). Validated on construction; the model card is read here."""

    model: str = "smollm2-135m"
    repetitions: int = 5
    out_dir: str = "outputs/30_context_kv"
    n_ctx_values: list = field(default_factory=lambda: [512, 2048, 4096, 8192])
    allow_beyond_train: bool = False      # run n_ctx above n_ctx_train too (llama.cpp allows it; quality suffers)
    n_threads: int = 0                    # 0 = llama-cpp-python's default
    prompt_tokens: int = 256              # the fixed prompt (TTFT, pp)
    n_gen: int = 64                       # tg length
    fill_fraction: float = 0.9            # fill prompts: this share of n_ctx
    fill_max_n_ctx: int = 2048            # fill prompts only up to this n_ctx (cost grows with n_ctx squared)
    fill_repetitions: int = 2
    depth_n_ctx: int = 0                  # 0 = the largest n_ctx run
    depths: list = field(default_factory=lambda: [0, 1024, 2048])
    depth_repetitions: int = 5
    kv_types: list = field(default_factory=lambda: ["f16", "q8_0", "q4_0"])
    kv_n_ctx: int = 2048
    kv_depth: int = 512                   # tg measured after this many tokens, where the KV type matters
    rope_freq_bases: list = field(default_factory=lambda: [10000.0])
    ppl_n_ctx: int = 256                  # perplexity chunk size
    ppl_chunks: int = 8
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        from kit.models import model_card

        for name in ("repetitions", "prompt_tokens", "n_gen", "fill_repetitions", "depth_repetitions",
                     "kv_n_ctx", "ppl_n_ctx", "ppl_chunks", "fill_max_n_ctx"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SettingsError(f"{name}={v!r} must be a positive int")
        for name in ("n_threads", "depth_n_ctx", "kv_depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SettingsError(f"{name}={v!r} must be an int >= 0")
        if not 0 < self.fill_fraction <= 1:
            raise SettingsError(f"fill_fraction={self.fill_fraction} must be in (0, 1]")
        if not self.n_ctx_values or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                        for n in self.n_ctx_values):
            raise SettingsError(f"n_ctx_values={self.n_ctx_values!r} must be a non-empty list of positive ints")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in self.depths) or not self.depths:
            raise SettingsError(f"depths={self.depths!r} must be a non-empty list of ints >= 0")
        for t in self.kv_types:
            if t not in KV_CACHE_TYPES:
                raise SettingsError(f"kv_types: {t!r} is not one of {', '.join(KV_CACHE_TYPES)}")
        if "f16" not in self.kv_types:
            raise SettingsError("kv_types must include 'f16': it is the baseline every other type is compared with")
        for b in self.rope_freq_bases:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0:
                raise SettingsError(f"rope_freq_bases: {b!r} must be a positive number")
        self.rope_freq_bases = [float(b) for b in self.rope_freq_bases]
        self.card = model_card(self.model)
        train = self.card.n_ctx_train
        self.beyond_train = sorted(n for n in set(self.n_ctx_values) if train and n > train)
        runnable = sorted(set(self.n_ctx_values)) if self.allow_beyond_train else \
            sorted(n for n in set(self.n_ctx_values) if not (train and n > train))
        if not runnable:
            raise SettingsError(f"every n_ctx in {self.n_ctx_values} exceeds the model's n_ctx_train={train}; "
                                f"allow_beyond_train=True runs them anyway")
        self.n_ctx_run = runnable
        if self.prompt_tokens + 1 > min(runnable) or self.n_gen > min(runnable):
            raise SettingsError(f"prompt_tokens + 1 = {self.prompt_tokens + 1} and n_gen = {self.n_gen} must fit "
                                f"the smallest n_ctx ({min(runnable)})")
        dctx = self.depth_n_ctx or max(runnable)
        need = max(self.depths) + max(self.prompt_tokens, self.n_gen)
        if need > dctx:
            raise SettingsError(f"the deepest depth test needs {need} tokens; depth_n_ctx={dctx} (drop depths above "
                                f"{dctx - max(self.prompt_tokens, self.n_gen)})")
        self.depth_ctx = dctx
        if self.kv_depth + self.n_gen > self.kv_n_ctx or self.prompt_tokens > self.kv_n_ctx \
                or self.ppl_n_ctx > self.kv_n_ctx:
            raise SettingsError(f"kv_n_ctx={self.kv_n_ctx} must hold kv_depth + n_gen, prompt_tokens and ppl_n_ctx")
        for n in self.n_ctx_run:  # every configuration the settings' way (types, model)
            self.settings(n_ctx=n)

    # -- paths

    def reference_path(self) -> Path:
        from kit.quality import reference_path

        return reference_path(self.card.path, self.ppl_n_ctx, self.ppl_chunks,
                              cache_dir=Path(self.out_dir) / "cache", tag="kv-f16-fa").resolve()

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
        tests = [Test("kit.measure:memory_probe"), self.ttft_test(self.prompt_tokens), tg(self.n_gen)]
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
        return Test("kit.quality:kld_test", n_prompt=self.ppl_n_ctx,
                    params={"reference_logits": str(self.reference_path()), "n_ctx": self.ppl_n_ctx,
                            "n_chunks": self.ppl_chunks, "reference_sha256": self.card.sha256, "create": False})

    def kv_tests(self) -> list[Test]:
        return _tagged([Test("kit.measure:memory_probe"), tg(self.n_gen, depth=self.kv_depth),
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
    import pandas as pd

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
def run_context_study(study: ContextStudy, parts: tuple = ("allocated", "fill", "depth", "kv", "rope"),
                      progress: bool = True):
    """Run the parts in order (kv before rope: it holds the quality reference); returns all rows as a DataFrame."""
    from kit.results import load_results
    from kit.sweep import run_sweep

    known = ("allocated", "fill", "depth", "kv", "rope")
    for p in parts:
        if p not in known:
            raise SettingsError(f"unknown part {p!r}; parts: {', '.join(known)}")

    def sweep(configs, tests, reps, part):
        return run_sweep(study.study, configs, tests, repetitions=reps, out_root=study.out_root,
                         timeout_s=study.timeout_s, progress=progress, extra={"part": part})

    if "allocated" in parts:
        sweep(*study.allocated_plan(), study.repetitions, "allocated")
    if "fill" in parts:
        for config, tests in study.fill_plans():
            sweep([config], tests, study.fill_repetitions, "fill")
    if "depth" in parts:
        sweep(*study.depth_plan(), study.depth_repetitions, "depth")
    if "kv" in parts or "rope" in parts:
        from kit.quality import ensure_reference

        # the reference log-probs: f16 KV with flash attention, the model's own RoPE, written once in this process
        ensure_reference(study.kv_configs()[0], path=study.reference_path(), n_ctx=study.ppl_n_ctx,
                         n_chunks=study.ppl_chunks)
    if "kv" in parts:
        sweep(study.kv_configs(), study.kv_tests(), study.repetitions, "kv")
    if "rope" in parts:
        sweep(study.rope_configs(), [study.quality_test()], 1, "rope")
    return load_results(study.out_dir)


# ---- analysis ---------------------------------------------------------------------------------------------------


def _ttft_ms(rows) -> list[float]:
    return [ns / 1e6 for ns in _samples(rows, "samples_ns")]


def _fmt_ci(lo, hi, digits: int = 1) -> str:
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None else ""


def allocated_table(df, study: ContextStudy):
    """Per allocated n_ctx, same prompt: load time, KV size (computed) vs measured anonymous memory, TTFT, tg."""
    import pandas as pd

    d = _ok(df, "allocated")
    rows = []
    for n, g in d.groupby("n_ctx"):
        mem = g[g["test_kind"] == "kit.measure:memory_probe"]
        ttft = g[g["test_kind"] == "pg"]
        gen = g[g["test_kind"] == "tg"]
        eff = int(g["n_ctx_effective"].iloc[0]) if "n_ctx_effective" in g else int(n)
        t_med, t_lo, t_hi = median_ci(_ttft_ms(ttft))
        g_med, g_lo, g_hi = median_ci(_samples(gen))
        rows.append({
            "n_ctx": int(n), "n_ctx_effective": eff,
            "load_ms": round(float(g["load_ms"].iloc[0]), 1),
            "kv_mib_computed": round(study.card.kv_cache_bytes(eff) / 2**20, 1),
            "rss_anon_mb": float(mem["rss_anon_mb"].iloc[0]) if not mem.empty else None,
            "ttft_ms": t_med, "ttft_ci": _fmt_ci(t_lo, t_hi),
            "tg_ts": g_med, "tg_ci": _fmt_ci(g_lo, g_hi),
            "prompt_tokens": study.prompt_tokens,
        })
    t = pd.DataFrame(rows)
    if not t.empty and t["rss_anon_mb"].notna().any():
        base = t.iloc[0]
        t["kv_mib_vs_smallest"] = (t["kv_mib_computed"] - base["kv_mib_computed"]).round(1)
        t["rss_anon_vs_smallest"] = (t["rss_anon_mb"] - base["rss_anon_mb"]).round(1)
    return t


def fill_table(df):
    import pandas as pd

    d = _ok(df, "fill")
    rows = []
    for (n, p), g in d.groupby(["n_ctx", "n_prompt"]):
        med, lo, hi = median_ci(_ttft_ms(g))
        rows.append({"n_ctx": int(n), "prompt_tokens": int(p), "ttft_ms": med, "ttft_ci": _fmt_ci(lo, hi),
                     "prompt_ts": round(int(p) / (med / 1e3), 1) if med else None})
    return pd.DataFrame(rows)


def depth_table(df):
    import pandas as pd

    d = _ok(df, "depth")
    rows = []
    for (kind, depth), g in d.groupby(["test_kind", "n_depth"]):
        med, lo, hi = median_ci(_samples(g))
        rows.append({"test": kind, "depth": int(depth), "n_ctx": int(g["n_ctx"].iloc[0]), "median_ts": med,
                     "ci": _fmt_ci(lo, hi)})
    return pd.DataFrame(rows).sort_values(["test", "depth"]).reset_index(drop=True) if rows else pd.DataFrame()


def _kv_label(r) -> str:
    fa = "FA" if bool(r["flash_attn"]) else "no FA"
    return f"K {r['type_k']} / V {r['type_v']}, {fa}"


def _quality_rows(df, part: str):
    d = _ok(df, part)
    return d[d["test_kind"] == "kit.quality:kld_test"] if not d.empty else d


def kv_table(df, study: ContextStudy):
    """Per KV configuration: KV size computed and measured, tg at depth, pp, perplexity, KLD, top-1 agreement,
    and the paired perplexity ratio to f16 + FA with its interval."""
    import pandas as pd

    d = _ok(df, "kv")
    if d.empty:
        return pd.DataFrame()
    q = _quality_rows(df, "kv")
    ref = q[(q["type_k"] == "f16") & (q["type_v"] == "f16") & (q["flash_attn"] == True)]  # noqa: E712
    ref_nll = ref["chunk_nll"].iloc[0] if not ref.empty else None
    rows, base_mem = [], None
    for (tk, tv, fa), g in d.groupby(["type_k", "type_v", "flash_attn"], sort=False):
        eff = int(g["n_ctx_effective"].iloc[0])
        mem = g[g["test_kind"] == "kit.measure:memory_probe"]
        gen = g[(g["test_kind"] == "tg")]
        prm = g[(g["test_kind"] == "pp")]
        qq = g[g["test_kind"] == "kit.quality:kld_test"]
        tg_m, tg_lo, tg_hi = median_ci(_samples(gen))
        pp_m, pp_lo, pp_hi = median_ci(_samples(prm))
        r = {"kv": _kv_label({"type_k": tk, "type_v": tv, "flash_attn": fa}), "type_k": tk, "type_v": tv,
             "flash_attn": bool(fa), "n_ctx": eff,
             "kv_mib_computed": round(study.card.kv_cache_bytes(eff, tk, tv) / 2**20, 1),
             "rss_anon_mb": float(mem["rss_anon_mb"].iloc[0]) if not mem.empty else None,
             f"tg_ts@d{study.kv_depth}": tg_m, "tg_ci": _fmt_ci(tg_lo, tg_hi), "pp_ts": pp_m,
             "pp_ci": _fmt_ci(pp_lo, pp_hi)}
        if not qq.empty:
            x = qq.iloc[0]
            r.update(ppl=x["ppl"], ppl_stderr=x["ppl_stderr"], kld_mean=x["kld_mean"],
                     top1_agree_pct=x["top1_agree_pct"],
                     ln_ppl_ratio=x["ln_ppl_ratio"], ln_ppl_ratio_stderr=x["ln_ppl_ratio_stderr"])
            if ref_nll is not None:
                pt, lo, hi = paired_log_ratio(x["chunk_nll"], ref_nll)
                r.update(ppl_ratio_vs_f16fa=round(pt, 4), ppl_ratio_ci=_fmt_ci(lo, hi, 4))
        rows.append(r)
    t = pd.DataFrame(rows)
    base = t[(t["type_k"] == "f16") & (t["type_v"] == "f16") & t["flash_attn"]]
    if not base.empty and t["rss_anon_mb"].notna().any():
        base_mem = base.iloc[0]
        t["kv_mib_saved_computed"] = (base_mem["kv_mib_computed"] - t["kv_mib_computed"]).round(1)
        t["rss_anon_saved_mb"] = (base_mem["rss_anon_mb"] - t["rss_anon_mb"]).round(1)
    return t


def rope_table(df, study: ContextStudy):
    import pandas as pd

    q = _quality_rows(df, "kv")
    ref = q[(q["type_k"] == "f16") & (q["type_v"] == "f16") & (q["flash_attn"] == True)]  # noqa: E712
    rq = _quality_rows(df, "rope")
    rows = []
    if not ref.empty:
        x = ref.iloc[0]
        rows.append({"rope_freq_base": study.card.rope_freq_base, "source": "model's own (GGUF)", "ppl": x["ppl"],
                     "ppl_stderr": x["ppl_stderr"], "kld_mean": x["kld_mean"], "top1_agree_pct": x["top1_agree_pct"],
                     "ppl_ratio": 1.0, "ppl_ratio_ci": ""})
    for _, x in rq.iterrows():
        r = {"rope_freq_base": x["rope_freq_base"], "source": "override", "ppl": x["ppl"],
             "ppl_stderr": x["ppl_stderr"], "kld_mean": x["kld_mean"], "top1_agree_pct": x["top1_agree_pct"]}
        if not ref.empty:
            pt, lo, hi = paired_log_ratio(x["chunk_nll"], ref.iloc[0]["chunk_nll"])
            r.update(ppl_ratio=round(pt, 4), ppl_ratio_ci=_fmt_ci(lo, hi, 4))
        rows.append(r)
    return pd.DataFrame(rows)


def m1_verdict(df, study: ContextStudy, evidence=()):
    """M1: the same prompt at a smaller allocated n_ctx (4096) against a larger one (8192), tg t/s; TTFT and the
    used-context (depth) effect in details and in the summary."""
    from kit.verdicts import compare, not_testable

    d = _ok(df, "allocated")
    have = sorted(int(n) for n in d["n_ctx"].unique()) if not d.empty else []
    if 4096 in have and 8192 in have:
        small, large = 4096, 8192
    elif len(have) >= 2:
        small, large = have[-2], have[-1]
    else:
        return not_testable("M1", f"need two allocated n_ctx values with rows (have {have})", list(evidence))
    gs, gl = d[d["n_ctx"] == small], d[d["n_ctx"] == large]
    v = compare("M1", _samples(gs[gs["test_kind"] == "tg"]), _samples(gl[gl["test_kind"] == "tg"]),
                claimed="better", evidence=list(evidence),
                metric=f"tg t/s, same prompt, n_ctx {small} / {large} (allocated only)")
    ttft = compare("M1", _ttft_ms(gs[gs["test_kind"] == "pg"]), _ttft_ms(gl[gl["test_kind"] == "pg"]),
                   higher_is_better=False, claimed="better",
                   metric=f"TTFT ms ({study.prompt_tokens}-token prompt), n_ctx {small} / {large}")
    kv_saved = (study.card.kv_cache_bytes(large) - study.card.kv_cache_bytes(small)) / 2**20
    v.details.update(ttft=ttft.to_dict(), kv_mib_saved=round(kv_saved, 1), n_ctx_small=small, n_ctx_large=large)
    words = [f"Allocating n_ctx={small} instead of {large} with the same prompt: tg {v.verdict} "
             f"({v.effect_text()}), TTFT {ttft.verdict} ({ttft.effect_text()}); it saves {kv_saved:.0f} MiB of "
             f"f16 KV cache."]
    dd = _ok(df, "depth")
    if not dd.empty:
        depths = sorted(int(x) for x in dd["n_depth"].unique())
        if len(depths) >= 2:
            lo_d, hi_d = depths[0], depths[-1]
            for kind in ("tg", "pp"):
                a = dd[(dd["test_kind"] == kind) & (dd["n_depth"] == hi_d)]
                b = dd[(dd["test_kind"] == kind) & (dd["n_depth"] == lo_d)]
                if a.empty or b.empty:
                    continue
                u = compare("M1", _samples(a), _samples(b), claimed="worse",
                            metric=f"{kind} t/s at depth {hi_d} / depth {lo_d} (n_ctx {study.depth_ctx})")
                v.details[f"used_{kind}"] = u.to_dict()
                words.append(f"Using the context: {kind} at depth {hi_d} against depth {lo_d}: {u.effect_text(2)}.")
    from kit.verdicts import NO_EFFECT, SUPPORTED

    used = v.details.get("used_tg", {})
    if v.verdict == NO_EFFECT and ttft.verdict == NO_EFFECT:
        tail = ("Allocating less context did not measurably change speed at the same prompt"
                + ("; the context actually used did, so a smaller n_ctx helps only through the shorter prompts it "
                   "forces" if used.get("verdict") == SUPPORTED else "") + ". What it saves is memory.")
    elif v.verdict == SUPPORTED:
        tail = "Here the smaller allocation was measurably faster at the same prompt, and it saves memory."
    else:
        tail = "Here the smaller allocation was measurably slower at the same prompt" + \
            (" (samples unstable: repeat on a quieter machine)" if v.unstable or ttft.unstable else "") + "."
    words.append(tail)
    note = beyond_train_note(study)
    if note:
        words.append(note)
        v.details["beyond_train"] = note
    v.summary = " ".join(words)
    return v


def m2_verdict(df, study: ContextStudy, evidence=()):
    """M2: the guide's values are model properties; the rope override's effect on perplexity decides the verdict;
    the real KV levers (type_k / type_v) are reported in details and the summary."""
    from kit.verdicts import not_testable

    c = study.card
    q = _quality_rows(df, "kv")
    ref = q[(q["type_k"] == "f16") & (q["type_v"] == "f16") & (q["flash_attn"] == True)]  # noqa: E712
    rq = _quality_rows(df, "rope")
    guide_base = GUIDE_MODEL_PROPERTIES["rope_freq_base"]
    g = rq[rq["rope_freq_base"] == guide_base] if not rq.empty else rq
    if g.empty:
        g = rq
    check = guide_setting_check()
    head = (f"n_ctx_train is a property of the model file (this model: {c.n_ctx_train}); the guide's "
            f"{GUIDE_MODEL_PROPERTIES['n_ctx_train']} cannot be set (Settings refuses it). ")
    if ref.empty or g.empty:
        return not_testable("M2", "no perplexity rows for the model's own RoPE base and the override",
                            list(evidence), setting_check=check)
    x = g.iloc[0]
    base = x["rope_freq_base"]
    v = ppl_verdict("M2", x["chunk_nll"], ref.iloc[0]["chunk_nll"], claimed="better", evidence=list(evidence),
                    metric=f"perplexity ratio, rope_freq_base {base:g} (guide) / model's own ({c.rope_freq_base})")
    if v.ci_low > 1:
        outcome = "it damages this model: do not set it; leave rope_freq_base to the model."
    elif v.ci_high < 1:
        outcome = (f"lower perplexity on {study.ppl_n_ctx}-token chunks; RoPE acts over long distances, so check at "
                   f"longer chunks (ppl_n_ctx) before trusting an override the model was not trained with.")
    else:
        outcome = f"no measurable change on {study.ppl_n_ctx}-token chunks."
    own = f"{c.rope_freq_base:g}" if c.rope_freq_base else "unset"
    words = [head + f"Overriding rope_freq_base with the guide's {base:g} (model's own: {own}) changes perplexity by "
             f"a factor {v.effect:.3f} (95 % CI {v.ci_low:.3f}-{v.ci_high:.3f}): " + outcome]
    kt = kv_table(df, study)
    kv = []
    if not kt.empty and "ppl_ratio_vs_f16fa" in kt:
        for _, r in kt.iterrows():
            if r["type_k"] == "f16" and r["type_v"] == "f16":
                continue
            kv.append({"kv": r["kv"], "kv_mib": r["kv_mib_computed"], "kv_mib_saved": r.get("kv_mib_saved_computed"),
                       "ppl_ratio": r["ppl_ratio_vs_f16fa"], "ppl_ratio_ci": r["ppl_ratio_ci"],
                       "kld_mean": r["kld_mean"], "tg_ts": r[f"tg_ts@d{study.kv_depth}"]})
            words.append(f"KV {r['type_k']}: saves {r.get('kv_mib_saved_computed', float('nan')):.0f} MiB at n_ctx "
                         f"{r['n_ctx']}, perplexity x{r['ppl_ratio_vs_f16fa']:.4f} {r['ppl_ratio_ci']}, "
                         f"KLD {r['kld_mean']:.4g}.")
    v.details.update(setting_check=check, kv_types=kv, model_rope_freq_base=c.rope_freq_base,
                     model_n_ctx_train=c.n_ctx_train)
    v.summary = " ".join(words)
    return v


def figure(df, study: ContextStudy):
    """Four panels: allocated n_ctx (tg, TTFT), depth (tg, pp), memory (computed KV vs measured), KV types."""
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    from kit.plots import samples_long, setup

    setup()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    a = _ok(df, "allocated")
    ax = axes[0, 0]
    if not a.empty:
        gen = samples_long(a[a["test_kind"] == "tg"])
        sns.pointplot(data=gen, x="n_ctx", y="samples_ts", estimator=np.median, errorbar=("ci", 95), ax=ax,
                      color="C0", markersize=4)
        ax.set_ylabel("tg tokens/s", color="C0")
        ax2 = ax.twinx()
        tt = samples_long(a[a["test_kind"] == "pg"], "samples_ns")
        tt = tt.assign(ttft_ms=tt["samples_ns"] / 1e6)
        sns.pointplot(data=tt, x="n_ctx", y="ttft_ms", estimator=np.median, errorbar=("ci", 95), ax=ax2,
                      color="C3", markersize=4)
        ax2.set_ylabel(f"TTFT ms ({study.prompt_tokens}-token prompt)", color="C3")
        ax2.grid(False)
    ax.set_title("Allocated n_ctx, same prompt")
    ax = axes[0, 1]
    dd = _ok(df, "depth")
    if not dd.empty:
        sns.pointplot(data=samples_long(dd), x="n_depth", y="samples_ts", hue="test_kind", estimator=np.median,
                      errorbar=("ci", 95), ax=ax, markersize=4)
        ax.set_ylabel("tokens/s")
    ax.set_title(f"Used context (depth), n_ctx {study.depth_ctx}")
    ax = axes[1, 0]
    t = allocated_table(df, study)
    if not t.empty:
        ax.plot(t["n_ctx"], t["kv_mib_computed"], "o-", label="KV cache, computed (f16)")
        if "rss_anon_vs_smallest" in t:
            ax.plot(t["n_ctx"], t["rss_anon_vs_smallest"] + t["kv_mib_computed"].iloc[0], "s--",
                    label="anonymous RSS growth (+ smallest KV)")
        ax.set_xlabel("n_ctx")
        ax.set_ylabel("MiB")
        ax.legend()
    ax.set_title("Memory against n_ctx")
    ax = axes[1, 1]
    k = kv_table(df, study)
    if not k.empty and "ppl" in k:
        for i, r in k.iterrows():
            ax.errorbar(r["kv_mib_computed"], r["ppl"], yerr=r["ppl_stderr"], fmt="o", label=r["kv"], color=f"C{i}")
        r = rope_table(df, study)
        for _, x in r[r["source"] == "override"].iterrows():
            ax.axhline(x["ppl"], ls=":", color="k", label=f"rope_freq_base {x['rope_freq_base']:g} (f16)")
        ax.set_xlabel(f"KV cache MiB at n_ctx {study.kv_n_ctx}")
        ax.set_ylabel("perplexity (held-out text)")
        ax.legend(fontsize=8)
    ax.set_title("KV cache type: memory vs quality")
    fig.tight_layout()
    return fig
