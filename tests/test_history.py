"""Usage history end to end: reqapi's refresher, storage and objects against real metrics engines.

The history is tests/test_metrics_engines.py's (six workloads written as cAdvisor and
kube-state-metrics series, backfilled into Debian's Prometheus 2.42 and imported into
VictoriaMetrics 1.79).  reqapi reads it through `--history-as-of` (the last written day) with a
3-day window, so its answers are a pure function of days 2-4 of the traces.

Test doubles appear only for faults a real engine cannot be made to produce on demand, and each
says so: a server that accepts and never answers (hung), and an HTTP server answering HTML (a
URL pointing at a proxy or a UI instead of the API).
"""

from __future__ import annotations

import http.server
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "evaluation"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import metrics_engines as me              # noqa: E402
import reqapi                             # noqa: E402
import test_metrics_engines as tme        # noqa: E402
import traces                             # noqa: E402
from conftest import REQAPI, Kubectl, free_port, wait_until, write_rules   # noqa: E402

GV = "/apis/k8s.wujiuye.com/v1beta1"
WINDOW = 3                                        # days 2-4 of the written traces
AS_OF_DAY = traces.EPOCH_DAY + tme.WRITTEN_DAYS[-1]        # the last completed day used
AS_OF = time.strftime("%Y-%m-%d", time.gmtime(AS_OF_DAY * 86400))
HISTORY_FLAGS = ["--history-as-of", AS_OF, "--history-window", f"{WINDOW}d"]
RULES = {
    "defaults": {"cpu": "100m", "memory": "100Mi"},
    "min": {"cpu": "10m", "memory": "16Mi"},
    "max": {"cpu": "16", "memory": "64Gi"},
    "rules": [
        {"id": "shop-api", "namespace": "shop", "name": "api", "cpu": "1", "memory": "1Gi"},
        {"id": "trial", "namespace": "shop", "name": "cache", "history": "shadow"},
        {"id": "pinned", "namespace": "ops", "name": "worker", "history": "off"},
        {"id": "reserved", "namespace": "shop", "name": "checkout", "cpu": "2", "memory": "3Gi"},
    ],
}
HISTORY_WORKLOADS = {("shop", "api"), ("shop", "cache"), ("shop", "web"), ("ops", "worker"), ("batch", "report")}


# ---- the engines (the same data as tests/test_metrics_engines.py) ----------------------------------

@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tme.History:
    return tme.History(tmp_path_factory.mktemp("openmetrics"))


@pytest.fixture(scope="module")
def blocks(history: tme.History, tmp_path_factory: pytest.TempPathFactory) -> Path:
    me.require(me.PROMETHEUS, me.PROMTOOL)
    path = tmp_path_factory.mktemp("blocks")
    me.backfill(history.files, path)
    return path


@pytest.fixture(scope="module")
def prometheus(blocks: Path, history: tme.History, tmp_path_factory: pytest.TempPathFactory) -> Iterator[me.Engine]:
    engine = me.start_prometheus(blocks, tmp_path_factory.mktemp("prometheus"))
    try:
        me.wait_for_samples(engine, history.samples, history.end, len(tme.WRITTEN_DAYS))
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def victoriametrics(history: tme.History, tmp_path_factory: pytest.TempPathFactory) -> Iterator[me.Engine]:
    me.require(me.VICTORIA)
    engine = me.start_victoriametrics(tmp_path_factory.mktemp("victoriametrics"), history.files)
    try:
        me.wait_for_samples(engine, history.samples, history.end, len(tme.WRITTEN_DAYS))
        yield engine
    finally:
        engine.stop()


@pytest.fixture(params=["prometheus", "victoriametrics"])
def engine(request: pytest.FixtureRequest) -> me.Engine:
    return request.getfixturevalue(request.param)


