"""The PromQL reqapi sends, and the reading of its answers into per-day aggregates: reqapi.py's
section 9 ships them (its header comment has the queries, their cost and the chunking); this
module re-exports them so that tests/test_metrics_engines.py proves the shipped code against the
real engines, and keeps `http_query`, the tests' plain urllib call.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))     # the repository root: reqapi.py

from reqapi import (  # noqa: E402,F401
    BY, CRONJOB, DAEMONSET, DEFAULT_MAX_SAMPLES, DEPLOYMENT, JOB, MIB, POD, POINTS_PER_DAY, REPLICASET,
    SECONDS_PER_DAY, STATEFULSET, SUBQUERY_SAMPLES_PER_SERIES, Fetch, Key, PodDay, PromQueryError, Selectors,
    WorkloadRef, by_container, by_container_day, day_end, instant_params, max_series_per_query, parse_result,
    plan_chunks, pod_days, q_cpu_quantile, q_job_owner, q_limits, q_memory_peak, q_oom_kills, q_pod_owner,
    q_replicaset_owner, q_samples, q_throttled, range_params, read_day, read_owners, regex_alternatives,
    resolve_owners, workload_days)


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
