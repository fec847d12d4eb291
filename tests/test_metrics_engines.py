"""The refresher's PromQL against two real metrics engines: Prometheus and VictoriaMetrics.

Traces from tests/evaluation/traces.py are written as cAdvisor and kube-state-metrics series
(tests/evaluation/openmetrics.py), backfilled into Prometheus with promtool and imported into
VictoriaMetrics from the same OpenMetrics files. The per-day aggregates read through
tests/evaluation/promql.py must equal the offline aggregates `traces.day_usage` computes on the
same series (within 2%), pods must map to their workloads, and the CPU subqueries must fit under a
lowered sample limit only when chunked.

The pure parts of promql.py (chunk plans, parsing, owner resolution) are tested without engines.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "evaluation"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import metrics_engines as me       # noqa: E402
import openmetrics as om           # noqa: E402
import promql                      # noqa: E402
import traces                      # noqa: E402

SEED = 1                    # the leak of seed 1 is OOM-killed on trace days 2 and 4
WRITTEN_DAYS = range(1, 5)  # day 1 only warms up the rates and counters of day 2
COMPARED_DAYS = range(2, 5)
RATE_MINUTES = 2            # the estimator's rate window (Params.cpu_rate)


def _workloads() -> list[om.Workload]:
    return [
        om.Workload(traces.generate("steady", SEED), "shop", "Deployment", "api"),
        om.Workload(traces.generate("leak", SEED), "shop", "StatefulSet", "cache"),
        # Scaled by an HPA on CPU utilisation: its CPU keeps the rule's answer (tests/test_history.py).
        om.Workload(traces.generate("sidecar", SEED), "shop", "Deployment", "web", hpa=("cpu",)),
        om.Workload(traces.generate("throttled", SEED), "ops", "DaemonSet", "worker"),
        om.Workload(traces.generate("batch", SEED), "batch", "CronJob", "report"),
        # The same name as the CronJob, another kind: the mapping must keep them apart.
        om.Workload(traces.generate("diurnal", SEED), "batch", "Deployment", "report"),
    ]


class History:
    def __init__(self, directory: Path) -> None:
        started = time.monotonic()
        self.workloads = _workloads()
        assert any(WRITTEN_DAYS.start < m // traces.MINUTES_PER_DAY < WRITTEN_DAYS.stop
                   for m in self.workloads[1].trace.containers[0].oom_minutes), "the leak must OOM in the compared days"
        self.files = om.write_days(self.workloads, WRITTEN_DAYS, directory)
        self.samples: dict[str, int] = {}       # samples written, per metric name
        for f in self.files:
            for line in f.open():
                if not line.startswith("#"):
                    name = line[:line.index("{")]
                    self.samples[name] = self.samples.get(name, 0) + 1
        self.end = om.utc_midnight(WRITTEN_DAYS[-1])
        self.seconds = time.monotonic() - started


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return History(tmp_path_factory.mktemp("openmetrics"))


@pytest.fixture(scope="module")
def blocks(history: History, tmp_path_factory: pytest.TempPathFactory) -> Path:
    me.require(me.PROMETHEUS, me.PROMTOOL)
    path = tmp_path_factory.mktemp("blocks")
    me.backfill(history.files, path)
    return path


@pytest.fixture(scope="module")
def prometheus(blocks: Path, history: History, tmp_path_factory: pytest.TempPathFactory) -> Iterator[me.Engine]:
    engine = me.start_prometheus(blocks, tmp_path_factory.mktemp("prometheus"))
    try:
        me.wait_for_samples(engine, history.samples, history.end, len(WRITTEN_DAYS))
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def victoriametrics(history: History, tmp_path_factory: pytest.TempPathFactory) -> Iterator[me.Engine]:
    me.require(me.VICTORIA)
    engine = me.start_victoriametrics(tmp_path_factory.mktemp("victoriametrics"), history.files)
    try:
        me.wait_for_samples(engine, history.samples, history.end, len(WRITTEN_DAYS))
        yield engine
    finally:
        engine.stop()


@pytest.fixture(params=["prometheus", "victoriametrics"])
def engine(request: pytest.FixtureRequest) -> me.Engine:
    return request.getfixturevalue(request.param)


def fetcher(engine: me.Engine) -> promql.Fetch:
    return lambda path, params: promql.http_query(engine.url, path, params, timeout_s=120)


def read_workload_days(engine: me.Engine, selectors: promql.Selectors = promql.Selectors(),
                       max_samples: int = promql.DEFAULT_MAX_SAMPLES
                       ) -> dict[tuple[promql.WorkloadRef, str], dict[int, promql.PodDay]]:
    fetch = fetcher(engine)
    owners = promql.read_owners(fetch, traces.EPOCH_DAY + COMPARED_DAYS[-1], len(WRITTEN_DAYS), selectors)
    days = [promql.read_day(fetch, traces.EPOCH_DAY + d, selectors, max_samples) for d in COMPARED_DAYS]
    return promql.workload_days(days, owners)


def close(a: float, b: float, rel: float = 0.02, abs_: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


# ---- against the engines ------------------------------------------------------------------------

def test_day_aggregates_equal_the_offline_emulation(engine: me.Engine, history: History) -> None:
    read = read_workload_days(engine)
    compared = 0
    mismatches: list[str] = []
    for w in history.workloads:
        ref = promql.WorkloadRef(w.namespace, w.kind, w.name)
        for c in w.trace.containers:
            offline = {u.day: u for u in traces.day_usage(c, COMPARED_DAYS.start, COMPARED_DAYS.stop, RATE_MINUTES)}
            online = read.get((ref, c.name), {})
            assert sorted(online) == sorted(offline), (ref, c.name)
            for day, want in offline.items():
                got = online[day]
                where = f"{engine.kind} {ref.kind}/{ref.name}/{c.name} day {day}"
                for field in ("samples", "cpu_p95_m", "cpu_p99_m", "memory_peak_mi", "cpu_throttled_ratio"):
                    a, b = getattr(got, field), getattr(want, field)
                    # A pod that starts and ends within the day (a CronJob run, 35-60 minutes): at
                    # a series' edges both engines' rate() differs from traces._rolling (no rate at
                    # its first minute, one minute's usage at its second, and one more point a
                    # minute after it ends: the last minute's usage). Two of ~40 points differ; the
                    # p99 - between the two largest - moves by up to ~4% (the p95 stays within 2%).
                    rel = 0.05 if (field == "cpu_p99_m" and want.samples < traces.MINUTES_PER_DAY) else 0.02
                    if not close(a, b, rel=rel, abs_=1e-6):
                        mismatches.append(f"{where} {field}: {a:.6g} vs offline {b:.6g} ({(a - b) / b:+.2%})")
                for field in ("oom_kills", "cpu_limit_m", "memory_limit_mi"):
                    if getattr(got, field) != getattr(want, field):
                        mismatches.append(f"{where} {field}: {getattr(got, field)} vs offline {getattr(want, field)}")
                compared += 1
    assert not mismatches, "\n".join(mismatches)
    # 7 containers x 3 days; the leak's OOM kills and the throttled worker's capped days are among them.
    assert compared == 7 * len(COMPARED_DAYS)
    # Nothing else: the pod-level cgroups and pause containers, which the data holds, are filtered out.
    assert set(read) == {(promql.WorkloadRef(w.namespace, w.kind, w.name), c.name)
                         for w in history.workloads for c in w.trace.containers}
    excluded = me.instant(engine, 'count(last_over_time(container_memory_working_set_bytes{container=~"|POD"}[1d]))',
                          promql.day_end(traces.EPOCH_DAY + COMPARED_DAYS[0]))
    assert int(excluded["data"]["result"][0]["value"][1]) == 2 * len(history.workloads)
    leak = read[(promql.WorkloadRef("shop", "StatefulSet", "cache"), "cache")]
    assert sum(d.oom_kills for d in leak.values()) >= 2
    worker = read[(promql.WorkloadRef("ops", "DaemonSet", "worker"), "worker")]
    assert all(d.cpu_throttled_ratio > 0.05 for d in worker.values())


def test_the_engines_agree_with_each_other(prometheus: me.Engine, victoriametrics: me.Engine) -> None:
    """What differs between Prometheus 2.42 and VictoriaMetrics 1.79 on the same samples.

    * Range boundaries: Prometheus 2.x ranges are closed at both ends, VictoriaMetrics' are
      left-open. A day's `[1d]` at its ending midnight holds 1441 samples in Prometheus (the
      previous day's midnight sample too) and 1440 in VictoriaMetrics when a scrape falls on the
      midnight; the `[1d:1m]` subquery likewise has 1441 points vs 1440. The CPU quantiles differ
      by that one point (under 0.1% here).
    * A series' first minutes: at a new series' second sample Prometheus extrapolates rate()
      towards the series' start, VictoriaMetrics does not; on a 35-60 minute CronJob pod the
      daily CPU p99 differs by ~1%.
    * Everything else (working-set peaks, throttled shares, OOM kills, limits) is the same, to
      VictoriaMetrics' storage precision (decimal, ~15 significant digits)."""
    prom, vm = read_workload_days(prometheus), read_workload_days(victoriametrics)
    assert sorted(prom, key=repr) == sorted(vm, key=repr)
    differences = []
    for key, days in prom.items():
        for day, p in days.items():
            v = vm[key][day]
            where = f"{key[0].kind}/{key[0].name}/{key[1]} {day}"
            for field in ("memory_peak_mi", "cpu_throttled_ratio", "oom_kills", "cpu_limit_m", "memory_limit_mi"):
                a, b = getattr(p, field), getattr(v, field)
                # VictoriaMetrics stores a value as a decimal mantissa and exponent: the last of a
                # float's 17 significant digits can change (a 1e-15 relative difference).
                if not (a == b or (a is not None and b is not None and close(a, b, rel=1e-12))):
                    differences.append(f"{where} {field}: prometheus {getattr(p, field)} vm {getattr(v, field)}")
            whole_day = v.samples == traces.MINUTES_PER_DAY
            # A pod that ran through the previous midnight has a sample there: Prometheus counts it.
            if p.samples != v.samples + (1 if whole_day else 0):
                differences.append(f"{where} samples: prometheus {p.samples} vm {v.samples}")
            for field in ("cpu_p95_m", "cpu_p99_m"):
                if not close(getattr(p, field), getattr(v, field), rel=0.001 if whole_day else 0.02):
                    differences.append(f"{where} {field}: prometheus {getattr(p, field)} vm {getattr(v, field)}")
    assert not differences, "\n".join(differences)


