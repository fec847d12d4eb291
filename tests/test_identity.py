"""Request identity: front-proxy and client certificates, in-cluster configuration, delegated authorization.

CAs (trustme): the serving CA (conftest `certs`), a front-proxy CA whose client certificate has
CN front-proxy-client (as kubeadm's), a client CA for direct callers, and an unknown CA.
The in-cluster tests use tests/fake_apiserver.py, a test double of kube-apiserver (no
kube-apiserver can run here) that serves the authentication ConfigMap, SubjectAccessReviews and
metav1.Status errors the way kube-apiserver does (its module docstring says exactly what it imitates).
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import socket
import ssl
import threading
import time

import pytest

import reqapi
from conftest import GV, RULES, Kubectl, client_ca, client_cert, wait_until, write_rules
from fake_apiserver import FakeKubeAPIServer, write_service_account_dir

OBJECT = f"{GV}/namespaces/default/requests/web"


@pytest.fixture()
def pki(tmp_path):
    """CAs and client certificates for one test."""
    directory = tmp_path / "pki"
    front_proxy, front_proxy_file = client_ca(directory, "front-proxy")
    clients, clients_file = client_ca(directory, "clients")
    unknown, _ = client_ca(directory, "unknown")

    class PKI:
        front_proxy_ca_file = front_proxy_file
        client_ca_file = clients_file
        front_proxy_ca = front_proxy
        client_ca = clients
        proxy = client_cert(front_proxy, directory, "front-proxy-client")
        proxy_wrong_name = client_cert(front_proxy, directory, "someone-else")
        bob = client_cert(clients, directory, "bob", ("devs",))
        stranger = client_cert(unknown, directory, "mallory")
    return PKI


@pytest.fixture()
def secured(start_server, pki):
    return start_server("--requestheader-client-ca-file", str(pki.front_proxy_ca_file),
                        "--requestheader-allowed-names", "front-proxy-client",
                        "--client-ca-file", str(pki.client_ca_file), "--log-format", "json")


def request_logs(server) -> list:
    lines = []
    for line in server.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("msg") == "request":
            lines.append(record)
    return lines


def logged(server, path: str) -> dict:
    records = wait_until(lambda: [r for r in request_logs(server) if r["path"] == path])
    assert records, server.log()
    return records[-1]


# The pure authenticator

FP_ANCHOR, CLIENT_ANCHOR = b"front-proxy-ca", b"client-ca"
CONFIG = reqapi.AuthConfig(source="test", requestheader_ca="x", allowed_names=("front-proxy-client",),
                           client_ca="y")
ANCHORS = (frozenset([FP_ANCHOR]), frozenset([CLIENT_ANCHOR]))


def test_authenticate_front_proxy_user_groups_and_extra():
    peer = reqapi.PeerCertificate(FP_ANCHOR, "front-proxy-client", ())
    identity = reqapi.authenticate(CONFIG, peer, [
        ("x-remote-user", "alice"), ("x-remote-group", "dev"), ("x-remote-group", "ops"),
        ("x-remote-extra-scopes", "a"), ("x-remote-extra-scopes", "b"),
        ("x-remote-extra-authentication.kubernetes.io%2fcredential-id", "X509SHA256=ab")], *ANCHORS)
    assert identity.user == "alice" and identity.method == "front-proxy"
    assert identity.groups == ("dev", "ops", "system:authenticated")
    assert dict(identity.extra) == {"scopes": ("a", "b"),
                                    "authentication.kubernetes.io/credential-id": ("X509SHA256=ab",)}


@pytest.mark.parametrize("user,groups,expected", [
    ("system:anonymous", ["system:unauthenticated"], ("system:unauthenticated",)),
    ("system:anonymous", [], ()),
    ("alice", ["system:unauthenticated"], ("system:unauthenticated",)),
    ("alice", ["system:authenticated", "dev"], ("system:authenticated", "dev")),
    ("alice", ["dev"], ("dev", "system:authenticated")),
])
def test_system_authenticated_is_added_as_kube_apiservers_group_adder_does(user, groups, expected):
    peer = reqapi.PeerCertificate(FP_ANCHOR, "front-proxy-client", ())
    headers = [("x-remote-user", user)] + [("x-remote-group", group) for group in groups]
    assert reqapi.authenticate(CONFIG, peer, headers, *ANCHORS).groups == expected


def test_authenticate_refuses_front_proxy_names_not_allowed_and_missing_user():
    wrong = reqapi.PeerCertificate(FP_ANCHOR, "intruder", ())
    failure = reqapi.authenticate(CONFIG, wrong, [("x-remote-user", "admin")], *ANCHORS)
    assert isinstance(failure, reqapi.AuthFailure) and "not in --requestheader-allowed-names" in failure.message
    right = reqapi.PeerCertificate(FP_ANCHOR, "front-proxy-client", ())
    failure = reqapi.authenticate(CONFIG, right, [], *ANCHORS)
    assert isinstance(failure, reqapi.AuthFailure) and "without a user header" in failure.message


def test_authenticate_client_certificate_ignores_identity_headers():
    peer = reqapi.PeerCertificate(CLIENT_ANCHOR, "bob", ("devs", "ops"))
    identity = reqapi.authenticate(CONFIG, peer, [("x-remote-user", "admin"), ("x-remote-group", "system:masters")],
                                   *ANCHORS)
    assert (identity.user, identity.groups, identity.method) == ("bob", ("devs", "ops", "system:authenticated"),
                                                                  "client-cert")


def test_authenticate_without_certificate_or_with_unknown_anchor_fails_when_configured():
    for peer in (None, reqapi.PeerCertificate(b"other", "x", ())):
        failure = reqapi.authenticate(CONFIG, peer, [("x-remote-user", "admin")], *ANCHORS)
        assert isinstance(failure, reqapi.AuthFailure)
        assert "did not come through kube-apiserver" in failure.message


def test_authentication_off_is_anonymous_and_ignores_headers():
    identity = reqapi.authenticate(reqapi.AuthConfig(), None, [("x-remote-user", "admin")])
    assert identity == reqapi.ANONYMOUS


def test_configmap_parsing_follows_k8s_apiserver():
    config = reqapi.auth_config_from_configmap({
        "requestheader-client-ca-file": PEM, "requestheader-allowed-names": '["front-proxy-client"]',
        "requestheader-username-headers": '["X-Remote-User"]', "requestheader-group-headers": '["X-Remote-Group"]',
        "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]', "client-ca-file": PEM})
    assert config.allowed_names == ("front-proxy-client",)
    assert config.username_headers == ("x-remote-user",) and config.extra_prefixes == ("x-remote-extra-",)
    with pytest.raises(ValueError, match="JSON array"):
        reqapi.auth_config_from_configmap({"requestheader-client-ca-file": PEM,
                                           "requestheader-allowed-names": "front-proxy-client"})
    with pytest.raises(ValueError, match="aggregation layer is not configured"):
        reqapi.auth_config_from_configmap({})


def test_forbidden_message_in_kube_apiserver_wording():
    alice = reqapi.Identity("alice")
    assert reqapi.forbidden_message(alice, "get", "default", "x", f"{GV}/namespaces/default/requests/x",
                                    True) == (
        'requests.k8s.wujiuye.com "x" is forbidden: User "alice" cannot get resource "requests" in API group '
        '"k8s.wujiuye.com" in the namespace "default"')
    assert reqapi.forbidden_message(alice, "list", "", "", f"{GV}/requests", True).endswith("at the cluster scope")
    assert reqapi.forbidden_message(reqapi.Identity("<x>"), "get", "", "", "/apis", False) == (
        'forbidden: User "&lt;x&gt;" cannot get path "/apis"')


# Against the running server

def test_no_certificate_is_401_on_api_paths_and_200_on_health(secured):
    for path in (OBJECT, f"{GV}/requests", "/apis", GV, "/openapi/v3", "/version"):
        answer = secured.get(path)
        assert answer.status == 401, (path, answer)
        body = answer.json()
        assert (body["kind"], body["reason"], body["code"]) == ("Status", "Unauthorized", 401)
        assert "did not come through kube-apiserver" in body["message"]
        assert "--requestheader-client-ca-file" in body["message"]
    for path in ("/healthz", "/livez", "/readyz", "/metrics"):
        assert secured.get(path).status == 200, path


def test_forged_remote_user_without_certificate_is_401(secured):
    answer = secured.get(OBJECT, {"X-Remote-User": "admin", "X-Remote-Group": "system:masters"})
    assert answer.status == 401


def test_front_proxy_identity_reaches_the_log(secured, pki):
    path = f"{GV}/namespaces/default/requests/from-proxy"
    answer = secured.get(path, {"X-Remote-User": "alice", "X-Remote-Group": "dev",
                                "X-Remote-Extra-Scopes": "read"}, client_cert=pki.proxy)
    assert answer.status == 200 and answer.json()["metadata"]["name"] == "from-proxy"
    record = logged(secured, path)
    assert record["user"] == "alice" and record["auth"] == "front-proxy"
    assert record["groups"] == ["dev", "system:authenticated"]
    assert record["extra"] == {"scopes": ["read"]}


def test_repeated_group_headers_are_all_groups(secured, pki):
    # http.client cannot repeat a header; write the request by hand.
    context = secured.certs.client_context(pki.proxy)
    path = f"{GV}/namespaces/default/requests/groups"
    with socket.create_connection(("127.0.0.1", secured.port)) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Remote-User: carol\r\nX-Remote-Group: a\r\n"
                        f"X-Remote-Group: b\r\nConnection: close\r\n\r\n".encode())
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
    assert response.startswith(b"HTTP/1.1 200")
    assert logged(secured, path)["groups"] == ["a", "b", "system:authenticated"]


def test_kept_answers_are_told_apart_by_caller_and_certificate(secured, pki):
    # The transport keeps the answer to a head asked again within the second (AnswerMemo): the same
    # head from another caller, without a user, or over another certificate is still its own request.
    from test_transport import Raw
    path = f"{GV}/namespaces/default/requests/kept"

    def head(user, audit_id):
        user_line = f"X-Remote-User: {user}\r\n" if user else ""
        return f"GET {path} HTTP/1.1\r\nHost: x\r\n{user_line}Audit-Id: {audit_id}\r\n\r\n"

    def exchange(client_cert, heads):
        with Raw(secured, client_cert=client_cert) as conn:
            conn.send("".join(heads).encode())
            return [conn.response() for _ in heads]

    through_proxy = exchange(pki.proxy, [head("alice", "a-1"), head("bob", "b-1"), head("alice", "a-2"),
                                         head(None, "n-1"), head("alice", "a-3")])
    assert [answer.code for answer in through_proxy] == [200, 200, 200, 401, 200]
    assert [answer.headers["audit-id"] for answer in through_proxy] == ["a-1", "b-1", "a-2", "n-1", "a-3"]
    assert [answer.code for answer in exchange(None, [head("alice", "a-4"), head("alice", "a-5")])] == [401, 401]
    assert [answer.code for answer in exchange(pki.bob, [head("alice", "c-1"), head("alice", "c-2")])] == [200, 200]
    records = wait_until(lambda: (lambda found: found if len(found) == 9 else None)(
        {record.get("audit_id"): record for record in request_logs(secured) if record["path"] == path}))
    assert records, request_logs(secured)
    users = {audit_id: (record["status"], record["user"], record["auth"]) for audit_id, record in records.items()}
    assert users == {"a-1": (200, "alice", "front-proxy"), "b-1": (200, "bob", "front-proxy"),
                     "a-2": (200, "alice", "front-proxy"), "n-1": (401, "system:anonymous", "none"),
                     "a-3": (200, "alice", "front-proxy"), "a-4": (401, "system:anonymous", "none"),
                     "a-5": (401, "system:anonymous", "none"), "c-1": (200, "bob", "client-cert"),
                     "c-2": (200, "bob", "client-cert")}, users


def test_front_proxy_certificate_without_user_header_is_401(secured, pki):
    answer = secured.get(OBJECT, client_cert=pki.proxy)
    assert answer.status == 401 and "without a user header" in answer.json()["message"]


def test_front_proxy_certificate_with_a_name_not_allowed_is_401(secured, pki):
    answer = secured.get(OBJECT, {"X-Remote-User": "alice"}, client_cert=pki.proxy_wrong_name)
    assert answer.status == 401
    assert "someone-else" in answer.json()["message"] and "allowed-names" in answer.json()["message"]


def test_client_ca_user_is_cn_with_o_groups_and_headers_ignored(secured, pki):
    path = f"{GV}/namespaces/default/requests/direct"
    answer = secured.get(path, {"X-Remote-User": "admin"}, client_cert=pki.bob)
    assert answer.status == 200
    record = logged(secured, path)
    assert (record["user"], record["auth"], record["groups"]) == ("bob", "client-cert", ["devs", "system:authenticated"])


def test_unknown_ca_is_refused_and_the_next_client_is_served_at_once(secured, pki):
    try:
        answer = secured.get(OBJECT, client_cert=pki.stranger)
        assert answer.status == 401
    except (ssl.SSLError, ConnectionError, OSError):
        pass                                 # the handshake was refused: also acceptable
    started = time.perf_counter()
    assert secured.get(OBJECT, {"X-Remote-User": "alice"}, client_cert=pki.proxy).status == 200
    assert time.perf_counter() - started < 1.0
    secured.wait_for_log("not signed by a CA reqapi trusts")


def test_kubectl_with_a_client_certificate(secured, pki, tmp_path):
    kubectl = Kubectl(secured, tmp_path / "with-cert", client_cert=pki.bob)
    output = kubectl.run("get", "requests", "web", "-n", "default").stdout
    assert output.split("\n")[1].split()[:4] == ["web", "100m", "100Mi", "default"]
    refused = Kubectl(secured, tmp_path / "without").run("get", "requests", "web", "-n", "default", check=False)
    assert refused.returncode == 1
    assert "You must be logged in to the server" in refused.stderr


def test_readyz_verbose_names_the_authentication_source_to_callers_who_authenticated(secured, pki):
    text = secured.get("/readyz?verbose", client_cert=pki.bob).text
    assert "authentication: flags" in text and "authentication is off" not in text
    proxied = secured.get("/readyz?verbose", {"X-Remote-User": "alice"}, client_cert=pki.proxy).text
    assert "authentication: flags" in proxied


def test_health_reasons_are_withheld_from_strangers(start_server, pki, tmp_path):
    # A stranger (a probe, anyone who can reach the port) learns the status, never the reason:
    # the rules path and the text of a refused rules file were shown to anyone before.
    rules = write_rules(tmp_path / "secret-rules.json", RULES)
    server = start_server("--rules", str(rules), "--client-ca-file", str(pki.client_ca_file),
                          "--reload-interval", "1h")
    write_rules(rules, {**RULES, "defaults": {"cpu": "not-a-quantity", "memory": "1Gi"}})
    server.signal(signal.SIGHUP)
    server.wait_for_log(r"rules refused")
    stranger = server.get("/readyz?verbose")
    assert stranger.status == 200 and "secret-rules" not in stranger.text and "refused" not in stranger.text
    known = server.get("/readyz?verbose", client_cert=pki.bob)
    assert known.status == 200 and "the newest rules file was refused" in known.text
    assert "secret-rules.json" in known.text


def test_bad_ca_file_is_refused_at_start(start_server, tmp_path, certs):
    bad = tmp_path / "bad-ca.pem"
    bad.write_text("not a certificate\n")
    from conftest import Server
    server = Server(certs, tmp_path / "bad", ["--requestheader-client-ca-file", str(bad)])
    with pytest.raises(AssertionError, match="exited with 2"):
        server.start()
    assert f"--requestheader-client-ca-file {bad}: holds no PEM certificate" in server.log()


# In a pod: the ConfigMap from kube-apiserver (a test double) and SubjectAccessReviews

PEM = ""      # filled by the fixture below for the parsing test


@pytest.fixture(autouse=True, scope="module")
def _pem():
    global PEM
    import trustme
    PEM = trustme.CA().cert_pem.bytes().decode()


def fake_token(namespace: str = "default", name: str = "requests-apiserver") -> str:
    def part(document):
        return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")
    return f"{part({'alg': 'RS256'})}.{part({'sub': f'system:serviceaccount:{namespace}:{name}'})}.signature"


@pytest.fixture()
def cluster(tmp_path, pki):
    """A kube-apiserver double serving extension-apiserver-authentication, and a pod's SA dir."""
    import trustme
    api_ca = trustme.CA()
    leaf = api_ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "api.pem", tmp_path / "api-key.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    token = fake_token()
    data = {
        "client-ca-file": pki.client_ca_file.read_text(),
        "requestheader-client-ca-file": pki.front_proxy_ca_file.read_text(),
        "requestheader-allowed-names": '["front-proxy-client"]',
        "requestheader-username-headers": '["X-Remote-User"]',
        "requestheader-group-headers": '["X-Remote-Group"]',
        "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]',
        "requestheader-uid-headers": "[]",
    }
    fake = FakeKubeAPIServer(cert_file=str(cert), key_file=str(key), token=token, configmap_data=data).start()
    sa_dir = tmp_path / "serviceaccount"
    write_service_account_dir(sa_dir, token=token, ca_pem=api_ca.cert_pem.bytes().decode())
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(fake.port)}
    yield fake, ["--service-account-dir", str(sa_dir), "--authentication-refresh", "1s"], env
    fake.stop()


