"""The transport (section 10) under load, faults and bad input.

Everything here talks to the real reqapi.py over real TLS with raw sockets, so that malformed
traffic reaches the server byte for byte.  (tests/test_http_messages.py feeds the same kind of
generated request heads straight to ``reqapi.parse_head`` + ``reqapi.Api.handle``.)

What every case requires:

* an answer that is a metav1.Status (kind Status, apiVersion v1, status Failure, the right
  code and reason, a message), or a clean close — never a traceback, neither in a body nor
  in the server's log;
* the server answers a good GET with 200 afterwards.

Every wait has a deadline.  The only sleeps are the pauses of the deliberately slow client of
the trickle test, where the slowness is the behaviour under test.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import re
import resource
import selectors
import socket
import ssl
import time
import types
import urllib.parse
import uuid
from typing import NamedTuple, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reqapi
from conftest import GV, Server, runtime_in_process, wait_until, write_rules
from test_http_messages import assert_status_document, request_heads

GOOD_PATH = f"{GV}/namespaces/default/requests/web"
GROUP, VERSION = reqapi.GROUP, reqapi.VERSION

# ---------------------------------------------------------------------------
# Raw connections and answers
# ---------------------------------------------------------------------------

class Closed(Exception):
    """The server closed the connection (FIN, reset or TLS EOF) before a whole answer arrived."""


class RawAnswer(NamedTuple):
    status_line: str
    code: int
    headers: dict          # lower-case name -> value (last one wins)
    raw_head: bytes
    body: bytes

    def json(self):
        return json.loads(self.body)


class Raw:
    """One raw connection to the server, TLS by default, with a buffer so that pipelined answers
    can be read one at a time.  Every read has the connection's timeout."""

    def __init__(self, server: Server, tls: bool = True, timeout: float = 5.0, alpn: Optional[list] = None,
                 client_cert: Optional[tuple] = None, receive_buffer: Optional[int] = None):
        sock = socket.socket()
        sock.settimeout(timeout)
        if receive_buffer:                  # a small TCP window: the server must wait for this client
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.connect(("127.0.0.1", server.port))
        if tls:
            context = server.certs.client_context(client_cert)
            if alpn:
                context.set_alpn_protocols(alpn)
            try:
                sock = context.wrap_socket(sock, server_hostname="localhost")
            except BaseException:
                sock.close()
                raise
        self.sock = sock
        self.buffer = b""
        self.eof = False

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> bool:
        """Send; False if the server had already closed (it may have answered first)."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return False
        except ssl.SSLError as error:
            # e.g. BAD_LENGTH: OpenSSL refusing to retry a write the closed peer left half-done
            if "BAD_LENGTH" in str(error) or "bad length" in str(error):
                return False
            raise

    def _fill(self) -> None:
        if self.eof:
            raise Closed()
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            chunk = b""
        except socket.timeout:
            raise AssertionError(f"no answer within {self.sock.gettimeout()}s; have {self.buffer[:300]!r}") from None
        if not chunk:
            self.eof = True
            raise Closed()
        self.buffer += chunk

    def response(self, method: str = "GET", read_body: bool = True) -> Optional[RawAnswer]:
        """The next answer, or None if the server closed cleanly before sending a byte of it."""
        try:
            while b"\r\n\r\n" not in self.buffer:
                self._fill()
        except Closed:
            if self.buffer:
                raise AssertionError(f"connection closed in the middle of an answer: {self.buffer[:500]!r}")
            return None
        raw_head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        status_line = lines[0]
        version, _, rest = status_line.partition(" ")
        assert version in ("HTTP/1.1", "HTTP/1.0"), f"not a status line: {status_line!r}"
        code_text = rest.partition(" ")[0]
        assert code_text.isdigit() and len(code_text) == 3, f"not a status line: {status_line!r}"
        code = int(code_text)
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            assert colon, f"malformed response header line {line!r} in {raw_head!r}"
            headers[name.strip().lower()] = value.strip()
        answer = RawAnswer(status_line, code, headers, raw_head, b"")
        return self.with_body(answer, method) if read_body else answer

    def with_body(self, answer: RawAnswer, method: str = "GET") -> RawAnswer:
        """The answer with its body read (by Content-Length, chunks, or up to the close)."""
        code, headers, raw_head = answer.code, answer.headers, answer.raw_head
        body = b""
        if method != "HEAD" and code != 304 and not 100 <= code < 200:
            if "content-length" in headers:
                length = int(headers["content-length"])
                try:
                    while len(self.buffer) < length:
                        self._fill()
                except Closed:
                    raise AssertionError(f"answer cut short: {raw_head!r} {self.buffer!r}") from None
                body, self.buffer = self.buffer[:length], self.buffer[length:]
            elif "chunked" in headers.get("transfer-encoding", ""):
                body = self._dechunk()
            else:
                try:
                    while True:
                        self._fill()
                except Closed:
                    pass
                body, self.buffer = self.buffer, b""
        return answer._replace(body=body)

    def _dechunk(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buffer:
                self._fill()
            size_line, _, self.buffer = self.buffer.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(self.buffer) < size + 2:
                self._fill()
            body += self.buffer[:size]
            self.buffer = self.buffer[size + 2:]
            if size == 0:
                return body

    def read_steadily(self, size: int, pause: float) -> None:
        """Read until `size` bytes are buffered, a TLS record at a time with `pause` after each: a
        client that reads slowly but never stops (the pauses ARE the reader under test)."""
        while len(self.buffer) < size:
            self._fill()
            time.sleep(pause)

    def readable_within(self, timeout: float) -> bool:
        """True as soon as application data or a close arrives (within timeout).  TLS records that carry
        none, such as the TLS 1.3 session tickets sent after the handshake, do not count."""
        if self.buffer or self.eof:
            return True
        deadline = time.monotonic() + timeout
        previous = self.sock.gettimeout()
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            try:
                while True:
                    pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
                    if not pending and not selector.select(max(0.0, deadline - time.monotonic())):
                        return False
                    self.sock.setblocking(False)
                    try:
                        chunk = self.sock.recv(65536)
                    except (ssl.SSLWantReadError, BlockingIOError):
                        if time.monotonic() >= deadline:
                            return False
                        continue
                    except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
                        chunk = b""
                    if chunk:
                        self.buffer += chunk
                    else:
                        self.eof = True
                    return True
            finally:
                self.sock.settimeout(previous)

    def closed_within(self, timeout: float) -> bool:
        """True if the server closes the connection (after whatever it still sends) within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                self._fill()
            except Closed:
                return True
            except AssertionError:      # the read timed out
                return False


def assert_status(answer: Optional[RawAnswer], code: int, reason: Optional[str] = None) -> dict:
    """A metav1.Status answer with this code (and reason), as kube-apiserver writes one."""
    assert answer is not None, f"expected a {code} Status, the server closed without answering"
    assert answer.code == code, f"expected {code}, got {answer.status_line!r}: {answer.body[:500]!r}"
    assert answer.headers.get("content-type") == "application/json", answer
    assert b"Traceback" not in answer.body
    document = answer.json()
    assert_status_document(document, code, reason)
    return document


def assert_good_get(server: Server) -> None:
    """The quick check after each case of a loop: a good GET on a new connection answers 200."""
    answer = server.get(GOOD_PATH, timeout=5)
    assert answer.status == 200, answer


def assert_serves_normally(server: Server) -> None:
    """A good GET answers 200 with the object, and its log line shows the log is still written."""
    audit_id = f"after-{uuid.uuid4().hex[:12]}"
    answer = server.get(GOOD_PATH, headers={"Audit-Id": audit_id}, timeout=5)
    assert answer.status == 200, answer
    assert answer.json()["metadata"]["name"] == "web"
    server.wait_for_log(f"audit_id={audit_id}", timeout=5)


class LogWatch:
    """The part of a server's log written since a point; it must never hold a traceback."""

    def __init__(self, server: Server):
        self.server = server
        self.start = len(server.log())

    def new(self) -> str:
        return self.server.log()[self.start:]

    def assert_clean(self) -> None:
        assert_serves_normally(self.server)     # also waits for the log to catch up with this request
        text = self.new()
        assert "Traceback" not in text, text[-5000:]


@pytest.fixture()
def clean_log(server):
    """The shared server's log must stay free of tracebacks during the test, and it must serve after."""
    watch = LogWatch(server)
    yield watch
    watch.assert_clean()