def engine_rates_of_a_run(kind: str, used: list[float], start: int, end: int) -> list[float]:
    """An engine's `rate(x[2m])` at each minute of a series that runs minutes [start, end).

    Inside the run the window holds the samples of minutes m-2..m: the mean of two minutes' usage
    on both engines. At the run's first minute there is no rate (one sample). At its second,
    Prometheus 2.42 extrapolates the increase to the window's start, but not past where the
    counter would have been zero (its first value is one minute's usage):
    (u[a+1] + min(u[a], u[a+1])) / 2; VictoriaMetrics takes the first sample as its base: u[a+1].
    A minute after the run both still see its last two samples: u[b-1]."""
    a, b = start, end
    second = (used[a + 1] + min(used[a], used[a + 1])) / 2 if kind == "prometheus" else used[a + 1]
    return [second] + [(used[m - 1] + used[m]) / 2 for m in range(a + 2, b)] + [used[b - 1]]


def test_rate_at_series_edges_explains_the_cronjob_difference(engine: me.Engine, history: History) -> None:
    # The CronJob is the one workload the offline emulation misses by more than 2% (p99): with
    # each engine's edge arithmetic emulated, its quantiles agree to float precision.
    w = next(w for w in history.workloads if w.kind == "CronJob")
    read = read_workload_days(engine)[(promql.WorkloadRef(w.namespace, w.kind, w.name), "report")]
    used = w.trace.containers[0].cpu_used
    for day in COMPARED_DAYS:
        runs = [(s.start, s.end) for s in om.pods(w) if s.start // traces.MINUTES_PER_DAY == day]
        assert len(runs) == 1 and runs[0][1] // traces.MINUTES_PER_DAY == day
        rates = sorted(engine_rates_of_a_run(engine.kind, used, *runs[0]))
        got = read[traces.EPOCH_DAY + day]
        assert got.samples == len(rates) == runs[0][1] - runs[0][0]
        assert close(got.cpu_p95_m, traces.quantile(rates, 0.95), rel=1e-9), (day, got)
        assert close(got.cpu_p99_m, traces.quantile(rates, 0.99), rel=1e-9), (day, got)


def test_pods_map_to_their_workloads(engine: me.Engine, history: History) -> None:
    owners = promql.read_owners(fetcher(engine), traces.EPOCH_DAY + COMPARED_DAYS[-1], len(WRITTEN_DAYS))
    want: dict[tuple[str, str], promql.WorkloadRef] = {}
    for w in history.workloads:
        for span in om.pods(w):
            if span.start < WRITTEN_DAYS.stop * traces.MINUTES_PER_DAY and span.end > WRITTEN_DAYS.start * traces.MINUTES_PER_DAY:
                want[(span.namespace, span.pod)] = promql.WorkloadRef(w.namespace, w.kind, w.name)
    assert owners == want
    # A CronJob's pods (one Job per run) and a Deployment's pod (through its ReplicaSet) share a
    # name prefix and a namespace, and still map apart.
    cron = {pod for (ns, pod), ref in owners.items() if ref == promql.WorkloadRef("batch", "CronJob", "report")}
    assert len(cron) == len(WRITTEN_DAYS)
    assert all(pod.startswith("report-2880") for pod in cron)
    deploy = [pod for (ns, pod), ref in owners.items() if ref == promql.WorkloadRef("batch", "Deployment", "report")]
    assert len(deploy) == 1 and deploy[0] not in cron


def test_extra_label_matchers_select_the_cluster(engine: me.Engine) -> None:
    prod = promql.Selectors(extra=(f'cluster="{om.CLUSTER}"',))
    other = promql.Selectors(extra=('cluster="staging"',))
    day = traces.EPOCH_DAY + COMPARED_DAYS[0]
    fetch = fetcher(engine)
    assert promql.read_day(fetch, day, prod) == promql.read_day(fetch, day)
    assert promql.read_day(fetch, day, other) == {}
    assert promql.read_owners(fetch, day, 1, other) == {}


def test_query_range_with_a_daily_step_reads_the_same_days(engine: me.Engine) -> None:
    # The cheap queries (no subquery) can ask for several days in one query_range.
    fetch = fetcher(engine)
    first, last = traces.EPOCH_DAY + COMPARED_DAYS[0], traces.EPOCH_DAY + COMPARED_DAYS[-1]
    ranged = promql.by_container_day(fetch("/api/v1/query_range", promql.range_params(
        promql.q_memory_peak(promql.Selectors()), first, last)))
    for day in range(first, last + 1):
        one = promql.by_container(fetch("/api/v1/query", promql.instant_params(promql.q_memory_peak(promql.Selectors()), day)))
        assert one and {k: v for (k, d), v in ranged.items() if d == day} == one


@pytest.fixture(scope="module")
def limited_prometheus(blocks: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[me.Engine]:
    # Room for about 3 containers' day of per-minute rates (3 x 1441), not for the 7 of a day.
    engine = me.start_prometheus(blocks, tmp_path_factory.mktemp("prometheus-limited"), max_samples=LIMIT * 2)
    try:
        yield engine
    finally:
        engine.stop()


LIMIT = 4400      # the budget handed to the chunk planner; Prometheus's own limit is twice it


def test_chunking_keeps_the_cpu_subqueries_under_the_sample_limit(limited_prometheus: me.Engine,
                                                                  prometheus: me.Engine) -> None:
    day = traces.EPOCH_DAY + COMPARED_DAYS[0]
    s = promql.Selectors()
    unchunked = me.instant(limited_prometheus, promql.q_cpu_quantile(s, 0.95), promql.day_end(day))
    assert unchunked["status"] == "error"
    assert "too many samples" in unchunked["error"]
    with pytest.raises(promql.PromQueryError, match="too many samples"):
        promql.read_day(fetcher(limited_prometheus), day, s, max_samples=promql.DEFAULT_MAX_SAMPLES)
    memory = promql.by_container(me.instant(prometheus, promql.q_memory_peak(s), promql.day_end(day)))
    inventory: dict[tuple[str, str], int] = {}
    for ns, pod, _ in memory:
        inventory[(ns, pod)] = inventory.get((ns, pod), 0) + 1
    assert len(promql.plan_chunks(inventory, promql.max_series_per_query(LIMIT * 2))) > 1
    chunked = promql.read_day(fetcher(limited_prometheus), day, s, max_samples=LIMIT * 2)
    assert chunked == promql.read_day(fetcher(prometheus), day, s)
    # The planner's cost model holds: Prometheus's own peak count never exceeds it (plus the
    # couple of samples of the final vector: 2,884 for one container).
    for chunk in promql.plan_chunks(inventory, promql.max_series_per_query(LIMIT * 2)) + [""]:
        answer = me.instant(prometheus, promql.q_cpu_quantile(s, 0.95, chunk), promql.day_end(day), {"stats": "all"})
        peak = answer["data"]["stats"]["samples"]["peakSamples"]
        series = len(answer["data"]["result"])
        assert series and peak <= series * promql.SUBQUERY_SAMPLES_PER_SERIES + 8, (chunk, series, peak)


VM_LIMIT = 12_000     # -search.maxSamplesPerQuery for the limited VictoriaMetrics: two series' raw samples


@pytest.fixture(scope="module")
def limited_victoriametrics(history: History, tmp_path_factory: pytest.TempPathFactory) -> Iterator[me.Engine]:
    me.require(me.VICTORIA)
    engine = me.start_victoriametrics(tmp_path_factory.mktemp("victoriametrics-limited"), history.files,
                                      max_samples=VM_LIMIT)
    try:
        me.wait_for_rows(engine, sum(history.samples.values()))
        yield engine
    finally:
        engine.stop()


def test_chunking_on_victoriametrics_whose_limit_counts_raw_samples(limited_victoriametrics: me.Engine,
                                                                    victoriametrics: me.Engine) -> None:
    """VictoriaMetrics' -search.maxSamplesPerQuery counts raw samples read, not points kept - and
    (observed on 1.79, by bisecting the limit) every sample of the storage blocks it reads: a
    one-series, one-day query here is charged the series' 4 written days, 5,760 samples, whether
    it is the CPU subquery or the memory peak. So the memory query, which Prometheus streams
    series by series, fails unchunked too; chunked by the same planner with VictoriaMetrics' cost
    per series, both fit."""
    day = traces.EPOCH_DAY + COMPARED_DAYS[0]
    s = promql.Selectors()
    at = promql.day_end(day)
    charged = len(WRITTEN_DAYS) * traces.MINUTES_PER_DAY
    for query in (promql.q_cpu_quantile(s, 0.95), promql.q_memory_peak(s)):
        answer = me.instant(limited_victoriametrics, query, at)
        assert answer["status"] == "error" and "maxSamplesPerQuery" in answer["error"], answer
    memory = promql.by_container(me.instant(victoriametrics, promql.q_memory_peak(s), at))
    inventory: dict[tuple[str, str], int] = {}
    for ns, pod, _ in memory:
        inventory[(ns, pod)] = inventory.get((ns, pod), 0) + 1
    chunks = promql.plan_chunks(inventory, promql.max_series_per_query(VM_LIMIT, 1.0, charged))
    assert len(chunks) > 1
    for make in (lambda c: promql.q_cpu_quantile(s, 0.95, c), lambda c: promql.q_memory_peak(s, c)):
        merged: dict[promql.Key, float] = {}
        for chunk in chunks:
            part = promql.by_container(promql.http_query(limited_victoriametrics.url, "/api/v1/query",
                                                         promql.instant_params(make(chunk), day)))
            assert part and not set(part) & set(merged)
            merged.update(part)
        assert merged == promql.by_container(me.instant(victoriametrics, make(""), at))


def test_a_missing_engine_skips_or_fails_as_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv(me.REQUIRE_VARIABLE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed: prometheus, promtool"):
        me.require(me.PROMETHEUS, me.PROMTOOL)
    monkeypatch.setenv(me.REQUIRE_VARIABLE, "1")
    with pytest.raises(pytest.fail.Exception, match="REQAPI_REQUIRE_METRICS_ENGINES=1 requires them"):
        me.require(me.VICTORIA)


# ---- pure: no engine -----------------------------------------------------------------------------

def test_the_chunk_arithmetic_for_10000_pods_over_14_days() -> None:
    per_query = promql.max_series_per_query()
    assert per_query * promql.SUBQUERY_SAMPLES_PER_SERIES <= promql.DEFAULT_MAX_SAMPLES // 2
    assert per_query == 8674
    # 14 days in one query_range would hold 15 days of inner points per container: refused.
    assert 10_000 * 2 * 15 * 1440 > promql.DEFAULT_MAX_SAMPLES
    # 10,000 single-container pods in 40 namespaces: 2 chunks a day; two containers a pod: 3.
    for containers, chunks in ((1, 2), (2, 3)):
        pods = {(f"ns{i % 40}", f"pod-{i}"): containers for i in range(10_000)}
        assert len(promql.plan_chunks(pods, per_query)) == chunks


def test_chunk_plans_cover_every_pod_once_within_the_budget() -> None:
    import random
    import re
    rng = random.Random(7)
    pods = {(f"ns-{rng.randrange(6)}", f"p{i}.x-{rng.randrange(99)}"): rng.randrange(1, 4) for i in range(400)}
    for budget in (3, 10, 57, 1000):
        chunks = promql.plan_chunks(pods, budget)
        seen: dict[tuple[str, str], int] = {}
        for chunk in chunks:
            # PromQL string content -> the RE2 regex (here also a Python one), anchored like PromQL's.
            m = re.fullmatch(r'namespace=~"(.*)"', chunk)
            if m:
                selected = [k for k in pods if re.fullmatch(m.group(1).replace("\\\\", "\\"), k[0])]
            else:
                m = re.fullmatch(r'namespace="(.*)", pod=~"(.*)"', chunk)
                assert m, chunk
                selected = [k for k in pods if k[0] == m.group(1)
                            and re.fullmatch(m.group(2).replace("\\\\", "\\"), k[1])]
            size = sum(pods[k] for k in selected)
            assert size <= budget or len(selected) == 1, (budget, chunk, size)
            for k in selected:
                seen[k] = seen.get(k, 0) + 1
        assert seen == {k: 1 for k in pods}


def test_parse_result_reports_engine_errors_and_keeps_nan() -> None:
    with pytest.raises(promql.PromQueryError, match="execution: query processing would load too many samples"):
        promql.parse_result({"status": "error", "errorType": "execution",
                             "error": "query processing would load too many samples into memory in query execution"})
    with pytest.raises(promql.PromQueryError):
        promql.parse_result({"status": "success", "data": {"resultType": "scalar", "result": [1, "2"]}})
    with pytest.raises(promql.PromQueryError):
        promql.parse_result("<html>")
    got = promql.by_container({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"namespace": "a", "pod": "b", "container": "c"}, "value": [1, "NaN"]}]}})
    assert math.isnan(got[("a", "b", "c")])


