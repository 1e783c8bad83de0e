"""kit.studies.autotune on the bundled model: real screening with tiny grids and 1 repetition.

The tuner must respect a memory limit and a quality floor, log what it refused with the numbers, and the
profiles it writes must use the guide's LLAMACPP_* names and read back with Settings.from_dotenv.
"""
from pathlib import Path

import pytest

from kit import Settings, verdicts
from kit.config import StudyConfigError, read_dotenv
from kit.gpu import build_supports_gpu_offload
from kit.models import model_card
from kit.paths import DEFAULT_MODEL, GUIDE_PROFILES_DIR
from kit.results import read_rows
from kit.search import NOT_TESTABLE_NO_OFFLOAD
from kit.studies import autotune
from kit.sweep import run_sweep

GUIDE = Path("/work/shared/seed/llm-optimization-guide.ru.md")


def test_guide_profiles_are_verbatim_and_load():
    for name in autotune.GUIDE_PROFILE_NAMES:
        text = (GUIDE_PROFILES_DIR / f"{name}.env").read_text()
        assert all(line.startswith("LLAMACPP_") for line in text.splitlines())
        if GUIDE.exists():  # the guide's "Готовые профили" section holds exactly these lines
            assert text.strip() in GUIDE.read_text()
        s, notes = autotune.load_guide_profile(name, DEFAULT_MODEL)
        assert s.n_ctx in (2048, 4096, 8192) and s.n_gpu_layers in (30, 35, 40)
        if not build_supports_gpu_offload():
            assert any("accepted and ignored" in n for n in notes)
    q, notes = autotune.load_guide_profile("quality", DEFAULT_MODEL)
    assert q.n_batch == 256 and q.n_ubatch == 256 and any("clamps" in n for n in notes)


def test_config_validation():
    with pytest.raises(StudyConfigError, match="kv_type"):
        autotune.AutotuneStudy(kv_type=["q3_x"])
    with pytest.raises(StudyConfigError, match="max_ppl_ratio"):
        autotune.AutotuneStudy(max_ppl_ratio=0.9)
    with pytest.raises(StudyConfigError, match="n_prompt"):
        autotune.AutotuneStudy(n_prompt=0)
    with pytest.raises(StudyConfigError, match="repetitions"):
        autotune.AutotuneStudy(repetitions="abc")
    with pytest.raises(StudyConfigError, match="flash_attn"):
        autotune.AutotuneStudy(flash_attn=[0, 1])


def test_config_builds_what_the_tuner_takes():
    study = autotune.AutotuneStudy(ram_limit_mb=0.0, vram_limit_mb=2048.0, threads=[])
    cons = study.constraints()
    assert cons.ram_limit_mb is None and cons.vram_limit_mb == 2048.0  # 0 = no limit
    assert study.space().threads  # empty = half the CPUs and all of them
    kw = study.tuner_kwargs()
    assert kw["study"] == "85_autotune" and kw["out_root"].is_absolute() and kw["confirm_top"] == 1
    assert study.request().params == {"n_questions": 1, "chunk_chars": 400}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    start = Settings(n_ctx=512, n_batch=128, n_ubatch=128, n_threads=2, n_threads_batch=2)
    work = autotune.Workload(n_prompt=32, n_gen=8, ppl_chunks=3, ppl_chunk_tokens=256)
    # measure the start point first (the tuner reuses this very trial as its reference): its memory sets a
    # limit that an 8192-token KV cache (about 190 MB more) cannot meet
    df = run_sweep("tune", start, work.speed_tests() + [work.quality_test()], repetitions=1, out_root=out,
                   progress=False)
    assert (df["status"] == "ok").all(), df[["status", "error"]]
    # the tuner judges memory on the speed tests' rows (the perplexity test holds logits on top)
    rss0 = float(df[df["test_kind"].isin(["pp", "tg"])]["rss_peak_mb"].max())
    cons = autotune.Constraints(ram_limit_mb=rss0 + 60, vram_limit_mb=None, max_ppl_ratio=1.01)
    space = autotune.SearchSpace(threads=[2], n_batch=[], n_ubatch=[], flash_attn=[], kv_type=["f16", "q4_0"],
                                 n_ctx=[512, 8192])
    res = autotune.benchmark_settings(DEFAULT_MODEL, start=start, study="tune", out_root=out, space=space,
                                      constraints=cons, workload=work, screen_repetitions=1, repetitions=1,
                                      confirm_top=1, min_gain=0.03, progress=False)
    return res, out, rss0


