"""The two baselines, ported from their sources: krr's `simple` strategy and VPA's recommender.

krr (robusta-dev/krr, robusta_krr/strategies/simple.py, core/abstract/strategies.py,
core/runner.py, v1.15 era):
  CPU request  = max over pods of the p95 of `rate(container_cpu_usage_seconds_total[75s])`
                 sampled every 75 s over 14 days (PercentileCPULoader); no CPU limit.
  memory       = max over pods of max_over_time(working set) over 14 days x 1.15 (request = limit).
  fewer than 100 points (points_required) -> no recommendation ("not enough data");
  OOM data off by default (use_oomkill_data=False); CPU ceiled to 1m with a 10m minimum,
  memory ceiled to 1Mi with a 100Mi minimum (runner._round_value).
  Here the trace's one-minute usage stands in for the 75 s rate (the closest resolution the
  traces have), and the memory max reads every sample (krr's 75 s subquery can skip peaks).

VPA (kubernetes/autoscaler vertical-pod-autoscaler v1.8.1, pkg/recommender): see `VpaContainer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# ---- krr simple -------------------------------------------------------------------------------

KRR_CPU_PERCENTILE = 95           # simple.py: cpu_percentile default 95
KRR_MEMORY_BUFFER = 0.15          # simple.py: memory_buffer_percentage default 15
KRR_POINTS_REQUIRED = 100         # simple.py: points_required default 100
KRR_CPU_MIN_M = 10                # runner.py: cpu_min_value
KRR_MEMORY_MIN_MI = 100           # runner.py: memory_min_value


def _krr_percentile(sorted_values: list[float], percentile: float) -> float:
    # krr computes the percentile in PromQL: quantile_over_time, linear interpolation.
    rank = percentile / 100 * (len(sorted_values) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


@dataclass(frozen=True)
class KrrAnswer:
    cpu_m: int | None       # None = krr reports "?" (not enough data); the deploy keeps the rule
    memory_mi: int | None


def krr_simple(cpu_by_pod: list[list[float]], memory_by_pod: list[list[float]]) -> KrrAnswer:
    """krr `simple` for one container from each pod's samples over the history window."""
    cpu_points = sum(len(s) for s in cpu_by_pod)
    memory_points = sum(len(s) for s in memory_by_pod)
    cpu: int | None = None
    memory: int | None = None
    if cpu_points >= KRR_POINTS_REQUIRED:
        p95 = max(_krr_percentile(sorted(s), KRR_CPU_PERCENTILE) for s in cpu_by_pod if s)
        cpu = max(KRR_CPU_MIN_M, math.ceil(p95))
    if memory_points >= KRR_POINTS_REQUIRED:
        peak = max(max(s) for s in memory_by_pod if s)
        memory = max(KRR_MEMORY_MIN_MI, math.ceil(peak * (1 + KRR_MEMORY_BUFFER)))
    return KrrAnswer(cpu, memory)


# ---- VPA --------------------------------------------------------------------------------------
# pkg/recommender/model/aggregations_config.go, util/histogram_options.go, logic/recommender.go,
# config/config.go (v1.8.1).
VPA_BUCKET_GROWTH = 0.05                 # DefaultHistogramBucketSizeGrowth
VPA_CPU_FIRST_BUCKET = 0.01              # cores; CPU histogram max 1000 cores
VPA_CPU_MAX = 1000.0
VPA_MEMORY_FIRST_BUCKET = 1e7            # bytes; memory histogram max 1e12 bytes
VPA_MEMORY_MAX = 1e12
VPA_MIN_SAMPLE_WEIGHT = 0.1              # minSampleWeight (CPU sample weight)
VPA_EPSILON = 0.001 * VPA_MIN_SAMPLE_WEIGHT
VPA_HALF_LIFE_S = 24 * 3600              # DefaultCPU/MemoryHistogramDecayHalfLife = 24h
VPA_MAX_DECAY_EXPONENT = 100             # util/decaying_histogram.go maxDecayExponent
VPA_MEMORY_INTERVAL_S = 24 * 3600        # DefaultMemoryAggregationInterval
VPA_OOM_BUMP_RATIO = 1.2                 # DefaultOOMBumpUpRatio
VPA_OOM_MIN_BUMP_BYTES = 100 * 1024 * 1024   # DefaultOOMMinBumpUp
VPA_MARGIN = 0.15                        # SafetyMarginFraction (--recommendation-margin-fraction)
VPA_TARGET_PERCENTILE = 0.9              # TargetCPUPercentile, TargetMemoryPercentile
VPA_LOWER_PERCENTILE = 0.5
VPA_UPPER_PERCENTILE = 0.95
VPA_POD_MIN_CPU_M = 25.0                 # PodMinCPUMillicores
VPA_POD_MIN_MEMORY_MB = 250.0            # PodMinMemoryMb (x 1024 x 1024 bytes in recommender.go)
VPA_CONFIDENCE_INTERVAL_S = 24 * 3600    # ConfidenceIntervalCPU/Memory = 24h
MIB = 1024 * 1024
_MAX_RESOURCE = 10 ** 14   # model/types.go MaxResourceAmount: resourceAmountFromFloat caps here


