"""The history estimator: what requests a container should get, from its completed days of usage.

Written to move verbatim into reqapi.py's pure core: standard library only, no I/O, no clock
(the caller passes `today`), frozen dataclasses, and a pure function `recommend()` whose answer
depends on nothing but its arguments - two replicas that hold the same completed days and the
same rules agree byte for byte, and an answer can change at most when a day completes.

Units are reqapi's: CPU in millicores, memory in Mi (2**20 bytes). Inputs are floats as a
metrics engine returns them; answers are whole numbers, rounded up so a request never shrinks
below what was computed.

The algorithm (constants in `Params`, chosen on the evaluation's tuning seeds, see
docs/history-estimator.md):

* CPU: per completed day, the p95 of the CPU rate (`rate(...[2m])` sampled each minute: the
  evaluation found a 5-minute rate smooths bursts away and under-requests bursty workloads),
  max over the workload's pods. A day on which a CPU limit visibly capped usage (throttled in
  more than 5% of CFS periods - so the p95 of demand lies above the limit - and the day's p99
  at the limit) counts as `limit x (1 + throttle_raise)` instead of its p95: usage cannot show
  demand above the limit, and the smoothed p95 sits below it. Over the days, a recency-weighted
  quantile (weights halve every `cpu_half_life_days`, times the day's sample count), then
  `x (1 + cpu_margin)`.
* Memory: the largest daily working-set peak of the window `x (1 + memory_margin)` - the max,
  not a percentile, because a missed memory peak is an OOM kill, not a slow request. If the
  container was OOM-killed, at least VPA's bump applied to the limit it was killed at:
  `max(limit x 1.2, limit + 100Mi)` (VPA's OOMBumpUpRatio and OOMMinBumpUp in
  vertical-pod-autoscaler pkg/recommender/model/aggregations_config.go; VPA bumps the observed
  usage, we bump the limit because usage at the moment of the kill is never observed).
  A peak that grows day after day is flagged as a leak, not chased.
* Confidence `min(1, days / full_confidence_days)`. The answer moves from the rule toward the
  history value as confidence grows, but never below the history value:
  `max(history, w x history + (1 - w) x rule)`. With too little history (no completed day, or
  fewer than `min_samples` samples) the rule answers.
* Then the rules' min/max clamp. The max wins even over "never below observed usage"; the basis
  says so (`max_clamp_beat_usage`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

SOURCE_RULES = "rules"
SOURCE_HISTORY = "history"
SOURCE_BLEND = "blend"

REASON_NO_HISTORY = "NoHistory"                    # no completed day with usage
REASON_INSUFFICIENT = "InsufficientSamples"        # fewer samples than Params.min_samples
REASON_PINNED = "PinnedToRules"                    # the rule says: rules only


@dataclass(frozen=True)
class DayUsage:
    """One container's usage on one completed UTC day, aggregated over the workload's pods."""
    day: int                               # UTC day number: days since 1970-01-01
    samples: int                           # usage samples behind the day (all pods)
    cpu_p95_m: float                       # p95 of the CPU rate (Params.cpu_rate), millicores, max over pods
    cpu_p99_m: float                       # p99 of the same, millicores (detects usage at the limit)
    memory_peak_mi: float                  # working-set peak, Mi, max over pods
    oom_kills: int = 0                     # OOM kills that day, all pods
    cpu_limit_m: float | None = None       # CPU limit in force (max over pods); None = no limit
    cpu_throttled_ratio: float = 0.0       # throttled / total CFS periods, max over pods
    memory_limit_mi: float | None = None   # memory limit in force (max over pods); None = no limit


@dataclass(frozen=True)
class RuleAnswer:
    """What the static rules say for the workload, and their guard rails."""
    cpu_m: int                      # the rule's answer (already clamped into min/max by the rules)
    memory_mi: int
    min_cpu_m: int | None = None    # None = no lower clamp
    min_memory_mi: int | None = None
    max_cpu_m: int | None = None    # None = no upper clamp
    max_memory_mi: int | None = None
    rules_only: bool = False        # the rule pins the workload to the rules' answer


@dataclass(frozen=True)
class Params:
    """The estimator's constants. Defaults are the values chosen by tests/evaluation (tuning seeds)."""
    window_days: int = 14              # history window, completed days (krr's default history)
    cpu_rate: str = "2m"               # the rate window of the daily CPU percentiles (for the basis text)
    min_samples: int = 100             # krr's points_required: fewer samples than this is no history
    cpu_day_quantile: float = 0.9      # quantile over the days of the daily p95s
    cpu_half_life_days: float = 1.0    # a day's weight halves every this many days of age
    cpu_margin: float = 0.05           # on top of a p95 that is already a high statistic
    throttle_threshold: float = 0.05   # > 5% of periods throttled: demand's p95 is above the limit
    throttle_at_limit: float = 0.95    # the day's p99 reached 95% of the limit: usage was capped
    throttle_raise: float = 0.25       # a capped day counts as limit x (1 + this)
    memory_margin: float = 0.15        # krr's and VPA's 15%
    oom_bump_ratio: float = 1.2        # VPA DefaultOOMBumpUpRatio
    oom_min_bump_mi: float = 100.0     # VPA DefaultOOMMinBumpUp (100 MiB)
    full_confidence_days: float = 7.0  # days of history at which history fully replaces the rule
    leak_days: int = 4                 # a leak needs this many comparable pairs of days...
    leak_share: float = 0.75           # ...this share of which rose...
    leak_min_growth: float = 0.02      # ...by at least 2% from one day to the next


