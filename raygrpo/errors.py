"""The ways a run ends early on purpose; ``python -m raygrpo.run`` turns each into one line and an exit code."""

from __future__ import annotations


class PreflightError(RuntimeError):
    """The run cannot start: problems found before training, one per line, each naming its field; exit code 2."""


class RunAborted(RuntimeError):
    """The run cannot usefully go on (every actor of a role dead, rewards failing, a fatal reward answer).

    The controller keeps what was learned (``checkpoint-aborted``), marks the run aborted with this
    message, and the driver exits with code 3.
    """


class RunStopped(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or ``ray job stop`` asked the run to stop; it saves a resumable checkpoint when it
    can and exits with 128 + the signal number (130 or 143). The same command continues the run.

    A KeyboardInterrupt: code that handles a failed call (``except Exception``, e.g. an in-process worker's
    error kept for its caller) must not swallow a request to stop, and Ray's blocking calls, interrupted by a
    signal, raise a KeyboardInterrupt cleanly (any other exception from a signal handler breaks them)."""

    def __init__(self, signal_name: str, signal_number: int, detail: str = ""):
        super().__init__(f"stopped by {signal_name}" + (f" {detail}" if detail else ""))
        self.signal_name, self.signal_number = signal_name, signal_number
