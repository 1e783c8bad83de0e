"""A profile's settings as a deployed server takes them: llama-cpp-python's server config and llama-server's flags.

`server_config(settings, ...)` translates the kit's `Settings` (the guide's `LLAMACPP_*` names) into the JSON
config file `python -m llama_cpp.server --config_file` reads (`ConfigFileSettings`: server keys plus one entry
of `models`), and `translation(settings)` says, name by name, where each setting went: a server config key, a
per-request field the client sends, a client-side RAG step, or nowhere (with why). `llama_server_command` does
the same for llama.cpp's own `llama-server`. `write_deploy_files` puts both beside a profile's `.env`.
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from kit.config import KV_CACHE_TYPES, NUMA_STRATEGIES, Settings
from kit.models import chat_format_for, resolve_model

# kit setting -> llama-cpp-python ModelSettings key (same meaning, same units)
MODEL_KEYS = {
    "n_gpu_layers": "n_gpu_layers", "n_ctx": "n_ctx", "n_batch": "n_batch", "n_ubatch": "n_ubatch",
    "flash_attn": "flash_attn", "type_k": "type_k", "type_v": "type_v", "n_threads": "n_threads",
    "n_threads_batch": "n_threads_batch", "use_mmap": "use_mmap", "use_mlock": "use_mlock", "numa": "numa",
    "rope_freq_base": "rope_freq_base", "chat_format": "chat_format", "seed": "seed",
}
# request-time settings: llama-cpp-python's server has no default for them; the client sends them per request
REQUEST_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                "repeat_penalty": "repeat_penalty", "max_tokens": "max_tokens"}
CLIENT_SIDE = {
    "rag_search_k": "the RAG step before the request (how many chunks the prompt carries); not a server setting",
    "max_context_length": "the RAG step before the request (the context's token budget); not a server setting",
    "enable_embedding_cache": "the RAG service's embedding cache; not a llama.cpp server setting",
    "concurrent_rag_queries": "how many RAG queries the service runs at once: the load's concurrency here",
    "log_level": "the service's log level: no equivalent in the server's config (uvicorn logs at its default)",
}
# llama-cpp-python chat format -> llama-server --chat-template built-in name (the ones that are the same format)
LLAMA_SERVER_TEMPLATES = {"chatml": "chatml", "llama-2": "llama2", "llama-3": "llama3", "gemma": "gemma",
                          "zephyr": "zephyr", "vicuna": "vicuna", "openchat": "openchat", "phind": None}


def server_config(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000, interrupt_requests: bool = True,
                  model_path: str | None = None, model_alias: str = "kit", logits_all: bool = False) -> dict:
    """The JSON config file of `python -m llama_cpp.server --config_file` for one profile (one model).

    logits_all: the server's own default is True (logits for every prompt token, which a chat server never
    reads); `Llama()` in-process defaults to False. False here, so that a profile serves as the kit measured it."""
    s = settings
    m: dict = {"model": model_path or str(resolve_model(s.model)), "model_alias": model_alias, "verbose": True,
               "logits_all": logits_all}
    if s.chat_format is None:  # a GGUF without a template: the format the kit chooses, never the silent llama-2
        s = s.replace(chat_format=chat_format_for(m["model"]).name)
    for k, key in MODEL_KEYS.items():
        v = getattr(s, k)
        if v is None:
            continue  # the server's own default: cpu_count // 2 threads, cpu_count batch threads, the model's RoPE
        if k in ("type_k", "type_v"):
            v = KV_CACHE_TYPES[v]
        elif k == "numa":
            v = NUMA_STRATEGIES[v]
        elif k == "rope_freq_base":
            v = float(v)
        m[key] = v
    return {"host": host, "port": port, "interrupt_requests": interrupt_requests, "models": [m]}


def request_fields(settings: Settings) -> dict:
    """What the client sends with every chat completion: the profile's request-time settings."""
    out = {key: getattr(settings, k) for k, key in REQUEST_KEYS.items()}
    if out["max_tokens"] is None:
        out.pop("max_tokens")
    return out


def translation(settings: Settings) -> list[dict]:
    """Every LLAMACPP_* name of the profile and where it went: {env, value, target, where, note}."""
    env = Settings.env_names()
    rows = []
    for name in Settings.names():
        v = getattr(settings, name)
        if name == "model":
            rows.append({"env": env[name], "value": v, "where": "server config", "target": "models[0].model",
                         "note": "resolved to the GGUF's path"})
        elif name in MODEL_KEYS:
            rows.append({"env": env[name], "value": v, "where": "server config" if v is not None else "server default",
                         "target": f"models[0].{MODEL_KEYS[name]}",
                         "note": {"type_k": "ggml type id", "type_v": "ggml type id", "numa": "ggml_numa_strategy id"}
                         .get(name, "") if v is not None else "unset: the server's default applies"})
        elif name in REQUEST_KEYS:
            rows.append({"env": env[name], "value": v, "where": "per request", "target": REQUEST_KEYS[name],
                         "note": "sent by the client with each request (the server has no default for it)"})
        else:
            rows.append({"env": env[name], "value": v, "where": "client side", "target": "",
                         "note": CLIENT_SIDE.get(name, "not a server setting")})
    return rows


