"""``pytest examples`` serially and under pytest-xdist: wall time and forward+backward passes.

One run prints, side by side, for a serial run, ``-n 2`` (``--dist load``: items spread one by
one) and ``-n 2 --dist loadscope`` (a suite model's items on one worker): the wall time, the
ratio to the serial run, the forward+backward passes counted in every process (see
``_count_passes.py``), and whether the JSON records equal the serial run's.

    python benchmarks/parallel.py            # on this machine's cores (2 here)
    python benchmarks/parallel.py --keep out # also keep each run's output and JSON in out/

The examples' trained models are cached (examples/.cache) by the first run; run once before
timing, or pass --warm to run the serial configuration twice and time the second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "serial": [],
    "-n 2 (load)": ["-n", "2"],
    "-n 2 --dist loadscope": ["-n", "2", "--dist", "loadscope"],
}


def run(extra: list[str], workdir: Path, name: str) -> tuple[float, int, list]:
    log = workdir / f"{name}.passes"
    report = workdir / f"{name}.json"
    env = dict(os.environ, SALIENCY_PASS_LOG=str(log))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "examples", "-q", "-p", "no:cacheprovider",
           "-p", "_count_passes", f"--saliency-report={report}", *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (workdir / f"{name}.out").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{name}: pytest exited {done.returncode}; see {workdir}/{name}.out")
    passes = sum(int(line) for line in log.read_text().split())
    return wall, passes, json.loads(report.read_text())["records"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="keep each run's output and JSON here")
    parser.add_argument("--warm", action="store_true", help="run the serial one first, untimed")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="saliency-xdist-"))
    workdir.mkdir(parents=True, exist_ok=True)
    safe = {name: name.replace(" ", "_").replace("(", "").replace(")", "") for name in MODES}
    if args.warm:
        run([], workdir, "warm")
    results = {name: run(extra, workdir, safe[name]) for name, extra in MODES.items()}
    serial_wall, serial_passes, serial_records = results["serial"]
    print(f"pytest examples on {os.cpu_count()} cores ({len(serial_records)} audits)")
    print(f"{'run':<24} {'wall s':>8} {'vs serial':>10} {'passes':>8} {'vs serial':>10}  JSON")
    for name, (wall, passes, records) in results.items():
        same = "same" if records == serial_records else "DIFFERS"
        print(f"{name:<24} {wall:8.1f} {wall / serial_wall:10.2f} {passes:8d} "
              f"{passes / serial_passes:10.2f}  {same}")  # fmt: skip


if __name__ == "__main__":
    main()
