"""Profiles (claims X1, X2): the guide's `.env.speed|balanced|quality` as written, and the kit's own three.

- `load_guide_profile` reads data/guide_profiles/<name>.env with the guide's LLAMACPP_* names and says what this
  build does with it (GPU layers ignored without offload, n_ubatch clamped like llama.cpp does ...).
- `measure_profiles` measures named configurations: engine pp/tg at the workload and RAG-shaped requests.
- `choose_kit_profiles` derives the kit's speed / balanced / quality from the tuner's winner (no second
  "fastest" pick among candidates the tuner could not tell apart, so the files are as stable as the winner), and
  `write_kit_profiles` writes them as `.env` files whose header holds the measured numbers, the trial keys, the
  changes the tuner took with the comparison that justified each, and the candidates within noise of the winner.

RAG-shaped requests (`rag_request_test`): streamed chat completions whose messages the RAG pipeline builds
(`kit.studies.rag.pipeline.rag_messages`: the RAG study's chunking, packing into the token budget and chat
template), with each profile's own ``rag_search_k`` and ``max_context_length``, for TTFT and tokens/s as a
client sees them. Retrieval is neither run nor timed: the chunks come in an oracle order (the question's gold
topics first, then the rest of the corpus), so every profile gets the same best-case context; retrieval.py times
search and measures what a smaller k costs in recall, and the RAG study's rows (outputs/60_rag) set the kit
profiles' rag_search_k (`rag_floor_from_study`).
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Sequence

import pandas as pd

from kit.config import Settings, SettingsError, read_dotenv
from kit.gpu import build_supports_gpu_offload
from kit.measure import Test, requests_row, stream_chat
from kit.models import model_card
from kit.paths import GUIDE_PROFILES_DIR, resolve
from kit.results import RESULTS_FILE, read_rows
from kit.serve.deploy import write_deploy_files
from kit.studies.rag.pipeline import (
    Chunk, LlamaTokenCounter, Question, chunk_documents, load_corpus, load_questions, rag_messages,
)
from kit.studies.autotune.tuner import (
    TuneResult, Workload, changes_quality, describe, num, ratio_words, request_time_samples, rows_for, settings_key,
    with_reference_quality,
)
from kit.sweep import run_sweep, study_dir

GUIDE_PROFILE_NAMES = ("speed", "balanced", "quality")
RAG_STUDY = "60_rag"   # the RAG study's folder beside this one (its retrieval and latency rows)
REQUEST_KIND = "kit.studies.autotune.profiles:rag_request_test"
# what a profile takes from the guide's profile of the same name: request, RAG and service settings
REQUEST_FIELDS = ("temperature", "top_p", "top_k", "repeat_penalty", "max_tokens", "rag_search_k",
                  "max_context_length", "enable_embedding_cache", "concurrent_rag_queries", "log_level")
PROMPT_ROOM = 96   # tokens the question, the template and the system prompt need beside the context


# ---- the guide's profiles ----------------------------------------------------------------------------------------
def load_guide_profile(name: str, model: str,
                       profiles_dir: str | os.PathLike = GUIDE_PROFILES_DIR) -> tuple[Settings, list[str]]:
    """One of the guide's `.env.speed|balanced|quality`, read as written, and what this build does with it."""
    if name not in GUIDE_PROFILE_NAMES:
        raise SettingsError(f"guide profile {name!r}: one of {', '.join(GUIDE_PROFILE_NAMES)}")
    env = read_dotenv(Path(profiles_dir) / f"{name}.env")
    notes = []
    base = Settings(model=model)
    n_batch = env.get("LLAMACPP_N_BATCH")
    if "LLAMACPP_N_UBATCH" not in env and n_batch and n_batch.strip().isdigit() and int(n_batch) < base.n_ubatch:
        # as written, llama.cpp clamps n_ubatch (default 512) to n_batch: do the same, and say so
        base = base.replace(n_ubatch=int(n_batch))
        notes.append(f"n_batch={n_batch} without n_ubatch: n_ubatch 512 -> {n_batch}, as llama.cpp clamps it")
    s = Settings.from_env(env, base=base)
    card = model_card(model)
    if s.n_gpu_layers and not build_supports_gpu_offload():
        notes.append(f"n_gpu_layers={s.n_gpu_layers} accepted and ignored: this build has no GPU offload")
    elif s.n_gpu_layers > card.n_layers:
        notes.append(f"n_gpu_layers={s.n_gpu_layers} > the model's {card.n_layers} layers: all layers offloaded")
    if card.n_ctx_train and s.n_ctx > card.n_ctx_train:
        notes.append(f"n_ctx={s.n_ctx} exceeds the model's n_ctx_train={card.n_ctx_train}")
    if "LLAMACPP_LOG_LEVEL" in env:
        notes.append("LLAMACPP_LOG_LEVEL is a server setting: accepted, no effect on llama.cpp")
    return s, notes


