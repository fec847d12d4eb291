"""reqapi behind a real kube-apiserver: the aggregation layer, kubectl and RBAC as they really are.

The control plane (etcd, kube-apiserver and kubectl of one Kubernetes release, built from their Go
modules: tests/controlplane/) runs on this machine; reqapi runs as the aggregated API server inside
a network namespace, as it runs in a pod, installed from the real k8s/ manifests with certificates
from the real gen_certs.sh. See tests/controlplane/cluster.py for what runs and what does not.

Where Go, root or the network namespace is missing these tests are skipped with one reason; with
REQAPI_REQUIRE_CONTROLPLANE=1 (set by .ci/run) that skip is a failure instead.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import queue
import re
import signal
import subprocess
import threading
from typing import Any, Iterator, Optional

import pytest
import yaml

from conftest import ROOT, Server, write_rules
from controlplane.cluster import (APISERVICE, GROUP_VERSION, NAMESPACE, POD_PORT, REQUIRE_VARIABLE, SERVICE,
                                  ControlPlane, Installation, NetworkNamespace, ServingCerts, Unavailable, build,
                                  ca_bundle, unavailable_reason, wait_for)

pytestmark = pytest.mark.controlplane

AGGREGATED_DISCOVERY = ("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
                        "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json")


def skip_or_fail(reason: str) -> None:
    if os.environ.get(REQUIRE_VARIABLE):
        pytest.fail(f"the control plane must run here ({REQUIRE_VARIABLE} is set) but cannot: {reason}",
                    pytrace=False)
    pytest.skip(f"control plane unavailable: {reason}")


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory, pytestconfig) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver (+ the network namespace reqapi runs in), for the whole session."""
    reason = unavailable_reason()
    if reason:
        skip_or_fail(reason)
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    try:
        with capture.global_and_fixture_disabled():     # a cold build takes minutes: show progress
            bin_dir = build(lambda line: print(line, flush=True))
        netns = NetworkNamespace()
    except Unavailable as error:
        skip_or_fail(str(error))
    plane = ControlPlane(bin_dir, tmp_path_factory.mktemp("controlplane"), netns.host_address)
    plane.netns = netns
    try:
        plane.start()
        yield plane
    finally:
        plane.stop()
        netns.remove()


@pytest.fixture(scope="session")
def installed(controlplane, tmp_path_factory) -> Iterator[Installation]:
    """reqapi installed from k8s/ with one ready pod ("a") behind the Service, APIService Available."""
    installation = Installation(controlplane, controlplane.netns, tmp_path_factory.mktemp("reqapi"))
    try:
        installation.start_pod("a", controlplane.netns.pod_addresses[0])
        installation.publish({controlplane.netns.pod_addresses[0]: (True, False)})
        installation.wait_available("True")
        yield installation
    finally:
        installation.stop()


@pytest.fixture()
def pod_a(installed) -> Server:
    return installed.pods[installed.netns.pod_addresses[0]]


def discovered(plane: ControlPlane) -> bool:
    """kube-apiserver's merged discovery lists the group (the aggregator fetched it from reqapi)."""
    answer = plane.get("/apis", {"Accept": AGGREGATED_DISCOVERY})
    return answer.status == 200 and any(g["metadata"]["name"] == "k8s.wujiuye.com" for g in answer.json()["items"])


# -- the control plane itself ---------------------------------------------------------------------

def test_the_control_plane_is_the_pinned_release(controlplane):
    pinned = re.search(r"^\tk8s.io/kubernetes (v[0-9.]+)", (ROOT / "tests/controlplane/kubernetes/go.mod").read_text(),
                       re.M).group(1)
    version = controlplane.version()
    assert version["gitVersion"] == pinned and version["minor"] == pinned.split(".")[1]
    client = json.loads(controlplane.kubectl("version", "-o", "json").stdout)
    assert client["clientVersion"]["gitVersion"] == pinned and client["serverVersion"]["gitVersion"] == pinned
    etcd_pin = re.search(r"go.etcd.io/etcd/server/v3 v([0-9.]+)",
                         (ROOT / "tests/controlplane/etcd/go.mod").read_text()).group(1)
    etcd = subprocess.run([str(controlplane.bin_dir / "etcd"), "--version"], capture_output=True, text=True).stdout
    assert f"etcd Version: {etcd_pin}" in etcd


