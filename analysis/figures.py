"""``python -m analysis.figures RESULTS``: the study's figures, tables and index page.

Reads a results folder (docs/design.md, "Results layout"), or several that hold parts of one
study (``analysis.load.load_studies``), and writes into ``RESULTS/figures`` (or ``--out``) the
figures (docs/design.md, "Analysis outputs") with confidence bands across seeds (``FIGURES``,
drawn by ``analysis.plots_activations``, ``analysis.plots_training`` and
``analysis.plots_probes``), the accuracy and gradient-stability tables (``analysis.tables``),
the paired comparisons between variants (``analysis.comparisons``), the comparison with the
seed notebook's published accuracies where the study ran at its settings
(``analysis.seed_comparison``), each run's per-batch spread of the activation moments
(``analysis.batch_spread``), the probe and weight-norm summaries (``analysis.probe_summary``),
and ``index.md`` / ``index.html`` showing them all with the study's settings
(``analysis.report``).
A figure whose data the study lacks is skipped with a notice; bad input exits with status 2
and one line on stderr, before anything is written.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from common.cli import Parser, python_interrupts, quiet_until_main, unwritable

if __name__ == "__main__":  # Ctrl-C while matplotlib and pandas load: one line, not a traceback
    quiet_until_main("python -m analysis.figures")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from analysis import bands  # noqa: E402
from analysis.batch_spread import write_batch_spread  # noqa: E402
from analysis.comparisons import comparisons, run_values, write_comparisons  # noqa: E402
from analysis.fetch import FetchError, local_copy  # noqa: E402
from analysis.folder import ResultsError  # noqa: E402
from analysis.labels import format_number  # noqa: E402
from analysis.load import Study, load_studies, select_norms  # noqa: E402
from analysis.noise_eval_summary import write_noise_eval_summary  # noqa: E402
from analysis.plots_activations import fig_activations, fig_histograms, fig_noisy_bn  # noqa: E402
from analysis.plots_probes import fig_probes_ics, fig_probes_landscape  # noqa: E402
from analysis.plots_training import (  # noqa: E402
    STEP_PANELS,
    fig_accuracy_differences,
    fig_gradients,
    fig_lr_sensitivity,
)
from analysis.probe_summary import write_probe_window, write_weight_norms  # noqa: E402
from analysis.report import FORMATS, Options, Report, Skip, StepWindow, write_index  # noqa: E402
from analysis.seed_comparison import seed_comparison, write_seed_comparison  # noqa: E402
from analysis.style import variant_styles  # noqa: E402
from analysis.tables import (  # noqa: E402
    accuracy_table,
    stability_runs,
    stability_table,
    write_accuracy_table,
    write_stability_table,
)
from study import results  # noqa: E402

PROG = "python -m analysis.figures"
#: Every figure, by the name of its files, in the order they are drawn and listed.
FIGURES = (
    ("fig1_activations", fig_activations),
    ("fig2_noisy_bn", fig_noisy_bn),
    ("fig3_gradients", fig_gradients),
    ("fig_accuracy_differences", fig_accuracy_differences),
    ("fig_lr_sensitivity", fig_lr_sensitivity),
    ("fig_histograms", fig_histograms),
    ("fig_probes_ics", fig_probes_ics),
    ("fig_probes_landscape", fig_probes_landscape),
)


def _number(kind: type, ok, must: str):
    """An argparse type: parse ``kind`` and check ``ok``, with one clear message either way."""
    noun = "a whole number" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} must be {must}")
        return value

    return parse


_level = _number(float, lambda v: 0 < v < 1, "between 0 and 1 (e.g. 0.95)")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_positive_int = _number(int, lambda v: v >= 1, "at least 1")


def _formats(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(x.strip().lower() for x in text.split(",") if x.strip()))
    bad = [x for x in items if x not in FORMATS]
    if not items or bad:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a comma-separated list of {', '.join(FORMATS)}"
        )
    return items


def _window(text: str) -> StepWindow:
    try:
        return StepWindow.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m analysis.figures``."""
    p = Parser(
        prog=PROG,
        name=PROG,
        description="Draw the BatchNorm study's figures, accuracy and gradient-stability tables "
        "and index page from a "
        "results folder (RESULTS/<table>/<trial_id>.parquet).",
    )
    p.add_argument("results", metavar="RESULTS", nargs="+",
                   help="the results folder written by the sweep (a local path, or a URI such as "
                   "s3://BUCKET/PREFIX: copied to ~/.cache/bnstudy first); several folders that hold parts "
                   "of one study (other seeds or learning rates, same settings) are drawn as one, "
                   "into --out")
    p.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=None,
        help="where to write the figures (default: RESULTS/figures, or NAME-figures here for "
        "RESULTS at a URI; needed for several RESULTS)",
    )
    p.add_argument(
        "--ci",
        choices=bands.METHODS,
        default="t",
        help="interval across seeds: t = Student-t interval of the mean, bootstrap = "
        "percentile bootstrap of the mean, 2,000 seeded resamples (default: t)",
    )
    p.add_argument(
        "--level",
        type=_level,
        default=0.95,
        metavar="P",
        help="confidence level of the bands and table, in (0, 1) (default: 0.95)",
    )
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        metavar="LR",
        help="learning rate shown in figures 1-3, the histograms and the probes; "
        "must be one in the study (default: the smallest in the study)",
    )
    p.add_argument(
        "--smooth",
        type=_positive_int,
        default=100,
        metavar="N",
        help="moving-average window of the gradient-norm curves, in training steps (default: 100)",
    )
    p.add_argument(
        "--format",
        type=_formats,
        default=FORMATS,
        metavar="LIST",
        dest="formats",
        help="comma-separated figure formats among png, pdf (default: png,pdf)",
    )
    p.add_argument(
        "--window",
        type=_window,
        default=StepWindow(),
        metavar="START:END",
        help="training steps START <= step < END that probe_window.csv's per-run medians are "
        "over; either end may be left out (default: every probed step)",
    )
    p.add_argument(
        "--norms",
        type=_names,
        default=None,
        metavar="LIST",
        help="draw only the trials of these norms, comma-separated (e.g. none,batch,lp_batch: "
        "every setting of each), for a study with more variants than a figure shows legibly; "
        "drawn into RESULTS/figures-NORM-NORM... unless --out is given (default: every norm)",
    )
    return p