def _amount(value: float) -> int:
    """model/types.go resourceAmountFromFloat: int64 truncation, capped to [0, MaxResourceAmount]."""
    if value < 0:
        return 0
    if value > _MAX_RESOURCE:
        return _MAX_RESOURCE
    return int(value)


class ExponentialOptions:
    """util/histogram_options.go exponentialHistogramOptions."""

    def __init__(self, max_value: float, first_bucket: float, ratio: float, epsilon: float) -> None:
        self.first = first_bucket
        self.ratio = ratio
        self.epsilon = epsilon
        self.num_buckets = int(math.ceil(math.log(max_value * (ratio - 1) / first_bucket + 1) / math.log(ratio))) + 1

        self.ratio_minus_one = ratio - 1
        self.log_ratio = math.log(ratio)

    def find_bucket(self, value: float) -> int:
        # Go: int(log(ratio, value*(ratio-1)/firstBucketSize+1)), log(b, x) = Log(x) / Log(b).
        if value < self.first:
            return 0
        bucket = int(math.log(value * self.ratio_minus_one / self.first + 1) / self.log_ratio)
        return min(bucket, self.num_buckets - 1)

    def bucket_start(self, bucket: int) -> float:
        if bucket == 0:
            return 0.0
        return self.first * (self.ratio ** bucket - 1) / (self.ratio - 1)


def cpu_options() -> ExponentialOptions:
    return ExponentialOptions(VPA_CPU_MAX, VPA_CPU_FIRST_BUCKET, 1 + VPA_BUCKET_GROWTH, VPA_EPSILON)


def memory_options() -> ExponentialOptions:
    return ExponentialOptions(VPA_MEMORY_MAX, VPA_MEMORY_FIRST_BUCKET, 1 + VPA_BUCKET_GROWTH, VPA_EPSILON)


class DecayingHistogram:
    """util/histogram.go + util/decaying_histogram.go: weights grow as 2^((t - ref) / halfLife)."""

    def __init__(self, options: ExponentialOptions, half_life_s: float) -> None:
        self.o = options
        self.half_life = half_life_s
        self.weights = [0.0] * options.num_buckets
        self.total = 0.0
        self.min_bucket = options.num_buckets - 1
        self.max_bucket = 0
        self.reference: float | None = None   # Go starts at time.Time{}: the first sample shifts it

    def _decay_factor(self, t: float) -> float:
        if self.reference is None or t > self.reference + self.half_life * VPA_MAX_DECAY_EXPONENT:
            # shiftReferenceTimestamp: round to a multiple of halfLife, rescale by 2^exponent.
            new_ref = math.floor(t / self.half_life + 0.5) * self.half_life
            if self.reference is not None:
                exponent = math.floor((self.reference - new_ref) / self.half_life + 0.5)
                self._scale(2.0 ** exponent)
            self.reference = new_ref
        return 2.0 ** ((t - self.reference) / self.half_life)

    def _scale(self, factor: float) -> None:
        for b in range(self.min_bucket, self.max_bucket + 1):
            self.weights[b] *= factor
        self.total *= factor
        self._update_min_max()

    def _update_min_max(self) -> None:
        last = self.o.num_buckets - 1
        while self.weights[self.min_bucket] < self.o.epsilon and self.min_bucket < last:
            self.min_bucket += 1
        while self.weights[self.max_bucket] < self.o.epsilon and self.max_bucket > 0:
            self.max_bucket -= 1

    def add(self, value: float, weight: float, t: float) -> None:
        ref = self.reference
        if ref is not None and t <= ref + self.half_life * VPA_MAX_DECAY_EXPONENT:
            weight *= 2.0 ** ((t - ref) / self.half_life)    # _decay_factor's common case, inlined
        else:
            weight *= self._decay_factor(t)
        b = self.o.find_bucket(value)
        self.weights[b] += weight
        self.total += weight
        if b < self.min_bucket and self.weights[b] >= self.o.epsilon:
            self.min_bucket = b
        if b > self.max_bucket and self.weights[b] >= self.o.epsilon:
            self.max_bucket = b

    def subtract(self, value: float, weight: float, t: float) -> None:
        weight *= self._decay_factor(t)
        b = self.o.find_bucket(value)
        eps = self.o.epsilon
        self.total = 0.0 if self.total - weight < eps else self.total - weight
        self.weights[b] = 0.0 if self.weights[b] - weight < eps else self.weights[b] - weight
        self._update_min_max()

    def empty(self) -> bool:
        return self.weights[self.min_bucket] < self.o.epsilon

    def percentile(self, p: float) -> float:
        """The *end* of the bucket where the cumulative weight reaches p of the total."""
        if self.empty():
            return 0.0
        threshold = p * self.total
        partial = 0.0
        b = self.min_bucket
        while b < self.max_bucket:
            partial += self.weights[b]
            if partial >= threshold:
                break
            b += 1
        if b < self.o.num_buckets - 1:
            return self.o.bucket_start(b + 1)
        return self.o.bucket_start(b)


