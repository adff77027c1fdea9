"""Segment all-sky aurora frames with a patch classifier trained by PU learning.

The model from ``train.py`` looks at one square patch and returns one logit;
a logit > 0 means BACKGROUND (the positive class of PU learning), so

    P(aurora) = sigmoid(-logit).

The probability at a pixel is that of the patch centred on it. Evaluating a
patch at every pixel is exact but slow (230,400 patches for a 480x480 frame),
so patches are evaluated on a grid of centres ``--stride`` pixels apart and
the LOGITS are interpolated bilinearly to every pixel; the grid always
contains the frame's first and last rows and columns, so the interpolation
never extrapolates, and at an evaluated centre it returns the evaluated logit
exactly. ``--stride 1`` is the exact per-pixel sliding window.

The default mode is coarse to fine (``--stride 16 --adaptive --fine_stride
2``): a grid of stride 16, then, round by round, the stride is halved inside
the grid cells whose four corner logits are not all on the same side of the
threshold (or one of them is within ``ADAPTIVE_MARGIN`` of it), down to stride
2, and only the new patches inside those cells are evaluated. Away from the
boundary of the mask the coarse interpolation stays. On the generator's
480x480 aurora frames this evaluates under 2 % of the patches of
``--stride 1``, 56 times faster than the seed's all-patches ``predict`` with
the default 16-pixel model (119 times with 32-pixel patches), and its masks
agree with the exact ones at IoU 0.99 (``--fine_stride 1`` evaluates every
boundary pixel: IoU 0.997 with 1.9 times the patches); see "Speed" in the
README and ``tests/benchmark_segmentation.py``. The price: a patch of aurora (or of
background) that fits between the coarse nodes without changing the logit
at any of them is not seen; use a smaller ``--stride`` for small frames or
structures a few pixels wide. ``--no-adaptive`` interpolates the plain grid.

Memory is bounded by the batch, not by the frame: the frame is padded once,
patches are read from a zero-copy window view of it, and only ``--batchsize``
patches are copied out at a time.

All-sky frames are a fisheye circle on a black border. The border is found
(``sky_mask``), patches that cannot influence any sky pixel are not evaluated,
and pixels outside the sky are background in the mask.

A patch is aurora when aurora lies anywhere in it, so ``P(aurora) >
--threshold`` draws the mask up to half a patch past bright aurora. With
``--refine`` (the default) the boundary is then moved onto the aurora's edge
in the image by a random walker between confident seeds (``refine_mask``):
on 16 held-out generator frames the mean IoU rose from 0.869 to 0.932 (see
"Quality" in the README). The probability map is the model's, unrefined.

Usage::

    python segmentation.py --dataset dataset/Unlabelled --model Results/model.keras \\
        --save_dir Results/segmentation --masks dataset/masks

Outputs, one file per frame and kind, named by the frame's stem, in
``--save_dir``: ``mask/`` (uint8 PNG, 255 = aurora), ``probability/`` (float32
``.npy`` of P(aurora), with ``--save_probability``), ``color_filter/`` (P through
the ``bwr`` colour map: blue = aurora, red = background), ``overlay/`` (the
frame with the colour filter blended over it), ``figure/`` (Original,
Probability, Segmented) and one ``summary.csv``.

``summary.csv`` has one row per frame: ``file``, ``rows``, ``cols``,
``aurora_fraction`` (aurora pixels / sky pixels, the sky being the detected
fisheye circle, or the whole frame when none is found), ``mean_p_aurora``
(over the same sky), ``seconds`` (reading, segmenting and writing the frame)
and ``patches`` (patches evaluated); with ``--masks`` also ``iou``,
``precision`` and ``recall`` of aurora against the true mask over the whole
frame (see ``mask_metrics`` for empty masks). A last row with ``file`` =
``mean`` holds the mean of every per-frame number except rows, cols and
patches.

Exit codes: 0 all frames segmented, 1 some frames could not be read (each
is named on stderr and skipped), 2 bad input (one line on stderr, nothing
written).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import weakref
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import data

PROG = "segmentation.py"

# Logit given to grid points that are not evaluated because no sky pixel
# depends on them; sigmoid(-20) = 2e-9, i.e. certainly background. Its value
# never reaches a sky pixel (see ``needed_grid_points``).
BACKGROUND_LOGIT = 20.0

# The default mode: a grid of patch centres DEFAULT_STRIDE pixels apart,
# refined down to DEFAULT_FINE_STRIDE in the cells where the mask boundary
# may pass.
DEFAULT_STRIDE = 16

# The grid refinement stops at this stride: near the boundary the logits are
# interpolated over 2 pixels (1 = evaluated at every boundary pixel). On the
# generator's frames stride 2 agreed with the exact masks at IoU 0.99 with
# about half the patches of stride 1 (tests/benchmark_segmentation.py).
DEFAULT_FINE_STRIDE = 2

# Grid cells with a corner logit closer than this to the threshold's logit are
# refined even when all four corners are on the same side (logit units).
ADAPTIVE_MARGIN = 1.0

# Mask refinement (``--refine``, ``refine_mask``). The values were chosen on
# 24 generator frames from seeds 700_000 up, which neither the shipped
# dataset, the tests nor tests/evaluate_quality.py use (mean IoU 0.886
# unrefined, 0.943 refined); each of smoothing 0.7 to 1.5, dark fraction 0.1
# to 0.5, edge weight 300 to 3000, and seed radii of 12- to 24-pixel patches
# changed that by less than 0.01.
# Gaussian smoothing before the random walker, in pixels: sensor noise and
# single stars would otherwise make edges everywhere.
REFINE_SMOOTHING = 1.0
# The random walker works on log(brightness + offset), offset = this fraction
# of the sky's median brightness, so that the faint outer edge of aurora is
# as visible as its bright core and the result does not depend on the gain.
REFINE_DARK_FRACTION = 0.3
# Edge weights are exp(-REFINE_EDGE_WEIGHT * mean over channels of the squared
# step in log brightness between neighbouring pixels): a step of 0.04 (4 %
# brighter) already weighs 0.38, one of 0.1 weighs 0.002.
REFINE_EDGE_WEIGHT = 600.0
# The random walker builds a graph of every pixel it is given, so frames are
# solved in tiles of this side (plus a margin) to bound memory.
REFINE_TILE = 512

# Opacity of the colour filter in the overlay (the seed's "superimposed").
OVERLAY_ALPHA = 0.4

# Largest side, in pixels, of the arrays drawn in the figure.
FIGURE_MAX_SIDE = 1024

OUTPUT_KINDS = ("mask", "color_filter", "overlay", "figure")

SUMMARY_COLUMNS = ["file", "rows", "cols", "aurora_fraction", "mean_p_aurora", "seconds", "patches"]
METRIC_COLUMNS = ["iou", "precision", "recall"]


class UsageError(ValueError):
    """A problem with the command line or its inputs; reported in one line, exit 2."""


# ---------------------------------------------------------------------------
# Model: loading and the one function that feeds it
# ---------------------------------------------------------------------------


def load_model(path):
    """Load a ``.keras`` patch classifier saved by ``train.py``.

    Parameters
    ----------
    path : str or Path
        A ``.keras`` file made of stock Keras layers.

    Returns
    -------
    model : keras.Model
        Input ``(None, patch, patch, 3)`` float32 RGB in [0, 1], output
        ``(None, 1)``: one logit per patch, > 0 = background.

    Raises
    ------
    UsageError
        If the file is missing, is not ``.keras``, cannot be loaded, or has
        the wrong input or output shape. The message names the file.
    """
    path = check_model_path(path)
    # Keeps TensorFlow's C++ start-up chatter off the terminal of a CLI user;
    # it has no effect when TensorFlow is already imported (e.g. in tests).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    try:
        # compile=False: inference needs no loss, and the training loss is a
        # custom object that only resolves where PULoss is imported.
        model = keras.models.load_model(path, compile=False)
    except (ValueError, KeyError, TypeError, OSError, zipfile.BadZipFile) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot load model {path}: {first_line}") from None
    patch_size_of(model, name=path)
    output_shape = model.output_shape
    if not (isinstance(output_shape, tuple) and len(output_shape) == 2 and output_shape[1] == 1):
        raise UsageError(f"invalid model {path}: expected output shape (None, 1), received {output_shape}")
    return model


def check_model_path(path):
    """Return ``path`` as a Path if it is an existing ``.keras`` file, else raise UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"model file not found: {path}")
    if path.suffix != ".keras":
        raise UsageError(f"invalid model file {path}: expected a .keras file, received '{path.suffix}'")
    return path


