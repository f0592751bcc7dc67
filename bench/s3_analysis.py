"""Reading a study from S3 against reading it from local disk (issue 24's last goal): the wall
time of ``python -m analysis.figures s3://BUCKET/STUDY`` (which copies the study's tables
from the store, then draws) ÷ the same on the local folder, one run each, in one invocation
(local first). S3 is moto's server on 127.0.0.1 (tests/s3_server.py), so the ratio is the
cost of S3's API and of the copy, without a real network's round trips.

The folder is uploaded first (not timed): study.json and the five tables.

    python bench/s3_analysis.py FOLDER
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _common import timed_module  # noqa: E402
from s3_server import s3_server  # noqa: E402

TABLES = ("trials", "epochs", "layers", "steps", "probes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    opts = parser.parse_args()
    files = sum(1 for name in TABLES for _ in (opts.folder / name).rglob("*.parquet"))
    print(f"load average at start {os.getloadavg()[0]:.2f}; {files} table files", flush=True)
    with tempfile.TemporaryDirectory(prefix="s3-analysis-", dir="/tmp") as tmp:
        env = dict(os.environ, XDG_CACHE_HOME=f"{tmp}/cache")
        local = timed_module("analysis.figures", [str(opts.folder), "--out", f"{tmp}/local"], env)
        print(f"local disk: {local:.1f} s", flush=True)
        with s3_server() as s3:
            fs = pafs.S3FileSystem(endpoint_override=s3.endpoint, access_key="testing",
                                   secret_key="testing", region="us-east-1", scheme="http")
            t0 = time.perf_counter()
            for name in TABLES:
                if (opts.folder / name).is_dir():
                    pafs.copy_files(str(opts.folder / name), f"{s3.bucket}/study/{name}",
                                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
            with fs.open_output_stream(f"{s3.bucket}/study/study.json") as out:
                out.write((opts.folder / "study.json").read_bytes())
            print(f"uploaded in {time.perf_counter() - t0:.1f} s (not timed below)", flush=True)
            on_s3 = timed_module("analysis.figures", [f"s3://{s3.bucket}/study", "--out", f"{tmp}/s3"],
                                 dict(env, **s3.env))
    print(f"analysis.figures, wall time: local disk {local:.1f} s, S3 (moto on 127.0.0.1) {on_s3:.1f} s; "
          f"S3 / local = {on_s3 / local:.2f} (load average at end {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
