"""kit.studies.generation: prompt set, text statistics, study validation, the sampling test kind on the real model, verdicts."""
from __future__ import annotations

import math
import statistics

import pandas as pd
import pytest

from kit.config import Settings, SettingsError, StudyConfigError
from kit.data import PROMPTS_PATH, load_prompts
from kit.measure import Test as KitTest, load_model
from kit.paths import PROMPTS_FILE
from kit.results import read_rows
from kit.studies import generation as gen
from kit.verdicts import INCONCLUSIVE, NO_EFFECT, NOT_TESTABLE, REFUTED, SUPPORTED, band_of, compare, decide


# ---- prompts and text ---------------------------------------------------------------------------------------------
def test_prompt_set_is_valid_and_ordered():
    prompts = load_prompts()
    assert 10 <= len(prompts) <= 16
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert all(len(p["prompt"]) > 20 for p in prompts)
    assert load_prompts(n=3) == prompts[:3]
    with pytest.raises(ValueError):
        load_prompts(n=len(prompts) + 1)
    assert load_prompts(PROMPTS_PATH) == prompts  # a relative path is taken from the repository root
    assert (PROMPTS_FILE.parent.parent / PROMPTS_PATH) == PROMPTS_FILE


def test_load_prompts_rejects_a_bad_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(ValueError, match="unique"):
        load_prompts(f)
    f.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match="prompt"):
        load_prompts(f)


def test_text_stats():
    s = gen.text_stats("a b a b a b a b")
    assert s["n_words"] == 8
    assert s["distinct_1"] == 0.25
    assert s["distinct_2"] == round(2 / 7, 4)
    assert s["rep_4gram"] == 0.6  # 5 four-grams, 2 distinct
    fresh = gen.text_stats("one two three four five six")
    assert fresh["distinct_1"] == 1.0 and fresh["rep_4gram"] == 0.0
    assert gen.text_stats("")["distinct_1"] is None


# ---- the study config ----------------------------------------------------------------------------------------------
def test_study_validation_fails_early():
    with pytest.raises(StudyConfigError, match="temperature"):
        gen.GenerationStudy(temperatures=[-1.0])
    with pytest.raises(StudyConfigError, match="top_p"):
        gen.GenerationStudy(top_ps=[1.5])
    with pytest.raises(StudyConfigError, match="expected list"):
        gen.GenerationStudy(temperatures="0.1")
    with pytest.raises(StudyConfigError, match="repetitions"):
        gen.GenerationStudy(repetitions="abc")
    with pytest.raises(StudyConfigError, match="caps"):
        gen.GenerationStudy(caps=[64, 0, 512])
    with pytest.raises(SettingsError, match="n_ctx"):
        gen.GenerationStudy(caps=[64, 4096], n_ctx=2048)
    with pytest.raises(SettingsError, match="n_unlimited_prompts"):
        gen.GenerationStudy(n_cap_prompts=1, n_unlimited_prompts=2)
    with pytest.raises(SettingsError, match="s2_cap"):
        gen.GenerationStudy(caps=[64, 128])
    with pytest.raises(SettingsError, match="n_prompts"):
        gen.GenerationStudy(n_prompts=99)
    with pytest.raises(SettingsError, match="did you mean 'chatml'"):
        gen.GenerationStudy(chat_format="chat-ml")
    assert gen.GenerationStudy(chat_format="chatml").settings().chat_format == "chatml"


def test_defaults_are_what_make_study_runs():
    st = gen.GenerationStudy()
    assert st.temperatures == [0.0] and st.caps == [64, 512] and st.sweep_max_tokens == 48 and st.n_ctx == 1024
    assert list(st.sampling_variants()) == ["guide", "default", "temperature=0.0", "repeat_penalty=1.1"]
    assert st.out_path.is_absolute() and st.out_path.parts[-2:] == ("outputs", "70_generation")


