"""Deployment artefacts: gen_certs.sh, Dockerfile, k8s/ manifests, LICENSE.

Nothing here talks to a Kubernetes cluster or a container engine:

* the manifests are rendered with ``kubectl kustomize`` (client-side only) and
  validated against the Kubernetes OpenAPI schemas shipped with the
  ``kubernetes-validate`` package;
* gen_certs.sh runs in a temporary directory, and the certificates it makes are
  checked with openssl, with Python's ssl module and with kubectl (Go's
  crypto/x509, i.e. what kube-apiserver uses) against the real reqapi.py
  started on 127.0.0.1;
* shellcheck and hadolint lint gen_certs.sh and the Dockerfile.

Everything is bounded in time: every subprocess has a timeout and the server
is polled for readiness with a deadline.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from conftest import Certs, Server

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
GEN_CERTS = ROOT / "gen_certs.sh"
DOCKERFILE = ROOT / "Dockerfile"
REQAPI = ROOT / "reqapi.py"

GROUP = "k8s.wujiuye.com"
VERSION = "v1beta1"
APISERVICE_NAME = f"{VERSION}.{GROUP}"
NAMESPACE = "default"
SERVICE = "requests-apiserver-service"
SERVICE_HOST = f"{SERVICE}.{NAMESPACE}.svc"  # the name kube-apiserver verifies
DEPLOYMENT = "requests-apiserver"
SERVICE_ACCOUNT = "requests-apiserver"
TLS_SECRET = "requests-apiserver-tls"
RULES_CONFIGMAP = "requests-apiserver-rules"
CA_BUNDLE_PLACEHOLDER = "REPLACE/ME/with/caBundle/printed/by/gen/certs/sh"
APISERVICE_FILE = K8S / "base" / "apiservice.yaml"

# Kubernetes versions whose schemas the manifests must satisfy (strict mode:
# unknown fields are errors). 1.30 = oldest still-common release with
# PDB unhealthyPodEvictionPolicy on by default; 1.32 = the pinned reference.
SCHEMA_VERSIONS = ["1.30", "1.32"]

EXPECTED_ARGS = [
    "--cert=/etc/reqapi/tls/tls.crt",
    "--key=/etc/reqapi/tls/tls.key",
    "--rules=/etc/reqapi/rules/rules.json",
    "--port=10250",
    "--shutdown-delay=10s",
    "--shutdown-timeout=15s",
]
SELECTOR = {
    "app.kubernetes.io/name": "requests-apiserver",
    "app.kubernetes.io/instance": "requests-apiserver",
}
# sha256 of the canonical https://www.apache.org/licenses/LICENSE-2.0.txt
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"

CMD_TIMEOUT = 60  # seconds, for any single external command


# --------------------------------------------------------------------------- helpers

def _require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (see tests/requirements.txt)")
    return path


def _run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = CMD_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        pytest.fail(f"{shlex.join(cmd)} exited {proc.returncode}\n"
                    f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def _offline_env(tmp: Path) -> dict[str, str]:
    """Environment for kubectl that can never reach a real cluster."""
    env = dict(os.environ)
    env["KUBECONFIG"] = str(tmp / "no-such-kubeconfig")
    env["KUBECACHEDIR"] = str(tmp / "kube-cache")
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(proxy, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost," + SERVICE_HOST
    return env


def _kustomize(path: Path, tmp: Path) -> list[dict[str, Any]]:
    kubectl = _require_tool("kubectl")
    out = _run([kubectl, "kustomize", str(path)], env=_offline_env(tmp)).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, got {len(found)}"
    return found[0]


def _gen_certs(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    _require_tool("openssl")
    return _run([str(GEN_CERTS), *args], cwd=cwd, check=check)


def _x509_text(path: Path) -> str:
    return _run(["openssl", "x509", "-in", str(path), "-noout", "-text"]).stdout


def _cert_dates(path: Path) -> tuple[dt.datetime, dt.datetime]:
    out = _run(["openssl", "x509", "-in", str(path), "-noout", "-startdate", "-enddate"]).stdout
    fields = dict(line.split("=", 1) for line in out.strip().splitlines())
    fmt = "%b %d %H:%M:%S %Y %Z"
    parse = lambda s: dt.datetime.strptime(" ".join(s.split()), fmt)  # noqa: E731
    return parse(fields["notBefore"]), parse(fields["notAfter"])


def _printed_commands(stdout: str) -> dict[str, Any]:
    """Pick the caBundle, the Secret command and the patch command out of gen_certs.sh's output."""
    lines = stdout.splitlines()
    patch = [ln for ln in lines if ln.startswith(f"kubectl patch apiservice {APISERVICE_NAME} ")]
    secret = [ln for ln in lines
              if ln.startswith(f"kubectl -n {NAMESPACE} create secret tls {TLS_SECRET} ")
              and "--dry-run" not in ln]
    assert len(patch) == 1, f"no single kubectl patch line in:\n{stdout}"
    assert len(secret) == 1, f"no single kubectl create secret line in:\n{stdout}"
    patch_argv = shlex.split(patch[0])
    assert patch_argv[:5] == ["kubectl", "patch", "apiservice", APISERVICE_NAME, "--type=merge"]
    assert patch_argv[5] == "-p" and len(patch_argv) == 7
    body = json.loads(patch_argv[6])
    assert list(body) == ["spec"] and list(body["spec"]) == ["caBundle"]
    ca_bundle = body["spec"]["caBundle"]
    idx = lines.index(next(ln for ln in lines if ln.startswith("caBundle (")))
    assert lines[idx + 1] == ca_bundle, "the standalone caBundle line differs from the patch value"
    return {"ca_bundle": ca_bundle, "patch_argv": patch_argv, "secret_argv": shlex.split(secret[0])}


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="module")
def rendered(module_tmp: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        "default": _kustomize(K8S, module_tmp),
        "ha": _kustomize(K8S / "overlays" / "ha", module_tmp),
    }


