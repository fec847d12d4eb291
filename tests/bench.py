#!/usr/bin/env python3
"""Benchmark the real reqapi server over HTTPS: start-up time, idle memory, and throughput,
latency, server CPU per request and peak memory on three routes at several keep-alive
connection counts.

    python3 tests/bench.py                 # 10 s per run, routes object,discovery,table, 1/16/256 connections
    python3 tests/bench.py --quick         # 2 s runs
    python3 tests/bench.py --generator python --routes object --connections 16 --json out.json
    python3 tests/bench.py --history       # usage history: ~2,000 pods against a real Prometheus
    python3 tests/bench.py --versus-gin    # issue 11: beside Go/gin, held connections, start-up (~12 min)

Method: the server runs on one core
(`taskset -c 0`), the load generator and this harness on another (CPU 1); every request is a
keep-alive HTTP/1.1 GET over TLS 1.3; server CPU per request = the server's utime+stime during
the run divided by the requests completed; RSS = VmRSS sampled every 0.1 s.

Load generators: `wrk` (install it with `apt-get install wrk`) when present, otherwise a
standard-library one (one process, epoll via `selectors`, N non-blocking TLS connections, one
request in flight per connection).  Needs nothing but Python and, for the throwaway
certificates, the `openssl` command (or the `trustme` package).

--versus-gin (section "Versus Go/gin") times start-up as the Dockerfile starts reqapi; runs reqapi
under this Python and a 3.13 beside the Go/gin server of tests/bench_gin (built by its build.sh;
needs Go and wrk) on the same core, with the same certificate and body bytes, in rotated rounds
reported as medians and ratios to gin; then holds 1,000 idle connections and 500 watches at once.
Each of its runs says how much CPU other processes took meanwhile (this VM may be shared).

Linux only (reads /proc).  Not part of the test suite: pytest does not collect this file (its name
is not test_*.py).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import platform
import random
import re
import resource
import select
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

ROOT = Path(__file__).resolve().parent.parent
REQAPI = ROOT / "reqapi.py"
GV = "/apis/k8s.wujiuye.com/v1beta1"
AGGREGATED_ACCEPT = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
TABLE_ACCEPT = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
ROUTES = {  # name -> (path, extra request headers)
    "object": (GV + "/namespaces/default/requests/hello-word", {}),
    "discovery": ("/apis", {"Accept": AGGREGATED_ACCEPT}),
    "table": (GV + "/requests", {"Accept": TABLE_ACCEPT}),
}
# The same rules format as the test suite (tests/conftest.py); four workloads are named exactly,
# so a Table list of all namespaces has four rows.
RULES = {
    "defaults": {"cpu": "100m", "memory": "100Mi"},
    "min": {"cpu": "10m", "memory": "16Mi"},
    "max": {"cpu": "16", "memory": "64Gi"},
    "rules": [
        {"id": "prod-api", "namespace": "prod-*", "name": "*-api", "cpu": "500m", "memory": "512Mi"},
        {"id": "hello", "namespace": "default", "name": "hello-word", "cpu": "200m", "memory": "256Mi"},
        {"id": "checkout", "namespace": "shop", "name": "checkout", "cpu": "2", "memory": "3Gi"},
        {"id": "search", "namespace": "shop", "name": "search", "cpu": "1500m", "memory": "1536Mi"},
        {"id": "reports", "namespace": "default", "name": "nightly-report", "cpu": "250m", "memory": "1Gi"},
    ],
}
REQUEST_TIMEOUT = 2.0       # seconds; a request outstanding longer counts as a timeout (wrk's default)
PAUSE = 1.0                 # seconds between runs
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class BenchError(Exception):
    """A failure that ends the benchmark with a message (and exit code 1)."""


# ---------------------------------------------------------------------------------------------
# Small HTTP/1.1 response framing, shared by the probe and the load generator
# ---------------------------------------------------------------------------------------------


def write_json(args: argparse.Namespace, results: Any) -> None:
    """--json FILE: the raw results (what cannot be encoded is written as its str())."""
    if not args.json:
        return
    try:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"raw results: {args.json}")
    except OSError as error:
        print(f"bench: cannot write {args.json}: {error}", file=sys.stderr)


def keep_or_remove(args: argparse.Namespace, workdir: Path) -> None:
    """--keep: say where the temporary directory is; otherwise remove it."""
    if args.keep:
        print(f"kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)

def request_bytes(port: int, path: str, headers: dict, host: str = "127.0.0.1") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked_end(buf: bytes, pos: int) -> int:
    """Index just past a chunked body that starts at pos, or -1 while incomplete."""
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return -1
        size = int(buf[pos:eol].split(b";", 1)[0], 16)
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)
            return -1 if end < 0 else end + 4
        pos = eol + 2 + size + 2
        if pos > len(buf):
            return -1


def parse_head(buf: bytes, head_end: int) -> tuple:
    """(status, body length or -1 for chunked or -2 for until-EOF, connection close?)"""
    status = int(buf[9:12])
    head = buf[:head_end].lower()
    close = b"\r\nconnection: close" in head
    length = -2
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        eol = head.find(b"\r\n", at + 2)
        length = int(head[at + 17:eol if eol >= 0 else len(head)])
    elif b"\r\ntransfer-encoding: chunked" in head:
        length = -1
    elif status in (204, 304) or status < 200:
        length = 0
    return status, length, close


def response_end(buf: bytes, head_end: int, length: int) -> int:
    """Index just past the response, or -1 while incomplete (length as from parse_head)."""
    if length >= 0:
        end = head_end + 4 + length
        return end if len(buf) >= end else -1
    if length == -1:
        return chunked_end(buf, head_end + 4)
    return -1


def https_get(context: ssl.SSLContext, port: int, path: str, headers: dict, timeout: float = 5.0) -> dict:
    """One blocking GET on a new TLS connection (TCP_NODELAY, one write)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        info = exchange(sock, request_bytes(port, path, headers))
        sock.close()
        return info
    finally:
        raw.close()


def exchange(sock: ssl.SSLSocket, request: bytes, first_chunk: bool = False) -> dict:
    """Send one request on an open TLS connection and read its response, leaving the connection
    open.  With first_chunk (a watch), stop at the first complete chunk of a chunked body: that
    chunk is the body returned."""
    sock.sendall(request)
    buf = b""
    head_end = length = -1
    status = 0
    body: Optional[bytes] = None
    while True:
        data = sock.recv(65536)
        if not data:
            if head_end >= 0 and length == -2:
                break
            raise ConnectionError("connection closed before the response was complete")
        buf += data
        if head_end < 0:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                continue
            status, length, _ = parse_head(buf, head_end)
        if first_chunk and length == -1:
            body = chunk_at(buf, head_end + 4)
            if body is not None:
                break
            continue
        end = response_end(buf, head_end, length)
        if end >= 0:
            buf = buf[:end]
            break
    head = buf[:head_end].decode("latin-1").split("\r\n")[1:]
    fields = {}
    for line in head:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if body is None:
        body = buf[head_end + 4:]
        if length == -1:
            body = dechunk(body)
    return {"status": status, "headers": fields, "body": body, "head_bytes": head_end + 4, "tls": sock.version(),
            "cipher": sock.cipher()[0]}


def chunk_at(buf: bytes, pos: int) -> Optional[bytes]:
    """The data of the chunk that starts at pos once it is complete (b"" for the last chunk), else None."""
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        return None
    size = int(buf[pos:eol].split(b";", 1)[0], 16)
    if len(buf) < eol + 2 + size + 2:
        return None
    return buf[eol + 2:eol + 2 + size]


def dechunk(body: bytes) -> bytes:
    out, pos = [], 0
    while True:
        eol = body.find(b"\r\n", pos)
        size = int(body[pos:eol].split(b";", 1)[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[eol + 2:eol + 2 + size])
        pos = eol + 2 + size + 2


# ---------------------------------------------------------------------------------------------
# The standard-library load generator (runs as a child process: bench.py --loadgen PARAMS)
# ---------------------------------------------------------------------------------------------

CONNECTING, HANDSHAKING, SENDING, READING = range(4)


class _Conn:
    __slots__ = ("sock", "state", "mask", "buf", "t0", "out", "head_end", "status", "length", "close")

    def __init__(self):
        self.sock = None
        self.state = CONNECTING
        self.mask = 0
        self.buf = b""
        self.t0 = 0.0
        self.out = b""
        self.head_end = -1
        self.status = 0
        self.length = 0
        self.close = False


def loadgen(params: dict) -> dict:
    """N keep-alive TLS connections, one request in flight on each, for `duration` seconds.
    Latency runs from the first write of a request to the last byte of its response, as in wrk."""
    port, duration, count = params["port"], params["duration"], params["connections"]
    timeout = params.get("timeout", REQUEST_TIMEOUT)
    host = params.get("host", "127.0.0.1")
    address = (host, port)
    request = request_bytes(port, params["path"], params["headers"], host)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=params["cafile"])
    if params.get("certfile"):                  # a client certificate (kube-apiserver's admin, say)
        context.load_cert_chain(params["certfile"], params["keyfile"])
    if params.get("no_hostname_check"):         # a pod address that the certificate does not name
        context.check_hostname = False
    sel = selectors.DefaultSelector()
    EV_READ, EV_WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
    WantRead, WantWrite = ssl.SSLWantReadError, ssl.SSLWantWriteError
    perf = time.perf_counter
    latencies: list = []
    record = latencies.append
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    statuses: dict = {}
    counts = {"connections": 0, "reconnects": 0, "bytes": 0}
    retry: list = []            # (when, conn): reconnects after a failed connect, 10 ms later
    conns = [_Conn() for _ in range(count)]

    def want(c: _Conn, mask: int) -> None:
        if c.mask != mask:
            sel.modify(c.sock, mask, c)
            c.mask = mask

    def open_conn(c: _Conn) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setblocking(False)
        sock = context.wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False)
        c.sock, c.state, c.buf, c.close, c.t0 = sock, CONNECTING, b"", False, perf()
        counts["connections"] += 1
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            errors["connect"] += 1
            sock.close()
            c.sock = None
            retry.append((perf() + 0.01, c))
            return
        sel.register(sock, EV_WRITE, c)
        c.mask = EV_WRITE

    def drop(c: _Conn, kind: Optional[str]) -> None:
        """Close a connection (counting an error of `kind`) and open a new one while the run lasts."""
        if kind:
            errors[kind] += 1
        try:
            sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        c.sock = None
        if perf() < deadline:
            counts["reconnects"] += 1
            if kind == "connect":
                retry.append((perf() + 0.01, c))
            else:
                open_conn(c)

    def send_request(c: _Conn, now: float) -> None:
        c.t0, c.out, c.state = now, request, SENDING
        c.head_end = -1
        c.buf = b""
        write(c)

    def write(c: _Conn) -> None:
        try:
            n = c.sock.send(c.out)
        except WantWrite:
            want(c, EV_WRITE)
            return
        except WantRead:
            want(c, EV_READ)
            return
        except OSError:
            drop(c, "write")
            return
        if n < len(c.out):
            c.out = c.out[n:]
            want(c, EV_WRITE)
            return
        c.state = READING
        want(c, EV_READ)

    def read(c: _Conn) -> None:
        sock = c.sock
        while True:
            try:
                data = sock.recv(16384)
            except WantRead:
                want(c, EV_READ)
                return
            except WantWrite:
                want(c, EV_WRITE)
                return
            except OSError:
                drop(c, "read")
                return
            if not data:
                if c.head_end >= 0 and c.length == -2:      # a body delimited by the close
                    finish(c, perf())
                drop(c, None if c.close else "read")
                return
            counts["bytes"] += len(data)
            buf = c.buf = c.buf + data if c.buf else data
            if c.head_end < 0:
                c.head_end = buf.find(b"\r\n\r\n")
                if c.head_end < 0:
                    if len(buf) > 65536:
                        drop(c, "read")
                        return
                    continue
                try:
                    c.status, c.length, c.close = parse_head(buf, c.head_end)
                except ValueError:
                    drop(c, "read")
                    return
            if response_end(buf, c.head_end, c.length) >= 0:
                now = perf()
                finish(c, now)
                if c.close:
                    drop(c, None)
                elif now < deadline:
                    send_request(c, now)
                return

    def finish(c: _Conn, now: float) -> None:
        if now <= deadline:
            record(now - c.t0)
            statuses[c.status] = statuses.get(c.status, 0) + 1

    def handshake(c: _Conn) -> None:
        try:
            c.sock.do_handshake()
        except WantRead:
            want(c, EV_READ)
            return
        except WantWrite:
            want(c, EV_WRITE)
            return
        except (OSError, ValueError):
            drop(c, "connect")
            return
        send_request(c, perf())

    # Ready: the parent samples the server's counters, then says go.
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    cpu_start = os.times()
    start = perf()
    deadline = start + duration
    for c in conns:
        open_conn(c)
    next_sweep = start + 0.1
    select = sel.select
    while True:
        now = perf()
        if now >= deadline:
            break
        for key, mask in select(min(0.1, deadline - now)):
            c = key.data
            state = c.state
            if state == READING:
                read(c)
            elif state == SENDING:
                write(c)
            elif state == HANDSHAKING:
                handshake(c)
            else:                                   # CONNECTING: the connect finished
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    drop(c, "connect")
                else:
                    c.state = HANDSHAKING
                    handshake(c)
        now = perf()
        if now >= next_sweep:
            next_sweep = now + 0.1
            for c in conns:
                if c.sock is not None and now - c.t0 > timeout:    # a request, or a connect + handshake
                    drop(c, "timeout")
            if retry:
                due = [c for when, c in retry if when <= now]
                retry[:] = [(when, c) for when, c in retry if when > now]
                for c in due:
                    if now < deadline:
                        open_conn(c)
    elapsed = perf() - start
    cpu_end = os.times()
    for c in conns:
        if c.sock is not None:
            c.sock.close()
    latencies.sort()
    total = len(latencies)

    def pct(q: float) -> Optional[float]:
        return latencies[min(total - 1, max(0, math.ceil(q * total) - 1))] if total else None

    return {"requests": total, "duration_s": elapsed, "rps": total / elapsed if elapsed else 0.0,
            "cpu_s": (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system),
            "latency_s": {"p50": pct(0.50), "p75": pct(0.75), "p90": pct(0.90), "p99": pct(0.99),
                          "max": latencies[-1] if total else None,
                          "mean": sum(latencies) / total if total else None},
            "socket_errors": errors, "non2xx": sum(n for s, n in statuses.items() if not 200 <= s < 300),
            "statuses": {str(s): n for s, n in sorted(statuses.items())}, **counts}