def test_sampling_variants_and_tests():
    st = gen.GenerationStudy(temperatures=[0.0, 0.8], top_ps=[0.9], top_ks=[], repeat_penalties=[1.1],
                             caps=[64, 128, 256, 512])
    v = st.sampling_variants()
    assert list(v)[:2] == ["guide", "default"]
    assert v["guide"] == gen.GUIDE_SAMPLING
    d = Settings()
    assert v["default"] == {"temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k,
                            "repeat_penalty": d.repeat_penalty}
    assert "temperature=0.8" not in v  # the default itself is not run twice
    assert {"temperature=0.0", "top_p=0.9", "repeat_penalty=1.1"} <= set(v)
    tests = st.sampling_tests()
    assert len(tests) == len(v) and all(t.kind == gen.SAMPLING_KIND for t in tests)
    assert all(t.params["max_tokens"] == st.sweep_max_tokens for t in tests)
    caps = st.cap_tests()
    assert [t.params["max_tokens"] for t in caps] == [64, 128, 256, 512, None]
    assert len(caps[-1].params["prompts"]) == st.n_unlimited_prompts
    assert all(t.params["temperature"] == 0.1 for t in caps)  # the guide's sampling


# ---- the sampling test kind on the real model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    m = load_model(Settings(n_ctx=512))
    yield m
    m.close()


def test_sampling_test_greedy_is_deterministic_and_truncated(lm):
    prompts = load_prompts(n=2)
    t = KitTest(gen.SAMPLING_KIND, n_gen=12, params={"temperature": 0.0, "max_tokens": 12, "prompts": prompts,
                                                 "label": "greedy"})
    row = gen.sampling_test(lm, t, repetitions=2)
    assert row["label"] == "greedy" and row["temperature"] == 0.0 and row["max_tokens"] == 12
    assert row["n_requests"] == 4 and [r["seed"] for r in row["requests"]] == [42, 42, 43, 43]
    assert row["deterministic_share"] == 1.0  # greedy: the seed does not matter
    assert row["truncation_rate"] == 1.0  # 12 tokens cannot finish an answer to these prompts
    assert all(r["finish_reason"] == "length" for r in row["requests"])
    assert all(r["n_gen_tokens"] >= 10 for r in row["requests"])
    assert 0.5 < row["decode_ms_per_token"] < 2000
    assert 5 < row["median_ts"] < 2000
    # the row's speed columns come from kit.measure.requests_row, decode speed: 1000 / mean ITL per request
    assert row["samples_ts"] == pytest.approx([1e3 / x for x in row["samples_decode_ms_per_token"]], rel=1e-3)
    assert row["samples_n_gen_tokens"] == [r["n_gen_tokens"] for r in row["requests"]]
    assert row["finish_reasons"] == {"length": 4} and row["n_empty"] == 0
    assert all(0 < r["itl_p50_ms"] <= r["itl_p95_ms"] for r in row["requests"])
    # llama.cpp's decode is part of the per-token latency, not more than it
    assert row["engine_decode_ms_per_token"] <= row["decode_ms_per_token"] * 1.25
    assert len(row["samples_ts"]) == 4 and all(r["text"] for r in row["requests"])


def test_sampling_test_rejects_unknown_and_invalid_params(lm):
    with pytest.raises(SettingsError, match="unknown"):
        gen.sampling_test(lm, KitTest(gen.SAMPLING_KIND, params={"temprature": 0.1}), 1)
    with pytest.raises(SettingsError):
        gen.sampling_test(lm, KitTest(gen.SAMPLING_KIND, params={"top_p": 0.0}), 1)


def test_unlimited_stops_at_eos_or_n_ctx():
    m = load_model(Settings(n_ctx=128))
    n_ctx = m.effective["n_ctx_effective"]  # llama.cpp may pad n_ctx (to 256 here)
    try:
        prompts = load_prompts(n=1)
        row = gen.sampling_test(m, KitTest(gen.SAMPLING_KIND, params={"max_tokens": None, "temperature": 0.0,
                                                                   "prompts": prompts}), 1)
    finally:
        m.close()
    r = row["requests"][0]
    assert row["max_tokens_label"] == "unlimited" and row["max_tokens"] is None
    assert r["finish_reason"] in ("stop", "length")
    assert r["n_prompt_tokens"] + r["n_gen_tokens"] <= n_ctx
    if r["finish_reason"] == "length":  # only the context can stop an uncapped answer early
        assert r["n_prompt_tokens"] + r["n_gen_tokens"] >= n_ctx - 2


