"""Real clients against a real reqapi: the kubectl binary and the Python `kubernetes` DynamicClient.

Every assertion is on what the client prints or returns (kubectl's own requests: discovery with the
aggregated Accept header, OpenAPI v3, Table lists, watches with resourceVersion and timeoutSeconds).
Tests that need `--rules` use either a module-wide rules server (read-only tests) or a server of their own
(watch tests, which change the rules).  Nothing here sleeps to synchronise: streams are read with deadlines.
"""

from __future__ import annotations

import concurrent.futures
import copy
import datetime
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import GV, RULES, Kubectl, Server, kubectl_binary, wait_until, write_rules

GROUP_VERSION = "k8s.wujiuye.com/v1beta1"
RULE_ANNOTATION = "k8s.wujiuye.com/rule"
TABLE_HEADER = "NAME CPU MEMORY RULE AGE"
AGE = re.compile(r"\d+(s|m\d*s?|h\d*m?|d\d*h?|y\d*d?)")
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
WATCH_SECONDS = 6          # kubectl --request-timeout of the watch tests: kubectl must end by itself then

# What conftest's RULES give (namespace, name) -> (cpu, memory, rule).
NAMED = {
    ("default", "nightly-report"): ("250m", "1Gi", "reports"),
    ("shop", "checkout"): ("2", "3Gi", "checkout"),
    ("shop", "search"): ("1500m", "1536Mi", "search"),
}


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------

def words(line: str) -> str:
    """A line with its whitespace normalised (kubectl pads columns with spaces, explain uses tabs)."""
    return " ".join(line.split())


def table(stdout: str) -> tuple:
    """(header, rows) of kubectl's table output, each row a list of cells."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, f"kubectl printed no table:\n{stdout!r}"
    return words(lines[0]), [line.split() for line in lines[1:]]


def without_age(rows: list) -> list:
    """Rows with the trailing AGE cell checked and dropped."""
    for row in rows:
        assert AGE.fullmatch(row[-1]), f"AGE cell {row[-1]!r} in {row}"
    return [row[:-1] for row in rows]


def recent(timestamp: str, within: float = 300.0) -> bool:
    moment = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    return abs(moment.timestamp() - time.time()) <= within


def assert_object(obj: dict, namespace: str, name: str, cpu: str, memory: str, rule: str) -> None:
    assert obj["kind"] == "Requests", obj
    assert obj["apiVersion"] == GROUP_VERSION, obj
    meta = obj["metadata"]
    assert (meta["name"], meta["namespace"]) == (name, namespace), meta
    assert UID.fullmatch(meta["uid"]), meta
    assert re.fullmatch(r"[1-9]\d*", meta["resourceVersion"]), meta
    assert RFC3339.fullmatch(meta["creationTimestamp"]) and recent(meta["creationTimestamp"]), meta
    assert meta["annotations"] == {RULE_ANNOTATION: rule}, meta
    assert obj["resources"] == {"cpu": cpu, "memory": memory}, obj


def rules_with(**changes) -> dict:
    """conftest's RULES with some rules' cpu/memory changed (rule id -> dict), None to drop a rule,
    and extra rules appended under the key `extra`."""
    document = copy.deepcopy(RULES)
    extra = changes.pop("extra", [])
    kept = []
    for rule in document["rules"]:
        change = changes.get(rule["id"], {})
        if change is None:
            continue
        rule.update(change)
        kept.append(rule)
    document["rules"] = kept + list(extra)
    return document


def watches_open(server: Server) -> int:
    match = re.search(r"^reqapi_watches_open (\d+)$", server.get("/metrics").text, re.M)
    assert match, server.get("/metrics").text[:2000]
    return int(match.group(1))


class KubectlStream:
    """A long-running kubectl (e.g. --watch), started the way Kubectl.run starts one (same env, same
    kubeconfig, a fresh --cache-dir), whose stdout is read line by line as it is printed."""

    def __init__(self, kubectl: Kubectl, *args: str):
        kubectl.runs += 1
        cache = kubectl.directory / f"cache{kubectl.runs}"
        home = kubectl.directory / "home"
        home.mkdir(exist_ok=True)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "KUBECONFIG": str(kubectl.kubeconfig)}
        self.args = args
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [kubectl_binary(), "--kubeconfig", str(kubectl.kubeconfig), "--cache-dir", str(cache), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list = []
        self.stderr_chunks: list = []
        self.changed = threading.Condition()
        self.readers = [threading.Thread(target=self._read_stdout, daemon=True),
                        threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self.readers:
            reader.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def _read_stderr(self) -> None:
        self.stderr_chunks.append(self.process.stderr.read())

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_chunks)

    def describe(self) -> str:
        return (f"kubectl {' '.join(self.args)} (exit {self.process.poll()}) printed:\n"
                + "\n".join(self.lines) + f"\nstderr:\n{self.stderr}")

    def wait_for_line(self, predicate, timeout: float = 15.0, after: int = 0) -> int:
        """Index of the first printed line (from `after` on) whose cells satisfy predicate."""
        deadline = time.monotonic() + timeout

        def find():
            for index in range(after, len(self.lines)):
                if predicate(self.lines[index].split()):
                    return index
            return None

        with self.changed:
            while True:
                found = find()
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self.readers[0].is_alive()):
                    raise AssertionError(f"no matching line within {timeout}s; {self.describe()}")
                self.changed.wait(min(remaining, 0.5))

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout=5)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()


@pytest.fixture()
def streams():
    """Start KubectlStreams; every one still running at the end of the test is killed."""
    started = []

    def start(kubectl: Kubectl, *args: str) -> KubectlStream:
        stream = KubectlStream(kubectl, *args)
        started.append(stream)
        return stream

    yield start
    for stream in started:
        stream.close()


@pytest.fixture(scope="module")
def rules_server(certs, tmp_path_factory):
    """One server with conftest's RULES for the read-only tests of this module."""
    directory = tmp_path_factory.mktemp("kubectl-rules")
    rules = write_rules(directory / "rules.json", RULES)
    running = Server(certs, directory / "server", ["--shutdown-delay", "0", "--rules", str(rules)]).start()
    yield running
    running.stop()


