import os
import sys
from pathlib import Path

# Tests never touch a model hub, and import the tiny-model helpers beside them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
