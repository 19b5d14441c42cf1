"""The library commands, run through Typer's CliRunner on a private app."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from kvlib.cli.library_cmds import register
from kvlib.store import Library
from store_helpers import blob_files, put_chunk

COMMANDS = ("inspect", "ls", "stats", "verify", "gc")


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)
    return app


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A small library: two public chunks in a document, one private chunk of alice."""
    for name in ("KVLIB_HOME", "KVLIB_TENANT"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    with Library(home) as library:
        library.register_model("test-model-fp", "tiny", {"layers": 2})
        keys = [put_chunk(library, seed).key for seed in range(2)]
        library.set_document(tenant="public", public=True, path="doc.txt", content_hash="h", chunk_keys=keys)
        secret = put_chunk(library, 9, tenant="alice", public=False).key
    return {"path": home, "public": keys[0].hex, "secret": secret.hex}


def run(app, *args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def test_every_command_has_help_text(app):
    names = {command.name for command in app.registered_commands}
    assert names == set(COMMANDS)
    for command in app.registered_commands:
        assert (command.callback.__doc__ or "").strip(), f"{command.name} has no help text"
        result = run(app, command.name, "--help")
        assert result.exit_code == 0 and "--home" in result.stdout and "--json" in result.stdout


@pytest.mark.parametrize(
    "args, expected_error",
    [
        (["inspect", "deadbeef00"], "chunk deadbeef00 not found"),
        (["inspect", "{secret}"], "chunk {secret} not found"),  # alice's chunk, seen by the public tenant
        (["inspect", "{secret}", "--tenant", "bob"], "chunk {secret} not found"),
        (["inspect", "abc"], "too short"),
        (["inspect", "not-hex!"], "hex digits expected"),
        (["inspect", "{public}", "--tenant", "bad tenant"], "invalid tenant name"),
        (["ls", "--home", "{missing}"], "no library at"),
        (["stats", "--home", "{garbage}"], "cannot open manifest"),
    ],
)
def test_errors_are_one_red_line_and_exit_1(app, home, tmp_path, args, expected_error):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "manifest.sqlite").write_bytes(b"not a database" * 100)
    values = {"secret": home["secret"], "public": home["public"], "missing": tmp_path / "nowhere", "garbage": garbage}
    args = [arg.format(**values) for arg in args]
    if "--home" not in args:
        args += ["--home", str(home["path"])]
    result = run(app, *args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert expected_error.format(**values) in lines[0]
    assert "Traceback" not in result.output


def test_secret_chunk_is_visible_to_its_owner(app, home):
    result = run(app, "inspect", home["secret"][:10], "--tenant", "alice", "--home", home["path"], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["owner"] == "alice"


@pytest.mark.parametrize(
    "args, check",
    [
        (["inspect", "{public8}"], lambda data: data["model_name"] == "tiny" and data["checksum_status"] == "ok"),
        (["ls"], lambda data: [d["path"] for d in data["documents"]] == ["doc.txt"]),
        (["ls", "--chunks"], lambda data: len(data["chunks"]) == 2),
        (["ls", "--chunks", "--tenant", "alice"], lambda data: len(data["chunks"]) == 3),
        (["stats"], lambda data: (data["documents"], data["chunks"], data["dedup_ratio"]) == (1, 2, 1.0)),
        (["verify", "--all"], lambda data: data == {"ok": True, "problems": []}),
        (["gc"], lambda data: data["orphan_blobs"] == [] and data["temp_files"] == []),
    ],
)
def test_json_output_parses(app, home, args, check):
    args = [arg.format(public8=home["public"][:8]) for arg in args]
    result = run(app, *args, "--home", home["path"], "--json")
    assert result.exit_code == 0, result.output
    assert check(json.loads(result.stdout))


@pytest.mark.parametrize("args", [["inspect", "{public8}"], ["ls"], ["ls", "--chunks"], ["stats"], ["verify"], ["gc"]])
def test_tables_render(app, home, args):
    result = run(app, *[arg.format(public8=home["public"][:8]) for arg in args], "--home", home["path"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()


def test_verify_exits_1_on_problems(app, home):
    path = blob_files(home["path"])[0]
    path.write_bytes(path.read_bytes()[:-8] + b"\xff" * 8)
    result = run(app, "verify", "--all", "--home", home["path"], "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert not data["ok"] and data["problems"][0]["key"] == path.stem
    assert "1 chunks failed verification" in result.stderr
