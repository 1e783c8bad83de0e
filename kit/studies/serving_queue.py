"""Load and queue time (claim P1): one model behind a queue, as a llama-cpp-python server runs it.

A llama-cpp-python server holds one `Llama` and serves one sequence at a time; concurrent requests wait in a
queue. `ModelServer` is that: a worker thread owns the loaded model and takes requests from a `queue.Queue`
in arrival order; clients are threads. Per request it records, on one clock:

- queue_ms: submitted -> the worker takes it (waiting behind other requests);
- service_ms: the worker takes it -> last chunk (prompt processing + generation; what one request costs);
- ttft_ms: submitted -> first streamed token, as the client sees it (queue + prompt processing);
- itl: inter-token latencies of the stream; e2e_ms: submitted -> last chunk (queue + service).

Loads: a closed loop (N clients, each sends its next request when the previous answer is complete, no think
time) and an open loop (Poisson arrivals at rate lambda = rho * mu, where mu = 1 / mean service time is
measured at the start of the same test by a few requests sent one at a time). Queue time explodes as the
offered load rho = lambda / mu approaches 1; the Pollaczek-Khinchine formula for an M/G/1 queue,
Wq = lambda * E[S^2] / (2 (1 - rho)), computed from the measured service times, is kept beside it.

Each load level is one test of kind ``kit.studies.serving_queue:queue_test``; the closed-loop levels share one trial (one
child process, one model load) and the Poisson levels another, so a rerun resumes per trial and one crash
costs one trial. The model load sits outside every timed region.
"""
from __future__ import annotations

import queue
import random
import statistics
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from kit.config import SAMPLING_KEYS, ChatStudyConfig, Settings, SettingsError, check_rule, param
from kit.data import load_prompts
from kit.measure import Test, percentile, requests_row, stream_chat
from kit.paths import OUTPUTS_DIR, resolve
from kit.results import as_float, load_results, no_rows_reason
from kit.sweep import run_sweep, split_out_dir
from kit.verdicts import SUPPORTED, Verdict, bootstrap_ratio, not_testable

QUEUE_KIND = "kit.studies.serving_queue:queue_test"
TIMED_REGION = ("per request, on one clock: submit -> worker takes it (queue_ms) -> streamed chat completion from a "
                "fresh prompt cache -> last chunk (service_ms); ttft and e2e from submit, as the client sees them")
# What the guide says to track (section 8) -> the row column that carries it (memory: host RSS and, with a GPU,
# its memory; the GPU columns are empty without one, and P1 says why).
P1_METRICS = {
    "tokens/s": "median_ts",
    "TTFT": "ttft_ms",
    "GPU utilisation": "gpu_util_pct",
    "memory": "rss_peak_mb",
    "GPU memory": "vram_peak_mb",
    "queue time": "queue_p50_ms",
}
GPU_COLUMNS = ("gpu_util_pct", "vram_peak_mb")
_PER_REQUEST = ("ttft_ms", "decode_ms_per_token", "itl_p50_ms", "itl_p95_ms")


# ---- the server -------------------------------------------------------------------------------------------------
@dataclass
class Ticket:
    """One request's journey; `done` is set when the worker has finished it (or failed)."""

    index: int
    prompt_id: str
    prompt: str
    t_submit: float = 0.0
    t_start: float = 0.0
    t_end: float = 0.0
    result: dict | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float | None = None) -> "Ticket":
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.index} not served within {timeout} s")
        return self

    def client_view(self) -> dict | None:
        """The stream_chat result with TTFT and e2e on the client's clock (from submit), or None if it failed."""
        r = self.result
        if not r:
            return None
        queue_ms = (self.t_start - self.t_submit) * 1e3
        # stream_chat's own clock starts just after its cache reset: put its TTFT on the worker's clock
        pre_ms = (self.t_end - self.t_start) * 1e3 - r["e2e_ms"]
        return {**r, "ttft_ms": queue_ms + pre_ms + r["ttft_ms"] if r.get("ttft_ms") is not None else None,
                "e2e_ms": (self.t_end - self.t_submit) * 1e3}

    def record(self, t0: float) -> dict:
        """Per-request metrics in ms (kit.measure.requests_row of this request, as the client sees it); t0 is the
        test's start (for the submit offset)."""
        r, view = self.result or {}, self.client_view()
        queue_ms = (self.t_start - self.t_submit) * 1e3
        one = requests_row([view], speed="decode") if view else dict.fromkeys(_PER_REQUEST)
        return {
            "index": self.index,
            "prompt_id": self.prompt_id,
            "submit_s": round(self.t_submit - t0, 4),
            "queue_ms": round(queue_ms, 3),
            "service_ms": round((self.t_end - self.t_start) * 1e3, 3),
            **{k: one[k] for k in _PER_REQUEST},
            "service_ttft_ms": round(one["ttft_ms"] - queue_ms, 3) if one["ttft_ms"] is not None else None,
            "e2e_ms": round((self.t_end - self.t_submit) * 1e3, 3),
            "itl_ms": [round(x, 3) for x in r.get("itl_ms") or []],
            "n_prompt_tokens": r.get("n_prompt_tokens"),
            "n_gen_tokens": r.get("n_gen_tokens"),
            "engine_tg_ms": r.get("engine_tg_ms"),
            "finish_reason": r.get("finish_reason"),
            "error": self.error,
        }