# Reading the ConfigMap from a real kube-apiserver, staying not ready without the RoleBinding and
# recovering with it, and RBAC answering SubjectAccessReviews are proven against the real thing in
# test_controlplane.py. The double stays for what a real kube-apiserver cannot be made to do on
# demand: answer 403 or 500 after a good read, and decide reviews with a reason of its own while
# every review it receives is counted.

def test_a_configmap_that_turns_forbidden_or_fails_keeps_the_last_configuration(start_server, cluster, pki):
    fake, args, env = cluster
    server = start_server(*args, env=env)
    assert wait_until(lambda: server.get("/readyz").status == 200)
    assert server.get(OBJECT, {"X-Remote-User": "alice"}, client_cert=pki.proxy).status == 200
    for status in (403, 500):
        fake.configmap_status = status
        fake.clear_requests()
        assert fake.wait_for(lambda seen: any("extension-apiserver-authentication" in r["path"] for r in seen), 10)
        server.wait_for_log(rf"could not refresh the authentication configuration; the last one keeps serving"
                            rf".*\({status} ")
        assert server.get("/readyz").status == 200
        assert server.get(OBJECT, {"X-Remote-User": "alice"}, client_cert=pki.proxy).status == 200
        assert server.get(OBJECT, {"X-Remote-User": "alice"}).status == 401
    # Back to 200 with a change: the new configuration is taken (the proxy's CN is no longer allowed).
    data = fake.configmap_data
    data["requestheader-allowed-names"] = '["someone-else"]'
    fake.configmap_data = data
    fake.configmap_status = 200
    assert wait_until(lambda: server.get(OBJECT, {"X-Remote-User": "alice"}, client_cert=pki.proxy).status == 401,
                      timeout=15), server.log()[-2000:]


