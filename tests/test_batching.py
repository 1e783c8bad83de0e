"""kit.studies.batch_flash_attn: the study config, the decode/micro-batch plan, tables, verdicts, and the cached-depth tests
on the real bundled model."""
from __future__ import annotations

import math
import random

import pandas as pd
import pytest

from kit.studies import batch_flash_attn
from kit import measure
from kit.config import Settings, SettingsError, StudyConfigError
from kit.measure import load_model, pp
from kit.sweep import planned_rows
from kit.verdicts import (INCONCLUSIVE, MIXED, NO_EFFECT, NOT_TESTABLE, REFUTED, SUPPORTED, decide, evidence_path,
                          median_ci)


# ---- config -------------------------------------------------------------------------------------------------------
def test_default_study_is_the_notebooks_grid() -> None:
    s = batch_flash_attn.BatchFlashStudy()
    pairs = {(c.n_batch, c.n_ubatch) for c in s.batch_configs()}
    assert pairs == {(512, 128), (512, 512), (1024, 128), (1024, 512)}  # every cell valid: nothing skipped
    assert s.skipped_combos().empty
    assert all(c.n_ctx == 640 for c in s.batch_configs())  # the longest prompt
    assert s.out_path.is_absolute() and s.out_path.name == "20_batch_flash_attn"


def test_a_grid_with_invalid_cells_skips_them() -> None:
    s = batch_flash_attn.BatchFlashStudy(n_batch=[128, 256, 512, 1024], n_ubatch=[128, 256, 512],
                                         prompt_lengths=[256, 1024], depths=[0, 1024, 2048], fa_n_prompt=128,
                                         fa_n_gen=32)
    configs = s.batch_configs()
    pairs = {(c.n_batch, c.n_ubatch) for c in configs}
    assert (512, 512) in pairs and (1024, 512) in pairs
    assert all(u <= b for b, u in pairs)
    skipped = {(c["n_batch"], c["n_ubatch"]) for c, _ in configs.skipped}
    assert skipped == {(128, 256), (128, 512), (256, 512)}
    assert len(configs) + len(skipped) == 4 * 3
    assert list(s.skipped_combos().columns) == ["n_batch", "n_ubatch", "why"]
    assert all(c.n_ctx == 1024 for c in configs)  # the longest prompt
    assert [t.n_prompt for t in s.batch_tests()] == [256, 1024]
    fa = s.flash_configs()
    assert [c.flash_attn for c in fa] == [False, True]
    assert fa[0].n_ctx >= 2048 + 128
    assert fa[0].n_threads is None  # 0 = llama-cpp-python's default
    tests = s.flash_tests()
    assert {(t.n_depth, t.n_prompt, t.n_gen) for t in tests} == {(d, 128, 0) for d in (0, 1024, 2048)} | {
        (d, 0, 32) for d in (0, 1024, 2048)}
    assert {t.kind for t in tests} == {"pp", "tg"}
    assert {t.name for t in tests} >= {"pp128", "tg32", "pp128 @ d1024", "tg32 @ d2048"}


@pytest.mark.parametrize("bad, match", [
    (dict(n_batch=[]), "must not be empty"),
    (dict(n_batch=[512, 512]), "duplicates"),
    (dict(n_ubatch=[0, 512]), "must be >= 1"),
    (dict(prompt_lengths="256"), "expected list"),
    (dict(prompt_lengths=[256.0]), "expected list"),
    (dict(depths=[-1]), "must be >= 0"),
    (dict(guide_batch=[2048, 512]), "must be in the grid"),
    (dict(baseline_batch=[512]), "must have 2 elements"),
    (dict(batch_n_ctx=512), "cannot hold the longest prompt"),
    (dict(repetitions=0), "must be >= 1"),
    (dict(repetitions="3"), "expected int"),
    (dict(n_threads=-1), "must be >= 0"),
    (dict(timeout_s=0), "must be > 0"),
])
def test_study_rejects_bad_parameters(bad, match) -> None:
    with pytest.raises(StudyConfigError, match=match):
        batch_flash_attn.BatchFlashStudy(**bad)


