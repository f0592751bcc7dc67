"""A synthetic results folder written through ``study.results``, for tests and benchmarks.

The values are made up but shaped like a real study (BN keeps activations near 0 and 1,
no BN drifts, noisy BN moves them, gradients are larger without BN), so the figures drawn
from it can be looked at, and the files go through the real writer, so the analysis reads
exactly what training writes. Only pyarrow and numpy are needed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from analysis.roles import BASELINE_NORM
from study import epoch_parts, results

#: The seed study's variants: the references (no BN, BN) at noise 0, the noisy ones at 0.5
#: and 1. Others (ℓp, GN, LN) are written when named, at their parameters' defaults.
DEFAULT_VARIANTS: tuple[tuple[str, float], ...] = tuple(
    (norm, noise)
    for norm in results.NORMS
    if results.VARIANTS[norm].reference or norm in results.NOISY_NORMS
    for noise in ((0.5, 1.0) if norm in results.NOISY_NORMS else (0.0,))
)


def write_synthetic_study(
    path: str | Path,
    *,
    variants: Sequence[tuple[str, float]] = DEFAULT_VARIANTS,
    lrs: Sequence[float] = (1e-3, 1e-2),
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 3,
    steps_per_epoch: int = 100,
    hist_bins: int = 32,
    probe_every: int = 0,
    outcome: Mapping[str, tuple[str, int]] | None = None,
    per_epoch: bool = True,
    compact: bool = True,
    dataset: str = "synthetic",
    noise_scope: str = "channel",
    study_json: bool = True,
    random_state: int = 0,
) -> list[dict]:
    """Write a study into ``path``; returns the trial rows written.

    ``outcome`` maps a trial id to (status, epochs written) for trials that did not finish
    (``diverged``: the last written epoch has a non-finite loss; ``running``: fewer epochs;
    ``error``). ``per_epoch`` writes each epoch into its own files, as training does; without
    it every table is written once per trial, compacted (faster, for the benchmark).
    ``compact``: compact each trial's per-epoch files at its end, as the writer does for a
    trial that has ended (without it the study is left as a running one leaves it).
    """
    out = Path(path)
    rng = np.random.default_rng(random_state)
    outcome = dict(outcome or {})
    rows = []
    for v_index, (norm, noise) in enumerate(variants):
        for lr in lrs:
            for seed in seeds:
                tid = results.trial_id(norm, noise, lr, seed)
                status, n_epochs = outcome.get(tid, ("done", epochs))
                rows.append(
                    _write_trial(
                        out,
                        rng,
                        tid,
                        norm,
                        float(noise),
                        float(lr),
                        int(seed),
                        v_index,
                        epochs,
                        n_epochs,
                        status,
                        steps_per_epoch,
                        hist_bins,
                        probe_every,
                        per_epoch,
                        compact,
                        dataset,
                        noise_scope,
                    )
                )
    if study_json:
        (out / "study.json").write_text(
            json.dumps(
                {
                    "name": "synthetic",
                    "preset": "synthetic",
                    "dataset": dataset,
                    "norms": sorted({n for n, _ in variants}),
                    "noises": sorted({float(z) for _, z in variants}),
                    "lrs": [float(x) for x in lrs],
                    "seeds": [int(s) for s in seeds],
                    "epochs": epochs,
                    "batch_size": 16,
                },
                indent=2,
            )
        )
    return rows


def _write_trial(
    out: Path,
    rng: np.random.Generator,
    tid: str,
    norm: str,
    noise: float,
    lr: float,
    seed: int,
    v_index: int,
    epochs: int,
    n_epochs: int,
    status: str,
    steps_per_epoch: int,
    hist_bins: int,
    probe_every: int,
    per_epoch: bool,
    compact: bool,
    dataset: str,
    noise_scope: str,
) -> dict:
    epoch_rows, layer_rows, step_cols, probe_rows = [], [], [], []
    for epoch in range(1, n_epochs + 1):
        row, layers, cols, probes = _epoch(rng, tid, norm, noise, lr, seed, epoch, n_epochs, status,
                                           steps_per_epoch, hist_bins, probe_every)
        epoch_rows.append(row)
        layer_rows.extend(layers)
        step_cols.append(cols)
        probe_rows.extend(probes)
        if per_epoch:
            _write(out, tid, [row], layers, [cols], probes, epoch_parts.write_epoch_rows)
    if not per_epoch and n_epochs:
        _write(out, tid, epoch_rows, layer_rows, step_cols, probe_rows, _write_compacted)
    if compact:
        epoch_parts.compact_trial(out, tid)
    last = epoch_rows[-1] if epoch_rows else {}
    row = dict(
        trial_id=tid,
        study="synthetic",
        norm=norm,
        noise=noise,
        noise_scope=noise_scope,
        **{k: results.PARAM_DEFAULTS[k] if k in _params(norm) else None for k in ("p", "groups")},
        lr=lr,
        momentum=0.9,
        batch_size=16,
        epochs=epochs,
        seed=seed,
        grad_every=1,
        probe_every=probe_every,
        dataset=dataset,
        train_size=40000,
        val_size=10000,
        test_size=10000,
        status=status,
        error="RuntimeError: synthetic failure" if status == "error" else None,
        epochs_done=n_epochs,
        final_train_loss=last.get("train_loss"),
        final_train_acc=last.get("train_acc"),
        final_val_loss=last.get("val_loss"),
        final_val_acc=last.get("val_acc"),
        final_test_loss=last.get("test_loss"),
        final_test_acc=last.get("test_acc"),
        wall_s=10.0 * n_epochs,
        host="localhost",
        device="cpu",
        config_json=json.dumps({"norm": norm, "noise": noise, "lr": lr, "seed": seed}),
    )
    results.write_trial_row(out, row)
    return row


def trial_records(norm: str, noise: float, lr: float, seed: int, *, epochs: int, rng: np.random.Generator,
                  steps_per_epoch: int = 2500, hist_bins: int = 128, probe_every: int = 0) -> list[dict]:
    """A finished trial's made-up epochs as ``study.train.run_trial`` hands them to its caller
    (one record per epoch: ``epoch``, ``layers``, ``steps``, ``probes``, ``status``), for
    feeding the real writer (bench/scale.py).

    Args:
        norm, noise, lr, seed: the trial's grid point.
        epochs: how many epochs; the last one's status is ``done``, the others' ``running``.
        rng: the generator the values are drawn from.
        steps_per_epoch, hist_bins, probe_every: the rows' sizes, as a trial's settings give them.

    Returns:
        The records, epoch 1 first.
    """
    tid = results.trial_id(norm, noise, lr, seed)
    records = []
    for epoch in range(1, epochs + 1):
        row, layers, cols, probes = _epoch(rng, tid, norm, float(noise), float(lr), int(seed), epoch,
                                           epochs, "done", steps_per_epoch, hist_bins, probe_every)
        records.append(dict(
            epoch={k: v for k, v in row.items() if k != "trial_id"},
            layers=[{k: v for k, v in r.items() if k not in ("trial_id", "epoch")} for r in layers],
            steps=cols,
            probes=[{k: v for k, v in r.items() if k != "trial_id"} for r in probes],
            status="done" if epoch == epochs else "running",
        ))
    return records

def _epoch(rng: np.random.Generator, tid: str, norm: str, noise: float, lr: float, seed: int,
           epoch: int, n_epochs: int, status: str, steps_per_epoch: int, hist_bins: int,
           probe_every: int) -> tuple[dict, list[dict], dict[str, np.ndarray], list[dict]]:
    """One epoch's made-up rows: its epochs row, layers rows, step columns and probe rows."""
    has_bn = norm != BASELINE_NORM  # the made-up data of every other variant are normalised
    lr_effect = float(np.log10(lr / 1e-3))
    epoch_rows, layer_rows, step_cols, probe_rows = [], [], [], []
    diverged = status == "diverged" and epoch == n_epochs
    acc = 0.35 + 0.3 * (1 - np.exp(-epoch / 4)) + (0.08 if has_bn else 0.0) - 0.01 * noise
    acc += 0.03 * lr_effect * (1 if has_bn else -1) + rng.normal(0, 0.01)
    epoch_rows.append(
        dict(
            trial_id=tid,
            epoch=epoch,
            train_loss=float("nan") if diverged else 2.0 - acc,
            train_acc=acc,
            val_loss=float("nan") if diverged else 2.1 - acc,
            val_acc=float("nan") if diverged else acc - 0.02 + rng.normal(0, 0.01),
            test_loss=float("nan") if diverged else 2.1 - acc,
            test_acc=float("nan") if diverged else acc - 0.03 + rng.normal(0, 0.01),
            lr=lr,
            steps=steps_per_epoch,
            wall_s=10.0,
            images_per_s=5000.0,
            diverged=diverged,
            grad_norm_mean=1.0,
            grad_norm_std=0.1,
            grad_norm_max=2.0,
        )
    )
    for k, layer in enumerate(results.ACT_LAYERS, start=1):
        drift = 0.15 * epoch * k
        conv_mean = drift * (1 if k % 2 else -1) + rng.normal(0, 0.05)
        conv_var = (1.0 + 0.4 * epoch * k) * np.exp(rng.normal(0, 0.05))
        if not has_bn:
            pre_mean, pre_var = conv_mean, conv_var
        else:
            pre_mean = rng.normal(0, 0.02 + 0.25 * noise)
            pre_var = (1.0 + 0.3 * noise) * np.exp(rng.normal(0, 0.02 + 0.1 * noise))
        for site, m, var in (("conv", conv_mean, conv_var), ("preact", pre_mean, pre_var)):
            count = 16 * 32 * 32 * steps_per_epoch
            layer_rows.append(
                dict(
                    trial_id=tid,
                    epoch=epoch,
                    layer=layer,
                    site=site,
                    count=count,
                    mean=float(m),
                    var=float(var),
                    # no draw from rng: the other made-up values stay as they were
                    batch_mean_std=0.05 * (1 + noise) * (1 + 0.1 * seed + 0.05 * epoch),
                    batch_var_std=0.05 * (1 + noise) * (1 + 0.2 * seed) * k,
                    hist_lo=-8.0,
                    hist_hi=8.0,
                    hist=_histogram(float(m), float(var), count, hist_bins),
                )
            )
    for k, layer in enumerate(results.GRAD_LAYERS, start=1):  # BN's conv weights grow
        growth = 0.1 * epoch if has_bn and layer.startswith("conv") else 0.02 * epoch
        layer_rows.append(dict(trial_id=tid, epoch=epoch, layer=layer, site=results.WEIGHT_SITE,
                               weight_norm=float(k * (1 + growth) * (1 + 0.01 * seed))))
    steps = np.arange((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch)
    level = (1.0 if has_bn else 3.0) * (1 + 0.2 * noise) * (lr / 1e-3) ** 0.3
    cols: dict[str, np.ndarray] = {
        "step": steps,
        "epoch": np.full(len(steps), epoch),
        "loss": (2.0 - 0.1 * epoch + rng.normal(0, 0.1, len(steps))).astype(np.float32),
    }
    swing = 1.0 + (0.0 if has_bn else 0.5 * np.sin(steps / (3.0 * steps_per_epoch)))
    for name in results.GRAD_LAYERS:
        cols[f"grad_norm_{name}"] = (
            level * swing * np.exp(rng.normal(0, 0.3, len(steps))) / 2
        ).astype(np.float32)
    cols["grad_norm"] = np.sqrt(
        sum(cols[f"grad_norm_{n}"].astype(np.float64) ** 2 for n in results.GRAD_LAYERS)
    ).astype(np.float32)
    if diverged:
        cols["loss"][-1] = np.inf
        cols["grad_norm"][-1] = np.nan
    step_cols.append(cols)
    if probe_every:
        for step in steps[steps % probe_every == 0]:
            lmin = 1.5 - 0.001 * step + rng.normal(0, 0.02)
            spread = (0.2 if has_bn else 0.6) * np.exp(rng.normal(0, 0.2))
            # the curvature's share; drawn from no generator, so the other numbers stay as they were
            dev = (0.01 if has_bn else 0.05) * (1 + 0.2 * np.sin(step + seed))
            for layer in results.PROBE_LAYERS:
                probe_rows.append(
                    dict(
                        trial_id=tid,
                        step=int(step),
                        epoch=epoch,
                        layer=layer,
                        ics_l2=float(np.exp(rng.normal(0 if has_bn else 0.5, 0.2))),
                        ics_cos=float(np.clip(rng.normal(0.3 if has_bn else 0.5, 0.1), -1, 1)),
                        loss_min=lmin,
                        loss_max=lmin + spread,
                        loss_dev_min=float(dev / 64),  # 1/2 eta^2 c over eta in [0.5, 4] lr
                        loss_dev_max=float(dev),
                        weight_norm=float(np.e * (1 + 0.001 * step)),
                        grad_pred=float(spread * 2),
                        beta_smooth=float(spread * 10),
                    )
                )
    return epoch_rows[0], layer_rows, step_cols[0], probe_rows


def _params(norm: str) -> tuple[str, ...]:
    return results.VARIANTS[norm].params if norm in results.VARIANTS else ()


def _write(out, tid, epoch_rows, layer_rows, step_cols, probe_rows, write) -> None:
    if probe_rows:
        write(out, "probes", tid, results.to_arrow("probes", probe_rows))
    steps = {k: np.concatenate([c[k] for c in step_cols]) for k in step_cols[0]}
    steps["trial_id"] = [tid] * len(steps["step"])
    write(out, "steps", tid, results.to_arrow("steps", steps))
    write(out, "layers", tid, results.to_arrow("layers", layer_rows))
    write(out, "epochs", tid, results.to_arrow("epochs", epoch_rows))


def _write_compacted(out, table: str, tid: str, rows) -> None:
    """A whole trial's rows of ``table`` as the compacted file (what compact_trial writes)."""
    results.write_atomic(results.sort_rows(table, rows),
                         results.table_path(out, table, tid))


def _histogram(mean: float, var: float, count: int, bins: int) -> list[int]:
    """Counts of a normal(mean, var) over equal bins of [-8, 8], outer bins holding the tails."""
    from math import erf, sqrt

    edges = np.linspace(-8.0, 8.0, bins + 1)
    sd = sqrt(max(var, 1e-12))
    cdf = np.array([0.5 * (1 + erf((e - mean) / (sd * sqrt(2)))) for e in edges])
    cdf[0], cdf[-1] = 0.0, 1.0
    return [int(round(c)) for c in np.diff(cdf) * count]
