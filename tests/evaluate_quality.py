"""Measure segmentation quality on data the method was not tuned on; print tables, write figures.

    python tests/evaluate_quality.py                       # everything but the prior grid (hours on 2 cores)
    python tests/evaluate_quality.py --only held_out rare  # some sets
    python tests/evaluate_quality.py --only prior_grid     # real patches, 5 seeds x 5 priors (several hours)

Every training and segmentation runs through the command-line tools, as a
user runs them, with their defaults unless the set says otherwise, and
each set is trained with several seeds: the tables give the mean and the
worst seed. Frames, masks and models live in a temporary folder; the
figures and ``results.json`` go to ``--out`` (default Results/evaluation).

Sets (``--only``):

held_out
    The README's training command on ``dataset/``, then 16 frames the
    dataset and the tests never use (seeds from 900_000: 12 with aurora, 4
    without; 256 and 480 pixels; brightness 0.6-1.4, arc width 0.7-1.4,
    clouds 0-0.6). IoU over the aurora frames, the share of sky called
    aurora on the aurora-free ones, and the expected calibration error of
    the pixel P(aurora) written by ``--save_probability`` (10 equal bins,
    sky pixels, against the true masks) with its reliability diagram.
    Also the shipped frames themselves (the quick start's own number).
rare
    Rare aurora: P = 20 aurora-free frames, U = frames of which few hold
    aurora, so that the patch prior is about 0.90, 0.95 and 0.99; sky
    conditions of both drawn from the same range (moon up to 0.5, haze,
    town glow, clouds, an obstruction). ``--prior auto``. Scored on 8
    aurora and 8 aurora-free held-out frames of the same kind.
real_backgrounds
    Real aurora-free frames with generator aurora added (``inject``):
    THEMIS Gillam (moonlit; P = the frames of 06:00, 06:02 and 06:04 UT,
    U = those of 06:01, 06:03 and 06:05, minutes apart) and THEMIS Gakona
    (dark sky with horizon glow; P = the first 11 frames of its minute,
    U = the last 11, 3 to 33 s later). Half of the U frames get aurora; U
    is segmented as a user would (the frames the model trained on), and
    the clean U frames are real aurora-free frames that are not in P.
real_patches
    NIPR's real 32x32 patches (``../shared/real_patches``): P = 40
    background, U = 40 other background + 60 aurora (true prior 0.4), the
    remaining 24 + 40 classified by the saved model; 5 random splits, with
    ``--prior 0.4`` and ``--prior auto``.
prior_grid
    The same protocol on split 0 with 5 seeds x priors 0.35, 0.38, 0.40,
    0.42, 0.45: how much the result depends on luck and on the prior.
pixel_step
    No training: the true patch labels (aurora anywhere in the patch centred
    on the pixel) given to ``segmentation.finish_mask`` as the model's
    P(aurora), on the held-out frames and the real backgrounds' U frames:
    the best IoU the pixel step allows a perfect patch classifier.
contact_sheet
    Real aurora frames segmented by models trained on aurora-free frames of
    the same camera where ``../shared/real_frames`` has them (TREx RGB, KHO
    KeoSentry), and for the OATH THEMIS frames with P from THEMIS Gillam
    and Gakona (other stations of the same network): a figure to look at.

Each set also scores the physical anchor: aurora where the frame's excess
over a local median background (21x21 at quarter resolution) exceeds 4
robust standard deviations of the sky, in G - (R + B) / 2 for colour frames
and in the brightness for grey ones; a trained model should beat it.
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
SHARED = ROOT.parent / "shared"
REAL_PATCHES = SHARED / "real_patches"
REAL_FRAMES = SHARED / "real_frames"
FIRST_SEED = 900_000
SETS = ("held_out", "rare", "real_backgrounds", "real_patches", "prior_grid", "contact_sheet", "pixel_step")

import data  # noqa: E402  (after the path is set)


# ------------------------------------------------------------ running the tools

def run(script, *arguments, check=True):
    """Run train.py or segmentation.py like a user, from the project root; returns (seconds, exit code, output)."""
    started = time.time()
    result = subprocess.run([sys.executable, script, *map(str, arguments)], cwd=ROOT, capture_output=True, text=True)
    if check and result.returncode not in (0, 1):
        sys.exit(f"evaluate_quality.py: {script} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.time() - started, result.returncode, result.stdout + result.stderr


# train.py flags every training of the run adds (--model, --patch_size, --background_jitter, --position,
# --sky_template: main()); a training's own flags come after them and so win (the real patches are
# 32x32 and have no sky around them to place them in).
TRAIN_FLAGS = []
# Flags of the sky (--min_elevation: main()) that training and segmentation of whole frames both take; the
# real patches have no horizon.
SKY_FLAGS = []


def train_model(folder, P, U, seed, *extra, whole_frames=True):
    """train.py on folders P and U into ``folder``; returns (config or None when training failed, seconds)."""
    seconds, code, output = run("train.py", "--P_dataset", P, "--U_dataset", U, "--save_dir", folder, "--seed",
                                seed, "--quiet", *TRAIN_FLAGS, *(SKY_FLAGS if whole_frames else []), *extra,
                                check=False)
    if code == 2 and ("look alike" in output or "look like U's aurora" in output):
        # A stop a user would see on these frames (no aurora found, or P frames taken for aurora): a failed
        # run, not a broken evaluation.
        print(f"evaluate_quality.py: {folder}: {output.strip().splitlines()[-1]}", flush=True)
        return None, seconds
    if code not in (0, 3):
        sys.exit(f"evaluate_quality.py: train.py failed ({code}):\n{output[-3000:]}")
    config = json.loads((Path(folder) / "config.json").read_text()) if (Path(folder) / "config.json").exists() else None
    return (config if code == 0 else None), seconds


def segment(model, frames, masks, out, *extra):
    """segmentation.py with true masks; returns the summary rows (without the mean row)."""
    run("segmentation.py", "--dataset", frames, "--model", model, "--save_dir", out, "--masks", masks, "--quiet",
        "--outputs", "mask", "probability", *SKY_FLAGS, *extra)
    with open(Path(out) / "summary.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["file"] != "mean"]


def scores(rows):
    """Mean and worst IoU over frames with true aurora, mean share of sky called aurora over frames without."""
    ious = [float(row["iou"]) for row in rows if row["iou"]]
    clear = [float(row["false_aurora"]) for row in rows if row["false_aurora"]]
    return {"iou": float(np.mean(ious)) if ious else None, "iou_min": float(np.min(ious)) if ious else None,
            "false_aurora": float(np.mean(clear)) if clear else None,
            "false_aurora_max": float(np.max(clear)) if clear else None, "frames": len(rows)}


# Noise levels by which dimmed_sky lowers the sky.
DIMMING = (1, 2, 4)


def dimmed_sky(model_path, p_folder, frames=4, per_frame=500, depths=DIMMING):
    """Share of the P frames' sky patches the model calls aurora once the sky is made darker than its background.

    Aurora only adds light, so sky below its background is never aurora.
    But wide aurora lifts the background estimate (``data.sky_background``)
    and leaves the sky around it below it, in U frames only: a cue that
    tells U from P without being aurora, which training can learn in its
    place. Each patch's excess is lowered by d noise levels in every
    excess channel (outside the sky it stays 0; position channels, if the
    model has them, are kept). Returns {str(d): share} for d in
    ``depths`` and 0, or None for a model that sees the frame itself
    (``normalize`` "none").
    """
    model, preprocessing = data.load_model(model_path)
    if preprocessing.get("normalize") != "background":
        return None
    paths = data.list_images(p_folder)
    rng = np.random.default_rng(0)
    patches = []
    for path in paths[::max(1, len(paths) // frames)][:frames]:
        frame = next(data.read_frames(path))
        prepared = data.prepare_frame(frame.pixels, frame.full_scale, preprocessing)
        patches.append(data.sample_patches(prepared.model_input, prepared.sky, data.patch_size_of(model), per_frame,
                                           rng)[0])
    patches = np.concatenate(patches)
    return {str(depth): float(np.mean(data.predict_logits(model, data.shift_excess(patches, -depth)) < 0))
            for depth in (0, *depths)}


# ------------------------------------------------------------ frames with true masks

def save_frame(folder, name, image, mask=None, masks=None):
    Image.fromarray(image).save(folder / f"{name}.png")
    if masks is not None:
        Image.fromarray((mask if mask is not None else np.zeros(image.shape[:2], bool)).astype(np.uint8) * 255).save(
            masks / f"{name}.png")


def synthetic_set(folder, count, aurora, seed, size=256, conditions=None, masks=True, **settings):
    """``count`` generator frames into folder/frames (and folder/masks); ``aurora`` a bool per frame."""
    rng = np.random.default_rng(seed)
    frames, mask_folder = folder / "frames", (folder / "masks" if masks else None)
    frames.mkdir(parents=True)
    if mask_folder:
        mask_folder.mkdir()
    for k in range(count):
        drawn = dict(brightness=float(rng.uniform(0.6, 1.4)), arc_width=float(rng.uniform(0.7, 1.4)),
                     cloud_cover=float(rng.uniform(0.0, 0.6)))
        drawn.update(conditions(rng) if conditions else {})
        drawn.update(settings)
        frame_size = size(k) if callable(size) else size
        image, mask = data.synthetic_frame(frame_size, seed=seed + k, aurora=bool(aurora[k]), **drawn)
        save_frame(frames, f"frame_{k:03d}", image, mask, mask_folder)
    return frames, mask_folder


def night_conditions(rng):
    """Sky conditions of an ordinary night at one site: some moon and haze, town glow, an obstruction."""
    return dict(moon=float(rng.choice([0.0, rng.uniform(0, 0.5)])), haze=float(rng.choice([0.0, rng.uniform(0, 0.4)])),
                town_glow=float(rng.uniform(0, 0.6)), obstruction=True)


def patch_prior(mask_folder, frame_folder, patch_size=16):
    """The fraction of sky pixels whose centred patch holds no aurora: the prior of sky-centred U patches."""
    from scipy import ndimage

    background = total = 0
    for path in sorted(Path(mask_folder).glob("*.png")):
        mask = np.asarray(Image.open(path)) > 0
        sky = data.sky_mask(data.read_image(Path(frame_folder) / path.name))
        near = ndimage.maximum_filter(mask.astype(np.uint8), size=patch_size) > 0
        background += int((~near & sky).sum())
        total += int(sky.sum())
    return background / total


# ------------------------------------------------------------ calibration and the anchor

def calibration(probability_folder, mask_folder, frame_folder, bins=10):
    """Expected calibration error of pixel P(aurora) over sky pixels, and the reliability table."""
    counts, confidence, accuracy = np.zeros(bins), np.zeros(bins), np.zeros(bins)
    for path in sorted(Path(probability_folder).glob("*.npy")):
        probability = np.load(path)
        truth = np.asarray(Image.open(Path(mask_folder) / f"{path.stem}.png")) > 0
        sky = data.sky_mask(data.read_image(Path(frame_folder) / f"{path.stem}.png"))
        if SKY_FLAGS:
            sky = data.Horizon(float(SKY_FLAGS[1])).cut(sky)
        p, t = probability[sky], truth[sky]
        index = np.minimum((p * bins).astype(int), bins - 1)
        counts += np.bincount(index, minlength=bins)
        confidence += np.bincount(index, weights=p, minlength=bins)
        accuracy += np.bincount(index, weights=t, minlength=bins)
    filled = counts > 0
    mean_p = np.where(filled, confidence / np.maximum(counts, 1), np.nan)
    share = np.where(filled, accuracy / np.maximum(counts, 1), np.nan)
    ece = float(np.nansum(counts * np.abs(mean_p - share)) / counts.sum())
    return ece, {"counts": counts.tolist(), "mean_probability": mean_p.tolist(), "aurora_share": share.tolist()}


def reliability_figure(table, path, title):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], color="grey", lw=0.8)
    axes.plot(table["mean_probability"], table["aurora_share"], marker="o")
    axes.set_xlabel("P(aurora) of the pixels in a bin")
    axes.set_ylabel("share of them that is aurora")
    axes.set_title(title, fontsize=9)
    figure.savefig(path, dpi=100)


def anchor_mask(image, sky):
    """The physical anchor: excess over a local median background above 4 robust standard deviations of the sky."""
    from scipy import ndimage

    grey = np.allclose(image[..., 0], image[..., 1]) and np.allclose(image[..., 1], image[..., 2])
    signal = image[..., 1] if grey else image[..., 1] - (image[..., 0] + image[..., 2]) / 2
    small = signal[::4, ::4]
    background = ndimage.median_filter(small, size=21, mode="nearest")
    background = np.kron(background, np.ones((4, 4)))[: signal.shape[0], : signal.shape[1]]
    excess = signal - background
    sky_excess = excess[sky]
    spread = 1.4826 * np.median(np.abs(sky_excess - np.median(sky_excess)))
    return (excess > np.median(sky_excess) + 4 * max(spread, 1e-6)) & sky


def anchor_scores(frame_folder, mask_folder):
    """The anchor's IoU over aurora frames and its false aurora over aurora-free frames."""
    import segmentation

    rows = []
    for path in sorted(Path(frame_folder).glob("*.png")):
        image = data.read_image(path)
        sky = data.sky_mask(image)
        truth = np.asarray(Image.open(Path(mask_folder) / path.name)) > 0
        scored = segmentation.frame_scores(anchor_mask(image, sky), truth, sky)
        rows.append({key: "" if value is None else value for key, value in scored.items()})
    return scores(rows)


