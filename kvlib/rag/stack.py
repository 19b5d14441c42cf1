"""Open the pieces a command needs (engine, library, index, embedder) from one home."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvlib.engine.session import Engine
    from kvlib.retrieve.embed import Embedder
    from kvlib.retrieve.index import VectorIndex
    from kvlib.store.library import Library

INDEX_DIR = "index"


@dataclass
class Stack:
    home: Path
    engine: "Engine"
    library: "Library"
    index: "VectorIndex"
    embedder: "Embedder"

    def close(self) -> None:
        self.index.close()
        self.library.close()


def open_stack(home: Path, *, model: str | None = None, dtype: str | None = None, device: str | None = None,
               max_bytes: int | None = None, engine=None) -> Stack:
    from kvlib.engine.session import Engine
    from kvlib.retrieve.embed import Embedder
    from kvlib.retrieve.index import VectorIndex
    from kvlib.store.library import Library

    home.mkdir(parents=True, exist_ok=True)
    engine = engine or Engine.load(model, home, dtype=dtype, device=device)
    return Stack(home=home, engine=engine, library=Library(home, max_bytes=max_bytes),
                 index=VectorIndex(home / INDEX_DIR), embedder=Embedder())
