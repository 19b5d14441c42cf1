"""Merge a QA file's passages into ones of about N tokens (kvlib/bench/passages.py), one file per N.

    python scripts/merge_passages.py build/guard-split/test.json --tokens 128,256,512 --out build/passage-length
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvlib.bench.passages import write_merged  # noqa: E402
from kvlib.errors import KvlibError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="QA file in any form `kvlib bench --data` reads")
    parser.add_argument("--tokens", default="128,256,512", help="comma list of target passage lengths")
    parser.add_argument("--out", type=Path, required=True, help="folder for merged-<N>.json")
    parser.add_argument("--model", default=None, help="tokenizer's model (default SmolLM2)")
    parser.add_argument("--home", type=Path, default=Path.home() / ".kvlib", help="library home holding the model")
    args = parser.parse_args()
    try:
        from kvlib.replay.shape import load_tokenizer_and_shape

        targets = [int(t) for t in args.tokens.split(",") if t.strip()]
        tokenizer = load_tokenizer_and_shape(args.model, args.home)[0]
        for n in targets:
            print(json.dumps(write_merged(args.source, args.out / f"merged-{n}.json", tokenizer, n)))
    except ValueError:
        print(f"error: --tokens must be a comma list of integers, got {args.tokens!r}", file=sys.stderr)
        return 1
    except (KvlibError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
