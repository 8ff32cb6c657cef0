"""Serve the run dashboard over an output root.

python -m services.dashboard --root outputs --port 8080          # then open http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from services.dashboard.app import STALE_AFTER_S, create_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.dashboard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="outputs", help="the output root holding run folders (run.output_root); default: outputs")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; default 127.0.0.1 (this machine only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--stale-after",
        type=float,
        default=STALE_AFTER_S,
        help="seconds without a new metrics line after which an unfinished run counts as aborted",
    )
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"dashboard: --root {str(root)!r} is not a folder; give the run.output_root of your runs (default outputs)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"dashboard: serving {root.resolve()} at http://{args.host}:{args.port}", flush=True)
    uvicorn.run(create_app(root, stale_after_s=args.stale_after), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