def test_study_rejects_bad_fixed_settings_before_any_trial() -> None:
    with pytest.raises(SettingsError, match="n_ubatch"):  # Settings' own rule: n_ubatch > n_batch
        batch_flash_attn.BatchFlashStudy(fa_n_batch=256, fa_n_ubatch=512)


# ---- micro-batch plan -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_prompt, nb, nub, calls, sizes", [
    (1024, 1024, 512, 1, (512, 512)),
    (1024, 512, 512, 2, (512, 512)),
    (256, 1024, 512, 1, (256,)),
    (1000, 512, 128, 2, (128, 128, 128, 128, 128, 128, 128, 104)),
    (200, 64, 64, 4, (64, 64, 64, 8)),
])
def test_ubatch_plan(n_prompt, nb, nub, calls, sizes) -> None:
    assert batch_flash_attn.ubatch_plan(n_prompt, nb, nub) == (calls, sizes)
    assert sum(batch_flash_attn.ubatch_plan(n_prompt, nb, nub)[1]) == n_prompt


def test_median_ci_brackets_the_median() -> None:
    rng = random.Random(1)
    xs = [100 + rng.gauss(0, 5) for _ in range(30)]
    med, lo, hi = median_ci(xs)
    assert lo <= med <= hi and hi - lo < 10
    assert median_ci([7.0]) == (7.0, None, None)  # one sample: no interval
    assert median_ci([]) == (None, None, None)


# ---- tables and verdicts on synthetic rows ------------------------------------------------------------------------
def _row(n_prompt, nb, nub, ts, n_ctx=1024, status="ok", **kw):
    samples = [ts * (1 + 0.01 * i) for i in range(-2, 3)]
    return {"trial_key": f"{n_prompt}-{nb}-{nub}-{kw.get('flash_attn', False)}-{kw.get('n_depth', 0)}",
            "status": status, "test_kind": kw.pop("test_kind", "pp"), "n_prompt": n_prompt, "n_gen": kw.pop("n_gen", 0),
            "n_depth": kw.pop("n_depth", 0), "n_batch": nb, "n_ubatch": nub,
            "n_batch_effective": min(nb, n_ctx), "n_ubatch_effective": min(nub, nb, n_ctx),
            "samples_ts": samples, "samples_ns": [int(max(n_prompt, 1) / x * 1e9) for x in samples],
            "cv": 0.01, "flash_attn": kw.pop("flash_attn", False), **kw}


def _grid_rows(speed):
    rows = []
    for n in (256, 1024):
        for nb in (256, 512, 1024, 2048):
            for nub in (256, 512):
                if nub <= nb:
                    rows.append(_row(n, nb, nub, speed(n, nb, nub)))
    return pd.DataFrame(rows)


def test_batch_table_flags_clamps_and_identical_work() -> None:
    t = batch_flash_attn.batch_table(_grid_rows(lambda n, nb, nub: 300.0))
    r = t[(t.n_prompt == 1024) & (t.n_batch == 2048) & (t.n_ubatch == 512)].iloc[0]
    assert r.n_batch_effective == 1024 and r.clamped == "n_batch 2048->1024"
    assert r.duplicate_of == "1024/512"  # llama.cpp ran the same configuration
    r = t[(t.n_prompt == 1024) & (t.n_batch == 1024) & (t.n_ubatch == 512)].iloc[0]
    assert r.decode_calls == 1 and r.ubatches == "2x512" and pd.isna(r.clamped) and pd.isna(r.duplicate_of)
    r = t[(t.n_prompt == 1024) & (t.n_batch == 512) & (t.n_ubatch == 512)].iloc[0]
    assert r.decode_calls == 2 and r.ubatches == "2x512" and pd.isna(r.same_work_as)  # different call count
    # at 256 tokens every n_batch >= 256 with n_ubatch 256 or 512 is one call of one 256-token micro-batch
    short = t[t.n_prompt == 256]
    assert short.same_work_as.isna().sum() == 1
    assert set(short.same_work_as.dropna()) == {"256/256"}
    # TTFT is the prompt time: n_prompt / t/s
    r = t.iloc[0]
    assert r.ttft_ms == pytest.approx(r.n_prompt / r.pp_ts * 1e3, rel=1e-6)
    assert r.pp_ts_lo <= r.pp_ts <= r.pp_ts_hi


