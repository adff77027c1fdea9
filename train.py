"""Train the aurora patch classifier from positive (background) and unlabeled frames.

    python train.py --P_dataset dataset/Positive --U_dataset dataset/Unlabelled

Reads random patches from the two folders, fits a ResNet18 (or a small CNN)
with the nnPU risk of Kiryo et al. (2017) -- or uPU, or PNU when a folder of
aurora examples is given -- on batches that always hold both P and U, and
writes into ``--save_dir``:

* ``model.keras``  the trained model, stock Keras layers only: it loads with
  ``keras.models.load_model(path, compile=False)`` in any process. Contract:
  input float32 RGB in [0, 1] of shape (n, patch, patch, 3); output (n, 1),
  one logit per patch; logit > 0 means background (positive), so
  P(aurora) = sigmoid(-logit).
* ``config.json``  every resolved setting, the library versions, the data
  folders and patch counts.
* ``history.csv``  per epoch: the training loss, its parts Rp+ (positive_risk)
  and Rn (negative_risk), and on a held-out P/U split the PU zero-one risk and
  the nnPU risk.
* ``loss.png`` and ``prediction.png``  learning curves, and the histogram of
  logits on held-out P and U.

Training runs on a GPU when TensorFlow sees one; nothing to configure.
"""

import argparse
import csv
import json
import math
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import data
import segmentation

PRIOR_DEFAULT = 0.4
MIN_STEPS_PER_EPOCH = 50


class CommandLineError(ValueError):
    """A user-facing problem with the flags or files; main() reports it in one line."""


# ----------------------------------------------------------------- model