class InProcess:
    """A refresher in this process, as a replica would run it, with its log in a file."""

    def __init__(self, url: str, directory: Path, **settings) -> None:
        self.settings = reqapi.HistorySettings(url=url, window_days=WINDOW, as_of=AS_OF_DAY + 1, **settings)
        self.rules = reqapi.parse_rules(RULES, "rules.json")
        self.history = reqapi.RulesHistory(self.rules, reqapi.pending_history(self.settings))
        self.metrics = reqapi.Metrics()
        self.health = reqapi.Health(self.history, reqapi.Access(reqapi.AlwaysAllow()), self.metrics)
        self.log_path = directory / "refresher.log"
        self.fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self.refresher = reqapi.HistoryRefresher(self.settings, self.history, self.health, self.metrics,
                                                 reqapi.Logger(fd=self.fd),
                                                 reqapi.prometheus_ssl_context(self.settings))

    def log(self) -> str:
        return self.log_path.read_text()


# ---- the aggregates reqapi reads ----------------------------------------------------------------------

def test_the_refresher_reads_what_the_offline_emulation_computes(engine: me.Engine, history: tme.History,
                                                                 tmp_path: Path) -> None:
    replica = InProcess(engine.url, tmp_path)
    assert replica.refresher.refresh(), replica.log()
    snapshot = replica.history.current.history
    assert snapshot.status == reqapi.HISTORY_FRESH and snapshot.today == AS_OF_DAY + 1
    compared, mismatches = 0, []
    for w in history.workloads:
        kinds = {u.kind: u for u in snapshot.workloads[(w.namespace, w.name)]}
        containers = dict(kinds[w.kind].containers)
        for c in w.trace.containers:
            offline = {u.day: u for u in traces.day_usage(c, tme.COMPARED_DAYS.start, tme.COMPARED_DAYS.stop,
                                                          tme.RATE_MINUTES)}
            online = {d.day: d for d in containers[c.name]}
            assert sorted(online) == sorted(offline), (w.name, c.name)
            for day, want in offline.items():
                got = online[day]
                for field in ("samples", "cpu_p95_m", "cpu_p99_m", "memory_peak_mi", "cpu_throttled_ratio"):
                    # The CronJob's 35-60 minute runs: the engines' rate() at a series' edges moves its
                    # p99 by up to ~4% (tests/test_metrics_engines.py explains it point by point).
                    rel = 0.05 if (field == "cpu_p99_m" and want.samples < traces.MINUTES_PER_DAY) else 0.02
                    a, b = getattr(got, field), getattr(want, field)
                    if not math.isclose(a, b, rel_tol=rel, abs_tol=1e-6):
                        mismatches.append(f"{engine.kind} {w.kind}/{w.name}/{c.name} {day} {field}: {a} vs {b}")
                for field in ("oom_kills", "cpu_limit_m", "memory_limit_mi"):
                    if getattr(got, field) != getattr(want, field):
                        mismatches.append(f"{engine.kind} {w.name}/{c.name} {day} {field}")
                compared += 1
    assert not mismatches, "\n".join(mismatches)
    assert compared == 7 * len(tme.COMPARED_DAYS)
    # The Deployment and the CronJob named report stay apart; the Deployment answers the object.
    assert [u.kind for u in snapshot.workloads[("batch", "report")]] == ["Deployment", "CronJob"]
    assert "history refreshed" in replica.log() and f"as_of={AS_OF}" not in replica.log()