# ---- through the sweep ---------------------------------------------------------------------------------------------------
def test_study_rows_resume_and_carry_the_request_sampling(tmp_path):
    st = gen.GenerationStudy(n_ctx=512, n_prompts=1, sweep_max_tokens=8, temperatures=[0.0], top_ps=[], top_ks=[],
                             repeat_penalties=[], caps=[8], s2_cap=8, n_cap_prompts=1, n_unlimited_prompts=0,
                             repetitions=2, cap_repetitions=1, out_dir=str(tmp_path / "70_generation"))
    df = gen.run_generation_study(st, progress=False)
    assert (df["status"] == "ok").all(), df[["label", "error"]].to_string()
    assert set(df["label"]) == {"guide", "default", "temperature=0.0", "max_tokens=8"}
    # one short trial per seed, every configuration once in it, the order reversed on the next seed
    s1 = df[df["part"] == "sampling"]
    assert sorted(s1["seed"].unique()) == [42, 43] and s1.groupby("seed")["label"].nunique().eq(3).all()
    first, second = (s1[s1["seed"] == seed]["label"].tolist() for seed in (42, 43))   # in the order appended
    assert first == ["guide", "default", "temperature=0.0"] and second == first[::-1], (first, second)
    # the trial's configuration stays in the plain columns; what the requests used is test_<name>
    raw = df.drop_duplicates("label").set_index("label")
    assert (df["temperature"] == Settings().temperature).all()
    assert raw.loc["guide", "test_temperature"] == 0.1 and raw.loc["guide", "test_repeat_penalty"] == 1.1
    by = gen.request_sampling_view(df).drop_duplicates("label").set_index("label")
    assert by.loc["guide", "temperature"] == 0.1 and by.loc["guide", "repeat_penalty"] == 1.1
    assert by.loc["default", "temperature"] == Settings().temperature
    assert by.loc["max_tokens=8", "max_tokens"] == 8 and by.loc["max_tokens=8", "temperature"] == 0.1
    assert set(gen.requests_frame(df).query("label == 'guide'")["temperature"]) == {0.1}
    # greedy gives one text whatever the seed: counted over both seeds' trials
    assert gen.sampling_table(df).set_index("label").loc["temperature=0.0", "same text across seeds"] == 1.0
    assert (df["rss_peak_mb"] > 0).all() and "gpu_util_pct" in df
    n_lines = len(read_rows(tmp_path / "70_generation" / "results.jsonl"))
    gen.run_generation_study(st, progress=False)  # a rerun measures nothing again
    assert len(read_rows(tmp_path / "70_generation" / "results.jsonl")) == n_lines
    table = gen.sampling_table(df)
    assert list(table["label"]) == ["guide", "default", "temperature=0.0"]
    v1 = gen.s1_verdict(df)  # 1 prompt x 2 seeds a side: no interval worth the name
    assert v1.verdict == NOT_TESTABLE and "too few samples" in v1.reason
    v2 = gen.s2_verdict(df, cap=8)
    assert v2.verdict == NOT_TESTABLE and "unlimited" in v2.reason
    assert not gen.text_examples(df).empty


# ---- verdict logic on constructed rows -------------------------------------------------------------------------------------
def _req(pid, seed, e2e, n, finish):
    return {"prompt_id": pid, "seed": seed, "e2e_ms": e2e, "n_gen_tokens": n, "finish_reason": finish}


def test_s2_verdict_counts_latency_and_truncation():
    capped = [_req("a", s, 4000.0 + s, 512, "length") for s in range(3)] + \
             [_req("b", s, 1000.0 + s, 120, "stop") for s in range(3)] + \
             [_req("c", s, 3000.0 + s, 400, "stop") for s in range(3)]
    unl = [_req("a", s, 12000.0 + s, 1500, "stop") for s in range(3)] + \
          [_req("b", s, 1000.0 + s, 120, "stop") for s in range(3)]
    df = pd.DataFrame([
        {"status": "ok", "label": "max_tokens=512", "part": "max_tokens", "max_tokens_label": "512",
         "temperature": 0.1, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1, "max_tokens": 512, "requests": capped},
        {"status": "ok", "label": "max_tokens=unlimited", "part": "max_tokens", "max_tokens_label": "unlimited",
         "temperature": 0.1, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1, "max_tokens": None, "requests": unl},
    ])
    v = gen.s2_verdict(df)
    assert v.n_candidate == 6 and v.n_baseline == 6  # prompt c never ran unlimited: left out of the ratio
    # paired by prompt and seed: the geometric mean of the six per-request ratios (a: ~1/3, b: 1)
    ratios = [(4000.0 + s) / (12000.0 + s) for s in range(3)] + [1.0] * 3
    assert v.effect == pytest.approx(math.exp(statistics.fmean(math.log(r) for r in ratios)), rel=1e-3)
    assert v.details["paired_requests"] == 6 and "paired by prompt and seed" in v.metric
    assert v.details["truncation_rate_cap_all_prompts"] == pytest.approx(1 / 3, abs=1e-3)
    assert v.details["truncation_rate_unlimited_hit_n_ctx"] == 0.0
    assert v.details["unlimited_max_tokens_seen"] == 1500


