"""``python -m raygrpo.plan CONFIG [key.path=value ...] [--gpu-memory 80GiB] [--mfu 0.4] [--json]``.

Prints the resource plan of a run config (raygrpo/plan/__init__.py); exit 0 when it fits, 1 when it
does not, 2 when it cannot be planned (config, unknown architecture).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from raygrpo.config import ConfigError, load_config
from raygrpo.plan import DEFAULT_GPU_FLOPS, DEFAULT_MFU, ArchitectureError, make_plan, parse_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raygrpo.plan", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="YAML run config, e.g. cluster/flux.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.num_ranks=16")
    parser.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU (default 80GiB; H200: 141GB)")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"assumed model FLOPs utilisation (default {DEFAULT_MFU})")
    parser.add_argument("--gpu-flops", type=float, default=DEFAULT_GPU_FLOPS, help="peak FLOP/s of one GPU (default: H100/H200 bf16 dense)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        config = load_config(args.config, args.overrides)
        plan = make_plan(
            config, mfu=args.mfu, gpu_memory_bytes=parse_bytes(args.gpu_memory), gpu_flops=args.gpu_flops,
            config_name=args.config,
        )  # fmt: skip
    except (ConfigError, ArchitectureError, ValueError) as exc:
        print(f"raygrpo.plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