def test_tuner_refuses_quality_and_memory_violations(tuned):
    res, out, rss0 = tuned
    quality = [r for r in res.refusals if r["reason"] == "quality"]
    memory = [r for r in res.refusals if r["reason"] == "memory"]
    assert quality, res.refusals
    q = quality[0]
    assert q["change"]["type_v"] == "q4_0" and q["ppl_ratio"] > 1.01 and q["max_ppl_ratio"] == 1.01
    assert "perplexity" in q["detail"] and q["trial_keys"]
    assert memory, res.refusals
    m = memory[0]
    assert m["change"] == {"n_ctx": 8192} and m["rss_peak_mb"] > m["ram_limit_mb"] == pytest.approx(rss0 + 60)
    # the choice respects both
    assert res.best.type_v == "f16" and res.best.n_ctx == 512
    best = res.confirmed_for(res.best)
    assert best is not None and best.status == "ok" and best.rss_peak_mb <= rss0 + 60
    assert best.score_s > 0 and best.pp_ts > 0 and best.tg_ts > 0
    assert res.reference_ppl and 1 < res.reference_ppl < 1000
    assert res.save().exists()


def test_gpu_layers_search_on_this_build(tuned):
    res, _, _ = tuned
    gpu = res.gpu_layers
    if not build_supports_gpu_offload():
        assert gpu["reason"] == NOT_TESTABLE_NO_OFFLOAD and not gpu["probes"] and not gpu["testable"]
        assert res.best.n_gpu_layers == 0 and res.start.n_gpu_layers == 0
    elif gpu["testable"]:  # an offloading build with a visible GPU: real probes, and the search starts there
        assert gpu["probes"] and 0 <= gpu["best_n_gpu_layers"] <= model_card(DEFAULT_MODEL).n_layers + 1
        assert res.screened[0].settings.n_gpu_layers == gpu["best_n_gpu_layers"]
    else:  # an offloading build that sees no NVIDIA GPU: nothing probed, and it says why
        assert gpu["reason"].startswith("not testable here") and not gpu["probes"]
        assert res.start.n_gpu_layers == 0


def test_verdicts_x3_x4(tuned):
    res, _, _ = tuned
    x3, x4 = autotune.x3_verdict(res), autotune.x4_verdict(res)
    # one confirmation repetition each: too few for an interval, and the verdict says so
    assert x3.verdict == verdicts.NOT_TESTABLE and "too few samples" in x3.reason
    assert x3.details["steps"] == res.steps
    # three paired perplexity chunks: q4_0 KV costs quality on this model (the claim "may cost quality")
    assert x4.details["refusals"] and x4.details["refusals"][0]["reason"] in ("quality", "memory")
    assert "perplexity" in x4.summary and x4.effect is not None and x4.effect > 1
    assert x4.verdict == verdicts.decide(x4.ci_low, x4.ci_high, claimed="worse", higher_is_better=False)


def test_profiles_roundtrip_with_llamacpp_names(tuned, tmp_path):
    res, _, _ = tuned
    guide = {n: s for n, (s, _) in autotune.load_guide_profiles(DEFAULT_MODEL).items()}
    profiles, why = autotune.choose_kit_profiles(res, guide, rag_floor=None)
    assert profiles["speed"].type_v == "f16"  # the q4_0 cache was refused for quality
    for name, s in profiles.items():
        assert s.n_ctx >= s.max_context_length  # the RAG budget fits
    paths = autotune.write_kit_profiles(profiles, {}, res, why, tmp_path / "profiles")
    for name, p in paths.items():
        text = p.read_text()
        assert text.startswith("# kit profile")
        assert "trial_key" in text and "perplexity" in text
        env = read_dotenv(p)
        assert env and all(k.startswith("LLAMACPP_") for k in env)
        assert "LLAMACPP_N_CTX" in env and "LLAMACPP_RAG_SEARCH_K" in env
        assert Settings.from_dotenv(p) == profiles[name]


