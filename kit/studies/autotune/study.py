"""Notebook 85's study: its config (`AutotuneStudy`, every parameter with its default and help) and the one run
function the notebook calls (`run_autotune_study`): the tuner, the tuner again under limits that bind (X4), then
the guide's and the kit's profiles, and retrieval at the two profiles' k (X2)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kit.config import KV_CACHE_TYPES, Settings, StudyConfig, param
from kit.measure import Test
from kit.paths import DEFAULT_MODEL, resolve
from kit.studies.autotune.profiles import (
    GUIDE_PROFILE_NAMES, choose_kit_profiles, guide_profile_table, load_guide_profiles, measure_profiles,
    profile_table, rag_floor_from_study, rag_request, write_kit_profiles,
)
from kit.studies.autotune.retrieval import from_rag_study, retrieval_cost
from kit.studies.autotune.tuner import (
    Constraints, SearchSpace, TuneResult, Workload, benchmark_settings, constrained_run, describe, x4_limits,
)

PROFILES_CSV = "profiles.csv"
X4_FILE = "autotune_x4.json"
RETRIEVAL_FILE = "retrieval.json"


def default_threads() -> list[int]:
    """The thread counts screened when none are given: half the CPUs and all of them."""
    cpu = os.cpu_count() or 1
    return sorted({max(cpu // 2, 1), cpu})


@dataclass
class AutotuneStudy(StudyConfig):
    """Notebook 85: the constrained tuner (X3, X4) and the guide's and the kit's profiles (X1, X2)."""

    model: str = param(DEFAULT_MODEL, "bundled name or a path to any GGUF")
    repetitions: int = param(5, "timed runs per configuration when confirming (after a warm-up)", ge=1)
    screen_repetitions: int = param(1, "timed runs per configuration when screening", ge=1)
    out_dir: str = param("outputs/85_autotune", "rows, figures, verdicts, autotune.json (relative: to the repo root)")
    profiles_dir: str = param("outputs/profiles", "where the kit's own speed/balanced/quality .env files go")
    n_prompt: int = param(256, "prompt tokens of the modelled request (pp test; tg runs at this depth)", ge=1)
    n_gen: int = param(128, "generated tokens of the modelled request (tg test; llama-bench's default -n 128)",
                       ge=1)
    n_gpu_layers: list[int] = param([0], "GPU layer counts screened against the largest that fits (what "
                                    "find_optimal_gpu_layers found; GPU builds only, counts above it are skipped)",
                                    ge=0)
    threads: list[int] = param([], "thread counts (n_threads and n_threads_batch alike); empty: cpu_count/2 and "
                               "cpu_count", ge=1)
    n_batch: list[int] = param([512, 1024], "n_batch values screened", ge=1)
    n_ubatch: list[int] = param([128, 512], "n_ubatch values screened (at most n_batch)", ge=1)
    flash_attn: list[bool] = param([False, True], "flash attention off / on")
    kv_type: list[str] = param(["f16", "q8_0", "q4_0"], "KV cache type for K and V together (quantized turns "
                               "flash_attn on)", choices=KV_CACHE_TYPES)
    rope_freq_base: list[float] = param([10000.0], "RoPE base overrides screened (the guide's 10000; the start keeps "
                                        "the model's own): quality-changing, so the floor judges them", gt=0)
    n_ctx: list[int] = param([2048, 8192], "context sizes screened (must hold n_prompt + n_gen)", ge=1)
    ram_limit_mb: float = param(0.0, "peak RSS limit per trial in MB; 0 means no limit", ge=0)
    vram_limit_mb: float = param(0.0, "VRAM limit in MB on GPU builds; 0 means free VRAM minus a margin", ge=0)
    max_ppl_ratio: float = param(1.02, "quality floor: perplexity at most this x the f16 reference", ge=1)
    balanced_ppl_ratio: float = param(1.01, "the balanced profile's tighter floor", ge=1)
    ppl_chunks: int = param(3, "perplexity chunks per quality-changing candidate (paired)", ge=1)
    ppl_chunk_tokens: int = param(256, "tokens per perplexity chunk", ge=16)
    confirm_top: int = param(1, "screened configurations confirmed with full repetitions", ge=0)
    confirm_looks: int = param(3, "confirmation blocks of `repetitions` at most while a contender against the start "
                                  "is inconclusive (1: none added); every comparison at confidence 1 - 0.05/looks",
                               ge=1, le=10)
    confirm_max_s: float = param(120.0, "seconds of added confirmation blocks at most", ge=0)
    min_gain: float = param(0.05, "a screened value is measured again against the current one (full repetitions, "
                            "interleaved) only if it was faster by more than this fraction (X3's band); it is taken "
                            "only if compare labels it supported", ge=0)
    profile_repetitions: int = param(5, "passes over the questions per profile (request-level)", ge=1)
    request_questions: int = param(1, "RAG questions per pass (data/rag_questions.jsonl, dev split)", ge=1)
    request_max_tokens: int = param(32, "answer cap for every profile's requests (the guide's profiles set none)",
                                    ge=1)
    chunk_chars: int = param(400, "characters per RAG chunk (the RAG pipeline's chunking, which overlaps "
                             "neighbours by 100 characters)", gt=100)
    min_recall: float = param(0.9, "recall floor for rag_search_k, where outputs/60_rag exists", ge=0, le=1)
    corpus_topics: list[str] = param([], "document ids the RAG requests and the recall of k use; empty: the whole "
                                     "corpus")
    retrieval_questions: int = param(12, "questions timed for RAG search time at each k (X2), where the RAG "
                                     "study's rows do not hold both k values", ge=1)
    retrieval_repetitions: int = param(3, "timed searches per question and k (X2), likewise", ge=1)

    # ---- what the tuner and the profiles take -----------------------------------------------------------------
    @property
    def study_name(self) -> str:
        return self.out_path.name

    @property
    def out_root(self) -> Path:
        """The outputs root this study's folder sits in (the RAG and quantization studies sit beside it)."""
        return self.out_path.parent

    @property
    def profiles_path(self) -> Path:
        return resolve(self.profiles_dir)

    @property
    def cache_dir(self) -> Path:
        """The embedding cache beside this study's folder (the RAG study's, under the same outputs root)."""
        return self.out_root / "cache" / "embeddings"

    def space(self) -> SearchSpace:
        return SearchSpace(threads=list(self.threads) or default_threads(), n_batch=list(self.n_batch),
                           n_ubatch=list(self.n_ubatch), flash_attn=list(self.flash_attn),
                           kv_type=list(self.kv_type), n_ctx=list(self.n_ctx),
                           rope_freq_base=[float(x) for x in self.rope_freq_base],
                           n_gpu_layers=[int(x) for x in self.n_gpu_layers])

    def constraints(self) -> Constraints:
        """The limits, with the parameters' 0 ("no limit" / "free VRAM minus a margin") as None."""
        return Constraints(ram_limit_mb=self.ram_limit_mb or None, vram_limit_mb=self.vram_limit_mb or None,
                           max_ppl_ratio=self.max_ppl_ratio)

    def workload(self) -> Workload:
        return Workload(n_prompt=self.n_prompt, n_gen=self.n_gen, ppl_chunks=self.ppl_chunks,
                        ppl_chunk_tokens=self.ppl_chunk_tokens)

    def request(self) -> Test:
        return rag_request(max_tokens=self.request_max_tokens, n_questions=self.request_questions,
                           chunk_chars=self.chunk_chars, corpus_topics=self.corpus_topics)

    def tuner_kwargs(self) -> dict:
        """benchmark_settings' arguments from this config."""
        return {"model": self.model, "study": self.study_name, "out_root": self.out_root, "space": self.space(),
                "constraints": self.constraints(), "workload": self.workload(),
                "screen_repetitions": self.screen_repetitions, "repetitions": self.repetitions,
                "confirm_top": self.confirm_top, "min_gain": self.min_gain, "confirm_looks": self.confirm_looks,
                "confirm_max_s": self.confirm_max_s}


