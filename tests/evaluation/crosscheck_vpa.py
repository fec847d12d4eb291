#!/usr/bin/env python3
"""Cross-check the VPA port (baselines.py) against VPA's own Go code on the same inputs.

    python3 tests/evaluation/crosscheck_vpa.py               # compare the port with vpa_reference.json
    python3 tests/evaluation/crosscheck_vpa.py --regenerate   # rebuild it: needs Go and the module
                                                              # proxy (k8s.io/autoscaler/vertical-pod-autoscaler v1.8.1)

The scenarios are generated from fixed seeds, so only VPA's answers are stored. tests/test_evaluation.py
checks the port against the stored answers without Go.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import baselines   # noqa: E402

REFERENCE = HERE / "vpa_reference.json"
T0 = 1_728_000_000.0          # 2024-10-04 00:00:00 UTC
MIB = 1024 * 1024

Event = tuple[float, str, float]   # (unix seconds, "cpu" | "mem" | "oom", cores | bytes | request bytes)


def scenarios() -> dict[str, dict[str, list[Event]]]:
    """{scenario: {container: events in time order}}."""
    out: dict[str, dict[str, list[Event]]] = {}

    def series(seed: str, minutes: int, cpu, mem, start: float = T0) -> list[Event]:
        rng = random.Random(seed)
        events: list[Event] = []
        for m in range(minutes):
            t = start + 60.0 * m
            events.append((t, "cpu", max(0.001, cpu(m, rng))))
            events.append((t, "mem", max(1.0, mem(m, rng))))
        return events

    out["steady-3d"] = {"app": series("s", 3 * 1440, lambda m, r: r.gauss(0.5, 0.05), lambda m, r: r.gauss(300 * MIB, 5 * MIB))}
    out["half-day"] = {"app": series("h", 720, lambda m, r: r.gauss(0.2, 0.02), lambda m, r: r.gauss(120 * MIB, 2 * MIB))}
    out["diurnal-9d"] = {"web": series(
        "d", 9 * 1440,
        lambda m, r: 0.6 * (1.6 + math.cos(2 * math.pi * (m % 1440 - 840) / 1440)) * r.gauss(1, 0.08),
        lambda m, r: (500 if m < 5 * 1440 else 700) * MIB * r.gauss(1, 0.02))}
    oom = series("o", 2 * 1440, lambda m, r: r.gauss(0.1, 0.01), lambda m, r: (300 + 0.3 * m) * MIB)
    oom.append((T0 + 60.0 * 2000 + 30, "oom", 768 * MIB))
    oom.sort(key=lambda e: (e[0], e[1] != "mem"))
    out["oom"] = {"cache": oom}
    out["sidecar-2d"] = {"app": series("a", 2 * 1440, lambda m, r: r.gauss(0.3, 0.03), lambda m, r: r.gauss(400 * MIB, 4 * MIB)),
                         "envoy": series("e", 2 * 1440, lambda m, r: r.gauss(0.004, 0.001), lambda m, r: r.gauss(60 * MIB, 1 * MIB))}
    return out


def port(containers: dict[str, list[Event]]) -> dict[str, dict[str, dict[str, float]]]:
    """The Python port's answer in VPA's units (millicores, bytes)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, events in containers.items():
        c = baselines.VpaContainer()
        for t, kind, v in events:
            if kind == "cpu":
                c.add_cpu(t, v)
            elif kind == "mem":
                c.add_memory(t, v)
            else:
                c.record_oom(t, v)
        r = c.raw_recommendation(len(containers))
        out[name] = r
    return out


def regenerate() -> None:
    binary = Path(tempfile.mkdtemp()) / "vpa_crosscheck"
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=HERE / "vpa_crosscheck", check=True)
    reference = {}
    for name, containers in scenarios().items():
        payload = {"containers": {c: [{"t": t, "kind": k, "v": v} for t, k, v in ev] for c, ev in containers.items()}}
        result = subprocess.run([str(binary)], input=json.dumps(payload), capture_output=True, text=True, check=True)
        reference[name] = json.loads(result.stdout)
    REFERENCE.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE}")


def compare() -> list[str]:
    """Differences between the port and the stored VPA answers (empty: they agree)."""
    reference = json.loads(REFERENCE.read_text())
    problems = []
    for name, containers in scenarios().items():
        ours = port(containers)
        for container, bounds in reference[name].items():
            for bound, values in bounds.items():
                for resource, expected in values.items():
                    got = ours[container][bound][resource]
                    # Exact: the port reproduces VPA's int64 truncations too.
                    if got != expected:
                        problems.append(f"{name}/{container} {bound}.{resource}: port {got}, VPA {expected}")
    return problems


if __name__ == "__main__":
    if "--regenerate" in sys.argv:
        regenerate()
    problems = compare()
    print("\n".join(problems) or "the port agrees with VPA on every scenario")
    sys.exit(1 if problems else 0)
