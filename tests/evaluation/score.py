"""Score the estimator and the baselines on the generated traces.

Protocol: every day T of days 14..20 at 00:00 UTC is a deploy. Each recommender sees what the
metrics engine recorded before T (our estimator: the completed days [T-14, T) as per-day
aggregates; krr: the raw samples of the same 14 days; VPA: every sample since the workload
started, as a recommender running all along would) and answers a request. The request is scored
on the *demand* of the next `horizon` days (open loop: demand does not react to the request):

* CPU slack %     = sum(max(0, R - d)) / sum(R) over the minutes the container runs;
* CPU shortfall % = share of minutes with demand d > R (samples above the request);
* OOM-days %      = share of container-days with an OOM kill when the memory limit equals the
                    memory request (the deploy restarts the pods, so a leak starts over at T);
* memory slack %  = the same as CPU slack on memory demand;
* churn %         = share of consecutive deploys where CPU or memory moved by more than 10%.

Per shape the sums are pooled over seeds, containers and deploy days; the suite is the mean of
the shapes. When krr reports "not enough data" or VPA has no samples, the deploy keeps the rule.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable

import baselines
import traces
from estimator import DEFAULT_PARAMS, Params, Recommendation, RuleAnswer, recommend

RECOMMENDERS = ("rules", "krr-simple", "vpa", "reqapi")
DEPLOY_DAYS = tuple(range(14, traces.TRACE_DAYS))
HISTORY_DAYS = 14
RATE_WINDOWS = (1, 2, 5)        # CPU rate windows (minutes) the refresher could query, evaluated
RATE_MINUTES = 2                # the one chosen on the tuning seeds
MIN_CPU_M, MAX_CPU_M = 10, 16_000          # reqapi's example min/max rules: 10m..16 cores
MIN_MEMORY_MI, MAX_MEMORY_MI = 16, 65_536  # 16Mi..64Gi


@dataclass
class Totals:
    """Pooled sums for one (recommender, shape)."""
    cpu_request: float = 0.0     # sum of R over running minutes
    cpu_slack: float = 0.0
    cpu_minutes: int = 0
    cpu_short: int = 0
    memory_request: float = 0.0
    memory_slack: float = 0.0
    container_days: int = 0
    oom_days: int = 0
    transitions: int = 0
    churned: int = 0

    def add(self, other: "Totals") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def metrics(self) -> dict[str, float]:
        def pct(a: float, b: float) -> float:
            return 100.0 * a / b if b else 0.0
        return {"cpu_slack": pct(self.cpu_slack, self.cpu_request),
                "cpu_short": pct(self.cpu_short, self.cpu_minutes),
                "oom_days": pct(self.oom_days, self.container_days),
                "mem_slack": pct(self.memory_slack, self.memory_request),
                "churn": pct(self.churned, self.transitions)}


@dataclass
class Window:
    """A container's demand after one deploy, pre-sorted so scoring a request is O(log n)."""
    cpu_sorted: list[float]
    cpu_prefix: list[float]         # prefix sums of cpu_sorted
    memory_sorted: list[float]
    memory_prefix: list[float]
    day_peaks: list[float]          # per scored day, the largest memory demand (pods restarted at T)
    container: traces.Container     # for a leak, OOM days depend on the limit: replayed at scoring
    start: int                      # minutes [start, end) of the window
    end: int