def load_guide_profiles(model: str) -> dict[str, tuple[Settings, list[str]]]:
    """All three guide profiles: name -> (settings, notes)."""
    return {name: load_guide_profile(name, model) for name in GUIDE_PROFILE_NAMES}


def guide_profile_table(guide: dict[str, tuple[Settings, list[str]]]):
    """One row per guide profile: the LLAMACPP_* values that differ from llama.cpp's defaults, and the notes."""
    return pd.DataFrame([{"profile": n, **s.to_env(only_changed=True), "notes": "; ".join(nt)}
                         for n, (s, nt) in guide.items()])


# ---- the RAG-shaped request (a kit.sweep test kind, run in a trial's child process) ------------------------------
def gold_first(question: Question, chunks: Sequence[Chunk]) -> list[Chunk]:
    """The chunks in an oracle retrieval order: the question's gold topics first, then the rest of the corpus."""
    gold = set(question.topics)
    return [c for c in chunks if c.doc_id in gold] + [c for c in chunks if c.doc_id not in gold]


def rag_request_test(lm, test: Test, repetitions: int) -> dict:
    """Streamed chat completions of RAG-shaped prompts sized by the configuration's rag_search_k and
    max_context_length (see the module docstring): TTFT and generated tokens/s as a client sees them."""
    s, p = lm.settings, test.params
    max_tokens = int(test.n_gen or 32)
    chunks, questions = request_inputs(int(p["chunk_chars"]), p.get("corpus_topics") or None)
    questions = questions[:int(p["n_questions"])]
    room = lm.effective["n_ctx_effective"] - max_tokens - PROMPT_ROOM
    budget = max(min(s.max_context_length, room), 0)
    counter = LlamaTokenCounter(llm=lm.llm)
    built = [rag_messages(q, gold_first(q, chunks), s.rag_search_k, budget, counter) for q in questions]
    stream_chat(lm, built[0][0], max_tokens=2)  # warm-up
    reqs = [stream_chat(lm, messages, max_tokens=max_tokens) for _ in range(repetitions) for messages, _ in built]
    info = [i for _, i in built]
    return {
        "n_gen": max_tokens, "n_depth": 0, "repetitions": repetitions, **requests_row(reqs),
        "rag_context_tokens": round(statistics.fmean(i["context_tokens"] for i in info)),
        "rag_chunks_in_context": round(statistics.fmean(i["n_in_context"] for i in info), 2),
        "rag_context_cut_by_n_ctx": any(i["context_cut"] for i in info) and room < s.max_context_length,
        "rag_search_k_used": s.rag_search_k, "max_context_length_used": s.max_context_length,
        "timed_region": "streamed create_chat_completion of a RAG-shaped prompt (kit.studies.rag.pipeline: "
                        "rag_search_k chunks within max_context_length tokens) to its last chunk; retrieval "
                        "excluded; prompt cache reset per request",
    }


def request_inputs(chunk_chars: int, corpus_topics: Sequence[str] | None = None,
                   split: str = "dev") -> tuple[list[Chunk], list[Question]]:
    """The chunks every RAG-shaped request and the recall of k are built from (the RAG pipeline's chunking,
    neighbours overlapping by its default 100 characters), and the questions whose gold topic is among them."""
    docs = load_corpus(topics=list(corpus_topics) if corpus_topics else None)
    chunks = chunk_documents(docs, chunk_chars)
    questions = load_questions(split=split, doc_ids={c.doc_id for c in chunks} if corpus_topics else None)
    if not questions:
        raise ValueError(f"no {split} question has a gold topic among corpus_topics={list(corpus_topics or [])}")
    return chunks, questions