class ModelServer:
    """A worker thread that owns one loaded model and serves queued requests one at a time, in arrival order.

    Use as a context manager: ``with ModelServer(lm, max_tokens=64) as srv: srv.submit(...).wait()``.
    Sampling keyword arguments are passed to every request (`kit.measure.stream_chat`).
    """

    def __init__(self, lm, **sampling):
        self.lm = lm
        self.sampling = sampling
        self._q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._count = 0
        self._lock = threading.Lock()

    def __enter__(self) -> "ModelServer":
        self._thread = threading.Thread(target=self._serve, name="ModelServer", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._q.put(None)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, prompt: str, prompt_id: str = "") -> Ticket:
        with self._lock:
            t = Ticket(index=self._count, prompt_id=prompt_id, prompt=prompt)
            self._count += 1
        t.t_submit = time.perf_counter()
        self._q.put(t)
        return t

    def _serve(self) -> None:
        while True:
            t = self._q.get()
            if t is None:
                return
            t.t_start = time.perf_counter()
            try:
                t.result = stream_chat(self.lm, t.prompt, **self.sampling)
            except Exception as exc:  # a failed request is recorded; the server keeps serving
                t.error = f"{type(exc).__name__}: {exc}"
            t.t_end = time.perf_counter()
            t.done.set()


# ---- load generators --------------------------------------------------------------------------------------------
def closed_loop(server: ModelServer, prompts: Sequence[dict], clients: int, requests_per_client: int,
                timeout_s: float = 600.0) -> list[Ticket]:
    """N client threads; each sends its next request as soon as its previous answer is complete."""
    tickets: list[Ticket] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(c: int) -> None:
        try:
            for k in range(requests_per_client):
                p = prompts[(c + k * clients) % len(prompts)]
                t = server.submit(p["prompt"], p["id"])
                with lock:
                    tickets.append(t)
                t.wait(timeout_s)
        except BaseException as exc:  # surfaced below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,), name=f"client-{c}") for c in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return sorted(tickets, key=lambda t: t.index)


def poisson_arrivals(server: ModelServer, prompts: Sequence[dict], rate_rps: float, n_requests: int,
                     seed: int = 0, timeout_s: float = 600.0) -> list[Ticket]:
    """Open loop: requests arrive at exponential intervals (mean 1/rate), whatever the server's state."""
    if rate_rps <= 0:
        raise ValueError("rate_rps must be > 0")
    rng = random.Random(seed)
    tickets = []
    next_t = time.perf_counter()
    for i in range(n_requests):
        delay = next_t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        p = prompts[i % len(prompts)]
        tickets.append(server.submit(p["prompt"], p["id"]))
        next_t += rng.expovariate(rate_rps)
    for t in tickets:
        t.wait(timeout_s)
    return tickets