def test_two_replicas_agree_byte_for_byte_and_a_refresh_without_a_new_day_changes_nothing(
        prometheus: me.Engine, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = InProcess(prometheus.url, tmp_path / "a"), InProcess(prometheus.url, tmp_path / "b")
    assert a.refresher.refresh() and b.refresher.refresh()
    ga, gb = a.history.current, b.history.current
    assert ga.resource_version == gb.resource_version != reqapi.resource_version_of(a.rules.digest)
    for key in sorted(HISTORY_WORKLOADS):
        assert reqapi.requests_object_json(*key, ga.prediction(*key), ga.resource_version, 0) == \
            reqapi.requests_object_json(*key, gb.prediction(*key), gb.resource_version, 0)
    # Steady state: the next refresh finds no new completed day and installs nothing.
    assert a.refresher.refresh() and a.history.current is ga
    assert "changed=False" in a.log()


def test_the_cache_directory_makes_a_restart_read_no_day_again(prometheus: me.Engine, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    first = InProcess(prometheus.url, tmp_path, cache_dir=str(cache))
    assert first.refresher.refresh()
    assert len(list(cache.glob("day-*.json"))) == WINDOW
    # A restart reads the cached days from the files: the engine is asked only whether it answers.
    again = InProcess(first.settings.url, tmp_path, cache_dir=str(cache))
    asked: list[str] = []
    real_fetch = again.refresher.client.fetch
    again.refresher.client.fetch = lambda path, params: asked.append(params["query"]) or real_fetch(path, params)
    assert again.refresher.refresh(), again.log()
    assert asked == ["vector(1)"]
    assert again.history.current.resource_version == first.history.current.resource_version
    # The cache key covers the URL, the headers and the matchers: another matcher reuses nothing.
    other = InProcess(f"http://127.0.0.1:{free_port()}", tmp_path, cache_dir=str(cache), matchers=('cluster="x"',))
    assert other.refresher._cache_key != again.refresher._cache_key
    assert not other.refresher.refresh() and other.refresher.query_errors == 1


# ---- the server: objects, Table, list, watch, --predict -----------------------------------------------

def get_json(server, path: str, **headers) -> dict:
    answer = server.get(path, headers=headers)
    assert answer.status == 200, (path, answer)
    return answer.json()


def test_objects_table_list_and_predict_show_the_history_answers(start_server, engine: me.Engine,
                                                                 tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules.json", RULES)
    server = start_server("--rules", str(rules), "--prometheus-url", engine.url, *HISTORY_FLAGS)
    server.wait_for_log(r"history refreshed .*workloads=5", timeout=60)
    assert wait_until(lambda: server.try_get("/readyz") == 200, timeout=10)
    # Shadow mode is logged: what history would answer for the rule "trial".
    server.wait_for_log(r"history shadow namespace=shop name=cache rule=trial serving=100m/100Mi "
                        r"history=\d+m?/\d+[MG]i source=blend")
    replica = InProcess(engine.url, tmp_path)
    assert replica.refresher.refresh()
    generation = replica.history.current

    api = get_json(server, f"{GV}/namespaces/shop/requests/api")
    annotations = api["metadata"]["annotations"]
    assert annotations == {"k8s.wujiuye.com/rule": "shop-api", "k8s.wujiuye.com/source": "blend"}
    assert api["metadata"]["resourceVersion"] == generation.resource_version        # replicas agree
    want = generation.prediction("shop", "api")
    assert api["resources"] == {"cpu": want.cpu, "memory": want.memory} != {"cpu": "1", "memory": "1Gi"}
    basis = api["basis"]
    assert basis["mode"] == "on" and basis["kind"] == "Deployment" and basis["window"] == "3d"
    assert basis["days"] == 3 and basis["confidence"] == round(3 / 7, 3) and basis["asOf"] == time.strftime(
        "%Y-%m-%d", time.gmtime((AS_OF_DAY + 1) * 86400))
    assert basis["cpu"]["rule"] == "1" and basis["memory"]["rule"] == "1Gi"
    # A blend never goes below usage: the answer is at least the history value.
    assert reqapi.cpu_millicores(reqapi.parse_quantity(api["resources"]["cpu"])) >= \
        reqapi.cpu_millicores(reqapi.parse_quantity(basis["cpu"]["history"]))

    report = get_json(server, f"{GV}/namespaces/batch/requests/report")
    assert report["basis"]["kind"] == "Deployment" and report["basis"]["otherKinds"] == ["CronJob"]
    web = get_json(server, f"{GV}/namespaces/shop/requests/web")
    assert len(web["containers"]) == 2 and web["basis"]["container"] in {c["name"] for c in web["containers"]}
    main = next(c for c in web["containers"] if c["name"] == web["basis"]["container"])
    assert main["resources"] == web["resources"]
    # An HPA scales web on CPU utilisation: CPU keeps the rule's answer, memory follows history.
    assert web["basis"]["hpaScaled"] == ["cpu"] and web["metadata"]["annotations"]["k8s.wujiuye.com/source"] == "blend"
    assert all(c["resources"]["cpu"] == "100m" for c in web["containers"])
    assert web["resources"]["memory"] == web["basis"]["memory"]["clamped"] != "100Mi"
    cache = get_json(server, f"{GV}/namespaces/shop/requests/cache")        # shadow: the rule answers
    assert cache["metadata"]["annotations"]["k8s.wujiuye.com/source"] == "rules"
    assert cache["resources"] == {"cpu": "100m", "memory": "100Mi"} and cache["basis"]["reason"] == "Shadow"
    assert cache["basis"]["memory"]["oomKills"] >= 2 and cache["basis"]["memory"]["history"] != "100Mi"
    worker = get_json(server, f"{GV}/namespaces/ops/requests/worker")      # pinned to the rule
    assert worker["basis"]["reason"] == "PinnedToRules" and worker["basis"]["mode"] == "off"
    assert worker["basis"]["cpu"]["cappedDays"] >= 1
    nobody = get_json(server, f"{GV}/namespaces/shop/requests/unknown")
    assert nobody["basis"]["reason"] == "NoHistory" and nobody["resources"] == {"cpu": "100m", "memory": "100Mi"}

    listed = get_json(server, f"{GV}/requests")
    names = {(i["metadata"]["namespace"], i["metadata"]["name"]) for i in listed["items"]}
    assert names == HISTORY_WORKLOADS | {("shop", "checkout")}
    page = get_json(server, f"{GV}/requests?limit=4")          # lists paginate as without history
    assert len(page["items"]) == 4 and page["metadata"]["remainingItemCount"] == 2
    rest = get_json(server, f"{GV}/requests?limit=4&continue={page['metadata']['continue']}")
    assert [i["metadata"]["name"] for i in page["items"] + rest["items"]] == [i["metadata"]["name"] for i in listed["items"]]
    table = get_json(server, f"{GV}/requests", Accept="application/json;as=Table;v=v1;g=meta.k8s.io")
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "CPU", "Memory", "Rule", "Source", "Age"]
    cells = {row["cells"][0]: row["cells"] for row in table["rows"]}
    assert cells["api"][1:5] == [want.cpu, want.memory, "shop-api", "blend"]
    # The real kubectl: `kubectl get requests -A` shows the history answers and their source.
    kubectl = Kubectl(server, tmp_path / "kubectl")
    printed_table = kubectl.run("get", "requests", "-A").stdout.splitlines()
    print("\n".join(printed_table))
    assert printed_table[0].split() == ["NAMESPACE", "NAME", "CPU", "MEMORY", "RULE", "SOURCE", "AGE"]
    assert ["shop", "api", want.cpu, want.memory, "shop-api", "blend"] in [line.split()[:6] for line in printed_table]
    explained = kubectl.run("explain", "requests.basis").stdout
    assert "hpaScaled" in explained and "otherKinds" in explained and "confidence" in explained
    assert "maxClampBelowUsage" in kubectl.run("explain", "requests.basis.cpu").stdout
    openapi = get_json(server, "/openapi/v3/apis/k8s.wujiuye.com/v1beta1")
    assert {"basis", "containers"} <= set(openapi["components"]["schemas"]["com.wujiuye.k8s.v1beta1.Requests"]["properties"])
    metrics = server.get("/metrics").text
    assert "reqapi_history_workloads 5" in metrics and "reqapi_history_query_errors 0" in metrics

    done = subprocess.run([sys.executable, str(REQAPI), "--rules", str(rules), "--prometheus-url", engine.url,
                           *HISTORY_FLAGS, "--predict", "shop/api"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    for document in (printed, api):
        document["metadata"].pop("creationTimestamp")
    assert printed == api


def test_without_prometheus_url_the_object_and_openapi_are_as_before(start_server, tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules.json", RULES)
    server = start_server("--rules", str(rules))
    obj = get_json(server, f"{GV}/namespaces/shop/requests/api")
    assert set(obj) == {"kind", "apiVersion", "metadata", "resources"}
    assert obj["metadata"]["annotations"] == {"k8s.wujiuye.com/rule": "shop-api"}
    openapi = server.get("/openapi/v2").body
    assert openapi == reqapi.dumps(reqapi.openapi_v2_document()) and b"basis" not in openapi
    table = get_json(server, f"{GV}/requests", Accept="application/json;as=Table;v=v1;g=meta.k8s.io")
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "CPU", "Memory", "Rule", "Age"]
    assert "reqapi_history" not in server.get("/metrics").text


class WatchReader:
    """The events of one watch, read line by line from its own connection."""

    def __init__(self, server, path: str) -> None:
        self.connection = server.connection(timeout=90)
        self.connection.request("GET", path)
        self.response = self.connection.getresponse()
        assert self.response.status == 200

    def next(self) -> dict:
        line = self.response.readline()
        assert line, "the watch ended"
        return json.loads(line)

    def close(self) -> None:
        self.connection.close()


def test_the_engine_going_away_and_coming_back(start_server, blocks: Path, tmp_path: Path) -> None:
    port = free_port()
    rules = write_rules(tmp_path / "rules.json", RULES)
    server = start_server("--rules", str(rules), "--prometheus-url", f"http://127.0.0.1:{port}", *HISTORY_FLAGS,
                          "--history-refresh", "1s", "--history-max-age", "3s", "--history-warmup", "60s")
    # Nothing listens yet: the first refresh fails, readiness settles on the rules.
    server.wait_for_log(r"history refresh failed.*cannot reach the metrics engine")
    assert wait_until(lambda: server.try_get("/readyz") == 200, timeout=10)
    api = get_json(server, f"{GV}/namespaces/shop/requests/api")
    assert api["metadata"]["annotations"]["k8s.wujiuye.com/source"] == "rules"
    assert api["basis"]["reason"] == "HistoryPending" and api["resources"] == {"cpu": "1", "memory": "1Gi"}
    watch = WatchReader(server, f"{GV}/namespaces/shop/requests?watch=1&fieldSelector=metadata.name%3Dapi"
                                f"&timeoutSeconds=120")
    engine = None
    try:
        first = watch.next()
        assert first["type"] == "ADDED" and first["object"]["basis"]["reason"] == "HistoryPending"
        engine = me.start_prometheus(blocks, tmp_path / "prometheus", port=port)
        modified = watch.next()           # the first successful refresh: history answers
        assert modified["type"] == "MODIFIED", modified
        assert modified["object"]["metadata"]["annotations"]["k8s.wujiuye.com/source"] == "blend"
        version = modified["object"]["metadata"]["resourceVersion"]
        # Refreshes that find no new day publish nothing (a watch sees MODIFIED at most once a day).
        server.wait_for_log(r"history refreshed .*changed=False")
        engine.stop()
        engine = None
        # The last good history keeps answering until --history-max-age, then the rules answer.
        server.wait_for_log(r"history refresh failed")
        stale = watch.next()
        assert stale["type"] == "MODIFIED" and stale["object"]["basis"]["reason"] == "HistoryStale", stale
        assert stale["object"]["resources"] == {"cpu": "1", "memory": "1Gi"}
        assert stale["object"]["metadata"]["resourceVersion"] != version
        verbose = server.get("/readyz?verbose")
        assert verbose.status == 200 and "warn: history: stale" in verbose.text
        server.wait_for_log(r"history is stale: the rules answer until a refresh succeeds")
        # It comes back: the same history, the same resourceVersion as before it went away.
        engine = me.start_prometheus(blocks, tmp_path / "prometheus", port=port)
        back = watch.next()
        assert back["type"] == "MODIFIED" and back["object"]["metadata"]["resourceVersion"] == version
    finally:
        watch.close()
        if engine is not None:
            engine.stop()


# ---- faults a real engine cannot be made to produce ---------------------------------------------------

@pytest.fixture()
def hung_engine() -> Iterator[str]:
    """TEST DOUBLE: a listener that accepts and never answers (a hung engine or a black-holed proxy):
    a real engine cannot be made to hang on demand."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for s in accepted:
        s.close()
    listener.close()


def test_a_hung_engine_delays_readiness_only_until_the_refresh_gives_up_and_never_a_get(
        start_server, hung_engine: str, tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules.json", RULES)
    server = start_server("--rules", str(rules), "--prometheus-url", hung_engine, *HISTORY_FLAGS,
                          "--prometheus-timeout", "5s", "--history-warmup", "120s")
    # The first refresh waits 2 x 5 s (a timeout and its retry): meanwhile not ready...
    first = server.get("/readyz?verbose")
    assert first.status == 503 and "[-]history failed: waiting for the first history refresh" in first.text
    # ...but every GET answers at once, from the rules.
    api = get_json(server, f"{GV}/namespaces/shop/requests/api")
    assert api["basis"]["reason"] == "HistoryPending"
    server.wait_for_log(r"history refresh failed.*timed out", timeout=60)
    assert server.get("/readyz").status == 200            # settled long before the 120 s warm-up
    assert "reqapi_history_query_errors 1" in server.get("/metrics").text


def test_readiness_waits_no_longer_than_the_warm_up(start_server, hung_engine: str, tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules.json", RULES)
    server = start_server("--rules", str(rules), "--prometheus-url", hung_engine, *HISTORY_FLAGS,
                          "--prometheus-timeout", "120s", "--history-warmup", "1s")
    # The refresh hangs for minutes (2 x 120 s); readiness gives up waiting after the 1 s warm-up.
    assert wait_until(lambda: server.try_get("/readyz") == 200, timeout=30), server.log()
    assert "history refresh failed" not in server.log() and "history refreshed" not in server.log()
    verbose = server.get("/readyz?verbose").text
    assert "[+]history ok" in verbose and "warn: history: the first refresh is under way" in verbose


class _HTMLHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = b"<html><body>Grafana login</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_an_answer_that_is_not_json_is_a_clear_error(tmp_path: Path) -> None:
    """TEST DOUBLE: an HTTP server answering HTML - what a URL pointing at a UI or a login proxy
    answers; a real engine's API never does."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HTMLHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        replica = InProcess(f"http://127.0.0.1:{server.server_address[1]}", tmp_path)
        assert not replica.refresher.refresh()
        assert "answered text/html, not JSON (is --prometheus-url the engine's API root?)" in replica.log()
        assert replica.history.current.history.status == reqapi.HISTORY_PENDING
        assert "history: no refresh has succeeded yet" in " ".join(replica.health.warnings("readyz"))
    finally:
        server.shutdown()


def test_an_engine_error_is_logged_with_the_engines_message(prometheus: me.Engine, tmp_path: Path) -> None:
    # A real engine refusing a query: a matcher it cannot parse as a regex.
    replica = InProcess(prometheus.url, tmp_path, matchers=('cluster=~"("',))
    assert not replica.refresher.refresh()
    assert "bad_data" in replica.log() and replica.refresher.query_errors == 1


def test_nan_negative_and_huge_values_are_refused_per_pod_day() -> None:
    """Values an engine can return (NaN from a NaN sample, a negative gauge, a counter reset gone
    wrong) in the engine's own JSON shape, through the same parsing the refresher uses."""
    def vector(*rows: tuple[str, str]) -> dict:
        return {"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"namespace": "ns", "pod": pod, "container": "c"}, "value": [86400, value]}
            for pod, value in rows]}}
    empty = {"status": "success", "data": {"resultType": "vector", "result": []}}
    answers = {
        "container_memory_working_set_bytes": vector(("ok", "1048576"), ("neg", "-5"), ("huge", "1e300"),
                                                     ("nan", "1048576")),
        "count_over_time": vector(("ok", "1440"), ("neg", "1440"), ("huge", "1440"), ("nan", "1440")),
        "quantile_over_time": vector(("ok", "0.5"), ("neg", "0.5"), ("huge", "0.5"), ("nan", "NaN")),
    }

    def fetch(path: str, params: dict) -> dict:
        for needle, answer in answers.items():
            if needle in params["query"] and not params["query"].startswith("max by (namespace, pod, owner"):
                return answer
        return empty
    usage, _, refused = reqapi.read_workload_day(fetch, 0, reqapi.Selectors(), reqapi.DEFAULT_MAX_SAMPLES)
    assert refused == 2                                      # the negative and the huge memory peaks
    assert set(usage) == {("ns", "Pod", "ok", "c"), ("ns", "Pod", "nan", "c")}
    nan_day = usage[("ns", "Pod", "nan", "c")]
    assert math.isnan(nan_day.cpu_p95_m)
    # The estimator drops the NaN day rather than trust it: the rule answers that workload.
    rule = reqapi.RuleAnswer(cpu_m=100, memory_mi=100)
    assert reqapi.recommend([nan_day], rule, 1).source == reqapi.SOURCE_RULES


# ---- configuration ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--prometheus-url", "ftp://x"], "--prometheus-url 'ftp://x': not an http(s) URL"),
    (["--history-cache-dir", "/tmp"], "--history-cache-dir configures usage history, which needs --prometheus-url"),
    (["--prometheus-url", "http://p:9090", "--prometheus-matcher", "cluster=prod"], "not a PromQL label matcher"),
    (["--prometheus-url", "http://p:9090", "--prometheus-header", "X-Scope-OrgID"], "expected NAME=VALUE"),
    (["--prometheus-url", "http://p:9090", "--prometheus-username", "u"], "go together (basic auth)"),
    (["--prometheus-url", "http://p:9090", "--prometheus-token-file", "/nonexistent"], "cannot be read"),
    (["--prometheus-url", "http://p:9090", "--history-as-of", "yesterday"], "expected a UTC date YYYY-MM-DD"),
    (["--prometheus-url", "http://p:9090", "--history-max-age", "1m", "--history-refresh", "1h"],
     "shorter than --history-refresh"),
])
def test_bad_history_flags_are_refused_at_start_naming_the_flag(flags: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, str(REQAPI), "--predict", "a/b", *flags], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_rules_history_key_is_validated_and_leaves_other_digests_alone() -> None:
    plain = {"rules": [{"id": "a", "name": "x", "cpu": "1"}]}
    before = reqapi.parse_rules(plain, "r.json").digest
    assert before == reqapi.parse_rules(json.loads(json.dumps(plain)), "r.json").digest
    shadowed = reqapi.parse_rules({"rules": [{"id": "a", "name": "x", "cpu": "1", "history": "shadow"}]}, "r.json")
    assert shadowed.digest != before and shadowed.rules[0].history == "shadow"
    assert reqapi.parse_rules({"rules": [{"id": "p", "namespace": "db", "history": "off"}]}, "r").rules[0].history == "off"
    with pytest.raises(reqapi.RulesError, match=r'rules\[0\]\.history: history must be one of "on", "shadow", "off"'):
        reqapi.parse_rules({"rules": [{"id": "a", "name": "x", "cpu": "1", "history": "yes"}]}, "r.json")


