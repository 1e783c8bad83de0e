"""kit.studies.profiling: exposing native calls to cProfile, reading profiles, profiling a real request, the P2 verdict."""
from __future__ import annotations

import ctypes
import pstats

import pandas as pd
import pytest

from kit.config import Settings, StudyConfigError
from kit.data import load_prompts
from kit.measure import Test as KitTest, load_model
from kit.paths import REPO_ROOT
from kit.studies import profiling as prof
from kit.verdicts import INCONCLUSIVE, NOT_TESTABLE, REFUTED, decide


def test_expose_native_calls_wraps_and_restores():
    import llama_cpp
    import llama_cpp.llama_cpp as low

    original = low.llama_decode
    assert isinstance(original, ctypes._CFuncPtr)
    with prof.expose_native_calls() as n:
        assert n > 100
        assert not isinstance(low.llama_decode, ctypes._CFuncPtr)
        assert low.llama_decode.__code__.co_name == "llama_decode"
        assert low.llama_decode.__code__.co_filename == prof.NATIVE_FILE
        assert llama_cpp.llama_decode is not original  # the package namespace too (kit.measure calls it there)
    assert low.llama_decode is original and llama_cpp.llama_decode is original


def test_names_and_categories():
    assert prof.short_name((prof.NATIVE_FILE, 1, "llama_decode")) == "[native] llama_decode"
    assert prof.short_name(("/x/lib/python3.11/site-packages/llama_cpp/llama.py", 854, "generate")) == \
        "llama_cpp/llama.py:854(generate)"
    assert prof.short_name(("~", 0, "<built-in method time.sleep>")) == "<built-in method time.sleep>"
    assert prof.categorize((prof.NATIVE_FILE, 1, "llama_decode")) == "llama.cpp: llama_decode"
    assert prof.categorize((prof.NATIVE_FILE, 1, "llama_sampler_sample")) == "llama.cpp: sampling"
    assert prof.categorize((prof.NATIVE_FILE, 1, "llama_token_to_piece")) == "llama.cpp: detokenize"
    assert prof.categorize((prof.NATIVE_FILE, 1, "llama_n_ctx")) == "llama.cpp: other native calls"
    assert prof.categorize(("/s/site-packages/llama_cpp/_internals.py", 328, "decode")).startswith("llama_cpp: _int")
    assert prof.categorize(("/s/site-packages/jinja2/runtime.py", 1, "f")) == "jinja2: chat template"
    assert prof.categorize((str(REPO_ROOT / "kit" / "measure.py"), 1, "stream_chat")) == "kit"
    assert prof.categorize((prof.__file__, 1, "profile_test")) == "kit"  # kit/studies/ is the kit too
    assert prof.short_name((str(REPO_ROOT / "kit" / "measure.py"), 338, "stream_chat")) == "kit/measure.py:338(stream_chat)"
    assert set(prof.CATEGORY_ORDER) >= {prof.categorize(k) for k in [("~", 0, "x"), ("/a/b.py", 1, "f")]}


def test_study_validation():
    with pytest.raises(StudyConfigError, match="prompt_index"):
        prof.ProfilingStudy(prompt_index=99)
    with pytest.raises(StudyConfigError, match="max_tokens"):
        prof.ProfilingStudy(max_tokens=4096, n_ctx=2048)
    with pytest.raises(StudyConfigError, match="top_n"):
        prof.ProfilingStudy(top_n=0)
    st = prof.ProfilingStudy()
    tests = st.tests()
    assert [t.kind for t in tests] == ["tg", prof.PROFILE_KIND] and st.max_tokens == 64
    assert tests[1].params["prof_dir"] == str(st.out_path)  # absolute, from the repository root


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("80_profiling")
    lm = load_model(Settings(n_ctx=512, max_tokens=12))
    try:
        p = load_prompts(n=1)[0]
        row = prof.profile_test(lm, KitTest(prof.PROFILE_KIND, params={
            "prompt": p["prompt"], "prompt_id": p["id"], "prof_dir": str(out)}), repetitions=3)
    finally:
        lm.close()
    return row, out