@pytest.fixture(scope="module", autouse=True)
def enough_file_descriptors():
    """Hundreds of held connections need as many descriptors here and in the server, which inherits
    this limit (servers are started by the tests, after this module fixture has run)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_watch(server: Server, path: str = f"{GV}/requests?watch=1") -> tuple[Raw, RawAnswer]:
    """A watch on a new connection, and the head of its answer (its events follow on the connection)."""
    conn = Raw(server, timeout=5)
    conn.send(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    return conn, conn.response(read_body=False)


def exchange(server: Server, payload: bytes, method: str = "GET", timeout: float = 5.0) -> Optional[RawAnswer]:
    """Send a payload on a fresh TLS connection; the first answer (None: closed without one)."""
    with Raw(server, timeout=timeout) as conn:
        conn.send(payload)
        return conn.response(method)


# ---------------------------------------------------------------------------
# Bad input, over the network
# ---------------------------------------------------------------------------

def test_plain_http_on_the_tls_port_is_told_like_go_does(server, clean_log):
    with Raw(server, tls=False) as conn:
        conn.send(b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = conn.response()
        assert answer is not None
        assert answer.status_line == "HTTP/1.0 400 Bad Request", answer
        assert answer.body == b"Client sent an HTTP request to an HTTPS server.\n", answer
        assert conn.closed_within(2)


@pytest.mark.parametrize("payload", [
    b"\x00\x01\x02\x03garbage\xff\xfe\r\n\r\n",       # not TLS, not HTTP
    b"\x16\x03\x01\x00\x05hello" + b"\x00" * 64,        # a TLS record header followed by garbage
    b"\x80\x00",                                        # an SSLv2-style first byte
    b"\r\n\r\n",
], ids=["binary", "bad-tls-record", "sslv2-byte", "blank-lines"])
def test_raw_garbage_instead_of_a_tls_handshake_is_closed_cleanly(server, clean_log, payload):
    with Raw(server, tls=False, timeout=15) as conn:
        conn.send(payload)
        assert conn.closed_within(12)
        # Go's plain-text "HTTP/1.0 400" is for what looks like HTTP; here at most a TLS alert record.
        assert conn.buffer == b"" or conn.buffer[:1] == b"\x15", conn.buffer


@pytest.mark.parametrize("payload, code", [
    (b"\x00\x01\x02\x03garbage\xff\xfe\r\n\r\n", 400),
    (b"garbage\r\n\r\n", 400),
    (b"GET\r\n\r\n", 400),
    (b"GET /livez\r\n\r\n", 400),                                    # HTTP/0.9
    (b"GET  /livez HTTP/1.1\r\n\r\n", 400),                          # two spaces
    (b"GET /livez http/1.1\r\n\r\n", 400),
    (b"GET /livez HTTP/3\r\n\r\n", 505),
    (b"G\x00T /livez HTTP/1.1\r\n\r\n", 400),
    (b"GET livez HTTP/1.1\r\n\r\n", 400),
    (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"CONNECT localhost:443 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /livez HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /livez HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
    (b"GET /livez HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    (b"GET /livez HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),      # obs-fold
    (b"GET /livez HTTP/1.1\r\n: empty-name\r\n\r\n", 400),
    (b"GET /livez HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /livez HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET /livez HTTP/1.1\r\n\xff\xfe: x\r\n\r\n", 400),
    (b"GET /livez HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"GET /livez HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET /livez HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400),
], ids=lambda value: value if isinstance(value, int) else value[:40].decode("latin-1"))
def test_malformed_requests_over_tls_get_a_status_and_a_close(server, clean_log, payload, code):
    with Raw(server) as conn:
        conn.send(payload)
        assert_status(conn.response(), code)
        assert conn.closed_within(2), "a request that cannot be parsed must close the connection"


@pytest.mark.parametrize("alpn", [["h2"], None], ids=["alpn-h2", "no-alpn"])
def test_an_http2_preface_over_tls_is_answered_505(server, clean_log, alpn):
    with Raw(server, alpn=alpn) as conn:
        # reqapi speaks HTTP/1.1 only: it never selects h2, whatever the client offers.
        assert conn.sock.selected_alpn_protocol() in (None, "http/1.1")
        conn.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        assert_status(conn.response(), 505, "HTTPVersionNotSupported")
        assert conn.closed_within(2)


def test_alpn_selects_http_1_1(server):
    with Raw(server, alpn=["h2", "http/1.1"]) as conn:
        assert conn.sock.selected_alpn_protocol() == "http/1.1"


def test_an_oversized_request_line_is_answered_414(server, clean_log):
    assert_status(exchange(server, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"), 414)


def test_an_oversized_request_line_is_answered_414_before_its_end_arrives(server, clean_log):
    with Raw(server) as conn:
        conn.send(b"GET /" + b"a" * 9000)            # no end of line, no end of head
        assert_status(conn.response(), 414, "RequestURITooLong")
        assert conn.closed_within(2)


def test_a_request_line_just_under_the_limit_is_served(server, clean_log):
    target = b"/livez?pad=" + b"a" * (reqapi.MAX_REQUEST_LINE - len(b"GET /livez?pad= HTTP/1.1"))
    line = b"GET " + target + b" HTTP/1.1"
    assert len(line) == reqapi.MAX_REQUEST_LINE
    answer = exchange(server, line + b"\r\nConnection: close\r\n\r\n")
    assert answer is not None and answer.code == 200, answer


def test_a_long_selector_is_served_up_to_the_head_limit(server, clean_log):
    # Only the path is bounded by the request-line limit; a 20 KB labelSelector (kube-apiserver
    # forwards whatever its clients send) was answered 414 before.
    selector = "app+in+(" + ",".join(f"v{n}" for n in range(3000)) + ")"
    line = f"GET {GV}/requests?labelSelector={selector} HTTP/1.1".encode()
    assert reqapi.MAX_REQUEST_LINE < len(line) < reqapi.MAX_HEAD_BYTES
    answer = exchange(server, line + b"\r\nConnection: close\r\n\r\n")
    assert answer is not None and answer.code == 200 and answer.json()["items"] == [], answer


def test_a_head_with_bare_lf_line_ends_is_refused_at_once(server, clean_log):
    # It never contains CRLF CRLF: the server waited for the 30 s read-header timeout before.
    for head in (b"GET /livez HTTP/1.1\nHost: a\n\n", b"GET /livez HTTP/1.1\r\nHost: a\n\r\n"):
        with Raw(server) as conn:
            conn.send(head)
            assert_status(conn.response(), 400, "BadRequest")
            assert conn.closed_within(2)


def headers_of(count: int, size: int = 10) -> bytes:
    return b"".join(b"X-Field-%d: %s\r\n" % (i, b"v" * size) for i in range(count))


def test_many_header_fields_are_served_the_head_size_is_the_bound(server, clean_log):
    # kube-apiserver sends one X-Remote-Group line per group: a user in 1,000 groups is 1,000 lines
    # (it was refused with 431 above 100 lines). Only the head's size is bounded (the tests below).
    answer = exchange(server, b"GET /livez HTTP/1.1\r\nConnection: close\r\n" + headers_of(1000) + b"\r\n")
    assert answer is not None and answer.code == 200, answer


def test_a_head_over_64_kib_arriving_in_pieces_is_answered_431(server, clean_log):
    """90 fields of 1 KiB, written a field at a time: the server stops reading past 64 KiB."""
    with Raw(server) as conn:
        conn.send(b"GET /livez HTTP/1.1\r\n")
        for i in range(90):
            if not conn.send(b"X-Field-%d: %s\r\n" % (i, b"v" * 1000)):
                break                       # the server has answered and closed
        conn.send(b"\r\n")
        assert_status(conn.response(), 431, "RequestHeaderFieldsTooLarge")
        assert conn.closed_within(2)


def test_a_head_over_64_kib_in_one_write_is_answered_431(server, clean_log):
    head = b"GET /livez HTTP/1.1\r\nConnection: close\r\n" + headers_of(70, 1000)
    assert reqapi.MAX_HEAD_BYTES < len(head) < 5 * 16384 and head.count(b"\r\n") < 100
    assert_status(exchange(server, head + b"\r\n"), 431, "RequestHeaderFieldsTooLarge")


def test_a_10000_segment_path_is_answered_414(server, clean_log):
    for path in (b"/a" * 10_000, b"/" * 10_000, GV.encode() + b"/x" * 10_000):
        assert_status(exchange(server, b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n"), 414)
        assert_good_get(server)


def test_a_4000_segment_path_is_answered_404(server, clean_log):
    for path in (b"/a" * 4000, b"/" * 8000, GV.encode() + b"/x" * 4000):
        assert_status(exchange(server, b"GET " + path + b" HTTP/1.1\r\nConnection: close\r\n\r\n"), 404, "NotFound")
        assert_good_get(server)


GOOD_SEGMENTS = [b"apis", GROUP.encode(), VERSION.encode(), b"namespaces", b"default", b"requests", b"web"]
PARAMETER_POSITIONS = {4, 6}       # {namespace} and {name}
BAD_SEGMENTS = {
    "escaped-nul": b"a%00b",
    "raw-nul": b"a\x00b",
    "escaped-invalid-utf8": b"a%ffb",
    "escaped-overlong-utf8": b"%c0%ae%c0%ae",
    "escaped-lone-continuation": b"%80",
    "raw-invalid-utf8": b"a\xffb",
    "raw-utf8": "é".encode(),
    "escaped-utf8": b"%C3%A9",
    "bad-escape": b"a%zzb",
    "truncated-escape": b"a%",
    "lone-percent": b"%",
    "escaped-slash": b"a%2Fb",
    "escaped-backslash": b"a%5Cb",
    "dot": b".",
    "dotdot": b"..",
    "escaped-dot": b"%2e",
    "escaped-dotdot": b"%2e%2E",
    "escaped-space": b"a%20b",
    "upper-case": b"Web",
    "control": b"a\x01\x7fb",
}


def expected_code(position: int, value: bytes) -> int:
    if not value.isascii():
        return 400                     # the target must be ASCII
    if any(byte < 0x20 or byte == 0x7f for byte in value):
        return 400                     # raw control characters are refused anywhere in the head
    try:
        urllib.parse.unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return 400                     # percent-escapes that are not UTF-8, in any segment
    return 400 if position in PARAMETER_POSITIONS else 404


@pytest.mark.parametrize("position", range(len(GOOD_SEGMENTS)),
                         ids=[segment.decode() for segment in GOOD_SEGMENTS])
def test_bad_bytes_in_every_path_segment_get_a_status(server, clean_log, position):
    for label, value in BAD_SEGMENTS.items():
        segments = list(GOOD_SEGMENTS)
        segments[position] = value
        path = b"/" + b"/".join(segments)
        code = expected_code(position, value)
        answer = exchange(server, b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        try:
            assert_status(answer, code)
        except AssertionError as error:
            raise AssertionError(f"{label} at segment {position} ({path!r}): {error}") from None
        assert_good_get(server)


def test_bad_segments_in_non_resource_paths(server, clean_log):
    for path, code in [(b"/livez/..", 404), (b"/livez/%00", 404), (b"/healthz/%ff", 400), (b"/apis/../livez", 404),
                       (b"/./livez", 404), (b"/openapi/v3/apis/%2e%2e/v1beta1", 404), (b"/version/%zz", 404)]:
        assert_status(exchange(server, b"GET " + path + b" HTTP/1.1\r\nConnection: close\r\n\r\n"), code)
        assert_good_get(server)


@pytest.mark.parametrize("method, framing", [
    ("GET", b"Content-Length: 5\r\n\r\nhello"),
    ("GET", b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("GET", b"Content-Length: 1\r\n\r\n"),                    # declared, never sent
    ("HEAD", b"Content-Length: 5\r\n\r\nhello"),
])
def test_a_body_on_get_is_answered_400_and_the_connection_closed(server, clean_log, method, framing):
    with Raw(server) as conn:
        conn.send(f"{method} {GOOD_PATH} HTTP/1.1\r\nHost: a\r\n".encode() + framing)
        answer = conn.response(method)
        assert answer is not None and answer.code == 400, answer
        assert answer.headers.get("connection") == "close", answer
        if method == "GET":
            assert_status(answer, 400, "BadRequest")
        assert conn.closed_within(2), "the unread body must not be taken for a next request"


def test_a_request_smuggled_in_a_body_is_never_answered(server, clean_log):
    smuggled = b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n"
    with Raw(server) as conn:
        conn.send(b"GET /livez HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
        assert_status(conn.response(), 400)
        assert conn.response() is None        # closed: the smuggled request got no answer
    assert "GET /metrics" not in clean_log.new()


@pytest.mark.parametrize("method", ["FOO", "PROPFIND", "get", "POST", "PUT", "PATCH", "DELETE", "TRACE", "OPTIONS"])
@pytest.mark.parametrize("path", [GOOD_PATH, f"{GV}/requests", "/apis", "/livez"])
def test_unknown_and_writing_methods_are_answered_405_with_allow(server, clean_log, method, path):
    with Raw(server) as conn:
        conn.send(f"{method} {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        answer = conn.response(method)
        assert_status(answer, 405, "MethodNotAllowed")
        assert answer.headers.get("allow") == "GET, HEAD", answer
        # No body was sent: the connection stays usable.
        conn.send(f"GET {GOOD_PATH} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        assert conn.response().code == 200


def test_a_writing_method_with_a_body_is_answered_405_and_closed(server, clean_log):
    with Raw(server) as conn:
        conn.send(f"POST {GV}/namespaces/default/requests HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 2\r\n\r\n{{}}".encode())
        answer = conn.response()
        assert_status(answer, 405, "MethodNotAllowed")
        assert answer.headers.get("allow") == "GET, HEAD"
        assert conn.closed_within(2)


@pytest.mark.parametrize("lengths", [
    (b"0", b"0"), (b"1", b"2"), (b"5", b"5"), (b"0, 0",), (b"1, 2",),
], ids=["0+0", "1+2", "5+5", "list-0-0", "list-1-2"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_duplicate_content_length_is_answered_400(server, clean_log, lengths, method):
    fields = b"".join(b"Content-Length: %s\r\n" % value for value in lengths)
    with Raw(server) as conn:
        conn.send(f"{method} /livez HTTP/1.1\r\nHost: a\r\n".encode() + fields + b"\r\n")
        assert_status(conn.response(), 400, "BadRequest")
        assert conn.closed_within(2)


@pytest.mark.parametrize("length", ["\u00b2".encode("latin-1"), "\u00b2".encode("utf-8"), b"9" * 5000, b"9" * 19,
                                    b"-1", b"+5", b" ", b"0x10"],
                         ids=["superscript-two-latin-1", "superscript-two-utf-8", "5000-digits", "19-digits",
                              "negative", "plus-sign", "blank", "hex"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_an_invalid_content_length_is_answered_400_and_closed(server, clean_log, length, method):
    """str.isdigit() takes "²" for a digit, and int() refuses 4,300+ digits: both once closed the
    connection with no answer, no log line and no metric."""
    with Raw(server) as conn:
        conn.send(f"{method} /livez HTTP/1.1\r\nHost: a\r\n".encode() + b"Content-Length: " + length + b"\r\n\r\n")
        document = assert_status(conn.response(), 400, "BadRequest")
        assert document["message"].startswith("invalid Content-Length "), document
        assert conn.closed_within(2)
    assert wait_until(lambda: re.search(r"bad request status=400", clean_log.new())), "the refusal was not logged"


# ---------------------------------------------------------------------------
# The answer memo: a head asked again within the second gets the kept answer
# ---------------------------------------------------------------------------

def test_the_answer_memo_keeps_one_state_and_a_bounded_size():
    memo = reqapi.AnswerMemo()
    entry = reqapi.MemoEntry(b"HTTP/1.1 200 OK\r\n", b"{}", "GET", "/", "", reqapi.ANONYMOUS, "GET", "")
    generation, later = object(), object()
    key = (None, b"GET / HTTP/1.1", False)
    assert memo.get((generation, 1), key) is None
    memo.put((generation, 1), key, entry)
    assert memo.get((generation, 1), key) is entry
    assert memo.get((generation, 1), (None, b"GET / HTTP/1.1", True)) is None     # keyed whole vs. less its id
    # Another generation or second: nothing kept before serves, even when the old state comes back.
    assert memo.get((later, 1), key) is None
    assert memo.get((generation, 1), key) is None
    # An answer made in a state that has passed meanwhile is not kept.
    memo.get((generation, 2), key)
    memo.put((generation, 1), key, entry)
    assert memo.get((generation, 2), key) is None
    # Bounded: at MAX_BYTES it starts again, so it never holds more.
    big = entry._replace(body=b"x" * (reqapi.AnswerMemo.MAX_BYTES // 3))
    for index in range(10):
        memo.put((generation, 2), (None, b"%d" % index, False), big)
        assert memo._bytes <= reqapi.AnswerMemo.MAX_BYTES
    assert memo.get((generation, 2), (None, b"9", False)) is big


def test_an_answer_memo_entry_costs_no_more_than_counted():
    from test_storage import allocated_by
    memo, state, encoder = reqapi.AnswerMemo(), (object(), 1), reqapi.ResponseEncoder()
    counted = []

    def answers():
        for index in range(2000):           # as the transport keeps them: every piece a fresh object
            path = f"{GV}/namespaces/prod-eu/requests/w{index}-" + "x" * 40
            head = f"GET {path} HTTP/1.1\r\nHost: a\r\nAccept: application/json".encode()
            body = json.dumps({"kind": "Requests", "metadata": {"name": path[-45:]}, "pad": "x" * 250}).encode()
            parts = encoder.reusable(reqapi.Response(200, body), "GET")
            entry = reqapi.MemoEntry(*parts, "GET", path, "", reqapi.ANONYMOUS, "GET", "requests")
            memo.put(state, (None, head, False), entry)
            counted.append(len(head) + len(parts[0]) + len(parts[1]) + len(path) + reqapi.AnswerMemo.ENTRY_BYTES)
    memo.get(state, (None, b"", False))
    kept = allocated_by(answers)
    print(f"an entry: {kept / len(counted):.0f} bytes kept, {sum(counted) / len(counted):.0f} counted")
    assert kept <= sum(counted), (kept / len(counted), sum(counted) / len(counted))
    assert memo._bytes == sum(counted)


def test_a_kept_answer_carries_each_requests_own_audit_id_and_log_line(server, clean_log):
    ids = [str(uuid.uuid4()) for _ in range(3)]
    heads = [f"GET {GOOD_PATH} HTTP/1.1\r\nHost: a\r\nAudit-Id: {ids[0]}\r\n\r\n",
             f"GET {GOOD_PATH} HTTP/1.1\r\nHost: a\r\nAudit-Id: {ids[1]}\r\n\r\n",
             f"GET {GOOD_PATH} HTTP/1.1\r\nHost: a\r\n\r\n",
             f"GET {GOOD_PATH} HTTP/1.1\r\nHost: a\r\nAudit-Id: not plain {ids[2][:8]}\r\n\r\n",
             f"GET {GOOD_PATH} HTTP/1.1\r\nHost: a\r\nAudit-Id: not plain {ids[2][:8]}\r\n\r\n",
             f"HEAD {GOOD_PATH} HTTP/1.1\r\nHost: a\r\nAudit-Id: {ids[2]}\r\n\r\n",
             f"GET {GOOD_PATH} HTTP/1.1\r\nHost: a\r\nAudit-Id: {ids[2]}\r\n\r\n"]
    with Raw(server) as conn:
        conn.send("".join(heads).encode())                     # one write: all within the same second or two
        answers = [conn.response("HEAD" if head.startswith("HEAD") else "GET") for head in heads]
    assert [answer.headers.get("audit-id") for answer in answers] == \
        [ids[0], ids[1], None, f"not plain {ids[2][:8]}", f"not plain {ids[2][:8]}", ids[2], ids[2]]
    assert all(answer.code == 200 for answer in answers), answers
    gets = [answer for head, answer in zip(heads, answers) if head.startswith("GET")]
    assert all(answer.json()["metadata"]["name"] == "web" for answer in gets)
    assert answers[5].body == b"" and answers[5].headers["content-length"] == answers[6].headers["content-length"]
    # Each request has its own log line, with its own Audit-Id.
    for audit_id in ids + [f"not plain {ids[2][:8]}"]:
        server.wait_for_log(re.escape(f"audit_id={reqapi.log_value(audit_id)}"))     # (quoted when it has spaces)
    assert clean_log.new().count(f"audit_id={ids[2]}") == 2
    assert clean_log.new().count(f"audit_id={ids[0]}") == 1


def test_header_values_beyond_latin_1_are_echoed_as_sent(server, clean_log):
    """An Audit-Id (or an offered Sec-WebSocket-Protocol) outside Latin-1 goes back as the UTF-8
    bytes the client sent; bytes that are not UTF-8 come back as U+FFFD.  (Encoding the head as
    Latin-1 raised: the connection was closed without an answer, and so were the answers of the
    requests pipelined before it.)"""
    ids = ["ok-1".encode(), "€-1".encode(), "€-1".encode(), b"\xff\xfe", "張三-w".encode()]
    heads = [b"GET %s HTTP/1.1\r\nHost: a\r\nAudit-Id: %s\r\n\r\n" % (GOOD_PATH.encode(), audit_id)
             for audit_id in ids[:4]]
    heads.append(b"GET %s/requests?watch=1&timeoutSeconds=1 HTTP/1.1\r\nHost: a\r\nAudit-Id: %s\r\n\r\n"
                 % (GV.encode(), ids[4]))
    with Raw(server) as conn:
        conn.send(b"".join(heads))             # the second and third: a miss, then a kept answer
        answers = [conn.response() for _ in heads]
    assert [answer.code for answer in answers] == [200] * 5
    echoed = [answer.headers["audit-id"].encode("latin-1") for answer in answers]
    assert echoed == ids[:3] + ["\ufffd\ufffd".encode(), ids[4]]
    with Raw(server) as conn:
        conn.send(f"GET {GV}/requests?watch=1&timeoutSeconds=1 HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                  f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: €-key\r\n"
                  f"Origin: http://a\r\nSec-WebSocket-Protocol: €.k8s.io\r\n\r\n".encode())
        answer = conn.response(read_body=False)
    assert answer.code == 101, answer
    assert answer.headers["sec-websocket-protocol"].encode("latin-1") == "€.k8s.io".encode()
    accept = base64.b64encode(hashlib.sha1("€-key".encode() + reqapi.WEBSOCKET_GUID).digest()).decode()
    assert answer.headers["sec-websocket-accept"] == accept


def test_a_request_on_an_open_connection_costs_one_read_of_the_socket(certs, monkeypatch):
    # In this process, so that the TLS socket's reads can be counted: reading on until the socket
    # was empty took a second recv() per request, which failed with EAGAIN (a system call and an
    # exception each time).
    import http.client
    import threading
    runtime = runtime_in_process(certs)
    reads = []
    recv = ssl.SSLSocket.recv

    def counted(self, *args, **kwargs):
        if threading.current_thread().name == "transport":
            reads.append(1)
        return recv(self, *args, **kwargs)
    monkeypatch.setattr(ssl.SSLSocket, "recv", counted)
    runtime.start()
    try:
        connection = http.client.HTTPSConnection(*runtime.address, context=certs.client_context(), timeout=10)
        connection.request("GET", GOOD_PATH)
        assert connection.getresponse().read()
        before = len(reads)
        for _ in range(50):
            connection.request("GET", GOOD_PATH)
            response = connection.getresponse()
            assert response.status == 200 and response.read()
        connection.close()
    finally:
        runtime.drain()
    assert len(reads) - before <= 50 + 2, len(reads) - before      # one a request (and a close)


def test_a_bug_while_answering_closes_only_that_connection(certs, monkeypatch):
    # A test double for what the real server cannot be made to do: fail while it answers.  The
    # failing connection is closed; the loop goes on serving the others.
    import http.client
    runtime = runtime_in_process(certs)
    answer = reqapi.Connection.answer

    def failing(self, head):
        if b"/boom" in head:
            raise RuntimeError("a bug")
        return answer(self, head)
    monkeypatch.setattr(reqapi.Connection, "answer", failing)
    runtime.start()
    try:
        broken = http.client.HTTPSConnection(*runtime.address, context=certs.client_context(), timeout=10)
        broken.request("GET", "/boom")
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            broken.getresponse()
        broken.close()
        fine = http.client.HTTPSConnection(*runtime.address, context=certs.client_context(), timeout=10)
        fine.request("GET", GOOD_PATH)
        response = fine.getresponse()
        assert response.status == 200 and response.read()
        fine.close()
    finally:
        runtime.drain()


def test_pipelined_requests_are_answered_in_order(server, clean_log):
    requests = b"".join([
        b"GET /livez HTTP/1.1\r\nHost: a\r\nAudit-Id: one\r\n\r\n",
        f"GET {GOOD_PATH} HTTP/1.1\r\nHost: a\r\nAudit-Id: two\r\n\r\n".encode(),
        b"GET /nope HTTP/1.1\r\nHost: a\r\nAudit-Id: three\r\n\r\n",
        f"HEAD {GV}/namespaces/shop/requests/checkout HTTP/1.1\r\nHost: a\r\nAudit-Id: four\r\n\r\n".encode(),
        f"GET {GV}/namespaces/shop/requests/checkout HTTP/1.1\r\nHost: a\r\nAudit-Id: five\r\n"
        f"Connection: close\r\n\r\n".encode(),
    ])
    with Raw(server) as conn:
        conn.send(requests)                           # one write
        answers = [conn.response(method) for method in ("GET", "GET", "GET", "HEAD", "GET")]
        assert [a.headers.get("audit-id") for a in answers] == ["one", "two", "three", "four", "five"], answers
        assert answers[0].code == 200 and answers[0].body == b"ok"
        assert answers[1].code == 200 and answers[1].json()["metadata"]["name"] == "web"
        assert_status(answers[2], 404, "NotFound")
        assert answers[3].code == 200 and answers[3].body == b"" and int(answers[3].headers["content-length"]) > 0
        assert answers[4].code == 200 and answers[4].json()["metadata"]["name"] == "checkout"
        assert answers[4].headers.get("connection") == "close"
        assert conn.response() is None


def test_two_gets_in_one_write_get_two_answers(server, clean_log):
    with Raw(server) as conn:
        conn.send(b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\nGET /readyz HTTP/1.1\r\nHost: a\r\n\r\n")
        first, second = conn.response(), conn.response()
        assert (first.code, first.body, second.code, second.body) == (200, b"ok", 200, b"ok")


def test_a_bad_request_after_a_good_one_in_a_pipeline(server, clean_log):
    with Raw(server) as conn:
        conn.send(b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\nBROKEN\r\n\r\nGET /livez HTTP/1.1\r\nHost: a\r\n\r\n")
        first = conn.response()
        assert first.code == 200 and first.body == b"ok"
        assert_status(conn.response(), 400, "BadRequest")
        assert conn.response() is None               # closed: the third request is not answered


def test_a_header_value_with_a_bare_lf_cannot_split_the_response_head(server, clean_log):
    answer = exchange(server, b"GET /livez HTTP/1.1\r\nAudit-Id: x\nSet-Cookie: injected=1\r\n"
                              b"Connection: close\r\n\r\n")
    if answer is not None and answer.code == 400:
        assert_status(answer, 400)
        return
    assert answer is not None
    assert b"\n" not in answer.raw_head.replace(b"\r\n", b""), answer.raw_head


def test_a_bare_lf_in_the_target_cannot_forge_a_log_line(server, clean_log):
    marker = f"FORGED-{uuid.uuid4().hex[:8]}"
    answer = exchange(server, f"GET /livez\n{marker} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
    assert answer is not None and answer.code in (400, 404), answer
    if answer.code == 400:
        assert_status(answer, 400)
    server.wait_for_log(r"remote=127\.0\.0\.1:\d+", timeout=5)
    assert_serves_normally(server)
    assert not any(line.startswith(marker) for line in clean_log.new().splitlines()), clean_log.new()[-2000:]


def test_an_audit_id_cannot_forge_fields_of_a_log_line(server, clean_log):
    marker = f"forged-{uuid.uuid4().hex[:8]}"
    answer = exchange(server, f"GET /livez HTTP/1.1\r\nAudit-Id: x user={marker} auth=admin\r\n"
                              f"Connection: close\r\n\r\n".encode())
    assert answer.code == 200 and answer.headers["audit-id"] == f"x user={marker} auth=admin"
    line = server.wait_for_log(f".*{marker}.*").group(0)
    assert line.endswith(f'audit_id="x user={marker} auth=admin"'), line


def test_a_watch_with_an_enormous_timeout_is_held_or_refused(server, clean_log):
    # Regression: Condition.wait(timeout > threading.TIMEOUT_MAX) raised OverflowError, which cut the
    # stream without its last chunk and logged a traceback.
    with Raw(server) as conn:
        conn.send(f"GET {GV}/watch/requests?timeoutSeconds=10000000000 HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        answer = conn.response(read_body=False)
        assert answer is not None
        if answer.code != 200:
            assert_status(answer, answer.code)
            return
        # Held open: nothing more comes (no events with the default rules) and no close.
        assert not conn.closed_within(0.5), f"the watch stream was cut: {conn.buffer!r}"
    assert "Traceback" not in clean_log.new()


# ---------------------------------------------------------------------------
# Timeouts: trickled heads, idle and half-way connections, the connection cap
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("after_a_request", [False, True], ids=["first-request", "after-keep-alive-request"])
def test_a_trickled_head_is_cut_off_at_the_read_header_timeout(start_server, after_a_request):
    """The read-header timeout is a total deadline: one byte every 200 ms never completes a head."""
    server = start_server("--read-header-timeout", "1s", "--idle-timeout", "10s")
    log = LogWatch(server)
    payload = b"GET /livez HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"s" * 100
    with Raw(server, timeout=5) as conn:
        if after_a_request:
            conn.send(b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\n")
            assert conn.response().code == 200
        assert not conn.readable_within(0.05)       # takes in the session tickets of TLS 1.3, if any
        started = time.monotonic()
        cut_off = None
        for byte in payload:
            if not conn.send(bytes([byte])):
                cut_off = time.monotonic()
                break
            # The 200 ms pause between bytes IS the slow client under test; the server may answer meanwhile.
            if conn.readable_within(0.2):
                cut_off = time.monotonic()
                break
        assert cut_off is not None, "the server kept reading a head trickled for 20 s"
        elapsed = cut_off - started
        # Not before the 1 s deadline, and long before the 20 s the head would take: the bound is
        # generous (the reaper is a backstop one second after the deadline; a loaded machine adds more).
        assert 0.9 <= elapsed < 8, f"cut off after {elapsed:.2f}s, the timeout is 1s"
        answer = conn.response()
        if answer is not None:                  # 408 Status, or a plain close
            assert_status(answer, 408, "Timeout")
            assert answer.headers.get("connection") == "close"
        assert conn.closed_within(2)
    log.assert_clean()


def test_a_watch_outlives_the_read_header_and_idle_timeouts(start_server):
    """The head and idle deadlines bound how long a client may take to send; they do not run while
    the server streams a watch.  (They did: every watch was cut, without its last chunk, at the
    read-header timeout, 30 s by default.)"""
    server = start_server("--read-header-timeout", "1s", "--idle-timeout", "1s")
    log = LogWatch(server)
    with Raw(server, timeout=10) as conn:
        started = time.monotonic()
        conn.send(f"GET {GV}/requests?watch=1&timeoutSeconds=3 HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        head = conn.response(read_body=False)
        assert head.code == 200
        conn.with_body(head)                    # up to its last chunk; a cut raises AssertionError
        assert time.monotonic() - started >= 2.9, "the watch ended before its timeoutSeconds"
        conn.send(b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\n")   # and the connection carries on
        assert conn.response().code == 200
    log.assert_clean()


LIST_REQUEST = f"GET {GV}/requests HTTP/1.1\r\nHost: a\r\n\r\n".encode()


def same_answer(received: bytes, expected: bytes) -> bool:
    """The same bytes but for the creation timestamps, which name the second each was answered in
    (a list read over seconds may be answered in another second than the one fetched to compare)."""
    def unstamped(body: bytes) -> bytes:
        return re.sub(rb'"creationTimestamp":"[^"]*"', b'"creationTimestamp":""', body)
    return len(received) == len(expected) and unstamped(received) == unstamped(expected)


def serving_a_1_mb_list(start_server, tmp_path, *flags: str) -> tuple[Server, bytes]:
    """A server whose list of all (LIST_REQUEST) is ~1 MB, ~60 TLS records, and that list (memoised now)."""
    rules = write_rules(tmp_path / "many.json", many_workloads(3000))
    server = start_server("--rules", str(rules), *flags)
    whole = server.get(f"{GV}/requests", timeout=10).body
    assert len(whole) > 900_000
    return server, whole


def test_a_slow_but_steady_reader_gets_the_whole_answer_and_keeps_its_connection(start_server, tmp_path):
    """A big answer read at a steady pace for longer than the head, idle and write timeouts arrives
    whole (--write-timeout cuts a reader that stops, counted from its last progress); the wait for
    the next request starts when the client has the answer.  (Answers were cut mid-body at the idle
    or read-header timeout; and, written as one piece, they looked stalled from the first full socket
    buffer on, so a steady reader was cut at --write-timeout.)"""
    server, whole = serving_a_1_mb_list(start_server, tmp_path, "--read-header-timeout", "2s", "--idle-timeout", "2s",
                                        "--write-timeout", "2s")
    log = LogWatch(server)
    with Raw(server, timeout=10, receive_buffer=4096) as conn:
        conn.send(LIST_REQUEST)
        started = time.monotonic()
        conn.read_steadily(len(whole), 0.06)    # ~4 s in all
        answer = conn.response()
        assert answer.code == 200 and same_answer(answer.body, whole)
        assert time.monotonic() - started > 2.5, "the answer came too fast to outlast the 2 s timeouts"
        assert "answers unsent" not in log.new()
        assert not conn.closed_within(0.5), "closed at once after the answer: the idle wait started long before"
        conn.send(b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.response().code == 200
    log.assert_clean()


def test_garbage_without_an_end_is_cut_off_by_the_read_header_timeout(start_server):
    server = start_server("--read-header-timeout", "1s")
    log = LogWatch(server)
    with Raw(server, timeout=20) as conn:
        started = time.monotonic()
        conn.send(b"\x00\xffgarbage without an end")
        answer = conn.response()
        elapsed = time.monotonic() - started
        # Not before the 1 s deadline; and by the server (a 408 or a close), not by this client's
        # 20 s read timeout.  The upper bound is generous for a loaded machine.
        assert 0.9 <= elapsed < 8, elapsed
        if answer is not None:
            assert_status(answer, 408, "Timeout")
    log.assert_clean()


def client_hello(server: Server) -> bytes:
    """The first flight of a real TLS client, captured without a socket."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = server.certs.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and len(hello) > 100
    return hello