def test_g3_verdict_follows_the_data() -> None:
    study = batch_flash_attn.BatchFlashStudy(n_batch=[256, 512, 1024, 2048], n_ubatch=[256, 512],
                                         prompt_lengths=[256, 1024])
    faster = batch_flash_attn.verdict_batch(_grid_rows(lambda n, nb, nub: 400.0 if (nb, nub) == (1024, 512) else 300.0),
                                    study, gpu_offload=False)
    assert faster.claim == "G3" and faster.verdict == SUPPORTED
    assert faster.effect == pytest.approx(4 / 3, rel=0.02)
    assert "not testable here" in faster.reason and faster.details["scope"] == "cpu"
    assert [p["n_prompt"] for p in faster.details["per_prompt"]] == [256, 1024]
    assert faster.details["per_prompt"][0]["same_work"] is True  # 256 tokens: both one call, one micro-batch
    assert faster.details["per_prompt"][1]["same_work"] is False
    slower = batch_flash_attn.verdict_batch(_grid_rows(lambda n, nb, nub: 200.0 if (nb, nub) == (1024, 512) else 300.0),
                                    study, gpu_offload=True)
    assert slower.verdict == REFUTED and slower.details["scope"] == "gpu" and "not testable" not in slower.reason
    same = batch_flash_attn.verdict_batch(_grid_rows(lambda n, nb, nub: 300.0), study, gpu_offload=False)
    assert same.verdict == NO_EFFECT and same.band == 0.05
    # the same work at 256 tokens (one call, one micro-batch), a gain at 1024: depends on the prompt length
    mixed = batch_flash_attn.verdict_batch(
        _grid_rows(lambda n, nb, nub: 400.0 if (n, nb, nub) == (1024, 1024, 512) else 300.0), study, gpu_offload=False)
    assert mixed.verdict == MIXED and mixed.depends_on == "prompt length"
    assert {c["condition"]: c["verdict"] for c in mixed.conditions} == {
        "256-token prompt (same decode calls and micro-batches)": NO_EFFECT, "1024-token prompt": SUPPORTED}
    assert mixed.effect == pytest.approx(4 / 3, rel=0.02)  # the longest prompt's
    failed = _grid_rows(lambda n, nb, nub: 300.0)
    failed["status"] = "error"
    assert batch_flash_attn.verdict_batch(failed, study).verdict == NOT_TESTABLE


def _flash_rows(on_factor, depths=(0, 1024), spread=0.01):
    rows = []
    for fa in (False, True):
        for d in depths:
            for mode in ("pp", "tg"):
                base = 300.0 if mode == "pp" else 100.0
                ts = base * (on_factor(mode, d) if fa else 1.0)
                r = _row(128 if mode == "pp" else 0, 512, 512, ts, flash_attn=fa, n_depth=d,
                         n_gen=0 if mode == "pp" else 32, test_kind=mode)
                r["samples_ts"] = [ts * (1 + spread * i) for i in range(-2, 3)]
                rows.append(r)
    return pd.DataFrame(rows)


def _labels(v) -> dict:
    return {c["condition"]: c["verdict"] for c in v.conditions}


def test_g2_verdict_agreeing_and_mixed() -> None:
    v = batch_flash_attn.verdict_flash(_flash_rows(lambda m, d: 1.3), gpu_offload=False)
    assert v.claim == "G2" and v.verdict == SUPPORTED and v.depends_on == "test and context depth"
    assert list(_labels(v)) == ["pp at depth 0", "tg at depth 0", "pp at depth 1024", "tg at depth 1024"]
    assert set(_labels(v).values()) == {SUPPORTED}
    # faster prompts, the same decode at depth 0, slower decode at depth: mixed, every condition's label kept
    v = batch_flash_attn.verdict_flash(_flash_rows(lambda m, d: 1.3 if m == "pp" else (0.8 if d else 1.0)),
                                       gpu_offload=False)
    assert v.verdict == MIXED and "Depends on the test and the context depth" in v.summary
    assert _labels(v) == {"pp at depth 0": SUPPORTED, "tg at depth 0": NO_EFFECT, "pp at depth 1024": SUPPORTED,
                          "tg at depth 1024": REFUTED}
    # the effect shown is decode at the deepest context
    assert v.details["headline"] == "tg at depth 1024" and v.effect == pytest.approx(0.8, rel=0.02)
    assert batch_flash_attn.verdict_flash(pd.DataFrame()).verdict == NOT_TESTABLE
    t = batch_flash_attn.flash_table(_flash_rows(lambda m, d: 1.0))
    assert set(t.test) == {"pp128", "tg32"} and len(t) == 8