def test_delegated_authorization_with_subject_access_reviews(start_server, cluster, pki):
    fake, args, env = cluster

    def decide(spec):
        if spec["user"] == "mallory":
            return {"allowed": False, "denied": True, "reason": "no role for mallory"}
        return {"allowed": True}
    fake.sar_decider = decide
    server = start_server(*args, "--authorization-mode", "Delegated", env=env)
    assert wait_until(lambda: server.get("/readyz").status == 200)
    fake.clear_requests()
    assert server.get(OBJECT, {"X-Remote-User": "alice", "X-Remote-Group": "dev"}, client_cert=pki.proxy).status == 200
    reviews = [r for r in fake.requests if r["path"].endswith("/subjectaccessreviews")]
    assert len(reviews) == 1
    spec = reviews[0]["body"]["spec"]
    assert spec["resourceAttributes"] == {"verb": "get", "group": "k8s.wujiuye.com", "version": "v1beta1",
                                          "resource": "requests", "namespace": "default", "name": "web"}
    assert spec["user"] == "alice" and spec["groups"] == ["dev", "system:authenticated"]
    # Cached: the same request again makes no new review.
    assert server.get(OBJECT, {"X-Remote-User": "alice", "X-Remote-Group": "dev"}, client_cert=pki.proxy).status == 200
    assert len([r for r in fake.requests if r["path"].endswith("/subjectaccessreviews")]) == 1
    denied = server.get(OBJECT, {"X-Remote-User": "mallory"}, client_cert=pki.proxy)
    assert denied.status == 403
    body = denied.json()
    assert body["reason"] == "Forbidden" and body["details"] == {"name": "web", "group": "k8s.wujiuye.com",
                                                                 "kind": "requests"}
    assert body["message"] == ('requests.k8s.wujiuye.com "web" is forbidden: User "mallory" cannot get resource '
                               '"requests" in API group "k8s.wujiuye.com" in the namespace "default": '
                               'no role for mallory')
    server.wait_for_log(r"GET /apis/k8s\.wujiuye\.com/v1beta1/namespaces/default/requests/web 403 \S+ "
                        r"user=mallory auth=front-proxy")       # the refusal is logged with who asked
    # system:masters (kube-aggregator's probe) is allowed without a review; health paths need none.
    fake.clear_requests()
    assert server.get(GV, {"X-Remote-User": "system:kube-aggregator", "X-Remote-Group": "system:masters"},
                      client_cert=pki.proxy).status == 200
    assert server.get("/readyz").status == 200
    assert not [r for r in fake.requests if r["path"].endswith("/subjectaccessreviews")]
    listing = server.get(f"{GV}/namespaces/shop/requests", {"X-Remote-User": "mallory"}, client_cert=pki.proxy)
    assert listing.status == 403 and "cannot list resource" in listing.json()["message"]


