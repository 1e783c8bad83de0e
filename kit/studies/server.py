"""Notebook 86: the deployed server, measured over HTTP (claims X1, X2, P1 and R4 on a real server).

The parts that are not this study's (the translation of a profile into server settings, the server process, the
HTTP load generator) are in kit.serve; `serve_check` (`python -m kit serve-check`) runs the same load on llama.cpp's
own llama-server, built from the llama.cpp that llama-cpp-python vendors, and on llama-cpp-python's server.

Every profile (the guide's three `.env` files as written, the kit's three from notebook 85, the tuner's baseline
and any `.env` a user names) is started as llama-cpp-python's OpenAI server (`kit.serve.server`) and sent the
same RAG-shaped requests (the RAG pipeline R1-R4 use: `rag_search_k` chunks within `max_context_length`
tokens, streamed) by an asyncio client (`kit.serve.client`). Right beside each, the same requests run in-process
(a `kit.sweep` trial in a child process), so the served / in-process ratio of TTFT and decode speed is measured
in one run. Then, on one profile, concurrent clients with `interrupt_requests` on (the server's default) and off
(R4: throughput, and what the default does to answers), and Poisson arrivals at rates derived from the measured
service time up to saturation (the knee).

Rows (one per request, results.jsonl, appended and fsynced as each load level ends): the request's TTFT,
inter-token latencies, TPOT, e2e, output tokens, finish reason, truncation, HTTP status and error; the level's
load, wall time, the server's peak RSS and CPU time, the client's CPU time; the server's settings (as translated,
`interrupt_requests` included); provenance. A level is one trial: a rerun skips the levels already written (and
failed ones unless retry_failed). Each served request carries a unique first line so the server cannot reuse
the previous request's KV prefix (llama-cpp-python keeps the longest common prefix); in-process requests reset
the cache instead.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import httpx
import matplotlib.pyplot as plt
import pandas as pd

from kit.config import Settings, SettingsError, StudyConfig, check_rule, param
from kit.environment import process_provenance, save_environment
from kit.fidelity import build_llama_tool
from kit.measure import requests_row
from kit.models import chat_format_for, model_card
from kit.paths import (
    DEFAULT_MODEL, SERVED_LEVELS_FILE, SERVED_SIDE_BY_SIDE_FILE, SERVED_SUMMARY_FILE, resolve,
)
from kit.results import RESULTS_FILE, append_rows, read_rows
from kit.serve.client import Load, bootstrap_quantile, run_load, tpot_ms
from kit.serve.deploy import llama_server_command, request_fields, translation, write_deploy_files
from kit.serve.server import CommandServer, Endpoint, LlamaCppServer, ServerError, check_endpoint, free_port
from kit.studies.autotune.profiles import (
    GUIDE_PROFILE_NAMES, PROMPT_ROOM, gold_first, load_guide_profile, rag_request, request_inputs,
)
from kit.studies.autotune.tuner import guide_baseline, samples_of
from kit.studies.autotune.verdicts import decode_ts, speed_conditions, x1_verdict
from kit.studies.rag.pipeline import LlamaTokenCounter, rag_messages
from kit.sweep import run_sweep, split_out_dir
from kit.verdicts import SUPPORTED, Verdict, bootstrap_ratio, combine, compare, not_testable

SERVED = "served"
IN_PROCESS = "in_process"
TIMED_REGION = ("client clock: request sent -> first content chunk (TTFT) -> each chunk (ITL) -> end of the "
                "stream (e2e), over HTTP on 127.0.0.1; prompt built by the RAG pipeline before sending (retrieval "
                "excluded)")
QUANTILES = (0.5, 0.9, 0.95, 0.99)
KNEE_SHARE = 0.9   # a rate the server keeps up with: achieved throughput >= 90 % of the offered rate


@dataclass
class ServedStudy(StudyConfig):
    """Parameters of notebook 86 (see the module docstring)."""

    guide_profiles: list = param(["speed", "balanced", "quality"], "the guide's profiles to serve (data/guide_profiles)")
    kit_profiles_dir: str = param("outputs/profiles", "the kit's own profiles (notebook 85); skipped where absent")
    extra_profiles: list = param([], "more .env files to serve (paths)")
    baseline: bool = param(True, "serve the tuner's baseline (the guide's good settings) too: X2's reference")
    endpoint: str | None = param(None, "an OpenAI-compatible base URL someone else started (http://HOST:PORT/v1): "
                                       "the load goes there instead of to servers the kit starts")
    endpoint_profile: str = param("speed", "with endpoint: the guide profile (or .env path) whose request settings "
                                           "and RAG sizing the requests use")
    n_questions: int = param(1, "RAG questions per pass (the dev split)", ge=1)
    chunk_chars: int = param(800, "characters per corpus chunk", ge=50)
    corpus_topics: list = param([], "restrict the corpus to these pydoc topics ([]: all)")
    max_tokens: int = param(32, "cap per answer (every profile)", ge=2)
    repetitions: int = param(5, "passes over the questions per profile, served and in-process", ge=1)
    concurrency: list = param([1, 2, 4], "closed-loop clients (R4, with interrupt_requests on and off)")
    requests_per_client: int = param(3, "requests per client per closed-loop level", ge=1)
    concurrency_profile: str = param("guide_speed", "the profile the concurrency and rate levels use")
    rhos: list = param([0.5, 0.9, 1.3], "Poisson offered loads, multiples of the measured service rate")
    poisson_requests: int = param(8, "requests per Poisson level", ge=1)
    slo_ttft_ms: float = param(3000.0, "goodput SLO: TTFT limit (ms)", gt=0)
    slo_tpot_ms: float = param(100.0, "goodput SLO: time per output token limit (ms)", gt=0)
    request_timeout_s: float = param(300.0, "client timeout per request (s)", gt=0)
    ready_timeout_s: float = param(120.0, "how long a started server may take to answer (s)", gt=0)
    logits_all: bool = param(False, "the server's logits_all (its own default True computes logits for every prompt "
                                    "token; in-process Llama uses False)")
    chat_format: str | None = param(None, "llama-cpp-python chat format (None: the GGUF's template, or one chosen "
                                           "from the vocabulary)")
    retry_failed: bool = param(False, "measure failed levels again on a rerun")
    out_dir: str = param("outputs/86_server", "rows, figures, deploy files and verdicts.json go here")

    def check(self) -> None:
        check_rule(all(isinstance(c, int) and c >= 1 for c in self.concurrency),
                   f"concurrency={self.concurrency!r}: whole numbers >= 1")
        check_rule(all(isinstance(r, (int, float)) and r > 0 for r in self.rhos), f"rhos={self.rhos!r}: > 0")
        for p in self.extra_profiles:
            check_rule(Path(resolve(p)).is_file(), f"extra_profiles: {p} does not exist")
        if self.endpoint:
            check_rule(self.endpoint.startswith(("http://", "https://")),
                       f"endpoint={self.endpoint!r}: an http(s) base URL such as http://127.0.0.1:8080/v1")
        chat_format_for(self.model, self.chat_format)
        self.profiles()  # every .env read, every value checked, before anything runs

    # ---- what is served -------------------------------------------------------------------------------------
    def _with_model(self, s: Settings) -> Settings:
        changes = {"chat_format": self.chat_format} if self.chat_format else {}
        return s.replace(**changes)

    def profiles(self) -> dict[str, Settings]:
        """name -> Settings, in serving order: baseline, the guide's, the kit's, the extra ones."""
        out: dict[str, Settings] = {}
        if self.endpoint:
            return {"endpoint": self._endpoint_settings()}
        if self.baseline:
            out["baseline"] = self._with_model(guide_baseline(self.model, self.out_path.parent)[0])
        for n in self.guide_profiles:
            if n not in GUIDE_PROFILE_NAMES:
                raise SettingsError(f"guide_profiles: {n!r} is not one of {', '.join(GUIDE_PROFILE_NAMES)}")
            out[f"guide_{n}"] = self._with_model(load_guide_profile(n, self.model)[0])
        kdir = resolve(self.kit_profiles_dir)
        for n in GUIDE_PROFILE_NAMES:
            p = Path(kdir) / f"{n}.env"
            if p.is_file():
                out[f"kit_{n}"] = self._with_model(Settings.from_dotenv(p))
        for p in self.extra_profiles:
            out[Path(p).stem] = self._with_model(Settings.from_dotenv(resolve(p)))
        return out

    def _endpoint_settings(self) -> Settings:
        if self.endpoint_profile in GUIDE_PROFILE_NAMES:
            return self._with_model(load_guide_profile(self.endpoint_profile, self.model)[0])
        return self._with_model(Settings.from_dotenv(resolve(self.endpoint_profile)))


# ---- requests ---------------------------------------------------------------------------------------------------
def build_requests(s: Settings, study: ServedStudy, counter, passes: int,
                   inputs: tuple[list, list]) -> tuple[list[tuple[str, list[dict]]], dict]:
    """The RAG-shaped chat requests of one profile (kit.studies.rag.pipeline.rag_messages over `inputs`, the
    chunks and questions of `request_inputs`, oracle order, sized by its rag_search_k and max_context_length within
    its n_ctx), `passes` times over the questions; and what went into them (context tokens, chunks, the prompt
    tokens as sent, with the first line `level_requests` adds)."""
    chunks, questions = inputs
    n_ctx = s.n_ctx or (model_card(s.model).n_ctx_train or 2048)
    budget = max(min(s.max_context_length, n_ctx - study.max_tokens - PROMPT_ROOM), 0)
    built = [rag_messages(q, gold_first(q, chunks), s.rag_search_k, budget, counter)
             for q in questions[:study.n_questions]]
    out = [(f"q{qi}", messages) for _ in range(passes) for qi, (messages, _) in enumerate(built)]
    sent = level_requests(out, "0" * 8)
    info = {"rag_context_tokens": round(statistics.fmean(i["context_tokens"] for _, i in built)),
            "rag_chunks_in_context": round(statistics.fmean(i["n_in_context"] for _, i in built), 2),
            "n_prompt": round(statistics.fmean(sum(counter(m["content"]) for m in msgs) for _, msgs in sent))}
    return out, info


def first_line(messages: list[dict], line: str) -> list[dict]:
    """A copy of the messages with `line` put before the first message's text."""
    msgs = [dict(m) for m in messages]
    msgs[0]["content"] = f"{line}\n" + msgs[0]["content"]
    return msgs