DEFAULT_PARAMS = Params()


@dataclass(frozen=True)
class ResourceBasis:
    """How one resource's answer was reached (one line of the object's explanation)."""
    statistic: str                 # what was measured, in words
    observed: float                # the statistic's value before margin (millicores or Mi)
    margin: float                  # the margin fraction applied
    history: int                   # the usage-based value: statistic, margin, raises and bumps
    rule: int                      # the rule's answer
    blended: int                   # after moving from the rule toward history (never < history)
    answer: int                    # after the rules' min/max clamp
    clamped: str                   # "", "min" or "max"
    max_clamp_beat_usage: bool     # the max clamp pulled the answer below `history`
    capped_days: int = 0           # CPU: days on which a CPU limit visibly capped usage
    oom_kills: int = 0             # memory: OOM kills in the window
    oom_limit_mi: float | None = None  # memory: the limit the container was killed at
    leak: bool = False             # memory: daily peaks grew day after day


@dataclass(frozen=True)
class Basis:
    window_days: int               # the history window asked for
    days: int                      # completed days with usage inside it
    samples: int                   # samples behind those days
    first_day: int | None          # UTC day numbers of the oldest and newest day used
    last_day: int | None
    confidence: float              # 0..1: how far the answer moved from the rule toward history
    reason: str                    # why the rules answered, "" when history did
    cpu: ResourceBasis | None      # None when there is no usable history
    memory: ResourceBasis | None


@dataclass(frozen=True)
class Recommendation:
    cpu_m: int
    memory_mi: int
    source: str                    # SOURCE_RULES, SOURCE_HISTORY or SOURCE_BLEND
    confidence: float
    basis: Basis


def _finite_nonnegative(value: float | None) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def usable_days(days: Iterable[DayUsage], today: int, window_days: int) -> tuple[DayUsage, ...]:
    """Completed days inside the window, one per day number, oldest first.

    A metrics engine can return NaN, negative or infinite values: such a day is dropped rather
    than trusted. If two entries share a day (a caller merging sources), the one with more
    samples wins, then the larger values - a choice that does not depend on input order.
    """
    best: dict[int, DayUsage] = {}
    for d in days:
        if not (today - window_days <= d.day < today):
            continue   # today is not complete; older days are outside the window
        if d.samples <= 0 or not all(_finite_nonnegative(v) for v in (
                d.cpu_p95_m, d.cpu_p99_m, d.memory_peak_mi, d.cpu_throttled_ratio)):
            continue
        if d.oom_kills < 0 or (d.cpu_limit_m is not None and not _finite_nonnegative(d.cpu_limit_m)) or (
                d.memory_limit_mi is not None and not _finite_nonnegative(d.memory_limit_mi)):
            continue
        old = best.get(d.day)
        if old is None or _rank(d) > _rank(old):
            best[d.day] = d
    return tuple(best[k] for k in sorted(best))


