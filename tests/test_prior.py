"""The class prior: BBE, estimate_prior, --prior auto and --early_stopping."""

import csv
import json
import re

import numpy as np
import pytest

import data
import PULoss
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
    estimate, uncertainty = PULoss.bbe_prior(p_scores, u_scores)
    assert abs(estimate - prior) <= 0.03, estimate
    assert 0 < uncertainty < 0.05


def test_bbe_is_invariant_to_monotone_transforms_of_the_scores():
    rng = np.random.default_rng(1)
    p_scores, u_scores = rng.normal(1, 1, 500), rng.normal(0, 1, 800)
    assert PULoss.bbe_prior(p_scores, u_scores, n_bootstrap=0)[0] == PULoss.bbe_prior(
        np.exp(p_scores), np.exp(u_scores), n_bootstrap=0)[0]


def test_bbe_of_identical_scores_is_one():
    scores = np.linspace(0, 1, 101)
    assert PULoss.bbe_prior(scores, scores, n_bootstrap=0)[0] == 1.0


@pytest.mark.parametrize("kwargs,message", [
    (dict(p_scores=[], u_scores=[1.0]), r"Invalid p_scores: expected at least one score"),
    (dict(p_scores=[1.0], u_scores=[np.nan]), r"Invalid u_scores: expected finite scores"),
    (dict(p_scores=[1.0], u_scores=[1.0], delta=1.0), r"Invalid delta: expected 0 < delta < 1, received 1.0"),
    (dict(p_scores=[1.0], u_scores=[1.0], gamma=-1), r"Invalid gamma: expected gamma >= 0, received -1"),
])
def test_bbe_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PULoss.bbe_prior(**kwargs)


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
    result = train.estimate_prior(P, U, seed=0, min_steps=60)
    assert abs(result["estimate"] - 0.6) <= 0.1, result
    assert result["distinguishable"] and result["method"] == "BBE" and result["auc"] > 0.6
    assert train.resolve_prior(result) == result["estimate"]


def test_rare_aurora_is_found_by_the_tail_though_the_auc_hardly_moves():
    rng = np.random.default_rng(3)
    P = dark(rng, 1500)
    U = np.concatenate([dark(rng, 2940), green(rng, 60)])  # prior 0.98
    result = train.estimate_prior(P, U, seed=0, min_steps=60)
    assert result["separation"] < 3 < result["tail_separation"], result
    assert result["distinguishable"]
    assert 0.95 <= train.resolve_prior(result) <= 0.995


def test_p_and_u_alike_stop_with_what_to_do():
    rng = np.random.default_rng(1)
    P = dark(rng, 200)
    result = train.estimate_prior(P, dark(rng, 200), seed=0, min_steps=40)
    assert not result["distinguishable"], result
    with pytest.raises(data.UsageError, match=r"P and U look alike .* holds? no aurora.*pass --prior"):
        train.resolve_prior(result)


def test_background_jitter_keeps_frames_of_a_clear_night_from_looking_unlike_p():
    # No aurora anywhere: each frame's sky sits a little off its background
    # estimate, by its own amount in each channel (up to a noise level), as
    # real frames minutes apart do. A classifier tells P's frames from U's
    # by those amounts, and the estimate falls far below the truth (1).
    rng = np.random.default_rng(2)

    def frames(n_frames, per_frame=40):
        levels = np.repeat(rng.uniform(-1, 1, (n_frames, 1, 1, 3)), per_frame, axis=0)
        excess = rng.normal(0.0, 1.0, (n_frames * per_frame, 16, 16, 3)) + levels
        return np.arcsinh(excess / data.NORMALIZE_SOFTENING).astype("float32")

    P, U = frames(10), frames(10)
    plain = train.estimate_prior(P, U, seed=0, min_steps=60)
    jittered = train.estimate_prior(P, U, seed=0, min_steps=60, offset=2.0)
    assert plain["estimate"] < 0.4 and plain["auc"] > 0.85, plain
    assert jittered["estimate"] > plain["estimate"] + 0.15 and jittered["auc"] < plain["auc"] - 0.05, jittered


def test_an_estimate_above_the_range_stops_and_one_below_is_clipped():
    above = {"estimate": 0.999, "distinguishable": True, "auc": 0.5, "separation": 0.0, "tail_separation": 4.0}
    with pytest.raises(data.UsageError, match=r"estimated class prior is 0\.999"):
        train.resolve_prior(above)
    with pytest.warns(UserWarning, match=r"below 0\.05"):
        assert train.resolve_prior({**above, "estimate": 0.01}) == train.PRIOR_RANGE[0]


def test_p_frames_whose_patches_score_like_u_aurora_are_named():
    rng = np.random.default_rng(3)
    # Held-out P-versus-U scores (high = like P): U is 900 background patches and 100 aurora ones.
    u_scores = np.concatenate([rng.normal(0, 1, 900), rng.normal(-4, 0.5, 100)])
    frame_of = np.repeat(np.arange(10), 50)
    P = data.PatchSet(None, frame_of, None, [f"f{k}" for k in range(10)], None, [])
    clean = rng.normal(0, 1, 500)
    assert train.p_frames_with_aurora({"u_scores": u_scores, "p_scores": clean}, 0.9, P) == []
    # Frame 3 holds aurora in 15 of its 50 patches.
    with_aurora = clean.copy()
    with_aurora[150:165] = rng.normal(-4, 0.5, 15)
    assert train.p_frames_with_aurora({"u_scores": u_scores, "p_scores": with_aurora}, 0.9, P) == ["f3"]
    # Where the prior leaves U less than P_CHECK_MIN_AURORA of aurora the check is not made (it has no
    # power there); frame 3's aurora, brighter than U's, would otherwise be named.
    bright = clean.copy()
    bright[150:165] = -10.0
    u_rare = np.concatenate([rng.normal(0, 1, 970), rng.normal(-8, 0.5, 30)])
    assert train.p_frames_with_aurora({"u_scores": u_rare, "p_scores": bright}, 0.95, P) == ["f3"]
    assert train.p_frames_with_aurora({"u_scores": u_rare, "p_scores": bright}, 0.975, P) == []