def loadgen_child(params_json: str) -> int:
    result = loadgen(json.loads(params_json))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------------------------------
# /proc readers
# ---------------------------------------------------------------------------------------------

def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of the process, in clock ticks."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        data = handle.read()
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def proc_status(pid: int) -> dict:
    """VmRSS and VmHWM in kB, Threads."""
    out = {}
    with open(f"/proc/{pid}/status", "rb") as handle:
        for line in handle:
            if line.startswith((b"VmRSS:", b"VmHWM:", b"Threads:")):
                name, value = line.split(b":", 1)
                out[name.decode()] = int(value.split()[0])
    return out


def cpu_times() -> dict:
    """cpuN -> (busy, total) jiffies from /proc/stat."""
    out = {}
    try:
        with open("/proc/stat") as handle:
            for line in handle:
                if line.startswith("cpu") and line[3:4].isdigit():
                    parts = line.split()
                    values = [int(v) for v in parts[1:9]]
                    total = sum(values)
                    out[parts[0]] = (total - values[3] - values[4], total)
    except OSError:
        pass
    return out


def load_average() -> str:
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "?"


def task_ticks() -> int:
    """user + nice + system jiffies of all CPUs together (/proc/stat): the time every process spent,
    without idle, iowait, interrupts and steal."""
    try:
        with open("/proc/stat") as handle:
            for line in handle:
                if line.startswith("cpu "):
                    return sum(int(v) for v in line.split()[1:4])
    except OSError:
        pass
    return 0


def busy_share(before: dict, after: dict, cpu: Optional[int]) -> Optional[float]:
    if cpu is None:
        return None
    key = f"cpu{cpu}"
    if key not in before or key not in after:
        return None
    busy = after[key][0] - before[key][0]
    total = after[key][1] - before[key][1]
    return busy / total if total > 0 else None


def machine_info() -> dict:
    info = {"cpu_model": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "kernel": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "python_executable": sys.executable, "openssl_python": ssl.OPENSSL_VERSION}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if hasattr(os, "sched_getaffinity"):
        info["cpus_allowed"] = sorted(os.sched_getaffinity(0))
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    info["mem_total_gib"] = round(int(line.split()[1]) / 1048576, 1)
                    break
    except OSError:
        pass
    try:
        with open("/etc/os-release") as handle:
            for line in handle:
                if line.startswith("PRETTY_NAME="):
                    info["os"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    try:
        with open("/proc/loadavg") as handle:
            info["loadavg_at_start"] = " ".join(handle.read().split()[:3])
    except OSError:
        pass
    if shutil.which("openssl"):
        try:
            info["openssl_cli"] = subprocess.run(["openssl", "version"], capture_output=True, text=True,
                                                 timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


# ---------------------------------------------------------------------------------------------
# Certificates, rules, CPU pinning
# ---------------------------------------------------------------------------------------------

def make_certificates(directory: Path) -> tuple:
    """(ca, cert, key) files: an ECDSA P-256 CA and a server certificate for IP:127.0.0.1 and
    DNS:localhost, made with the openssl command (or with trustme when openssl is missing)."""
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr",
                                                          "server.pem"))
    ext = directory / "server.ext"
    if shutil.which("openssl"):
        ext.write_text("basicConstraints = critical, CA:FALSE\n"
                       "keyUsage = critical, digitalSignature\n"
                       "extendedKeyUsage = serverAuth\n"
                       "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
                       "subjectKeyIdentifier = hash\n"
                       "authorityKeyIdentifier = keyid, issuer\n")
        serial = "0x%x" % random.getrandbits(63)
        steps = [
            ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(ca_key)],
            ["openssl", "req", "-x509", "-new", "-key", str(ca_key), "-out", str(ca), "-days", "90", "-sha256",
             "-subj", "/CN=reqapi bench throwaway CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-addext", "subjectKeyIdentifier=hash"],
            ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)],
            ["openssl", "req", "-new", "-key", str(key), "-out", str(csr), "-subj", "/CN=localhost"],
            ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-set_serial",
             serial, "-days", "90", "-sha256", "-extfile", str(ext), "-out", str(cert)],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                raise BenchError(f"openssl failed: {' '.join(step)}\n{done.stderr.strip()}")
        return ca, cert, key
    try:
        import trustme  # type: ignore
    except ImportError:
        raise BenchError("need the openssl command (apt-get install openssl) or the trustme package to make "
                         "throwaway certificates") from None
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(ca))
    leaf = authority.issue_cert("127.0.0.1", "localhost")
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return ca, cert, key


def choose_cpus(no_pin: bool) -> tuple:
    """(server CPU, generator CPU, how) — the first two CPUs this process may use."""
    if no_pin:
        return None, None, "not pinned (--no-pin)"
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(allowed) < 2:
        return None, None, f"not pinned ({len(allowed) or os.cpu_count()} CPU available)"
    how = "taskset" if shutil.which("taskset") else "sched_setaffinity (no taskset)"
    return allowed[0], allowed[1], how


def pinned(command: list, cpu: Optional[int]) -> tuple:
    """(command, preexec_fn) that runs `command` on `cpu`."""
    if cpu is None:
        return command, None
    if shutil.which("taskset"):
        return ["taskset", "-c", str(cpu)] + command, None
    return command, lambda: os.sched_setaffinity(0, {cpu})


def with_nofile(preexec: Optional[Callable[[], None]], nofile: Optional[int]) -> Optional[Callable[[], None]]:
    """`preexec` plus, when nofile is given, RLIMIT_NOFILE raised to it in the child (before exec,
    so a taskset in front passes it on): a server holding ~1,500 connections needs more than 1,024."""
    if nofile is None:
        return preexec

    def run() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, max(nofile, hard)))
        if preexec is not None:
            preexec()
    return run


def start_loadgen(params: dict, cpu: Optional[int]) -> subprocess.Popen:
    """The standard-library load generator in a child process (on `cpu`), connected and waiting:
    write "go" to its stdin to start the run; its result is the last line of its stdout."""
    command, preexec = pinned([sys.executable, str(Path(__file__).resolve()), "--loadgen", json.dumps(params)], cpu)
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=preexec)
    if child.stdout.readline().strip() != "ready":
        child.wait()
        raise BenchError(f"the load generator failed to start:\n{child.stderr.read()}")
    return child


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The server under test
# ---------------------------------------------------------------------------------------------