def test_g2_issue_example_is_mixed_not_one_word() -> None:
    """x1.13 pp and x1.16 tg at depth 0, x0.925 tg at depth 1024 (two runs labelled it "refuted" and "no measurable
    effect"): mixed, with each condition's own label."""
    factors = {("pp", 0): 1.13, ("tg", 0): 1.16, ("pp", 1024): 1.0, ("tg", 1024): 0.925}
    v = batch_flash_attn.verdict_flash(_flash_rows(lambda m, d: factors[(m, d)]), gpu_offload=False)
    labels = _labels(v)
    assert v.verdict == MIXED
    assert labels["pp at depth 0"] == labels["tg at depth 0"] == SUPPORTED
    assert labels["tg at depth 1024"] == REFUTED and labels["pp at depth 1024"] == NO_EFFECT
    for c in v.conditions:  # each label is the one rule's on its own interval and the claim's band
        assert c["verdict"] == decide(c["ci_low"], c["ci_high"], equivalence=c["band"]) and c["band"] == 0.05


def test_g2_wide_interval_is_inconclusive_with_the_samples_that_would_decide_it() -> None:
    """A 3 % gain with +-20 % spread can be neither a gain nor inside the band: inconclusive, not "no effect"."""
    v = batch_flash_attn.verdict_flash(_flash_rows(lambda m, d: 1.03, depths=(0,), spread=0.1), gpu_offload=False)
    assert v.verdict == INCONCLUSIVE
    for c in v.conditions:
        assert c["verdict"] == INCONCLUSIVE and c["ci_low"] < 0.95 and c["ci_high"] > 1.05
        assert c["samples_to_decide"] > c["n_candidate"] == 5
    assert v.samples_to_decide == max(c["samples_to_decide"] for c in v.conditions)
    assert v.label().startswith("inconclusive: about ") and "samples per side would decide it" in v.label()


def test_planned_rows_drops_rows_of_other_parameters() -> None:
    from kit.models import model_card
    from kit.sweep import trial_key

    s = Settings(n_ctx=512)
    sha = model_card("smollm2-135m").sha256
    keep = trial_key(sha, s, pp(64), 2)
    df = pd.DataFrame([{"trial_key": keep, "x": 1}, {"trial_key": trial_key(sha, s, pp(64), 3), "x": 2}])
    out = planned_rows(df, [s], [pp(64)], 2)
    assert list(out.x) == [1]


def test_evidence_path_is_relative_to_outputs_root(tmp_path) -> None:
    out = tmp_path / "outputs" / "20_x"
    assert evidence_path(out / "figures" / "a.png", out) == "20_x/figures/a.png"


# ---- depth tests on the real model (in process) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    m = load_model(Settings(n_ctx=256, n_batch=64, n_ubatch=64))
    yield m
    m.close()


def test_pp_at_depth_rolls_back_to_the_depth(lm) -> None:
    import llama_cpp

    # 200 + 3 x 40 tokens would overflow n_ctx=256 unless every repetition starts again at depth 200
    test = batch_flash_attn.depth_test("pp", 40, 200)
    row = measure.bench_engine(lm, test, repetitions=3)
    assert len(row["samples_ts"]) == 3 and all(x > 0 for x in row["samples_ts"])
    assert row["n_depth"] == 200 and row["n_prompt"] == 40
    assert row["depth_fill_ms"] > 0
    assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(lm.ctx), 0) == 200 + 40 - 1
    assert row["samples_ts"][0] == pytest.approx(40 / (row["samples_ns"][0] / 1e9), rel=1e-3)
    # llama.cpp's own counters agree with the wall clock (within scheduling noise)
    assert 0.5 < row["perf_wall_ratio"] < 2.0


