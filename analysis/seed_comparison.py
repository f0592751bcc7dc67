"""``seed_comparison.md`` and ``.csv``: the seed notebook's published train accuracies (one run
per variant) beside this study's runs at the seed's settings: their mean, its Student-t
interval, and the prediction interval for one new run, the interval a single run such as the
seed's is to be compared with (the interval of the mean narrows with n; one run's spread
does not)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from analysis.bands import t_interval
from analysis.labels import SCOPE_WORDS, datasets_words, format_number, percent_scale, variant_label
from analysis.load import Study
from analysis.report import Options, Report, Skip
from analysis.tables import _md_table, final_accuracies, run_lengths
from study import results

#: The seed notebook's final train accuracy in percent (the running average over its last
#: epoch), one run per variant, by norm.
SEED_TRAIN_ACC: dict[str, float] = {"none": 64.11, "batch": 70.64, "noisy_batch": 69.09}
#: The settings of the seed's runs: the ``seed`` preset of study/grid.py (the analysis cannot
#: import it; tests/test_analysis_seed.py checks that the two agree). Noise applies to noisy BN.
SEED_SETTINGS: dict[str, float | int | str] = dict(lr=1e-3, epochs=10, batch_size=16, noise=1.0,
                                                   noise_scope="layer")
COLUMNS = ["variant", "norm", "seed_train_acc", "n", "mean", "sd", "ci_lo", "ci_hi", "pi_lo", "pi_hi",
           "seed_in_pi", "seed_minus_mean", "level", "lr", "epochs", "batch_size", "noise", "noise_scope"]


def prediction_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The interval that one new draw from the values' normal population falls in with
    probability ``level``: mean ± t_{n−1} · s · √(1 + 1/n); NaN bounds where n < 2."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return (np.nan, np.nan)
    half = stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) * np.sqrt(1 + 1 / x.size)
    return (float(x.mean() - half), float(x.mean() + half))


def _settings_words() -> str:
    s = SEED_SETTINGS
    noisy = ", ".join(results.VARIANTS[n].label for n in SEED_TRAIN_ACC if n in results.NOISY_NORMS)
    return (f"lr {format_number(s['lr'])}, {s['epochs']} epochs, batch {s['batch_size']}; {noisy} at "
            f"noise {format_number(s['noise'])} {SCOPE_WORDS[str(s['noise_scope'])]}")


def seed_comparison(study: Study, level: float) -> pd.DataFrame:
    """One row per seed variant (``COLUMNS``): the seed's train accuracy beside this study's
    finished runs at the seed's settings (``SEED_SETTINGS``), n = 0 where it has none.
    Raises ``Skip`` where it has none of any variant."""
    final = final_accuracies(study)
    scale = percent_scale(final["train_acc"].to_numpy())
    trials = study.trials.assign(trial_id=study.trials["trial_id"].astype(str),
                                 epochs=run_lengths(study.trials).to_numpy())
    extra = [c for c in ("batch_size", "noise_scope") if c in trials]
    runs = final.merge(trials[["trial_id", "epochs", *extra]], on="trial_id")
    s = SEED_SETTINGS
    keep = ((runs["status"] == "done") & np.isclose(runs["lr"].astype(float), s["lr"], rtol=1e-9)
            & (runs["epochs"] == s["epochs"]))
    if "batch_size" in runs:
        keep &= runs["batch_size"] == s["batch_size"]
    noisy = runs["norm"].isin(results.NOISY_NORMS)
    setting = np.isclose(runs["noise"], s["noise"]) & (runs.get("noise_scope") == s["noise_scope"])
    keep &= np.where(noisy, setting, runs["noise"] == 0)
    runs = runs[keep]
    rows = []
    for norm, published in SEED_TRAIN_ACC.items():
        noisy_norm = norm in results.NOISY_NORMS
        noise, scope = (float(s["noise"]), str(s["noise_scope"])) if noisy_norm else (0.0, None)
        values = runs.loc[runs["norm"] == norm, "train_acc"].to_numpy(dtype=float) * scale
        values = values[np.isfinite(values)]
        mean, ci_lo, ci_hi = t_interval(values, level)
        pi_lo, pi_hi = prediction_interval(values, level)
        inside = bool(pi_lo <= published <= pi_hi) if np.isfinite(pi_lo) else None
        rows.append(dict(
            variant=variant_label(norm, noise, scope=scope), norm=norm, seed_train_acc=published,
            n=values.size,
            mean=mean, sd=float(values.std(ddof=1)) if values.size > 1 else np.nan, ci_lo=ci_lo,
            ci_hi=ci_hi, pi_lo=pi_lo, pi_hi=pi_hi, seed_in_pi=inside, seed_minus_mean=published - mean,
            level=level, lr=s["lr"], epochs=s["epochs"], batch_size=s["batch_size"],
            noise=noise, noise_scope=scope))
    table = pd.DataFrame(rows, columns=COLUMNS)
    if not table["n"].any():
        raise Skip(f"the study has no finished runs at the seed's settings ({_settings_words()})")
    return table


def _where(r) -> str:
    """Where the seed's run falls against our prediction interval, in one sentence."""
    if r.n == 0:
        return f"{r.variant}: this study has no finished run at the seed's settings."
    if r.seed_in_pi is None:
        return (f"{r.variant}: the seed's run ({r.seed_train_acc:.2f}%) against our one run "
                f"({r.mean:.2f}%): no interval from one run.")
    side = "inside" if r.seed_in_pi else ("below" if r.seed_train_acc < r.pi_lo else "above")
    return (f"{r.variant}: the seed's run ({r.seed_train_acc:.2f}%) lies {side} the "
            f"{r.level * 100:g}% prediction interval for one run of ours [{r.pi_lo:.2f}, "
            f"{r.pi_hi:.2f}] (n = {r.n}), {abs(r.seed_minus_mean):.2f} points "
            f"{'below' if r.seed_minus_mean < 0 else 'above'} our mean.")


