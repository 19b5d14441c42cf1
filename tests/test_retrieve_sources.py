"""Reading a corpus: supported files become documents, everything else is skipped with a reason."""

import hashlib
import json

import pytest

from kvlib.errors import InputError
from kvlib.retrieve.sources import iter_sources


def _write_corpus(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("Alpha text.\n")
    (root / "sub" / "b.md").write_text("# Bravo\n\nBody.\n")
    (root / "sub" / "deeper" / "c.TXT").write_text("Charlie.")
    records = [
        json.dumps({"id": "intro", "title": "Intro", "text": "First record."}),
        json.dumps({"text": "Second record, no id."}),
        "{not json",
        json.dumps({"title": "no text"}),
        json.dumps({"id": 7, "text": "Seventh."}),
    ]
    (root / "data.jsonl").write_text("\n".join(records) + "\n")
    (root / "binary.txt").write_bytes(b"abc\x00def")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "blank.md").write_text("  \n\t\n")
    (root / "image.png").write_bytes(b"\x89PNG")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main")


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    # Relative paths are part of the contract, so run from tmp_path (never the working tree).
    monkeypatch.chdir(tmp_path)
    _write_corpus(tmp_path / "corpus")
    return tmp_path / "corpus"


def test_folder_is_read_recursively_in_sorted_order(corpus):
    docs, _ = iter_sources([corpus.relative_to(corpus.parent)])
    assert [d.path for d in docs] == [
        "corpus/a.txt",
        "corpus/data.jsonl#intro",
        "corpus/data.jsonl#2",
        "corpus/data.jsonl#7",
        "corpus/sub/b.md",
        "corpus/sub/deeper/c.TXT",
    ]
    assert docs[0].text == "Alpha text.\n"
    assert docs[0].content_hash == hashlib.sha256(b"Alpha text.\n").hexdigest()


def test_jsonl_records_are_documents_with_title_heading(corpus):
    docs, _ = iter_sources([corpus / "data.jsonl"])
    by_path = {d.path.rsplit("#", 1)[1]: d.text for d in docs}
    assert by_path == {"intro": "# Intro\n\nFirst record.", "2": "Second record, no id.", "7": "Seventh."}


def test_unreadable_inputs_are_skipped_with_reasons(corpus):
    _, skipped = iter_sources([corpus.relative_to(corpus.parent)])
    reasons = {(s.path, s.reason.split(" (")[0]) for s in skipped}
    assert reasons == {
        ("corpus/.git", "hidden directory"),
        ("corpus/binary.txt", "binary file"),
        ("corpus/blank.md", "empty or whitespace-only"),
        ("corpus/data.jsonl", "line 3: invalid JSON"),
        ("corpus/data.jsonl", "line 4: no string 'text' field"),
        ("corpus/image.png", "unsupported extension '.png'"),
        ("corpus/latin1.txt", "not valid UTF-8"),
    }


def test_single_files_absolute_paths_and_duplicates(corpus):
    file = corpus / "sub" / "b.md"
    docs, skipped = iter_sources([file, corpus / "sub", file])
    assert [d.path for d in docs] == [str(file), str(corpus / "sub" / "deeper" / "c.TXT")], "b.md is read once"
    assert skipped == []


def test_paths_are_normalised(corpus):
    docs, _ = iter_sources([corpus.parent / "corpus" / "sub" / ".." / "a.txt"])
    assert [d.path for d in docs] == [str(corpus / "a.txt")]


def test_missing_path_raises_input_error(corpus):
    with pytest.raises(InputError, match="path not found: .*nope.txt"):
        iter_sources([corpus / "a.txt", corpus / "nope.txt"])


def test_reading_is_deterministic(corpus):
    assert iter_sources([corpus]) == iter_sources([corpus])
