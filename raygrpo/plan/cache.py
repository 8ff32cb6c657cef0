"""A config's plan measurements kept on disk, so that a repeated or resumed launch does not dry-run again.

The driver's preflight keeps them under ``<run.output_root>/.plans/``, one JSON file per key. The key is
a digest of everything the numbers depend on: the whole config (every default filled in), the
architecture's component configs, whether the other checkpointing setting was measured too, the
versions of raygrpo, torch, diffusers and transformers, and raygrpo's own source files (the dry run
runs the adapters, the learner's preparation and the algorithms' losses, which change between
releases during development). Only the measurements are kept: the verdict against a GPU memory size
and the speed at an MFU are recomputed from them each time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path

from raygrpo.config import Config
from raygrpo.plan.architecture import Architecture
from raygrpo.plan.measure import Measurements, measure

logger = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]


def cache_key(config: Config, arch: Architecture, compare: bool) -> str:
    """The digest naming the measurements of ``config`` on ``arch`` (see the module docstring)."""
    digest = hashlib.sha256()
    versions = [metadata.version(name) for name in ("raygrpo", "torch", "diffusers", "transformers")]
    for part in (config.to_yaml(), json.dumps(arch.components, sort_keys=True), str(compare), *versions):
        digest.update(part.encode() + b"\0")
    digest.update(_source_digest())
    return digest.hexdigest()[:32]


@functools.cache
def _source_digest() -> bytes:
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix in (".py", ".json") and path.is_file():
            digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.digest()


def cached_measure(config: Config, arch: Architecture, compare: bool, folder: Path | None) -> Measurements:
    """:func:`~raygrpo.plan.measure.measure` at full depth, read from ``folder`` when measured before (None: no cache).

    A cache that cannot be read or written is passed over with a warning: the plan is then measured afresh."""
    if folder is None:
        return measure(config, arch, compare=compare)
    path = folder / f"{cache_key(config, arch, compare)}.json"
    if path.is_file():
        try:
            return Measurements.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("measuring the plan again: cannot read its cache %s (%s)", path, exc)
    measured = measure(config, arch, compare=compare)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(measured.to_json())
        partial.replace(path)  # whole or absent, also when two launches write at once
    except OSError as exc:
        logger.warning("the plan is not cached: cannot write %s (%s)", path, exc)
    return measured
