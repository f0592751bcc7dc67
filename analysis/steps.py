"""The steps table, streamed: with ~2,500 rows an epoch per trial it is the table that outgrows
memory as a study grows (issue 24), so it is read in batches of ~BATCH_ROWS rows (a few trials,
only the columns asked for) and its consumers (figure 3, the gradient-stability table) take
each trial's rows in turn instead of the whole table.

Trials come in the order the whole table would hold them (its files' order), so that per-trial
results concatenate into what the whole-table computation gave.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd
import pyarrow as pa

from analysis.folder import read_table, to_pandas, trial_of, trial_rows
from analysis.join import attach, join_source, orphan_notice
from study import results

#: Rows of the steps table read and joined at once (~10 full-size trials, ~20 MB).
BATCH_ROWS = 250_000
#: Reads under way while one is used (each ~``BATCH_ROWS`` rows in memory).
READS_AHEAD = 1
#: Columns every read of the steps table includes, besides those asked for.
KEY_COLUMNS: tuple[str, ...] = ("trial_id", "step", "epoch")


@dataclass
class StepTable:
    """The steps table of a study, read lazily: ``frames`` yields one trial's rows at a time,
    ``frame`` the whole table (for small studies and tests)."""

    groups: dict[str, list[Path]]  # a trial's files (a compacted file, its parts), in read order
    columns: tuple[str, ...]  # the columns read: ``KEY_COLUMNS`` and the steps columns asked for
    trials: pd.DataFrame  # the study's trials, whose columns are copied onto every row
    rows: dict[str, int] = field(default_factory=dict)  # trial id -> its rows (with a trials row)
    holds: dict[str, tuple[str, ...]] = field(default_factory=dict)  # group -> the trials it holds
    batch_rows: int = BATCH_ROWS  # rows read and joined at once (``_reads``)

    @cached_property
    def _join(self) -> pd.DataFrame:
        """``trials`` ready to attach to each trial's rows (``analysis.join.join_source``)."""
        return join_source(self.trials)

    def __contains__(self, column: str) -> bool:
        return column in self.columns

    @property
    def empty(self) -> bool:
        return not any(self.rows.values())

    @property
    def trial_ids(self) -> list[str]:
        """The trials with rows, in the table's order."""
        return [t for t, n in self.rows.items() if n]

    def frames(self, ids: Iterable[str] | None = None,
               columns: Sequence[str] | None = None) -> Iterator[pd.DataFrame]:
        """Each trial's rows (of ``ids``, default all) with the trial columns, one DataFrame a
        trial, in the table's order; ``columns``: the steps columns to read (default all read).
        A frame's categorical columns may list values of other trials read with it."""
        wanted = None if ids is None else set(ids)
        cols = list(dict.fromkeys([*KEY_COLUMNS, *(self.columns if columns is None else columns)]))
        reads = iter(self._reads(wanted))
        # the next read's files decode on a thread (pyarrow lets go of the GIL) while this one's
        # rows are used: a read is ~half a trial's time in the analysis
        with ThreadPoolExecutor(1) as pool:
            ahead = deque()
            for _ in range(READS_AHEAD):
                ahead.extend((r, pool.submit(_read, r, cols)) for r in itertools.islice(reads, 1))
            while ahead:
                (batch, whole), read = ahead.popleft()
                ahead.extend((r, pool.submit(_read, r, cols)) for r in itertools.islice(reads, 1))
                parts = read.result()
                df = attach(to_pandas(pa.concat_tables(parts)), self._join, "steps", [])
                if whole:  # each part one trial's rows
                    start = 0
                    for part in parts:
                        if part.num_rows:
                            yield df.iloc[start:start + part.num_rows].reset_index(drop=True)
                        start += part.num_rows
                    continue
                if wanted is not None:
                    df = df[df["trial_id"].astype(str).isin(wanted)].reset_index(drop=True)
                yield from _by_trial(df)

    def _reads(self, wanted: set[str] | None) -> Iterator[tuple[list[list[Path]], bool]]:
        """The files to read, in the table's order, a read at a time: (a list of groups' files,
        whether each group is one trial with a trials row). Such groups are read ~``batch_rows``
        rows together, as reading, converting and joining costs ~3 ms a call whatever its size;
        any other group alone, its rows split by trial after the join."""
        batch: list[list[Path]] = []
        rows = 0
        for group, paths in self.groups.items():
            held = self.holds.get(group, (group,))
            if wanted is not None and not wanted.intersection(held):
                continue
            if len(held) == 1 and held[0] in self.rows:  # the usual
                batch.append(paths)
                rows += self.rows[held[0]]
                if rows >= self.batch_rows:
                    yield batch, True
                    batch, rows = [], 0
                continue
            if batch:
                yield batch, True
                batch, rows = [], 0
            yield [paths], False
        if batch:
            yield batch, True

    def frame(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The whole table as one DataFrame (every row in memory: for small studies)."""
        cols = list(dict.fromkeys([*KEY_COLUMNS, *(self.columns if columns is None else columns)]))
        arrow = read_table([p for paths in self.groups.values() for p in paths], "steps", cols)
        return attach(to_pandas(arrow), self._join, "steps", [])

    def select(self, ids: set[str]) -> StepTable:
        """The part of the table of trials ``ids`` (their trials rows kept for the join)."""
        groups = {g: p for g, p in self.groups.items() if ids.intersection(self.holds.get(g, (g,)))}
        return StepTable(groups, self.columns, self.trials, {t: n for t, n in self.rows.items() if t in ids},
                         {g: self.holds.get(g, (g,)) for g in groups}, self.batch_rows)


def _read(item: tuple[list[list[Path]], bool], cols: list[str]) -> list[pa.Table]:
    """The steps rows of each group of files in a ``StepTable._reads`` item."""
    return [read_table(paths, "steps", cols) for paths in item[0]]


def _by_trial(df: pd.DataFrame) -> Iterator[pd.DataFrame]:
    """``df``'s rows per trial (one file's rows are normally all of one trial's)."""
    ids = df["trial_id"].cat.remove_unused_categories()
    if len(ids.cat.categories) <= 1:
        if len(df):
            yield df
        return
    for _, rows in df.groupby(ids, observed=True, sort=True):
        yield rows.reset_index(drop=True)


def read_steps(paths: Sequence[Path], trials: pd.DataFrame, columns: Sequence[str] | None,
               notices: list[str]) -> StepTable:
    """The steps table of ``paths`` (every folder's steps files, in the order the whole table is
    read) joined with ``trials``; only each trial's rows are counted now (from the footer where
    a trial has one compacted file), to note those without a trials row, as ``analysis.load``
    does for every table."""

    groups: dict[str, list[Path]] = {}
    for p in paths:
        groups.setdefault(trial_of(p), []).append(p)
    names = list(results.TABLES["steps"].names) if columns is None else list(columns)
    cols = tuple(dict.fromkeys([*KEY_COLUMNS, *names]))
    table = StepTable(groups, cols, trials)
    for group, found in groups.items():
        counts = trial_rows(found, "steps")
        table.holds[group] = tuple(counts)
        for trial_id, n in counts.items():
            table.rows[trial_id] = table.rows.get(trial_id, 0) + n
    known = set(trials["trial_id"])
    missing = {t: n for t, n in table.rows.items() if t not in known}
    if missing:  # the notice ``analysis.load`` gives for the other tables' rows
        notices.append(orphan_notice("steps", sum(missing.values()), sorted(missing)))
    table.rows = {t: n for t, n in table.rows.items() if t in known}
    return table
