"""A real control plane for reqapi's tests: etcd and kube-apiserver, driven by the real kubectl.

The three binaries are built from their Go modules by ``tests/controlplane/build.sh`` (pinned in
``tests/controlplane/*/go.mod``) and started here on this machine:

* etcd on loopback with a temporary data directory (plain HTTP: nothing but kube-apiserver talks
  to it, and it never leaves loopback);
* kube-apiserver listening on 0.0.0.0 (so on loopback for the tests and on the host end of a veth
  pair for reqapi), with a serving certificate naming both addresses, an admin client
  certificate (``system:masters``), service-account keys, RBAC, the front-proxy CA and proxy
  client certificate with the ``--requestheader-*`` and ``--proxy-client-*`` flags as kubeadm
  sets them, and ``--enable-aggregator-routing=true`` (the aggregator dials the EndpointSlice's
  address, not the Service's cluster IP: nothing here implements cluster IPs);
* a network namespace with a veth pair whose addresses come from 198.18.0.0/15 (RFC 2544, the
  range reserved for tests like this): kube-apiserver refuses loopback addresses in endpoints,
  so reqapi runs inside that namespace, as it runs in a pod.

No kubelet, scheduler or kube-controller-manager runs. Where a scenario needs what they would do
(an EndpointSlice that follows a pod's readiness, a pod's deletion) the test plays their part and
says so. Without kube-controller-manager the built-in ClusterRoles view/edit/admin do not pick up
``aggregate-to-*`` labels, so tests bind ClusterRoles explicitly.

Nothing here enters reqapi's runtime; everything is torn down by ``ControlPlane.stop()`` and
``NetworkNamespace.remove()``, and the logs stay in the test's temporary directory.
"""

from __future__ import annotations

import base64
import copy
import http.client
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))             # tests/: conftest's Server is the one way to start reqapi
from conftest import ROOT, Answer, Server, free_port, wait_until, write_rules  # noqa: E402
BUILD_SCRIPT = HERE / "build.sh"

# Where a test run's veth pairs come from. Each run takes one /29 of 198.18.0.0/15 chosen by its
# process id, so two runs on one machine do not share addresses. The first address is the host
# end (kube-apiserver's advertise address), the next five belong to reqapi "pods".
TEST_NETWORK = ipaddress.ip_network("198.18.0.0/15")
# Cluster IPs (the kubernetes Service, reqapi's Service) come from the neighbouring reserved
# block too, so that no address outside the test ranges is ever configured. Nothing routes them.
SERVICE_CIDR = "198.19.255.0/24"
APISERVICE = "v1beta1.k8s.wujiuye.com"
GROUP_VERSION = "/apis/k8s.wujiuye.com/v1beta1"
NAMESPACE, SERVICE, SERVICE_ACCOUNT = "default", "requests-apiserver-service", "requests-apiserver"
SLICE = "requests-apiserver-service-test"
POD_PORT = 10250                       # the Deployment's containerPort
NETNS_PREFIX = "reqapi-cp-"
REQUIRE_VARIABLE = "REQAPI_REQUIRE_CONTROLPLANE"


class Unavailable(Exception):
    """The control plane cannot run on this machine; the message is the one clear reason."""


def unavailable_reason() -> Optional[str]:
    """Why the control-plane tests cannot run here, or None when they can."""
    if not shutil.which("go") and not os.environ.get("REQAPI_CONTROLPLANE_BIN"):
        return "no Go toolchain on PATH (needed to build kube-apiserver, etcd and kubectl)"
    if os.geteuid() != 0:
        return "not root (needed for the network namespace reqapi runs in: ip netns add)"
    if not shutil.which("ip"):
        return "no 'ip' command (iproute2, needed for the network namespace)"
    return None


