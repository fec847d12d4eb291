"""A test double of kube-apiserver, for faults the real one cannot be made to produce on demand.

THIS IS NOT kube-apiserver. It is a small HTTPS server (standard library only:
``http.server.ThreadingHTTPServer`` + ``ssl``, served from a daemon thread) that
imitates the two kube-apiserver endpoints reqapi calls when it runs in a pod.
Everything a real kube-apiserver can show is tested against a real one
(tests/test_controlplane.py: the ConfigMap read with a ServiceAccount token, the
missing RoleBinding and its fix, RBAC answering SubjectAccessReviews). This
double stays for what the real one cannot do when a test wants it: answer 403 or
500 after a good read, decide reviews with a reason of its own, and count every
request reqapi sends it (to prove the review cache).

What it serves, shaped after what kube-apiserver serves an extension API server:

* the authentication ConfigMap -- ``GET /api/v1/namespaces/kube-system/configmaps/extension-apiserver-authentication``
  returns a full ``v1`` ConfigMap whose ``data`` holds CA PEM bundles and
  JSON-encoded string arrays (``requestheader-allowed-names`` and the header
  lists).  The response can be switched to 403 (RoleBinding to
  ``extension-apiserver-authentication-reader`` missing), 404, 500 (or 401/503).
* SubjectAccessReviews -- ``POST /apis/authorization.k8s.io/v1/subjectaccessreviews`` takes the
  SubjectAccessReview body (``apiVersion: authorization.k8s.io/v1``, ``kind``, ``spec`` with the user,
  groups, extra, uid and resourceAttributes or nonResourceAttributes), validates it (kind/apiVersion -> 400;
  spec rules of ``ValidateSubjectAccessReviewSpec`` -> 422 Invalid), and answers
  ``201 Created`` with the same object plus ``metadata`` and a ``status``
  produced by a pluggable ``sar_decider`` (default: allow everything).
* errors -- every error is a ``metav1.Status`` (``kind: Status, apiVersion: v1``,
  Go's key order, ``metadata: {}``, omitempty fields left out),
  ``Content-Type: application/json``; 401/403 also carry
  ``X-Content-Type-Options: nosniff``.  A missing or wrong bearer token gives
  the 401 ``Unauthorized`` Status; any other path gives the 404
  ``the server could not find the requested resource`` Status.

Known simplifications (deliberate, to keep the double strict and small):

* Real kube-apiserver usually has anonymous auth on, so a request *without* a
  token would be ``system:anonymous`` and get a 403; here it is a 401, like a
  wrong token.
* Real kube-apiserver fills in a missing ``kind``/``apiVersion`` of a create
  body from the URL; here both are required (400 otherwise).
* Any unknown path is a 404 (a real server would 403 some of them first).
* SAR response ``metadata`` is ``{"creationTimestamp": null}``, which is what
  kube-apiserver emitted for years; releases after kubernetes/kubernetes#130989
  (2025) omit the null and send ``{}`` -- set ``sar_null_creation_timestamp``
  to ``False`` for that.  Clients must accept both.

Response bodies are compact JSON followed by ``\\n`` with ``<``, ``>``, ``&``
escaped as ``\\u003c`` ... the way Go's ``encoding/json`` encoder writes them.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import ssl
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = [
    "CONFIGMAP_NAME",
    "CONFIGMAP_NAMESPACE",
    "CONFIGMAP_PATH",
    "SAR_PATH",
    "DEFAULT_SERVICE_ACCOUNT_USER",
    "FakeKubeAPIServer",
    "allow_all",
    "status_object",
    "write_service_account_dir",
]

CONFIGMAP_NAME = "extension-apiserver-authentication"
CONFIGMAP_NAMESPACE = "kube-system"
CONFIGMAP_PATH = f"/api/v1/namespaces/{CONFIGMAP_NAMESPACE}/configmaps/{CONFIGMAP_NAME}"
SAR_PATH = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
SAR_API_VERSION = "authorization.k8s.io/v1"
SAR_KIND = "SubjectAccessReview"
DEFAULT_SERVICE_ACCOUNT_USER = "system:serviceaccount:default:requests-apiserver"

_CONFIGMAP_STATUSES = frozenset({200, 401, 403, 404, 500, 503})
_SAR_HTTP_STATUSES = frozenset({201, 401, 403, 500, 503})

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    415: "UnsupportedMediaType",
    422: "Invalid",
    500: "InternalError",
    503: "ServiceUnavailable",
}


# --------------------------------------------------------------------------- helpers


def _go_json(obj: Any) -> bytes:
    """Serialise like Go's json.Encoder: compact, HTML-escaped, trailing newline."""
    text = json.dumps(obj, separators=(",", ":"))
    # <, > and & can only occur inside JSON strings, so this is safe.
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (text + "\n").encode("utf-8")


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_object(code: int, message: str, reason: str | None = None,
                  details: dict | None = None) -> dict:
    """A metav1.Status failure in Go's key order (kind, apiVersion, metadata,
    status, message, reason, details, code); details omitted when None."""
    obj: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason if reason is not None else _REASONS.get(code, ""),
    }
    if not obj["reason"]:
        del obj["reason"]
    if details is not None:
        obj["details"] = details
    obj["code"] = code
    return obj