def test_when_kube_apiserver_stops_answering_reviews_the_probes_still_find_a_slot(start_server, cluster, pki):
    """Every slot holds a request waiting for a SubjectAccessReview that kube-apiserver does not
    answer.  At most max_busy wait (8 in reviews, the rest queued); the others are answered 429
    with Retry-After at once, and /livez is answered.  (All waited, queued 10 s a review deep,
    and every new connection, the kubelet's probes too, was closed at once.)  The double stands
    for a kube-apiserver that hangs, which the real one cannot be made to do."""
    fake, args, env = cluster
    release = threading.Event()
    fake.sar_decider = lambda spec: (release.wait(30), {"allowed": True})[1]
    server = start_server(*args, "--authorization-mode", "Delegated", "--max-connections", "24", env=env)
    assert wait_until(lambda: server.get("/readyz").status == 200)
    connections = [server.connection(pki.proxy) for _ in range(24)]
    try:
        for index, connection in enumerate(connections):
            connection.request("GET", OBJECT, headers={"X-Remote-User": f"user-{index}"})
        # The refused ones are answered at once; the waiting ones cannot be until `release`.
        assert wait_until(lambda: server.log().count(" 429 ") >= 10, timeout=10)
        answered = []
        for connection in connections:
            connection.sock.settimeout(0.5)
            try:
                answered.append(connection.getresponse())
            except TimeoutError:
                pass
        # 8 + min(64, 24 // 4) wait; the other 10 were refused at once.
        assert [response.status for response in answered] == [429] * 10
        assert all(response.getheader("Retry-After") == "1" for response in answered)
        assert json.loads(answered[0].read())["reason"] == "TooManyRequests"
        assert server.try_get("/livez") == 200
    finally:
        release.set()
        for connection in connections:
            connection.close()
    server.wait_for_log(r"requests/web 200 .* user=user-")