def write_seed_comparison(table: pd.DataFrame, study: Study, opts: Options, report: Report) -> None:
    """The comparison as CSV (full precision) and Markdown, shown on the index page."""
    table.to_csv(opts.out / "seed_comparison.csv", index=False)
    level = f"{opts.level * 100:g}%"
    header = ["variant", "seed's run", f"ours: mean [{level} t interval] (n)",
              f"{level} prediction interval, one run", "seed's run inside"]

    def cells(r) -> list[str]:
        if r.n == 0:
            return [r.variant, f"{r.seed_train_acc:.2f}", "–", "–", "–"]
        ours = (f"{r.mean:.2f} [{r.ci_lo:.2f}, {r.ci_hi:.2f}] ({r.n})" if r.n > 1
                else f"{r.mean:.2f} (1)")
        pi = f"[{r.pi_lo:.2f}, {r.pi_hi:.2f}]" if r.n > 1 else "–"
        inside = "–" if r.seed_in_pi is None else ("yes" if r.seed_in_pi else "no")
        return [r.variant, f"{r.seed_train_acc:.2f}", ours, pi, inside]

    rows = list(table.itertuples(index=False))
    notes = [
        f"Final train accuracy in percent, the running average over the last epoch (the seed's "
        f"measure), at the seed's settings ({_settings_words()}); only finished runs. The seed "
        "notebook published one run per variant.",
        f"Ours: the mean over n runs and its {level} Student-t interval (whatever --ci). The "
        f"prediction interval, mean ± t(n−1)·s·√(1 + 1/n), is where one new run at these settings "
        f"falls with {level} probability if runs vary normally: the seed's single run is such a "
        "run, so it is compared with this interval, not with the interval of the mean.",
        " ".join(_where(r) for r in rows),
        f"{datasets_words(study.datasets)} Every number: seed_comparison.csv.",
    ]
    md_text = "\n".join(_md_table(header, [cells(r) for r in rows])) + "\n\n" + "\n\n".join(notes) + "\n"
    (opts.out / "seed_comparison.md").write_text(
        f"# The seed notebook's train accuracies beside this study's\n\n{md_text}")
    report.tables.append(("Comparison with the seed notebook", md_text,
                          ["seed_comparison.md", "seed_comparison.csv"]))
    print(f"wrote {opts.out / 'seed_comparison'}.md, .csv")
