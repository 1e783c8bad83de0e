"""Defaults live in one place: each study's config dataclass. Every notebook's parameters cell repeats exactly
those defaults (same names, same values), and quick.json's smoke parameters build a valid config, so
`make study`, `kit run --quick`, the tests and someone calling the kit from their own notebook run one study."""
from __future__ import annotations

import ast
import json

import pytest

from kit.config import StudyConfig, StudyConfigError
from kit.paths import NOTEBOOKS_DIR
from kit.runner import load_quick, notebook_parameters
from kit.studies import STUDIES, study_class

NOTEBOOKS = sorted(p.stem for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def parameters_cell(stem: str) -> dict:
    """The cell's values as `kit run` reads them (kit.runner.notebook_parameters), after checking its shape."""
    path = NOTEBOOKS_DIR / f"{stem}.ipynb"
    cells = [c for c in json.loads(path.read_text())["cells"]
             if c["cell_type"] == "code" and "parameters" in c["metadata"].get("tags", [])]
    assert len(cells) == 1, f"{stem}: expected one cell tagged 'parameters', found {len(cells)}"
    source = "".join(cells[0]["source"])
    for node in ast.parse(source).body:
        assert isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name), \
            f"{stem}: the parameters cell holds typed assignments only (line {node.lineno})"
    return {name: ast.literal_eval(spec["default"]) for name, spec in notebook_parameters(path).items()}


def test_every_notebook_has_a_registered_study() -> None:
    assert NOTEBOOKS == sorted(STUDIES)


@pytest.mark.parametrize("stem", sorted(STUDIES))
def test_the_parameters_cell_equals_the_study_defaults(stem: str) -> None:
    cls = study_class(stem)
    assert issubclass(cls, StudyConfig)
    params, defaults = parameters_cell(stem), cls.defaults()
    assert sorted(params) == sorted(defaults), f"{stem}: names differ: notebook-only " \
        f"{sorted(set(params) - set(defaults))}, config-only {sorted(set(defaults) - set(params))}"
    differ = {k: (params[k], defaults[k]) for k in params if params[k] != defaults[k]}
    assert not differ, f"{stem}: notebook vs {cls.__name__} defaults differ: {differ}"
    assert params["out_dir"] == f"outputs/{stem}"
    cls(**params)  # the defaults are valid


@pytest.mark.parametrize("stem", sorted(STUDIES))
def test_the_smoke_parameters_build_a_valid_config(stem: str) -> None:
    quick = load_quick().get(stem, {})
    study_class(stem).from_params(quick)


def test_a_bad_value_is_one_clear_error() -> None:
    cls = study_class("20_batch_flash_attn")
    with pytest.raises(StudyConfigError, match="repetitions"):
        cls(repetitions="abc")
    with pytest.raises(StudyConfigError, match="did you mean"):
        cls.from_params({"repetition": 3})
