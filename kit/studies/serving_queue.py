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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from kit.config import Settings, SettingsError
from kit.data import load_prompts
from kit.sweep import split_out_dir
from kit.verdicts import too_few
from kit.measure import Test, _pct, stream_chat, summarize

QUEUE_KIND = "kit.studies.serving_queue:queue_test"
TIMED_REGION = ("per request, on one clock: submit -> worker takes it (queue_ms) -> streamed chat completion from a "
                "fresh prompt cache -> last chunk (service_ms); ttft and e2e from submit, as the client sees them")
# What the guide says to track (section 8) -> the row column that carries it.
P1_METRICS = {
    "tokens/s": "median_ts",
    "TTFT": "ttft_ms",
    "GPU utilisation": "gpu_util_pct",
    "memory": "rss_peak_mb",
    "queue time": "queue_p50_ms",
}


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

    def record(self, t0: float) -> dict:
        """Per-request metrics in ms; t0 is the test's start (for the submit offset)."""
        r = self.result or {}
        queue_ms = (self.t_start - self.t_submit) * 1e3
        service_ms = (self.t_end - self.t_start) * 1e3
        # stream_chat's own clock starts just after its cache reset: put its TTFT on the worker's clock
        pre_ms = service_ms - r["e2e_ms"] if r else 0.0
        itl = r.get("itl_ms") or []
        return {
            "index": self.index,
            "prompt_id": self.prompt_id,
            "submit_s": round(self.t_submit - t0, 4),
            "queue_ms": round(queue_ms, 3),
            "service_ms": round(service_ms, 3),
            "ttft_ms": round(queue_ms + pre_ms + r["ttft_ms"], 3) if r.get("ttft_ms") is not None else None,
            "service_ttft_ms": round(pre_ms + r["ttft_ms"], 3) if r.get("ttft_ms") is not None else None,
            "e2e_ms": round((self.t_end - self.t_submit) * 1e3, 3),
            "decode_ms_per_token": round(statistics.fmean(itl), 4) if itl else None,
            "itl_p50_ms": round(_pct(itl, 0.5), 4) if itl else None,
            "itl_p95_ms": round(_pct(itl, 0.95), 4) if itl else None,
            "itl_ms": [round(x, 3) for x in itl],
            "n_prompt_tokens": r.get("n_prompt_tokens"),
            "n_gen_tokens": r.get("n_gen_tokens"),
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

    def queue_length(self) -> int:
        return self._q.qsize()

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
    prompts = p.pop("prompts", None) or load_prompts(n=3)
    clients = int(p.pop("clients", 1))
    rho = p.pop("rho", None)
    n_requests = int(p.pop("n_requests", 0))
    n_cal = int(p.pop("calibration_requests", 3))
    arrival_seed = int(p.pop("arrival_seed", 0))
    label = p.pop("label", None)
    s = lm.settings.replace(**p)  # the rest are sampling settings: validated like any Settings
    sampling = {k: getattr(s, k) for k in ("temperature", "top_p", "top_k", "repeat_penalty", "max_tokens", "seed")}
    stream_chat(lm, prompts[0]["prompt"], max_tokens=4)  # warm-up, untimed
    calibration = []
    with ModelServer(lm, **sampling) as srv:
        if mode == "closed":
            t0 = time.perf_counter()
            tickets = closed_loop(srv, prompts, clients, repetitions)
            rate = None
        elif mode == "poisson":
            if rho is None or rho <= 0 or n_requests < 1:
                raise SettingsError("poisson mode needs rho > 0 and n_requests >= 1")
            cal = [srv.submit(q["prompt"], q["id"]).wait() for q in
                   (prompts[i % len(prompts)] for i in range(max(n_cal, 1)))]
            calibration = [(t.t_end - t.t_start) * 1e3 for t in cal]
            mu = 1e3 / statistics.fmean(calibration)
            rate = float(rho) * mu
            t0 = time.perf_counter()
            tickets = poisson_arrivals(srv, prompts, rate, n_requests, seed=arrival_seed)
        else:
            raise SettingsError(f"mode={mode!r}: use 'closed' or 'poisson'")
    wall_s = max(t.t_end for t in tickets) - t0
    recs = [t.record(t0) for t in tickets]
    row = queue_row(recs, wall_s)
    served = [r for r in recs if r["error"] is None]
    mean_service_s = statistics.fmean(r["service_ms"] for r in served) / 1e3 if served else None
    submits = sorted(r["submit_s"] for r in recs)
    arrival = ((len(submits) - 1) / (submits[-1] - submits[0]) if mode == "poisson" and len(submits) > 1
               and submits[-1] > submits[0] else None)
    row.update({
        "label": label or (f"closed, {clients} client(s)" if mode == "closed" else f"poisson, rho={rho}"),
        "mode": mode,
        "clients": clients if mode == "closed" else None,
        "rho_target": rho,
        "arrival_rate_rps": round(rate, 4) if rate else None,
        "arrival_rate_measured_rps": round(arrival, 4) if arrival else None,
        "calibration_service_ms": [round(x, 3) for x in calibration],
        "service_rate_rps": round(1 / mean_service_s, 4) if mean_service_s else None,
        "rho_measured": round(arrival * mean_service_s, 4) if arrival and mean_service_s else None,
        "pk_queue_ms": (round(pk_queue_ms(arrival, [r["service_ms"] for r in served]), 3)
                        if arrival and served and pk_queue_ms(arrival, [r["service_ms"] for r in served]) is not None
                        else None),
        **{k: v for k, v in sampling.items()},
        "max_tokens_label": "unlimited" if sampling["max_tokens"] is None else str(sampling["max_tokens"]),
        "n_prompt": round(statistics.fmean(r["n_prompt_tokens"] for r in served)) if served else 0,
        "n_gen": sampling["max_tokens"] or 0,
        "n_depth": 0,
        "repetitions": repetitions,
        "timed_region": TIMED_REGION,
    })
    return row


def _by_load(df):
    """Rows of a DataFrame ordered by load: closed loop by clients, then Poisson by measured rho."""
    parts = [df[df["mode"] == "closed"].sort_values("clients"), df[df["mode"] == "poisson"].sort_values("rho_measured")]
    return [(i, r) for p in parts for i, r in p.iterrows()]


def _num(x):
    """numpy scalar or NaN -> a plain float or None (verdict details are JSON)."""
    if x is None:
        return None
    x = float(x)
    return None if x != x else x


def _stat(values: list[float], q: float) -> float | None:
    return round(_pct(values, q), 3) if values else None


def queue_row(recs: list[dict], wall_s: float) -> dict:
    """Latency percentiles (p50/p95/p99), throughput, raw samples, from per-request records."""
    ok = [r for r in recs if r["error"] is None]
    out: dict = {"n_requests": len(recs), "n_failed": len(recs) - len(ok), "wall_s": round(wall_s, 4)}
    for name in ("queue_ms", "service_ms", "ttft_ms", "e2e_ms"):
        xs = [r[name] for r in ok if r[name] is not None]
        base = name[:-3]
        for q in (50, 95, 99):
            out[f"{base}_p{q}_ms"] = _stat(xs, q / 100)
        out[f"samples_{name}"] = xs
    itl = [x for r in ok for x in r["itl_ms"]]
    for q in (50, 95, 99):
        out[f"itl_p{q}_ms"] = _stat(itl, q / 100)
    per_tok = [r["decode_ms_per_token"] for r in ok if r["decode_ms_per_token"]]
    ts = [1e3 / x for x in per_tok]
    n_gen = sum(r["n_gen_tokens"] or 0 for r in ok)
    out.update({
        "samples_decode_ms_per_token": per_tok,
        "decode_ms_per_token": round(statistics.median(per_tok), 4) if per_tok else None,
        "samples_ts": [round(x, 4) for x in ts],
        **summarize(ts),
        "throughput_rps": round(len(ok) / wall_s, 4) if wall_s > 0 else None,
        "throughput_ts": round(n_gen / wall_s, 4) if wall_s > 0 else None,
        "ttft_ms": _stat([r["ttft_ms"] for r in ok if r["ttft_ms"] is not None], 0.5),
        "e2e_ms": _stat([r["e2e_ms"] for r in ok], 0.5),
        "queue_share_of_e2e": (round(sum(r["queue_ms"] for r in ok) / sum(r["e2e_ms"] for r in ok), 4)
                               if ok and sum(r["e2e_ms"] for r in ok) > 0 else None),
        "requests": [{k: v for k, v in r.items() if k != "itl_ms"} for r in recs],
    })
    return out


# ---- the study --------------------------------------------------------------------------------------------------
@dataclass
class ServingStudy:
    """Parameters of notebooks/75_serving_queue, validated before anything runs."""

    model: str = "smollm2-135m"
    n_ctx: int = 2048
    n_threads: int | None = None
    prompts_file: str | None = None
    n_prompts: int = 6
    max_tokens: int = 64
    temperature: float = 0.0
    clients: list = field(default_factory=lambda: [1, 2, 4, 8])
    rhos: list = field(default_factory=lambda: [0.5, 0.8, 0.95, 1.2])
    poisson_requests: int = 24
    calibration_requests: int = 3
    repetitions: int = 5
    timeout_s: float = 1800.0
    out_dir: str = "outputs/75_serving_queue"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "ServingStudy":
        self.settings()
        n_file = len(load_prompts(self.prompts_file))
        if not isinstance(self.n_prompts, int) or not 1 <= self.n_prompts <= n_file:
            raise SettingsError(f"n_prompts={self.n_prompts!r} must be 1..{n_file}")
        if not isinstance(self.clients, (list, tuple)) or not isinstance(self.rhos, (list, tuple)):
            raise SettingsError("clients and rhos must be lists")
        if not self.clients and not self.rhos:
            raise SettingsError("nothing to run: clients and rhos are both empty")
        for c in self.clients:
            if not isinstance(c, int) or isinstance(c, bool) or c < 1:
                raise SettingsError(f"clients: {c!r} must be a positive int")
        for r in self.rhos:
            if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 < r <= 5:
                raise SettingsError(f"rhos: {r!r} must be a number in (0, 5]")
        for name in ("poisson_requests", "calibration_requests", "repetitions"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SettingsError(f"{name}={v!r} must be a positive int")
        if self.max_tokens >= self.n_ctx:
            raise SettingsError(f"max_tokens={self.max_tokens} must leave room for the prompt in n_ctx={self.n_ctx}")
        return self

    def settings(self) -> Settings:
        return Settings(model=self.model, n_ctx=self.n_ctx, n_threads=self.n_threads,
                        temperature=self.temperature, max_tokens=self.max_tokens)

    def _prompts(self) -> list[dict]:
        return load_prompts(self.prompts_file, self.n_prompts)

    def closed_tests(self) -> list[Test]:
        return [Test(QUEUE_KIND, n_gen=self.max_tokens,
                     params={"mode": "closed", "clients": c, "prompts": self._prompts(),
                             "label": f"closed, {c} client(s)"}) for c in self.clients]

    def poisson_tests(self) -> list[Test]:
        return [Test(QUEUE_KIND, n_gen=self.max_tokens,
                     params={"mode": "poisson", "rho": float(r), "n_requests": self.poisson_requests,
                             "calibration_requests": self.calibration_requests, "prompts": self._prompts(),
                             "label": f"poisson, rho={r}"}) for r in self.rhos]


def run_serving_study(study: ServingStudy, progress: bool = True):
    """Two trials (closed loop, Poisson), each one child process with one model load. Returns all rows."""
    from kit.results import load_results
    from kit.sweep import run_sweep

    name, root = split_out_dir(study.out_dir)
    base = study.settings()
    if study.clients:
        run_sweep(name, base, study.closed_tests(), repetitions=study.repetitions, out_root=root,
                  timeout_s=study.timeout_s, progress=progress, extra={"claim": "P1", "part": "closed"})
    if study.rhos:
        run_sweep(name, base, study.poisson_tests(), repetitions=study.repetitions, out_root=root,
                  timeout_s=study.timeout_s, progress=progress, extra={"claim": "P1", "part": "poisson"})
    return load_results(Path(root) / name)


# ---- analysis -------------------------------------------------------------------------------------------------------
def requests_frame(df):
    """One row per request, with its load level (label, mode, clients, rho)."""
    import pandas as pd

    recs = []
    ok = df[df["status"] == "ok"]
    for _, row in ok.iterrows():
        for r in row.get("requests") or []:
            recs.append({"label": row["label"], "mode": row["mode"], "clients": row.get("clients"),
                         "rho_target": row.get("rho_target"), "rho_measured": row.get("rho_measured"), **r})
    return pd.DataFrame(recs)


def load_table(df):
    """Per load level: offered load, throughput, and queue / TTFT / e2e / ITL percentiles."""
    cols = ["label", "mode", "clients", "rho_target", "rho_measured", "arrival_rate_measured_rps",
            "service_rate_rps", "n_requests", "throughput_rps", "throughput_ts", "median_ts", "decode_ms_per_token",
            "queue_p50_ms", "queue_p95_ms", "queue_p99_ms", "pk_queue_ms", "service_p50_ms",
            "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p95_ms", "e2e_p99_ms",
            "itl_p50_ms", "itl_p95_ms", "itl_p99_ms", "queue_share_of_e2e", "rss_peak_mb", "gpu_util_pct"]
    ok = df[df["status"] == "ok"]
    return ok[[c for c in cols if c in ok.columns]].reset_index(drop=True)


def metric_coverage(df, metrics: dict[str, str] = P1_METRICS):
    """For each metric the guide says to track: its column, whether rows carry it, and the non-empty share."""
    import pandas as pd

    rows = []
    for metric, col in metrics.items():
        present = col in df.columns
        filled = float(df[col].notna().mean()) if present and len(df) else 0.0
        note = ""
        if present and filled == 0 and col.startswith("gpu"):
            note = "column present, empty: no GPU visible to NVML on this machine"
        rows.append({"metric": metric, "column": col, "present": present, "filled_share": round(filled, 3),
                     "note": note})
    return pd.DataFrame(rows)


def p1_verdict(df, evidence: Sequence[str] = ()):
    """P1: do the rows carry every metric the guide lists, and what does queue time do past rho ~ 1.

    supported: every metric column is present and, at the highest offered load measured, the median queue
    time exceeds the median service time with a 95 % interval above 1 (queue time, not decode, dominates).
    no measurable effect: the columns are there but the loads run did not make queue time dominate.
    """
    from kit.verdicts import NO_EFFECT, SUPPORTED, Verdict, bootstrap_ratio, not_testable

    cov = metric_coverage(df[df["status"] == "ok"])
    missing = cov[~cov["present"]]["metric"].tolist()
    gpu_empty = bool(cov.loc[cov["metric"] == "GPU utilisation", "filled_share"].iloc[0] == 0)
    ok = df[(df["status"] == "ok")]
    if ok.empty or "mode" not in ok:
        return not_testable("P1", "no successful load rows", evidence=evidence)
    pois = ok[ok["mode"] == "poisson"].sort_values("rho_measured")
    closed = ok[ok["mode"] == "closed"].sort_values("clients")
    # the heaviest load: the highest measured rho (open loop), else the most clients; the lightest: one client
    if not pois.empty:
        hi = pois.iloc[-1]
        where = f"rho={hi['rho_measured']:.2f} (Poisson arrivals)"
    else:
        hi = closed.iloc[-1]
        where = f"{int(hi['clients'])} closed-loop clients"
    lo = closed.iloc[0] if not closed.empty else pois.iloc[0]
    qs, ss = hi["samples_queue_ms"], hi["samples_service_ms"]
    if not qs or not ss or statistics.median(ss) == 0:
        return not_testable("P1", "the highest load level has no served requests", evidence=evidence)
    short = too_few("P1", len(qs), len(ss), "poisson_requests (or repetitions)", evidence)
    if short:
        return short
    ratio, r_lo, r_hi = bootstrap_ratio(qs, ss)
    dec, d_lo, d_hi = bootstrap_ratio(hi["samples_decode_ms_per_token"], lo["samples_decode_ms_per_token"])
    if missing:
        return not_testable("P1", f"the rows lack {', '.join(missing)}: the kit does not record them here",
                            evidence=evidence, coverage=cov.to_dict("records"))
    by_load = ", ".join(f"rho {r['rho_measured']:.2f}: {r['queue_p50_ms']:.0f} / {r['service_p50_ms']:.0f} ms"
                        for _, r in pois.iterrows() if r.get("rho_measured") is not None)
    if r_lo > 1:
        verdict = SUPPORTED
    else:
        verdict = NO_EFFECT
    gpu_note = (" GPU utilisation: the column is there (gpu_util_pct, vram_peak_mb) but empty, because no GPU is "
                "visible to NVML on this machine." if gpu_empty else "")
    summary = (
        "Every row carries tokens/s (median_ts, throughput_ts), TTFT, memory (rss_peak_mb) and queue time "
        "(p50/p95/p99)." + gpu_note +
        f" At {where} the median queue time is {statistics.median(qs):.0f} ms against a median service time of "
        f"{statistics.median(ss):.0f} ms: queue/service {ratio:.2f}x (95 % CI {r_lo:.2f}-{r_hi:.2f}), while the "
        f"per-token decode time is {dec:.2f}x that at the lightest load, {lo['label']} (95 % CI {d_lo:.2f}-{d_hi:.2f}). "
        + (f"Median queue / service time by offered load: {by_load}. " if by_load else "")
        + ("At this load, latency is mostly waiting, not decoding: a monitor that tracks only tokens/s "
           "misses it." if verdict == SUPPORTED else
           "At the loads run here queue time did not clearly exceed service time; raise rhos or "
           "poisson_requests to see the queue take over.")
    )
    return Verdict(
        claim="P1", verdict=verdict, summary=summary, effect=round(ratio, 4), ci_low=round(r_lo, 4),
        ci_high=round(r_hi, 4), metric=f"median queue time / median service time at the highest load ({where})",
        evidence=list(evidence), n_baseline=len(ss), n_candidate=len(qs),
        details={"coverage": cov.to_dict("records"), "gpu_columns_empty": gpu_empty,
                 "decode_ratio_high_vs_low_load": round(dec, 4), "decode_ratio_ci": [round(d_lo, 4), round(d_hi, 4)],
                 "queue_share_of_e2e_at_high_load": _num(hi.get("queue_share_of_e2e")),
                 "lightest_load": lo["label"], "heaviest_load": hi["label"],
                 "queue_p50_ms_lightest_load": _num(lo.get("queue_p50_ms")),
                 "queue_p50_ms_heaviest_load": _num(hi.get("queue_p50_ms")),
                 "queue_p95_ms_heaviest_load": _num(hi.get("queue_p95_ms")),
                 "service_p50_ms_heaviest_load": _num(hi.get("service_p50_ms")),
                 "by_load": [{"label": r["label"], "rho_measured": _num(r.get("rho_measured")),
                              "queue_p50_ms": _num(r.get("queue_p50_ms")), "service_p50_ms": _num(r.get("service_p50_ms")),
                              "e2e_p95_ms": _num(r.get("e2e_p95_ms"))} for _, r in _by_load(ok)]},
    )


# ---- figures --------------------------------------------------------------------------------------------------------
def plot_queue(df):
    """Left: queue time against offered load rho (Poisson), with the M/G/1 prediction. Right: closed loop."""
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    from kit.plots import setup

    setup()
    req = requests_frame(df)
    ok = df[df["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    pois = req[req["mode"] == "poisson"] if not req.empty else req
    if not pois.empty:
        long = pois.melt(id_vars=["rho_measured"], value_vars=["queue_ms", "service_ms"], var_name="part",
                         value_name="ms")
        sns.pointplot(data=long, x="rho_measured", y="ms", hue="part", estimator=np.median, errorbar=("ci", 95),
                      native_scale=True, ax=axes[0], markersize=4, linewidth=1.2)
        pk = ok[(ok["mode"] == "poisson") & ok["pk_queue_ms"].notna()].sort_values("rho_measured")
        if not pk.empty:
            axes[0].plot(pk["rho_measured"], pk["pk_queue_ms"], "k--", lw=1, label="M/G/1 mean wait (P-K)")
        axes[0].axvline(1.0, color="grey", lw=0.8, ls=":")
        axes[0].set_yscale("symlog", linthresh=100)
        axes[0].legend()
    axes[0].set_xlabel("offered load rho = arrival rate / service rate (measured)")
    axes[0].set_ylabel("ms per request (median, 95 % CI)")
    axes[0].set_title("Poisson arrivals: queue time vs service time")
    closed = req[req["mode"] == "closed"] if not req.empty else req
    if not closed.empty:
        long = closed.melt(id_vars=["clients"], value_vars=["queue_ms", "ttft_ms", "e2e_ms"], var_name="metric",
                           value_name="ms")
        sns.pointplot(data=long, x="clients", y="ms", hue="metric", estimator=np.median, errorbar=("ci", 95),
                      ax=axes[1], markersize=4, linewidth=1.2)
        ax2 = axes[1].twinx()
        c = ok[ok["mode"] == "closed"].sort_values("clients")
        ax2.plot(range(len(c)), c["throughput_ts"], "s:", color="grey", label="throughput tokens/s")
        ax2.set_ylabel("throughput, generated tokens/s", color="grey")
        ax2.grid(False)
        ax2.set_ylim(0, max(c["throughput_ts"].max() * 1.3, 1))
    axes[1].set_xlabel("concurrent clients (closed loop, no think time)")
    axes[1].set_ylabel("ms per request (median, 95 % CI)")
    axes[1].set_title("closed loop: latency grows, throughput does not")
    fig.tight_layout()
    return fig


def coverage_across_studies(out_root: str | Path = "outputs", metrics: dict[str, str] = P1_METRICS):
    """The P1 metrics' columns in every study's results.jsonl under out_root: filled share per study and metric."""
    import pandas as pd

    from kit.results import load_results

    rows = []
    for f in sorted(Path(out_root).glob("*/results.jsonl")):
        df = load_results(f)
        if df.empty or "status" not in df:
            continue
        cov = metric_coverage(df[df["status"] == "ok"], metrics)
        rows.append({"study": f.parent.name, "rows": int((df["status"] == "ok").sum()),
                     **{r["metric"]: r["filled_share"] if r["present"] else None for r in cov.to_dict("records")}})
    return pd.DataFrame(rows)
