"""Two `kvlib serve` nodes on one machine over the shared services: node B's reuse of node A's stores.

Usage: python scripts/cluster_serve.py [--root .kvlib-cluster] [--sessions 8] [--turns 3]
           [--concurrency 1] [--max-tokens 16] [--models DIR] [--dtype D] [--check]

Reads `.services/env` (`make services`) and gives the run a fresh S3 prefix and a fresh PostgreSQL
database, so node B can find only what node A stored in this run. Then:
1. node A (ROOT/serve-a) answers the load sessions (kvlib/serve/loadgen.py) and stores its misses;
   once its /healthz shows its stores done and its upload queue empty, it is stopped;
2. node B (ROOT/serve-b, an empty local tier) answers the same sessions: cold (every hit is an S3
   read), then once more: warm (the hits are in its local tier);
3. ROOT/serve-load/summary.json and summary.md: per run, the cached share of prompt tokens, TTFT
   p50/p90 and the manifest's chunk count after it (B storing nothing shows as no new chunks).
The nodes run one at a time, so each has the machine's CPU to itself. Both homes link one model
cache (--models, default ROOT/models), so the model is dequantized once. --check is a small run
(2 sessions of 2 turns, 4 tokens) that exits 1 unless B reused A's KV and stored nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's kvlib, as the nodes get through PYTHONPATH

from kvlib.serve.node import ServeNode  # noqa: E402

TENANT = "loadgen"
IDLE_TIMEOUT_S = 1800  # node A stores a miss in about a second; a full run leaves a few hundred


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=REPO / ".kvlib-cluster")
    p.add_argument("--services-env", type=Path, default=REPO / ".services" / "env")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=1800.0, help="per run: no session starts after this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", type=Path, help="model cache to link as each home's models/ (default ROOT/models)")
    p.add_argument("--dtype", help="the nodes' compute dtype (default: their own choice)")
    p.add_argument("--check", action="store_true", help="a small run that fails unless B reused A's KV")
    args = p.parse_args(argv)
    if args.check:
        args.sessions, args.turns, args.max_tokens = 2, 2, 4
    return args


def read_env(path: Path) -> dict[str, str]:
    if not path.is_file():
        sys.exit(f"error: {path} not found: start the services with `make services`")
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def fresh_backends(services: dict[str, str]) -> tuple[str, str]:
    """(store, manifest) of this run alone: a new prefix in the services' bucket, a new database."""
    from kvlib.store.manifest import create_database

    run = uuid.uuid4().hex[:10]
    bucket = services["KVLIB_STORE"].removeprefix("s3://").split("/", 1)[0]
    return f"s3://{bucket}/cluster-{run}", create_database(services["KVLIB_MANIFEST"], f"kvlib_cluster_{run}")


def node_env(services: dict[str, str]) -> dict[str, str]:
    """The caller's environment with the services' AWS_* variables; backends go as flags, not KVLIB_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVLIB_")}
    env.update({k: v for k, v in services.items() if k.startswith("AWS_")})
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def make_home(root: Path, name: str, models: Path) -> tuple[Path, str]:
    """A fresh home whose models/ links the shared model cache, and an API key for TENANT in it."""
    from kvlib.serve.keys import KeyStore

    home = root / name
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    models.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(models.resolve(), target_is_directory=True)
    keys = KeyStore(home)
    try:
        return home, keys.add(TENANT)[0]
    finally:
        keys.close()


def start_node(home: Path, store: str, manifest: str, env: dict, dtype: str | None) -> ServeNode:
    args = ["--store", store, "--manifest", manifest, "--sync-interval", "5"] + (["--dtype", dtype] if dtype else [])
    return ServeNode(home, *args, env=env)


def warm_up(node: ServeNode, key: str) -> None:
    """One short request that touches no library segment: the first forward's one-time costs go here."""
    import openai

    client = openai.OpenAI(api_key=key, base_url=node.url + "/v1", max_retries=0, timeout=600)
    client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Say hi."}], max_tokens=2)