def pk_queue_ms(arrival_rps: float, service_ms: Sequence[float]) -> float | None:
    """Pollaczek-Khinchine mean wait of an M/G/1 queue from measured service times; None when rho >= 1."""
    s = [x / 1e3 for x in service_ms]
    if not s or arrival_rps <= 0:
        return None
    es, es2 = statistics.fmean(s), statistics.fmean(x * x for x in s)
    rho = arrival_rps * es
    if rho >= 1:
        return None
    return arrival_rps * es2 / (2 * (1 - rho)) * 1e3


# ---- the sweep test kind ---------------------------------------------------------------------------------------
def queue_test(lm, test: Test, repetitions: int) -> dict:
    """One load level against one loaded model behind a queue.

    test.params: mode "closed" (clients; repetitions = requests per client) or "poisson" (rho, n_requests,
    calibration_requests, arrival_seed); prompts (list of {"id", "prompt"}); sampling overrides passed to every
    request (max_tokens, temperature, ...). A closed loop with one client doubles as the service-rate measurement.
    """
    p = dict(test.params)
    mode = p.pop("mode")
    if mode not in ("closed", "poisson"):
        raise SettingsError(f"mode={mode!r}: use 'closed' or 'poisson'")
    prompts = p.pop("prompts", None) or load_prompts(n=3)
    clients = int(p.pop("clients", 1))
    rho = p.pop("rho", None)
    n_requests = int(p.pop("n_requests", 0))
    n_cal = int(p.pop("calibration_requests", 3))
    arrival_seed = int(p.pop("arrival_seed", 0))
    label = p.pop("label", None)
    if mode == "poisson" and (rho is None or rho <= 0 or n_requests < 1):
        raise SettingsError("poisson mode needs rho > 0 and n_requests >= 1")
    s = lm.settings.replace(**p)  # the rest are sampling settings: validated like any Settings
    sampling = {k: getattr(s, k) for k in SAMPLING_KEYS + ("seed",)}
    stream_chat(lm, prompts[0]["prompt"], max_tokens=4)  # warm-up, untimed (raises for a model that cannot answer)
    calibration, rate = [], None
    with ModelServer(lm, **sampling) as srv:
        if mode == "closed":
            t0 = time.perf_counter()
            tickets = closed_loop(srv, prompts, clients, repetitions)
        else:
            cal = [srv.submit(q["prompt"], q["id"]).wait() for q in
                   (prompts[i % len(prompts)] for i in range(max(n_cal, 1)))]
            _served_or_raise(cal, "calibration")
            calibration = [(t.t_end - t.t_start) * 1e3 for t in cal]
            rate = float(rho) * 1e3 / statistics.fmean(calibration)  # rho x the measured service rate mu
            t0 = time.perf_counter()
            tickets = poisson_arrivals(srv, prompts, rate, n_requests, seed=arrival_seed)
    _served_or_raise(tickets, label or mode)
    recs = [t.record(t0) for t in tickets]
    row = queue_row(recs, max(t.t_end for t in tickets) - t0)
    row.update({
        "label": label or (f"closed, {clients} client(s)" if mode == "closed" else f"poisson, rho={rho}"),
        "mode": mode,
        "clients": clients if mode == "closed" else None,
        "rho_target": rho,
        "arrival_rate_rps": round(rate, 4) if rate else None,
        "calibration_service_ms": [round(x, 3) for x in calibration],
        **_offered_load(recs, mode),
        **sampling,
        "max_tokens_label": "unlimited" if sampling["max_tokens"] is None else str(sampling["max_tokens"]),
        "n_gen": sampling["max_tokens"] or 0,
        "n_depth": 0,
        "repetitions": repetitions,
        "timed_region": TIMED_REGION,
    })
    return row


def _served_or_raise(tickets: Sequence[Ticket], what: str) -> None:
    """A load level whose every request failed is an error row with the requests' cause, not a row of nothing."""
    if tickets and all(t.error is not None for t in tickets):
        raise RuntimeError(f"every request of {what} failed ({len(tickets)}): {tickets[0].error}")


