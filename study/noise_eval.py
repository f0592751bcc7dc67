"""Test accuracy of a study's noisy-BN trials, evaluated as trained and with the noise's mean.

Noisy BN trains on ``s * a + m`` with E[m] = 0 but E[s] = (1 + n_sigma) / 2 = 1 + noise / 8,
and evaluates without noise: at test time every noisy layer's output is 1/E[s] of its
average training scale, and the next layer's running statistics were gathered at the training
scale. This evaluates each noisy trial's last checkpoint both ways, as trained (``as is``, the
study's own ``test_acc``) and with each noisy BN's output multiplied by E[s] (``mean-scaled``,
the network's expected training-time forward pass, as inverted dropout does for dropout):

    python -m study.noise_eval results/noise                  # the study in results/noise
    python -m study.noise_eval results/noise --data-dir DIR   # where its dataset is

It writes each trial's two accuracies to RESULTS/noise_eval.csv, which ``analysis.figures``
summarises over seeds. It reads the checkpoints Tune kept under ``--storage`` (default
RESULTS/tune) and the dataset named in RESULTS/study.json; it changes nothing else in the study.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from common.cli import EXIT_USAGE, Parser, UsageError, first_few, python_interrupts, quiet_until_main

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): one line, not a traceback
    quiet_until_main("study.noise_eval")

import torch  # noqa: E402

from study import results  # noqa: E402
from study.config import TrialConfig  # noqa: E402
from study.data import DataError, load_dataset  # noqa: E402
from study.model import NoisyBatchNorm2d, SeedCNN, build_model, expected_scale  # noqa: E402
from study.train import STATE_FILE, disable_tf32, evaluate, pick_device  # noqa: E402
from study.variants import NOISY_NORMS  # noqa: E402


@contextlib.contextmanager
def mean_scaled(model: SeedCNN) -> Iterator[SeedCNN]:
    """``model`` whose noisy BN layers, in eval mode, multiply their output by E[s]."""
    hooks = [m.register_forward_hook(lambda mod, args, out: out * expected_scale(mod.noise))
             for m in model.modules() if isinstance(m, NoisyBatchNorm2d)]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


def last_checkpoints(experiment: Path) -> dict[str, Path]:
    """trial folder name -> its newest ``checkpoint_*/state.pt`` in Tune's ``experiment`` folder."""
    found: dict[str, Path] = {}
    for state in sorted(experiment.glob(f"*/checkpoint_*/{STATE_FILE}")):
        found[state.parent.parent.name] = state  # sorted: the last one per trial is the newest
    return found


def evaluate_both(state: dict, test_x: torch.Tensor,
                  test_y: torch.Tensor) -> tuple[TrialConfig, float, float]:
    """(config, test accuracy as is, test accuracy mean-scaled) of one checkpointed trial, on
    the test split (uint8 images and labels, on the device to evaluate on)."""
    disable_tf32()  # full fp32, as in training
    cfg = TrialConfig(**state["config"])
    model = build_model(cfg.norm, cfg.noise, cfg.noise_scope).to(test_x.device)
    model.load_state_dict(state["model"])
    _, plain = evaluate(model, test_x, test_y, cfg.eval_batch_size)
    with mean_scaled(model):
        _, scaled = evaluate(model, test_x, test_y, cfg.eval_batch_size)
    return cfg, plain, scaled


