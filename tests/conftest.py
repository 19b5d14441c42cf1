import os
import sys
from pathlib import Path

# Tests never touch a model hub, and import the tiny-model helpers beside them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest


@pytest.fixture(scope="session")
def smol_home(tmp_path_factory):
    """One temporary library home per test session: the GGUF is dequantized into it once."""
    return tmp_path_factory.mktemp("kvlib-home")


@pytest.fixture(scope="session")
def smol_engine(smol_home):
    """The real default model in float32 (exactness tests)."""
    from kvlib.engine.session import Engine

    return Engine.load(None, smol_home, dtype="float32")


# -- shared by the RAG integration tests (test_rag_*.py) -------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = REPO_ROOT / "examples" / "corpus"


@pytest.fixture(scope="session")
def smol_embedder():
    """One sentence-transformers embedder for the session (it loads lazily, on first embed)."""
    from kvlib.retrieve.embed import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def make_home(smol_home, smol_engine):
    """A fresh library home whose model cache links to the session's dequantized model.

    A CLI command (or a `kvlib` subprocess) loads the model from `<home>/models`; linking it
    saves the ~30 s GGUF dequantization per home. Depends on smol_engine so the cache exists.
    """
    def make(parent: Path, name: str = "home") -> Path:
        home = parent / name
        home.mkdir(parents=True)
        (home / "models").symlink_to(smol_home / "models", target_is_directory=True)
        return home

    return make


@pytest.fixture(scope="session")
def smol_stack(smol_engine, smol_embedder):
    """Open a home's stack around the session engine and embedder; the caller closes it."""
    from kvlib.rag.stack import open_stack

    def open_(home: Path):
        stack = open_stack(home, engine=smol_engine)
        stack.embedder = smol_embedder
        return stack

    return open_


@pytest.fixture(scope="session")
def ingested_home(tmp_path_factory, make_home, smol_stack):
    """examples/corpus/ ingested once per session (about two minutes on 2 CPU cores).

    Returns (home, first IngestReport). Tests that damage blobs must use their own home.
    """
    from kvlib.rag.ingest import Ingestor

    home = make_home(tmp_path_factory.mktemp("ingested"))
    stack = smol_stack(home)
    try:
        report = Ingestor(stack.engine, stack.library, stack.index, stack.embedder).run([CORPUS])
    finally:
        stack.close()
    return home, report


@pytest.fixture(scope="session")
def kvlib_cli(smol_engine, smol_embedder):
    """Run `kvlib ARGS...` in-process (Typer's CliRunner), blind to the caller's KVLIB_* variables.

    A command asking for the default model in float32 gets the session engine and embedder
    instead of loading its own (~8 s each on 2 cores); other models and dtypes load for real.
    Either way the command runs its own code from argument parsing to output.
    """
    from typer.testing import CliRunner

    import kvlib.retrieve.embed
    from kvlib.cli.app import app
    from kvlib.engine.session import Engine

    env = {"KVLIB_HOME": None, "KVLIB_TENANT": None, "KVLIB_MODEL": None}
    real_load = Engine.load.__func__

    def load(cls, model, home, *, dtype=None, device=None):
        if model is None and dtype == "float32" and device is None:
            return smol_engine
        return real_load(cls, model, home, dtype=dtype, device=device)

    def invoke(*args):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Engine, "load", classmethod(load))
            patch.setattr(kvlib.retrieve.embed, "Embedder", lambda: smol_embedder)
            return CliRunner().invoke(app, [str(arg) for arg in args], env=env)

    return invoke
