"""Time ``python -m analysis.figures`` on a results folder the size of the ``full`` preset.

75 trials (no BN and BN at noise 0, noisy BN at noise 0.5, 1, 2; lr 1e-3, 1e-2, 5e-2; seeds
0-4), 10 epochs, 2,500 steps per epoch with every step column (1.9 M step rows), 3 layers × 2
sites per epoch with 64-bin histograms, written through ``study.results`` into a temporary
folder. Prints the seconds of one run of the command (the goal is ≤ 30 s) and its peak memory.

    python bench/bench_analysis.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.synthetic import write_synthetic_study  # noqa: E402

VARIANTS = (
    ("none", 0.0),
    ("batch", 0.0),
    ("noisy_batch", 0.5),
    ("noisy_batch", 1.0),
    ("noisy_batch", 2.0),
)
GOAL_S = 30.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="write the study here and keep it (default: a temporary folder)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_analysis_") as tmp:
        folder = args.keep or Path(tmp) / "full"
        t0 = time.perf_counter()
        write_synthetic_study(
            folder,
            variants=VARIANTS,
            lrs=(1e-3, 1e-2, 5e-2),
            seeds=range(5),
            epochs=10,
            steps_per_epoch=2500,
            hist_bins=64,
            per_epoch=False,
        )
        rows = sum(1 for _ in (folder / "steps").glob("*.parquet"))
        print(f"wrote {rows} trials into {folder} in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "analysis.figures",
                str(folder),
                "--out",
                str(Path(tmp) / "figures"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr)
            print(f"analysis.figures failed with exit status {proc.returncode}")
            return 1
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(
            f"python -m analysis.figures on the full-size study: {seconds:.1f} s "
            f"(goal ≤ {GOAL_S:.0f} s), peak memory {peak_mb:.0f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
