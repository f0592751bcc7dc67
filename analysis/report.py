"""What one run of ``python -m analysis.figures`` is told and what it wrote: its validated
options, the report of figures, tables and notices, and the index page that shows them all
with the study's settings (``index.md`` and ``index.html``)."""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import bands
from analysis.labels import format_number
from analysis.load import Study

FORMATS: tuple[str, ...] = ("png", "pdf")
NO_NOTICES = "none: every figure was drawn from complete runs."


class Skip(Exception):
    """The study lacks what a figure or table needs; the message says what."""


@dataclass(frozen=True)
class StepWindow:
    """The training steps ``start <= step < end`` (``end`` None: to the last): the steps the
    probe summaries are over."""

    start: int = 0
    end: int | None = None

    @classmethod
    def parse(cls, text: str) -> StepWindow:
        """``START:END``, ``START:`` or ``:END`` (whole steps, START < END); raises ValueError
        with the one line the command prints."""
        start, sep, end = text.partition(":")
        try:
            if not sep:
                raise ValueError
            window = cls(int(start) if start.strip() else 0, int(end) if end.strip() else None)
        except ValueError:
            raise ValueError(f"{text!r}: give a step window START:END (whole steps, either may be "
                             "left out: 1000:, :500)") from None
        if window.start < 0 or (window.end is not None and window.end <= window.start):
            raise ValueError(f"{text!r}: the window needs 0 <= START < END")
        return window

    @property
    def label(self) -> str:
        """As given on the command line (``all`` for every step)."""
        if self.start == 0 and self.end is None:
            return "all"
        return f"{self.start if self.start else ''}:{'' if self.end is None else self.end}"

    @property
    def words(self) -> str:
        if self.end is None:
            return "every step" if self.start == 0 else f"the steps from {self.start} on"
        return f"steps {self.start} to {self.end - 1}"

    def holds(self, steps: np.ndarray) -> np.ndarray:
        """Which of ``steps`` (an array) are in the window."""
        inside = steps >= self.start
        return inside if self.end is None else inside & (steps < self.end)


@dataclass
class Options:
    """The command line, validated."""

    results: Path
    out: Path
    method: str = "t"
    level: float = 0.95
    lr: float | None = None
    lr_is_default: bool = True
    smooth: int = 100
    formats: tuple[str, ...] = FORMATS
    reps: int = 2000
    window: StepWindow = StepWindow()

    def estimate(self, frame: pd.DataFrame, by: list[str], x: str, value: str) -> pd.DataFrame:
        """``bands.get_interval_estimates`` with this run's interval method, level and resamples."""
        return bands.get_interval_estimates(frame, by, x, value, method=self.method,
                                            confidence_interval_size=self.level, reps=self.reps)


@dataclass
class Report:
    """What was written and what was not, for the index page."""

    figures: list[tuple[str, str, str]] = field(default_factory=list)  # name, title, caption
    notices: list[str] = field(default_factory=list)
    tables: list[tuple[str, str, list[str]]] = field(default_factory=list)  # heading, md, files
    data_files: list[tuple[str, str]] = field(default_factory=list)  # name, what it holds

    def skipped(self, name: str, why: Skip) -> None:
        """A figure or table the study lacks the data for: a notice, printed and on the index."""
        self.notices.append(f"{name} skipped: {why}")
        print(f"notice: {name} skipped: {why}")


def _config_items(study: Study, opts: Options) -> list[tuple[str, str]]:
    t = study.trials
    status = t["status"].value_counts()
    items = [
        ("results folder" + ("s" if len(study.paths) > 1 else ""), ", ".join(map(str, study.paths))),
        ("dataset(s)", ", ".join(study.datasets)),
        ("trials", f"{len(t)} (" + ", ".join(f"{s} {int(k)}" for s, k in status.items()) + ")"),
        ("variants", ", ".join(study.variants)),
        ("learning rates", ", ".join(format_number(x) for x in study.lrs)),
        ("seeds", ", ".join(str(int(s)) for s in sorted(t["seed"].dropna().unique()))),
        (
            "seeds per variant × lr",
            ", ".join(
                str(int(k))
                for k in sorted(set(t.groupby(["variant", "lr"], observed=True).size().tolist()))
            ),
        ),
    ]
    for col, words in (
        ("epochs", "epochs"),
        ("batch_size", "batch size"),
        ("momentum", "momentum"),
        ("noise_scope", "noise scope"),
        ("grad_every", "gradient norms every k steps"),
        ("probe_every", "probes every N steps"),
    ):
        if col in t and t[col].notna().any():
            items.append((words, ", ".join(str(v) for v in sorted(t[col].dropna().unique()))))
    items += [
        ("intervals", f"{bands.method_label(opts.method, opts.level, opts.reps)} across seeds"),
        (
            "figures 1–3, histograms, probes at lr",
            format_number(opts.lr) + (" (smallest in the study)" if opts.lr_is_default else ""),
        ),
        ("gradient smoothing", f"{opts.smooth} steps"),
        ("probe summaries over", opts.window.words),
    ]
    for label, config in zip(study.labels, study.configs, strict=True):
        where = "study.json" if len(study.paths) == 1 else f"{label}/study.json"
        for key, value in config.items():
            inner = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in inner:
                name = f"{where}: {key}" + (f".{sub}" if sub is not None else "")
                items.append((name, _short_json(v)))
    return items