def build(progress: Callable[[str], None] = lambda line: None) -> Path:
    """Build (or reuse from the cache under $HOME) the control plane; return its bin directory.

    REQAPI_CONTROLPLANE_BIN names a directory with ready binaries instead (no build)."""
    given = os.environ.get("REQAPI_CONTROLPLANE_BIN")
    if given:
        return Path(given)
    process = subprocess.Popen(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    errors = []
    assert process.stderr is not None
    for line in process.stderr:
        errors.append(line)
        progress(line.rstrip())
    out = process.stdout.read() if process.stdout else ""
    if process.wait() != 0:
        raise Unavailable("building the control plane failed (tests/controlplane/build.sh):\n" + "".join(errors[-30:]))
    return Path(out.strip().splitlines()[-1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1,
             details: Callable[[], str] = lambda: "") -> Any:
    """conftest's wait_until, failing with what and details() when the time runs out."""
    value = wait_until(predicate, timeout, interval)
    if not value:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{details()}")
    return value


def tail(path: Path, lines: int = 40) -> str:
    try:
        return f"--- last lines of {path} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"--- {path}: no log ---"


class NetworkNamespace:
    """A network namespace joined to the host by a veth pair, with addresses from 198.18.0.0/15."""

    def __init__(self) -> None:
        self.remove_stale()
        pid = os.getpid()
        self.name = f"{NETNS_PREFIX}{pid}"
        block = ipaddress.ip_network((int(TEST_NETWORK.network_address) + (pid % 16384) * 8, 29))
        hosts = list(block.hosts())
        self.host_address = str(hosts[0])
        self.pod_addresses = [str(address) for address in hosts[1:]]
        self.host_interface, self.inner_interface = f"rqcp{pid % 100000}h", f"rqcp{pid % 100000}n"
        commands = [
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", self.host_interface, "type", "veth", "peer", "name", self.inner_interface],
            ["ip", "link", "set", self.inner_interface, "netns", self.name],
            ["ip", "addr", "add", f"{self.host_address}/29", "dev", self.host_interface],
            ["ip", "link", "set", self.host_interface, "up"],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
            *(["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{address}/29", "dev", self.inner_interface]
              for address in self.pod_addresses),
            ["ip", "netns", "exec", self.name, "ip", "link", "set", self.inner_interface, "up"],
        ]
        try:
            for command in commands:
                subprocess.run(command, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as error:
            self.remove()
            raise Unavailable(f"cannot create the network namespace ({' '.join(error.cmd)}): {error.stderr.strip()}")

    @property
    def prefix(self) -> tuple[str, ...]:
        """Run a command inside the namespace."""
        return ("ip", "netns", "exec", self.name)

    def remove(self) -> None:
        # Deleting the namespace deletes the veth pair with it; the host end too, to be sure.
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.host_interface], capture_output=True)

    @staticmethod
    def remove_stale() -> None:
        """Remove namespaces left by test runs that died (their process id no longer exists)."""
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for line in listing.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(NETNS_PREFIX) and name[len(NETNS_PREFIX):].isdigit():
                pid = int(name[len(NETNS_PREFIX):])
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    subprocess.run(["ip", "netns", "delete", name], capture_output=True)
                    subprocess.run(["ip", "link", "delete", f"rqcp{pid % 100000}h"], capture_output=True)


class PKI:
    """The cluster's certificates, made as kubeadm lays them out (trustme and cryptography)."""

    def __init__(self, directory: Path, host_address: str):
        import trustme
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name="reqapi-test-kubernetes")
        self.ca_file = self.write("ca.crt", self.ca.cert_pem.bytes())
        first_service_ip = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))
        self.apiserver = self.leaf(self.ca, "apiserver", "kubernetes", "kubernetes.default",
                                   "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "localhost",
                                   "127.0.0.1", host_address, first_service_ip, common_name="kube-apiserver")
        self.admin = self.leaf(self.ca, "admin", "kubernetes-admin", common_name="kubernetes-admin",
                               organization_name="system:masters")
        self.front_proxy_ca = trustme.CA(organization_name="reqapi-test-front-proxy")
        self.front_proxy_ca_file = self.write("front-proxy-ca.crt", self.front_proxy_ca.cert_pem.bytes())
        self.front_proxy_client = self.leaf(self.front_proxy_ca, "front-proxy-client", "front-proxy-client",
                                            common_name="front-proxy-client")
        key = ec.generate_private_key(ec.SECP256R1())
        self.service_account_key = self.write("sa.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.service_account_public = self.write("sa.pub", key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def write(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def leaf(self, ca: Any, stem: str, *names: str, common_name: str,
             organization_name: Optional[str] = None) -> tuple[Path, Path]:
        issued = ca.issue_cert(*names, common_name=common_name, organization_name=organization_name)
        cert = self.write(f"{stem}.crt", b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        key = self.write(f"{stem}.key", issued.private_key_pem.bytes())
        return cert, key


class ControlPlane:
    """etcd + kube-apiserver on this machine, and kubectl pointed at them."""

    def __init__(self, bin_dir: Path, directory: Path, host_address: str):
        self.bin_dir = bin_dir
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.host_address = host_address
        self.pki = PKI(directory / "pki", host_address)
        self.port = free_port()
        self.etcd_port, self.etcd_peer_port = free_port(), free_port()
        self.processes: list[tuple[str, subprocess.Popen, Any]] = []
        self.kubectl_runs = 0
        self.admin_kubeconfig = self.kubeconfig("admin", {"client-certificate": str(self.pki.admin[0]),
                                                          "client-key": str(self.pki.admin[1])})

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> "ControlPlane":
        data = Path(tempfile.mkdtemp(prefix="etcd-", dir=self.directory))
        etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{self.etcd_peer_port}"
        self.spawn("etcd", [str(self.bin_dir / "etcd"), "--name", "default", "--data-dir", str(data),
                            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                            "--initial-cluster", f"default={peer_url}", "--listen-metrics-urls", "",
                            # A test cluster's data is thrown away: no fsync makes it start and
                            # write several times faster on a shared disk.
                            "--unsafe-no-fsync", "--log-level", "warn"])
        pki = self.pki
        self.spawn("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            "--etcd-servers", etcd_url,
            "--bind-address", "0.0.0.0", "--secure-port", str(self.port),
            "--advertise-address", self.host_address,
            "--tls-cert-file", str(pki.apiserver[0]), "--tls-private-key-file", str(pki.apiserver[1]),
            "--client-ca-file", str(pki.ca_file),
            "--service-account-key-file", str(pki.service_account_public),
            "--service-account-signing-key-file", str(pki.service_account_key),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--authorization-mode", "Node,RBAC",
            "--enable-admission-plugins", "NodeRestriction",
            # The front-proxy (aggregation layer) flags exactly as kubeadm sets them.
            "--requestheader-client-ca-file", str(pki.front_proxy_ca_file),
            "--requestheader-allowed-names", "front-proxy-client",
            "--requestheader-extra-headers-prefix", "X-Remote-Extra-",
            "--requestheader-group-headers", "X-Remote-Group",
            "--requestheader-username-headers", "X-Remote-User",
            "--proxy-client-cert-file", str(pki.front_proxy_client[0]),
            "--proxy-client-key-file", str(pki.front_proxy_client[1]),
            "--enable-aggregator-routing=true",
            "--profiling=false", "--v=2",
            "--cert-dir", str(self.directory / "apiserver-certs"),
        ])
        wait_for(lambda: self.alive() and self.try_status("/readyz") == 200, timeout, "kube-apiserver /readyz",
                 interval=0.25, details=self.logs)
        return self

    def spawn(self, name: str, command: list[str]) -> None:
        log = open(self.directory / f"{name}.log", "ab")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, process, log))

    def alive(self) -> bool:
        dead = [(name, process.returncode) for name, process, _ in self.processes if process.poll() is not None]
        if dead:
            raise AssertionError(f"control plane process exited: {dead}\n{self.logs()}")
        return True

    def logs(self) -> str:
        return "\n".join(tail(self.directory / f"{name}.log") for name, _, _ in self.processes)

    def stop(self) -> None:
        for name, process, log in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            log.close()
        self.processes.clear()

    def version(self) -> dict[str, Any]:
        return self.get("/version").json()

    # -- clients -----------------------------------------------------------------------------------

    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def kubeconfig(self, name: str, user: dict[str, str]) -> Path:
        path = self.directory / f"{name}.kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": name,
            "clusters": [{"name": "test", "cluster": {"server": self.url(),
                                                       "certificate-authority": str(self.pki.ca_file)}}],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": name, "context": {"cluster": "test", "user": name, "namespace": "default"}}]}))
        return path

    def kubectl_command(self, args: tuple[str, ...], kubeconfig: Optional[Path]) -> tuple[list[str], dict[str, str]]:
        """The built kubectl's argv and environment, with a fresh --cache-dir every time (nothing
        remembered between calls) and the admin's kubeconfig unless another is given."""
        self.kubectl_runs += 1
        cache = self.directory / "kubectl-cache" / str(self.kubectl_runs)
        home = self.directory / "kubectl-home"
        home.mkdir(exist_ok=True)
        config = kubeconfig or self.admin_kubeconfig
        return ([str(self.bin_dir / "kubectl"), "--kubeconfig", str(config), "--cache-dir", str(cache), *args],
                {"PATH": os.environ.get("PATH", ""), "HOME": str(home)})

    def kubectl(self, *args: str, kubeconfig: Optional[Path] = None, input: Optional[str] = None,
                check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        argv, env = self.kubectl_command(args, kubeconfig)
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {result.returncode}\nstdout:\n{result.stdout}\n"
                                 f"stderr:\n{result.stderr}")
        return result

    def kubectl_process(self, *args: str, kubeconfig: Optional[Path] = None) -> subprocess.Popen:
        """A long-running kubectl (e.g. --watch), stdout as lines."""
        argv, env = self.kubectl_command(args, kubeconfig)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def connection(self, timeout: float = 30) -> http.client.HTTPSConnection:
        """A keep-alive connection to kube-apiserver as the admin."""
        context = ssl.create_default_context(cafile=str(self.pki.ca_file))
        context.load_cert_chain(str(self.pki.admin[0]), str(self.pki.admin[1]))
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=context)

    def get(self, path: str, headers: Optional[dict[str, str]] = None, timeout: float = 30) -> Answer:
        """GET as the admin."""
        connection = self.connection(timeout)
        try:
            connection.request("GET", path, headers=headers or {})
            response = connection.getresponse()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def try_status(self, path: str) -> Optional[int]:
        try:
            return self.get(path, timeout=5).status
        except OSError:
            return None

    # -- objects ----------------------------------------------------------------------------------

    def apply(self, documents: Iterable[dict[str, Any]]) -> None:
        body = "\n".join(json.dumps(document) for document in documents)
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=body)

    def delete(self, kind: str, name: str, namespace: Optional[str] = None) -> None:
        args = ["delete", kind, name, "--ignore-not-found", "--wait=false"]
        if namespace:
            args += ["-n", namespace]
        self.kubectl(*args)

    def token(self, namespace: str, service_account: str, seconds: int = 3600) -> str:
        """A ServiceAccount token from the TokenRequest API (kubectl create token)."""
        return self.kubectl("create", "token", service_account, "-n", namespace,
                            f"--duration={seconds}s").stdout.strip()

    def token_kubeconfig(self, name: str, token: str) -> Path:
        return self.kubeconfig(name, {"token": token})

    def apiservice_condition(self, name: str) -> Optional[dict[str, Any]]:
        answer = self.get(f"/apis/apiregistration.k8s.io/v1/apiservices/{name}")
        if answer.status != 200:
            return None
        for condition in answer.json().get("status", {}).get("conditions", []):
            if condition.get("type") == "Available":
                return condition
        return None

    def wait_for_available(self, name: str, status: str, timeout: float = 90,
                           details: Callable[[], str] = lambda: "") -> dict[str, Any]:
        """Wait until the APIService's Available condition has status ("True"/"False")."""
        return wait_for(lambda: (c := self.apiservice_condition(name)) and c.get("status") == status and c,
                        timeout, f"APIService {name} Available={status}", interval=0.25,
                        details=lambda: f"condition now: {self.apiservice_condition(name)}\n{details()}")