def allow_all(spec: dict) -> dict:
    """Default SAR decider: allows every request (like a user bound to cluster-admin)."""
    return {"allowed": True}


def _normalise_sar_status(raw: dict) -> dict:
    """Shape a decider's answer like authorizationv1.SubjectAccessReviewStatus
    serialises: ``allowed`` always present, the rest omitempty."""
    if not isinstance(raw, dict):
        raise TypeError(f"sar_decider must return a dict, got {type(raw).__name__}")
    out: dict[str, Any] = {"allowed": bool(raw.get("allowed", False))}
    if raw.get("denied"):
        out["denied"] = True
    if raw.get("reason"):
        out["reason"] = str(raw["reason"])
    if raw.get("evaluationError"):
        out["evaluationError"] = str(raw["evaluationError"])
    return out


def _go_value(value: Any) -> str:
    """Rough rendering of a bad value in a field.Error message."""
    if value is None:
        return "null"
    return json.dumps(value, separators=(",", ":"))


def _validate_sar(body: dict) -> list[dict]:
    """ValidateSubjectAccessReview (spec + metadata) as field causes."""
    causes: list[dict] = []
    spec = body.get("spec") or {}
    if not isinstance(spec, dict):
        spec = {}
    ra = spec.get("resourceAttributes")
    nra = spec.get("nonResourceAttributes")
    if (ra is not None) == (nra is not None):
        causes.append({
            "reason": "FieldValueInvalid",
            "message": f"Invalid value: {_go_value(nra)}: exactly one of nonResourceAttributes "
                       "or resourceAttributes must be specified",
            "field": "spec",
        })
    if not spec.get("user") and not spec.get("groups"):
        causes.append({
            "reason": "FieldValueInvalid",
            "message": f"Invalid value: {_go_value(spec.get('user') or '')}: "
                       "at least one of user or group must be specified",
            "field": "spec.user",
        })
    meta = body.get("metadata")
    if isinstance(meta, dict):
        rest = {k: v for k, v in meta.items()
                if k != "managedFields" and not (k == "creationTimestamp" and v is None)}
        if rest:
            causes.append({
                "reason": "FieldValueInvalid",
                "message": f"Invalid value: {_go_value(meta)}: must be empty",
                "field": "metadata",
            })
    return causes


