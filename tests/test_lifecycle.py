"""The server lifecycle: rules reloads, certificate rotation, graceful shutdown, signals."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import ssl
import threading
import time

import pytest

import reqapi
from conftest import GV, RULES, Certs, Server, wait_until, write_rules

OBJECT = f"{GV}/namespaces/shop/requests/checkout"


def cpu(server, path=OBJECT) -> str:
    return server.get(path).json()["resources"]["cpu"]


def changed_rules(checkout_cpu: str) -> dict:
    document = json.loads(json.dumps(RULES))
    document["rules"][2]["cpu"] = checkout_cpu
    return document


# The configuration: built and checked once from the flags

def config_of(*flags: str, environ: dict | None = None) -> reqapi.Config:
    return reqapi.Config.from_args(reqapi.build_parser().parse_args(list(flags)), environ or {})


def test_the_config_is_frozen_and_decides_once_whether_it_runs_in_a_pod(certs, tmp_path):
    given = ("--cert", str(certs.cert_file), "--key", str(certs.key_file), "--service-account-dir", str(tmp_path),
             "--requestheader-username-headers", "X-Remote-User, X-Other")
    outside = config_of(*given, environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1"})     # no token: not a pod
    assert outside.kube_url is None and outside.shutdown_delay == 0
    assert outside.requestheader_username_headers == ("x-remote-user", "x-other")
    with pytest.raises(dataclasses.FrozenInstanceError):
        outside.port = 1                                                             # type: ignore[misc]
    (tmp_path / "token").write_text("token")
    inside = config_of(*given, environ={"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"})
    assert inside.kube_url == "https://[fd00::1]:6443"
    assert inside.shutdown_delay == reqapi.Config.IN_POD_SHUTDOWN_DELAY
    assert config_of(*given, "--shutdown-delay", "3s", environ={"KUBERNETES_SERVICE_HOST": "h"}).shutdown_delay == 3


def test_the_config_refuses_flags_that_do_not_go_together(certs):
    with pytest.raises(reqapi.ConfigError, match="--cert and --key go together"):
        config_of("--cert", str(certs.cert_file))
    with pytest.raises(reqapi.ConfigError, match="--authorization-mode=Delegated .* needs to run in a pod"):
        config_of("--cert", str(certs.cert_file), "--key", str(certs.key_file), "--authorization-mode", "Delegated")


# Rules reloads

def test_a_changed_rules_file_is_picked_up_by_polling(start_server, rules_file):
    server = start_server("--rules", str(rules_file), "--reload-interval", "0.2s")
    before = server.get(f"{GV}/requests").json()["metadata"]["resourceVersion"]
    assert cpu(server) == "2"
    write_rules(rules_file, changed_rules("4"))
    assert wait_until(lambda: cpu(server) == "4", timeout=10), server.log()
    after = server.get(f"{GV}/requests").json()["metadata"]["resourceVersion"]
    assert after != before
    server.wait_for_log(r"rules reloaded file=\S+ rules=5 resourceVersion=" + after)


def test_sighup_reloads_at_once(start_server, rules_file):
    server = start_server("--rules", str(rules_file), "--reload-interval", "1h")
    write_rules(rules_file, changed_rules("3"))
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: cpu(server) == "3", timeout=10), server.log()


def test_a_bad_rules_file_is_refused_and_the_last_good_rules_keep_serving(start_server, rules_file):
    server = start_server("--rules", str(rules_file), "--reload-interval", "1h")
    bad = changed_rules("3")
    bad["rules"][1]["memory"] = "2GB"
    write_rules(rules_file, bad)
    server.signal(signal.SIGHUP)
    message = server.wait_for_log(r"rules refused.*").group(0)
    assert "rules[1].memory" in message and str(rules_file) in message
    assert cpu(server) == "2"                                      # the last good rules
    ready = server.get("/readyz?verbose")
    assert ready.status == 200
    assert "the newest rules file was refused" in ready.text and "rules[1].memory" in ready.text
    assert "reqapi_rules_last_reload_refused 1" in server.get("/metrics").text
    write_rules(rules_file, changed_rules("5"))                  # fixed: served, and the warning goes
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: cpu(server) == "5"), server.log()
    assert "refused" not in server.get("/readyz?verbose").text


def test_a_configmap_style_symlink_swap_is_picked_up(start_server, tmp_path):
    # The kubelet writes ConfigMap volumes as ..data -> ..<timestamp>/ and swaps the ..data symlink.
    volume = tmp_path / "volume"
    volume.mkdir()
    first = volume / "..2026_11_25_10_00_00.000000001"
    first.mkdir()
    write_rules(first / "rules.json", RULES)
    (volume / "..data").symlink_to(first.name)
    (volume / "rules.json").symlink_to("..data/rules.json")
    server = start_server("--rules", str(volume / "rules.json"), "--reload-interval", "0.2s")
    assert cpu(server) == "2"
    second = volume / "..2026_11_25_10_05_00.000000002"
    second.mkdir()
    write_rules(second / "rules.json", changed_rules("7"))
    (volume / "..data_tmp").symlink_to(second.name)
    os.replace(volume / "..data_tmp", volume / "..data")
    assert wait_until(lambda: cpu(server) == "7", timeout=10), server.log()


def test_a_bad_rules_file_at_start_exits_2_with_the_message(certs, tmp_path, rules_file):
    bad = changed_rules("2")
    bad["rules"][0]["namespace"] = "Prod-*"
    write_rules(rules_file, bad)
    server = Server(certs, tmp_path / "bad", ["--rules", str(rules_file)])
    with pytest.raises(AssertionError, match="exited with 2"):
        server.start()
    assert "rules[0].namespace" in server.log() and str(rules_file) in server.log()


def too_many_rules() -> dict:
    """Rules whose estimated memory is above RULES_MAX_BYTES (20,000 one-line rules)."""
    document = changed_rules("9")
    document["rules"] += [{"id": f"team-{i}", "namespace": f"team-{i}", "name": "web", "cpu": "100m"}
                          for i in range(20000)]
    return document


def test_rules_too_large_for_memory_are_refused_at_start_and_on_reload(certs, tmp_path, start_server, rules_file):
    big = write_rules(tmp_path / "big.json", too_many_rules())
    refused = Server(certs, tmp_path / "big", ["--rules", str(big)])
    with pytest.raises(AssertionError, match="exited with 2"):
        refused.start()
    assert f"{big}: rules: 20,005 rules would keep about" in refused.log(), refused.log()
    server = start_server("--rules", str(rules_file), "--reload-interval", "1h")
    assert server.wait_for_log(r"INFO +rules source=\S+ rules=5 .*memory=\"\d+ KiB of at most 8.0 MiB\"")
    write_rules(rules_file, too_many_rules())
    server.signal(signal.SIGHUP)
    message = server.wait_for_log(r"rules refused.*").group(0)
    assert "20,005 rules would keep about" in message and "merge rules" in message
    assert cpu(server) == "2"                                      # the last good rules keep serving


# Certificate rotation

def served_certificate(server) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def test_rotated_certificate_serves_new_handshakes_and_keeps_old_connections(start_server, tmp_path):
    certs = Certs(tmp_path / "rotating")
    server = start_server("--reload-interval", "0.2s", server_certs=certs)
    old = served_certificate(server)
    kept = server.connection()
    kept.request("GET", OBJECT)
    assert kept.getresponse().read()
    # A new pair from a new CA, swapped in by rename (as a Secret volume update does).
    fresh = Certs(tmp_path / "fresh")
    for source, target in ((fresh.cert_file, certs.cert_file), (fresh.key_file, certs.key_file)):
        temporary = target.with_suffix(".new")
        temporary.write_bytes(source.read_bytes())
        os.replace(temporary, target)
    assert wait_until(lambda: served_certificate(server) != old, timeout=10), server.log()
    server.wait_for_log("TLS configuration reloaded")
    kept.request("GET", OBJECT)                      # the existing connection still works
    assert kept.getresponse().status == 200
    kept.close()


def test_a_mismatched_pair_is_refused_and_the_old_certificate_keeps_serving(start_server, tmp_path):
    certs = Certs(tmp_path / "rotating")
    server = start_server("--reload-interval", "1h", server_certs=certs)
    old = served_certificate(server)
    other = Certs(tmp_path / "other")
    certs.key_file.write_bytes(other.key_file.read_bytes())        # key no longer matches the certificate
    server.signal(signal.SIGHUP)
    server.wait_for_log("TLS files refused")
    assert served_certificate(server) == old
    assert server.get(OBJECT).status == 200
    assert "the newest certificate was refused" in server.get("/readyz?verbose").text


def test_rotation_under_load_fails_no_request(start_server, tmp_path):
    certs = Certs(tmp_path / "rotating")
    server = start_server("--reload-interval", "0.1s", server_certs=certs)
    failures, done, count = [], threading.Event(), [0]

    def load():
        while not done.is_set():
            try:
                answer = server.get(OBJECT)
                if answer.status != 200:
                    failures.append(answer)
                count[0] += 1
            except Exception as error:                              # noqa: BLE001 - any failure counts
                failures.append(error)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for round_number in range(3):                                  # same CA, new leaf each round
        cert, key = certs.issue(f"round{round_number}", "localhost", "127.0.0.1")
        for source, target in ((cert, certs.cert_file), (key, certs.key_file)):
            temporary = target.with_suffix(".new")
            temporary.write_bytes(source.read_bytes())
            os.replace(temporary, target)
        reloads = round_number + 1
        assert wait_until(lambda: server.log().count("TLS configuration reloaded") >= reloads, timeout=10)
    done.set()
    for thread in threads:
        thread.join(timeout=30)
    assert count[0] > 20 and failures == [], failures[:3]


# Graceful shutdown

def test_sigterm_fails_readyz_at_once_keeps_serving_for_the_delay_then_exits_0(certs, tmp_path):
    server = Server(certs, tmp_path / "s", ["--shutdown-delay", "3s", "--shutdown-timeout", "5s"]).start()
    kept = server.connection()
    kept.request("GET", "/readyz")
    assert kept.getresponse().read() == b"ok"
    server.signal(signal.SIGTERM)
    server.wait_for_log("shutting down")
    kept.request("GET", "/readyz")
    response = kept.getresponse()
    assert response.status == 503 and b"[-]shutdown failed" in response.read()
    assert server.get("/livez").status == 200                   # still serving new connections
    assert server.get(OBJECT).status == 200
    assert server.process.wait(timeout=15) == 0
    assert "stopped open_connections=0" in server.log()


def test_sigterm_lets_in_flight_watches_end_cleanly(certs, tmp_path, rules_file):
    server = Server(certs, tmp_path / "s", ["--rules", str(rules_file), "--shutdown-delay", "0",
                                            "--shutdown-timeout", "5s"]).start()
    connection = server.connection(timeout=20)
    connection.request("GET", f"{GV}/namespaces/shop/requests?watch=true&timeoutSeconds=60")
    response = connection.getresponse()
    first = response.read1(65536)
    assert b'"ADDED"' in first
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    rest = response.read()                  # the stream ends with the terminating chunk, not a reset
    assert time.monotonic() - started < 10
    assert b"ERROR" not in rest
    assert server.process.wait(timeout=15) == 0


def test_sigterm_under_load_loses_no_request(certs, tmp_path):
    server = Server(certs, tmp_path / "s", ["--shutdown-delay", "2s", "--shutdown-timeout", "5s"]).start()
    results, done = [], threading.Event()

    def load():
        connection = server.connection()
        while not done.is_set():
            try:
                connection.request("GET", OBJECT)
                response = connection.getresponse()
                body = response.read()
                results.append((response.status, len(body) > 0))
                if response.getheader("Connection") == "close":
                    connection.close()
                    connection = server.connection()
            except (ConnectionError, OSError, Exception) as error:       # noqa: BLE001
                # After the listener closes new connections are refused: that is not a lost request.
                if isinstance(error, ConnectionRefusedError):
                    break
                results.append(("error", repr(error)))
                break

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: len(results) > 50)
    server.signal(signal.SIGTERM)
    assert server.process.wait(timeout=20) == 0
    done.set()
    for thread in threads:
        thread.join(timeout=10)
    statuses = [status for status, _ in results]
    assert statuses.count(200) > 50
    lost = [r for r in results if r[0] != 200]
    # Every request that was sent got its answer: draining answers with Connection: close, and the
    # client reconnects (refused once the listener is closed, which ends that client's loop).
    assert lost == [], lost


def test_a_second_signal_exits_at_once(certs, tmp_path):
    server = Server(certs, tmp_path / "s", ["--shutdown-delay", "60s"]).start()
    server.signal(signal.SIGTERM)
    server.wait_for_log("shutting down")
    started = time.monotonic()
    server.signal(signal.SIGINT)
    assert server.process.wait(timeout=5) != 0
    assert time.monotonic() - started < 5
    assert "second signal: exiting now" in server.log()


def caught_signals(pid: int) -> int:
    """The mask of signals the process has handlers for (SigCgt in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith("SigCgt:")), 16)