# ------------------------------------------------------------ the sets

def held_out_frames(work):
    """The 16 held-out generator frames (12 with aurora) and their masks, in work/held_out."""
    return synthetic_set(work / "held_out", 16, [k % 4 != 3 for k in range(16)], FIRST_SEED,
                         size=lambda k: 256 if k % 2 == 0 else 480)


def held_out(work, seeds, out):
    frames, masks = held_out_frames(work)
    results = []
    for seed in seeds:
        model_dir = work / f"quick_start_{seed}"
        config, seconds = train_model(model_dir, "dataset/Positive", "dataset/Unlabelled", seed)
        if config is None:
            results.append({"seed": seed, "failed": True, "train_seconds": seconds})
            continue
        rows = segment(model_dir / "model.keras", frames, masks, work / f"held_out_{seed}")
        ece, table = calibration(work / f"held_out_{seed}" / "probability", masks, frames)
        shipped = segment(model_dir / "model.keras", "dataset/Unlabelled", "dataset/masks", work / f"shipped_{seed}")
        results.append({"seed": seed, "train_seconds": seconds, "prior": config["prior"], **scores(rows),
                        "ece": ece, "reliability": table, "shipped": scores(shipped),
                        "dimmed_sky": dimmed_sky(model_dir / "model.keras", ROOT / "dataset/Positive")})
        flags = "".join(f"_{text.lstrip('-')}" if text.startswith("--") else text for text in TRAIN_FLAGS)
        reliability_figure(table, out / f"reliability_seed{seed}{flags}.png",
                           f"held-out synthetic frames, seed {seed}: ECE {ece:.3f}")
    return {"seeds": results, "anchor": anchor_scores(frames, masks)}


