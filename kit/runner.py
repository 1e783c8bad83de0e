"""The one-command study: every notebooks/NN_*.ipynb through papermill, in order, then the report.

`python -m kit run [--model PATH] [--quick] [--only 10,20] [--out DIR] [-p STEM.NAME=JSON]`

- Executed copies go to <out>/<stem>/<stem>.ipynb; a failed one is kept there for inspection, named in the
  output with its cell, and the run goes on with the next notebook; the command then exits non-zero.
- Resumable: the notebooks' sweeps skip trials already in results.jsonl, so a rerun reuses them.
- Validated before anything runs, for every selected notebook: parameter names (known to the notebook via
  papermill.inspect_notebook) and JSON values, then the study config itself (`kit.studies.study_class(stem)`
  built from the notebook's defaults with this run's values on top: types, ranges, cross-field rules). Every
  problem of every notebook is one error listing them all; nothing is measured.
- `--quick` passes notebooks/quick.json's smoke parameters ({"stem": {param: value}}); with `--out` the
  outputs go to another root. String parameters whose default lies under "outputs" are moved under it.
  Relative roots are taken from the repository root (kit.paths.resolve), whatever the working directory.
- The notebooks' kernels run with KIT_PROGRESS=off (kit.progress): no progress bar, whose text or widget would
  only end up in the executed notebook; `--compare-to OTHER_RUN` puts another run beside this one in the report.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import json
import keyword
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from kit.config import StudyConfig
from kit.drift import run_probe, summarize_drift
from kit.models import resolve_model
from kit.paths import NOTEBOOKS_DIR, OUTPUTS, QUICK_FILE, REPO_ROOT, resolve
from kit.progress import ENV as PROGRESS_ENV
from kit.report import read_status, render_report, status_path
from kit.studies import STUDIES, study_class

NOTEBOOK_NAME = re.compile(r"^(\d\d)_[a-z0-9_]+\.ipynb$")
DEFAULT_OUT = OUTPUTS


class RunnerError(ValueError):
    """Bad input to the runner (unknown notebook, unknown parameter, non-JSON value, invalid study config)."""


# ---- discovery and parameters -------------------------------------------------------------------------------
def discover_notebooks(notebooks_dir: str | os.PathLike = NOTEBOOKS_DIR, only: Sequence[str] | None = None) -> list[Path]:
    """notebooks/NN_name.ipynb in reading order; `only` keeps stems or their NN prefixes ("10", "10_gpu_layers")."""
    d = resolve(notebooks_dir)
    found = sorted(p for p in d.glob("*.ipynb") if NOTEBOOK_NAME.match(p.name))
    if not only:
        return found
    wanted = [str(o).strip() for o in only if str(o).strip()]
    out, unknown = [], []
    for w in wanted:
        hits = [p for p in found if p.stem == w or p.stem.split("_", 1)[0] == w or p.name == w]
        if not hits:
            unknown.append(w)
        out.extend(h for h in hits if h not in out)
    if unknown:
        raise RunnerError(f"no notebook matches {', '.join(unknown)}; known: {', '.join(p.stem for p in found)}")
    return sorted(out)


def notebook_parameters(path: str | os.PathLike) -> dict[str, dict]:
    """The parameters cell (the code cell tagged "parameters"): name -> {name, default (its source text), help}.

    Read with json and ast, not papermill.inspect_notebook: its line parser skips a line whose comment holds '='
    ("0 = no limit"), and importing papermill takes seconds that the up-front validation should not spend.
    """
    nb = json.loads(resolve(path).read_text(encoding="utf-8"))
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code" or "parameters" not in cell.get("metadata", {}).get("tags", []):
            continue
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        lines = source.splitlines()
        known = {}
        for node in ast.parse(source).body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                if isinstance(t, ast.Name):
                    default = ast.get_source_segment(source, node.value) if node.value is not None else None
                    comment = lines[node.end_lineno - 1][node.end_col_offset:].strip()
                    known[t.id] = {"name": t.id, "default": default, "help": comment.lstrip("#").strip()}
        return known
    return {}


def _json_type_ok(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, str)):
        return True
    if isinstance(v, float):
        return v == v and v not in (float("inf"), float("-inf"))
    if isinstance(v, list):
        return all(_json_type_ok(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _json_type_ok(x) for k, x in v.items())
    return False


def validate_parameters(stem: str, params: dict, known: dict) -> dict:
    """Names must be identifiers the notebook declares; values JSON types. Returns params, or raises RunnerError."""
    problems = []
    for name, value in params.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            problems.append(f"{name!r} is not a valid parameter name")
        elif name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown parameter {name!r}{hint}; the notebook declares: {', '.join(known) or 'none'}")
        if not _json_type_ok(value):
            problems.append(f"{name}={value!r}: only JSON values (str, int, float, bool, null, list, dict) can be passed")
    if problems:
        raise RunnerError(f"{stem}: " + "; ".join(problems))
    return params


def build_study_config(stem: str, known: dict, params: dict) -> StudyConfig | None:
    """The notebook's study config as this run would build it: the parameters cell's defaults, `params` on top.

    None for a notebook with no registered study (kit.studies.STUDIES), e.g. one of your own: its names and
    JSON values are checked, nothing more. Raises RunnerError for a config that cannot be built."""
    if stem not in STUDIES:
        return None
    try:
        cls = study_class(stem)
    except Exception as exc:  # noqa: BLE001 - a study module that does not import is this run's problem too
        raise RunnerError(f"{stem}: cannot load its study config {STUDIES[stem]} "
                          f"({type(exc).__name__}: {exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, StudyConfig)):
        raise RunnerError(f"{stem}: {STUDIES[stem]} is not a kit.config.StudyConfig")
    values = {name: _default_value(spec) for name, spec in known.items()}
    values.update(params)
    try:
        return cls.from_params(values)
    except (ValueError, TypeError) as exc:  # StudyConfigError, or a SettingsError from a study's check()
        raise RunnerError(f"{stem}: {exc}") from None


def load_quick(path: str | os.PathLike = QUICK_FILE) -> dict[str, dict]:
    p = resolve(path)
    if not p.exists():
        return {}
    data = json.loads(p.read_text())
    data = {k: v for k, v in data.items() if not k.startswith("_")} if isinstance(data, dict) else data
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise RunnerError(f"{p}: expected {{\"stem\": {{param: value}}}} (keys starting with '_' are comments)")
    return data


def _default_value(spec: dict) -> Any:
    raw = spec.get("default")
    if raw is None:
        return None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _relocate(value: Any, out_root: str) -> Any:
    """"outputs" / "outputs/x" -> "<out_root>" / "<out_root>/x" (strings only)."""
    if isinstance(value, str) and (value == DEFAULT_OUT or value.startswith(DEFAULT_OUT + "/")):
        return out_root + value[len(DEFAULT_OUT):]
    return value


def _notebook_params(known: dict, model: str | None, out_root: str, quick: dict, extra: dict) -> dict:
    """What papermill gets for one notebook: relocated output defaults, --model, quick.json, then -p (as given)."""
    params: dict[str, Any] = {}
    if out_root != DEFAULT_OUT:
        for name, spec in known.items():
            v = _default_value(spec)
            moved = _relocate(v, out_root)
            if moved != v:
                params[name] = moved
    if model is not None and "model" in known:
        params["model"] = model
    params.update(quick)
    if out_root != DEFAULT_OUT:
        params = {k: _relocate(v, out_root) for k, v in params.items()}
    params.update(extra)
    return params


def plan_parameters(notebooks: Sequence[Path], model: str | None, quick: bool, out_root: str,
                    quick_params: dict | None = None, extra: dict[str, dict] | None = None) -> dict[str, dict]:
    """Every notebook's parameters, and its study config built from them, validated up front: all problems of
    all notebooks in one RunnerError."""
    quick_params = (load_quick() if quick_params is None else quick_params) if quick else {}
    extra = extra or {}
    plans, problems = {}, []
    # a -p for a registered notebook that --only left out is ignored; one for no notebook at all is a typo
    unknown_stems = sorted(set(extra) - {nb.stem for nb in notebooks} - set(STUDIES))
    if unknown_stems:
        problems.append(f"-p names no notebook: {', '.join(unknown_stems)}")
    for nb in notebooks:
        stem = nb.stem
        try:
            known = notebook_parameters(nb)
        except Exception as exc:  # noqa: BLE001 - a notebook papermill cannot read
            problems.append(f"{stem}: cannot read its parameters ({type(exc).__name__}: {exc})")
            continue
        params = _notebook_params(known, model, out_root, quick_params.get(stem, {}), extra.get(stem, {}))
        try:
            validate_parameters(stem, params, known)
            build_study_config(stem, known, params)
        except RunnerError as exc:
            problems.append(str(exc))
            continue
        plans[stem] = params
    if problems:
        raise RunnerError("invalid parameters, nothing was run:\n  " + "\n  ".join(problems))
    return plans


# ---- running -------------------------------------------------------------------------------------------------
def _write_status(out_root: str, status: dict) -> None:
    p = status_path(out_root)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"schema": 1, "notebooks": status}, indent=2, default=str))
    os.replace(tmp, p)


def describe_failure(exc: BaseException) -> dict:
    """Cell index, execution count, exception name and value from papermill's error (or any other)."""
    if type(exc).__name__ == "PapermillExecutionError":  # papermill's class, without importing papermill here
        return {"cell_index": exc.cell_index, "exec_count": exc.exec_count, "ename": exc.ename,
                "evalue": str(exc.evalue)[:2000]}
    return {"cell_index": None, "exec_count": None, "ename": type(exc).__name__, "evalue": str(exc)[:2000]}


