"""study.noise_eval: noisy BN evaluated as trained and with its noise's mean scale."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch
from torch import nn

from study import noise_eval, results
from study.config import TrialConfig
from study.data import load_dataset
from study.model import NoisyBatchNorm2d, build_model, expected_scale
from study.train import STATE_FILE, RunOptions, run_trial


def test_expected_scale_is_the_mean_of_the_drawn_scales():
    """E[s] against the empirical mean of 2.4 M draws of s (its standard error is ~3e-4)."""
    for noise in (0.5, 2.0, 4.0):
        layer = NoisyBatchNorm2d(3000, noise=noise)
        layer.generator = torch.Generator().manual_seed(1)
        s, _ = layer.draw(torch.zeros(800, 3000, 1, 1, dtype=torch.float64))
        assert abs(s.mean().item() - (1 + noise / 8)) < 3e-3, noise
        assert expected_scale(noise) == 1 + noise / 8


def test_mean_scaled_multiplies_each_noisy_layer_by_its_expected_scale_in_eval():
    torch.manual_seed(0)
    layer = NoisyBatchNorm2d(5, noise=2.0)
    layer.running_mean.uniform_(-1, 1)
    layer.running_var.uniform_(0.5, 2)
    plain = nn.BatchNorm2d(5)
    plain.load_state_dict(layer.state_dict())
    layer.eval(), plain.eval()
    x = torch.randn(4, 5, 3, 3)
    model = nn.Sequential(layer)
    with noise_eval.mean_scaled(model):
        torch.testing.assert_close(model(x), plain(x) * 1.25, rtol=0, atol=0)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)  # the hook is gone


def make_study(tmp_path, norms=("noisy_batch", "batch")):
    """A results folder as the sweep leaves it: study.json and Tune's checkpoints of 1-epoch
    trials on a small synthetic set; returns it and each trial's recorded test accuracy."""
    data = load_dataset("synthetic", subset=300, log=lambda s: None)
    out = tmp_path / "results"
    recorded = {}
    for norm in norms:
        cfg = TrialConfig(norm=norm, noise=4.0 if norm == "noisy_batch" else 0.0, epochs=1, lr=0.02,
                          eval_batch_size=64)
        trial = f"{norm}-trial"
        folder = out / "tune" / "study" / trial / "checkpoint_000000"
        folder.mkdir(parents=True)

        def save(record, state, folder=folder, trial=trial):
            torch.save(state, folder / STATE_FILE)
            recorded[trial] = record["epoch"]["test_acc"]

        run_trial(cfg, data, on_epoch=save, options=RunOptions(device="cpu"))
    (out / "study.json").write_text(json.dumps(
        {"name": "study", "preset": {"dataset": "synthetic", "subset": 300}}))
    return out, recorded


