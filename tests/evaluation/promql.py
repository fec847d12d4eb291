"""The PromQL reqapi sends, and the reading of its answers into the estimator's per-day aggregates.

Written to move into reqapi.py: standard library only, typed, and pure except `http_query` (a
thin urllib call). Everything else builds strings and parameters or parses JSON already fetched;
`read_day` and `read_owners` drive the queries through a caller-supplied `fetch` function.

The shape of the work (the design rule measured against a real Prometheus): **aggregate per
pod-container in PromQL, join pods to workloads in Python.** A join inside a subquery is evaluated
at every inner step and cost 10-20x more. Per completed UTC day `d`, every query is an instant
query at the midnight that ends `d` over a `[1d]` range (or a `query_range` with `step=1d`, which
evaluates the same expression at each midnight):

* memory peak  `max by (ns, pod, container) (max_over_time(container_memory_working_set_bytes{SEL}[1d]))`
* samples      `sum by (...) (count_over_time(container_cpu_usage_seconds_total{SEL}[1d]))`
* CPU p95, p99 `quantile_over_time(q, max by (...) (rate(container_cpu_usage_seconds_total{SEL}[2m]))[1d:1m])`
  - the `max by` sits inside the subquery so that an OOM-restarted container (a new cAdvisor `id`,
    a new series) is one series per minute, as the offline emulation sees it; an aggregation is not
    a join and costs little there.
* throttled    `sum by (...) (increase(throttled[1d])) / clamp_min(sum by (...) (increase(periods[1d])), 1)`
* OOM kills    `max_over_time(last_terminated_reason{reason="OOMKilled"}[1d]) * increase(restarts_total[1d])`
  (kube-state-metrics keeps only the *last* reason: a container restarted for mixed reasons on one
  day is over-counted; `container_oom_events_total` is an alternative where cAdvisor has it)
* limits       `max by (..., resource) (max_over_time(kube_pod_container_resource_limits{...}[1d]))`
* mapping      `max by (namespace, pod, owner_kind, owner_name, owner_is_controller) (last_over_time(kube_pod_owner[W]))`,
  the same for `kube_replicaset_owner` and `kube_job_owner`: three cheap instant queries over the window.

`SEL` = `job="kubelet", metrics_path="/metrics/cadvisor", container!="", container!="POD", image!=""`
plus the caller's extra matchers (e.g. `cluster="prod"`): it drops the pod-level cgroup (which
double counts its containers) and the pause container.

Cost and chunking. The CPU subquery materialises every inner point at once: per container a
day of per-minute rates, 1441 points (Prometheus 2.x ranges are closed at both ends), and the
`max by` over them as many again - `peakSamples` measured 2 x 1441 per container. Prometheus
refuses a query above `--query.max-samples` (default 50,000,000). A 14-day `query_range` with
`step=1d` at 10,000 containers would hold 10,000 x 2 x 15 x 1,440 = 432M samples - refused. One
instant query per day holds 10,000 x 2,882 = 28.8M: it would pass alone, but `plan_chunks` keeps
each query under half the limit (25M: 8,674 containers a query) as headroom for the cost model
(containers that appear after the inventory was read, an engine holding a little more). So 10,000 single-container pods over 14 days take 14 days x 2 quantiles x 2 chunks = 56
subqueries of at most 25M samples; 20,000 containers take 3 chunks a day. The other queries keep
only one series' samples in memory at a time (peak about the number of series plus one series'
day, 1441 + n), so they are not chunked for Prometheus. VictoriaMetrics' limit
(`-search.maxSamplesPerQuery`, default 1e9) counts the raw samples read instead, for every
query, and whole storage blocks of them: even charged all 14 days of every series, 10,000
containers at one sample a minute are 201.6M, inside it.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

SECONDS_PER_DAY = 86400
MIB = float(1 << 20)
DEFAULT_MAX_SAMPLES = 50_000_000        # Prometheus --query.max-samples default
POINTS_PER_DAY = 1441                   # a [1d:1m] subquery: both ends included in Prometheus 2.x
# What Prometheus holds at the peak of one day's CPU subquery, per container: the inner rate()
# matrix and the `max by` matrix over it, 1441 points each (measured with stats=all).
SUBQUERY_SAMPLES_PER_SERIES = 2 * POINTS_PER_DAY
BY = "namespace, pod, container"

# Workload kinds after resolving owners.
DEPLOYMENT, STATEFULSET, DAEMONSET, JOB, CRONJOB, REPLICASET, POD = (
    "Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet", "Pod")


class PromQueryError(Exception):
    """The engine answered with an error, or an answer that is not a Prometheus API result."""


@dataclass(frozen=True)
class Selectors:
    """Where the series come from: scrape jobs and extra matchers (e.g. ('cluster="prod"',))."""
    cadvisor_job: str = "kubelet"
    ksm_job: str = "kube-state-metrics"
    extra: tuple[str, ...] = ()
    cpu_rate: str = "2m"                # the estimator's rate window (needs a scrape every minute or less)
    step: str = "1m"                    # the subquery's resolution: the CPU percentile is over per-minute rates

    def cadvisor(self, *more: str) -> str:
        parts = [f'job="{_esc(self.cadvisor_job)}"', 'metrics_path="/metrics/cadvisor"',
                 'container!=""', 'container!="POD"', 'image!=""', *self.extra, *more]
        return ", ".join(p for p in parts if p)

    def ksm(self, *more: str) -> str:
        return ", ".join(p for p in (f'job="{_esc(self.ksm_job)}"', *self.extra, *more) if p)


def _esc(value: str) -> str:
    """A PromQL double-quoted string's content."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def regex_alternatives(values: Iterable[str]) -> str:
    """A PromQL regex string content matching exactly these values (PromQL anchors regexes)."""
    return _esc("|".join(re.escape(v) for v in sorted(set(values))))


