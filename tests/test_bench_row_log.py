"""A measuring run's rows on disk: kept as they come, taken back by a run of the same identity only."""

from __future__ import annotations

import json

import pytest

from kvlib.bench.row_log import RowLog
from kvlib.errors import InputError

IDENTITY = {"model": "m", "fingerprint": "f" * 8, "ladder": ["", "blend:0.2"], "target": "gold"}


def test_rows_come_back_in_a_run_of_the_same_identity(tmp_path):
    path = tmp_path / "out" / "rows.jsonl"
    log = RowLog(path, IDENTITY)
    assert log.open() == {}
    log.append({"record": "a", "kl": [0.5, 0.1]})
    log.append({"record": 7, "kl": [0.4, 0.2]})
    assert RowLog(path, dict(IDENTITY)).open() == {"a": {"record": "a", "kl": [0.5, 0.1]},
                                                     "7": {"record": 7, "kl": [0.4, 0.2]}}


def test_a_row_cut_off_by_a_crash_is_dropped_and_the_next_starts_its_own_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    log = RowLog(path, IDENTITY)
    log.open()
    log.append({"record": "a", "kl": [0.5, 0.1]})
    with path.open("a") as f:
        f.write('{"record": "b", "kl": [0.')  # killed mid-write
    again = RowLog(path, IDENTITY)
    assert list(again.open()) == ["a"]
    again.append({"record": "b", "kl": [0.3, 0.1]})
    assert list(RowLog(path, IDENTITY).open()) == ["a", "b"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


@pytest.mark.parametrize("change", [{"target": "full"}, {"fingerprint": "g" * 8}, {"extra": 1}])
def test_rows_of_another_run_are_refused_by_name_and_left_alone(tmp_path, change):
    path = tmp_path / "rows.jsonl"
    log = RowLog(path, IDENTITY)
    log.open()
    log.append({"record": "a", "kl": [0.5, 0.1]})
    before = path.read_bytes()
    with pytest.raises(InputError, match=f"differs in: {next(iter(change))}.*another --out"):
        RowLog(path, {**IDENTITY, **change}).open()
    assert path.read_bytes() == before


def test_a_file_that_is_not_a_row_log_is_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("not json\n")
    with pytest.raises(InputError, match="another run"):
        RowLog(path, IDENTITY).open()
    assert path.read_text() == "not json\n"