def confidence_multiplier(multiplier: float, exponent: float, confidence: float) -> float:
    """logic/estimator.go confidenceMultiplier: (1 + multiplier / confidence) ^ exponent."""
    if confidence == 0:
        return math.inf if exponent > 0 else 0.0   # Go: +Inf / 0 as float division gives these
    return (1.0 + multiplier / confidence) ** exponent


@dataclass(frozen=True)
class VpaRecommendation:
    target_cpu_m: int
    target_memory_mi: int
    lower_cpu_m: int
    upper_cpu_m: float
    lower_memory_mi: int
    upper_memory_mi: float
    confidence: float


class VpaContainer:
    """One VPA container aggregate fed like metrics-server feeds it: one CPU and one memory
    sample a minute, OOMs through RecordOOM (model/container.go, aggregate_container_state.go)."""

    def __init__(self) -> None:
        self.cpu = DecayingHistogram(cpu_options(), VPA_HALF_LIFE_S)
        self.memory = DecayingHistogram(memory_options(), VPA_HALF_LIFE_S)
        self.first_sample: float | None = None
        self.last_sample: float | None = None
        self.samples = 0
        self.window_end: float | None = None
        self.memory_peak = 0.0     # bytes
        self.oom_peak = 0.0
        self.last_memory_sample: float | None = None

    def add_cpu(self, t: float, cores: float) -> None:
        # addCPUSample: weight minSampleWeight for every sample (since VPA 1.4.0). The sample is
        # a ResourceAmount, so the histogram sees whole millicores (CPUAmountFromCores truncates).
        # DecayingHistogram.add is inlined here (the evaluation feeds millions of samples); the
        # arithmetic is the same, and the Go cross-check covers both paths.
        m = cores * 1000.0
        value = (int(m) if 0.0 <= m <= _MAX_RESOURCE else _amount(m)) / 1000.0
        h = self.cpu
        ref = h.reference
        if ref is not None and t <= ref + h.half_life * VPA_MAX_DECAY_EXPONENT:
            weight = VPA_MIN_SAMPLE_WEIGHT * 2.0 ** ((t - ref) / h.half_life)
        else:
            weight = VPA_MIN_SAMPLE_WEIGHT * h._decay_factor(t)
        o = h.o
        if value < o.first:
            b = 0
        else:
            b = int(math.log(value * o.ratio_minus_one / o.first + 1) / o.log_ratio)
            if b >= o.num_buckets:
                b = o.num_buckets - 1
        weights = h.weights
        weights[b] += weight
        h.total += weight
        if b < h.min_bucket and weights[b] >= o.epsilon:
            h.min_bucket = b
        if b > h.max_bucket and weights[b] >= o.epsilon:
            h.max_bucket = b
        if self.first_sample is None:
            self.first_sample = self.last_sample = t
        elif t > self.last_sample:
            self.last_sample = t
        elif t < self.first_sample:
            self.first_sample = t
        self.samples += 1

    def add_memory(self, t: float, usage_bytes: float, is_oom: bool = False) -> bool:
        """ContainerState.addMemorySample: one peak per 24 h window, timestamped at its end."""
        usage_bytes = float(_amount(usage_bytes))   # whole bytes (MemoryAmountFromBytes)
        if not is_oom and self.last_memory_sample is not None and t < self.last_memory_sample:
            return False
        self.last_memory_sample = t
        if self.window_end is None:
            self.window_end = t
        add_new_peak = False
        if t < self.window_end:
            old_max = max(self.memory_peak, self.oom_peak)
            if old_max != 0 and usage_bytes > old_max:
                self.memory.subtract(old_max, 1.0, self.window_end)
                add_new_peak = True
        else:
            shift = (t - self.window_end) // VPA_MEMORY_INTERVAL_S * VPA_MEMORY_INTERVAL_S + VPA_MEMORY_INTERVAL_S
            self.window_end += shift
            self.memory_peak = 0.0
            self.oom_peak = 0.0
            add_new_peak = True
        if add_new_peak:
            self.memory.add(usage_bytes, 1.0, self.window_end)
            if is_oom:
                self.oom_peak = usage_bytes
            else:
                self.memory_peak = usage_bytes
        return True

    def record_oom(self, t: float, request_bytes: float) -> None:
        """ContainerState.RecordOOM: max(request, peak) bumped by max(+100MiB, x1.2)."""
        if self.last_memory_sample is not None and t < self.last_memory_sample - VPA_MEMORY_INTERVAL_S:
            return   # too old, discarded
        used = max(float(_amount(request_bytes)), self.memory_peak)
        needed = max(used + VPA_OOM_MIN_BUMP_BYTES, float(_amount(used * VPA_OOM_BUMP_RATIO)))
        self.add_memory(t, needed, is_oom=True)

    def confidence(self) -> float:
        """logic/estimator.go getConfidence: min(lifespan in days, samples / 1440)."""
        if self.first_sample is None or self.last_sample is None:
            return 0.0
        lifespan = (self.last_sample - self.first_sample) / VPA_CONFIDENCE_INTERVAL_S
        return min(lifespan, self.samples / (VPA_CONFIDENCE_INTERVAL_S / 60))

    def raw_recommendation(self, containers_in_pod: int = 1) -> dict[str, dict[str, int]]:
        """VPA's answer in its own units (millicores, bytes), as logic/recommender.go builds it:
        percentile -> margin -> confidence multiplier -> per-pod floor split over containers.

        ResourceAmount is an int64 (millicores, bytes): CPUAmountFromCores, MemoryAmountFromBytes
        and ScaleResource truncate (model/types.go); the margin is base + ScaleResource(base, 0.15).
        """
        conf = self.confidence()
        fraction = 1.0 / containers_in_pod
        min_cpu = int(VPA_POD_MIN_CPU_M * 0.001 * fraction * 1000)
        min_memory = int(VPA_POD_MIN_MEMORY_MB * MIB * fraction)

        def with_margin(base: int) -> int:
            return base + int(base * VPA_MARGIN)

        def scaled(amount: int, multiplier: float, exponent: float) -> int:
            factor = confidence_multiplier(multiplier, exponent, conf)
            return _amount(amount * factor)

        out: dict[str, dict[str, int]] = {}
        for bound, p, mult, exp in (("target", VPA_TARGET_PERCENTILE, None, None),
                                    ("lower", VPA_LOWER_PERCENTILE, 0.001, -2.0),
                                    ("upper", VPA_UPPER_PERCENTILE, 1.0, 1.0)):
            cpu = with_margin(int(self.cpu.percentile(p) * 1000))
            memory = with_margin(int(self.memory.percentile(p)))
            if mult is not None:
                cpu, memory = scaled(cpu, mult, exp), scaled(memory, mult, exp)
            out[bound] = {"cpu": max(cpu, min_cpu), "memory": max(memory, min_memory)}
        return out

    def recommend(self, containers_in_pod: int = 1) -> VpaRecommendation | None:
        """The recommendation in reqapi's units (millicores, Mi rounded up); None without samples."""
        if self.cpu.empty() and self.memory.empty():
            return None
        raw = self.raw_recommendation(containers_in_pod)
        return VpaRecommendation(
            target_cpu_m=raw["target"]["cpu"], target_memory_mi=math.ceil(raw["target"]["memory"] / MIB),
            lower_cpu_m=raw["lower"]["cpu"], upper_cpu_m=raw["upper"]["cpu"],
            lower_memory_mi=math.ceil(raw["lower"]["memory"] / MIB), upper_memory_mi=raw["upper"]["memory"] / MIB,
            confidence=self.confidence())