def test_owner_resolution_covers_every_kind() -> None:
    def answer(rows: list[dict[str, str]]) -> dict:
        return {"status": "success", "data": {"resultType": "vector",
                                              "result": [{"metric": r, "value": [0, "1"]} for r in rows]}}
    pods = answer([
        {"namespace": "n", "pod": "d-1", "owner_kind": "ReplicaSet", "owner_name": "d-abc", "owner_is_controller": "true"},
        {"namespace": "n", "pod": "rs-1", "owner_kind": "ReplicaSet", "owner_name": "rs", "owner_is_controller": "true"},
        {"namespace": "n", "pod": "s-0", "owner_kind": "StatefulSet", "owner_name": "s", "owner_is_controller": "true"},
        {"namespace": "n", "pod": "ds-x", "owner_kind": "DaemonSet", "owner_name": "ds", "owner_is_controller": "true"},
        {"namespace": "n", "pod": "j-x", "owner_kind": "Job", "owner_name": "j", "owner_is_controller": "true"},
        {"namespace": "n", "pod": "c-1-x", "owner_kind": "Job", "owner_name": "c-1", "owner_is_controller": "true"},
        {"namespace": "n", "pod": "bare", "owner_kind": "<none>", "owner_name": "<none>", "owner_is_controller": "<none>"},
        {"namespace": "kube-system", "pod": "static-node-a", "owner_kind": "Node", "owner_name": "node-a",
         "owner_is_controller": "true"},
    ])
    pods["data"]["result"].append({"metric": {"namespace": "n", "pod": "d-2", "owner_kind": "ReplicaSet",
                                              "owner_name": "d-def", "owner_is_controller": "true"}, "value": [0, "1"]})
    rs = answer([{"namespace": "n", "replicaset": "d-abc", "owner_kind": "Deployment", "owner_name": "d"},
                 {"namespace": "n", "replicaset": "d-def", "owner_kind": "Deployment", "owner_name": "d"},
                 {"namespace": "n", "replicaset": "rs", "owner_kind": "<none>", "owner_name": "<none>"}])
    jobs = answer([{"namespace": "n", "job_name": "c-1", "owner_kind": "CronJob", "owner_name": "c"}])
    got = {pod: (ref.kind, ref.name) for (_, pod), ref in promql.resolve_owners(pods, rs, jobs).items()}
    assert got == {"d-1": ("Deployment", "d"), "d-2": ("Deployment", "d"), "rs-1": ("ReplicaSet", "rs"), "s-0": ("StatefulSet", "s"),
                   "ds-x": ("DaemonSet", "ds"), "j-x": ("Job", "j"), "c-1-x": ("CronJob", "c"),
                   "bare": ("Pod", "bare"), "static-node-a": ("Pod", "static-node-a")}