def test_profiles_differing_only_in_sampling_share_the_engine_rows(tmp_path):
    base = Settings(n_ctx=512, rag_search_k=2, max_context_length=200)
    profiles = {"a": base.replace(temperature=0.1), "b": base.replace(temperature=0.3),
                "c": base.replace(n_batch=256, n_ubatch=256)}
    work = autotune.Workload(n_prompt=32, n_gen=8, ppl_chunks=1, ppl_chunk_tokens=64)
    m = autotune.measure_profiles(profiles, study="prof", out_root=tmp_path, repetitions=1, workload=work,
                                  request=autotune.rag_request(max_tokens=4, n_questions=1, chunk_chars=200),
                                  progress=False)
    assert [m[n]["engine_from"] for n in "abc"] == ["a", "a", "c"]
    req = m["a"]["request"]
    # the RAG pipeline packed 2 chunks (rag_search_k) of the gold topic within the 200-token budget
    assert 0 < req["rag_context_tokens"] <= 200 and req["rag_chunks_in_context"] >= 1
    assert req["n_prompt"] > req["rag_context_tokens"] and req["n_requests"] == 1
    assert req["samples_ttft_ms"] and req["ttft_ms"] > 0 and req["e2e_ms"] >= req["ttft_ms"]
    assert m["b"]["pp"]["trial_key"] == m["a"]["pp"]["trial_key"] != m["c"]["pp"]["trial_key"]
    assert m["b"]["request"]["trial_key"] != m["a"]["request"]["trial_key"]
    assert all(m[n][t]["status"] == "ok" for n in "abc" for t in ("pp", "tg", "request"))
    rows = read_rows(tmp_path / "prof" / "results.jsonl")
    assert len(rows) == 2 * 2 + 3  # engine pp/tg for a and c only; a request row for each profile
    assert "profile 'a'" in autotune.profile_header("b", m["b"], "test")
    # engine rows already in the study for the same load settings (and enough repetitions) are used, not remeasured
    again = autotune.measure_profiles({"d": base.replace(temperature=0.7)}, study="prof", out_root=tmp_path,
                                      repetitions=1, workload=work,
                                      request=autotune.rag_request(max_tokens=4, n_questions=1, chunk_chars=200),
                                      progress=False)
    assert again["d"]["pp"]["trial_key"] == m["a"]["pp"]["trial_key"]
    assert len(read_rows(tmp_path / "prof" / "results.jsonl")) == 2 * 2 + 3 + 1
    assert autotune.measured_engine_rows("prof", tmp_path, base, work.speed_tests(), 2) is None  # too few runs


def _measured(ts: list[float], ttft: list[float]) -> dict:
    return {"request": {"status": "ok", "samples_ts": ts, "samples_ttft_ms": ttft,
                        "samples_e2e_ms": [t + 500 for t in ttft]}}


def test_x2_compares_magnitude_with_the_guides_claim():
    base = _measured([50, 51, 49, 50, 52], [1000, 1010, 990, 1005, 995])
    small = _measured([55, 56, 54, 55, 57], [800, 810, 790, 805, 795])     # +10 %: faster, short of +50 %
    big = _measured([100, 101, 99, 100, 102], [400, 410, 390, 405, 395])   # +100 %
    v = autotune.x2_verdict(base, small)
    assert v.verdict == verdicts.REFUTED and "less than the claimed +50 %" in v.summary
    assert v.details["ratios"]["tokens_per_s"]["verdict"] == verdicts.SUPPORTED  # faster, just not by +50 %
    assert v.details["ratios"]["ttft"]["effect"] < 1 and v.details["ratios"]["rag_search"]["verdict"] == "not run"
    assert autotune.x2_verdict(base, big).verdict == verdicts.SUPPORTED
    # +40-60 %: faster, but the interval straddles the claimed 1.5, so it settles nothing about the claim
    mid = _measured([65, 80, 75, 70, 85, 72, 78], [700] * 7)
    v = autotune.x2_verdict(base, mid)
    assert v.ci_low < 1.5 < v.ci_high and v.verdict == verdicts.NO_EFFECT and "does not settle" in v.summary
    few = autotune.x2_verdict(_measured([50], [1000]), big)
    assert few.verdict == verdicts.NOT_TESTABLE and "too few" in few.reason
    # RAG search time from the RAG study's samples, k 8 -> 3
    v = autotune.x2_verdict(base, small, {8: [10, 11, 10, 12], 3: [9, 9.5, 9.2, 9.1]}, baseline_k=8, tuned_k=3)
    assert v.details["ratios"]["rag_search"]["effect"] < 1


def test_x1_speed_profile_against_quality_profile():
    m = {"speed": _measured([50] * 4, [300, 310, 290, 305]), "balanced": _measured([50] * 4, [600] * 4),
         "quality": _measured([50] * 4, [900, 910, 890, 905])}
    v = autotune.x1_verdict(m)
    assert v.verdict == verdicts.SUPPORTED and v.effect < 1 and set(v.details["profiles"]) == set(m)