# -- 1. the APIService ----------------------------------------------------------------------------

def test_apiservice_becomes_available(installed):
    condition = installed.wait_available("True")
    assert condition["reason"] == "Passed"
    listing = installed.plane.kubectl("get", "apiservice", APISERVICE).stdout.splitlines()
    assert listing[0].split()[:3] == ["NAME", "SERVICE", "AVAILABLE"]
    assert listing[1].split()[:3] == [APISERVICE, f"{NAMESPACE}/{SERVICE}", "True"]


# -- 2. kubectl through kube-apiserver, with the front-proxy identity --------------------------------

def test_kubectl_api_resources_lists_requests(installed):
    wait_for(lambda: discovered(installed.plane), 60, "the group in kube-apiserver's discovery")
    lines = installed.plane.kubectl("api-resources", "--api-group", "k8s.wujiuye.com").stdout.splitlines()
    assert lines[0].split() == ["NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED", "KIND"]
    assert lines[1].split()[0] == "requests" and lines[1].split()[-3:] == ["k8s.wujiuye.com/v1beta1", "true",
                                                                            "Requests"]


def test_kubectl_get_list_yaml_describe_through_the_aggregator(installed, pod_a):
    plane = installed.plane
    named = {(rule["namespace"], rule["name"]): rule for rule in installed.rules_document["rules"]
             if "*" not in rule.get("namespace", "*") and "*" not in rule.get("name", "*")}
    table = plane.kubectl("get", "requests", "-A").stdout.splitlines()
    assert table[0].split() == ["NAMESPACE", "NAME", "CPU", "MEMORY", "RULE", "AGE"]
    rows = {(row.split()[0], row.split()[1]): row.split() for row in table[1:]}
    assert set(rows) == set(named)
    for key, rule in named.items():
        assert rows[key][4] == rule["id"]

    document = yaml.safe_load(plane.kubectl("get", "request", "checkout", "-n", "shop", "-o", "yaml").stdout)
    assert document["kind"] == "Requests" and document["apiVersion"] == "k8s.wujiuye.com/v1beta1"
    assert document["resources"] == {"cpu": "2", "memory": "3Gi"}
    assert document["metadata"]["annotations"] == {"k8s.wujiuye.com/rule": "checkout"}

    described = plane.kubectl("describe", "requests", "checkout", "-n", "shop").stdout
    assert re.search(r"^Name:\s+checkout$", described, re.M) and re.search(r"^Namespace:\s+shop$", described, re.M)
    assert re.search(r"Cpu:\s+2$", described, re.M) and re.search(r"Memory:\s+3Gi$", described, re.M)

    # The user kube-apiserver authenticated (the admin certificate's CN) reached reqapi through the
    # front-proxy headers, proven by reqapi's own request log.
    pod_a.wait_for_log(r"user=kubernetes-admin auth=front-proxy")


def test_kubectl_explain_uses_the_aggregated_openapi(installed):
    # kube-apiserver downloads reqapi's OpenAPI (v3 root every minute) and serves it merged.
    def explained() -> Optional[str]:
        result = installed.plane.kubectl("explain", "requests.resources", check=False)
        return result.stdout if result.returncode == 0 else None
    text = wait_for(explained, 90, "kubectl explain requests.resources")
    assert "KIND:       Requests" in text and "VERSION:    v1beta1" in text
    assert re.search(r"^\s+cpu\s+<string> -required-", text, re.M)
    assert re.search(r"^\s+memory\s+<string> -required-", text, re.M)
    v2 = installed.plane.get("/openapi/v2", {"Accept": "application/json"}).json()
    assert "io.wujiuye.k8s.v1beta1.Requests" in v2["definitions"] or any(
        name.endswith(".Requests") and "wujiuye" in name for name in v2["definitions"])


def test_get_raw_object_is_reqapis_answer(installed, pod_a):
    path = f"{GROUP_VERSION}/namespaces/shop/requests/checkout"
    through = json.loads(installed.plane.kubectl("get", "--raw", path).stdout)
    direct = pod_a.get(path, client_cert=installed.plane.pki.admin).json()
    assert through == direct