def timed_get(server: Server) -> float:
    started = time.perf_counter()
    answer = server.get(GOOD_PATH, timeout=5)
    elapsed = time.perf_counter() - started
    assert answer.status == 200, answer
    return elapsed


def test_600_idle_and_half_way_connections_neither_block_new_clients_nor_linger(start_server):
    timeout = 2.0
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < 1500:
        pytest.skip(f"RLIMIT_NOFILE is {soft} and its hard limit forbids more: 600 held connections need ~1500")
    server = start_server("--max-connections", "1000", "--tls-handshake-timeout", "2s",
                          "--read-header-timeout", "2s", "--idle-timeout", "2s")
    log = LogWatch(server)
    hello = client_hello(server)
    idle, half_hello, half_head = [], [], []
    opened = {}
    try:
        for _ in range(500):                    # TCP connections that never send a byte
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            idle.append(sock)
            opened[sock] = time.monotonic()
        for _ in range(50):                     # half a ClientHello, then silence
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(hello[:len(hello) // 2])
            half_hello.append(sock)
            opened[sock] = time.monotonic()

        def half_way_head() -> tuple:           # TLS done, then half a request head
            conn = Raw(server, timeout=5)
            conn.send(b"GET /x HTTP/1.1\r\nHost: a\r\n")
            return conn, time.monotonic()

        # The handshakes run side by side: one after the other they would take most of the 2 s.
        with concurrent.futures.ThreadPoolExecutor(max_workers=25) as pool:
            for conn, sent in pool.map(lambda _: half_way_head(), range(50)):
                half_head.append(conn)
                opened[conn.sock] = sent
        # The listener accepts in order and each of the last 50 finished a handshake, so every one
        # of the 600 connections is now held by the server.
        held_since = min(opened.values())

        if time.monotonic() - held_since >= timeout - 0.5:
            pytest.skip("this machine took too long to open the 600 connections: some may already have timed "
                        "out, so a new client being served would prove nothing")
        # A new client among them is served at once, not after the held connections time out (how
        # fast it is served is a figure for tests/bench.py, not a threshold here).
        latency = timed_get(server)
        served_at = time.monotonic()
        print(f"new-client latency among 600 held connections: {latency * 1000:.1f} ms")
        assert served_at - held_since < timeout, (
            f"a new client was served only {served_at - held_since:.2f}s after the 600 connections were held, "
            f"when their {timeout:g}s timeouts could already have freed the server")

        # Every one of them is closed by the server, by its timeout (not before, and soon after).
        selector = selectors.DefaultSelector()
        for sock in idle + half_hello:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, "plain")
        for conn in half_head:
            selector.register(conn.sock, selectors.EVENT_READ, conn)
        closed_after = {}
        answers = []
        deadline = time.monotonic() + timeout + 8.0       # generous: the reaper runs 4 times a second
        while len(closed_after) < 600 and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                sock = key.fileobj
                if key.data == "plain":
                    try:
                        chunk = sock.recv(4096)
                    except BlockingIOError:
                        continue                 # a spurious wake-up
                    except ConnectionResetError:
                        chunk = b""
                    if chunk:
                        continue                 # bytes (a TLS alert, say): wait for the close itself
                else:
                    if not key.data.readable_within(0):
                        continue                 # a session ticket, not an answer
                    answers.append(key.data.response())
                    assert key.data.closed_within(2)
                closed_after[sock] = time.monotonic() - opened[sock]
                selector.unregister(sock)
        selector.close()
        assert len(closed_after) == 600, (
            f"{600 - len(closed_after)} connections still open {timeout + 8:.0f}s after their timeout "
            f"(idle {sum(s not in closed_after for s in idle)}, half hello "
            f"{sum(s not in closed_after for s in half_hello)}, half head "
            f"{sum(c.sock not in closed_after for c in half_head)})")
        earliest = min(closed_after.values())
        print(f"held connections closed {earliest:.2f}-{max(closed_after.values()):.2f}s after opening")
        assert earliest >= timeout - 0.5, f"a connection was closed {earliest:.2f}s after opening, before its timeout"
        for answer in answers:
            if answer is not None:
                assert_status(answer, 408, "Timeout")
    finally:
        for sock in idle + half_hello:
            sock.close()
        for conn in half_head:
            conn.close()
    log.assert_clean()


def metric(server: Server, name: str, connection=None) -> int:
    """A counter or gauge of /metrics, asked on a new connection or on `connection`."""
    if connection is None:
        text = server.get("/metrics").text
    else:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    return int(float(next(line.split()[1] for line in text.splitlines() if line.startswith(f"reqapi_{name} "))))


def only_these_open(connection, count: int):
    """A predicate: /metrics, asked on `connection`, shows `count` open connections (so the
    readiness probes of start() have been let go and the count is the test's alone)."""
    def check() -> bool:
        connection.request("GET", "/metrics")
        return f"\nreqapi_connections_open {count}\n" in connection.getresponse().read().decode()
    return check


def test_at_the_cap_a_new_client_takes_the_slot_of_the_longest_idle_connection(start_server):
    """Regression (the cap was a lockout switch): 20 connections that never send a byte filled
    --max-connections, and every new client — the kubelet's probes included — was turned away."""
    server = start_server("--max-connections", "20", "--tls-handshake-timeout", "30s", "--idle-timeout", "30s")
    log = LogWatch(server)
    first = server.connection(timeout=5)
    silent: list = []
    newcomers: list = []
    try:
        assert wait_until(only_these_open(first, 1), timeout=5)
        for _ in range(19):
            silent.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        assert wait_until(only_these_open(first, 20), timeout=5), "the 19 silent connections were not all held"
        # Full.  New clients are served (and stay connected), each taking the slot of the connection
        # silent longest.
        for index in range(10):
            client = server.connection(timeout=5)
            newcomers.append(client)
            client.request("GET", "/livez" if index % 2 else GOOD_PATH)
            assert client.getresponse().status == 200
        evicted = silent[:10]
        for sock in evicted:                      # the oldest ten went, in order, at once
            sock.settimeout(5)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
        assert metric(server, "connections_evicted_total", first) == 10
        assert metric(server, "connections_rejected_total", first) == 0
        # The keep-alive connection that asked /metrics was busy each time, never idle longest.
        first.request("GET", "/livez")
        assert first.getresponse().read() == b"ok"
        for sock in silent[10:]:                  # the younger silent ones are still held
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        first.close()
        for sock in silent:
            sock.close()
        for client in newcomers:
            client.close()
    log.assert_clean()


def test_when_every_slot_has_work_in_progress_a_new_connection_is_closed_at_once(start_server, rules_file):
    server = start_server("--rules", str(rules_file), "--max-connections", "4", "--max-watches", "4")
    watches = []
    try:
        for _ in range(4):
            conn, answer = open_watch(server)
            assert answer.code == 200
            assert conn.readable_within(5)        # the first event arrived: the watch is open
            watches.append(conn)
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        try:
            assert sock.recv(1) == b""            # closed at once, not held until a timeout
        except ConnectionResetError:
            pass
        finally:
            sock.close()
        watches.pop().close()                     # one watch ends: its slot is free again
        assert wait_until(lambda: server.try_get("/livez") == 200, timeout=5)
        assert metric(server, "connections_rejected_total") >= 1
    finally:
        for conn in watches:
            conn.close()


def test_at_the_cap_the_client_that_left_its_answers_unread_longest_gives_up_its_slot(start_server):
    """Eight clients fill the eight slots, pipeline 25 requests each and never read the answers:
    once they have taken nothing for STALL_GRACE, a new client (the kubelet's probe) takes the slot
    of the one stalled longest.  (Such slots counted as work in progress: every new connection was
    closed at once until --write-timeout, 60 s here.)"""
    server = start_server("--max-connections", "8", "--write-timeout", "60s")
    log = LogWatch(server)
    stalled = [Raw(server, timeout=10, receive_buffer=1024) for _ in range(8)]
    try:
        for conn in stalled:
            conn.send(b"GET /openapi/v2 HTTP/1.1\r\nHost: a\r\n\r\n" * 25)    # ~200 KB of answers each
        # Every request answered: the answers wait in the server, past what the sockets hold.
        assert wait_until(lambda: server.log().count("GET /openapi/v2 200") >= 200, timeout=10)
        assert wait_until(lambda: server.try_get("/livez") == 200, timeout=reqapi.STALL_GRACE + 8)
        assert metric(server, "slow_readers_cut_total") >= 1
        server.wait_for_log(r"connection closed with answers unsent .*unsent_bytes=[1-9].*--max-connections")
    finally:
        for conn in stalled:
            conn.close()
    log.assert_clean()


def test_watches_over_their_cap_are_answered_429_with_retry_after(start_server, rules_file):
    server = start_server("--rules", str(rules_file), "--max-watches", "3")
    log = LogWatch(server)
    watches = []
    try:
        for _ in range(3):
            conn, answer = open_watch(server)
            assert answer.code == 200
            watches.append(conn)
        with Raw(server, timeout=5) as conn:
            conn.send(f"GET {GV}/requests?watch=1 HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            answer = conn.response()
            document = assert_status(answer, 429, "TooManyRequests")
            assert answer.headers["retry-after"] == str(reqapi.RETRY_AFTER_WATCHES)
            assert document["details"]["retryAfterSeconds"] == reqapi.RETRY_AFTER_WATCHES
            assert "--max-watches" in document["message"]
            # The connection stays usable: a GET on it is answered.
            conn.send(f"GET {GOOD_PATH} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            assert conn.response().code == 200
        assert metric(server, "watches_rejected_total") == 1
        assert metric(server, "watches_open") == 3
    finally:
        for conn in watches:
            conn.close()
    log.assert_clean()


# ---------------------------------------------------------------------------
# Generated requests over the network (the same generator as test_http_messages.py)
# ---------------------------------------------------------------------------

@st.composite
def network_heads(draw) -> bytes:
    """Like request_heads, but always starting with a request line that is not blank (a blank one is
    skipped as the padding between pipelined requests, and the server would wait for a real one)."""
    head = draw(request_heads())
    if not head or head[:1] in (b"\r", b"\n"):
        head = b"X" + head
    return head


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(head=network_heads())
def test_generated_requests_over_the_network_get_a_status_line_and_status_errors(server, clean_log, head):
    method = head.split(b" ", 1)[0]
    with Raw(server, timeout=10) as conn:
        conn.send(head + b"\r\n\r\n")
        answer = conn.response(read_body=False)      # a 200 may be a watch: its body never ends
        assert answer is not None, f"closed without an answer to {head!r}"
        assert answer.code != 500, (head, answer)
        if answer.code >= 400 and method != b"HEAD":
            assert_status(conn.with_body(answer), answer.code)


def test_connection_tokens_and_zero_length_bodies(server, clean_log):
    with Raw(server) as conn:
        conn.send(b"GET /livez HTTP/1.1\r\nHost: a\r\nContent-Length: 00\r\nConnection: keep-alive, close\r\n\r\n")
        answer = conn.response()
        assert answer is not None and answer.code == 200, answer
        assert answer.headers.get("connection") == "close"
        assert conn.closed_within(2)


def test_a_python_without_the_tls_introspection_reqapi_needs_refuses_to_start(monkeypatch):
    """The verified chain of a client certificate and the serving certificate's expiry come from
    CPython APIs outside ssl's documented surface: where they are gone, start-up fails, saying so,
    instead of trusting no client certificate or reporting an expiry of 0."""
    assert reqapi.require_tls_introspection()          # this Python has them
    stripped = types.SimpleNamespace(SSLSocket=type("SSLSocket", (), {}), _ssl=types.SimpleNamespace())
    monkeypatch.setattr(reqapi, "ssl", stripped)
    with pytest.raises(reqapi.ConfigError, match=r"lacks SSLSocket\.get_verified_chain .* and "
                                                 r"ssl\._ssl\._test_decode_cert"):
        reqapi.require_tls_introspection()


# ---------------------------------------------------------------------------
# WebSocket watches, with a real WebSocket client library (websocket-client)
# ---------------------------------------------------------------------------

def websocket_url(server: Server, path: str) -> str:
    return f"wss://localhost:{server.port}{path}"


def test_a_websocket_watch_sends_each_event_as_a_text_frame_and_closes_normally(server):
    import websocket

    url = websocket_url(server, f"{GV}/namespaces/shop/requests/web?watch=1&timeoutSeconds=1")
    ws = websocket.create_connection(url, sslopt={"ca_certs": str(server.certs.ca_file)},
                                     subprotocols=["base64.binary.k8s.io"], timeout=10)
    try:
        assert ws.getstatus() == 101 and ws.subprotocol == "base64.binary.k8s.io"
        opcode, data = ws.recv_data()
        assert opcode == websocket.ABNF.OPCODE_TEXT
        event = json.loads(data)
        assert event["type"] == "ADDED" and event["object"]["metadata"]["name"] == "web"
        opcode, data = ws.recv_data(control_frame=True)      # the watch's timeout ends it
        assert opcode == websocket.ABNF.OPCODE_CLOSE and data[:2] == (1000).to_bytes(2, "big")
    finally:
        ws.close()


def test_a_websocket_client_that_closes_is_answered_and_let_go(server, clean_log):
    import websocket

    url = websocket_url(server, f"{GV}/namespaces/shop/requests/web?watch=1&timeoutSeconds=60")
    ws = websocket.create_connection(url, sslopt={"ca_certs": str(server.certs.ca_file)}, timeout=10)
    assert json.loads(ws.recv())["type"] == "ADDED"
    ws.ping(b"are you there")
    assert ws.recv_data(control_frame=True) == (websocket.ABNF.OPCODE_PONG, b"are you there")
    ws.send_close()
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and data == (1000).to_bytes(2, "big")
    ws.shutdown()
    # Logged as a 101 long before its 60 s timeout: the server noticed the close.
    assert server.wait_for_log(r"GET /apis/k8s\.wujiuye\.com/v1beta1/namespaces/shop/requests/web 101 (\d+)\.\d+ms")


def test_a_websocket_watch_without_origin_is_refused_with_a_status(server):
    import websocket

    url = websocket_url(server, f"{GV}/namespaces/shop/requests?watch=1")
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(url, sslopt={"ca_certs": str(server.certs.ca_file)}, suppress_origin=True,
                                    timeout=10)
    assert refused.value.status_code == 403
    assert_status_document(json.loads(refused.value.resp_body), 403)


# ---------------------------------------------------------------------------
# The event loop: slow readers, split TLS records, half-closed clients, deep pipelines
# ---------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def many_workloads(count: int) -> dict:
    """Rules naming `count` workloads exactly: a watch's initial events are ~400 bytes each."""
    return {"defaults": {"cpu": "100m", "memory": "100Mi"},
            "rules": [{"id": f"w{index}", "namespace": "load", "name": f"workload-{index:05d}", "cpu": "1"}
                      for index in range(count)]}


def test_watches_whose_clients_stop_reading_hold_little_memory_and_stall_nobody(start_server, tmp_path):
    """20 watches of 10,000 workloads each (~4 MB of initial events apiece, 80 MB if queued whole)
    whose clients never read: the server queues at most its high water per watch, keeps answering
    others, and cuts the stalled clients off at --write-timeout."""
    rules = write_rules(tmp_path / "many.json", many_workloads(10_000))
    server = start_server("--rules", str(rules), "--write-timeout", "3s")
    log = LogWatch(server)
    pid = server.process.pid
    assert server.get(f"{GV}/requests?limit=1").status == 200     # the generation's memo is warm
    before = rss_bytes(pid)
    stalled = []
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)     # a small window: the server must wait
            tls = server.certs.client_context().wrap_socket(sock, server_hostname="localhost")
            tls.sendall(f"GET {GV}/requests?watch=1 HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            stalled.append(tls)
        assert wait_until(lambda: metric(server, "watches_open") == 20, timeout=10)
        # Others are served meanwhile: GETs, a list of all 10,000, and a watch that reads.
        assert server.get(GOOD_PATH, timeout=5).status == 200
        assert len(server.get(f"{GV}/requests", timeout=10).json()["items"]) == 10_000
        grown = rss_bytes(pid) - before
        print(f"RSS grew {grown / 2**20:.1f} MiB with 20 stalled watches of ~4 MB each")
        assert grown < 30 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB: the stalled watches' events were queued whole"
        # The stalled clients are cut off at the write timeout, and the log says so.
        assert wait_until(lambda: metric(server, "watches_open") == 0, timeout=15)
        server.wait_for_log(r"connection closed with answers unsent .*--write-timeout")
    finally:
        for tls in stalled:
            tls.close()
    log.assert_clean()


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def test_a_burst_of_big_answers_nobody_reads_stays_within_the_queue_limit(start_server, tmp_path):
    """60 clients ask for a ~1 MB list at once and never read it.  The queues hold at most
    QUEUED_LIMIT (8 MiB): the lists beyond it are answered 429, /livez is answered meanwhile, and
    the clients that read nothing are cut off after STALL_GRACE.  (The limit was checked only once
    per turn of the loop, after every ready connection had queued its answer: 60 MB here, 400 MB
    for 300 clients.)"""
    server, _ = serving_a_1_mb_list(start_server, tmp_path, "--write-timeout", "60s")
    log = LogWatch(server)
    pid = server.process.pid
    clients = [Raw(server, timeout=10, receive_buffer=1024) for _ in range(60)]
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear:
            clear.write("5")                    # VmHWM := VmRSS: the peak from here on
        before = peak_rss_bytes(pid)
        for client in clients:
            client.send(LIST_REQUEST)
        assert server.try_get("/livez") == 200
        # All but the few whose answers fit under the limit are refused; those are cut off after
        # STALL_GRACE, not at --write-timeout (60 s).
        assert wait_until(lambda: server.log().count(f"GET {GV}/requests 429 ") >= 50, timeout=30)
        assert wait_until(lambda: metric(server, "slow_readers_cut_total") >= 1, timeout=reqapi.STALL_GRACE + 8)
        grown = peak_rss_bytes(pid) - before
        print(f"peak RSS grew {grown / 2**20:.1f} MiB for 60 unread answers of ~1 MB")
        assert grown < 30 * 2**20, f"peak RSS grew {grown / 2**20:.1f} MiB: the answers were queued beyond the limit"
        server.wait_for_log(r"connection closed with answers unsent .*queue limit.*taken nothing for")
    finally:
        for client in clients:
            client.close()
    log.assert_clean()


def test_a_steady_reader_is_not_cut_off_for_clients_that_read_nothing(start_server, tmp_path):
    """A client reads a ~1 MB list at a steady pace while ten others ask for it and read nothing,
    filling the queues: those are cut off, the reader gets its whole list.  (It was cut first: its
    answer, one piece, looked stalled since the socket buffer first filled, longer than theirs.)"""
    server, whole = serving_a_1_mb_list(start_server, tmp_path, "--write-timeout", "60s")
    log = LogWatch(server)
    hogs = []
    try:
        with Raw(server, timeout=10, receive_buffer=4096) as reader:
            reader.send(LIST_REQUEST)
            reader._fill()                          # its answer is on its way
            for _ in range(10):
                hog = Raw(server, timeout=10, receive_buffer=1024)
                hog.send(LIST_REQUEST)
                hogs.append(hog)
            reader.read_steadily(len(whole), 0.05)  # ~3 s in all
            answer = reader.response()
            assert answer.code == 200 and same_answer(answer.body, whole)
        assert wait_until(lambda: metric(server, "slow_readers_cut_total") >= 1, timeout=reqapi.STALL_GRACE + 8)
    finally:
        for hog in hogs:
            hog.close()
    log.assert_clean()


class SplitRecords:
    """A TLS client over a raw socket (ssl.MemoryBIO), so that the test decides how the bytes of
    each TLS record are cut into TCP writes."""

    def __init__(self, server: Server):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = server.certs.client_context().wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def send_in_pieces(self, piece: int) -> None:
        data = self.outgoing.read()
        for start in range(0, len(data), piece):
            self.sock.sendall(data[start:start + piece])

    def receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.incoming.write_eof()
        self.incoming.write(data)

    def handshake(self, piece: int) -> None:
        while True:
            try:
                self.tls.do_handshake()
                self.send_in_pieces(piece)
                return
            except ssl.SSLWantReadError:
                self.send_in_pieces(piece)
                self.receive()

    def read_answer(self) -> bytes:
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"Content-Length: (\d+)", answer).group(1) if b"Content-Length" in answer else 0):
            try:
                answer += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self.receive()
        return answer


def test_tls_records_split_across_many_reads_are_put_together(server, clean_log):
    client = SplitRecords(server)
    try:
        client.handshake(piece=7)                   # the ClientHello and Finished in 7-byte writes
        head = f"GET {GOOD_PATH} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
        client.tls.write(head[:20])                 # two TLS records, cut at a place that is not a line end,
        client.tls.write(head[20:])
        client.send_in_pieces(3)                    # sent 3 bytes at a time
        answer = client.read_answer()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:200]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["metadata"]["name"] == "web"
    finally:
        client.sock.close()


