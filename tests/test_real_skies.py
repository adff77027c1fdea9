"""Training that checks itself, rare aurora, science frames' scale: the behaviours the real-skies issue asks for."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data
import segmentation
import train
from conftest import ROOT


# ------------------------------------------------------------ the checks, by hand

def test_collapse_names_each_trivial_model_and_passes_a_useful_one():
    n = dict(n_u=4000, n_p=2000)
    assert "no aurora anywhere" in train.collapse(0.95, u_aurora=0.001, p_aurora=0.0, **n)
    assert "aurora everywhere" in train.collapse(0.95, u_aurora=0.99, p_aurora=0.9, **n)
    assert train.collapse(0.95, u_aurora=0.05, p_aurora=0.01, **n) is None
    # Calling U aurora no more often than clear sky is finding no aurora.
    assert "no aurora anywhere" in train.collapse(0.95, u_aurora=0.03, p_aurora=0.03, **n)
    # At a prior of 0.99, 400 U patches hold about 4 aurora patches: too few to call the model collapsed.
    assert train.collapse(0.99, u_aurora=0.0, p_aurora=0.0, n_u=400, n_p=200) is None
    assert "no aurora anywhere" in train.collapse(0.99, u_aurora=0.0, p_aurora=0.0, n_u=8000, n_p=8000)


def test_collapse_asks_the_share_found_to_clear_a_tenth_by_its_noise():
    # Prior 0.98, 20,000 patches each: U at 2.0% against P at 1.4% finds 31% of U's aurora, with a standard
    # error of about 6%, and passes; U at 1.7% finds 16%, not clear of a tenth by two errors: collapsed.
    n = dict(n_u=20_000, n_p=20_000)
    assert train.collapse(0.98, u_aurora=0.020, p_aurora=0.014, **n) is None
    assert "finds 16%" in train.collapse(0.98, u_aurora=0.017, p_aurora=0.014, **n)
    # Calling more clear sky aurora does not make the counts too noisy to judge: at a prior of 0.99, 5% of
    # U and 5% of P called aurora is no aurora found.
    assert "no aurora anywhere" in train.collapse(0.99, u_aurora=0.05, p_aurora=0.05, **n)
    assert "no aurora anywhere" in train.collapse(0.95, u_aurora=0.28, p_aurora=0.30, **n)
    # With twenty times fewer patches the same rates are too noisy to call the model either way.
    assert train.collapse(0.98, u_aurora=0.017, p_aurora=0.014, n_u=1000, n_p=1000) is None


def test_unseen_patches_leave_the_training_patches_as_they_were(tmp_path):
    folder, _ = frames_folder(tmp_path / "U", 3, [True, False, True], seed=700)
    paths = sorted(folder.glob("*.png"))
    preprocessing = {"version": data.PREPROCESSING_VERSION, "normalize": "background", "full_scale": 255.0,
                     "camera_range": None, "patch_size": 16, "background_sectors": 0, "grey_scales": None}

    def draw(unseen):
        return data.frame_patches(paths, 16, 60, np.random.default_rng(1), preprocessing, quiet=True,
                                  unseen=unseen, unseen_rng=np.random.default_rng(2))

    plain, checked = draw(0), draw(300)
    assert plain.unseen is None and checked.unseen.shape == (300, 16, 16, 3)
    np.testing.assert_array_equal(plain.patches, checked.patches)
    np.testing.assert_array_equal(plain.centres, checked.centres)


def test_decision_offset_matches_the_prior_unless_p_would_be_called_aurora():
    u_logits = np.linspace(-5, 5, 1001)
    clear_p = np.linspace(2, 6, 200)
    offset = train.decision_offset(u_logits, clear_p, prior=0.9)
    assert np.mean(u_logits - offset < 0) == pytest.approx(0.1, abs=0.002)
    # A prior that is too low would make 40% of U aurora, and half of P with it: P's false alarms decide.
    mixed_p = np.linspace(-5, 5, 200)
    offset = train.decision_offset(u_logits, mixed_p, prior=0.6)
    assert np.mean(mixed_p - offset < 0) == pytest.approx(train.FALSE_ALARM, abs=0.01)


def test_offset_and_scale_are_folded_into_the_last_layer():
    model = train.build_cnn(8)
    patches = np.random.default_rng(0).random((5, 8, 8, 3)).astype("float32")
    before = data.predict_logits(model, patches)
    train.fold_offset(model, 1.5)
    np.testing.assert_allclose(data.predict_logits(model, patches), before - 1.5, atol=1e-5)
    train.fold_offset(model, 0.0, 2.5)
    np.testing.assert_allclose(data.predict_logits(model, patches), 2.5 * (before - 1.5), atol=1e-4)


@pytest.mark.parametrize("prior", [0.6, 0.95])
def test_calibration_scale_recovers_the_posterior_from_p_and_u_alone(prior):
    # Background logits ~ N(m, 1), aurora ~ N(-m, 1): in U the posterior's
    # logit is 2 m x + log(prior / (1 - prior)), so once x is shifted to
    # where that is 0, the calibrated scale is 2 m.
    rng, m = np.random.default_rng(0), 1.5
    shift = -np.log(prior / (1 - prior)) / (2 * m)
    n_background = int(prior * 200_000)
    u = np.concatenate([rng.normal(m, 1, n_background), rng.normal(-m, 1, 200_000 - n_background)]) - shift
    p = rng.normal(m, 1, 200_000) - shift
    assert train.calibration_scale(u / 2, p / 2, prior) == pytest.approx(2 * 2 * m, rel=0.05)
    assert train.calibration_scale(u * 2, p * 2, prior) == pytest.approx(2 * m / 2, rel=0.05)


def test_calibration_scale_stays_finite_when_p_is_surer_than_u_background():
    # P's patches (the frames training saw) sit further on the background
    # side than U's background: the unbiased risk then falls without end as
    # the scale grows; the non-negative one does not.
    rng, prior = np.random.default_rng(1), 0.5
    u = np.concatenate([rng.normal(1.0, 1, 50_000), rng.normal(-2.0, 1, 50_000)])
    p = rng.normal(2.5, 1.2, 100_000)  # 2% of P on the aurora side, as decision_offset allows
    scale = train.calibration_scale(u, p, prior)
    assert train.SCALE_BOUNDS[0] < scale < 0.5 * train.SCALE_BOUNDS[1]


def test_calibration_scale_leaves_the_logit_as_trained_when_p_and_u_separate_perfectly():
    u = np.concatenate([np.linspace(1, 3, 40), np.linspace(-4, -1, 60)])
    p = np.linspace(1, 3, 40)
    assert train.calibration_scale(u, p, 0.4) == 1.0


def frame_set(specs, size=128):
    """A PatchSet holding only the names and sky conditions of generator frames drawn with ``specs``."""
    preprocessing = {"normalize": "background", "camera_range": [0.0, 255.0], "full_scale": 255.0}
    conditions = []
    for settings in specs.values():
        image, _ = data.synthetic_frame(size, **settings)
        conditions.append(data.sky_conditions(data.prepare_frame(image, 255.0, preprocessing)))
    return data.PatchSet(None, None, None, list(specs), np.stack(conditions), [])


def test_u_frames_in_conditions_p_lacks_are_named_and_clear_skies_are_not():
    P = frame_set({f"p{k}": dict(seed=k, aurora=False) for k in range(8)})
    clear = {f"clear{k}": dict(seed=k, aurora=False) for k in range(20, 26)}
    # Strong conditions, which move the conditions well past the spread of P's clear skies.
    unlike = {"moonlit": dict(seed=30, aurora=False, moon=4.0), "town": dict(seed=40, aurora=False, town_glow=3.0),
              "twilight": dict(seed=18, aurora=False, twilight=3.0)}
    named = train.p_coverage(P, frame_set({**clear, **unlike}))
    assert set(named) == set(unlike)
    # Too few P frames to say what P covers: nothing is named.
    assert train.p_coverage(frame_set({"p0": dict(seed=0, aurora=False)}), frame_set(unlike)) == []


# ------------------------------------------------------------ through train.py

def frames_folder(folder, count, aurora, size=96, seed=0, bit_depth=8, **settings):
    """Generator frames (and their true masks in folder/../<name>_masks) for tiny CLI runs."""
    folder.mkdir(parents=True)
    masks = folder.parent / f"{folder.name}_masks"
    masks.mkdir()
    for k in range(count):
        # Pillow writes 16-bit grey PNGs, not 16-bit colour: a 16-bit camera here is a grey one.
        image, mask = data.synthetic_frame(size, seed=seed + k, aurora=bool(aurora[k]), bit_depth=bit_depth,
                                           grey=bit_depth == 16, **settings)
        Image.fromarray(image).save(folder / f"f_{k:02d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"f_{k:02d}.png")
    return folder, masks


@pytest.mark.slow
def test_a_run_forced_into_collapse_fails_with_exit_3_and_no_model(tmp_path, capsys):
    # U is P itself, but the prior given says half of U is aurora: the model finds none
    # it could call aurora without calling clear sky aurora too, so every attempt fails.
    P, _ = frames_folder(tmp_path / "P", 6, [False] * 6, seed=100)
    out = tmp_path / "out"
    code = train.main(["--P_dataset", str(P), "--U_dataset", str(P), "--save_dir", str(out), "--model", "CNN",
                       "--patch_size", "16", "--P_n", "300", "--U_n", "400", "--epochs", "1", "--prior", "0.5",
                       "--attempts", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == train.EXIT_TRAINING_FAILED
    assert "train.py: training failed:" in err and "in 2 attempt(s)" in err
    assert not (out / "model.keras").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "collapsed" and len(config["attempts"]) == 2 and config["failure"]
    # Checked on patches drawn apart from the training ones: ten times --P_n and --U_n.
    p_unseen, u_unseen = config["attempts"][0]["unseen_patches"]
    assert p_unseen == 3000 and u_unseen == 4000


@pytest.mark.slow
def test_rare_aurora_is_found_and_clear_skies_stay_clear(tmp_path, capsys):
    # Two of eighteen U frames hold aurora: a patch prior of 0.925 (evaluate_quality.patch_prior), estimated.
    P, _ = frames_folder(tmp_path / "P", 10, [False] * 10, seed=300, cloud_cover=0.3)
    U, U_masks = frames_folder(tmp_path / "U", 18, [k in (3, 11) for k in range(18)], seed=400, cloud_cover=0.3,
                               brightness=1.2)
    out = tmp_path / "model"
    code = train.main(["--P_dataset", str(P), "--U_dataset", str(U), "--save_dir", str(out), "--model", "CNN",
                       "--patch_size", "16", "--P_n", "1500", "--U_n", "3000", "--epochs", "3", "--quiet"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert 0.82 < config["prior"] < 0.995, config["prior"]  # within 0.1 of the truth, from 10 P frames
    assert segmentation.main(["--dataset", str(U), "--model", str(out / "model.keras"), "--save_dir",
                              str(tmp_path / "seg"), "--masks", str(U_masks), "--outputs", "mask", "--quiet"]) == 0
    rows = {row["name"]: row for row in segmentation_summary(tmp_path / "seg")}
    assert min(float(rows[name]["iou"]) for name in ("f_03", "f_11")) > 0.3, rows
    clear = [float(row["false_aurora"]) for row in rows.values() if row["false_aurora"]]
    assert np.mean(clear) < 0.05, clear


def segmentation_summary(save_dir):
    import csv

    with open(save_dir / "summary.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["file"] != "mean"]


@pytest.mark.slow
def test_16_bit_frames_train_and_segment_with_the_same_stored_scale(tmp_path):
    P, _ = frames_folder(tmp_path / "P", 4, [False] * 4, seed=500, bit_depth=16)
    U, U_masks = frames_folder(tmp_path / "U", 4, [True, False, True, False], seed=600, bit_depth=16)
    out = tmp_path / "model"
    assert train.main(["--P_dataset", str(P), "--U_dataset", str(U), "--save_dir", str(out), "--model", "CNN",
                       "--patch_size", "16", "--P_n", "300", "--U_n", "400", "--epochs", "1", "--prior", "0.7",
                       "--attempts", "1", "--quiet"]) in (0, train.EXIT_TRAINING_FAILED)
    config = json.loads((out / "config.json").read_text())
    low, high = config["preprocessing"]["camera_range"]
    # The frames are a pedestal of 3300 plus 16 counts per 8-bit step: the range is the camera's, not 0-65535.
    assert config["preprocessing"]["full_scale"] == 65535.0
    assert 3290 <= low <= 3400 and 3400 < high < 3300 + 256 * 16, (low, high)
    if not (out / "model.keras").exists():
        return  # a collapsed tiny run still records the scale; the round trip needs a model
    model, stored = data.load_model(out / "model.keras")
    assert stored["camera_range"] == [low, high] and stored["normalize"] == "background"
    frame = next(data.read_frames(U / "f_00.png"))
    assert data.frame_range(frame.full_scale, stored) == (low, high)
    image = data.prepare_frame(frame.pixels, frame.full_scale, stored).image
    assert image.max() > 0.5  # scaled by the camera's range, not left near black by 1/65535
    # An 8-bit frame through the same model keeps its own 0-255 scale.
    assert data.frame_range(255.0, stored) == (0.0, 255.0)


# ------------------------------------------------------------ glow on one side of the horizon

def outer_sky(sky, fraction=0.6):
    """The sky beyond ``fraction`` of its radius from its centre."""
    rows, cols = np.nonzero(sky)
    centre = ((rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2)
    radius = (rows.max() - rows.min()) / 2
    down, across = np.ogrid[:sky.shape[0], :sky.shape[1]]
    return sky & (np.hypot(down - centre[0], across - centre[1]) > fraction * radius)


def test_twilight_on_one_side_leaves_the_model_input_and_the_aurora_stays():
    image, aurora = data.synthetic_frame(256, seed=18, aurora=True, twilight=3.0)
    image = image.astype(np.float32) / 255
    sky = data.sky_mask(image)
    clear = outer_sky(sky) & ~aurora
    one_profile = data.normalize_frame(image, sky, 1 / 255).max(axis=2)
    by_sector = data.normalize_frame(image, sky, 1 / 255, sectors=data.BACKGROUND_SECTORS).max(axis=2)
    # Excess of more than 1.5 (asinh units: about 6 noise levels) on clear sky near the horizon.
    assert np.mean(by_sector[clear] > 1.5) < 0.5 * np.mean(one_profile[clear] > 1.5)
    assert by_sector[aurora].mean() > 0.9 * one_profile[aurora].mean()


def test_models_saved_before_the_sectors_prepare_frames_as_they_were_trained():
    image, _ = data.synthetic_frame(128, seed=18, aurora=True, twilight=3.0)
    version_1 = {"version": 1, "normalize": "background", "camera_range": [0.0, 255.0], "full_scale": 255.0}
    prepared = data.prepare_frame(image.astype(np.float32), 255.0, version_1)
    expected = data.normalize_frame(prepared.image, prepared.sky, prepared.quantum, sectors=0)
    np.testing.assert_array_equal(prepared.model_input, expected)
    current = data.prepare_frame(image.astype(np.float32), 255.0, {**version_1, "version": 2,
                                                                   "background_sectors": data.BACKGROUND_SECTORS})
    assert not np.array_equal(current.model_input, expected)


def test_background_sectors_are_stored_with_the_model_and_default_to_one_profile():
    paths = sorted((ROOT / "dataset" / "Positive").glob("*.png"))[:3]
    flags = ["--P_dataset", "P", "--U_dataset", "U"]
    default = train.resolve_preprocessing(train.build_parser().parse_args(flags), paths)
    chosen = train.resolve_preprocessing(train.build_parser().parse_args([*flags, "--background_sectors", "12"]), paths)
    assert default["normalize"] == chosen["normalize"] == "background"
    assert default["background_sectors"] == 0 and chosen["background_sectors"] == 12


# ------------------------------------------------------------ monochrome cameras: backgrounds of three scales

def grey(image):
    """An 8-bit RGB frame as a monochrome camera takes it: its green channel in all three, [0, 1] float32."""
    return np.repeat(image[..., 1:2], 3, axis=2).astype(np.float32) / 255


def test_grey_frames_hold_the_excess_over_three_backgrounds_and_the_moon_fades_from_the_smaller_ones():
    with_moon, aurora = data.synthetic_frame(256, seed=31, aurora=True, moon=1.0)
    without_moon, _ = data.synthetic_frame(256, seed=31, aurora=True, moon=0.0)
    image = grey(with_moon)
    sky = data.sky_mask(image)
    scales = data.normalize_frame(image, sky, 1 / 255, grey_scales=data.GREY_SCALES)
    one_scale = data.normalize_frame(image, sky, 1 / 255)
    # The widest background is the one of every colour model: channel 0 is the old input.
    np.testing.assert_allclose(scales[..., 0], one_scale[..., 0], atol=1e-4)
    # The moon's glow where it stands above the widest background (asinh 1: about 3.5 noise levels).
    glow = sky & ~aurora & (grey(with_moon)[..., 0] - grey(without_moon)[..., 0] > 0.05) & (scales[..., 0] > 1.0)
    assert glow.sum() > 500, glow.sum()  # the test needs a moon's glow in the sky
    assert np.median(scales[..., 2][glow]) < 0.6 * np.median(scales[..., 0][glow])
    # The aurora keeps most of its excess over the smaller backgrounds.
    assert np.median(scales[..., 1][aurora & sky]) > 0.5 * np.median(scales[..., 0][aurora & sky])


def test_grey_scales_are_chosen_for_monochrome_frames_only_and_stored_with_the_model(tmp_path):
    flags = train.build_parser().parse_args(["--P_dataset", "P", "--U_dataset", "U"])
    colour = sorted((ROOT / "dataset" / "Positive").glob("*.png"))[:2]
    assert train.resolve_preprocessing(flags, colour)["grey_scales"] is None
    for k, path in enumerate(colour):
        Image.fromarray(np.asarray(Image.open(path).convert("L"))).save(tmp_path / f"grey_{k}.png")
    stored = train.resolve_preprocessing(flags, sorted(tmp_path.glob("grey_*.png")))
    assert stored["grey_scales"] == list(data.GREY_SCALES)
    frame = next(data.read_frames(tmp_path / "grey_0.png"))
    prepared = data.prepare_frame(frame.pixels, frame.full_scale, stored)
    assert not np.array_equal(prepared.model_input[..., 0], prepared.model_input[..., 2])
    # A model saved before the scales (version 2) sees the same excess in every channel.
    before = data.prepare_frame(frame.pixels, frame.full_scale, {**stored, "version": 2, "grey_scales": None})
    np.testing.assert_array_equal(before.model_input[..., 0], before.model_input[..., 2])


# ------------------------------------------------------------ the sky the user means: --min_elevation

DASC = ROOT.parent / "shared" / "real_frames" / "pkr_dasc"


@pytest.mark.skipif(not DASC.is_dir(), reason="needs ../shared/real_frames")
def test_the_fisheye_elevation_follows_a_calibrated_all_sky_lens():
    frame = next(data.read_frames(DASC / "PKR_DASC_0558_20151007_082351.743.FITS"))
    low, high = data.estimate_camera_range([frame.pixels], frame.full_scale)
    preprocessing = {"normalize": "none", "camera_range": [low, high], "full_scale": frame.full_scale}
    sky = data.prepare_frame(frame.pixels, frame.full_scale, preprocessing).sky
    calibrated = next(data.read_frames(DASC / "cal" / "PKR_DASC_0558_20150213_El.FIT")).pixels[..., 0]
    guessed = data.fisheye_elevation(sky)
    mapped = sky & np.isfinite(calibrated) & (calibrated > 0)
    assert np.median(np.abs(guessed[mapped] - calibrated[mapped])) < 5.0  # degrees
    above, truly_above = sky & (guessed >= 15), sky & (calibrated >= 15)
    assert (above & truly_above).sum() / (above | truly_above).sum() > 0.85
    # With the map itself, the cut is the map's.
    np.testing.assert_array_equal(data.user_sky(DASC / "cal" / "PKR_DASC_0558_20150213_El.FIT", 15.0),
                                  np.isfinite(calibrated) & (calibrated >= 15) & (calibrated <= 90))


def test_min_elevation_without_a_map_cuts_the_horizon_off_the_sky_found_in_each_frame():
    image, _ = data.synthetic_frame(128, seed=3, aurora=False)
    preprocessing = {"normalize": "none", "camera_range": [0.0, 255.0], "full_scale": 255.0}
    whole = data.prepare_frame(image.astype(np.float32), 255.0, preprocessing)
    cut = data.prepare_frame(image.astype(np.float32), 255.0, preprocessing, data.Horizon(30.0))
    assert cut.sky_found and not (cut.sky & ~whole.sky).any()
    # Above 30 degrees of an equidistant fisheye: inside 2/3 of the circle's radius.
    np.testing.assert_allclose(cut.sky.sum() / whole.sky.sum(), (2 / 3) ** 2, rtol=0.05)
    np.testing.assert_array_equal(outer_sky(whole.sky, 0.7) & cut.sky, False)
    # The frame is prepared over its whole circle: only the sky used is cut.
    template = {**preprocessing, "normalize": "background", "position": True, "mask_bright": True,
                "sky_template": np.ones((data.SKY_TEMPLATE_CELLS, data.SKY_TEMPLATE_CELLS, 3)).tolist()}
    np.testing.assert_array_equal(data.prepare_frame(image.astype(np.float32), 255.0, template).model_input,
                                  data.prepare_frame(image.astype(np.float32), 255.0, template,
                                                     data.Horizon(30.0)).model_input)
    np.testing.assert_array_equal(cut.circle, whole.sky)
    # A model trained with the cut carries it: its frames are cut without being told, unless told otherwise.
    carried = data.prepare_frame(image.astype(np.float32), 255.0, {**preprocessing, "min_elevation": 30.0})
    np.testing.assert_array_equal(carried.sky, cut.sky)
    uncut = data.prepare_frame(image.astype(np.float32), 255.0, {**preprocessing, "min_elevation": 30.0},
                               data.Horizon(-90.0))
    np.testing.assert_array_equal(uncut.sky, whole.sky)
    flags = ["--P_dataset", "P", "--U_dataset", "U", "--min_elevation", "10"]
    paths = sorted((ROOT / "dataset" / "Positive").glob("*.png"))[:2]
    assert train.resolve_preprocessing(train.build_parser().parse_args(flags), paths)["min_elevation"] == 10.0
    with_map = train.build_parser().parse_args(flags + ["--field_of_view", "El.FIT"])
    assert train.resolve_preprocessing(with_map, paths)["min_elevation"] is None
    # No border found: the centre of the (square) frame is the zenith, half its side the horizon.
    flat = np.full((64, 64, 3), 100.0, np.float32)
    cut_flat = data.prepare_frame(flat, 255.0, preprocessing, data.Horizon(0.0))
    assert not cut_flat.sky_found
    np.testing.assert_allclose(cut_flat.sky.mean(), np.pi / 4, rtol=0.05)


def test_the_sky_template_is_laid_over_the_whole_circle_whatever_the_cut(tmp_path):
    folder, _ = frames_folder(tmp_path / "P", 2, [False, False], size=96, seed=40, town_glow=2.0)
    preprocessing = {"version": data.PREPROCESSING_VERSION, "normalize": "background", "camera_range": [0.0, 255.0],
                     "full_scale": 255.0, "sky_template": None, "mask_bright": True}
    paths = sorted(folder.glob("*.png"))
    np.testing.assert_array_equal(data.build_sky_template(paths, preprocessing, data.Horizon(45.0)),
                                  data.build_sky_template(paths, preprocessing))


# ------------------------------------------------------------ where in the sky: --position

def disk(size, radius):
    rows, cols = np.ogrid[:size, :size]
    return np.hypot(rows - (size - 1) / 2, cols - (size - 1) / 2) <= radius


def test_position_channels_place_each_pixel_in_its_sky_whatever_the_frame_size():
    small, large = data.position_channels(disk(101, 40)), data.position_channels(disk(201, 80))
    centre = (50, 50)
    np.testing.assert_allclose(small[centre], 0.0, atol=1e-6)
    # Half way to the rim, below the centre: distance and row offset half the scale, column offset 0.
    np.testing.assert_allclose(small[70, 50], [0.5 * data.POSITION_SCALE, 0.5 * data.POSITION_SCALE, 0.0], atol=0.03)
    # The same place in a frame twice the size reads the same.
    np.testing.assert_allclose(large[140, 100], small[70, 50], atol=0.03)
    np.testing.assert_allclose(large[100, 60], [0.5 * data.POSITION_SCALE, 0.0, -0.5 * data.POSITION_SCALE],
                               atol=0.03)
    assert small[~disk(101, 40)].max() == 0.0 and small[..., 0].max() <= data.POSITION_SCALE * 1.02


def test_position_appends_three_channels_and_leaves_the_excess_as_it_was():
    image, _ = data.synthetic_frame(96, seed=7, aurora=True, town_glow=2.0)
    image = image.astype(np.float32) / 255
    sky = data.sky_mask(image)
    plain = data.normalize_frame(image, sky, 1 / 255)
    placed = data.normalize_frame(image, sky, 1 / 255, position=True)
    assert plain.shape[2] == 3 and placed.shape[2] == 6
    np.testing.assert_array_equal(placed[..., :3], plain)
    np.testing.assert_array_equal(placed[..., 3:], data.position_channels(sky))
    # The pixel step reads the excess channels only.
    np.testing.assert_array_equal(segmentation.excess_map(placed, {"normalize": "background"}),
                                  segmentation.excess_map(plain, {"normalize": "background"}))


# ------------------------------------------------------------ P's sky: --sky_template

def smooth_excess(size, radius):
    """An excess (noise levels) rising toward the rim and to one side, as horizon and town glow do; and its sky."""
    sky = disk(size, radius)
    down, right = np.broadcast_arrays(*data.sky_coordinates(sky))
    field = 3 * (down ** 2 + right ** 2) + 2 * right
    return np.repeat(field[..., None], 3, axis=2).astype(np.float32), sky


def test_sky_template_reads_back_a_smooth_excess_whatever_the_frame_size():
    field, sky = smooth_excess(201, 90)
    # The median over frames: the frames 1 above and 1 below the field do not move it.
    template = data.sky_template([data.frame_template(field + offset, sky) for offset in (-1, 0, 1)])
    assert template.shape == (data.SKY_TEMPLATE_CELLS, data.SKY_TEMPLATE_CELLS, 3)
    for size, radius in ((201, 90), (101, 45), (300, 140)):
        other, other_sky = smooth_excess(size, radius)
        down, right = np.broadcast_arrays(*data.sky_coordinates(other_sky))
        inner = other_sky & (np.hypot(down, right) < 0.9)
        np.testing.assert_allclose(data.template_at(template, other_sky)[inner], other[inner], atol=0.15)
    # Cells beyond the sky take their nearest filled neighbour's value: no hole at the rim.
    assert not np.isnan(template).any()


def test_the_template_is_taken_off_the_excess_in_noise_levels():
    image, _ = data.synthetic_frame(96, seed=7, aurora=True, town_glow=2.0)
    image = image.astype(np.float32) / 255
    sky = data.sky_mask(image)
    plain = data.normalize_frame(image, sky, 1 / 255)
    less = data.normalize_frame(image, sky, 1 / 255, template=np.full((32, 32, 3), 2.0, np.float32))
    softening = data.NORMALIZE_SOFTENING
    np.testing.assert_allclose(softening * np.sinh(less[sky]), softening * np.sinh(plain[sky]) - 2.0, atol=1e-3)
    assert not less[~sky].any()


def test_a_template_of_aurora_free_frames_takes_out_glow_fixed_to_the_camera(tmp_path):
    """Town glow at one place on the horizon of every frame: the template of P's frames takes it off U's."""
    for k in range(4):
        image, _ = data.synthetic_frame(128, seed=700 + k, aurora=False, town_glow=2.0, cloud_cover=0)
        Image.fromarray(image).save(tmp_path / f"p_{k}.png")
    frame, _ = data.synthetic_frame(128, seed=800, aurora=False, town_glow=2.0, cloud_cover=0)
    preprocessing = {"version": data.PREPROCESSING_VERSION, "normalize": "background", "full_scale": 255.0,
                     "camera_range": [0.0, 255.0], "patch_size": 16, "background_sectors": 0, "grey_scales": None}
    template = data.build_sky_template(sorted(tmp_path.glob("*.png")), preprocessing)
    plain = data.prepare_frame(frame.astype(np.float32), 255.0, preprocessing)
    less = data.prepare_frame(frame.astype(np.float32), 255.0, {**preprocessing, "sky_template": template.tolist()})
    down, right = np.broadcast_arrays(*data.sky_coordinates(plain.sky))
    rim = plain.sky & (np.hypot(down, right) > 0.8)

    def bright(prepared):  # share of the rim more than 3 noise levels above its background
        return float(np.mean(data.NORMALIZE_SOFTENING * np.sinh(prepared.model_input[rim].max(axis=1)) > 3))

    assert bright(plain) > 0.3 and bright(less) < bright(plain) / 2, (bright(plain), bright(less))


def town_glow_template(folder, preprocessing):
    """A sky template of four aurora-free synthetic frames with town glow, built as train.py builds it."""
    for k in range(4):
        image, _ = data.synthetic_frame(128, seed=700 + k, aurora=False, town_glow=2.0, cloud_cover=0)
        Image.fromarray(image).save(folder / f"p_{k}.png")
    return data.build_sky_template(sorted(folder.glob("p_*.png")), preprocessing)


BRIGHT_PREPROCESSING = {"version": data.PREPROCESSING_VERSION, "normalize": "background", "full_scale": 255.0,
                        "camera_range": [0.0, 255.0], "patch_size": 16, "background_sectors": 0,
                        "grey_scales": None, "mask_bright": True}


def test_bright_sky_is_the_aurora_and_not_the_glow_p_shows(tmp_path):
    template = town_glow_template(tmp_path, BRIGHT_PREPROCESSING)
    clear, _ = data.synthetic_frame(128, seed=800, aurora=False, town_glow=2.0, cloud_cover=0)
    aurora, mask = data.synthetic_frame(128, seed=802, aurora=True, town_glow=2.0, cloud_cover=0)
    for frame in (clear, aurora):
        image = frame.astype(np.float32) / 255
        sky = data.sky_mask(image)
        bright = data.bright_sky(image, sky, 1 / 255, 0, False, template)
        assert not bright[~sky].any()
        if frame is clear:
            # The glow is in the template: against none, much more of a clear frame stands out.
            unexplained = data.bright_sky(image, sky, 1 / 255, 0, False, np.zeros_like(template))
            assert bright[sky].mean() < 0.6 * unexplained[sky].mean(), (bright[sky].mean(), unexplained[sky].mean())
        else:
            assert bright[mask > 0].mean() > 0.9


def test_bright_sky_left_out_changes_new_models_only_and_keeps_p_at_its_template(tmp_path):
    template = town_glow_template(tmp_path, BRIGHT_PREPROCESSING).tolist()
    frame, _ = data.synthetic_frame(128, seed=801, aurora=True, town_glow=2.0, cloud_cover=0)
    new = data.prepare_frame(frame.astype(np.float32), 255.0, {**BRIGHT_PREPROCESSING, "sky_template": template})
    # A model saved before mask_bright (preprocessing version 5) has no such key: prepared as it was trained.
    old = {key: value for key, value in BRIGHT_PREPROCESSING.items() if key != "mask_bright"}
    before = data.prepare_frame(frame.astype(np.float32), 255.0, {**old, "version": 5, "sky_template": template})
    image = frame.astype(np.float32) / 255
    np.testing.assert_array_equal(before.model_input,
                                  data.normalize_frame(image, before.sky, 1 / 255, template=template))
    assert not np.allclose(new.model_input, before.model_input)
    # The template is P's excess as prepared with its bright sky left out (a second reading of P): P's frames
    # then sit at it, where a template of the first reading alone leaves them 0.04 to 0.14 levels above.
    cells = []
    for path in sorted(tmp_path.glob("p_*.png")):
        pixels = np.asarray(Image.open(path)).astype(np.float32)
        prepared = data.prepare_frame(pixels, 255.0, {**BRIGHT_PREPROCESSING, "sky_template": template})
        cells.append(data.frame_template(data.NORMALIZE_SOFTENING * np.sinh(prepared.model_input), prepared.sky))
    assert abs(np.nanmedian(np.stack(cells))) < 0.03, np.nanmedian(np.stack(cells))


@pytest.mark.slow
def test_a_model_with_positions_and_a_sky_template_trains_segments_and_loads_without_the_project(
        tmp_path, capsys):
    P, _ = frames_folder(tmp_path / "P", 4, [False] * 4, seed=700, town_glow=2.0)
    U, U_masks = frames_folder(tmp_path / "U", 4, [True, False, True, True], seed=800, town_glow=2.0)
    out = tmp_path / "model"
    assert train.main(["--P_dataset", str(P), "--U_dataset", str(U), "--save_dir", str(out), "--model", "CNN",
                       "--patch_size", "16", "--P_n", "600", "--U_n", "800", "--epochs", "2", "--prior", "0.6",
                       "--position", "--sky_template", "--background_jitter", "2", "--min_elevation", "5",
                       "--quiet"]) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["position"] is True and config["preprocessing"]["position"] is True
    assert config["preprocessing"]["sky_template"]["cells"] == [data.SKY_TEMPLATE_CELLS] * 2
    assert config["background_jitter"] == 2.0
    assert (out / "sky_template.png").stat().st_size > 0
    model, stored = data.load_model(out / "model.keras")
    assert model.input_shape == (None, 16, 16, 6) and stored["version"] == data.PREPROCESSING_VERSION
    # The template travels in model.keras, so that segmentation takes it off as training did.
    assert np.asarray(stored["sky_template"]).shape == (data.SKY_TEMPLATE_CELLS, data.SKY_TEMPLATE_CELLS, 3)
    assert stored["mask_bright"] is True and config["preprocessing"]["mask_bright"] is True
    assert stored["min_elevation"] == 5.0
    assert segmentation.main(["--dataset", str(U), "--model", str(out / "model.keras"), "--save_dir",
                              str(tmp_path / "seg"), "--masks", str(U_masks), "--outputs", "mask", "--quiet"]) == 0
    rows = {row["name"]: row for row in segmentation_summary(tmp_path / "seg")}
    assert np.mean([float(rows[name]["iou"]) for name in ("f_00", "f_02", "f_03")]) > 0.2, rows
    # The model's horizon is cut without segmentation.py being told.
    image = data.read_image(U / "f_00.png")
    below = data.sky_mask(image) & (data.fisheye_elevation(data.sky_mask(image)) < 4.0)
    assert below.any() and not (np.asarray(Image.open(tmp_path / "seg" / "mask" / "f_00.png"))[below] > 0).any()
    # Stock layers only: loads in a bare process, 6 channels in, one logit out.
    script = ("import keras, numpy as np, sys; m = keras.models.load_model(sys.argv[1], compile=False); "
              "print(m.predict(np.zeros((2, 16, 16, 6), 'float32'), verbose=0).shape)")
    done = subprocess.run([sys.executable, "-c", script, str(out / "model.keras")], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0 and "(2, 1)" in done.stdout, done.stderr[-2000:]


def test_a_model_whose_channels_disagree_with_its_preprocessing_is_refused(tmp_path):
    keras = data.import_keras()
    inputs = keras.Input((16, 16, 6))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(inputs)))
    path = tmp_path / "model.keras"
    data.save_model(model, path, {"version": data.PREPROCESSING_VERSION, "normalize": "background",
                                  "camera_range": None, "full_scale": 255.0, "patch_size": 16})
    with pytest.raises(data.UsageError, match=r"model\.keras: its input has 6 channels but its preprocessing gives 3"):
        data.load_model(path)
