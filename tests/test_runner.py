"""kit.runner: parameters and study configs validated before anything runs, failures named with notebook and cell,
the rest still runs and the index renders; quick.json names real parameters of the real notebooks."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from kit import report, runner
from kit.drift import PROBE_DIR, drift_bound, drift_text, metric_kind, summarize_drift, within_drift
from kit.paths import NOTEBOOKS_DIR, QUICK_FILE, REPO_ROOT
from kit.progress import ENV as PROGRESS_ENV, progress_bar, progress_mode
from kit.report import claims_html
from kit.results import append_rows
from kit.studies import STUDIES


def _nb(path: Path, params_src: str, cells: list[str]) -> Path:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    p = new_code_cell(params_src)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [new_markdown_cell(f"# {path.stem}"), p] + [new_code_cell(c) for c in cells]
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def tiny_notebooks(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    _nb(d / "10_fails.ipynb", 'x: int = 1            # a number\nout_dir: str = "outputs/10_fails"  # where',
        ["y = x + 1", "raise ValueError('deliberate failure in the third code cell')", "z = 3"])
    _nb(d / "20_runs.ipynb", 'out_dir: str = "outputs/20_runs"  # where it writes\nlimit: int = 0  # 0 = none',
        ["from pathlib import Path\nPath(out_dir).mkdir(parents=True, exist_ok=True)\n"
         "Path(out_dir, 'done.txt').write_text(str(limit))"])
    (d / "README.ipynb").write_text("{}")  # not NN_name: never run
    return d


def test_validate_parameters_errors():
    known = {"repetitions": {}, "model": {}}
    assert runner.validate_parameters("s", {"repetitions": 2}, known) == {"repetitions": 2}
    with pytest.raises(runner.RunnerError, match="unknown parameter 'repetitons'.*did you mean 'repetitions'"):
        runner.validate_parameters("s", {"repetitons": 2}, known)
    with pytest.raises(runner.RunnerError, match="not a valid parameter name"):
        runner.validate_parameters("s", {"model; import os": "x"}, {"model; import os": {}})
    with pytest.raises(runner.RunnerError, match="only JSON values"):
        runner.validate_parameters("s", {"model": {1, 2}}, known)
    with pytest.raises(runner.RunnerError, match="only JSON values"):
        runner.validate_parameters("s", {"model": float("nan")}, known)


def test_unknown_parameter_fails_before_anything_runs(tiny_notebooks, tmp_path):
    out = tmp_path / "out"
    lines = []
    rc = runner.run_study(notebooks_dir=tiny_notebooks, out_root=str(out), params={"20_runs": {"limt": 3}},
                          log=lines.append, progress=False)
    assert rc == 2
    assert any("unknown parameter 'limt'" in line and "20_runs" in line for line in lines)
    assert not (out / "10_fails").exists() and not (out / "20_runs").exists()


def test_parameters_with_equals_in_comment_are_known(tiny_notebooks):
    # papermill's own parser skips "limit: int = 0  # 0 = none"; the runner must still know it
    assert "limit" in runner.notebook_parameters(tiny_notebooks / "20_runs.ipynb")


@pytest.mark.notebook
def test_failing_notebook_named_with_cell_rest_runs_report_renders(tiny_notebooks, tmp_path):
    out = tmp_path / "out"
    lines = []
    rc = runner.run_study(notebooks_dir=tiny_notebooks, out_root=str(out), params={"20_runs": {"limit": 7}},
                          log=lines.append, progress=False, quick=True)
    assert rc == 1
    failure = [line for line in lines if line.startswith("FAILED 10_fails")]
    assert failure, lines
    assert "cell 4" in failure[0] and "ValueError" in failure[0] and "deliberate failure" in failure[0]
    assert (out / "10_fails" / "10_fails.ipynb").exists()  # kept for inspection
    # the next notebook still ran, with its out_dir moved under the out root
    assert (out / "20_runs" / "done.txt").read_text() == "7"
    status = json.loads((out / "run_status.json").read_text())["notebooks"]
    assert status["10_fails"]["status"] == "failed" and status["10_fails"]["cell_index"] == 4
    assert status["20_runs"]["status"] == "ok"
    index = (out / "report" / "index.html").read_text()
    assert "10_fails" in index and "failed" in index and "deliberate failure" in index
    assert (out / "report" / "20_runs.html").exists()
    # the speed probe ran on the real model before and after the notebooks, and the report says what it saw
    probe = [json.loads(x) for x in (out / "speed_probe" / "results.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["status"]) for r in probe] == [("start", "ok")] * 2 + [("end", "ok")] * 2
    assert all(len(r["samples_ts"]) == 5 and r["median_ts"] > 0 for r in probe)
    assert any(line.startswith("machine speed, end / start: tg16 x") for line in lines), lines
    drift = json.loads((out / "speed_probe" / "drift.json").read_text())
    assert {t["test"] for t in drift["tests"]} == {"tg16", "pp32"}
    assert "Machine speed during the run" in index and "end/start x" in index


def test_main_run_param_syntax_and_only(tiny_notebooks, tmp_path, monkeypatch):
    assert runner.main_run(["--param", "nodot=3"]) == 2
    with pytest.raises(runner.RunnerError, match="no notebook matches 99"):
        runner.discover_notebooks(tiny_notebooks, only=["99"])
    assert [p.stem for p in runner.discover_notebooks(tiny_notebooks, only=["20"])] == ["20_runs"]
    assert [p.stem for p in runner.discover_notebooks(tiny_notebooks)] == ["10_fails", "20_runs"]


def test_out_root_relocates_output_paths(tiny_notebooks):
    nbs = runner.discover_notebooks(tiny_notebooks)
    plans = runner.plan_parameters(nbs, model=None, quick=False, out_root="/tmp/elsewhere")
    assert plans["20_runs"]["out_dir"] == "/tmp/elsewhere/20_runs"
    assert runner.plan_parameters(nbs, model=None, quick=False, out_root="outputs") == {"10_fails": {}, "20_runs": {}}


def test_quick_json_names_real_parameters_of_real_notebooks():
    quick = runner.load_quick(QUICK_FILE)
    present = {p.stem: p for p in runner.discover_notebooks(NOTEBOOKS_DIR)}
    assert "85_autotune" in quick and "85_autotune" in present
    checked = 0
    for stem, params in quick.items():
        if stem not in present:
            continue
        known = runner.notebook_parameters(present[stem])
        runner.validate_parameters(stem, params, known)  # raises on an unknown name or a non-JSON value
        checked += 1
    assert checked >= 2
    # and the whole quick plan validates for the notebooks that exist, study configs included
    plans = runner.plan_parameters(list(present.values()), model=None, quick=True, out_root="/tmp/quick-out",
                                   quick_params=quick)
    assert set(plans) == set(present) and set(present) == set(STUDIES)
    assert plans["85_autotune"]["out_dir"] == "/tmp/quick-out/85_autotune"
    assert plans["90_findings"]["out_root"] == "/tmp/quick-out"


def test_bad_model_path_is_one_error(tiny_notebooks, tmp_path):
    lines = []
    rc = runner.run_study(model=str(tmp_path / "missing.gguf"), notebooks_dir=tiny_notebooks,
                          out_root=str(tmp_path / "out"), log=lines.append, progress=False)
    assert rc == 2 and "no such file" in lines[0]


def test_a_bad_value_anywhere_is_one_error_listing_all_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    lines = []
    params = {"85_autotune": {"repetitions": "abc"}, "00_environment": {"n_prompt": 4096, "n_ctx": 256},
              "20_batch_flash_attn": {"repetitions": 0}}
    t = time.perf_counter()
    rc = runner.run_study(out_root=str(out), params=params, log=lines.append, progress=False)
    assert rc == 2 and time.perf_counter() - t < 10
    text = "\n".join(lines)
    assert text.startswith("error: invalid parameters, nothing was run")
    assert "85_autotune: AutotuneStudy: repetitions='abc' has type str; expected int" in text
    assert "00_environment: n_ctx=256 is smaller than the pp or tg test (4096 tokens)" in text
    assert "20_batch_flash_attn" in text and "repetitions=0 must be >= 1" in text
    assert not out.exists()  # no probe, no notebook, no status file


def test_study_config_is_built_from_notebook_defaults_and_overrides():
    nb = NOTEBOOKS_DIR / "00_environment.ipynb"
    known = runner.notebook_parameters(nb)
    assert known["n_ctx"]["help"].startswith("context size")
    study = runner.build_study_config("00_environment", known, {"n_gen": 4, "out_dir": "elsewhere/00"})
    assert study.n_gen == 4 and study.n_prompt == 512 and study.out_path == REPO_ROOT / "elsewhere" / "00"
    with pytest.raises(runner.RunnerError, match="unknown parameter 'n_gne'.*did you mean 'n_gen'"):
        runner.build_study_config("00_environment", known, {"n_gne": 4})
    assert runner.build_study_config("99_own_notebook", {}, {"x": 1}) is None  # unregistered: names only


def test_cli_run_with_a_bad_value_exits_within_seconds_having_run_nothing(tmp_path):
    out = tmp_path / "out"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kit", "run", "-p", '85_autotune.repetitions="abc"',
                           "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and time.perf_counter() - t < 10, proc.stdout + proc.stderr
    assert "repetitions='abc'" in proc.stdout and not out.exists()


@pytest.mark.notebook
def test_report_reads_the_runs_status_file(tiny_notebooks, tmp_path):
    out = tmp_path / "out"
    assert report.read_status(out) == {}
    rc = runner.run_study(notebooks_dir=tiny_notebooks, out_root=str(out), only=["20"], log=lambda s: None,
                          progress=False, probe=False, report=False)
    assert rc == 0 and report.read_status(out)["20_runs"]["status"] == "ok"


def test_drift_summary_flags_only_a_clear_change(tmp_path):
    def row(run, phase, test, xs):
        return {"run_id": run, "phase": phase, "test": test, "status": "ok", "samples_ts": xs,
                "median_ts": sorted(xs)[len(xs) // 2], "test_time": "t"}

    path = tmp_path / PROBE_DIR / "results.jsonl"
    steady = [100, 101, 99, 100.5, 99.5]
    append_rows(path, [row("a", "start", "tg64", steady), row("a", "end", "tg64", [x * 0.6 for x in steady]),
                       row("b", "start", "tg64", steady), row("b", "end", "tg64", [x * 1.01 for x in steady]),
                       row("c", "start", "tg64", steady)])  # c never ended: not a complete run
    latest = summarize_drift(tmp_path)
    assert latest["run_id"] == "b" and not latest["drifted"]
    assert 1.0 < latest["tests"][0]["ratio"] < 1.02
    slowed = summarize_drift(tmp_path, "a")
    assert slowed["drifted"] and slowed["tests"][0]["ci_high"] < 0.7
    assert "moved by more than 10%" in drift_text(slowed)
    assert "not probed" in drift_text(summarize_drift(tmp_path / "nothing"))


def test_speed_effects_within_the_runs_drift_are_flagged(tmp_path):
    summary = {"tests": [{"test": "tg64", "ratio": 1.04}, {"test": "pp128", "ratio": 1 / 1.3}]}
    assert drift_bound(summary) == pytest.approx(1.3) and drift_bound(summary, "tg") == pytest.approx(1.04)
    assert metric_kind("tg t/s ratio") == "tg" and metric_kind("pp512 t/s, TTFT") == "pp"
    assert metric_kind("request time (n_prompt/pp + n_gen/tg)") is None
    speed = {"claim": "G3", "verdict": "supported", "effect": 1.2, "metric": "pp512 t/s ratio, a / b",
             "summary": "s", "evidence": []}
    assert within_drift(speed, summary) == pytest.approx(1.3)
    assert within_drift({**speed, "effect": 1 / 1.25}, summary)
    assert not within_drift({**speed, "metric": "tg t/s ratio"}, summary)  # generation moved only 4 %
    assert within_drift({**speed, "metric": "load ms, a / b"}, summary) == pytest.approx(1.3)  # neither: the larger
    assert not within_drift({**speed, "effect": 1.5}, summary)  # larger than the drift
    assert not within_drift({**speed, "verdict": "no meaningful effect"}, summary)
    assert not within_drift({**speed, "metric": "perplexity ratio, a / b"}, summary)  # quality does not drift
    assert not within_drift(speed, None) and drift_bound(None) is None
    assert "within the run's machine drift, x1.30" in claims_html([speed], tmp_path, tmp_path, drift=summary)
    assert "drift" not in claims_html([speed], tmp_path, tmp_path, drift=None)


BAR_CELL = ("from kit.progress import progress_bar, progress_mode\nprint('mode', progress_mode())\n"
            "bar = progress_bar(3, 'trials')\nfor _ in range(3):\n    bar.update(1)\nbar.close()")


def test_progress_mode_follows_kit_progress(monkeypatch):
    for value, mode in (("off", "off"), ("0", "off"), ("text", "text"), ("widget", "widget")):
        monkeypatch.setenv(PROGRESS_ENV, value)
        assert progress_mode() == mode
    monkeypatch.setenv(PROGRESS_ENV, "off")
    assert progress_bar(3, "x").disable


@pytest.mark.notebook
def test_a_kit_run_kernel_shows_no_progress_bar(tmp_path, monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    nb = _nb(tmp_path / "30_bar.ipynb", 'out_dir: str = "outputs/30_bar"  # where', [BAR_CELL])
    rec = runner.run_notebook(nb, {}, str(tmp_path / "out"), progress=False)
    assert rec["status"] == "ok" and PROGRESS_ENV not in os.environ   # set for the kernel only
    cell = nbformat.read(rec["executed"], as_version=4).cells[-1]
    assert [o.get("text") for o in cell.outputs] == ["mode off\n"]   # no stderr, no widget, no TqdmWarning


@pytest.mark.notebook
def test_an_interactive_kernel_shows_a_widget_bar_without_warnings(tmp_path, monkeypatch):
    """What JupyterLab gets: with ipywidgets, the bar is a widget view, and nothing goes to stderr."""
    from nbclient import NotebookClient

    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    nb = new_notebook()
    nb.cells = [new_code_cell(BAR_CELL)]
    NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT)}},
                   store_widget_state=True).execute()
    outputs = nb.cells[0].outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    assert not [o for o in outputs if o.get("name") == "stderr"], outputs
    assert "TqdmWarning" not in json.dumps(outputs) and "mode widget" in json.dumps(outputs)
    assert nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]   # the bar's state
