"""What a study lacks, in words for the index page: planned trials that have not started,
runs still going or stopped, runs with fewer epochs than planned, failed and diverged runs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.cli import first_few


def note_not_started(config: dict, trials: pd.DataFrame, notices: list[str], prefix: str = "") -> None:
    """Trials the sweep planned (study.json ``trial_ids``) that have no trials row yet."""
    planned = config.get("trial_ids")
    if not isinstance(planned, list):
        return
    started = set(trials["trial_id"].astype(str))
    missing = [str(t) for t in planned if str(t) not in started]
    if missing:
        notices.append(
            f"{prefix}{len(missing)} of the study's {len(planned)} planned trials have not started: "
            + first_few(missing, 6)
        )


def note_incomplete(trials: pd.DataFrame, epochs: pd.DataFrame, notices: list[str]) -> None:
    """Runs unfinished, short of epochs, failed, diverged or without epoch rows."""
    done_epochs = epochs.groupby("trial_id", observed=True)["epoch"].max()
    done_epochs.index = done_epochs.index.astype(str)
    have = trials["trial_id"].map(done_epochs).fillna(0).astype(int).to_numpy()
    want = trials["epochs"].fillna(0).astype(int).to_numpy()

    def describe(mask: np.ndarray, extra: str = "") -> str:
        items = [
            f"{tid} ({h}/{w} epochs{extra})"
            for tid, h, w in zip(trials["trial_id"][mask], have[mask], want[mask], strict=True)
        ]
        return first_few(items, 6)

    status = trials["status"].to_numpy()
    running = status == "running"
    if running.any():
        notices.append(
            f"{int(running.sum())} trial(s) unfinished (running, or stopped: the sweep's --resume "
            "finishes them); their curves end early and they are "
            f"not in the accuracy means: {describe(running)}"
        )
    short = (status == "done") & (have < want)
    if short.any():
        notices.append(
            f"{int(short.sum())} trial(s) marked done have fewer epochs than configured: "
            f"{describe(short)}"
        )
    errors = trials[status == "error"]
    if len(errors):
        msgs = [
            f"{tid}: {str(err).splitlines()[0] if isinstance(err, str) and err else 'no message'}"
            for tid, err in zip(errors["trial_id"], errors["error"], strict=True)
        ]
        notices.append(
            f"{len(errors)} trial(s) failed with an error and are left out: "
            + first_few(msgs, 5, sep="; ")
        )
    diverged = int((status == "diverged").sum())
    if diverged:
        notices.append(
            f"{diverged} trial(s) diverged (a non-finite loss); they are counted in the accuracy "
            "table and left out of the means and curves"
        )
    no_rows = (have == 0) & (status != "error")
    if no_rows.any():
        notices.append(f"{int(no_rows.sum())} trial(s) have no epoch rows yet")