@pytest.mark.parametrize("close_notify", [True, False], ids=["tls-close-notify-and-fin", "fin-only"])
def test_a_client_that_sends_its_request_then_closes_its_side_gets_the_answer(server, clean_log, close_notify):
    client = SplitRecords(server)
    try:
        client.handshake(piece=65536)
        client.tls.write(f"GET {GOOD_PATH} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        if close_notify:
            with pytest.raises(ssl.SSLWantReadError):
                client.tls.unwrap()               # TLS close_notify: "I send nothing more"
        client.send_in_pieces(65536)
        client.sock.shutdown(socket.SHUT_WR)      # and the TCP FIN
        answer = b""
        while True:
            try:
                answer += client.tls.read(65536)
            except ssl.SSLWantReadError:
                data = client.sock.recv(65536)
                if not data:
                    break
                client.incoming.write(data)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:300]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["metadata"]["name"] == "web"
    finally:
        client.sock.close()


def test_10000_pipelined_requests_in_one_write_are_answered_in_order(server, clean_log):
    count = 10_000
    payload = b"".join(f"GET {GV}/namespaces/pipe/requests/w-{index} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
                       for index in range(count))
    client = SplitRecords(server)
    try:
        client.handshake(piece=65536)
        client.tls.write(payload)                   # one write of ~700 KB (TLS records of 16 KB)
        ciphertext = client.outgoing.read()
        # The server stops reading while its answers wait to be read: send and read side by side,
        # in this one thread (an SSL object must not be used by two threads at once).
        client.sock.setblocking(False)
        received = bytearray()
        names: list = []
        deadline = time.monotonic() + 60
        with selectors.DefaultSelector() as selector:
            selector.register(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while len(names) < count and time.monotonic() < deadline:
                for _, events in selector.select(1.0):
                    if events & selectors.EVENT_WRITE and ciphertext:
                        try:
                            ciphertext = ciphertext[client.sock.send(ciphertext[:262144]):]
                        except BlockingIOError:
                            pass
                        if not ciphertext:
                            selector.modify(client.sock, selectors.EVENT_READ)
                    if events & selectors.EVENT_READ:
                        data = client.sock.recv(262144)
                        assert data, f"closed after {len(names)} answers"
                        client.incoming.write(data)
                        while True:
                            try:
                                received += client.tls.read(262144)
                            except ssl.SSLWantReadError:
                                break
                while True:                         # whole answers: head, then Content-Length bytes
                    end = received.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    length = int(re.search(rb"Content-Length: (\d+)", received[:end]).group(1))
                    if len(received) < end + 4 + length:
                        break
                    assert received.startswith(b"HTTP/1.1 200 "), bytes(received[:200])
                    names.append(json.loads(received[end + 4:end + 4 + length])["metadata"]["name"])
                    del received[:end + 4 + length]
    finally:
        client.sock.close()
    assert names == [f"w-{index}" for index in range(count)]