@contextlib.contextmanager
def headless_kernel_env():
    """Kernels started inside inherit KIT_PROGRESS=off (unless the caller set KIT_PROGRESS): a headless run
    has nobody to show a bar to, and its text or widget would only land in the executed notebook."""
    had = os.environ.get(PROGRESS_ENV)
    if had is None:
        os.environ[PROGRESS_ENV] = "off"
    try:
        yield
    finally:
        if had is None:
            os.environ.pop(PROGRESS_ENV, None)


def run_notebook(nb: Path, params: dict, out_root: str, kernel_name: str = "python3", cwd: str | None = None,
                 progress: bool = True) -> dict:
    """One notebook with papermill; returns its status record (never raises for a failing notebook)."""
    # papermill (with nbformat's jsonschema) takes seconds to import: only a run that executes a notebook pays
    # them, so that `kit run` with a bad value answers within seconds (validation needs only json and ast)
    import papermill as pm

    out_dir = resolve(out_root) / nb.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / f"{nb.stem}.ipynb"
    t0 = time.perf_counter()
    rec = {"notebook": str(nb), "executed": str(executed), "parameters": params,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        with headless_kernel_env():
            pm.execute_notebook(str(nb), str(executed), parameters=params, kernel_name=kernel_name,
                                cwd=cwd or str(REPO_ROOT), progress_bar=progress)
        rec.update(status="ok")
    except Exception as exc:  # noqa: BLE001 - a failed notebook must not stop the rest
        rec.update(status="failed", **describe_failure(exc))
        if not hasattr(exc, "cell_index"):
            rec["traceback"] = traceback.format_exc(limit=5)
    rec["duration_s"] = round(time.perf_counter() - t0, 1)
    return rec


def _probe(model: str | None, out_root: str, phase: str, run_id: str, quick: bool, log) -> None:
    """The drift probe; a failure is logged (and its row kept), never fatal: the studies matter more."""
    try:
        rows = run_probe(model, out_root, phase, run_id, quick=quick)
        bad = [r for r in rows if r.get("status") != "ok"]
        if bad:
            log(f"speed probe ({phase}) failed: {bad[0].get('status')}: {bad[0].get('error')}")
        else:
            log(f"speed probe ({phase}): " + ", ".join(f"{r['test']} {r['median_ts']:.1f} t/s" for r in rows))
    except Exception as exc:  # noqa: BLE001
        log(f"speed probe ({phase}) failed: {type(exc).__name__}: {exc}")


def _log_drift(out_root: str, run_id: str, log) -> None:
    summary = summarize_drift(out_root, run_id)
    if summary:
        log("machine speed, end / start: " + ", ".join(
            f"{t['test']} x{t['ratio']:.2f} [{t['ci_low']:.2f}, {t['ci_high']:.2f}]" for t in summary["tests"])
            + (" (drifted: see the report)" if summary["drifted"] else ""))


def failure_message(stem: str, rec: dict) -> str:
    where = (f"cell {rec['cell_index']} (execution count {rec['exec_count']})"
             if rec.get("cell_index") is not None else "before or outside a cell")
    return (f"FAILED {stem}: {where}: {rec.get('ename')}: {rec.get('evalue')}\n"
            f"  executed notebook kept for inspection: {rec.get('executed')}")


def _prepare(model, quick, only, out_root, notebooks_dir, quick_file, params) -> tuple[list[Path], dict[str, dict]]:
    """Everything checked before the first notebook starts (model file, notebooks, parameters, study configs)."""
    if model is not None:
        resolve_model(model)  # a bad model path fails here, not twelve times
    notebooks = discover_notebooks(notebooks_dir, only)
    if not notebooks:
        raise RunnerError(f"no notebooks named NN_name.ipynb in {notebooks_dir}")
    quick_params = load_quick(quick_file or resolve(notebooks_dir) / QUICK_FILE.name) if quick else None
    return notebooks, plan_parameters(notebooks, model, quick, out_root, quick_params, params)


def _run_notebooks(notebooks: list[Path], plans: dict, out_root: str, status: dict, log, **kw) -> list[str]:
    """Each notebook in order, the status file updated after each; returns the stems that failed."""
    failed = []
    for i, nb in enumerate(notebooks, 1):
        log(f"[{i}/{len(notebooks)}] {nb.stem} {json.dumps(plans[nb.stem]) if plans[nb.stem] else ''}".rstrip())
        rec = run_notebook(nb, plans[nb.stem], out_root, **kw)
        status[nb.stem] = rec
        _write_status(out_root, status)
        if rec["status"] == "ok":
            log(f"    ok in {rec['duration_s']:.0f} s")
        else:
            failed.append(nb.stem)
            log(failure_message(nb.stem, rec))
    return failed


def _render(out_root: str, status: dict, log, compare_to: str | None = None) -> bool:
    try:
        log(f"report: {render_report(out_root, status=status, compare_to=compare_to)}")
        return True
    except Exception as exc:  # noqa: BLE001 - a report failure is a failure, but after the studies ran
        log(f"FAILED report: {type(exc).__name__}: {exc}")
        return False


def run_study(model: str | None = None, quick: bool = False, only: Sequence[str] | None = None,
              out_root: str = DEFAULT_OUT, notebooks_dir: str | os.PathLike = NOTEBOOKS_DIR,
              quick_file: str | os.PathLike | None = None, params: dict[str, dict] | None = None,
              report: bool = True, kernel_name: str = "python3", cwd: str | None = None,
              progress: bool = True, log=print, probe: bool = True, compare_to: str | None = None) -> int:
    """Run the study notebooks in order, then render the report (with `compare_to`, another run's output root,
    beside this one). 0 when every notebook ran, 1 otherwise, 2 for bad input (nothing run).

    With `probe`, the same short engine bench runs before the first notebook and after the last
    (`kit.drift`): the report says how much the machine's speed moved during the run."""
    out_root = str(out_root).rstrip("/") or DEFAULT_OUT
    try:
        notebooks, plans = _prepare(model, quick, only, out_root, notebooks_dir, quick_file, params)
    except (RunnerError, ValueError) as exc:
        log(f"error: {exc}")
        return 2
    status = read_status(out_root)
    t_start = time.perf_counter()
    run_id = time.strftime("%Y%m%dT%H%M%S")
    if probe:
        _probe(model, out_root, "start", run_id, quick, log)
    failed = _run_notebooks(notebooks, plans, out_root, status, log, kernel_name=kernel_name, cwd=cwd,
                            progress=progress)
    if probe:
        _probe(model, out_root, "end", run_id, quick, log)
        _log_drift(out_root, run_id, log)
    if report and not _render(out_root, status, log, compare_to):
        failed.append("report")
    profiles = resolve(out_root) / "profiles"
    if profiles.is_dir():
        log(f"profiles: {', '.join(str(p) for p in sorted(profiles.glob('*.env')))}")
    log(f"{len(notebooks)} notebooks in {(time.perf_counter() - t_start) / 60:.1f} min")
    if failed:
        log(f"{len(failed)} failed: {', '.join(failed)}")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m kit run", description="Run every study notebook, then the report.")
    ap.add_argument("--model", default=None, help="bundled model name or path to a GGUF (default: the bundled model)")
    ap.add_argument("--quick", action="store_true", help="smoke parameters from notebooks/quick.json (CI)")
    ap.add_argument("--only", default=None, help="comma-separated stems or NN prefixes, e.g. 10,20_batch_flash_attn")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="output root (default: outputs; relative: to the repository root)")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="STEM.NAME=JSON",
                    help="one parameter for one notebook, e.g. 20_batch_flash_attn.repetitions=3")
    ap.add_argument("--no-report", action="store_true", help="skip rendering the HTML report")
    ap.add_argument("--compare-to", default=None, metavar="OTHER_RUN",
                    help="another run's output root: the report puts both runs side by side (kit compare)")
    ap.add_argument("--no-probe", action="store_true",
                    help="skip the speed probe before and after the notebooks (machine drift check)")
    return ap


def _parse_param_args(items: Sequence[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        stem, dot, name = key.partition(".")
        if not sep or not dot:
            raise RunnerError(f"--param {item!r}: expected STEM.NAME=JSON")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string
        out.setdefault(stem, {})[name] = value
    return out


def main_run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        params = _parse_param_args(args.param)
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    only = [s for s in args.only.split(",")] if args.only else None
    return run_study(model=args.model, quick=args.quick, only=only, out_root=args.out, params=params,
                     report=not args.no_report, probe=not args.no_probe, compare_to=args.compare_to)


if __name__ == "__main__":
    sys.exit(main_run())
