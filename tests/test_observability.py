"""Observability (section 8): the logger's lines, metrics with registered gauges, and Health, the
one owner of readiness — each without a server."""

from __future__ import annotations

import collections
import json
import os

import reqapi


def read_lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_log_lines_quote_only_what_must_be_quoted(tmp_path):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        log = reqapi.Logger(fd=fd)
        log.log("info", "rules", source="/etc/rules.json", note="two words", empty="", eq="a=b")
        log.log("debug", "dropped at level info")
        log.request("GET", "/livez", 200, 0.00123, reqapi.Identity("jane doe"), "127.0.0.1:1", "id-1")
    finally:
        os.close(fd)
    rules, request = read_lines(path)
    assert rules.endswith('INFO    rules source=/etc/rules.json note="two words" empty="" eq="a=b"'), rules
    assert request.endswith('INFO    GET /livez 200 1.23ms user="jane doe" auth=none remote=127.0.0.1:1 audit_id=id-1')


def test_json_log_lines_and_the_queue_written_on_flush(tmp_path):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        log = reqapi.Logger("json", fd=fd)
        log.queue = None
        log.log("warning", "careful", n=1)
        log.queue = collections.deque()       # as start_background_writer sets it, without its thread
        log.request("GET", "/x", 404, 0.5, reqapi.ANONYMOUS, "[::1]:2", "")
        assert len(read_lines(path)) == 1     # queued, not written yet
        log.flush()
    finally:
        os.close(fd)
    warning, request = (json.loads(line) for line in read_lines(path))
    assert (warning["level"], warning["msg"], warning["n"]) == ("warning", "careful", 1)
    assert request["status"] == 404 and request["duration_ms"] == 500.0 and "audit_id" not in request


def test_metrics_render_counters_histograms_and_registered_gauges():
    metrics = reqapi.Metrics()
    metrics.observe("GET", "requests", 200, 0.0007)
    metrics.observe("WATCH", "requests", 200, 30.0)      # watches are counted, not timed
    metrics.increment("tls_handshake_failures_total")
    metrics.reloaded("rules", "refused")
    metrics.register_gauge("watches_open", "Watches open now.", lambda: 3)
    metrics.register_gauge("serving_certificate_expiry_timestamp_seconds", "notAfter.", lambda: 1.9e9)
    text = metrics.render()
    for line in ('reqapi_requests_total{verb="GET",resource="requests",code="200"} 1',
                 'reqapi_requests_total{verb="WATCH",resource="requests",code="200"} 1',
                 'reqapi_request_duration_seconds_bucket{verb="GET",le="0.0005"} 0',
                 'reqapi_request_duration_seconds_bucket{verb="GET",le="0.001"} 1',
                 'reqapi_request_duration_seconds_count{verb="GET"} 1',
                 "reqapi_tls_handshake_failures_total 1", "reqapi_connections_rejected_total 0",
                 'reqapi_reloads_total{what="rules",result="refused"} 1',
                 "reqapi_watches_open 3", "reqapi_serving_certificate_expiry_timestamp_seconds 1900000000"):
        assert line in text.splitlines(), line
    assert 'verb="WATCH",le=' not in text


def test_health_owns_readiness_shutdown_and_refusals():
    storage = reqapi.RequestsStorage(reqapi.RulesHistory())
    access, metrics = reqapi.Access(reqapi.AlwaysAllow()), reqapi.Metrics()
    health = reqapi.Health(storage.history, access, metrics)

    def ready() -> bool:
        return all(ok for _, ok, _ in health.checks("readyz"))

    assert ready() and [name for name, _, _ in health.checks("livez")] == ["ping", "log"]
    assert "authentication is off" in " ".join(health.warnings("readyz"))
    access.cannot_authenticate("loading kube-system/extension-apiserver-authentication")
    assert not ready()
    access.configure(reqapi.AuthConfig(source="flags", client_ca="pem"))
    assert ready() and "authentication: flags" in health.warnings("readyz")
    health.refuse_rules("rules.json: rules: bad")
    assert ready() and "reqapi_rules_last_reload_refused 1" in metrics.render()
    assert any("the newest rules file was refused" in warning for warning in health.warnings("readyz"))
    health.accept_rules()
    assert "reqapi_rules_last_reload_refused 0" in metrics.render()
    health.shut_down()
    assert not ready() and not health.draining and not storage.history.closed
    health.drain()
    assert health.draining and storage.history.closed       # watches end with the drain


def test_metric_series_stay_few_whatever_methods_clients_invent():
    # Each distinct method used to make series of its own, never freed (even answered 401).
    metrics = reqapi.Metrics()
    for n in range(2000):
        metrics.observe(f"M{n}" + "X" * 100, "", 401, 0.001)
    metrics.observe("GET", "requests", 200, 0.001)
    text = metrics.render()
    assert 'reqapi_requests_total{verb="other",resource="",code="401"} 2000' in text
    assert "XXXX" not in text
    assert len(text) < 10_000


def test_a_stderr_nobody_reads_costs_bounded_memory_and_never_holds_up_a_final_flush():
    # A pipe that is never read: the writer thread blocks once the pipe is full (64 KiB), and the
    # queue grew without bound before (478 MB after 40k requests); shutdown's flush hung with it.
    import time
    read_end, write_end = os.pipe()
    try:
        log = reqapi.Logger(fd=write_end)
        log.start_background_writer()
        identity = reqapi.Identity("alice")
        for _ in range(60_000):
            log.request("GET", "/apis/k8s.wujiuye.com/v1beta1/namespaces/shop/requests/" + "x" * 60, 200, 0.001,
                        identity, "127.0.0.1:1", "")
        assert log._queued <= reqapi.Logger.MAX_QUEUED_BYTES
        assert sum(len(line) for line in log.queue) <= reqapi.Logger.MAX_QUEUED_BYTES
        assert log.dropped > 0
        started = time.monotonic()
        log.flush(deadline=time.monotonic() + 0.3)
        assert time.monotonic() - started < 5          # generous: it gives up at its deadline
    finally:
        log.queue = None                # the writer thread finds nothing more to write...
        os.close(read_end)              # ...a write blocked on the full pipe fails now (EPIPE)...
        assert log._writing.acquire(timeout=10)     # ...and it lets go of the descriptor
        os.close(write_end)