def patch_size_of(model, name="model"):
    """Return the patch side in pixels read from the model's input shape.

    Parameters
    ----------
    model : keras.Model
        Must have input shape ``(None, patch, patch, 3)`` with ``patch`` an int.
    name : str or Path
        What to call the model in the error message (its file).

    Returns
    -------
    patch_size : int

    Raises
    ------
    UsageError
        If the input shape is anything else (several inputs, unknown or
        non-square size, not 3 channels).
    """
    shape = model.input_shape
    valid = (
        isinstance(shape, tuple)
        and len(shape) == 4
        and isinstance(shape[1], int)
        and shape[1] > 0
        and shape[1] == shape[2]
        and shape[3] == 3
    )
    if not valid:
        raise UsageError(f"invalid model {name}: expected input shape (None, patch, patch, 3), received {shape}")
    return shape[1]


# A compiled forward pass per loaded model. A tf.function with a None batch
# dimension is traced once and then reused for every batch size; it measured
# 1.1x to 1.2x faster than model.predict_on_batch for small models on this
# 2-core CPU, and about 9x faster than model.predict per batch. XLA
# (jit_compile=True) measured 2.7x slower for small models, so it is not used.
_FORWARD_PASSES = weakref.WeakKeyDictionary()


def _forward_pass(model):
    forward = _FORWARD_PASSES.get(model)
    if forward is None:
        import tensorflow as tf

        # The function holds only a weak reference, so that the cache entry
        # (and the traced graph) goes away with the model.
        model_ref = weakref.ref(model)
        patch_size = patch_size_of(model)
        spec = tf.TensorSpec((None, patch_size, patch_size, 3), tf.float32)

        @tf.function(input_signature=[spec])
        def forward(patches):
            return model_ref()(patches, training=False)

        _FORWARD_PASSES[model] = forward
    return forward


def predict_logits(model, patches, batch_size=256):
    """Feed patches to the model in inference mode and return their logits.

    This is the one place where the model is called.

    Parameters
    ----------
    model : keras.Model
        Input ``(None, patch, patch, 3)``, output ``(None, 1)``.
    patches : ndarray of shape (n, patch, patch, 3), float32
        RGB in [0, 1].
    batch_size : int
        Patches per model call; bounds the activation memory.

    Returns
    -------
    logits : ndarray of shape (n,), float32
        One logit per patch; > 0 means background, P(aurora) = sigmoid(-logit).
    """
    forward = _forward_pass(model)
    logits = np.empty(len(patches), dtype=np.float32)
    for start in range(0, len(patches), batch_size):
        batch = np.ascontiguousarray(patches[start : start + batch_size], dtype=np.float32)
        # (batch, 1) logits -> (batch,)
        logits[start : start + len(batch)] = np.asarray(forward(batch), dtype=np.float32).reshape(-1)
    return logits


# ---------------------------------------------------------------------------
# Window arithmetic: padding, patch views, grids, interpolation
# ---------------------------------------------------------------------------


def pad_frame(image, patch_size):
    """Reflect-pad a frame so that every pixel is the centre of a full patch.

    The patch centred at pixel ``(row, col)`` covers rows
    ``row - patch_size // 2 ... row - patch_size // 2 + patch_size - 1`` and
    likewise columns (for an even patch the centre is the lower of the two
    middle pixels, index ``patch_size // 2`` inside the patch). So the frame
    gets ``patch_size // 2`` rows/columns before and
    ``patch_size - 1 - patch_size // 2`` after.

    Parameters
    ----------
    image : ndarray of shape (rows, cols, 3), float32
    patch_size : int

    Returns
    -------
    padded : ndarray of shape (rows + patch_size - 1, cols + patch_size - 1, 3), float32

    Notes
    -----
    The padding is ``numpy.pad(mode="reflect")``: mirrored about the edge
    pixel, which is not repeated (``d c b | a b c d | c b a``). When the pad
    is wider than the frame (a frame smaller than half the patch), numpy
    reflects again at the far edge, so the padded axis is the triangle wave
    ``a b c d c b a b c ...``; an axis of one pixel is repeated. Every padded
    value is therefore a value of the frame, at any frame size.
    """
    before = patch_size // 2
    after = patch_size - 1 - before
    return np.pad(image, ((before, after), (before, after), (0, 0)), mode="reflect")


def patch_windows(padded, patch_size):
    """Return a zero-copy view of every patch of a padded frame.

    Parameters
    ----------
    padded : ndarray of shape (rows + patch_size - 1, cols + patch_size - 1, 3)
        From ``pad_frame``.
    patch_size : int

    Returns
    -------
    windows : ndarray view of shape (rows, cols, patch_size, patch_size, 3)
        ``windows[row, col]`` is the patch centred at pixel ``(row, col)`` of
        the unpadded frame. Read-only; shares memory with ``padded``.

    Notes
    -----
    Materialising this view for a 480x480 frame and 32x32 patches would take
    2.8 GB of float32; index it with at most a batch of centres at a time.
    """
    # Window shape (p, p, 3) over (rows, cols, 3) gives (rows, cols, 1, p, p, 3).
    return sliding_window_view(padded, (patch_size, patch_size, padded.shape[2]))[:, :, 0]


def logits_at(model, windows, rows, cols, batch_size=256):
    """Evaluate the model on the patches centred at arbitrary pixels.

    The building block of every mode: the grid uses it for its nodes, and a
    later refinement can use it for any set of extra pixels.

    Parameters
    ----------
    model : keras.Model
    windows : ndarray view of shape (frame_rows, frame_cols, patch, patch, 3)
        From ``patch_windows``.
    rows, cols : ndarray of shape (n,), int
        Pixel coordinates of the patch centres in the unpadded frame.
    batch_size : int
        Patches copied out of the view and fed to the model at a time; peak
        patch memory is ``batch_size * patch * patch * 3 * 4`` bytes.

    Returns
    -------
    logits : ndarray of shape (n,), float32
        > 0 means background.
    """
    rows = np.asarray(rows, dtype=np.intp)
    cols = np.asarray(cols, dtype=np.intp)
    logits = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        stop = start + batch_size
        # Fancy indexing copies only this batch: (batch, patch, patch, 3).
        patches = windows[rows[start:stop], cols[start:stop]]
        logits[start:stop] = predict_logits(model, patches, batch_size)
    return logits


