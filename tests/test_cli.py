"""The command line: --help, --check, --predict, start-up refusals and the laptop default."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

import reqapi
from conftest import REQAPI, RULES, wait_until, write_rules


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    python = os.environ.get("REQAPI_PYTHON", sys.executable)
    return subprocess.run([python, str(REQAPI), *args], capture_output=True, text=True, timeout=timeout)


def test_help_explains_every_flag():
    result = run("--help")
    assert result.returncode == 0
    flags = set(re.findall(r"(--[a-z][a-z-]+)", result.stdout))
    for flag in ("--cert", "--key", "--port", "--bind-address", "--rules", "--check", "--predict", "--log-format",
                 "--requestheader-client-ca-file", "--requestheader-allowed-names", "--client-ca-file",
                 "--authorization-mode", "--max-connections", "--shutdown-delay", "--shutdown-timeout"):
        assert flag in flags, flag
    assert "(default: 8443)" in result.stdout


def test_check_accepts_a_good_file(rules_file):
    result = run("--rules", str(rules_file), "--check")
    assert result.returncode == 0, result.stderr
    assert "OK: 5 rules, 3 named workloads" in result.stdout


def test_check_reports_the_memory_the_rules_will_keep(tmp_path):
    path = write_rules(tmp_path / "rules.json", {"rules": [
        {"id": f"rule-{i}", "namespace": f"team-{i % 40}", "name": f"svc-{i}-*", "cpu": "100m"} for i in range(3000)]})
    result = run("--rules", str(path), "--check")
    assert result.returncode == 0, result.stderr
    estimate = reqapi.load_rules(str(path)).memory
    assert 1.5 * 2**20 < estimate < 3 * 2**20
    assert result.stdout.rstrip().endswith(f"memory about {reqapi.size_text(estimate)} (at most 8.0 MiB)"), result.stdout


def test_check_refuses_rules_that_would_not_fit_the_memory_limit(tmp_path):
    # 30,000 rules: --check said OK, and the server then held ~150 MB for them.
    path = write_rules(tmp_path / "rules.json", {"rules": [
        {"id": f"rule-{i}", "namespace": f"team-{i % 40}", "name": f"svc-{i}-*", "cpu": "100m"} for i in range(30000)]})
    result = run("--rules", str(path), "--check")
    assert result.returncode == 2
    message = result.stderr.strip()
    assert message.startswith(f"error: {path}: rules: 30,000 rules would keep about "), message
    assert "more than the 8.0 MiB reqapi allows its rules" in message and "merge rules" in message
    assert "for example {" in message


def test_check_refuses_a_bad_file_with_exit_2_and_the_place(tmp_path):
    bad = json.loads(json.dumps(RULES))
    bad["rules"][3]["memory"] = "1.5 Gi"
    path = write_rules(tmp_path / "rules.json", bad)
    result = run("--rules", str(path), "--check")
    assert result.returncode == 2
    assert str(path) in result.stderr and "rules[3].memory" in result.stderr


def test_check_needs_rules():
    result = run("--check")
    assert result.returncode == 2 and "--rules" in result.stderr


def test_predict_prints_the_object_the_server_serves(rules_file):
    result = run("--rules", str(rules_file), "--predict", "prod-eu/pay-api")
    assert result.returncode == 0, result.stderr
    obj = json.loads(result.stdout)
    assert obj["kind"] == "Requests" and obj["metadata"]["namespace"] == "prod-eu"
    assert obj["resources"] == {"cpu": "500m", "memory": "512Mi"}
    assert obj["metadata"]["annotations"] == {"k8s.wujiuye.com/rule": "prod-api"}


def test_predict_agrees_with_the_running_server(start_server, rules_file):
    server = start_server("--rules", str(rules_file))
    offline = json.loads(run("--rules", str(rules_file), "--predict", "shop/checkout").stdout)
    online = server.get("/apis/k8s.wujiuye.com/v1beta1/namespaces/shop/requests/checkout").json()
    for key in ("uid", "resourceVersion", "annotations"):
        assert offline["metadata"][key] == online["metadata"][key]
    assert offline["resources"] == online["resources"]


@pytest.mark.parametrize("target", ["shop", "Shop/checkout", "shop/Checkout", "/x"])
def test_predict_refuses_bad_names(target):
    result = run("--predict", target)
    assert result.returncode == 2 and "--predict" in result.stderr


def test_mismatched_certificate_and_key_are_refused_at_start(certs, tmp_path):
    from conftest import Certs
    other = Certs(tmp_path / "other")
    result = run("--cert", str(certs.cert_file), "--key", str(other.key_file), "--port", "0")
    assert result.returncode == 2
    assert "cannot be used together" in result.stderr and str(certs.cert_file) in result.stderr


def test_missing_certificate_file_is_refused_at_start(tmp_path):
    result = run("--cert", str(tmp_path / "nope.pem"), "--key", str(tmp_path / "nope-key.pem"), "--port", "0")
    assert result.returncode == 2 and "no such file" in result.stderr


def test_cert_without_key_is_refused(certs):
    result = run("--cert", str(certs.cert_file), "--port", "0")
    assert result.returncode == 2 and "--cert and --key go together" in result.stderr


def test_without_certificates_it_makes_a_throwaway_one_and_says_how_to_curl(tmp_path):
    log = tmp_path / "log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([os.environ.get("REQAPI_PYTHON", sys.executable), str(REQAPI), "--port", "0",
                                    "--bind-address", "127.0.0.1"],
                                   stdout=handle, stderr=subprocess.STDOUT)
    try:
        found = wait_until(lambda: re.search(r"try: curl --cacert (\S+) https://localhost:(\d+)(\S+)",
                                             log.read_text()), timeout=20)
        assert found, log.read_text()
        cert, port, path = found.groups()
        result = subprocess.run(["curl", "-sS", "--cacert", cert, f"https://localhost:{port}{path}"],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["resources"] == {"cpu": "100m", "memory": "100Mi"}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0


def test_port_in_use_is_refused_with_a_hint(server, certs):
    result = run("--cert", str(certs.cert_file), "--key", str(certs.key_file), "--port", str(server.port),
                 "--bind-address", "127.0.0.1")
    assert result.returncode == 2 and "cannot listen on 127.0.0.1" in result.stderr


def test_json_log_format(start_server):
    server = start_server("--log-format", "json")
    server.get("/version")
    def records():
        return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert wait_until(lambda: any(r.get("msg") == "request" and r["path"] == "/version" and r["status"] == 200
                                  for r in records()))
    assert all({"time", "level", "msg"} <= set(r) for r in records())


def test_the_readme_quotes_errors_as_reqapi_words_them(tmp_path):
    readme = " ".join((REQAPI.parent / "README.md").read_text(encoding="utf-8").split())
    rules = tmp_path / "rules.json"
    rules.write_text('{"rules": [{"id": "a", "cpu": "1"}, {"id": "b", "memory": "2GB"}]}')
    refused = run("--rules", str(rules), "--check")
    assert refused.returncode == 2
    message = refused.stderr.strip().removeprefix("error: ").replace(str(rules), "rules.json")
    assert f"`{message}`" in readme, message
    # The README's example of a Status message: its quoting of the name, and the text up to its "…".
    with pytest.raises(reqapi.HTTPError) as refusal:
        reqapi.checked_workload("default", "Web")
    quoted = re.search(r"`(Name parameter invalid: [^`]*?) …`", readme)
    assert quoted and refusal.value.message.startswith(quoted.group(1)), (quoted, refusal.value.message)