def _rank(d: DayUsage) -> tuple:
    return (d.samples, d.cpu_p95_m, d.cpu_p99_m, d.memory_peak_mi, d.oom_kills, d.cpu_throttled_ratio,
            d.cpu_limit_m or 0.0, d.memory_limit_mi or 0.0)


def weighted_quantile(values: Sequence[float], weights: Sequence[float], q: float) -> float:
    """The smallest value whose cumulative weight reaches q of the total (values need not be sorted).

    Ties in value are broken by position only through sorting on (value, weight), so the result
    is the same for any order of the same pairs.
    """
    pairs = sorted(zip(values, weights))
    total = math.fsum(w for _, w in pairs)
    threshold = q * total
    running = 0.0
    for value, weight in pairs:
        running += weight
        if running >= threshold:
            return value
    return pairs[-1][0]


def cpu_day_value(d: DayUsage, p: Params) -> tuple[float, bool]:
    """The day's CPU statistic, and whether a CPU limit visibly capped it (then raised)."""
    capped = (d.cpu_limit_m is not None and d.cpu_limit_m > 0
              and d.cpu_throttled_ratio > p.throttle_threshold
              and d.cpu_p99_m >= p.throttle_at_limit * d.cpu_limit_m)
    if capped:
        return max(d.cpu_p95_m, d.cpu_limit_m * (1.0 + p.throttle_raise)), True
    return d.cpu_p95_m, False


def is_leak(days: Sequence[DayUsage], p: Params) -> bool:
    """Daily peaks that grow day after day: of the pairs of consecutive days in the window, at
    least `leak_days` are comparable and `leak_share` of them rose by `leak_min_growth` or more.

    A day with an OOM kill is not comparable with its neighbours: the kill restarts the container,
    so a leak that is killed every few days shows a sawtooth, not a staircase - its rising
    kill-free stretches are the signal.
    """
    pairs = [(a, b) for a, b in zip(days, days[1:])
             if b.day == a.day + 1 and not a.oom_kills and not b.oom_kills]
    if len(pairs) < p.leak_days:
        return False
    rising = sum(b.memory_peak_mi >= a.memory_peak_mi * (1.0 + p.leak_min_growth) for a, b in pairs)
    return rising >= p.leak_share * len(pairs)


def _ceil(value: float) -> int:
    # Round up, but forgive float noise so 100.00000000001 (from 87 x 1.15) is 100, not 101.
    return int(math.ceil(value - 1e-9))


def _clamp(value: int, low: int | None, high: int | None) -> tuple[int, str]:
    # Min first, then max: when the two disagree the max wins, like reqapi's rules.
    clamped = ""
    if low is not None and value < low:
        value, clamped = low, "min"
    if high is not None and value > high:
        value, clamped = high, "max"
    return value, clamped


def _resource(statistic: str, observed: float, margin: float, history: float, rule: int, weight: float,
              low: int | None, high: int | None, **extra: object) -> ResourceBasis:
    history_whole = _ceil(history)
    blended = max(history_whole, _ceil(weight * history + (1.0 - weight) * rule))
    answer, clamped = _clamp(blended, low, high)
    return ResourceBasis(statistic=statistic, observed=observed, margin=margin, history=history_whole,
                         rule=rule, blended=blended, answer=answer, clamped=clamped,
                         max_clamp_beat_usage=answer < history_whole, **extra)