def grid_coordinates(length, stride):
    """Return the evaluated centres along one axis.

    Parameters
    ----------
    length : int
        Pixels along the axis (>= 1).
    stride : int
        Pixels between evaluated centres (>= 1).

    Returns
    -------
    coordinates : ndarray of shape (m,), int64
        ``0, stride, 2 * stride, ...`` and ``length - 1`` if not already
        there, so the last interval may be shorter than ``stride``. With
        stride 1 this is every pixel.

    Examples
    --------
    >>> grid_coordinates(10, 4)
    array([0, 4, 8, 9])
    """
    if length < 1 or stride < 1:
        raise ValueError(f"Invalid grid: expected length >= 1 and stride >= 1, received {length} and {stride}")
    coordinates = np.arange(0, length, stride, dtype=np.int64)
    if coordinates[-1] != length - 1:
        coordinates = np.append(coordinates, length - 1)
    return coordinates


def interpolation_weights(length, coordinates):
    """Return, for every pixel of an axis, its left grid node and weight.

    Parameters
    ----------
    length : int
        Pixels along the axis.
    coordinates : ndarray of shape (m,), int
        Grid nodes from ``grid_coordinates`` (increasing, first 0, last
        ``length - 1``).

    Returns
    -------
    lower : ndarray of shape (length,), intp
        Index of the node at or left of each pixel (at most ``m - 2``).
    weight : ndarray of shape (length,), float32
        Weight of node ``lower + 1``; node ``lower`` gets ``1 - weight``.
        It is exactly 0 or 1 at a node, so interpolated values at nodes equal
        the node values bit for bit.
    """
    return _weights_at(np.arange(length), coordinates)


def _weights_at(positions, coordinates):
    """``interpolation_weights`` at chosen pixels ``positions`` (int, within the grid) of an axis."""
    positions = np.asarray(positions)
    coordinates = np.asarray(coordinates)
    if len(coordinates) == 1:
        return np.zeros(len(positions), dtype=np.intp), np.zeros(len(positions), dtype=np.float32)
    lower = np.searchsorted(coordinates, positions, side="right") - 1
    lower = np.clip(lower, 0, len(coordinates) - 2)
    left = coordinates[lower]
    weight = (positions - left) / (coordinates[lower + 1] - left)
    return lower.astype(np.intp), weight.astype(np.float32)


def interpolate_grid(grid_logits, row_coordinates, col_coordinates, rows, cols):
    """Bilinearly interpolate logits from grid nodes to every pixel.

    Parameters
    ----------
    grid_logits : ndarray of shape (m, n), float32
        Logit at node ``(row_coordinates[i], col_coordinates[j])``.
    row_coordinates : ndarray of shape (m,), int
    col_coordinates : ndarray of shape (n,), int
        From ``grid_coordinates(rows, stride)`` and ``grid_coordinates(cols, stride)``.
    rows, cols : int
        Frame size.

    Returns
    -------
    logits : ndarray of shape (rows, cols), float32
        Equal to ``grid_logits`` at the nodes, bilinear in between.

    Notes
    -----
    Logits, not probabilities, are interpolated: the threshold P = 0.5 is
    logit 0, and a linear blend of logits moves the boundary smoothly
    between nodes instead of flattening it as a blend of sigmoids would.
    """
    return _interpolate_at(grid_logits, row_coordinates, col_coordinates, np.arange(rows), np.arange(cols))


def _interpolate_at(grid_logits, row_coordinates, col_coordinates, row_positions, col_positions):
    """``interpolate_grid`` on the sub-grid ``row_positions`` x ``col_positions`` of the frame's pixels.

    Returns an ndarray of shape (len(row_positions), len(col_positions)), float32.
    """
    grid_logits = np.asarray(grid_logits, dtype=np.float32)
    row_lower, row_weight = _weights_at(row_positions, row_coordinates)
    col_lower, col_weight = _weights_at(col_positions, col_coordinates)
    row_upper = np.minimum(row_lower + 1, len(row_coordinates) - 1)
    col_upper = np.minimum(col_lower + 1, len(col_coordinates) - 1)
    # Along columns on the m grid rows first (small), then along rows.
    along_cols = grid_logits[:, col_lower] * (1 - col_weight) + grid_logits[:, col_upper] * col_weight  # (m, cols)
    # In place, so that a large frame needs two full-size arrays, not four.
    logits = along_cols[row_lower]  # (rows, cols)
    logits *= (1 - row_weight)[:, None]
    upper = along_cols[row_upper]
    upper *= row_weight[:, None]
    logits += upper
    return logits


def needed_grid_points(sky, row_coordinates, col_coordinates, stride):
    """Return which grid nodes influence at least one sky pixel.

    A pixel's interpolated logit uses only the nodes of the grid cell that
    contains it, which are less than ``stride`` pixels away along each axis.
    A node with no sky pixel within ``stride - 1`` pixels (a square of side
    ``2 * stride - 1``) therefore never reaches the sky, and skipping it
    changes no sky pixel's logit. With stride 1 this is the sky itself.

    Parameters
    ----------
    sky : ndarray of shape (rows, cols), bool
        From ``sky_mask``.
    row_coordinates, col_coordinates : ndarray of int
        Grid nodes along each axis.
    stride : int

    Returns
    -------
    needed : ndarray of shape (len(row_coordinates), len(col_coordinates)), bool
    """
    if sky.all():
        return np.ones((len(row_coordinates), len(col_coordinates)), dtype=bool)
    from scipy import ndimage

    near_sky = ndimage.maximum_filter(sky.view(np.uint8), size=2 * stride - 1, mode="constant", cval=0)
    return near_sky[np.ix_(row_coordinates, col_coordinates)] > 0