def _offered_load(recs: list[dict], mode: str) -> dict:
    """The load a level really offered: measured arrival rate, service rate, rho, and the M/G/1 mean wait."""
    served = [r["service_ms"] for r in recs if r["error"] is None]
    mean_service_s = statistics.fmean(served) / 1e3 if served else None
    submits = sorted(r["submit_s"] for r in recs)
    arrival = ((len(submits) - 1) / (submits[-1] - submits[0]) if mode == "poisson" and len(submits) > 1
               and submits[-1] > submits[0] else None)
    pk = pk_queue_ms(arrival, served) if arrival and served else None
    return {
        "arrival_rate_measured_rps": round(arrival, 4) if arrival else None,
        "service_rate_rps": round(1 / mean_service_s, 4) if mean_service_s else None,
        "rho_measured": round(arrival * mean_service_s, 4) if arrival and mean_service_s else None,
        "pk_queue_ms": round(pk, 3) if pk is not None else None,
    }


def _by_load(df):
    """Rows of a DataFrame ordered by load: closed loop by clients, then Poisson by measured rho."""
    parts = [df[df["mode"] == "closed"].sort_values("clients"), df[df["mode"] == "poisson"].sort_values("rho_measured")]
    return [(i, r) for p in parts for i, r in p.iterrows()]


def _stat(values: list[float], q: float) -> float | None:
    return round(percentile(values, q), 3) if values else None


def queue_row(recs: list[dict], wall_s: float) -> dict:
    """A load level's row: kit.measure.requests_row of the served requests as the client saw them (tokens/s =
    1000 / mean ITL per request), then queue / service / TTFT / e2e percentiles (p50/p95/p99), throughput."""
    ok = [r for r in recs if r["error"] is None]
    out: dict = {**requests_row(ok, speed="decode"), "n_requests": len(recs), "n_failed": len(recs) - len(ok),
                 "wall_s": round(wall_s, 4)}
    for name in ("queue_ms", "service_ms", "ttft_ms", "e2e_ms"):
        xs = [r[name] for r in ok if r[name] is not None]
        for q in (50, 95, 99):
            out[f"{name[:-3]}_p{q}_ms"] = _stat(xs, q / 100)
        out[f"samples_{name}"] = xs
    out["itl_p99_ms"] = _stat([x for r in ok for x in r["itl_ms"]], 0.99)
    n_gen, e2e_total = sum(r["n_gen_tokens"] or 0 for r in ok), sum(r["e2e_ms"] for r in ok)
    out.update({
        "throughput_rps": round(len(ok) / wall_s, 4) if wall_s > 0 else None,
        "throughput_ts": round(n_gen / wall_s, 4) if wall_s > 0 else None,
        "queue_share_of_e2e": round(sum(r["queue_ms"] for r in ok) / e2e_total, 4) if e2e_total > 0 else None,
        "requests": [{k: v for k, v in r.items() if k != "itl_ms"} for r in recs],
    })
    return out


# ---- the study --------------------------------------------------------------------------------------------------
@dataclass
class ServingStudy(ChatStudyConfig):
    """Parameters of notebooks/75_serving_queue, validated before anything runs."""

    n_prompts: int = param(6, "prompts (the first n of the prompt set), cycled over requests", ge=1)
    max_tokens: int = param(32, "cap per answer: keeps service time short and steady", ge=1)
    temperature: float = param(0.0, "greedy: the same prompt costs the same every time", ge=0)
    clients: list[int] = param([1, 2, 4], "closed-loop concurrency levels", ge=1)
    rhos: list[float] = param([0.5, 0.9, 1.2], "offered loads for Poisson arrivals (arrival rate / service rate)",
                              gt=0, le=5)
    poisson_requests: int = param(10, "requests per Poisson load level", ge=1)
    calibration_requests: int = param(3, "one-at-a-time requests that measure the service rate first", ge=1)
    repetitions: int = param(5, "requests per client in the closed loop", ge=1)
    chat_format: str | None = param(None, "llama-cpp-python chat format (None: the GGUF's template, or one chosen "
                                          "from the vocabulary when it has none)")
    timeout_s: float = param(1800.0, "wall-clock limit of one trial (child process), seconds", gt=0)
    out_dir: str = param("outputs/75_serving_queue", "rows, figures and verdicts.json go here")

    def check(self) -> None:
        n_file = len(load_prompts(self.prompts_file))
        check_rule(self.n_prompts <= n_file, f"n_prompts={self.n_prompts}: the prompt file has {n_file} prompts")
        check_rule(bool(self.clients or self.rhos), "nothing to run: clients and rhos are both empty")
        check_rule(self.max_tokens < self.n_ctx,
                   f"max_tokens={self.max_tokens} must leave room for the prompt in n_ctx={self.n_ctx}")
        self.settings()

    def settings(self) -> Settings:
        return Settings(model=self.model, n_ctx=self.n_ctx, n_threads=self.n_threads,
                        temperature=self.temperature, max_tokens=self.max_tokens, chat_format=self.chat_format)

    def _prompts(self) -> list[dict]:
        return load_prompts(self.prompts_file, self.n_prompts)

    def closed_tests(self) -> list[Test]:
        prompts = self._prompts()
        return [Test(QUEUE_KIND, n_gen=self.max_tokens,
                     params={"mode": "closed", "clients": c, "prompts": prompts,
                             "label": f"closed, {c} client(s)"}) for c in self.clients]

    def poisson_tests(self) -> list[Test]:
        prompts = self._prompts()
        return [Test(QUEUE_KIND, n_gen=self.max_tokens,
                     params={"mode": "poisson", "rho": float(r), "n_requests": self.poisson_requests,
                             "calibration_requests": self.calibration_requests, "prompts": prompts,
                             "label": f"poisson, rho={r}"}) for r in self.rhos]


