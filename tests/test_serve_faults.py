"""Documents, anonymous callers, and a SIGKILL mid-request: the library stays verifiable
and the server restarts cleanly on the same home."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from serve_helpers import REPO_ROOT, Server, add_key, new_home, run_kvlib, wait_until

pytestmark = pytest.mark.slow
CORPUS = REPO_ROOT / "examples" / "corpus"


def post_document(server, key, **body):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/documents", json=body, headers=headers, timeout=600)


def long_text() -> str:
    """Several thousand tokens of real prose: enough chunks that ingest takes seconds."""
    return "\n\n".join(p.read_text() for p in sorted(CORPUS.glob("*.md")))


def test_kill9_mid_request_then_verify_and_restart(tmp_path, smol_home):
    home = new_home(tmp_path, smol_home)
    alice, admin = add_key(home, "alice"), add_key(home, "public", admin=True)
    server = Server(home, "--allow-anonymous")
    try:
        first = post_document(server, alice, name="ferry", text=(CORPUS / "ferry_notes.txt").read_text())
        assert first.status_code == 200 and first.json()["chunks_new"] >= 1, first.text
        outcome: dict = {}

        def ingest_long():
            try:
                outcome["response"] = post_document(server, alice, name="long", text=long_text())
            except httpx.HTTPError as exc:
                outcome["error"] = exc

        sender = threading.Thread(target=ingest_long)
        sender.start()
        wait_until(lambda: server.health()["running"] == 1, 60, "the long ingest to reach the engine")
        time.sleep(2.0)  # inside the ingest: encoding and blob writes under way
        server.kill9()
        sender.join(60)
        assert "error" in outcome, "the kill must land mid-request (the ingest had already finished)"
    finally:
        server.stop()
    verify = run_kvlib("verify", "--all", "--home", home)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    server = Server(home, "--allow-anonymous")
    try:
        again = post_document(server, alice, name="ferry", text=(CORPUS / "ferry_notes.txt").read_text())
        assert again.json()["unchanged"], "the document stored before the kill is intact and known"
        # anonymous callers send no Authorization header (the openai client always sends one)
        anon = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": "default", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2})
        assert anon.status_code == 200 and anon.json()["choices"][0]["message"]["content"] is not None
        with pytest.raises(openai.AuthenticationError):  # a wrong key is refused, anonymous or not
            server.client("kvl-wrong").models.list()
        assert post_document(server, None, text="anonymous text").status_code == 403
        refused = post_document(server, alice, text="shared text", public=True)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_required"
        shared = post_document(server, admin, text="The Brennock ferry leaves at nine.", public=True)
        assert shared.status_code == 200 and shared.json()["tenant"] == "public"
    finally:
        server.stop()
    verify = run_kvlib("verify", "--all", "--home", home)
    assert verify.returncode == 0, verify.stdout + verify.stderr