@dataclass
class AutotuneResult:
    """Everything one run of the study produced; the verdicts and the figure read it."""

    study: AutotuneStudy
    guide: dict            # name -> the guide's profile as written (Settings)
    guide_notes: dict      # name -> what this build does with it
    tune: TuneResult
    x4: TuneResult | None  # the tuner again under limits that bind (None where none can)
    x4_limits: dict        # those limits and how each was derived (tuner.x4_limits)
    retrieval: dict | None  # search time and recall@k at the baseline's and the speed profile's k
    rag_floor: dict | None
    kit_profiles: dict     # name -> Settings
    why: dict              # name -> the reasons for each kit profile
    measured: dict         # "baseline", "guide_<name>", "kit_<name>" -> rows by test (measure_profiles)
    written: dict          # name -> path of the kit's .env file
    profiles: pd.DataFrame
    profiles_csv: Path

    def guide_table(self):
        return guide_profile_table({n: (self.guide[n], self.guide_notes[n]) for n in self.guide})

    def steps_table(self):
        return pd.DataFrame(self.tune.steps, columns=["axis", "from", "to", "changed", "why"])

    def decision_table(self):
        """Each value the screening nominated, measured again against the current one: the ratio and the label."""
        return self.tune.decision_table()

    def confirmed_table(self):
        cols = ["label", "status", "score_s", "pp_ts", "tg_ts", "rss_peak_mb", "ppl", "ppl_ratio"]
        return self.tune.table("confirmed")[cols]

    def refusal_table(self, run: TuneResult | None = None):
        df = (run or self.tune).refusal_table()
        return df[["axis", "change", "reason", "faster", "speedup", "detail"]] if len(df) else df

    def x4_table(self):
        """The constrained run (X4): its limits, then what it refused."""
        return self.refusal_table(self.x4) if self.x4 is not None else pd.DataFrame()

    def summary(self) -> str:
        """Markdown: the baseline's notes, what find_optimal_gpu_layers said, the refusals and the files written."""
        t, lim = self.tune, self.x4_limits
        x4 = (f"**X4 run** (from the largest measured configuration, under a memory limit of {lim.get('ram_limit_mb')} MB: "
              f"{lim.get('ram_why')}; quality floor {lim.get('max_ppl_ratio')}: {lim.get('ppl_why')}): "
              + (f"chose `{describe(self.x4.best)}`, refused {len(self.x4.refusals)}" if self.x4 is not None
                 else "not run"))
        return "\n\n".join([
            "**Baseline (the guide's good settings) on this build:** " + "; ".join(t.start_notes or ["as written"]),
            f"**find_optimal_gpu_layers:** {t.gpu_layers['reason']} (n_gpu_layers = {t.best.n_gpu_layers})",
            f"**Winner:** `{describe(t.best)}`: {t.why_best}",
            f"**Refused ({len(t.refusals)}):** see the table below" if t.refusals else "**The tuner refused nothing.**",
            x4,
            "**Written:** " + ", ".join(f"`{p}`" for p in self.written.values()),
        ])


