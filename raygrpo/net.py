"""Addresses and free ports, without torch.

The learner group's rendezvous runs as a Ray task on rank 0's bundle before any rank starts (``raygrpo.learner.group``);
its worker imports only the task function's module. Here that is this module (socket and Ray), not the learner's
torch.distributed code: on 2 CPU cores importing torch first held every run's start 1.7-3.4 s (measured, Ray 2.60)
before the rollout and reward actors were even created.
"""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at ``host`` now (the OS picks it; free until someone binds it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def rendezvous_address(loopback: bool) -> tuple[str, int]:
    """This node's address for the other ranks (127.0.0.1 on a single machine) and a free port on it."""
    import ray

    host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
    return host, free_port(host)