RARE_SETS = {0.90: dict(frames=40, aurora=12, cover=(0.04, 0.35)),
             0.95: dict(frames=40, aurora=6, cover=(0.04, 0.35)),
             0.99: dict(frames=60, aurora=3, cover=(0.02, 0.15))}


def rare(work, seeds, out):
    results = {}
    for prior, spec in RARE_SETS.items():
        folder = work / f"rare_{prior}"
        rng = np.random.default_rng(int(prior * 1000))
        P, _ = synthetic_set(folder / "P", 20, [False] * 20, FIRST_SEED + 10_000, conditions=night_conditions,
                             masks=False)
        aurora = np.zeros(spec["frames"], bool)
        aurora[rng.permutation(spec["frames"])[: spec["aurora"]]] = True
        U, U_masks = synthetic_set(folder / "U", spec["frames"], aurora, FIRST_SEED + 20_000 + int(prior * 100),
                                   conditions=night_conditions, cover=spec["cover"])
        test, test_masks = synthetic_set(folder / "test", 16, [k < 8 for k in range(16)], FIRST_SEED + 30_000,
                                         conditions=night_conditions, cover=spec["cover"])
        truth = patch_prior(U_masks, U)
        runs = []
        for seed in seeds:
            config, seconds = train_model(folder / f"model_{seed}", P, U, seed)
            if config is None:
                runs.append({"seed": seed, "failed": True, "train_seconds": seconds})
                continue
            rows = segment(folder / f"model_{seed}" / "model.keras", test, test_masks, folder / f"seg_{seed}")
            runs.append({"seed": seed, "train_seconds": seconds, "prior": config["prior"], **scores(rows),
                         "dimmed_sky": dimmed_sky(folder / f"model_{seed}" / "model.keras", P)})
        results[str(prior)] = {"true_prior": truth, "runs": runs, "anchor": anchor_scores(test, test_masks)}
    return results


