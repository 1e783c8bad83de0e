"""The inputs the project ships in data/: the prompt set (prompts.jsonl). The RAG questions and corpus belong
to the RAG pipeline (kit.studies.rag.pipeline); the claim list is data/claims.md."""
from __future__ import annotations

import json
from pathlib import Path

from kit.paths import PROMPTS_FILE, REPO_ROOT, resolve

# The shipped prompt set as a study config and its notebook write it (relative: from the repository root).
PROMPTS_PATH = PROMPTS_FILE.relative_to(REPO_ROOT).as_posix()


def load_prompts(path: str | Path | None = None, n: int | None = None) -> list[dict]:
    """A prompt set (JSON lines: id, kind, prompt; the shipped data/prompts.jsonl unless `path` names another,
    relative paths from the repository root), the first `n` of it if given."""
    p = resolve(path) if path else PROMPTS_FILE
    rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    for r in rows:
        if not isinstance(r.get("id"), str) or not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise ValueError(f"{p}: every line needs a string 'id' and a non-empty 'prompt': {r!r}")
    if len({r["id"] for r in rows}) != len(rows):
        raise ValueError(f"{p}: prompt ids are not unique")
    if n is not None:
        if n < 1 or n > len(rows):
            raise ValueError(f"n={n}: the prompt file {p.name} has {len(rows)} prompts")
        rows = rows[:n]
    return [{"id": r["id"], "prompt": r["prompt"]} for r in rows]
