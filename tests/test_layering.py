"""The structure, checked with ast so it stays: the core never imports a study, a study imports only the core
(kit.studies.autotune may use kit.studies.rag.pipeline), nobody imports another module's _private names, the
report never imports the runner, and imports sit at the top of a file unless the line says why."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kit.paths import REPO_ROOT

KIT = REPO_ROOT / "kit"
APP = {"kit.runner", "kit.__main__"}      # the layer above the studies: runs notebooks, validates their configs
ALLOWED_CROSS_STUDY = {("kit.studies.autotune", "kit.studies.rag.pipeline"),
                       # the served study serves notebook 85's profiles with its RAG-shaped requests
                       ("kit.studies.server", "kit.studies.autotune"), ("kit.studies.server", "kit.studies.rag.pipeline")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(KIT.rglob("*.py"))}


def _resolve(name: str, node: ast.ImportFrom, path: Path) -> str:
    if not node.level:
        return node.module or ""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: Path, tree: ast.Module):
    """(imported module, names imported from it, node) for every kit-internal import."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("kit"):
                    yield a.name, [], node
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, node, path)
            if mod.startswith("kit"):
                yield mod, [a.name for a in node.names], node


def _study(mod: str) -> str | None:
    """The study a module belongs to: kit.studies.rag.study -> kit.studies.rag."""
    parts = mod.split(".")
    return ".".join(parts[:3]) if len(parts) >= 3 and parts[:2] == ["kit", "studies"] else None


def _targets(mod: str, names: list[str]) -> list[str]:
    """`from kit.studies import rag` imports the module kit.studies.rag."""
    if mod == "kit.studies" and names:
        return [f"kit.studies.{n}" for n in names]
    return [mod]


MODULES = _modules()


def test_the_tree_has_a_core_and_studies() -> None:
    studies = {_study(m) for m in MODULES if _study(m)}
    assert {"kit.studies.rag", "kit.studies.autotune", "kit.studies.batch_flash_attn"} <= studies
    assert {"kit.config", "kit.measure", "kit.sweep", "kit.verdicts", "kit.paths"} <= set(MODULES)


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not _study(m) and m not in APP and m != "kit.studies"))
def test_core_never_imports_a_study(name: str) -> None:
    path, tree = MODULES[name]
    bad = [f"{path.name}:{n.lineno} imports {t}" for mod, names, n in _imports(name, path, tree)
           for t in _targets(mod, names) if t.startswith("kit.studies")]
    assert not bad, bad


@pytest.mark.parametrize("name", sorted(m for m in MODULES if _study(m)))
def test_a_study_imports_only_the_core(name: str) -> None:
    path, tree = MODULES[name]
    own = _study(name)
    bad = []
    for mod, names, n in _imports(name, path, tree):
        for t in _targets(mod, names):
            other = _study(t)
            if other and other != own and not any(own == a and t.startswith(b) for a, b in ALLOWED_CROSS_STUDY):
                bad.append(f"{path.name}:{n.lineno} imports {t}")
            if t in APP:
                bad.append(f"{path.name}:{n.lineno} imports the app layer {t}")
    assert not bad, bad


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_another_modules_private_names(name: str) -> None:
    path, tree = MODULES[name]
    bad = [f"{path.name}:{n.lineno} imports {mod}.{x}" for mod, names, n in _imports(name, path, tree)
           for x in names if x.startswith("_") and not x.startswith("__") and mod != name]
    assert not bad, bad


def test_the_report_never_imports_the_runner() -> None:
    path, tree = MODULES["kit.report"]
    assert not [n.lineno for mod, names, n in _imports("kit.report", path, tree)
                if "kit.runner" in _targets(mod, names) or (mod == "kit" and "runner" in names)]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_sit_at_the_top_unless_the_line_says_why(name: str) -> None:
    path, tree = MODULES[name]
    lines = path.read_text().splitlines()
    top = {id(n) for n in tree.body}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            span = lines[node.lineno - 1: node.end_lineno] + [lines[node.lineno - 2] if node.lineno > 1 else ""]
            if not any("#" in line for line in span):
                bad.append(f"{path.name}:{node.lineno}")
    assert not bad, f"imports inside functions without a stated reason: {bad}"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The rules above can fail: a study that imports another study's private helper is caught."""
    src = "from kit.studies.batch_flash_attn import _as_list\n\ndef f():\n    import kit.studies.rag\n"
    tree = ast.parse(src)
    found = list(_imports("kit.studies.gpu_layers", KIT / "studies" / "gpu_layers.py", tree))
    assert [m for m, _, _ in found] == ["kit.studies.batch_flash_attn", "kit.studies.rag"]
    assert any(x.startswith("_") for _, names, _ in found for x in names)