def test_with_delegated_authorization_403_comes_before_404_and_405(start_server, cluster, pki):
    # kube-apiserver authorizes before it routes: a caller without rights learns nothing about
    # which paths or methods exist. reqapi answered 404/405 without asking before.
    fake, args, env = cluster
    fake.sar_decider = lambda spec: ({"allowed": True} if spec["user"] == "alice" and
                                     spec.get("resourceAttributes", {}).get("verb") == "get"
                                     else {"allowed": False})
    server = start_server(*args, "--authorization-mode", "Delegated", env=env)
    assert wait_until(lambda: server.get("/readyz").status == 200)
    as_mallory, as_alice = {"X-Remote-User": "mallory"}, {"X-Remote-User": "alice"}
    assert server.get("/no/such/path", as_mallory, client_cert=pki.proxy).status == 403
    denied = server.get(OBJECT, as_mallory, client_cert=pki.proxy, method="DELETE")
    assert denied.status == 403
    assert denied.json()["message"].startswith('requests.k8s.wujiuye.com "web" is forbidden: User "mallory" '
                                               'cannot delete resource "requests"'), denied.json()
    fake.clear_requests()
    assert server.get(OBJECT, as_alice, client_cert=pki.proxy, method="DELETE").status == 403
    (review,) = [r for r in fake.requests if r["path"].endswith("/subjectaccessreviews")]
    assert review["body"]["spec"]["resourceAttributes"]["verb"] == "delete"
    # Allowed callers still get the honest refusal (a new user: decisions are cached for 10 s).
    fake.sar_decider = lambda spec: {"allowed": True}
    as_carol = {"X-Remote-User": "carol"}
    assert server.get(f"{OBJECT}x/y", as_carol, client_cert=pki.proxy).status == 404
    assert server.get(OBJECT, as_carol, client_cert=pki.proxy, method="DELETE").status == 405