def build_resnet18(patch_size=32, bn_momentum=0.9):
    """The seed's ResNet18 patch classifier, from stock Keras layers only.

    7x7 stride-2 stem, 3x3 stride-2 max-pool, four stages of two basic
    blocks (64, 128, 256, 512 filters), global average pooling, two Dense 256
    tanh layers and one logit. Input float32 RGB in [0, 1], shape
    (n, patch_size, patch_size, 3); output (n, 1), > 0 means background.

    ``bn_momentum`` is 0.9 rather than Keras's 0.99 because a few hundred
    steps are not enough for 0.99 moving averages to settle; `train` also
    recalibrates them each epoch (see `recalibrate_batch_norm`).
    """
    import keras
    from keras import layers

    def conv_bn(x, filters, kernel, stride, name, relu=True):
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same",
                          use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
        return layers.Activation("relu", name=f"{name}_relu")(x) if relu else x

    def basic_block(x, filters, stride, name):
        shortcut = x
        y = conv_bn(x, filters, 3, stride, f"{name}_a")
        y = conv_bn(y, filters, 3, 1, f"{name}_b", relu=False)
        if stride != 1 or x.shape[-1] != filters:
            shortcut = conv_bn(x, filters, 1, stride, f"{name}_proj", relu=False)
        y = layers.Add(name=f"{name}_add")([shortcut, y])
        return layers.Activation("relu", name=f"{name}_out")(y)

    inputs = keras.Input((patch_size, patch_size, 3), name="patch")
    x = conv_bn(inputs, 64, 7, 2, "stem")
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, filters in enumerate([64, 128, 256, 512]):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            x = basic_block(x, filters, stride, f"stage{stage + 1}_block{block + 1}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(256, activation="tanh", name="dense1")(x)
    x = layers.Dense(256, activation="tanh", name="dense2")(x)
    outputs = layers.Dense(1, name="logit")(x)
    return keras.Model(inputs, outputs, name="resnet18")


def build_cnn(patch_size=32, bn_momentum=0.9):
    """The seed's small CNN, a fast alternative with the same contract."""
    import keras
    from keras import layers

    inputs = keras.Input((patch_size, patch_size, 3), name="patch")
    x = inputs
    for i, filters in enumerate([32, 64]):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"bn{i + 1}")(x)
        x = layers.Activation("relu", name=f"relu{i + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(256, activation="tanh", name="dense1")(x)
    outputs = layers.Dense(1, name="logit")(x)
    return keras.Model(inputs, outputs, name="cnn")


MODELS = {"ResNet18": build_resnet18, "CNN": build_cnn}


def recalibrate_batch_norm(model, patches):
    """Set every BatchNormalization's moving statistics to those of ``patches``.

    Inference mode normalises with moving averages; after a short training
    they lag the batch statistics the weights were fitted with, and the seed's
    model then called every patch background. One forward pass in training
    mode with momentum 0 makes the moving statistics exactly those of a large
    batch drawn like the training batches.
    """
    import keras

    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(patches, training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum


def split_holdout(patches, n_holdout, rng):
    """Shuffle and split (n, ...) into (n - n_holdout, ...) and (n_holdout, ...)."""
    order = rng.permutation(len(patches))
    return patches[order[n_holdout:]], patches[order[:n_holdout]]


def load_patches(folder, total, patch_size, rng, quiet):
    """About ``total`` random patches from the images of ``folder``."""

    n_images = len(data.list_images(folder))
    per_image = max(1, math.ceil(total / n_images))
    patches = data.get_data(folder, patch_size, per_image, rng, quiet=quiet)
    if len(patches) > total:
        patches = patches[rng.choice(len(patches), total, replace=False)]
    return patches


# -------------------------------------------------------------- CLI

def prior_value(text):
    """argparse type for --prior: ``auto`` (estimate it, see `estimate_prior`) or a number strictly between 0 and 1."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), received {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected 0 < prior < 1, received {text}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage block) and exit with 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = OneLineParser(
        prog="train.py",
        description="Train a patch classifier with nnPU/uPU/PNU from folders of frames.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--P_dataset", required=True, help="folder of positive (background-only) images")
    parser.add_argument("--U_dataset", required=True, help="folder of unlabeled frames")
    parser.add_argument("--N_dataset", default=None,
                        help="optional folder of negative (aurora) images: switches to PNU learning, needs --eta")
    parser.add_argument("--save_dir", default="Results", help="where model.keras and the reports are written")
    parser.add_argument("--prior", type=prior_value, default="auto",
                        help="class prior: fraction of background patches among the U patches, in (0, 1), "
                             "or 'auto' to estimate it from P and U (BBE, see README)")
    parser.add_argument("--nnPU", action=argparse.BooleanOptionalAction, default=True,
                        help="non-negative PU risk (Kiryo et al. 2017); --no-nnPU gives unbiased uPU")
    parser.add_argument("--loss", choices=["sigmoid", "logistic"], default="sigmoid", help="surrogate loss")
    parser.add_argument("--beta", type=float, default=0.0, help="nnPU: correct when the negative risk < -beta")
    parser.add_argument("--gamma", type=float, default=1.0, help="nnPU: step size of the correction, in [0, 1]")
    parser.add_argument("--eta", type=float, default=None, help="PNU mix in [-1, 1] (with --N_dataset)")
    parser.add_argument("--model", choices=sorted(MODELS), default="ResNet18", help="network")
    parser.add_argument("--patch_size", type=data.positive_int, default=16,
                        help="patch side in pixels (16 gives sharper masks than 32: see README, Quality)")
    parser.add_argument("--U_n", type=data.positive_int, default=4000, help="number of U patches drawn")
    parser.add_argument("--P_n", type=data.positive_int, default=2000, help="number of P patches drawn")
    parser.add_argument("--N_n", type=data.positive_int, default=2000, help="number of N patches drawn (PNU)")
    parser.add_argument("--P_n_sacrifice", type=int, default=None,
                        help="P patches held out of training for validation (default: 10%% of P)")
    parser.add_argument("--val_fraction", type=float, default=0.1,
                        help="fraction of U patches held out for validation")
    parser.add_argument("--epochs", type=data.positive_int, default=8,
                        help=f"passes over the U patches (at least {MIN_STEPS_PER_EPOCH} batches each)")
    parser.add_argument("--early_stopping", action=argparse.BooleanOptionalAction, default=False,
                        help="stop when the held-out PU zero-one risk has not improved for --patience epochs, "
                             "and keep the weights of its best epoch")
    parser.add_argument("--patience", type=data.positive_int, default=3,
                        help="epochs without improvement before --early_stopping stops")
    parser.add_argument("--batchsize", type=data.positive_int, default=64, help="patches per batch, half P and half U")
    parser.add_argument("--lr", type=float, default=3e-4,
                        help="Adam learning rate (1e-3 can saturate the sigmoid loss before features form)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="random flips and 90-degree rotations of training patches")
    parser.add_argument("--seed", type=int, default=0, help="random seed for patches, splits and weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier model in --save_dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def check_args(args):
    """Cross-flag checks argparse cannot express; raises CommandLineError."""
    if args.N_dataset is not None and args.eta is None:
        raise CommandLineError("--N_dataset needs --eta (PNU mix in [-1, 1])")
    if args.eta is not None and not -1.0 <= args.eta <= 1.0:
        raise CommandLineError(f"--eta: expected -1 <= eta <= 1, received {args.eta}")
    if args.eta is not None and args.N_dataset is None:
        raise CommandLineError("--eta needs --N_dataset (a folder of aurora examples)")
    if args.beta < 0:
        raise CommandLineError(f"--beta: expected beta >= 0, received {args.beta}")
    if not 0.0 <= args.gamma <= 1.0:
        raise CommandLineError(f"--gamma: expected 0 <= gamma <= 1, received {args.gamma}")
    if not args.lr > 0:
        raise CommandLineError(f"--lr: expected a positive learning rate, received {args.lr}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise CommandLineError(f"--val_fraction: expected 0 <= fraction < 1, received {args.val_fraction}")
    if args.batchsize < 2 or (args.N_dataset and args.batchsize < 3):
        raise CommandLineError(f"--batchsize: every batch needs P and U patches (and N for PNU), received {args.batchsize}")
    if args.P_n_sacrifice is not None and not 0 <= args.P_n_sacrifice < args.P_n:
        raise CommandLineError(f"--P_n_sacrifice: expected 0 <= n < --P_n ({args.P_n}), received {args.P_n_sacrifice}")
    for flag in ("P_dataset", "U_dataset", "N_dataset"):
        folder = getattr(args, flag)
        if folder is not None and not Path(folder).is_dir():
            raise CommandLineError(f"--{flag}: {folder} is not a folder")
    model_path = Path(args.save_dir) / "model.keras"
    if model_path.exists() and not args.overwrite:
        raise CommandLineError(f"{model_path} exists; pass --overwrite to replace it")
    if Path(args.save_dir).exists() and not Path(args.save_dir).is_dir():
        raise CommandLineError(f"--save_dir: {args.save_dir} exists and is not a folder")


# ------------------------------------------------------ class prior

# Estimated priors outside this range are not trusted: below it U would be
# almost all aurora, above it almost none, and either way one bad threshold
# of a noisy classifier moves the estimate a lot.
PRIOR_RANGE = (0.05, 0.99)


def patch_is_background(mask_patches, tolerance=0.0):
    """Which patches count as background (positive): the prior's one definition.

    Parameters
    ----------
    mask_patches : ndarray of shape (n, p, p), bool
        True marks an aurora pixel.
    tolerance : float
        Largest fraction of aurora pixels a background patch may hold; 0
        means no aurora pixel at all.

    Returns
    -------
    background : ndarray of shape (n,), bool

    Notes
    -----
    The class prior is the mean of this over the U patches training draws.
    A patch with no aurora pixel looks exactly like a P patch, so this is the
    quantity a P-versus-U estimator sees (measured in the README's "Class
    prior" section against the alternative "centre pixel not aurora").
    """
    mask_patches = np.asarray(mask_patches, dtype=bool)
    if mask_patches.ndim != 3:
        raise ValueError(f"Invalid mask_patches: expected shape (n, p, p), received {mask_patches.shape}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"Invalid tolerance: expected 0 <= tolerance < 1, received {tolerance}")
    return mask_patches.mean(axis=(1, 2)) <= tolerance


def _bbe_point(p_sorted, u_sorted, delta, gamma, min_p_mass=0.0):
    """BBE on sorted score arrays: the estimate q_U(c*) / q_P(c*) and its bound half-width."""
    n_p, n_u = len(p_sorted), len(u_sorted)
    thresholds = np.unique(np.concatenate([p_sorted, u_sorted]))
    # q(c): fraction of scores >= c, for every candidate threshold c.
    q_p = (n_p - np.searchsorted(p_sorted, thresholds, side="left")) / n_p
    q_u = (n_u - np.searchsorted(u_sorted, thresholds, side="left")) / n_u
    usable = q_p >= max(min_p_mass, 1 / n_p) - 1e-12
    q_p, q_u = q_p[usable], q_u[usable]
    # Garg et al. (2021), eq. (3): the DKW deviation of both tails, divided by q_P(c).
    width = (1 + gamma) * (np.sqrt(np.log(4 / delta) / (2 * n_p)) + np.sqrt(np.log(4 / delta) / (2 * n_u))) / q_p
    ratio = q_u / q_p
    best = np.argmin(ratio + width)
    return float(np.clip(ratio[best], 0.0, 1.0)), float(width[best])


def bbe_prior(p_scores, u_scores, delta=0.1, gamma=0.01, n_bootstrap=200, seed=0, min_p_mass=0.0):
    """Best Bin Estimation of the fraction of U that is drawn like P.

    Garg, Wu, Smola, Balakrishnan & Lipton, "Mixture proportion estimation
    and PU learning: a modern approach", NeurIPS 2021, Algorithm 1. With a
    P-versus-U classifier's scores on held-out samples, for each threshold c
    q_P(c) and q_U(c) are the fractions of P and U scoring >= c. Where the
    top bin holds (almost) only P-like samples, q_U(c) / q_P(c) is the prior.
    The threshold minimises the upper confidence bound

        q_U(c) / q_P(c) + (1 + gamma) / q_P(c) * (sqrt(log(4/delta) / (2 n_P)) + sqrt(log(4/delta) / (2 n_U)))

    over the held-out scores, and the estimate is q_U(c*) / q_P(c*) clipped to [0, 1].

    Parameters
    ----------
    p_scores : ndarray of shape (n_P,), float
        Scores of held-out positive (background) samples, higher = more P-like.
    u_scores : ndarray of shape (n_U,), float
        Scores of held-out unlabeled samples, from the same classifier.
    delta : float
        Confidence level of the bound, in (0, 1).
    gamma : float
        The bound's slack (the paper's gamma), >= 0.
    n_bootstrap : int
        Bootstrap resamples of the held-out scores for the uncertainty; 0 skips it.
    seed : int
        Seed of the bootstrap.
    min_p_mass : float
        Only thresholds with q_P(c) >= min_p_mass are candidates; 0 is the
        paper's BBE. A floor keeps the top bin out of the extreme tail of P,
        where P and the background in U differ most when they come from
        different frames (see `estimate_prior`).

    Returns
    -------
    estimate : float
        In [0, 1].
    uncertainty : float
        Standard deviation of the estimate over bootstrap resamples of the
        held-out P and U scores (threshold re-chosen each time). It covers
        the sampling of the held-out data, not the training of the
        classifier; the paper's bound half-width at c* is far wider on small
        sets (about 0.4 for 40 P and 60 U at delta 0.1) and is not reported.
    """
    p_scores = np.sort(np.asarray(p_scores, dtype=np.float64).ravel())
    u_scores = np.sort(np.asarray(u_scores, dtype=np.float64).ravel())
    for name, scores in (("p_scores", p_scores), ("u_scores", u_scores)):
        if scores.size == 0:
            raise ValueError(f"Invalid {name}: expected at least one score, received none")
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"Invalid {name}: expected finite scores, received NaN or infinity")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"Invalid delta: expected 0 < delta < 1, received {delta}")
    if gamma < 0:
        raise ValueError(f"Invalid gamma: expected gamma >= 0, received {gamma}")
    if not 0.0 <= min_p_mass <= 1.0:
        raise ValueError(f"Invalid min_p_mass: expected 0 <= min_p_mass <= 1, received {min_p_mass}")
    estimate, _ = _bbe_point(p_scores, u_scores, delta, gamma, min_p_mass)
    if n_bootstrap < 1:
        return estimate, float("nan")
    rng = np.random.default_rng(seed)
    resampled = [
        _bbe_point(np.sort(rng.choice(p_scores, p_scores.size)), np.sort(rng.choice(u_scores, u_scores.size)),
                   delta, gamma, min_p_mass)[0]
        for _ in range(n_bootstrap)
    ]
    return estimate, float(np.std(resampled))


def _rank_auc(p_scores, u_scores):
    """Mann-Whitney AUC of P over U (ties count half) and its z-score against 0.5."""
    from scipy.stats import rankdata

    n_p, n_u = len(p_scores), len(u_scores)
    ranks = rankdata(np.concatenate([p_scores, u_scores]))
    auc = (ranks[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_u)
    # Standard deviation of the AUC when P and U come from one distribution.
    null_sd = np.sqrt((n_p + n_u + 1) / (12 * n_p * n_u))
    return float(auc), float((auc - 0.5) / null_sd)


def _random_gain_layer():
    """The RandomGain layer class, built on first use so that importing train.py does not import Keras."""
    import keras

    class RandomGain(keras.layers.Layer):
        """Multiply each training patch by a random brightness and per-channel colour gain.

        Sky level and tint differ from frame to frame; with a few dozen frames a
        P-versus-U classifier otherwise tells P frames from U frames by their
        colour alone and BBE's top bin holds only P (see `estimate_prior`).
        Inference passes patches through unchanged.
        """

        def __init__(self, gain, tint, seed=0, **kwargs):
            super().__init__(**kwargs)
            self.gain, self.tint = float(gain), float(tint)
            self.generator = keras.random.SeedGenerator(seed)

        def call(self, x, training=False):
            if not training:
                return x
            n = keras.ops.shape(x)[0]
            log_gain = keras.random.uniform((n, 1, 1, 1), -self.gain, self.gain, seed=self.generator)
            log_gain = log_gain + keras.random.normal((n, 1, 1, 3), stddev=self.tint, seed=self.generator)
            return keras.ops.clip(x * keras.ops.exp(log_gain), 0.0, 1.0)

    return RandomGain


def _RandomGain(gain, tint, seed=0):
    return _random_gain_layer()(gain, tint, seed=seed)


def _fold_of(n, groups, folds, rng):
    """Cross-fitting fold of each of n samples; samples of one group (source image) share a fold."""
    if groups is None:
        return rng.permutation(n) % folds
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"Invalid groups: expected shape ({n},), received {groups.shape}")
    names, index = np.unique(groups, return_inverse=True)
    if len(names) < folds:
        return rng.permutation(n) % folds
    return (rng.permutation(len(names)) % folds)[index]


def estimate_prior(P, U, patch_size=None, seed=0, quiet=True, folds=2, epochs=3, min_steps=150,
                   batch_size=64, delta=0.1, min_separation=3.0, p_groups=None, u_groups=None,
                   gain=0.5, tint=0.15, min_p_mass=0.9):
    """Estimate the class prior of ``U`` (fraction of background) with BBE on a cross-fitted P-versus-U CNN.

    The patches are split into ``folds`` folds. For each fold a small CNN
    (``build_cnn``) learns P (1) against U (0) with binary cross-entropy on
    balanced, augmented batches from the other folds, and scores the fold's
    own P and U in inference mode, so every patch gets a held-out score and
    BBE sees all the data (with 40 P patches that matters). Each fold's scores
    become ranks within that fold: the folds are drawn alike, so ranks are
    comparable across folds where raw logits of different models are not.

    Parameters
    ----------
    P : ndarray of shape (n_P, p, p, 3), float32 in [0, 1]
        Positive (background) patches.
    U : ndarray of shape (n_U, p, p, 3), float32 in [0, 1]
        Unlabeled patches; the prior is the fraction of them that are background.
    patch_size : int, optional
        Patch side; taken from ``P`` when omitted, checked when given.
    seed : int
        Seeds the folds, the batches and the weights.
    quiet : bool
        No progress output.
    folds : int
        Cross-fitting folds, >= 2.
    epochs : int
        Passes over each fold's training U patches ...
    min_steps : int
        ... but at least this many batches, so that tiny sets still train.
    batch_size : int
        Patches per batch, half P and half U.
    delta : float
        BBE's confidence level.
    min_separation : float
        The held-out AUC must exceed 0.5 by this many null standard
        deviations, or P and U count as indistinguishable.
    p_groups, u_groups : ndarray of shape (n_P,) and (n_U,), optional
        Source image of each patch; patches of one image then share a fold.
    gain, tint : float
        Training-time photometric augmentation of the classifier: log
        brightness gain uniform in [-gain, gain] and per-channel log gain
        with standard deviation ``tint`` (0 and 0 switch it off).
    min_p_mass : float
        `bbe_prior`'s floor on q_P(c). 0.9 rather than the paper's 0 because P
        and U come from different frames (or nights): a flexible classifier
        then finds P-only regions in the extreme tail, where plain BBE
        measured 0.33 on the real patches (true 0.40) against 0.38 here, and
        far too low on synthetic frames (README, "Class prior").

    Returns
    -------
    result : dict
        ``prior`` the value to train with; ``estimate`` and ``uncertainty``
        from `bbe_prior`; ``method`` "BBE"; ``auc`` the held-out P-versus-U
        AUC and ``separation`` its z-score against 0.5; ``fallback`` True when
        ``prior`` is not the estimate; ``message`` one line saying what was
        done; ``n_P``, ``n_U`` and ``seconds``.

    Warns
    -----
    UserWarning
        P and U are indistinguishable (``prior`` falls back to
        ``PRIOR_DEFAULT``), or the estimate lies outside ``PRIOR_RANGE``
        (``prior`` is clipped into it).
    """
    import keras


    P = np.asarray(P, dtype=np.float32)
    U = np.asarray(U, dtype=np.float32)
    for name, patches in (("P", P), ("U", U)):
        if patches.ndim != 4 or patches.shape[1] != patches.shape[2] or patches.shape[3] != 3:
            raise ValueError(f"Invalid {name}: expected shape (n, p, p, 3), received {patches.shape}")
        if len(patches) < 2 * folds:
            raise ValueError(f"Invalid {name}: expected at least {2 * folds} patches for {folds} folds, received {len(patches)}")
    if P.shape[1:] != U.shape[1:]:
        raise ValueError(f"Invalid patches: P is {P.shape[1:]} but U is {U.shape[1:]}")
    patch_size = P.shape[1] if patch_size is None else patch_size
    if patch_size != P.shape[1]:
        raise ValueError(f"Invalid patch_size: expected the patches' side {P.shape[1]}, received {patch_size}")

    started = time.time()
    rng = np.random.default_rng(seed)
    p_fold = _fold_of(len(P), p_groups, folds, rng)
    u_fold = _fold_of(len(U), u_groups, folds, rng)
    p_scores = np.empty(len(P))
    u_scores = np.empty(len(U))

    def cross_entropy(y_true, y_pred):
        # Labels +1 P, -1 U (make_pu_dataset's) become 1 and 0. (batch,) logits.
        y_true = keras.ops.reshape((y_true + 1.0) / 2.0, (-1,))
        return keras.losses.binary_crossentropy(y_true, keras.ops.reshape(y_pred, (-1,)), from_logits=True)

    for fold in range(folds):
        keras.utils.set_random_seed(seed + fold)
        P_fit, U_fit = P[p_fold != fold], U[u_fold != fold]
        steps = max(epochs * math.ceil(len(U_fit) / (batch_size - batch_size // 2)), min_steps)
        batches = data.make_pu_dataset(P_fit, U_fit, batch_size, seed=seed + fold, augment=True, steps_per_epoch=steps)
        model = build_cnn(patch_size)
        trainer = keras.Sequential([_RandomGain(gain, tint, seed=seed + fold), model]) if gain or tint else model
        trainer.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3), loss=cross_entropy)
        if not quiet:
            print(f"train.py: prior estimation, fold {fold + 1} of {folds}: P-versus-U classifier")
        trainer.fit(batches, epochs=1, verbose=0 if quiet else 2)
        n_cal = min(len(P_fit), len(U_fit), 512)
        recalibrate_batch_norm(model, np.concatenate([P_fit[rng.choice(len(P_fit), n_cal, replace=False)],
                                                      U_fit[rng.choice(len(U_fit), n_cal, replace=False)]]))
        held_p, held_u = p_fold == fold, u_fold == fold
        logits = segmentation.predict_logits(model, np.concatenate([P[held_p], U[held_u]]))
        # Ranks within the fold, in (0, 1]: one scale for every fold's model.
        order = np.argsort(np.argsort(logits, kind="stable"), kind="stable")
        ranks = (order + 1) / len(logits)
        p_scores[held_p], u_scores[held_u] = ranks[:held_p.sum()], ranks[held_p.sum():]

    estimate, uncertainty = bbe_prior(p_scores, u_scores, delta=delta, seed=seed, min_p_mass=min_p_mass)
    auc, separation = _rank_auc(p_scores, u_scores)
    result = dict(prior=estimate, estimate=estimate, uncertainty=uncertainty, method="BBE", auc=auc,
                  separation=separation, fallback=False, n_P=len(P), n_U=len(U))
    low, high = PRIOR_RANGE
    if separation < min_separation:
        result.update(prior=PRIOR_DEFAULT, fallback=True, message=(
            f"P and U look alike to a P-versus-U classifier (held-out AUC {auc:.3f}, {separation:.1f} standard "
            f"deviations from chance), so the class prior cannot be estimated (BBE gave {estimate:.3f}); "
            f"using the default {PRIOR_DEFAULT}. Check that --U_dataset holds aurora, or pass --prior"))
    elif not low <= estimate <= high:
        clipped = float(np.clip(estimate, low, high))
        result.update(prior=clipped, fallback=True, message=(
            f"estimated class prior {estimate:.3f} is outside [{low}, {high}], where the estimate is unreliable; "
            f"using {clipped}. Pass --prior to override"))
    else:
        result["message"] = f"estimated class prior {estimate:.3f} +- {uncertainty:.3f} (BBE, held-out AUC {auc:.3f})"
    if result["fallback"]:
        warnings.warn(result["message"], stacklevel=2)
    result["seconds"] = round(time.time() - started, 1)
    return result


# ---------------------------------------------------------- training

def make_loss(args):
    """The loss the flags select: PNULoss with --N_dataset, else PULoss (nnPU or uPU)."""
    from PULoss import PNULoss, PULoss

    common = dict(loss=args.loss, gamma=args.gamma, beta=args.beta, nnPU=args.nnPU)
    if args.N_dataset is not None:
        return PNULoss(args.prior, args.eta, **common)
    return PULoss(args.prior, **common)


def train(args):
    """Fit the model described by ``args`` (the parsed flags) and write the outputs.

    Returns a dict of the resolved configuration, written as config.json.
    """
    import keras
    import tensorflow as tf

    from PULoss import pu_loss, pu_risk, pu_zero_one_risk

    rng = np.random.default_rng(args.seed)
    keras.utils.set_random_seed(args.seed)
    save_dir = Path(args.save_dir)
    patch = args.patch_size

    # Data: random patches per folder, then held-out P and U for validation.
    P = load_patches(args.P_dataset, args.P_n, patch, rng, args.quiet)
    U = load_patches(args.U_dataset, args.U_n, patch, rng, args.quiet)
    N = load_patches(args.N_dataset, args.N_n, patch, rng, args.quiet) if args.N_dataset else None
    n_p_val = args.P_n_sacrifice if args.P_n_sacrifice is not None else len(P) // 10
    n_p_val = min(n_p_val, len(P) - 1)
    n_u_val = min(int(round(args.val_fraction * len(U))), len(U) - 1)
    P_train, P_val = split_holdout(P, n_p_val, rng)
    U_train, U_val = split_holdout(U, n_u_val, rng)

    # Class prior: estimated from the very P and U patches training uses, so
    # that it is the fraction of background among the U patches the loss sees.
    # From here on args.prior is that float for the loss, metrics and validation.
    prior_estimate = None
    if args.prior == "auto":
        prior_estimate = estimate_prior(P_train, U_train, patch, seed=args.seed, quiet=args.quiet)
        if not args.quiet:
            print(f"train.py: estimated prior {prior_estimate['estimate']:.2f} "
                  f"+- {prior_estimate['uncertainty']:.2f} ({prior_estimate['method']})"
                  + (f", using {prior_estimate['prior']:.2f}" if prior_estimate["fallback"] else ""))
        args = argparse.Namespace(**{**vars(args), "prior": float(prior_estimate["prior"])})
        # The estimator's models drew from the global seed; training starts afresh.
        keras.utils.set_random_seed(args.seed)
    def make_batches(steps_per_epoch=None):
        if N is None:
            return data.make_pu_dataset(P_train, U_train, args.batchsize, seed=args.seed,
                                        augment=args.augment, steps_per_epoch=steps_per_epoch)
        return data.make_pnu_dataset(P_train, N, U_train, args.batchsize, seed=args.seed,
                                     augment=args.augment, steps_per_epoch=steps_per_epoch)

    # An epoch is one pass over the U patches, but at least MIN_STEPS_PER_EPOCH
    # batches, so that a folder of a hundred patches still trains.
    batches = make_batches()
    if len(batches) < MIN_STEPS_PER_EPOCH:
        batches = make_batches(MIN_STEPS_PER_EPOCH)
    loss = make_loss(args)

    # Model: the risk parts are logged as metrics so history.csv shows them.
    model = MODELS[args.model](patch)

    def positive_risk(y_true, y_pred):
        return pu_risk(y_true, y_pred, args.prior, args.loss)["positive_risk"]

    def negative_risk(y_true, y_pred):
        return pu_risk(y_true, y_pred, args.prior, args.loss)["negative_risk"]

    metrics = [positive_risk, negative_risk] if N is None else []
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=args.lr), loss=loss, metrics=metrics)

    # BatchNorm calibration sample: drawn like a training batch, half P, half U.
    n_cal = min(len(P_train), len(U_train), 512)
    calibration = np.concatenate([P_train[rng.choice(len(P_train), n_cal, replace=False)],
                                  U_train[rng.choice(len(U_train), n_cal, replace=False)]])
    x_val = np.concatenate([P_val, U_val])
    y_val = np.concatenate([np.ones(len(P_val)), -np.ones(len(U_val))]).astype("float32")

    class Validate(keras.callbacks.Callback):
        """Recalibrate BatchNorm, then score the held-out P/U split in inference mode."""

        def on_epoch_end(self, epoch, logs=None):
            recalibrate_batch_norm(self.model, calibration)
            if logs is None or len(x_val) == 0:
                return
            logits = segmentation.predict_logits(self.model, x_val)
            logs["val_pu_zero_one_risk"] = float(pu_zero_one_risk(y_val, logits, args.prior))
            logs["val_nnpu_risk"] = float(pu_loss(y_val, logits, args.prior, args.loss, beta=args.beta))
            logs["val_negative_risk"] = float(pu_risk(y_val, logits, args.prior, args.loss)["negative_risk"])

    save_dir.mkdir(parents=True, exist_ok=True)
    backup = save_dir / "backup"
    if args.overwrite and backup.exists():
        shutil.rmtree(backup)
    callbacks = [
        Validate(),
        # After Validate, which adds val_pu_zero_one_risk to the epoch's logs.
        *([keras.callbacks.EarlyStopping(monitor="val_pu_zero_one_risk", mode="min", patience=args.patience,
                                         restore_best_weights=True)] if args.early_stopping and len(x_val) else []),
        keras.callbacks.TerminateOnNaN(),
        # Checkpoints every epoch; an interrupted run resumes from the last one.
        keras.callbacks.BackupAndRestore(str(backup)),
        keras.callbacks.CSVLogger(str(save_dir / "history.csv")),
    ]
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    if not args.quiet:
        print(f"train.py: {len(P_train)} P and {len(U_train)} U training patches, "
              f"{len(P_val)} P and {len(U_val)} U held out; {args.model} on {device}")
    started = time.time()
    history = model.fit(batches, epochs=args.epochs, callbacks=callbacks, verbose=0 if args.quiet else 2)
    seconds = time.time() - started
    if model.stop_training and any(not np.isfinite(v) for v in history.history.get("loss", [])):
        raise CommandLineError("training diverged (loss is NaN); try a smaller --lr")

    # The saved model is an uncompiled copy: stock layers only, no project module needed.
    inference_model = MODELS[args.model](patch)
    inference_model.set_weights(model.get_weights())
    inference_model.save(save_dir / "model.keras")

    u_val_logits = segmentation.predict_logits(model, U_val)
    p_val_logits = segmentation.predict_logits(model, P_val)
    config = {
        **{k: v for k, v in vars(args).items()},
        "P_patches": [len(P_train), len(P_val)],
        "U_patches": [len(U_train), len(U_val)],
        "N_patches": None if N is None else len(N),
        "method": "PNU" if N is not None else ("nnPU" if args.nnPU else "uPU"),
        "device": device,
        "train_seconds": round(seconds, 1),
        "epochs_run": len(history.history.get("loss", [])),
        "prior_estimate": prior_estimate,
        "heldout_U_fraction_aurora": float(np.mean(u_val_logits < 0)) if len(U_val) else None,
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                     "keras": keras.__version__, "numpy": np.__version__},
    }
    (save_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    plot_history(save_dir / "history.csv", save_dir / "loss.png")
    plot_predictions(p_val_logits, u_val_logits, save_dir / "prediction.png")
    if backup.exists():
        shutil.rmtree(backup)
    return config


def plot_history(history_csv, path):
    """Learning curves from history.csv into ``path`` (PNG)."""
    # A bare Figure draws without pyplot, so a notebook's backend is left alone.
    from matplotlib.figure import Figure

    with open(history_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for key in ("loss", "positive_risk", "negative_risk", "val_nnpu_risk", "val_pu_zero_one_risk"):
        if rows and key in rows[0]:
            ax.plot([int(r["epoch"]) + 1 for r in rows], [float(r[key]) for r in rows], marker="o", label=key)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("risk")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_predictions(p_logits, u_logits, path):
    """Histogram of held-out logits; > 0 is predicted background."""
    # A bare Figure draws without pyplot, so a notebook's backend is left alone.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    both = np.concatenate([p_logits, u_logits]) if len(p_logits) + len(u_logits) else np.zeros(1)
    bins = np.linspace(both.min() - 1e-3, both.max() + 1e-3, 50)
    ax.hist(u_logits, bins=bins, alpha=0.6, label="held-out U")
    ax.hist(p_logits, bins=bins, alpha=0.6, label="held-out P")
    ax.axvline(0, color="k", lw=1)
    ax.set_xlabel("logit (> 0: background, < 0: aurora)")
    ax.set_ylabel("patches")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        with warnings.catch_warnings():
            # A skipped file is worth one line, not a source listing.
            warnings.showwarning = lambda message, *_, **__: print(f"train.py: warning: {message}", file=sys.stderr)
            check_args(args)
            config = train(args)
    except (CommandLineError, data.DataError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    if not args.quiet:
        fraction = config["heldout_U_fraction_aurora"]
        print(f"train.py: wrote model.keras, config.json, history.csv, loss.png and prediction.png to {args.save_dir}")
        if fraction is not None:
            print(f"train.py: held-out U predicted aurora: {fraction:.3f} (1 - prior = {1 - config['prior']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