def test_aggregated_discovery_lists_the_group(installed):
    wait_for(lambda: discovered(installed.plane), 60, "the group in kube-apiserver's discovery")
    answer = installed.plane.get("/apis", {"Accept": AGGREGATED_DISCOVERY})
    assert answer.headers["content-type"].startswith("application/json;g=apidiscovery.k8s.io;v=v2")
    group = next(g for g in answer.json()["items"] if g["metadata"]["name"] == "k8s.wujiuye.com")
    version = group["versions"][0]
    assert version["version"] == "v1beta1" and version.get("freshness", "Current") == "Current"
    resource = next(r for r in version["resources"] if r["resource"] == "requests")
    assert resource["responseKind"]["kind"] == "Requests" and resource["scope"] == "Namespaced"
    assert sorted(resource["verbs"]) == ["get", "list", "watch"]


def test_watch_through_kube_apiserver_sees_modified_after_a_rules_reload(installed):
    # -v=6 puts every HTTP request kubectl makes on stderr: a hang names the request that hung.
    watcher = installed.plane.kubectl_process("get", "requests", "checkout", "-n", "shop", "--watch",
                                              "--output-watch-events", "--request-timeout=0", "-v=6")
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in watcher.stdout], daemon=True).start()

    def next_line(timeout: float) -> str:
        try:
            return lines.get(timeout=timeout)
        except queue.Empty:
            watcher.kill()
            raise AssertionError(f"no watch line within {timeout} s; kubectl's stderr:\n{watcher.stderr.read()}\n"
                                 f"{installed.logs()}\n{installed.plane.logs()}")
    changed = json.loads(json.dumps(installed.rules_document))
    try:
        header = next_line(60)
        assert header.split()[:2] == ["EVENT", "NAME"]
        added = next_line(30).split()
        assert added[:4] == ["ADDED", "checkout", "2", "3Gi"]
        for rule in changed["rules"]:
            if rule["id"] == "checkout":
                rule["cpu"] = "3"
        write_rules(installed.rules_file, changed)
        modified = next_line(60).split()
        assert modified[:4] == ["MODIFIED", "checkout", "3", "3Gi"]
    finally:
        write_rules(installed.rules_file, installed.rules_document)
        watcher.kill()
        watcher.wait()
    wait_for(lambda: installed.plane.kubectl("get", "request", "checkout", "-n", "shop", "-o",
                                             "jsonpath={.resources.cpu}").stdout == "2", 30, "the rules restored")


def test_the_python_client_through_kube_apiserver_as_a_deploy_service(installed, deployer):
    """The deploy service's path: the Python client's DynamicClient with a ServiceAccount token
    and the binding from k8s/examples, through kube-apiserver: discovery, get, list, watch."""
    from kubernetes import client
    from kubernetes.dynamic import DynamicClient

    plane = installed.plane
    example = ROOT / "k8s/examples/deploy-service-binding.yaml"
    plane.kubectl("apply", "-f", str(example))
    configuration = client.Configuration()
    configuration.host = plane.url()
    configuration.ssl_ca_cert = str(plane.pki.ca_file)
    configuration.api_key = {"authorization": f"Bearer {deployer['token']}"}
    api_client = client.ApiClient(configuration)
    try:
        dynamic = DynamicClient(api_client, cache_file=str(installed.directory / "python-discovery.json"))
        requests = dynamic.resources.get(api_version="k8s.wujiuye.com/v1beta1", kind="Requests")
        assert sorted(requests.verbs) == ["get", "list", "watch"] and requests.namespaced
        checkout = wait_for(lambda: _get_or_none(requests, "checkout", "shop"), 30, "the binding to take effect")
        assert checkout.resources.cpu == "2" and checkout.resources.memory == "3Gi"
        listed = requests.get(namespace="shop", _request_timeout=10).to_dict()
        assert [item["metadata"]["name"] for item in listed["items"]] == ["checkout"]
        events = []
        for event in requests.watch(namespace="shop", timeout=5):
            events.append((event["type"], event["raw_object"]["metadata"]["name"]))
            break
        assert events == [("ADDED", "checkout")]
    finally:
        api_client.close()
        plane.kubectl("delete", "-f", str(example), "--ignore-not-found")


def _get_or_none(requests: Any, name: str, namespace: str) -> Any:
    from kubernetes.client.exceptions import ApiException
    try:
        return requests.get(name=name, namespace=namespace, _request_timeout=10)
    except ApiException as error:
        if error.status == 403:
            return None
        raise


