"""kit.studies.context_kv: statistics, study validation and expansion, model properties, and the verdict logic."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from kit.config import StudyConfigError
from kit.models import model_card
from kit.paths import DEFAULT_MODEL, REPO_ROOT
from kit.studies import context_kv as context
from kit.verdicts import INCONCLUSIVE, MIXED, NO_EFFECT, REFUTED, SUPPORTED, decide, paired_log_ratio


def test_paired_ppl_ratio():
    base = [2.0, 2.5, 1.8, 2.2, 2.9, 2.1]
    assert paired_log_ratio(base, base) == (1.0, 1.0, 1.0)
    pt, lo, hi = paired_log_ratio([x + 0.1 for x in base], base)
    assert pt == pytest.approx(math.exp(0.1)) and lo == pytest.approx(math.exp(0.1))
    # pairing removes the chunk-to-chunk spread: a small consistent shift is still detected
    pt, lo, hi = paired_log_ratio([x + 0.01 + 0.002 * i for i, x in enumerate(base)], base)
    assert lo > 1
    with pytest.raises(ValueError):
        paired_log_ratio([1.0], [1.0, 2.0])


def test_ppl_ratio_verdict_directions_follow_the_one_rule():
    base = [2.0, 2.5, 1.8, 2.2, 2.9, 2.1]
    worse = [x + 0.2 for x in base]
    v = context.ppl_ratio_verdict("M2", worse, base, claimed="better")
    assert v.verdict == REFUTED and v.effect == pytest.approx(math.exp(0.2), abs=1e-4) and v.ci_low > 1
    assert v.n_candidate == v.n_baseline == 6 and "paired over 6 chunks" in v.summary
    assert context.ppl_ratio_verdict("M2", worse, base, claimed="worse").verdict == SUPPORTED
    better = [x - 0.2 for x in base]
    assert context.ppl_ratio_verdict("M2", better, base, claimed="better").verdict == SUPPORTED
    # +-5 % per chunk either way: the interval holds 1 but is wider than M2's +-1 % band: inconclusive
    noisy = [x + (0.05 if i % 2 else -0.05) for i, x in enumerate(base)]
    v = context.ppl_ratio_verdict("M2", noisy, base, claimed="better")
    assert v.verdict == INCONCLUSIVE and v.ci_low < 0.99 and v.ci_high > 1.01 and v.band == 0.01
    assert v.samples_to_decide > 6 and v.label().startswith("inconclusive: about")
    # +-0.2 % per chunk: the whole interval inside the band
    tiny = [x + (0.002 if i % 2 else -0.002) for i, x in enumerate(base)]
    v = context.ppl_ratio_verdict("M2", tiny, base, claimed="better")
    assert v.verdict == NO_EFFECT and 0.99 <= v.ci_low < 1 < v.ci_high <= 1.01
    assert context.ppl_ratio_verdict("M2", tiny, base, claimed="same").verdict == SUPPORTED
    # the label is kit.verdicts.decide's on the paired interval and M2's band, lower perplexity being better
    for cand in (worse, better, noisy, tiny):
        _, lo, hi = paired_log_ratio(cand, base)
        assert context.ppl_ratio_verdict("M2", cand, base, claimed="better").verdict == \
            decide(lo, hi, claimed="better", higher_is_better=False, equivalence=0.01)


def test_study_excludes_beyond_train_and_says_so():
    s = context.ContextStudy(n_ctx_values=[512, 4096, 16384], depths=[0, 1024])
    train = model_card(DEFAULT_MODEL).n_ctx_train
    assert s.beyond_train == [16384] and s.n_ctx_run == [512, 4096] and 16384 > train
    note = context.beyond_train_note(s)
    assert "16384" in note and str(train) in note and "not run" in note
    s2 = context.ContextStudy(n_ctx_values=[512, 16384], depths=[0, 1024], allow_beyond_train=True)
    assert s2.n_ctx_run == [512, 16384] and "were run" in context.beyond_train_note(s2)


@pytest.mark.parametrize("bad", [
    {"kv_types": ["f16", "q3_k"]}, {"kv_types": ["q8_0"]}, {"n_ctx_values": []}, {"n_ctx_values": [16384]},
    {"depths": [0, 9000]}, {"prompt_tokens": 600, "n_ctx_values": [512]}, {"fill_fraction": 1.5},
    {"rope_freq_bases": [0]}, {"kv_depth": 2040}, {"repetitions": 0}, {"ppl_n_ctx": 4096},
])
def test_study_validation(bad):
    with pytest.raises(StudyConfigError):
        context.ContextStudy(**bad)


def test_defaults_are_the_notebook_values_and_resolve_from_the_repository_root():
    s = context.ContextStudy()
    assert s.n_ctx_values == [1024, 4096, 8192, 16384] and s.ppl_chunks == 3 and s.prompt_tokens == 128
    assert s.n_ctx_run == [1024, 4096, 8192] and s.beyond_train == [16384] and s.depth_ctx == 8192
    assert s.out_path == REPO_ROOT / "outputs" / "30_context_kv"
    assert s.reference_path().is_relative_to(REPO_ROOT / "outputs" / "30_context_kv" / "cache")
    assert all(context.ContextStudy.help()[name] for name in context.ContextStudy.defaults())


def test_study_expansion():
    s = context.ContextStudy(n_ctx_values=[512, 2048], depths=[0, 1024], kv_types=["f16", "q8_0", "q4_0"],
                             prompt_tokens=256, n_gen=64, fill_max_n_ctx=2048)
    cfgs, tests = s.allocated_plan()
    assert [c.n_ctx for c in cfgs] == [512, 2048]
    assert [t.name for t in tests] == ["memory_probe", "pp256+tg1", "tg64"]
    assert all(t.params["part"] == "allocated" for t in tests)
    fills = s.fill_plans()
    assert [(c.n_ctx, t[0].n_prompt) for c, t in fills] == [(512, 459), (2048, 1842)]
    (dc,), dt = s.depth_plan()
    assert dc.n_ctx == 2048 and {t.n_depth for t in dt} == {0, 1024}
    kv = s.kv_configs()
    assert (kv[0].type_k, kv[0].type_v, kv[0].flash_attn) == ("f16", "f16", True)  # the reference first
    assert (kv[1].type_v, kv[1].flash_attn) == ("f16", False)
    assert all(c.flash_attn for c in kv if c.type_v != "f16")
    assert [c.type_k for c in kv] == ["f16", "f16", "q8_0", "q4_0"]
    q = s.quality_test()
    assert q.params["create"] is False and q.params["reference_sha256"] == s.card.sha256
    assert [c.rope_freq_base for c in s.rope_configs()] == [10000.0]


def test_model_properties_and_setting_check():
    s = context.ContextStudy()
    t = context.model_properties_table(s).set_index("property")
    assert t.loc["n_ctx_train", "model (GGUF)"] == f"{s.card.n_ctx_train:g}" == "8192"
    assert t.loc["n_ctx_train", "guide"] == "131072" and t.loc["rope_freq_base", "guide"] == "10000"
    assert float(t.loc["rope_freq_base", "model (GGUF)"]) == s.card.rope_freq_base
    check = context.guide_setting_check()
    assert not check["accepted"] and "property of the model" in check["message"]


# ---- verdict logic on synthetic rows ---------------------------------------------------------------------------
def _alloc_rows(tg_small, tg_large, small=4096, large=8192):
    rows = []
    for n, xs in ((small, tg_small), (large, tg_large)):
        rows.append({"part": "allocated", "status": "ok", "n_ctx": n, "n_ctx_effective": n, "test_kind": "tg",
                     "samples_ts": xs, "load_ms": 10.0})
        rows.append({"part": "allocated", "status": "ok", "n_ctx": n, "n_ctx_effective": n, "test_kind": "pg",
                     "samples_ns": [1_000_000 * x for x in (100, 101, 99, 100)], "samples_ts": [1, 1], "load_ms": 10.0})
    for d, xs in ((0, [100, 101, 99, 100]), (2048, [60, 61, 59, 60])):
        rows.append({"part": "depth", "status": "ok", "n_ctx": large, "n_depth": d, "test_kind": "tg",
                     "samples_ts": xs})
    return pd.DataFrame(rows)


def test_m1_verdict():
    s = context.ContextStudy(n_ctx_values=[512, 4096, 8192, 16384], depths=[0, 2048])
    assert s.depth_ctx == 8192
    v = context.m1_verdict(_alloc_rows([100, 101, 99, 100, 102], [100, 99, 101, 100, 98]), s)
    assert v.claim == "M1" and v.verdict == NO_EFFECT and v.band == 0.05
    assert {c["condition"]: c["verdict"] for c in v.conditions} == {"tg t/s": NO_EFFECT, "TTFT": NO_EFFECT}
    assert v.details["ttft"]["verdict"] == NO_EFFECT
    assert v.details["used_tg"]["verdict"] == SUPPORTED and v.details["used_tg"]["effect"] == pytest.approx(0.6)
    assert "16384" in v.summary and v.details["kv_mib_saved"] > 0 and "by less than the band" in v.summary
    # faster tg, the same TTFT: mixed, both kept
    v = context.m1_verdict(_alloc_rows([120, 121, 119, 120, 122], [100, 99, 101, 100, 98]), s)
    assert v.verdict == MIXED and {c["condition"]: c["verdict"] for c in v.conditions} == {
        "tg t/s": SUPPORTED, "TTFT": NO_EFFECT}
    assert v.effect == pytest.approx(1.2, rel=0.01)  # tg's, the headline
    # a 2 % difference within +-25 % spread: inconclusive (it used to read "no measurable effect")
    v = context.m1_verdict(_alloc_rows([102, 75, 125, 80, 120], [100, 125, 75, 120, 80]), s)
    tg = next(c for c in v.conditions if c["condition"] == "tg t/s")
    assert tg["verdict"] == INCONCLUSIVE and tg["ci_low"] < 0.95 and tg["ci_high"] > 1.05
    assert tg["samples_to_decide"] > 5 and v.verdict == MIXED  # TTFT is still inside the band


def test_m2_verdict_from_rope_perplexity():
    s = context.ContextStudy()
    own = [2.0, 2.5, 1.8, 2.2, 2.9, 2.1]
    base = {"status": "ok", "test_kind": "kit.quality:kld_test", "type_k": "f16", "type_v": "f16",
            "flash_attn": True, "ppl": 9.0, "ppl_stderr": 0.5, "kld_mean": 0.0, "top1_agree_pct": 100.0,
            "ln_ppl_ratio": 0.0, "ln_ppl_ratio_stderr": 0.0, "n_ctx_effective": 2048, "n_ctx": 2048}
    rows = [dict(base, part="kv", rope_freq_base=None, chunk_nll=own),
            dict(base, part="rope", rope_freq_base=10000.0, chunk_nll=[x + 0.3 for x in own], ppl=12.0)]
    v = context.m2_verdict(pd.DataFrame(rows), s)
    assert v.claim == "M2" and v.verdict == REFUTED and v.effect > 1.3
    assert "damages" in v.summary and "n_ctx_train" in v.summary
    assert v.details["model_rope_freq_base"] == s.card.rope_freq_base


def test_tables_on_synthetic_rows():
    s = context.ContextStudy(n_ctx_values=[4096, 8192], depths=[0, 2048])
    df = _alloc_rows([100, 101, 99, 100, 102], [90, 91, 89, 90, 92])
    t = context.allocated_table(df, s).set_index("n_ctx")
    assert list(t.index) == [4096, 8192]
    assert t.loc[4096, "tg_ts"] == 100 and t.loc[8192, "tg_ts"] == 90
    assert t.loc[4096, "ttft_ms"] == pytest.approx(100.0) and t.loc[4096, "ttft_ci"].startswith("[")
    assert t.loc[8192, "kv_mib_computed"] == pytest.approx(2 * t.loc[4096, "kv_mib_computed"], rel=0.01)
    d = context.depth_table(df)
    assert list(zip(d["depth"], d["median_ts"])) == [(0, 100.0), (2048, 60.0)] and set(d["n_ctx"]) == {8192}
    fill = pd.DataFrame([{"part": "fill", "status": "ok", "n_ctx": 1024, "n_prompt": 920, "test_kind": "pg",
                          "samples_ns": [2_000_000_000, 2_100_000_000, 1_900_000_000]}])
    f = context.fill_table(fill)
    assert f.loc[0, "ttft_ms"] == pytest.approx(2000.0) and f.loc[0, "prompt_ts"] == pytest.approx(460.0)
    assert context.fill_table(pd.DataFrame()).empty and context.allocated_table(pd.DataFrame(), s).empty