def endpoint_slice(name: str, namespace: str, service: str, port_name: str, port: int,
                   endpoints: list[tuple[str, bool, bool]]) -> dict[str, Any]:
    """An EndpointSlice for a Service without selector, [(address, ready, terminating)]: what the
    EndpointSlice controller writes for a Service's pods (no controller runs in the test cluster)."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "reqapi-tests"}},
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP", "appProtocol": "https"}],
        "endpoints": [{"addresses": [address],
                       "conditions": {"ready": ready and not terminating, "serving": ready,
                                      "terminating": terminating}}
                      for address, ready, terminating in endpoints],
    }


class ServingCerts:
    """reqapi's serving certificate made by the real gen_certs.sh (CA ca.pem, leaf apiservice.pem)."""

    def __init__(self, directory: Path, *options: str, ca_from: Optional["ServingCerts"] = None):
        if ca_from:                          # a new leaf from an existing CA (gen_certs.sh --reuse-ca)
            directory.mkdir(parents=True)
            for name in ("ca.pem", "ca-key.pem"):
                shutil.copy2(ca_from.directory / name, directory / name)
            options = (*options, "--reuse-ca")
        result = subprocess.run(["sh", str(ROOT / "gen_certs.sh"), "--out", str(directory), *options],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        self.directory = directory
        self.ca_file = directory / "ca.pem"
        self.cert_file, self.key_file = directory / "apiservice.pem", directory / "apiservice-key.pem"

    def client_context(self, client_cert: Optional[tuple] = None) -> ssl.SSLContext:
        # The certificate names the Service (what kube-apiserver verifies), not the pod address the
        # tests dial directly, so direct calls verify the chain but not the name.
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.check_hostname = False
        if client_cert:
            context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
        return context


class Installation:
    """reqapi installed into the control plane from k8s/, with "pods" run by hand in the namespace.

    No kubelet or EndpointSlice controller runs: `publish()` writes the EndpointSlice those two would
    write from the pods' readiness, and tests call it where a kubelet would act."""

    def __init__(self, plane: ControlPlane, netns: NetworkNamespace, directory: Path):
        self.plane, self.netns, self.directory = plane, netns, directory
        self.certs = ServingCerts(directory / "certs")
        self.objects = render_manifests(plane, directory)
        self.deployment = next(o for o in self.objects if o["kind"] == "Deployment")
        rules = next(o for o in self.objects if o["kind"] == "ConfigMap")["data"]["rules.json"]
        self.rules_document = json.loads(rules)
        self.rules_file = write_rules(directory / "rules.json", self.rules_document)
        installed = []
        for document in self.objects:
            if document["kind"] == "Deployment":
                continue                    # no pods run here: reqapi is started by hand below
            document = copy.deepcopy(document)
            if document["kind"] == "Service":
                # A Service without selector, so that the EndpointSlice written here is its only one.
                document["spec"].pop("selector", None)
            if document["kind"] == "APIService":
                document["spec"]["caBundle"] = ca_bundle(self.certs.ca_file)
            installed.append(document)
        plane.apply(installed)
        self.apiservice = next(o for o in installed if o["kind"] == "APIService")
        self.pods: dict[str, Server] = {}
        self.endpoints: dict[str, tuple[bool, bool]] = {}

    def pod_args(self, pod_dir: Path, certs: ServingCerts) -> list[str]:
        """The Deployment's container args, with this machine's paths for the mounted files."""
        container = self.deployment["spec"]["template"]["spec"]["containers"][0]
        paths = {"--cert": str(certs.cert_file), "--key": str(certs.key_file), "--rules": str(self.rules_file)}
        args = []
        for arg in container["args"]:
            flag, _, value = arg.partition("=")
            args.append(f"{flag}={paths[flag]}" if flag in paths else arg)
        return args

    def service_account_dir(self, name: str, service_account: str) -> Path:
        """What the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount."""
        directory = self.directory / f"sa-{name}"
        directory.mkdir(exist_ok=True)
        (directory / "token").write_text(self.plane.token(NAMESPACE, service_account))
        (directory / "ca.crt").write_bytes(self.plane.pki.ca_file.read_bytes())
        (directory / "namespace").write_text(NAMESPACE)
        return directory

    def start_pod(self, name: str, address: str, *extra: str, service_account: str = SERVICE_ACCOUNT,
                  certs: Optional[ServingCerts] = None, wait_ready: bool = True) -> Server:
        certs = certs or self.certs
        pod_dir = self.directory / f"pod-{name}"
        sa_dir = self.service_account_dir(name, service_account)
        env = {"KUBERNETES_SERVICE_HOST": self.plane.host_address, "KUBERNETES_SERVICE_PORT": str(self.plane.port)}
        pod = Server(certs, pod_dir, [*self.pod_args(pod_dir, certs), "--service-account-dir", str(sa_dir), *extra],
                     env=env, host=address, prefix=self.netns.prefix, port=POD_PORT).start(wait_ready=True)
        if wait_ready:
            wait_for(lambda: pod.try_get("/readyz") == 200, 30, f"reqapi pod {name} /readyz",
                     details=lambda: pod.log()[-3000:])
        self.pods[address] = pod
        return pod

    def stop_pod(self, address: str) -> int:
        pod = self.pods.pop(address)
        return pod.stop()

    def publish(self, endpoints: dict[str, tuple[bool, bool]]) -> None:
        """Write the EndpointSlice: {address: (ready, terminating)}."""
        self.endpoints = dict(endpoints)
        self.plane.apply([endpoint_slice(SLICE, NAMESPACE, SERVICE, "https", POD_PORT,
                                         [(address, ready, terminating)
                                          for address, (ready, terminating) in endpoints.items()])])

    def wait_available(self, status: str = "True", timeout: float = 90) -> dict[str, Any]:
        return self.plane.wait_for_available(APISERVICE, status, timeout, details=self.logs)

    def logs(self) -> str:
        return "\n".join(f"--- reqapi {address} ---\n{pod.log()[-2000:]}" for address, pod in self.pods.items())

    def stop(self) -> None:
        for address in list(self.pods):
            self.stop_pod(address)


def render_manifests(plane: ControlPlane, directory: Path) -> list[dict[str, Any]]:
    """k8s/ rendered by kubectl kustomize (the built kubectl), as dicts."""
    rendered = plane.kubectl("kustomize", str(ROOT / "k8s")).stdout
    (directory / "rendered.yaml").write_text(rendered)
    return [document for document in yaml.safe_load_all(rendered) if document]


def ca_bundle(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


if __name__ == "__main__":           # `python3 tests/controlplane/cluster.py` builds and prints the bin dir
    print(build(lambda line: print(line, file=sys.stderr)))
