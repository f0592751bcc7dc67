"""Results on S3 against results on local disk: the smoke sweep's wall time with ``--out`` and
``--storage`` on a real S3 endpoint (moto's server on 127.0.0.1, tests/s3_server.py) ÷ the same
sweep with both on local disk, one run each, in one invocation (local first).

What the ratio measures is the cost of the driver's writes and Tune's checkpoints going through
S3's API (every epoch: a read and a write per table per trial, a checkpoint upload) on a
loopback server; a real bucket adds the network's round trips.

    python bench/s3_vs_local.py [--preset smoke]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _common import timed_module  # noqa: E402
from s3_server import s3_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="smoke")
    opts = parser.parse_args()
    common = ["--preset", opts.preset, "--dataset", "synthetic", "--address", "local"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as tmp:
        local = timed_module("study.sweep", [*common, "--out", f"{tmp}/results"], env)
        with s3_server() as s3:
            on_s3 = timed_module("study.sweep", [*common, "--out", f"s3://{s3.bucket}/results",
                                 "--storage", f"s3://{s3.bucket}/tune"], dict(env, **s3.env))
    print(f"{opts.preset} sweep, wall time: local disk {local:.1f} s, S3 (moto on 127.0.0.1) "
          f"{on_s3:.1f} s; S3 / local = {on_s3 / local:.2f}  (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
