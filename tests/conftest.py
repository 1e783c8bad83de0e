"""Shared fixtures. Notebook tests run through `run_notebook` only: the smoke parameters come from
notebooks/quick.json (the same file `kit run --quick` uses), a test adds what it needs on top."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from kit.models import resolve_model
from kit.paths import DEFAULT_MODEL, NOTEBOOKS_DIR, OUTPUTS_DIR, REPO_ROOT
from kit.runner import load_quick

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("KIT_LLAMA_LOG", str(OUTPUTS_DIR / "test-llama.log"))


def quick_params(stem: str) -> dict:
    """notebooks/quick.json's smoke parameters for one notebook (read as `kit run --quick` reads them)."""
    return dict(load_quick().get(stem, {}))


@dataclass
class NotebookRun:
    out: Path          # the study's out_dir
    executed: Path     # the executed notebook
    text: str          # every code cell's text output, joined

    def outputs_of(self, cell_index: int) -> str:
        nb = json.loads(self.executed.read_text())
        return _cell_text(nb["cells"][cell_index])


def _cell_text(cell: dict) -> str:
    return "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                     for o in cell.get("outputs", []))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(resolve_model(DEFAULT_MODEL))


@pytest.fixture
def run_notebook(tmp_path):
    """Execute notebooks/<stem>.ipynb headless with papermill, as the runner does.

    run(stem, out_dir=None, cwd=None, quick=True, **params) -> NotebookRun. Parameters: quick.json's for the stem
    (unless quick=False), then **params; out_dir defaults to tmp_path/outputs/<stem>. cwd defaults to the
    repository root; pass NOTEBOOKS_DIR to run it as JupyterLab does."""
    import papermill as pm

    def run(stem: str, out_dir: Path | str | None = None, cwd: Path | str | None = None, quick: bool = True,
            **params) -> NotebookRun:
        out = Path(out_dir) if out_dir else tmp_path / "outputs" / stem
        executed = tmp_path / f"{stem}.executed.ipynb"
        merged = {**(quick_params(stem) if quick else {}), **params, "out_dir": str(out)}
        pm.execute_notebook(str(NOTEBOOKS_DIR / f"{stem}.ipynb"), str(executed), cwd=str(cwd or REPO_ROOT),
                            kernel_name="python3", parameters=merged, progress_bar=False)
        nb = json.loads(executed.read_text())
        text = "\n".join(_cell_text(c) for c in nb["cells"] if c["cell_type"] == "code")
        return NotebookRun(out=out, executed=executed, text=text)

    return run
