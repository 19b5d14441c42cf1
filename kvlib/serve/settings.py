"""Server settings, resolved once by the CLI (flag, then environment, then default)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    home: Path
    model: str | None = None  # None = the default SmolLM2 GGUF
    dtype: str | None = None
    mode: str = "rerope"  # "full" turns reuse off (the load benchmark's baseline)
    repair: str | None = None
    misses: str = "isolated"  # reusable misses: encoded on their own and stored at once, or "context"
    max_queue: int = 32  # requests waiting for the engine beyond those it is running (4 batches)
    max_batch: int = 8  # requests the engine decodes together (queue.EngineWorker)
    allow_anonymous: bool = False
    max_body_bytes: int = 8 << 20  # a prompt at the model's context is ~40 KB; documents are bigger
    default_max_tokens: int = 256  # when a request names no max_tokens (the default model decodes ~30 tok/s here)
    store: str | None = None  # blobs: None = KVLIB_STORE, else the home's folder; or s3://bucket[/prefix]
    manifest: str | None = None  # None = KVLIB_MANIFEST, else <home>/manifest.sqlite; or postgresql://...
    local_bytes: int | None = None  # the local tier's budget with a remote store (None = KVLIB_LOCAL_BYTES / 2 GiB)
    manifest_retry_s: float = 5.0  # while degraded, how often the manifest is tried again
    sync_interval_s: float = 30.0  # how often the upload queue is retried in the background (0: never)
    recent_bytes: int = 64 << 20  # just-stored KV kept in memory for the next turn's read (store/recent.py)
    prefix_bytes: int = 256 << 20  # answered conversations' KV kept for their next turns (serve/prefix_hits.py)

    @property
    def spec(self) -> str:
        """The engine spec string the pipeline resolves, e.g. 'rerope+boundary:8', 'rerope+guard:0.2' or 'full'."""
        return self.mode if not self.repair or self.mode == "full" else f"{self.mode}+{self.repair}"


def serve_spec(text: str):
    """A mode the server answers in (the default, or a request's kvlib.mode), resolved; else an InputError.
    Every base is served: rerope and prefix keep conversations' prefixes (prefix_hits.py); prefix alone
    is a serving engine's prefix caching."""
    from kvlib.engine.spec import parse_mode

    return parse_mode(text)