class _Headers(dict):
    """Plain dict of request headers, keys in Go's canonical form
    (``Content-Type``, ``X-Remote-User``), with case-insensitive lookups.
    Repeated headers are joined with ``", "``."""

    @staticmethod
    def canonical(key: str) -> str:
        return "-".join(part[:1].upper() + part[1:].lower() for part in key.split("-"))

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(self.canonical(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(self.canonical(key))

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(self.canonical(key), default)


# --------------------------------------------------------------------------- server


class _TLSServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose TLS handshake runs in the per-connection thread,
    so a stalled or failing client never blocks the accept loop."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, ssl_context: ssl.SSLContext, fake: "FakeKubeAPIServer"):
        self.ssl_context = ssl_context
        self.fake = fake
        super().__init__(addr, handler)

    def finish_request(self, request, client_address):
        request.settimeout(10)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # handshake failed (e.g. client does not trust our CA)
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            try:
                tls.close()
            except OSError:
                pass

    def handle_error(self, request, client_address):  # pragma: no cover - noise only
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-kube-apiserver"
    sys_version = ""
    server: _TLSServer

    def log_message(self, format, *args):  # silence stderr logging
        pass

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_PATCH(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        headers = _Headers()
        for key, value in self.headers.items():
            ckey = _Headers.canonical(key)
            if dict.__contains__(headers, ckey):
                dict.__setitem__(headers, ckey, dict.__getitem__(headers, ckey) + ", " + value)
            else:
                dict.__setitem__(headers, ckey, value)
        fake = self.server.fake
        code, extra_headers, payload = fake._respond(self.command, self.path, headers, raw, parsed)
        fake._record({
            "method": self.command,
            "path": self.path,
            "query": urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query),
            "headers": headers,
            "body": parsed,
            "raw_body": raw,
            "status": code,
        })
        body = _go_json(payload)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        for key, value in extra_headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FakeKubeAPIServer:
    """HTTPS test double of kube-apiserver (see the module docstring).

    The listening socket is bound in ``__init__`` (``127.0.0.1``, ephemeral
    port), so ``host``/``port``/``url`` are known before ``start()``.

    Mutable knobs (all guarded by one lock, safe to change while serving):

    ``configmap_data``   the ConfigMap's ``.data`` (dict of str -> str), or
                         ``None``: the ConfigMap does not exist (404).  Setting
                         it bumps ``metadata.resourceVersion``.
    ``configmap_status`` 200, or 403 / 404 / 500 (also 401 / 503) to simulate
                         missing RBAC, a missing object, etcd trouble ...
    ``sar_decider``      ``Callable[[spec], status]``: gets a deep copy of the
                         SAR ``spec`` and returns ``{"allowed": bool,
                         "denied": bool?, "reason": str?, "evaluationError": str?}``.
                         If it raises, the SAR POST answers a 500 InternalError.
    ``sar_http_status``  201 (default), or 403 (``system:auth-delegator`` not
                         bound) / 500 / 503 / 401 to make the SAR call itself fail.
    ``sar_null_creation_timestamp``  ``True``: SAR metadata is
                         ``{"creationTimestamp": null}``; ``False``: ``{}``.

    ``requests`` is a snapshot (copy) of every request seen, oldest first;
    each is a dict with ``method``, ``path`` (raw request target, query
    included), ``query`` (parse_qs), ``headers`` (dict, case-insensitive
    lookups), ``body`` (parsed JSON or None), ``raw_body`` (bytes) and
    ``status`` (the HTTP status answered).  A request is recorded before its
    response is written.  ``clear_requests()`` empties the log.
    """

    def __init__(self, *, cert_file: str, key_file: str, token: str,
                 configmap_data: dict[str, str] | None,
                 configmap_status: int = 200,
                 sar_decider: Callable[[dict], dict] | None = None,
                 service_account_user: str = DEFAULT_SERVICE_ACCOUNT_USER,
                 host: str = "127.0.0.1") -> None:
        if not token:
            raise ValueError("token must be non-empty")
        self._lock = threading.RLock()  # re-entrant: wait_for predicates may read knobs
        self._cond = threading.Condition(self._lock)
        self._token = token
        self._service_account_user = service_account_user
        self._requests: list[dict] = []
        self._configmap_data: dict[str, str] | None = None
        self._configmap_status = 200
        self._resource_version = 4711
        self._sar_decider: Callable[[dict], dict] = sar_decider or allow_all
        self._sar_http_status = 201
        self._sar_null_creation_timestamp = True
        self._cm_uid = str(uuid.uuid4())
        self._cm_created = _now_rfc3339()
        self.configmap_data = configmap_data
        self.configmap_status = configmap_status

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert_file, key_file)
        ctx.set_alpn_protocols(["http/1.1"])
        self._httpd = _TLSServer((host, 0), _Handler, ctx, self)
        self.host: str = host
        self.port: int = self._httpd.server_address[1]
        self.url: str = f"https://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "FakeKubeAPIServer":
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                name=f"fake-kube-apiserver:{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "FakeKubeAPIServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The env vars a pod would have for this server."""
        return {"KUBERNETES_SERVICE_HOST": self.host, "KUBERNETES_SERVICE_PORT": str(self.port)}

    # ---------------------------------------------------------------- knobs

    @property
    def token(self) -> str:
        return self._token

    @property
    def configmap_data(self) -> dict[str, str] | None:
        with self._lock:
            return None if self._configmap_data is None else dict(self._configmap_data)

    @configmap_data.setter
    def configmap_data(self, value: dict[str, str] | None) -> None:
        if value is not None:
            if not isinstance(value, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                raise TypeError("configmap_data must be a dict of str to str (ConfigMap .data)")
            value = dict(value)
        with self._lock:
            self._configmap_data = value
            self._resource_version += 1

    @property
    def configmap_status(self) -> int:
        with self._lock:
            return self._configmap_status

    @configmap_status.setter
    def configmap_status(self, value: int) -> None:
        if value not in _CONFIGMAP_STATUSES:
            raise ValueError(f"configmap_status must be one of {sorted(_CONFIGMAP_STATUSES)}")
        with self._lock:
            self._configmap_status = value

    @property
    def sar_decider(self) -> Callable[[dict], dict]:
        with self._lock:
            return self._sar_decider

    @sar_decider.setter
    def sar_decider(self, value: Callable[[dict], dict] | None) -> None:
        with self._lock:
            self._sar_decider = value or allow_all

    @property
    def sar_http_status(self) -> int:
        with self._lock:
            return self._sar_http_status

    @sar_http_status.setter
    def sar_http_status(self, value: int) -> None:
        if value not in _SAR_HTTP_STATUSES:
            raise ValueError(f"sar_http_status must be one of {sorted(_SAR_HTTP_STATUSES)}")
        with self._lock:
            self._sar_http_status = value

    @property
    def sar_null_creation_timestamp(self) -> bool:
        with self._lock:
            return self._sar_null_creation_timestamp

    @sar_null_creation_timestamp.setter
    def sar_null_creation_timestamp(self, value: bool) -> None:
        with self._lock:
            self._sar_null_creation_timestamp = bool(value)

    # ---------------------------------------------------------------- request log

    @property
    def requests(self) -> list[dict]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def wait_for(self, predicate: Callable[[list[dict]], bool], timeout: float) -> bool:
        """Block until ``predicate(requests_snapshot)`` is true; the condition is
        notified on every request.  Returns False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(list(self._requests)), timeout)

    def _record(self, entry: dict) -> None:
        with self._cond:
            self._requests.append(entry)
            self._cond.notify_all()

    # ---------------------------------------------------------------- behaviour

    def _respond(self, method: str, target: str, headers: _Headers, raw: bytes,
                 parsed: Any) -> tuple[int, dict[str, str], dict]:
        """Compute (status code, extra headers, JSON payload) for one request."""
        nosniff = {"X-Content-Type-Options": "nosniff"}
        # 1. Authentication (Go's bearer token authenticator: "Bearer <token>",
        #    scheme case-insensitive).
        auth = (headers.get("Authorization") or "").strip()
        parts = auth.split(" ")
        if len(parts) < 2 or parts[0].lower() != "bearer" or parts[1] != self._token:
            return 401, nosniff, status_object(401, "Unauthorized")

        path = urllib.parse.urlsplit(target).path
        user = self._service_account_user
        if path == CONFIGMAP_PATH:
            if method != "GET":
                return 405, {}, status_object(
                    405, "the server does not allow this method on the requested resource", details={})
            return self._configmap_response(user, nosniff)
        if path == SAR_PATH:
            if method != "POST":
                return 405, {}, status_object(
                    405, "the server does not allow this method on the requested resource", details={})
            return self._sar_response(headers, raw, parsed, user, nosniff)
        return 404, {}, status_object(404, "the server could not find the requested resource", details={})

    def _configmap_response(self, user: str, nosniff: dict) -> tuple[int, dict[str, str], dict]:
        with self._lock:
            status = self._configmap_status
            data = None if self._configmap_data is None else dict(self._configmap_data)
            rv = str(self._resource_version)
        details = {"name": CONFIGMAP_NAME, "kind": "configmaps"}
        if status == 200 and data is None:
            status = 404
        if status == 200:
            return 200, {}, {
                "kind": "ConfigMap",
                "apiVersion": "v1",
                "metadata": {
                    "name": CONFIGMAP_NAME,
                    "namespace": CONFIGMAP_NAMESPACE,
                    "uid": self._cm_uid,
                    "resourceVersion": rv,
                    "creationTimestamp": self._cm_created,
                },
                "data": data,
            }
        if status == 403:
            return 403, nosniff, status_object(
                403,
                f'configmaps "{CONFIGMAP_NAME}" is forbidden: User "{user}" cannot get resource '
                f'"configmaps" in API group "" in the namespace "{CONFIGMAP_NAMESPACE}"',
                details=details)
        if status == 404:
            return 404, {}, status_object(404, f'configmaps "{CONFIGMAP_NAME}" not found', details=details)
        if status == 401:
            return 401, nosniff, status_object(401, "Unauthorized")
        if status == 503:
            return 503, {"Retry-After": "1"}, status_object(503, "apiserver is shutting down")
        cause = "etcdserver: request timed out"
        return 500, {}, status_object(500, f"Internal error occurred: {cause}",
                                      details={"causes": [{"message": cause}]})

    def _sar_response(self, headers: _Headers, raw: bytes, parsed: Any, user: str,
                      nosniff: dict) -> tuple[int, dict[str, str], dict]:
        with self._lock:
            http_status = self._sar_http_status
            decider = self._sar_decider
            null_ts = self._sar_null_creation_timestamp
        # Authorization of the caller itself (system:auth-delegator) comes first.
        if http_status == 403:
            return 403, nosniff, status_object(
                403,
                f'subjectaccessreviews.authorization.k8s.io is forbidden: User "{user}" cannot create '
                f'resource "subjectaccessreviews" in API group "authorization.k8s.io" at the cluster scope',
                details={"group": "authorization.k8s.io", "kind": "subjectaccessreviews"})
        if http_status == 401:
            return 401, nosniff, status_object(401, "Unauthorized")
        if http_status == 503:
            return 503, {"Retry-After": "1"}, status_object(503, "apiserver is shutting down")
        if http_status == 500:
            cause = "etcdserver: request timed out"
            return 500, {}, status_object(500, f"Internal error occurred: {cause}",
                                          details={"causes": [{"message": cause}]})

        media = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if media != "application/json":
            return 415, {}, status_object(
                415,
                "the body of the request was in an unknown format - accepted media types include: "
                "application/json, application/yaml, application/vnd.kubernetes.protobuf")
        if not isinstance(parsed, dict):
            what = "empty body" if not raw else "body is not a JSON object"
            return 400, {}, status_object(400, f"couldn't get version/kind; json parse error: {what}")
        api_version, kind = parsed.get("apiVersion"), parsed.get("kind")
        if api_version != SAR_API_VERSION:
            return 400, {}, status_object(
                400, f"the API version in the data ({api_version or ''}) does not match the expected "
                     f"API version ({SAR_API_VERSION})")
        if kind != SAR_KIND:
            return 400, {}, status_object(
                400, f"the kind in the data ({kind or ''}) does not match the expected kind ({SAR_KIND})")
        causes = _validate_sar(parsed)
        if causes:
            msgs = [f"{c['field']}: {c['message']}" for c in causes]
            joined = msgs[0] if len(msgs) == 1 else "[" + ", ".join(msgs) + "]"
            return 422, {}, status_object(
                422, f'{SAR_KIND}.authorization.k8s.io "" is invalid: {joined}',
                details={"group": "authorization.k8s.io", "kind": SAR_KIND, "causes": causes})

        spec = parsed.get("spec") or {}
        try:
            sar_status = _normalise_sar_status(decider(copy.deepcopy(spec)))
        except Exception as exc:  # the decider may raise to simulate an authorizer error
            cause = str(exc) or type(exc).__name__
            return 500, {}, status_object(500, f"Internal error occurred: {cause}",
                                          details={"causes": [{"message": cause}]})
        return 201, {}, {
            "kind": SAR_KIND,
            "apiVersion": SAR_API_VERSION,
            "metadata": {"creationTimestamp": None} if null_ts else {},
            "spec": spec,
            "status": sar_status,
        }


# --------------------------------------------------------------------------- SA dir


def write_service_account_dir(directory: str | os.PathLike, *, token: str,
                              ca_pem: str | bytes, namespace: str = "default") -> str:
    """Write ``token``, ``ca.crt`` and ``namespace`` into ``directory`` (created
    if needed), like a pod's ``/var/run/secrets/kubernetes.io/serviceaccount``
    (no trailing newlines on token/namespace, as the kubelet writes them).
    Returns the directory path as a str."""
    path = os.fspath(directory)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "token"), "w", encoding="utf-8") as fh:
        fh.write(token)
    with open(os.path.join(path, "ca.crt"), "wb") as fh:
        fh.write(ca_pem.encode("ascii") if isinstance(ca_pem, str) else ca_pem)
    with open(os.path.join(path, "namespace"), "w", encoding="utf-8") as fh:
        fh.write(namespace)
    return path
