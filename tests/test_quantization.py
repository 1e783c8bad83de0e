"""kit.studies.quantization: config, ladder (fallbacks, cache), tables, Pareto front, Q1/Q2 verdicts."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from kit.config import StudyConfigError
from kit.models import ModelFileError
from kit.paths import DEFAULT_MODEL, REPO_ROOT
from kit.studies import quantization as qz
from kit.verdicts import INCONCLUSIVE, MIXED, NO_EFFECT, NOT_TESTABLE, REFUTED, SUPPORTED, decide


# ---- config -------------------------------------------------------------------------------------------------------
def test_config_validates_and_puts_the_reference_first():
    cfg = qz.QuantStudy(types=["Q4_0", "Q8_0"])
    assert cfg.types == ["F16", "Q4_0", "Q8_0"]
    assert cfg.n_ctx >= max(cfg.ppl_n_ctx, cfg.n_prompt + cfg.n_gen)
    with pytest.raises(StudyConfigError, match="'Q4_K_X' is not one of"):
        qz.QuantStudy(types=["Q4_K_X"])
    with pytest.raises(StudyConfigError, match="list"):
        qz.QuantStudy(types="Q4_0")
    with pytest.raises(StudyConfigError, match="duplicates"):
        qz.QuantStudy(types=["Q4_0", "Q4_0"])
    with pytest.raises(StudyConfigError, match="repetitions"):
        qz.QuantStudy(repetitions=0)
    with pytest.raises(StudyConfigError, match="n_threads"):
        qz.QuantStudy(n_threads=-1)
    with pytest.raises(ModelFileError, match="no such file"):
        qz.QuantStudy(model="/nonexistent/model.gguf")


def test_defaults_are_the_notebook_values_and_paths_resolve_from_the_repository_root():
    cfg = qz.QuantStudy()
    assert cfg.types == ["F16", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K"]
    assert cfg.ppl_chunks == 4 and cfg.n_threads == 0
    assert cfg.out_path == REPO_ROOT / "outputs" / "50_quantization"
    assert cfg.cache_path == REPO_ROOT / "outputs" / "cache" / "quantized"
    assert qz.ladder_dir(DEFAULT_MODEL).parent == REPO_ROOT / "outputs" / "cache" / "quantized"


def test_parse_fallbacks_reads_llama_cpp_warnings():
    log = ("warning: blk.0.attn_q.weight                 - ncols    576 not divisible by 256 (required for type    q4_K)"
           " -> falling back to    q5_0\n"
           "llama_model_quantize_impl: WARNING: 1 of 272 tensor(s) required fallback quantization\n")
    fb = qz.parse_fallbacks(log)
    assert fb["n_fallback"] == 1 and fb["n_tensors"] == 272
    assert fb["fallbacks"] == [{"tensor": "blk.0.attn_q.weight", "ncols": 576, "wanted": "q4_K", "used": "q5_0"}]


# ---- the ladder on the real model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_ladder(tmp_path_factory):
    cache = tmp_path_factory.mktemp("quantized")
    return cache, qz.build_ladder(DEFAULT_MODEL, ["Q4_K_M", "Q4_0"], cache_dir=cache, progress=False)


def test_ladder_files_sizes_and_fallbacks(small_ladder, capfd):
    cache, ladder = small_ladder
    assert [l["quant_type"] for l in ladder] == ["F16", "Q4_K_M", "Q4_0"]
    by = {l["quant_type"]: l for l in ladder}
    assert 15.5 < by["F16"]["bits_per_weight"] < 16.5 and by["F16"]["n_fallback"] == 0
    assert 4.4 < by["Q4_0"]["bits_per_weight"] < 7.0
    assert by["Q4_0"]["size_bytes"] < by["Q4_K_M"]["size_bytes"] < by["F16"]["size_bytes"]
    # rows of 576 are not divisible by 256: most of "Q4_K_M" is not Q4_K on this model, and we say so
    assert by["Q4_K_M"]["n_fallback"] > 50 and by["Q4_K_M"]["base_type_share_pct"] < 50
    assert sum(by["Q4_K_M"]["tensor_types"].values()) == by["Q4_K_M"]["n_tensors"]
    assert all(l["reference_dequantized"] for l in ladder)  # the bundled source is Q4_1
    assert "dequantized from a Q4_1" in qz.reference_note(ladder)
    assert Path(by["Q4_K_M"]["log"]).stat().st_size > 0
    # a second call reuses the cache: nothing rebuilt, nothing printed
    t0 = time.perf_counter()
    again = qz.build_ladder(DEFAULT_MODEL, ["Q4_K_M", "Q4_0"], cache_dir=cache, progress=False)
    assert all(l["cached"] for l in again) and time.perf_counter() - t0 < 30
    out, err = capfd.readouterr()
    assert "llama_model_quantize" not in out + err and "ncols" not in out + err
    lt = qz.ladder_table(ladder)
    assert list(lt.columns) == list(qz.LADDER_COLUMNS) and list(lt["quant_type"]) == ["F16", "Q4_K_M", "Q4_0"]


# ---- tables, Pareto front and verdicts on constructed tables ------------------------------------------------------
def _table(spec):
    rows = []
    for q, tg, kld, size in spec:
        rows.append({"quant_type": q, "tg_ts": tg, "tg_samples": [tg * f for f in (0.99, 1.0, 1.01, 1.0, 0.995)],
                     "pp_samples": [1.0], "kld_mean": kld, "kld_stderr": kld * 0.02, "size_mib": size})
    return pd.DataFrame(rows)


def test_study_table_is_written_without_samples_and_shown_by_its_columns(tmp_path):
    cfg = qz.QuantStudy(out_dir=str(tmp_path / "50_quantization"))
    t = _table([("F16", 50, 0.0, 258), ("Q4_0", 120, 0.04, 87)])
    path = qz.write_study_table(cfg, t)
    assert path == tmp_path / "50_quantization" / "table.csv"
    back = pd.read_csv(path)
    assert list(back["quant_type"]) == ["F16", "Q4_0"] and "tg_samples" not in back and "pp_samples" not in back
    view = qz.table_view(t)
    assert list(view.columns) == [c for c in qz.TABLE_COLUMNS if c in t] and "tg_samples" not in view
    ev = qz.verdict_evidence(cfg, tmp_path / "50_quantization" / "figures" / "pareto.png")
    assert ev == ["50_quantization/figures/pareto.png", "50_quantization/results.jsonl", "50_quantization/table.csv"]


def _labels(v) -> dict:
    return {c["condition"]: c["verdict"] for c in v.conditions}


def test_pareto_front_and_q2_per_recommended_type():
    t = _table([("F16", 50, 0.0, 258), ("Q8_0", 80, 0.005, 138), ("Q5_K_M", 90, 0.02, 110),
                ("Q4_K_M", 95, 0.05, 100), ("Q4_0", 120, 0.04, 87), ("Q3_K_M", 130, 0.2, 80)])
    assert set(qz.pareto_front(t)) == {"F16", "Q8_0", "Q5_K_M", "Q4_0", "Q3_K_M"}
    v = qz.recommendation_verdict(t)
    # Q4_K_M is beaten by Q4_0 (faster and closer to F16); the others outrun every better-quality type
    assert v.verdict == MIXED and v.depends_on == "recommended type"
    assert _labels(v) == {"Q5_K_M (quality) against Q8_0": SUPPORTED, "Q4_K_M (production) against Q4_0": REFUTED,
                          "Q3_K_M (development) against Q4_0": SUPPORTED}
    assert v.details["clear_dominators"]["Q4_K_M"][0]["by"] == "Q4_0" and "Q4_K_M" in v.summary
    assert v.band == 0.05 and v.band_why == qz.Q2_BAND.why
    view = qz.front_table(v)
    assert list(view["condition"]) == list(_labels(v)) and view["verdict"].tolist() == list(_labels(v).values())


def test_q2_supported_when_recommendations_are_on_the_front():
    t = _table([("F16", 50, 0.0, 258), ("Q5_K_M", 90, 0.02, 110), ("Q4_K_M", 100, 0.04, 100),
                ("Q3_K_M", 130, 0.2, 80)])
    v = qz.recommendation_verdict(t)
    assert v.verdict == SUPPORTED and v.details["share_on_front"] == 1.0 and v.details["missing"] == ["Q4_K_S"]
    # 2 % faster than a better-quality type: within the band, the recommendation buys nothing there
    t = _table([("F16", 50, 0.0, 258), ("Q5_K_M", 98, 0.02, 110), ("Q4_K_M", 100, 0.04, 100)])
    v = qz.recommendation_verdict(t)
    assert _labels(v)["Q4_K_M (production) against Q5_K_M"] == NO_EFFECT and v.verdict == MIXED


def test_q1_order_verdicts():
    guide = list(qz.GUIDE_SPEED_ORDER)
    fast_first = _table([(q, 200 - 20 * i, 0.01 * (6 - i), 100) for i, q in enumerate(guide)])
    v = qz.speed_order_verdict(fast_first)
    assert v.verdict == SUPPORTED and v.details["spearman_rho"] == pytest.approx(1.0)
    assert len(v.conditions) == len(guide) - 1 and v.depends_on == "adjacent pair in the guide's order"
    assert len(qz.pairs_table(v)) == len(guide) - 1 and (qz.pairs_table(v)["verdict"] == SUPPORTED).all()
    reversed_ = _table([(q, 100 + 20 * i, 0.01, 100) for i, q in enumerate(guide)])
    v = qz.speed_order_verdict(reversed_)
    assert v.verdict == REFUTED and v.details["spearman_rho_ci"][1] < 0
    flat = qz.speed_order_verdict(_table([(q, 100, 0.01, 100) for q in guide]))
    assert flat.verdict == NO_EFFECT  # every pair inside +-5 %: the guide's order makes no difference here
    # the first three in the guide's order, then two equal: the pairs disagree
    part = qz.speed_order_verdict(_table([(q, s, 0.01, 100) for q, s in zip(guide, (200, 150, 120, 120, 120, 90))]))
    assert part.verdict == MIXED
    assert list(_labels(part).values()) == [SUPPORTED, SUPPORTED, NO_EFFECT, NO_EFFECT, SUPPORTED]
    assert list(_labels(part))[0] == "Q2_K faster than Q3_K_M"
    for c in part.conditions:
        assert c["verdict"] == decide(c["ci_low"], c["ci_high"], equivalence=c["band"])
    few = qz.speed_order_verdict(_table([("Q4_0", 1, 0.1, 1)]))
    assert few.verdict == NOT_TESTABLE and qz.pairs_table(few).empty


def test_q1_wide_spread_is_inconclusive_not_no_effect():
    """Pairs 3 % apart with +-20 % spread: no pair reversed, none decided; this used to read "no measurable effect"."""
    guide = list(qz.GUIDE_SPEED_ORDER)[:3]
    t = pd.DataFrame([{"quant_type": q, "tg_ts": 100 - 3 * i, "kld_mean": 0.01, "kld_stderr": 0.001, "size_mib": 100,
                       "tg_samples": [(100 - 3 * i) * f for f in (0.8, 0.9, 1.0, 1.1, 1.2)]}
                      for i, q in enumerate(guide)])
    v = qz.speed_order_verdict(t)
    assert v.verdict == INCONCLUSIVE and all(c["verdict"] == INCONCLUSIVE for c in v.conditions)
    assert v.samples_to_decide and v.samples_to_decide > 5 and "samples per side would decide it" in v.label()
