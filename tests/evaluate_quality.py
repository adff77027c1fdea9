"""Measure segmentation quality on data the training never saw; print one table.

    python tests/evaluate_quality.py            # everything (about 20 minutes on 2 CPU cores)
    python tests/evaluate_quality.py --skip_real
    # Other frame sets, with a model from the README's quick start:
    python tests/evaluate_quality.py --model Results/model.keras --skip_real --prior_fractions \
        --first_seed 700000 --frames 24      # the frames segmentation.py's refinement was tuned on
    python tests/evaluate_quality.py --model Results/model.keras --skip_real --prior_fractions \
        --arc_width 0.3 0.5 --frames 8        # thin arcs

Two evaluations, each run through the command-line tools as a user runs them:

1. Held-out synthetic frames. Frames are drawn with ``data.synthetic_frame``
   from seeds the shipped dataset and the tests do not use (from 900_000 up),
   at 256 and 480 pixels, with brightness, arc width and cloud cover varied.
   A model is trained with the README's command on the shipped
   ``dataset/Positive`` and ``dataset/Unlabelled`` (or ``--model`` reuses
   one), then ``segmentation.py`` segments the frames with its defaults and
   ``--masks``, and again with ``--no-refine`` to show what the mask
   refinement adds (``--first_seed`` and ``--arc_width`` draw other frame
   sets). Reported: mean IoU, the worst frame, and how many frames
   score below 0.6 and how many of those have almost no aurora (< 1% of the
   frame), where a handful of wrong pixels makes the IoU meaningless.
2. Real patches (``../shared/real_patches``, read in place when present,
   never copied into the repository): P = 40 background patches, U = 40 other
   background + 60 aurora patches (true prior 0.4); ``train.py --prior 0.4``;
   the remaining 24 background + 40 aurora patches are classified by the
   saved model in inference mode (logit > 0 = background). Accuracy and AUC
   over 5 random splits, mean and spread; then the same with
   ``--prior auto``, with the estimated prior.
3. The class prior estimator (``train.estimate_prior``) on synthetic U
   patches with 100%, 50% and 10% of frames holding aurora, against the
   truth of ``train.patch_is_background``.

This is not a pytest test (it takes minutes); tests/test_quality.py is the
small version that CI runs.
"""

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REAL_PATCHES = ROOT.parent / "shared" / "real_patches"
FIRST_SEED = 900_000


def run(command):
    """Run a CLI like a user, from the project root; stop on failure."""
    started = time.time()
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"evaluate_quality.py: {' '.join(command[:1])} failed:\n{result.stderr[-3000:]}")
    return time.time() - started, result.stdout


