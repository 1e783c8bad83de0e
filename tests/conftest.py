import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("KIT_LLAMA_LOG", str(REPO_ROOT / "outputs" / "test-llama.log"))
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def model_path() -> str:
    from kit.models import resolve_model

    return str(resolve_model("smollm2-135m"))


@pytest.fixture
def run_notebook(tmp_path):
    """Execute notebooks/<stem>.ipynb headless with papermill from the repository root, as the runner does.

    Returns (out_dir, executed notebook path). out_dir defaults to tmp_path/<stem>.
    """
    import papermill as pm

    def run(stem: str, params: dict | None = None, out_dir: Path | None = None) -> tuple[Path, Path]:
        out = Path(out_dir) if out_dir else tmp_path / stem
        executed = tmp_path / f"{stem}.executed.ipynb"
        pm.execute_notebook(str(REPO_ROOT / "notebooks" / f"{stem}.ipynb"), str(executed), cwd=str(REPO_ROOT),
                            kernel_name="python3", parameters={**(params or {}), "out_dir": str(out)},
                            progress_bar=False)
        return out, executed

    return run
