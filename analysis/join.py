"""The trial columns copied onto the rows of the per-trial tables (``JOIN_COLUMNS``), so that
a figure can group by them without another join; rows of trials without a trials row are
left out and said so."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from common.cli import first_few

#: Trial columns copied onto every row of the per-trial tables.
JOIN_COLUMNS: tuple[str, ...] = ("variant", "norm", "noise", "lr", "seed", "dataset", "status")


def orphan_notice(table: str, rows: int, missing: Sequence[str]) -> str:
    """The notice for ``rows`` rows of ``table`` whose trials (``missing``) have no trials row."""
    return (f"{table}: {rows} rows of {len(missing)} trial(s) without a trials row "
            f"were ignored ({first_few(list(missing), 5)})")


def attach(df: pd.DataFrame, trials: pd.DataFrame, table: str, notices: list[str]) -> pd.DataFrame:
    """Copy the trial columns onto ``df`` through the trial_id codes (no row-wise merge)."""
    ids = df["trial_id"].cat
    pos = np.append(pd.Index(trials["trial_id"]).get_indexer(ids.categories), -1)
    row_pos = pos[ids.codes.to_numpy()]
    orphan = row_pos < 0
    if orphan.any():
        missing = sorted(set(df["trial_id"][orphan].astype(str)))
        notices.append(orphan_notice(table, int(orphan.sum()), missing))
        df = df[~orphan]
        row_pos = row_pos[~orphan]
    df = df.reset_index(drop=True)
    for col in JOIN_COLUMNS:
        source = trials[col]
        if isinstance(source.dtype, pd.CategoricalDtype):
            df[col] = pd.Categorical.from_codes(
                source.cat.codes.to_numpy()[row_pos], dtype=source.dtype
            )
        else:
            df[col] = source.to_numpy()[row_pos]
    for col in ("status", "norm", "dataset"):
        df[col] = df[col].astype("category")
    return df
