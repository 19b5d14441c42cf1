"""`kvlib keys add|ls|revoke`: a key is printed once, and the home keeps only its sha256."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from kvlib.cli.app import app
from kvlib.serve.keys import KEYS_FILE, KeyStore


def kvlib(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"KVLIB_HOME": None})


def test_keys_store_only_the_hash_and_revoke_takes_effect(tmp_path):
    added = kvlib("keys", "add", "alice", "--json", "--home", tmp_path)
    assert added.exit_code == 0, added.output
    info = json.loads(added.stdout)
    key = info["key"]
    stored = (tmp_path / KEYS_FILE).read_bytes()
    assert key.encode() not in stored and key[4:20].encode() not in stored, "no part of the key is stored"
    assert hashlib.sha256(key.encode()).hexdigest().encode() in stored
    store = KeyStore(tmp_path)
    assert store.lookup(key).tenant == "alice"
    listed = kvlib("keys", "ls", "--json", "--home", tmp_path)
    assert [(r["id"], r["tenant"], r["revoked"]) for r in json.loads(listed.stdout)] == [(info["id"], "alice", None)]
    assert kvlib("keys", "revoke", info["id"], "--home", tmp_path).exit_code == 0
    assert store.lookup(key) is None, "a revoked key authenticates no one"
    store.close()


@pytest.mark.parametrize("args, expected_error", [
    (["keys", "add", "public"], "--admin"),
    (["keys", "add", "bad tenant!"], "invalid tenant name"),
    (["keys", "revoke", "deadbeef"], "no key with id"),
])
def test_keys_errors_are_one_line(tmp_path, args, expected_error):
    result = kvlib(*args, "--home", tmp_path)
    assert result.exit_code == 1 and expected_error in result.output, result.output