def chunk_count(manifest: str) -> int:
    from kvlib.store.manifest import open_manifest

    db = open_manifest(manifest)
    try:
        return int(db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])
    finally:
        db.close()


def load_run(node: ServeNode, key: str, args, label: str, manifest: str, out: Path) -> dict:
    """The sessions against one node; its loadgen summary, once its stores and uploads are done."""
    from kvlib.serve.loadgen import LoadConfig, run_load

    cfg = LoadConfig(url=node.url + "/v1", api_key=key, levels=[args.concurrency], sessions=args.sessions,
                     turns=args.turns, max_tokens=args.max_tokens, max_seconds=args.max_seconds, seed=args.seed)
    result = run_load(cfg, progress=lambda line: print(f"{label}: {line}", file=sys.stderr))
    (out / f"{label}.json").write_text(json.dumps(result, indent=2) + "\n")
    health = node.wait_idle(IDLE_TIMEOUT_S)
    return {"run": label, **result["levels"][0], "chunks_after": chunk_count(manifest), "health": health}


def run_cluster(args) -> dict:
    services = read_env(args.services_env)
    store, manifest = fresh_backends(services)
    env, models = node_env(services), args.models or args.root / "models"
    out = args.root / "serve-load"
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    home_a, key_a = make_home(args.root, "serve-a", models)
    node = start_node(home_a, store, manifest, env, args.dtype)
    try:
        warm_up(node, key_a)
        runs.append(load_run(node, key_a, args, "a", manifest, out))
    finally:
        node.stop()
    home_b, key_b = make_home(args.root, "serve-b", models)  # an empty local tier: B's hits come from S3
    node = start_node(home_b, store, manifest, env, args.dtype)
    try:
        warm_up(node, key_b)
        runs.append(load_run(node, key_b, args, "b-cold", manifest, out))
        runs.append(load_run(node, key_b, args, "b-warm", manifest, out))
    finally:
        node.stop()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {"store": store, "manifest": manifest.rpartition("@")[2], "config": config, "runs": runs}


def markdown(summary: dict) -> str:
    c = summary["config"]
    lines = [f"Node A, then node B over one S3 prefix and PostgreSQL database ({c['sessions']} sessions of "
             f"{c['turns']} turns, concurrency {c['concurrency']}, {c['max_tokens']} tokens per answer).", "",
             "| run | ok | errors | prompt tokens | cached tokens | cached share | TTFT p50 s | TTFT p90 s | "
             "chunks in the manifest after |", "| --- |" + " ---: |" * 8]
    names = {"a": "node A (first sight)", "b-cold": "node B, cold local tier", "b-warm": "node B, warm local tier"}
    for r in summary["runs"]:
        lines.append(f"| {names[r['run']]} | {r['ok']} | {r['errors']} | {r['prompt_tokens']} | {r['cached_tokens']} | "
                     f"{r['cached_share']} | {r['ttft_p50_s']} | {r['ttft_p90_s']} | {r['chunks_after']} |")
    return "\n".join(lines) + "\n"


def check(summary: dict) -> list[str]:
    """What a --check run must show: no errors, B's hits from A's stores, nothing stored by B."""
    a, cold, warm = summary["runs"]
    problems = [f"{r['run']}: {r['errors']} errors {r['error_examples']}" for r in summary["runs"] if r["errors"]]
    problems += [f"{r['run']}: no request answered" for r in summary["runs"] if not r["ok"]]
    if a["chunks_after"] == 0:
        problems.append("node A stored nothing")
    if not cold["cached_tokens"] or not warm["cached_tokens"]:
        problems.append(f"node B reused nothing (cold {cold['cached_tokens']}, warm {warm['cached_tokens']} cached)")
    if warm["chunks_after"] != a["chunks_after"]:
        problems.append(f"node B stored chunks of its own ({a['chunks_after']} -> {warm['chunks_after']})")
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = run_cluster(args)
    out = args.root / "serve-load"
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary)
    (out / "summary.md").write_text(text)
    sys.stdout.write(text)
    problems = check(summary) if args.check else []
    for problem in problems:
        print(f"check failed: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