def run_serving_study(study: ServingStudy, progress: bool = True):
    """Two trials (closed loop, Poisson), each one child process with one model load. Returns all rows."""
    name, root = split_out_dir(study.out_path)
    base = study.settings()
    if study.clients:
        run_sweep(name, base, study.closed_tests(), repetitions=study.repetitions, out_root=root,
                  timeout_s=study.timeout_s, progress=progress, extra={"claim": "P1", "part": "closed"})
    if study.rhos:
        run_sweep(name, base, study.poisson_tests(), repetitions=study.repetitions, out_root=root,
                  timeout_s=study.timeout_s, progress=progress, extra={"claim": "P1", "part": "poisson"})
    return load_results(study.out_path)


# ---- analysis -------------------------------------------------------------------------------------------------------
REQUEST_COLUMNS = ("label", "mode", "clients", "rho_target", "rho_measured", "index", "prompt_id", "submit_s",
                   "queue_ms", "service_ms", "ttft_ms", "e2e_ms", "n_gen_tokens", "finish_reason", "error")


def _ok(df):
    """The successful load levels (none when the frame has no status column: nothing ran)."""
    if df is None or df.empty or "status" not in df:
        return pd.DataFrame(columns=["status", "label", "mode"])
    return df[df["status"] == "ok"]


def requests_frame(df):
    """One row per request, with its load level (label, mode, clients, rho); empty, with the same columns, when no
    level succeeded."""
    recs = []
    for _, row in _ok(df).iterrows():
        for r in row.get("requests") or []:
            recs.append({"label": row["label"], "mode": row["mode"], "clients": row.get("clients"),
                         "rho_target": row.get("rho_target"), "rho_measured": row.get("rho_measured"), **r})
    return pd.DataFrame(recs) if recs else pd.DataFrame(columns=list(REQUEST_COLUMNS))


def load_table(df):
    """Per load level: offered load, throughput, and queue / TTFT / e2e / ITL percentiles."""
    cols = ["label", "mode", "clients", "rho_target", "rho_measured", "arrival_rate_measured_rps",
            "service_rate_rps", "n_requests", "throughput_rps", "throughput_ts", "median_ts", "decode_ms_per_token",
            "queue_p50_ms", "queue_p95_ms", "queue_p99_ms", "pk_queue_ms", "service_p50_ms",
            "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p95_ms", "e2e_p99_ms",
            "itl_p50_ms", "itl_p95_ms", "itl_p99_ms", "queue_share_of_e2e", "rss_peak_mb", "gpu_util_pct"]
    ok = _ok(df)
    return ok[[c for c in cols if c in ok.columns]].reset_index(drop=True)


def gpu_gap(rows) -> str | None:
    """Why the GPU columns of these rows are empty, where the machine explains it: no NVIDIA GPU visible to NVML in
    the process that measured them (its `gpu_info`). None when a GPU was there: then an empty column is a gap."""
    if rows.empty or "gpu_info" not in rows:
        return None
    if rows["gpu_info"].fillna("").astype(str).str.strip().eq("").all():
        return "no NVIDIA GPU visible to NVML on this machine, so there is nothing to sample"
    return None


