"""The server's link to its library (kvlib/serve/library_link.py), over a real Library and real
refused PostgreSQL connections (a port nothing listens on): no model, no services."""

from __future__ import annotations

import threading

import pytest

from kvlib.errors import ManifestUnavailableError
from kvlib.serve.library_link import LibraryLink
from kvlib.serve.node import free_port, wait_until
from kvlib.store import Library


def dead_manifest() -> str:
    """A PostgreSQL URL whose port refuses connections (free_port's socket is closed again)."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/kvlib"


def test_starts_degraded_and_opens_the_library_once_the_manifest_answers(tmp_path):
    target = {"manifest": dead_manifest()}  # the manifest the server is configured with, for now unreachable
    link = LibraryLink(lambda: Library(tmp_path, manifest=target["manifest"]), retry_s=0.2)
    recovered = threading.Event()
    link.on_recover = recovered.set
    link.start()
    try:
        assert link.degraded and link.usable() is None and link.library is None
        assert link.reason.startswith("cannot reach manifest postgresql://postgres@127.0.0.1:"), link.reason
        with pytest.raises(ManifestUnavailableError, match="cannot reach manifest"):
            link.require()
        target["manifest"] = str(tmp_path / "manifest.sqlite")  # a manifest that answers
        assert recovered.wait(10), "the watch must open the library and call on_recover"
        assert not link.degraded and link.reason is None and link.require() is link.library
        assert link.library.stats()["chunks"] == 0
    finally:
        link.close()


def test_a_failed_call_degrades_until_the_watch_reaches_the_manifest(tmp_path):
    link = LibraryLink(lambda: Library(tmp_path), retry_s=0.2).start()
    try:
        assert not link.degraded and link.usable() is link.library
        with pytest.raises(ManifestUnavailableError), link.watching():
            Library(tmp_path / "other", manifest=dead_manifest())  # a library call that cannot reach its manifest
        assert link.degraded and link.usable() is None and "cannot reach manifest" in link.reason
        wait_until(lambda: not link.degraded, 10, "the watch's ping to find the manifest answering")
        assert link.usable() is link.library
    finally:
        link.close()


def test_retry_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="retry_s must be positive"):
        LibraryLink(lambda: Library(tmp_path), retry_s=0)


def test_the_model_row_is_written_once_per_opened_library(tmp_path, smol_engine, monkeypatch):
    """Stores after the first write no model row (no extra manifest transaction per request after
    its first token), and a library opened again (after an outage) gets the row again."""
    from kvlib.serve.pipeline import Pipeline

    link = LibraryLink(lambda: Library(tmp_path), retry_s=0.2).start()
    try:
        pipeline = Pipeline(smol_engine, link, spec="rerope")
        writes = []
        real = Library.register_model
        monkeypatch.setattr(Library, "register_model", lambda self, *a: (writes.append(self), real(self, *a)))
        tok = smol_engine.lm.tokenizer
        docs = ["The weir was rebuilt in 1903.", "The quay crane lifted six tons.", "The ridge is granite."]
        assert pipeline.store_segments("alice", [tok.encode(docs[0], add_special_tokens=False)]) == 1
        assert pipeline.store_segments("alice", [tok.encode(docs[1], add_special_tokens=False)]) == 1
        assert writes == [link.library], "one model row write for the opened library"
        assert link.library.model(smol_engine.lm.fingerprint)["name"] == smol_engine.lm.name
        link.library = Library(tmp_path)  # what the link holds once it reopened the library
        assert pipeline.store_segments("alice", [tok.encode(docs[2], add_special_tokens=False)]) == 1
        assert writes[1:] == [link.library]
    finally:
        link.close()


def test_a_finished_request_lets_go_of_its_kv_cache_without_the_garbage_collector(tmp_path, smol_engine):
    """The engine's stream calls back into the pipeline's record of the request, which holds the
    stream: unless finishing breaks that cycle, every answered request keeps its KV cache (and
    its pooled buffer) until a garbage collection, and a busy server grows by a cache a request."""
    import gc

    from kvlib.engine.cache import KVCache
    from kvlib.serve.pipeline import Pipeline

    link = LibraryLink(lambda: Library(tmp_path), retry_s=0.2).start()
    try:
        pipeline = Pipeline(smol_engine, link, spec="rerope")
        doc = ("Aberlow Mill was a water-powered flax mill on the river Senn, built in 1794 by the Harrow "
               "family and closed in 1911 after a flood destroyed its wheel. Its weir was rebuilt in 1903 "
               "from the stones of the old bridge, and the mill race still feeds the town's lower pond.")
        messages = [{"role": "user", "content": f"Document [1](Title: Aberlow Mill) {doc}\n\n"
                                                 "Question: when was the weir rebuilt?"}]
        gc.collect()
        gc.disable()
        try:
            for _ in range(2):  # the second one is served from the library
                done = pipeline.complete(messages, "alice", max_tokens=3)
            alive = [o for o in gc.get_objects() if isinstance(o, KVCache)]
        finally:
            gc.enable()
        assert done.cached_tokens > 0
        assert alive == [], f"{len(alive)} KV caches outlived their requests"
    finally:
        link.close()