@pytest.mark.parametrize("value", ["t", "True", ""])
def test_a_watch_spelled_as_go_parses_booleans_is_a_watch_behind_kube_apiserver(installed, value):
    # kube-apiserver decides "watch" (and so its long-running handling) from the first value, true
    # unless "0" or "false"; reqapi must agree or the client gets a list where it asked to watch.
    answer = installed.plane.get(f"{GROUP_VERSION}/namespaces/shop/requests?watch={value}&timeoutSeconds=1")
    assert answer.status == 200
    first = json.loads(answer.body.splitlines()[0])
    assert first["type"] == "ADDED" and first["object"]["metadata"]["name"] == "checkout"


@pytest.mark.parametrize("query", [
    "resourceVersionMatch=Bogus&resourceVersion=1", "resourceVersionMatch=Exact", "resourceVersionMatch=Bogus",
    "resourceVersionMatch=Exact&resourceVersion=0", "resourceVersionMatch=NotOlderThan&resourceVersion=1&continue=x",
    "sendInitialEvents=true", "sendInitialEvents=false"])
def test_list_options_are_refused_as_kube_apiserver_refuses_them_for_its_own_lists(installed, query):
    # kube-apiserver passes an aggregated list's options through unchecked: reqapi checks them, and
    # its 422 must be the one kube-apiserver gives for a list of its own (here, ConfigMaps).
    own = installed.plane.get(f"/api/v1/namespaces/default/configmaps?{query}")
    ours = installed.plane.get(f"{GROUP_VERSION}/namespaces/shop/requests?{query}")
    assert own.status == 422, own.body
    assert (ours.status, ours.json()) == (own.status, own.json())


def test_client_gos_metadata_client_through_kube_apiserver(installed):
    """Metadata informers (and inventory or backup tools built on them) ask any resource for
    PartialObjectMetadata; client-go's metadata client could not decode reqapi's watch events."""
    plane = installed.plane
    result = subprocess.run([str(plane.bin_dir / "metadataclient"), str(plane.admin_kubeconfig), "shop", "checkout"],
                            capture_output=True, text=True, timeout=90)
    steps = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0, (steps, result.stderr)
    # (client-go's decoder clears kind and apiVersion once it has decoded into its own types.)
    get, listed, *watched = steps
    assert get["name"] == "checkout" and get["annotations"] == {"k8s.wujiuye.com/rule": "checkout"}
    assert listed["names"] == ["checkout"]
    # Each event decoded as a *metav1.PartialObjectMetadata (the program says "object" otherwise).
    assert [(event["type"], event.get("name")) for event in watched] == [("ADDED", "checkout")]


def test_a_websocket_watch_through_kube_apiserver(installed):
    """Web consoles watch over WebSocket; kube-apiserver's proxy dials reqapi with the upgrade and
    answers "503 invalid upgrade response" unless reqapi switches protocols."""
    import websocket

    plane = installed.plane
    ws = websocket.create_connection(
        f"wss://127.0.0.1:{plane.port}{GROUP_VERSION}/namespaces/shop/requests?watch=1&timeoutSeconds=2",
        sslopt={"ca_certs": str(plane.pki.ca_file), "certfile": str(plane.pki.admin[0]),
                "keyfile": str(plane.pki.admin[1])},
        subprotocols=["base64.binary.k8s.io"], timeout=30)
    try:
        assert ws.getstatus() == 101 and ws.subprotocol == "base64.binary.k8s.io"
        event = json.loads(ws.recv())
        assert event["type"] == "ADDED" and event["object"]["metadata"]["name"] == "checkout"
        assert event["object"]["resources"] == {"cpu": "2", "memory": "3Gi"}
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and data[:2] == (1000).to_bytes(2, "big")
    finally:
        ws.close()


# -- 3. in-cluster mode: extension-apiserver-authentication from the real kube-apiserver --------------