@pytest.fixture(scope="module")
def certs(module_tmp: Path) -> dict[str, Any]:
    """gen_certs.sh --out certs --local --client alice, run in a temporary directory."""
    work = module_tmp / "gen"
    work.mkdir()
    proc = _gen_certs("--out", "certs", "--local", "--client", "alice", cwd=work)
    out = work / "certs"
    return {
        "dir": out,
        "cwd": work,
        "stdout": proc.stdout,
        "ca": out / "ca.pem",
        "ca_key": out / "ca-key.pem",
        "cert": out / "apiservice.pem",
        "key": out / "apiservice-key.pem",
        "client_cert": out / "client.pem",
        "client_key": out / "client-key.pem",
        **_printed_commands(proc.stdout),
    }


@pytest.fixture(scope="module")
def rules_file(module_tmp: Path, rendered: dict[str, list[dict[str, Any]]]) -> Path:
    cm = _one(rendered["default"], "ConfigMap", RULES_CONFIGMAP)
    path = module_tmp / "rules.json"
    path.write_text(cm["data"]["rules.json"])
    return path


def _https_get(port: int, path: str, ctx: ssl.SSLContext, server_hostname: str,
               timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTP/1.1 GET over TLS to 127.0.0.1:port with the given SNI/verification name."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_hostname}:{port}\r\n"
                        "Accept: application/json\r\nConnection: close\r\n\r\n".encode())
            chunks = []
            while True:
                data = tls.recv(65536)
                if not data:
                    break
                chunks.append(data)
    raw_resp = b"".join(chunks)
    head, _, body = raw_resp.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, body


def _dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


@pytest.fixture(scope="module")
def server(certs: dict[str, Any], module_tmp: Path) -> Iterator[Server]:
    """The real reqapi.py, serving gen_certs.sh's certificate on 127.0.0.1:<free port>."""
    with _reqapi(certs, module_tmp, "reqapi") as running:
        yield running


@contextlib.contextmanager
def _reqapi(certs: dict[str, Any], tmp: Path, name: str, *extra: str) -> Iterator[Server]:
    """The real reqapi.py with gen_certs.sh's certificates, started the tests' one way (conftest.Server)."""
    if not REQAPI.exists():
        pytest.skip(f"{REQAPI} does not exist yet")
    running = Server(Certs.from_files(certs["ca"], certs["cert"], certs["key"]), tmp / name,
                     ["--shutdown-delay", "0", *extra], env=_offline_env(tmp))
    try:
        yield running.start()
    finally:
        running.stop()


# --------------------------------------------------------------------------- manifests

@pytest.mark.parametrize("variant", ["default", "ha"])
def test_kustomize_renders_expected_objects(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in rendered[variant])
    expected = sorted([
        f"ServiceAccount/{SERVICE_ACCOUNT}",
        "ClusterRoleBinding/requests-apiserver:system:auth-delegator",
        "RoleBinding/requests-apiserver-auth-reader",
        "ClusterRole/requests-apiserver:reader",
        f"ConfigMap/{RULES_CONFIGMAP}",
        f"Service/{SERVICE}",
        f"Deployment/{DEPLOYMENT}",
        f"APIService/{APISERVICE_NAME}",
    ] + ([f"PodDisruptionBudget/{DEPLOYMENT}"] if variant == "ha" else []))
    assert kinds == expected
    for doc in rendered[variant]:
        if doc["kind"] in {"ClusterRole", "ClusterRoleBinding", "APIService"}:
            assert "namespace" not in doc["metadata"]
        elif doc["kind"] == "RoleBinding":
            assert doc["metadata"]["namespace"] == "kube-system"
        else:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]


