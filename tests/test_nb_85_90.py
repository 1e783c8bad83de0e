"""Smoke runs of notebooks 85 (auto-tune, profiles) and 90 (findings) with tiny parameters, headless."""
import json
from pathlib import Path

import papermill as pm
import pytest

from kit import Settings
from kit.runner import load_quick
from kit.verdicts import VERDICTS

REPO = Path(__file__).resolve().parent.parent


def _run(stem: str, out: Path, params: dict) -> None:
    pm.execute_notebook(str(REPO / "notebooks" / f"{stem}.ipynb"), str(out / f"{stem}.executed.ipynb"),
                        parameters=params, kernel_name="python3", cwd=str(REPO), progress_bar=False)


def test_90_renders_with_no_studies(tmp_path):
    root = tmp_path / "empty"
    _run("90_findings", tmp_path, {"out_root": str(root), "out_dir": str(root / "90_findings")})
    md = (root / "90_findings" / "findings.md").read_text()
    assert "| G1 | not run |" in md and "| X4 | not run |" in md
    assert (root / "90_findings" / "figures" / "effects.png").exists()


@pytest.fixture(scope="module")
def after_85(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    params = dict(load_quick(REPO / "notebooks" / "quick.json")["85_autotune"])
    params.update(out_dir=str(root / "85_autotune"), profiles_dir=str(root / "profiles"))
    _run("85_autotune", root, params)
    return root


def test_85_writes_verdicts_profiles_and_figure(after_85):
    d = after_85 / "85_autotune"
    vs = {v["claim"]: v for v in json.loads((d / "verdicts.json").read_text())["verdicts"]}
    assert set(vs) == {"X1", "X2", "X3", "X4"}
    for v in vs.values():
        assert v["verdict"] in VERDICTS
        assert v["summary"]
    assert vs["X4"]["details"]["refusals"] is not None
    assert "ratios" in vs["X2"]["details"] or vs["X2"]["verdict"] == "not testable here"
    assert (d / "figures" / "autotune_profiles.png").exists()
    tune = json.loads((d / "autotune.json").read_text())
    assert tune["confirmed"] and all(c["status"] for c in tune["confirmed"])
    for name in ("speed", "balanced", "quality"):
        p = after_85 / "profiles" / f"{name}.env"
        s = Settings.from_dotenv(p)
        assert s.n_ctx >= s.max_context_length
        assert "tokens/s" in p.read_text() and "trial_key" in p.read_text()
    rows = [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]
    req = [r for r in rows if r.get("test_kind") == "kit.studies.autotune:rag_request_test" and r["status"] == "ok"]
    assert req and all(r["ttft_ms"] > 0 and r["median_ts"] > 0 for r in req)


def test_90_reads_85_and_marks_the_rest_not_run(after_85, tmp_path):
    _run("90_findings", tmp_path, {"out_root": str(after_85), "out_dir": str(after_85 / "90_findings")})
    md = (after_85 / "90_findings" / "findings.md").read_text()
    assert "| G1 | not run |" in md
    x3 = [line for line in md.splitlines() if line.startswith("| X3 |")]
    assert x3 and "not run" not in x3[0] and "85_autotune" in x3[0]