def test_utf_8_identities_and_hundreds_of_groups_reach_the_review_whole(start_server, cluster, pki):
    # kube-apiserver writes identities as UTF-8 and sends one X-Remote-Group line per group.
    fake, args, env = cluster
    server = start_server(*args, "--authorization-mode", "Delegated", env=env)
    assert wait_until(lambda: server.get("/readyz").status == 200)
    fake.clear_requests()
    groups = ["研发-平台组", "Équipe-Ops"] + [f"team-{n:03d}" for n in range(300)]
    connection = server.connection(pki.proxy)
    try:
        connection.putrequest("GET", OBJECT)
        connection.putheader("X-Remote-User", "张三@example.com".encode())
        for group in groups:
            connection.putheader("X-Remote-Group", group.encode())
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 200, response.read()
    finally:
        connection.close()
    reviews = [r for r in fake.requests if r["path"].endswith("/subjectaccessreviews")]
    assert len(reviews) == 1
    spec = reviews[0]["body"]["spec"]
    assert spec["user"] == "张三@example.com" and spec["groups"] == groups + ["system:authenticated"]
    server.wait_for_log("user=张三@example.com auth=front-proxy")


# Regressions found in review

def test_a_resumed_tls_session_keeps_its_identity(secured, pki):
    # A resumed session carries no verified chain; reqapi therefore issues no tickets when client
    # certificates matter, and a reconnecting client is verified again.
    context = secured.certs.client_context(pki.proxy)
    request = f"GET {OBJECT} HTTP/1.1\r\nHost: x\r\nX-Remote-User: alice\r\nConnection: close\r\n\r\n".encode()

    def exchange(session=None):
        with socket.create_connection(("127.0.0.1", secured.port)) as raw:
            with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                tls.sendall(request)
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
                return data, tls.session, tls.session_reused

    first, session, _ = exchange()
    assert first.startswith(b"HTTP/1.1 200")
    second, _, reused = exchange(session)
    assert second.startswith(b"HTTP/1.1 200") and not reused


