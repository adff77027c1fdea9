"""Train the aurora patch classifier from positive (background) and unlabeled frames.

    python train.py --P_dataset dataset/Positive --U_dataset dataset/Unlabelled

Reads random patches from the frames of the two folders (the sky of each
frame only, normalized so that the sky's brightness, colour and glow do not
matter: ``data.prepare_frame``), estimates the class prior, fits a ResNet18
(or a small CNN, which ``--model auto`` takes when aurora is rare in U:
``choose_network``) with the non-negative PU risk of Kiryo et al. (2017),
weighted so that rare aurora counts (Su et al. 2021), checks that the model
did not collapse to "no aurora anywhere" or "aurora everywhere", scales its
logit so that P(aurora) is calibrated (``calibration_scale``), and writes
into ``--save_dir``:

* ``model.keras``  the trained model, stock Keras layers only: it loads with
  ``keras.models.load_model(path, compile=False)`` in any process. It holds
  how its frames were prepared (``data.load_model`` reads it back), so
  segmentation prepares frames exactly as training did.
* ``config.json``  every resolved setting, the prior estimate, the checks,
  the frames and patch counts, the backend, the device and the versions.
* ``history.csv``, ``loss.png``  the risks per epoch.
* ``prediction.png``  histograms of the logits of held-out P and U patches.

Exit codes: 0 a model was written; 2 bad input (a flag, a folder, P and U
that cannot be told apart; one line on stderr, nothing written); 3 training
failed (the model collapsed or diverged): no model.keras, the reason in
config.json and on stderr.
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

MIN_STEPS_PER_EPOCH = 50
EXIT_TRAINING_FAILED = 3

# The class prior is trusted in this range: below it U would be almost all
# aurora; above it U holds almost no aurora the classifier can find (a
# night without aurora), and training has nothing to learn.
PRIOR_RANGE = (0.05, 0.995)


class TrainingFailed(RuntimeError):
    """Training ran but produced no useful model; main() reports it in one line and exits with 3."""


# ----------------------------------------------------------------- model

def build_resnet18(patch_size=32, bn_momentum=0.9, channels=3):
    """The seed's ResNet18 patch classifier, from stock Keras layers only.

    7x7 stride-2 stem, 3x3 stride-2 max-pool, four stages of two basic
    blocks (64, 128, 256, 512 filters), global average pooling, two Dense 256
    tanh layers and one logit. Input float32, shape (n, patch_size,
    patch_size, channels), prepared by ``data.prepare_frame`` (3 channels,
    6 with ``data.position_channels``); output (n, 1), > 0 means background.

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

    inputs = keras.Input((patch_size, patch_size, channels), name="patch")
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


def build_cnn(patch_size=32, bn_momentum=0.9, channels=3):
    """The seed's small CNN, a fast alternative with the same contract."""
    import keras
    from keras import layers

    inputs = keras.Input((patch_size, patch_size, channels), name="patch")
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


def batch_norm_layers(model):
    """Every BatchNormalization layer of ``model``, nested models included."""
    import keras

    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif hasattr(layer, "layers"):
            found += batch_norm_layers(layer)
    return found