def recommend(days: Iterable[DayUsage], rule: RuleAnswer, today: int,
              params: Params = DEFAULT_PARAMS) -> Recommendation:
    """The requests for one container, from its completed days before `today` (a UTC day number)."""
    p = params
    kept = usable_days(days, today, p.window_days)
    samples = sum(d.samples for d in kept)
    rule_cpu, _ = _clamp(rule.cpu_m, rule.min_cpu_m, rule.max_cpu_m)
    rule_memory, _ = _clamp(rule.memory_mi, rule.min_memory_mi, rule.max_memory_mi)
    if not kept or samples < p.min_samples:
        basis = Basis(window_days=p.window_days, days=len(kept), samples=samples,
                      first_day=kept[0].day if kept else None, last_day=kept[-1].day if kept else None,
                      confidence=0.0, reason=REASON_PINNED if rule.rules_only else (
                          REASON_INSUFFICIENT if kept else REASON_NO_HISTORY),
                      cpu=None, memory=None)
        return Recommendation(cpu_m=rule_cpu, memory_mi=rule_memory, source=SOURCE_RULES,
                              confidence=0.0, basis=basis)

    confidence = min(1.0, len(kept) / p.full_confidence_days)
    weight = confidence

    # CPU: a recency-weighted quantile of the daily values.
    newest = today - 1
    values: list[float] = []
    weights: list[float] = []
    capped_days = 0
    for d in kept:
        value, capped = cpu_day_value(d, p)
        capped_days += capped
        values.append(value)
        weights.append(d.samples * 2.0 ** (-(newest - d.day) / p.cpu_half_life_days))
    cpu_observed = weighted_quantile(values, weights, p.cpu_day_quantile)
    cpu = _resource(
        f"p{round(p.cpu_day_quantile * 100)} over days (half-life {p.cpu_half_life_days:g}d) of the daily "
        f"p95 of the {p.cpu_rate} CPU rate" + (", capped days at limit x" + f"{1 + p.throttle_raise:g}" if capped_days else ""),
        cpu_observed, p.cpu_margin, cpu_observed * (1.0 + p.cpu_margin), rule_cpu, weight,
        rule.min_cpu_m, rule.max_cpu_m, capped_days=capped_days)

    # Memory: the largest daily peak, the margin, and the OOM bump on the limit that killed it.
    memory_observed = max(d.memory_peak_mi for d in kept)
    memory_history = memory_observed * (1.0 + p.memory_margin)
    oom_kills = sum(d.oom_kills for d in kept)
    oom_limit: float | None = None
    if oom_kills:
        # The kill happened at the limit; without a known limit the day's peak is the best bound.
        oom_limit = max((d.memory_limit_mi if d.memory_limit_mi is not None else d.memory_peak_mi)
                        for d in kept if d.oom_kills)
        memory_history = max(memory_history, oom_limit * p.oom_bump_ratio, oom_limit + p.oom_min_bump_mi)
    memory = _resource(
        "max daily working-set peak", memory_observed, p.memory_margin, memory_history, rule_memory, weight,
        rule.min_memory_mi, rule.max_memory_mi, oom_kills=oom_kills, oom_limit_mi=oom_limit,
        leak=is_leak(kept, p))

    if rule.rules_only:
        # A pinned workload's explanation still shows what history would answer (shadow), but
        # the rule answers.
        source, reason = SOURCE_RULES, REASON_PINNED
        cpu_m, memory_mi = rule_cpu, rule_memory
    else:
        source, reason = (SOURCE_HISTORY if confidence >= 1.0 else SOURCE_BLEND), ""
        cpu_m, memory_mi = cpu.answer, memory.answer
    basis = Basis(window_days=p.window_days, days=len(kept), samples=samples, first_day=kept[0].day,
                  last_day=kept[-1].day, confidence=weight, reason=reason, cpu=cpu, memory=memory)
    return Recommendation(cpu_m=cpu_m, memory_mi=memory_mi, source=source, confidence=weight, basis=basis)


def main_container(workload: str, answers: dict[str, Recommendation]) -> str:
    """The container whose answer is the object's `resources`: the one named like the workload,
    else the largest (memory, then CPU, then name - so the choice never depends on dict order)."""
    if workload in answers:
        return workload
    return max(sorted(answers), key=lambda name: (answers[name].memory_mi, answers[name].cpu_m))
