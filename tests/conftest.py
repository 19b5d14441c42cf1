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