def test_in_cluster_reads_the_authentication_configmap(installed, pod_a):
    # Pod "a" runs like the Deployment: no CA flags, a ServiceAccount token from the TokenRequest
    # API, RBAC from k8s/. It became ready by reading the ConfigMap kube-apiserver publishes.
    # (Health details are for callers who authenticate: the admin's cluster certificate does.)
    verbose = pod_a.get("/readyz?verbose", client_cert=installed.plane.pki.admin)
    assert verbose.status == 200
    assert "configmap kube-system/extension-apiserver-authentication" in verbose.text
    assert "configmap" not in pod_a.get("/readyz?verbose").text
    path = f"{GROUP_VERSION}/namespaces/shop/requests/checkout"
    refused = pod_a.get(path)                                   # a direct caller, no certificate
    assert refused.status == 401 and refused.json()["reason"] == "Unauthorized"
    forged = pod_a.get(path, {"X-Remote-User": "system:admin", "X-Remote-Group": "system:masters"})
    assert forged.status == 401
    # The front-proxy CA and allowed names came from the ConfigMap: kube-apiserver's proxy
    # certificate is believed, with the user it names.
    proxy = installed.plane.pki.front_proxy_client
    assert pod_a.get(path, {"X-Remote-User": "alice"}, client_cert=proxy).status == 200
    assert pod_a.get(path, client_cert=proxy).status == 401        # no user header
    # The ConfigMap's client-ca-file is the cluster CA: a client certificate of the cluster is a user.
    assert pod_a.get(path, client_cert=installed.plane.pki.admin).status == 200


def test_in_cluster_without_the_rolebinding_stays_not_ready_and_says_the_fix(installed):
    plane = installed.plane
    account = "reqapi-no-reader"
    plane.kubectl("create", "serviceaccount", account, "-n", NAMESPACE)
    address = installed.netns.pod_addresses[3]
    try:
        pod = installed.start_pod("no-reader", address, service_account=account, wait_ready=False)
        fix = (f"kubectl create rolebinding -n kube-system ROLEBINDING_NAME "
               f"--role=extension-apiserver-authentication-reader --serviceaccount={NAMESPACE}:{account}")
        pod.wait_for_log(re.escape(fix), timeout=30)
        ready = pod.get("/readyz?verbose")
        assert ready.status == 503 and fix in ready.text
        answer = pod.get(f"{GROUP_VERSION}/namespaces/shop/requests/checkout", {"X-Remote-User": "alice"},
                         client_cert=plane.pki.front_proxy_client)
        assert answer.status == 503 and answer.json()["reason"] == "ServiceUnavailable"
        # The fix, as printed (with a real name), makes the same process ready.
        plane.kubectl(*fix.replace("ROLEBINDING_NAME", "reqapi-no-reader-auth").split()[1:])
        wait_for(lambda: pod.try_get("/readyz") == 200, 60, "readiness after the RoleBinding",
                 details=lambda: pod.log()[-2000:])
    finally:
        if address in installed.pods:
            installed.stop_pod(address)
        plane.delete("rolebinding", "reqapi-no-reader-auth", "kube-system")
        plane.delete("serviceaccount", account, NAMESPACE)


# -- 4. RBAC: kube-apiserver's, and reqapi's delegated SubjectAccessReviews ---------------------------

@pytest.fixture(scope="session")
def deployer(installed) -> dict[str, Any]:
    """The deploy service's ServiceAccount deploy/deployer (k8s/examples/deploy-service-binding.yaml)."""
    plane = installed.plane
    for namespace in ("deploy", "shop"):
        plane.kubectl("create", "namespace", namespace, check=False)
    plane.kubectl("create", "serviceaccount", "deployer", "-n", "deploy")
    token = plane.token("deploy", "deployer")
    return {"token": token, "kubeconfig": plane.token_kubeconfig("deployer", token),
            "user": "system:serviceaccount:deploy:deployer"}


def test_rbac_forbids_an_unbound_service_account_and_the_example_binding_allows_it(installed, deployer):
    plane = installed.plane
    example = ROOT / "k8s/examples/deploy-service-binding.yaml"
    plane.kubectl("delete", "-f", str(example), "--ignore-not-found")
    denied = plane.kubectl("get", "request", "checkout", "-n", "shop", kubeconfig=deployer["kubeconfig"],
                           check=False)
    assert denied.returncode == 1
    assert denied.stderr.strip() == (
        'Error from server (Forbidden): requests.k8s.wujiuye.com "checkout" is forbidden: User '
        f'"{deployer["user"]}" cannot get resource "requests" in API group "k8s.wujiuye.com" in the namespace "shop"')
    plane.kubectl("apply", "-f", str(example))
    try:
        allowed = wait_for(lambda: (r := plane.kubectl("get", "request", "checkout", "-n", "shop", "-o", "json",
                                                        kubeconfig=deployer["kubeconfig"], check=False))
                           .returncode == 0 and r, 30, "the binding to take effect")
        assert json.loads(allowed.stdout)["resources"] == {"cpu": "2", "memory": "3Gi"}
    finally:
        plane.kubectl("delete", "-f", str(example), "--ignore-not-found")


