"""Notebook 85, auto-tune and profiles (claims X1-X4 of data/claims.md): the guide's `benchmark_settings()` and
`find_optimal_gpu_layers()` implemented for real, the guide's `.env` profiles measured as written, and the
kit's own three derived from the tuner's winner.

- study.py     `AutotuneStudy` (every parameter, its default and help) and `run_autotune_study`, the one call
               notebook 85 makes;
- tuner.py     the constrained tuner `benchmark_settings` (screen one axis at a time, decide each nominated change
               by compare under X3's band, confirm) under a memory limit and a quality floor, with every refusal
               recorded; `x4_limits` and `constrained_run`, the tuner under limits that bind (X4);
- profiles.py  the guide's profiles, the RAG-shaped request test (prompts from kit.studies.rag.pipeline),
               measuring profiles, deriving and writing the kit's `.env` profiles with their headers;
- retrieval.py search time and recall@k at two k values, through the RAG pipeline (X2's cost of a smaller k);
- verdicts.py  X1-X4 through kit.verdicts;
- figures.py   the notebook's figure.
"""
from kit.studies.autotune.figures import plot_profiles
from kit.studies.autotune.profiles import (
    GUIDE_PROFILE_NAMES, choose_kit_profiles, load_guide_profile, load_guide_profiles, measure_profiles,
    measured_engine_rows, profile_header, profile_table, rag_floor_from_study, rag_request, rag_request_test,
    request_inputs, tuner_header, write_kit_profiles, write_profile,
)
from kit.studies.autotune.retrieval import from_rag_study, recall_cost, retrieval_cost
from kit.studies.autotune.study import AutotuneResult, AutotuneStudy, run_autotune_study
from kit.studies.autotune.tuner import (
    Candidate, Constraints, SearchSpace, TuneResult, Workload, beats, benchmark_settings, constrained_run,
    guide_baseline, llama_defaults, x4_limits, x4_start,
)
from kit.studies.autotune.verdicts import (
    against_claim, autotune_verdicts, memory_condition, quality_condition, x1_verdict, x2_ratio_table, x2_verdict,
    x3_verdict, x4_verdict,
)

__all__ = [
    "AutotuneResult", "AutotuneStudy", "Candidate", "Constraints", "GUIDE_PROFILE_NAMES", "SearchSpace",
    "TuneResult", "Workload", "against_claim", "autotune_verdicts", "beats", "benchmark_settings",
    "choose_kit_profiles", "constrained_run", "from_rag_study", "guide_baseline", "llama_defaults",
    "load_guide_profile", "load_guide_profiles", "measure_profiles", "measured_engine_rows", "memory_condition",
    "plot_profiles", "profile_header", "profile_table", "quality_condition", "rag_floor_from_study", "rag_request",
    "rag_request_test", "recall_cost", "request_inputs", "retrieval_cost", "run_autotune_study", "tuner_header",
    "write_kit_profiles", "write_profile", "x1_verdict", "x2_ratio_table", "x2_verdict", "x3_verdict", "x4_limits",
    "x4_start", "x4_verdict",
]
