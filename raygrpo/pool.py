"""Resize a running run's rollout pool, or show it (raygrpo/rollout/control.py has the channel, the README the how-to).

    python -m raygrpo.pool outputs/tiny-20261123-101500 --workers 3            # ask for 3 rollout workers
    python -m raygrpo.pool outputs/tiny-20261123-101500 --workers 3 --wait 300 # ... and wait until 3 take work
    python -m raygrpo.pool outputs/tiny-20261123-101500                        # the pool's status
    python -m raygrpo.pool RUN_DIR --workers 2 --token-env POOL_TOKEN          # signed (rollout.autoscale.token_env)

Under Ray Jobs it runs as its own job against the same run folder (``ray job submit -- python -m raygrpo.pool ...``).
Exit status: 0 done, 1 not applied within ``--wait`` seconds (or refused), 2 not a run folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from raygrpo.rollout.control import read_status, token_from_env, write_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raygrpo.pool", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run's folder (<run.output_root>/<name>-<timestamp>)")
    parser.add_argument("--workers", type=int, help="rollout workers to aim for (within rollout.autoscale min..max)")
    parser.add_argument("--token-env", help="NAME of the environment variable holding the pool token (rollout.autoscale.token_env)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait until that many workers take work")
    args = parser.parse_args(argv)
    if not (args.run_dir / "run_state.json").exists():
        print(f"{args.run_dir} is not a run folder (no run_state.json)", file=sys.stderr)
        return 2
    if args.workers is None:
        print(json.dumps(read_status(args.run_dir), indent=1))
        return 0
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        command = write_command(args.run_dir, args.workers, token_from_env(args.token_env))
    except ValueError as exc:
        parser.error(str(exc))
    print(f"asked {args.run_dir} for {args.workers} rollout workers (applied after the step running now)")
    deadline = time.monotonic() + args.wait
    while True:
        status = read_status(args.run_dir) or {}
        last = status.get("last_command", {})
        if last.get("nonce") == command.nonce and not last.get("outcome", "").startswith("applied"):
            print(f"not applied: {last.get('outcome')}", file=sys.stderr)
            return 1
        if last.get("nonce") == command.nonce and status.get("pool_size") == status.get("target"):
            print(f"{status['pool_size']} rollout workers take work (step {status['step']})")
            return 0
        if time.monotonic() >= deadline:
            if args.wait:
                print(f"not done within {args.wait:g} s; status: {json.dumps(status)}", file=sys.stderr)
            return 1 if args.wait else 0
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
