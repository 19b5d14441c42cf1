"""Split a QA file into dev.json and test.json sharing no question (deterministic; see kvlib/bench/split.py).

    python scripts/split_qa.py ../shared/data/hotpotqa/qa_train.json --test 40 --out build/guard-split
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvlib.bench.split import write_split
from kvlib.errors import KvlibError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="QA file: a JSON list or JSON lines of records")
    parser.add_argument("--test", type=int, required=True, help="records in the test part")
    parser.add_argument("--out", type=Path, required=True, help="folder for dev.json and test.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    args = parser.parse_args()
    try:
        print(json.dumps(write_split(args.source, args.out, args.test, args.seed)))
    except (KvlibError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