def _short_json(value) -> str:
    """A study.json value in one short line (a list of records is only counted)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return f"{len(value)} entries (see study.json)"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 200 else text[:197] + "…"


def write_index(study: Study, opts: Options, report: Report) -> Path:
    """index.md and index.html: every figure and table, with settings and notices."""
    image = "png" if "png" in opts.formats else opts.formats[0]
    items = _config_items(study, opts)
    md = [f"# BatchNorm study: {study.name}", "", "## Configuration", ""]
    md += [f"- **{k}**: {v}" for k, v in items]
    md += ["", "## Notices", ""]
    md += [f"- {n}" for n in report.notices] or [f"- {NO_NOTICES}"]
    for heading, table_md, files in report.tables:
        md += ["", f"## {heading}", "", table_md, "Files: " + ", ".join(f"[{f}]({f})" for f in files), ""]
    if report.data_files:
        md += ["", "## Data files", ""] + [f"- [{f}]({f}): {what}" for f, what in report.data_files] + [""]
    for name, title, caption in report.figures:
        files = ", ".join(f"[{fmt.upper()}]({name}.{fmt})" for fmt in opts.formats)
        link = f"![{title}]({name}.png)" if image == "png" else f"[{title}]({name}.{image})"
        md += [f"## {title}", "", link, "", caption, "", files, ""]
    (opts.out / "index.md").write_text("\n".join(md))

    e = html.escape
    page = [
        "<!doctype html>",
        "<html><head><meta charset='utf-8'>",
        f"<title>BatchNorm study: {e(study.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}.caption{color:#444;font-size:90%}"
        "</style></head><body>",
        f"<h1>BatchNorm study: {e(study.name)}</h1>",
        "<h2>Configuration</h2><ul>",
        *(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in items),
        "</ul><h2>Notices</h2><ul>",
        *(f"<li>{e(n)}</li>" for n in report.notices),
        *([] if report.notices else [f"<li>{NO_NOTICES}</li>"]),
        "</ul>",
    ]
    for heading, table_md, files in report.tables:
        page += [f"<h2>{e(heading)}</h2>", _md_table_to_html(table_md),
                 "<p>Files: " + ", ".join(f"<a href='{e(f)}'>{e(f)}</a>" for f in files) + "</p>"]
    if report.data_files:
        page += ["<h2>Data files</h2><ul>",
                 *(f"<li><a href='{e(f)}'>{e(f)}</a>: {e(what)}</li>" for f, what in report.data_files),
                 "</ul>"]
    for name, title, caption in report.figures:
        files = ", ".join(f"<a href='{e(name)}.{fmt}'>{fmt.upper()}</a>" for fmt in opts.formats)
        shown = (
            f"<img src='{e(name)}.png' alt='{e(title)}'>"
            if image == "png"
            else f"<a href='{e(name)}.{image}'>{e(title)}</a>"
        )
        page += [
            f"<h2>{e(title)}</h2>",
            shown,
            f"<p class='caption'>{e(caption)}</p>",
            f"<p>{files}</p>",
        ]
    page.append("</body></html>")
    (opts.out / "index.html").write_text("\n".join(page) + "\n")
    return opts.out / "index.html"


def _md_table_to_html(md: str) -> str:
    lines = md.strip().splitlines()
    rows = [line for line in lines if line.startswith("|")]
    notes = [line for line in lines if line and not line.startswith("|")]
    out = ["<table>"]
    for i, line in enumerate(rows):
        if i == 1:
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        tag = "th" if i == 0 else "td"
        out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
    out.append("</table>")
    out += [f"<p class='caption'>{html.escape(n)}</p>" for n in notes]
    return "\n".join(out)
