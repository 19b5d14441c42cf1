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