def threshold_logit(threshold):
    """Return the logit at which P(aurora) = sigmoid(-logit) equals ``threshold``.

    A pixel is aurora when P(aurora) > threshold, i.e. when its logit is
    below ``log((1 - threshold) / threshold)`` (0 for threshold 0.5; +inf
    for threshold 0 and -inf for 1, where no finite logit changes side).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"Invalid threshold: expected 0 <= threshold <= 1, received {threshold}")
    if threshold == 0.0:
        return np.inf
    if threshold == 1.0:
        return -np.inf
    return float(np.log((1.0 - threshold) / threshold))


def cells_to_refine(grid_logits, exact, boundary_logit, margin):
    """Return the grid cells that the boundary may cross.

    A cell is the rectangle between four neighbouring nodes. It is refined
    when its four corners were all evaluated (``exact``) and either they are
    not all on the same side of ``boundary_logit`` (the mask changes inside
    the cell) or one of them is closer to it than ``margin`` (it may change
    inside the cell without the corners showing it).

    Parameters
    ----------
    grid_logits : ndarray of shape (m, n), float32
    exact : ndarray of shape (m, n), bool
        True where the node's logit was evaluated, not interpolated.
    boundary_logit : float
        From ``threshold_logit``.
    margin : float
        In logit units, >= 0.

    Returns
    -------
    refine : ndarray of shape (m - 1, n - 1), bool
    """
    corners = [(slice(None, -1), slice(None, -1)), (slice(None, -1), slice(1, None)),
               (slice(1, None), slice(None, -1)), (slice(1, None), slice(1, None))]
    all_exact = np.logical_and.reduce([exact[corner] for corner in corners])
    below = [grid_logits[corner] < boundary_logit for corner in corners]
    mixed = np.logical_or.reduce(below) & ~np.logical_and.reduce(below)
    with np.errstate(invalid="ignore"):
        # inf - inf (threshold 0 or 1) is nan, which is never < margin.
        near = np.logical_or.reduce([np.abs(grid_logits[corner] - boundary_logit) < margin for corner in corners])
    return all_exact & (mixed | near)


def _cells_around(coordinates, positions):
    """For pixels of an axis, the first and last grid cell (closed interval) that contains each.

    A pixel strictly between nodes ``i`` and ``i + 1`` is in cell ``i``
    only; a pixel on node ``i`` is in cells ``i - 1`` and ``i`` (clipped to
    the ``len(coordinates) - 1`` cells that exist).
    """
    last_cell = len(coordinates) - 2
    first = np.clip(np.searchsorted(coordinates, positions, side="left") - 1, 0, last_cell)
    last = np.clip(np.searchsorted(coordinates, positions, side="right") - 1, 0, last_cell)
    return first, last


def _next_stride(stride):
    """The stride of the next finer grid: ``stride`` divided by its smallest prime factor.

    Dividing keeps every node of a grid a node of the next one
    (16 -> 8 -> 4 -> 2 -> 1, 12 -> 6 -> 3 -> 1, 5 -> 1).
    """
    factor = next(f for f in range(2, stride + 1) if stride % f == 0)
    return stride // factor


def refine_grid(evaluate, grid_logits, exact, row_coordinates, col_coordinates, stride, sky, boundary_logit,
                margin, finest_stride=1):
    """Refine a grid of logits towards stride 1 where the mask boundary may pass.

    Each round takes the cells of the current grid chosen by
    ``cells_to_refine``, divides the stride by its smallest prime factor
    (16 -> 8 -> 4 -> 2 -> 1), evaluates the new nodes inside those cells and
    on their edges, and gives every other new node the bilinear value of the
    current grid, marked not exact. Cells away from the boundary are
    therefore never refined again, and the final grid has stride
    ``finest_stride`` or less (or the first stride at which nothing needed
    refining).

    Parameters
    ----------
    evaluate : callable
        ``evaluate(rows, cols)`` with two (k,) int arrays of pixel
        coordinates returns the (k,) float32 logits of the patches centred
        there (``logits_at`` on the frame).
    grid_logits : ndarray of shape (m, n), float32
        Logits at ``row_coordinates x col_coordinates``.
    exact : ndarray of shape (m, n), bool
        True where a node was evaluated; nodes that are not (outside the
        sky) are never refined.
    row_coordinates, col_coordinates : ndarray of int
        From ``grid_coordinates(rows, stride)`` and ``(cols, stride)``.
    stride : int
    sky : ndarray of shape (rows, cols), bool
        New nodes that influence no sky pixel (``needed_grid_points``) are
        not evaluated.
    boundary_logit, margin : float
        See ``cells_to_refine``.
    finest_stride : int
        Refinement stops once the stride is at most this.

    Returns
    -------
    grid_logits, exact, row_coordinates, col_coordinates : ndarrays
        The final grid, to be interpolated with ``interpolate_grid``.
    patches : int
        Patches evaluated by the refinement.

    Notes
    -----
    Bilinear interpolation reproduces a bilinear function exactly, so
    filling the new nodes of unrefined cells with the current interpolant
    leaves the interpolated map there unchanged; next to a refined cell the
    new edge nodes are exact and the interpolant stays continuous across the
    edge. Inside a refined cell every pixel is within the new grid's cells
    whose corners are all exact; with ``finest_stride`` 1 every pixel of the
    last refined cells is evaluated. On a frame of ``R x C`` pixels the finest
    grids are full size: memory is a few ``R x C`` arrays of float32 and
    bool, not of patches.
    """
    rows, cols = sky.shape
    patches = 0
    while stride > finest_stride and len(row_coordinates) > 1 and len(col_coordinates) > 1:
        refine = cells_to_refine(grid_logits, exact, boundary_logit, margin)
        if not refine.any():
            break
        stride = _next_stride(stride)
        new_rows, new_cols = grid_coordinates(rows, stride), grid_coordinates(cols, stride)
        # Every node of the current grid is a node of the new one.
        old_rows, old_cols = np.searchsorted(new_rows, row_coordinates), np.searchsorted(new_cols, col_coordinates)
        new_logits = _interpolate_at(grid_logits, row_coordinates, col_coordinates, new_rows, new_cols)
        new_logits[np.ix_(old_rows, old_cols)] = grid_logits
        new_exact = np.zeros(new_logits.shape, dtype=bool)
        new_exact[np.ix_(old_rows, old_cols)] = exact
        # A new node is in a refined cell if any of the (up to four) current
        # cells whose closed rectangle holds it is refined.
        first_row, last_row = _cells_around(row_coordinates, new_rows)
        first_col, last_col = _cells_around(col_coordinates, new_cols)
        todo = refine[np.ix_(first_row, first_col)]
        todo |= refine[np.ix_(first_row, last_col)]
        todo |= refine[np.ix_(last_row, first_col)]
        todo |= refine[np.ix_(last_row, last_col)]
        todo &= ~new_exact
        todo &= needed_grid_points(sky, new_rows, new_cols, stride)
        node_rows, node_cols = np.nonzero(todo)
        del todo
        new_logits[node_rows, node_cols] = evaluate(new_rows[node_rows], new_cols[node_cols])
        new_exact[node_rows, node_cols] = True
        patches += len(node_rows)
        grid_logits, exact, row_coordinates, col_coordinates = new_logits, new_exact, new_rows, new_cols
    return grid_logits, exact, row_coordinates, col_coordinates, patches


def logit_map(model, image, stride=4, batch_size=256, sky=None, adaptive=False, threshold=0.5, margin=None,
              fine_stride=DEFAULT_FINE_STRIDE):
    """Return the logit of the patch centred at every pixel of a frame.

    Parameters
    ----------
    model : keras.Model
        Input ``(None, patch, patch, 3)``, output ``(None, 1)``.
    image : ndarray of shape (rows, cols, 3), float32
        RGB in [0, 1]; any size, padded by ``pad_frame``.
    stride : int
        Pixels between evaluated centres; 1 evaluates every pixel (exact),
        larger values interpolate the logits bilinearly between nodes of
        ``grid_coordinates``. With ``adaptive`` this is the coarse grid.
    batch_size : int
        Patches per model call.
    sky : ndarray of shape (rows, cols), bool, optional
        Nodes that influence no sky pixel are not evaluated and get
        ``BACKGROUND_LOGIT``. Default: the whole frame is sky.
    adaptive : bool
        Refine the grid down to ``fine_stride`` where the mask boundary may
        pass (``refine_grid``); elsewhere the logits stay interpolated.
    threshold : float
        The P(aurora) threshold of the mask; only used by ``adaptive``.
    margin : float, optional
        Only used by ``adaptive``: cells with a corner less than ``margin``
        (logit units) from the threshold's logit are refined even when all
        corners are on one side. Default ``ADAPTIVE_MARGIN``.
    fine_stride : int
        Only used by ``adaptive``: the finest stride; 1 evaluates every pixel
        near the boundary.

    Returns
    -------
    logits : ndarray of shape (rows, cols), float32
        > 0 means background; P(aurora) = sigmoid(-logits). Exact at the
        evaluated nodes. Outside ``sky`` the values are meaningless.
    patches : int
        How many patches were evaluated.
    """
    if stride < 1:
        raise ValueError(f"Invalid stride: expected an int >= 1, received {stride}")
    margin = ADAPTIVE_MARGIN if margin is None else float(margin)
    if margin < 0:
        raise ValueError(f"Invalid margin: expected margin >= 0, received {margin}")
    if fine_stride < 1:
        raise ValueError(f"Invalid fine_stride: expected an int >= 1, received {fine_stride}")
    boundary_logit = threshold_logit(threshold)
    patch_size = patch_size_of(model)
    rows, cols = image.shape[:2]
    if sky is None:
        sky = np.ones((rows, cols), dtype=bool)
    windows = patch_windows(pad_frame(image, patch_size), patch_size)

    def evaluate(centre_rows, centre_cols):
        return logits_at(model, windows, centre_rows, centre_cols, batch_size)

    row_coordinates = grid_coordinates(rows, stride)
    col_coordinates = grid_coordinates(cols, stride)
    exact = needed_grid_points(sky, row_coordinates, col_coordinates, stride)
    node_rows, node_cols = np.nonzero(exact)
    grid_logits = np.full(exact.shape, BACKGROUND_LOGIT, dtype=np.float32)
    grid_logits[node_rows, node_cols] = evaluate(row_coordinates[node_rows], col_coordinates[node_cols])
    patches = len(node_rows)
    if adaptive:
        grid_logits, exact, row_coordinates, col_coordinates, refined = refine_grid(
            evaluate, grid_logits, exact, row_coordinates, col_coordinates, stride, sky, boundary_logit, margin,
            fine_stride,
        )
        patches += refined
    # Frees the padded copy of the frame before the full-size interpolation.
    del windows, evaluate, exact
    if len(row_coordinates) == rows and len(col_coordinates) == cols:
        # The grid is every pixel: nothing to interpolate.
        return grid_logits, patches
    return interpolate_grid(grid_logits, row_coordinates, col_coordinates, rows, cols), patches


def aurora_probability(logits):
    """Return P(aurora) = sigmoid(-logit), computed without overflow.

    Parameters
    ----------
    logits : ndarray, float32
        > 0 means background.

    Returns
    -------
    probability : ndarray of the same shape, float32, in [0, 1]
    """
    from scipy.special import expit

    return expit(-np.asarray(logits, dtype=np.float32)).astype(np.float32)


# ---------------------------------------------------------------------------
# The fisheye circle
# ---------------------------------------------------------------------------


def sky_mask(image, threshold=0.01, smoothing=5, min_border_fraction=0.005):
    """Detect the sky (the fisheye circle) of an all-sky frame.

    The border around the circle is black: essentially 0, while even a dark
    sky has noise and stars of a few hundredths. The border is taken to be
    the near-zero pixels connected to the frame's edges; the sky is the
    largest connected region of what remains.

    Parameters
    ----------
    image : ndarray of shape (rows, cols, 3), float32
        RGB in [0, 1].
    threshold : float
        A pixel is near zero when the mean of its channel maximum over a
        ``smoothing`` x ``smoothing`` square is <= this (0.01 ~ 2.5/255).
    smoothing : int
        Side of that square in pixels; averaging keeps single dark pixels of
        a noisy sky out of the border.
    min_border_fraction : float
        Edge-connected dark regions smaller than this fraction of the frame
        are not a border (a dark corner of an ordinary frame).

    Returns
    -------
    sky : ndarray of shape (rows, cols), bool
        True inside the sky. All True when the frame has no border (or when
        everything is dark, so no sky can be told apart).

    Notes
    -----
    Keeping only the largest non-border region drops text and time stamps
    printed in the black corners. Dark sky connected to the border by
    near-zero pixels (e.g. below the horizon) is counted as border, which
    is harmless because such pixels are background anyway. Averaging would
    move the edge up to ``smoothing // 2`` pixels into the border, so dark
    pixels that close to the averaged border are added back to it.
    """
    from scipy import ndimage

    rows, cols = image.shape[:2]
    # Arrays are deleted as soon as they are used: a 4096x4096 frame makes
    # each of them 16 to 64 MB.
    brightness = image.max(axis=2)  # (rows, cols) float32
    dark = brightness <= threshold
    smooth_dark = ndimage.uniform_filter(brightness, size=smoothing, mode="nearest") <= threshold
    del brightness
    labels, _ = ndimage.label(smooth_dark)
    del smooth_dark
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    # A lookup table over labels: cheaper than np.isin, which sorts copies.
    touches_edge = np.zeros(labels.max() + 1, dtype=bool)
    touches_edge[edge_labels] = True
    touches_edge[0] = False  # label 0 is the bright background of ndimage.label
    border = touches_edge[labels]
    del labels
    # Averaging lifts the border pixels next to a bright sky above the
    # threshold; give back to the border the dark pixels within reach of the
    # averaging window, so that the edge lands on the circle itself.
    near_border = ndimage.maximum_filter(border.view(np.uint8), size=smoothing, mode="constant", cval=0)
    border |= dark & (near_border > 0)
    del near_border, dark
    if border.sum() < min_border_fraction * rows * cols:
        return np.ones((rows, cols), dtype=bool)
    sky_labels, count = ndimage.label(~border)
    if count == 0:
        return np.ones((rows, cols), dtype=bool)
    sizes = np.bincount(sky_labels.ravel())
    sizes[0] = 0
    return sky_labels == np.argmax(sizes)


# ---------------------------------------------------------------------------
# Mask refinement
# ---------------------------------------------------------------------------


def refine_mask(image, mask, sky, patch_size, tile=REFINE_TILE):
    """Move the mask boundary onto the aurora's visible edge with a random walker.

    The model calls a patch aurora when aurora lies anywhere in it, so the
    mask of ``P(aurora) > threshold`` is only as sharp as half a patch: it
    runs a few pixels past bright aurora and can stop short of faint edges.
    Pixels deep inside the mask (eroded by ``patch_size // 3``) become aurora
    seeds, pixels beyond ``patch_size // 2`` of it and outside the sky
    become background seeds, and scikit-image's ``random_walker`` labels the
    band in between from the image: a walker crosses small brightness steps
    easily and large ones hardly at all, so the band is split where the
    brightness changes most. The image is smoothed (``REFINE_SMOOTHING``)
    and log-transformed (``REFINE_DARK_FRACTION``) first.

    Parameters
    ----------
    image : ndarray of shape (rows, cols, 3), float32
        RGB in [0, 1].
    mask : ndarray of shape (rows, cols), bool
        True = aurora, from the model.
    sky : ndarray of shape (rows, cols), bool
        From ``sky_mask``; pixels outside it are background.
    patch_size : int
        The model's patch side in pixels (>= 1); sets how far the boundary
        may move.
    tile : int
        Side of the tiles the random walker solves, in pixels (>= 1).

    Returns
    -------
    refined : ndarray of shape (rows, cols), bool
        True = aurora; False outside the sky.

    Notes
    -----
    Where the refinement has nothing to decide between, the model's mask
    stays: a connected part of the mask too thin to keep a seed after the
    erosion (an arc a few pixels wide), and band pixels whose tile (with its
    margin) holds only one kind of seed or that no seed reaches (the far
    end of a thin arm whose body lies in another tile). Tiles are solved
    with a margin of ``2 * patch_size`` pixels of context, wider than the
    band, and only tiles that hold part of the band are solved. Memory: a
    few float64 copies of a tile, and a few bool and one int32 array the
    size of the frame (16 and 64 MB at 4096x4096).
    """
    from scipy import ndimage
    from skimage.filters import gaussian
    from skimage.morphology import disk
    from skimage.segmentation import random_walker

    if mask.shape != image.shape[:2] or sky.shape != image.shape[:2]:
        raise ValueError(f"Invalid mask or sky: expected shape {image.shape[:2]}, received {mask.shape} and "
                         f"{sky.shape}")
    if patch_size < 1:
        raise ValueError(f"Invalid patch_size: expected an int >= 1, received {patch_size}")
    if tile < 1:
        raise ValueError(f"Invalid tile: expected an int >= 1, received {tile}")
    aurora_seed, background_seed = 1, 2
    mask = mask & sky
    if not mask.any():
        return mask  # an aurora-free frame: nothing to move, and no morphology to pay for
    # Bool morphology, not distance transforms: these keep a 4096x4096
    # frame's extra memory to bool arrays (float64 distances were 130 MB each).
    # border_value=1: aurora reaching the frame's edge keeps its seeds there.
    inner = ndimage.binary_erosion(mask, disk(max(1, patch_size // 3)), border_value=1)
    outer = ~ndimage.binary_dilation(mask, disk(max(1, patch_size // 2))) | ~sky
    components, count = ndimage.label(mask)
    seeded = np.zeros(count + 1, dtype=bool)
    seeded[components[inner]] = True
    thin = mask & ~seeded[components]
    del components
    labels = np.zeros(mask.shape, dtype=np.int8)
    labels[inner] = aurora_seed
    labels[outer] = background_seed
    unknown = labels == 0
    del inner, outer
    refined = mask.copy()
    if not unknown.any():
        return refined
    step = max(1, int(np.sqrt(sky.size / 250_000)))  # a sample of about 250,000 pixels suffices
    sample = image[::step, ::step][sky[::step, ::step]]
    offset = REFINE_DARK_FRACTION * float(np.median(sample.mean(axis=1))) if sample.size else 0.0
    # Half an 8-bit step at least: on a black sky, one-count steps of an
    # 8-bit frame would otherwise be huge steps of log brightness.
    offset = max(offset, 0.5 / 255)

    rows, cols = mask.shape
    margin = 2 * patch_size
    for top in range(0, rows, tile):
        for left in range(0, cols, tile):
            core = (slice(top, min(top + tile, rows)), slice(left, min(left + tile, cols)))
            if not unknown[core].any():
                continue
            crop_top, crop_left = max(top - margin, 0), max(left - margin, 0)
            crop = (slice(crop_top, min(top + tile + margin, rows)), slice(crop_left, min(left + tile + margin, cols)))
            seeds = labels[crop].astype(np.int32)
            if not (seeds == aurora_seed).any() or not (seeds == background_seed).any():
                continue  # one kind of seed: nothing to decide between
            smoothed = gaussian(image[crop], sigma=REFINE_SMOOTHING, channel_axis=-1, preserve_range=True)
            log_brightness = np.log(smoothed + offset)
            spread = float(log_brightness.std())
            if spread == 0.0:
                continue  # a flat tile has no edge to move the boundary to
            # random_walker weighs an edge exp(-beta / (10 * std) / sqrt(channels)
            # * sum of squared channel steps); this beta makes that
            # exp(-REFINE_EDGE_WEIGHT * mean squared step) whatever the tile.
            channels = log_brightness.shape[-1]
            beta = REFINE_EDGE_WEIGHT * 10.0 * spread / np.sqrt(channels)
            # Seeds with no unknown neighbour play no part in the solution;
            # leaving them out (label -1) keeps the linear system to the band.
            band = unknown[crop]
            seeds[~ndimage.binary_dilation(band, np.ones((3, 3), bool))] = -1
            # A direct sparse solve ("bf"): exact, and as fast as conjugate
            # gradients on a tile's band, which at tol 1e-3 left
            # probabilities outside [0, 1] and a warning per frame.
            walked = random_walker(log_brightness, seeds, beta=beta, mode="bf", channel_axis=-1)
            inside = (slice(top - crop_top, top - crop_top + tile), slice(left - crop_left, left - crop_left + tile))
            # Band pixels no seed reaches come back as -1 and keep the mask.
            decided = band[inside] & (walked[inside] > 0)
            refined[core][decided] = walked[inside][decided] == aurora_seed
    refined |= thin
    refined &= sky
    return refined


def segment_frame(model, image, stride=DEFAULT_STRIDE, batch_size=256, threshold=0.5, adaptive=True,
                  fine_stride=DEFAULT_FINE_STRIDE, refine=True):
    """Segment one frame.

    Parameters
    ----------
    model : keras.Model
    image : ndarray of shape (rows, cols, 3), float32 in [0, 1]
    stride, batch_size : int
        See ``logit_map``.
    threshold : float
        A sky pixel is aurora when P(aurora) > threshold.
    adaptive : bool
        Refine the ``stride`` grid to ``fine_stride`` where the mask
        boundary may pass (the default mode); False interpolates the plain
        grid.
    fine_stride : int
        See ``logit_map``.
    refine : bool
        Move the mask's boundary onto the aurora's edge in the image
        (``refine_mask``); False keeps ``P(aurora) > threshold``.

    Returns
    -------
    p_aurora : ndarray of shape (rows, cols), float32
        P(aurora) = sigmoid(-logit) inside the sky, 0 outside it; the
        model's output, not changed by ``refine``.
    mask : ndarray of shape (rows, cols), bool
        True = aurora; always False outside the sky.
    sky : ndarray of shape (rows, cols), bool
        From ``sky_mask``.
    patches : int
        Patches evaluated.
    """
    sky = sky_mask(image)
    logits, patches = logit_map(model, image, stride=stride, batch_size=batch_size, sky=sky, adaptive=adaptive,
                                threshold=threshold, fine_stride=fine_stride)
    p_aurora = aurora_probability(logits)
    p_aurora[~sky] = 0.0
    mask = p_aurora > threshold
    if refine:
        mask = refine_mask(image, mask, sky, patch_size_of(model))
    return p_aurora, mask, sky, patches


# ---------------------------------------------------------------------------
# Scores and pictures
# ---------------------------------------------------------------------------


def mask_metrics(predicted, truth):
    """Compare a predicted aurora mask with a true one.

    Parameters
    ----------
    predicted, truth : ndarray of shape (rows, cols), bool
        True = aurora.

    Returns
    -------
    metrics : dict
        ``iou`` = TP / (TP + FP + FN), ``precision`` = TP / (TP + FP),
        ``recall`` = TP / (TP + FN), aurora being the positive of the score.
        An empty denominator means there was nothing to get wrong and gives
        1.0: both masks empty -> iou 1.0; nothing predicted -> precision 1.0;
        no true aurora -> recall 1.0.
    """
    true_positive = np.count_nonzero(predicted & truth)
    false_positive = np.count_nonzero(predicted & ~truth)
    false_negative = np.count_nonzero(~predicted & truth)

    def ratio(numerator, denominator):
        return numerator / denominator if denominator else 1.0

    return {
        "iou": ratio(true_positive, true_positive + false_positive + false_negative),
        "precision": ratio(true_positive, true_positive + false_positive),
        "recall": ratio(true_positive, true_positive + false_negative),
    }


def color_filter(p_aurora):
    """Colour P(aurora) with matplotlib's ``bwr`` map: blue = aurora, red = background.

    Parameters
    ----------
    p_aurora : ndarray of shape (rows, cols), float32 in [0, 1]

    Returns
    -------
    rgb : ndarray of shape (rows, cols, 3), uint8
        ``bwr`` applied to P(background) = 1 - P(aurora) (bwr runs blue at 0,
        white at 0.5, red at 1), through a 256-entry table so that a large
        frame needs no float RGBA copy.
    """
    import matplotlib

    table = matplotlib.colormaps["bwr"](np.linspace(0.0, 1.0, 256), bytes=True)[:, :3]  # (256, 3) uint8
    index = np.rint((1.0 - np.clip(p_aurora, 0.0, 1.0)) * 255).astype(np.uint8)
    return table[index]


def overlay(image, colors, alpha=OVERLAY_ALPHA):
    """Blend a colour filter over a frame.

    Parameters
    ----------
    image : ndarray of shape (rows, cols, 3), float32 in [0, 1]
    colors : ndarray of shape (rows, cols, 3), uint8
    alpha : float
        Weight of the colour filter.

    Returns
    -------
    blended : ndarray of shape (rows, cols, 3), uint8
    """
    blended = np.empty(colors.shape, dtype=np.uint8)
    # Blocks of rows keep the float temporaries small on large frames.
    for start in range(0, len(image), 256):
        block = slice(start, start + 256)
        mixed = (1.0 - alpha) * 255.0 * image[block] + alpha * colors[block].astype(np.float32)
        blended[block] = np.clip(np.rint(mixed), 0, 255)
    return blended


def save_figure(path, image, p_aurora, mask, title=""):
    """Save the 3-panel figure: Original, Probability, Segmented.

    Parameters
    ----------
    path : Path
        PNG file to write.
    image : ndarray of shape (rows, cols, 3), float32 in [0, 1]
    p_aurora : ndarray of shape (rows, cols), float32 in [0, 1]
    mask : ndarray of shape (rows, cols), bool
        True = aurora.
    title : str
        Figure title (the frame's name).

    Notes
    -----
    Frames larger than ``FIGURE_MAX_SIDE`` pixels a side are shown
    subsampled (every ``step``-th pixel); the full-resolution results are
    in ``mask/`` and ``probability/``.
    """
    # The Figure class with the Agg canvas directly: no pyplot global state,
    # no display needed, and nothing to close.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The panels are about 450 pixels wide, so the arrays are subsampled to
    # at most FIGURE_MAX_SIDE pixels a side first: matplotlib would otherwise
    # make float64 RGBA copies of the whole frame (over 700 MB at 4096x4096).
    step = max(1, -(-max(mask.shape) // FIGURE_MAX_SIDE))
    image, p_aurora, mask = image[::step, ::step], p_aurora[::step, ::step], mask[::step, ::step]
    figure = Figure(figsize=(15, 5.2), layout="constrained")
    FigureCanvasAgg(figure)
    original_axes, probability_axes, mask_axes = figure.subplots(1, 3)
    original_axes.imshow(image)
    original_axes.set_title("Original")
    shown = probability_axes.imshow(1.0 - p_aurora, cmap="bwr", vmin=0.0, vmax=1.0)
    probability_axes.set_title("Probability")
    colorbar = figure.colorbar(shown, ax=probability_axes, fraction=0.046, pad=0.04)
    colorbar.set_ticks([0.0, 1.0], labels=["Aurora", "Background"])
    mask_axes.imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    mask_axes.set_title("Segmented (white = aurora)")
    for axes in (original_axes, probability_axes, mask_axes):
        axes.set_axis_off()
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=100)


def _save_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def write_outputs(save_dir, stem, image, p_aurora, mask, save_probability=False):
    """Write the per-frame outputs of one frame into ``save_dir``.

    Parameters
    ----------
    save_dir : Path
    stem : str
        The frame's file name without suffix.
    image : ndarray of shape (rows, cols, 3), float32 in [0, 1]
    p_aurora : ndarray of shape (rows, cols), float32 in [0, 1]
    mask : ndarray of shape (rows, cols), bool
        True = aurora.
    save_probability : bool
        Also write ``probability/<stem>.npy``.
    """
    save_dir = Path(save_dir)
    _save_png(save_dir / "mask" / f"{stem}.png", np.where(mask, 255, 0).astype(np.uint8))
    if save_probability:
        np.save(save_dir / "probability" / f"{stem}.npy", p_aurora.astype(np.float32))
    colors = color_filter(p_aurora)
    _save_png(save_dir / "color_filter" / f"{stem}.png", colors)
    _save_png(save_dir / "overlay" / f"{stem}.png", overlay(image, colors))
    save_figure(save_dir / "figure" / f"{stem}.png", image, p_aurora, mask, title=stem)


def planned_outputs(save_dir, stems, save_probability=False):
    """Return every file a run would write, ``summary.csv`` included.

    Parameters
    ----------
    save_dir : Path
    stems : list of str
    save_probability : bool

    Returns
    -------
    paths : list of Path
    """
    save_dir = Path(save_dir)
    kinds = [(kind, ".png") for kind in OUTPUT_KINDS]
    if save_probability:
        kinds.append(("probability", ".npy"))
    paths = [save_dir / kind / f"{stem}{suffix}" for stem in stems for kind, suffix in kinds]
    paths.append(save_dir / "summary.csv")
    return paths


# ---------------------------------------------------------------------------
# Checks done before anything is written
# ---------------------------------------------------------------------------


def list_frames(dataset):
    """Return the frames to segment: one image file, or every image of a folder.

    Raises
    ------
    UsageError or data.DataError
        Missing path, empty folder, unsupported file type, or two frames with
        the same stem (their outputs would collide).
    """
    dataset = Path(dataset)
    if dataset.is_file():
        if dataset.suffix.lower() not in data.IMAGE_EXTENSIONS:
            raise UsageError(
                f"unsupported image file {dataset}: expected one of {', '.join(data.IMAGE_EXTENSIONS)}"
            )
        frames = [dataset]
    elif dataset.exists() or dataset.suffix.lower() not in data.IMAGE_EXTENSIONS:
        frames = data.list_images(dataset)
    else:
        raise UsageError(f"image file not found: {dataset}")
    seen = {}
    for frame in frames:
        if frame.stem in seen:
            raise UsageError(f"frames {seen[frame.stem]} and {frame} have the same stem; their outputs would collide")
        seen[frame.stem] = frame
    return frames


def _image_size(path):
    """(rows, cols) from the file header, or None when the header is unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            cols, rows = opened.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return rows, cols


def match_masks(frames, mask_folder):
    """Pair every frame with the true mask of the same stem and check sizes.

    Parameters
    ----------
    frames : list of Path
    mask_folder : str or Path
        Images with the frames' stems; nonzero = aurora.

    Returns
    -------
    masks : dict of str to Path
        Stem to mask file.

    Raises
    ------
    UsageError or data.DataError
        No mask for a frame, an unreadable mask, or a mask whose rows and
        columns differ from its frame's. A frame whose own header is
        unreadable is left for the main loop to report and skip.
    """
    by_stem = {}
    for path in data.list_images(mask_folder):
        by_stem.setdefault(path.stem, path)
    masks = {}
    for frame in frames:
        mask_path = by_stem.get(frame.stem)
        if mask_path is None:
            raise UsageError(f"no mask for frame {frame} in {mask_folder}")
        mask_size = _image_size(mask_path)
        if mask_size is None:
            # Pillow cannot read every valid file (16-bit RGB TIFF); read the
            # whole mask, which raises DataError naming it if it is corrupt.
            mask_size = data.read_image(mask_path).shape[:2]
        frame_size = _image_size(frame)
        if frame_size is not None and frame_size != mask_size:
            raise UsageError(
                f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} (rows x cols) "
                f"but frame {frame} is {frame_size[0]}x{frame_size[1]}"
            )
        masks[frame.stem] = mask_path
    return masks


def check_writable(save_dir):
    """Check that ``save_dir`` and its output folders can be created, without creating them."""
    save_dir = Path(save_dir)
    existing = save_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write to {save_dir}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {save_dir}: permission denied on {existing}")
    for kind in (*OUTPUT_KINDS, "probability"):
        folder = save_dir / kind
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"cannot write to {folder}: it is a file, not a folder")


