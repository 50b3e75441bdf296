"""free_port: a port the demo's and the tests' servers can bind, drawn below the ephemeral range
(where outgoing connections take their source ports) so another process's connection cannot
take it between the check and the server's bind."""

from __future__ import annotations

import socket

from worker.cli.demo.ports import LOWEST, _first_ephemeral, free_port


def test_a_free_port_is_below_the_ephemeral_range_and_can_be_bound() -> None:
    ports = {free_port() for _ in range(50)}
    assert all(LOWEST <= port < _first_ephemeral() for port in ports), sorted(ports)
    assert len(ports) > 40  # drawn at random, not one port handed out again and again
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))


def test_a_port_someone_listens_on_is_never_given() -> None:
    taken = []
    try:
        for _ in range(200):
            sock = socket.socket()
            sock.bind(("127.0.0.1", free_port()))
            sock.listen()
            taken.append(sock)
        ports = {sock.getsockname()[1] for sock in taken}
        assert len(ports) == len(taken)
    finally:
        for sock in taken:
            sock.close()
