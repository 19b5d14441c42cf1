"""The server's link to its library, and what the server does while the manifest is out of reach.

Design facts:
- The link owns the server's Library. It is opened when the server starts; if the manifest
  (PostgreSQL) cannot be reached then, the server starts anyway, degraded, with no library.
- Degraded means the manifest is unreachable, and says why (`reason`, the one-line
  ManifestUnavailableError). While degraded the pipeline answers chat completions by full
  recompute and stores nothing, `POST /v1/documents` is a 503 `manifest_unavailable`, and
  /healthz says `"status": "degraded"`. Nothing is ever half-written: the library writes a
  row only after its blob, so a store cut off by the outage leaves at most an orphan blob for gc.
- Two ways in: a request whose library call fails on an unreachable manifest marks the link
  down at once (`failed`, from the engine thread), and a watch thread pings the manifest every
  `retry_s` seconds (`SELECT 1`), which notices an outage while idle and notices the recovery.
  On recovery the link calls `on_recover` (the server wakes its engine thread to store the
  misses that waited) and reuse resumes with the next request.
- Threads: the engine thread uses the Library. The watch thread only pings through the
  manifest's SQLAlchemy engine, which is thread-safe (its pool gives each thread its own
  connection), and, while no library could be opened yet, opens it and hands it over: the
  engine thread sees it only once `reason` is cleared, after it is complete.
- API keys are not the manifest's: they live in the node's `<home>/keys.sqlite` (keys.py), so
  auth works unchanged while degraded, with the same live lookup; an unknown key stays a 401.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator

from kvlib.config import resolve_store
from kvlib.errors import ManifestUnavailableError

log = logging.getLogger("kvlib.serve")
DEFAULT_RETRY_S = 5.0
JOIN_TIMEOUT_S = 30.0  # a ping or an open waits at most the manifest's connect timeout (5 s) per try


class LibraryLink:
    """The Library a server uses, or why it cannot use one now."""

    def __init__(self, open_library: Callable[[], object], retry_s: float = DEFAULT_RETRY_S) -> None:
        if retry_s <= 0:
            raise ValueError(f"retry_s must be positive, got {retry_s!r}")
        self._open, self.retry_s = open_library, retry_s
        self.library = None  # set once opened; stays set through outages (its pool reconnects)
        self.reason: str | None = None  # why the manifest is unreachable; None when it answers
        self.down_since: float | None = None  # time.time() of the outage's start
        self.on_recover: Callable[[], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def degraded(self) -> bool:
        return self.reason is not None

    def start(self) -> "LibraryLink":
        """Open the library now (degraded if the manifest does not answer), then watch it."""
        self.check()
        self._thread = threading.Thread(target=self._watch, name="kvlib-manifest-watch", daemon=True)
        self._thread.start()
        return self

    def usable(self):
        """The library, or None while degraded."""
        return None if self.reason is not None else self.library

    def require(self):
        """The library, or the ManifestUnavailableError that says why there is none now."""
        library = self.usable()
        if library is None:
            raise ManifestUnavailableError(self.reason or "the library is not open")
        return library

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Run library work; an unreachable manifest marks the link down, then propagates."""
        try:
            yield
        except ManifestUnavailableError as exc:
            self.failed(exc)
            raise

    def failed(self, exc: Exception) -> None:
        """The manifest did not answer: degraded until a ping or an open succeeds."""
        if self.reason is None:
            self.down_since = time.time()
            log.warning("kvlib serve: %s; answering by full recompute and storing nothing until it is back "
                        "(retrying every %g s)", exc, self.retry_s)
        self.reason = str(exc)

    def check(self) -> bool:
        """Open the library if it is not open yet, else ping its manifest; True when it answered."""
        try:
            if self.library is None:
                self.library = self._open()
            else:
                self.library.ping()
        except ManifestUnavailableError as exc:
            self.failed(exc)
            return False
        if self.reason is not None:
            log.warning("kvlib serve: the manifest answers again after %.0f s: reuse resumes",
                        time.time() - (self.down_since or time.time()))
            self.reason, self.down_since = None, None
            if self.on_recover is not None:
                self.on_recover()
        return True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
        if self.library is not None:
            self.library.close()

    def _watch(self) -> None:
        while not self._stop.wait(self.retry_s):
            try:
                self.check()
            except Exception:  # a bug in a ping must not end the watch, and never the server
                log.exception("manifest check failed")


def library_opener(settings) -> Callable[[], object]:
    """Opens the server's Library with the settings' backends (each call a new one)."""
    from kvlib.store.library import Library

    return lambda: Library(settings.home, store=settings.store, manifest=settings.manifest,
                           local_bytes=settings.local_bytes, recent_bytes=settings.recent_bytes)


def sync_loop_for(settings):
    """The background upload of the home's queue (a started SyncLoop), or None: without a remote
    store there is no queue, and `--sync-interval 0` turns it off."""
    from kvlib.store.sync_loop import SyncLoop

    if resolve_store(settings.store) is None or settings.sync_interval_s <= 0:
        return None
    return SyncLoop(library_opener(settings), interval_s=settings.sync_interval_s).start()