@pytest.fixture()
def rules_kubectl(rules_server, tmp_path) -> Kubectl:
    return Kubectl(rules_server, tmp_path / "kubectl-rules")


# ---------------------------------------------------------------------------------------------------------
# kubectl: raw requests, discovery
# ---------------------------------------------------------------------------------------------------------

def test_get_raw_object(kubectl):
    first = json.loads(kubectl.run("get", "--raw", f"{GV}/namespaces/default/requests/web").stdout)
    assert_object(first, "default", "web", "100m", "100Mi", "default")
    second = json.loads(kubectl.run("get", "--raw", f"{GV}/namespaces/default/requests/web").stdout)
    assert second["metadata"]["uid"] == first["metadata"]["uid"]
    other = json.loads(kubectl.run("get", "--raw", f"{GV}/namespaces/other/requests/web").stdout)
    assert other["metadata"]["uid"] != first["metadata"]["uid"]
    listed = json.loads(kubectl.run("get", "--raw", f"{GV}/namespaces/default/requests").stdout)
    assert listed["kind"] == "RequestsList" and listed["items"] == []
    assert listed["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]


def test_get_raw_group_version(kubectl):
    document = json.loads(kubectl.run("get", "--raw", GV).stdout)
    assert document["kind"] == "APIResourceList" and document["groupVersion"] == GROUP_VERSION
    (resource,) = document["resources"]
    assert resource["name"] == "requests" and resource["kind"] == "Requests"
    assert resource["singularName"] == "request" and resource["namespaced"] is True
    assert resource["shortNames"] == ["req"]
    assert sorted(resource["verbs"]) == ["get", "list", "watch"]


def test_get_raw_version(kubectl):
    document = json.loads(kubectl.run("get", "--raw", "/version").stdout)
    assert re.fullmatch(r"\d+", document["major"]) and re.fullmatch(r"\d+\+?", document["minor"]), document
    assert document["gitVersion"].startswith("v"), document
    assert document["platform"], document


def test_get_raw_unknown_path_is_a_not_found_status(kubectl):
    result = kubectl.run("get", "--raw", f"{GV}/nothing", check=False)
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.strip() == "Error from server (NotFound): the server could not find the requested resource"


def test_api_resources(kubectl):
    result = kubectl.run("api-resources")
    header, rows = table(result.stdout)
    assert header == "NAME SHORTNAMES APIVERSION NAMESPACED KIND"
    assert rows == [["requests", "req", GROUP_VERSION, "true", "Requests"]], result.stdout
    assert result.stderr == ""


def test_api_resources_wide(kubectl):
    result = kubectl.run("api-resources", "-o", "wide")
    header, rows = table(result.stdout)
    assert header == "NAME SHORTNAMES APIVERSION NAMESPACED KIND VERBS CATEGORIES"
    assert rows == [["requests", "req", GROUP_VERSION, "true", "Requests", "get,list,watch", "wujiuye"]], \
        result.stdout


def test_api_versions(kubectl):
    result = kubectl.run("api-versions")
    assert result.stdout.split() == [GROUP_VERSION]
    assert result.stderr == ""


# ---------------------------------------------------------------------------------------------------------
# kubectl get: tables
# ---------------------------------------------------------------------------------------------------------

def test_get_list_without_rules_is_empty(kubectl):
    result = kubectl.run("get", "requests", "-n", "default")
    assert result.stdout == ""
    assert result.stderr.strip() == "No resources found in default namespace."


def test_get_list_with_rules(rules_kubectl):
    result = rules_kubectl.run("get", "requests", "-n", "default")
    header, rows = table(result.stdout)
    assert header == TABLE_HEADER
    assert without_age(rows) == [["nightly-report", "250m", "1Gi", "reports"]], result.stdout
    empty = rules_kubectl.run("get", "requests", "-n", "nobody-here")
    assert empty.stdout == "" and empty.stderr.strip() == "No resources found in nobody-here namespace."


@pytest.mark.parametrize("resource", ["requests", "request", "req", "Requests", "requests.k8s.wujiuye.com",
                                      "requests.v1beta1.k8s.wujiuye.com"])
def test_get_one_by_name_and_resource_spelling(kubectl, resource):
    result = kubectl.run("get", resource, "web", "-n", "default")
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert words(lines[0]) == TABLE_HEADER
    assert without_age([lines[1].split()]) == [["web", "100m", "100Mi", "default"]]


@pytest.mark.parametrize("resource", ["request", "req"])
def test_get_one_without_namespace_uses_the_kubeconfig_namespace(kubectl, resource):
    header, rows = table(kubectl.run("get", resource, "web").stdout)
    assert header == TABLE_HEADER
    assert without_age(rows) == [["web", "100m", "100Mi", "default"]]


@pytest.mark.parametrize("namespace,name", [("shop", "checkout"), ("shop", "search"), ("default", "nightly-report"),
                                            ("prod-eu", "payments-api"), ("x", "backup-job"), ("default", "web")])
def test_get_one_by_name_with_rules(rules_kubectl, namespace, name):
    expected = {("prod-eu", "payments-api"): ("500m", "512Mi", "prod-api"),
                ("x", "backup-job"): ("100m", "2Gi", "jobs"),
                ("default", "web"): ("100m", "100Mi", "default"), **NAMED}[(namespace, name)]
    result = rules_kubectl.run("get", "requests", name, "-n", namespace)
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and words(lines[0]) == TABLE_HEADER, result.stdout
    assert without_age([lines[1].split()]) == [[name, *expected]]


def test_get_all_namespaces_fills_the_namespace_column(rules_kubectl):
    result = rules_kubectl.run("get", "requests.k8s.wujiuye.com", "-A")
    header, rows = table(result.stdout)
    assert header == "NAMESPACE " + TABLE_HEADER
    assert sorted(without_age(rows)) == sorted([ns, name, *values] for (ns, name), values in NAMED.items())


def test_get_all_namespaces_wide(rules_kubectl):
    result = rules_kubectl.run("get", "requests", "-A", "-o", "wide")
    header, rows = table(result.stdout)
    assert header == "NAMESPACE " + TABLE_HEADER
    assert sorted(without_age(rows)) == sorted([ns, name, *values] for (ns, name), values in NAMED.items())


@pytest.mark.parametrize("field,order", [(".resources.cpu", ["search", "checkout"]),
                                         (".resources.memory", ["search", "checkout"]),
                                         (".metadata.name", ["checkout", "search"])])
def test_get_sort_by_needs_whole_objects(rules_kubectl, field, order):
    # The server lists checkout before search; 1500m < 2 and 1536Mi < 3Gi sort search first.  kubectl
    # sorts on the objects it asked for with includeObject=Object: without them it prints nothing.
    result = rules_kubectl.run("get", "requests", "-n", "shop", f"--sort-by={field}")
    header, rows = table(result.stdout)
    assert header == TABLE_HEADER
    assert [row[0] for row in rows] == order, result.stdout
    assert without_age(rows) == [[name, *NAMED[("shop", name)]] for name in order]


def test_get_output_name(rules_kubectl):
    result = rules_kubectl.run("get", "requests", "-n", "shop", "-o", "name")
    assert result.stdout.splitlines() == ["requests.k8s.wujiuye.com/checkout", "requests.k8s.wujiuye.com/search"]


@pytest.mark.parametrize("selector,expected", [
    ("metadata.name=checkout", [("shop", "checkout")]),
    ("metadata.namespace=shop", [("shop", "checkout"), ("shop", "search")]),
    ("metadata.name!=checkout", [("default", "nightly-report"), ("shop", "search")]),
])
def test_get_field_selector(rules_kubectl, selector, expected):
    result = rules_kubectl.run("get", "requests", "-A", "--field-selector", selector)
    header, rows = table(result.stdout)
    assert header == "NAMESPACE " + TABLE_HEADER
    assert sorted(without_age(rows)) == [[ns, name, *NAMED[(ns, name)]] for ns, name in expected]


def test_get_unsupported_field_selector_is_a_bad_request(rules_kubectl):
    result = rules_kubectl.run("get", "requests", "-A", "--field-selector", "spec.nodeName=x", check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("Error from server (BadRequest): "), result.stderr
    assert "field label not supported: spec.nodeName" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# kubectl get -o json / -o yaml
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("output,parse", [("json", json.loads), ("yaml", yaml.safe_load)])
def test_get_one_as_json_and_yaml(kubectl, output, parse):
    obj = parse(kubectl.run("get", "requests", "web", "-n", "default", "-o", output).stdout)
    assert_object(obj, "default", "web", "100m", "100Mi", "default")
    raw = json.loads(kubectl.run("get", "--raw", f"{GV}/namespaces/default/requests/web").stdout)
    assert obj["metadata"]["uid"] == raw["metadata"]["uid"]
    assert obj["metadata"]["resourceVersion"] == raw["metadata"]["resourceVersion"]


@pytest.mark.parametrize("output,parse", [("json", json.loads), ("yaml", yaml.safe_load)])
def test_get_one_with_rules_as_json_and_yaml(rules_kubectl, output, parse):
    obj = parse(rules_kubectl.run("get", "requests", "checkout", "-n", "shop", "-o", output).stdout)
    assert_object(obj, "shop", "checkout", "2", "3Gi", "checkout")
    listed = json.loads(rules_kubectl.run("get", "--raw", f"{GV}/namespaces/shop/requests").stdout)
    assert obj["metadata"]["resourceVersion"] == listed["metadata"]["resourceVersion"]
    assert obj["metadata"]["uid"] == {item["metadata"]["name"]: item["metadata"]["uid"]
                                      for item in listed["items"]}["checkout"]


def test_get_list_as_json(rules_kubectl):
    document = json.loads(rules_kubectl.run("get", "requests", "-A", "-o", "json").stdout)
    assert document["kind"] == "List"
    found = {}
    for item in document["items"]:
        meta = item["metadata"]
        found[(meta["namespace"], meta["name"])] = item
    assert set(found) == set(NAMED)
    for (namespace, name), (cpu, memory, rule) in NAMED.items():
        assert_object(found[(namespace, name)], namespace, name, cpu, memory, rule)


# ---------------------------------------------------------------------------------------------------------
# kubectl explain
# ---------------------------------------------------------------------------------------------------------

def explained_fields(stdout: str) -> dict:
    """FIELDS of kubectl explain: name -> (type, description)."""
    lines = stdout.splitlines()
    assert "FIELDS:" in lines, stdout
    fields, current = {}, None
    for line in lines[lines.index("FIELDS:") + 1:]:
        match = re.fullmatch(r"  (\S+)\t(<[^>]+>)(.*)", line)
        if match:
            current = match.group(1)
            fields[current] = [match.group(2), ""]
        elif current and line.strip():
            fields[current][1] = (fields[current][1] + " " + line.strip()).strip()
    return {name: tuple(value) for name, value in fields.items()}


def explained_header(stdout: str) -> dict:
    header = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"(GROUP|KIND|VERSION|FIELD):\s+(.*)", line)
        if match:
            header[match.group(1)] = words(match.group(2))
    return header


def test_explain_requests(kubectl):
    result = kubectl.run("explain", "requests")
    assert explained_header(result.stdout) == {"GROUP": "k8s.wujiuye.com", "KIND": "Requests", "VERSION": "v1beta1"}
    description = result.stdout.split("DESCRIPTION:", 1)[1].split("FIELDS:", 1)[0]
    assert "CPU and memory requests" in words(description), result.stdout
    fields = explained_fields(result.stdout)
    assert set(fields) == {"apiVersion", "kind", "metadata", "resources"}, result.stdout
    assert fields["apiVersion"][0] == fields["kind"][0] == "<string>"
    assert fields["metadata"][0] == "<ObjectMeta>"
    for name, (kind, text) in fields.items():
        assert text and text != "<no description>", (name, result.stdout)
    assert "requests" in fields["resources"][1].lower()


def test_explain_requests_resources(kubectl):
    result = kubectl.run("explain", "requests.resources")
    header = explained_header(result.stdout)
    assert (header["GROUP"], header["KIND"], header["VERSION"]) == ("k8s.wujiuye.com", "Requests", "v1beta1")
    assert header["FIELD"].startswith("resources <"), header
    fields = explained_fields(result.stdout)
    assert set(fields) == {"cpu", "memory"}, result.stdout
    assert fields["cpu"][0] == fields["memory"][0] == "<string>"
    assert "CPU" in fields["cpu"][1] and "millicores" in fields["cpu"][1], fields
    assert "Memory" in fields["memory"][1] and "mebibytes" in fields["memory"][1], fields


def test_explain_requests_metadata_goes_into_object_meta(kubectl):
    fields = explained_fields(kubectl.run("explain", "requests.metadata").stdout)
    assert {"name", "namespace", "uid", "resourceVersion", "creationTimestamp", "annotations"} <= set(fields)
    assert RULE_ANNOTATION in fields["annotations"][1]


def test_explain_unknown_field(kubectl):
    result = kubectl.run("explain", "requests.foo", check=False)
    assert result.returncode == 1, result
    assert result.stderr.strip() == 'error: field "foo" does not exist'


# ---------------------------------------------------------------------------------------------------------
# kubectl: errors come back as Status objects and print in kube's words
# ---------------------------------------------------------------------------------------------------------

def test_invalid_namespace_is_a_bad_request_naming_the_rule(kubectl):
    result = kubectl.run("get", "requests", "-n", "Bad_NS", check=False)
    assert result.returncode == 1, result
    assert result.stdout == ""
    error = result.stderr.strip()
    assert error.startswith('Error from server (BadRequest): Unable to list "k8s.wujiuye.com/v1beta1, '
                            'Resource=requests": '), error
    assert "Bad_NS" in error and "RFC 1123 label" in error and "[a-z0-9]([-a-z0-9]*[a-z0-9])?" in error, error


def test_invalid_name_is_a_bad_request_status(kubectl):
    # Were the body not a Status, kubectl would print "the server rejected our request for an unknown
    # reason (get requests.k8s.wujiuye.com Bad_Name)" instead of the server's message.
    result = kubectl.run("get", "requests", "Bad_Name", "-n", "default", check=False)
    assert result.returncode == 1, result
    assert result.stdout == ""
    error = result.stderr.strip()
    assert error.startswith("Error from server (BadRequest): Name parameter invalid: "), error
    assert "Bad_Name" in error and "RFC 1123 subdomain" in error, error
    assert "unknown reason" not in error


def test_invalid_name_with_raw_prints_the_status_message(kubectl):
    result = kubectl.run("get", "--raw", f"{GV}/namespaces/default/requests/Bad_Name", check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("Error from server (BadRequest): Name parameter invalid: "), result.stderr


# ---------------------------------------------------------------------------------------------------------
# kubectl --watch: a rules reload shows up as new rows
# ---------------------------------------------------------------------------------------------------------

def is_row(name: str, cpu: str, memory: str, rule: str):
    return lambda cells: cells[:4] == [name, cpu, memory, rule] and len(cells) == 5 and AGE.fullmatch(cells[4])


def reload_rules(server: Server, rules_file: Path, document: dict) -> None:
    write_rules(rules_file, document)
    server.signal(signal.SIGHUP)


def finish_watch(stream: KubectlStream) -> None:
    """kubectl must end by itself, with exit 0 and no error, once --request-timeout has passed."""
    code = stream.wait(timeout=WATCH_SECONDS + 30)
    elapsed = time.monotonic() - stream.started
    assert code == 0, stream.describe()
    assert elapsed >= WATCH_SECONDS - 0.5, f"kubectl ended after {elapsed:.1f}s; {stream.describe()}"
    assert "error" not in stream.stderr.lower(), stream.describe()


def test_watch_list_shows_a_changed_row(start_server, rules_file, tmp_path, streams):
    # --reload-interval 1h: only the SIGHUP can make this reload happen within the test.
    server = start_server("--rules", str(rules_file), "--reload-interval", "1h")
    stream = streams(Kubectl(server, tmp_path / "k"), "get", "requests", "-n", "default", "--watch",
                     f"--request-timeout={WATCH_SECONDS}s")
    first = stream.wait_for_line(is_row("nightly-report", "250m", "1Gi", "reports"))
    assert first == 1 and words(stream.lines[0]) == TABLE_HEADER, stream.describe()
    reload_rules(server, rules_file, rules_with(reports={"cpu": "750m"}))
    stream.wait_for_line(is_row("nightly-report", "750m", "1Gi", "reports"), after=first + 1)
    finish_watch(stream)
    # One header, the listed row, the changed row: no replayed duplicates, nothing for other namespaces.
    assert len(stream.lines) == 3, stream.describe()


def test_watch_list_with_event_types(start_server, rules_file, tmp_path, streams):
    server = start_server("--rules", str(rules_file), "--reload-interval", "1h")
    stream = streams(Kubectl(server, tmp_path / "k"), "get", "requests", "-n", "default", "--watch",
                     "--output-watch-events", f"--request-timeout={WATCH_SECONDS}s")
    first = stream.wait_for_line(lambda cells: cells[:2] == ["ADDED", "nightly-report"])
    assert words(stream.lines[0]) == "EVENT " + TABLE_HEADER, stream.describe()
    backfill = {"id": "backfill", "namespace": "default", "name": "backfill", "cpu": "300m", "memory": "256Mi"}
    reload_rules(server, rules_file, rules_with(reports={"memory": "2Gi"}, extra=[backfill]))
    stream.wait_for_line(lambda cells: cells[:5] == ["ADDED", "backfill", "300m", "256Mi", "backfill"],
                         after=first + 1)
    modified = stream.wait_for_line(lambda cells: cells[:5] == ["MODIFIED", "nightly-report", "250m", "2Gi",
                                                                "reports"], after=first + 1)
    reload_rules(server, rules_file, rules_with(reports=None, extra=[backfill]))
    stream.wait_for_line(lambda cells: cells[:2] == ["DELETED", "nightly-report"], after=modified + 1)
    finish_watch(stream)
    assert len(stream.lines) == 5, stream.describe()


@pytest.mark.parametrize("namespace,name,before,after,change", [
    # A workload the rules name: it is in the list, its rule changes.
    ("default", "nightly-report", ("250m", "1Gi", "reports"), ("750m", "1Gi", "reports"),
     {"reports": {"cpu": "750m"}}),
    # Any other valid name: its prediction comes from the defaults, which change.
    ("default", "web", ("100m", "100Mi", "default"), ("300m", "100Mi", "default"),
     {"defaults": None}),
])
def test_watch_one_name_shows_the_first_change(start_server, rules_file, tmp_path, streams, namespace, name,
                                               before, after, change):
    # kubectl prints the GET, then watches with resourceVersion=0 and drops the first event (the
    # initial ADDED a real apiserver sends); without that initial event the change below would be lost.
    server = start_server("--rules", str(rules_file), "--reload-interval", "1h")
    stream = streams(Kubectl(server, tmp_path / "k"), "get", "requests", name, "-n", namespace, "--watch",
                     f"--request-timeout={WATCH_SECONDS}s")
    first = stream.wait_for_line(is_row(name, *before))
    assert first == 1 and words(stream.lines[0]) == TABLE_HEADER, stream.describe()
    # kubectl opens its watch only after printing the GET: change the rules once the watch is open.
    assert wait_until(lambda: watches_open(server) == 1, timeout=15), stream.describe()
    document = rules_with(**{key: value for key, value in change.items() if key != "defaults"})
    if "defaults" in change:
        document["defaults"] = {"cpu": after[0], "memory": after[1]}
    reload_rules(server, rules_file, document)
    stream.wait_for_line(is_row(name, *after), after=first + 1)
    finish_watch(stream)
    assert len(stream.lines) == 3, stream.describe()


# ---------------------------------------------------------------------------------------------------------
# The Python kubernetes client's DynamicClient
# ---------------------------------------------------------------------------------------------------------

def bounded(function, timeout: float = 30.0):
    """Run a client call in a worker thread: the kubernetes client's discovery has no timeout of its own."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(function).result(timeout=timeout)
    finally:
        pool.shutdown(wait=False)


@pytest.fixture()
def dynamic(tmp_path):
    """DynamicClient(server) -> the Requests resource of a fresh client with its own discovery cache."""
    from kubernetes import client
    from kubernetes.dynamic import DynamicClient

    clients = []

    def make(server: Server):
        configuration = client.Configuration()
        configuration.host = server.url()
        configuration.ssl_ca_cert = str(server.certs.ca_file)
        api_client = client.ApiClient(configuration)
        clients.append(api_client)
        dynamic_client = DynamicClient(api_client, cache_file=str(tmp_path / f"discovery{len(clients)}.json"))
        return bounded(lambda: dynamic_client.resources.get(api_version=GROUP_VERSION, kind="Requests"))

    yield make
    for api_client in clients:
        api_client.close()


def test_dynamic_client_finds_the_resource(server, dynamic):
    requests = dynamic(server)
    assert (requests.group_version, requests.kind, requests.name) == (GROUP_VERSION, "Requests", "requests")
    assert requests.namespaced is True
    assert sorted(requests.verbs) == ["get", "list", "watch"]


def test_dynamic_client_get_one(server, dynamic):
    requests = dynamic(server)
    obj = bounded(lambda: requests.get(name="web", namespace="default", _request_timeout=10))
    assert_object(obj.to_dict(), "default", "web", "100m", "100Mi", "default")
    assert obj.resources.cpu == "100m" and obj.metadata.annotations[RULE_ANNOTATION] == "default"


def test_dynamic_client_get_one_with_rules(rules_server, dynamic):
    requests = dynamic(rules_server)
    for (namespace, name), (cpu, memory, rule) in {("prod-eu", "payments-api"): ("500m", "512Mi", "prod-api"),
                                                   **NAMED}.items():
        obj = bounded(lambda: requests.get(name=name, namespace=namespace, _request_timeout=10))
        assert_object(obj.to_dict(), namespace, name, cpu, memory, rule)


def test_dynamic_client_lists(rules_server, dynamic):
    requests = dynamic(rules_server)
    shop = bounded(lambda: requests.get(namespace="shop", _request_timeout=10)).to_dict()
    assert shop["kind"] == "RequestsList" and re.fullmatch(r"[1-9]\d*", shop["metadata"]["resourceVersion"])
    assert [item["metadata"]["name"] for item in shop["items"]] == ["checkout", "search"]
    for item in shop["items"]:
        assert_object(item, "shop", item["metadata"]["name"], *NAMED[("shop", item["metadata"]["name"])])
    everywhere = bounded(lambda: requests.get(_request_timeout=10)).to_dict()
    assert {(item["metadata"]["namespace"], item["metadata"]["name"]) for item in everywhere["items"]} == set(NAMED)
    assert everywhere["metadata"]["resourceVersion"] == shop["metadata"]["resourceVersion"]
    empty = bounded(lambda: requests.get(namespace="nobody-here", _request_timeout=10)).to_dict()
    assert empty["items"] == []


def test_dynamic_client_watch_starts_with_added_events(rules_server, dynamic):
    requests = dynamic(rules_server)

    def first_events():
        seen = []
        for event in requests.watch(namespace="shop", timeout=5):
            seen.append((event["type"], event["raw_object"]))
            if len(seen) == 2:
                break
        return seen

    events = bounded(first_events)
    assert [(kind, obj["metadata"]["name"]) for kind, obj in events] == [("ADDED", "checkout"), ("ADDED", "search")]
    for _, obj in events:
        assert_object(obj, "shop", obj["metadata"]["name"], *NAMED[("shop", obj["metadata"]["name"])])


def test_dynamic_client_watch_ends_at_its_timeout(server, dynamic):
    requests = dynamic(server)
    started = time.monotonic()
    events = bounded(lambda: list(requests.watch(namespace="default", timeout=1)))
    assert events == []
    assert 0.5 <= time.monotonic() - started < 15


@pytest.mark.parametrize("name,namespace,fragment", [("Bad_Name", "default", "Name parameter invalid: 'Bad_Name'"),
                                                     ("web", "Bad_NS", "namespace 'Bad_NS' is not valid")])
def test_dynamic_client_bad_request_is_an_api_exception_with_a_status(server, dynamic, name, namespace, fragment):
    from kubernetes.client.exceptions import ApiException

    requests = dynamic(server)
    with pytest.raises(ApiException) as raised:
        bounded(lambda: requests.get(name=name, namespace=namespace, _request_timeout=10))
    assert raised.value.status == 400
    body = json.loads(raised.value.body)
    assert body["kind"] == "Status" and body["apiVersion"] == "v1" and body["status"] == "Failure", body
    assert body["code"] == 400 and body["reason"] == "BadRequest", body
    assert fragment in body["message"], body
