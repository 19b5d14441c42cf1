"""Split a QA file into a development part and a test part that share no question.

Design facts:
- Deterministic and independent of file order: records are grouped by their normalised
  question (bench.metrics.normalize_answer), groups are ordered by sha256(seed, question),
  and whole groups go to the test part until it holds `n_test` records. A question asked
  twice can never sit on both sides.
- Records are copied as they are (any form the bench reads), so both parts load exactly as
  the original file does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kvlib.bench.metrics import normalize_answer
from kvlib.errors import InputError


def split_records(records: list[dict], n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(dev, test), each in the input's order."""
    if not 0 < n_test < len(records):
        raise InputError(f"--test must lie between 1 and {len(records) - 1} (the file has {len(records)} records)")
    groups: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        question = rec.get("question") if isinstance(rec, dict) else None
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"record {i} has no question")
        groups.setdefault(normalize_answer(question), []).append(i)
    ranked = sorted(groups, key=lambda q: hashlib.sha256(f"{seed}\0{q}".encode()).hexdigest())
    test: set[int] = set()
    for q in ranked:
        if len(test) >= n_test:
            break
        test.update(groups[q])
    return ([r for i, r in enumerate(records) if i not in test], [r for i, r in enumerate(records) if i in test])


def read_records(path: Path) -> list[dict]:
    """A JSON list or JSON lines."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list or JSON lines of records")
    return data


def write_split(source: Path, out_dir: Path, n_test: int, seed: int = 0) -> dict:
    """Write out_dir/dev.json and out_dir/test.json; returns their paths and sizes."""
    dev, test = split_records(read_records(source), n_test, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"dev": out_dir / "dev.json", "test": out_dir / "test.json"}
    for name, part in (("dev", dev), ("test", test)):
        paths[name].write_text(json.dumps(part) + "\n", encoding="utf-8")
    return {"dev": str(paths["dev"]), "test": str(paths["test"]), "n_dev": len(dev), "n_test": len(test)}