def run(args: argparse.Namespace) -> int:
    out = Path(args.results)
    try:
        record = json.loads((out / "study.json").read_text())
        preset, name = record["preset"], record["name"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{out} holds no readable study.json ({type(e).__name__}: {e})") from e
    if "://" in (args.storage or ""):
        raise UsageError("remote storage: copy the experiment folder here and pass its parent as --storage")
    storage = Path(args.storage) if args.storage else out / "tune"
    planned = record.get("trials")  # an older study.json lacks them: no check then
    if planned is not None and not any(t.get("norm") in NOISY_NORMS for t in planned):
        raise UsageError(f"the study in {out} has no noisy-BN trials (its variants: "
                         f"{', '.join(sorted({t.get('norm', '?') for t in planned}))})")
    checkpoints = last_checkpoints(storage / name)
    if record.get("trial_ids") is not None:  # a --storage shared with another study of this name
        ids = set(record["trial_ids"])
        other = sorted(set(checkpoints) - ids)
        if other:
            print(f"study.noise_eval: leaving out {len(other)} checkpointed trial(s) in "
                  f"{storage / name} that the study does not have ({first_few(other)})", file=sys.stderr)
        checkpoints = {t: path for t, path in checkpoints.items() if t in ids}
    states = {}
    for trial, path in checkpoints.items():
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            noisy = state["config"]["norm"] in NOISY_NORMS
        except Exception as e:  # noqa: BLE001 -- a damaged checkpoint: say so, go on with the rest
            print(f"study.noise_eval: skipping {path}: unreadable ({type(e).__name__}: {e})",
                  file=sys.stderr)
            continue
        if noisy:
            states[trial] = state
    if not states:
        raise UsageError(f"no checkpoints of noisy-BN trials in {storage / name} (--storage: the "
                         f"sweep's --storage, where Tune keeps the study's checkpoints)")
    try:
        data = load_dataset(preset["dataset"], args.data_dir, subset=preset.get("subset"),
                            log=lambda s: print(s, file=sys.stderr))
    except DataError as e:
        raise UsageError(str(e)) from e
    for trial in list(states):  # the trials record the dataset they trained on; evaluate on that one
        path = results.table_path(out, "trials", trial)
        if path.exists():
            row = results.read_table_file(path, ["dataset", "status"]).to_pylist()[0]
            trained_on = row["dataset"]
            if row["status"] == "diverged":  # its weights are not finite: no accuracy to speak of
                print(f"study.noise_eval: skipping {trial}: it diverged", file=sys.stderr)
                del states[trial]
                continue
            if trained_on != data.name:
                raise UsageError(f"{trial} trained on {trained_on}, but the study's dataset "
                                 f"{preset['dataset']!r} with --data-dir {args.data_dir} gives "
                                 f"{data.name}; pass the --data-dir the sweep had")
    if not states:
        raise UsageError(f"every noisy-BN trial of the study in {out} diverged")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: PyTorch sees no CUDA device here")
    device = pick_device(args.device)
    test_x = torch.from_numpy(data.test_x).to(device)
    test_y = torch.from_numpy(data.test_y).long().to(device)
    print(f"{'trial':<40}{'epoch':>6}{'E[s]':>7}{'as is':>9}{'mean-scaled':>13}")
    rows = []
    for trial, state in sorted(states.items()):
        cfg, plain, scaled = evaluate_both(state, test_x, test_y)
        rows.append((trial, state["epoch"], expected_scale(cfg.noise), 100 * plain, 100 * scaled))
        print(f"{trial:<40}{state['epoch']:>6}{expected_scale(cfg.noise):>7.3f}"
              f"{100 * plain:>8.2f}%{100 * scaled:>12.2f}%", flush=True)
    path = out / results.NOISE_EVAL_FILE
    tmp = path.with_name(path.name + results.TMP_SUFFIX)  # whole or not at all
    with tmp.open("w", newline="") as f:
        csv.writer(f).writerows([results.NOISE_EVAL_COLUMNS, *rows])
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    python_interrupts()
    ap = Parser(prog="python -m study.noise_eval", name="study.noise_eval",
                description=__doc__.splitlines()[0])
    ap.add_argument("results", help="the study's results folder (holds study.json)")
    ap.add_argument("--storage", default=None, help="Tune's storage path of the study (default RESULTS/tune)")
    ap.add_argument("--data-dir", default="data", help="where the study's dataset is (as for the sweep)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="where to evaluate (auto: cuda if there is one)")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"study.noise_eval: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("study.noise_eval: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
