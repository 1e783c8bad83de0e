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
import random
import re
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import psutil

from kit import __version__
from kit.config import Settings, SettingsError, check_setting_names
from kit.environment import process_provenance, save_environment
from kit.gpu import build_supports_gpu_offload
from kit.measure import DEFAULT_REPETITIONS, ENGINE_KINDS, Test
from kit.models import KV_TYPE_BYTES, model_card
from kit.paths import OUTPUTS, REPO_ROOT, resolve as resolve_path
from kit.progress import progress_bar
from kit.results import RESULTS_FILE, append_rows, load_results, read_rows
from kit.verdicts import INCONCLUSIVE, compare, looks_confidence

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
    check_setting_names(axes)
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
    """outputs/<study> -> (study name, absolute output root), the two arguments run_sweep takes; a relative
    out_dir is taken from the repository root (kit.paths.resolve), whatever the working directory."""
    p = resolve_path(out_dir)
    return p.name, p.parent


def planned_rows(df, configs: Sequence[Settings], tests: Sequence[Test], repetitions: int):
    """Only the rows this plan asked for, by trial key: a reused study folder may hold rows of other parameters."""
    if df is None or df.empty:
        return df
    shas = {m: model_card(m).sha256 for m in {s.model for s in configs}}
    keys = {trial_key(shas[s.model], s, t, repetitions) for s in configs for t in tests}
    return df[df["trial_key"].isin(keys)].reset_index(drop=True)


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


