"""Rows a long measuring run has finished, kept on disk as they come, so that a run cut short resumes.

Design facts:
- One JSONL file: the first line is the run's identity (everything a row's numbers depend
  on: the model's fingerprint, the data, the ladder, the target...), each further line one
  finished row, keyed by its record. A row is written, flushed and fsynced when it is done,
  so a crash (or kill -9) loses at most the request being measured. `kvlib calibrate --out
  DIR` keeps DIR/rows.jsonl: 60 SmolLM2 requests take ~25 minutes here, a larger model's hours.
- A run with the same identity takes the rows back and measures only the records still
  missing; a last line cut off mid-write is dropped (its request is measured again). A file of
  another identity is one error naming the fields that differ: rows of two settings are never
  mixed, and nothing is overwritten; the user picks another DIR or removes the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvlib.errors import InputError

KIND = "kvlib-measured-rows"


class RowLog:
    def __init__(self, path: Path, identity: dict) -> None:
        self.path, self.identity = Path(path), {"kind": KIND, **identity}

    def open(self) -> dict[str, dict]:
        """The rows finished before, by record (a fresh file holds only the identity); refuses a file of another run."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write(self.identity, mode="w")
            return {}
        raw = self.path.read_bytes()
        lines = raw.decode("utf-8", errors="replace").splitlines()
        header = _parse(lines[0]) if lines else None
        if header != self.identity:
            differ = sorted(k for k in set(self.identity) | set(header or {})
                            if (header or {}).get(k) != self.identity.get(k))
            raise InputError(f"{self.path} holds rows of another run (differs in: {', '.join(differ) or 'format'}): "
                             "give another --out, or remove the file to measure again")
        rows = {}
        for line in lines[1:]:
            row = _parse(line)
            if isinstance(row, dict) and "record" in row:  # a line cut off by a crash parses as nothing
                rows[str(row["record"])] = row
        if not raw.endswith(b"\n"):
            self._rewrite(rows)  # the next row must start on a line of its own
        return rows

    def append(self, row: dict) -> None:
        self._write(row, mode="a")

    def _rewrite(self, rows: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in [self.identity, *rows.values()]))
        os.replace(tmp, self.path)

    def _write(self, obj: dict, mode: str) -> None:
        with self.path.open(mode, encoding="utf-8") as f:
            f.write(json.dumps(obj, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _parse(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
