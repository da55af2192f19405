"""Messages between the container child and the pytest process: one JSON object per line.

The child holds one end of a socket pair and writes whole lines with a single ``sendall``; the
parent reads lines until end of stream, which comes when the child (the container's PID 1) is
gone, however it went. Reports travel as the dicts of pytest's own
``pytest_report_to_serializable`` hook, never as pickles of report internals.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any


def send(sock: socket.socket, kind: str, **payload: Any) -> None:
    sock.sendall(json.dumps({"kind": kind, **payload}).encode() + b"\n")


def receive(sock: socket.socket) -> Iterator[dict[str, Any]]:
    """Messages until end of stream; a torn last line (the child died mid-write) is dropped."""
    with sock.makefile("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            yield json.loads(line)