@pytest.mark.parametrize("k8s_version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("variant", ["default", "ha", "examples"])
def test_manifests_validate_against_kubernetes_schema(rendered: dict[str, list[dict[str, Any]]],
                                                      variant: str, k8s_version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate import utils as kv_utils

    newest = kv_utils.major_minor(kv_utils.latest_version())
    if tuple(map(int, k8s_version.split("."))) > tuple(map(int, newest.split("."))):
        pytest.skip(f"kubernetes-validate {kv.__version__} has no schemas for {k8s_version}")
    if variant == "examples":
        docs = [d for d in yaml.safe_load_all((K8S / "examples" / "deploy-service-binding.yaml").read_text()) if d]
        assert docs
    else:
        docs = rendered[variant]
    for doc in docs:
        # strict: additional (unknown or misspelt) properties are errors.
        # APIService has a schema in kubernetes-validate, nothing is skipped.
        try:
            kv.validate(doc, k8s_version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {k8s_version}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")


def test_labels_and_selectors_are_explicit(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for path in K8S.rglob("kustomization.yaml"):
        kust = yaml.safe_load(path.read_text())
        for injected in ("commonLabels", "labels", "namespace", "namePrefix", "nameSuffix"):
            assert injected not in kust, f"{path}: {injected} would inject/rename; write it in the YAML"
    for doc in rendered["ha"]:
        labels = doc["metadata"].get("labels", {})
        for key, value in SELECTOR.items():
            assert labels.get(key) == value, f"{doc['kind']}/{doc['metadata']['name']} lacks {key}"
        assert labels.get("app.kubernetes.io/part-of") == "reqapi"


def test_apiservice_uses_cabundle_placeholder_and_never_skips_tls(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant in ("default", "ha"):
        api = _one(rendered[variant], "APIService", APISERVICE_NAME)
        assert api["apiVersion"] == "apiregistration.k8s.io/v1"
        spec = api["spec"]
        assert api["metadata"]["name"] == f"{spec['version']}.{spec['group']}"
        assert spec["group"] == GROUP and spec["version"] == VERSION
        assert spec["service"] == {"namespace": NAMESPACE, "name": SERVICE, "port": 443}
        assert "insecureSkipTLSVerify" not in spec
        assert spec["caBundle"] == CA_BUNDLE_PLACEHOLDER
        # a placeholder that survives schema validation (format: byte) ...
        decoded = base64.b64decode(spec["caBundle"], validate=True)
        # ... but can never be mistaken for a CA
        assert b"-----BEGIN CERTIFICATE-----" not in decoded
        assert spec["groupPriorityMinimum"] == 1000
        assert spec["versionPriority"] == 15
    assert "insecureSkipTLSVerify" not in APISERVICE_FILE.read_text().replace("Never add insecureSkipTLSVerify", "")


def test_deployment_is_restricted_and_probed(rendered: dict[str, list[dict[str, Any]]]) -> None:
    dep = _one(rendered["default"], "Deployment", DEPLOYMENT)
    spec = dep["spec"]
    assert spec["replicas"] == 1
    assert spec["selector"]["matchLabels"] == SELECTOR
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pod = spec["template"]["spec"]
    for key, value in SELECTOR.items():
        assert spec["template"]["metadata"]["labels"][key] == value
    assert pod["serviceAccountName"] == SERVICE_ACCOUNT
    assert pod.get("automountServiceAccountToken", True) is True
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["terminationGracePeriodSeconds"] == 40
    assert pod["terminationGracePeriodSeconds"] > 10 + 15  # --shutdown-delay + --shutdown-timeout
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 65532 and psc["runAsGroup"] == 65532
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")

    (ctr,) = pod["containers"]
    assert ctr["image"] == "reqapi:latest"
    assert ctr["args"] == EXPECTED_ARGS
    assert "command" not in ctr  # the image's exec-form ENTRYPOINT runs python
    csc = ctr["securityContext"]
    assert csc["runAsNonRoot"] is True
    assert csc["runAsUser"] == 65532 and csc["runAsGroup"] == 65532
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not csc.get("privileged")

    assert ctr["ports"] == [{"name": "https", "containerPort": 10250, "protocol": "TCP"}]
    for probe_name, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        probe = ctr[probe_name]
        assert probe["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}
        assert probe["periodSeconds"] == 10
        assert probe["timeoutSeconds"] == 3
        assert probe["failureThreshold"] == 3
    startup = ctr.get("startupProbe")
    assert startup is not None or ctr["readinessProbe"].get("initialDelaySeconds", 0) > 0
    if startup:
        assert startup["httpGet"]["scheme"] == "HTTPS" and startup["httpGet"]["port"] == "https"
        assert startup["periodSeconds"] * startup["failureThreshold"] <= 60

    assert ctr["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}

    mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert all("subPath" not in m and "subPathExpr" not in m for m in ctr["volumeMounts"])
    tls = mounts["/etc/reqapi/tls"]
    assert tls["readOnly"] is True
    assert volumes[tls["name"]]["secret"]["secretName"] == TLS_SECRET
    rules = mounts["/etc/reqapi/rules"]
    assert rules["readOnly"] is True
    assert volumes[rules["name"]]["configMap"]["name"] == RULES_CONFIGMAP
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # args point into the mounted directories, at the Secret/ConfigMap keys
    assert "--cert=/etc/reqapi/tls/tls.crt" in ctr["args"] and "--key=/etc/reqapi/tls/tls.key" in ctr["args"]
    cm = _one(rendered["default"], "ConfigMap", RULES_CONFIGMAP)
    assert list(cm["data"]) == ["rules.json"]


def test_service_routes_to_the_named_https_port(rendered: dict[str, list[dict[str, Any]]]) -> None:
    svc = _one(rendered["default"], "Service", SERVICE)
    dep = _one(rendered["default"], "Deployment", DEPLOYMENT)
    api = _one(rendered["default"], "APIService", APISERVICE_NAME)
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert svc["spec"]["selector"] == SELECTOR
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "https",
                                     "protocol": "TCP", "appProtocol": "https"}]
    # the availability check looks for a ready endpoint port with the Service port's name
    container_port_names = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] in container_port_names
    assert api["spec"]["service"]["port"] in {p["port"] for p in svc["spec"]["ports"]}
    assert (api["spec"]["service"]["namespace"], api["spec"]["service"]["name"]) == \
        (svc["metadata"]["namespace"], svc["metadata"]["name"])


def test_rbac_for_an_aggregated_apiserver(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    sa_subject = {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}
    _one(docs, "ServiceAccount", SERVICE_ACCOUNT)
    crb = _one(docs, "ClusterRoleBinding", "requests-apiserver:system:auth-delegator")
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                              "name": "system:auth-delegator"}
    assert crb["subjects"] == [sa_subject]
    rb = _one(docs, "RoleBinding", "requests-apiserver-auth-reader")
    assert rb["metadata"]["namespace"] == "kube-system"
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                             "name": "extension-apiserver-authentication-reader"}
    assert rb["subjects"] == [sa_subject]
    reader = _one(docs, "ClusterRole", "requests-apiserver:reader")
    assert reader["rules"] == [{"apiGroups": [GROUP], "resources": ["requests"],
                                "verbs": ["get", "list", "watch"]}]
    for agg in ("view", "edit", "admin"):
        assert reader["metadata"]["labels"][f"rbac.authorization.k8s.io/aggregate-to-{agg}"] == "true"
    # the example binding for a deploy service is not installed by default ...
    assert not any(d["kind"] in {"RoleBinding", "ClusterRoleBinding"} and
                   d["roleRef"]["name"] == "requests-apiserver:reader" for d in docs)
    # ... and grants exactly the reader role
    examples = [d for d in yaml.safe_load_all((K8S / "examples" / "deploy-service-binding.yaml").read_text()) if d]
    assert examples and all(d["roleRef"]["name"] == "requests-apiserver:reader" for d in examples)
    assert all(s["kind"] == "ServiceAccount" for d in examples for s in d["subjects"])


def test_ha_overlay(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base_dep = _one(rendered["default"], "Deployment", DEPLOYMENT)
    dep = _one(rendered["ha"], "Deployment", DEPLOYMENT)
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    anti = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti  # soft: 1-node clusters still work
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == SELECTOR
    pdb = _one(rendered["ha"], "PodDisruptionBudget", DEPLOYMENT)
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["spec"]["selector"]["matchLabels"] == SELECTOR
    # apart from replicas and affinity the Deployment is the base one
    strip = lambda d: {**d, "spec": {**d["spec"], "replicas": None, "template": {  # noqa: E731
        **d["spec"]["template"], "spec": {k: v for k, v in d["spec"]["template"]["spec"].items() if k != "affinity"}}}}
    assert strip(dep) == strip(base_dep)
    component = yaml.safe_load((K8S / "components" / "ha" / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    overlay = yaml.safe_load((K8S / "overlays" / "ha" / "kustomization.yaml").read_text())
    assert overlay["components"] == ["../../components/ha"]


def test_rules_configmap_is_realistic_and_well_formed(rendered: dict[str, list[dict[str, Any]]]) -> None:
    k8s_utils = pytest.importorskip("kubernetes.utils")
    cm = _one(rendered["default"], "ConfigMap", RULES_CONFIGMAP)
    # k8s/rules.json (README: try it on a laptop) is the very same document
    assert cm["data"]["rules.json"] == (K8S / "rules.json").read_text()
    doc = json.loads(cm["data"]["rules.json"])
    assert set(doc) <= {"defaults", "min", "max", "rules"}
    q = k8s_utils.parse_quantity
    for section in ("defaults", "min", "max"):
        assert set(doc[section]) == {"cpu", "memory"}
    for res in ("cpu", "memory"):
        assert q(doc["min"][res]) <= q(doc["defaults"][res]) <= q(doc["max"][res])
    rules = doc["rules"]
    assert 8 <= len(rules) <= 12
    ids = [r["id"] for r in rules]
    assert len(ids) == len(set(ids)), "rule ids must be unique"
    for rule in rules:
        assert set(rule) <= {"id", "namespace", "name", "cpu", "memory"}, rule
        assert rule.keys() & {"cpu", "memory"}, f"rule {rule['id']} sets neither cpu nor memory"
        for res in ("cpu", "memory"):
            if res in rule:
                assert q(doc["min"][res]) <= q(rule[res]) <= q(doc["max"][res]), rule
    # the shapes the brief asks for: exact big services, namespace tiers, naming conventions
    assert rules[0] == {"id": "checkout", "namespace": "shop", "name": "checkout", "cpu": "2", "memory": "3Gi"}
    assert any(r.get("namespace") == "prod-*" and r.get("name") == "*-api" for r in rules)
    for suffix in ("*-worker", "*-job", "*-cron"):
        assert any(r.get("name") == suffix for r in rules), suffix
    # first match wins: every exact-name rule comes before every glob-name rule
    exact = [i for i, r in enumerate(rules) if "*" not in r.get("name", "*") and "*" not in r.get("namespace", "*")]
    globbed = [i for i, r in enumerate(rules) if i not in exact]
    assert max(exact) < min(globbed)


# --------------------------------------------------------------------------- linters, Dockerfile, LICENSE

def test_shellcheck_gen_certs() -> None:
    shellcheck = _require_tool("shellcheck")
    _run([shellcheck, "--severity=style", str(GEN_CERTS)])
    # portable: also clean when checked as dash (Debian/Ubuntu /bin/sh) and as bash
    _run([shellcheck, "--severity=style", "--shell=dash", str(GEN_CERTS)])
    _run([shellcheck, "--severity=style", "--shell=bash", str(GEN_CERTS)])
    text = GEN_CERTS.read_text()
    assert text.startswith("#!/bin/sh\n") or text.startswith("#!/usr/bin/env bash\n")
    assert re.search(r"^set -eu", text, re.M)
    code = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    assert not any("-addext" in ln for ln in code), "use config files / -extfile, not -addext"
    assert os.access(GEN_CERTS, os.X_OK)


def test_hadolint_dockerfile() -> None:
    hadolint = _require_tool("hadolint")
    _run([hadolint, "--no-color", "--failure-threshold", "style",
          "--require-label", "org.opencontainers.image.licenses:spdx",
          "--require-label", "org.opencontainers.image.title:text",
          str(DOCKERFILE)])


def test_dockerfile_shape() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines()]
    instr = [ln for ln in lines if ln and not ln.startswith("#")]
    froms = [ln for ln in instr if ln.upper().startswith("FROM ")]
    assert froms == ["FROM gcr.io/distroless/python3-debian13:nonroot"]  # single stage
    assert any("imagetools inspect" in ln or "crane digest" in ln for ln in lines)  # how to pin the digest
    assert "COPY reqapi.py /app/reqapi.py" in instr
    assert not any(ln.upper().startswith("RUN ") for ln in instr)  # no shell in distroless
    assert "USER 65532:65532" in instr
    assert "EXPOSE 10250" in instr
    assert 'ENTRYPOINT ["/usr/bin/python3", "/app/reqapi.py"]' in instr
    joined = "\n".join(instr)
    assert "PYTHONUNBUFFERED=1" in joined and "PYTHONDONTWRITEBYTECODE=1" in joined
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in joined


def test_license_is_the_unmodified_apache_2_text() -> None:
    data = (ROOT / "LICENSE").read_bytes()
    assert b"Apache License\n                           Version 2.0, January 2004" in data
    assert b"END OF TERMS AND CONDITIONS" in data
    assert hashlib.sha256(data).hexdigest() == APACHE_2_SHA256


# --------------------------------------------------------------------------- gen_certs.sh

def test_gen_certs_help_explains_every_option(tmp_path: Path) -> None:
    proc = _gen_certs("--help", cwd=tmp_path)
    for opt in ("--service", "--namespace", "--domain", "--out", "--local", "--client", "--force"):
        assert re.search(rf"^\s+{re.escape(opt)}\b.*\S", proc.stdout, re.M), opt
    for default in (SERVICE, NAMESPACE, "cluster.local", "certs"):
        assert default in proc.stdout
    assert not list(tmp_path.iterdir()), "--help must not write anything"


def test_gen_certs_rejects_bad_input(tmp_path: Path) -> None:
    assert _gen_certs("--bogus", cwd=tmp_path, check=False).returncode != 0
    bad_ns = _gen_certs("--namespace", "Bad_NS", cwd=tmp_path, check=False)
    assert bad_ns.returncode != 0 and "namespace" in bad_ns.stderr
    assert _gen_certs("--out", cwd=tmp_path, check=False).returncode != 0
    assert not (tmp_path / "certs").exists()


def test_gen_certs_outputs(certs: dict[str, Any]) -> None:
    for key in ("ca", "cert", "client_cert"):
        assert certs[key].read_text().startswith("-----BEGIN CERTIFICATE-----")
    for key in ("key", "ca_key", "client_key"):
        mode = stat.S_IMODE(certs[key].stat().st_mode)
        assert mode == 0o600, f"{certs[key].name} has mode {oct(mode)}"
    assert not [p.name for p in certs["dir"].iterdir() if p.name.startswith(".")], "temporary files left behind"

    ca = _x509_text(certs["ca"])
    assert re.search(r"Basic Constraints: critical\s+CA:TRUE", ca)
    assert re.search(r"Key Usage: critical\s+Certificate Sign, CRL Sign", ca)
    assert "Subject Key Identifier" in ca and "Authority Key Identifier" in ca
    assert "sha256" in ca.lower() and "sha1With" not in ca
    start, end = _cert_dates(certs["ca"])
    assert 3649 <= (end - start).days <= 3651

    leaf = _x509_text(certs["cert"])
    assert re.search(r"Basic Constraints: critical\s+CA:FALSE", leaf)
    assert re.search(r"Key Usage: critical\s+Digital Signature", leaf)
    assert re.search(r"Extended Key Usage:\s+TLS Web Server Authentication\s*\n", leaf)
    assert "Subject Key Identifier" in leaf and "Authority Key Identifier" in leaf
    assert "ecdsa-with-SHA256" in leaf or "sha256WithRSAEncryption" in leaf
    assert "id-ecPublicKey" in leaf and "prime256v1" in leaf or "rsaEncryption" in leaf and "2048 bit" in leaf
    san = re.search(r"Subject Alternative Name:\s*\n\s*(.+)", leaf).group(1)
    assert [s.strip() for s in san.split(",")] == [
        f"DNS:{SERVICE}", f"DNS:{SERVICE}.{NAMESPACE}", f"DNS:{SERVICE_HOST}",
        f"DNS:{SERVICE_HOST}.cluster.local", "DNS:localhost", "IP Address:127.0.0.1"]
    start, end = _cert_dates(certs["cert"])
    assert 364 <= (end - start).days <= 366
    _run(["openssl", "verify", "-x509_strict", "-CAfile", str(certs["ca"]), "-purpose", "sslserver",
          "-verify_hostname", SERVICE_HOST, str(certs["cert"])])
    wrong = _run(["openssl", "verify", "-CAfile", str(certs["ca"]), "-purpose", "sslserver",
                  "-verify_hostname", "other.default.svc", str(certs["cert"])], check=False)
    assert wrong.returncode != 0

    client = _x509_text(certs["client_cert"])
    assert re.search(r"Subject: CN\s*=\s*alice\s*\n", client)
    assert re.search(r"Extended Key Usage:\s+TLS Web Client Authentication\s*\n", client)
    _run(["openssl", "verify", "-x509_strict", "-CAfile", str(certs["ca"]), "-purpose", "sslclient",
          str(certs["client_cert"])])

    # keys belong to the certs; Python (as the server will) accepts both pairs
    for cert, key in ((certs["cert"], certs["key"]), (certs["client_cert"], certs["client_key"])):
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key))

    # printed: notAfter, the caBundle, the secret and patch commands
    assert "notAfter=" in certs["stdout"]
    assert base64.b64decode(certs["ca_bundle"], validate=True) == certs["ca"].read_bytes()
    argv = certs["secret_argv"]
    assert argv[:7] == ["kubectl", "-n", NAMESPACE, "create", "secret", "tls", TLS_SECRET]
    opts = dict(a.split("=", 1) for a in argv[7:])
    assert (certs["cwd"] / opts["--cert"]).resolve() == certs["cert"].resolve()
    assert (certs["cwd"] / opts["--key"]).resolve() == certs["key"].resolve()


def test_printed_secret_command_builds_the_tls_secret(certs: dict[str, Any], module_tmp: Path) -> None:
    """The printed `kubectl create secret tls` works as printed (kubectl loads the pair with Go's crypto/tls)."""
    kubectl = _require_tool("kubectl")
    argv = [kubectl, *certs["secret_argv"][1:], "--dry-run=client", "-o", "json"]
    secret = json.loads(_run(argv, cwd=certs["cwd"], env=_offline_env(module_tmp)).stdout)
    assert secret["type"] == "kubernetes.io/tls"
    assert (secret["metadata"]["name"], secret["metadata"]["namespace"]) == (TLS_SECRET, NAMESPACE)
    assert base64.b64decode(secret["data"]["tls.crt"]) == certs["cert"].read_bytes()
    assert base64.b64decode(secret["data"]["tls.key"]) == certs["key"].read_bytes()
    # the Deployment mounts exactly these keys
    assert EXPECTED_ARGS[:2] == ["--cert=/etc/reqapi/tls/tls.crt", "--key=/etc/reqapi/tls/tls.key"]


def test_gen_certs_refuses_to_replace_a_ca_without_force(tmp_path: Path) -> None:
    first = _gen_certs("--out", "tmp", "--local", "--client", "alice", cwd=tmp_path)
    ca = tmp_path / "tmp" / "ca.pem"
    ca_before = ca.read_bytes()
    leaf_before = (tmp_path / "tmp" / "apiservice.pem").read_bytes()

    again = _gen_certs("--out", "tmp", "--local", cwd=tmp_path, check=False)
    assert again.returncode != 0
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert ca.read_bytes() == ca_before
    assert (tmp_path / "tmp" / "apiservice.pem").read_bytes() == leaf_before

    renewed = _gen_certs("--out", "tmp", "--local", "--reuse-ca", cwd=tmp_path)
    assert ca.read_bytes() == ca_before  # same CA -> same caBundle
    assert (tmp_path / "tmp" / "apiservice.pem").read_bytes() != leaf_before
    assert _printed_commands(renewed.stdout)["ca_bundle"] == _printed_commands(first.stdout)["ca_bundle"]

    forced = _gen_certs("--out", "tmp", "--local", "--client", "alice", "--force", cwd=tmp_path)
    assert ca.read_bytes() != ca_before
    assert _printed_commands(forced.stdout)["ca_bundle"] != _printed_commands(first.stdout)["ca_bundle"]
    _run(["openssl", "verify", "-CAfile", str(ca), "-verify_hostname", SERVICE_HOST,
          str(tmp_path / "tmp" / "apiservice.pem")])
    _run(["openssl", "verify", "-CAfile", str(ca), "-purpose", "sslclient", str(tmp_path / "tmp" / "client.pem")])
    for key in ("ca-key.pem", "apiservice-key.pem", "client-key.pem"):
        assert stat.S_IMODE((tmp_path / "tmp" / key).stat().st_mode) == 0o600
    # a new CA without --client removes the client cert the old CA had signed
    _gen_certs("--out", "tmp", "--force", cwd=tmp_path)
    assert not (tmp_path / "tmp" / "client.pem").exists()
    assert not (tmp_path / "tmp" / "client-key.pem").exists()


def test_gen_certs_other_service_namespace_domain_and_rsa(tmp_path: Path) -> None:
    proc = _gen_certs("--service", "reqapi", "--namespace", "team-a", "--domain", "corp.internal",
                      "--key-type", "rsa", "--out", "o", cwd=tmp_path)
    leaf = _x509_text(tmp_path / "o" / "apiservice.pem")
    san = re.search(r"Subject Alternative Name:\s*\n\s*(.+)", leaf).group(1)
    assert [s.strip() for s in san.split(",")] == [
        "DNS:reqapi", "DNS:reqapi.team-a", "DNS:reqapi.team-a.svc", "DNS:reqapi.team-a.svc.corp.internal"]
    assert "2048 bit" in leaf
    assert re.search(r"Key Usage: critical\s+Digital Signature, Key Encipherment", leaf)
    assert "kubectl -n team-a create secret tls" in proc.stdout


def test_placeholder_cabundle_can_be_replaced_by_gen_certs_output(certs: dict[str, Any], tmp_path: Path) -> None:
    text = APISERVICE_FILE.read_text()
    assert text.count(f"caBundle: {CA_BUNDLE_PLACEHOLDER}\n") == 1
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    (copy / APISERVICE_FILE.relative_to(K8S)).write_text(
        text.replace(CA_BUNDLE_PLACEHOLDER, certs["ca_bundle"]))
    for variant in (copy, copy / "overlays" / "ha"):
        api = _one(_kustomize(variant, tmp_path), "APIService", APISERVICE_NAME)
        bundle = api["spec"]["caBundle"]
        assert bundle == certs["ca_bundle"]
        pem = base64.b64decode(bundle, validate=True)  # exactly one base64 layer ...
        assert pem.startswith(b"-----BEGIN CERTIFICATE-----")  # ... of a PEM bundle
        assert pem == certs["ca"].read_bytes()
    # the decoded bundle is a working trust anchor for the serving cert
    bundle_file = tmp_path / "bundle.pem"
    bundle_file.write_bytes(base64.b64decode(certs["ca_bundle"]))
    _run(["openssl", "verify", "-CAfile", str(bundle_file), "-purpose", "sslserver",
          "-verify_hostname", SERVICE_HOST, str(certs["cert"])])
    ssl.create_default_context(cadata=bundle_file.read_text())
    # and the merge patch produces the same object
    api = _one(_kustomize(K8S, tmp_path), "APIService", APISERVICE_NAME)
    patch = json.loads(certs["patch_argv"][6])
    api["spec"].update(patch["spec"])
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate(api, "1.32", strict=True)


# --------------------------------------------------------------------------- the real server

def test_rules_configmap_accepted_by_reqapi(rules_file: Path, module_tmp: Path) -> None:
    if not REQAPI.exists():
        pytest.skip(f"{REQAPI} does not exist yet")
    proc = _run([sys.executable, str(REQAPI), "--rules", str(rules_file), "--check"], check=False,
                env=_offline_env(module_tmp))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # first match wins, as the shipped examples intend
    expected = {"shop/checkout": "checkout", "prod-eu/payments-api": "prod-api",
                "default/nightly-report": "reports", "ml-eu/ranker-inference": "ml-inference",
                "prod-eu/mail-worker": "prod-worker", "dev-bob/mail-worker": "workers",
                "analytics/nightly-job": "jobs", "staging-eu/web": "staging", "misc/web": "default"}
    for target, rule in expected.items():
        out = _run([sys.executable, str(REQAPI), "--rules", str(rules_file), "--predict", target],
                   env=_offline_env(module_tmp)).stdout
        obj = json.loads(out)
        assert obj["kind"] == "Requests"
        assert obj["metadata"]["annotations"][f"{GROUP}/rule"] == rule, (target, obj)


def test_server_trusted_by_curl(server: Server, certs: dict[str, Any]) -> None:
    curl = _require_tool("curl")
    port = server.port
    url = f"https://{SERVICE_HOST}:{port}/apis/{GROUP}/{VERSION}"
    proc = _run([curl, "-sS", "--max-time", "10", "--noproxy", "*", "--cacert", str(certs["ca"]),
                 "--resolve", f"{SERVICE_HOST}:{port}:127.0.0.1", "-H", "Accept: application/json",
                 "-w", "\n%{http_code}", url])
    body, _, code = proc.stdout.rpartition("\n")
    assert code == "200", proc.stdout
    doc = json.loads(body)
    assert doc["kind"] == "APIResourceList"
    assert doc["groupVersion"] == f"{GROUP}/{VERSION}"
    assert any(r["name"] == "requests" for r in doc["resources"])


def test_server_trusted_by_python_ssl(server: Server, certs: dict[str, Any]) -> None:
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    status, body = _https_get(server.port, f"/apis/{GROUP}/{VERSION}", ctx, SERVICE_HOST)
    assert status == 200
    assert json.loads(body)["kind"] == "APIResourceList"
    # Python >= 3.13 (the distroless runtime) adds VERIFY_X509_STRICT by default
    strict = ssl.create_default_context(cafile=str(certs["ca"]))
    strict.verify_flags |= ssl.VERIFY_X509_STRICT
    assert _https_get(server.port, "/readyz", strict, SERVICE_HOST)[0] == 200
    # hostname verification is real: another Service name must be rejected
    with pytest.raises(ssl.SSLCertVerificationError):
        _https_get(server.port, "/readyz", ctx, "other-service.default.svc")
    # and a client that does not trust our CA is rejected
    with pytest.raises(ssl.SSLCertVerificationError):
        _https_get(server.port, "/readyz", ssl.create_default_context(), SERVICE_HOST)


def test_server_trusted_by_kubectl(server: Server, certs: dict[str, Any], tmp_path: Path) -> None:
    """kubectl verifies with Go's crypto/x509 like kube-apiserver's aggregator (no CN fallback)."""
    kubectl = _require_tool("kubectl")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "reqapi", "cluster": {
            "server": f"https://127.0.0.1:{server.port}",
            "certificate-authority": str(certs["ca"]),
            "tls-server-name": SERVICE_HOST}}],
        # Some credential is needed, or kubectl prompts for a username. reqapi started
        # without --client-ca-file requests no client certificate, so none is sent.
        "users": [{"name": "alice", "user": {"client-certificate": str(certs["client_cert"]),
                                             "client-key": str(certs["client_key"])}}],
        "contexts": [{"name": "reqapi", "context": {"cluster": "reqapi", "user": "alice"}}],
        "current-context": "reqapi",
    }))
    cache = tmp_path / "kube-cache"
    cache.mkdir()
    env = _offline_env(tmp_path)
    env["KUBECONFIG"] = str(kubeconfig)
    proc = _run([kubectl, "--kubeconfig", str(kubeconfig), "--cache-dir", str(cache),
                 "--request-timeout", "10s", "get", "--raw", f"/apis/{GROUP}/{VERSION}"], env=env)
    doc = json.loads(proc.stdout)
    assert doc["kind"] == "APIResourceList"
    assert any(r["name"] == "requests" for r in doc["resources"])


