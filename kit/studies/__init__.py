"""The studies, one module (or small package) per notebook. A study imports only the core (kit.config,
kit.models, kit.measure, kit.sweep, kit.results, kit.verdicts, ...), never another study; the one exception is
kit.studies.rag.pipeline, the RAG prompt pipeline that the autotune profiles' requests use too. The served study
(kit.studies.server, notebook 86) serves the profiles notebook 85 writes, with the same RAG-shaped requests
(kit.studies.autotune and its rag.pipeline); the server process and the HTTP client are core (kit.serve).

STUDIES maps each notebook to its config class ("module:Class"): `kit run` builds every selected notebook's
config from its parameters before anything runs, and a test checks that each notebook's parameters cell
equals its config's defaults. Imported by name, so importing kit.studies loads no study.
"""
from __future__ import annotations

import importlib

STUDIES = {
    "00_environment": "kit.studies.environment_report:EnvironmentStudy",
    "10_gpu_layers": "kit.studies.gpu_layers:GpuLayersStudy",
    "20_batch_flash_attn": "kit.studies.batch_flash_attn:BatchFlashStudy",
    "30_context_kv": "kit.studies.context_kv:ContextStudy",
    "40_threads_system": "kit.studies.threads_system:SystemStudy",
    "50_quantization": "kit.studies.quantization:QuantStudy",
    "60_rag": "kit.studies.rag:RagStudy",
    "70_generation": "kit.studies.generation:GenerationStudy",
    "75_serving_queue": "kit.studies.serving_queue:ServingStudy",
    "80_profiling": "kit.studies.profiling:ProfilingStudy",
    "85_autotune": "kit.studies.autotune:AutotuneStudy",
    "86_server": "kit.studies.server:ServedStudy",
    "90_findings": "kit.studies.findings:FindingsStudy",
}


def study_class(stem: str):
    """The config class (a kit.config.StudyConfig) of notebooks/<stem>.ipynb."""
    if stem not in STUDIES:
        raise KeyError(f"no study is registered for notebook {stem!r}; known: {', '.join(STUDIES)}")
    module, _, name = STUDIES[stem].partition(":")
    return getattr(importlib.import_module(module), name)