def test_tg_at_depth_and_no_depth(lm) -> None:
    import llama_cpp

    row = measure.bench_engine(lm, batch_flash_attn.depth_test("tg", 8, 100), repetitions=2)
    assert row["n_gen"] == 8 and len(row["samples_ns"]) == 2
    assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(lm.ctx), 0) == 100 + 8 - 1
    row = measure.bench_engine(lm, batch_flash_attn.depth_test("tg", 8, 0), repetitions=2)
    assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(lm.ctx), 0) == 8 - 1
    assert math.isfinite(row["median_ts"]) and "depth_fill_ms" not in row


def test_depth_fill_is_paid_once_per_test(lm, monkeypatch) -> None:
    calls = []
    real = measure._decode_prompt
    monkeypatch.setattr(measure, "_decode_prompt", lambda m, n, rng: (calls.append(n), real(m, n, rng)))
    measure._clear_kv(lm.ctx)
    row = measure.bench_engine(lm, batch_flash_attn.depth_test("tg", 4, 150), repetitions=4)
    assert calls == [150] and row["depth_reused"] is False  # one fill; the runs only decode single tokens
    # the next test at a depth the cache already holds keeps those tokens: no fill at all
    calls.clear()
    row = measure.bench_engine(lm, batch_flash_attn.depth_test("pp", 16, 120), repetitions=2)
    assert calls == [16, 16, 16] and row["depth_reused"] is True and row["depth_fill_ms"] == 0
    # a pp test at depth 0 leaves its prompt in the cache: a tg at that depth reuses it, as pp256 -> tg32 @ d256
    measure.bench_engine(lm, measure.pp(100), repetitions=1)
    assert measure.bench_engine(lm, measure.tg(4, depth=100), repetitions=1)["depth_reused"] is True
    assert measure.bench_engine(lm, measure.tg(4, depth=200), repetitions=1)["depth_reused"] is False


def test_depth_test_refuses_what_does_not_fit_or_mixes_modes(lm) -> None:
    with pytest.raises(ValueError, match="smaller than the test pp100 @ d200"):
        measure.bench_engine(lm, batch_flash_attn.depth_test("pp", 100, 200), repetitions=1)
    with pytest.raises(ValueError):
        batch_flash_attn.depth_test("pg", 8, 0)


def test_equal_speeds_give_no_effect_at_every_depth() -> None:
    v = batch_flash_attn.verdict_flash(_flash_rows(lambda m, d: 1.0), gpu_offload=True)
    assert v.verdict == NO_EFFECT and v.details["scope"] == "gpu" and v.band == 0.05
    assert all(c["verdict"] == NO_EFFECT and 0.95 <= c["ci_low"] <= 1.0 <= c["ci_high"] <= 1.05
               for c in v.conditions)
    assert v.details["n_depth"] == 1024 and v.details["test"] == "tg" and len(v.conditions) == 4


def test_too_few_samples_give_no_verdict() -> None:
    """One sample per side makes a zero-width interval: a point estimate must not become a verdict."""
    df = _flash_rows(lambda m, d: 1.5)
    df["samples_ts"] = [s[:1] for s in df["samples_ts"]]
    v = batch_flash_attn.verdict_flash(df, gpu_offload=True)
    assert v.verdict == NOT_TESTABLE and "too few samples" in v.reason
    assert v.conditions[0]["details"]["point_ratio"] == pytest.approx(1.5, rel=0.05)
    assert "point estimate" in v.summary
    rows = _grid_rows(lambda n, nb, nub: 400.0 if (nb, nub) == (1024, 512) else 300.0)
    rows["samples_ts"] = [s[:2] for s in rows["samples_ts"]]
    study = batch_flash_attn.BatchFlashStudy(n_batch=[256, 512, 1024, 2048], n_ubatch=[256, 512],
                                         prompt_lengths=[256, 1024])
    g3 = batch_flash_attn.verdict_batch(rows, study, gpu_offload=False)
    assert g3.verdict == NOT_TESTABLE and g3.details["per_prompt"][-1]["effect"] == pytest.approx(4 / 3, rel=0.02)