def test_a_front_proxy_ca_that_is_an_intermediate(start_server, tmp_path):
    import trustme
    root = trustme.CA()
    intermediate = root.create_child_ca()
    ca_file = tmp_path / "front-proxy-intermediate.pem"
    intermediate.cert_pem.write_to_path(str(ca_file))
    proxy = client_cert(intermediate, tmp_path, "front-proxy-client")
    server = start_server("--requestheader-client-ca-file", str(ca_file),
                          "--requestheader-allowed-names", "front-proxy-client")
    assert server.get(OBJECT, {"X-Remote-User": "alice"}, client_cert=proxy).status == 200


def test_a_client_certificate_without_cn_is_not_a_user(secured, pki, tmp_path):
    leaf = pki.client_ca.issue_cert("nocn.client.test", organization_name="system:masters")
    cert, key = tmp_path / "nocn.pem", tmp_path / "nocn-key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    answer = secured.get(OBJECT, client_cert=(cert, key))
    assert answer.status == 401 and "no CN" in answer.json()["message"]


def test_strangers_learn_nothing_about_paths_or_methods(secured):
    for method, path, body in (("GET", "/nonexistent", None), ("GET", "/apis/other/v1", None),
                               ("POST", "/apis", b"{}"), ("DELETE", OBJECT, None)):
        answer = secured.get(path, method=method, body=body)
        assert answer.status == 401, (method, path, answer)