def inject(image, rng, sky, amplitude=(8, 40), threshold=5.0):
    """Add generator aurora to a real [0, 1] frame: amplitude in sky-noise units; mask where it adds > threshold."""
    rows, cols = np.nonzero(sky)
    centre_row, centre_col = (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2
    radius = max(rows.max() - rows.min(), cols.max() - cols.min()) / 2
    v = ((np.arange(image.shape[0], dtype=np.float32) - centre_row) / radius)[:, None]
    u = ((np.arange(image.shape[1], dtype=np.float32) - centre_col) / radius)[None, :]
    fields = [data._smooth_field(rng, image.shape[0], image.shape[1], radius / scale) for scale in (2.5, 5, 9)]
    for _ in range(6):
        emission = data._aurora_structures(rng, u, v, fields, rng.uniform(0.5, 1.2))
        if 0.03 < (emission.max(axis=2) > 0.1)[sky].mean() < 0.4:
            break
    background = data.sky_background(image, sky)
    noise = float(np.max(data.pixel_noise(image, sky, 1e-6, background)))
    grey = np.allclose(image[..., 0], image[..., 1])
    emission = np.repeat(emission[..., 1:2], 3, axis=2) if grey else emission
    emission = emission / max(float(emission.max()), 1e-6) * rng.uniform(*amplitude) * noise
    emission[~sky] = 0
    return np.clip(image + emission, 0, 1), (emission.max(axis=2) > threshold * noise) & sky


def real_background_frames(camera):
    """(P frames, U frames) as uint16 counts, of a camera with no aurora, minutes (or seconds) apart."""
    if camera == "themis_gill":
        folder = REAL_FRAMES / "themis_gill"
        stack = [frame.pixels[..., 0] for frame in data.read_frames(folder / "20140310_0600_gill_themis19_full.pgm.gz")]
        minute = {m: [data.read_frames(p).__next__().pixels[..., 0]
                      for p in sorted((folder / "png16").glob(f"20140310_06{m:02d}_*.png"))] for m in range(1, 6)}
        return stack[::4] + minute[2] + minute[4], minute[1] + minute[3] + minute[5]
    frames = [frame.pixels[..., 0] for frame in data.read_frames(REAL_FRAMES / "themis_gako" /
                                                                 "thg_l1_asf_gako_2011010617_v01.cdf")]
    return frames[:11], frames[12:]


def real_background_set(folder, camera):
    """Write folder/P, folder/U (every other frame with aurora injected) and folder/U_masks; returns (low, high)."""
    P_frames, U_frames = real_background_frames(camera)
    low, high = np.percentile(np.concatenate([f.ravel()[::13] for f in P_frames + U_frames]), [0.5, 99.9])
    for name in ("P", "U", "U_masks"):
        (folder / name).mkdir(parents=True)
    for k, counts in enumerate(P_frames):
        Image.fromarray(counts.astype(np.uint16)).save(folder / "P" / f"p_{k:02d}.png")
    rng = np.random.default_rng(7)
    for k, counts in enumerate(U_frames):
        image = np.repeat(data.scale_counts(counts, low, high)[..., None], 3, axis=2)
        sky = data.sky_mask(image)
        mask = np.zeros(sky.shape, bool)
        if k % 2:
            image, mask = inject(image, rng, sky)
        injected = np.rint(low + image[..., 0] * (high - low)).clip(0, 65535).astype(np.uint16)
        Image.fromarray(injected).save(folder / "U" / f"u_{k:02d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "U_masks" / f"u_{k:02d}.png")
    return low, high


def real_backgrounds(work, seeds, out):
    results = {}
    for camera in ("themis_gill", "themis_gako"):
        folder = work / camera
        low, high = real_background_set(folder, camera)
        runs = []
        for seed in seeds:
            config, seconds = train_model(folder / f"model_{seed}", folder / "P", folder / "U", seed)
            if config is None:
                runs.append({"seed": seed, "failed": True, "train_seconds": seconds})
                continue
            rows = segment(folder / f"model_{seed}" / "model.keras", folder / "U", folder / "U_masks",
                           folder / f"seg_{seed}")
            runs.append({"seed": seed, "train_seconds": seconds, "prior": config["prior"], **scores(rows),
                         "dimmed_sky": dimmed_sky(folder / f"model_{seed}" / "model.keras", folder / "P")})
        scaled = folder / "U_scaled"
        scaled.mkdir()
        for path in sorted((folder / "U").glob("*.png")):
            counts = np.asarray(Image.open(path)).astype(np.float32)
            Image.fromarray(np.rint(data.scale_counts(counts, low, high) * 255).astype(np.uint8)).save(scaled / path.name)
        results[camera] = {"P_frames": len(list((folder / "P").glob("*.png"))),
                           "U_frames": len(list((folder / "U").glob("*.png"))), "runs": runs,
                           "anchor": anchor_scores(scaled, folder / "U_masks")}
    return results


def pixel_step_scores(frames, masks, training_frames, patch_size=16):
    """IoU of true patch labels before and after ``segmentation.finish_mask``, over the frames with aurora."""
    from types import SimpleNamespace

    from scipy import ndimage

    import segmentation
    import train

    settings = SimpleNamespace(normalize="auto", patch_size=patch_size, background_sectors=0, position=False,
                               sky_template=False)
    preprocessing = train.resolve_preprocessing(settings, [p for f in training_frames for p in data.list_images(f)])
    before, after = [], []
    for path in sorted(Path(frames).glob("*.png")):
        frame = next(data.read_frames(path))
        prepared = data.prepare_frame(frame.pixels, frame.full_scale, preprocessing)
        truth = segmentation.read_true_mask(Path(masks) / path.name, prepared.sky.shape) & prepared.sky
        if not truth.any():
            continue
        # "Aurora anywhere in the patch centred on the pixel": what a perfect model says.
        patch_truth = ndimage.binary_dilation(truth, np.ones((patch_size, patch_size), bool)) & prepared.sky
        refined, _ = segmentation.finish_mask(prepared, patch_truth.astype(np.float32), patch_truth, patch_size,
                                              preprocessing)
        before.append(segmentation.mask_metrics(patch_truth, truth)["iou"])
        after.append(segmentation.mask_metrics(refined, truth)["iou"])
    return {"frames": len(after), "patch_labels_iou": float(np.mean(before)), "pixel_step_iou": float(np.mean(after)),
            "pixel_step_iou_min": float(np.min(after))}


def pixel_step(work, seeds, out):
    """The pixel step's ceiling: true patch labels as the model's P(aurora) (1 and 0), no training."""
    frames, masks = held_out_frames(work)
    results = {"held_out": pixel_step_scores(frames, masks, [ROOT / "dataset/Positive", ROOT / "dataset/Unlabelled"])}
    for camera in ("themis_gill", "themis_gako"):
        real_background_set(work / camera, camera)
        results[camera] = pixel_step_scores(work / camera / "U", work / camera / "U_masks",
                                            [work / camera / "P", work / camera / "U"])
    return results


def real_patch_split(work, split, prior, seed):
    """One run of the real-patch protocol; returns accuracy, AUC, prior used, seconds."""
    rng = np.random.default_rng(split)
    background = sorted((REAL_PATCHES / "background").glob("*.jpg"))
    aurora = sorted((REAL_PATCHES / "aurora").glob("*.jpg"))
    background = [background[i] for i in rng.permutation(len(background))]
    aurora = [aurora[i] for i in rng.permutation(len(aurora))]
    folder = work / f"real_{split}_{prior}_{seed}"
    for name, files in (("P", background[:40]), ("U", background[40:80] + aurora[:60])):
        (folder / name).mkdir(parents=True)
        for path in files:
            shutil.copy(path, folder / name / f"{path.parent.name}_{path.name}")
    # The labels describe whole 32x32 patches, so the model sees whole patches.
    config, seconds = train_model(folder / "model", folder / "P", folder / "U", seed, "--prior", prior,
                                  "--patch_size", "32", "--no-position", "--no-sky_template",
                                  "--background_jitter", "0", whole_frames=False)
    if config is None:
        return {"split": split, "prior_flag": prior, "seed": seed, "failed": True, "seconds": seconds}
    model, _ = data.load_model(folder / "model" / "model.keras")
    test_background = np.stack([data.read_image(path) for path in background[80:]])
    test_aurora = np.stack([data.read_image(path) for path in aurora[60:]])
    logits_background = data.predict_logits(model, test_background)
    logits_aurora = data.predict_logits(model, test_aurora)
    right = np.sum(logits_background > 0) + np.sum(logits_aurora <= 0)
    auc = float(np.mean((logits_background[:, None] > logits_aurora[None, :])
                        + 0.5 * (logits_background[:, None] == logits_aurora[None, :])))
    return {"split": split, "prior_flag": prior, "seed": seed, "prior": config["prior"], "seconds": seconds,
            "accuracy": float(right / (len(logits_background) + len(logits_aurora))), "wrong": int(64 - right),
            "auc": auc}


def real_patches(work, seeds, out):
    runs = [real_patch_split(work, split, prior, split) for prior in ("0.4", "auto") for split in range(5)]
    return {"runs": runs}


def prior_grid(work, seeds, out):
    runs = [real_patch_split(work, 0, prior, seed) for prior in ("0.35", "0.38", "0.4", "0.42", "0.45")
            for seed in range(5)]
    return {"runs": runs}


def contact_sheet(work, seeds, out):
    """Real aurora frames segmented by a model of their own camera (or network); one figure."""
    import segmentation

    cameras = {
        "TREx RGB, Gillam": ([REAL_FRAMES / "trex_gill" / "20200508_060500_122643_gill_rgb-04_320ms_full.png"],
                             [REAL_FRAMES / "trex_gill" / "20211030_060500_149606_gill_rgb-04_320ms_burst.png"]),
        "KHO KeoSentry 557.7 nm": ([REAL_FRAMES / "kho_svalbard" / "png16" / "W8446B18_2020-12-11_20-09-36.img.png"],
                                   [REAL_FRAMES / "kho_svalbard" / "png16" / "W8446B185_2017-12-18_03-14-57.img.png"]),
        "OATH THEMIS (P: Gillam, Gakona)": (
            sorted((REAL_FRAMES / "themis_gill" / "png16").glob("*.png"))
            + sorted((REAL_FRAMES / "themis_gako" / "png16").glob("*.png")),
            sorted((REAL_FRAMES / "oath_themis").glob("*.png"))[:4]),
    }
    panels, notes = [], {}
    for k, (camera, (P_files, U_files)) in enumerate(cameras.items()):
        folder = work / f"sheet_{k}"
        for name, files in (("P", P_files), ("U", U_files)):
            (folder / name).mkdir(parents=True)
            for path in files:
                shutil.copy(path, folder / name / path.name)
        config, _ = train_model(folder / "model", folder / "P", folder / "U", seeds[0])
        if config is None:
            notes[camera] = "training failed (collapsed)"
            continue
        notes[camera] = f"prior {config['prior']:.3f}"
        model, preprocessing = data.load_model(folder / "model" / "model.keras")
        for path in sorted((folder / "U").glob("*.png"))[:2]:
            frame = next(data.read_frames(path))
            prepared = data.prepare_frame(frame.pixels, frame.full_scale, preprocessing)
            p_aurora, mask, _ = segmentation.segment_frame(model, prepared, preprocessing)
            panels.append((f"{camera}: {path.name[:28]}", segmentation.display_image(prepared.image, prepared.sky),
                           p_aurora, mask))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 3.6 * max(1, len(panels))), layout="constrained")
    FigureCanvasAgg(figure)
    for row, (title, shown, p_aurora, mask) in enumerate(panels):
        step = max(1, max(mask.shape) // 600)
        axes = [figure.add_subplot(len(panels), 3, 3 * row + column + 1) for column in range(3)]
        axes[0].imshow(shown[::step, ::step])
        axes[0].set_title(title, fontsize=8)
        axes[1].imshow(p_aurora[::step, ::step], cmap=segmentation.COLOUR_MAP, vmin=0, vmax=1)
        axes[1].set_title("P(aurora)", fontsize=8)
        axes[2].imshow(segmentation.overlay(shown, mask)[::step, ::step])
        axes[2].set_title(f"mask: {mask.mean():.1%} of the frame", fontsize=8)
        for ax in axes:
            ax.set_axis_off()
    figure.savefig(out / "contact_sheet.png", dpi=80)
    return {"cameras": notes, "figure": str(out / "contact_sheet.png")}


# ------------------------------------------------------------ tables

def summarize(name, result):
    """Lines of the printed table for one set."""
    lines = []

    def runs_line(label, runs):
        done = [run for run in runs if not run.get("failed")]
        failed = len(runs) - len(done)
        if not done:
            return f"{label}: every training failed"
        parts = []
        ious = [run["iou"] for run in done if run.get("iou") is not None]
        if ious:
            worst = min(run["iou_min"] for run in done if run.get("iou_min") is not None)
            parts.append(f"IoU mean {np.mean(ious):.3f} (seeds {', '.join(f'{v:.3f}' for v in ious)}; worst frame {worst:.3f})")
        clear = [run["false_aurora"] for run in done if run.get("false_aurora") is not None]
        if clear:
            parts.append(f"aurora-free sky called aurora {np.mean(clear):.2%} (worst seed {max(clear):.2%})")
        dimmed = [run["dimmed_sky"] for run in done if run.get("dimmed_sky")]
        if dimmed:
            shares = ", ".join(f"{np.mean([d[str(depth)] for d in dimmed]):.0%}" for depth in (0, *DIMMING))
            parts.append(f"clear P sky lowered by {', '.join(map(str, (0, *DIMMING)))} noise levels called aurora "
                         f"{shares}")
        priors = [run["prior"] for run in done if "prior" in run]
        if priors:
            parts.append(f"prior {', '.join(f'{p:.3f}' for p in priors)}")
        if failed:
            parts.append(f"{failed} training(s) failed")
        return f"{label}: " + "; ".join(parts)

    if name == "held_out":
        lines.append(runs_line("held-out synthetic frames (12 aurora, 4 clear)", result["seeds"]))
        done = [run for run in result["seeds"] if not run.get("failed")]
        if done:
            eces = ", ".join(f"{run['ece']:.3f}" for run in done)
            lines.append(f"  calibration of pixel P(aurora): ECE {eces}")
            lines.append(runs_line("  shipped frames (quick start, --masks dataset/masks)",
                                   [{**run["shipped"], "prior": run["prior"]} for run in done]))
        lines.append(runs_line("  anchor (excess > 4 sigma), held-out frames", [result["anchor"]]))
    elif name == "rare":
        for prior, entry in result.items():
            if not isinstance(entry, dict):  # the set's "minutes"
                continue
            lines.append(runs_line(f"rare aurora, true patch prior {entry['true_prior']:.3f}", entry["runs"]))
            lines.append(runs_line("  anchor", [entry["anchor"]]))
    elif name == "real_backgrounds":
        for camera, entry in result.items():
            if not isinstance(entry, dict):
                continue
            lines.append(runs_line(f"{camera}: real sky + generator aurora ({entry['P_frames']} P, {entry['U_frames']} U)",
                                   entry["runs"]))
            lines.append(runs_line("  anchor", [entry["anchor"]]))
    elif name in ("real_patches", "prior_grid"):
        runs = [run for run in result["runs"] if not run.get("failed")]
        failed = len(result["runs"]) - len(runs)
        for flag in sorted({run["prior_flag"] for run in result["runs"]}):
            chosen = [run for run in runs if run["prior_flag"] == flag]
            if not chosen:
                lines.append(f"real patches, --prior {flag}: every training failed")
                continue
            accuracy = [run["accuracy"] for run in chosen]
            used = ", ".join(f"{run['prior']:.3f}" for run in chosen)
            lines.append(f"real patches, --prior {flag} ({len(chosen)} runs): accuracy mean {np.mean(accuracy):.3f}, "
                         f"worst {min(accuracy):.3f} ({max(run['wrong'] for run in chosen)} of 64 wrong), AUC worst "
                         f"{min(run['auc'] for run in chosen):.3f}, prior used {used}")
        if failed:
            lines.append(f"  {failed} training(s) failed")
    elif name == "pixel_step":
        for label, entry in result.items():
            if isinstance(entry, dict):
                lines.append(f"pixel step on true patch labels, {label} ({entry['frames']} aurora frames): IoU "
                             f"{entry['patch_labels_iou']:.3f} before, {entry['pixel_step_iou']:.3f} after "
                             f"(worst frame {entry['pixel_step_iou_min']:.3f})")
    elif name == "contact_sheet":
        lines.append(f"contact sheet {result['figure']}: " + "; ".join(f"{k}: {v}" for k, v in result["cameras"].items()))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SETS, default=[s for s in SETS if s != "prior_grid"],
                        help="the sets to measure (default: all but prior_grid)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of each set")
    parser.add_argument("--out", default="Results/evaluation", help="folder for results.json and the figures")
    parser.add_argument("--model", help="train.py's --model for every training (default: train.py's own); the "
                                        "results go to results.json as '<set> --model <model>'")
    parser.add_argument("--patch_size", type=int, help="train.py's --patch_size for every training but the real "
                                                       "patches' (default: train.py's own); the results go to "
                                                       "results.json as '<set> --patch_size <n>'")
    parser.add_argument("--position", action="store_true", help="train.py's --position for every training of "
                                                                "whole frames; the results go to results.json as "
                                                                "'<set> --position'")
    parser.add_argument("--sky_template", action="store_true", help="train.py's --sky_template for every training "
                                                                    "of whole frames; the results go to "
                                                                    "results.json as '<set> --sky_template'")
    parser.add_argument("--background_jitter", type=float, help="train.py's --background_jitter for every training "
                                                                 "of whole frames; the results go to results.json as "
                                                                 "'<set> --background_jitter <levels>'")
    parser.add_argument("--min_elevation", type=float, help="train.py's and segmentation.py's --min_elevation for "
                                                             "every set of whole frames, the scores within that sky; "
                                                             "the results go to results.json as "
                                                             "'<set> --min_elevation <degrees>'")
    args = parser.parse_args(argv)
    SKY_FLAGS[:] = ["--min_elevation", str(args.min_elevation)] if args.min_elevation is not None else []
    TRAIN_FLAGS[:] = [text for flag in ("model", "patch_size", "background_jitter") if getattr(args, flag) is not None
                      for text in (f"--{flag}", str(getattr(args, flag)))] + [
        f"--{flag}" for flag in ("position", "sky_template") if getattr(args, flag)]
    suffix = "".join(f" {text}" for text in TRAIN_FLAGS + SKY_FLAGS)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            if name in ("real_patches", "prior_grid") and not REAL_PATCHES.is_dir():
                print(f"evaluate_quality.py: {REAL_PATCHES} not found; {name} skipped")
                continue
            started = time.time()
            key = name + suffix
            results[key] = globals()[name](Path(tmp), args.seeds, out)
            results[key]["minutes"] = round((time.time() - started) / 60, 1)
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            lines = ([f"{key}:"] if suffix else []) + summarize(name, results[key])
            print("\n".join(lines) + f"  [{results[key]['minutes']} min]", flush=True)


if __name__ == "__main__":
    main()