def rag_request(*, max_tokens: int, n_questions: int, chunk_chars: int,
                corpus_topics: Sequence[str] = ()) -> Test:
    params = {"n_questions": n_questions, "chunk_chars": chunk_chars}
    if corpus_topics:
        params["corpus_topics"] = list(corpus_topics)
    return Test(REQUEST_KIND, n_gen=max_tokens, params=params)


# ---- measuring profiles --------------------------------------------------------------------------------------------
def measure_profiles(profiles: dict[str, Settings], *, study: str, out_root: str | os.PathLike, repetitions: int,
                     workload: Workload, request: Test, progress: bool = True) -> dict[str, dict]:
    """Measure named configurations (e.g. the guide's three profiles) as written: engine pp/tg at the workload
    and RAG-shaped requests sized by each profile's own RAG settings. Returns name -> rows by test.

    Engine pp/tg decode random tokens without sampling, so profiles that differ only in request, RAG or service
    settings (say, temperature) share one engine measurement: the first such profile's rows (`engine_from`). Where
    the study already holds successful engine rows for the same model and load settings with at least
    `repetitions` runs (the tuner's confirm stage), those are used instead of measuring again. A relative
    out_root is taken from the repository root.
    """
    out_root = resolve(out_root)
    speed = workload.speed_tests()
    engine_from: dict[str, str] = {}
    first: dict[str, str] = {}
    for name, s in profiles.items():
        engine_from[name] = first.setdefault(_engine_key(s), name)
    leaders = list(dict.fromkeys(engine_from.values()))
    rows = read_rows(study_dir(study, out_root) / RESULTS_FILE)  # once, for every leader
    earlier = {n: measured_engine_rows(study, out_root, profiles[n], speed, repetitions, rows) for n in leaders}
    todo = [profiles[n] for n in leaders if earlier[n] is None]
    if todo:
        run_sweep(study, todo, speed, repetitions=repetitions, out_root=out_root, progress=progress,
                  extra={"autotune_stage": "profile"})
    unique = list({settings_key(s): s for s in profiles.values()}.values())
    df = run_sweep(study, unique, [request], repetitions=repetitions, out_root=out_root, progress=progress,
                   extra={"autotune_stage": "profile"})
    out = {}
    for name, s in profiles.items():
        lead = engine_from[name]
        pp_row, tg_row = earlier[lead] or rows_for(df, profiles[lead], speed, repetitions)
        (req_row,) = rows_for(df, s, [request], repetitions)
        out[name] = {"settings": s, "pp": pp_row, "tg": tg_row, "request": req_row, "engine_from": lead,
                     "engine_stage": pp_row.get("autotune_stage"),
                     "samples_request_s": request_time_samples(pp_row, tg_row, workload.n_prompt, workload.n_gen)
                     if pp_row.get("status") == "ok" and tg_row.get("status") == "ok" else []}
    return out


def measured_engine_rows(study: str, out_root: str | os.PathLike, s: Settings, tests: Sequence[Test],
                          min_repetitions: int, rows: list[dict] | None = None) -> list[dict] | None:
    """The study's latest successful rows of these engine tests under the same model and load settings, run with
    at least min_repetitions; None unless every test has one. `rows`: the study's rows if already read."""
    if rows is None:
        rows = read_rows(study_dir(study, out_root) / RESULTS_FILE)
    if not rows:
        return None
    sha = model_card(s.model).sha256
    want = {k: v for k, v in _engine_settings(s).items() if k != "model"}
    found = []
    for t in tests:
        hits = [r for r in rows if r.get("status") == "ok" and r.get("model_sha256") == sha
                and r.get("test_kind") == t.kind and (r.get("n_prompt"), r.get("n_gen"), r.get("n_depth"))
                == (t.n_prompt, t.n_gen, t.n_depth) and (r.get("repetitions") or 0) >= min_repetitions
                and all(r.get(k) == v for k, v in want.items())]
        if not hits:
            return None
        found.append(max(hits, key=lambda r: (r.get("repetitions") or 0, r.get("test_time") or "")))
    return found


