"""Generated usage traces for the offline evaluation: seeded, deterministic, one sample a minute.

Each trace is one workload: one or more containers, each with a per-minute CPU *demand*
(millicores) and memory *demand* (Mi), 21 days long, starting at a UTC midnight. What a metrics
engine would have recorded (the *observations*) comes from the demand under the workload's
historical configuration: CPU usage cannot exceed a CPU limit (the excess is throttling), and a
container whose memory reaches its memory limit is OOM-killed and restarts.

Recommenders see observations before a deploy time T; they are scored on demand after it. The
per-day aggregates the estimator consumes (`day_usage`) are computed here exactly as the
Prometheus queries of the refresher will compute them: the p95/p99 of the k-minute CPU rate
sampled each minute, the working-set peak, OOM kills, limits and the throttled share.

Shape parameters are assumptions, stated next to each generator: no real per-container trace is
available offline. Daily max/min CPU ratios of 2-3 sit between whole-cluster figures (Google 2019
cells about 1.5, Alibaba 2018 about 3.2); a single service swings at least as much as a cluster,
so they are on the mild side. Bursts have Pareto(1.5) lengths (heavy tails, as reported for the
Alibaba and Google traces; the exponent itself is an assumption).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

from estimator import DayUsage

MINUTES_PER_DAY = 1440
TRACE_DAYS = 21
EPOCH_DAY = 20_000            # UTC day number of the trace's first day (2024-10-04); any midnight works
NAN = float("nan")

SHAPES = ("steady", "diurnal", "bursty", "throttled", "leak", "batch", "step", "sidecar", "new")
# Seeds used to choose the estimator's constants, and seeds the targets are scored on. Disjoint.
TUNING_SEEDS = (1, 2, 3, 4, 5, 6, 7, 8)
SCORED_SEEDS = (201, 202, 203, 204)


@dataclass(frozen=True)
class Leak:
    """Memory that grows from `base_mi` by `rate_mi_per_min` since the container's last start."""
    base_mi: float
    rate_mi_per_min: float
    noise_mi: float


@dataclass
class Container:
    name: str
    cpu: list[float]                    # demand per minute, millicores; NaN = container not running
    memory: list[float]                 # demand per minute, Mi; NaN = not running (a leak: its noise)
    leak: Leak | None = None            # memory grows with time since the container's start
    cpu_limit_m: float | None = None    # the historical configuration
    memory_limit_mi: float | None = None
    rule_cpu_m: int = 0                 # this container's rule answer; 0 = the trace's (workload's) rule
    rule_memory_mi: int = 0
    # Filled by observe(): what the metrics engine recorded.
    cpu_used: list[float] = field(default_factory=list)
    memory_used: list[float] = field(default_factory=list)
    oom_minutes: list[int] = field(default_factory=list)


@dataclass
class Trace:
    shape: str
    seed: int
    containers: list[Container]
    rule_cpu_m: int                 # what the platform team's rule says (a guess around the true level)
    rule_memory_mi: int
    restarts: tuple[int, ...] = ()  # minutes at which the workload rolled out (pods restart)


def _present(x: float) -> bool:
    return x == x   # NaN is the only value not equal to itself


def memory_demand(c: Container, minute: int, started: int) -> float:
    """Memory demand at `minute` for a container (re)started at `started`."""
    if c.leak is None:
        return c.memory[minute]
    # A leaking container's `memory` holds its noise: the same minute has the same noise whatever
    # limit is replayed, so recommenders are compared on identical demand.
    return c.leak.base_mi + c.leak.rate_mi_per_min * (minute - started) + c.memory[minute]


def observe(trace: Trace) -> None:
    """Replay the demand under the historical configuration (limits), recording observations."""
    for c in trace.containers:
        limit = c.cpu_limit_m
        c.cpu_used = [min(x, limit) if (limit is not None and _present(x)) else x for x in c.cpu]
        c.memory_used, c.oom_minutes = simulate_memory(c, 0, len(c.cpu), c.memory_limit_mi, trace.restarts)


def simulate_memory(c: Container, start: int, end: int, limit: float | None,
                    restarts: tuple[int, ...] = ()) -> tuple[list[float], list[int]]:
    """Working set per minute over [start, end) with a memory limit, and the minutes of OOM kills.

    A container whose demand reaches the limit is killed; the working set recorded that minute is
    the last one before the kill (the fatal value is never observed, as with cAdvisor), and a
    leaking container restarts from its base. `start` is a (re)start: a deploy rolls the pods.
    """
    used: list[float] = []
    ooms: list[int] = []
    started = start
    last = NAN
    restart_set = set(restarts)
    for minute in range(start, end):
        if minute in restart_set:
            started = minute
        if not _present(c.cpu[minute]):
            used.append(NAN)
            continue
        need = memory_demand(c, minute, started)
        if limit is not None and need >= limit:
            ooms.append(minute)
            used.append(last if _present(last) else limit * 0.99)
            started = minute + 1      # restarts: a leak starts over
            last = NAN
            continue
        used.append(need)
        last = need
    return used, ooms