def profiles_to_measure(tune: TuneResult, guide: dict[str, Settings], kit: dict[str, Settings]) -> dict[str, Settings]:
    """The baseline, the guide's profiles as written and the kit's own, under the names the verdicts read."""
    return {"baseline": tune.start, **{f"guide_{n}": guide[n] for n in GUIDE_PROFILE_NAMES},
            **{f"kit_{n}": s for n, s in kit.items()}}


def run_x4(study: AutotuneStudy, tune: TuneResult, progress: bool = True) -> tuple[TuneResult | None, dict]:
    """The tuner again from the largest measured configuration (tuner.x4_start) under limits derived from what the first run measured (x4_limits), over
    the axes that move memory and quality; None where neither limit can bind. Saved as autotune_x4.json."""
    limits = x4_limits(tune, study.max_ppl_ratio)
    if limits["ram_limit_mb"] is None and limits["max_ppl_ratio"] is None:
        return None, limits
    run = constrained_run(tune, limits, model=study.model, study=study.study_name, out_root=study.out_root,
                          space=study.space(), screen_repetitions=study.screen_repetitions,
                          repetitions=study.repetitions, min_gain=study.min_gain, progress=progress)
    run.save(study.out_path / X4_FILE)
    return run, limits


def run_retrieval(study: AutotuneStudy, ks: list[int]) -> dict:
    """Search time and recall@k at the given k values (retrieval.json): the RAG study's rows where they hold both
    k values (nothing measured again), else measured here with the requests' chunking."""
    cost = from_rag_study(study.out_root, ks) or retrieval_cost(
        ks, chunk_chars=study.chunk_chars, cache_dir=study.cache_dir, corpus_topics=study.corpus_topics,
        repetitions=study.retrieval_repetitions, n_timed=study.retrieval_questions)
    path = study.out_path / RETRIEVAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cost, indent=2, default=str))
    return cost


def run_autotune_study(study: AutotuneStudy, progress: bool = True) -> AutotuneResult:
    """The tuner (autotune.json), the tuner again under limits that bind (autotune_x4.json), then the profiles:
    the guide's as written, the kit's derived from the winner and written as .env files, every one measured
    (profiles.csv); then retrieval at the baseline's and the speed profile's k (retrieval.json)."""
    guide = load_guide_profiles(study.model)
    settings = {n: s for n, (s, _) in guide.items()}
    tune = benchmark_settings(**study.tuner_kwargs(), progress=progress)
    tune.save()
    x4, limits = run_x4(study, tune, progress)
    rag_floor = rag_floor_from_study(study.out_root, study.min_recall)
    kit, why = choose_kit_profiles(tune, settings, rag_floor, balanced_ppl_ratio=study.balanced_ppl_ratio)
    measured = measure_profiles(profiles_to_measure(tune, settings, kit), study=study.study_name,
                                out_root=study.out_root, repetitions=study.profile_repetitions,
                                workload=study.workload(), request=study.request(), progress=progress)
    written = write_kit_profiles(kit, {n: measured[f"kit_{n}"] for n in kit}, tune, why, study.profiles_path)
    retrieval = run_retrieval(study, [tune.start.rag_search_k, kit["speed"].rag_search_k])
    table = profile_table(measured)
    csv = study.out_path / PROFILES_CSV
    csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv, index=False)
    return AutotuneResult(study=study, guide=settings, guide_notes={n: nt for n, (_, nt) in guide.items()},
                          tune=tune, x4=x4, x4_limits=limits, retrieval=retrieval, rag_floor=rag_floor,
                          kit_profiles=kit, why=why, measured=measured, written=written, profiles=table,
                          profiles_csv=csv)
