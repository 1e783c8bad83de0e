"""Sweeps: a grid of settings -> isolated trials (one child process each) -> rows appended as each trial ends.

Everything that can be checked is checked before the first trial starts (settings, model file, whether every
test fits the context), so bad input fails in seconds with one message and nothing measured is lost.
A rerun of the same study skips what is already in results.jsonl (key: model sha256 + settings + test).
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from . import __version__
from .config import Settings, SettingsError, _check_names
from .measure import DEFAULT_REPETITIONS, Test
from .models import model_card
from .results import RESULTS_FILE, append_rows, load_results, read_rows

DEFAULT_TIMEOUT_S = 600
STDERR_TAIL_LINES = 15
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---- grids -----------------------------------------------------------------------------------------------------
def grid(base: Settings | None = None, skip_invalid: bool = False, **axes: Sequence) -> list[Settings]:
    """Cartesian product of axes over a base Settings.

    Invalid combinations (say n_ubatch > n_batch) are one error listing all of them, or, with
    skip_invalid=True, left out (`grid.skipped` on the returned list says which and why).
    """
    base = base or Settings()
    _check_names(axes)
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise SettingsError(f"axis {name!r} must be a list of values, got {values!r}")
    names = list(axes)
    out, skipped = _Grid(), []
    for combo in itertools.product(*(list(axes[n]) for n in names)):
        change = dict(zip(names, combo))
        try:
            out.append(base.replace(**change))
        except SettingsError as exc:
            skipped.append((change, str(exc)))
    if skipped and not skip_invalid:
        lines = "\n".join(f"  {c}: {e}" for c, e in skipped)
        raise SettingsError(f"{len(skipped)} invalid combination(s) in the grid (skip_invalid=True leaves them out):\n{lines}")
    out.skipped = skipped
    return out


class _Grid(list):
    skipped: list


def split_out_dir(out_dir: str | os.PathLike) -> tuple[str, Path]:
    """outputs/<study> -> (study name, output root), the two arguments run_sweep takes."""
    p = Path(out_dir)
    return p.name, p.parent


def planned_rows(df, configs: Sequence[Settings], tests: Sequence[Test], repetitions: int):
    """Only the rows this plan asked for, by trial key: a reused study folder may hold rows of other parameters."""
    if df is None or df.empty:
        return df
    shas = {m: model_card(m).sha256 for m in {s.model for s in configs}}
    keys = {trial_key(shas[s.model], s, t, repetitions) for s in configs for t in tests}
    return df[df["trial_key"].isin(keys)].reset_index(drop=True)


class StudyLocation:
    """For a study config with an `out_dir` (outputs/<study>): the sweep's study name and output root."""

    out_dir: str

    @property
    def study(self) -> str:
        return split_out_dir(self.out_dir)[0]

    @property
    def out_root(self) -> str:
        return str(split_out_dir(self.out_dir)[1])


