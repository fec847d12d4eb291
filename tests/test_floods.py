"""Floods: each of the cheap inputs that could take the pod down or lock it out, twice over.

Each test sends one kind of flood in two equal waves against a real reqapi.py process and checks
that (1) a probe like the kubelet's (a new TLS connection without a certificate, GET /livez and
/readyz) is answered during the flood, and (2) the server's resident memory after the second
wave is where the first left it: whatever the flood fills is bounded, so a second wave finds it
full and adds nothing.  (How fast the probes are answered is a figure for tests/bench.py.)
"""

from __future__ import annotations

import random
import socket
import ssl

from conftest import GV, RULES, Server, wait_until, write_rules
from test_transport import Raw, client_hello, enough_file_descriptors, metric, open_watch, rss_bytes  # noqa: F401

MiB = 1024 * 1024
FLAT = 6 * MiB        # what a second, equal wave may add to RSS (allocator noise, not the flood)


def probes_answer(server: Server) -> None:
    """The kubelet's probes: new connections, no client certificate."""
    for path in ("/livez", "/readyz"):
        assert server.get(path, timeout=10).status == 200, path


def two_waves(server: Server, wave) -> tuple[int, int]:
    """RSS after each of two equal waves of a flood (the wave returns what it holds open, closed
    after the probes)."""
    sizes = []
    for _ in range(2):
        held = wave()
        try:
            probes_answer(server)
            sizes.append(rss_bytes(server.process.pid))
        finally:
            for thing in held:
                thing.close()
    print(f"RSS after wave 1: {sizes[0] / MiB:.1f} MiB, after wave 2: {sizes[1] / MiB:.1f} MiB")
    return sizes[0], sizes[1]


def test_silent_sockets_and_half_handshakes_beyond_the_cap_never_lock_out_the_probes(start_server):
    server = start_server("--max-connections", "300", "--tls-handshake-timeout", "60s")
    hello = client_hello(server)

    def wave() -> list:
        held = []
        for index in range(600):             # twice the cap: silent sockets, and half a ClientHello
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            if index % 2:
                sock.sendall(hello[:len(hello) // 2])
            held.append(sock)
        return held

    first, second = two_waves(server, wave)
    assert second - first < FLAT
    assert metric(server, "connections_evicted_total") >= 2 * (600 - 300)     # each wave fills the free slots, then evicts


def test_watches_beyond_their_cap_get_429_and_never_lock_out_the_probes(start_server, tmp_path):
    rules = write_rules(tmp_path / "rules.json", RULES)
    server = start_server("--rules", str(rules), "--max-watches", "100", "--max-connections", "400")

    def wave() -> list:
        held, refused = [], 0
        for _ in range(150):
            conn, answer = open_watch(server)
            if answer.code == 429:
                refused += 1
                conn.close()
            else:
                assert answer.code == 200
                held.append(conn)
        assert refused == 50 and len(held) == 100
        return held

    first, second = two_waves(server, wave)
    assert second - first < FLAT
    assert wait_until(lambda: metric(server, "watches_open") == 0, timeout=10)


def test_invented_methods_make_no_new_metric_series(start_server):
    server = start_server()

    def wave() -> list:
        for _ in range(1000):
            method = "".join(random.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=2000))
            with Raw(server, timeout=10) as conn:
                conn.send(f"{method} /livez HTTP/1.1\r\nHost: a\r\n\r\n".encode())
                assert conn.response().code == 405
        return []

    first, second = two_waves(server, wave)
    assert second - first < FLAT
    assert len(server.get("/metrics").body) < 50_000


def test_pipelined_lists_never_read_are_cut_off_and_never_lock_out_the_probes(start_server, tmp_path):
    """Clients that pipeline lists with junk query strings and never read an answer: the answers
    they leave queued are bounded across all connections (the readers stalled longest are cut)."""
    rules = write_rules(tmp_path / "rules.json", {
        "defaults": {"cpu": "100m", "memory": "100Mi"},
        "rules": [{"id": f"w{index}", "namespace": "load", "name": f"workload-{index:05d}", "cpu": "1"}
                  for index in range(3000)]})
    server = start_server("--rules", str(rules), "--write-timeout", "120s")

    def wave() -> list:
        held = []
        for index in range(40):          # each queues ~1 MB before the server stops taking its requests
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            tls = server.certs.client_context().wrap_socket(sock, server_hostname="localhost")
            tls.setblocking(False)
            payload = b"".join(f"GET {GV}/requests?junk={index}-{n}&limit={2000 + n} HTTP/1.1\r\nHost: a\r\n\r\n"
                               .encode() for n in range(100))
            try:
                tls.sendall(payload)
            except (ssl.SSLWantWriteError, BlockingIOError):
                pass                          # the server stopped reading: it has enough queued
            held.append(tls)
        return held

    first, second = two_waves(server, wave)
    assert second - first < FLAT
    assert metric(server, "slow_readers_cut_total") > 0