def _s1_rows(guide_ts: list[float]):
    base = {"status": "ok", "samples_n_gen_tokens": [100, 120, 80, 90], "samples_e2e_ms": [900.0, 1000, 800, 850],
            "decode_ms_per_token": 8.0, "overhead_ms_per_token": 1.0, "max_tokens": 128}
    return pd.DataFrame([{**base, "label": "guide", "samples_ts": guide_ts},
                         {**base, "label": "default", "samples_ts": [120.2, 120.8, 119.2, 120.1, 119.9]}])


def test_s1_verdict_same_speed_is_no_effect():
    df = _s1_rows([120.0, 121, 119, 120.5, 119.5])
    v = gen.s1_verdict(df, equivalence=0.03)
    assert v.verdict == NO_EFFECT and v.band == 0.03 and v.band_why  # the study's own band, and why
    assert v.verdict == decide(v.ci_low, v.ci_high, equivalence=0.03)
    assert v.details["output_tokens_ratio"] == 1.0
    v = gen.s1_verdict(df[df["label"] == "guide"])
    assert v.verdict == NOT_TESTABLE and "no successful rows" in v.reason


def test_s1_verdict_a_wide_interval_is_inconclusive_not_no_effect():
    # spread that a 3 % band cannot hold: the interval contains 1 but reaches far outside the band
    v = gen.s1_verdict(_s1_rows([100.0, 140, 95, 150, 118]), equivalence=0.03)
    assert v.verdict == INCONCLUSIVE == decide(v.ci_low, v.ci_high, equivalence=0.03)
    assert v.samples_to_decide and v.samples_to_decide > 5 and "inconclusive: about" in v.summary


def test_s2_verdict_the_issues_wide_interval_is_inconclusive():
    """Issue 14: x1.04, 95 % CI 0.58-1.71 from 2 prompts was labelled "no measurable effect"; it says nothing."""
    capped = [_req("a", s, e, 48, "length") for s, e in enumerate((2100.0, 5200.0))] + \
             [_req("b", s, e, 48, "length") for s, e in enumerate((3500.0, 1900.0))]
    unl = [_req("a", s, e, 60, "stop") for s, e in enumerate((2500.0, 3000.0))] + \
          [_req("b", s, e, 90, "stop") for s, e in enumerate((4000.0, 1700.0))]
    df = pd.DataFrame([
        {"status": "ok", "label": "max_tokens=512", "part": "max_tokens", "max_tokens_label": "512", "requests": capped},
        {"status": "ok", "label": "max_tokens=unlimited", "part": "max_tokens", "max_tokens_label": "unlimited",
         "requests": unl}])
    v = gen.s2_verdict(df)
    # paired by prompt and seed (ratios 0.84, 1.73, 0.875, 1.12): still far wider than the band on both sides
    assert v.ci_low < 0.9 and v.ci_high > 1.3 and 0.9 < v.effect < 1.2, (v.effect, v.ci_low, v.ci_high)
    assert v.band == band_of("S2").width and v.band_why
    assert v.verdict == INCONCLUSIVE == decide(v.ci_low, v.ci_high, higher_is_better=False, equivalence=v.band)
    assert v.samples_to_decide > 4 and v.label().startswith("inconclusive: about")
    assert "no meaningful effect" not in v.summary and "no measurable effect" not in v.summary