class Server:
    """reqapi.py under test, started with `python` (default: the one running this harness)."""

    # Log text saying the port was taken between free_port() and the server's bind: try another.
    PORT_TAKEN = ("cannot listen", "address already in use")

    def __init__(self, directory: Path, cert: Path, key: Path, rules: Optional[Path], log_level: Optional[str],
                 extra: list, cpu: Optional[int], python: str = sys.executable, nofile: Optional[int] = None,
                 name: str = "reqapi", script: Path = REQAPI):
        self.directory, self.cert, self.key, self.rules = directory, cert, key, rules
        self.log_level, self.extra, self.cpu = log_level, extra, cpu
        self.python, self.nofile, self.name, self.script = python, nofile, name, script
        self.log_file = directory / f"{name}.log"
        self.process: Optional[subprocess.Popen] = None
        self.port = 0
        self.command: list = []
        self.tls = ""

    def build_command(self) -> list:
        command = [self.python, str(self.script), "--cert", str(self.cert), "--key", str(self.key),
                   "--port", str(self.port), "--bind-address", "127.0.0.1"]
        if self.rules:
            command += ["--rules", str(self.rules)]
        if self.log_level:
            command += ["--log-level", self.log_level]
        return command + self.extra

    def environment(self) -> dict:
        env = dict(os.environ)
        env.pop("KUBERNETES_SERVICE_HOST", None)      # never act as if in a pod
        return env

    def start(self, context: ssl.SSLContext, probe_path: str, timeout: float = 30.0) -> float:
        """Start the server; returns ms from process start to the end of the first 200 response."""
        for attempt in range(3):
            self.port = free_port()
            self.command, preexec = pinned(self.build_command(), self.cpu)
            preexec = with_nofile(preexec, self.nofile)
            log = open(self.log_file, "ab")
            started = time.perf_counter()
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.environment(), stdin=subprocess.DEVNULL, preexec_fn=preexec)
            log.close()
            deadline = started + timeout
            last_error = ""
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    break
                try:
                    answer = https_get(context, self.port, probe_path, {}, timeout=2.0)
                except (OSError, ssl.SSLError) as error:
                    last_error = repr(error)
                    time.sleep(0.002)
                    continue
                if answer["status"] == 200:
                    self.tls = f"{answer['tls']} {answer['cipher']}"
                    return (time.perf_counter() - started) * 1000
                last_error = f"HTTP {answer['status']}: {answer['body'][:200]!r}"
                time.sleep(0.002)
            tail = self.log_tail()
            if self.process.poll() is not None and any(mark in tail for mark in self.PORT_TAKEN) and attempt < 2:
                continue                                    # the port was taken meanwhile: another one
            exited = self.process.poll() is not None
            self.stop()
            what = (f"{self.name} exited with code {self.process.returncode} before answering" if exited else
                    f"{self.name} did not answer 200 within {timeout:g}s")
            raise BenchError(f"{what} (last probe: {last_error or 'none'})\n"
                             f"command: {shlex.join(self.command)}\nlog ({self.log_file}):\n{self.log_tail()}")
        raise BenchError("unreachable")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, size: int = 4000) -> str:
        try:
            data = self.log_file.read_bytes()
        except OSError:
            return ""
        return data[-size:].decode("utf-8", "replace")

    def log_summary(self) -> dict:
        lines = errors = tracebacks = 0
        size = 0
        try:
            size = self.log_file.stat().st_size
            with open(self.log_file, "rb") as handle:
                for line in handle:
                    lines += 1
                    if b" ERROR " in line or b'"level":"error"' in line:
                        errors += 1
                    if line.startswith(b"Traceback"):
                        tracebacks += 1
        except OSError:
            pass
        return {"lines": lines, "bytes": size, "error_lines": errors, "tracebacks": tracebacks}

    def stop(self) -> Optional[int]:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=25)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def server_default_log_level() -> str:
    try:
        text = subprocess.run([sys.executable, str(REQAPI), "--help"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    # The option's own help entry (not the usage line): from "  --log-level" to the next option.
    entry = re.search(r"^\s+--log-level\b(.*?)(?=^\s+-|^\S|\Z)", text, re.S | re.M)
    found = entry and re.search(r"\(default:\s*([\w-]+)\)", entry.group(1))
    return found.group(1) if found else "unknown"


# ---------------------------------------------------------------------------------------------
# Load runs
# ---------------------------------------------------------------------------------------------

WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_wrk(text: str) -> dict:
    def seconds(number: str, unit: str) -> float:
        return float(number) * WRK_UNITS[unit]

    out: dict = {"latency_s": {}, "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0},
                 "non2xx": 0}
    found = re.search(r"Requests/sec:\s*([\d.]+)", text)
    if not found:
        raise BenchError(f"cannot read wrk's output:\n{text}")
    out["rps"] = float(found.group(1))
    found = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h),", text)
    out["requests"] = int(found.group(1)) if found else 0
    out["duration_s"] = seconds(found.group(2), found.group(3)) if found else None
    for pct, number, unit in re.findall(r"^\s+(\d+)(?:\.\d+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M):
        out["latency_s"][f"p{pct}"] = seconds(number, unit)
    found = re.search(r"Latency\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)", text)
    if found:
        out["latency_s"]["mean"] = seconds(found.group(1), found.group(2))
        out["latency_s"]["max"] = seconds(found.group(5), found.group(6))
    found = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if found:
        out["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, found.groups())))
    found = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if found:
        out["non2xx"] = int(found.group(1))
    return out


class Runner:
    def __init__(self, server: Server, generator: str, ca: Path, gen_cpu: Optional[int], srv_cpu: Optional[int],
                 workdir: Path):
        self.server, self.generator, self.ca = server, generator, ca
        self.gen_cpu, self.srv_cpu, self.workdir = gen_cpu, srv_cpu, workdir

    def snapshot(self) -> dict:
        own = os.times()
        return {"t": time.perf_counter(), "ticks": proc_cpu_ticks(self.server.process.pid), "cpus": cpu_times(),
                "all_tasks": task_ticks(), "harness_s": own.user + own.system}

    def run(self, route: str, connections: int, duration: float, target: Optional[tuple] = None) -> dict:
        """One load run; `target` = (path, headers) instead of ROUTES[route]."""
        path, headers = target or ROUTES[route]
        pid = self.server.process.pid
        peak = {"VmRSS": 0, "Threads": 0}

        def sample() -> None:
            try:
                status = proc_status(pid)
            except OSError:
                return
            for name in peak:
                peak[name] = max(peak[name], status.get(name, 0))

        sample()
        if self.generator == "wrk":
            command = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency",
                       f"--timeout", f"{REQUEST_TIMEOUT:g}s"]
            for name, value in headers.items():
                command += ["-H", f"{name}: {value}"]
            command.append(f"https://127.0.0.1:{self.server.port}{path}")
            command, preexec = pinned(command, self.gen_cpu)
            before = self.snapshot()
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL, preexec_fn=preexec)
        else:
            params = {"port": self.server.port, "path": path, "headers": headers, "connections": connections,
                      "duration": duration, "cafile": str(self.ca), "timeout": REQUEST_TIMEOUT}
            child = start_loadgen(params, self.gen_cpu)
            before = self.snapshot()
            child.stdin.write("go\n")
            child.stdin.flush()
        limit = time.perf_counter() + duration + 60
        usage = None
        while usage is None:
            time.sleep(0.1)
            sample()
            # wait4 reaps the generator and gives its CPU time (the Popen object is told the exit code).
            pid_done, status, rusage = os.wait4(child.pid, os.WNOHANG)
            if pid_done:
                usage = rusage
                child.returncode = os.waitstatus_to_exitcode(status)
            elif time.perf_counter() > limit:
                child.kill()
                child.wait()
                raise BenchError(f"the load generator ({self.generator}) did not finish within {duration + 60:g}s")
        after = self.snapshot() if self.server.alive() else None
        sample()
        stdout, stderr = child.communicate()
        if after is None:
            raise BenchError(f"the server died during {route} c{connections} (exit code "
                             f"{self.server.process.returncode}):\n{self.server.log_tail()}")
        if child.returncode != 0 and self.generator == "python":
            raise BenchError(f"the load generator failed (exit code {child.returncode}):\n{stderr}")
        if self.generator == "wrk":
            if child.returncode != 0:
                raise BenchError(f"wrk failed (exit code {child.returncode}):\n{stdout}\n{stderr}")
            result = parse_wrk(stdout)
            result["raw"] = stdout
        else:
            result = json.loads(stdout.strip().splitlines()[-1])
        cpu_s = (after["ticks"] - before["ticks"]) / CLK_TCK
        gen_cpu_s = result.pop("cpu_s", None)
        if gen_cpu_s is None:
            gen_cpu_s = usage.ru_utime + usage.ru_stime
        requests = result["requests"]
        result.update({
            "route": route, "path": path, "connections": connections, "generator": self.generator,
            "server_cpu_s": cpu_s,
            "server_cpu_us_per_req": cpu_s / requests * 1e6 if requests else None,
            # wrk: its whole life (it starts in a few ms); python: measured by the child over the run only
            # (without the interpreter's start-up).
            "generator_cpu_s": gen_cpu_s,
            "generator_cpu_us_per_req": gen_cpu_s / requests * 1e6 if requests else None,
            "server_core_busy": busy_share(before["cpus"], after["cpus"], self.srv_cpu),
            "generator_core_busy": busy_share(before["cpus"], after["cpus"], self.gen_cpu),
            "peak_rss_mb": peak["VmRSS"] / 1024, "peak_threads": peak["Threads"],
            "wall_s": after["t"] - before["t"],
            # CPU that neither the server, nor the generator, nor this harness used during the run, as a
            # share of one core: other processes on the machine (this VM is shared); 0 on a quiet one.
            "other_load": max(0.0, (after["all_tasks"] - before["all_tasks"]) / CLK_TCK - cpu_s - gen_cpu_s
                              - (after["harness_s"] - before["harness_s"])) / (after["t"] - before["t"]),
        })
        result["errors"] = sum(result["socket_errors"].values()) + result["non2xx"]
        return result


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def fmt_latency(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    if value < 1.0:
        return f"{value * 1e3:.2f} ms" if value < 0.01 else f"{value * 1e3:.1f} ms"
    return f"{value:.2f} s"


def fmt_errors(run: dict) -> str:
    if not run["errors"]:
        return "0"
    parts = [f"{k} {v}" for k, v in run["socket_errors"].items() if v]
    if run["non2xx"]:
        parts.append(f"non-2xx {run['non2xx']}")
    return f"{run['errors']} ({', '.join(parts)})"


def fmt_share(value: Optional[float]) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def table(rows: list, headers: list, align: str) -> str:
    cells = [headers] + rows
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(str(v).rjust(w) if a == "r" else str(v).ljust(w)
                               for v, w, a in zip(row, widths, align)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_results(runs: list) -> None:
    rows = []
    for run in runs:
        lat = run["latency_s"]
        rows.append([run["route"], run["connections"], f"{run['rps']:,.0f}", fmt_latency(lat.get("p50")),
                     fmt_latency(lat.get("p90")), fmt_latency(lat.get("p99")), fmt_errors(run),
                     "-" if run["server_cpu_us_per_req"] is None else f"{run['server_cpu_us_per_req']:.0f}",
                     f"{run['peak_rss_mb']:.1f}", run["peak_threads"], fmt_share(run["server_core_busy"]),
                     fmt_share(run["generator_core_busy"]),
                     "-" if run["generator_cpu_us_per_req"] is None else f"{run['generator_cpu_us_per_req']:.0f}"])
    print(table(rows, ["route", "conns", "req/s", "p50", "p90", "p99", "errors", "srv CPU us/req",
                       "peak RSS MB", "threads", "srv core", "gen core", "gen CPU us/req"], "lrrrrrlrrrrrr"))


# ---------------------------------------------------------------------------------------------
# Versus Go/gin (--versus-gin, issue 11): reqapi beside gin in the same run, and what reqapi holds
# ---------------------------------------------------------------------------------------------
# Fair or worthless: gin in release mode without a request logger, GOMAXPROCS=1, on reqapi's core;
# the same ECDSA P-256 certificate and the same body bytes; the same wrk command on the other core;
# several rounds whose server order rotates, reported as medians and as ratios to gin's runs of
# the same rounds (this VM's absolute figures move by 10-15 % from run to run).

GIN_DIR = ROOT / "tests" / "bench_gin"
# The paths issue 11 names; wrk sends the Accept header with -H.
VERSUS_ROUTES = {
    "object": (GV + "/namespaces/default/requests/web", {}),
    "table": (GV + "/requests", {"Accept": TABLE_ACCEPT}),
    "discovery": (GV, {}),
}
ROUTE_TITLES = {"object": "object GET", "table": "Table list", "discovery": "discovery"}
VERSUS_CONFIGS = (("object", 16), ("object", 256), ("table", 256), ("discovery", 256))
# All namespaces: with RULES, four workloads are named exactly, so every watch starts with four
# ADDED events at once.
WATCH_PATH = GV + "/requests?watch=1"
# Where a Python 3.13 (the image's) is looked for when --python is not given; the same list as .ci/run.
PY313_CANDIDATES = ("python3.13", "~/.pyenv/versions/3.13.0/bin/python3.13", "/usr/bin/python3.13")
# The Deployment's args (k8s/base/deployment.yaml) with this machine's files and a free port;
# --shutdown-delay/--shutdown-timeout are left out: they act only after SIGTERM.
IMAGE_RULES = ROOT / "k8s" / "rules.json"
TARGET_STARTUP_MS, TARGET_RSS_MB = 150, 30     # issue 11's targets for reqapi as the image starts it
HELD_TIMEOUT = 10.0         # seconds one held connection may take to connect, handshake and answer


class Interpreter(NamedTuple):
    path: str               # the real executable (a pyenv shim would add its own start-up to every figure)
    version: str            # "3.11.7"
    openssl: str

    @property
    def label(self) -> str:
        return f"reqapi py{self.version}"


def probe_interpreter(candidate: str) -> tuple:
    """(Interpreter or None, why not) for a Python command or path."""
    try:
        said = subprocess.run([candidate, "-c", "import ssl, sys; print(sys.executable); "
                               "print(sys.version.split()[0]); print(ssl.OPENSSL_VERSION)"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"cannot run it ({error})"
    lines = said.stdout.strip().splitlines()
    if said.returncode != 0 or len(lines) != 3:
        return None, f"not a Python with ssl: {(said.stderr or said.stdout).strip()[:300]}"
    return Interpreter(*lines), ""


def resolve_interpreters(requested: list) -> tuple:
    """([Interpreter], notes): each --python, or this Python and the first working 3.13 of
    PY313_CANDIDATES when none is given (a pyenv shim may exist and still fail); the same
    interpreter asked twice runs once."""
    notes = []
    found: list = []
    if requested:
        for candidate in requested:
            interpreter, why = probe_interpreter(candidate)
            if interpreter is None:
                raise BenchError(f"--python {candidate}: {why}")
            found.append(interpreter)
    else:
        found.append(Interpreter(sys.executable, sys.version.split()[0], ssl.OPENSSL_VERSION))
        for candidate in PY313_CANDIDATES:
            path = shutil.which(os.path.expanduser(candidate))
            interpreter = probe_interpreter(path)[0] if path else None
            if interpreter is not None:
                found.append(interpreter)
                break
        else:
            notes.append(f"no working Python 3.13 found ({', '.join(PY313_CANDIDATES)}): only "
                         f"{sys.version.split()[0]} is measured; name one with --python")
    out: list = []
    for interpreter in found:
        if all(os.path.realpath(other.path) != os.path.realpath(interpreter.path) for other in out):
            out.append(interpreter)
    return out, notes


def build_gin() -> str:
    """The gin server's binary, built (or reused) by tests/bench_gin/build.sh; its progress goes to stderr."""
    try:
        done = subprocess.run(["bash", str(GIN_DIR / "build.sh")], stdout=subprocess.PIPE, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as error:
        raise BenchError(f"tests/bench_gin/build.sh failed to run: {error}") from None
    if done.returncode == 3:
        raise BenchError("--versus-gin needs Go 1.26 or newer on PATH to build the gin server (tests/bench_gin)")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not os.access(lines[-1], os.X_OK):
        raise BenchError(f"tests/bench_gin/build.sh failed (exit code {done.returncode}); its messages are above")
    return lines[-1]


class GinServer(Server):
    """tests/bench_gin: serves `body_file` on the object route, /livez, with reqapi's certificate."""

    def __init__(self, directory: Path, binary: str, cert: Path, key: Path, body_file: Path, content_type: str,
                 cpu: Optional[int], nofile: Optional[int] = None):
        super().__init__(directory, cert, key, None, None, [], cpu, nofile=nofile, name="gin")
        self.binary, self.body_file, self.content_type = binary, body_file, content_type

    def build_command(self) -> list:
        return [self.binary, "-addr", f"127.0.0.1:{self.port}", "-cert", str(self.cert), "-key", str(self.key),
                "-body", str(self.body_file), "-content-type", self.content_type]

    def environment(self) -> dict:
        env = super().environment()
        env["GOMAXPROCS"] = "1"             # one P, as reqapi has one core's worth of GIL
        return env

    def check_gomaxprocs(self) -> str:
        """The line main.go writes at start; a GOMAXPROCS other than 1 makes the comparison unfair."""
        said = next((line for line in self.log_tail().splitlines() if "GOMAXPROCS=" in line), "")
        if "GOMAXPROCS=1 " not in said:
            raise BenchError(f"the gin server does not run with GOMAXPROCS=1: {said or self.log_tail()}")
        return said.split("bench_gin: ", 1)[-1].split(" on https", 1)[0]


def reqapi_flags(python: str) -> str:
    return subprocess.run([python, str(REQAPI), "--help"], capture_output=True, text=True, timeout=60).stdout


def raise_nofile(needed: int) -> int:
    """Raise this process's RLIMIT_NOFILE to `needed` (root may raise the hard limit too); returns
    the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(needed, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def settled_rss_kb(pid: int, first_wait: float = 1.0, limit: float = 8.0) -> int:
    """VmRSS once it stops moving: after `first_wait`, the first of two readings half a second apart
    that differ by at most 0.5 % (or 64 kB), else the last reading after `limit` seconds."""
    time.sleep(first_wait)
    last = proc_status(pid)["VmRSS"]
    give_up = time.perf_counter() + limit
    while time.perf_counter() < give_up:
        time.sleep(0.5)
        now = proc_status(pid)["VmRSS"]
        if abs(now - last) <= max(64, last // 200):
            return now
        last = now
    return last


# -- start-up as the image starts it ---------------------------------------------------------

def image_command(python: str, cert: Path, key: Path, port: int, no_site: bool = False) -> tuple:
    """(argv, env) of the container: the Dockerfile's ENTRYPOINT and ENV (its python replaced by
    `python`, /app/reqapi.py by this reqapi.py) and the Deployment's args.  no_site adds -S."""
    text = (ROOT / "Dockerfile").read_text()
    found = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    if not found:
        raise BenchError("Dockerfile: no ENTRYPOINT in exec form; cannot start reqapi as the image does")
    entry = json.loads(found.group(1))
    argv = [python] + (["-S"] if no_site else []) + [str(REQAPI) if arg.endswith("reqapi.py") else arg
                                                      for arg in entry[1:]]
    argv += [f"--cert={cert}", f"--key={key}", f"--rules={IMAGE_RULES}", f"--port={port}",
             "--bind-address=127.0.0.1"]          # the image binds 0.0.0.0; loopback is enough here
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    # ENV lines, continuation lines included: KEY=VALUE pairs.
    for block in re.findall(r"^ENV\s+((?:.*\\\n)*.*)$", text, re.M):
        for pair in shlex.split(block.replace("\\\n", " ")):
            name, _, value = pair.partition("=")
            env[name] = value
    return argv, env


def precompiled_command(python: str, cert: Path, key: Path, port: int, directory: Path) -> tuple:
    """(argv, env) of image_command(..., no_site=True) as `python -S -P -m reqapi` from a copy of
    reqapi.py in `directory` compiled beforehand: what the image would start if its command ran a
    module.  Not the product's shape (the image runs the script, and CPython compiles a script at
    every start, never from a .pyc); measured to show what that compilation costs at start-up."""
    argv, env = image_command(python, cert, key, port, no_site=True)
    at = argv.index(str(REQAPI))
    # -P: not the working directory first on sys.path, where a reqapi.py without its .pyc may be.
    return argv[:at] + ["-P", "-m", "reqapi"] + argv[at + 1:], {**env, "PYTHONPATH": str(directory)}


def compile_copy(python: str, directory: Path) -> Path:
    """A copy of reqapi.py in `directory`, compiled to its .pyc by `python`."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REQAPI, directory / "reqapi.py")
    subprocess.run([python, "-m", "py_compile", str(directory / "reqapi.py")], check=True)
    return directory


def start_once(name: str, argv: list, env: dict, port: int, cpu: Optional[int], context: ssl.SSLContext,
               log_path: Path) -> tuple:
    """Start argv on `cpu` and poll /livez until 200: (ms from just before the exec to the end of that
    answer, CPU other processes took meanwhile as a share of one core, VmRSS MB once settled)."""
    preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None   # no taskset exec
    with open(log_path, "ab") as log:
        all_before, own_before = task_ticks(), sum(os.times()[:2])
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL, preexec_fn=preexec)
    try:
        answered = None
        while time.perf_counter() - started < 30 and process.poll() is None:
            try:
                answer = https_get(context, port, "/livez", {}, timeout=2.0)
            except (OSError, ssl.SSLError):
                time.sleep(0.002)
                continue
            if answer["status"] == 200:
                answered = time.perf_counter()
                break
            time.sleep(0.002)
        if answered is None:
            tail = log_path.read_bytes()[-3000:].decode("utf-8", "replace")
            raise BenchError(f"{name} did not answer /livez with 200 (exit code {process.poll()}):\n"
                             f"{shlex.join(argv)}\n{tail}")
        # As in Runner.run (jiffies: coarse over a start-up's few hundred ms).
        foreign = ((task_ticks() - all_before - proc_cpu_ticks(process.pid)) / CLK_TCK
                   - (sum(os.times()[:2]) - own_before))
        return (answered - started) * 1000, max(0.0, foreign) / (answered - started), \
            settled_rss_kb(process.pid) / 1024
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=25)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def measure_startups(name: str, make: Callable[[int], tuple], cpu: Optional[int], context: ssl.SSLContext,
                     starts: int, workdir: Path, max_others: float, retries: int) -> dict:
    """`starts` starts of `make(port)`'s (argv, env) (see start_once); a start during which other
    processes took more than `max_others` of a core is done again, up to `retries` times, and the
    least disturbed attempt is kept."""
    times, rss, others = [], [], []
    argv: list = []
    repeated = 0
    log_path = workdir / f"startup-{name.replace(' ', '_')}.log"
    for _ in range(starts):
        best: Optional[tuple] = None
        for attempt in range(1 + retries):
            port = free_port()
            argv, env = make(port)
            result = start_once(name, argv, env, port, cpu, context, log_path)
            if best is None or result[1] < best[1]:
                best = result
            if result[1] <= max_others:
                break
        repeated += attempt                     # attempts beyond the first
        times.append(best[0])
        others.append(best[1])
        rss.append(best[2])
    return {"name": name, "command": shlex.join(argv), "startup_ms": times, "rss_mb": rss,
            "startup_ms_median": statistics.median(times), "rss_mb_median": statistics.median(rss),
            "other_load": others, "repeated": repeated}


# -- idle connections and watches held at once ---------------------------------------------

def open_held(context: ssl.SSLContext, port: int, path: str, count: int, into: list,
              first_chunk: bool) -> tuple:
    """Open `count` TLS connections one after another, each with one GET answered 200 (a watch: its
    first event chunk received), and keep them open in `into`.  (seconds each, error or None)."""
    request = request_bytes(port, path, {})
    took: list = []
    for n in range(count):
        started = time.perf_counter()
        raw: Optional[socket.socket] = None
        sock: Optional[ssl.SSLSocket] = None
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=HELD_TIMEOUT)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            into.append(sock)                   # from here on the caller closes it
            answer = exchange(sock, request, first_chunk)
        except (OSError, ssl.SSLError, ValueError) as error:
            if sock is None and raw is not None:
                raw.close()
            return took, f"connection {n + 1} of {count}: {error!r}"
        if answer["status"] != 200 or (first_chunk and b'"type"' not in answer["body"]):
            return took, f"connection {n + 1} of {count}: HTTP {answer['status']} {answer['body'][:200]!r}"
        took.append(time.perf_counter() - started)
    return took, None


def count_open(socks: list) -> int:
    """How many of these connections the server still holds open: not hung up, and any bytes that
    arrived meanwhile are data (a watch event), not a TLS close."""
    poller = select.poll()
    by_fd = {}
    for sock in socks:
        by_fd[sock.fileno()] = sock
        poller.register(sock, select.POLLIN | select.POLLRDHUP)
    closed = 0
    for fd, events in poller.poll(0):
        sock = by_fd[fd]
        if events & (select.POLLHUP | select.POLLERR | select.POLLRDHUP):
            closed += 1
            continue
        sock.setblocking(False)
        try:
            if not sock.recv(65536):
                closed += 1
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass                                # a TLS record without application data
        except OSError:
            closed += 1
        finally:
            sock.settimeout(HELD_TIMEOUT)
    return len(socks) - closed


def timed_gets(context: ssl.SSLContext, port: int, path: str, count: int) -> list:
    """Seconds for each of `count` GETs, each on a new TLS connection (connect + handshake + answer)."""
    took = []
    for _ in range(count):
        started = time.perf_counter()
        answer = https_get(context, port, path, {}, timeout=30.0)
        if answer["status"] != 200:
            raise BenchError(f"GET {path} answered {answer['status']} while connections were held")
        took.append(time.perf_counter() - started)
    return took


def hold_test(server: Server, context: ssl.SSLContext, idle: int, watches: int, probes: int) -> dict:
    """RSS of a freshly started server (one request done), with `idle` keep-alive connections each
    answered once, and with `watches` watches each past its first event besides; then, with all of
    them open, `probes` new clients' GET of the object and of /livez."""
    pid = server.process.pid
    out: dict = {"idle": idle, "watches": watches}
    socks: list = []
    all_before, server_before, own_before = task_ticks(), proc_cpu_ticks(pid), sum(os.times()[:2])
    hold_started = time.perf_counter()
    try:
        out["rss_before_kb"] = settled_rss_kb(pid)
        out["threads_before"] = proc_status(pid)["Threads"]
        started = time.perf_counter()
        took, error = open_held(context, server.port, VERSUS_ROUTES["object"][0], idle, socks, False)
        out["idle_opened"], out["idle_open_s"] = len(took), time.perf_counter() - started
        out["idle_each_ms"] = [t * 1000 for t in took]
        if error:
            out["error"] = f"idle {error}"
            return out
        out["rss_idle_kb"] = settled_rss_kb(pid)
        if watches:
            started = time.perf_counter()
            took, error = open_held(context, server.port, WATCH_PATH, watches, socks, True)
            out["watches_opened"], out["watches_open_s"] = len(took), time.perf_counter() - started
            out["watch_each_ms"] = [t * 1000 for t in took]
            if error:
                out["error"] = f"watch {error}"
                return out
            out["rss_watches_kb"] = settled_rss_kb(pid)
        out["threads_held"] = proc_status(pid)["Threads"]
        out["new_client_ms"] = [t * 1000 for t in timed_gets(context, server.port, VERSUS_ROUTES["object"][0],
                                                            probes)]
        out["livez_ms"] = [t * 1000 for t in timed_gets(context, server.port, "/livez", probes)]
        out["still_open"] = count_open(socks)
        out["held"] = len(socks)
        return out
    except (OSError, ssl.SSLError, BenchError) as error:
        out["error"] = repr(error)
        return out
    finally:
        out.setdefault("held", len(socks))
        if server.alive():                      # as in Runner.run, over the whole hold
            foreign = ((task_ticks() - all_before - (proc_cpu_ticks(pid) - server_before)) / CLK_TCK
                       - (sum(os.times()[:2]) - own_before))
            out["other_load"] = max(0.0, foreign) / (time.perf_counter() - hold_started)
        for sock in socks:
            try:
                sock.close()
            except OSError:
                pass


# -- the report --------------------------------------------------------------------------------

def median_of(runs: list, pick: Callable[[dict], Optional[float]]) -> Optional[float]:
    values = [v for v in (pick(run) for run in runs) if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: list) -> dict:
    """(route, connections, server) -> medians over the rounds (req/s, p50, p99 separately)."""
    groups: dict = {}
    for run in runs:
        groups.setdefault((run["route"], run["connections"], run["server"]), []).append(run)
    out = {}
    for key, group in groups.items():
        rps = [run["rps"] for run in group]
        out[key] = {"rps": statistics.median(rps), "rps_min": min(rps), "rps_max": max(rps), "runs": len(group),
                    # A run that completed no request has no latency (wrk prints 0.00us).
                    "p50": median_of(group, lambda r: r["latency_s"].get("p50") if r["requests"] else None),
                    "p99": median_of(group, lambda r: r["latency_s"].get("p99") if r["requests"] else None),
                    "errors": sum(run["errors"] for run in group),
                    "error_detail": [fmt_errors(run) for run in group if run["errors"]],
                    "cpu_us": median_of(group, lambda r: r["server_cpu_us_per_req"]),
                    "core": median_of(group, lambda r: r["server_core_busy"]),
                    "gen_core": median_of(group, lambda r: r["generator_core_busy"]),
                    "other_load": max(run["other_load"] for run in group),
                    "peak_rss_mb": max(run["peak_rss_mb"] for run in group)}
    return out


def ratio(value: Optional[float], base: Optional[float], digits: int = 2) -> str:
    return "-" if not value or not base else f"{value / base:.{digits}f}"


def print_versus(summary: dict, servers: list, gin: str) -> None:
    rows = []
    for route, connections in VERSUS_CONFIGS:
        gin_object = summary.get(("object", connections, gin))
        for name in servers:
            entry = summary.get((route, connections, name))
            if entry is None:
                continue
            own_object = summary.get(("object", connections, name))
            rows.append([f"{ROUTE_TITLES[route]} c{connections}", name, f"{entry['rps']:,.0f}",
                         f"{entry['rps_min']:,.0f}–{entry['rps_max']:,.0f}",
                         ratio(entry["rps"], gin_object and gin_object["rps"]),
                         "-" if route == "object" else ratio(entry["rps"], own_object and own_object["rps"]),
                         fmt_latency(entry["p50"]), fmt_latency(entry["p99"]),
                         ratio(entry["p99"], gin_object and gin_object["p99"], 1) if route == "object" else "-",
                         str(entry["errors"]), "-" if entry["cpu_us"] is None else f"{entry['cpu_us']:.0f}",
                         fmt_share(entry["core"]), fmt_share(entry["gen_core"]), fmt_share(entry["other_load"]),
                         f"{entry['peak_rss_mb']:.1f}"])
    print(table(rows, ["config", "server", "req/s", "min–max", "×gin", "×own object", "p50", "p99", "p99 ×gin",
                       "errors", "srv CPU us/req", "srv core", "wrk core", "others", "peak RSS MB"],
                "llrrrrrrrrrrrrr"))


def fmt_ms_spread(values: list) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} / {max(values):.1f}"


def print_holds(holds: list) -> None:
    rows = []
    for name, held in holds:
        before, idle_kb, watch_kb = held.get("rss_before_kb"), held.get("rss_idle_kb"), held.get("rss_watches_kb")
        per_idle = (idle_kb - before) * 1024 / held["idle"] if before and idle_kb else None
        per_watch = (watch_kb - idle_kb) * 1024 / held["watches"] if idle_kb and watch_kb else None
        opened = f"{held.get('idle_opened', 0)}/{held['idle']}"
        if held["watches"]:
            opened += f" + {held.get('watches_opened', 0)}/{held['watches']}"
        rows.append([name, opened,
                     "-" if before is None else f"{before / 1024:.1f}",
                     "-" if idle_kb is None else f"{idle_kb / 1024:.1f}",
                     "-" if watch_kb is None else f"{watch_kb / 1024:.1f}",
                     "-" if per_idle is None else f"{per_idle / 1024:.1f}",
                     "-" if per_watch is None else f"{per_watch / 1024:.1f}",
                     f"{held.get('threads_before', '-')} → {held.get('threads_held', '-')}",
                     fmt_ms_spread(held.get("new_client_ms", [])), fmt_ms_spread(held.get("livez_ms", [])),
                     "-" if "still_open" not in held else f"{held['still_open']}/{held['held']}",
                     fmt_share(held.get("other_load"))])
    print(table(rows, ["server", "held (idle + watches)", "RSS before MB", "+idle MB", "+watches MB",
                       "KB/idle conn", "KB/watch", "threads", "new client ms (med / max)",
                       "/livez ms (med / max)", "still open", "others"], "llrrrrrrrrrr"))
    for name, held in holds:
        opening = [f"{name}: opened {held.get('idle_opened', 0)} idle in {held.get('idle_open_s', 0):.1f} s "
                   f"(each {fmt_ms_spread(held.get('idle_each_ms', []))} ms med / max)"]
        if held["watches"]:
            opening.append(f"{held.get('watches_opened', 0)} watches in {held.get('watches_open_s', 0):.1f} s "
                           f"(each {fmt_ms_spread(held.get('watch_each_ms', []))} ms)")
        print("  " + ", ".join(opening) + (f"; FAILED: {held['error']}" if held.get("error") else ""))


def print_startups(startups: list, targets: tuple) -> None:
    ms_target, mb_target = targets
    rows = []
    for entry in startups:
        ms, mb = entry["startup_ms_median"], entry["rss_mb_median"]
        verdict = "" if not entry["name"].startswith("reqapi") else (
            f"{'meets' if ms < ms_target else 'misses'} < {ms_target:g} ms, "
            f"{'meets' if mb < mb_target else 'misses'} < {mb_target:g} MB")
        rows.append([entry["name"], f"{ms:.0f}", f"{min(entry['startup_ms']):.0f}–{max(entry['startup_ms']):.0f}",
                     f"{mb:.1f}", f"{min(entry['rss_mb']):.1f}–{max(entry['rss_mb']):.1f}",
                     fmt_share(max(entry["other_load"])), verdict])
    print(table(rows, ["server (as started)", "exec → 200 /livez ms", "min–max", "settled VmRSS MB", "min–max",
                       "others", "targets"], "lrrrrrl"))


@dataclass
class Versus:
    """What the three parts of --versus-gin share."""
    args: argparse.Namespace
    workdir: Path
    ca: Path
    cert: Path
    key: Path
    context: ssl.SSLContext             # a client that trusts `ca`
    rules: Path                         # RULES, for the throughput and held servers
    body_file: Path                     # the bytes gin serves: reqapi's answer to the object GET
    gin_binary: str
    pythons: list
    srv_cpu: Optional[int]
    gen_cpu: Optional[int]
    results: dict
    servers: dict = field(default_factory=dict)      # label -> Server, running; stopped at the end in any case
    content_type: str = ""


def versus_startups(v: Versus) -> list:
    """Part 1: start-up and settled RSS as the image starts reqapi (and gin, for reference)."""
    args = v.args
    print(f"\n[1/3] start-up: {args.starts} starts each, exec → first 200 on /livez, then VmRSS once settled")
    startups = []
    for interpreter in v.pythons:
        python, label = interpreter.path, interpreter.label
        directory = compile_copy(python, v.workdir / f"precompiled-{interpreter.version}")
        # (The commands are made and started within this iteration: the lambdas' late binding is safe.)
        for name, make in ((label, lambda port: image_command(python, v.cert, v.key, port)),
                           (f"{label} -S", lambda port: image_command(python, v.cert, v.key, port, no_site=True)),
                           (f"{label} -S -m, .pyc",
                            lambda port: precompiled_command(python, v.cert, v.key, port, directory))):
            entry = measure_startups(name, make, v.srv_cpu, v.context, args.starts, v.workdir, args.max_others,
                                     args.retries)
            startups.append(entry)
            print(f"  {name}: {entry['startup_ms_median']:.0f} ms, {entry['rss_mb_median']:.1f} MB   "
                  f"({entry['command']})")
    # gin's body file is a placeholder here: /livez is what is asked.
    v.body_file.write_bytes(b"{}")
    gin_env = {**os.environ, "GOMAXPROCS": "1"}
    entry = measure_startups(
        "gin", lambda port: ([v.gin_binary, "-addr", f"127.0.0.1:{port}", "-cert", str(v.cert), "-key", str(v.key),
                              "-body", str(v.body_file)], gin_env),
        v.srv_cpu, v.context, args.starts, v.workdir, args.max_others, args.retries)
    startups.append(entry)
    print(f"  gin: {entry['startup_ms_median']:.0f} ms, {entry['rss_mb_median']:.1f} MB")
    return startups


def versus_throughput(v: Versus) -> list:
    """Part 2: every reqapi and gin up at once (the idle ones cost nothing measurable), gin serving
    the bytes reqapi answered, then the rounds; returns the server labels in table order."""
    args = v.args
    print(f"\n[2/3] throughput: {', '.join(f'{ROUTE_TITLES[r]} c{c}' for r, c in VERSUS_CONFIGS)}")
    for interpreter in v.pythons:
        server = Server(v.workdir, v.cert, v.key, v.rules, args.log_level, args.extra, v.srv_cpu,
                        python=interpreter.path, name=interpreter.label.replace(" ", "-"))
        v.servers[interpreter.label] = server
        server.start(v.context, "/livez")
    if args.before:
        # An older reqapi.py in the same rounds (under the first Python), for before/after figures.
        label = f"before {v.pythons[0].label.split()[-1]}"
        server = Server(v.workdir, v.cert, v.key, v.rules, args.log_level, args.extra, v.srv_cpu,
                        python=v.pythons[0].path, name="before", script=Path(args.before).resolve())
        v.servers[label] = server
        server.start(v.context, "/livez")
    first = v.servers[v.pythons[0].label]
    reference = https_get(v.context, first.port, VERSUS_ROUTES["object"][0], {})
    if reference["status"] != 200:
        raise BenchError(f"reqapi answered the object GET with {reference['status']}: {reference['body'][:300]!r}")
    v.content_type = reference["headers"].get("content-type", "")
    v.body_file.write_bytes(reference["body"])
    gin = GinServer(v.workdir, v.gin_binary, v.cert, v.key, v.body_file, v.content_type, v.srv_cpu)
    v.servers["gin"] = gin
    gin.start(v.context, VERSUS_ROUTES["object"][0])
    print(f"  gin: {gin.check_gomaxprocs()}, release mode, no logger: {shlex.join(gin.command)}")
    for label, server in v.servers.items():
        answers = {route: https_get(v.context, server.port, path, headers)
                   for route, (path, headers) in VERSUS_ROUTES.items() if server is not gin or route == "object"}
        obj = answers["object"]
        same = obj["body"] == reference["body"] and obj["headers"].get("content-type") == v.content_type
        if server is gin and not same:
            raise BenchError(f"gin's answer differs from reqapi's: {obj['headers']} {obj['body'][:200]!r}")
        routes = ", ".join(f"{route} {a['status']} ({len(a['body'])} B)" for route, a in answers.items())
        print(f"  {label}: {server.tls}; object head {obj['head_bytes']} B + body {len(obj['body'])} B "
              f"{obj['headers'].get('content-type')}{' (the bytes gin serves)' if server is first else ''}"
              f"{', identical body' if server is gin else ''}; {routes}")
        bad = [route for route, a in answers.items() if a["status"] != 200]
        if bad:
            raise BenchError(f"{label} does not answer 200 on {', '.join(bad)}")
    v.results["object_body_bytes"] = len(reference["body"])
    v.results["commands"] = {label: server.command for label, server in v.servers.items()}
    runners = {label: Runner(server, "wrk", v.ca, v.gen_cpu, v.srv_cpu, v.workdir)
               for label, server in v.servers.items()}
    if args.warmup > 0:
        for runner in runners.values():
            runner.run("object", 16, args.warmup, VERSUS_ROUTES["object"])
            time.sleep(PAUSE)
    labels = list(v.servers)
    v.results["repeated_runs"] = 0
    for round_no in range(args.rounds):
        for route, connections in VERSUS_CONFIGS:
            taking = [label for label in labels if route == "object" or v.servers[label] is not gin]
            shift = round_no % len(taking)
            for label in taking[shift:] + taking[:shift]:
                best: Optional[dict] = None
                for attempt in range(1 + args.retries):
                    run = runners[label].run(route, connections, args.duration, VERSUS_ROUTES[route])
                    run.pop("raw", None)
                    run.update({"server": label, "round": round_no + 1, "attempt": attempt + 1})
                    lat = run["latency_s"]
                    disturbed = run["other_load"] > args.max_others
                    print(f"  round {round_no + 1}/{args.rounds} {ROUTE_TITLES[route]} c{connections} {label}: "
                          f"{run['rps']:,.0f} req/s, p50 {fmt_latency(lat.get('p50'))}, p99 "
                          f"{fmt_latency(lat.get('p99'))}, errors {fmt_errors(run)}, others "
                          f"{fmt_share(run['other_load'])}"
                          + (" (disturbed: again)" if disturbed and attempt < args.retries else ""))
                    if best is None or run["other_load"] < best["other_load"]:
                        best = run
                    time.sleep(PAUSE)
                    if not disturbed:
                        break
                v.results["runs"].append(best)
                v.results["repeated_runs"] += attempt          # attempts beyond the first
    for server in v.servers.values():
        server.stop()
    return labels


def versus_holds(v: Versus) -> list:
    """Part 3: a fresh server each, allowed enough descriptors (and, where its flags exist, enough
    --max-connections and --max-watches) to hold every connection; [(label, hold_test's dict)]."""
    args = v.args
    held_total = args.idle_connections + args.watches
    print(f"\n[3/3] held at once: {args.idle_connections} idle keep-alive TLS connections (one GET each) + "
          f"{args.watches} watches ({WATCH_PATH}, first event received); then {args.probes} new clients")
    holds = []
    limit_fds = held_total + 1024
    for interpreter in v.pythons:
        extra = list(args.extra)
        flags = reqapi_flags(interpreter.path)
        if "--max-connections" in flags:
            extra += ["--max-connections", str(held_total + 2 * args.probes + 64)]
        if "--max-watches" in flags:                # a watch beyond the cap is answered 429
            extra += ["--max-watches", str(args.watches + 16)]
        server = Server(v.workdir, v.cert, v.key, v.rules, args.log_level, extra, v.srv_cpu, python=interpreter.path,
                        nofile=limit_fds, name=interpreter.label.replace(" ", "-") + "-held")
        v.servers[server.name] = server
        server.start(v.context, VERSUS_ROUTES["object"][0])
        try:
            held = hold_test(server, v.context, args.idle_connections, args.watches, args.probes)
        finally:
            exit_code = server.stop()
        held.update({"command": server.command, "exit_code": exit_code})
        holds.append((interpreter.label, held))
        print(f"  {interpreter.label}: {held.get('error') or 'all held'} ({shlex.join(server.command)})")
    gin = GinServer(v.workdir, v.gin_binary, v.cert, v.key, v.body_file, v.content_type, v.srv_cpu, nofile=limit_fds)
    v.servers["gin-held"] = gin
    gin.start(v.context, VERSUS_ROUTES["object"][0])
    try:
        held = hold_test(gin, v.context, args.idle_connections, 0, args.probes)
    finally:
        gin.stop()
    holds.append(("gin", held))
    print(f"  gin: {held.get('error') or 'all held'} (idle connections only: it serves no watch)")
    return holds


def print_versus_report(v: Versus, labels: list, holds: list, startups: list) -> None:
    """The three tables together, each with what its columns mean."""
    args, results = v.args, v.results
    summary = summarise(results["runs"])
    results["summary"] = [{"route": k[0], "connections": k[1], "server": k[2], **e} for k, e in summary.items()]
    print(f"\n== Throughput: medians of {args.rounds} rounds of {args.duration:g} s (req/s, p50 and p99 "
          f"each the median) ==")
    print_versus(summary, labels, "gin")
    print("×gin = req/s ÷ gin's object GET at the same connections (the same rounds); ×own object = req/s ÷ "
          "the same server's\nobject GET at the same connections; p99 ×gin = p99 ÷ gin's p99 (above 1: slower); "
          "errors = wrk's socket errors + non-2xx,\nsummed over the rounds; srv CPU = the server's utime+stime "
          f"per request; srv core / wrk core = busy share of CPU {v.srv_cpu} / {v.gen_cpu}; others = the most CPU\n"
          "(share of one core) that other processes on this machine used during one of the runs: above a few "
          f"% the figures are disturbed; {results['repeated_runs']} runs were done again because "
          f"others exceeded {fmt_share(args.max_others)} (--max-others), the least disturbed attempt kept.")
    disturbed = [run for run in results["runs"] if run["other_load"] > args.max_others]
    if disturbed:
        print(f"WARNING: {len(disturbed)} of the {len(results['runs'])} runs kept were disturbed (others above "
              f"{fmt_share(args.max_others)} even after {args.retries} more attempts): other processes shared "
              f"these cores, so these figures\nare not comparable with a quiet run's; the ratios to gin (same "
              f"rounds) suffer least.")
    print("\n== Held at once (fresh server each; RSS = VmRSS once settled) ==")
    print_holds(holds)
    print(f"KB/idle conn = (+idle - before) ÷ {args.idle_connections}; KB/watch = (+watches - +idle) ÷ "
          f"{args.watches}; new client = connect + TLS handshake + GET of the object on a new connection, "
          f"{args.probes} times,\nwith everything held; still open = held connections the server had not "
          f"closed at the end; others = as above, over the whole hold.")
    print(f"\n== Start-up as the image starts it (median of {args.starts}; Dockerfile ENTRYPOINT and ENV, "
          "the Deployment's --cert/--key/--rules/--port) ==")
    print_startups(startups, (TARGET_STARTUP_MS, TARGET_RSS_MB))
    print("-S = the same command with python -S: no site-packages start-up hooks (this machine's "
          "interpreters have some; the distroless image has none);\n-S -m, .pyc = `python -S -P -m reqapi` "
          "from a copy compiled beforehand: not how the image starts reqapi (a script is compiled at every "
          "start),\nshown for what that compilation costs; others = as above, the most over the starts, "
          f"from exec to the answer; {sum(e['repeated'] for e in startups)} starts were done again because others "
          f"exceeded {fmt_share(args.max_others)}.")
    for entry in startups:
        if entry["name"].startswith("reqapi") and "-S" not in entry["name"]:
            print(f"  {entry['name']}: {entry['command']}")
    print(f"\nload average at the end: {load_average()}")


def versus_gin(args: argparse.Namespace) -> int:
    """The side-by-side benchmark of issue 11 (see the section comment above): check what it needs,
    print the set-up, run the three parts, print the report."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    if not shutil.which("wrk"):
        print("bench: --versus-gin drives both servers with wrk, which is not installed here; install it "
              "(Debian: apt-get install -y wrk) and run again", file=sys.stderr)
        return 1
    held_total = args.idle_connections + args.watches
    nofile = raise_nofile(held_total + 1024)           # this process holds them all, plus probes and files
    if nofile < held_total + 64:
        print(f"bench: RLIMIT_NOFILE is {nofile}, too low to hold {held_total} connections; raise the hard limit",
              file=sys.stderr)
        return 1
    try:
        pythons, notes = resolve_interpreters(args.python)
        gin_binary = build_gin()
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    srv_cpu, gen_cpu, pin_how = choose_cpus(args.no_pin)
    if gen_cpu is not None:
        os.sched_setaffinity(0, {gen_cpu})      # this harness (probes, held connections) on wrk's core
    machine = machine_info()
    said = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    machine["wrk"] = ((said.stdout or said.stderr).strip().splitlines() or ["wrk"])[0].split(" Copyright")[0]
    print("reqapi versus Go/gin (issue 11)")
    print(f"  machine     : {machine['cpu_model']}, {machine['cores']} cores, {machine.get('os', '?')}, kernel "
          f"{machine['kernel']}, load average {machine.get('loadavg_at_start', '?')}")
    for interpreter in pythons:
        print(f"  python      : {interpreter.version} {interpreter.path} ({interpreter.openssl})")
    for note in notes:
        print(f"  python      : {note}")
    print("  pinning     : " + (f"servers on CPU {srv_cpu}, wrk and this harness on CPU {gen_cpu} ({pin_how})"
                                 if srv_cpu is not None else pin_how))
    print(f"  load        : {machine['wrk']}: wrk -t1 -cN -d{args.duration:g}s --latency --timeout "
          f"{REQUEST_TIMEOUT:g}s, keep-alive; {args.rounds} rounds (server order rotated every round), "
          f"{PAUSE:g} s pause, a {args.warmup:g} s warm-up per server")
    print(f"  reqapi      : log level {args.log_level or 'the default (a line per request, to a file)'}"
          + (f", extra flags {shlex.join(args.extra)}" if args.extra else ""))
    if args.before:
        print(f"  before      : {args.before} in the throughput rounds too, under {pythons[0].version}")

    workdir = Path(tempfile.mkdtemp(prefix="reqapi-bench-versus-"))
    results: dict = {"machine": machine, "config": {
        "duration_s": args.duration, "rounds": args.rounds, "warmup_s": args.warmup,
        "pythons": [p._asdict() for p in pythons], "idle_connections": args.idle_connections,
        "watches": args.watches, "starts": args.starts, "max_others": args.max_others, "retries": args.retries,
        "before": args.before,
        "pinning": {"server_cpu": srv_cpu, "generator_cpu": gen_cpu, "how": pin_how}}, "runs": []}
    v: Optional[Versus] = None
    code = 0
    try:
        ca, cert, key = make_certificates(workdir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(ca))
        rules = workdir / "rules.json"
        rules.write_text(json.dumps(RULES, indent=2))
        print(f"  certificate : ECDSA P-256 for IP:127.0.0.1 from a throwaway CA ({cert.name}); the same files "
              f"for every server")
        v = Versus(args, workdir, ca, cert, key, context, rules, workdir / "object-body.json", gin_binary, pythons,
                   srv_cpu, gen_cpu, results)
        # Start-up first, while no server of this bench runs.
        startups = results["startups"] = versus_startups(v)
        labels = versus_throughput(v)
        holds = versus_holds(v)
        results["holds"] = {name: held for name, held in holds}
        print_versus_report(v, labels, holds, startups)
    except BenchError as error:
        print(f"\nbench: {error}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        code = 130
    finally:
        for server in (v.servers.values() if v else ()):
            server.stop()
        write_json(args, results)
        keep_or_remove(args, workdir)
    return code


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 tests/bench.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark the real reqapi.py over HTTPS on this machine: start-up time, idle RSS,\n"
                    "and for each route and keep-alive connection count: req/s, p50/p90/p99 latency,\n"
                    "errors, server CPU per request and peak RSS.",
        epilog="load generator:\n"
               "  wrk when installed (apt-get install wrk), run as `wrk -t1 -cN -dDs --latency`;\n"
               "  otherwise (or with --generator python) a standard-library epoll client in a child\n"
               "  process: N non-blocking TLS connections, one request in flight on each.\n"
               "pinning:\n"
               "  the server runs on the first allowed CPU (taskset -c 0), the generator and this\n"
               "  harness on the second, when there are two or more.\n"
               "certificates:\n"
               "  an ECDSA P-256 CA and server certificate from the openssl command (or trustme),\n"
               "  in a temporary directory removed at the end (see --keep), with the rules file and\n"
               "  the server's log.\n"
               "examples:\n"
               "  python3 tests/bench.py --quick\n"
               "  python3 tests/bench.py --generator python --routes object --connections 16\n"
               "  python3 tests/bench.py --server-args='--max-connections 512' --log-level warning\n"
               "  python3 tests/bench.py --versus-gin                  # ~12 min; --duration 2 --rounds 1 to try it\n"
               "exit status: 0 done, 1 the server failed to start or died, 2 bad options.")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run (default 10; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="2 s runs and a 1 s warm-up")
    parser.add_argument("--connections", default="1,16,256", help="keep-alive connection counts (default 1,16,256)")
    parser.add_argument("--routes", default="object,discovery,table",
                        help="routes to drive, from: object, discovery, table (default: all three)")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto",
                        help="auto = wrk if installed, else python (default auto)")
    parser.add_argument("--server-args", default="", metavar="'FLAGS'",
                        help="extra reqapi flags as one shell-quoted string; write it with '=' since it starts "
                             "with '--': --server-args='--max-connections 512'")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None,
                        help="reqapi's --log-level (default: not given, i.e. the server's own default, which "
                             "logs a line per request)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds of uncounted load (object route, 16 connections) before the runs "
                             "(default 2; 1 with --quick; 0 = none)")
    parser.add_argument("--json", metavar="FILE", help="write the raw results (machine, start-up, every run) here")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and the generator to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (certificates, "
                                                             "rules, server log) and print where it is")
    parser.add_argument("--through-apiserver", action="store_true",
                        help="instead: a GET of one object through a real kube-apiserver (built by "
                             "tests/controlplane/build.sh; needs Go, root and the test packages) beside the same "
                             "GET sent to reqapi directly, at the --connections counts (default 1,16)")
    parser.add_argument("--history", action="store_true",
                        help="instead: usage history at scale - refresh time, memory and chunking against a real "
                             "Prometheus (Debian's prometheus/promtool) holding --history-pods pods at one sample a "
                             "minute, and GET latency with history on and off")
    parser.add_argument("--history-pods", type=int, default=2000, help="pods for --history (default 2000)")
    parser.add_argument("--history-days", type=int, default=2, help="completed days for --history (default 2)")
    versus = parser.add_argument_group(
        "--versus-gin (issue 11)",
        "instead: reqapi beside Go/gin (tests/bench_gin, built by its build.sh; needs Go and wrk) in the same "
        "runs: object GET at 16 and 256 connections, Table list and discovery at 256, over --rounds rounds; "
        "then connections and watches held at once; then start-up and idle RSS as the image starts reqapi")
    versus.add_argument("--versus-gin", action="store_true", help="run this comparison")
    versus.add_argument("--rounds", type=int, default=3, help="rounds, server order rotated each (default 3)")
    versus.add_argument("--python", action="append", default=[], metavar="PATH",
                        help="interpreter for reqapi; repeat for several (default: this Python and a Python 3.13 "
                             "if one is found)")
    versus.add_argument("--before", metavar="FILE",
                        help="an older reqapi.py to run in the same throughput rounds, e.g. from "
                             "'git show REV:reqapi.py > /tmp/before.py' (labelled 'before')")
    versus.add_argument("--idle-connections", type=int, default=1000,
                        help="idle keep-alive connections held at once (default 1000)")
    versus.add_argument("--watches", type=int, default=500, help="watches held besides (default 500)")
    versus.add_argument("--probes", type=int, default=5,
                        help="new clients timed while they are held, for the object and /livez (default 5)")
    versus.add_argument("--starts", type=int, default=5, help="process starts for the start-up figures (default 5)")
    versus.add_argument("--max-others", type=float, default=0.15, metavar="SHARE",
                        help="a run or start during which other processes on this machine took more than this "
                             "share of one core is done again (default 0.15)")
    versus.add_argument("--retries", type=int, default=2,
                        help="how many times a disturbed run or start is done again; the least disturbed attempt "
                             "is kept (default 2)")
    parser.add_argument("--memory", action="store_true",
                        help="instead: measure in this process (no server) what the bounds of reqapi.py allow "
                             "and what its glob matching costs: bytes per rule, per memo entry, per past rules "
                             "generation (tracemalloc), load times, and lookups against crafted names")
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loadgen:
        return args
    if args.through_apiserver and args.connections == "1,16,256":
        args.connections = "1,16"
    if args.duration is None:
        args.duration = 2.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be > 0 and --warmup >= 0")
    if min(args.rounds, args.idle_connections, args.probes, args.starts) < 1 or min(args.watches, args.retries) < 0:
        parser.error("--rounds, --idle-connections, --probes and --starts must be >= 1, --watches and --retries >= 0")
    if args.versus_gin and not (float(args.duration).is_integer() and float(args.warmup).is_integer()):
        parser.error("--versus-gin: --duration and --warmup in whole seconds (wrk takes no fractions)")
    try:
        args.connection_counts = [int(part) for part in args.connections.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--connections: a comma-separated list of integers, not {args.connections!r}")
    if not args.connection_counts or min(args.connection_counts) < 1:
        parser.error("--connections: at least one count, each >= 1")
    args.route_names = [part.strip() for part in args.routes.split(",") if part.strip()]
    unknown = [name for name in args.route_names if name not in ROUTES]
    if unknown or not args.route_names:
        parser.error(f"--routes: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ROUTES)}")
    try:
        args.extra = shlex.split(args.server_args)
    except ValueError as error:
        parser.error(f"--server-args: {error}")
    if args.generator == "wrk" and not shutil.which("wrk"):
        parser.error("--generator wrk: wrk is not installed (apt-get install wrk)")
    return args


def through_apiserver(args: argparse.Namespace) -> int:
    """GET of one object through kube-apiserver's aggregation layer, beside the same GET sent to
    reqapi directly, with the standard-library generator in a child process (wrk cannot present
    the admin's client certificate). Not pinned: kube-apiserver uses both cores. The difference is
    what the aggregator costs: authentication, authorization, the proxy and a second TLS hop."""
    sys.path.insert(0, str(ROOT / "tests"))
    from controlplane.cluster import ControlPlane, Installation, NetworkNamespace, build, unavailable_reason
    reason = unavailable_reason()
    if reason:
        print(f"bench: the control plane cannot run here: {reason}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="reqapi-bench-aggregator-"))
    bin_dir = build(lambda line: print(line, file=sys.stderr))
    netns = NetworkNamespace()
    plane = ControlPlane(bin_dir, workdir / "controlplane", netns.host_address)
    installation = None
    try:
        started = time.perf_counter()
        plane.start()
        print(f"control plane: kube-apiserver {plane.version()['gitVersion']} up in "
              f"{time.perf_counter() - started:.1f} s")
        installation = Installation(plane, netns, workdir / "reqapi")
        address = netns.pod_addresses[0]
        pod = installation.start_pod("a", address)
        installation.publish({address: (True, False)})
        installation.wait_available("True")
        path = ROUTES["object"][0]
        admin_cert, admin_key = (str(part) for part in plane.pki.admin)
        targets = {
            "through kube-apiserver": {"host": "127.0.0.1", "port": plane.port, "cafile": str(plane.pki.ca_file),
                                       "certfile": admin_cert, "keyfile": admin_key},
            "reqapi directly": {"host": address, "port": pod.port, "cafile": str(installation.certs.ca_file),
                                "certfile": admin_cert, "keyfile": admin_key, "no_hostname_check": True},
        }
        rows = []
        for connections in args.connection_counts:
            for name, target in targets.items():
                params = {**target, "path": path, "headers": {}, "connections": connections,
                          "duration": args.duration, "timeout": REQUEST_TIMEOUT}
                child = start_loadgen(params, None)
                child.stdin.write("go\n")
                child.stdin.flush()
                stdout, stderr = child.communicate(timeout=args.duration + 60)
                run = json.loads(stdout.strip().splitlines()[-1])
                errors = sum(run["socket_errors"].values()) + run["non2xx"]
                rows.append([name, str(connections), f"{run['rps']:,.0f}", fmt_latency(run["latency_s"]["p50"]),
                             fmt_latency(run["latency_s"]["p99"]), str(errors)])
                print(f"{name} c{connections}: {run['rps']:,.0f} req/s, p50 {fmt_latency(run['latency_s']['p50'])}, "
                      f"p99 {fmt_latency(run['latency_s']['p99'])}, errors {errors}", flush=True)
                time.sleep(PAUSE)
        print()
        print(table(rows, ["path", "conns", "req/s", "p50", "p99", "errors"], "llrrrr"))
        print(f"\nGET {path} as kubernetes-admin (client certificate), {args.duration:g} s per run, keep-alive, "
              f"not pinned (2 cores shared by kube-apiserver, etcd, reqapi and the generator).")
        return 0
    except BenchError as error:
        print(f"\nbench: {error}", file=sys.stderr)
        return 1
    finally:
        if installation is not None:
            installation.stop()
        plane.stop()
        netns.remove()
        keep_or_remove(args, workdir)


HISTORY_EPOCH_DAY = 20_000         # 2024-10-04: the history is dated, reqapi reads it with --history-as-of
HISTORY_PODS_PER_DEPLOYMENT = 5


def write_history_day(path: Path, pods: int, day: int) -> int:
    """One completed day of cAdvisor and kube-state-metrics series as OpenMetrics (one file a day:
    promtool holds a whole file in memory): per pod one container, CPU counter and working set at
    one sample a minute, owners every 10 minutes.  Deterministic.  Returns the samples written."""
    start = (HISTORY_EPOCH_DAY + day) * 86400
    lines = 0
    with path.open("w") as out:
        cadvisor = 'job="kubelet",metrics_path="/metrics/cadvisor",container="app",image="registry.example/app:1"'
        families = (("container_cpu_usage_seconds", "counter", "container_cpu_usage_seconds_total"),
                    ("container_memory_working_set_bytes", "gauge", "container_memory_working_set_bytes"))
        for family, kind, name in families:
            out.write(f"# TYPE {family} {kind}\n")
            for p in range(pods):
                d = p // HISTORY_PODS_PER_DEPLOYMENT
                head = f'{name}{{{cadvisor},namespace="ns{d % 20}",pod="web{d}-7f9c-{p}"}} '
                level = 50 + (d * 37) % 900                      # millicores, per deployment
                memory = (64 + (d * 53) % 1500) * 1048576.0
                total = day * 1440 * level * 60 / 1000.0
                rows = []
                for m in range(1440):
                    wave = 1.0 + 0.5 * math.sin(2 * math.pi * m / 1440 + p)
                    if kind == "counter":
                        total += level * wave * 60 / 1000.0
                        rows.append(f"{head}{total:.3f} {start + (m + 1) * 60}\n")
                    else:
                        rows.append(f"{head}{memory * (0.9 + 0.1 * wave):.0f} {start + (m + 1) * 60}\n")
                out.writelines(rows)
                lines += len(rows)
        ksm = 'job="kube-state-metrics"'
        out.write("# TYPE kube_pod_owner gauge\n")
        for p in range(pods):
            d = p // HISTORY_PODS_PER_DEPLOYMENT
            head = (f'kube_pod_owner{{{ksm},namespace="ns{d % 20}",pod="web{d}-7f9c-{p}",owner_kind="ReplicaSet",'
                    f'owner_name="web{d}-7f9c",owner_is_controller="true"}} ')
            out.writelines(f"{head}1 {start + (m + 1) * 60}\n" for m in range(0, 1440, 10))
            lines += 144
        out.write("# TYPE kube_replicaset_owner gauge\n")
        for d in range(pods // HISTORY_PODS_PER_DEPLOYMENT):
            head = (f'kube_replicaset_owner{{{ksm},namespace="ns{d % 20}",replicaset="web{d}-7f9c",'
                    f'owner_kind="Deployment",owner_name="web{d}",owner_is_controller="true"}} ')
            out.writelines(f"{head}1 {start + (m + 1) * 60}\n" for m in range(0, 1440, 10))
            lines += 144
        out.write("# EOF\n")
    return lines


def history_bench(args: argparse.Namespace) -> int:
    """Usage history at scale against a real Prometheus: the first refresh's time, the server's
    memory with history, the chunking of the CPU subqueries under a lowered sample limit (the
    unchunked query is refused, reqapi's chunked refresh succeeds), and GET latency of one object
    with history on and off (the same generator, connections and duration)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import metrics_engines as me
    for binary in (me.PROMETHEUS, me.PROMTOOL):
        if not shutil.which(binary):
            print(f"bench: {binary} is not installed (apt-get install prometheus)", file=sys.stderr)
            return 1
    pods, days = args.history_pods, args.history_days
    per_day_cpu_query = pods * 2 * 1441                 # what Prometheus holds for one unchunked CPU subquery
    limit = per_day_cpu_query * 2 // 3                  # lowered: the unchunked subquery must be refused
    workdir = Path(tempfile.mkdtemp(prefix="reqapi-bench-history-"))
    engine = None
    servers: list = []
    try:
        started = time.perf_counter()
        files, samples = [], 0
        for day in range(days):
            path = workdir / f"day-{day}.om"
            samples += write_history_day(path, pods, day)
            files.append(path)
        size = sum(f.stat().st_size for f in files)
        written = time.perf_counter() - started
        seconds = me.backfill(files, workdir / "blocks")
        for f in files:
            f.unlink()
        engine = me.start_prometheus(workdir / "blocks", workdir / "prometheus", max_samples=limit)
        print(f"history: {pods} pods x {days} days at 60 s: {samples:,} samples, {size / 2**20:.0f} MiB of "
              f"OpenMetrics written in {written:.1f} s, promtool {seconds:.1f} s; Prometheus "
              f"--query.max-samples={limit:,} (an unchunked day's CPU subquery holds {per_day_cpu_query:,})")
        last = HISTORY_EPOCH_DAY + days - 1
        sel = 'job="kubelet",metrics_path="/metrics/cadvisor",container!="",container!="POD",image!=""'
        refused = me.instant(engine, f"quantile_over_time(0.95, max by (namespace, pod, container) "
                                     f"(rate(container_cpu_usage_seconds_total{{{sel}}}[2m]))[1d:1m])",
                             (last + 1) * 86400)
        print(f"unchunked CPU subquery: {refused.get('status')}: {refused.get('error', '')[:100]}")

        ca, cert, key = make_certificates(workdir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(ca))
        as_of = time.strftime("%Y-%m-%d", time.gmtime(last * 86400))
        history_flags = ["--prometheus-url", engine.url, "--history-as-of", as_of, "--history-window", f"{days}d",
                         "--prometheus-max-samples", str(limit), "--log-level", "warning"]
        srv_cpu, gen_cpu, _ = choose_cpus(args.no_pin)
        rows = []
        # History on first: after its refresh Prometheus is stopped, so that on this 2-core machine
        # it takes no CPU from either latency run; then the same runs with history off, and on again.
        runs = (("history on", history_flags), ("history off", ["--log-level", "warning"]))
        for name, extra in runs:
            directory = workdir / name.replace(" ", "-")
            directory.mkdir()
            server = Server(directory, cert, key, None, None, extra, srv_cpu)
            servers.append(server)
            server.start(context, "/livez")
            refresh = ""
            if name == "history on":
                deadline = time.monotonic() + 1800

                def gauges() -> dict:
                    text = https_get(context, server.port, "/metrics", {})["body"].decode()
                    return {k: float(v) for k, v in re.findall(r"^reqapi_(history_\w+) (\S+)$", text, re.M)}
                while gauges().get("history_last_success_timestamp_seconds", 0) == 0:
                    if gauges().get("history_query_errors", 0) or time.monotonic() > deadline:
                        raise BenchError(f"the refresh failed or took over 30 minutes:\n{server.log_tail()}")
                    time.sleep(0.5)
                found = gauges()
                refresh = (f"{found['history_refresh_duration_milliseconds'] / 1000:.1f} s for "
                           f"{found['history_workloads']:.0f} workloads")
                print(f"first refresh ({days} days, chunked): {refresh}")
                engine.stop()
                engine = None
            time.sleep(1.0)
            rss = proc_status(server.process.pid)["VmRSS"] / 1024
            runner = Runner(server, "python" if args.generator == "auto" and not shutil.which("wrk") else
                            ("wrk" if args.generator in ("auto", "wrk") else "python"), ca, gen_cpu, srv_cpu, workdir)
            runner.run("object", 16, min(args.warmup or 1.0, 2.0))
            run = runner.run("object", 16, args.duration or 10.0)
            lat = run["latency_s"]
            rows.append([name, f"{rss:.1f}", f"{run['rps']:,.0f}", fmt_latency(lat.get("p50")),
                         fmt_latency(lat.get("p99")), fmt_errors(run)])
            print(f"{name}: RSS {rss:.1f} MB after start{' and refresh' if refresh else ''}; GET object c16 "
                  f"{run['rps']:,.0f} req/s, p50 {fmt_latency(lat.get('p50'))}, p99 {fmt_latency(lat.get('p99'))}")
            server.stop()
        print()
        print(table(rows, ["server", "RSS MB", "req/s", "p50", "p99", "errors"], "lrrrrr"))
        return 0
    except BenchError as error:
        print(f"\nbench: {error}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            server.stop()
        if engine is not None:
            engine.stop()
        keep_or_remove(args, workdir)


# ---------------------------------------------------------------------------------------------
# --memory: the figures behind reqapi's memory bounds and its linear glob matching, in process
# ---------------------------------------------------------------------------------------------

def traced(action) -> tuple:
    """(result, bytes still allocated after it, peak bytes during it), as tracemalloc counts them
    (tests/test_predictor.py and tests/test_storage.py measure with it too)."""
    import gc
    import tracemalloc
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = action()
        gc.collect()
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, kept - base, peak - base


def shaped_rules(count: int, shape: str, length: int = 0) -> dict:
    """Rules of one shape, as tests/test_predictor.py measures them too: exact names, prefixes,
    suffixes, several "*", classes."""
    pad = "x" * length
    tail = f"-{pad}" if length else ""
    rules = []
    for i in range(count):
        where = {"exact": {"namespace": f"team{i % 50}{pad[:40]}", "name": f"w{i}{tail}"},
                 "prefix": {"namespace": f"team{i % 50}{pad[:40]}-*", "name": f"svc{i}{tail}-*"},
                 "suffix": {"name": f"*-{pad}w{i}"},
                 "multi": {"namespace": "*", "name": f"*.x{pad}{i}.*-*.*-svc"},
                 "classes": {"namespace": f"t[a-c]{i}-*", "name": f"*-w{i}?[!x]{pad}z"}}[shape]
        rules.append({"id": f"rule-{i}{tail}", "cpu": f"{i % 900 + 100}m", "memory": f"{i % 60 + 4}Mi", **where})
    return {"defaults": {"cpu": "100m", "memory": "100Mi"}, "rules": rules}


def _per_call(function, calls: int) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def memory_report() -> int:
    import re as regex
    sys.path.insert(0, str(ROOT))
    import reqapi
    MiB = 1024 * 1024
    workdir = Path(tempfile.mkdtemp(prefix="reqapi-bench-memory-"))
    try:
        print(f"reqapi memory and matching figures (Python {platform.python_version()}, in process, tracemalloc)\n")
        print("glob matching: one rule, a crafted name of the maximum length (253), best of 3")
        crafted = ("a." * 126 + "a")[:253]
        for glob in ("*.*.*.*.*-svc", "*a*b*c*d*e*f*"):
            rules = reqapi.parse_rules({"rules": [{"id": "r", "namespace": "prod-*", "name": glob, "cpu": "1"}]}, "b")
            now = _per_call(lambda: rules.predict("prod-x", crafted), 200)
            # The form reqapi compiled before: every "*" a free repeat that re may backtrack into.
            free = regex.compile("prod\\-[^\\x00]*\\x00" + "".join(
                "[^\\x00]*" if c == "*" else regex.escape(c) for c in glob))
            for length in (61, 121, 253):
                name = crafted[:length]
                before = _per_call(lambda: free.fullmatch(f"prod-x\x00{name}"), 1)
                print(f"  {glob:16s} {length:3d} characters: backtracking form {before * 1e3:9.2f} ms")
            print(f"  {glob:16s} 253 characters: atomic chunks      {now * 1e6:9.2f} us")
        print("\nlookups over 1,000 rules (uncached Rules.predict), best of 3")
        for shape, (namespace, name) in {"prefix": ("team990", "svc990-api"), "suffix": ("payments", "billing-w990"),
                                         "multi": ("any", "a.x990.b-c.d-svc"),
                                         "classes": ("tb990-prod", "billing-w990abz")}.items():
            rules = reqapi.parse_rules(shaped_rules(1000, shape), shape)
            miss = _per_call(lambda: rules.predict("nowhere", "nothing-matches"), 2000)
            hit = _per_call(lambda: rules.predict(namespace, name), 2000)
            print(f"  {shape:8s} a match {hit * 1e6:6.2f} us, no match {miss * 1e6:6.2f} us")

        print("\nrules: bytes a rule keeps once compiled (with its named workload), the estimate, a load's peak")
        for shape in ("exact", "prefix", "suffix", "multi", "classes"):
            for length in (0, 100):
                path = workdir / "rules.json"
                path.write_text(json.dumps(shaped_rules(2000, shape, length)))
                (rules, _), kept, peak = traced(lambda: (lambda r: (r, reqapi.Generation(r)))(
                    reqapi.load_rules(str(path))))
                print(f"  {shape:8s} +{length:3d} chars: keeps {kept / 2000:6.0f} B, estimate {rules.memory / 2000:6.0f} B, "
                      f"load peak {peak / 2000:6.0f} B a rule")
        for count in (1000, 10000):
            path = workdir / "rules.json"
            path.write_text(json.dumps(shaped_rules(count, "prefix")))
            started = time.perf_counter()
            rules = reqapi.load_rules(str(path))
            print(f"  {count:,} prefix rules load in {time.perf_counter() - started:.2f} s, estimate "
                  f"{reqapi.size_text(rules.memory)}")
        per_rule = reqapi.rules_memory(1, 10 + 8 + 6) - reqapi.rules_memory(0, 0)
        print(f"  RULES_MAX_BYTES {reqapi.size_text(reqapi.RULES_MAX_BYTES)}: "
              f"~{(reqapi.RULES_MAX_BYTES - reqapi.rules_memory(0, 0)) // per_rule:,} rules of ~{per_rule} B "
              f"(a 10-character id, 'team-a-*', 'svc-a*')")

        print("\npast generations: bytes a retired rules generation keeps, and its estimate")
        for count in (100, 8000):
            document = shaped_rules(count, "prefix")
            document["rules"] += [{"id": f"x{i}", "namespace": "shop", "name": f"w-{i}", "cpu": "1"}
                                  for i in range(count // 4)]

            path = workdir / "rules.json"
            path.write_text(json.dumps(document))

            def retired():
                generation = reqapi.Generation(reqapi.load_rules(str(path)))
                generation.retire()
                return generation
            generation, kept, _ = traced(retired)
            print(f"  {len(document['rules']):,} rules: keeps {reqapi.size_text(kept)}, estimate "
                  f"{reqapi.size_text(generation.memory)}: {reqapi.RulesHistory.MAX_BYTES // generation.memory} "
                  f"fit RulesHistory.MAX_BYTES ({reqapi.size_text(reqapi.RulesHistory.MAX_BYTES)}, at most "
                  f"{reqapi.RulesHistory.LENGTH - 1})")

        print("\nmemo entries: bytes kept per entry, beside what reqapi counts for it")
        generation = reqapi.Generation(reqapi.parse_rules({}, "b"))
        _, kept, _ = traced(lambda: [generation.prediction("prod-eu", f"w{i}-" + "x" * 20) for i in range(10000)])
        counted = reqapi.PREDICTION_ENTRY_BYTES + len("prod-eu") + len("w10000-" + "x" * 20)
        print(f"  prediction: {kept / 10000:.0f} B kept, {counted} counted; "
              f"PREDICTION_MEMO_BYTES {reqapi.size_text(reqapi.PREDICTION_MEMO_BYTES)} "
              f"= ~{reqapi.PREDICTION_MEMO_BYTES // counted:,} names")
        import os as _os
        history = reqapi.RulesHistory(reqapi.parse_rules({"rules": [
            {"id": f"w{i}", "namespace": "load", "name": f"w-{i:04d}", "cpu": "1"} for i in range(2000)]}, "b"))
        access, metrics = reqapi.Access(reqapi.AlwaysAllow()), reqapi.Metrics()
        api = reqapi.Api(reqapi.RequestsStorage(history), access, reqapi.Health(history, access, metrics), metrics,
                         reqapi.Logger(fd=_os.open(_os.devnull, _os.O_WRONLY)), 300)
        clock = time.time
        time.time = lambda: 1_800_000_000.0            # one second for every answer: nothing is emptied
        try:
            names = [f"w{i}-" + "x" * 20 for i in range(5000)]
            _, kept, _ = traced(lambda: [api.object_json("prod-eu", name) for name in names])
            body = len(api.object_json("prod-eu", names[0]))
            counted = body + reqapi.Api.OBJECT_ENTRY_BYTES + len("prod-eu") + len(names[0])
            print(f"  object: {kept / 5000:.0f} B kept with its prediction, {counted} counted "
                  f"(+{reqapi.PREDICTION_ENTRY_BYTES + len('prod-eu') + len(names[0])} for the prediction); "
                  f"OBJECT_MEMO_BYTES {reqapi.size_text(reqapi.Api.OBJECT_MEMO_BYTES)} = ~"
                  f"{reqapi.Api.OBJECT_MEMO_BYTES // counted:,} objects")
            options = [reqapi.ListOptions("load", (), (), reqapi.JSON_OUTPUT, limit=100 + i) for i in range(20)]
            api.list_response(options[0]._replace(limit=1))  # the namespace's selection, memoised once
            responses, kept, _ = traced(lambda: [api.list_response(option) for option in options])
            bodies = sum(len(response.body) for response in responses)
            counted = sum(reqapi.Api.LIST_ENTRY_BYTES + 8 * option.limit + len(json.loads(response.body)["metadata"]
                                                                                ["continue"])
                          for option, response in zip(options, responses))
            print(f"  list of ~110 rows: {(kept - bodies) / 20:.0f} B kept beside its body, {counted / 20:.0f} counted "
                  f"(LIST_ENTRY_BYTES {reqapi.Api.LIST_ENTRY_BYTES}, 8 a row, its continue token); "
                  f"LIST_MEMO_BYTES {reqapi.size_text(reqapi.Api.LIST_MEMO_BYTES)}")
        finally:
            time.time = clock
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list) -> int:
    args = parse_args(argv)
    if args.loadgen:
        return loadgen_child(args.loadgen)
    if args.through_apiserver:
        return through_apiserver(args)
    if args.history:
        return history_bench(args)
    if args.versus_gin:
        return versus_gin(args)
    if args.memory:
        return memory_report()
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)     # progress lines show up as runs finish
    if not REQAPI.exists():
        print(f"bench: {REQAPI} not found", file=sys.stderr)
        return 1
    wrk = shutil.which("wrk")
    generator = args.generator if args.generator != "auto" else ("wrk" if wrk else "python")
    machine = machine_info()
    if wrk:
        version = subprocess.run([wrk, "-v"], capture_output=True, text=True)
        said = (version.stdout or version.stderr).strip()
        machine["wrk"] = said.splitlines()[0].split(" Copyright")[0] if said else "wrk (version unknown)"
    srv_cpu, gen_cpu, pin_how = choose_cpus(args.no_pin)
    if gen_cpu is not None:
        os.sched_setaffinity(0, {gen_cpu})      # this harness (and the startup probe) share the generator's CPU

    level_flag = args.log_level
    for n, flag in enumerate(args.extra):
        if flag == "--log-level" and n + 1 < len(args.extra):
            level_flag = args.extra[n + 1]
        elif flag.startswith("--log-level="):
            level_flag = flag.split("=", 1)[1]
    if level_flag:
        level_text = f"{level_flag} (--log-level {level_flag})"
    else:
        level_text = f"{server_default_log_level()} (the server's default: no --log-level given)"

    print("reqapi benchmark")
    print(f"  machine     : {machine['cpu_model']}, {machine['cores']} cores"
          f"{'' if 'mem_total_gib' not in machine else ', %.1f GiB RAM' % machine['mem_total_gib']}")
    print(f"  system      : {machine.get('os', '?')}, kernel {machine['kernel']}, load average "
          f"{machine.get('loadavg_at_start', '?')}")
    print(f"  python      : {machine['python']} ({sys.executable}), {machine['openssl_python']}")
    print(f"  pinning     : " + (f"server on CPU {srv_cpu}, generator and harness on CPU {gen_cpu} ({pin_how})"
                                 if srv_cpu is not None else pin_how))
    if generator == "wrk":
        print(f"  generator   : {machine['wrk']}: wrk -t1 -cN -d{args.duration:g}s --latency")
    else:
        print(f"  generator   : standard-library epoll client (one child process, N non-blocking TLS "
              f"connections, one request in flight each)")
        if not wrk:
            print(f"                wrk is not installed: install it with `apt-get install wrk` to use wrk")
    print(f"  runs        : {args.duration:g} s each, routes {','.join(args.route_names)}, connections "
          f"{','.join(map(str, args.connection_counts))}, warm-up {args.warmup:g} s, {PAUSE:g} s pause")
    print(f"  server log  : level {level_text}; written to a file")

    workdir = Path(tempfile.mkdtemp(prefix="reqapi-bench-"))
    server: Optional[Server] = None
    results: dict = {"machine": machine, "config": {
        "duration_s": args.duration, "connections": args.connection_counts, "routes": args.route_names,
        "generator": generator, "server_args": args.extra, "log_level": level_text, "warmup_s": args.warmup,
        "pinning": {"server_cpu": srv_cpu, "generator_cpu": gen_cpu, "how": pin_how}}, "runs": []}
    code = 0
    try:
        ca, cert, key = make_certificates(workdir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(ca))

        rules_path: Optional[Path] = workdir / "rules.json"
        rules_path.write_text(json.dumps(RULES, indent=2))
        check = subprocess.run([sys.executable, str(REQAPI), "--rules", str(rules_path), "--check"],
                               capture_output=True, text=True, timeout=60)
        if check.returncode == 0:
            rules_note = check.stdout.strip()
        else:
            said = ((check.stderr or check.stdout).strip().splitlines() or ["no message"])[-1]
            rules_note = (f"REFUSED by this reqapi.py ({said}); running with its built-in default rules, "
                          f"so the Table list may have no rows")
            rules_path = None
        print(f"  rules       : {rules_note}")
        results["config"]["rules"] = rules_note

        server = Server(workdir, cert, key, rules_path, args.log_level, args.extra, srv_cpu)
        startup_ms = server.start(context, ROUTES["object"][0])
        print(f"  command     : {shlex.join(server.command)}")
        time.sleep(1.0)
        idle = proc_status(server.process.pid)
        results["startup_ms"] = startup_ms
        results["idle_rss_mb"] = idle["VmRSS"] / 1024
        results["idle_threads"] = idle["Threads"]
        results["tls"] = server.tls
        print(f"  TLS         : {server.tls}, ECDSA P-256 certificate")
        print()
        print(f"start-up: {startup_ms:.0f} ms (process start -> first 200 response, in-process probe)")
        print(f"idle RSS: {idle['VmRSS'] / 1024:.1f} MB (1 s after the first response), {idle['Threads']} threads")

        checks = {}
        for name in args.route_names:
            path, headers = ROUTES[name]
            answer = https_get(context, server.port, path, headers)
            entry = {"status": answer["status"], "content_type": answer["headers"].get("content-type", ""),
                     "body_bytes": len(answer["body"])}
            if name == "table" and answer["status"] == 200:
                try:
                    entry["rows"] = len(json.loads(answer["body"]).get("rows", []))
                except ValueError:
                    entry["rows"] = None
            checks[name] = entry
            extra = f", {entry['rows']} rows" if "rows" in entry else ""
            warn = "" if answer["status"] == 200 else "   <-- not 200: its runs will count errors"
            print(f"route {name:<9}: GET {path} -> {answer['status']} {entry['content_type']}, "
                  f"{entry['body_bytes']} bytes{extra}{warn}")
        results["route_checks"] = checks

        runner = Runner(server, generator, ca, gen_cpu, srv_cpu, workdir)
        if args.warmup > 0:
            runner.run("object", 16, args.warmup)
            time.sleep(PAUSE)
        print()
        total = len(args.connection_counts) * len(args.route_names)
        n = 0
        for connections in args.connection_counts:
            for route in args.route_names:
                n += 1
                run = runner.run(route, connections, args.duration)
                results["runs"].append(run)
                lat = run["latency_s"]
                print(f"[{n}/{total}] {route} c{connections}: {run['rps']:,.0f} req/s, p50 "
                      f"{fmt_latency(lat.get('p50'))}, p99 {fmt_latency(lat.get('p99'))}, errors {fmt_errors(run)}",
                      flush=True)
                time.sleep(PAUSE)
        print()
        print_results(results["runs"])
        print()
        print(f"start-up {startup_ms:.0f} ms, idle RSS {results['idle_rss_mb']:.1f} MB; errors = socket errors "
              f"(connect/read/write/timeout) + non-2xx" + (" (wrk: status >= 400)" if generator == "wrk" else "")
              + ";\nlatency = from the request's first write to its last byte; srv CPU = the server's utime+stime "
              "per request; srv core / gen core = busy share of the server's and the generator's CPU during the "
              "run\n(other processes on those CPUs included); gen CPU = the generator's own CPU time per request.")
    except BenchError as error:
        print(f"\nbench: {error}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        code = 130
    finally:
        if server is not None and server.process is not None:
            rss_hwm = None
            try:
                rss_hwm = proc_status(server.process.pid).get("VmHWM")
            except OSError:
                pass
            exit_code = server.stop()
            summary = server.log_summary()
            results["server"] = {"exit_code": exit_code, "rss_high_water_mb": rss_hwm and rss_hwm / 1024,
                                 "log": summary, "command": server.command}
            if code == 0:
                print(f"server: level {level_text}; log {summary['lines']} lines ({summary['bytes'] / 1e6:.1f} MB), "
                      f"{summary['error_lines']} ERROR lines, {summary['tracebacks']} tracebacks; "
                      f"VmHWM {rss_hwm / 1024 if rss_hwm else 0:.1f} MB; exit code after SIGTERM {exit_code}")
        write_json(args, results)
        keep_or_remove(args, workdir)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
