"""A small version of tests/evaluate_quality.py: a regression that breaks
segmentation quality fails CI. Short training, loose bound."""

import csv

import numpy as np
import pytest
from PIL import Image

import data
import segmentation
import train
from conftest import ROOT


@pytest.mark.slow
def test_short_training_segments_heldout_frames(tmp_path):
    frames, masks = tmp_path / "frames", tmp_path / "masks"
    frames.mkdir()
    masks.mkdir()
    # Seeds and settings the shipped dataset does not use.
    for i, (brightness, width) in enumerate([(1.2, 1.0), (1.0, 1.3), (1.3, 0.8)]):
        image, mask = data.synthetic_frame(256, seed=700_001 + i, brightness=brightness, arc_width=width)
        Image.fromarray(image).save(frames / f"f{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"f{i}.png")
    model_dir = tmp_path / "model"
    assert train.main(["--P_dataset", str(ROOT / "dataset" / "Positive"),
                       "--U_dataset", str(ROOT / "dataset" / "Unlabelled"),
                       "--save_dir", str(model_dir), "--prior", "0.8", "--patch_size", "16",
                       "--P_n", "1000", "--U_n", "2000", "--epochs", "2", "--quiet"]) == 0
    assert segmentation.main(["--dataset", str(frames), "--model", str(model_dir / "model.keras"),
                              "--save_dir", str(tmp_path / "seg"), "--masks", str(masks), "--quiet"]) == 0
    with open(tmp_path / "seg" / "summary.csv", newline="") as f:
        iou = [float(r["iou"]) for r in csv.DictReader(f) if r["file"] != "mean"]
    assert len(iou) == 3
    assert min(iou) > 0.5, iou


def test_dimmed_sky_counts_clear_sky_called_aurora_once_below_its_background(tmp_path):
    import keras

    import evaluate_quality

    P = tmp_path / "P"
    P.mkdir()
    for k in range(2):
        image, _ = data.synthetic_frame(128, seed=700_100 + k, aurora=False)
        Image.fromarray(image).save(P / f"p{k}.png")
    # A model that calls a patch aurora (logit < 0) when its mean excess is below the background.
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1)])
    model.layers[-1].set_weights([np.ones((3, 1), np.float32), np.zeros(1, np.float32)])
    preprocessing = {"version": data.PREPROCESSING_VERSION, "normalize": "background", "full_scale": 255.0,
                     "camera_range": None, "patch_size": 16, "background_sectors": 0, "grey_scales": None}
    data.save_model(model, tmp_path / "model.keras", preprocessing)
    shares = evaluate_quality.dimmed_sky(tmp_path / "model.keras", P, per_frame=200)
    assert list(shares) == ["0", *map(str, evaluate_quality.DIMMING)]
    assert shares["0"] < 0.2 and shares[str(evaluate_quality.DIMMING[-1])] > 0.9, shares
    assert list(shares.values()) == sorted(shares.values()), shares
    data.save_model(model, tmp_path / "none.keras", {**preprocessing, "normalize": "none"})
    assert evaluate_quality.dimmed_sky(tmp_path / "none.keras", P) is None