def read_true_mask(path, shape):
    """Read a true mask: nonzero in any channel = aurora.

    Returns
    -------
    mask : ndarray of shape (rows, cols), bool
    """
    mask = data.read_image(path).max(axis=2) > 0
    if mask.shape != tuple(shape):
        raise data.DataError(f"mask {path} is {mask.shape} but its frame is {tuple(shape)}")
    return mask


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment aurora in all-sky frames with a PU-trained patch classifier: "
        "a mask, a probability map, a colour filter, an overlay and a figure per frame, and summary.csv.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dataset", default="dataset/Unlabelled", help="folder of frames, or one image file")
    parser.add_argument("--model", default="Results/model.keras", help=".keras model saved by train.py")
    parser.add_argument("--save_dir", default="Results/segmentation", help="folder for the outputs")
    parser.add_argument(
        "--stride",
        type=data.positive_int,
        default=DEFAULT_STRIDE,
        help="pixels between evaluated patch centres of the coarse grid; 1 = exact per-pixel sliding window, "
        "larger = bilinear interpolation of the logits in between (refined near the boundary with --adaptive)",
    )
    parser.add_argument(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate more patches, down to --fine_stride, in the grid cells where the mask boundary may pass; "
        "--no-adaptive interpolates the plain grid everywhere",
    )
    parser.add_argument(
        "--fine_stride",
        type=data.positive_int,
        default=DEFAULT_FINE_STRIDE,
        help="finest stride of the adaptive grid near the boundary; 1 = every boundary pixel evaluated",
    )
    parser.add_argument(
        "--refine",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="move the mask's boundary onto the aurora's edge in the image (random walker from confident seeds); "
        "--no-refine keeps P(aurora) > threshold as the mask",
    )
    parser.add_argument("--batchsize", type=data.positive_int, default=256, help="patches per model call")
    parser.add_argument(
        "--threshold", type=data.fraction, default=0.5, help="a pixel is aurora when P(aurora) > threshold"
    )
    parser.add_argument(
        "--masks",
        default=None,
        help="folder of true masks with the frames' stems (nonzero = aurora); "
        "adds iou, precision, recall to summary.csv and prints the mean IoU",
    )
    parser.add_argument(
        "--save_probability",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also save P(aurora) as probability/<stem>.npy (float32)",
    )
    parser.add_argument(
        "--overwrite",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="replace outputs of an earlier run for the same frames",
    )
    parser.add_argument(
        "--quiet", action=argparse.BooleanOptionalAction, default=False, help="no progress bar"
    )
    return parser