# ---- the queries --------------------------------------------------------------------------------

def q_memory_peak(s: Selectors, chunk: str = "") -> str:
    return f"max by ({BY}) (max_over_time(container_memory_working_set_bytes{{{s.cadvisor(chunk)}}}[1d]))"


def q_samples(s: Selectors, chunk: str = "") -> str:
    return f"sum by ({BY}) (count_over_time(container_cpu_usage_seconds_total{{{s.cadvisor(chunk)}}}[1d]))"


def q_cpu_quantile(s: Selectors, q: float, chunk: str = "") -> str:
    return (f"quantile_over_time({q}, max by ({BY}) (rate(container_cpu_usage_seconds_total"
            f"{{{s.cadvisor(chunk)}}}[{s.cpu_rate}]))[1d:{s.step}])")


def q_throttled(s: Selectors, chunk: str = "") -> str:
    sel = s.cadvisor(chunk)
    return (f"sum by ({BY}) (increase(container_cpu_cfs_throttled_periods_total{{{sel}}}[1d]))"
            f" / clamp_min(sum by ({BY}) (increase(container_cpu_cfs_periods_total{{{sel}}}[1d])), 1)")


def q_oom_kills(s: Selectors, chunk: str = "") -> str:
    reason = s.ksm('reason="OOMKilled"', chunk)
    return (f"max by ({BY}) (max_over_time(kube_pod_container_status_last_terminated_reason{{{reason}}}[1d]))"
            f" * on ({BY}) max by ({BY}) (increase(kube_pod_container_status_restarts_total{{{s.ksm(chunk)}}}[1d]))")


def q_limits(s: Selectors, chunk: str = "") -> str:
    sel = s.ksm('resource=~"cpu|memory"', chunk)
    return f"max by ({BY}, resource) (max_over_time(kube_pod_container_resource_limits{{{sel}}}[1d]))"


def q_pod_owner(s: Selectors, window_days: int) -> str:
    return (f"max by (namespace, pod, owner_kind, owner_name, owner_is_controller) "
            f"(last_over_time(kube_pod_owner{{{s.ksm()}}}[{window_days}d]))")