def test_server_accepts_gen_certs_client_certificate(certs: dict[str, Any], tmp_path: Path) -> None:
    """gen_certs.sh --client: the client cert is accepted by reqapi --client-ca-file (trying mTLS locally)."""
    curl = _require_tool("curl")
    with _reqapi(certs, tmp_path, "reqapi-mtls", "--client-ca-file", str(certs["ca"])) as running:
        port = running.port
        url = f"https://{SERVICE_HOST}:{port}/apis/{GROUP}/{VERSION}"
        proc = _run([curl, "-sS", "--max-time", "10", "--noproxy", "*", "--cacert", str(certs["ca"]),
                     "--cert", str(certs["client_cert"]), "--key", str(certs["client_key"]),
                     "--resolve", f"{SERVICE_HOST}:{port}:127.0.0.1", "-w", "\n%{http_code}", url])
        body, _, code = proc.stdout.rpartition("\n")
        assert code == "200", proc.stdout
        assert json.loads(body)["kind"] == "APIResourceList"
        # the same TLS handshake from Python, presenting alice's certificate
        ctx = ssl.create_default_context(cafile=str(certs["ca"]))
        ctx.load_cert_chain(str(certs["client_cert"]), str(certs["client_key"]))
        assert _https_get(port, f"/apis/{GROUP}/{VERSION}", ctx, SERVICE_HOST)[0] == 200
