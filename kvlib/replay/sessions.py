"""Multi-turn RAG sessions as OpenAI request logs, built from HotpotQA and a folder of documents.

Design facts:
- A session asks one question per turn. Each turn retrieves passages for its question and
  keeps every passage shown before: documents accumulate, and the whole set is shuffled
  and renumbered each turn, as a re-ranking retriever does. History holds the earlier
  questions and answers without their documents; the documents sit in the last user message.
- Sessions rotate through three prompt formats (lost-in-the-middle `Document [n](Title: ...)`
  lines, `<document>` tags, markdown headings), so no one format is baked into the results.
- HotpotQA session s asks the questions of records s, s+1, ... (passages of neighbouring
  sessions overlap, as popular documents do in real traffic). Corpus sessions ask the
  questions of questions.jsonl, with passages of the document each question is about.
- Requests are written in time order in the recorded-exchange form: {"timestamp_rel_s",
  "session", "type": "request", "body": {...chat-completions request...}}.
- The serve load benchmark (issue 13) replays these same files.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from kvlib.errors import InputError

SYSTEM = "You are a helpful assistant. Answer the user's question from the documents they provide, briefly."
FORMATS = ("lost_in_the_middle", "document_tags", "markdown")
SESSION_GAP_S, TURN_GAP_S = 7.0, 45.0
PASSAGE_WORDS = 120  # a corpus passage is a run of paragraphs of about this many words


@dataclass(frozen=True)
class SessionSpec:
    hotpotqa: Path | None = None
    corpus: Path | None = None
    sessions: int = 40  # per source
    turns: int = 4
    seed: int = 0
    first_docs: int = 3  # passages retrieved for the first turn
    docs_per_turn: int = 2  # passages added by each later turn


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    passages: tuple[tuple[str, str], ...]  # (title, text) retrieved for this question


def format_documents(docs: list[tuple[str, str]], fmt: str) -> str:
    if fmt == "lost_in_the_middle":
        return "\n".join(f"Document [{i}](Title: {t}) {x}" for i, (t, x) in enumerate(docs, 1))
    if fmt == "document_tags":
        return "\n".join(f'<document index="{i}" title="{t}">\n{x}\n</document>' for i, (t, x) in enumerate(docs, 1))
    return "\n\n".join(f"## {t}\n\n{x}" for t, x in docs)


def user_message(docs: list[tuple[str, str]], question: str, fmt: str) -> str:
    lead = "Use the documents below (some may be irrelevant) to answer the question."
    return f"{lead}\n\n{format_documents(docs, fmt)}\n\nQuestion: {question}"


def hotpot_turns(path: Path, spec: SessionSpec, rng: random.Random) -> list[list[Turn]]:
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read HotpotQA file {path}: {exc}") from exc
    if not isinstance(records, list) or not records:
        raise InputError(f"{path}: expected a JSON list of HotpotQA records")
    sessions = []
    for s in range(spec.sessions):
        turns = []
        for k in range(spec.turns):
            r = records[(s + k) % len(records)]
            paras = [(t, "".join(sents).strip()) for t, sents in r["context"]]
            n = spec.first_docs if k == 0 else spec.docs_per_turn
            turns.append(Turn(r["question"], str(r["answer"]), tuple(rng.sample(paras, min(n, len(paras))))))
        sessions.append(turns)
    return sessions


def _passages(text: str, title: str) -> list[tuple[str, str]]:
    out, buf = [], []
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        buf.append(para.replace("\n", " "))
        if sum(len(b.split()) for b in buf) >= PASSAGE_WORDS:
            out.append((title, " ".join(buf)))
            buf = []
    if buf:
        out.append((title, " ".join(buf)))
    return out


def corpus_passages(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """Document path under the folder -> its passages (markdown/text files; articles.jsonl one document per line)."""
    docs = {}
    for f in sorted(folder.rglob("*")):
        if f.suffix in (".md", ".txt"):
            docs[f.relative_to(folder).as_posix()] = _passages(f.read_text(encoding="utf-8"), f.stem.replace("_", " "))
        elif f.name == "articles.jsonl":
            for line in f.read_text(encoding="utf-8").splitlines():
                a = json.loads(line)
                docs[str(a.get("id"))] = _passages(a["text"], a.get("title", ""))
    return docs


def corpus_turns(folder: Path, spec: SessionSpec, rng: random.Random) -> list[list[Turn]]:
    docs = corpus_passages(folder)
    qfile = folder / "questions.jsonl"
    if not qfile.exists() or not docs:
        raise InputError(f"{folder}: expected documents and a questions.jsonl")
    qs = [json.loads(line) for line in qfile.read_text(encoding="utf-8").splitlines() if line.strip()]
    about = [[q["doc"]] if isinstance(q.get("doc"), str) else list(q.get("doc") or []) for q in qs]
    qs = [(q, names) for q, names in zip(qs, about) if names and all(n in docs for n in names)]
    sessions = []
    for s in range(spec.sessions):
        turns = []
        for k in range(spec.turns):
            q, names = qs[(s * spec.turns + k) % len(qs)]
            pool = [p for name in names for p in docs[name]]
            n = spec.first_docs if k == 0 else spec.docs_per_turn
            turns.append(Turn(q["question"], str(q["answers"][0]), tuple(rng.sample(pool, min(n, len(pool))))))
        sessions.append(turns)
    return sessions


def session_requests(sid: str, turns: list[Turn], fmt: str, start: float, rng: random.Random) -> Iterator[dict]:
    """One request line per turn; documents accumulate, then are shuffled and renumbered."""
    shown: list[tuple[str, str]] = []
    history: list[dict] = [{"role": "system", "content": SYSTEM}]
    for k, turn in enumerate(turns):
        shown += [p for p in turn.passages if p not in shown]
        docs = list(shown)
        rng.shuffle(docs)
        messages = history + [{"role": "user", "content": user_message(docs, turn.question, fmt)}]
        yield {"timestamp_rel_s": start + k * TURN_GAP_S, "session": sid, "type": "request",
               "body": {"model": "default", "messages": messages, "max_tokens": 64, "temperature": 0}}
        history = history + [{"role": "user", "content": turn.question},
                             {"role": "assistant", "content": f"The answer is {turn.answer}."}]


def build_sessions(spec: SessionSpec) -> list[dict]:
    rng = random.Random(spec.seed)
    sources = []
    if spec.hotpotqa is not None:
        sources.append(("hotpotqa", hotpot_turns(spec.hotpotqa, spec, rng)))
    if spec.corpus is not None:
        sources.append(("corpus", corpus_turns(spec.corpus, spec, rng)))
    if not sources:
        raise InputError("give --hotpotqa and/or --corpus")
    lines, n = [], 0
    for name, sessions in sources:
        for s, turns in enumerate(sessions):
            fmt = FORMATS[s % len(FORMATS)]
            lines += session_requests(f"{name}-{s:03d}", turns, fmt, n * SESSION_GAP_S, rng)
            n += 1
    return sorted(lines, key=lambda line: line["timestamp_rel_s"])


def write_sessions(out: Path, spec: SessionSpec) -> int:
    lines = build_sessions(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return len(lines)


def write_synthetic_segments(out: Path, tokens: int, seed: int = 0) -> int:
    """A segment trace of about `tokens` prompt tokens shaped like a RAG service's: a few shared
    system prompts, Zipf-popular passages from a pool of a million, unique history and questions.
    For memory and speed checks only; its shares say nothing about real traffic."""
    rng = random.Random(seed)
    pool = range(1_000_000)
    cum = list(itertools.accumulate(1.0 / (i + 1) ** 0.8 for i in pool))  # once: choices() would redo it per call
    n = total = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        while total < tokens:
            segs = [{"kind": "system", "id": f"s{rng.randrange(10)}-{j}", "tokens": 512} for j in range(3)]
            segs.append({"kind": "history", "id": f"h{n}", "tokens": rng.randrange(10, 400)})
            for p in rng.choices(pool, cum_weights=cum, k=6):
                segs.append({"kind": "passage", "id": f"p{p}", "tokens": 100 + p % 300})
            segs.append({"kind": "question", "id": f"q{n}", "tokens": rng.randrange(5, 40)})
            size = sum(s["tokens"] for s in segs)
            f.write(json.dumps({"t": n * 0.5, "session": f"u{rng.randrange(n // 4 + 1)}", "segments": segs}) + "\n")
            n, total = n + 1, total + size
    return n
