"""The background retry of the upload queue, for a long-running process (the server).

Design facts:
- Its own Library, opened on its own thread: a Library is used by one thread only.
- Every `interval_s` it runs `Library.sync()`; an unreachable store or manifest is not an
  error here, only a reason to try again later, and the last outcome is kept for /healthz
  (`last_error`: why the latest round could not open the library or upload everything).
- `stop()` ends the loop and waits for it, so a server shuts down with the queue on disk intact.
"""

from __future__ import annotations

import threading
from typing import Callable

from kvlib.errors import KvlibError

DEFAULT_INTERVAL_S = 30.0


class SyncLoop:
    """Drain a node's upload queue in the background until stopped."""

    def __init__(self, open_library: Callable[[], object], interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self._open = open_library
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_report = None  # the latest SyncReport
        self.last_error: str | None = None  # why the latest round could not run or finish, if so

    def start(self) -> "SyncLoop":
        self._thread = threading.Thread(target=self._run, name="kvlib-sync", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def pending(self) -> int:
        return 0 if self.last_report is None else self.last_report.pending

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.interval_s)

    def run_once(self) -> None:
        try:
            with self._open() as library:
                self.last_report = library.sync()
            self.last_error = self.last_report.error  # None, or the outage that stopped the upload
        except KvlibError as exc:
            self.last_error = str(exc)
