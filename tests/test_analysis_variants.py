"""The analysis draws any registered variant with no edit (issue 23, item 4), and ``--norms``
draws a part of a study with many variants: on a synthetic study of all six norms, the
accuracy table and the paired comparisons against BN are checked against the epochs files
read by hand."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from analysis import figures
from analysis.synthetic import write_synthetic_study
from study import results

VARIANTS = [("none", 0.0), ("batch", 0.0), ("noisy_batch", 1.0), ("lp_batch", 0.0), ("group", 0.0),
            ("layer", 0.0)]
#: Each variant's label, from the registry's definitions (p = 2 and 8 groups by default).
LABELS = ["no BN", "BN", "noisy BN (noise 1)", "ℓ2 BN", "GN (8 groups)", "LN"]
LR, SEEDS, EPOCHS = 1e-2, (0, 1), 2


@pytest.fixture(scope="module")
def six(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("six") / "study"
    write_synthetic_study(folder, variants=VARIANTS, lrs=(LR,), seeds=SEEDS, epochs=EPOCHS,
                          steps_per_epoch=20)
    code = figures.main([str(folder), "--format", "png"])
    return {"folder": folder, "code": code}


def final_train_acc(folder, norm: str, noise: float) -> np.ndarray:
    """Each seed's last-epoch train accuracy in percent, read from its own epochs file."""
    out = []
    for seed in SEEDS:
        rows = pd.read_parquet(results.table_path(folder, "epochs", results.trial_id(norm, noise, LR, seed)))
        out.append(100 * rows.loc[rows["epoch"] == EPOCHS, "train_acc"].item())
    return np.array(out)


def test_every_variant_is_tabled_and_compared_with_bn(six):
    assert six["code"] == 0
    out = six["folder"] / "figures"
    for name in ("fig1_activations", "fig3_gradients", "fig_accuracy_differences", "fig_histograms"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    table = pd.read_csv(out / "accuracy_table.csv")
    assert list(table["variant"]) == LABELS
    comps = pd.read_csv(out / "comparisons.csv")
    comps = comps[comps["metric"] == "train_acc"].set_index("pair")
    bn = final_train_acc(six["folder"], "batch", 0.0)
    for (norm, noise), label in zip(VARIANTS, LABELS, strict=True):
        acc = final_train_acc(six["folder"], norm, noise)
        assert table.set_index("variant").loc[label, "train_mean"] == pytest.approx(acc.mean(), rel=1e-12)
        if norm in ("lp_batch", "group", "layer"):
            row = comps.loc[f"{label} − BN"]
            assert (row["n"], row["method"]) == (2, "paired t")
            assert row["mean"] == pytest.approx((acc - bn).mean(), rel=1e-9)


def test_norms_flag_draws_a_part_beside_the_whole(six, tmp_path):
    folder = tmp_path / "study"
    shutil.copytree(six["folder"], folder)
    whole = (folder / "figures" / "accuracy_table.csv").read_bytes()
    assert figures.main([str(folder), "--norms", "none,lp_batch", "--format", "png"]) == 0
    part = folder / "figures-none-lp_batch"
    table = pd.read_csv(part / "accuracy_table.csv")
    assert list(table["variant"]) == ["no BN", "ℓ2 BN"]
    comps = pd.read_csv(part / "comparisons.csv")
    assert set(comps["pair"]) == {"ℓ2 BN − no BN"}
    spread = pd.read_csv(part / "batch_spread.csv")
    assert set(spread["norm"]) == {"none", "lp_batch"}
    assert "--norms" in (part / "index.md").read_text()
    assert (folder / "figures" / "accuracy_table.csv").read_bytes() == whole  # the whole is kept


def test_a_norm_the_study_lacks_is_refused_in_one_line(six, capsys):
    assert figures.main([str(six["folder"]), "--norms", "none,bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--norms bogus: not in the study" in err
    assert "its norms: none, batch, noisy_batch, lp_batch, group, layer" in err
    assert not (six["folder"] / "figures-none-bogus").exists()