def _names(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of norms")
    return items


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad input, nothing written).

    Ctrl-C gives one line and status 130, not a traceback: it says whether anything was written.
    """
    python_interrupts()
    started: list[Path] = []  # the output folder, once writing into it has begun
    try:
        return _main(argv, started)
    except KeyboardInterrupt:
        plt.close("all")
        done = (
            f"the files written so far in {started[0]} are kept, but its index is not up to date"
            if started
            else "nothing was written"
        )
        sys.stderr.write(f"{PROG}: interrupted; {done}\n")
        return 130


def _main(argv: Sequence[str] | None, started: list[Path]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        if len(args.results) > 1 and args.out is None:
            raise ResultsError(f"{len(args.results)} results folders are drawn as one study into "
                               "--out DIR: give it")
        local = [local_copy(r) if results.storage.is_uri(r) else r for r in args.results]
        study = load_studies(local, step_columns=STEP_PANELS)
        if args.norms is not None:
            study = select_norms(study, args.norms)
    except (ResultsError, FetchError) as exc:
        sys.stderr.write(f"{PROG}: error: {_one_line(str(exc))}\n")
        return 2
    lrs = study.lrs
    if not lrs:
        sys.stderr.write(f"{PROG}: error: {study.name}: the trials table has no learning rate\n")
        return 2
    if args.lr is None:
        lr, lr_is_default = lrs[0], True
    else:
        match = [x for x in lrs if math.isclose(x, args.lr, rel_tol=1e-9)]
        if not match:
            sys.stderr.write(
                f"{PROG}: error: --lr {format_number(args.lr)} is not in the study (its learning "
                f"rates: {', '.join(format_number(x) for x in lrs)})\n"
            )
            return 2
        lr, lr_is_default = match[0], False
    if args.out is not None:
        out = Path(args.out)
    else:
        # a part of the study (--norms) gets its own folder beside the whole one's
        folder = "figures" if args.norms is None else f"figures-{'-'.join(args.norms)}"
        if results.storage.is_uri(args.results[0]):  # drawn here, beside where the command runs
            out = Path(f"{study.path.name}-{folder}").resolve()
        else:
            out = study.path / folder
    opts = Options(
        results=study.path,
        out=out,
        method=args.ci,
        level=args.level,
        lr=lr,
        lr_is_default=lr_is_default,
        smooth=args.smooth,
        formats=args.formats,
        window=args.window,
    )
    started.append(out)
    why = unwritable(out)
    if why:
        sys.stderr.write(f"{PROG}: error: cannot write to {out}: {why}\n")
        return 2
    try:
        run(study, opts)
    except OSError as exc:  # e.g. a folder where a figure's file should go, or a full disk
        where = f" {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"{PROG}: error: cannot write{where}: {_one_line(exc.strerror or exc)}\n")
        return 2
    return 0


def run(study: Study, opts: Options) -> Report:
    """Draw everything the study allows into ``opts.out``; returns what was written."""
    report = Report(notices=list(study.notices))
    for notice in study.notices:
        print(f"notice: {notice}")
    styles = variant_styles(study.trials)
    write_accuracy_table(accuracy_table(study, opts), study, opts, report)
    stability = None
    try:
        stability = stability_runs(study)
        write_stability_table(*stability_table(study, opts, stability), study, opts, report)
    except Skip as why:
        report.skipped("gradient_stability", why)
    try:
        write_comparisons(*comparisons(run_values(study, stability), opts.level), study, opts, report,
                          stability[1] if stability is not None else None)
    except Skip as why:
        report.skipped("comparisons", why)
    for name, write in (("probe_window", write_probe_window), ("weight_norms", write_weight_norms),
                        ("noise_eval_summary", write_noise_eval_summary)):
        try:
            write(study, opts, report)
        except Skip as why:
            report.skipped(name, why)
    try:
        write_seed_comparison(seed_comparison(study, opts.level), study, opts, report)
    except Skip as why:
        report.skipped("seed_comparison", why)
    try:
        write_batch_spread(study, opts, report)
    except Skip as why:
        report.skipped("batch_spread", why)
    for name, draw in FIGURES:
        try:
            draw(study, opts, styles, report)
        except Skip as why:
            plt.close("all")
            report.skipped(name, why)
    index = write_index(study, opts, report)
    print(f"index: {index} (and index.md)")
    return report


if __name__ == "__main__":
    sys.exit(main())