def llama_server_command(settings: Settings, *, exe: str = "llama-server", host: str = "127.0.0.1",
                         port: int = 8080, model_path: str | None = None, parallel: int = 1) -> tuple[list[str], list[str]]:
    """llama.cpp's `llama-server` command line with the profile's settings, and notes where a setting has no
    equivalent or means something else there. parallel=1 serves one sequence at a time, as llama-cpp-python does."""
    s = settings
    if s.chat_format is None:
        s = s.replace(chat_format=chat_format_for(model_path or s.model).name)
    cmd = [exe, "-m", model_path or str(resolve_model(s.model)), "--host", host, "--port", str(port),
           "-c", str(s.n_ctx), "-b", str(s.n_batch), "-ub", str(s.n_ubatch), "-ngl", str(s.n_gpu_layers),
           "-fa", "on" if s.flash_attn else "off", "-ctk", s.type_k, "-ctv", s.type_v, "--parallel", str(parallel),
           "--seed", str(s.seed), "--temp", str(s.temperature), "--top-p", str(s.top_p), "--top-k", str(s.top_k),
           "--repeat-penalty", str(s.repeat_penalty), "--metrics", "--slots"]
    notes = [f"--parallel {parallel}: llama-cpp-python's server decodes one request at a time; llama-server can "
             "batch several sequences (-np N), each slot getting n_ctx / N of the context"]
    if s.n_threads is not None:
        cmd += ["-t", str(s.n_threads)]
    if s.n_threads_batch is not None:
        cmd += ["-tb", str(s.n_threads_batch)]
    if not s.use_mmap:
        cmd.append("--no-mmap")
    if s.use_mlock:
        cmd.append("--mlock")
    if s.numa != "disabled":
        if s.numa in ("distribute", "isolate", "numactl"):
            cmd += ["--numa", s.numa]
        else:
            notes.append(f"numa={s.numa}: llama-server has no such strategy; left out")
    if s.rope_freq_base is not None:
        cmd += ["--rope-freq-base", str(float(s.rope_freq_base))]
    if s.max_tokens is not None:
        cmd += ["-n", str(s.max_tokens)]
    if s.chat_format is None:
        cmd.append("--jinja")
        notes.append("chat template: the GGUF's own (--jinja)")
    elif LLAMA_SERVER_TEMPLATES.get(s.chat_format):
        cmd += ["--chat-template", LLAMA_SERVER_TEMPLATES[s.chat_format]]
    else:
        notes.append(f"chat_format={s.chat_format}: no llama-server built-in template of that name; pass "
                     "--chat-template-file with the format's Jinja template")
    for name, why in CLIENT_SIDE.items():
        notes.append(f"{Settings.env_names()[name]}: {why}")
    return cmd, notes


def write_deploy_files(env_path: str | os.PathLike, settings: Settings | None = None, *,
                       model_path: str | None = None, guide_name: str | None = None) -> dict[str, Path]:
    """Beside `<dir>/<name>.env`: `<name>.server.json` (llama-cpp-python's server config, interrupt_requests
    false), `<name>.llama-server.sh` (the same settings as a llama-server command line, notes as comments) and, for
    the guide's profile names, the `.env` again under the guide's own file name `.env.<name>`. Returns kind -> path."""
    env_path = Path(env_path)
    s = settings or Settings.from_dotenv(env_path)
    name = env_path.stem
    out = {}
    # interrupt_requests false: the server's default cuts off a streaming answer whenever another request waits
    # (notebook 86 measures it); a deployed profile should answer every request in full
    cfg = server_config(s, model_path=model_path, interrupt_requests=False)
    p = env_path.with_name(f"{name}.server.json")
    p.write_text(json.dumps(cfg, indent=2) + "\n")
    out["server_config"] = p
    cmd, notes = llama_server_command(s, model_path=model_path)
    p = env_path.with_name(f"{name}.llama-server.sh")
    p.write_text("#!/bin/sh\n# llama.cpp's llama-server with the settings of " + env_path.name + "\n"
                 + "".join(f"# {n}\n" for n in notes)
                 + "# sampling flags are the server's defaults; a request's own fields override them\n"
                 + shlex.join(cmd) + ' "$@"\n')
    p.chmod(0o755)
    out["llama_server"] = p
    guide_name = guide_name or (name if name in ("speed", "balanced", "quality") else None)
    if guide_name:
        p = env_path.with_name(f".env.{guide_name}")
        p.write_text(env_path.read_text())
        out["env_guide_name"] = p
    return out
