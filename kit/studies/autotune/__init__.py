"""Notebook 85, auto-tune and profiles (claims X1-X4 of data/claims.md): the guide's `benchmark_settings()` and
`find_optimal_gpu_layers()` implemented for real, the guide's `.env` profiles measured as written, and the
kit's own three chosen from measurements.

- study.py     `AutotuneStudy` (every parameter, its default and help) and `run_autotune_study`, the one call
               notebook 85 makes;
- tuner.py     the constrained tuner `benchmark_settings` (screen one axis at a time, confirm the best few)
               under a memory limit and a quality floor, with every refusal recorded;
- profiles.py  the guide's profiles, the RAG-shaped request test (prompts from kit.studies.rag.pipeline),
               measuring profiles, choosing and writing the kit's `.env` profiles with their headers;
- verdicts.py  X1-X4 through kit.verdicts;
- figures.py   the notebook's figure.
"""
from kit.studies.autotune.figures import plot_profiles
from kit.studies.autotune.profiles import (
    GUIDE_PROFILE_NAMES, choose_kit_profiles, load_guide_profile, load_guide_profiles, measure_profiles,
    measured_engine_rows, profile_header, profile_table, rag_floor_from_study, rag_request, rag_request_test,
    rag_search_samples, write_kit_profiles, write_profile,
)
from kit.studies.autotune.study import AutotuneResult, AutotuneStudy, run_autotune_study
from kit.studies.autotune.tuner import (
    Candidate, Constraints, SearchSpace, TuneResult, Workload, benchmark_settings, guide_baseline, llama_defaults,
)
from kit.studies.autotune.verdicts import (
    autotune_verdicts, x1_verdict, x2_ratio_table, x2_verdict, x3_verdict, x4_verdict,
)

__all__ = [
    "AutotuneResult", "AutotuneStudy", "Candidate", "Constraints", "GUIDE_PROFILE_NAMES", "SearchSpace",
    "TuneResult", "Workload", "autotune_verdicts", "benchmark_settings", "choose_kit_profiles", "guide_baseline",
    "llama_defaults", "load_guide_profile", "load_guide_profiles", "measure_profiles", "measured_engine_rows",
    "plot_profiles", "profile_header", "profile_table", "rag_floor_from_study", "rag_request", "rag_request_test",
    "rag_search_samples", "run_autotune_study", "write_kit_profiles", "write_profile", "x1_verdict",
    "x2_ratio_table", "x2_verdict", "x3_verdict", "x4_verdict",
]
