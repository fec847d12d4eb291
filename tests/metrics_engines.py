"""Real metrics engines for the tests: Debian's `prometheus` (with `promtool`) and `victoria-metrics`.

Each engine is a real process on 127.0.0.1 with a free port and a temporary data directory,
started by the tests and stopped by them (never a system service). Readiness is polled
(`/-/ready`, `/health`), never slept on, and the data is only trusted once every written sample
is visible through a query.

Where a binary is missing the tests skip with one reason; with REQAPI_REQUIRE_METRICS_ENGINES=1
(set by .ci/run) that skip is a failure instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import pytest

from conftest import free_port, wait_until

REQUIRE_VARIABLE = "REQAPI_REQUIRE_METRICS_ENGINES"
PROMETHEUS, PROMTOOL, VICTORIA = "prometheus", "promtool", "victoria-metrics"
START_TIMEOUT_S = 60.0


def require(*binaries: str) -> None:
    """Skip (or fail, when REQAPI_REQUIRE_METRICS_ENGINES=1) unless every binary is on PATH."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if not missing:
        return
    reason = (f"metrics engine binaries not installed: {', '.join(missing)} "
              f"(Debian: apt-get install prometheus victoria-metrics)")
    if os.environ.get(REQUIRE_VARIABLE) == "1":
        pytest.fail(f"{reason}; {REQUIRE_VARIABLE}=1 requires them")
    pytest.skip(reason)


def poll(predicate: Callable[[], bool], what: str, timeout_s: float = START_TIMEOUT_S,
         process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """conftest's wait_until for `predicate()`; fail with the process's log if it exits or time runs out."""
    def ready() -> bool:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {process.returncode}\n{_tail(log)}")
        return predicate()
    if not wait_until(ready, timeout_s, 0.05):
        raise RuntimeError(f"{what}: not within {timeout_s:g} s\n{_tail(log)}")


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-3000:]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Engine:
    """A running engine: its kind, base URL and process."""
    kind: str                  # "prometheus" or "victoriametrics"
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def backfill(openmetrics_files: Iterable[Path], blocks: Path) -> float:
    """promtool tsdb create-blocks-from openmetrics, one file at a time; returns seconds taken.

    `--max-block-duration=24h` (accepted but hidden from --help in 2.42; it rounds down to the
    TSDB's 2h x 3^k ladder, i.e. 18h blocks) cuts promtool's passes over each file: it re-parses
    the whole file once per block window, 12 times a day with the default 2h blocks."""
    blocks.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for path in openmetrics_files:
        done = subprocess.run([PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", "--max-block-duration=24h",
                               "--quiet", str(path), str(blocks)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"promtool failed on {path.name}: {done.stderr[-2000:]}")
    return time.monotonic() - started


def start_prometheus(blocks: Path, workdir: Path, max_samples: int | None = None, port: int | None = None) -> Engine:
    """A Prometheus over a copy of backfilled blocks (each instance owns and locks its data dir).

    Retention is measured from the newest block, not the wall clock, but the history is years old:
    a 100-year retention keeps any compaction from deleting it. No scrape jobs: the TSDB holds only
    the backfilled history (so Prometheus has no self-scrape series either)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    if not data.exists():          # a restart on the same directory (and port) keeps its data
        shutil.copytree(blocks, data)
    config = workdir / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1m\n")
    port = port or free_port()
    log = workdir / "prometheus.log"
    argv = [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={data}",
            "--storage.tsdb.retention.time=100y", f"--web.listen-address=127.0.0.1:{port}",
            "--query.timeout=2m"]
    if max_samples is not None:
        argv.append(f"--query.max-samples={max_samples}")
    return launch("prometheus", argv, port, log, "/-/ready")


def launch(name: str, argv: list[str], port: int, log: Path, ready_path: str,
           then: Callable[["Engine"], None] = lambda engine: None) -> "Engine":
    """Start an engine with its output in log, wait until ready_path answers, run `then` (an
    import), and stop it again if any of that fails."""
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    engine = Engine(name, f"http://127.0.0.1:{port}", process, log)
    try:
        poll(lambda: http_ok(engine.url + ready_path), f"{name} {ready_path}", process=process, log=log)
        then(engine)
    except BaseException:
        engine.stop()
        raise
    return engine


def start_victoriametrics(workdir: Path, openmetrics_files: Iterable[Path], max_samples: int | None = None) -> Engine:
    """A VictoriaMetrics importing the same OpenMetrics files through /api/v1/import/prometheus.

    -retentionPeriod: VictoriaMetrics drops samples older than retention *on import* (default 1
    month), and the history is dated 2024. -search.disableCache: its rollup cache would otherwise
    keep answers computed before the last import landed."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "victoria-metrics.log"
    argv = [VICTORIA, f"-storageDataPath={workdir / 'data'}", f"-httpListenAddr=127.0.0.1:{port}",
            "-retentionPeriod=100y", "-search.disableCache", "-loggerLevel=WARN"]
    if max_samples is not None:
        argv.append(f"-search.maxSamplesPerQuery={max_samples}")
    files = list(openmetrics_files)

    def load(engine: Engine) -> None:
        for path in files:
            with path.open("rb") as f:
                request = urllib.request.Request(engine.url + "/api/v1/import/prometheus", data=f, method="POST",
                                                 headers={"Content-Length": str(path.stat().st_size)})
                with urllib.request.urlopen(request, timeout=300) as r:
                    if r.status not in (200, 204):
                        raise RuntimeError(f"import of {path.name}: HTTP {r.status}")
        # Imported rows sit in in-memory buffers for about a second; flushing makes them searchable.
        with urllib.request.urlopen(engine.url + "/internal/force_flush", timeout=60):
            pass

    return launch("victoriametrics", argv, port, log, "/health", load)


def instant(engine: Engine, query: str, at: int, extra: Mapping[str, str] | None = None) -> dict:
    """An instant query's decoded JSON answer (errors too: the engines answer them as JSON)."""
    body = urllib.parse.urlencode({"query": query, "time": str(at), **(extra or {})}).encode()
    request = urllib.request.Request(engine.url + "/api/v1/query", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def wait_for_samples(engine: Engine, expected: Mapping[str, int], at: int, window_days: int) -> None:
    """Poll until the engine counts exactly the samples written, per metric name (import complete).

    Per name, because `count_over_time` drops the name: across names, series that differ only by
    it (a cAdvisor counter pair) would collide."""
    def complete() -> bool:
        for name, count in sorted(expected.items()):
            answer = instant(engine, f"sum(count_over_time({name}[{window_days}d]))", at)
            result = answer.get("data", {}).get("result") or []
            if not result or int(float(result[0]["value"][1])) != count:
                return False
        return True
    poll(complete, f"{engine.kind}: all {sum(expected.values())} samples visible", process=engine.process, log=engine.log)


def victoriametrics_rows_added(engine: Engine) -> int:
    """VictoriaMetrics' own count of rows added to storage (its /metrics, not a query)."""
    try:
        with urllib.request.urlopen(engine.url + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("vm_rows_added_to_storage_total "):
                    return int(float(line.split()[1]))
    except (urllib.error.URLError, OSError):
        pass
    return -1


def wait_for_rows(engine: Engine, expected: int) -> None:
    """Poll until VictoriaMetrics stored every imported row: for an instance whose sample limit
    is too low for a counting query."""
    poll(lambda: victoriametrics_rows_added(engine) == expected, f"{engine.kind}: {expected} rows stored",
         process=engine.process, log=engine.log)
    with urllib.request.urlopen(engine.url + "/internal/force_flush", timeout=60):
        pass