def _offload_note(rows) -> str:
    """With a GPU present: whether this model ran on it at all (a build without offload, or no layers offloaded)."""
    if "backends" in rows and not rows["backends"].fillna("").astype(str).str.contains(
            "CUDA|Vulkan|Metal|HIP|SYCL|OpenCL|MUSA|CANN", case=False).any():
        return f"a GPU is present, but this llama.cpp build has no GPU offload (backends: {rows['backends'].iloc[0]}): " \
               "the figure is the GPU's, not this model's"
    if "n_gpu_layers" in rows and (rows["n_gpu_layers"].fillna(0) == 0).all():
        return "a GPU is present, but no layers were offloaded (n_gpu_layers=0): the figure is the GPU's idle load"
    return ""


def metric_coverage(df, metrics: dict[str, str] = P1_METRICS):
    """For each metric the guide says to track: its column, whether rows carry it, the filled share, and a status:
    "filled" (every row), "explained" (empty because the machine cannot give it, `note` says why), "partly
    filled", "empty", "not recorded" (the column is missing) or "no rows"."""
    df = _ok(df) if "status" in df else df
    rows = []
    for metric, col in metrics.items():
        present = col in df.columns
        filled = float(df[col].notna().mean()) if present and len(df) else 0.0
        gap = gpu_gap(df) if col in GPU_COLUMNS else None
        if df.empty:
            status, note = "no rows", "no successful row to look at"
        elif not present:
            status, note = "not recorded", "no row carries this column"
        elif len(df) and filled == 1.0:
            status, note = "filled", _offload_note(df) if col in GPU_COLUMNS and gpu_gap(df) is None else ""
        elif filled == 0 and gap:
            status, note = "explained", f"column present, empty: {gap}"
        elif filled == 0:
            errors = df["gpu_error"].dropna() if col in GPU_COLUMNS and "gpu_error" in df else []
            status, note = "empty", (f"NVML failed: {errors.iloc[0]}" if len(errors) else "column present, empty")
        else:
            status, note = "partly filled", f"empty in {round((1 - filled) * len(df))} of {len(df)} rows"
        rows.append({"metric": metric, "column": col, "present": present, "filled_share": round(filled, 3),
                     "status": status, "note": note})
    return pd.DataFrame(rows)


def _load_extremes(ok):
    """The heaviest load (the highest measured rho of the open loop, else the most clients), the lightest (the
    fewest clients, else the lowest rho), and where the heaviest is, in words."""
    pois = ok[ok["mode"] == "poisson"].sort_values("rho_measured")
    closed = ok[ok["mode"] == "closed"].sort_values("clients")
    if not pois.empty:
        hi, where = pois.iloc[-1], f"rho={pois.iloc[-1]['rho_measured']:.2f} (Poisson arrivals)"
    else:
        hi, where = closed.iloc[-1], f"{int(closed.iloc[-1]['clients'])} closed-loop clients"
    return hi, (closed.iloc[0] if not closed.empty else pois.iloc[0]), where


def _ratio(candidate, baseline) -> dict | None:
    """Ratio of medians with its 95 % bootstrap interval, as evidence (None where a side is empty or zero)."""
    c = [float(x) for x in candidate if x is not None] if isinstance(candidate, list) else []
    b = [float(x) for x in baseline if x is not None] if isinstance(baseline, list) else []
    if not c or not b or statistics.median(b) == 0:
        return None
    point, lo, hi = bootstrap_ratio(c, b)
    return {"ratio": round(point, 4), "ci": [round(lo, 4), round(hi, 4)], "n": [len(c), len(b)]}


