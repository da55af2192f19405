"""Framed messages on the control socket between the engine and a container's stage processes.

A frame is a 5-byte header (payload length, kind) and a payload: a JSON object for control
messages, raw bytes for a pickled callable result. One ``sendall`` per frame keeps frames from
two writers (the intermediate and the init process share the socket) from interleaving.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

_HEADER = struct.Struct("!IB")
JSON, BLOB = 0, 1


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    sock.sendall(_HEADER.pack(len(data), JSON) + data)


def send_blob(sock: socket.socket, data: bytes) -> None:
    sock.sendall(blob_frame(data))


def blob_frame(data: bytes) -> bytes:
    """The frame :func:`send_blob` sends, for a writer that sends several in one write."""
    return _HEADER.pack(len(data), BLOB) + data


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> dict[str, Any] | bytes | None:
    """The next frame, or ``None`` at end of stream (every writer closed its end)."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    length, kind = _HEADER.unpack(header)
    payload = _recv_exact(sock, length) if length else b""
    if payload is None:
        return None
    if kind == BLOB:
        return payload
    message: dict[str, Any] = json.loads(payload)
    return message
