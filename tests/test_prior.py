"""The class prior: BBE, estimate_prior, --prior auto and --early_stopping."""

import csv
import json
import re

import numpy as np
import pytest

import train
from conftest import write_png


def dark(rng, n, size=16):
    """(n, size, size, 3) noisy dark sky: the positive (background) class."""
    return np.clip(0.08 + 0.03 * rng.standard_normal((n, size, size, 3)), 0, 1).astype("float32")


def green(rng, n, size=16):
    """(n, size, size, 3) dark sky with a bright green band over the left half: aurora."""
    patches = dark(rng, n, size)
    patches[:, :, : size // 2, 1] = np.clip(0.7 + 0.05 * rng.standard_normal((n, size, size // 2)), 0, 1)
    return patches


# ------------------------------------------------------------ bbe_prior

@pytest.mark.parametrize("prior", [0.3, 0.7, 0.9])
def test_bbe_recovers_a_known_mixture_of_scores(prior):
    rng = np.random.default_rng(0)
    n = 5000
    p_scores = rng.normal(2, 1, n)
    from_p = rng.random(n) < prior
    u_scores = np.where(from_p, rng.normal(2, 1, n), rng.normal(-2, 1, n))
    estimate, uncertainty = train.bbe_prior(p_scores, u_scores)
    assert abs(estimate - prior) <= 0.03, estimate
    assert 0 < uncertainty < 0.05


def test_bbe_is_invariant_to_monotone_transforms_of_the_scores():
    rng = np.random.default_rng(1)
    p_scores, u_scores = rng.normal(1, 1, 500), rng.normal(0, 1, 800)
    assert train.bbe_prior(p_scores, u_scores, n_bootstrap=0)[0] == train.bbe_prior(
        np.exp(p_scores), np.exp(u_scores), n_bootstrap=0)[0]


def test_bbe_of_identical_scores_is_one():
    scores = np.linspace(0, 1, 101)
    assert train.bbe_prior(scores, scores, n_bootstrap=0)[0] == 1.0


@pytest.mark.parametrize("kwargs,message", [
    (dict(p_scores=[], u_scores=[1.0]), r"Invalid p_scores: expected at least one score"),
    (dict(p_scores=[1.0], u_scores=[np.nan]), r"Invalid u_scores: expected finite scores"),
    (dict(p_scores=[1.0], u_scores=[1.0], delta=1.0), r"Invalid delta: expected 0 < delta < 1, received 1.0"),
    (dict(p_scores=[1.0], u_scores=[1.0], gamma=-1), r"Invalid gamma: expected gamma >= 0, received -1"),
])
def test_bbe_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.bbe_prior(**kwargs)


def test_patch_is_background_counts_aurora_pixels():
    masks = np.zeros((3, 4, 4), bool)
    masks[1, 0, 0] = True           # 1 of 16 pixels
    masks[2, :2] = True             # 8 of 16 pixels
    assert train.patch_is_background(masks).tolist() == [True, False, False]
    assert train.patch_is_background(masks, tolerance=0.1).tolist() == [True, True, False]
    with pytest.raises(ValueError, match=r"Invalid mask_patches: expected shape \(n, p, p\)"):
        train.patch_is_background(masks[0])


# ------------------------------------------------------------ estimate_prior

def test_estimate_prior_on_a_known_mix():
    rng = np.random.default_rng(0)
    P = dark(rng, 300)
    U = np.concatenate([dark(rng, 300), green(rng, 200)])  # prior 0.6
    result = train.estimate_prior(P, U, 16, seed=0, min_steps=60)
    assert abs(result["estimate"] - 0.6) <= 0.1, result
    assert result["prior"] == result["estimate"] and not result["fallback"]
    assert result["method"] == "BBE" and result["auc"] > 0.6
    json.dumps(result)  # goes into config.json as it is


def test_estimate_prior_warns_and_falls_back_when_p_and_u_look_alike():
    rng = np.random.default_rng(1)
    P = dark(rng, 200)
    with pytest.warns(UserWarning, match=r"P and U look alike .* using the default 0\.4"):
        result = train.estimate_prior(P, P.copy(), seed=0, min_steps=40)
    assert result["fallback"] and result["prior"] == train.PRIOR_DEFAULT
    assert "cannot be estimated" in result["message"]


def test_estimate_prior_rejects_bad_input():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match=r"Invalid U: expected at least 4 patches for 2 folds, received 3"):
        train.estimate_prior(dark(rng, 10), dark(rng, 3))
    with pytest.raises(ValueError, match=r"Invalid patch_size: expected the patches' side 16, received 32"):
        train.estimate_prior(dark(rng, 10), dark(rng, 10), 32)


# ------------------------------------------------------------ through train.py

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """P: 4 dark frames. U: 3 dark + 2 frames with a green band."""
    root = tmp_path_factory.mktemp("prior_data")
    rng = np.random.default_rng(0)
    (root / "P").mkdir()
    (root / "U").mkdir()
    for i in range(4):
        write_png(root / "P" / f"p{i}.png", dark(rng, 1, 48)[0])
    for i in range(3):
        write_png(root / "U" / f"sky{i}.png", dark(rng, 1, 48)[0])
    for i in range(2):
        write_png(root / "U" / f"aurora{i}.png", green(rng, 1, 48)[0])
    return root


def arguments(folders, save_dir, *extra):
    return ["--P_dataset", str(folders / "P"), "--U_dataset", str(folders / "U"), "--save_dir", str(save_dir),
            "--model", "CNN", "--patch_size", "16", "--P_n", "160", "--U_n", "240", "--batchsize", "32",
            "--quiet", *extra]


def test_prior_auto_is_the_default_and_is_recorded(folders, tmp_path):
    assert train.build_parser().parse_args(arguments(folders, tmp_path)).prior == "auto"
    assert train.main(arguments(folders, tmp_path, "--epochs", "1")) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    estimate = config["prior_estimate"]
    assert estimate["method"] == "BBE" and isinstance(config["prior"], float)
    assert config["prior"] == estimate["prior"] and 0 < config["prior"] < 1
    # A float still overrides, and then nothing is estimated.
    args = train.build_parser().parse_args(arguments(folders, tmp_path, "--prior", "0.7"))
    assert args.prior == 0.7


def test_bad_prior_is_one_line_with_exit_2(folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(arguments(folders, tmp_path / "out", "--prior", "abc"))
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(r"argument --prior: expected a number in \(0, 1\), received 'abc'", lines[0])


def test_early_stopping_runs_and_keeps_the_best_epoch(folders, tmp_path):
    code = train.main(arguments(folders, tmp_path, "--prior", "0.6", "--epochs", "4", "--early_stopping",
                                "--patience", "1"))
    assert code == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["early_stopping"] is True and config["patience"] == 1
    assert 2 <= config["epochs_run"] <= 4
    with open(tmp_path / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == config["epochs_run"]
    assert all(np.isfinite(float(row["val_pu_zero_one_risk"])) for row in rows)
