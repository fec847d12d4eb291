#!/usr/bin/env python3
"""Offline evaluation of reqapi's history estimator against krr `simple` and VPA.

    python3 tests/evaluation/evaluate.py               # the scored seeds: markdown table + targets
    python3 tests/evaluation/evaluate.py --tune        # the constant sweep, on the tuning seeds only
    python3 tests/evaluation/evaluate.py --seeds 101-110 --horizon 3

Pure functions over generated traces (traces.py); no Prometheus. See docs/recommender.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import score    # noqa: E402
import traces   # noqa: E402
from estimator import DEFAULT_PARAMS, Params   # noqa: E402


def _seeds(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


# The sweep: every combination is scored on the tuning seeds; the kept one meets every target
# there with the lowest suite CPU slack (ties: lower shortfall).
GRID: dict[str, tuple] = {
    "cpu_day_quantile": (0.75, 0.9, 1.0),
    "cpu_half_life_days": (1.0, 2.0, 4.0),
    "cpu_margin": (0.10, 0.15, 0.20, 0.25),
    "throttle_raise": (0.25, 0.5, 0.8),
}


def tune(seeds: tuple[int, ...], horizon: int) -> Params:
    prepared = score.prepare_all(traces.SHAPES, seeds, horizon)
    best: tuple | None = None
    for values in itertools.product(*GRID.values()):
        params = dataclasses.replace(DEFAULT_PARAMS, **dict(zip(GRID, values)))
        result = score.evaluate(prepared, params)
        met = all(ok for name, ok, _ in score.target_report(result) if not name.startswith("stretch"))
        suite = result["reqapi"]["suite"]
        key = (not met, round(suite["cpu_slack"], 3), suite["cpu_short"])
        print(f"{'met ' if met else 'MISS'} slack {suite['cpu_slack']:6.2f} short {suite['cpu_short']:5.2f} "
              f"oom {suite['oom_days']:5.2f}  {dict(zip(GRID, values))}")
        if best is None or key < best[0]:
            best = (key, params)
    assert best is not None
    print(f"\nchosen on tuning seeds {seeds}: {dict((k, getattr(best[1], k)) for k in GRID)}")
    return best[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=_seeds, default=traces.SCORED_SEEDS,
                        help="seeds to score, e.g. 101-104 (default: the scored seeds)")
    parser.add_argument("--horizon", type=int, default=1, help="days each deploy is scored on (default 1)")
    parser.add_argument("--tune", action="store_true", help="sweep the constants on the tuning seeds")
    args = parser.parse_args()
    if args.tune:
        if set(args.seeds) & set(traces.SCORED_SEEDS) and args.seeds != traces.SCORED_SEEDS:
            print("refusing to tune on scored seeds", file=sys.stderr)
            return 2
        tune(traces.TUNING_SEEDS, args.horizon)
        return 0
    started = time.monotonic()
    result = score.evaluate(score.prepare_all(traces.SHAPES, args.seeds, args.horizon))
    print(f"Seeds {','.join(map(str, args.seeds))}; {len(traces.SHAPES)} shapes; deploys at days "
          f"{score.DEPLOY_DAYS[0]}-{score.DEPLOY_DAYS[-1]}; horizon {args.horizon} d; memory limit = request.\n")
    print(score.markdown_table(result))
    print("\n| target | met | numbers |\n|---|---|---|")
    for name, ok, numbers in score.target_report(result):
        print(f"| {name} | {'yes' if ok else 'NO'} | {numbers} |")
    print(f"\n({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
