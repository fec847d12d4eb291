"""HTTP messages (section 4) and the pipeline behind them, without a socket: parse_head decides
everything about a request once, ResponseEncoder makes the bytes, and generated request heads
through parse_head + Api.handle always give a well-formed answer (a metav1.Status for errors)."""

from __future__ import annotations

import base64
import json
import os
import string
import urllib.parse
from typing import Optional

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import reqapi
from conftest import AGGREGATED_ACCEPT, GV, TABLE_ACCEPT

GROUP, VERSION = reqapi.GROUP, reqapi.VERSION

# The reason reqapi (like kube-apiserver, where one exists) gives each code.
REASON = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
          406: "NotAcceptable", 408: "Timeout", 410: "Expired", 414: "RequestURITooLong",
          431: "RequestHeaderFieldsTooLarge", 500: "InternalError", 503: "ServiceUnavailable",
          505: "HTTPVersionNotSupported"}


def assert_status_document(document: dict, code: int, reason: Optional[str] = None) -> None:
    assert document.get("kind") == "Status", document
    assert document.get("apiVersion") == "v1", document
    assert document.get("status") == "Failure", document
    assert document.get("code") == code, document
    expected = reason or REASON.get(code)
    if expected:
        assert document.get("reason") == expected, document
    else:
        assert isinstance(document.get("reason"), str) and document["reason"], document
    assert isinstance(document.get("message"), str) and document["message"].strip(), document
    assert "Traceback" not in document["message"]



# ---------------------------------------------------------------------------
# Property-based tests
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api():
    """The Api, with its storage, access and health built as Runtime builds them, logging to /dev/null."""
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        storage = reqapi.RequestsStorage(reqapi.RulesHistory())
        access, metrics = reqapi.Access(reqapi.AlwaysAllow()), reqapi.Metrics()
        health = reqapi.Health(storage.history, access, metrics)
        yield reqapi.Api(storage, access, health, metrics, reqapi.Logger(fd=fd), watch_timeout=300)
    finally:
        os.close(fd)


LATIN1 = st.characters(min_codepoint=0, max_codepoint=255)
TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"

LITERAL_SEGMENTS = ["", "api", "apis", GROUP, VERSION, "namespaces", "requests", "watch", "openapi", "v2", "v3",
                    "healthz", "livez", "readyz", "metrics", "version", "ping", "log", "rules", "default", "shop",
                    "checkout", "web", "kube-system", "a.b", "x" * 64]
BAD_SEGMENT_TEXT = [".", "..", "%2e", "%2E%2e", "%00", "\x00", "%ff", "%c0%af", "%2F", "%zz", "%", "a%", "%C3%A9",
                    "\xe9", "\xff", "%ed%a0%80", "%f4%90%80%80", "a b", "?", "#", ";", "\t"]
QUERY_NAMES = ["watch", "labelSelector", "fieldSelector", "resourceVersion", "resourceVersionMatch", "includeObject",
               "sendInitialEvents", "allowWatchBookmarks", "hash", "exclude", "verbose", "pretty", "continue"]
# limit and timeoutSeconds also get non-ASCII digits ("²") and numbers too long for int(): see
# test_numbers_in_the_query_that_int_refuses_are_answered_400 below.
NUMERIC_QUERY_NAMES = ["limit", "timeoutSeconds"]
HEADER_NAMES = ["Accept", "Content-Length", "Transfer-Encoding", "Host", "Connection", "If-None-Match", "Audit-Id",
                "X-Remote-User", "X-Remote-Group", "X-Remote-Extra-Scopes", "Authorization", "User-Agent",
                "Content-Type", "Expect", "Upgrade"]
ACCEPT_VALUES = ["application/json", TABLE_ACCEPT, AGGREGATED_ACCEPT, "*/*", "application/*", "text/html",
                 "application/json;as=Table;v=v1;g=meta.k8s.io", "application/json;as=Table;v=v2;g=meta.k8s.io",
                 "application/json;q=0", "application/json;q=abc", "application/json;q=1e999", "application/json;q=nan",
                 "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList", ";;;,,,", "a/b;c",
                 "application/yaml", "application/vnd.kubernetes.protobuf"]