def _provenance(card: dict) -> dict:
    """Build, machine and model columns of a row. The build and machine are this process's, captured live
    (`process_provenance`); a trial's child reports its own, which replace these in its rows, so only a row of a
    child that died before reporting carries the parent's. The model's sha256 is of the file at planning time."""
    return {
        **process_provenance(),
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
            lim = mem_limit_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    return setup


def _child_env() -> dict:
    env = dict(os.environ)
    # ggml_abort would otherwise attach gdb for a backtrace: slow, and it buries the assertion message
    env.setdefault("GGML_NO_BACKTRACE", "1")
    return env


def _spawn_worker(args: list[str], mem_limit_mb: int | None, **streams) -> subprocess.Popen:
    """`python -m kit.worker ARGS` in its own session, dying with its parent, under an optional memory limit."""
    return subprocess.Popen([sys.executable, "-m", "kit.worker", *args],
                            cwd=str(REPO_ROOT), start_new_session=True,
                            env=_child_env(), preexec_fn=_child_setup(mem_limit_mb), **streams)


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
            proc = _spawn_worker([spec_p, result_p], mem_limit_mb, stdout=subprocess.DEVNULL, stderr=err,
                                 stdin=subprocess.DEVNULL)
            try:
                rc = proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
                timed_out = True
        wall_s = time.perf_counter() - t0
        tail = _log_tail(log_file, settings, err_p)
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
                rows.append(_failed_row(t, status, error) if first else
                            _failed_row(t, "skipped", f"not run: an earlier test in the trial failed ({status})"))
                first = False
        for r in rows:
            r["trial_wall_s"] = round(wall_s, 3)
        return rows


def _log_tail(log_file: str | None, settings: Settings, err_path: str) -> str:
    """The child's last stderr lines, also appended to the study's llama.log under its settings."""
    tail = _tail(err_path)
    if log_file and tail:
        with open(log_file, "a") as fh:
            fh.write(f"\n--- trial stderr ({settings.to_dict()}) ---\n{tail}\n")
    return tail


def _tail(path: str, n: int = STDERR_TAIL_LINES) -> str:
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# ---- interleaved trials: one live child per configuration, repetitions alternated -----------------------------
MAX_LIVE_CHILDREN = 8          # configurations alternated at once (each holds its model and KV cache)
LIVE_MEMORY_SHARE = 0.5        # their estimated memory must fit in this share of the available RAM
CHILD_OVERHEAD_BYTES = 160 * 2**20  # Python, llama-cpp-python and compute buffers, measured ~100 MB over the weights


def _child_bytes(plan: _Plan) -> int:
    """A child's memory, estimated before it starts: weights + KV cache at n_ctx + a fixed overhead."""
    c, s = plan.card, plan.settings
    n_ctx = s.n_ctx or c["n_ctx_train"]
    per_cell = c["n_layers"] * c["n_head_kv"] * c["head_dim"]
    kv = per_cell * n_ctx * (KV_TYPE_BYTES.get(s.type_k, 2.0) + KV_TYPE_BYTES.get(s.type_v, 2.0))
    return int(c["size_bytes"] + kv + CHILD_OVERHEAD_BYTES)


def interleave_group_size(plans: Sequence[_Plan], tests: Sequence[Test], interleave: bool | None = None,
                          mem_limit_mb: int | None = None, available_bytes: int | None = None,
                          gpu_offload: bool | None = None) -> int:
    """How many configurations to alternate at once; 1 means back to back (llama-bench's way).

    1 when interleaving is off, when there is one configuration, when a test is not an engine test (pp/tg/pg:
    e2e and custom tests keep their own timing), when a configuration offloads layers to a GPU (children would
    compete for VRAM, and a failure would be blamed on the wrong configuration), or when two children's
    estimated memory (`_child_bytes`) does not fit in LIVE_MEMORY_SHARE of the available RAM.
    """
    if interleave is False or len(plans) < 2:
        return 1
    if any(t.kind not in ENGINE_KINDS for t in tests):
        return 1
    if gpu_offload is None and any(p.settings.n_gpu_layers for p in plans):
        gpu_offload = build_supports_gpu_offload()
    if gpu_offload and any(p.settings.n_gpu_layers for p in plans):
        return 1
    if available_bytes is None:
        available_bytes = psutil.virtual_memory().available
    need = max(_child_bytes(p) for p in plans)
    if mem_limit_mb:
        need = max(need, mem_limit_mb * 2**20)  # each child may grow to its own limit
    fit = int(available_bytes * LIVE_MEMORY_SHARE // max(need, 1))
    n = min(len(plans), MAX_LIVE_CHILDREN, fit)
    return n if n >= 2 else 1


class ChildGone(RuntimeError):
    """A live child died, timed out or broke the protocol; status and error are ready for its rows."""

    def __init__(self, status: str, error: str):
        super().__init__(error)
        self.status, self.error = status, error


class LiveTrial:
    """One configuration's child (`python -m kit.worker --serve`), driven one command at a time.

    timeout_s bounds the child's whole life, as it bounds a back-to-back trial: the time its own commands take
    counts, the time spent waiting while other configurations run does not.
    """

    def __init__(self, plan: _Plan, tests: list[Test], timeout_s: float, log_file: str | None,
                 mem_limit_mb: int | None, t_origin: float):
        self.plan, self.tests, self.timeout_s, self.log_file = plan, tests, timeout_s, log_file
        self.used_s = 0.0
        self.t0 = time.perf_counter()
        self.gone: ChildGone | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="kit-live-")
        spec_p = os.path.join(self._tmp.name, "spec.json")
        self._err_p = os.path.join(self._tmp.name, "stderr.txt")
        with open(spec_p, "w") as fh:
            json.dump({"settings": plan.settings.to_dict(), "tests": [t.to_dict() for t in tests],
                       "model_path": plan.model_path, "log_file": log_file, "t_origin": t_origin}, fh)
        self._err = open(self._err_p, "wb")
        self.proc = _spawn_worker(["--serve", spec_p], mem_limit_mb, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._err)
        try:
            self.load = self._read()  # the model loads before anything else is sent
        except ChildGone as g:
            self.load = {"ok": False, "error": g.error}
        if not self.load.get("ok") and not self.gone:
            self.gone = ChildGone("error", self.load.get("error") or "the model did not load")

    def _read(self) -> dict:
        left = self.timeout_s - self.used_s
        t0 = time.perf_counter()
        ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0.0))
        line = self.proc.stdout.readline() if ready else b""
        self.used_s += time.perf_counter() - t0
        if line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                self._fail("error", f"the child sent a line that is not JSON: {line[:200]!r}")
        if not ready:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self._fail("timeout", f"no result within {self.timeout_s:g} s; killed")
        rc = self.proc.wait()
        self._fail(*(_describe_exit(rc) if rc else ("error", "the child exited without replying")))

    def _fail(self, status: str, error: str):
        self._err.flush()
        tail = _log_tail(self.log_file, self.plan.settings, self._err_p)
        self.gone = ChildGone(status, error + (" | stderr: " + tail if tail else ""))
        raise self.gone

    def call(self, op: str, test: int) -> dict:
        if self.gone:
            raise self.gone
        try:
            self.proc.stdin.write((json.dumps({"op": op, "test": test}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone: _read reports how it ended
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for fh in (self.proc.stdin, self.proc.stdout, self._err):
            try:
                fh.close()
            except OSError:
                pass
        self._tmp.cleanup()


@dataclass
class Adaptive:
    """More interleaved rounds for the comparisons of a sweep that are still inconclusive after the planned ones.

    A fixed schedule of looks: the planned `repetitions` rounds are look 1; after each look, every (candidate,
    baseline) pair in `pairs` whose engine t/s comparison is still inconclusive at confidence
    `looks_confidence(looks)` gets one more block of `repetitions` rounds (both configurations, alternated as
    before), up to `looks` blocks in all; decided pairs stop. Every look uses that Bonferroni confidence, and so must
    the verdict on the rows (`kit.verdicts.rows_confidence`), so stopping at the first look that decides keeps the
    chance of a wrong label at most 5 %. `max_s` caps the seconds spent on extra blocks in one sweep. Rows say how
    many blocks their test ran (`looks`), the schedule (`looks_planned`), and `looks_capped` when the schedule or
    the time cap, not a decision, ended it. Applies where a sweep interleaves (engine tests of several configurations).
    `paired`: judge a pair on its per-round ratios (`kit.verdicts.compare(paired=True)`), as a study whose verdict
    pairs them by round (`kit.results.compared_samples`) does; a pair with unequal counts is judged unpaired.
    """
    claim: str
    pairs: Sequence[tuple[Settings, Settings]]     # (candidate, baseline)
    claimed: str = "better"
    looks: int = 3
    max_s: float = 120.0
    equivalence: float | None = None                # None: the claim's band (kit.verdicts.BANDS)
    test_kinds: tuple = ENGINE_KINDS                # the tests whose comparisons the verdict uses (pp, tg, pg)
    paired: bool = False                            # the verdict pairs samples by round (compare(paired=True))
    spent_s: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        if self.looks < 1 or self.max_s < 0:
            raise SettingsError(f"adaptive looks={self.looks} must be >= 1 and max_s={self.max_s} >= 0")
        for pair in self.pairs:
            if len(pair) != 2 or not all(isinstance(s, Settings) for s in pair):
                raise SettingsError("adaptive pairs are (candidate Settings, baseline Settings)")

    @classmethod
    def against(cls, claim: str, baseline: Settings, candidates: Sequence[Settings], **kw) -> "Adaptive":
        """Every candidate against one baseline."""
        return cls(claim, [(c, baseline) for c in candidates if c != baseline], **kw)

    @property
    def confidence(self) -> float:
        return looks_confidence(self.looks)

    def undecided(self, samples: dict[int, list[float]], settings: dict[int, Settings]) -> set[int]:
        """Members (group indexes) of pairs still inconclusive on these samples."""
        index = {}
        for j, s in settings.items():
            index.setdefault(json.dumps(s.to_dict(), sort_keys=True, default=str), j)
        out: set[int] = set()
        for cand, base in self.pairs:
            c = index.get(json.dumps(cand.to_dict(), sort_keys=True, default=str))
            b = index.get(json.dumps(base.to_dict(), sort_keys=True, default=str))
            if c is None or b is None or c not in samples or b not in samples:
                continue
            paired = self.paired and len(samples[c]) == len(samples[b])
            v = compare(self.claim, samples[c], samples[b], claimed=self.claimed, equivalence=self.equivalence,
                        confidence=self.confidence, paired=paired)
            if v.verdict == INCONCLUSIVE:
                out |= {c, b}
        return out


def _failed_row(test: Test, status: str, error: str) -> dict:
    return {"status": status, "error": error, "test": test.name, "test_kind": test.kind,
            "n_prompt": test.n_prompt, "n_gen": test.n_gen, "n_depth": test.n_depth}


def run_interleaved(group: Sequence[_Plan], todo: Sequence[list], repetitions: int, record,
                    timeout_s: float = DEFAULT_TIMEOUT_S, log_file: str | None = None,
                    mem_limit_mb: int | None = None, on_trial_done=None, seed: int = 0,
                    adaptive: Adaptive | None = None) -> None:
    """Measure a group of configurations with their repetitions alternated.

    Every configuration gets a live child (model loaded once, one after the other). Then, test by test: each
    child fills the depth and runs the warm-up; then `repetitions` rounds, each running one timed repetition per
    configuration in a fresh random order; then each child returns its row. A drift of the machine's speed during
    the test (another tenant, clocks, heat) so lands on every configuration alike instead of on whichever ran
    last, and the random order keeps a fixed position in the round from favouring one of them. The timed region
    and the cache reset before each repetition are those of a back-to-back run.

    `record(plan, [(test, key)], rows)` is called for every test as soon as all configurations finished it, so a
    crash later loses nothing. A child that dies costs only its own configuration's remaining tests.
    `adaptive` adds blocks of rounds to comparisons still inconclusive (`Adaptive`).
    """
    rng = random.Random(seed)
    t_origin = time.perf_counter()
    lives: list[LiveTrial] = []
    died: dict[int, Test] = {}  # configuration -> the test its child died in
    try:
        for plan, pairs in zip(group, todo):
            lives.append(LiveTrial(plan, [t for t, _ in pairs], timeout_s, log_file, mem_limit_mb, t_origin))
        order: list[Test] = []
        for pairs in todo:
            order += [t for t, _ in pairs if t not in order]
        pending = [len(pairs) for pairs in todo]
        for test in order:
            members = [j for j, pairs in enumerate(todo) if any(t == test for t, _ in pairs)]
            rows = _interleave_test(test, lives, todo, members, repetitions, rng, died, adaptive,
                                    {j: group[j].settings for j in members})
            for j in members:
                row = rows[j]
                row.update(interleaved=True, interleave_group=len(group),
                           trial_wall_s=round(time.perf_counter() - lives[j].t0, 3))
                record(group[j], [(test, dict(todo[j])[test])], [row])
                pending[j] -= 1
                if pending[j] == 0 and on_trial_done:
                    on_trial_done()
    finally:
        for lv in lives:
            lv.close()


def _interleave_test(test: Test, lives: list[LiveTrial], todo: Sequence[list], members: list[int],
                     repetitions: int, rng: random.Random, died: dict[int, Test], adaptive: Adaptive | None = None,
                     settings: dict[int, Settings] | None = None) -> dict[int, dict]:
    """One test across the group's children: prepare each, `repetitions` rounds in a fresh random order (then, with
    `adaptive`, more blocks of rounds for the pairs still undecided), then each child's row (or its failure's).
    Returns configuration index -> row."""
    idx = {j: [t for t, _ in todo[j]].index(test) for j in members}
    rows: dict[int, dict] = {}
    samples: dict[int, list[float]] = {j: [] for j in members}
    looks = {j: 1 for j in members}

    def step(j: int, op: str) -> dict | None:
        try:
            r = lives[j].call(op, idx[j])
        except ChildGone as g:
            first = died.setdefault(j, test) is test
            rows[j] = (_failed_row(test, g.status, g.error) if first else
                       _failed_row(test, "skipped", f"not run: an earlier test in the trial failed ({g.status})"))
            return None
        if not r.get("ok"):
            rows[j] = _failed_row(test, "error", r.get("error"))
            return None
        return r

    def block(who: list[int]) -> None:
        for _ in range(repetitions):
            turn = [j for j in who if j not in rows]
            rng.shuffle(turn)
            for j in turn:
                r = step(j, "rep")
                if r is not None and r.get("ts") is not None:
                    samples[j].append(float(r["ts"]))

    for j in members:
        step(j, "prepare")
    block(members)
    undecided: set[int] = set()
    if adaptive is not None and test.kind in adaptive.test_kinds:
        for look in range(1, adaptive.looks + 1):
            undecided = adaptive.undecided({j: x for j, x in samples.items() if j not in rows}, settings or {})
            if not undecided or look == adaptive.looks or adaptive.spent_s >= adaptive.max_s:
                break
            t0 = time.perf_counter()
            block(sorted(undecided))
            adaptive.spent_s += time.perf_counter() - t0
            for j in undecided:
                looks[j] = look + 1
    for j in members:
        if j not in rows:
            r = step(j, "finish")
            if r is not None:
                rows[j] = r["row"]
                if adaptive is not None:
                    rows[j].update(looks=looks[j], looks_planned=adaptive.looks, adaptive_claim=adaptive.claim,
                                   looks_capped=j in undecided)
    return rows


# ---- the sweep ----------------------------------------------------------------------------------------------------
def study_dir(study: str, out_root: str | os.PathLike = OUTPUTS) -> Path:
    """<out_root>/<study>, absolute: a relative out_root is taken from the repository root (kit.paths.resolve)."""
    if not STUDY_NAME.match(study):
        raise SettingsError(f"study name {study!r}: use letters, digits, '_', '-', '.' (it becomes a folder name)")
    return resolve_path(out_root) / study


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
              repetitions: int = DEFAULT_REPETITIONS, out_root: str | os.PathLike = OUTPUTS,
              timeout_s: float = DEFAULT_TIMEOUT_S, retry_failed: bool = False, progress: bool = True,
              mem_limit_mb: int | None = None, extra: dict | None = None, interleave: bool | None = None,
              adaptive: Adaptive | None = None):
    """Run every configuration x test, each configuration in its own child process; returns the study's DataFrame.

    interleave: None (auto) alternates the repetitions of every configuration (`run_interleaved`) when the
    sweep has two or more configurations, engine tests (pp/tg/pg) and room for their children
    (`interleave_group_size`); the sweep's other tests then run back to back, one more child per configuration.
    False measures each configuration's repetitions back to back, as llama-bench does;
    True asks for interleaving (still only where it can run). Rows say which (`interleaved`).

    adaptive: extra interleaved rounds for comparisons still inconclusive after `repetitions` (`Adaptive`: a fixed
    schedule of looks, Bonferroni; the verdict then uses `kit.verdicts.rows_confidence(rows)`).

    Rows go to outputs/<study>/results.jsonl as each trial ends; llama.cpp's log to outputs/<study>/llama.log.
    `extra` columns (e.g. {"claim": "G3"}) are added to every row of this call.
    """
    configs = [configs] if isinstance(configs, Settings) else list(configs)
    tests = list(tests)
    out = study_dir(study, out_root)
    plans = plan_trials(configs, tests, repetitions)
    out.mkdir(parents=True, exist_ok=True)
    save_environment(out)  # this run's machine and build, replacing an earlier run's file
    results = out / RESULTS_FILE
    trial_kw = dict(timeout_s=timeout_s, log_file=str((out / "llama.log").resolve()), mem_limit_mb=mem_limit_mb)
    done = _done_keys(results, retry_failed)
    live_plans = [p for p in plans if any(k not in done for k in p.keys)]
    # engine tests of several configurations alternate; the others (e2e, a study's own) then run back to back
    engine = [t for t in tests if t.kind in ENGINE_KINDS]
    group_size = interleave_group_size(live_plans, engine, interleave, mem_limit_mb) if engine else 1
    split = group_size > 1 and len(engine) < len(tests)
    bar = _progress(len(plans), study, progress)
    bar.update(len(plans) - len(live_plans))

    def record(plan: _Plan, pairs: list, rows: list[dict]) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        full = [merge_row(study, key, plan, row, extra, stamp) for (_, key), row in zip(pairs, rows)]
        append_rows(results, full)
        bar.set_postfix_str(f"{full[-1]['status']}: {_short(plan.settings)}"[:60])

    try:
        if group_size > 1:
            for g in range(0, len(live_plans), group_size):
                group = live_plans[g:g + group_size]
                todo = [[(t, k) for t, k in zip(p.tests, p.keys) if k not in done and t.kind in ENGINE_KINDS]
                        for p in group]
                run_interleaved(group, todo, repetitions, record, adaptive=adaptive,
                                on_trial_done=None if split else lambda: bar.update(1), **trial_kw)
        if group_size == 1 or split:
            for plan in live_plans:
                _run_back_to_back(plan, done, split, repetitions, record, **trial_kw)
                bar.update(1)
    finally:
        bar.close()
    return load_results(out)


def _done_keys(results: Path, retry_failed: bool) -> set[str]:
    """Trial keys a rerun skips: ok rows, and failed ones unless retry_failed. 'skipped' tests never ran (an
    earlier test of their trial died): they always run again."""
    previous = {r.get("trial_key"): r.get("status") for r in read_rows(results)}
    return {k for k, st in previous.items() if st == "ok" or (st not in (None, "skipped") and not retry_failed)}


def merge_row(study: str, key: str, plan: _Plan, row: dict, extra: dict | None, stamp: str) -> dict:
    """One row as results.jsonl holds it: study, key, time, provenance, the configuration, `extra`, then what the
    child measured (its build and machine replace the parent's). A test's own value of a setting never overwrites
    the configuration it ran under (e.g. a chunk's n_ctx): it goes to test_<name>."""
    settings_cols = _settings_columns(plan.settings)
    merged = {"study": study, "trial_key": key, "test_time": stamp, **_provenance(plan.card), **settings_cols,
              **(extra or {})}
    for k, v in row.items():
        merged[f"test_{k}" if k in settings_cols and v != settings_cols[k] else k] = v
    return merged


def _run_back_to_back(plan: _Plan, done: set[str], split: bool, repetitions: int, record, **trial_kw) -> None:
    """One configuration's tests not yet done in one child (with `split`, those the interleaved part left)."""
    todo = [(t, k) for t, k in zip(plan.tests, plan.keys) if k not in done and not (split and t.kind in ENGINE_KINDS)]
    if todo:
        rows = run_trial(plan.settings, [t for t, _ in todo], repetitions, plan.model_path, **trial_kw)
        for r in rows:
            r["interleaved"] = False
        record(plan, todo, rows)


def _progress(total: int, desc: str, enabled: bool):
    # a widget in an interactive kernel, text on a terminal, none in a papermill run (kit.progress)
    return progress_bar(total, desc, unit="trial", enabled=enabled)