def level_requests(reqs: list[tuple[str, list[dict]]], key: str) -> list[tuple[str, list[dict]]]:
    """The requests with first lines unique to one level (its key and the request's index): a server that keeps
    earlier prompts (llama-server's prompt cache, llama-cpp-python's longest common prefix, a server reused across
    levels) cannot serve a request from cache. The same level gets the same prompts on a rerun."""
    return [(pid, first_line(messages, f"(request {key[:8]}-{i + 1})")) for i, (pid, messages) in enumerate(reqs)]


# ---- levels: one trial each ---------------------------------------------------------------------------------------
@dataclass
class Level:
    profile: str
    part: str                  # "sequential" (X1/X2/P1), "concurrency" (R4), "rate" (the knee)
    load: Load
    interrupt_requests: bool = True
    key: str = ""


def level_key(model_sha: str, s: Settings, level: Level, spec: dict, target: str) -> str:
    d = s.to_dict()
    d.pop("model")
    blob = json.dumps({"model": model_sha, "settings": d, "part": level.part, "load": level.load.to_dict(),
                       "interrupt": level.interrupt_requests, "spec": spec, "target": target}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _done_levels(rows: list[dict], retry_failed: bool) -> set[str]:
    last = {}
    for r in rows:
        if r.get("part") == SERVED and r.get("level_key"):
            last[r["level_key"]] = r.get("level_status")
    return {k for k, st in last.items() if st == "ok" or (st and not retry_failed)}


def _metrics_text(ep: Endpoint) -> dict[str, float]:
    """llama-server's Prometheus /metrics as {name: value}; {} where the server has none."""
    try:
        r = httpx.get(ep.origin + "/metrics", timeout=5.0)
    except httpx.HTTPError:
        return {}
    if r.status_code != 200:
        return {}
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, _, val = line.rpartition(" ")
            try:
                out[name.replace("llamacpp:", "")] = float(val)
            except ValueError:
                pass
    return out


def _slots(ep: Endpoint) -> list | None:
    try:
        r = httpx.get(ep.origin + "/slots", timeout=5.0)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def run_level(ep: Endpoint, level: Level, requests, fields: dict, study: ServedStudy) -> tuple[list[dict], dict]:
    """One load level against the endpoint: the request records and the level's columns."""
    ep.reset_peak_rss()
    run_id = f"{time.time_ns():x}"
    cpu0 = ep.cpu_s()
    m0 = _metrics_text(ep)
    recs, lvl = run_load(ep.base_url, ep.model, requests, fields, level.load, study.request_timeout_s)
    cpu1 = ep.cpu_s()
    m1 = _metrics_text(ep)
    alive = ep.alive()
    lvl.update(level_run=run_id, server_rss_peak_mb=ep.peak_rss_mb() if alive else None,
               server_cpu_s=round(cpu1 - cpu0, 3) if cpu0 is not None and cpu1 is not None else None,
               server_alive_after=alive)
    if lvl["server_cpu_s"] is not None and lvl["client_cpu_s"] is not None:
        tot = lvl["server_cpu_s"] + lvl["client_cpu_s"]
        lvl["client_cpu_share"] = round(lvl["client_cpu_s"] / tot, 4) if tot > 0 else None
    if m1:
        lvl.update({f"server_metric_{k}": round(v - m0.get(k, 0.0), 3) if k.endswith("_total") else v
                    for k, v in m1.items()})
        slots = _slots(ep)
        if slots is not None:
            lvl["server_slots"] = len(slots)
    if not alive:
        lvl["level_status"] = "failed: the server exited during the level"
    elif recs and all(r["error"] for r in recs):
        lvl["level_status"] = f"failed: every request failed ({recs[0]['error'][:160]})"
    else:
        lvl["level_status"] = "ok"
    return recs, lvl


def _request_row(rec: dict) -> dict:
    row = {k: v for k, v in rec.items() if k not in ("text", "server_timings")}
    for k, v in (rec.get("server_timings") or {}).items():  # llama-server: prompt_ms, predicted_per_token_ms ...
        row[f"server_timing_{k}"] = v
    row["answer_chars"] = len(rec.get("text") or "")
    row["tpot_ms"] = tpot_ms(rec)
    row["samples_itl_ms"] = [round(x, 3) for x in row.pop("itl_ms")]
    for k in ("ttft_ms", "e2e_ms", "tpot_ms"):
        if row.get(k) is not None:
            row[k] = round(row[k], 3)
    row["status"] = "ok" if not rec["error"] else f"error: {rec['error']}"
    return row


def _base_columns(study_name: str, card, name: str, s: Settings, level: Level, ep: Endpoint | None,
                  info: dict) -> dict:
    d = s.to_dict()
    d.pop("model")
    return {"study": study_name, "part": SERVED, "profile": name, "level_part": level.part,
            "level_key": level.key, "load_label": level.load.label(), **{f"load_{k}": v for k, v in
                                                                         level.load.to_dict().items()},
            "interrupt_requests": level.interrupt_requests, "endpoint_kind": ep.kind if ep else None,
            "endpoint": ep.base_url if ep else None, **process_provenance(),
            "model_filename": card.file_name, "model_sha256": card.sha256, **d, **info,
            "timed_region": TIMED_REGION, "test_time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _failed_level_rows(base: dict, level: Level, cause: str) -> list[dict]:
    return [{**base, "trial_key": f"{level.key}-0", "index": 0, "status": f"error: {cause}",
             "level_status": f"failed: {cause}", "error": cause, "level_run": f"{time.time_ns():x}"}]


def _write(results: Path, base: dict, level: Level, recs: list[dict], lvl: dict) -> list[dict]:
    rows = [{**base, **lvl, "trial_key": f"{level.key}-{r['index']}", **_request_row(r)} for r in recs]
    append_rows(results, rows)
    return rows


# ---- the study --------------------------------------------------------------------------------------------------
@dataclass
class ServedResult:
    rows: pd.DataFrame
    profiles: dict[str, Settings]
    deploy: dict[str, dict] = field(default_factory=dict)
    mu_rps: float | None = None
    notes: list[str] = field(default_factory=list)


def _levels_for(study: ServedStudy, names: Sequence[str]) -> list[Level]:
    seq = Load("closed", clients=1, requests_per_client=study.n_questions * study.repetitions)
    return [Level(n, "sequential", seq) for n in names]


def _concurrency_levels(study: ServedStudy, name: str) -> list[Level]:
    """Closed loops at each concurrency, with interrupt_requests on and off (llama-cpp-python's setting: against
    another endpoint, one pass, recorded as off)."""
    out = []
    for interrupt in ((False,) if study.endpoint else (True, False)):
        for c in study.concurrency:
            out.append(Level(name, "concurrency", Load("closed", clients=c, requests_per_client=study.requests_per_client),
                             interrupt_requests=interrupt))
    return out


def run_served_study(study: ServedStudy, progress: bool = True, endpoint: Endpoint | None = None) -> ServedResult:
    """Every profile served and in-process, then the concurrency and rate levels (see the module docstring).
    With study.endpoint, `endpoint` may carry the server's pid (a server the caller started: its RSS and CPU are
    then read too)."""

    out = study.out_path
    out.mkdir(parents=True, exist_ok=True)
    save_environment(out)
    results = out / RESULTS_FILE
    name, root = split_out_dir(out)
    profiles = study.profiles()
    res = ServedResult(rows=pd.DataFrame(), profiles=profiles)
    count = LlamaTokenCounter(study.model)
    chunks, questions = request_inputs(study.chunk_chars, study.corpus_topics or None)  # once, for every profile
    spec = {"n_questions": study.n_questions, "chunk_chars": study.chunk_chars, "max_tokens": study.max_tokens,
            "corpus_topics": list(study.corpus_topics), "nonce": "per level", "logits_all": study.logits_all}
    done = _done_levels(read_rows(results), study.retry_failed)
    deploy_dir = out / "deploy"
    deploy_dir.mkdir(exist_ok=True)
    for pname, s in profiles.items():
        env = s.to_dotenv(deploy_dir / f"{pname}.env", header=f"profile {pname} as served by notebook 86")
        res.deploy[pname] = {k: str(v) for k, v in write_deploy_files(env, s, guide_name=None).items()}
        res.deploy[pname]["translation"] = translation(s)
    request_test = rag_request(max_tokens=study.max_tokens, n_questions=study.n_questions,
                               chunk_chars=study.chunk_chars, corpus_topics=study.corpus_topics)

    def serve(pname: str, levels: list[Level], reqs, info) -> None:
        s = profiles[pname]
        card = model_card(s.model)
        for lv in levels:
            lv.key = level_key(card.sha256, s, lv, spec, study.endpoint or "llama-cpp-python")
        todo = [lv for lv in levels if lv.key not in done]
        if not todo:
            return
        fields = {**request_fields(s), "max_tokens": study.max_tokens}
        groups: dict[bool, list[Level]] = {}
        for lv in todo:
            groups.setdefault(lv.interrupt_requests, []).append(lv)
        for interrupt, lvs in groups.items():
            if study.endpoint:
                ep = endpoint or Endpoint(study.endpoint, kind="external")
                try:
                    ep.model = check_endpoint(study.endpoint)
                except ServerError as exc:
                    for lv in lvs:
                        append_rows(results, _failed_level_rows(_base_columns(name, card, pname, s, lv, None, info), lv,
                                                                str(exc)))
                    continue
                _run_levels(ep, lvs, pname, s, card, reqs, fields, info, None)
                continue
            srv = LlamaCppServer(s, out / "servers", interrupt_requests=interrupt, ready_timeout_s=study.ready_timeout_s,
                                 name=f"{pname}-interrupt{int(interrupt)}", logits_all=study.logits_all)
            try:
                ep = srv.start()
            except ServerError as exc:
                for lv in lvs:
                    append_rows(results, _failed_level_rows(_base_columns(name, card, pname, s, lv, None, info), lv,
                                                            str(exc)))
                continue
            try:
                _run_levels(ep, lvs, pname, s, card, reqs, fields, info, srv)
            finally:
                srv.stop()

    def _run_levels(ep, lvs, pname, s, card, reqs, fields, info, srv) -> None:
        # one warm-up request per server start (model pages, the first graph): not recorded
        # (its own first line: a warm-up with the first measured prompt would hand that request a cached prefix)
        pid0, msgs0 = reqs[0]
        run_load(ep.base_url, ep.model, [(pid0, first_line(msgs0, "(warm-up)"))], {**fields, "max_tokens": 2},
                 Load("closed"), study.request_timeout_s)
        for lv in lvs:
            base = {**_base_columns(name, card, pname, s, lv, ep, info), **ep.settings}
            recs, lvl = run_level(ep, lv, level_requests(reqs, lv.key), fields, study)
            _write(results, base, lv, recs, lvl)
            if lvl["level_status"] != "ok" and not ep.alive():
                res.notes.append(f"{pname}: the server exited during {lv.load.label()}; its remaining levels are "
                                 f"left for a rerun")
                return

    # X1 / X2 / P1: each profile in-process, then served, one after the other (drift hits both sides alike)
    for pname, s in profiles.items():
        reqs, info = build_requests(s, study, count, study.repetitions, (chunks, questions))
        if not study.endpoint:
            run_sweep(name, s, [request_test], repetitions=study.repetitions, out_root=root, progress=progress,
                      extra={"part": IN_PROCESS, "profile": pname})
        serve(pname, _levels_for(study, [pname]), reqs, info)

    # R4 and the knee: one profile, concurrent clients with interrupt_requests on and off, then Poisson rates
    cname = "endpoint" if study.endpoint else study.concurrency_profile
    if cname in profiles and (study.concurrency or study.rhos):
        s = profiles[cname]
        passes = max(study.requests_per_client * max(study.concurrency or [1]), study.poisson_requests) // \
            max(study.n_questions, 1) + 1
        reqs, info = build_requests(s, study, count, passes, (chunks, questions))
        serve(cname, _concurrency_levels(study, cname) if study.concurrency else [], reqs, info)
        rows = read_rows(results)
        mu = service_rate(rows, cname)
        res.mu_rps = mu
        if mu and study.rhos:
            levels = [Level(cname, "rate", Load("poisson", rate_rps=round(rho * mu, 4), n_requests=study.poisson_requests,
                                                seed=i), interrupt_requests=False)
                      for i, rho in enumerate(study.rhos)]
            serve(cname, levels, reqs, info)
        elif study.rhos:
            res.notes.append("no service rate measured (no successful one-client level): no Poisson levels")
    elif study.concurrency or study.rhos:
        res.notes.append(f"concurrency_profile {cname!r} is not among the served profiles: no R4 or rate levels")
    res.rows = load_rows(out)
    return res


def load_rows(out: str | os.PathLike) -> pd.DataFrame:
    rows = read_rows(Path(out) / RESULTS_FILE)
    return pd.DataFrame(rows)


def service_rate(rows: list[dict], profile: str) -> float | None:
    """1 / mean e2e time of the one-client levels of `profile` (interrupt off where there is one)."""
    e2e = [r["e2e_ms"] for r in rows if r.get("part") == SERVED and r.get("profile") == profile
           and r.get("load_clients") == 1 and r.get("load_mode") == "closed" and r.get("status") == "ok"
           and r.get("e2e_ms")]
    return round(1000.0 / statistics.fmean(e2e), 4) if e2e else None


# ---- analysis ---------------------------------------------------------------------------------------------------
def served(df: pd.DataFrame) -> pd.DataFrame:
    """The served request rows of each level's latest run (a rerun of a failed level replaces its rows)."""
    if df is None or not len(df) or "part" not in df:
        return pd.DataFrame()
    s = df[df["part"] == SERVED]
    if not len(s) or "level_run" not in s:
        return s
    latest = s.groupby("level_key")["level_run"].transform("max")
    return s[s["level_run"] == latest]


def _as_records(g: pd.DataFrame) -> list[dict]:
    """Served request rows back to the shape `kit.measure.requests_row` reads (the in-process side's too)."""
    out = []
    for r in g.to_dict("records"):
        if r.get("status") != "ok":
            continue
        itl = r.get("samples_itl_ms") or []
        out.append({"ttft_ms": r.get("ttft_ms"), "e2e_ms": r["e2e_ms"], "itl_ms": itl, "n_gen_tokens":
                    int(r.get("n_gen_tokens") or 0), "n_prompt_tokens": r.get("n_prompt") or 0,
                    "finish_reason": r.get("finish_reason"), "engine_tg_ms": None})
    return out


def level_table(df: pd.DataFrame, slo_ttft_ms: float, slo_tpot_ms: float) -> pd.DataFrame:
    """One row per served load level: p50/p90/p95/p99 of TTFT, TPOT and e2e with 95 % bootstrap intervals,
    throughput, goodput under the SLO, error and truncation rates, the server's peak RSS, the client's CPU share."""
    s = served(df)
    if not len(s):
        return pd.DataFrame()
    out = []
    for key, g in s.groupby("level_key", sort=False):
        first = g.iloc[0]
        ok = g[g["status"] == "ok"]
        complete = ok[~ok["truncated"].astype(bool)] if len(ok) else ok
        row = {"profile": first["profile"], "part": first["level_part"], "load": first["load_label"],
               "interrupt_requests": bool(first["interrupt_requests"]), "requests": len(g),
               "errors": int((g["status"] != "ok").sum()), "truncated": int(ok["truncated"].astype(bool).sum())
               if len(ok) else 0, "level_status": first.get("level_status")}
        row["error_rate"] = round(row["errors"] / len(g), 3)
        row["truncation_rate"] = round(row["truncated"] / max(len(ok), 1), 3) if len(ok) else None
        for col, name in (("ttft_ms", "ttft"), ("tpot_ms", "tpot"), ("e2e_ms", "e2e")):
            vals = [float(x) for x in ok[col].dropna()] if len(ok) and col in ok else []
            p50, lo, hi = bootstrap_quantile(vals, 0.5)
            row[f"{name}_p50_ms"] = None if p50 is None else round(p50, 1)
            row[f"{name}_p50_ci"] = None if lo is None else f"{lo:.0f}-{hi:.0f}"
            for q in QUANTILES[1:]:  # with few requests a high quantile is near the maximum: its interval says so
                v, qlo, qhi = bootstrap_quantile(vals, q)
                row[f"{name}_p{int(q * 100)}_ms"] = None if v is None else round(v, 1)
                row[f"{name}_p{int(q * 100)}_ci"] = None if qlo is None else f"{qlo:.0f}-{qhi:.0f}"
        itl = [x for xs in ok["samples_itl_ms"] for x in (xs or [])] if len(ok) else []
        row["itl_p50_ms"] = round(bootstrap_quantile(itl, 0.5, n_boot=1)[0], 2) if itl else None
        row["itl_p99_ms"] = round(bootstrap_quantile(itl, 0.99, n_boot=1)[0], 2) if itl else None
        wall = float(first.get("wall_s") or 0)
        row["throughput_rps"] = round(len(complete) / wall, 4) if wall > 0 else None
        row["output_tps"] = round(float(ok["n_gen_tokens"].sum()) / wall, 2) if wall > 0 and len(ok) else None
        good = complete[(complete["ttft_ms"] <= slo_ttft_ms) & (complete["tpot_ms"].fillna(0) <= slo_tpot_ms)] \
            if len(complete) else complete
        row["goodput_rps"] = round(len(good) / wall, 4) if wall > 0 else None
        row["offered_rps"] = first.get("load_rate_rps")
        row["server_rss_peak_mb"] = first.get("server_rss_peak_mb")
        row["client_cpu_ms_per_request"] = first.get("client_cpu_ms_per_request")
        row["client_cpu_share"] = first.get("client_cpu_share")
        row["level_key"] = key
        out.append(row)
    return pd.DataFrame(out)


def knee(levels: pd.DataFrame) -> dict:
    """The highest offered Poisson rate the server kept up with (achieved >= KNEE_SHARE x offered, no errors), and
    the first it did not: saturation lies between them."""
    r = levels[levels["part"] == "rate"].sort_values("offered_rps") if len(levels) else levels
    if not len(r):
        return {"knee_rps": None, "saturated_from_rps": None, "why": "no rate levels ran"}
    kept = [row for row in r.to_dict("records") if row["throughput_rps"] is not None and row["errors"] == 0
            and row["throughput_rps"] >= KNEE_SHARE * row["offered_rps"]]
    over = [row for row in r.to_dict("records") if row not in kept]
    k = max((x["offered_rps"] for x in kept), default=None)
    sat = min((x["offered_rps"] for x in over if k is None or x["offered_rps"] > k), default=None)
    return {"knee_rps": k, "saturated_from_rps": sat,
            "why": f"achieved throughput >= {KNEE_SHARE:.0%} of the offered Poisson rate, no errors"}


def request_summary(df: pd.DataFrame, profile: str, part: str = "sequential") -> dict:
    """One profile's sequential requests as a kit.measure.requests_row dict (served side)."""
    s = served(df)
    g = s[(s["profile"] == profile) & (s["level_part"] == part)] if len(s) else s
    recs = _as_records(g)
    return requests_row(recs, speed="decode") if recs else {}


def in_process_summary(df: pd.DataFrame, profile: str) -> dict:
    if df is None or not len(df) or "part" not in df:
        return {}
    g = df[(df["part"] == IN_PROCESS) & (df["profile"] == profile) & (df["status"] == "ok")]
    return g.iloc[-1].to_dict() if len(g) else {}


def _ratio_columns(metric: str, served_samples: list[float], in_process_samples: list[float]) -> dict:
    """served / in-process for one metric, with its 95 % bootstrap interval (None with fewer than 2 a side)."""
    if len(served_samples) < 2 or len(in_process_samples) < 2:
        return {f"{metric}_ratio": None, f"{metric}_ratio_ci": None}
    pt, lo, hi = bootstrap_ratio(served_samples, in_process_samples)
    return {f"{metric}_ratio": round(pt, 3), f"{metric}_ratio_ci": f"{lo:.3f}-{hi:.3f}"}


def side_by_side(df: pd.DataFrame, profiles: Sequence[str]) -> pd.DataFrame:
    """Per profile: TTFT and decode t/s served and in-process (medians) and served / in-process with 95 % CIs."""
    out = []
    for p in profiles:
        sv, ip = request_summary(df, p), in_process_summary(df, p)
        ttft_sv, ttft_ip = samples_of(sv, "samples_ttft_ms"), samples_of(ip, "samples_ttft_ms")
        dec_sv, dec_ip = decode_ts(sv), decode_ts(ip)
        out.append({"profile": p, "served_ttft_ms": sv.get("ttft_ms"), "in_process_ttft_ms": ip.get("ttft_ms"),
                    "served_decode_ts": round(statistics.median(dec_sv), 1) if dec_sv else None,
                    "in_process_decode_ts": round(statistics.median(dec_ip), 1) if dec_ip else None,
                    **_ratio_columns("ttft", ttft_sv, ttft_ip), **_ratio_columns("decode_ts", dec_sv, dec_ip),
                    "served_n": len(ttft_sv), "in_process_n": len(ttft_ip)})
    return pd.DataFrame(out)


# ---- verdicts ---------------------------------------------------------------------------------------------------
def _served_tag(v: Verdict, ratio_note: str = "") -> Verdict:
    v.summary = "On the served profiles (llama-cpp-python's server over HTTP): " + v.summary + ratio_note
    v.metric = (v.metric + " - served over HTTP").strip(" -")
    return v


def x1_served(df: pd.DataFrame, evidence: Sequence[str] = ()) -> Verdict:
    meas = {n: {"request": request_summary(df, f"guide_{n}")} for n in ("speed", "balanced", "quality")}
    v = x1_verdict(meas, evidence=evidence)
    sbs = side_by_side(df, ["guide_speed", "guide_quality"])
    note = ""
    if len(sbs) and sbs["ttft_ratio"].notna().all():
        note = " Served / in-process TTFT: " + ", ".join(f"{r.profile} x{r.ttft_ratio} ({r.ttft_ratio_ci})"
                                                          for r in sbs.itertuples()) + "."
    return _served_tag(v, note)


def x2_served(df: pd.DataFrame, evidence: Sequence[str] = ()) -> Verdict:
    """X2's TTFT and decode conditions on the server: the kit's speed profile against the baseline, served."""
    base, tuned = request_summary(df, "baseline"), request_summary(df, "kit_speed")
    if not base or not tuned:
        return not_testable("X2", "served X2 needs the baseline and the kit's speed profile (notebook 85 writes it) "
                            "served with successful requests", evidence=evidence)
    conds = speed_conditions(base, tuned, where="served, ")
    v = combine("X2", conds, "metric", evidence=evidence)
    return _served_tag(v)


P1_SERVED = {"tokens/s": "decode_ts", "TTFT": "ttft_ms", "memory": "server_rss_peak_mb",
             "queue time": "queue_est_ms", "GPU utilisation": None, "GPU memory": None}


def with_queue_estimate(df: pd.DataFrame) -> pd.DataFrame:
    """Queue time as the server imposes it, estimated per request: its TTFT minus the median TTFT of the same
    profile's one-client requests (which never wait), floored at 0. Decode t/s per request: 1000 / mean ITL."""
    s = served(df).copy()
    if not len(s):
        return s
    ok = s["status"] == "ok"
    alone = s[ok & (s["load_clients"] == 1) & (s["load_mode"] == "closed")].groupby("profile")["ttft_ms"].median()
    s["queue_est_ms"] = [max(t - alone.get(p), 0.0) if ok_ and t == t and p in alone else None
                         for t, p, ok_ in zip(s["ttft_ms"], s["profile"], ok)]
    s["decode_ts"] = [1000.0 / statistics.fmean(x) if isinstance(x, list) and x and statistics.fmean(x) > 0 else None
                      for x in s["samples_itl_ms"]]
    return s


def p1_served(df: pd.DataFrame, evidence: Sequence[str] = ()) -> Verdict:
    """Coverage at the server: every metric the guide tracks recorded for every successful served request, or
    empty for a reason of the machine (GPU columns without an NVIDIA GPU: the server's process is not sampled by
    NVML here)."""
    s = with_queue_estimate(df)
    ok = s[(s["status"] == "ok") & (s["n_gen_tokens"] > 0)] if len(s) else s
    if not len(ok):
        return not_testable("P1", "no served request succeeded with a token", evidence=evidence)
    # requests cut off before their first token (interrupt_requests) have nothing to time: they are counted as
    # truncated, not as gaps; one-token answers have no inter-token latency, so no decode speed, and only them
    timed = ok[ok["n_gen_tokens"] > 1]
    cover, gaps = {}, []
    for metric, col in P1_SERVED.items():
        if col is None:
            cover[metric] = "explained: the served study does not sample GPU counters (notebook 75 and the engine "
            "studies do, with NVML)"
            continue
        rows = timed if metric == "tokens/s" else ok
        filled = rows[col].notna().mean() if col in rows and len(rows) else 0.0
        cover[metric] = f"filled in {filled:.0%} of successful requests that streamed a token"
        if filled < 1.0:
            gaps.append(metric)
    q = ok["queue_est_ms"].dropna()
    many = ok[ok["load_clients"] > 1] if "load_clients" in ok else ok.iloc[0:0]
    qtxt = (f"; estimated queue time at the server, median over requests with more than one client: "
            f"{many['queue_est_ms'].median():.0f} ms" if len(many) and many["queue_est_ms"].notna().any() else "")
    if gaps:
        return not_testable("P1", f"served rows leave {', '.join(gaps)} empty", evidence=evidence, coverage=cover)
    return Verdict(claim="P1", verdict=SUPPORTED, metric="coverage of the guide's metrics at the server",
                   summary=("On the served profiles (llama-cpp-python's server over HTTP): tokens/s, TTFT, server "
                            "memory (peak RSS per load level) and queue time (TTFT beyond the one-client TTFT) are "
                            f"recorded for every successful request ({len(ok)}){qtxt}; GPU counters are left to the "
                            "in-process studies."), evidence=list(evidence), details={"coverage": cover,
                                                                                        "n_queue": int(len(q))})


def _throughput_samples(g: pd.DataFrame, clients: int, complete_only: bool) -> list[float]:
    """Per-request throughput contributions by Little's law: clients / e2e (s); a truncated answer counts 0 where
    only complete answers count."""
    out = []
    for r in g.to_dict("records"):
        if r.get("status") != "ok" or not r.get("e2e_ms"):
            continue
        done = 0.0 if complete_only and r.get("truncated") else 1.0
        out.append(clients * done / (r["e2e_ms"] / 1e3))
    return out


def r4_served(df: pd.DataFrame, evidence: Sequence[str] = ()) -> Verdict:
    """R4 on the server: complete answers per second at the most clients against one client, with
    interrupt_requests off and on (each its own condition); the truncation the default causes is stated."""
    s = served(df)
    c = s[s["level_part"] == "concurrency"] if len(s) else s
    if not len(c):
        return not_testable("R4", "no concurrency levels were served", evidence=evidence)
    conds, trunc = {}, {}
    for interrupt in (False, True):
        g = c[c["interrupt_requests"] == interrupt]
        if not len(g):
            continue
        counts = sorted(int(x) for x in g["load_clients"].unique())
        if len(counts) < 2 or counts[0] != 1:
            continue
        hi = counts[-1]
        one = _throughput_samples(g[g["load_clients"] == 1], 1, True)
        many = _throughput_samples(g[g["load_clients"] == hi], hi, True)
        name = f"interrupt_requests={'on (the default)' if interrupt else 'off'}"
        v = compare("R4", many, one, higher_is_better=True, claimed="better",
                    metric=f"complete answers/s at {hi} clients / 1 client (served, Little's law per request)",
                    hint="requests_per_client")
        conds[name] = v
        for k in counts:
            gk = g[(g["load_clients"] == k) & (g["status"] == "ok")]
            trunc[f"{name}, {k} client(s)"] = (int(gk["truncated"].astype(bool).sum()), int(len(gk)))
    if not conds:
        return not_testable("R4", "served concurrency levels need 1 and more clients", evidence=evidence)
    v = combine("R4", conds, "interrupt_requests", evidence=evidence,
                headline=next((n for n in conds if "off" in n), None))
    words = "; ".join(f"{k}: {t} of {n} answers truncated" for k, (t, n) in trunc.items() if n)
    v.summary = ("On llama-cpp-python's server over HTTP: " + v.summary + f" Truncation: {words}.")
    v.details = {**(v.details or {}), "truncation": {k: {"truncated": t, "answers": n} for k, (t, n) in trunc.items()}}
    return v


def served_verdicts(df: pd.DataFrame, evidence: Sequence[str] = ()) -> list[Verdict]:
    return [x1_served(df, evidence), x2_served(df, evidence), p1_served(df, evidence), r4_served(df, evidence)]


# ---- figure -----------------------------------------------------------------------------------------------------
def plot_served(df: pd.DataFrame, levels: pd.DataFrame, profiles: Sequence[str]):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    sbs = side_by_side(df, profiles)
    ax = axes[0]
    if len(sbs) and sbs["served_ttft_ms"].notna().any():
        x = range(len(sbs))
        ax.bar([i - 0.2 for i in x], sbs["in_process_ttft_ms"].fillna(0), width=0.4, label="in-process")
        ax.bar([i + 0.2 for i in x], sbs["served_ttft_ms"].fillna(0), width=0.4, label="served (HTTP)")
        ax.set_xticks(list(x), sbs["profile"], rotation=30, ha="right")
        ax.set_ylabel("median TTFT (ms)")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no profile served and in-process", ha="center", transform=ax.transAxes)
    ax.set_title("TTFT per profile: served vs in-process")
    ax = axes[1]
    c = levels[levels["part"] == "concurrency"] if len(levels) else levels
    if len(c):
        for interrupt, g in c.groupby("interrupt_requests"):
            cl = [int(x.split("=")[1]) for x in g["load"]]
            ax.plot(cl, g["throughput_rps"], marker="o",
                    label=f"interrupt_requests={'on' if interrupt else 'off'}: complete answers/s")
            ax.plot(cl, g["truncation_rate"].fillna(0), ls=":", marker="x",
                    label=f"interrupt_requests={'on' if interrupt else 'off'}: share truncated")
        ax.set_xlabel("concurrent clients")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no concurrency levels", ha="center", transform=ax.transAxes)
    ax.set_title("Concurrent clients (R4)")
    ax = axes[2]
    r = levels[levels["part"] == "rate"].sort_values("offered_rps") if len(levels) else levels
    if len(r):
        ax.plot(r["offered_rps"], r["throughput_rps"], marker="o", label="achieved (complete answers/s)")
        lim = [0, float(r["offered_rps"].max()) * 1.1]
        ax.plot(lim, lim, color="grey", ls="--", lw=0.8, label="achieved = offered")
        ax.set_xlabel("offered Poisson rate (requests/s)")
        ax.set_ylabel("requests/s")
        ax2 = ax.twinx()
        ax2.plot(r["offered_rps"], r["ttft_p50_ms"], color="C3", marker="s", label="p50 TTFT (ms)")
        ax2.set_ylabel("p50 TTFT (ms)", color="C3")
        ax.legend(fontsize=7, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no rate levels", ha="center", transform=ax.transAxes)
    ax.set_title("Rate sweep: where the server saturates")
    fig.tight_layout()
    return fig


# ---- what the notebook shows and the report reads -------------------------------------------------------------


@dataclass
class ServedSummary:
    side_by_side: pd.DataFrame
    levels: pd.DataFrame
    knee: dict
    mu_rps: float | None
    notes: list[str]

    def text(self) -> str:
        k = self.knee
        words = [f"service rate (1 / mean e2e, one client): {self.mu_rps} requests/s" if self.mu_rps else
                 "no service rate measured",
                 f"knee: the server kept up with {k['knee_rps']} requests/s" if k.get("knee_rps") else
                 f"knee: not found ({k.get('why')})"]
        if k.get("saturated_from_rps"):
            words.append(f"saturated at {k['saturated_from_rps']} requests/s offered")
        return "; ".join(words) + "".join(f"\n{n}" for n in self.notes)


def summarize(res: ServedResult, study: ServedStudy) -> ServedSummary:
    """The served-vs-in-process table, the level table and the knee; written beside the rows for the report."""
    sbs = side_by_side(res.rows, list(res.profiles))
    levels = level_table(res.rows, study.slo_ttft_ms, study.slo_tpot_ms)
    k = knee(levels) if len(levels) else {"knee_rps": None, "saturated_from_rps": None, "why": "no levels ran"}
    out = study.out_path
    sbs.to_csv(out / SERVED_SIDE_BY_SIDE_FILE, index=False)
    levels.to_csv(out / SERVED_LEVELS_FILE, index=False)
    (out / SERVED_SUMMARY_FILE).write_text(json.dumps({"knee": k, "mu_rps": res.mu_rps, "notes": res.notes,
                                                "slo_ttft_ms": study.slo_ttft_ms, "slo_tpot_ms": study.slo_tpot_ms},
                                               indent=2, default=str))
    return ServedSummary(sbs, levels, k, res.mu_rps, list(res.notes))


# ---- `python -m kit serve-check`: llama-server and llama-cpp-python's server, the same load ------------------
COLUMNS = ["server", "part", "load", "interrupt_requests", "requests", "errors", "truncated", "ttft_p50_ms",
           "ttft_p50_ci", "itl_p50_ms", "e2e_p50_ms", "throughput_rps", "server_rss_peak_mb", "client_cpu_share"]


def serve_check(profile: str = "speed", model: str = DEFAULT_MODEL, out_dir: str = "outputs/serve-check",
                n_questions: int = 2, repetitions: int = 5, concurrency: tuple[int, ...] = (1, 2, 4),
                requests_per_client: int = 3, max_tokens: int = 32, log=print) -> pd.DataFrame:
    out = resolve(out_dir)
    common = dict(model=model, n_questions=n_questions, max_tokens=max_tokens, repetitions=repetitions,
                  concurrency=list(concurrency), requests_per_client=requests_per_client, rhos=[])
    exe = build_llama_tool("llama-server", log=log)
    settings = load_guide_profile(profile, model)[0]
    port = free_port()
    cmd, notes = llama_server_command(settings, exe=str(exe), port=port)
    log(f"llama-server: {' '.join(cmd)}")
    base = f"http://127.0.0.1:{port}/v1"
    with CommandServer(cmd, base, out / "llama-server.log") as ep:
        study = ServedStudy(endpoint=base, endpoint_profile=profile, guide_profiles=[], baseline=False,
                            out_dir=str(out / "llama-server"), **common)
        a = run_served_study(study, progress=False, endpoint=ep)
    study = ServedStudy(guide_profiles=[profile], baseline=False, kit_profiles_dir=str(out / "none"),
                        concurrency_profile=f"guide_{profile}", out_dir=str(out / "llama-cpp-python"), **common)
    b = run_served_study(study, progress=False)
    la, lb = level_table(a.rows, 3000, 100), level_table(b.rows, 3000, 100)
    la.insert(0, "server", "llama-server"), lb.insert(0, "server", "llama-cpp-python")
    both = pd.concat([lb, la], ignore_index=True)
    both = both[[c for c in COLUMNS if c in both]]
    both.to_csv(out / "serve_check.csv", index=False)
    # the client against the server's own clock (llama-server times every request): ITL vs predicted_per_token_ms,
    # TTFT vs prompt_ms (the client's TTFT adds HTTP, queueing and the first token's decode)
    s = a.rows[(a.rows.get("part") == "served") & (a.rows.get("status") == "ok")] if len(a.rows) else a.rows
    if len(s) and "server_timing_predicted_per_token_ms" in s:
        one = s[s["load_clients"] == 1]
        itl = [x for xs in one["samples_itl_ms"] for x in (xs or [])]
        c_itl, s_itl = statistics.median(itl), float(one["server_timing_predicted_per_token_ms"].median())
        c_ttft, s_pp = float(one["ttft_ms"].median()), float(one["server_timing_prompt_ms"].median())
        log(f"one client on llama-server: client ITL median {c_itl:.2f} ms vs the server's predicted_per_token_ms "
            f"median {s_itl:.2f} ms (x{c_itl / s_itl:.3f}); client TTFT median {c_ttft:.1f} ms vs the server's "
            f"prompt_ms median {s_pp:.1f} ms (x{c_ttft / s_pp:.3f})")
    metrics = [c for c in a.rows.columns if c.startswith("server_metric_")] if len(a.rows) else []
    log(f"llama-server /metrics columns kept in the rows: {', '.join(metrics) or 'none'}")
    return both


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kit serve-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="speed", help="the guide profile both servers run (default speed)")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL)
    p.add_argument("--out", default="outputs/serve-check")
    p.add_argument("--repetitions", type=int, default=5)
    a = p.parse_args(argv)
    df = serve_check(a.profile, a.model, a.out, repetitions=a.repetitions, log=lambda s: print(s, file=sys.stderr))
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(df.to_string(index=False))
    return 0