def percent_encoded(data: bytes) -> str:
    return "".join(f"%{byte:02X}" for byte in data)


segment_strategy = st.one_of(
    st.sampled_from(LITERAL_SEGMENTS),
    st.sampled_from(BAD_SEGMENT_TEXT),
    st.text(LATIN1, max_size=12),
    st.binary(max_size=6).map(percent_encoded),
    st.text(max_size=6).map(lambda text: urllib.parse.quote(text, safe="")),
)

query_value = st.one_of(
    st.text(LATIN1, max_size=20),
    st.text(max_size=12).map(lambda text: urllib.parse.quote(text, safe="")),
    st.binary(max_size=8).map(percent_encoded),
    st.sampled_from(["true", "false", "1", "0", "", "Exact", "NotOlderThan", "None", "Metadata", "Object",
                     "metadata.name=web", "metadata.namespace!=x,metadata.name==y", "a in (b,c),!d", "x notin ()"]),
)
numeric_value = st.one_of(st.text(string.ascii_letters + string.digits + "+-. ", max_size=12),
                          st.integers(min_value=-10, max_value=10**12).map(str),
                          st.text(string.digits + "\u00b2\u0663\uff11", max_size=12).map(urllib.parse.quote),
                          st.sampled_from(["9" * 13, "9" * 5000]))
continue_value = st.one_of(
    query_value,
    st.builds(lambda rv, start: base64.urlsafe_b64encode(json.dumps({"rv": rv, "start": start}).encode()).decode(),
              st.one_of(st.text(max_size=8), st.integers()),
              st.one_of(st.lists(st.text(max_size=4), max_size=3), st.integers(), st.none(), st.text(max_size=4))),
)
query_pair = st.one_of(
    st.tuples(st.sampled_from(QUERY_NAMES), query_value),
    st.tuples(st.sampled_from(NUMERIC_QUERY_NAMES), numeric_value),
    st.tuples(st.just("continue"), continue_value),
    st.tuples(st.text(LATIN1, max_size=8), query_value),
)


@st.composite
def targets(draw) -> str:
    kind = draw(st.sampled_from(["path", "path", "path", "absolute", "raw"]))
    if kind == "raw":
        return draw(st.text(LATIN1, max_size=40))
    target = "/" + "/".join(draw(st.lists(segment_strategy, max_size=9)))
    if kind == "absolute":
        target = draw(st.sampled_from(["https://localhost", "http://x", "https://a:1"])) + target
    pairs = draw(st.lists(query_pair, max_size=4))
    if pairs or draw(st.booleans()):
        target += "?" + "&".join(name + draw(st.sampled_from(["=", "=", ""])) + value for name, value in pairs)
    if draw(st.booleans()):
        target += "#" + draw(st.text(LATIN1, max_size=5))
    return target


method_strategy = st.one_of(
    st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
                     "PRI", "get", "FOO"]),
    st.text(TOKEN_CHARS, min_size=1, max_size=8),
    st.text(LATIN1, max_size=6),
)
version_strategy = st.one_of(
    st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/2", "HTTP/0.9", "http/1.1",
                     "HTTP/1.1 ", "HTTP/", "HTTP/1.1\x00"]),
    st.text(LATIN1, max_size=10),
)
header_strategy = st.one_of(
    st.tuples(st.sampled_from(HEADER_NAMES), st.one_of(st.sampled_from(ACCEPT_VALUES), st.text(LATIN1, max_size=30),
                                                       st.sampled_from(["0", "1", "00", "chunked", "close",
                                                                        "keep-alive", "h2c", "100-continue"]))),
    st.tuples(st.text(TOKEN_CHARS, min_size=1, max_size=12), st.text(LATIN1, max_size=30)),
    st.tuples(st.text(LATIN1, max_size=12), st.text(LATIN1, max_size=12)),
)