def test_estimate_prior_rejects_bad_input():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match=r"Invalid U: expected at least 4 patches for 2 folds, received 3"):
        train.estimate_prior(dark(rng, 10), dark(rng, 3))
    with pytest.raises(ValueError, match=r"Invalid patches: P is \(16, 16, 3\) but U is \(8, 8, 3\)"):
        train.estimate_prior(dark(rng, 10), dark(rng, 10, 8))


def test_checkerboard_folds_keep_held_out_patches_apart_and_every_frame_on_both_sides():
    rows, cols = np.meshgrid(np.arange(8, 200, 8), np.arange(8, 200, 8), indexing="ij")
    centres = np.stack([rows.ravel(), cols.ravel()], axis=1)
    frames = np.repeat([0, 1], len(centres) // 2 + 1)[: len(centres)]
    patch_set = data.PatchSet(None, frames, centres, ["a", "b"], None, [])
    folds = train.checkerboard_folds(patch_set, 16)
    assert set(folds[frames == 0]) == {0, 1} and set(folds[frames == 1]) == {0, 1}
    # Two patches of different folds are never closer than a patch (same square: same fold).
    for fold in (0, 1):
        squares = set(map(tuple, centres[folds == fold] // 32))
        other = set(map(tuple, centres[folds != fold] // 32))
        assert not squares & other
    # Patch-sized images (one patch each, all centred alike) are dealt out whole instead:
    # the draws of one frame (here three of each) all go to one fold, half the frames to each.
    frame_of = np.repeat(np.arange(6), 3)
    alike = data.PatchSet(None, frame_of, np.full((18, 2), 16), list("abcdef"), None, [])
    folds = train.checkerboard_folds(alike, 32)
    assert all(len(set(folds[frame_of == frame])) == 1 for frame in range(6))
    assert sorted(folds) == [0] * 9 + [1] * 9
    # A single such image still gets two folds.
    single = data.PatchSet(None, np.zeros(4, int), np.full((4, 2), 16), ["a"], None, [])
    assert sorted(train.checkerboard_folds(single, 32)) == [0, 0, 1, 1]


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


@pytest.mark.slow
def test_prior_auto_is_the_default_and_is_recorded(folders, tmp_path):
    assert train.build_parser().parse_args(arguments(folders, tmp_path)).prior == "auto"
    assert train.main(arguments(folders, tmp_path, "--epochs", "1")) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    estimate = config["prior_estimate"]
    assert estimate["method"] == "BBE" and estimate["distinguishable"] is True
    assert config["prior"] == estimate["prior"] == pytest.approx(estimate["estimate"])
    assert config["prior_given"] is None
    # Two of the five U frames hold a green band over half of them: the truth is near 0.8.
    assert 0.6 < config["prior"] < 0.95, config["prior"]


def test_given_prior_is_used_and_nothing_is_estimated(folders, tmp_path):
    assert train.main(arguments(folders, tmp_path, "--epochs", "1", "--prior", "0.7")) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["prior"] == config["prior_given"] == 0.7 and config["prior_estimate"] is None


def test_u_without_aurora_stops_with_exit_2_and_writes_nothing(folders, tmp_path, capsys):
    save_dir = tmp_path / "out"
    code = train.main(arguments(folders, save_dir, "--U_dataset", str(folders / "P")))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("train.py: error: ") and "seems to hold no aurora" in err and "--prior" in err
    assert not (save_dir / "model.keras").exists()


def test_bad_prior_is_one_line_with_exit_2(folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(arguments(folders, tmp_path / "out", "--prior", "abc"))
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(r"argument --prior: expected a number in \(0, 1\), received 'abc'", lines[0])


@pytest.mark.slow
def test_early_stopping_keeps_the_weights_of_the_best_epoch(folders, tmp_path):
    code = train.main(arguments(folders, tmp_path, "--prior", "0.8", "--epochs", "4", "--early_stopping",
                                "--patience", "1"))
    assert code == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["early_stopping"] is True and config["patience"] == 1
    assert 2 <= config["epochs_run"] <= 4
    with open(tmp_path / "history.csv", newline="") as f:
        risks = [float(row["val_pu_zero_one_risk"]) for row in csv.DictReader(f)]
    assert len(risks) == config["epochs_run"]
    # The saved weights score the held-out split as the best epoch did, not as the last one.
    assert config["final_val_pu_zero_one_risk"] == pytest.approx(min(risks), abs=1e-6)


def test_early_stopping_without_held_out_data_is_refused(folders, tmp_path, capsys):
    assert train.main(arguments(folders, tmp_path / "o", "--early_stopping", "--val_fraction", "0")) == 2
    assert "--early_stopping needs held-out P and U patches" in capsys.readouterr().err