def signal_during_start_up(server: Server, signum: int) -> dict:
    """Start `server` while a thread sends `signum` as soon as the process handles it, before the
    server says it is serving.  What the thread saw."""
    seen: dict = {}

    def send() -> None:
        assert wait_until(lambda: server.process is not None, timeout=10)
        pid = server.process.pid
        if wait_until(lambda: caught_signals(pid) & (1 << (signum - 1)), timeout=30, interval=0.001):
            seen["before_serving"] = "serving k8s.wujiuye.com" not in server.log()
            os.kill(pid, signum)
            seen["sent"] = True

    sender = threading.Thread(target=send)
    sender.start()
    try:
        server.start(wait_ready=False)
    except AssertionError:
        # A SIGTERM during start-up ends the process (exit 0) right after its "serving" line: it may
        # be gone before start() looks.  Anything else is a failure.
        if server.process is None or server.process.wait(timeout=30) != 0:
            raise
    finally:
        sender.join(30)
    return seen


def big_rules(count: int) -> dict:
    return {"defaults": {"cpu": "100m", "memory": "100Mi"},
            "rules": [{"id": f"w{index}", "namespace": f"team-{index % 50}", "name": f"service-{index}-*",
                       "cpu": "1"} for index in range(count)]}


def test_a_sighup_during_start_up_is_handled_once_serving_not_fatal(certs, tmp_path):
    """Regression: SIGHUP's default action killed the process until run() installed its handler
    (0.1 s with the example rules, ~19 s with 100k rules)."""
    rules = write_rules(tmp_path / "rules.json", big_rules(5000))
    server = Server(certs, tmp_path / "s", ["--rules", str(rules)])
    seen = signal_during_start_up(server, signal.SIGHUP)
    try:
        assert seen == {"before_serving": True, "sent": True}, seen
        server.wait_for_log("SIGHUP during start-up: reading the rules and certificates again before serving")
        assert wait_until(lambda: server.try_get("/livez") == 200, timeout=10)
        assert server.process.poll() is None
    finally:
        server.stop()