def _engine_settings(s: Settings) -> dict:
    """What the engine tests depend on: the model and load settings, not request, RAG or service settings."""
    d = s.to_dict()
    return {k: d[k] for k in Settings.group("model") + Settings.group("load")}


def _engine_key(s: Settings) -> str:
    return json.dumps(_engine_settings(s), sort_keys=True, default=str)


def profile_table(measured: dict[str, dict]):
    """One row per measured profile: the settings that differ between profiles and what they gave."""
    rows = []
    for name, m in measured.items():
        s, req, tgr = m["settings"], m.get("request", {}), m.get("tg", {})
        rows.append({"profile": name, "status": req.get("status"), "n_ctx": s.n_ctx, "n_batch": s.n_batch,
                     "n_ubatch": s.n_ubatch, "threads": s.n_threads, "flash_attn": s.flash_attn,
                     "kv": s.type_k, "temperature": s.temperature, "rag_search_k": s.rag_search_k,
                     "max_context_length": s.max_context_length, "prompt_tokens": req.get("n_prompt"),
                     "ttft_ms": num(req.get("ttft_ms")), "gen_tokens_per_s": num(req.get("median_ts")),
                     "e2e_ms": num(req.get("e2e_ms")), "engine_tg_ts": num(tgr.get("median_ts")),
                     "request_s_model": round(statistics.median(m["samples_request_s"]), 4)
                     if m.get("samples_request_s") else None,
                     "rss_peak_mb": num(req.get("rss_peak_mb")), "engine_from": m.get("engine_from", name),
                     "error": req.get("error")})
    return pd.DataFrame(rows)


# ---- what the RAG study found (outputs/60_rag) -----------------------------------------------------------------------
def rag_part(out_root: str | os.PathLike, part: str):
    """One part of the RAG study's files (<out_root>/60_rag/<part>.jsonl) as a DataFrame; empty when absent."""
    return pd.DataFrame(read_rows(Path(out_root) / RAG_STUDY / f"{part}.jsonl"))


def rag_floor_from_study(out_root: str | os.PathLike, min_recall: float) -> dict | None:
    """The smallest rag_search_k whose mean recall@k (dev questions) meets the floor, from outputs/60_rag.

    Reads the RAG study's retrieval.jsonl (columns k, split, recall_at_k). None where the study has not run.
    """
    df = rag_part(out_root, "retrieval")
    if df.empty or not {"k", "recall_at_k"} <= set(df.columns):
        return None
    if "split" in df:
        df = df[df["split"] == "dev"]
    g = df.dropna(subset=["recall_at_k"]).groupby("k")["recall_at_k"].mean()
    if g.empty:
        return None
    ok = g[g >= min_recall]
    col = "recall@k (dev, outputs/60_rag/retrieval.jsonl)"
    if ok.empty:
        return {"rag_search_k": int(g.idxmax()), "recall": float(g.max()), "column": col, "met": False,
                "min_recall": min_recall}
    k = int(ok.index.min())
    return {"rag_search_k": k, "recall": float(ok.loc[k]), "column": col, "met": True, "min_recall": min_recall}


# ---- choosing, describing and writing the kit's own profiles -----------------------------------------------------
def _pow2_at_least(n: int) -> int:
    p = 512
    while p < n:
        p *= 2
    return p


def _engine_choices(result: TuneResult, balanced_ppl_ratio: float) -> dict[str, Settings]:
    """The engine settings of each kit profile, all from the tuner's winner: speed is the winner; balanced is the
    winner where its perplexity stays within balanced_ppl_ratio of the reference (else the winner with the
    reference's KV cache, model and RoPE); quality is the winner with the reference's. Deterministic given the
    winner: a second pick by speed among candidates the tuner could not tell apart would flip between runs."""
    ref = result.screened[0].settings if result.screened else result.start
    best = result.best
    plain = with_reference_quality(best, ref)
    if not changes_quality(best, ref):
        return {"speed": best, "balanced": best, "quality": best}
    cand = result.candidate_for(best)
    ratio = cand.ppl_ratio if cand is not None else None
    balanced = best if ratio is not None and ratio <= balanced_ppl_ratio else plain
    return {"speed": best, "balanced": balanced, "quality": plain}


