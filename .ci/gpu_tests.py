"""Run the GPU test files on a CUDA machine in N parallel pytest processes: python .ci/gpu_tests.py [N].

Their time is Triton compiling kernels (one compile per shape and dtype a test meets), which is CPU-bound and runs
one at a time inside a process; split over 8 processes on one H200 the 121 tests take about 2 minutes instead of
more than 5. Tests are dealt round-robin by node id; every process writes a log beside the others (in $OUT, or the
working directory), and the failures of all are printed at the end. Exit status: non-zero if any process failed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

FILES = ["tests/ops/test_triton.py", "tests/ops/test_swa.py", "tests/gdn2/test_hybrid.py",
         "tests/gdn2/test_generate.py", "tests/gdn2/test_layer_kernels.py", "tests/gdn2/test_model.py"]
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def main(n: int) -> int:
    logs = Path(os.environ.get("OUT", "."))
    listed = subprocess.run([*PYTEST, "--collect-only", *FILES], capture_output=True, text=True, check=True)
    ids = [line for line in listed.stdout.splitlines() if "::" in line]
    print(f"{len(ids)} tests in {n} processes", flush=True)
    started = time.perf_counter()
    runs = []
    for i in range(n):
        log = logs / f"gpu_tests_{i}.log"
        with log.open("w") as f:
            runs.append((subprocess.Popen([*PYTEST, "-rfEs", *ids[i::n]], stdout=f, stderr=subprocess.STDOUT), log))
    status = 0
    for proc, log in runs:
        status |= proc.wait()
        lines = log.read_text().splitlines()
        print(f"{log.name}: {lines[-1] if lines else 'no output'} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    for _, log in runs:
        failed = [line for line in log.read_text().splitlines() if line.startswith(("FAILED", "ERROR"))]
        if failed:
            print("\n".join(failed), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8))
