"""Several processes and hard crashes: the library stays consistent on disk."""

from __future__ import annotations

import signal
import subprocess
import time

from kvlib.store import Library
from kvlib.store.blobs import checksum_file
from kvlib.store.keys import ChunkKey
from store_helpers import blob_files, temp_files, writer_command, writer_env

# 2 layers x 2 heads x 8 dims x 2 tensors x fp16 = 128 bytes per token: a 32 MB
# blob takes long enough to write and fsync that the parent can see its temp
# file and kill the writer in the middle of it.
CRASH_TOKENS = 1 << 18
WAIT_S = 120
KILL_ATTEMPTS = 3


def _start_writer(tmp_path, home, go, seeds, *, value_offset=0, tokens=6):
    args = [*writer_command(tmp_path), str(home), str(go), str(value_offset), str(tokens), *map(str, seeds)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=writer_env())


def _assert_consistent(library: Library) -> None:
    """Every row has a whole blob with its checksum, and every blob a row."""
    rows = {row["key"]: row["checksum"] for row in library.db.query("SELECT key, checksum FROM chunks")}
    files = {path.stem: path for path in blob_files(library.home)}
    assert set(rows) == set(files), "rows and blob files must be the same set of keys"
    for key, checksum in rows.items():
        assert checksum_file(library.blobs.path_for(ChunkKey(key))) == checksum, f"row {key[:12]} points at a bad blob"
    assert library.verify() == []


def _kill_during_a_write(tmp_path, home, seeds) -> tuple[set[str], bool]:
    """Start a writer, let two chunks land, SIGKILL it while a temp file exists.

    Returns the keys it reported as stored and whether a partial write was left.
    """
    go = tmp_path / "go"
    go.touch()
    writer = _start_writer(tmp_path, home, go, seeds, tokens=CRASH_TOKENS)
    landed = {writer.stdout.readline().strip() for _ in range(2)}
    assert all(landed), writer.stderr.read()
    deadline = time.monotonic() + WAIT_S
    while not temp_files(home) and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    writer.send_signal(signal.SIGKILL)
    writer.wait(WAIT_S)
    writer.stdout.close()
    writer.stderr.close()
    return landed, bool(temp_files(home))


def test_sigkill_mid_write_leaves_a_library_gc_can_clean(tmp_path):
    home = tmp_path / "home"
    Library(home).close()
    landed: set[str] = set()
    for attempt in range(KILL_ATTEMPTS):  # a kill can miss the write window; the temp check says if it hit
        keys, left_partial = _kill_during_a_write(tmp_path, home, range(attempt * 100, attempt * 100 + 10))
        landed |= keys
        if left_partial:
            break
    assert left_partial, f"no kill landed mid-write in {KILL_ATTEMPTS} attempts"

    with Library(home) as library:
        report = library.gc()
        assert report.temp_files and temp_files(home) == [], f"gc must remove the partial write: {report}"
        _assert_consistent(library)
        stored = {row["key"] for row in library.db.query("SELECT key FROM chunks")}
        assert landed <= stored, "chunks reported as written must survive the crash"


def test_two_processes_writing_overlapping_chunks(tmp_path):
    home, go = tmp_path / "home", tmp_path / "go"
    Library(home).close()
    # Both write seeds 12..47 at the same moment (after 12 private-to-each seeds),
    # and the second with different tensor values for the same keys: the row's
    # checksum must still describe whichever file is on disk.
    first = _start_writer(tmp_path, home, go, [*range(12), *range(12, 48)])
    second = _start_writer(tmp_path, home, go, [*range(48, 60), *range(12, 48)], value_offset=1000)
    go.touch()
    outputs = [proc.communicate(timeout=WAIT_S) for proc in (first, second)]
    for proc, (_, err) in zip((first, second), outputs):
        assert proc.returncode == 0, err
    written = [set(out.split()) for out, _ in outputs]
    assert len(written[0]) == len(written[1]) == 48 and len(written[0] & written[1]) == 36

    with Library(home) as library:
        count = library.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        assert count == len(blob_files(home)) == 60, "every chunk exactly once, as a row and as a blob"
        assert temp_files(home) == []
        _assert_consistent(library)