def _kit_profile(name: str, eng: Settings, guide: Settings, result: TuneResult, rag_floor: dict | None,
                 answer_tokens: int) -> tuple[Settings, list[str]]:
    """One kit profile: its engine settings, the guide's request settings, the RAG floor's k, an n_ctx that fits."""
    req = {k: getattr(guide, k) for k in REQUEST_FIELDS}
    notes = [f"engine settings: {describe(eng)}" + (" (the tuner's winner)" if eng == result.best else
                                                    " (the tuner's winner with the reference's KV cache, model "
                                                    "and RoPE base)")]
    if rag_floor:
        k = rag_floor["rag_search_k"] if name != "quality" else max(rag_floor["rag_search_k"], guide.rag_search_k)
        req["rag_search_k"] = k
        notes.append(f"rag_search_k={k}: the smallest k with {rag_floor['column']} >= {rag_floor['min_recall']} "
                     f"in outputs/60_rag ({rag_floor['recall']:.3f})" if rag_floor.get("met") else
                     f"rag_search_k={k}: no k met the recall floor; the best recall")
    else:
        notes.append("rag_search_k / max_context_length / temperature: the guide's values for this profile "
                     "(no RAG study results to set a recall floor)")
    s = eng.replace(**req)
    need = _pow2_at_least(s.max_context_length + answer_tokens)
    n_ctx_train = model_card(result.best.model).n_ctx_train or 0
    if n_ctx_train:
        need = min(need, n_ctx_train)
    if s.n_ctx and s.n_ctx < need:
        notes.append(f"n_ctx {s.n_ctx} -> {need}: max_context_length {s.max_context_length} + an answer must fit")
        s = s.replace(n_ctx=need)
    if s.n_batch > s.n_ctx:
        s = s.replace(n_batch=s.n_ctx, n_ubatch=min(s.n_ubatch, s.n_ctx))
    return s, notes


def choose_kit_profiles(result: TuneResult, guide: dict[str, Settings], rag_floor: dict | None = None,
                        balanced_ppl_ratio: float = 1.01, answer_tokens: int = 512) -> tuple[dict[str, Settings], dict]:
    """The kit's speed / balanced / quality from the tuner's winner (`_engine_choices`).

    speed: the winner (under the memory limit and the quality floor, kept at the start unless a change was
    measured beyond the band); balanced: the winner if its perplexity is within ``balanced_ppl_ratio`` of the
    reference, else the winner with the reference's KV cache and model; quality: the winner with the numbers
    untouched (the reference's KV cache, model and RoPE base).
    Request settings (temperature, RAG k and budget) come from the guide's profile of the same name, except
    rag_search_k, which the RAG study's recall floor sets where outputs/60_rag exists. n_ctx is raised where the
    RAG budget plus an answer would not fit. Returns (profiles, why) with a reason per profile.
    """
    engine = _engine_choices(result, balanced_ppl_ratio)
    out, why = {}, {}
    for name, eng in engine.items():
        out[name], why[name] = _kit_profile(name, eng, guide[name], result, rag_floor, answer_tokens)
    return out, why