@st.composite
def request_heads(draw) -> bytes:
    """A request head without its final blank line: mostly nearly-valid, sometimes anything at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    if draw(st.integers(0, 9)) == 0:
        request_line = draw(st.text(LATIN1, max_size=60))
    else:
        separator = draw(st.sampled_from([" ", " ", " ", " ", "  ", "\t"]))
        request_line = separator.join([draw(method_strategy), draw(targets()), draw(version_strategy)])
    headers = draw(st.lists(header_strategy, max_size=8))
    lines = [request_line] + [f"{name}{draw(st.sampled_from([': ', ':', ' : ', ':  ']))}{value}"
                              for name, value in headers]
    return "\r\n".join(lines).encode("latin-1")


def check_answer(api, head: bytes) -> str:
    """parse_head + Api.handle must give a well-formed answer; any other exception fails the test."""
    try:
        request = reqapi.parse_head(head)
    except reqapi.BadRequest as error:
        assert 400 <= error.code < 600
        response = error.response()
        assert response.code == error.code and response.content_type == reqapi.JSON
        assert_status_document(json.loads(response.body), error.code)
        return "bad-request"
    assert isinstance(request.segments, list) and all(isinstance(s, str) for s in request.segments)
    outcome = api.handle(request, None)
    result = outcome.result
    assert isinstance(outcome.identity, reqapi.Identity) and outcome.verb and isinstance(outcome.resource, str)
    if isinstance(result, reqapi.Response) and result.code >= 400:
        assert result.code != 500, f"an internal error: {result.body!r}"
        assert result.content_type == reqapi.JSON and 400 <= result.code < 600
        assert_status_document(json.loads(result.body), result.code)
        return "http-error"
    if isinstance(result, reqapi.WatchStream):
        assert isinstance(result.content_type, str) and result.content_type.startswith("application/json")
        result.events.close()        # a generator never started: closing it runs none of its code
        return "watch"
    assert isinstance(result, reqapi.Response), result
    assert isinstance(result.code, int) and 200 <= result.code < 600 and isinstance(result.body, bytes)
    for name, value in result.headers:
        assert isinstance(name, str) and isinstance(value, str) and "\n" not in value and "\r" not in value
    if result.content_type.startswith("application/json"):
        if result.code == 304:
            assert result.body == b""
        else:
            document = json.loads(result.body)
            if result.code >= 400:
                assert_status_document(document, result.code)
    else:
        assert result.content_type.startswith("text/plain"), result.content_type
        result.body.decode("utf-8")
    return "response"


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=request_heads())
@example(head=b"GET " + b"/a" * 10_000 + b" HTTP/1.1")
@example(head=b"GET /" + b"/".join([b"%ff"] * 7) + b" HTTP/1.1")
@example(head=f"GET {GV}/namespaces/%00/requests/%2e%2e HTTP/1.1".encode())
@example(head=b"PRI * HTTP/2.0")
@example(head=b"GET /livez HTTP/1.1\r\n" + b"X: y\r\n" * 101)
@example(head=f"GET {GV}/watch/requests?timeoutSeconds=1 HTTP/1.1".encode())
@example(head=f"GET {GV}/namespaces/default/requests/web?watch=1 HTTP/1.1\r\nAccept: {TABLE_ACCEPT}".encode())
@example(head=b"")
def test_parse_and_dispatch_always_give_a_well_formed_answer(api, head):
    check_answer(api, head)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=st.lists(segment_strategy, min_size=1, max_size=8), query=st.lists(query_pair, max_size=5),
       headers=st.lists(header_strategy, max_size=5))
def test_every_route_shape_with_generated_segments_answers(api, segments, query, headers):
    """Generated values in the parameter places of every route, so that endpoints run, not just 404s."""
    for route in reqapi.ROUTES:
        values = iter(segments * 8)
        path = "/" + "/".join(next(values) if part.startswith("{") else part for part in route.pattern)
        target = path + ("?" + "&".join(f"{name}={value}" for name, value in query) if query else "")
        head = "\r\n".join([f"GET {target} HTTP/1.1"] + [f"{name}: {value}" for name, value in headers])
        check_answer(api, head.encode("latin-1"))


@pytest.mark.parametrize("query", ["limit=%C2%B2", "limit=" + "9" * 5000, "watch=1&timeoutSeconds=%C2%B2"],
                         ids=["limit-superscript-two", "limit-5000-digits", "timeoutSeconds-superscript-two"])
def test_numbers_in_the_query_that_int_refuses_are_answered_400(api, query):
    assert check_answer(api, f"GET {GV}/requests?{query} HTTP/1.1".encode()) == "http-error"


def test_a_continue_token_of_deeply_nested_json_is_answered_400(api):
    token = base64.urlsafe_b64encode(b"[" * 3000).decode().rstrip("=")
    assert check_answer(api, f"GET {GV}/requests?continue={token} HTTP/1.1".encode()) == "http-error"


# ---------------------------------------------------------------------------
# parse_head and ResponseEncoder
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("version, connection, keep_alive", [
    ("HTTP/1.1", None, True), ("HTTP/1.1", "close", False), ("HTTP/1.1", "Keep-Alive, Upgrade", True),
    ("HTTP/1.1", "upgrade, CLOSE", False), ("HTTP/1.0", None, False), ("HTTP/1.0", "keep-alive", True),
])
def test_keep_alive_is_decided_once_from_the_version_and_connection(version, connection, keep_alive):
    head = f"GET /livez {version}\r\nHost: a" + (f"\r\nConnection: {connection}" if connection else "")
    assert reqapi.parse_head(head.encode()).keep_alive is keep_alive


@pytest.mark.parametrize("fields, has_body", [
    ("", False), ("\r\nContent-Length: 0", False), ("\r\nContent-Length: 000", False),
    ("\r\nContent-Length: 7", True), ("\r\nTransfer-Encoding: chunked", True),
])
def test_a_body_is_decided_once_from_content_length_and_transfer_encoding(fields, has_body):
    assert reqapi.parse_head(f"POST /livez HTTP/1.1\r\nHost: a{fields}".encode()).has_body is has_body


@pytest.mark.parametrize("length", ["\u00b2", "9" * 5000, "9" * 19, "-1", "1.0", ""])
def test_a_content_length_that_is_not_1_to_18_ascii_digits_is_a_bad_request(length):
    with pytest.raises(reqapi.BadRequest) as refusal:
        reqapi.parse_head(f"GET /livez HTTP/1.1\r\nContent-Length: {length}".encode("latin-1", "replace"))
    assert refusal.value.code == 400 and refusal.value.message.startswith("invalid Content-Length ")


# As kube-apiserver converts a boolean query parameter (apimachinery runtime.Convert_Slice_string_To_bool):
# the first value counts, and only "0" and "false" in any case are false; "t", "True", "yes" and
# even an empty value are true. Seen through the real kube-apiserver: reqapi served ?watch=t as a list.
@pytest.mark.parametrize("target, watch", [
    (f"{GV}/requests?watch=true", True), (f"{GV}/requests?watch=1", True), (f"{GV}/requests?watch=false", False),
    (f"{GV}/requests?watch=t", True), (f"{GV}/requests?watch=True", True), (f"{GV}/requests?watch=", True),
    (f"{GV}/requests?watch=FALSE", False), (f"{GV}/requests?watch=0", False),
    (f"{GV}/requests?watch=true&watch=0", True), (f"{GV}/requests?watch=0&watch=true", False),
    (f"{GV}/watch/requests", True), (f"{GV}/requests", False),
])
def test_a_watch_is_decided_once_from_the_query_or_the_watch_prefix(target, watch):
    assert reqapi.parse_head(f"GET {target} HTTP/1.1".encode()).watch is watch


def test_the_encoder_writes_each_response_whole_with_its_framing():
    encoder = reqapi.ResponseEncoder()
    response = reqapi.Response(200, b'{"a":1}', reqapi.JSON, (("Cache-Control", "no-cache, private"),))
    data = encoder.encode(response, close=False, method="GET", audit_id="id-1")
    head, _, body = data.partition(b"\r\n\r\n")
    assert body == b'{"a":1}'
    assert head.split(b"\r\n") == [b"HTTP/1.1 200 OK", b"Date: " + encoder.http_date().encode(),
                                     b"Content-Type: application/json", b"Content-Length: 7",
                                     b"Cache-Control: no-cache, private", b"Audit-Id: id-1"]
    head_only = encoder.encode(response, close=True, method="HEAD")
    assert head_only.endswith(b"Content-Length: 7\r\n" b"Cache-Control: no-cache, private\r\nConnection: close\r\n\r\n")
    not_modified = encoder.encode(reqapi.Response(304, b"", reqapi.JSON), close=False, method="GET")
    assert b"Content-Length" not in not_modified and not_modified.endswith(b"\r\n\r\n")
    assert encoder.chunk(b'{"type":"ADDED"}') == b'11\r\n{"type":"ADDED"}\n\r\n'
    assert b"Transfer-Encoding: chunked\r\n" in encoder.watch_head(reqapi.JSON, "")


@given(st.integers(min_value=0, max_value=253402300799))      # 1970 to 9999
def test_http_date_writes_what_email_utils_writes(seconds):
    import email.utils
    assert reqapi.http_date(seconds) == email.utils.formatdate(seconds, usegmt=True)


# The answer memo's pieces: the key of a head (less its Audit-Id) and an answer rebuilt from two parts.

AUDITED = b"GET /apis HTTP/1.1\r\nHost: x\r\nAudit-Id: 0f2b-9C\r\nAccept: */*"


@pytest.mark.parametrize("head, expected", [
    (AUDITED, (b"GET /apis HTTP/1.1\r\nHost: x\r\nAccept: */*", "0f2b-9C")),
    (b"GET /apis HTTP/1.1\r\nAudit-Id: last", (b"GET /apis HTTP/1.1", "last")),
    (b"GET /apis HTTP/1.1\r\nHost: x", (b"GET /apis HTTP/1.1\r\nHost: x", None)),
    # Anything but the one plain form is keyed whole: then the head itself decides the Audit-Id.
    (b"GET /apis HTTP/1.1\r\naudit-id: lower", None),
    (b"GET /apis HTTP/1.1\r\nAudit-Id: has space", None),
    (b"GET /apis HTTP/1.1\r\nAudit-Id: ", None),
    (b"GET /apis HTTP/1.1\r\nAudit-Id:  padded", None),
    (b"GET /apis HTTP/1.1\r\nAudit-Id: " + b"a" * 65, None),
    (b"GET /apis HTTP/1.1\r\nAudit-Id: one\r\nAudit-Id: two", None),
    (b"GET /apis HTTP/1.1\r\nAudit-Id: one\r\nX-Note: audit-id", None),
])
def test_the_answer_memo_keys_a_head_without_its_plain_audit_id(head, expected):
    assert reqapi.head_without_audit_id(head) == (expected or (head, None))


def test_the_audit_id_is_the_first_one_and_whole_as_kube_apiserver_keeps_it():
    long = "a" * 200
    assert reqapi.parse_head(b"GET /apis HTTP/1.1\r\nAudit-Id: " + long.encode()).audit_id == long
    assert reqapi.parse_head(b"GET /apis HTTP/1.1\r\nAudit-Id: one\r\nAudit-Id: two").audit_id == "one"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(head=request_heads(), audit_id=st.text("0123456789abcdefABCDEF-", min_size=1, max_size=64))
def test_two_heads_that_differ_only_in_a_plain_audit_id_share_a_key_and_parse_alike(head, audit_id):
    with_id = head + b"\r\nAudit-Id: " + audit_id.encode()
    key, found = reqapi.head_without_audit_id(with_id)
    if found is None:                 # the head had an Audit-Id of its own: keyed whole
        assert key == with_id
        return
    assert (key, found) == (head, audit_id)
    try:
        plain, audited = reqapi.parse_head(head), reqapi.parse_head(with_id)
    except reqapi.BadRequest:
        return
    # Everything but the Audit-Id is the same, so one answer serves both (with its own Audit-Id).
    assert audited.audit_id == audit_id
    assert (plain.method, plain.path, plain.segments, plain.query, plain.keep_alive, plain.has_body, plain.watch,
            plain.websocket) == (audited.method, audited.path, audited.segments, audited.query, audited.keep_alive,
                                 audited.has_body, audited.watch, audited.websocket)
    assert [item for item in audited.header_items if item[0] != "audit-id"] == plain.header_items


@pytest.mark.parametrize("response", [
    reqapi.Response(200, b'{"a":1}', reqapi.JSON, (("Cache-Control", "no-cache, private"),)),
    reqapi.Response(200, b"", reqapi.JSON),
    reqapi.Response(304, b"", reqapi.JSON, (("ETag", '"1"'),)),
    reqapi.Response(200, b"x" * 70000, "application/json;as=Table;v=v1;g=meta.k8s.io"),
])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("audit_id", ["", "7f9c2d4e-1b3a-4c5d-9e8f-0a1b2c3d4e5f"])
def test_an_answer_rebuilt_from_the_memo_is_byte_for_byte_the_encoded_one(response, method, audit_id):
    encoder = reqapi.ResponseEncoder()
    encoder.http_date = lambda: "Wed, 02 Dec 2026 03:00:00 GMT"     # one Date for both, whatever the clock does
    head, body = encoder.reusable(response, method)
    assert reqapi.ResponseEncoder.reuse(head, body, audit_id) == encoder.encode(response, False, method, audit_id)


# WebSocket watches: the handshake checks golang.org/x/net/websocket makes for k8s.io/apiserver, and
# the framing of RFC 6455.

def websocket_head(extra: str = "", method: str = "GET") -> bytes:
    lines = [f"{method} {GV}/namespaces/shop/requests?watch=1 HTTP/1.1", "Host: x", "Connection: Upgrade",
             "Upgrade: websocket", "Sec-WebSocket-Version: 13", "Origin: https://console.example"]
    return "\r\n".join(lines + ([extra] if extra else [])).encode()


def test_a_websocket_upgrade_is_recognised_only_with_both_headers():
    assert reqapi.parse_head(websocket_head("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")).websocket
    assert reqapi.parse_head(b"GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket").websocket
    assert not reqapi.parse_head(b"GET / HTTP/1.1\r\nUpgrade: websocket").websocket
    assert not reqapi.parse_head(b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c").websocket


def test_the_websocket_handshake_accepts_as_rfc_6455_computes_it():
    # RFC 6455 section 1.3's own example: key dGhlIHNhbXBsZSBub25jZQ== -> s3pPLMBiTxaQ9kYGzzhZRbK+xOo=
    request = reqapi.parse_head(websocket_head("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                               "Sec-WebSocket-Protocol: base64.binary.k8s.io"))
    assert reqapi.websocket_upgrade(request) == reqapi.WebSocketUpgrade("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
                                                                        "base64.binary.k8s.io")
    head = reqapi.ResponseEncoder.websocket_head(reqapi.websocket_upgrade(request))
    assert head == (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
                    b"Sec-WebSocket-Protocol: base64.binary.k8s.io\r\n\r\n")


@pytest.mark.parametrize("extra,method,code,fragment", [
    ("", "GET", 400, "Sec-WebSocket-Key"),
    ("Sec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5aw==\r\nSec-WebSocket-Protocol: a, b", "GET", 400,
     "offer one Sec-WebSocket-Protocol, not 2"),
    ("Sec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5aw==", "HEAD", 405, "a WebSocket watch is a GET"),
])
def test_a_websocket_handshake_that_kubernetes_refuses_is_refused(extra, method, code, fragment):
    with pytest.raises(reqapi.HTTPError) as refused:
        reqapi.websocket_upgrade(reqapi.parse_head(websocket_head(extra, method)))
    assert refused.value.code == code and fragment in refused.value.message
    assert_status_document(json.loads(refused.value.response().body), code)


def test_a_websocket_handshake_without_origin_or_of_another_version_is_refused():
    no_origin = websocket_head("Sec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5aw==").replace(
        b"\r\nOrigin: https://console.example", b"")
    with pytest.raises(reqapi.HTTPError) as refused:
        reqapi.websocket_upgrade(reqapi.parse_head(no_origin))
    assert refused.value.code == 403 and "Origin header" in refused.value.message
    old = websocket_head("Sec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5aw==").replace(b"Version: 13", b"Version: 8")
    with pytest.raises(reqapi.HTTPError) as refused:
        reqapi.websocket_upgrade(reqapi.parse_head(old))
    assert refused.value.code == 400 and ("Sec-WebSocket-Version", "13") in refused.value.response().headers


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_websocket_frames_round_trip_at_every_length_encoding(size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = reqapi.ResponseEncoder.websocket_frame(payload)
    assert frame[0] == 0x81 and not frame[1] & 0x80          # final text frame, unmasked from a server
    mask = b"\x01\x02\x03\x04"                              # the same frame as a client masks it
    masked = bytes((frame[0], frame[1] | 0x80)) + frame[2:len(frame) - size] + mask + bytes(
        byte ^ mask[index % 4] for index, byte in enumerate(payload))
    frames, rest = reqapi.websocket_client_frames(masked + masked[:3])
    assert frames == [(reqapi.WS_TEXT, payload)] and rest == masked[:3]


@given(payload=st.binary(max_size=300), mask=st.binary(min_size=4, max_size=4))
def test_websocket_unmasking_is_rfc_6455s_xor(payload, mask):
    assert reqapi.websocket_unmask(payload, mask) == bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))


def test_partial_websocket_frames_wait_for_their_end():
    close = bytes((0x88, 0x82)) + b"\x00\x00\x00\x00" + (1000).to_bytes(2, "big")
    for cut in range(len(close)):
        assert reqapi.websocket_client_frames(close[:cut]) == ([], close[:cut])
    assert reqapi.websocket_client_frames(close) == ([(reqapi.WS_CLOSE, b"\x03\xe8")], b"")


def test_header_values_are_utf_8_as_kube_apiserver_writes_identities():
    head = ("GET / HTTP/1.1\r\nX-Remote-User: 张三@example.com\r\nX-Remote-Group: Équipe-Ops\r\n"
            "X-Remote-Group: 研发-平台组").encode("utf-8")
    request = reqapi.parse_head(head)
    assert request.headers["x-remote-user"] == "张三@example.com"
    assert [v for n, v in request.header_items if n == "x-remote-group"] == ["Équipe-Ops", "研发-平台组"]
    # Bytes that are not UTF-8 become U+FFFD, as Go's JSON encoding of a review would make them.
    assert reqapi.parse_head(b"GET / HTTP/1.1\r\nX-Remote-User: a\xffb").headers["x-remote-user"] == "a\ufffdb"


def test_a_watch_lasts_as_kube_apiservers_do(api):
    # No timeoutSeconds, or 0: the base (--watch-timeout, here 300 s) times 1 to 2 at random,
    # as kube-apiserver does with its --min-request-timeout; reqapi ended every such watch after
    # exactly 5 minutes before, so `kubectl get requests -w` quit silently after 5 minutes.
    base = reqapi.ListOptions(None, (), (), reqapi.Output(), watch=True)
    lengths = {api.watch_length(base) for _ in range(200)} | {api.watch_length(base._replace(timeout_seconds=0))
                                                                 for _ in range(200)}
    assert all(300 <= length < 600 for length in lengths) and len(lengths) > 300
    assert api.watch_length(base._replace(timeout_seconds=10)) == 10
    assert api.watch_length(base._replace(timeout_seconds=10 ** 9)) == 600     # cut to twice the base