def test_a_sigterm_during_start_up_ends_the_process_cleanly(certs, tmp_path):
    rules = write_rules(tmp_path / "rules.json", big_rules(5000))
    server = Server(certs, tmp_path / "s", ["--rules", str(rules), "--shutdown-delay", "0"])
    seen = signal_during_start_up(server, signal.SIGTERM)
    assert seen == {"before_serving": True, "sent": True}, seen
    assert server.process.wait(timeout=30) == 0
    assert "SIGTERM during start-up: stopped before serving" in server.log()
    assert "Traceback" not in server.log()


# Signals during start-up (issue 12, item 8).  The rules file is a named pipe while the server
# starts: the server is then blocked in start-up, reading the rules, until the test writes them,
# so the signal certainly arrives during start-up, whatever the machine's speed.

class RulesThroughAPipe:
    """--rules names a symlink to a FIFO: the server's first read blocks until the test writes; the
    link is then switched to a regular file, so every later read (the reloader's) is ordinary."""

    def __init__(self, directory) -> None:
        self.link, self.fifo, self.file = directory / "rules.json", directory / "rules.fifo", directory / "rules.file"
        os.mkfifo(self.fifo)
        self.link.symlink_to(self.fifo.name)

    def wait_for_reader(self):
        return open(self.fifo, "wb")          # returns once the server opened the pipe: it is in start-up

    def switch_to_file(self, document: dict) -> None:
        write_rules(self.file, document)
        temporary = self.link.with_name("rules.link")
        temporary.symlink_to(self.file.name)
        os.replace(temporary, self.link)