def test_cli_reports_each_noisy_trial_as_trained_and_mean_scaled(tmp_path, capsys):
    out, recorded = make_study(tmp_path)
    assert noise_eval.main([str(out), "--device", "cpu"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("noisy_batch-trial")]
    assert len(lines) == 1  # the BN trial is not a noisy one
    epoch, scale, as_is, scaled = re.findall(r"[\d.]+(?=%|\s|$)", lines[0].split(maxsplit=1)[1])
    assert (int(epoch), float(scale)) == (1, 1.5)
    assert float(as_is) == round(100 * recorded["noisy_batch-trial"], 2)  # the trial's own test_acc
    # the mean-scaled column is the same model evaluated with its layers' outputs x 1.5
    state = torch.load(out / "tune/study/noisy_batch-trial/checkpoint_000000" / STATE_FILE,
                       weights_only=False)
    cfg = TrialConfig(**state["config"])
    model = build_model(cfg.norm, cfg.noise)
    model.load_state_dict(state["model"])
    model.eval()
    data = load_dataset("synthetic", subset=300, log=lambda s: None)
    for k in (1, 2, 3):
        model.blocks[k - 1].norm.register_forward_hook(lambda m, a, o: o * 1.5)
    x = torch.from_numpy(data.test_x).float() / 127.5 - 1
    with torch.no_grad():
        acc = (model(x).argmax(1) == torch.from_numpy(data.test_y)).double().mean().item()
    assert float(scaled) == round(100 * acc, 2)
    # the same numbers, at full precision, in the file the analysis summarises
    with (out / results.NOISE_EVAL_FILE).open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["trial_id"] == "noisy_batch-trial" and float(row["expected_scale"]) == 1.5
    assert float(row["test_acc"]) == pytest.approx(100 * recorded["noisy_batch-trial"], abs=1e-9)
    assert float(row["test_acc_mean_scaled"]) == pytest.approx(100 * acc, abs=1e-9)


def test_cli_refuses_a_folder_without_a_study_or_noisy_checkpoints(tmp_path, capsys):
    assert noise_eval.main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("study.noise_eval: error:") and "study.json" in err and "\n" not in err
    out, _ = make_study(tmp_path, norms=("batch",))
    damaged = out / "tune/study/noisy-damaged/checkpoint_000000" / STATE_FILE
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a checkpoint")
    assert noise_eval.main([str(out)]) == 2
    err = capsys.readouterr().err
    assert "skipping" in err and "noisy-damaged" in err  # said, and the others still read
    assert "no checkpoints of noisy-BN trials" in err


def test_cli_refuses_to_evaluate_on_another_dataset_than_the_trials_trained_on(tmp_path, capsys):
    """An ``auto`` study finds CIFAR-10 or falls back to synthetic data depending on --data-dir:
    the trials table says which it trained on, and another one is refused."""
    from study import results

    out, _ = make_study(tmp_path, norms=("noisy_batch",))
    trial = "noisy_batch-trial"
    row = dict(trial_id=trial, dataset="synthetic")
    results.write_atomic(results.to_arrow("trials", [row]), results.table_path(out, "trials", trial))
    assert noise_eval.main([str(out)]) == 0  # the dataset it trained on
    capsys.readouterr()
    results.write_atomic(results.to_arrow("trials", [dict(row, dataset="cifar10")]),
                         results.table_path(out, "trials", trial))
    assert noise_eval.main([str(out)]) == 2
    err = capsys.readouterr().err
    assert "trained on cifar10" in err and "--data-dir" in err


def test_cli_evaluates_only_the_studys_trials_and_skips_diverged_ones(tmp_path, capsys):
    """A --storage shared with another study of the same name holds its checkpoints too: only
    the trials study.json lists are evaluated, the others named. A diverged trial (its trials
    row says so) is skipped with a note; if every noisy trial diverged, that is the error."""
    import shutil

    from study import results

    out, _ = make_study(tmp_path)
    study = json.loads((out / "study.json").read_text())
    ids = ["noisy_batch-trial", "batch-trial"]
    study.update(trial_ids=ids, trials=[{"norm": "noisy_batch"}, {"norm": "batch"}])
    (out / "study.json").write_text(json.dumps(study))
    shutil.copytree(out / "tune/study/noisy_batch-trial", out / "tune/study/noisy_batch-other")
    assert noise_eval.main([str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "noisy_batch-trial" in captured.out and "noisy_batch-other" not in captured.out
    assert "leaving out 1 checkpointed trial(s)" in captured.err and "noisy_batch-other" in captured.err
    row = dict(trial_id="noisy_batch-trial", dataset="synthetic", status="diverged")
    path = results.table_path(out, "trials", row["trial_id"])
    results.write_atomic(results.to_arrow("trials", [row]), path)
    assert noise_eval.main([str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "skipping noisy_batch-trial: it diverged" in err and "every noisy-BN trial" in err


def test_cli_refuses_a_study_without_noisy_trials_and_a_device_it_lacks(tmp_path, capsys):
    out, _ = make_study(tmp_path, norms=("batch",))
    study = json.loads((out / "study.json").read_text())
    (out / "study.json").write_text(json.dumps(dict(study, trials=[{"norm": "batch"}, {"norm": "none"}])))
    assert noise_eval.main([str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("has no noisy-BN trials (its variants: batch, none)") and "\n" not in err
    if not torch.cuda.is_available():
        noisy, _ = make_study(tmp_path / "noisy", norms=("noisy_batch",))
        assert noise_eval.main([str(noisy), "--device", "cuda"]) == 2
        assert "--device cuda: PyTorch sees no CUDA device" in capsys.readouterr().err
