"""kit.autotune on the bundled model: real screening with tiny grids and 1 repetition.

The tuner must respect a memory limit and a quality floor, log what it refused with the numbers, and the
profiles it writes must use the guide's LLAMACPP_* names and read back with Settings.from_dotenv.
"""
from pathlib import Path

import pytest

from kit import Settings, verdicts
from kit.studies import autotune
from kit.config import read_dotenv
from kit.gpu import build_supports_gpu_offload
from kit.sweep import run_sweep

REPO = Path(__file__).resolve().parent.parent
GUIDE = Path("/work/shared/seed/llm-optimization-guide.ru.md")


def test_guide_profiles_are_verbatim_and_load():
    for name in autotune.GUIDE_PROFILE_NAMES:
        text = (REPO / "data" / "guide_profiles" / f"{name}.env").read_text()
        assert all(line.startswith("LLAMACPP_") for line in text.splitlines())
        if GUIDE.exists():  # the guide's "Готовые профили" section holds exactly these lines
            assert text.strip() in GUIDE.read_text()
        s, notes = autotune.load_guide_profile(name)
        assert s.n_ctx in (2048, 4096, 8192) and s.n_gpu_layers in (30, 35, 40)
        if not build_supports_gpu_offload():
            assert any("accepted and ignored" in n for n in notes)
    q, notes = autotune.load_guide_profile("quality")
    assert q.n_batch == 256 and q.n_ubatch == 256 and any("clamps" in n for n in notes)


def test_config_validation():
    with pytest.raises(Exception, match="kv_type"):
        autotune.SearchSpace(kv_type=["q3_x"])
    with pytest.raises(Exception, match="max_ppl_ratio"):
        autotune.Constraints(max_ppl_ratio=0.9)
    with pytest.raises(Exception, match="positive"):
        autotune.Workload(n_prompt=0)


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
    cons = autotune.Constraints(ram_limit_mb=rss0 + 60, max_ppl_ratio=1.01)
    space = autotune.SearchSpace(threads=[2], n_batch=[], n_ubatch=[], flash_attn=[], kv_type=["f16", "q4_0"],
                                 n_ctx=[512, 8192])
    res = autotune.benchmark_settings(start=start, study="tune", out_root=out, space=space, constraints=cons,
                                      workload=work, screen_repetitions=1, repetitions=1, confirm_top=1,
                                      progress=False)
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
    if build_supports_gpu_offload():
        assert res.gpu_layers["probes"] or res.gpu_layers["reason"].startswith("not testable")
    else:
        assert res.gpu_layers["reason"] == "not testable here: this build has no GPU offload"
        assert res.best.n_gpu_layers == 0


def test_verdicts_x3_x4(tuned):
    res, _, _ = tuned
    x3, x4 = autotune.x3_verdict(res), autotune.x4_verdict(res)
    assert x3.verdict in verdicts.VERDICTS and x4.verdict in verdicts.VERDICTS
    assert x4.details["n_refused_faster"] >= 0 and x4.details["refusals"]
    assert "perplexity" in x4.summary and x4.effect is not None and x4.effect > 1


def test_profiles_roundtrip_with_llamacpp_names(tuned, tmp_path):
    res, _, _ = tuned
    guide = {n: autotune.load_guide_profile(n)[0] for n in autotune.GUIDE_PROFILE_NAMES}
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
    from kit.results import read_rows

    base = Settings(n_ctx=512, rag_search_k=2, max_context_length=200)
    profiles = {"a": base.replace(temperature=0.1), "b": base.replace(temperature=0.3),
                "c": base.replace(n_batch=256, n_ubatch=256)}
    work = autotune.Workload(n_prompt=32, n_gen=8)
    m = autotune.measure_profiles(profiles, study="prof", out_root=tmp_path, repetitions=1, workload=work,
                                  request=autotune.rag_request(max_tokens=4, n_questions=1, chunk_chars=200),
                                  progress=False)
    assert [m[n]["engine_from"] for n in "abc"] == ["a", "a", "c"]
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
    assert autotune._measured_engine_rows("prof", tmp_path, base, work.speed_tests(), 2) is None  # too few runs


def _measured(ts: list[float], ttft: list[float]) -> dict:
    return {"request": {"status": "ok", "samples_ts": ts, "samples_ttft_ms": ttft,
                        "samples_e2e_ms": [t + 500 for t in ttft]}}


def test_x2_compares_magnitude_with_the_guides_claim():
    base = _measured([50, 51, 49, 50, 52], [1000, 1010, 990, 1005, 995])
    small = _measured([55, 56, 54, 55, 57], [800, 810, 790, 805, 795])     # +10 %: faster, short of +50 %
    big = _measured([100, 101, 99, 100, 102], [400, 410, 390, 405, 395])   # +100 %
    v = autotune.x2_verdict(base, small)
    assert v.verdict == verdicts.REFUTED and "less than the claimed +50 %" in v.summary
    assert v.details["ratios"]["ttft"]["effect"] < 1 and v.details["ratios"]["rag_search"]["verdict"] == "not run"
    assert autotune.x2_verdict(base, big).verdict == verdicts.SUPPORTED
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