def q_replicaset_owner(s: Selectors, window_days: int) -> str:
    return (f"max by (namespace, replicaset, owner_kind, owner_name) "
            f"(last_over_time(kube_replicaset_owner{{{s.ksm()}}}[{window_days}d]))")


def q_job_owner(s: Selectors, window_days: int) -> str:
    return (f"max by (namespace, job_name, owner_kind, owner_name) "
            f"(last_over_time(kube_job_owner{{{s.ksm()}}}[{window_days}d]))")


def day_end(day: int) -> int:
    """Unix seconds of the midnight that ends UTC day number `day` (days since 1970-01-01)."""
    return (day + 1) * SECONDS_PER_DAY


def instant_params(query: str, day: int, timeout_s: float = 60.0) -> dict[str, str]:
    """/api/v1/query parameters reading day `day`: evaluated at the midnight that ends it."""
    return {"query": query, "time": str(day_end(day)), "timeout": f"{timeout_s:g}s"}


def range_params(query: str, first_day: int, last_day: int, timeout_s: float = 60.0) -> dict[str, str]:
    """/api/v1/query_range parameters for days [first_day, last_day]: one point per ending midnight.

    Only for the queries without a subquery: a subquery in a range query materialises the inner
    points of the whole range at once (see the module's cost note)."""
    return {"query": query, "start": str(day_end(first_day)), "end": str(day_end(last_day)),
            "step": str(SECONDS_PER_DAY), "timeout": f"{timeout_s:g}s"}


# ---- chunking -----------------------------------------------------------------------------------

