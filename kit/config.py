"""Settings: every knob the guide names, with help text, its LLAMACPP_* name, and validation.

llama-cpp-python's `Llama(**kwargs)` ignores unknown keyword arguments and llama.cpp clamps or aborts on
values it dislikes. Everything is checked here first, so a typo or a bad combination fails with one
clear message before any model is loaded and before anything already measured could be lost.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from kit.data import PROMPTS_PATH
from kit.paths import DEFAULT_MODEL, resolve as resolve_path

ENV_PREFIX = "LLAMACPP_"
# The request-time sampling settings a request may override (Settings fields of the "request" group).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repeat_penalty", "max_tokens")

# ggml_type values (ggml.h) for the KV cache types llama.cpp accepts for K and V.
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
UNQUANTIZED_KV = {"f32", "f16", "bf16"}
# ggml_numa_strategy values; `numa=True` in llama-cpp-python means "distribute".
NUMA_STRATEGIES = {"disabled": 0, "distribute": 1, "isolate": 2, "numactl": 3, "mirror": 4}

# Names the guide uses that are not settings: say why instead of "unknown".
NOT_SETTINGS = {
    "n_ctx_train": "n_ctx_train is a property of the model (its GGUF metadata), not a setting: "
    "llama.cpp reads it from the file and no server option changes it. See `kit.models.model_card`.",
}


class SettingsError(ValueError):
    """A setting llama.cpp would silently ignore, clamp, or crash on."""


def _s(default, help: str, env: str | None = None, group: str = "load", choices=None, **kw):
    """A dataclass field that carries its help text, LLAMACPP_* name and group with its default."""
    meta = {"help": help, "env": env, "group": group, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class Settings:
    """One configuration of a llama-cpp-python RAG server. Defaults are llama-cpp-python's `Llama()` defaults."""

    # model
    model: str = _s(DEFAULT_MODEL, "bundled model name or path to any GGUF file", "MODEL_PATH", "model")
    # load time
    n_gpu_layers: int = _s(0, "layers offloaded to the GPU (-1 = all); ignored by a CPU-only build", "N_GPU_LAYERS")
    n_ctx: int = _s(512, "context size in tokens allocated for the KV cache (0 = the model's n_ctx_train)", "N_CTX")
    n_batch: int = _s(512, "logical batch: max tokens handed to llama_decode at once (clamped to n_ctx)", "N_BATCH")
    n_ubatch: int = _s(512, "physical micro-batch computed in one graph (must not exceed n_batch)", "N_UBATCH")
    flash_attn: bool = _s(False, "use flash attention (needed for a quantized V cache)", "FLASH_ATTN")
    type_k: str = _s("f16", "KV cache type for K", "TYPE_K", choices=tuple(KV_CACHE_TYPES))
    type_v: str = _s("f16", "KV cache type for V (quantized needs flash_attn)", "TYPE_V", choices=tuple(KV_CACHE_TYPES))
    n_threads: int | None = _s(None, "threads for generation (None = llama-cpp-python's default: cpu_count // 2)", "N_THREADS")
    n_threads_batch: int | None = _s(None, "threads for prompt processing (None = cpu_count)", "N_THREADS_BATCH")
    use_mmap: bool = _s(True, "memory-map the model file instead of reading it", "USE_MMAP")
    use_mlock: bool = _s(False, "lock the model in RAM (may need a raised RLIMIT_MEMLOCK)", "USE_MLOCK")
    numa: str = _s("disabled", "NUMA strategy", "NUMA", choices=tuple(NUMA_STRATEGIES))
    rope_freq_base: float | None = _s(None, "RoPE base frequency override (None = the model's own value)", "ROPE_FREQ_BASE")
    # its own group: it changes the prompt's text, not the engine, so engine rows stay comparable across it
    chat_format: str | None = _s(None, "llama-cpp-python chat format (None = the GGUF's template; a GGUF without one "
                                       "gets a format chosen from its vocabulary)", "CHAT_FORMAT", "chat")
    seed: int = _s(42, "sampling seed, for repeatable studies", "SEED", "request")
    # request time
    temperature: float = _s(0.8, "sampling temperature (0 = greedy)", "TEMPERATURE", "request")
    top_p: float = _s(0.95, "nucleus sampling mass", "TOP_P", "request")
    top_k: int = _s(40, "sample from the k most likely tokens (0 = all)", "TOP_K", "request")
    repeat_penalty: float = _s(1.0, "penalty for repeating recent tokens (1.0 = off)", "REPEAT_PENALTY", "request")
    max_tokens: int | None = _s(None, "cap on generated tokens per answer (None = until EOS or n_ctx)", "DEFAULT_MAX_TOKENS", "request")
    # RAG
    rag_search_k: int = _s(8, "chunks retrieved per question", "RAG_SEARCH_K", "rag")
    max_context_length: int = _s(4000, "budget of the RAG context handed to the LLM, in LLM tokens", "MAX_CONTEXT_LENGTH", "rag")
    enable_embedding_cache: bool = _s(True, "cache embeddings on disk", "ENABLE_EMBEDDING_CACHE", "rag")
    concurrent_rag_queries: int = _s(1, "retrievals run concurrently", "CONCURRENT_RAG_QUERIES", "rag")
    # service
    log_level: str = _s("INFO", "server log level (no effect on llama.cpp speed)", "LOG_LEVEL", "service",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))

    def __post_init__(self) -> None:
        self.validate()

    # ---- introspection -------------------------------------------------------------------------
    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """field name -> LLAMACPP_* variable."""
        return {f.name: ENV_PREFIX + f.metadata["env"] for f in fields(cls)}

    @classmethod
    def group(cls, name: str) -> list[str]:
        return [f.name for f in fields(cls) if f.metadata["group"] == name]

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Settings":
        """Build from a plain mapping; unknown names are an error (with the closest known name)."""
        check_setting_names(d.keys())
        return cls(**dict(d))

    def replace(self, **changes) -> "Settings":
        check_setting_names(changes.keys())
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- LLAMACPP_* environment and .env files -------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, base: "Settings | None" = None) -> "Settings":
        """Read LLAMACPP_* variables; any other LLAMACPP_* variable is an error, not silently ignored."""
        environ = os.environ if environ is None else environ
        by_env = {v: k for k, v in cls.env_names().items()}
        values: dict[str, Any] = {}
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            if key not in by_env:
                _unknown_env(key, by_env)
            name = by_env[key]
            values[name] = _parse_value(name, raw)
        start = base.to_dict() if base else {}
        start.update(values)
        return cls(**start)

    @classmethod
    def from_dotenv(cls, path: str | os.PathLike, base: "Settings | None" = None) -> "Settings":
        return cls.from_env(read_dotenv(path), base=base)

    def to_env(self, only_changed: bool = False) -> dict[str, str]:
        default = Settings() if only_changed else None
        env = {}
        for name, var in self.env_names().items():
            v = getattr(self, name)
            if default is not None and getattr(default, name) == v:
                continue
            env[var] = _format_value(v)
        return env

    def to_dotenv(self, path: str | os.PathLike, header: str = "", only_changed: bool = False) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"# {line}" if line else "#" for line in header.splitlines()]
        help_ = self.help()
        for var, val in self.to_env(only_changed).items():
            name = var[len(ENV_PREFIX):].lower()
            name = {"model_path": "model", "default_max_tokens": "max_tokens"}.get(name, name)
            lines.append(f"{var}={shlex.quote(val) if val else ''}  # {help_[name]}")
        p.write_text("\n".join(lines) + "\n")
        return p

    # ---- validation ------------------------------------------------------------------------------------
    def validate(self) -> "Settings":
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise SettingsError(
                    f"{f.name}={getattr(self, f.name)!r} is not one of: {', '.join(map(str, choices))}"
                )
        _at_least(self, "n_ctx", 0)
        for name in ("n_batch", "n_ubatch", "rag_search_k", "max_context_length", "concurrent_rag_queries"):
            _at_least(self, name, 1)
        for name in ("n_threads", "n_threads_batch", "max_tokens"):
            if getattr(self, name) is not None:
                _at_least(self, name, 1)
        _at_least(self, "n_gpu_layers", -1)
        _at_least(self, "top_k", 0)
        if self.temperature < 0:
            raise SettingsError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise SettingsError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repeat_penalty <= 0:
            raise SettingsError(f"repeat_penalty={self.repeat_penalty} must be > 0")
        if self.chat_format is not None and self.chat_format not in chat_format_names():
            close = difflib.get_close_matches(self.chat_format, chat_format_names(), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SettingsError(f"chat_format={self.chat_format!r} ({ENV_PREFIX}CHAT_FORMAT) is not a chat format "
                                f"llama-cpp-python registers; {hint}known: {', '.join(chat_format_names())}")
        if self.rope_freq_base is not None and self.rope_freq_base <= 0:
            raise SettingsError(f"rope_freq_base={self.rope_freq_base} must be > 0 (or None for the model's own)")
        if self.n_ubatch > self.n_batch:
            raise SettingsError(
                f"n_ubatch={self.n_ubatch} > n_batch={self.n_batch}: llama.cpp would silently use "
                f"n_ubatch={self.n_batch}; set n_ubatch <= n_batch"
            )
        if self.type_v not in UNQUANTIZED_KV and not self.flash_attn:
            raise SettingsError(
                f"type_v={self.type_v} (a quantized V cache) needs flash_attn=True: llama.cpp refuses to "
                f"create the context otherwise"
            )
        return self

    def check_fits(self, n_tokens: int, n_ctx_train: int | None = None, what: str = "prompt + generation") -> None:
        """n_ctx must hold what a test will put into it."""
        n_ctx = self.n_ctx or n_ctx_train or 0
        if n_ctx and n_tokens > n_ctx:
            raise SettingsError(f"n_ctx={n_ctx} is smaller than the {what} ({n_tokens} tokens)")

    # ---- what llama.cpp will actually use --------------------------------------------------------------
    def effective(self, n_ctx_train: int | None = None) -> dict:
        """The values llama.cpp will run with, after its silent clamps (n_batch <= n_ctx, n_ubatch <= n_batch)."""
        n_ctx = self.n_ctx or (n_ctx_train or 0)
        n_batch = min(self.n_batch, n_ctx) if n_ctx else self.n_batch
        n_ubatch = min(self.n_ubatch, n_batch)
        cpu = os.cpu_count() or 1
        return {
            "n_ctx": n_ctx,
            "n_batch": n_batch,
            "n_ubatch": n_ubatch,
            "n_threads": self.n_threads or max(cpu // 2, 1),
            "n_threads_batch": self.n_threads_batch or cpu,
            "clamped": [n for n, a, b in (("n_batch", self.n_batch, n_batch), ("n_ubatch", self.n_ubatch, n_ubatch)) if a != b],
        }

    def llama_kwargs(self, model_path: str) -> dict:
        """Keyword arguments for llama_cpp.Llama, every one of them a name Llama really reads."""
        kw = dict(
            model_path=model_path,
            n_gpu_layers=self.n_gpu_layers,
            n_ctx=self.n_ctx,
            n_batch=self.n_batch,
            n_ubatch=self.n_ubatch,
            flash_attn=self.flash_attn,
            type_k=KV_CACHE_TYPES[self.type_k],
            type_v=KV_CACHE_TYPES[self.type_v],
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads_batch,
            use_mmap=self.use_mmap,
            use_mlock=self.use_mlock,
            numa=NUMA_STRATEGIES[self.numa],
            seed=self.seed,
            verbose=False,
        )
        if self.rope_freq_base is not None:
            kw["rope_freq_base"] = float(self.rope_freq_base)
        if self.chat_format is not None:
            kw["chat_format"] = self.chat_format
        return kw

    def sampling_kwargs(self) -> dict:
        return dict(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repeat_penalty=self.repeat_penalty,
            max_tokens=self.max_tokens,
            seed=self.seed,
        )


# ---- helpers ---------------------------------------------------------------------------------------------
_FIELD_TYPES = {f.name: f.type for f in fields(Settings)}


class ChatFormatError(SettingsError):
    """A model the kit cannot send chat requests to: no chat template in the GGUF, none chosen, none set."""


@functools.lru_cache(maxsize=1)
def chat_format_names() -> tuple[str, ...]:
    """The chat formats llama-cpp-python registers (`Llama(chat_format=...)` accepts exactly these)."""
    # here, not on top: it loads libllama, which only a setting that names a format needs
    from llama_cpp import llama_chat_format
    registry = llama_chat_format.LlamaChatCompletionHandlerRegistry()
    return tuple(sorted(getattr(registry, "_chat_handlers", {})))


def check_setting_names(names) -> None:
    """Raise SettingsError for any name that is not a Settings field (with the closest one), e.g. a grid axis."""
    for n in names:
        if n in NOT_SETTINGS:
            raise SettingsError(NOT_SETTINGS[n])
        if n not in _FIELD_TYPES:
            close = difflib.get_close_matches(n, list(_FIELD_TYPES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SettingsError(f"unknown setting {n!r}{hint} (llama-cpp-python would silently ignore it)")


def _unknown_env(key: str, by_env: Mapping[str, str]) -> None:
    name = key[len(ENV_PREFIX):].lower()
    if name in NOT_SETTINGS:
        raise SettingsError(f"{key}: {NOT_SETTINGS[name]}")
    close = difflib.get_close_matches(key, list(by_env), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise SettingsError(f"unknown variable {key}{hint}")


def _check_type(name: str, value: Any, type_: str) -> None:
    """A Settings field's value against its annotation (the same check StudyConfig uses: _type_ok)."""
    t = str(type_)
    if value is None and "None" not in t:
        raise SettingsError(f"{name} must not be None")
    if not _type_ok(value, t):
        raise SettingsError(f"{name}={value!r} has type {type(value).__name__}; expected {t}")


def _at_least(s: Settings, name: str, lo: int) -> None:
    v = getattr(s, name)
    if v < lo:
        what = "positive" if lo == 1 else f">= {lo}"
        raise SettingsError(f"{name}={v} must be {what}")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_value(name: str, raw: str) -> Any:
    t = str(_FIELD_TYPES[name])
    s = raw.strip()
    if "None" in t and s.lower() in {"", "none", "null"}:
        return None
    base = t.split("|")[0].strip()
    try:
        if base == "bool":
            if s.lower() in _TRUE:
                return True
            if s.lower() in _FALSE:
                return False
            raise ValueError(s)
        if base == "int":
            return int(s)
        if base == "float":
            return float(s)
    except ValueError:
        raise SettingsError(f"{ENV_PREFIX}{_FIELD_ENV[name]}={raw!r}: expected {base}") from None
    return s


_FIELD_ENV = {f.name: f.metadata["env"] for f in fields(Settings)}


def _format_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def read_dotenv(path: str | os.PathLike) -> dict[str, str]:
    """KEY=VALUE lines; '#' starts a comment (also after a value, as in the guide); quotes are honoured."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export "):]
        if "=" not in stripped:
            raise SettingsError(f"{path}:{lineno}: expected KEY=VALUE, got {line!r}")
        key, _, rest = stripped.partition("=")
        try:
            parts = shlex.split(rest, comments=True)
        except ValueError as exc:
            raise SettingsError(f"{path}:{lineno}: {exc}") from None
        out[key.strip()] = " ".join(parts)
    return out


# ---- study configurations ------------------------------------------------------------------------------
# Every study's config is a dataclass derived from StudyConfig. Each field is made with `param(...)`, which
# holds its default, its help text and its range, like Settings' fields; the notebook's parameters cell
# repeats exactly these defaults (a test enforces it), and `kit run` builds every selected study's config
# before the first notebook starts, so a bad value anywhere is one error within seconds.
class StudyConfigError(SettingsError):
    """A study parameter with a wrong type, out of range, or inconsistent with another."""


def param(default, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
          choices=None, nonempty: bool = False, length: int | None = None):
    """A study-config field: default, help text, and the checks `StudyConfig.validate` applies.

    ge/gt/le bound a number (or every element of a list of numbers), choices restricts a value (or every element),
    nonempty refuses an empty list, length requires a list of exactly that many elements."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "choices": tuple(choices) if choices else None,
            "nonempty": nonempty, "length": length}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: _copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(v):
    return [_copy(x) for x in v] if isinstance(v, list) else (dict(v) if isinstance(v, dict) else v)


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def _type_ok(value: Any, type_: str) -> bool:
    """Checks a value against an annotation string: int, float, bool, str, X | None, list, list[X], dict."""
    t = type_.replace(" ", "")
    if "|None" in t or t.startswith("None|"):
        if value is None:
            return True
        t = t.replace("|None", "").replace("None|", "")
    if t.startswith("list"):
        if not isinstance(value, list):
            return False
        inner = t[5:-1] if t.startswith("list[") else ""
        return not inner or all(_type_ok(x, inner) for x in value)
    if t.startswith("dict"):
        return isinstance(value, dict)
    if t == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if t in _SCALARS:
        return isinstance(value, _SCALARS[t])
    return True  # an annotation this checker does not know (a class): the study's check() covers it


def _bounds_problem(name: str, value: Any, meta: Mapping) -> str | None:
    items = value if isinstance(value, list) else [value]
    for x in items:
        if x is None or isinstance(x, (bool, list, dict)):
            continue
        if meta.get("choices") and x not in meta["choices"]:
            return f"{name}={value!r}: {x!r} is not one of {', '.join(map(repr, meta['choices']))}"
        if not isinstance(x, (int, float)):
            continue
        if meta.get("ge") is not None and x < meta["ge"]:
            return f"{name}={value!r} must be >= {meta['ge']}"
        if meta.get("gt") is not None and x <= meta["gt"]:
            return f"{name}={value!r} must be > {meta['gt']}"
        if meta.get("le") is not None and x > meta["le"]:
            return f"{name}={value!r} must be <= {meta['le']}"
    if isinstance(value, list):
        if meta.get("nonempty") and not value:
            return f"{name} must not be empty"
        if meta.get("length") is not None and len(value) != meta["length"]:
            return f"{name}={value!r} must have {meta['length']} elements"
    return None


@dataclass
class StudyConfig:
    """Base of every study's config: `model`, `repetitions` and `out_dir`, then the study's own fields.

    Subclasses add fields made with `param(...)` and may override `check()` for cross-field rules (raise
    StudyConfigError). Relative `out_dir` values are resolved against the repository root (kit.paths)."""

    model: str = param(DEFAULT_MODEL, "bundled model name or a path to any GGUF")
    repetitions: int = param(5, "timed runs per test, after one warm-up", ge=1)
    out_dir: str = param("outputs/study", "where rows, figures and verdicts go (relative: to the repository root)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "StudyConfig":
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if not _type_ok(value, str(f.type)):
                problems.append(f"{f.name}={value!r} has type {type(value).__name__}; expected {f.type}")
                continue
            p = _bounds_problem(f.name, value, f.metadata)
            if p:
                problems.append(p)
        if problems:
            raise StudyConfigError(f"{type(self).__name__}: " + "; ".join(problems))
        self.check()
        return self

    def check(self) -> None:
        """Cross-field rules of a study (override; raise StudyConfigError)."""

    @classmethod
    def defaults(cls) -> dict:
        out = {}
        for f in fields(cls):
            out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        return out

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "StudyConfig":
        """From a notebook's parameters; unknown names are an error with the closest known name."""
        known = [f.name for f in fields(cls)]
        for n in params:
            if n not in known:
                close = difflib.get_close_matches(n, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise StudyConfigError(f"{cls.__name__}: unknown parameter {n!r}{hint}")
        return cls(**dict(params))

    @property
    def out_path(self) -> Path:
        """out_dir as an absolute path (relative values from the repository root)."""
        return resolve_path(self.out_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_rule(ok: bool, message: str) -> None:
    """One cross-field rule of a study config: raise StudyConfigError(message) unless ok."""
    if not ok:
        raise StudyConfigError(message)


@dataclass
class ChatStudyConfig(StudyConfig):
    """Base of the studies that send chat requests from a prompt set to one loaded model (notebooks 70, 75, 80):
    the context size, the generation threads and the prompt set, with their help texts, once."""

    n_ctx: int = param(2048, "context size", ge=1)
    n_threads: int | None = param(None, "generation threads (None: llama-cpp-python's default)", ge=1)
    prompts_file: str = param(PROMPTS_PATH, "the prompt set (JSON lines: id, prompt); relative: from the repository root")

    def validate(self) -> "ChatStudyConfig":
        """StudyConfig's checks, then the model's chat format (`kit.models.chat_format_for`): a model whose requests
        would all end at once is one error here, before anything is measured. A study with a `chat_format`
        parameter passes it on."""
        super().validate()
        # here, not on top: kit.models imports this module (for ChatFormatError)
        from kit.models import chat_format_for
        chat_format_for(self.model, getattr(self, "chat_format", None))
        return self