def test_verdicts_name_the_cause_when_every_trial_failed():
    err = "ChatTemplateError: the chat template could not be rendered: SecurityError: unsafe"
    df = pd.DataFrame([{"status": "error", "error": err, "claim": "S1", "part": "sampling", "test": "sampling_test8"},
                       {"status": "error", "error": err, "claim": "S2", "part": "max_tokens", "test": "sampling_test8"}])
    for v in (gen.s1_verdict(df), gen.s2_verdict(df)):
        assert v.verdict == NOT_TESTABLE and "every test failed (1 of 1)" in v.reason and "SecurityError" in v.reason
    assert gen.sampling_table(df).empty and gen.text_examples(df).empty and gen.requests_frame(df).empty


def test_s1_verdict_faster_guide_is_supported():
    v = gen.s1_verdict(_s1_rows([150.0, 151, 149, 150.5, 149.5]), equivalence=0.03)
    assert v.verdict == SUPPORTED and v.ci_low > 1.2 and v.effect == pytest.approx(150.0 / 120.1, rel=1e-3)


def _paired_rows(ratio: float):
    """Two prompts at very different speeds (a long one decodes slower), 5 seeds each; the guide's requests run at
    `ratio` times the defaults' with the same prompt and seed, plus a little noise."""
    def reqs(scale: float):
        out = []
        for pid, speed in (("long", 90.0), ("short", 150.0)):
            for seed in range(5):
                ts = speed * scale * (1 + 0.004 * ((seed * 7) % 5 - 2))
                out.append({"prompt_id": pid, "seed": seed, "decode_ms_per_token": 1e3 / ts})
        return out
    base = {"status": "ok", "samples_n_gen_tokens": [48] * 10, "samples_e2e_ms": [900.0] * 10,
            "decode_ms_per_token": 8.0, "overhead_ms_per_token": 1.0, "max_tokens": 48}
    g, d = reqs(ratio), reqs(1.0)
    return pd.DataFrame([{**base, "label": "guide", "requests": g, "samples_ts": [1e3 / r["decode_ms_per_token"] for r in g]},
                         {**base, "label": "default", "requests": d,
                          "samples_ts": [1e3 / r["decode_ms_per_token"] for r in d]}])


def test_s1_pairs_by_prompt_and_seed_decide_what_unpaired_medians_cannot():
    df = _paired_rows(0.97)
    v = gen.s1_verdict(df)
    assert v.n_candidate == 10 and v.details["paired_requests"] == 10 and "paired by prompt and seed" in v.metric
    assert v.effect == pytest.approx(0.97, abs=0.005) and v.ci_high - v.ci_low < 0.02
    assert v.verdict == NO_EFFECT and v.band == band_of("S1").width   # inside S1's stated +-5 % band
    # the same samples unpaired: two prompts' speeds apart by x1.7 make the ratio of medians say nothing
    unpaired = compare("S1", df.iloc[0]["samples_ts"], df.iloc[1]["samples_ts"])
    assert unpaired.verdict == INCONCLUSIVE and unpaired.ci_high - unpaired.ci_low > 0.3
    assert gen.s1_verdict(_paired_rows(0.85)).verdict == REFUTED


def test_s1_pools_every_block_of_seeds_at_the_schedules_confidence():
    one = _paired_rows(0.97)
    two = one.copy()
    for col in ("requests",):
        two[col] = [[{**r, "seed": r["seed"] + 1000} for r in reqs] for reqs in two[col]]
    both = pd.concat([one.assign(look=1, looks_planned=3, part="sampling"),
                      two.assign(look=2, looks_planned=3, part="sampling")], ignore_index=True)
    v = gen.s1_verdict(both)
    assert v.n_candidate == 20 and v.details["looks"] == 2 and v.details["looks_planned"] == 3
    assert v.confidence == pytest.approx(1 - 0.05 / 3) and "2 of 3 planned blocks" in v.summary
    cols = {"n_requests": 10, "temperature": 0.1, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1,
            "max_tokens_label": "48", "engine_decode_ms_per_token": 7.0, "median_ts": 100.0, "n_gen_tokens_mean": 48.0,
            "e2e_ms": 900.0, "truncation_rate": 1.0, "distinct_2": 0.9, "rep_4gram": 0.0, "deterministic_share": 0.0,
            "samples_decode_ms_per_token": [[10.0, 10.5, 9.5]] * 4}
    table = gen.sampling_table(both.assign(**cols))
    assert list(table["label"]) == ["guide", "default"] and list(table["requests"]) == [20, 20]