def p1_verdict(df, evidence: Sequence[str] = ()):
    """P1, a coverage verdict: do the rows carry every metric the guide says to track, filled where the machine can
    give it?

    Rule: supported when every metric of `P1_METRICS` is recorded in the successful rows and each is filled in all
    of them or empty for a reason of the machine (the GPU columns without an NVIDIA GPU: `metric_coverage`'s
    "explained"); not testable here, naming the gaps, when a metric is missing or empty where the machine could give
    it (the kit fell short, which says nothing against the advice), and with the failures' cause when no load level
    succeeded. Never refuted: recording a metric cannot show that tracking it is wrong. What queue time adds (queue
    time / service time at the heaviest load, with its 95 % interval; the decode time per token against the lightest
    load; every level's medians) is evidence in `details`, not the label.
    """
    ok = _ok(df)
    if ok.empty or "mode" not in ok:
        return not_testable("P1", no_rows_reason(df, "no load level produced rows"), evidence=evidence)
    cov = metric_coverage(ok)
    gaps = cov[~cov["status"].isin(["filled", "explained"])]
    details = _p1_details(ok, cov)
    if not gaps.empty:
        listing = "; ".join(f"{r['metric']} ({r['column']}): {r['status']}, {r['note']}" for _, r in gaps.iterrows())
        return not_testable("P1", f"the rows do not carry every metric the guide lists where this machine could "
                                  f"give it: {listing}", evidence=evidence, **details)
    v = Verdict(claim="P1", verdict=SUPPORTED, evidence=list(evidence), details=details,
                metric="coverage: every metric the guide lists, in every successful row (or explained where empty)",
                n_candidate=len(ok))
    v.summary = _p1_summary(cov, details)
    return v


def _p1_summary(cov, details: dict) -> str:
    filled = [f"{r['metric']} ({r['column']})" for _, r in cov.iterrows() if r["status"] == "filled"]
    why: dict[str, list[str]] = {}  # one sentence per reason: "A and B are empty: <why>"
    for _, r in cov[cov["status"] == "explained"].iterrows():
        why.setdefault(r["note"].split(": ", 1)[-1], []).append(f"{r['metric']} ({r['column']})")
    notes = [f"{r['metric']}: {r['note']}" for _, r in cov.iterrows() if r["status"] == "filled" and r["note"]]
    text = f"Every successful row carries {', '.join(filled)}."
    for reason, names in why.items():
        text += f" {' and '.join(names)} {'is' if len(names) == 1 else 'are'} empty: {reason}."
    if notes:
        text += " " + "; ".join(notes) + "."
    q = details.get("queue_over_service_at_heaviest_load")
    if q:
        text += (f" At the heaviest load ({details['heaviest_load']}) the median queue time was x{q['ratio']:.2f} the "
                 f"median service time (95 % CI {q['ci'][0]:.2f}-{q['ci'][1]:.2f}): waiting that a monitor of "
                 f"tokens/s alone does not show.")
    d = details.get("decode_ms_per_token_heaviest_vs_lightest")
    if d:
        text += (f" Decode time per token there was x{d['ratio']:.2f} that at {details['lightest_load']} "
                 f"(95 % CI {d['ci'][0]:.2f}-{d['ci'][1]:.2f}).")
    return text


def _p1_details(ok, cov) -> dict:
    hi, lo, where = _load_extremes(ok)
    pois = ok[ok["mode"] == "poisson"].sort_values("rho_measured")
    return {"coverage": cov.to_dict("records"),
            "gpu_columns_empty": bool((cov[cov["column"].isin(GPU_COLUMNS)]["filled_share"] == 0).all()),
            "lightest_load": lo["label"], "heaviest_load": hi["label"], "heaviest_load_where": where,
            "queue_over_service_at_heaviest_load": _ratio(hi.get("samples_queue_ms"), hi.get("samples_service_ms")),
            "decode_ms_per_token_heaviest_vs_lightest": _ratio(hi.get("samples_decode_ms_per_token"),
                                                               lo.get("samples_decode_ms_per_token")),
            "queue_share_of_e2e_at_high_load": as_float(hi.get("queue_share_of_e2e")),
            "queue_p50_ms_lightest_load": as_float(lo.get("queue_p50_ms")),
            "queue_p50_ms_heaviest_load": as_float(hi.get("queue_p50_ms")),
            "queue_p95_ms_heaviest_load": as_float(hi.get("queue_p95_ms")),
            "service_p50_ms_heaviest_load": as_float(hi.get("service_p50_ms")),
            "queue_service_by_rho": [{"rho_measured": as_float(r.get("rho_measured")),
                                      "queue_p50_ms": as_float(r.get("queue_p50_ms")),
                                      "service_p50_ms": as_float(r.get("service_p50_ms"))}
                                     for _, r in pois.iterrows()],
            "by_load": [{"label": r["label"], "rho_measured": as_float(r.get("rho_measured")),
                         "queue_p50_ms": as_float(r.get("queue_p50_ms")), "service_p50_ms": as_float(r.get("service_p50_ms")),
                         "e2e_p95_ms": as_float(r.get("e2e_p95_ms"))} for _, r in _by_load(ok)]}