def test_delegated_authorization_asks_the_real_kube_apiserver(installed, deployer):
    plane = installed.plane
    address = installed.netns.pod_addresses[3]
    plane.kubectl("create", "rolebinding", "reqapi-test-shop-reader", "-n", "shop",
                  "--clusterrole=requests-apiserver:reader", "--serviceaccount=deploy:deployer")
    try:
        pod = installed.start_pod("delegated", address, "--authorization-mode=Delegated")
        proxy = plane.pki.front_proxy_client
        as_deployer = {"X-Remote-User": deployer["user"], "X-Remote-Group": "system:serviceaccounts"}
        # Allowed by the RoleBinding in shop, and by nothing in search: RBAC decides, not reqapi.
        assert pod.get(f"{GROUP_VERSION}/namespaces/shop/requests/checkout", as_deployer,
                       client_cert=proxy).status == 200
        forbidden = pod.get(f"{GROUP_VERSION}/namespaces/search/requests/indexer", as_deployer, client_cert=proxy)
        assert forbidden.status == 403 and forbidden.json()["reason"] == "Forbidden"
        assert forbidden.json()["message"].startswith(
            f'requests.k8s.wujiuye.com "indexer" is forbidden: User "{deployer["user"]}" cannot get resource '
            '"requests" in API group "k8s.wujiuye.com" in the namespace "search"')
        listing = pod.get(f"{GROUP_VERSION}/namespaces/shop/requests", {"X-Remote-User": "mallory"},
                          client_cert=proxy)
        assert listing.status == 403 and "cannot list resource" in listing.json()["message"]
    finally:
        if address in installed.pods:
            installed.stop_pod(address)
        plane.delete("rolebinding", "reqapi-test-shop-reader", "shop")


# -- 6. certificate mistakes as users make them -------------------------------------------------------
# kube-apiserver 1.36 and later verify reqapi's serving certificate in the availability probe too
# (ServerName <service>.<namespace>.svc against spec.caBundle); up to 1.35 the probe skipped TLS
# verification and only proxied calls failed. These tests pin what the pinned release shows.

def patch_ca_bundle(plane: ControlPlane, value: str) -> None:
    plane.kubectl("patch", "apiservice", APISERVICE, "--type=merge", "-p",
                  json.dumps({"spec": {"caBundle": value}}))


def raw_call(plane: ControlPlane) -> subprocess.CompletedProcess:
    return plane.kubectl("get", "--raw", GROUP_VERSION, check=False)


@pytest.fixture()
def restores_the_installation(installed) -> Iterator[Installation]:
    yield installed
    patch_ca_bundle(installed.plane, installed.apiservice["spec"]["caBundle"])
    installed.wait_available("True")


def test_a_ca_bundle_from_another_ca(restores_the_installation, tmp_path):
    installed = restores_the_installation
    other = ServingCerts(tmp_path / "other")
    patch_ca_bundle(installed.plane, ca_bundle(other.ca_file))
    condition = installed.wait_available("False")
    assert condition["reason"] == "FailedDiscoveryCheck"
    assert condition["message"].endswith("tls: failed to verify certificate: x509: certificate signed by "
                                         "unknown authority")
    failed = raw_call(installed.plane)
    assert failed.returncode == 1
    assert failed.stderr.strip() == "Error from server (ServiceUnavailable): the server is currently unable to " \
                                    "handle the request"


