"""One figure from its grid of panels to its files: every figure is a :class:`Sheet` that
estimates and draws the bands of its panels, then ``save`` puts the title, legend and caption
outside the grid and writes one file per format."""

from __future__ import annotations

import math
import textwrap

import matplotlib.pyplot as plt
import pandas as pd

from analysis.captions import caption
from analysis.load import Study
from analysis.panel import draw_bands
from analysis.report import Options, Report, Skip
from analysis.series import variants_in
from analysis.style import VariantStyle, legend_handles

DPI = 150


def require(frame: pd.DataFrame, why: str) -> pd.DataFrame:
    """``frame``; a figure without rows to draw is skipped, ``why`` saying what it lacks."""
    if frame.empty:
        raise Skip(why)
    return frame


class Sheet:
    """One figure while it is drawn: its ``axes`` (always a 2-d grid) and the estimates behind
    its bands, which its caption describes."""

    def __init__(self, study: Study, opts: Options, styles: dict[str, VariantStyle], report: Report,
                 nrows: int, ncols: int, width: float, height: float, **subplots) -> None:
        self.study, self.opts, self.styles, self.report = study, opts, styles, report
        self.fig, self.axes = plt.subplots(
            nrows, ncols, figsize=(width, height), layout="constrained", squeeze=False, **subplots
        )
        self.estimates: list[pd.DataFrame] = []

    def estimate(self, frame: pd.DataFrame, by: list[str], x: str, value: str) -> pd.DataFrame:
        """The mean and interval across seeds of ``value`` per ``by`` and ``x`` (``Options.estimate``),
        kept for the caption."""
        est = self.opts.estimate(frame, by, x, value)
        self.estimates.append(est)
        return est

    def draw(self, ax, est: pd.DataFrame, x: str, markers: bool, **kw) -> None:
        """``est``'s mean lines and bands on ``ax`` (``panel.draw_bands``) in the study's styles."""
        draw_bands(ax, est, self.styles, x, markers, **kw)

    def legend(self, frame: pd.DataFrame, markers: bool) -> list:
        """A legend entry for each variant ``frame`` holds rows of."""
        return legend_handles(self.styles, variants_in(frame), markers)

    def save(self, name: str, title: str, *words: str, legend: list | None = None) -> None:
        """Title, legend and caption (the estimates' bands, then ``words``) outside the axes
        grid, then save in each format."""
        fig = self.fig
        opts = self.opts
        est = pd.concat(self.estimates) if self.estimates else None
        text = caption(self.study, opts, est, *words)
        width, height = fig.get_size_inches()
        fig.text(0.5, 1 - 0.08 / height, title, ha="center", va="top", fontsize=12, weight="bold")
        top = 0.45
        if legend:
            ncols = min(len(legend), max(1, int(width // 2.2)))
            rows = math.ceil(len(legend) / ncols)
            fig.legend(
                handles=legend,
                loc="upper center",
                bbox_to_anchor=(0.5, 1 - 0.36 / height),
                ncols=ncols,
                frameon=False,
                fontsize=9,
            )
            top += 0.26 * rows + 0.05
        lines = []
        for para in text.split("\n"):
            lines += textwrap.wrap(para, int(width * 72 / (8 * 0.58)))
        bottom = (len(lines) * 8 * 1.3 / 72 + 0.2) / height
        fig.get_layout_engine().set(rect=(0, bottom, 1, 1 - bottom - top / height))
        fig.text(0.01, bottom / 2, "\n".join(lines), fontsize=8, va="center", ha="left")
        paths = []
        for fmt in opts.formats:
            path = opts.out / f"{name}.{fmt}"
            fig.savefig(path, dpi=DPI)
            paths.append(path.name)
            fig.set_layout_engine("none")  # positions are final; don't lay out again per format
        plt.close(fig)
        self.report.figures.append((name, title, text))
        print(f"wrote {', '.join(str(opts.out / p) for p in paths)}")