def recalibrate_batch_norm(model, patches):
    """Set every BatchNormalization's moving statistics to those of ``patches``.

    Inference mode normalises with moving averages; after a short training
    they lag the batch statistics the weights were fitted with, and the seed's
    model then called every patch background. One forward pass in training
    mode with momentum 0 makes the moving statistics exactly those of a large
    batch drawn like the training batches.
    """
    norms = batch_norm_layers(model)
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(patches, training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum


# ----------------------------------------------------------------- data

def frame_files(folders, recursive):
    """The frame files of one or more folders, in order (``data.list_images``)."""
    return [path for folder in folders for path in data.list_images(folder, recursive=recursive)]


def resolve_preprocessing(args, paths):
    """How frames are prepared for this model (``data.prepare_frame``), from a look at the training frames.

    ``--normalize auto`` normalizes whole frames by their sky's background
    and leaves images that are themselves patches (smaller than four patches
    a side: no sky around them to estimate a background from) as they are.
    Frames of a monochrome camera get a background of each scale of
    ``data.GREY_SCALES`` in their three channels.
    """
    survey = data.survey_frames(paths, args.patch_size)
    normalize = args.normalize
    if normalize == "auto":
        normalize = "background" if survey["min_side"] >= 4 * args.patch_size else "none"
    # Each works on the excess over the background.
    for flag in ("position", "sky_template", "background_sectors", "background_jitter"):
        if getattr(args, flag, None) and normalize != "background":
            raise data.UsageError(f"--{flag} needs the background normalization (whole frames, --normalize "
                                  f"background); these frames are prepared with '{normalize}'")
    return {"version": data.PREPROCESSING_VERSION, "normalize": normalize, "full_scale": survey["full_scale"],
            "camera_range": survey["camera_range"], "patch_size": args.patch_size,
            "background_sectors": args.background_sectors if normalize == "background" else 0,
            "grey_scales": list(data.GREY_SCALES) if normalize == "background" and survey["grey"] else None,
            "position": bool(args.position), "sky_template": None, "mask_bright": bool(args.sky_template),
            # Without a map the horizon goes with the model, so that segmentation cuts it as training did.
            "min_elevation": None if getattr(args, "field_of_view", None) else getattr(args, "min_elevation", None)}


# Patches of the P and of the U frames drawn apart from the training ones
# (other random positions, which may overlap them), for the collapse check:
# at a prior of 0.99 U holds 1% aurora, and the check needs many thousand
# patches to tell a model that finds it from one that does not. At most
# UNSEEN_BYTES of them each, so that large patches stay affordable.
UNSEEN_PATCHES = 20_000
UNSEEN_BYTES = 256 * 2**20


# The ``--background_jitter`` to try first, in noise levels. Each frame's sky
# sits a little off its background estimate, by its own amount (wide aurora
# lifts the estimate and leaves the sky around it below it), and a network
# reads a patch's mean excess far more finely than that: with
# ``--sky_template`` the prior estimator told even U's aurora-free frames
# from P by it, unless each training patch was moved by a random offset
# (docs/measurements.md, "Background offsets in training").
BACKGROUND_JITTER = 2.0


def read_field_of_view(args):
    """The user's sky (``--field_of_view``, ``--min_elevation``): ``data.user_sky``."""
    return data.user_sky(args.field_of_view, args.min_elevation)


def load_patch_sets(args, preprocessing, rng):
    """Patches of the P, U (and N) frames: ``data.PatchSet`` each (N None without --N_dataset).

    P and U also carry ``unseen`` patches (up to ``UNSEEN_PATCHES`` and
    ``UNSEEN_BYTES`` of float32, ten times the training draw at most, drawn
    with their own generator, so that the training patches do not depend on
    them).
    """
    affordable = UNSEEN_BYTES // (4 * 3 * args.patch_size ** 2)
    field_of_view = read_field_of_view(args)

    def patches(folders, total, label, stream=None):
        unseen = 0 if stream is None else min(UNSEEN_PATCHES, affordable, 10 * total)
        return data.frame_patches(frame_files(folders, args.recursive), args.patch_size, total, rng, preprocessing,
                                  field_of_view, quiet=args.quiet, desc=f"{label} patches", unseen=unseen,
                                  unseen_rng=None if stream is None else np.random.default_rng([args.seed, stream]))

    P = patches(args.P_dataset, args.P_n, "P", stream=1)
    U = patches([args.U_dataset], args.U_n, "U", stream=2)
    N = patches([args.N_dataset], args.N_n, "N") if args.N_dataset else None
    return P, U, N


def split_holdout(n, n_holdout, rng):
    """Indices of a random split of range(n): (training, held out)."""
    order = rng.permutation(n)
    return np.sort(order[n_holdout:]), np.sort(order[:n_holdout])


# ----------------------------------------------------------- class prior

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
    The class prior is the mean of this over the U patches training draws
    (centres in the sky). A patch with no aurora pixel looks exactly like a
    P patch, so this is the quantity a P-versus-U estimator sees. A pixel's
    prior (the fraction of sky pixels without aurora) is larger: a patch is
    aurora as soon as one of its pixels is.
    """
    mask_patches = np.asarray(mask_patches, dtype=bool)
    if mask_patches.ndim != 3:
        raise ValueError(f"Invalid mask_patches: expected shape (n, p, p), received {mask_patches.shape}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"Invalid tolerance: expected 0 <= tolerance < 1, received {tolerance}")
    return mask_patches.mean(axis=(1, 2)) <= tolerance


def checkerboard_folds(patch_set, patch_size):
    """Cross-fitting fold (0 or 1) of each patch: the colour of its centre on a checkerboard of 2-patch squares.

    Held-out patches must not share pixels with the patches a classifier
    was trained on, or it scores them by memory: neighbouring random
    patches of a frame overlap heavily. Splitting each frame on a
    checkerboard keeps them apart (up to the squares' borders) and puts
    every frame, aurora frames included, on both sides. Images too small
    for two squares (a patch-sized image gives one patch, drawn many times)
    are dealt out whole, every draw of a frame to one fold: a copy on
    each side would be scored by memory, which made U's background look
    unlike P and the prior estimate low.
    """
    square = 2 * patch_size
    rows, cols = patch_set.centres[:, 0] // square, patch_set.centres[:, 1] // square
    folds = (rows + cols) % 2
    if folds.min() == folds.max():
        folds = np.asarray(patch_set.frame_of) % 2
    if folds.min() == folds.max():
        folds = np.arange(len(folds)) % 2
    return folds


def estimate_prior(P, U, seed=0, quiet=True, epochs=3, min_steps=150, batch_size=64, delta=0.1,
                   min_separation=3.0, p_folds=None, u_folds=None, min_p_mass=0.9, offset=0.0):
    """Estimate the class prior of ``U`` (fraction of background) with BBE on a cross-fitted P-versus-U CNN.

    The patches are split into two folds (``p_folds``, ``u_folds``; see
    ``checkerboard_folds``). For each fold a small CNN (``build_cnn``) learns
    P (1) against U (0) with binary cross-entropy on balanced, augmented
    batches from the other fold, and scores the fold's own P and U in
    inference mode, so every patch gets a held-out score. Each fold's scores become ranks within that fold, so that
    the folds' models share one scale. ``PULoss.bbe_prior`` turns the scores
    into the estimate.

    Parameters
    ----------
    P : ndarray of shape (n_P, p, p, 3) or (n_P, p, p, 6), float32
        Positive (background) patches, prepared (``data.prepare_frame``).
    U : ndarray of shape (n_U, p, p, channels), float32
        Unlabeled patches; the prior is the fraction of them that are background.
    seed : int
        Seeds the folds, the batches and the weights.
    quiet : bool
        No progress output.
    epochs : int
        Passes over each fold's training U patches ...
    min_steps : int
        ... but at least this many batches, so that tiny sets still train.
    batch_size : int
        Patches per batch, half P and half U.
    delta : float
        BBE's confidence level.
    min_separation : float
        U counts as holding something P does not when either the held-out
        AUC, or the share of U below the P scores' 1st percentile, exceeds
        chance by this many standard deviations.
    p_folds, u_folds : ndarray of shape (n_P,) and (n_U,), int 0 or 1, optional
        The fold of each patch; default: dealt out at random.
    min_p_mass : float
        ``PULoss.bbe_prior``'s floor on q_P(c). 0.9 rather than the paper's 0
        because P and U come from different frames (or nights): a flexible
        classifier then finds P-only regions in the extreme tail, where plain
        BBE estimates too low.
    offset : float
        The classifier's batches move each patch's excess by up to this many
        noise levels (``data.augment_patches``, ``--background_jitter``).

    Returns
    -------
    result : dict
        ``estimate`` and ``uncertainty`` (``PULoss.bbe_prior``), ``method``
        "BBE", ``auc`` the held-out P-versus-U AUC and ``separation`` its
        z-score against 0.5, ``tail`` the share of U patches scoring below
        the 1st percentile of P and ``tail_separation`` its z-score against
        1%, ``distinguishable`` (either z-score >= ``min_separation``),
        ``p_scores`` and ``u_scores`` (held-out, for `p_frames_with_aurora`),
        ``n_P``, ``n_U`` and ``seconds``.
    """
    import keras

    import PULoss

    P = np.asarray(P, dtype=np.float32)
    U = np.asarray(U, dtype=np.float32)
    for name, patches in (("P", P), ("U", U)):
        if patches.ndim != 4 or patches.shape[1] != patches.shape[2] or patches.shape[3] not in (3, 6):
            raise ValueError(f"Invalid {name}: expected shape (n, p, p, 3) or (n, p, p, 6), received {patches.shape}")
        if len(patches) < 4:
            raise ValueError(f"Invalid {name}: expected at least 4 patches for 2 folds, received {len(patches)}")
    if P.shape[1:] != U.shape[1:]:
        raise ValueError(f"Invalid patches: P is {P.shape[1:]} but U is {U.shape[1:]}")

    started = time.time()
    rng = np.random.default_rng(seed)
    folds = 2
    p_fold = rng.permutation(len(P)) % folds if p_folds is None else np.asarray(p_folds)
    u_fold = rng.permutation(len(U)) % folds if u_folds is None else np.asarray(u_folds)
    p_scores = np.empty(len(P))
    u_scores = np.empty(len(U))

    def cross_entropy(y_true, y_pred):
        # Labels +1 P, -1 U (make_pu_dataset's) become 1 and 0. (batch,) logits.
        y_true = keras.ops.reshape((y_true + 1.0) / 2.0, (-1,))
        return keras.losses.binary_crossentropy(y_true, keras.ops.reshape(y_pred, (-1,)), from_logits=True)

    for fold in range(folds):
        keras.utils.set_random_seed(seed + fold)
        P_fit, U_fit = P[p_fold != fold], U[u_fold != fold]
        held_p, held_u = p_fold == fold, u_fold == fold
        steps = max(epochs * math.ceil(len(U_fit) / (batch_size - batch_size // 2)), min_steps)
        batches = data.make_pu_dataset(P_fit, U_fit, batch_size, seed=seed + fold, augment=True,
                                       steps_per_epoch=steps, offset=offset)
        model = build_cnn(P.shape[1], channels=P.shape[3])
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3), loss=cross_entropy)
        if not quiet:
            print(f"train.py: prior estimation, fold {fold + 1} of {folds}: P-versus-U classifier")
        model.fit(iter(batches), steps_per_epoch=len(batches), epochs=1, shuffle=False, verbose=0 if quiet else 2)
        n_cal = min(len(P_fit), len(U_fit), 512)
        recalibrate_batch_norm(model, np.concatenate([P_fit[rng.choice(len(P_fit), n_cal, replace=False)],
                                                      U_fit[rng.choice(len(U_fit), n_cal, replace=False)]]))
        logits = data.predict_logits(model, np.concatenate([P[held_p], U[held_u]]))
        # Ranks within the fold, in (0, 1]: one scale for every fold's model.
        order = np.argsort(np.argsort(logits, kind="stable"), kind="stable")
        ranks = (order + 1) / len(logits)
        p_scores[held_p], u_scores[held_u] = ranks[:held_p.sum()], ranks[held_p.sum():]

    estimate, uncertainty = PULoss.bbe_prior(p_scores, u_scores, delta=delta, seed=seed, min_p_mass=min_p_mass)
    auc, separation = PULoss.rank_auc(p_scores, u_scores)
    # Rare aurora barely moves the AUC (1% of U changes it by 0.005); a small
    # U-only tail below almost all of P is the stronger sign of it.
    floor = np.quantile(p_scores, 0.01)
    tail = float(np.mean(u_scores < floor))
    expected = float(np.mean(p_scores < floor))
    spread = np.sqrt(expected * (1 - expected) * (1 / len(U) + 1 / len(P))) + 1e-12
    tail_separation = (tail - expected) / spread
    return {"estimate": estimate, "uncertainty": uncertainty, "method": "BBE", "auc": auc, "separation": separation,
            "tail": tail, "tail_separation": float(tail_separation),
            "distinguishable": bool(max(separation, tail_separation) >= min_separation),
            "p_scores": p_scores, "u_scores": u_scores, "n_P": len(P), "n_U": len(U),
            "seconds": round(time.time() - started, 1)}


def resolve_prior(estimate):
    """The prior to train with from ``estimate_prior``'s result, or a UsageError saying why there is none.

    P and U that a classifier cannot tell apart, or an estimate above the
    top of ``PRIOR_RANGE``, mean U holds no aurora the classifier can find:
    training would have nothing to learn, so it stops and says what to do.
    An estimate below the range is clipped into it, with a warning.
    """
    low, high = PRIOR_RANGE
    value = estimate["estimate"]
    if not estimate["distinguishable"] or value > high:
        why = (f"P and U look alike to a P-versus-U classifier (held-out AUC {estimate['auc']:.3f}, "
               f"{estimate['separation']:.1f} and {estimate['tail_separation']:.1f} standard deviations from chance)"
               if not estimate["distinguishable"] else
               f"the estimated class prior is {value:.3f}: almost no U patch differs from P")
        raise data.UsageError(f"{why}, so --U_dataset seems to hold no aurora. Give U frames with aurora, or, if U "
                              f"does hold aurora that looks like the sky in P, pass --prior (the fraction of U "
                              f"patches without aurora)")
    if value < low:
        warnings.warn(f"estimated class prior {value:.3f} is below {low}, where the estimate is unreliable; "
                      f"using {low}. Pass --prior to override", stacklevel=2)
        return low
    return value


# The check for aurora in P is made only where the estimate leaves U at least
# this share of aurora. Below it the P-versus-U classifier hardly sees U's
# aurora: on synthetic nights of rare aurora the check named clean P frames
# of unusual skies and missed aurora frames put into P (docs/measurements.md,
# "The check for aurora in P").
P_CHECK_MIN_AURORA = 0.05


def p_frames_with_aurora(estimate, prior, P, threshold=0.05):
    """P frames that hold patches like U's aurora, which P must not (``estimate_prior``'s scores).

    The U patches scoring lowest (least like P) are aurora when U holds
    aurora; below the score under which half of U's estimated aurora lies,
    a clean P has (almost) no patch. A P frame with more than ``threshold``
    of its patches there most likely shows aurora. Returns their names;
    none where ``1 - prior`` is under ``P_CHECK_MIN_AURORA``.
    """
    aurora = max(1.0 - prior, 0.0)
    if aurora < P_CHECK_MIN_AURORA:
        return []
    cut = np.quantile(estimate["u_scores"], aurora / 2)
    below = estimate["p_scores"] < cut
    names = []
    for frame in np.unique(P.frame_of):
        mine = P.frame_of == frame
        if mine.sum() >= 5 and below[mine].mean() > threshold:
            names.append(P.names[frame])
    return names


# --------------------------------------------------------------- training

def make_loss(args, prior):
    """The loss the flags select: PNULoss with --N_dataset, else PULoss (nnPU or uPU, balanced or not)."""
    from PULoss import PNULoss, PULoss

    common = dict(loss=args.loss, gamma=args.gamma, beta=args.beta, nnPU=args.nnPU)
    if args.N_dataset is not None:
        return PNULoss(prior, args.eta, **common)
    return PULoss(prior, balanced=args.balanced, **common)


def fit_model(args, network, prior, P_train, U_train, N_train, P_val, U_val, seed, backup):
    """Fit one ``network`` (a key of MODELS); returns (model, history dict). Risks per epoch go to history.csv."""
    import keras

    from PULoss import pu_loss, pu_risk, pu_zero_one_risk

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    if N_train is None:
        batches = data.make_pu_dataset(P_train, U_train, args.batchsize, seed=seed, augment=args.augment,
                                       offset=args.background_jitter)
    else:
        batches = data.make_pnu_dataset(P_train, N_train, U_train, args.batchsize, seed=seed, augment=args.augment,
                                        offset=args.background_jitter)
    # An epoch is one pass over the U patches, but at least MIN_STEPS_PER_EPOCH
    # batches, so that a folder of a hundred patches still trains.
    if len(batches) < MIN_STEPS_PER_EPOCH:
        batches.steps = MIN_STEPS_PER_EPOCH

    model = MODELS[network](args.patch_size, channels=P_train.shape[3])

    def positive_risk(y_true, y_pred):
        return pu_risk(y_true, y_pred, prior, args.loss)["positive_risk"]

    def negative_risk(y_true, y_pred):
        return pu_risk(y_true, y_pred, prior, args.loss)["negative_risk"]

    metrics = [positive_risk, negative_risk] if N_train is None else []
    # The learning rate falls from --lr to 0 along a cosine: with a constant
    # rate the held-out risk swings from epoch to epoch, and the saved model
    # is wherever the last noisy steps left it.
    schedule = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=args.epochs * len(batches))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=schedule), loss=make_loss(args, prior),
                  metrics=metrics)

    # BatchNorm calibration sample: drawn like a training batch, half P, half U.
    n_cal = min(len(P_train), len(U_train), 512)
    calibration = np.concatenate([P_train[rng.choice(len(P_train), n_cal, replace=False)],
                                  U_train[rng.choice(len(U_train), n_cal, replace=False)]])
    x_val = np.concatenate([P_val, U_val])
    y_val = np.concatenate([np.ones(len(P_val)), -np.ones(len(U_val))]).astype("float32")

    class Validate(keras.callbacks.Callback):
        """Recalibrate BatchNorm, record the learning rate, score the held-out P/U split in inference mode."""

        def on_epoch_end(self, epoch, logs=None):
            recalibrate_batch_norm(self.model, calibration)
            if logs is None:
                return
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            if len(P_val) == 0 or len(U_val) == 0:
                return
            logits = data.predict_logits(self.model, x_val)
            logs["val_pu_zero_one_risk"] = float(pu_zero_one_risk(y_val, logits, prior))
            logs["val_nnpu_risk"] = float(pu_loss(y_val, logits, prior, args.loss, beta=args.beta,
                                                  balanced=args.balanced))
            logs["val_negative_risk"] = float(pu_risk(y_val, logits, prior, args.loss)["negative_risk"])

    callbacks = [
        Validate(),
        # After Validate, which adds val_pu_zero_one_risk to the epoch's logs.
        *([keras.callbacks.EarlyStopping(monitor="val_pu_zero_one_risk", mode="min", patience=args.patience,
                                         restore_best_weights=True)] if args.early_stopping else []),
        keras.callbacks.TerminateOnNaN(),
        # Checkpoints every epoch; an interrupted run resumes from the last one.
        keras.callbacks.BackupAndRestore(str(backup)),
        keras.callbacks.CSVLogger(str(Path(args.save_dir) / "history.csv"), append=backup_has_checkpoint(backup)),
    ]
    # shuffle=False: the batches are shuffled already, by seed (data.PUBatches).
    history = model.fit(iter(batches), steps_per_epoch=len(batches), epochs=args.epochs, callbacks=callbacks,
                        shuffle=False, verbose=0 if args.quiet else 2)
    if any(not np.isfinite(value) for value in history.history.get("loss", [])):
        raise TrainingFailed("training diverged (the loss became NaN); try a smaller --lr")
    if args.early_stopping:
        recalibrate_batch_norm(model, calibration)  # the restored weights' own statistics
    return model, history.history


# Above this standard error of the share of aurora found, `collapse` makes no claim.
MAX_CHECK_ERROR = 0.2


def collapse(prior, u_aurora, p_aurora, n_u, n_p):
    """Why a trained model is useless, or None: it finds (almost) no aurora, or calls (almost) everything aurora.

    Parameters
    ----------
    prior : float
        The class prior trained with: U should hold about ``1 - prior`` aurora.
    u_aurora, p_aurora : float
        Fractions of U patches and of P (clear sky) patches the model calls
        aurora, counted on patches drawn apart from its training patches
        (other random positions of the same frames, which may overlap them):
        a model that learnt its training patches by heart finds "aurora"
        there and less elsewhere.
    n_u, n_p : int
        Patches counted.

    Notes
    -----
    U holds a share ``prior`` of background and ``1 - prior`` of aurora, so
    ``found = (u_aurora - prior * p_aurora) / (1 - prior)`` is the share of
    U's aurora the model finds. The model has collapsed to "no aurora
    anywhere" when ``found`` is not above a tenth by twice its standard
    error (binomial, counts plus one so that zero counts are not certain;
    it leaves out the prior's own error and that aurora comes in a few
    frames). When that error, with both rates capped at ``FALSE_ALARM``,
    exceeds ``MAX_CHECK_ERROR`` (too few patches for the prior: 400 U
    patches hold 4 aurora patches at 0.99) no claim is made.
    One that calls more than half of P, or nearly all of U, aurora has
    collapsed to "aurora everywhere". Empty masks on a night without aurora
    are fine, but then the prior would have said so (``resolve_prior``).
    """
    expected = 1.0 - prior

    def error(u_rate, p_rate):
        return math.sqrt(u_rate * (1 - u_rate) / n_u + prior ** 2 * p_rate * (1 - p_rate) / n_p) / expected

    found = (u_aurora - prior * p_aurora) / expected
    u_rate, p_rate = (u_aurora * n_u + 1) / (n_u + 2), (p_aurora * n_p + 1) / (n_p + 2)
    noise = error(u_rate, p_rate)
    # Whether the counts can tell is judged at rates of at most FALSE_ALARM: a
    # model that calls more clear sky aurora must not escape the check.
    powered = error(min(u_rate, FALSE_ALARM), min(p_rate, FALSE_ALARM)) <= MAX_CHECK_ERROR
    if powered and found < 0.1 + 2 * noise:
        return (f"on patches apart from its training ones, the model calls {u_aurora:.2%} of U and "
                f"{p_aurora:.2%} of P aurora where the prior {prior:.3f} says {expected:.2%} of U is: it finds "
                f"{max(found, 0):.0%} (+- {noise:.0%}) of U's aurora, it has collapsed to 'no aurora anywhere'")
    if p_aurora > 0.5 or u_aurora > 1.0 - 0.1 * prior:
        return (f"the model calls {p_aurora:.0%} of P and {u_aurora:.0%} of U (patches apart from its training ones) "
                f"aurora: it has collapsed to 'aurora everywhere'")
    return None


# The share of held-out P (aurora-free) patches the model may call aurora.
FALSE_ALARM = 0.02


def decision_offset(u_logits, p_logits, prior):
    """Where the model's decision goes: the stricter of the prior's threshold and P's false-alarm threshold.

    The balanced risk ranks patches well but puts its threshold where a
    patch is as likely under the aurora's distribution as under the
    background's, which on a night of rare aurora calls far more than the
    ``1 - prior`` share aurora, and calls part of the held-out P aurora
    too. Two thresholds are at hand: the logit below which the
    prior's share of U lies, and the one below which only ``FALSE_ALARM`` of
    the held-out P lies (P is background, so that one needs no prior: an
    underestimated prior cannot make the model call clear sky aurora). The
    lower of the two wins; `train` folds it into the model's last bias, so
    that logit > 0 still means background.
    """
    threshold = float(np.quantile(u_logits, 1.0 - prior))
    if len(p_logits):
        threshold = min(threshold, float(np.quantile(p_logits, FALSE_ALARM)))
    return threshold


# Bounds of the calibration scale: a model whose logits want more than this
# stretch or shrink is not fixed by a scale (``calibration_scale``).
SCALE_BOUNDS = (0.1, 10.0)


def calibration_scale(u_logits, p_logits, prior):
    """The factor ``s`` that makes ``sigmoid(-s * logit)`` a calibrated P(aurora) in U, from P and U alone.

    With labels, temperature scaling minimizes the log loss on held-out
    data. Without them, the log loss of ``s * logit`` is estimated from P
    and U with the logistic loss ``l`` as training estimates its risk,
    non-negative (Kiryo et al. 2017):

        R(s) = prior * mean_P l(s g) + max(0, mean_U l(-s g) - prior * mean_P l(-s g)),

    and its minimizer within ``SCALE_BOUNDS`` is returned. Without the
    ``max`` (the unbiased risk of du Plessis et al. 2015), a model surer of
    the P frames' patches, which it trained on, than of U's background
    drives the negative part below zero and ``s`` to its bound. The logits
    are those of the decision (after ``decision_offset``), so scaling them
    leaves every decision, and the mask at P(aurora) = 0.5, as it was.
    ``prior`` is the share of background among U patches; the probability
    calibrated is that the patch holds aurora, at U's rate. A minimizer at
    the upper bound means the patches separate perfectly (as when each
    frame is one patch, so the unseen patches are the training ones): the
    fit then cannot tell, and 1.0 (the logit as trained) is returned.
    """
    from scipy.optimize import minimize_scalar

    # PULoss.pu_risk holds the same risk in keras.ops, but in float32 its
    # value underflows to a flat zero at large scales and hides the bound.
    u_logits, p_logits = np.asarray(u_logits, np.float64), np.asarray(p_logits, np.float64)

    def risk(log_scale):
        scale = math.exp(log_scale)
        positive = prior * np.mean(np.logaddexp(0.0, -scale * p_logits))
        negative = np.mean(np.logaddexp(0.0, scale * u_logits)) - prior * np.mean(np.logaddexp(0.0, scale * p_logits))
        return float(positive + max(negative, 0.0))

    low, high = np.log(SCALE_BOUNDS)
    fitted = float(minimize_scalar(risk, bounds=(low, high), method="bounded").x)
    return 1.0 if fitted > high - 0.01 else math.exp(fitted)


def fold_offset(model, offset, scale=1.0):
    """Make the model's logit ``scale * (logit - offset)`` by moving the weights of its last Dense layer."""
    weights, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([weights * np.float32(scale), (bias - np.float32(offset)) * np.float32(scale)])


# Aurora in fewer than 7% of U's patches. On synthetic nights where it is in
# 2% the ResNet18 seems to learn U's few aurora frames rather than aurora, and
# misses it in new frames, where the small CNN finds it; where it is in 4% or
# 8% the CNN found as much as the ResNet18 or more (docs/measurements.md,
# "Rare aurora and the network"). The estimated priors fall short of the true
# ones there, by up to 0.02 (0.05 with --sky_template on the rarest set), so
# the line lies between the estimates of those two sets, not at the truth.
RARE_PRIOR = 0.93


def choose_network(flag, prior):
    """The network to train (a key of MODELS) for ``--model`` ``flag`` and the class prior.

    "auto" is the ResNet18, or the small CNN when the prior is ``RARE_PRIOR``
    or more; any other flag names the network itself.
    """
    if flag != "auto":
        return flag
    return "CNN" if prior >= RARE_PRIOR else "ResNet18"


# With --position a model can learn where the few aurora frames of U have their
# aurora instead of what aurora looks like; on synthetic nights it did from
# about this prior on (docs/measurements.md, "Where in the sky").
POSITION_RARE_PRIOR = 0.95


def rare_aurora_note(prior, network, position=False):
    """A line for the user when aurora is too rare in U for ``network`` to have learnt it well, else None."""
    if position and prior >= POSITION_RARE_PRIOR:
        return (f"aurora is rare in U (prior {prior:.3f}: {1 - prior:.1%} of its patches); on synthetic nights this "
                f"rare models trained with --position missed much of the aurora in new frames: train without "
                f"--position as well and compare the masks")
    if network != "ResNet18" or prior < RARE_PRIOR:
        return None
    return (f"aurora is rare in U (prior {prior:.3f}: {1 - prior:.1%} of its patches); on synthetic nights this rare "
            f"--model CNN found as much of the aurora in new frames as the ResNet18 or more, and where it was "
            f"rarest the ResNet18 missed most of it: train with --model CNN as well and compare the masks")


def p_coverage(P, U, factor=3.0):
    """U frames whose sky is unlike every P frame (``data.sky_conditions``), which P should then include.

    Each frame is described by a few numbers of its sky's background (level
    and colour, glow, noise), in units of their spread over the P frames; a
    U frame is unlike P when its distance to the nearest P frame exceeds
    ``factor`` times the largest distance of a P frame to its nearest other
    P frame. Returns their names, the most unlike first.
    """
    if len(P.conditions) < 3:
        return []
    scale = P.conditions.std(axis=0) + 0.05
    p_points, u_points = P.conditions / scale, U.conditions / scale
    between_p = np.linalg.norm(p_points[:, None] - p_points[None], axis=2)
    np.fill_diagonal(between_p, np.inf)
    reach = factor * between_p.min(axis=1).max()
    nearest = np.linalg.norm(u_points[:, None] - p_points[None], axis=2).min(axis=1)
    return [U.names[k] for k in np.argsort(-nearest) if nearest[k] > reach]


def choose_prior(args, P, U, p_train, u_train):
    """The class prior to train with: ``--prior`` itself, or estimated from the training patches.

    Returns (prior, estimate), ``estimate`` the estimator's record for
    config.json (None with a given prior). The estimate comes from the very
    P and U patches training uses, so that it is the fraction of background
    among the U patches the loss sees. Raises data.UsageError when there are
    too few patches to estimate from, or when P frames look like U's aurora.
    """
    if args.prior != "auto":
        return float(args.prior), None
    if min(len(p_train), len(u_train)) < 4:
        raise data.UsageError(f"--prior auto needs at least 4 P and 4 U training patches, found {len(p_train)} and "
                              f"{len(u_train)}: draw more with --P_n and --U_n, or pass --prior")
    estimate = estimate_prior(P.patches[p_train], U.patches[u_train], seed=args.seed, quiet=args.quiet,
                              p_folds=checkerboard_folds(P, args.patch_size)[p_train],
                              u_folds=checkerboard_folds(U, args.patch_size)[u_train], offset=args.background_jitter)
    prior = resolve_prior(estimate)
    aurora_in_p = p_frames_with_aurora(estimate, prior, P._replace(frame_of=P.frame_of[p_train]))
    if aurora_in_p:
        raise data.UsageError(
            f"{len(aurora_in_p)} P frame(s) look like U's aurora (first: {aurora_in_p[0]}): P must hold no "
            f"aurora at all; remove them from --P_dataset, or, if they hold none, pass --prior")
    if not args.quiet:
        print(f"train.py: estimated prior {estimate['estimate']:.3f} +- {estimate['uncertainty']:.3f} "
              f"(BBE, held-out P-versus-U AUC {estimate['auc']:.3f})")
    record = {key: value for key, value in estimate.items() if key not in ("p_scores", "u_scores")}
    return prior, {**record, "prior": prior}


def fit_until_useful(args, network, prior, P, U, N, p_train, p_val, u_train, u_val, backup):
    """Train ``network``, check the model for a collapse, and train again from other weights if it collapsed.

    Returns (model, history, attempts, failure, logits): ``attempts`` a
    record per training for config.json; ``failure`` None, or why the last
    attempt is useless (``collapse``); ``logits`` the last model's on all of
    U and on held-out P, before its ``decision_offset``. The check is made
    on the unseen P and U patches, where the saved model will decide, after
    ``decision_offset``: the balanced risk's own threshold calls about half
    of everything aurora when aurora is rare and P and U look alike, even
    when the model ranks them well.
    """
    attempts, failure = [], None
    for attempt in range(args.attempts):
        seed = args.seed + 1000 * attempt
        if attempt:
            # A new attempt starts from scratch, not from the last one's
            # checkpoint; the first resumes an interrupted run's (check_backup).
            shutil.rmtree(backup, ignore_errors=True)
            if not args.quiet:
                print(f"train.py: attempt {attempt + 1} of {args.attempts}, seed {seed}: {failure}")
        backup.mkdir(parents=True, exist_ok=True)
        (backup / BACKUP_SETTINGS).write_text(json.dumps(_backup_settings(args)))
        model, history = fit_model(args, network, prior, P.patches[p_train], U.patches[u_train],
                                   None if N is None else N.patches, P.patches[p_val], U.patches[u_val], seed,
                                   backup)
        u_logits = data.predict_logits(model, U.patches)
        p_val_logits = data.predict_logits(model, P.patches[p_val]) if len(p_val) else np.zeros(0)
        offset = decision_offset(u_logits, p_val_logits, prior) if N is None else 0.0
        u_aurora = float(np.mean(u_logits < offset))
        p_aurora = float(np.mean(p_val_logits < offset)) if len(p_val) else None
        unseen_u_logits = data.predict_logits(model, U.unseen) - offset
        unseen_p_logits = data.predict_logits(model, P.unseen) - offset
        unseen_u, unseen_p = float(np.mean(unseen_u_logits < 0)), float(np.mean(unseen_p_logits < 0))
        failure = collapse(prior, unseen_u, unseen_p, len(U.unseen), len(P.unseen))
        attempts.append({"seed": seed, "U_fraction_aurora": u_aurora, "decision_offset": offset,
                         "calibration_scale": calibration_scale(unseen_u_logits, unseen_p_logits, prior),
                         "heldout_P_fraction_aurora": p_aurora, "unseen_U_fraction_aurora": unseen_u,
                         "unseen_P_fraction_aurora": unseen_p, "unseen_patches": [len(P.unseen), len(U.unseen)],
                         "collapsed": failure})
        if failure is None:
            break
    shutil.rmtree(backup, ignore_errors=True)
    return model, history, attempts, failure, (u_logits, p_val_logits)


def train(args):
    """Fit the model described by ``args`` (the parsed flags) and write the outputs.

    Returns a dict of the resolved configuration, written as config.json.

    Raises
    ------
    data.UsageError
        Bad input found while reading (no usable frame, P and U alike, aurora in P).
    TrainingFailed
        Every attempt collapsed or diverged; config.json says why, no model.keras is written.
    """
    import keras

    rng = np.random.default_rng(args.seed)
    keras.utils.set_random_seed(args.seed)
    save_dir = Path(args.save_dir)
    started = time.time()

    # Data: every frame prepared as segmentation will prepare it, then patches.
    paths = frame_files(args.P_dataset, args.recursive) + frame_files([args.U_dataset], args.recursive)
    preprocessing = resolve_preprocessing(args, paths)
    if args.sky_template:
        template = data.build_sky_template(frame_files(args.P_dataset, args.recursive), preprocessing,
                                           read_field_of_view(args))
        preprocessing["sky_template"] = np.round(template, 3).tolist()
    P, U, N = load_patch_sets(args, preprocessing, rng)
    n_p_val = min(args.P_n_sacrifice if args.P_n_sacrifice is not None else len(P.patches) // 10,
                  len(P.patches) - 1)
    n_u_val = min(int(round(args.val_fraction * len(U.patches))), len(U.patches) - 1)
    p_train, p_val = split_holdout(len(P.patches), n_p_val, rng)
    u_train, u_val = split_holdout(len(U.patches), n_u_val, rng)
    prior, prior_estimate = choose_prior(args, P, U, p_train, u_train)
    network = choose_network(args.model, prior)
    if args.model == "auto" and network == "CNN" and not args.quiet:
        print(f"train.py: aurora is rare in U (prior {prior:.3f}): training the small CNN, which finds it where the "
              f"ResNet18 was measured not to (--model auto; pass --model ResNet18 for the ResNet18)")

    model, history, attempts, failure, (u_logits, p_val_logits) = fit_until_useful(
        args, network, prior, P, U, N, p_train, p_val, u_train, u_val, save_dir / "backup")
    offset, scale = attempts[-1]["decision_offset"], attempts[-1]["calibration_scale"]
    final_risk = None
    if len(p_val) and len(u_val):
        from PULoss import pu_zero_one_risk

        # Of the weights as trained (before the offset), as history.csv scores every epoch.
        labels = np.concatenate([np.ones(len(p_val)), -np.ones(len(u_val))]).astype("float32")
        final_risk = float(pu_zero_one_risk(labels, np.concatenate([p_val_logits, u_logits[u_val]]), prior))

    config = {
        **{key: value for key, value in vars(args).items() if key not in ("prior", "model")},
        "model": network, "model_flag": args.model,
        "prior": prior, "prior_given": None if args.prior == "auto" else float(args.prior),
        "prior_estimate": prior_estimate,
        "preprocessing": {**preprocessing, "sky_template": template_summary(preprocessing["sky_template"])},
        "P_frames": len(P.names), "U_frames": len(U.names),
        "P_patches": [len(p_train), len(p_val)], "U_patches": [len(u_train), len(u_val)],
        "N_patches": None if N is None else len(N.patches),
        "method": "PNU" if N is not None else ("nnPU" if args.nnPU else "uPU"),
        "backend": keras.backend.backend(), "device": device_name(),
        "train_seconds": round(time.time() - started, 1),
        "epochs_run": len(history.get("loss", [])),
        "attempts": attempts,
        "status": "collapsed" if failure else "ok",
        "failure": failure,
        "heldout_U_fraction_aurora": float(np.mean(u_logits[u_val] < offset)) if len(u_val) else None,
        "final_val_pu_zero_one_risk": final_risk,
        "U_fraction_aurora": attempts[-1]["U_fraction_aurora"],
        "unseen_U_fraction_aurora": attempts[-1]["unseen_U_fraction_aurora"],
        "unseen_P_fraction_aurora": attempts[-1]["unseen_P_fraction_aurora"],
        "decision_offset": offset,
        "calibration_scale": scale,
        "U_frames_unlike_P": p_coverage(P, U),
        "rare_aurora_note": rare_aurora_note(prior, network, args.position),
        "frames_without_border": {"P": P.skyless, "U": U.skyless},
        "versions": {"python": platform.python_version(), "keras": keras.__version__, "numpy": np.__version__,
                     **({"tensorflow": _tensorflow_version()} if keras.backend.backend() == "tensorflow" else {})},
    }
    (save_dir / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if (save_dir / "history.csv").exists():
        plot_history(save_dir / "history.csv", save_dir / "loss.png")
    if preprocessing["sky_template"] is not None:
        plot_sky_template(preprocessing["sky_template"], save_dir / "sky_template.png")
    u_shown = u_logits[u_val] if len(u_val) else u_logits
    plot_predictions(scale * (p_val_logits - offset), scale * (u_shown - offset), save_dir / "prediction.png")
    if failure:
        raise TrainingFailed(f"{failure} in {len(attempts)} attempt(s); no model.keras was written "
                             f"(see {save_dir / 'config.json'}). Check that P holds no aurora and that --prior "
                             f"fits U, or try --lr {args.lr / 3:.0e}")
    # The saved model is an uncompiled copy: stock layers only, no project module needed.
    inference_model = MODELS[network](args.patch_size, channels=data.input_channels(preprocessing))
    inference_model.set_weights(model.get_weights())
    fold_offset(inference_model, offset, scale)
    data.save_model(inference_model, save_dir / "model.keras", preprocessing)
    return config


def device_name():
    """"GPU" or "CPU": where the Keras backend in use runs."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    if backend == "jax":
        import jax

        return jax.devices()[0].platform.upper()
    import torch

    return "GPU" if torch.cuda.is_available() else "CPU"


def _tensorflow_version():
    import tensorflow as tf

    return tf.__version__


# --------------------------------------------------------------- reports

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


def template_summary(template):
    """What config.json says of a ``sky_template`` (the grid itself is in model.keras), or None."""
    if template is None:
        return None
    values = np.asarray(template, np.float32)
    return {"cells": list(values.shape[:2]), "channels": values.shape[2], "noise_levels": [float(values.min()),
            float(values.max())], "figure": "sky_template.png", "in": "model.keras"}


def plot_sky_template(template, path):
    """The sky template (``data.build_sky_template``), one panel per channel, into ``path`` (PNG)."""
    from matplotlib.figure import Figure

    values = np.asarray(template, np.float32)
    centres = (np.arange(values.shape[0]) + 0.5) / values.shape[0] * 2 - 1
    outside = np.hypot(centres[:, None], centres[None, :]) > 1  # the fill beyond the sky's circle
    values = np.where(outside[..., None], np.nan, values)
    fig = Figure(figsize=(3.2 * values.shape[2] + 1, 3.4), layout="constrained")
    axes = fig.subplots(1, values.shape[2], squeeze=False)[0]
    limit = max(float(np.nanmax(np.abs(values))), 1e-3)
    for channel, ax in enumerate(axes):
        shown = ax.imshow(values[..., channel], cmap="RdBu_r", vmin=-limit, vmax=limit, extent=(-1, 1, 1, -1))
        ax.set_title(f"channel {channel}", fontsize=9)
        ax.set_xlabel("columns (sky radii)")
    axes[0].set_ylabel("rows (sky radii)")
    fig.colorbar(shown, ax=list(axes), label="P's median excess (noise levels)")
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


# ------------------------------------------------------------------- CLI

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
        prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an aurora patch classifier with PU learning from a folder of aurora-free frames (P) "
                    "and a folder of ordinary frames (U) of the same camera.",
        epilog="example:\n  python train.py --P_dataset dataset/Positive --U_dataset dataset/Unlabelled\n"
               "exit codes: 0 model written, 2 bad input (nothing written), 3 training failed (no model.keras; "
               "the reason in config.json)")
    essential = parser.add_argument_group("essential")
    essential.add_argument("--P_dataset", required=True, nargs="+", metavar="FOLDER",
                           help="one or more folders of aurora-free frames (P, the background)")
    essential.add_argument("--U_dataset", required=True, metavar="FOLDER",
                           help="folder of ordinary frames, with and without aurora (U)")
    essential.add_argument("--save_dir", default="Results", help="where model.keras and the reports go "
                                                                  "(default: %(default)s)")
    essential.add_argument("--prior", type=prior_value, default="auto",
                           help="fraction of U patches without aurora, or 'auto' to estimate it (default: auto)")
    essential.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                           help="replace an earlier model in --save_dir")
    essential.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False, help="no progress output")

    frames = parser.add_argument_group("frames")
    frames.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=False,
                        help="also read the frames of sub-folders")
    frames.add_argument("--field_of_view", default=None, metavar="FILE",
                        help="the sky: a picture (nonzero = sky), or with --min_elevation an elevation map "
                             "(degrees); default: the fisheye circle of each frame")
    frames.add_argument("--min_elevation", type=data.elevation, default=None, metavar="DEGREES",
                        help="leave out the sky below this elevation (10 to 20 is usual), by the elevation map of "
                             "--field_of_view or, without one, as if the fisheye circle were equidistant with its "
                             "edge on the horizon")
    frames.add_argument("--background_sectors", type=data.nonnegative_int, default=0, metavar="N",
                        help="take the outer sky's background per azimuth sector, N around the sky, for glow on "
                             f"one side of the horizon (try {data.BACKGROUND_SECTORS}; default: %(default)s, one "
                             "profile all round)")
    frames.add_argument("--position", action=argparse.BooleanOptionalAction, default=False,
                        help="also show the model where in the sky each patch lies, so that glow fixed to the "
                             "camera (a town, the horizon's airglow) is learnt as background where P shows it; "
                             "for P and U of one camera and pointing")
    frames.add_argument("--sky_template", action=argparse.BooleanOptionalAction, default=False,
                        help="take P's median excess at each place in the sky off every frame, so that glow fixed "
                             "to the camera (horizon, town light, a moon that stays put) is not aurora; for P and U "
                             "of one camera and pointing")
    frames.add_argument("--normalize", choices=["auto", *data.NORMALIZATIONS], default="auto",
                        help="what the model sees: 'background' = each frame's excess over its sky's background in "
                             "noise units, 'none' = the frame itself; auto: background for whole frames, none for "
                             "images that are patches (default: auto)")

    model = parser.add_argument_group("model and training (advanced)")
    model.add_argument("--model", choices=["auto", *sorted(MODELS)], default="auto",
                       help="network: ResNet18, CNN (small and fast), or auto: the ResNet18, or the CNN when aurora "
                            f"is rare in U (a prior of {RARE_PRIOR} or more), where the CNN was measured to find as "
                            f"much or more (default: %(default)s)")
    model.add_argument("--patch_size", type=data.positive_int, default=16,
                       help="patch side in pixels; the mask is as sharp as half a patch (default: %(default)s)")
    model.add_argument("--epochs", type=data.positive_int, default=24,
                       help=f"passes over the U patches, at least {MIN_STEPS_PER_EPOCH} batches each "
                            f"(default: %(default)s)")
    model.add_argument("--batchsize", type=data.positive_int, default=64,
                       help="patches per batch, half P and half U (default: %(default)s)")
    model.add_argument("--lr", type=float, default=3e-4,
                       help="Adam's learning rate at the start; it falls to 0 along a cosine over the epochs "
                            "(default: %(default)s)")
    model.add_argument("--seed", type=data.nonnegative_int, default=0,
                       help="random seed for patches, splits and weights (default: %(default)s)")
    model.add_argument("--attempts", type=data.positive_int, default=3,
                       help="trainings from other initial weights when a model collapses (default: %(default)s)")
    model.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                       help="random flips and 90-degree rotations of training patches")
    model.add_argument("--background_jitter", type=data.nonnegative_float, default=0.0, metavar="LEVELS",
                       help="also move each training patch's excess over the background by a random amount of up "
                            "to this many noise levels (with --augment; in the prior estimate always), so that how "
                            "far a frame's background estimate is off counts less in telling P from U (try "
                            f"{BACKGROUND_JITTER:g}, with --sky_template; default: %(default)s)")
    model.add_argument("--early_stopping", action=argparse.BooleanOptionalAction, default=False,
                       help="stop when the held-out PU zero-one risk has not improved for --patience epochs and keep "
                            "the best epoch's weights")
    model.add_argument("--patience", type=data.positive_int, default=3,
                       help="epochs without improvement before --early_stopping stops (default: %(default)s)")
    model.add_argument("--U_n", type=data.positive_int, default=4000,
                       help="U patches drawn (default: %(default)s)")
    model.add_argument("--P_n", type=data.positive_int, default=2000,
                       help="P patches drawn (default: %(default)s)")
    model.add_argument("--P_n_sacrifice", type=data.nonnegative_int, default=None, metavar="N",
                       help="P patches held out for validation; default 10%% of --P_n")
    model.add_argument("--val_fraction", type=float, default=0.1,
                       help="share of U patches held out for validation (default: %(default)s)")

    risk = parser.add_argument_group("PU risk (advanced)")
    risk.add_argument("--nnPU", action=argparse.BooleanOptionalAction, default=True,
                      help="non-negative PU risk (Kiryo et al. 2017); --no-nnPU gives the unbiased uPU risk")
    risk.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=True,
                      help="weigh background and aurora equally in the risk (Su et al. 2021), so that rare aurora "
                           "counts")
    risk.add_argument("--loss", choices=["sigmoid", "logistic"], default="logistic",
                      help="surrogate of the zero-one loss: the logistic loss keeps a gradient for patches on the "
                           "wrong side, where the bounded sigmoid saturates and leaves them there "
                           "(default: %(default)s)")
    risk.add_argument("--beta", type=float, default=0.0,
                      help="nnPU: correct when the negative risk falls below -beta (default: %(default)s)")
    risk.add_argument("--gamma", type=float, default=1.0,
                      help="nnPU: step size of the correction, in [0, 1] (default: %(default)s)")
    risk.add_argument("--N_dataset", default=None, metavar="FOLDER",
                      help="folder of aurora examples (N): PNU learning (Sakai et al. 2017), needs --eta")
    risk.add_argument("--N_n", type=data.positive_int, default=2000, help="N patches drawn (default: %(default)s)")
    risk.add_argument("--eta", type=float, default=None,
                      help="PNU: weight of the PU risk (eta > 0) or the NU risk (eta < 0) against the PN risk, in "
                           "[-1, 1]")
    model.add_argument("--backend_logs", action=argparse.BooleanOptionalAction, default=False,
                       help="show the Keras backend's own start-up messages")
    return parser


def check_args(args):
    """Cross-flag checks argparse cannot express; raises data.UsageError before anything is written."""
    if args.N_dataset is not None and args.eta is None:
        raise data.UsageError("--N_dataset needs --eta (PNU mix in [-1, 1])")
    if args.eta is not None and not -1.0 <= args.eta <= 1.0:
        raise data.UsageError(f"--eta: expected -1 <= eta <= 1, received {args.eta}")
    if args.eta is not None and args.N_dataset is None:
        raise data.UsageError("--eta needs --N_dataset (a folder of aurora examples)")
    if args.beta < 0:
        raise data.UsageError(f"--beta: expected beta >= 0, received {args.beta}")
    if not 0.0 <= args.gamma <= 1.0:
        raise data.UsageError(f"--gamma: expected 0 <= gamma <= 1, received {args.gamma}")
    if not args.lr > 0:
        raise data.UsageError(f"--lr: expected a positive learning rate, received {args.lr}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise data.UsageError(f"--val_fraction: expected 0 <= fraction < 1, received {args.val_fraction}")
    if args.batchsize < 2 or (args.N_dataset and args.batchsize < 3):
        raise data.UsageError(f"--batchsize: every batch needs P and U patches (and N for PNU), "
                              f"received {args.batchsize}")
    if args.P_n_sacrifice is not None and not args.P_n_sacrifice < args.P_n:
        raise data.UsageError(f"--P_n_sacrifice: expected 0 <= n < --P_n ({args.P_n}), "
                              f"received {args.P_n_sacrifice}")
    if args.early_stopping and (args.val_fraction == 0 or args.P_n_sacrifice == 0):
        raise data.UsageError("--early_stopping needs held-out P and U patches: --val_fraction > 0 and "
                              "--P_n_sacrifice > 0")
    for flag, folders in (("P_dataset", args.P_dataset), ("U_dataset", [args.U_dataset]),
                          ("N_dataset", [args.N_dataset] if args.N_dataset else [])):
        for folder in folders:
            if not Path(folder).is_dir():
                raise data.UsageError(f"--{flag}: {folder} is not a folder")
    save_dir = Path(args.save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        raise data.UsageError(f"--save_dir: {args.save_dir} exists and is not a folder")
    if (save_dir / "model.keras").exists() and not args.overwrite:
        raise data.UsageError(f"{save_dir / 'model.keras'} exists; pass --overwrite to replace it")
    check_backup(args)


BACKUP_SETTINGS = "settings.json"


def backup_has_checkpoint(backup):
    """Whether ``backup/`` holds a checkpoint of an interrupted run (more than its settings)."""
    return backup.is_dir() and any(path.name != BACKUP_SETTINGS for path in backup.iterdir())


def _backup_settings(args):
    """The flags an interrupted run must share with this one to be resumed from its backup."""
    return {key: value for key, value in vars(args).items() if key not in ("quiet", "overwrite", "backend_logs")}


def check_backup(args):
    """Refuse to resume a ``backup/`` of an interrupted run that had other flags; start it over with --overwrite."""
    backup = Path(args.save_dir) / "backup"
    if not backup.exists():
        return
    if args.overwrite:
        shutil.rmtree(backup)
        return
    if not backup_has_checkpoint(backup):
        return  # no checkpoint: nothing to resume
    recorded_path = backup / BACKUP_SETTINGS
    recorded = json.loads(recorded_path.read_text()) if recorded_path.exists() else {}
    current = json.loads(json.dumps(_backup_settings(args)))
    changed = sorted(key for key in set(recorded) | set(current) if recorded.get(key) != current.get(key))
    if changed:
        raise data.UsageError(f"{backup} holds an interrupted run with other settings ({', '.join(changed)}); "
                              f"pass --overwrite to start again, or the same flags to resume it")


def main(argv=None):
    """Run the command line; returns the exit code (0 ok, 2 bad input, 3 training failed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            # A skipped file is worth one line, not a source listing; the
            # libraries' notes to their own developers are not the user's.
            warnings.showwarning = lambda message, *_, **__: print(f"train.py: warning: {message}", file=sys.stderr)
            warnings.simplefilter("ignore", DeprecationWarning)
            check_args(args)
            data.import_keras(args.backend_logs)
            config = train(args)
    except data.UsageError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except TrainingFailed as error:
        print(f"train.py: training failed: {error}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    if not args.quiet:
        extra = ", sky_template.png" if args.sky_template else ""
        print(f"train.py: wrote model.keras, config.json, history.csv, loss.png{extra} and prediction.png to "
              f"{args.save_dir}")
        print(f"train.py: on patches apart from its training ones, the model calls "
              f"{config['unseen_U_fraction_aurora']:.1%} of U and {config['unseen_P_fraction_aurora']:.1%} of P "
              f"aurora; the prior {config['prior']:.3f} says {1 - config['prior']:.1%} of U is")
    skyless = config["frames_without_border"]["P"] + config["frames_without_border"]["U"]
    if skyless:
        horizon = config["preprocessing"]["min_elevation"] is not None  # a cut without a map
        print(f"train.py: {data.borderless_warning(skyless, horizon)}", file=sys.stderr)
    if config["U_frames_unlike_P"]:
        names = config["U_frames_unlike_P"]
        print(f"train.py: warning: {len(names)} U frame(s) have a sky unlike every P frame ({', '.join(names[:5])}"
              f"{', ...' if len(names) > 5 else ''}): add aurora-free frames like them to --P_dataset if their "
              f"masks follow the sky", file=sys.stderr)
    if config["rare_aurora_note"]:
        print(f"train.py: note: {config['rare_aurora_note']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