def test_a_snapshot_is_a_pure_function_of_the_completed_days() -> None:
    day = reqapi.DayUsage(day=10, samples=1440, cpu_p95_m=200.0, cpu_p99_m=250.0, memory_peak_mi=300.0)
    later = dataclasses_replace(day, day=11)
    today = dataclasses_replace(day, day=12)          # not complete: left out
    a = reqapi.history_snapshot("fresh", "on", 12, 14, [(("n", "Deployment", "w", "c"), [later, day, today])])
    b = reqapi.history_snapshot("fresh", "on", 12, 14, [(("n", "Deployment", "w", "c"), [day, later])])
    assert a.digest == b.digest and dict(a.workloads) == dict(b.workloads)
    c = reqapi.history_snapshot("fresh", "on", 13, 14, [(("n", "Deployment", "w", "c"), [day, later])])
    assert c.digest != a.digest                       # a day completed


def dataclasses_replace(obj, **changes):
    import dataclasses
    return dataclasses.replace(obj, **changes)


# ---- authentication against a real Prometheus: TLS, a client certificate, basic auth ------------------

def test_tls_client_certificate_and_basic_auth_against_a_real_prometheus(blocks: Path, certs, tmp_path: Path) -> None:
    """Prometheus's own --web.config.file: a serving certificate, client certificates required from
    a CA, and a basic-auth user (a bcrypt hash).  reqapi's --prometheus-ca-file,
    --prometheus-client-cert/-key, --prometheus-username and --prometheus-password-file reach it;
    a wrong password is the engine's 401, named in the log."""
    import shutil
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # bcrypt hashes for Prometheus's web config (the crypt module is gone from Python 3.13)
        crypt = pytest.importorskip("crypt")
    from conftest import client_ca, client_cert
    ca, ca_file = client_ca(tmp_path / "clients", "metrics-clients")
    cert, key = client_cert(ca, tmp_path / "clients", "reqapi")
    web = tmp_path / "web.yml"
    web.write_text(json.dumps({
        "tls_server_config": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file),
                              "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": str(ca_file)},
        "basic_auth_users": {"reqapi": crypt.crypt("s3cret", crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 10))}}))
    data = tmp_path / "prometheus" / "data"
    shutil.copytree(blocks, data)
    (tmp_path / "prometheus.yml").write_text("global:\n  scrape_interval: 1m\n")
    port = free_port()
    argv = [me.PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={data}",
            "--storage.tsdb.retention.time=100y", f"--web.listen-address=127.0.0.1:{port}",
            f"--web.config.file={web}"]
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    engine = me.Engine("prometheus", f"https://127.0.0.1:{port}", process, log)
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    try:
        context = certs.client_context((cert, key))
        import urllib.request
        import base64

        def ready() -> bool:
            request = urllib.request.Request(engine.url + "/-/ready", headers={
                "Authorization": "Basic " + base64.b64encode(b"reqapi:s3cret").decode()})
            try:
                with urllib.request.urlopen(request, timeout=2, context=context) as r:
                    return r.status == 200
            except OSError:
                return False
        me.poll(ready, "prometheus with TLS and basic auth", process=process, log=log)
        auth = dict(ca_file=str(certs.ca_file), cert_file=str(cert), key_file=str(key), username="reqapi",
                    password_file=str(password))
        replica = InProcess(engine.url, tmp_path, **auth)
        assert replica.refresher.refresh(), replica.log()
        assert replica.refresher.workloads == 5
        password.write_text("wrong\n")            # read at each query: a rotated Secret takes effect
        again = InProcess(engine.url, tmp_path, **auth)
        assert not again.refresher.refresh()
        assert "HTTP 401 from the metrics engine" in again.log()
        without_cert = InProcess(engine.url, tmp_path, ca_file=str(certs.ca_file), username="reqapi",
                                 password_file=str(password))
        assert not without_cert.refresher.refresh() and "cannot reach the metrics engine" in without_cert.log()
    finally:
        engine.stop()


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self) -> None:
        _RecordingHandler.seen.append({k.lower(): v for k, v in self.headers.items()})
        body = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_bearer_token_file_is_re_read_when_it_changes_and_headers_are_sent(tmp_path: Path) -> None:
    """TEST DOUBLE: a server recording the request headers - neither real engine here checks a
    bearer token or a tenant header (a Mimir or a proxy in front of Prometheus does)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = tmp_path / "token"
    token.write_text("first-token\n")
    _RecordingHandler.seen = []
    try:
        replica = InProcess(f"http://127.0.0.1:{server.server_address[1]}", tmp_path, token_file=str(token),
                            headers=(("X-Scope-OrgID", "tenant-1"),))
        assert replica.refresher.refresh()
        assert {h["authorization"] for h in _RecordingHandler.seen} == {"Bearer first-token"}
        assert {h["x-scope-orgid"] for h in _RecordingHandler.seen} == {"tenant-1"}
        token.write_text("second-token-rotated\n")     # a projected token rotates: a new size and mtime
        _RecordingHandler.seen = []
        assert replica.refresher.refresh()
        assert {h["authorization"] for h in _RecordingHandler.seen} == {"Bearer second-token-rotated"}
    finally:
        server.shutdown()