def _prefix(values: list[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out


def _slack_short(sorted_values: list[float], prefix: list[float], r: float) -> tuple[float, int]:
    below = bisect.bisect_left(sorted_values, r)          # values < r
    slack = r * below - prefix[below]
    short = len(sorted_values) - bisect.bisect_right(sorted_values, r)
    return slack, short


@dataclass
class PreparedContainer:
    """Everything the recommenders need for one container, computed once per trace."""
    shape: str
    name: str
    rule: RuleAnswer
    days: dict[int, list]                               # rate window -> DayUsage of every trace day
    windows: dict[int, Window]                          # deploy day -> scored window
    baseline_answers: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)


def _window(trace: traces.Trace, c: traces.Container, t: int, horizon: int) -> Window:
    lo = t * traces.MINUTES_PER_DAY
    hi = min(len(c.cpu), (t + horizon) * traces.MINUTES_PER_DAY)
    cpu = sorted(x for x in c.cpu[lo:hi] if x == x)
    need: list[float] = []
    day_peaks: list[float] = []
    for day_lo in range(lo, hi, traces.MINUTES_PER_DAY):
        day_need = [traces.memory_demand(c, m, lo) for m in range(day_lo, min(hi, day_lo + traces.MINUTES_PER_DAY))
                    if c.cpu[m] == c.cpu[m]]
        if day_need:
            day_peaks.append(max(day_need))
        need.extend(day_need)
    memory = sorted(need)
    return Window(cpu, _prefix(cpu), memory, _prefix(memory), day_peaks, c, lo, hi)


def _oom_days(w: Window, limit: float) -> int:
    """Days of the window with an OOM kill when the memory limit is `limit`."""
    if w.container.leak is None:
        return sum(peak >= limit for peak in w.day_peaks)   # the kill happens at the limit
    # A leak restarts after each kill, so later days depend on when it was killed: replay it.
    _, kills = traces.simulate_memory(w.container, w.start, w.end, limit)
    return len({(m - w.start) // traces.MINUTES_PER_DAY for m in kills})


def prepare(trace: traces.Trace, horizon: int = 1, rate_windows: tuple[int, ...] = RATE_WINDOWS) -> list[PreparedContainer]:
    """Per container: daily aggregates, scored windows, and the baselines' answers at each deploy."""
    out = []
    minute_s = 60.0
    t0 = traces.EPOCH_DAY * 86400.0
    for c in trace.containers:
        rule = RuleAnswer(cpu_m=c.rule_cpu_m, memory_mi=c.rule_memory_mi, min_cpu_m=MIN_CPU_M,
                          min_memory_mi=MIN_MEMORY_MI, max_cpu_m=MAX_CPU_M, max_memory_mi=MAX_MEMORY_MI)
        days = {k: traces.day_usage(c, 0, traces.TRACE_DAYS, k) for k in rate_windows}
        windows = {t: _window(trace, c, t, horizon) for t in DEPLOY_DAYS}
        prepared = PreparedContainer(trace.shape, c.name, rule, days, windows)
        krr: dict[int, tuple[float, float]] = {}
        vpa: dict[int, tuple[float, float]] = {}
        feeder = baselines.VpaContainer()
        fed = 0
        oom_set = set(c.oom_minutes)
        request_bytes = (c.memory_limit_mi or 0.0) * baselines.MIB   # historical request = limit
        for t in DEPLOY_DAYS:
            lo, hi = (t - HISTORY_DAYS) * traces.MINUTES_PER_DAY, t * traces.MINUTES_PER_DAY
            cpu = [x for x in c.cpu_used[lo:hi] if x == x]
            memory = [x for x in c.memory_used[lo:hi] if x == x]
            k = baselines.krr_simple([cpu], [memory])
            krr[t] = (k.cpu_m if k.cpu_m is not None else rule.cpu_m,
                      k.memory_mi if k.memory_mi is not None else rule.memory_mi)
            for minute in range(fed, hi):
                u = c.cpu_used[minute]
                if u != u:
                    continue
                ts = t0 + minute * minute_s
                feeder.add_cpu(ts, u / 1000.0)
                feeder.add_memory(ts, c.memory_used[minute] * baselines.MIB)
                if minute in oom_set:
                    feeder.record_oom(ts, request_bytes)
            fed = hi
            v = feeder.recommend(len(trace.containers))
            vpa[t] = (v.target_cpu_m, v.target_memory_mi) if v else (rule.cpu_m, rule.memory_mi)
        prepared.baseline_answers = {"rules": {t: (rule.cpu_m, rule.memory_mi) for t in DEPLOY_DAYS},
                                     "krr-simple": krr, "vpa": vpa}
        out.append(prepared)
    return out


def reqapi_answers(pc: PreparedContainer, params: Params, rate_minutes: int = RATE_MINUTES) -> dict[int, tuple[float, float]]:
    days = pc.days[rate_minutes]
    return {t: _pair(recommend(days, pc.rule, traces.EPOCH_DAY + t, params)) for t in DEPLOY_DAYS}


def _pair(r: Recommendation) -> tuple[float, float]:
    return (r.cpu_m, r.memory_mi)


def score_answers(pc: PreparedContainer, answers: dict[int, tuple[float, float]]) -> Totals:
    tot = Totals()
    previous: tuple[float, float] | None = None
    for t in DEPLOY_DAYS:
        cpu_r, memory_r = answers[t]
        w = pc.windows[t]
        if w.cpu_sorted:
            slack, short = _slack_short(w.cpu_sorted, w.cpu_prefix, cpu_r)
            tot.cpu_request += cpu_r * len(w.cpu_sorted)
            tot.cpu_slack += slack
            tot.cpu_minutes += len(w.cpu_sorted)
            tot.cpu_short += short
            mslack, _ = _slack_short(w.memory_sorted, w.memory_prefix, memory_r)
            tot.memory_request += memory_r * len(w.memory_sorted)
            tot.memory_slack += mslack
            tot.container_days += len(w.day_peaks)
            tot.oom_days += _oom_days(w, memory_r)
        if previous is not None:
            tot.transitions += 1
            tot.churned += any(abs(new - old) > 0.10 * old for new, old in zip((cpu_r, memory_r), previous))
        previous = (cpu_r, memory_r)
    return tot


def prepare_all(shapes: Iterable[str], seeds: Iterable[int], horizon: int = 1,
                rate_windows: tuple[int, ...] = RATE_WINDOWS) -> list[PreparedContainer]:
    out: list[PreparedContainer] = []
    for shape in shapes:
        for seed in seeds:
            out.extend(prepare(traces.generate(shape, seed), horizon, rate_windows))
    return out


def evaluate(prepared: list[PreparedContainer], params: Params = DEFAULT_PARAMS,
             rate_minutes: int = RATE_MINUTES) -> dict[str, dict[str, dict[str, float]]]:
    """{recommender: {shape or "suite": {metric: value}}}."""
    totals: dict[str, dict[str, Totals]] = {r: {} for r in RECOMMENDERS}
    for pc in prepared:
        for r in RECOMMENDERS:
            answers = reqapi_answers(pc, params, rate_minutes) if r == "reqapi" else pc.baseline_answers[r]
            totals[r].setdefault(pc.shape, Totals()).add(score_answers(pc, answers))
    result: dict[str, dict[str, dict[str, float]]] = {}
    for r, by_shape in totals.items():
        result[r] = {shape: t.metrics() for shape, t in by_shape.items()}
        shapes = list(by_shape)
        result[r]["suite"] = {m: sum(result[r][s][m] for s in shapes) / len(shapes)
                              for m in result[r][shapes[0]]}
    return result


def leak_flags(prepared: list[PreparedContainer], params: Params = DEFAULT_PARAMS,
               rate_minutes: int = RATE_MINUTES) -> dict[str, tuple[int, int]]:
    """{shape: (deploys whose answer flags a memory leak, deploys)}."""
    out: dict[str, tuple[int, int]] = {}
    for pc in prepared:
        flagged, total = out.get(pc.shape, (0, 0))
        for t in DEPLOY_DAYS:
            memory = recommend(pc.days[rate_minutes], pc.rule, traces.EPOCH_DAY + t, params).basis.memory
            flagged += bool(memory is not None and memory.leak)
            total += 1
        out[pc.shape] = (flagged, total)
    return out


def target_report(result: dict[str, dict[str, dict[str, float]]], shape_safety: float = 0.0) -> list[tuple[str, bool, str]]:
    """The issue's targets, each (name, met, numbers). With `shape_safety` (tuning only) a baseline
    that comes within that many points of beating it on both slack and shortfall counts as beating."""
    ours, krr, vpa = result["reqapi"]["suite"], result["krr-simple"]["suite"], result["vpa"]["suite"]
    best_oom = min(krr["oom_days"], vpa["oom_days"])
    rows = [
        ("OOM-days <= better baseline + 1 point", ours["oom_days"] <= best_oom + 1.0,
         f"{ours['oom_days']:.2f}% vs {best_oom:.2f}% + 1"),
        ("CPU shortfall <= krr-simple", ours["cpu_short"] <= krr["cpu_short"],
         f"{ours['cpu_short']:.2f}% vs {krr['cpu_short']:.2f}%"),
        ("CPU slack <= VPA", ours["cpu_slack"] <= vpa["cpu_slack"],
         f"{ours['cpu_slack']:.2f}% vs {vpa['cpu_slack']:.2f}%"),
    ]
    beaten = [f"{shape}: {b}" for shape in result["reqapi"] if shape != "suite"
              for b in ("krr-simple", "vpa")
              if result[b][shape]["cpu_slack"] < result["reqapi"][shape]["cpu_slack"] + shape_safety
              and result[b][shape]["cpu_short"] < result["reqapi"][shape]["cpu_short"] + shape_safety]
    rows.append(("no shape where a baseline beats it on both CPU slack and shortfall", not beaten,
                 "; ".join(beaten) or "none"))
    rows.append(("stretch: lower CPU slack than krr-simple at <= shortfall",
                 ours["cpu_slack"] < krr["cpu_slack"] and ours["cpu_short"] <= krr["cpu_short"],
                 f"slack {ours['cpu_slack']:.2f}% vs {krr['cpu_slack']:.2f}%, "
                 f"shortfall {ours['cpu_short']:.2f}% vs {krr['cpu_short']:.2f}%"))
    return rows


def markdown_table(result: dict[str, dict[str, dict[str, float]]]) -> str:
    shapes = [s for s in result["reqapi"] if s != "suite"] + ["suite"]
    lines = ["| shape | recommender | CPU slack % | CPU shortfall % | OOM-days % | memory slack % | churn % |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        for r in RECOMMENDERS:
            m = result[r][shape]
            name = f"**{shape}**" if shape == "suite" else shape
            lines.append(f"| {name} | {r} | {m['cpu_slack']:.1f} | {m['cpu_short']:.2f} | {m['oom_days']:.1f} | "
                         f"{m['mem_slack']:.1f} | {m['churn']:.1f} |")
    return "\n".join(lines)