def starting_server(certs, tmp_path, pipe, *flags) -> tuple[Server, threading.Thread, list]:
    server = Server(certs, tmp_path / "s", ["--rules", str(pipe.link), "--reload-interval", "1h",
                                            "--shutdown-delay", "0", *flags])
    failures: list = []

    def start():
        try:
            server.start()
        except AssertionError as error:
            failures.append(error)
    thread = threading.Thread(target=start)
    thread.start()
    return server, thread, failures


def test_sighup_during_start_up_is_remembered_and_the_files_are_read_again_before_serving(certs, tmp_path):
    pipe = RulesThroughAPipe(tmp_path)
    big = changed_rules("2")                 # 5,000 more rules: compiling them takes a while after the pipe
    big["rules"] += [{"id": f"team-{i}", "namespace": f"team-{i}", "name": "web-*", "cpu": "100m"} for i in range(5000)]
    server, thread, failures = starting_server(certs, tmp_path, pipe)
    with pipe.wait_for_reader() as writer:
        assert wait_until(lambda: server.process is not None)
        assert "serving" not in server.log()
        server.signal(signal.SIGHUP)         # while start-up reads the rules: the old code died of it
        pipe.switch_to_file(changed_rules("3"))   # what the SIGHUP is about: a newer file
        writer.write(json.dumps(big).encode())
    server.signal(signal.SIGHUP)             # a second one, most likely while the 5,000 rules compile
    thread.join(60)
    assert not failures, failures
    assert server.process.poll() is None
    # The newer file was read before the listener took its first request: no waiting for a reload.
    assert cpu(server) == "3"
    server.wait_for_log("SIGHUP during start-up: reading the rules and certificates again before serving")
    server.wait_for_log(r"rules reloaded file=\S+ rules=5 ")
    server.stop()
