"""Fingerprint every output of three studies, to show a refactor changed no output.

    python bench/same_outputs.py snapshot before.json     # on the old code
    python bench/same_outputs.py snapshot after.json      # on the new code
    python bench/same_outputs.py compare before.json after.json

The three studies: the ``smoke`` demo (a real sweep, then ``analysis.figures``); a synthetic
study of the ``full`` preset's size (75 trials, 10 epochs, 2,500 steps an epoch), written
through the real writer and analysed; and a real probe study (the smoke grid, seed 0,
``--probe-every 25``), analysed. Every file's SHA-256 is recorded under its path within a
fixed work folder (so paths in the outputs match between runs). Exceptions, each for a reason
outside the code's numbers: Parquet files are compared by their rows (the
``wall_s``, ``images_per_s`` and ``host`` columns left out: time and machine), PDFs are written with
``SOURCE_DATE_EPOCH`` fixed (matplotlib embeds the date otherwise), and Tune's own experiment
folder (logs, checkpoints) is not compared. Takes ~4 min on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/bnstudy-same-outputs")
VOLATILE_COLUMNS = {"wall_s", "images_per_s", "host"}
SYNTHETIC_VARIANTS = (("none", 0.0), ("batch", 0.0), ("noisy_batch", 0.5), ("noisy_batch", 1.0),
                      ("noisy_batch", 2.0))


def run(*argv: str) -> None:
    env = dict(os.environ, SOURCE_DATE_EPOCH="0", PYTHONHASHSEED="0")
    print("$", " ".join(argv), flush=True)
    subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, check=True)


def make_studies() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    storage = WORK / "ray"
    run("-m", "study.sweep", "--preset", "smoke", "--dataset", "synthetic", "--out", str(WORK / "smoke"),
        "--storage", str(storage))
    run("-m", "analysis.figures", str(WORK / "smoke"))
    run("-m", "study.sweep", "--preset", "smoke", "--dataset", "synthetic", "--seeds", "0",
        "--probe-every", "25", "--name", "probes", "--out", str(WORK / "probes"), "--storage", str(storage))
    run("-m", "analysis.figures", str(WORK / "probes"))
    run("-c", "from analysis.synthetic import write_synthetic_study as w; import sys; "
        f"w(sys.argv[1], variants={SYNTHETIC_VARIANTS!r}, lrs=(1e-3, 1e-2, 5e-2), seeds=range(5), "
        "epochs=10, steps_per_epoch=2500, hist_bins=64, per_epoch=False)", str(WORK / "full"))
    run("-m", "analysis.figures", str(WORK / "full"))


def fingerprint(path: Path) -> str:
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        table = table.select([c for c in table.column_names if c not in VOLATILE_COLUMNS])
        text = json.dumps(table.to_pylist(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(manifest: Path) -> None:
    make_studies()
    prints = {}
    for path in sorted(WORK.rglob("*")):
        rel = path.relative_to(WORK)
        if path.is_file() and rel.parts[0] != "ray":
            prints[str(rel)] = fingerprint(path)
    manifest.write_text(json.dumps(prints, indent=1, sort_keys=True))
    print(f"{len(prints)} files fingerprinted into {manifest}")


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    missing, new = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    for word, names in (("only before", missing), ("only after", new), ("differ", changed)):
        for name in names:
            print(f"{word}: {name}")
    same = len(set(a) & set(b)) - len(changed)
    print(f"{same} of {len(a)} files identical; {len(changed)} differ, {len(missing)} only before, "
          f"{len(new)} only after")
    return 1 if missing or new or changed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("snapshot").add_argument("manifest", type=Path)
    cmp = sub.add_parser("compare")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "snapshot":
        snapshot(args.manifest)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    raise SystemExit(main())