# ---- figures --------------------------------------------------------------------------------------------------------
def _no_rows(ax, df, part: str) -> None:
    """An empty panel that says why (the figure is still saved: the notebook's evidence paths stay valid)."""
    ax.text(0.5, 0.5, textwrap.fill(no_rows_reason(df, "no successful rows", part=part), 60), ha="center",
            va="center", transform=ax.transAxes, fontsize=9)


def plot_queue(df):
    """Left: queue time against offered load rho (Poisson), with the M/G/1 prediction. Right: closed loop."""
    # not at the top: a trial child imports this module for queue_test and must not load matplotlib
    from kit.plots import median_plot, panel_figure  # (start-up time and RSS are measured there)

    req, ok = requests_frame(df), _ok(df)
    pois = req[req["mode"] == "poisson"]
    closed = req[req["mode"] == "closed"]

    def poisson(ax):
        if not pois.empty:
            long = pois.melt(id_vars=["rho_measured"], value_vars=["queue_ms", "service_ms"], var_name="part",
                             value_name="ms")
            median_plot(long, x="rho_measured", y="ms", hue="part", ax=ax, native_scale=True, linewidth=1.2)
            pk = ok[(ok["mode"] == "poisson") & ok["pk_queue_ms"].notna()].sort_values("rho_measured")
            if not pk.empty:
                ax.plot(pk["rho_measured"], pk["pk_queue_ms"], "k--", lw=1, label="M/G/1 mean wait (P-K)")
            ax.axvline(1.0, color="grey", lw=0.8, ls=":")
            ax.set_yscale("symlog", linthresh=100)
            ax.legend()
        else:
            _no_rows(ax, df, "poisson")
        ax.set_xlabel("offered load rho = arrival rate / service rate (measured)")
        ax.set_ylabel("ms per request (median, 95 % CI)")

    def closed_loop_panel(ax):
        if not closed.empty:
            long = closed.melt(id_vars=["clients"], value_vars=["queue_ms", "ttft_ms", "e2e_ms"], var_name="metric",
                               value_name="ms")
            median_plot(long, x="clients", y="ms", hue="metric", ax=ax, linewidth=1.2)
            ax2 = ax.twinx()
            c = ok[ok["mode"] == "closed"].sort_values("clients")
            ax2.plot(range(len(c)), c["throughput_ts"], "s:", color="grey", label="throughput tokens/s")
            ax2.set_ylabel("throughput, generated tokens/s", color="grey")
            ax2.grid(False)
            ax2.set_ylim(0, max(c["throughput_ts"].max() * 1.3, 1))
        else:
            _no_rows(ax, df, "closed")
        ax.set_xlabel("concurrent clients (closed loop, no think time)")
        ax.set_ylabel("ms per request (median, 95 % CI)")

    return panel_figure([("Poisson arrivals: queue time vs service time", poisson),
                         ("closed loop: latency grows, throughput does not", closed_loop_panel)],
                        ncols=2, figsize=(12, 4.2))


def coverage_across_studies(out_root: str | Path = OUTPUTS_DIR, metrics: dict[str, str] = P1_METRICS):
    """The P1 metrics' columns in every study's results.jsonl under out_root (relative: from the repository root):
    filled share per study and metric."""
    rows = []
    for f in sorted(resolve(out_root).glob("*/results.jsonl")):
        df = load_results(f)
        if df.empty or "status" not in df:
            continue
        cov = metric_coverage(df[df["status"] == "ok"], metrics)
        rows.append({"study": f.parent.name, "rows": int((df["status"] == "ok").sum()),
                     **{r["metric"]: r["filled_share"] if r["present"] else None for r in cov.to_dict("records")}})
    return pd.DataFrame(rows)
