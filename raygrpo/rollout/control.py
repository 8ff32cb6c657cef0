"""Resize commands for a running pool: a small signed file in the run folder that the driver reads after every step.

    python -m raygrpo.pool <run_dir> --workers 3 [--token-env NAME] [--wait 120]   # raygrpo/pool.py

writes ``<run_dir>/pool-command.json``; the driver applies it at the next step boundary and reports in
``<run_dir>/pool-status.json`` (pool size, target, workers joining and leaving, the last command's outcome).
A file rather than a port: it works the same under ``ray job submit`` (the driver runs on the head node, the
run folder is on the shared ``run.output_root``), from a job's own entrypoint, and on a laptop, and opens no
socket. Writes are atomic (a temporary file renamed into place), so the driver never reads half a command.

Authentication: with ``rollout.autoscale.token_env`` set, a command must carry ``signature`` =
HMAC-SHA256(token, ``"<workers>:<issued_at>:<nonce>"``) in hex, the token read from that environment variable
on both sides (the scheme of the HTTP reward servers' bearer token, ``params.token_env``, without the token
ever being written down); an unsigned or wrongly signed command is refused and the refusal reported. Without
a token, whoever can write the run folder (who could also rewrite its checkpoints) may resize the pool.
Each command is applied once (by nonce); one issued before this driver started (a resumed run meeting an old
file) is ignored: the resumed run's own ``rollout.num_workers`` wins.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)

COMMAND_FILE = "pool-command.json"
STATUS_FILE = "pool-status.json"


class PoolCommand(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: int = Field(ge=1)
    issued_at: float  # time.time() of the writer
    nonce: str = Field(min_length=8)
    signature: str | None = None

    def payload(self) -> bytes:
        return f"{self.workers}:{self.issued_at!r}:{self.nonce}".encode()


def sign(command: PoolCommand, token: str) -> str:
    return hmac.new(token.encode(), command.payload(), hashlib.sha256).hexdigest()


def token_from_env(name: str | None) -> str | None:
    """The token in environment variable ``name`` (None: no token); a named variable that is unset is an error."""
    if name is None:
        return None
    token = os.environ.get(name)
    if not token:
        raise ValueError(
            f"environment variable {name!r} (rollout.autoscale.token_env / --token-env) is not set or empty; export the pool token in it"
        )
    return token


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def write_command(run_dir: Path, workers: int, token: str | None = None) -> PoolCommand:
    """Ask the run in ``run_dir`` to resize its rollout pool to ``workers``; the command written."""
    command = PoolCommand(workers=workers, issued_at=time.time(), nonce=secrets.token_hex(8))
    if token is not None:
        command = command.model_copy(update={"signature": sign(command, token)})
    write_atomic(Path(run_dir) / COMMAND_FILE, command.model_dump())
    return command


def read_status(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.exists() else None


class CommandReader:
    """The driver's side: :meth:`poll` returns each new, valid command once; refusals are logged and kept for the status."""

    def __init__(self, run_dir: Path, token: str | None):
        self.path = Path(run_dir) / COMMAND_FILE
        self.token = token
        self.started = time.time()
        self.seen: str | None = None  # nonce of the last command read (applied or refused)
        self.outcome: dict[str, Any] = {}  # the last command's nonce, workers and what became of it

    def poll(self) -> PoolCommand | None:
        if not self.path.exists():
            return None
        try:
            command = PoolCommand.model_validate_json(self.path.read_text())
        except (OSError, ValidationError) as exc:
            return self._refuse(None, f"{self.path} is not a pool command: {str(exc).splitlines()[0]}")
        if command.nonce == self.seen:
            return None
        self.seen = command.nonce
        if command.issued_at < self.started:
            self.outcome = {"nonce": command.nonce, "workers": command.workers, "outcome": "ignored: issued before this driver started"}
            return None
        if self.token is not None and not (command.signature and hmac.compare_digest(command.signature, sign(command, self.token))):
            return self._refuse(command, "unsigned or wrongly signed (rollout.autoscale.token_env is set: sign it with --token-env)")
        return command

    def _refuse(self, command: PoolCommand | None, why: str) -> None:
        if command is None and self.outcome.get("outcome") == f"refused: {why}":
            return None  # the same broken file: said once
        logger.warning("pool command refused: %s", why)
        nonce, workers = (command.nonce, command.workers) if command else (None, None)
        self.outcome = {"nonce": nonce, "workers": workers, "outcome": f"refused: {why}"}
        return None

    def applied(self, command: PoolCommand, outcome: str) -> None:
        self.outcome = {"nonce": command.nonce, "workers": command.workers, "outcome": outcome}