def test_the_placeholder_ca_bundle(restores_the_installation):
    """The shipped placeholder is no PEM, so the aggregator cannot even build its TLS transport;
    the availability controller then returns before it writes any condition (its source:
    transport.New fails and sync returns the error), so the APIService never says False."""
    installed = restores_the_installation
    plane = installed.plane
    rendered = plane.kubectl("kustomize", str(ROOT / "k8s")).stdout
    placeholder = re.search(r"caBundle: (\S+)", rendered).group(1)
    # Put back over a working install (e.g. a later `kubectl apply -k k8s/` after a patch):
    # Available stays True with its old "all checks passed" while every call fails with 500.
    patch_ca_bundle(plane, placeholder)
    failed = wait_for(lambda: (r := raw_call(plane)).returncode == 1 and r, 30, "calls to fail")
    assert failed.stderr.strip() == (
        'Error from server (InternalError): an error on the server ("unable to load root certificates: unable to '
        'parse bytes as PEM block") has prevented the request from succeeding')
    condition = plane.apiservice_condition(APISERVICE)
    assert condition["status"] == "True" and condition["message"] == "all checks passed"
    # A fresh install with the placeholder: no Available condition at all (AVAILABLE "Unknown"),
    # and kubectl does not know the resource.
    plane.kubectl("delete", "apiservice", APISERVICE)
    fresh = copy.deepcopy(installed.apiservice)
    fresh["spec"]["caBundle"] = placeholder
    plane.apply([fresh])
    listing = wait_for(lambda: (out := plane.kubectl("get", "apiservice", APISERVICE).stdout.splitlines())
                       and out[1].split()[2] == "Unknown" and out, 30, "AVAILABLE Unknown")
    assert listing[1].split()[:3] == [APISERVICE, f"{NAMESPACE}/{SERVICE}", "Unknown"]
    assert plane.apiservice_condition(APISERVICE) is None
    unknown = plane.kubectl("get", "requests", "-A", check=False)
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == 'error: the server doesn\'t have a resource type "requests"'
    failed = raw_call(plane)
    assert failed.stderr.strip() == ("Error from server (ServiceUnavailable): the server is currently unable to "
                                     "handle the request")


def test_a_serving_certificate_without_the_service_name(installed, tmp_path):
    address = installed.netns.pod_addresses[0]
    # Signed by the caBundle's CA, so only the name is wrong: it names requests-apiserver.default.svc.
    wrong = ServingCerts(tmp_path / "wrong", "--service", "requests-apiserver", ca_from=installed.certs)
    installed.stop_pod(address)
    try:
        installed.start_pod("wrong-name", address, certs=wrong)
        # While the pods were swapped the probe may have found nobody listening ("connection
        # refused"): wait for the condition about this certificate, not for the first False.
        expected = ("tls: failed to verify certificate: x509: certificate is valid for requests-apiserver, "
                    "requests-apiserver.default, requests-apiserver.default.svc, "
                    "requests-apiserver.default.svc.cluster.local, not requests-apiserver-service.default.svc")
        condition = wait_for(lambda: (c := installed.plane.apiservice_condition(APISERVICE)) and
                             c["status"] == "False" and c["message"].endswith(expected) and c,
                             90, "Available=False naming the certificate", interval=0.25, details=installed.logs)
        assert condition["reason"] == "FailedDiscoveryCheck"
    finally:
        installed.stop_pod(address)
        installed.start_pod("a", address)
        installed.wait_available("True")


# -- identities as kube-apiserver forwards them ----------------------------------------------------------

def test_a_user_in_hundreds_of_groups_through_kube_apiserver(installed, pod_a):
    # kube-apiserver's proxy sends one X-Remote-Group line per group (here the admin impersonates
    # a user in 150 groups): reqapi refused more than 100 header lines with 431 before.
    plane = installed.plane
    groups = [f"--as-group=team-{n:03d}" for n in range(150)]
    plane.kubectl("create", "clusterrolebinding", "reqapi-test-team-149", "--clusterrole=requests-apiserver:reader",
                  "--group=team-149")
    try:
        result = plane.kubectl("get", "request", "checkout", "-n", "shop", "-o", "json",
                               "--as=many-groups@example.com", *groups)
    finally:
        plane.delete("clusterrolebinding", "reqapi-test-team-149")
    assert json.loads(result.stdout)["resources"] == {"cpu": "2", "memory": "3Gi"}
    pod_a.wait_for_log("user=many-groups@example.com auth=front-proxy")