def test_workload_days_sum_counts_and_take_the_max_over_pods() -> None:
    nan = float("nan")
    a = promql.PodDay(day=5, samples=1440, cpu_p95_m=100.0, cpu_p99_m=nan, memory_peak_mi=300.0, oom_kills=1,
                      cpu_limit_m=None, cpu_throttled_ratio=0.0, memory_limit_mi=512.0)
    b = promql.PodDay(day=5, samples=700, cpu_p95_m=150.0, cpu_p99_m=180.0, memory_peak_mi=250.0, oom_kills=2,
                      cpu_limit_m=1000.0, cpu_throttled_ratio=0.1, memory_limit_mi=None)
    old_rs = promql.PodDay(day=4, samples=10, cpu_p95_m=1.0, cpu_p99_m=1.0, memory_peak_mi=1.0, oom_kills=0,
                           cpu_limit_m=None, cpu_throttled_ratio=0.0, memory_limit_mi=None)
    web = promql.WorkloadRef("n", "Deployment", "web")
    # Two ReplicaSets of one Deployment (a rollout) and a pod without a known owner.
    owners = {("n", "web-a-1"): web, ("n", "web-a-2"): web, ("n", "web-b-1"): web}
    got = promql.workload_days([{("n", "web-a-1", "app"): a, ("n", "web-a-2", "app"): b, ("n", "stray", "app"): a},
                                {("n", "web-b-1", "app"): old_rs}], owners)
    assert got[(web, "app")][5] == promql.PodDay(day=5, samples=2140, cpu_p95_m=150.0, cpu_p99_m=180.0,
                                                 memory_peak_mi=300.0, oom_kills=3, cpu_limit_m=1000.0,
                                                 cpu_throttled_ratio=0.1, memory_limit_mi=512.0)
    assert got[(web, "app")][4] == old_rs
    assert got[(promql.WorkloadRef("n", "Pod", "stray"), "app")] == {5: a}


def test_the_queries_tested_here_are_the_ones_reqapi_sends() -> None:
    # tests/evaluation/promql.py re-exports reqapi.py's section 9: the engines test the shipped code.
    import reqapi
    assert promql.read_day is reqapi.read_day and promql.plan_chunks is reqapi.plan_chunks
    assert promql.resolve_owners is reqapi.resolve_owners and promql.pod_days is reqapi.pod_days