def _error(message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None):
    """Run the command line; returns the exit code (0 ok, 1 a frame failed, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        # argparse has printed its message (or the help); hand back its code.
        return exit_request.code
    save_dir = Path(args.save_dir)

    # Every check that can fail on the user's input runs before anything is
    # written, cheapest first; the model is loaded last because it is slow.
    try:
        model_path = check_model_path(args.model)
        frames = list_frames(args.dataset)
        masks = match_masks(frames, args.masks) if args.masks else {}
        check_writable(save_dir)
        existing = [path for path in planned_outputs(save_dir, [f.stem for f in frames], args.save_probability)
                    if path.exists()]
        if existing and not args.overwrite:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise UsageError(f"{existing[0]} already exists{more}; use --overwrite to replace")
        model = load_model(model_path)
    except (UsageError, data.DataError) as error:
        return _error(str(error))

    from tqdm import tqdm

    try:
        for kind in OUTPUT_KINDS + (("probability",) if args.save_probability else ()):
            (save_dir / kind).mkdir(parents=True, exist_ok=True)
        summary_file = open(save_dir / "summary.csv", "w", newline="")
    except OSError as error:
        return _error(f"cannot write to {save_dir}: {error.strerror or error}")

    columns = SUMMARY_COLUMNS + (METRIC_COLUMNS if args.masks else [])
    failed = []
    rows_written = []
    with summary_file:
        writer = csv.DictWriter(summary_file, fieldnames=columns)
        writer.writeheader()
        for frame in tqdm(frames, desc="segmenting", unit="frame", disable=args.quiet, file=sys.stderr):
            start = time.perf_counter()
            try:
                image = data.read_image(frame)
                p_aurora, mask, sky, patches = segment_frame(
                    model, image, stride=args.stride, batch_size=args.batchsize, threshold=args.threshold,
                    adaptive=args.adaptive, fine_stride=args.fine_stride, refine=args.refine,
                )
                metrics = mask_metrics(mask, read_true_mask(masks[frame.stem], mask.shape)) if args.masks else {}
                write_outputs(save_dir, frame.stem, image, p_aurora, mask, args.save_probability)
            except data.DataError as error:
                # DataError messages usually name the file already.
                named = str(error) if str(frame) in str(error) else f"{frame}: {error}"
                tqdm.write(f"{PROG}: skipped {named}", file=sys.stderr)
                failed.append(frame)
                continue
            except OSError as error:
                summary_file.flush()
                return _error(f"cannot write outputs of {frame} to {save_dir}: {error.strerror or error}")
            row = {
                "file": frame.name,
                "rows": mask.shape[0],
                "cols": mask.shape[1],
                "aurora_fraction": float(mask[sky].mean()),
                "mean_p_aurora": float(p_aurora[sky].mean()),
                "seconds": round(time.perf_counter() - start, 4),
                "patches": patches,
                **metrics,
            }
            writer.writerow(row)
            summary_file.flush()
            rows_written.append(row)

        # The last row holds the mean of every numeric column over the frames.
        if rows_written:
            numeric = [c for c in columns if c not in ("file", "rows", "cols", "patches")]
            writer.writerow({"file": "mean", **{c: float(np.mean([r[c] for r in rows_written])) for c in numeric}})

    print(f"segmented {len(rows_written)} of {len(frames)} frames into {save_dir}")
    if args.masks and rows_written:
        means = {c: float(np.mean([r[c] for r in rows_written])) for c in METRIC_COLUMNS}
        print(f"mean IoU {means['iou']:.4f}  precision {means['precision']:.4f}  recall {means['recall']:.4f}")
    if failed:
        print(f"{PROG}: {len(failed)} frame(s) could not be read: {', '.join(str(f) for f in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
