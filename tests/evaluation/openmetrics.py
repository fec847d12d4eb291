"""The traces of `traces.py` written as the series a real cluster's Prometheus would hold.

cAdvisor (kubelet `/metrics/cadvisor`, `job="kubelet"`) and kube-state-metrics
(`job="kube-state-metrics"`) series with the labels those exporters use, one sample a minute,
rendered as OpenMetrics text, **one file per UTC day**: `promtool tsdb create-blocks-from
openmetrics` holds a whole file in memory and re-parses it once per block window, so a day per
file keeps the backfill's memory bounded. VictoriaMetrics imports the very same files through
`/api/v1/import/prometheus` (it reads second timestamps and skips `# TYPE` / `# EOF` lines).

Timestamps. Minute `j` of a trace (0-based, `traces.MINUTES_PER_DAY` a day) is the sample at
`(EPOCH_DAY * 86400) + (j + 1) * 60`: a scrape reports what was used *up to* its timestamp, so the
samples of UTC day `d` lie in (midnight, next midnight] and an instant query at the next midnight
over `[1d]` reads exactly that day. With a counter sampled on the minute, `rate(x[2m])` at a minute
is then `(c(t) - c(t - 2m)) / 120 s`, the mean usage of the last two minutes - what
`traces._rolling(values, 2)` computes offline - on both engines (Prometheus sees 3 samples that
span the whole window, so it does not extrapolate; VictoriaMetrics takes the sample before the
window as its base).

What the files hold, per pod:

* cAdvisor, per container: `container_cpu_usage_seconds_total` (a counter of CPU seconds),
  `container_memory_working_set_bytes`, and with a CPU limit `container_cpu_cfs_periods_total` /
  `container_cpu_cfs_throttled_periods_total` (600 periods of 100 ms a minute; a minute in which
  demand exceeded the limit counts all its periods as throttled, so the throttled share of a day
  is the share of minutes with demand above the limit, `traces.day_usage`'s definition). An OOM
  kill restarts the container: its `id` and `name` change, so a new series starts (counters from
  zero) - the queries must aggregate `by (namespace, pod, container)`.
* cAdvisor series the queries must *exclude*: the pod-level cgroup (`container=""`, `image=""`),
  which double counts its containers, and the pause container (`container="POD"`).
* kube-state-metrics: `kube_pod_owner`, `kube_replicaset_owner` (Deployment -> ReplicaSet),
  `kube_job_owner` (CronJob -> Job; the label is `job_name` because `job` is the scrape label),
  `kube_pod_container_resource_requests` / `_limits` (`resource="cpu"`, `unit="core"`;
  `resource="memory"`, `unit="byte"`), `kube_pod_container_status_restarts_total` and, from the
  first OOM kill on, `kube_pod_container_status_last_terminated_reason{reason="OOMKilled"} 1`
  (kube-state-metrics keeps only the *last* reason).

A trace is one workload. Its kind decides the pod names and owners: a Deployment's pod belongs to a
ReplicaSet (`<name>-<hash>`), a StatefulSet's is `<name>-0`, a DaemonSet's `<name>-<suffix>`, and a
CronJob runs one Job per scheduled run (`<cronjob>-<scheduled minute since the epoch>`, as the
CronJob controller names them) whose pod exists only while the run does. A rollout
(`Trace.restarts`) of a Deployment creates a new ReplicaSet and pod.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import traces

MIB = 1 << 20
SECONDS_PER_DAY = 86400
# `cluster` is the external label a multi-cluster setup adds (Thanos, Mimir, a shared VictoriaMetrics).
CLUSTER = "prod"
CADVISOR = {"job": "kubelet", "metrics_path": "/metrics/cadvisor", "instance": "10.0.0.11:10250", "node": "node-a",
            "cluster": CLUSTER}
KSM = {"job": "kube-state-metrics", "instance": "10.0.0.12:8080", "cluster": CLUSTER}
PAUSE_IMAGE = "registry.k8s.io/pause:3.9"
KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod")


@dataclass(frozen=True)
class Workload:
    """A trace placed in a cluster: namespace, workload kind and name."""
    trace: traces.Trace
    namespace: str
    kind: str           # one of KINDS ("Pod": a bare pod without owner)
    name: str
    hpa: tuple[str, ...] = ()   # resources an HPA (named like the workload) scales it on by utilisation


@dataclass(frozen=True)
class PodSpan:
    """One pod of a workload and the minutes [start, end) it exists."""
    namespace: str
    pod: str
    uid: str
    owner_kind: str      # kube_pod_owner's owner_kind ("" for a bare pod)
    owner_name: str
    parent_kind: str     # the owner's owner: Deployment of a ReplicaSet, CronJob of a Job ("" if none)
    parent_name: str
    start: int
    end: int


def _hash(*parts: object, n: int = 10) -> str:
    # Deterministic name suffixes (a pod-template hash, a pod suffix): same trace, same names.
    alphabet = "bcdfghjklmnpqrstvwxz2456789"     # the Kubernetes name-suffix alphabet
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return "".join(alphabet[b % len(alphabet)] for b in digest[:n])


def _uid(*parts: object) -> str:
    h = hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _present_runs(trace: traces.Trace) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of minutes in which any container of the trace runs."""
    n = len(trace.containers[0].cpu)
    alive = [any(traces._present(c.cpu[i]) for c in trace.containers) for i in range(n)]
    runs: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if not alive[i]:
            i += 1
            continue
        j = i
        while j < n and alive[j]:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def pods(w: Workload) -> list[PodSpan]:
    """The pods of a workload over the trace, with their owners."""
    ns, name = w.namespace, w.name
    out: list[PodSpan] = []
    if w.kind == "CronJob":
        # One Job per run, named after its scheduled time in minutes since the epoch.
        for start, end in _present_runs(w.trace):
            scheduled = traces.EPOCH_DAY * traces.MINUTES_PER_DAY + start - start % 60
            job = f"{name}-{scheduled}"
            pod = f"{job}-{_hash(job, n=5)}"
            out.append(PodSpan(ns, pod, _uid(ns, pod), "Job", job, "CronJob", name, start, end))
        return out
    cuts = [0, *sorted(r for r in w.trace.restarts if w.kind == "Deployment"), len(w.trace.containers[0].cpu)]
    for k, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
        runs = [(max(a, lo), min(b, hi)) for a, b in _present_runs(w.trace) if a < hi and b > lo]
        if not runs:
            continue
        start, end = runs[0][0], runs[-1][1]
        if w.kind == "Deployment":
            rs = f"{name}-{_hash(name, 'template', k)}"
            pod = f"{rs}-{_hash(rs, k, n=5)}"
            out.append(PodSpan(ns, pod, _uid(ns, pod), "ReplicaSet", rs, "Deployment", name, start, end))
        elif w.kind == "StatefulSet":
            out.append(PodSpan(ns, f"{name}-0", _uid(ns, name, k), "StatefulSet", name, "", "", start, end))
        elif w.kind == "DaemonSet":
            pod = f"{name}-{_hash(name, k, n=5)}"
            out.append(PodSpan(ns, pod, _uid(ns, pod), "DaemonSet", name, "", "", start, end))
        elif w.kind == "Job":
            pod = f"{name}-{_hash(name, k, n=5)}"
            out.append(PodSpan(ns, pod, _uid(ns, pod), "Job", name, "", "", start, end))
        else:
            out.append(PodSpan(ns, name, _uid(ns, name, k), "", "", "", "", start, end))
    return out


