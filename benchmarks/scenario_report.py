"""Run the whole scenario suite (planted pathologies and healthy runs) and print recall and false alarms.

Usage::

    python benchmarks/scenario_report.py            # every scenario
    python benchmarks/scenario_report.py dead_relu  # only scenarios whose name contains "dead_relu"
    python benchmarks/scenario_report.py -v         # also print each finding's message
    python benchmarks/scenario_report.py --seeds 3  # every scenario with seeds 0, 1, 2

Recall counts a planted scenario as found when every expected code is reported as a warning or error
(and, where the catalog names it, on the expected layer) and no code it forbids is (the wrong story, e.g.
exploding_gradients for one corrupted label). A false alarm is any warning or error on a
healthy run, whatever its code (codes of the other monitors included).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from scenarios import ALL, run_scenario  # noqa: E402  (imports lightning, which sets its loggers up)

torch.set_num_threads(1)  # tiny models: one thread is several times faster on a shared CPU (as in conftest)

for _name in ("lightning.pytorch", "lightning.fabric", "lightning_normcheck"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


def main(argv: list[str]) -> int:
    verbose = "-v" in argv
    seeds = 1
    if "--seeds" in argv:
        i = argv.index("--seeds")
        seeds = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    pattern = [a for a in argv if not a.startswith("-")]
    chosen = [(s, seed) for s in ALL if not pattern or any(p in s.name for p in pattern) for seed in range(seeds)]
    found = planted = false_runs = healthy = 0
    total_time = 0.0
    print(f"{'scenario':<30} {'kind':<8} {'time':>6}  result")
    for sc, seed in chosen:
        res = run_scenario(sc, seed=seed)
        total_time += res.seconds
        bad = [f for f in res.findings if f.severity in ("warning", "error")]
        got = sorted({f.code for f in bad})
        if sc.planted:
            planted += 1
            ok = all(c in got for c in sc.expect)
            if ok and sc.layer is not None:
                ok = any(f.code == sc.expect[0] and f.layer == sc.layer for f in bad)
            wrong = [c for c in got if c in sc.forbid]  # the wrong story for this cause
            found += ok and not wrong
            status = ("FOUND" if ok else "MISSED") + (f" WRONG {wrong}" if wrong else "")
            detail = f"expected {list(sc.expect)}{' @' + sc.layer if sc.layer else ''}, got {got}"
        else:
            healthy += 1
            false_runs += bool(bad)
            status = "FALSE ALARM" if bad else "silent"
            detail = f"got {got}" if bad else ""
        if res.exception is not None:
            detail += f" (raised {type(res.exception).__name__})"
        label = sc.name if seeds == 1 else f"{sc.name}#{seed}"
        print(f"{label:<30} {'planted' if sc.planted else 'healthy':<8} {res.seconds:>5.1f}s  {status} {detail}")
        if verbose or (sc.planted and status != "FOUND") or (not sc.planted and bad):
            for f in res.findings:
                print(f"    {f}")
    print()
    if planted:
        print(f"recall: {found}/{planted} planted pathologies found with the right code ({found / planted:.0%})")
    if healthy:
        print(f"false alarms: {false_runs}/{healthy} healthy runs with a warning or error")
    print(f"total training time: {total_time:.1f}s")
    return 0 if found == planted and false_runs == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