def test_a_utf_8_user_is_authorized_by_the_real_rbac(installed):
    """Delegated authorization for 张三@example.com: reqapi's SubjectAccessReview must name the
    user as kube-apiserver wrote it (UTF-8), or RBAC denies it (the header was read as Latin-1)."""
    plane = installed.plane
    address = installed.netns.pod_addresses[3]
    plane.kubectl("create", "namespace", "shop", check=False)
    plane.kubectl("create", "rolebinding", "reqapi-test-utf8", "-n", "shop",
                  "--clusterrole=requests-apiserver:reader", "--user=张三@example.com")
    try:
        pod = installed.start_pod("utf8", address, "--authorization-mode=Delegated")
        connection = pod.connection(plane.pki.front_proxy_client)
        try:
            connection.putrequest("GET", f"{GROUP_VERSION}/namespaces/shop/requests/checkout")
            connection.putheader("X-Remote-User", "张三@example.com".encode())
            connection.putheader("X-Remote-Group", "研发-平台组".encode())
            connection.endheaders()
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        assert response.status == 200, body
        assert json.loads(body)["resources"] == {"cpu": "2", "memory": "3Gi"}
        pod.wait_for_log("user=张三@example.com auth=front-proxy")
    finally:
        if address in installed.pods:
            installed.stop_pod(address)
        plane.delete("rolebinding", "reqapi-test-utf8", "shop")


# -- 5. availability follows reality; a rolling restart loses nothing ----------------------------------

def test_availability_follows_reqapi(installed):
    plane, address = installed.plane, installed.netns.pod_addresses[0]
    installed.stop_pod(address)            # the container died; the kubelet has not noticed yet
    try:
        condition = installed.wait_available("False")
        assert condition["reason"] == "FailedDiscoveryCheck"
        assert condition["message"] == (
            f"failing or missing response from https://{address}:{POD_PORT}{GROUP_VERSION}: Get "
            f'"https://{address}:{POD_PORT}{GROUP_VERSION}": dial tcp {address}:{POD_PORT}: connect: connection refused')
        # Playing the kubelet: the readiness probe fails, the endpoint turns not ready.
        installed.publish({address: (False, False)})
        condition = wait_for(lambda: (c := plane.apiservice_condition(APISERVICE))["reason"] == "MissingEndpoints"
                             and c, 30, "MissingEndpoints")
        assert condition["message"] == (f'endpointslices for service/{SERVICE} in "{NAMESPACE}" have no addresses '
                                        'with port name "https"')
        failed = raw_call(plane)
        assert failed.returncode == 1 and "ServiceUnavailable" in failed.stderr
    finally:
        installed.start_pod("a", address)
        installed.publish({address: (True, False)})
    assert installed.wait_available("True")["reason"] == "Passed"


def test_a_rolling_restart_of_two_replicas_loses_no_request(installed):
    """Two replicas behind the Service; each in turn is deleted as the kubelet and the EndpointSlice
    controller delete a pod (endpoint marked terminating, SIGTERM at the same moment), replaced by a
    new process that joins the slice once its /readyz answers 200 (the readiness probe's part),
    while a client loops GETs through kube-apiserver."""
    plane = installed.plane
    first, second = installed.netns.pod_addresses[0], installed.netns.pod_addresses[1]
    installed.start_pod("b", second)
    installed.publish({first: (True, False), second: (True, False)})
    installed.wait_available("True")
    outcomes: dict[str, int] = {}
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        connection = plane.connection()
        while not stop.is_set():
            try:
                connection.request("GET", f"{GROUP_VERSION}/namespaces/shop/requests/checkout")
                response = connection.getresponse()
                body = response.read()
                outcomes[str(response.status)] = outcomes.get(str(response.status), 0) + 1
                if response.status != 200:
                    failures.append(f"{response.status} {body[:200]!r}")
            except (OSError, http.client.HTTPException) as error:
                failures.append(repr(error))
                connection.close()
                connection = plane.connection()
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for address, name in ((first, "a"), (second, "b")):
            before = sum(outcomes.values())
            wait_for(lambda: sum(outcomes.values()) > before + 20, 30, "requests flowing")
            # The pod is deleted: its endpoint turns terminating and SIGTERM arrives together.
            installed.publish({**installed.endpoints, address: (False, True)})
            pod = installed.pods[address]
            pod.signal(signal.SIGTERM)
            assert pod.process.wait(timeout=60) == 0
            installed.stop_pod(address)
            # Its replacement becomes ready, then joins the slice.
            installed.start_pod(name, address)
            installed.publish({**installed.endpoints, address: (True, False)})
        before = sum(outcomes.values())
        wait_for(lambda: sum(outcomes.values()) > before + 20, 30, "requests flowing after the restart")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        installed.stop_pod(second)
        installed.publish({first: (True, False)})
    assert not failures, f"{len(failures)} failed of {sum(outcomes.values())}: {failures[:5]}"
    assert outcomes.get("200", 0) > 60