def _labels(d: dict[str, str]) -> str:
    # OpenMetrics label values escape backslash, double quote and newline.
    esc = {k: v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in d.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


def _num(x: float) -> str:
    # repr() keeps every digit of a float, so the engines store what traces.py computed with.
    return repr(float(x)) if x != int(x) or abs(x) >= 1e15 else str(int(x))


def timestamp(minute: int) -> int:
    """The scrape timestamp (Unix seconds) of trace minute `minute`: the end of that minute."""
    return traces.EPOCH_DAY * SECONDS_PER_DAY + (minute + 1) * 60


@dataclass
class _Series:
    family: str          # the `# TYPE` family name
    kind: str            # "counter" or "gauge"
    name: str            # the sample name (a counter's ends with _total)
    labels: dict[str, str]
    points: list[tuple[int, float]]      # (minute, value), minutes ascending


def _container_series(w: Workload, span: PodSpan) -> list[_Series]:
    out: list[_Series] = []
    ns, pod, uid = span.namespace, span.pod, span.uid
    pod_cgroup = f"/kubepods/burstable/pod{uid}"
    pod_cpu: dict[int, float] = {}
    pod_mem: dict[int, float] = {}
    for c in w.trace.containers:
        image = f"registry.example/{w.name}/{c.name}:1.0"
        ooms = sorted(m for m in c.oom_minutes if span.start <= m < span.end)
        incarnation = 0          # bumped after each OOM kill: a new container id, new series
        cpu_s: _Series | None = None
        mem_s: _Series | None = None
        per_s: _Series | None = None
        thr_s: _Series | None = None
        used_total = periods = throttled = 0.0
        restarts = _Series("kube_pod_container_status_restarts", "counter", "kube_pod_container_status_restarts_total",
                           {**KSM, "namespace": ns, "pod": pod, "uid": uid, "container": c.name}, [])
        reason = _Series("kube_pod_container_status_last_terminated_reason", "gauge",
                         "kube_pod_container_status_last_terminated_reason",
                         {**KSM, "namespace": ns, "pod": pod, "uid": uid, "container": c.name, "reason": "OOMKilled"}, [])
        resources = []
        for res_kind, family in (("requests", "kube_pod_container_resource_requests"),
                                 ("limits", "kube_pod_container_resource_limits")):
            cpu_m = c.rule_cpu_m if res_kind == "requests" else c.cpu_limit_m
            mem_mi = c.rule_memory_mi if res_kind == "requests" else c.memory_limit_mi
            for resource, unit, value in (("cpu", "core", None if cpu_m is None else cpu_m / 1000.0),
                                          ("memory", "byte", None if mem_mi is None else mem_mi * MIB)):
                if value is not None:
                    resources.append((_Series(family, "gauge", family, {
                        **KSM, "namespace": ns, "pod": pod, "uid": uid, "container": c.name, "node": CADVISOR["node"],
                        "resource": resource, "unit": unit}, []), value))
        killed = 0
        for m in range(span.start, span.end):
            if not traces._present(c.cpu[m]):
                continue
            if cpu_s is None:
                cid = _hash(uid, c.name, incarnation, n=32)
                base = {**CADVISOR, "namespace": ns, "pod": pod, "container": c.name, "image": image,
                        "id": f"{pod_cgroup}/{cid}", "name": cid[:12]}
                cpu_s = _Series("container_cpu_usage_seconds", "counter", "container_cpu_usage_seconds_total",
                                {**base, "cpu": "total"}, [])
                mem_s = _Series("container_memory_working_set_bytes", "gauge", "container_memory_working_set_bytes",
                                dict(base), [])
                out += [cpu_s, mem_s]
                if c.cpu_limit_m is not None:
                    per_s = _Series("container_cpu_cfs_periods", "counter", "container_cpu_cfs_periods_total", dict(base), [])
                    thr_s = _Series("container_cpu_cfs_throttled_periods", "counter",
                                    "container_cpu_cfs_throttled_periods_total", dict(base), [])
                    out += [per_s, thr_s]
                used_total = periods = throttled = 0.0
            used_total += c.cpu_used[m] * 60 / 1000.0      # millicores for a minute -> CPU seconds
            cpu_s.points.append((m, used_total))
            mem_s.points.append((m, c.memory_used[m] * MIB))
            pod_cpu[m] = pod_cpu.get(m, 0.0) + c.cpu_used[m]
            pod_mem[m] = pod_mem.get(m, 0.0) + c.memory_used[m]
            if per_s is not None and thr_s is not None:
                periods += 600
                throttled += 600 if c.cpu[m] > c.cpu_limit_m else 0
                per_s.points.append((m, periods))
                thr_s.points.append((m, throttled))
            if ooms and ooms[0] == m:
                # Killed during this minute: by the next scrape the kubelet restarted it.
                ooms.pop(0)
                killed += 1
                incarnation += 1
                cpu_s = mem_s = per_s = thr_s = None
            restarts.points.append((m, float(killed)))
            if killed:
                reason.points.append((m, 1.0))
            for s, value in resources:
                s.points.append((m, value))
        out += [restarts] + ([reason] if reason.points else []) + [s for s, _ in resources]
    # The pod-level cgroup (sums its containers: counted twice if not excluded) and the pause container.
    minutes = sorted(pod_cpu)
    pod_base = {**CADVISOR, "namespace": ns, "pod": pod, "container": "", "image": "", "id": pod_cgroup, "name": ""}
    pause_id = _hash(uid, "pause", n=32)
    pause_base = {**CADVISOR, "namespace": ns, "pod": pod, "container": "POD", "image": PAUSE_IMAGE,
                  "id": f"{pod_cgroup}/{pause_id}", "name": pause_id[:12]}
    acc = 0.0
    pts: list[tuple[int, float]] = []
    for m in minutes:
        acc += pod_cpu[m] * 60 / 1000.0
        pts.append((m, acc))
    out.append(_Series("container_cpu_usage_seconds", "counter", "container_cpu_usage_seconds_total",
                       {**pod_base, "cpu": "total"}, pts))
    out.append(_Series("container_memory_working_set_bytes", "gauge", "container_memory_working_set_bytes",
                       dict(pod_base), [(m, pod_mem[m] * MIB) for m in minutes]))
    out.append(_Series("container_cpu_usage_seconds", "counter", "container_cpu_usage_seconds_total",
                       {**pause_base, "cpu": "total"}, [(m, 0.00002 * (i + 1)) for i, m in enumerate(minutes)]))
    out.append(_Series("container_memory_working_set_bytes", "gauge", "container_memory_working_set_bytes",
                       dict(pause_base), [(m, 409600.0) for m in minutes]))
    # kube-state-metrics' owner series, while the pod exists.
    owner = _Series("kube_pod_owner", "gauge", "kube_pod_owner", {
        **KSM, "namespace": ns, "pod": pod, "uid": uid, "owner_kind": span.owner_kind or "<none>",
        "owner_name": span.owner_name or "<none>", "owner_is_controller": "true" if span.owner_kind else "<none>"},
        [(m, 1.0) for m in minutes])
    out.append(owner)
    if span.parent_kind == "Deployment":
        out.append(_Series("kube_replicaset_owner", "gauge", "kube_replicaset_owner", {
            **KSM, "namespace": ns, "replicaset": span.owner_name, "owner_kind": "Deployment",
            "owner_name": span.parent_name, "owner_is_controller": "true"}, [(m, 1.0) for m in minutes]))
    if span.parent_kind == "CronJob":
        out.append(_Series("kube_job_owner", "gauge", "kube_job_owner", {
            **KSM, "namespace": ns, "job_name": span.owner_name, "owner_kind": "CronJob",
            "owner_name": span.parent_name, "owner_is_controller": "true"}, [(m, 1.0) for m in minutes]))
    return out


def _hpa_series(w: Workload) -> list[_Series]:
    """kube-state-metrics' HPA series for the whole trace: kube_horizontalpodautoscaler_info names
    the target, kube_horizontalpodautoscaler_spec_target_metric each resource and target type."""
    if not w.hpa:
        return []
    minutes = [(m, 1.0) for m in range(len(w.trace.containers[0].cpu))]
    base = {**KSM, "namespace": w.namespace, "horizontalpodautoscaler": w.name}
    out = [_Series("kube_horizontalpodautoscaler_info", "gauge", "kube_horizontalpodautoscaler_info", {
        **base, "scaletargetref_api_version": "apps/v1", "scaletargetref_kind": w.kind,
        "scaletargetref_name": w.name}, minutes)]
    for resource in w.hpa:
        out.append(_Series("kube_horizontalpodautoscaler_spec_target_metric", "gauge",
                           "kube_horizontalpodautoscaler_spec_target_metric",
                           {**base, "metric_name": resource, "metric_target_type": "utilization"},
                           [(m, 70.0) for m, _ in minutes]))
    return out


def all_series(workloads: list[Workload]) -> list[_Series]:
    out: list[_Series] = []
    for w in workloads:
        for span in pods(w):
            out += _container_series(w, span)
        out += _hpa_series(w)
    return out


def render_day(series: list[_Series], day: int) -> Iterator[str]:
    """OpenMetrics lines for trace day `day` (0-based): families contiguous, samples time-ordered, `# EOF`."""
    lo, hi = day * traces.MINUTES_PER_DAY, (day + 1) * traces.MINUTES_PER_DAY
    by_family: dict[str, list[_Series]] = {}
    for s in series:
        by_family.setdefault(s.family, []).append(s)
    for family in sorted(by_family):
        group = by_family[family]
        # "# TYPE x counter" names the family without _total; the samples carry it (promtool accepts this).
        yield f"# TYPE {family} {group[0].kind}\n"
        for s in group:
            head = s.name + _labels(s.labels) + " "
            for m, v in s.points:
                if lo <= m < hi:
                    yield f"{head}{_num(v)} {timestamp(m)}\n"
    yield "# EOF\n"


def write_days(workloads: list[Workload], days: range, directory: Path) -> list[Path]:
    """One OpenMetrics file per trace day in `days` (promtool holds a whole file in memory)."""
    directory.mkdir(parents=True, exist_ok=True)
    series = all_series(workloads)
    paths: list[Path] = []
    for day in days:
        path = directory / f"day-{traces.EPOCH_DAY + day}.om"
        with path.open("w") as f:
            f.writelines(render_day(series, day))
        paths.append(path)
    return paths


def utc_midnight(day: int) -> int:
    """Unix seconds of the midnight that *ends* trace day `day`: the instant its aggregates are read."""
    return (traces.EPOCH_DAY + day + 1) * SECONDS_PER_DAY