def make_heldout_frames(folder, n_frames, seed=FIRST_SEED, arc_width=(0.7, 1.4)):
    """Frames and masks with varied settings, half 256 and half 480 pixels; arc widths in ``arc_width``."""
    import data

    rng = np.random.default_rng(seed)
    (folder / "frames").mkdir(parents=True)
    (folder / "masks").mkdir()
    settings = []
    for i in range(n_frames):
        size = 256 if i % 2 == 0 else 480
        params = dict(brightness=float(rng.uniform(0.6, 1.4)), arc_width=float(rng.uniform(*arc_width)),
                      cloud_cover=float(rng.uniform(0.0, 0.6)))
        image, mask = data.synthetic_frame(size, seed=seed + i, aurora=True, **params)
        Image.fromarray(image).save(folder / "frames" / f"heldout_{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"heldout_{i:03d}.png")
        settings.append({"size": size, **params})
    return settings


def synthetic_evaluation(work, model, n_frames, epochs, first_seed=FIRST_SEED, arc_width=(0.7, 1.4)):
    rows = []
    settings = make_heldout_frames(work / "heldout", n_frames, first_seed, arc_width)
    if model is None:
        model = work / "model" / "model.keras"
        command = ["train.py", "--P_dataset", "dataset/Positive", "--U_dataset", "dataset/Unlabelled",
                   "--save_dir", str(model.parent), "--quiet"]
        if epochs:
            command += ["--epochs", str(epochs)]
        seconds, _ = run(command)
        config = json.loads((model.parent / "config.json").read_text())
        rows.append(("train on dataset/ (README command)", f"prior used {config['prior']:.3f}", seconds))
    # The defaults (refined masks), then --no-refine: the gain of the refinement.
    for flag, label in (([], ""), (["--no-refine"], ", --no-refine")):
        out = work / f"segmentation{flag[0] if flag else ''}"
        seconds, _ = run(["segmentation.py", "--dataset", str(work / "heldout" / "frames"), "--model", str(model),
                          "--save_dir", str(out), "--masks", str(work / "heldout" / "masks"), "--quiet", *flag])
        with open(out / "summary.csv", newline="") as f:
            frames = [r for r in csv.DictReader(f) if r["file"] != "mean"]
        iou = np.array([float(r["iou"]) for r in frames])
        precision = np.mean([float(r["precision"]) for r in frames])
        recall = np.mean([float(r["recall"]) for r in frames])
        truth_fraction = np.array([
            np.mean(np.asarray(Image.open(work / "heldout" / "masks" / r["file"])) > 0) for r in frames])
        low = iou < 0.6
        rows.append((f"held-out synthetic frames ({len(frames)}, 256 and 480 px){label}",
                     f"mean IoU {iou.mean():.3f} (precision {precision:.3f}, recall {recall:.3f}), "
                     f"worst {iou.min():.3f}, {low.sum()} below 0.6 ({np.sum(low & (truth_fraction < 0.01))} "
                     f"with < 1% aurora)", seconds))
        print(f"segmentation.py defaults{label}:")
        for r, s in zip(frames, settings):
            print(f"  {r['file']}  size {s['size']}  brightness {s['brightness']:.2f}  "
                  f"arc_width {s['arc_width']:.2f}  clouds {s['cloud_cover']:.2f}  IoU {float(r['iou']):.3f}  "
                  f"precision {float(r['precision']):.3f}  recall {float(r['recall']):.3f}")
    return rows


def auc(background_scores, aurora_scores):
    """Probability that a background patch scores above an aurora patch (ties half)."""
    b = np.asarray(background_scores)[:, None]
    a = np.asarray(aurora_scores)[None, :]
    return float(np.mean((b > a) + 0.5 * (b == a)))


def real_split(work, split, prior):
    """One split of the real-patch protocol; returns accuracy, AUC, prior used."""
    import keras

    rng = np.random.default_rng(split)
    background = sorted((REAL_PATCHES / "background").glob("*.jpg"))
    aurora = sorted((REAL_PATCHES / "aurora").glob("*.jpg"))
    background = [background[i] for i in rng.permutation(len(background))]
    aurora = [aurora[i] for i in rng.permutation(len(aurora))]
    folder = work / f"real_{split}_{prior}"
    for name, files in (("P", background[:40]), ("U", background[40:80] + aurora[:60])):
        (folder / name).mkdir(parents=True)
        for path in files:
            shutil.copy(path, folder / name / f"{path.parent.name}_{path.name}")
    seconds, _ = run(["train.py", "--P_dataset", str(folder / "P"), "--U_dataset", str(folder / "U"),
                      "--save_dir", str(folder / "model"), "--prior", str(prior), "--seed", str(split),
                      # The labels describe whole 32x32 patches, so the model sees whole patches.
                      "--patch_size", "32", "--quiet"])
    import data

    model = keras.models.load_model(folder / "model" / "model.keras", compile=False)
    test_bg = np.stack([data.read_image(p) for p in background[80:]])
    test_au = np.stack([data.read_image(p) for p in aurora[60:]])
    logits_bg = model.predict(test_bg, verbose=0).ravel()
    logits_au = model.predict(test_au, verbose=0).ravel()
    accuracy = (np.sum(logits_bg > 0) + np.sum(logits_au <= 0)) / (len(logits_bg) + len(logits_au))
    config = json.loads((folder / "model" / "config.json").read_text())
    return accuracy, auc(logits_bg, logits_au), config["prior"], seconds


def real_evaluation(work, splits):
    rows = []
    for prior in ("0.4", "auto"):
        results = np.array([real_split(work, split, prior)[:4] for split in range(splits)])
        accuracy, area, used, seconds = results.T
        label = "true prior 0.4" if prior == "0.4" else "--prior auto"
        detail = (f"accuracy {accuracy.mean():.3f} (min {accuracy.min():.3f}, max {accuracy.max():.3f}), "
                  f"AUC {area.mean():.3f} (min {area.min():.3f})")
        if prior == "auto":
            detail += f", prior estimate {used.mean():.3f} (min {used.min():.3f}, max {used.max():.3f})"
        rows.append((f"real patches, {splits} splits, {label}", detail, seconds.sum()))
    return rows


def frame_patches(n_frames, total, aurora_fraction, patch_size, seed):
    """Random patches and their mask patches from fresh synthetic 256-pixel frames.

    ``aurora_fraction`` of the frames have aurora; settings vary as in the
    held-out set. Returns (patches (n, p, p, 3) float32, masks (n, p, p) bool).
    """
    import data

    rng = np.random.default_rng(seed)
    with_aurora = np.zeros(n_frames, bool)
    with_aurora[rng.permutation(n_frames)[:int(round(aurora_fraction * n_frames))]] = True
    per_frame = int(np.ceil(total / n_frames))
    patches, masks = [], []
    for aurora in with_aurora:
        image, mask = data.synthetic_frame(256, seed=int(rng.integers(2**31)), aurora=bool(aurora),
                                           brightness=rng.uniform(0.6, 1.4), arc_width=rng.uniform(0.7, 1.4),
                                           cloud_cover=rng.uniform(0.0, 0.6))
        # Image and mask as one array, so both are cut at the same positions.
        stacked = np.concatenate([image / np.float32(255), mask[..., None].astype(np.float32)], axis=2)
        cut = data.extract_patches(stacked, patch_size, n=per_frame, rng=rng)
        patches.append(cut[..., :3])
        masks.append(cut[..., 3] > 0.5)
    return np.concatenate(patches)[:total], np.concatenate(masks)[:total]


def prior_evaluation(fractions, patch_size=16):
    """train.estimate_prior against the truth (train.patch_is_background) on
    U folders with several amounts of aurora; P from 20 aurora-free frames."""
    import train

    rows = []
    P, _ = frame_patches(20, 2000, 0.0, patch_size, seed=FIRST_SEED + 1000)
    for i, fraction in enumerate(fractions):
        U, masks = frame_patches(24, 4000, fraction, patch_size, seed=FIRST_SEED + 2000 + i)
        truth = train.patch_is_background(masks).mean()
        started = time.time()
        result = train.estimate_prior(P, U, patch_size, seed=0)
        rows.append((f"prior, synthetic U with {fraction:.0%} aurora frames ({patch_size} px patches)",
                     f"estimate {result['estimate']:.3f} +- {result['uncertainty']:.3f}, truth {truth:.3f}, "
                     f"error {result['estimate'] - truth:+.3f}", time.time() - started))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--frames", type=int, default=16, help="held-out synthetic frames")
    parser.add_argument("--first_seed", type=int, default=FIRST_SEED,
                        help="generator seed of the first held-out frame (700000: the frames the refinement's "
                        "constants were chosen on)")
    parser.add_argument("--arc_width", type=float, nargs=2, default=[0.7, 1.4], metavar=("MIN", "MAX"),
                        help="range of the held-out frames' arc widths (0.3 0.5: thin arcs)")
    parser.add_argument("--model", default=None, help="reuse this model.keras instead of training one")
    parser.add_argument("--epochs", type=int, default=None, help="override train.py's default epochs")
    parser.add_argument("--splits", type=int, default=5, help="random splits of the real patches")
    parser.add_argument("--skip_real", action="store_true", help="skip the real-patch evaluation")
    parser.add_argument("--skip_frames", action="store_true", help="skip the held-out frame evaluation")
    parser.add_argument("--prior_fractions", type=float, nargs="*", default=[1.0, 0.5, 0.1],
                        help="fractions of U frames with aurora for the prior evaluation (none: skip it)")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_frames:
            rows += synthetic_evaluation(work, args.model, args.frames, args.epochs, args.first_seed,
                                         tuple(args.arc_width))
        rows += prior_evaluation(args.prior_fractions)
        if args.skip_real:
            pass
        elif REAL_PATCHES.is_dir():
            rows += real_evaluation(work, args.splits)
        else:
            print(f"evaluate_quality.py: {REAL_PATCHES} not found; real-patch evaluation skipped")
    width = max(len(r[0]) for r in rows)
    print(f"\n{'evaluation'.ljust(width)}  {'seconds':>8}  result")
    for name, result, seconds in rows:
        print(f"{name.ljust(width)}  {seconds:8.1f}  {result}")


if __name__ == "__main__":
    main()