def _same_engine(a: Settings, b: Settings) -> bool:
    keys = ("model", "n_gpu_layers", "type_k", "type_v", "rope_freq_base")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def profile_header(name: str, measured: dict, source: str, extra: Sequence[str] = ()) -> str:
    """The comment block on top of a written profile: what was measured, and from which trials."""
    req, tgr = measured.get("request", {}), measured.get("tg", {})
    lines = [f"kit profile '{name}' - chosen from measurements on this machine ({source})",
             f"measured (streamed, RAG-shaped request of {_fmt(num(req.get('n_prompt')))} prompt tokens): decode "
             f"{_fmt(_per_s(req.get('decode_ms_per_token')))} tokens/s (1000 / ITL), TTFT "
             f"{_fmt(num(req.get('ttft_ms')))} ms, end-to-end {_fmt(num(req.get('e2e_ms')))} ms "
             f"({_fmt(num(req.get('median_ts')))} tokens/s with TTFT); engine tg {_fmt(num(tgr.get('median_ts')))} t/s",
             f"memory: peak RSS {_fmt(num(req.get('rss_peak_mb')))} MB"
             + (f", VRAM {_fmt(num(req.get('vram_peak_mb')))} MB" if req.get('vram_peak_mb') is not None else ""),
             f"quality: perplexity {_fmt(measured.get('ppl'))} "
             f"(ratio to the f16-KV reference {_fmt(measured.get('ppl_ratio'))})",
             "trials (trial_key): " + ", ".join(k for k in measured.get("trial_keys", []) if k)]
    src, stage = measured.get("engine_from"), measured.get("engine_stage")
    if src and src not in (name, f"kit_{name}"):
        lines.append(f"engine pp/tg: the rows of profile '{src}', which has the same model and load settings "
                     "(the engine tests do not sample)")
    if stage and stage != "profile":
        lines.append(f"engine pp/tg: measured in the tuner's '{stage}' stage with the same model and load settings")
    lines += list(extra)
    return "\n".join(lines)


def tuner_header(result: TuneResult) -> list[str]:
    """The tuner's part of a profile header: the winner and why, each change taken with the comparison that
    justified it, and the candidates within noise of the winner (not told apart from it by the rule)."""
    lines = [f"tuner winner: {describe(result.best)} ({'kept the start point' if result.kept_start else 'moved'}"
             f"; {result.why_best})"]
    taken = [d for d in result.decisions if d["taken"]]
    lines += [f"taken: {d['axis']} {d['change']}: {ratio_words(d)}" for d in taken]
    noise = [d for d in result.decisions if not d["taken"]]
    noise_lines = [f"{d['axis']} {d['change']} vs current: {ratio_words(d)}" for d in noise]
    noise_lines += [f"{w['settings']} ({w['differs']}) vs winner: {ratio_words(w)}" for w in result.within_noise]
    lines.append("within noise of the winner (not taken; the rule keeps the current value unless a difference "
                 "beyond the band is measured): " + ("; ".join(noise_lines) if noise_lines else "none measured"))
    return lines


def _per_s(ms) -> float | None:
    ms = num(ms)
    return round(1000.0 / ms, 2) if ms else None


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def write_profile(path: str | os.PathLike, settings: Settings, header: str) -> Path:
    """A `.env` file in the guide's LLAMACPP_* names; reads back with Settings.from_dotenv."""
    return settings.to_dotenv(path, header=header)


def write_kit_profiles(profiles: dict[str, Settings], measured: dict[str, dict], result: TuneResult,
                       why: dict[str, list], out_dir: str | os.PathLike) -> dict[str, Path]:
    """<out_dir>/{speed,balanced,quality}.env, each with its measured numbers and trial keys on top, and its deploy
    files beside it (`kit.serve.deploy.write_deploy_files`)."""
    by = {settings_key(c.settings): c for c in result.screened + result.confirmed}
    ref = result.screened[0].settings if result.screened else result.start
    paths = {}
    for name, s in profiles.items():
        m = dict(measured.get(name, {}))
        cand = next((c for c in by.values() if _same_engine(c.settings, s) and c.ppl is not None), None)
        m["ppl"] = cand.ppl if cand and cand.ppl is not None else result.reference_ppl
        m["ppl_ratio"] = cand.ppl_ratio if cand and cand.ppl_ratio is not None else (
            1.0 if not changes_quality(s, ref) else None)
        m["trial_keys"] = [m.get(t, {}).get("trial_key") for t in ("pp", "tg", "request")]
        header = profile_header(name, m, "kit.studies.autotune", why.get(name, []) + tuner_header(result))
        paths[name] = write_profile(Path(out_dir) / f"{name}.env", s, header)
        # beside it: llama-cpp-python's server config, a llama-server command line, and .env.<name> (the guide's
        # own file name) (kit.serve.deploy)
        write_deploy_files(paths[name], s)
    return paths