def _rolling(values: list[float], k: int) -> list[float]:
    """The k-minute rate sampled each minute: the mean of the last k present minutes' usage."""
    out: list[float] = []
    window: list[float] = []
    total = 0.0
    for x in values:
        if not _present(x):
            window, total = [], 0.0   # a gap (batch pod gone) starts a new series, as a new pod does
            out.append(NAN)
            continue
        window.append(x)
        total += x
        if len(window) > k:
            total -= window.pop(0)
        out.append(total / len(window))
    return out


def quantile(sorted_values: list[float], q: float) -> float:
    """Prometheus quantile_over_time: linear interpolation between closest ranks."""
    if not sorted_values:
        return NAN
    rank = q * (len(sorted_values) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


def day_usage(c: Container, first_day: int, last_day: int, rate_minutes: int = 5) -> list[DayUsage]:
    """The per-day aggregates of days [first_day, last_day) (0-based trace days), as the refresher
    would read them from the metrics engine for this container: CPU percentiles of
    `rate(container_cpu_usage_seconds_total[<rate_minutes>m])` sampled each minute."""
    rate = _rolling(c.cpu_used, rate_minutes)
    oom_set = set(c.oom_minutes)
    out: list[DayUsage] = []
    for day in range(max(0, first_day), last_day):
        lo, hi = day * MINUTES_PER_DAY, (day + 1) * MINUTES_PER_DAY
        rates = sorted(r for r in rate[lo:hi] if _present(r))
        if not rates:
            continue
        mem = [m for m in c.memory_used[lo:hi] if _present(m)]
        present = [i for i in range(lo, hi) if _present(c.cpu[i])]
        throttled = 0.0
        if c.cpu_limit_m is not None:
            throttled = sum(1 for i in present if c.cpu[i] > c.cpu_limit_m) / len(present)
        out.append(DayUsage(
            day=EPOCH_DAY + day, samples=len(present),
            cpu_p95_m=quantile(rates, 0.95), cpu_p99_m=quantile(rates, 0.99),
            memory_peak_mi=max(mem) if mem else 0.0,
            oom_kills=sum(1 for i in range(lo, hi) if i in oom_set),
            cpu_limit_m=c.cpu_limit_m, cpu_throttled_ratio=throttled, memory_limit_mi=c.memory_limit_mi))
    return out


# ---- shapes -----------------------------------------------------------------------------------

def _rule_guess(rng: random.Random, level: float) -> int:
    # A platform team's rule is a guess: log-uniform between 0.4x and 2.5x the true level.
    return max(10, int(round(level * math.exp(rng.uniform(math.log(0.4), math.log(2.5))))))


def _diurnal_factor(minute: int, ratio: float, weekend: float = 0.55) -> float:
    """Daily cycle with max/min `ratio`, peak at 14:00 UTC, weekends at `weekend` of weekdays."""
    day, m = divmod(minute, MINUTES_PER_DAY)
    lo = 2.0 / (1.0 + ratio)              # mean 1: lo + hi = 2, hi / lo = ratio
    hi = lo * ratio
    phase = math.cos(2 * math.pi * (m - 14 * 60) / MINUTES_PER_DAY)   # 1 at 14:00
    f = lo + (hi - lo) * (phase + 1) / 2
    return f * (weekend if (EPOCH_DAY + day + 3) % 7 >= 5 else 1.0)   # day 0 of 1970 was a Thursday


def _steady(rng: random.Random, n: int, cpu_level: float, mem_level: float, cpu_cv: float = 0.05,
            mem_cv: float = 0.02) -> tuple[list[float], list[float]]:
    cpu = [max(1.0, rng.gauss(cpu_level, cpu_level * cpu_cv)) for _ in range(n)]
    mem = [max(1.0, rng.gauss(mem_level, mem_level * mem_cv)) for _ in range(n)]
    return cpu, mem


def _bursts(rng: random.Random, n: int, per_hour: tuple[float, float]) -> list[bool]:
    """Minutes inside a burst: Poisson arrivals, Pareto(1.5) lengths (>= 1 minute, <= 60)."""
    out = [False] * n
    rate = rng.uniform(*per_hour) / 60.0
    minute = 0.0
    while True:
        minute += rng.expovariate(rate)
        if minute >= n:
            return out
        length = min(60, int(rng.paretovariate(1.5)))
        for i in range(int(minute), min(n, int(minute) + length)):
            out[i] = True


def gen_steady(rng: random.Random, seed: int) -> Trace:
    n = TRACE_DAYS * MINUTES_PER_DAY
    cpu_level, mem_level = rng.uniform(100, 800), rng.uniform(200, 1200)
    cpu, mem = _steady(rng, n, cpu_level, mem_level)
    return Trace("steady", seed, [Container("app", cpu, mem)], _rule_guess(rng, cpu_level), _rule_guess(rng, mem_level))


def gen_diurnal(rng: random.Random, seed: int) -> Trace:
    n = TRACE_DAYS * MINUTES_PER_DAY
    cpu_level, mem_level, ratio = rng.uniform(200, 1000), rng.uniform(300, 1500), rng.uniform(2.0, 3.0)
    cpu, mem = [], []
    for i in range(n):
        f = _diurnal_factor(i, ratio)
        cpu.append(max(1.0, cpu_level * f * rng.gauss(1.0, 0.08)))
        mem.append(max(1.0, mem_level * (1 + 0.4 * (f - 1)) * rng.gauss(1.0, 0.02)))  # memory follows load at 40%
    return Trace("diurnal", seed, [Container("web", cpu, mem)], _rule_guess(rng, cpu_level * 1.5),
                 _rule_guess(rng, mem_level))


def gen_bursty(rng: random.Random, seed: int) -> Trace:
    n = TRACE_DAYS * MINUTES_PER_DAY
    base, mem_level = rng.uniform(100, 400), rng.uniform(200, 800)
    burst = _bursts(rng, n, (2, 6))
    amp = rng.uniform(2.0, 4.0)
    cpu = [max(1.0, rng.gauss(base * (amp if b else 1.0), base * 0.1)) for b in burst]
    mem = [max(1.0, rng.gauss(mem_level * (1.1 if b else 1.0), mem_level * 0.02)) for b in burst]
    return Trace("bursty", seed, [Container("worker", cpu, mem)], _rule_guess(rng, base * 1.5), _rule_guess(rng, mem_level))


def gen_throttled(rng: random.Random, seed: int) -> Trace:
    """Bursts to 1.2-2.0 cores over a 1-core CPU limit: usage is censored, throttling shows it."""
    n = TRACE_DAYS * MINUTES_PER_DAY
    base, mem_level = rng.uniform(300, 600), rng.uniform(300, 600)
    burst = _bursts(rng, n, (2, 6))
    level = rng.uniform(1200, 2000)
    cpu = [max(1.0, rng.gauss(level if b else base, (level if b else base) * 0.08)) for b in burst]
    mem = [max(1.0, rng.gauss(mem_level, mem_level * 0.02)) for _ in range(n)]
    c = Container("worker", cpu, mem, cpu_limit_m=1000.0)
    return Trace("throttled", seed, [c], _rule_guess(rng, 1000), _rule_guess(rng, mem_level))


def gen_leak(rng: random.Random, seed: int) -> Trace:
    """Memory grows 3-12 MiB/h from 250-350 MiB under a 768 MiB limit: OOM every 1.5-7 days."""
    n = TRACE_DAYS * MINUTES_PER_DAY
    cpu_level = rng.uniform(50, 200)
    cpu, _ = _steady(rng, n, cpu_level, 1.0)
    leak = Leak(base_mi=rng.uniform(250, 350), rate_mi_per_min=rng.uniform(3, 12) / 60, noise_mi=3.0)
    noise = [rng.gauss(0.0, leak.noise_mi) for _ in range(n)]
    c = Container("cache", cpu, noise, leak=leak, memory_limit_mi=768.0)
    return Trace("leak", seed, [c], _rule_guess(rng, cpu_level), _rule_guess(rng, 600))


def gen_batch(rng: random.Random, seed: int) -> Trace:
    """A nightly CronJob: 35-60 min from 02:00, CPU-bound 1.5-2 cores, memory ramping to 1.2-1.6 GiB."""
    n = TRACE_DAYS * MINUTES_PER_DAY
    cpu, mem = [NAN] * n, [NAN] * n
    cores, peak = rng.uniform(1500, 2000), rng.uniform(1200, 1600)
    for day in range(TRACE_DAYS):
        start = day * MINUTES_PER_DAY + 120 + rng.randrange(0, 5)
        length = rng.randrange(35, 61)
        for k in range(length):
            cpu[start + k] = max(1.0, rng.gauss(cores, cores * 0.06))
            mem[start + k] = max(1.0, peak * (0.3 + 0.7 * (k + 1) / length) * rng.gauss(1.0, 0.02))
    return Trace("batch", seed, [Container("report", cpu, mem)], _rule_guess(rng, cores), _rule_guess(rng, peak))


def gen_step(rng: random.Random, seed: int) -> Trace:
    """A rollout between days 9 and 12.5: CPU -30%, memory +40% (tests recency)."""
    n = TRACE_DAYS * MINUTES_PER_DAY
    cpu_level, mem_level = rng.uniform(200, 800), rng.uniform(200, 800)
    at = rng.randrange(9 * MINUTES_PER_DAY, int(12.5 * MINUTES_PER_DAY))
    cpu, mem = [], []
    for i in range(n):
        after = i >= at
        f = _diurnal_factor(i, 1.5, weekend=0.8)
        cpu.append(max(1.0, cpu_level * (0.7 if after else 1.0) * f * rng.gauss(1.0, 0.06)))
        mem.append(max(1.0, mem_level * (1.4 if after else 1.0) * rng.gauss(1.0, 0.02)))
    return Trace("step", seed, [Container("api", cpu, mem)], _rule_guess(rng, cpu_level),
                 _rule_guess(rng, mem_level), restarts=(at,))


def gen_sidecar(rng: random.Random, seed: int) -> Trace:
    """A diurnal app and an injected envoy sidecar whose CPU follows the app's traffic."""
    n = TRACE_DAYS * MINUTES_PER_DAY
    cpu_level, mem_level, ratio = rng.uniform(200, 800), rng.uniform(300, 1000), rng.uniform(1.5, 2.5)
    share, envoy_mem = rng.uniform(0.05, 0.15), rng.uniform(50, 80)
    app_cpu, app_mem, envoy_cpu, envoy_m = [], [], [], []
    for i in range(n):
        f = _diurnal_factor(i, ratio)
        load = cpu_level * f * rng.gauss(1.0, 0.08)
        app_cpu.append(max(1.0, load))
        app_mem.append(max(1.0, mem_level * (1 + 0.3 * (f - 1)) * rng.gauss(1.0, 0.02)))
        envoy_cpu.append(max(1.0, load * share * rng.gauss(1.0, 0.1)))
        envoy_m.append(max(1.0, envoy_mem * rng.gauss(1.0, 0.03)))
    # Rules name the sidecar's requests separately (an injector's defaults), also a guess.
    envoy = Container("envoy", envoy_cpu, envoy_m, rule_cpu_m=_rule_guess(rng, cpu_level * share),
                      rule_memory_mi=_rule_guess(rng, envoy_mem))
    return Trace("sidecar", seed, [Container("app", app_cpu, app_mem), envoy],
                 _rule_guess(rng, cpu_level), _rule_guess(rng, mem_level))


def gen_new(rng: random.Random, seed: int) -> Trace:
    """A workload created at 12:00 on day 13: 12 h of history at the first scored deploy (day 14)."""
    n = TRACE_DAYS * MINUTES_PER_DAY
    born = 13 * MINUTES_PER_DAY + 720
    cpu_level, mem_level, ratio = rng.uniform(100, 800), rng.uniform(200, 1200), rng.uniform(1.2, 2.0)
    cpu, mem = [NAN] * n, [NAN] * n
    for i in range(born, n):
        f = _diurnal_factor(i, ratio, weekend=0.8)
        cpu[i] = max(1.0, cpu_level * f * rng.gauss(1.0, 0.06))
        mem[i] = max(1.0, mem_level * rng.gauss(1.0, 0.02))
    return Trace("new", seed, [Container("app", cpu, mem)], _rule_guess(rng, cpu_level), _rule_guess(rng, mem_level))


GENERATORS: dict[str, Callable[[random.Random, int], Trace]] = {
    "steady": gen_steady, "diurnal": gen_diurnal, "bursty": gen_bursty, "throttled": gen_throttled,
    "leak": gen_leak, "batch": gen_batch, "step": gen_step, "sidecar": gen_sidecar, "new": gen_new,
}


def generate(shape: str, seed: int) -> Trace:
    """The trace of `shape` for `seed`, observations included. Same arguments, same trace."""
    # random.Random seeded with a str hashes it with SHA-512: stable across runs and machines.
    trace = GENERATORS[shape](random.Random(f"{shape}:{seed}"), seed)
    for c in trace.containers:
        c.rule_cpu_m = c.rule_cpu_m or trace.rule_cpu_m
        c.rule_memory_mi = c.rule_memory_mi or trace.rule_memory_mi
    observe(trace)
    return trace
