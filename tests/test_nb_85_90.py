"""Smoke runs of notebook 90 (findings): it reads verdict files only, from any working directory.
(Notebook 85's test is in test_nb_85_autotune.py.)"""
import json
import shutil
import uuid
from pathlib import Path

import pytest

from kit import report, verdicts
from kit.paths import NOTEBOOKS_DIR, REPO_ROOT


def _verdict_files(root: Path) -> None:
    """A study folder with real verdicts (written through kit.verdicts, as a study writes them)."""
    d = root / "20_batch_flash_attn"
    g3 = verdicts.compare("G3", [110, 112, 111, 113, 109], [100, 101, 99, 100, 102], metric="pp t/s ratio")
    verdicts.write_verdicts(d, [g3, verdicts.not_testable("G2", "this llama.cpp build has no GPU offload")])


def _markdown(run, mime: str = "text/markdown") -> str:
    """What the executed notebook displayed as Markdown (or HTML): display(...) of it has no plain-text form."""
    nb = json.loads(run.executed.read_text())
    return "\n".join("".join(o.get("data", {}).get(mime, "")) for c in nb["cells"] for o in c.get("outputs", []))


@pytest.mark.notebook
def test_90_renders_with_no_studies(run_notebook, tmp_path):
    root = tmp_path / "empty"
    run = run_notebook("90_findings", out_dir=root / "90_findings", out_root=str(root))
    md = (root / "90_findings" / "findings.md").read_text()
    assert "| G1 | not run |" in md and "| X4 | not run |" in md
    assert (root / "90_findings" / "figures" / "effects.png").exists()
    assert "**24 claims:** 24 not run" in _markdown(run) and "0 of 8 items" in _markdown(run)


@pytest.mark.notebook
def test_90_reads_verdicts_and_marks_the_rest_not_run(run_notebook, tmp_path):
    root = tmp_path / "study"
    _verdict_files(root)
    run = run_notebook("90_findings", out_dir=root / "90_findings", out_root=str(root))
    md = (root / "90_findings" / "findings.md").read_text()
    g3 = [line for line in md.splitlines() if line.startswith("| G3 |")]
    assert g3 and "| supported |" in g3[0] and "20_batch_flash_attn" in g3[0] and "1.1" in g3[0]
    assert "| G2 | not testable here |" in md and "| G1 | not run |" in md
    checklist = json.loads((root / "90_findings" / "findings.json").read_text())["checklist"]
    by = {c["item"]: c for c in checklist}
    assert by["Tune n_batch for your GPU"]["ticked"] and not by["Test different quantizations"]["ticked"]
    assert "1 of 8 items" in _markdown(run) and "1 supported" in _markdown(run)
    shown = _markdown(run, "text/html")
    first = shown[shown.index("On this machine"):shown.index("<b>G1</b>")]
    assert "LLAMACPP_N_BATCH=1024 LLAMACPP_N_UBATCH=512" in first and ">change<" in first
    assert shown.count("<details class='claim") == len(verdicts.CLAIM_IDS)
    page = report.render_notebook(run.executed, root / "page.html").read_text()
    assert "On this machine" in page and "output_stderr" not in page and "TqdmWarning" not in page


@pytest.mark.notebook
def test_90_run_from_the_notebooks_folder_writes_under_the_repo_root(run_notebook):
    # JupyterLab starts a kernel in notebooks/: relative output paths must still land in <repo>/outputs/...
    rel = f"outputs/_test_cwd_{uuid.uuid4().hex[:8]}"
    try:
        _verdict_files(REPO_ROOT / rel)
        run_notebook("90_findings", cwd=NOTEBOOKS_DIR, out_dir=f"{rel}/90_findings", out_root=rel)
        assert (REPO_ROOT / rel / "90_findings" / "findings.md").exists()
        assert (REPO_ROOT / rel / "90_findings" / "figures" / "effects.png").exists()
        assert "| G3 | supported |" in (REPO_ROOT / rel / "90_findings" / "findings.md").read_text()
        assert not (NOTEBOOKS_DIR / rel).exists()
    finally:
        shutil.rmtree(REPO_ROOT / rel, ignore_errors=True)
        shutil.rmtree(NOTEBOOKS_DIR / rel, ignore_errors=True)