def test_profile_test_on_the_real_model(profiled):
    row, out = profiled
    assert (out / prof.PLAIN_PROF).exists() and (out / prof.NATIVE_PROF).exists()
    assert row["all_same_tokens"]  # same prompt and seed: the three variants did the same work
    assert len(row["samples_wall_ms"]) == len(row["samples_wall_cprofile_ms"]) == 3
    # the unprofiled requests' columns come from kit.measure.requests_row (decode speed: 1000 / mean ITL)
    assert row["samples_e2e_ms"] == row["samples_wall_ms"] and row["n_requests"] == 3
    assert row["samples_ts"] == pytest.approx([1e3 / x for x in row["samples_decode_ms_per_token"]], rel=1e-3)
    assert 0 < row["engine_decode_ms_per_token"] <= row["decode_ms_per_token"] * 1.25
    # plain cProfile: the wrapper's self time is llama_decode's time, as llama.cpp's own timer says
    for r in row["samples_cprofile_decode_ratio"]:
        assert 0.8 < r < 1.25, row["samples_cprofile_decode_ratio"]
    for c in row["samples_cprofile_coverage"]:
        assert 0.9 < c < 1.1
    share = row["native_breakdown_share"]
    assert sum(v for v in share.values() if v) == pytest.approx(1.0, abs=0.01)
    assert share["llama.cpp: llama_decode"] > 0.3  # decoding is most of a request on any machine
    assert row["native_breakdown_ms"]["llama.cpp: sampling"] > 0
    assert row["native_breakdown_ms"]["llama.cpp: detokenize"] > 0
    # with native calls exposed, _internals.decode no longer holds llama_decode's time
    assert share["llama_cpp: _internals.py (self time; hides native calls)"] < 0.2


def test_top_functions_from_the_saved_profile(profiled):
    _, out = profiled
    top = prof.top_functions(out / prof.PLAIN_PROF, 20)
    assert len(top) == 20 and list(top.index) == list(range(1, 21))
    assert top["cumtime_s"].is_monotonic_decreasing
    assert "stream_chat" in top["function"].iloc[0]
    assert any("_internals.py" in f and "(decode)" in f for f in top["function"])
    assert not any("/work/" in f or "site-packages" in f for f in top["function"])  # no machine paths
    native = prof.top_functions(pstats.Stats(str(out / prof.NATIVE_PROF)), 5, sort="tottime")
    assert native["function"].iloc[0] == "[native] llama_decode"


def test_tables_and_verdict(profiled):
    row, _ = profiled
    df = pd.DataFrame([{"status": "ok", "test_kind": "tg", "median_ts": 100.0},
                       {"status": "ok", "test_kind": prof.PROFILE_KIND, **row}])
    split = prof.split_table(df)
    assert {"llama.cpp: llama_decode, prompt processing", "llama.cpp: llama_decode, generation"} <= set(split["category"])
    assert split["ms"].sum() == pytest.approx(row["native_total_ms"], rel=0.02)
    gap = prof.gap_table(df)
    assert gap["ms_per_token"].iloc[0] == pytest.approx(10.0)
    assert gap["ms_per_token"].notna().all()
    v = prof.p2_verdict(df)
    ratios = row["samples_cprofile_decode_ratio"]
    assert v.effect == pytest.approx(sorted(ratios)[1], rel=1e-3)  # the median of three paired ratios
    assert v.band == 0.10 and v.band_why  # P2's stated band (kit.verdicts.BANDS)
    assert v.verdict == decide(v.ci_low, v.ci_high, claimed="same", equivalence=0.10)
    assert 0.9 < v.details["profile_coverage_of_wall"] < 1.1 and v.details["llama_decode_share"] > 0.3
    assert "native" in v.summary
    # "same" within +-10 %: an interval across the band's edge decides nothing, one wholly outside refutes it
    wide = {**row, "samples_cprofile_decode_ratio": [0.8, 1.0, 1.2, 0.85, 1.15]}
    v = prof.p2_verdict(pd.DataFrame([{"status": "ok", "test_kind": prof.PROFILE_KIND, **wide}]))
    assert v.verdict == INCONCLUSIVE and v.samples_to_decide > 5 and "repetitions) would decide it" in v.summary
    off = {**row, "samples_cprofile_decode_ratio": [1.3, 1.31, 1.29, 1.3, 1.32]}
    v = prof.p2_verdict(pd.DataFrame([{"status": "ok", "test_kind": prof.PROFILE_KIND, **off}]))
    assert v.verdict == REFUTED and v.effect == pytest.approx(1.3)
    # a profile that misses a tenth of the request cannot be checked against the wall clock
    thin = {**row, "samples_cprofile_coverage": [0.7, 0.75, 0.8]}
    v = prof.p2_verdict(pd.DataFrame([{"status": "ok", "test_kind": prof.PROFILE_KIND, **thin}]))
    assert v.verdict == NOT_TESTABLE and "75%" in v.reason
