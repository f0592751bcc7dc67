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
#: Those of them that are categorical on the rows, of the values the rows hold.
_CATEGORY_COLUMNS = frozenset({"status", "norm", "dataset"})


def orphan_notice(table: str, rows: int, missing: Sequence[str]) -> str:
    """The notice for ``rows`` rows of ``table`` whose trials (``missing``) have no trials row."""
    return (f"{table}: {rows} rows of {len(missing)} trial(s) without a trials row "
            f"were ignored ({first_few(list(missing), 5)})")


def join_source(trials: pd.DataFrame) -> pd.DataFrame:
    """``trials`` with the columns ``attach`` makes categorical already so: for a table
    attached in many parts (the steps table, a trial at a time), converted once."""
    return trials.assign(**{c: trials[c].astype("category") for c in _CATEGORY_COLUMNS if c in trials})


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
    codes = ids.codes.to_numpy()
    # the trials the rows hold (a handful; one needs no sort of the codes)
    used_trials = pos[np.unique(codes)] if len(ids.categories) > 1 else pos[:1]
    columns = {}
    for col in JOIN_COLUMNS:
        source = trials[col]
        if col in _CATEGORY_COLUMNS and not isinstance(source.dtype, pd.CategoricalDtype):
            source = source.astype("category")
        if isinstance(source.dtype, pd.CategoricalDtype):
            # through the codes: a per-row string column and its factorising cost ~25x more
            values = _present_categories(source, row_pos, used_trials) if col in _CATEGORY_COLUMNS \
                else pd.Categorical.from_codes(source.cat.codes.to_numpy()[row_pos], dtype=source.dtype)
            columns[col] = values
        else:
            columns[col] = source.to_numpy()[row_pos]
    df = df.reset_index(drop=True)
    existing = [c for c in columns if c in df.columns]  # replaced where they are, as df[c] = does
    if existing:
        df = df.assign(**{c: columns.pop(c) for c in existing})
    return pd.concat([df, pd.DataFrame(columns, index=df.index)], axis=1)


def _present_categories(source: pd.Series, row_pos: np.ndarray, used_trials: np.ndarray) -> pd.Categorical:
    """``source`` (categorical) at ``row_pos``, its categories only those the rows hold, as
    ``astype("category")`` of the values gives them (found from the few ``used_trials``)."""
    if not len(row_pos):
        return pd.Categorical(np.empty(0, dtype=object))
    codes = source.cat.codes.to_numpy()
    present = np.unique(codes[used_trials[used_trials >= 0]])
    present = present[present >= 0]
    remap = np.full(len(source.cat.categories) + 1, -1, dtype=codes.dtype)
    remap[present] = np.arange(len(present))
    return pd.Categorical.from_codes(remap[codes[row_pos]],
                                     dtype=pd.CategoricalDtype(source.cat.categories[present]))