def max_series_per_query(max_samples: int = DEFAULT_MAX_SAMPLES, share: float = 0.5,
                         samples_per_series: int = SUBQUERY_SAMPLES_PER_SERIES) -> int:
    """Containers one day's CPU subquery may cover: `share` of the engine's sample limit.

    `samples_per_series` is what the engine charges a series: Prometheus 2 x 1441 points (the
    inner rate() and the `max by` matrices); VictoriaMetrics (whose -search.maxSamplesPerQuery counts the raw samples of every
    storage block a query reads, not the points it keeps) the series' samples in those blocks."""
    return max(1, int(max_samples * share) // samples_per_series)


def plan_chunks(containers: Mapping[tuple[str, str], int], max_series: int) -> list[str]:
    """Label matchers splitting (namespace, pod) -> container count into queries of <= max_series.

    Whole namespaces are packed together (first fit, largest first: a short matcher); a namespace
    larger than the budget is split by pod names. A single pod larger than the budget gets its
    own query (it cannot be split by these labels). The result is deterministic."""
    per_ns: dict[str, dict[str, int]] = {}
    for (ns, pod), n in containers.items():
        per_ns.setdefault(ns, {})[pod] = per_ns.get(ns, {}).get(pod, 0) + max(0, n)
    bins: list[tuple[int, list[str]]] = []          # (series, namespaces)
    chunks: list[str] = []
    for ns in sorted(per_ns, key=lambda k: (-sum(per_ns[k].values()), k)):
        total = sum(per_ns[ns].values())
        if total > max_series:
            group: list[str] = []
            size = 0
            for pod in sorted(per_ns[ns]):
                n = per_ns[ns][pod]
                if group and size + n > max_series:
                    chunks.append(f'namespace="{_esc(ns)}", pod=~"{regex_alternatives(group)}"')
                    group, size = [], 0
                group.append(pod)
                size += n
            if group:
                chunks.append(f'namespace="{_esc(ns)}", pod=~"{regex_alternatives(group)}"')
            continue
        for i, (size, names) in enumerate(bins):
            if size + total <= max_series:
                bins[i] = (size + total, names + [ns])
                break
        else:
            bins.append((total, [ns]))
    chunks = [f'namespace=~"{regex_alternatives(names)}"' for _, names in bins] + chunks
    return chunks


# ---- parsing ------------------------------------------------------------------------------------

Key = tuple[str, str, str]          # (namespace, pod, container)


def parse_result(answer: Any) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
    """A Prometheus HTTP API answer -> [(labels, [(unix seconds, value)])], vector or matrix.

    Values arrive as strings ("NaN", "+Inf" included) and are returned as floats; the caller
    decides what to trust. Anything that is not a success answer raises PromQueryError."""
    if not isinstance(answer, dict):
        raise PromQueryError(f"not a Prometheus API answer: {type(answer).__name__}")
    if answer.get("status") != "success":
        raise PromQueryError(f"{answer.get('errorType', 'error')}: {answer.get('error', answer.get('status'))}")
    data = answer.get("data")
    if not isinstance(data, dict) or data.get("resultType") not in ("vector", "matrix"):
        raise PromQueryError(f"unexpected result type: {data.get('resultType') if isinstance(data, dict) else data!r}")
    out: list[tuple[dict[str, str], list[tuple[float, float]]]] = []
    for item in data.get("result") or []:
        if not isinstance(item, dict) or not isinstance(item.get("metric"), dict):
            raise PromQueryError("malformed series in result")
        pairs = item.get("values") if data["resultType"] == "matrix" else [item.get("value")]
        points: list[tuple[float, float]] = []
        for pair in pairs or []:
            if not isinstance(pair, list) or len(pair) != 2:
                raise PromQueryError("malformed sample in result")
            try:
                points.append((float(pair[0]), float(pair[1])))
            except (TypeError, ValueError) as e:
                raise PromQueryError(f"malformed sample value {pair!r}") from e
        out.append(({str(k): str(v) for k, v in item["metric"].items()}, points))
    return out


def by_container(answer: Any) -> dict[Key, float]:
    """An instant answer keyed by (namespace, pod, container)."""
    out: dict[Key, float] = {}
    for labels, points in parse_result(answer):
        if points:
            out[(labels.get("namespace", ""), labels.get("pod", ""), labels.get("container", ""))] = points[-1][1]
    return out


def by_container_day(answer: Any) -> dict[tuple[Key, int], float]:
    """A query_range answer (step=1d) keyed by ((namespace, pod, container), day it ends)."""
    out: dict[tuple[Key, int], float] = {}
    for labels, points in parse_result(answer):
        key = (labels.get("namespace", ""), labels.get("pod", ""), labels.get("container", ""))
        for t, v in points:
            out[(key, int(round(t)) // SECONDS_PER_DAY - 1)] = v
    return out


# ---- pods -> workloads --------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkloadRef:
    namespace: str
    kind: str
    name: str


def resolve_owners(pod_owner: Any, replicaset_owner: Any, job_owner: Any) -> dict[tuple[str, str], WorkloadRef]:
    """(namespace, pod) -> its workload, from the three owner answers.

    ReplicaSet -> its Deployment (a ReplicaSet without one stays a ReplicaSet), Job -> its CronJob
    (a bare Job stays a Job), StatefulSet and DaemonSet as they are, any other controller by its
    kind; a pod without a controller (bare, or a static pod owned by its Node) is its own workload
    of kind Pod. When the window saw a pod with several owner rows (owner references changed),
    the controller row wins, then the lexically smallest: deterministic."""
    rs: dict[tuple[str, str], tuple[str, str]] = {}
    for labels, _ in parse_result(replicaset_owner):
        if labels.get("owner_kind") and labels.get("owner_kind") != "<none>":
            rs[(labels.get("namespace", ""), labels.get("replicaset", ""))] = (labels["owner_kind"], labels.get("owner_name", ""))
    jobs: dict[tuple[str, str], tuple[str, str]] = {}
    for labels, _ in parse_result(job_owner):
        if labels.get("owner_kind") and labels.get("owner_kind") != "<none>":
            jobs[(labels.get("namespace", ""), labels.get("job_name", ""))] = (labels["owner_kind"], labels.get("owner_name", ""))
    rows: dict[tuple[str, str], list[tuple[int, str, str]]] = {}
    for labels, _ in parse_result(pod_owner):
        ns, pod = labels.get("namespace", ""), labels.get("pod", "")
        rank = 0 if labels.get("owner_is_controller") == "true" else 1
        rows.setdefault((ns, pod), []).append((rank, labels.get("owner_kind", ""), labels.get("owner_name", "")))
    out: dict[tuple[str, str], WorkloadRef] = {}
    for (ns, pod), candidates in rows.items():
        rank, kind, name = min(candidates)
        if rank != 0 or kind in ("", "<none>", "Node"):
            out[(ns, pod)] = WorkloadRef(ns, POD, pod)
        elif kind == REPLICASET and (ns, name) in rs and rs[(ns, name)][0] == DEPLOYMENT:
            out[(ns, pod)] = WorkloadRef(ns, DEPLOYMENT, rs[(ns, name)][1])
        elif kind == JOB and (ns, name) in jobs and jobs[(ns, name)][0] == CRONJOB:
            out[(ns, pod)] = WorkloadRef(ns, CRONJOB, jobs[(ns, name)][1])
        else:
            out[(ns, pod)] = WorkloadRef(ns, kind, name)
    return out


# ---- per pod-container day -> per workload-container day ----------------------------------------

@dataclass(frozen=True)
class PodDay:
    """One pod-container's aggregates for one completed UTC day, as read from the engine."""
    day: int
    samples: int
    cpu_p95_m: float
    cpu_p99_m: float
    memory_peak_mi: float
    oom_kills: int
    cpu_limit_m: float | None
    cpu_throttled_ratio: float
    memory_limit_mi: float | None


def pod_days(day: int, memory: Any, samples: Any, p95: Sequence[Any], p99: Sequence[Any], throttled: Any,
             ooms: Any, limits: Any) -> dict[Key, PodDay]:
    """Assemble one day's answers (p95/p99: one answer per chunk) into per pod-container days.

    A container counts when it has a memory peak (it ran that day). Missing CPU quantiles are NaN
    (the estimator drops such a day rather than trust it); missing throttling or OOM rows mean 0."""
    mem = by_container(memory)
    cnt = by_container(samples)
    q95: dict[Key, float] = {}
    for a in p95:
        q95.update(by_container(a))
    q99: dict[Key, float] = {}
    for a in p99:
        q99.update(by_container(a))
    thr = by_container(throttled)
    oom = by_container(ooms)
    lim: dict[tuple[Key, str], float] = {}
    for labels, points in parse_result(limits):
        if points:
            key = (labels.get("namespace", ""), labels.get("pod", ""), labels.get("container", ""))
            lim[(key, labels.get("resource", ""))] = points[-1][1]
    out: dict[Key, PodDay] = {}
    nan = float("nan")
    for key, peak in mem.items():
        cpu_limit = lim.get((key, "cpu"))
        mem_limit = lim.get((key, "memory"))
        n = cnt.get(key, 0.0)
        kills = oom.get(key, 0.0)
        out[key] = PodDay(
            day=day, samples=int(round(n)) if math.isfinite(n) else 0,
            cpu_p95_m=q95.get(key, nan) * 1000.0, cpu_p99_m=q99.get(key, nan) * 1000.0,
            memory_peak_mi=peak / MIB,
            # increase() extrapolates to the range's edges in Prometheus: a count is a whole number.
            oom_kills=int(round(kills)) if math.isfinite(kills) else 0,
            cpu_limit_m=None if cpu_limit is None else cpu_limit * 1000.0,
            cpu_throttled_ratio=thr.get(key, 0.0),
            memory_limit_mi=None if mem_limit is None else mem_limit / MIB)
    return out


def workload_days(days: Iterable[Mapping[Key, PodDay]], owners: Mapping[tuple[str, str], WorkloadRef]
                  ) -> dict[tuple[WorkloadRef, str], dict[int, PodDay]]:
    """Per (workload, container) and day: samples and OOM kills summed over the workload's pods,
    everything else the max over them (the estimator's DayUsage definition). A pod without a known
    owner is its own workload (kind Pod)."""
    out: dict[tuple[WorkloadRef, str], dict[int, PodDay]] = {}
    for one_day in days:
        for (ns, pod, container), d in sorted(one_day.items()):
            ref = owners.get((ns, pod), WorkloadRef(ns, POD, pod))
            slot = out.setdefault((ref, container), {})
            old = slot.get(d.day)
            slot[d.day] = d if old is None else PodDay(
                day=d.day, samples=old.samples + d.samples,
                cpu_p95_m=_max(old.cpu_p95_m, d.cpu_p95_m), cpu_p99_m=_max(old.cpu_p99_m, d.cpu_p99_m),
                memory_peak_mi=_max(old.memory_peak_mi, d.memory_peak_mi), oom_kills=old.oom_kills + d.oom_kills,
                cpu_limit_m=_max_opt(old.cpu_limit_m, d.cpu_limit_m),
                cpu_throttled_ratio=_max(old.cpu_throttled_ratio, d.cpu_throttled_ratio),
                memory_limit_mi=_max_opt(old.memory_limit_mi, d.memory_limit_mi))
    return out


def _max(a: float, b: float) -> float:
    # NaN-aware: a pod without a value does not hide its sibling's.
    if a != a:
        return b
    if b != b:
        return a
    return max(a, b)


def _max_opt(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else _max(a, b)


# ---- driving the queries ------------------------------------------------------------------------

Fetch = Callable[[str, Mapping[str, str]], Any]      # (API path, form parameters) -> decoded JSON


def read_day(fetch: Fetch, day: int, s: Selectors = Selectors(),
             max_samples: int = DEFAULT_MAX_SAMPLES) -> dict[Key, PodDay]:
    """Every aggregate of one completed day; the CPU subqueries chunked under `max_samples`."""
    def q(query: str) -> Any:
        return fetch("/api/v1/query", instant_params(query, day))
    memory = q(q_memory_peak(s))
    # The day's containers (from the cheap memory answer) decide the CPU chunks.
    inventory: dict[tuple[str, str], int] = {}
    for ns, pod, _ in by_container(memory):
        inventory[(ns, pod)] = inventory.get((ns, pod), 0) + 1
    chunks = plan_chunks(inventory, max_series_per_query(max_samples))
    p95 = [q(q_cpu_quantile(s, 0.95, c)) for c in chunks]
    p99 = [q(q_cpu_quantile(s, 0.99, c)) for c in chunks]
    return pod_days(day, memory, q(q_samples(s)), p95, p99, q(q_throttled(s)), q(q_oom_kills(s)), q(q_limits(s)))


def read_owners(fetch: Fetch, last_day: int, window_days: int, s: Selectors = Selectors()
                ) -> dict[tuple[str, str], WorkloadRef]:
    """The pod -> workload mapping over the window ending with day `last_day`."""
    def q(query: str) -> Any:
        return fetch("/api/v1/query", instant_params(query, last_day))
    return resolve_owners(q(q_pod_owner(s, window_days)), q(q_replicaset_owner(s, window_days)),
                          q(q_job_owner(s, window_days)))


def http_query(base_url: str, path: str, params: Mapping[str, str], timeout_s: float = 60.0) -> Any:
    """POST a form-encoded query (no URL length limit for long pod regexes) and decode the JSON.

    The engines answer errors as JSON too (HTTP 400/422/503 with status "error"): that body is
    returned, so parse_result raises with the engine's own message."""
    body = urllib.parse.urlencode(dict(params)).encode()
    request = urllib.request.Request(base_url.rstrip("/") + path, data=body, method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded",
                                              "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        payload = e.read()
        try:
            return json.loads(payload)
        except ValueError:
            raise PromQueryError(f"HTTP {e.code}: {payload[:200]!r}") from e