# ---- keys and provenance ----------------------------------------------------------------------------------------
def trial_key(model_sha256: str, settings: Settings, test: Test, repetitions: int) -> str:
    s = settings.to_dict()
    s.pop("model")  # the file's content, not its name or path, identifies the model
    blob = json.dumps({"model": model_sha256, "settings": s, "test": test.to_dict(), "repetitions": repetitions},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class _Plan:
    settings: Settings
    model_path: str
    card: dict
    tests: list[Test]
    keys: list[str]


def _provenance(card: dict, env: dict) -> dict:
    return {
        "build_commit": env.get("llama_cpp_python"),
        "cpu_info": env.get("cpu_info"),
        "gpu_info": env.get("gpu_info"),
        "backends": env.get("backends"),
        "model_filename": card["file_name"],
        "model_type": card["model_type"],
        "model_size": card["size_bytes"],
        "model_n_params": card["n_params"],
        "model_sha256": card["sha256"],
        "kit_version": __version__,
    }


def _settings_columns(s: Settings) -> dict:
    d = s.to_dict()
    d.pop("model")
    return d


# ---- running one trial in a child -------------------------------------------------------------------------------
def _child_setup(mem_limit_mb: int | None):
    def setup() -> None:
        try:  # die with the parent: a killed sweep must not leave a trial running
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
        if mem_limit_mb:
            import resource

            lim = mem_limit_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    return setup


def _child_env() -> dict:
    env = dict(os.environ)
    # ggml_abort would otherwise attach gdb for a backtrace: slow, and it buries the assertion message
    env.setdefault("GGML_NO_BACKTRACE", "1")
    return env


def _describe_exit(rc: int) -> tuple[str, str]:
    if rc < 0:
        sig = signal.Signals(-rc).name
        if sig == "SIGKILL":
            return "killed", "killed by SIGKILL (out of memory, or killed from outside)"
        return "crashed", f"crashed with {sig}"
    return "error", f"exited with code {rc}"


def run_trial(settings: Settings, tests: list[Test], repetitions: int, model_path: str,
              timeout_s: float = DEFAULT_TIMEOUT_S, log_file: str | None = None,
              mem_limit_mb: int | None = None) -> list[dict]:
    """Run one configuration's tests in a child process. Always returns one row per test, failed or not."""
    with tempfile.TemporaryDirectory(prefix="kit-trial-") as tmp:
        spec_p, result_p, err_p = (os.path.join(tmp, n) for n in ("spec.json", "result.json", "stderr.txt"))
        with open(spec_p, "w") as fh:
            json.dump({"settings": settings.to_dict(), "tests": [t.to_dict() for t in tests],
                       "repetitions": repetitions, "model_path": model_path, "log_file": log_file}, fh)
        t0 = time.perf_counter()
        with open(err_p, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kit.worker", spec_p, result_p],
                stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                cwd=str(Path(__file__).resolve().parent.parent), start_new_session=True, env=_child_env(),
                preexec_fn=_child_setup(mem_limit_mb),
            )
            try:
                rc = proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
                timed_out = True
        wall_s = time.perf_counter() - t0
        tail = _tail(err_p)
        if log_file and tail:
            with open(log_file, "a") as fh:
                fh.write(f"\n--- trial stderr ({settings.to_dict()}) ---\n{tail}\n")
        done = read_rows(result_p)
        rows = done[:]
        if len(done) < len(tests):
            if timed_out:
                status, error = "timeout", f"no result within {timeout_s:g} s; killed"
            elif rc == 0:
                status, error = "error", "the child exited without reporting this test"
            else:
                status, error = _describe_exit(rc)
            if tail:
                error += " | stderr: " + tail
            first = True
            for t in tests[len(done):]:
                # the test in flight gets the cause; the ones after it were never reached
                rows.append({"status": status if first else "skipped",
                             "error": error if first else f"not run: an earlier test in the trial failed ({status})",
                             "test": t.name, "test_kind": t.kind,
                             "n_prompt": t.n_prompt, "n_gen": t.n_gen, "n_depth": t.n_depth})
                first = False
        for r in rows:
            r["trial_wall_s"] = round(wall_s, 3)
        return rows


def _tail(path: str, n: int = STDERR_TAIL_LINES) -> str:
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# ---- the sweep ----------------------------------------------------------------------------------------------------
def study_dir(study: str, out_root: str | os.PathLike = "outputs") -> Path:
    if not STUDY_NAME.match(study):
        raise SettingsError(f"study name {study!r}: use letters, digits, '_', '-', '.' (it becomes a folder name)")
    return Path(out_root) / study


def plan_trials(configs: Sequence[Settings], tests: Sequence[Test], repetitions: int) -> list[_Plan]:
    """Validate everything before any trial runs; all problems in one error."""
    if not configs:
        raise SettingsError("no configurations to run")
    if not tests:
        raise SettingsError("no tests to run")
    if repetitions < 1:
        raise SettingsError(f"repetitions={repetitions} must be positive")
    cards: dict[str, dict] = {}
    plans, problems = [], []
    for s in configs:
        if not isinstance(s, Settings):
            raise SettingsError(f"configs must be Settings, got {type(s).__name__}")
        if s.model not in cards:
            cards[s.model] = model_card(s.model).to_dict()  # raises ModelFileError for a bad file
        card = cards[s.model]
        for t in tests:
            try:
                s.check_fits(t.tokens_needed(), card["n_ctx_train"], what=f"test {t.name}")
            except SettingsError as exc:
                problems.append(f"  {_short(s)}: {exc}")
        plans.append(_Plan(s, card["path"], card, list(tests),
                           [trial_key(card["sha256"], s, t, repetitions) for t in tests]))
    if problems:
        raise SettingsError("some trials cannot run:\n" + "\n".join(dict.fromkeys(problems)))
    return plans


def _short(s: Settings) -> str:
    d, base = s.to_dict(), Settings().to_dict()
    return ", ".join(f"{k}={v}" for k, v in d.items() if base.get(k) != v) or "defaults"


def run_sweep(study: str, configs: Sequence[Settings] | Settings, tests: Sequence[Test],
              repetitions: int = DEFAULT_REPETITIONS, out_root: str | os.PathLike = "outputs",
              timeout_s: float = DEFAULT_TIMEOUT_S, retry_failed: bool = False, progress: bool = True,
              mem_limit_mb: int | None = None, extra: dict | None = None):
    """Run every configuration x test, each configuration in its own child process; returns the study's DataFrame.

    Rows go to outputs/<study>/results.jsonl as each trial ends; llama.cpp's log to outputs/<study>/llama.log.
    `extra` columns (e.g. {"claim": "G3"}) are added to every row of this call.
    """
    from .environment import save_environment

    configs = [configs] if isinstance(configs, Settings) else list(configs)
    tests = list(tests)
    out = study_dir(study, out_root)
    plans = plan_trials(configs, tests, repetitions)
    out.mkdir(parents=True, exist_ok=True)
    env = save_environment(out)
    results = out / RESULTS_FILE
    log_file = str((out / "llama.log").resolve())

    previous = {}
    for r in read_rows(results):
        previous[r.get("trial_key")] = r.get("status")
    # 'skipped' tests never ran (an earlier test of their trial died): always run them again
    done = {k for k, st in previous.items() if st == "ok" or (st not in (None, "skipped") and not retry_failed)}

    bar = _progress(len(plans), study, progress)
    try:
        for plan in plans:
            todo = [(t, k) for t, k in zip(plan.tests, plan.keys) if k not in done]
            if not todo:
                bar.update(1)
                continue
            rows = run_trial(plan.settings, [t for t, _ in todo], repetitions, plan.model_path,
                             timeout_s=timeout_s, log_file=log_file, mem_limit_mb=mem_limit_mb)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            full = []
            settings_cols = _settings_columns(plan.settings)
            for (test, key), row in zip(todo, rows):
                merged = {"study": study, "trial_key": key, "test_time": stamp, **_provenance(plan.card, env),
                          **settings_cols, **(extra or {})}
                for k, v in row.items():
                    # a test's own value never overwrites the configuration it ran under (e.g. a chunk n_ctx)
                    merged[f"test_{k}" if k in settings_cols and v != settings_cols[k] else k] = v
                full.append(merged)
            append_rows(results, full)
            bar.set_postfix_str(f"{full[-1]['status']}: {_short(plan.settings)}"[:60])
            bar.update(1)
    finally:
        bar.close()
    return load_results(out)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="trial", disable=not enabled, leave=True)
