"""A smoke run of notebook 50 (quantization) with quick.json's parameters on the real model, through conftest's
run_notebook. The module's unit tests are in test_quantization.py."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from kit.verdicts import NOT_TESTABLE, read_verdicts

pytestmark = pytest.mark.notebook


def test_notebook_50_quantization_smoke(tmp_path, run_notebook):
    run = run_notebook("50_quantization", cache_dir=str(tmp_path / "cache"))
    out_dir = run.out
    table = pd.read_csv(out_dir / "table.csv")
    assert list(table["quant_type"]) == ["F16", "Q8_0", "Q4_0"]
    assert table["errors"].isna().all(), table["errors"]  # empty cells: no test failed
    assert (table["tg_ts"] > 0).all() and (table["pp_ts"] > 0).all()
    ref = table.set_index("quant_type").loc["F16"]
    assert abs(ref["kld_mean"]) < 1e-5 and ref["top1_agree_pct"] == 100.0  # the reference against itself
    q4 = table.set_index("quant_type").loc["Q4_0"]
    assert q4["kld_mean"] > 0 and q4["size_mib"] < ref["size_mib"] and 1 < q4["ppl"] < 1e4
    assert (out_dir / "figures" / "pareto.png").stat().st_size > 0
    v = {d["claim"]: d for d in read_verdicts(out_dir)}
    assert set(v) == {"Q1", "Q2"}
    assert v["Q1"]["verdict"] == NOT_TESTABLE and "an order needs at least 3" in v["Q1"]["reason"]
    assert v["Q2"]["verdict"] == NOT_TESTABLE and "none of the recommended types" in v["Q2"]["reason"]
    assert v["Q1"]["evidence"] == ["50_quantization/figures/pareto.png", "50_quantization/results.jsonl",
                                   "50_quantization/table.csv"]
    assert "dequantized from a Q4_1" in run.text
    assert "ncols" not in run.executed.read_text()  # the quantizer's per-tensor output stayed in the log
    ladder = json.loads((out_dir / "ladder.json").read_text())
    assert {l["quant_type"] for l in ladder} == {"F16", "Q8_0", "Q4_0"}
    assert all((tmp_path / "cache") in Path(l["path"]).parents for l in ladder)