def test_a_refused_ca_reload_keeps_the_old_cas(start_server, pki, tmp_path):
    ca_file = tmp_path / "rotating-front-proxy-ca.pem"
    ca_file.write_bytes(pki.front_proxy_ca_file.read_bytes())
    server = start_server("--requestheader-client-ca-file", str(ca_file), "--reload-interval", "1h")
    assert server.get(OBJECT, {"X-Remote-User": "alice"}, client_cert=pki.proxy).status == 200
    import trustme
    broken = trustme.CA().cert_pem.bytes().decode() + (
        "-----BEGIN CERTIFICATE-----\nTUlJQm9nVXM=\n-----END CERTIFICATE-----\n")
    temporary = tmp_path / "new.pem"
    temporary.write_text(broken)
    os.replace(temporary, ca_file)
    server.signal(signal.SIGHUP)
    server.wait_for_log("TLS files refused")
    assert server.get(OBJECT, {"X-Remote-User": "alice"}, client_cert=pki.proxy).status == 200


def test_while_subject_access_reviews_hang_the_probes_and_other_connections_are_answered(start_server, cluster, pki):
    """The transport answers a request that needs a SubjectAccessReview in a worker thread: a hung
    kube-apiserver holds those requests (and only those), never the event loop.  (The fake API
    server stands in for a hung kube-apiserver here: its decider waits on an event.)"""
    fake, args, env = cluster
    release = threading.Event()
    asked: list = []

    def hung(spec):
        asked.append(spec["user"])
        release.wait(60)
        return {"allowed": True}
    server = start_server(*args, "--authorization-mode", "Delegated", env=env)
    assert wait_until(lambda: server.get("/readyz").status == 200)
    fake.sar_decider = hung
    waiting = 12                                    # more than the transport's workers
    with concurrent.futures.ThreadPoolExecutor(max_workers=waiting) as pool:
        answers = [pool.submit(server.get, f"{GV}/namespaces/n{index}/requests/web",
                               {"X-Remote-User": f"user-{index}"}, pki.proxy, timeout=60) for index in range(waiting)]
        try:
            assert wait_until(lambda: len(asked) >= reqapi.ReqapiServer.WORKERS, timeout=15)
            for path in ("/livez", "/readyz", "/metrics"):
                assert server.get(path, timeout=10).status == 200
            metrics = server.get("/metrics").text
            assert f"\nreqapi_requests_in_flight {waiting}\n" in metrics
            assert not any(answer.done() for answer in answers)
        finally:
            release.set()
        assert [answer.result().status for answer in answers] == [200] * waiting
