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
boundary of the mask the coarse interpolation stays, so a frame costs a small
fraction of the patches of ``--stride 1`` (``--fine_stride 1`` evaluates
every boundary pixel); ``tests/benchmark_segmentation.py`` measures the speed
and the agreement with the exact masks. The price: a patch of aurora (or of
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
``--refine`` (the default) the probability map holds each pixel's own
P(aurora): the model's for its patch times the probability that the pixel's
excess over the sky is aurora's (``pixel_mask``), and the mask is where that
exceeds ``--threshold``, in parts that hold a clear detection. (Models that
see the frame itself, ``normalize`` "none", have no excess: a random walker
moves their boundary onto the edge in the image, ``refine_mask``.)

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
import datetime
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

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
# interpolated over 2 pixels (1 = evaluated at every boundary pixel, at
# about three times the patches); tests/benchmark_segmentation.py measures
# how far each setting's masks are from the exact ones.
DEFAULT_FINE_STRIDE = 2

# Grid cells with a corner logit closer than this to the threshold's logit are
# refined even when all four corners are on the same side (logit units).
ADAPTIVE_MARGIN = 1.0

# Mask refinement (``--refine``, ``refine_mask``). The values were chosen on
# 24 generator frames from seeds 700_000 up, which neither the shipped
# dataset, the tests nor tests/evaluate_quality.py use; the result changed
# little over smoothing 0.7 to 1.5, dark fraction 0.1 to 0.5, edge weight
# 300 to 3000, and seed radii of 12- to 24-pixel patches.
# Gaussian smoothing of the frame before the random walker, and of the excess
# (``excess_map``), in pixels: sensor noise and single stars would otherwise
# make edges everywhere.
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
# The pixel's own P(aurora) for models that see the excess over the sky
# (``pixel_mask``, in noise levels of a pixel after REFINE_SMOOTHING): given
# aurora in its patch, a pixel is aurora along a logistic of its excess,
# one half at PIXEL_EDGE_EXCESS, rising over PIXEL_EDGE_WIDTH; a part of the
# mask stays only when a pixel of it stands out by PIXEL_SEED_EXCESS (a
# detection, not a noise peak). The sky's own excess is about 0.7 (the
# background is a lower envelope) give or take 0.35 after the smoothing.
# Chosen on 24 generator frames from seeds 700_000 up (half of them with
# moon, haze and town glow) and the shipped frames, with true patch labels
# and with a model's (docs/measurements.md, "The pixel step").
PIXEL_EDGE_EXCESS = 4.0
PIXEL_EDGE_WIDTH = 1.0
PIXEL_SEED_EXCESS = 8.0

# Opacity of the colour filter in the overlay (the seed's "superimposed").
OVERLAY_ALPHA = 0.4

# Largest side, in pixels, of the arrays drawn in the figure.
FIGURE_MAX_SIDE = 1024


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
        logits[start:stop] = data.predict_logits(model, patches, batch_size)
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
    patch_size = data.patch_size_of(model)
    rows, cols = image.shape[:2]
    if sky is None:
        sky = np.ones((rows, cols), dtype=bool)
    windows = patch_windows(pad_frame(image, patch_size), patch_size)
    evaluate = functools.partial(logits_at, model, windows, batch_size=batch_size)

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
# Mask refinement
# ---------------------------------------------------------------------------


def refine_mask(image, mask, sky, patch_size, tile=REFINE_TILE, quantum=1 / 255, return_probability=False):
    """Move the mask boundary onto the aurora's visible edge with a random walker.

    The model calls a patch aurora when aurora lies anywhere in it, so the
    mask of ``P(aurora) > threshold`` is only as sharp as half a patch or
    more: it runs past bright aurora and fills the sky between close arcs.
    Confident pixels become seeds and scikit-image's ``random_walker``
    labels the pixels in between from the image: a walker crosses small
    brightness steps easily and large ones hardly at all, so the boundary
    lands where the brightness changes most. The image is smoothed
    (``REFINE_SMOOTHING``) and log-transformed (``REFINE_DARK_FRACTION``)
    first. Seeds: aurora deep inside the mask (eroded by ``patch_size //
    3``), background beyond ``patch_size // 2`` of it; pixels outside the
    sky take no part. This is the refinement of models that see the frame
    itself (``normalize`` "none"); models that see the excess over the sky
    use ``pixel_mask``, which measured better (docs/measurements.md).

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
    quantum : float
        One count of the frame in ``image`` units (``data.Prepared``).
    return_probability : bool
        Also return the pixels' probability of aurora.

    Returns
    -------
    refined : ndarray of shape (rows, cols), bool
        True = aurora; False outside the sky.
    probability : ndarray of shape (rows, cols), float32
        With ``return_probability``: the random walker's probability of
        aurora where it decided, 1 and 0 on the seeds near the mask, NaN
        elsewhere (``segment_frame`` keeps the model's there).

    Notes
    -----
    Where the refinement has nothing to decide between, the model's mask
    stays: a connected part of the mask too thin to keep a seed after the
    erosion, and pixels whose tile (with its margin) holds
    only one kind of seed or that no seed reaches. Tiles are solved with a
    margin of ``2 * patch_size`` pixels of context, and only tiles that hold
    undecided pixels are solved. Memory: a few float64 copies of a tile, and
    a few bool, int32 and float32 arrays the size of the frame.
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
    probability = np.full(mask.shape, np.nan, np.float32)

    def result(refined):
        return (refined, probability) if return_probability else refined

    if not mask.any():
        return result(mask)  # an aurora-free frame: nothing to move, and no morphology to pay for
    # Bool morphology, not distance transforms: these keep a 4096x4096
    # frame's extra memory to bool arrays (float64 distances were 130 MB each).
    near = ndimage.binary_dilation(mask, disk(max(1, patch_size // 2)))
    components, count = ndimage.label(mask)
    # border_value=1: aurora reaching the frame's edge keeps its seeds there.
    inner = ndimage.binary_erosion(mask, disk(max(1, patch_size // 3)), border_value=1)
    outer = ~near
    seeded = np.zeros(count + 1, dtype=bool)
    seeded[components[inner]] = True
    thin = mask & ~seeded[components]
    del components
    labels = np.zeros(mask.shape, dtype=np.int8)
    labels[outer] = background_seed
    labels[inner] = aurora_seed
    # Beyond the sky (the black border, or what a field of view leaves out)
    # is no seed of either kind: it must not pull the boundary.
    labels[~sky] = -1
    unknown = labels == 0
    del inner, outer
    # The model's mask stands where the walker does not decide.
    refined = mask.copy()
    if not unknown.any():
        return result(refined)
    step = max(1, int(np.sqrt(sky.size / 250_000)))  # a sample of about 250,000 pixels suffices
    sample = image[::step, ::step][sky[::step, ::step]]
    offset = REFINE_DARK_FRACTION * float(np.median(sample.mean(axis=1))) if sample.size else 0.0
    # Half a count at least: on a black sky, one-count steps would otherwise
    # be huge steps of log brightness.
    offset = max(offset, 0.5 * quantum)

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
            inside = (slice(top - crop_top, top - crop_top + tile), slice(left - crop_left, left - crop_left + tile))
            has_aurora, has_sky = (seeds == aurora_seed).any(), (seeds == background_seed).any()
            if not (has_aurora and has_sky):
                continue
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
            walked = random_walker(log_brightness, seeds, beta=beta, mode="bf", channel_axis=-1,
                                   return_full_prob=True)[0]
            # Band pixels no seed reaches come back with no probability and keep the mask.
            reached = band[inside] & (seeds[inside] == 0) & np.isfinite(walked[inside])
            reached &= np.abs(walked[inside]) <= 1.0
            refined[core][reached] = walked[inside][reached] > 0.5
            probability[core][reached] = walked[inside][reached]
    refined |= thin
    refined &= sky
    decided = near & ~unknown
    probability[decided] = labels[decided] == aurora_seed
    return result(refined)


def excess_map(model_input, preprocessing):
    """The frame's excess over its sky background in noise units, smoothed and the largest over channels.

    Undoes ``data.normalize_frame``'s asinh; None when the model sees the
    frame itself (``normalize`` "none"). For a monochrome camera's model
    (``grey_scales``) the excess over the widest background alone: the
    others take part of the aurora into their background.
    """
    from skimage.filters import gaussian

    if preprocessing.get("normalize") != "background":
        return None
    # The excess channels come first; a model with ``position`` has three more.
    model_input = model_input[..., :1] if preprocessing.get("grey_scales") else model_input[..., :3]
    # Smoothed channel by channel before the maximum: the maximum of three
    # noisy channels would lift the whole sky by most of a noise level.
    excess = gaussian(data.NORMALIZE_SOFTENING * np.sinh(model_input), sigma=REFINE_SMOOTHING, channel_axis=-1,
                      preserve_range=True)
    return excess.max(axis=2).astype(np.float32)


def pixel_mask(p_aurora, excess, sky, threshold=0.5):
    """The pixel P(aurora) and mask from the model's patch P(aurora) and the frame's excess over the sky.

    The model's P(aurora) is the probability that aurora lies in the patch
    centred on a pixel, so its mask runs up to half a patch past the aurora.
    A pixel's own probability is that times the probability that, given
    aurora in its patch, the pixel itself is aurora: a logistic of its
    excess, one half at ``PIXEL_EDGE_EXCESS`` noise levels. The mask is the
    pixels above ``threshold`` in the connected parts that hold a pixel of
    ``PIXEL_SEED_EXCESS`` or more; a part without one (the model's call on
    a patch with nothing in it brighter than noise) is dropped.

    Parameters
    ----------
    p_aurora : ndarray of shape (rows, cols), float32
        The model's P(aurora), interpolated to every pixel (``logit_map``).
    excess : ndarray of shape (rows, cols), float32
        The excess over the sky in noise levels (``excess_map``).
    sky : ndarray of shape (rows, cols), bool
        Pixels outside it get probability 0 and no mask.
    threshold : float
        In (0, 1); a pixel is aurora above it.

    Returns
    -------
    probability : ndarray of shape (rows, cols), float32
        The pixel's P(aurora); at most ``threshold`` in a dropped part, so
        that the mask is ``probability > threshold`` everywhere.
    mask : ndarray of shape (rows, cols), bool
        True = aurora.
    """
    from scipy import ndimage
    from scipy.special import expit

    if p_aurora.shape != sky.shape or excess.shape != sky.shape:
        raise ValueError(f"Invalid p_aurora or excess: expected shape {sky.shape}, received {p_aurora.shape} and "
                         f"{excess.shape}")
    probability = (p_aurora * expit((excess - PIXEL_EDGE_EXCESS) / PIXEL_EDGE_WIDTH)).astype(np.float32)
    probability[~sky] = 0.0
    above = probability > threshold
    parts, count = ndimage.label(above)
    seeded = np.zeros(count + 1, dtype=bool)
    seeded[parts[above & (excess >= PIXEL_SEED_EXCESS)]] = True
    mask = seeded[parts]
    dropped = above & ~mask
    probability[dropped] = threshold
    return probability, mask


def segment_frame(model, prepared, preprocessing=None, stride=DEFAULT_STRIDE, batch_size=256, threshold=0.5,
                  adaptive=True, fine_stride=DEFAULT_FINE_STRIDE, refine=True):
    """Segment one frame.

    Parameters
    ----------
    model : keras.Model
    prepared : data.Prepared
        The frame as the model was trained (``data.prepare_frame``).
    preprocessing : dict, optional
        The model's (``data.load_model``); with ``normalize`` "background"
        the pixel step weighs each pixel's excess over the sky
        (``pixel_mask``), else a random walker moves the boundary
        (``refine_mask``).
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
        The pixel step (``finish_mask``): the mask's boundary on the
        aurora's edge in the image; False keeps the model's ``P(aurora) >
        threshold``.

    Returns
    -------
    p_aurora : ndarray of shape (rows, cols), float32
        P(aurora) of each sky pixel, 0 outside it. Without ``refine`` the
        model's (the probability that aurora lies in the patch centred on
        the pixel). With it, for models that see the excess over the sky,
        the probability that the pixel itself is aurora, the mask being
        ``p_aurora > threshold``; for the others the model's, and the
        random walker's near the mask's boundary.
    mask : ndarray of shape (rows, cols), bool
        True = aurora; always False outside the sky.
    patches : int
        Patches evaluated.
    """
    sky = prepared.sky
    logits, patches = logit_map(model, prepared.model_input, stride=stride, batch_size=batch_size, sky=sky,
                                adaptive=adaptive, threshold=threshold, fine_stride=fine_stride)
    p_aurora = aurora_probability(logits)
    p_aurora[~sky] = 0.0
    mask = p_aurora > threshold
    if refine:
        mask, p_aurora = finish_mask(prepared, p_aurora, mask, data.patch_size_of(model), preprocessing or {},
                                     threshold)
    return p_aurora, mask, patches


def finish_mask(prepared, p_aurora, mask, patch_size, preprocessing, threshold=0.5):
    """The pixel mask and P(aurora) of one prepared frame from the model's (``segment_frame``).

    ``pixel_mask`` for models that see the excess over the sky, else
    ``refine_mask``; returns (mask, p_aurora).
    """
    excess = excess_map(prepared.model_input, preprocessing)
    if excess is not None:
        p_aurora, mask = pixel_mask(p_aurora, excess, prepared.sky, threshold)
        return mask, p_aurora
    mask, refined_probability = refine_mask(prepared.image, mask, prepared.sky, patch_size, quantum=prepared.quantum,
                                            return_probability=True)
    decided = np.isfinite(refined_probability)
    p_aurora = np.where(decided, refined_probability, p_aurora).astype(np.float32)
    p_aurora[~prepared.sky] = 0.0
    return mask, p_aurora


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
        no true aurora -> recall 1.0. Frames without true aurora are better
        scored by the fraction of their sky called aurora (``frame_scores``).
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


def frame_scores(predicted, truth, sky):
    """``summary.csv``'s scores of one frame against its true mask.

    A frame with true aurora gets ``iou``, ``precision`` and ``recall``
    (``mask_metrics``); a frame without gets ``false_aurora``, the fraction
    of its sky called aurora. The other keys are None (empty cells), so that
    the 1.0 of an empty mask predicted empty and the 0.0 of a few false
    pixels on an aurora-free frame never enter a mean IoU. Only the sky is
    scored: true aurora outside it (below ``--min_elevation``, say) is not
    asked for.
    """
    truth = truth & sky
    scores = {"true_fraction": float(truth[sky].mean()) if sky.any() else 0.0,
              "iou": None, "precision": None, "recall": None, "false_aurora": None}
    if truth.any():
        scores.update(mask_metrics(predicted, truth))
    else:
        scores["false_aurora"] = float(predicted[sky].mean()) if sky.any() else 0.0
    return scores


# P(aurora) is drawn with a perceptual colour map: black (0) through red to
# yellow (1), so brighter means more likely aurora in colour and in grey.
COLOUR_MAP = "inferno"
# Aurora in the overlay: magenta, a colour neither aurora nor the sky has.
MASK_COLOUR = (255, 0, 255)


def color_filter(p_aurora):
    """P(aurora) as a colour picture through ``COLOUR_MAP``: black = background, yellow = aurora.

    Parameters
    ----------
    p_aurora : ndarray of shape (rows, cols), float32 in [0, 1]

    Returns
    -------
    rgb : ndarray of shape (rows, cols, 3), uint8
        Through a 256-entry table, so that a large frame needs no float RGBA copy.
    """
    import matplotlib

    table = matplotlib.colormaps[COLOUR_MAP](np.linspace(0.0, 1.0, 256), bytes=True)[:, :3]  # (256, 3) uint8
    return table[np.rint(np.clip(p_aurora, 0.0, 1.0) * 255).astype(np.uint8)]


def display_image(image, sky):
    """A frame stretched for the eye: its sky's 1st to 99.5th percentile become 0 and 1.

    Science frames and dark nights fill a small part of [0, 1]; pictures of
    them are stretched so that the sky is visible. Returns uint8 RGB.
    """
    step = max(1, int(np.sqrt(image.shape[0] * image.shape[1] / 250_000)))
    sample = image[::step, ::step][sky[::step, ::step]] if sky.any() else image[::step, ::step].reshape(-1, 3)
    low, high = np.percentile(sample, [1, 99.5]) if sample.size else (0.0, 1.0)
    high = max(high, low + 1e-6)
    shown = np.empty(image.shape, np.uint8)
    for start in range(0, len(image), 256):  # blocks keep float temporaries small
        block = slice(start, start + 256)
        shown[block] = np.rint(np.clip((image[block] - low) / (high - low), 0, 1) * 255)
    return shown


def overlay(shown, mask, alpha=OVERLAY_ALPHA):
    """The frame with the aurora mask drawn on it: ``MASK_COLOUR`` blended over aurora, its outline solid.

    Parameters
    ----------
    shown : ndarray of shape (rows, cols, 3), uint8
        From ``display_image``.
    mask : ndarray of shape (rows, cols), bool
    alpha : float
        Weight of the colour over the aurora.

    Returns
    -------
    blended : ndarray of shape (rows, cols, 3), uint8
    """
    from scipy import ndimage

    blended = shown.copy()
    colour = np.array(MASK_COLOUR, np.float32)
    blended[mask] = np.rint((1 - alpha) * shown[mask] + alpha * colour).astype(np.uint8)
    outline = mask & ~ndimage.binary_erosion(mask, border_value=1)
    blended[outline] = MASK_COLOUR
    return blended


def save_figure(path, shown, p_aurora, mask, title=""):
    """Save the 3-panel figure: the frame, P(aurora) with a colour bar, the mask over the frame.

    Parameters
    ----------
    path : Path or file object
        PNG file to write.
    shown : ndarray of shape (rows, cols, 3), uint8
        From ``display_image``.
    p_aurora : ndarray of shape (rows, cols), float32 in [0, 1]
    mask : ndarray of shape (rows, cols), bool
        True = aurora.
    title : str
        Figure title (the frame's name and time).

    Notes
    -----
    Frames larger than ``FIGURE_MAX_SIDE`` pixels a side are shown
    subsampled (every ``step``-th pixel): matplotlib would otherwise make
    float64 RGBA copies of the whole frame (over 700 MB at 4096x4096). The
    full-resolution results are in ``mask/`` and ``probability/``.
    """
    # The Figure class with the Agg canvas directly: no pyplot global state,
    # no display needed, and nothing to close.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    step = max(1, -(-max(mask.shape) // FIGURE_MAX_SIDE))
    shown, p_aurora, mask = shown[::step, ::step], p_aurora[::step, ::step], mask[::step, ::step]
    figure = Figure(figsize=(15, 5.2), layout="constrained")
    FigureCanvasAgg(figure)
    frame_axes, probability_axes, mask_axes = figure.subplots(1, 3)
    frame_axes.imshow(shown)
    frame_axes.set_title("Frame (contrast stretched)")
    drawn = probability_axes.imshow(p_aurora, cmap=COLOUR_MAP, vmin=0.0, vmax=1.0, interpolation="nearest")
    probability_axes.set_title("P(aurora)")
    figure.colorbar(drawn, ax=probability_axes, fraction=0.046, pad=0.04, label="P(aurora)")
    mask_axes.imshow(overlay(shown, mask))
    mask_axes.set_title(f"Aurora mask (magenta): {mask.mean():.1%} of the frame")
    for axes in (frame_axes, probability_axes, mask_axes):
        axes.set_axis_off()
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=100, format="png")


# ---------------------------------------------------------------------------
# Keograms and the night at a glance
# ---------------------------------------------------------------------------

# Frames more than this many hours apart belong to different nights.
NIGHT_GAP_HOURS = 3.0
# A night figure needs at least this many frames with a time.
NIGHT_MIN_FRAMES = 3
NORTH = ("up", "down", "left", "right")


def zenith_of(sky):
    """(row, col) of the zenith: the centre of the sky circle (the middle of its bounding box)."""
    rows, cols = np.nonzero(sky)
    if rows.size == 0:
        return (sky.shape[0] - 1) // 2, (sky.shape[1] - 1) // 2
    return (int(rows.min()) + int(rows.max())) // 2, (int(cols.min()) + int(cols.max())) // 2


def keogram_line(array, sky, north="up"):
    """The north-to-south line of ``array`` through the zenith, north first: shape (n,).

    ``north`` says which side of the frame north is on; the line runs from
    that edge to the opposite one through ``zenith_of(sky)``, and pixels
    outside the sky are NaN.
    """
    row, col = zenith_of(sky)
    values = np.where(sky, array.astype(np.float32), np.nan)
    line = {"up": values[:, col], "down": values[::-1, col],
            "left": values[row, :], "right": values[row, ::-1]}[north]
    return np.ascontiguousarray(line)


def night_groups(rows, camera="frames"):
    """Summary rows grouped by camera and night: a list of (name, rows in time order).

    A camera is a source folder and frame size; a night ends where two of
    its frames are more than ``NIGHT_GAP_HOURS`` apart. Rows without a time
    belong to no night; groups of fewer than ``NIGHT_MIN_FRAMES`` are left
    out. Names start with the sub-folder, or ``camera`` (the dataset
    folder's name) for frames at the top.
    """
    cameras = {}
    for row in rows:
        if row.get("time"):
            key = (str(Path(row["file"]).parent), row["rows"], row["cols"])
            cameras.setdefault(key, []).append(row)
    groups = []
    for (folder, rows_, cols_), members in cameras.items():
        members.sort(key=lambda row: row["time"])
        night = [members[0]]
        for row in members[1:]:
            gap = _parse_time(row["time"]) - _parse_time(night[-1]["time"])
            if gap > datetime.timedelta(hours=NIGHT_GAP_HOURS):
                groups.append(night)
                night = []
            night.append(row)
        groups.append(night)
    named = []
    for night in groups:
        if len(night) < NIGHT_MIN_FRAMES:
            continue
        folder = Path(night[0]["file"]).parent.name or camera
        start = _parse_time(night[0]["time"]).strftime("%Y%m%d_%H%M")
        named.append((f"{folder}_{night[0]['cols']}x{night[0]['rows']}_{start}", night))
    return named


def _parse_time(text):
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)


def format_time(time):
    """A frame time as ISO 8601 UTC with milliseconds (``2015-10-07T08:23:51.743Z``), or '' when unknown."""
    if time is None:
        return ""
    return time.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def write_night(save_dir, name, night, slices):
    """One night's figure (``night/<name>.png``) and keogram arrays (``night/<name>_keogram.npz``).

    Parameters
    ----------
    save_dir : Path
    name : str
        The group's name (``night_groups``).
    night : list of dict
        Its summary rows, in time order.
    slices : dict of str to ndarray of shape (2, n)
        Each frame's keogram line of P(aurora) and of the mask (``keogram_line``), by output name.

    Notes
    -----
    The keograms are drawn against time with each frame's column as wide
    as the time to the next frame, but never wider than twice the night's
    median cadence: a gap in the data stays a gap, not a stretched frame.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    times = np.array([_parse_time(row["time"]).replace(tzinfo=None) for row in night], dtype="datetime64[ms]")
    lines = [slices[row["name"]] for row in night]
    length = max(line.shape[1] for line in lines)
    keogram = np.full((2, length, len(lines)), np.nan, np.float32)
    for k, line in enumerate(lines):
        keogram[:, : line.shape[1], k] = line
    fraction = np.array([float(row["aurora_fraction"]) for row in night])
    folder = Path(save_dir) / "night"
    folder.mkdir(parents=True, exist_ok=True)
    data.write_atomically(folder / f"{name}_keogram.npz", lambda handle: np.savez_compressed(
        handle, time=times.astype(str), seconds=times.astype("datetime64[ms]").astype(np.int64) / 1000.0,
        p_aurora=keogram[0], mask=keogram[1], aurora_fraction=fraction,
        name=np.array([row["name"] for row in night])))

    cadence = np.median(np.diff(times).astype(np.float64)) if len(times) > 1 else 1000.0
    widths = np.diff(times).astype(np.float64) if len(times) > 1 else np.array([cadence])
    widths = np.minimum(np.append(widths, cadence), 2 * cadence).astype("timedelta64[ms]")
    figure = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(figure)
    fraction_axes, probability_axes, mask_axes = figure.subplots(3, 1, sharex=True)
    fraction_axes.plot(times, 100 * fraction, marker=".", lw=0.8)
    fraction_axes.set_ylabel("sky called aurora (%)")
    fraction_axes.set_title(f"{name}: {len(night)} frames")
    for axes, values, label in ((probability_axes, keogram[0], "P(aurora)"), (mask_axes, keogram[1], "mask")):
        for k in range(len(times)):
            axes.pcolormesh(np.array([times[k], times[k] + widths[k]]), np.arange(length + 1), values[:, k:k + 1],
                            cmap=COLOUR_MAP, vmin=0, vmax=1, shading="flat")
        axes.set_ylim(length, 0)
        axes.set_ylabel(f"keogram of {label}\n(north at top)")
    mask_axes.set_xlabel("time (UT)")
    data.write_atomically(folder / f"{name}.png", lambda handle: figure.savefig(handle, dpi=100, format="png"))


# ---------------------------------------------------------------------------
# Writing outputs: every file whole or not at all
# ---------------------------------------------------------------------------

OUTPUT_KINDS = ("mask", "probability", "color_filter", "overlay", "figure")
DEFAULT_OUTPUTS = ("mask", "color_filter", "overlay", "figure")
OUTPUT_SUFFIX = {"probability": ".npy"}


def output_path(save_dir, kind, name):
    """Where the ``kind`` output of the frame ``name`` goes (``name`` may hold sub-folders)."""
    return Path(save_dir) / kind / f"{name}{OUTPUT_SUFFIX.get(kind, '.png')}"


def write_outputs(save_dir, name, image, sky, p_aurora, mask, outputs=DEFAULT_OUTPUTS, title=""):
    """Write the chosen outputs of one frame into ``save_dir``, each file atomically.

    Parameters
    ----------
    save_dir : Path
    name : str
        The frame's output name.
    image : ndarray of shape (rows, cols, 3), float32 in [0, 1]
    sky : ndarray of shape (rows, cols), bool
    p_aurora : ndarray of shape (rows, cols), float32 in [0, 1]
    mask : ndarray of shape (rows, cols), bool
        True = aurora.
    outputs : sequence of str
        Kinds of ``OUTPUT_KINDS``: ``mask`` (uint8 PNG, 255 = aurora),
        ``probability`` (float32 ``.npy`` of P(aurora)), ``color_filter``
        (P(aurora) through ``COLOUR_MAP``), ``overlay`` (the frame with the
        mask drawn on it), ``figure`` (``save_figure``).
    title : str
        Title of the figure.
    """
    for kind in outputs:
        output_path(save_dir, kind, name).parent.mkdir(parents=True, exist_ok=True)
    if "mask" in outputs:
        data.save_png(output_path(save_dir, "mask", name), np.where(mask, 255, 0).astype(np.uint8))
    if "probability" in outputs:
        data.write_atomically(output_path(save_dir, "probability", name), lambda handle: np.save(handle, p_aurora.astype(np.float32)))
    if "color_filter" in outputs:
        data.save_png(output_path(save_dir, "color_filter", name), color_filter(p_aurora))
    if "overlay" in outputs or "figure" in outputs:
        shown = display_image(image, sky)
        if "overlay" in outputs:
            data.save_png(output_path(save_dir, "overlay", name), overlay(shown, mask))
        if "figure" in outputs:
            data.write_atomically(output_path(save_dir, "figure", name),
                    lambda handle: save_figure(handle, shown, p_aurora, mask, title=title or name))


# ---------------------------------------------------------------------------
# Frames in memory: the Python entry point
# ---------------------------------------------------------------------------


def segment_arrays(model, frames, preprocessing=None, full_scale=None, field_of_view=None, **settings):
    """Segment frames already in memory, such as an asilib imager's ``(time, rows, cols)`` array.

    Parameters
    ----------
    model : keras.Model or str or Path
        A model, or a ``.keras`` file (``data.load_model``).
    frames : ndarray of shape (time, rows, cols) or (time, rows, cols, 3)
        Counts as the camera recorded them: uint8, uint16 or float (not
        scaled to [0, 1]); frames of one camera are scaled exactly as its
        files are (``data.frame_range``).
    preprocessing : dict, optional
        The model's (``data.load_model``); needed when ``model`` is a model
        object that was trained by ``train.py``.
    full_scale : float, optional
        Full scale of the counts; default from the dtype (``data.full_scale_of``),
        and for float counts the full scale the model was trained on.
    field_of_view : ndarray of shape (rows, cols), bool, or data.Horizon, optional
        The sky (``data.user_sky``); default: found in each frame
        (``data.sky_mask``).
    **settings
        ``segment_frame``'s keywords: ``stride``, ``adaptive``, ``refine``, ...

    Returns
    -------
    result : dict
        ``p_aurora`` (time, rows, cols) float32, ``mask`` (time, rows, cols)
        bool and ``aurora_fraction`` (time,) float64, the fraction of each
        frame's sky that is aurora.

    Examples
    --------
    >>> import asilib.asi  # doctest: +SKIP
    >>> times, images = asilib.asi.themis("gill", time_range=(t0, t1)).data  # doctest: +SKIP
    >>> result = segment_arrays("Results/model.keras", images)  # doctest: +SKIP
    """
    if isinstance(model, (str, Path)):
        model, preprocessing = data.load_model(model)
    preprocessing = dict(data.LEGACY_PREPROCESSING) if preprocessing is None else preprocessing
    frames = np.asarray(frames)
    if frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[-1] != 3):
        raise ValueError(f"Invalid frames: expected shape (time, rows, cols) or (time, rows, cols, 3), "
                         f"received {frames.shape}")
    if full_scale is None:
        full_scale = data.full_scale_of(frames.dtype)
        if frames.dtype.kind == "f" and preprocessing.get("full_scale"):
            full_scale = preprocessing["full_scale"]
    p_aurora = np.zeros(frames.shape[:3], np.float32)
    masks = np.zeros(frames.shape[:3], bool)
    fractions = np.zeros(len(frames))
    for k, frame in enumerate(frames):
        counts = np.repeat(frame[..., None], 3, axis=2) if frame.ndim == 2 else frame
        prepared = data.prepare_frame(counts.astype(np.float32), full_scale, preprocessing, field_of_view)
        p_aurora[k], masks[k], _ = segment_frame(model, prepared, preprocessing, **settings)
        fractions[k] = masks[k][prepared.sky].mean() if prepared.sky.any() else 0.0
    return {"p_aurora": p_aurora, "mask": masks, "aurora_fraction": fractions}


# ---------------------------------------------------------------------------
# A run over files: what to segment, its settings, resuming and shards
# ---------------------------------------------------------------------------

SUMMARY_COLUMNS = ["file", "frame", "name", "time", "rows", "cols", "aurora_fraction", "mean_p_aurora", "seconds",
                   "patches"]
METRIC_COLUMNS = ["true_fraction", "iou", "precision", "recall", "false_aurora"]
# The settings that decide a run's outputs; --resume and --merge refuse
# to mix runs that differ in any of them.
RUN_SETTINGS = ("dataset", "recursive", "model", "model_sha256", "outputs", "stride", "adaptive", "fine_stride",
                "refine", "threshold", "masks", "field_of_view", "min_elevation", "north")


class Source(NamedTuple):
    """A file to segment: ``path``; ``name``, its output name (relative path without suffix);
    ``file``, as ``summary.csv`` names it; ``index``, its place in the whole run's order."""

    path: Path
    name: str
    file: str
    index: int


def list_sources(dataset, recursive=False):
    """The files to segment, in the run's order: one frame file, or every frame file of a folder.

    Raises
    ------
    data.UsageError or data.DataError
        Missing path, empty folder, unsupported file type, or two files with
        the same output name (``a.png`` and ``a.jpg``: their outputs would
        collide).
    """
    dataset = Path(dataset)
    if dataset.is_file():
        if data.frame_suffix(dataset) is None:
            raise data.UsageError(f"unsupported image file {dataset}: expected one of "
                                  f"{', '.join(data.IMAGE_EXTENSIONS)}")
        paths, root = [dataset], dataset.parent
    elif dataset.exists() or data.frame_suffix(dataset) is None:
        paths, root = data.list_images(dataset, recursive=recursive), dataset
    else:
        raise data.UsageError(f"image file not found: {dataset}")
    sources, seen = [], {}
    for index, path in enumerate(paths):
        relative = path.relative_to(root)
        name = str(relative.parent / data.frame_stem(path)) if relative.parent != Path(".") else data.frame_stem(path)
        if name in seen:
            raise data.UsageError(f"frames {seen[name]} and {path} have the same name; their outputs would collide")
        seen[name] = path
        sources.append(Source(path, name, str(relative), index))
    return sources


def shard_value(text):
    """argparse type for --shard: ``K/N`` with 1 <= K <= N, returned as (K, N)."""
    try:
        part, parts = (int(value) for value in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N such as 2/8, received {text!r}") from None
    if parts < 1 or not 1 <= part <= parts:
        raise argparse.ArgumentTypeError(f"expected K/N with 1 <= K <= N, received {text!r}")
    return part, parts


def shard_sources(sources, shard):
    """The K-th of N shards: every N-th file from the K-th, so each shard spans every night.

    Splitting by file needs no file to be read first, and the N shards
    together hold every file exactly once.
    """
    if shard is None:
        return sources
    part, parts = shard
    return [source for source in sources if source.index % parts == part - 1]


def _image_size(path):
    """(rows, cols) from the file header, or None when the header is unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            cols, rows = opened.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return rows, cols


def match_masks(sources, mask_folder, recursive=False):
    """The true mask of every frame, by output name, checked against single-frame files' sizes.

    Parameters
    ----------
    sources : list of Source
    mask_folder : str or Path
        Pictures named like the frames' outputs (``<name>.png``, or
        ``<name>_<k>.png`` for frame k of a multi-frame file); nonzero = aurora.
    recursive : bool
        Masks in sub-folders mirroring the frames'.

    Returns
    -------
    masks : dict of str to Path
        Output name to mask file.

    Raises
    ------
    data.UsageError or data.DataError
        No mask for a single-frame file, an unreadable mask, or a mask whose
        rows and columns differ from its frame's. The masks of multi-frame
        files are checked frame by frame while segmenting.
    """
    mask_folder = Path(mask_folder)
    by_name = {}
    for path in data.list_images(mask_folder, recursive=recursive):
        relative = path.relative_to(mask_folder)
        name = str(relative.parent / data.frame_stem(path)) if relative.parent != Path(".") else data.frame_stem(path)
        by_name.setdefault(name, path)
    for source in sources:
        if data.frame_suffix(source.path) not in data.PICTURE_EXTENSIONS:
            continue
        mask_path = by_name.get(source.name)
        if mask_path is None:
            raise data.UsageError(f"no mask for frame {source.path} in {mask_folder}")
        mask_size = _image_size(mask_path)
        if mask_size is None:
            # Pillow cannot read every valid file (16-bit RGB TIFF); read the
            # whole mask, which raises DataError naming it if it is corrupt.
            mask_size = data.read_image(mask_path).shape[:2]
        frame_size = _image_size(source.path)
        if frame_size is not None and frame_size != mask_size:
            raise data.UsageError(f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} (rows x cols) "
                                  f"but frame {source.path} is {frame_size[0]}x{frame_size[1]}")
    return by_name


def read_true_mask(path, shape):
    """Read a true mask: nonzero in any channel = aurora; shape (rows, cols), bool."""
    mask = data.read_image(path).max(axis=2) > 0
    if mask.shape != tuple(shape):
        raise data.DataError(f"mask {path} is {mask.shape[0]}x{mask.shape[1]} but its frame is "
                             f"{shape[0]}x{shape[1]}")
    return mask


def check_writable(save_dir):
    """Check that ``save_dir`` can be created or written, without creating it."""
    save_dir = Path(save_dir)
    existing = save_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise data.UsageError(f"cannot write to {save_dir}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise data.UsageError(f"cannot write to {save_dir}: permission denied on {existing}")
    for kind in (*OUTPUT_KINDS, "night"):
        folder = save_dir / kind
        if folder.exists() and not folder.is_dir():
            raise data.UsageError(f"cannot write to {folder}: it is a file, not a folder")


def _shard_tag(shard):
    return "" if shard is None else f".shard-{shard[0]}-of-{shard[1]}"


def run_files(save_dir, shard):
    """The bookkeeping files of one run or shard: settings, journal (one row per finished frame), summary."""
    tag = _shard_tag(shard)
    save_dir = Path(save_dir)
    return {"settings": save_dir / f"run{tag}.json", "journal": save_dir / f".progress{tag}.csv",
            "summary": save_dir / ("summary.csv" if shard is None else f"summary{tag}.csv"),
            "slices": save_dir / ".keogram"}


def run_settings(args, model_path):
    """The settings of this run that decide its outputs (``RUN_SETTINGS``), as JSON-ready values."""
    import hashlib

    digest = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    values = {"dataset": str(Path(args.dataset).resolve()), "recursive": args.recursive,
              "model": str(Path(model_path).resolve()), "model_sha256": digest, "outputs": sorted(args.outputs),
              "stride": args.stride, "adaptive": args.adaptive, "fine_stride": args.fine_stride,
              "refine": args.refine, "threshold": args.threshold,
              "masks": str(Path(args.masks).resolve()) if args.masks else None,
              "field_of_view": str(Path(args.field_of_view).resolve()) if args.field_of_view else None,
              "min_elevation": args.min_elevation, "north": args.north}
    return {key: values[key] for key in RUN_SETTINGS}


def settings_difference(recorded, current):
    """One line naming the settings that differ between a recorded run and this one, or ''."""
    changed = [key for key in RUN_SETTINGS if recorded.get(key) != current.get(key)]
    if not changed:
        return ""
    names = {"model_sha256": "model file contents", "dataset": "--dataset", "model": "--model"}
    return ", ".join(f"{names.get(key, '--' + key)} ({recorded.get(key)!r} then, {current.get(key)!r} now)"
                     if key != "model_sha256" else names[key] for key in changed)


def read_journal(path, columns):
    """The rows of a run's journal; a last line cut short by a killed run is ignored."""
    if not path.exists():
        return []
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.DictReader(text.splitlines(keepends=True)))
    return [row for row in rows if None not in row.values() and len(row) == len(columns)]


class Journal:
    """Append-only record of finished frames: a row is added only after all of a frame's outputs exist.

    Rows are flushed and synced one by one, so a killed run loses at most
    the frames it was working on; ``--resume`` skips the frames recorded.
    """

    def __init__(self, path, columns, fresh):
        import threading

        self.columns = columns
        self.lock = threading.Lock()
        new = fresh or not path.exists()
        self.handle = open(path, "w" if new else "a", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=columns, extrasaction="ignore")
        if new:
            self.writer.writeheader()
            self.handle.flush()

    def add(self, row):
        with self.lock:
            self.writer.writerow({key: "" if row.get(key) is None else row[key] for key in self.columns})
            self.handle.flush()
            os.fsync(self.handle.fileno())

    def close(self):
        self.handle.close()


def sort_rows(rows):
    """Rows in the run's order: by time when every row has one, else by file and frame."""
    def place(row):
        return int(row["_index"]), int(row["frame"]) if row["frame"] not in ("", None) else -1

    if rows and all(row["time"] for row in rows):
        return sorted(rows, key=lambda row: (row["time"], place(row)))
    return sorted(rows, key=place)


def write_summary(path, rows, columns):
    """``summary.csv``: the rows in the run's order, then a ``mean`` row.

    The mean row averages each column over the frames where it has a value:
    ``iou``, ``precision`` and ``recall`` over frames with true aurora,
    ``false_aurora`` over frames without.
    """
    def mean(column):
        values = [float(row[column]) for row in rows if row.get(column) not in ("", None)]
        return float(np.mean(values)) if values else ""

    numeric = [column for column in columns if column not in ("file", "frame", "name", "time", "rows", "cols",
                                                               "patches")]

    def write(handle):
        import io

        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        if rows:
            writer.writerow({"file": "mean", **{column: mean(column) for column in numeric}})
        handle.write(text.getvalue().encode())

    data.write_atomically(path, write)


def finish_run(save_dir, rows, columns, summary_path, camera):
    """Write the summary and the night figures of finished rows; return the nights written.

    ``camera`` names nights of frames at the top of the dataset (its folder's name).
    """
    rows = sort_rows(rows)
    write_summary(summary_path, rows, columns)
    nights = []
    slices_folder = Path(save_dir) / ".keogram"
    for name, night in night_groups(rows, camera):
        slices = {}
        for row in night:
            path = slices_folder / f"{row['name']}.npy"
            if path.exists():
                slices[row["name"]] = np.load(path)
        night = [row for row in night if row["name"] in slices]
        if len(night) >= NIGHT_MIN_FRAMES:
            write_night(save_dir, name, night, slices)
            nights.append(name)
    return nights


def camera_name(dataset):
    """What nights of frames at the top of ``dataset`` are called: its folder's name (a file's folder)."""
    dataset = Path(dataset)
    return (dataset.parent if data.frame_suffix(dataset) else dataset).resolve().name or "frames"


def merge_shards(save_dir, quiet=False):
    """Combine the summaries of ``--shard K/N`` runs in ``save_dir`` into one ``summary.csv`` and night figures.

    Returns the number of rows. Raises UsageError naming a missing or
    unfinished shard, or shards run with different settings.
    """
    save_dir = Path(save_dir)
    found = sorted(save_dir.glob("run.shard-*-of-*.json"))
    if not found:
        raise data.UsageError(f"{save_dir}: no shard runs to merge (run.shard-K-of-N.json)")
    settings = [json.loads(path.read_text()) for path in found]
    parts = {entry["shard"][1] for entry in settings}
    if len(parts) != 1:
        raise data.UsageError(f"{save_dir}: shards of different splits ({sorted(parts)}) cannot be merged")
    parts = parts.pop()
    for entry, path in zip(settings, found):
        difference = settings_difference(settings[0]["settings"], entry["settings"])
        if difference:
            raise data.UsageError(f"{path.name} differs from {found[0].name}: {difference}")
    rows, columns = [], None
    for part in range(1, parts + 1):
        summary = run_files(save_dir, (part, parts))["summary"]
        journal = run_files(save_dir, (part, parts))["journal"]
        if not summary.exists():
            raise data.UsageError(f"shard {part}/{parts} has not finished: {summary.name} is missing "
                                  f"(run it, or resume it with --resume --shard {part}/{parts})")
        with open(summary, newline="") as handle:
            columns = next(csv.reader(handle))
        rows += read_journal(journal, columns + ["_index"])
    finish_run(save_dir, rows, columns, save_dir / "summary.csv", camera_name(settings[0]["settings"]["dataset"]))
    return len(rows)


# ---------------------------------------------------------------------------
# The run itself: reading, the model and writing overlap
# ---------------------------------------------------------------------------


def _read_worker(sources, frames_out, skip, preprocessing, field_of_view):
    """Reader thread: take files from ``sources``, put their prepared frames on ``frames_out``."""
    import queue

    try:
        while True:
            try:
                source = sources.get_nowait()
            except queue.Empty:
                break
            try:
                count = 0
                for frame in data.read_frames(source.path, name=source.name):
                    count += 1
                    if frame.name in skip:
                        continue
                    if frame.error:
                        frames_out.put(("skipped", source, frame.error))
                        continue
                    started = time.perf_counter()
                    prepared = data.prepare_frame(frame.pixels, frame.full_scale, preprocessing, field_of_view)
                    frames_out.put(("frame", source, frame, prepared, time.perf_counter() - started))
                frames_out.put(("file", source, count))
            except data.DataError as error:
                frames_out.put(("skipped", source, str(error)))
    except BaseException as error:  # a bug in a thread must reach the main thread, not vanish
        frames_out.put(("crashed", error))
    finally:
        frames_out.put(("reader done",))


def _finish_frame(args, save_dir, source, frame, prepared, p_aurora, mask, patches, masks, journal, seconds):
    """Writer task: refine the mask, write the outputs, score, record the frame in the journal."""
    started = time.perf_counter()
    if args.refine:
        mask, p_aurora = finish_mask(prepared, p_aurora, mask, args.patch_size, args.preprocessing, args.threshold)
    sky = prepared.sky
    when = data.frame_time(frame)
    title = f"{frame.name}  {format_time(when)}" if when else frame.name
    write_outputs(save_dir, frame.name, prepared.image, sky, p_aurora, mask, args.outputs, title=title)
    slice_path = Path(save_dir) / ".keogram" / f"{frame.name}.npy"
    slice_path.parent.mkdir(parents=True, exist_ok=True)
    line = np.stack([keogram_line(p_aurora, sky, args.north), keogram_line(mask, sky, args.north)])
    data.write_atomically(slice_path, lambda handle: np.save(handle, line.astype(np.float16)))
    row = {"file": source.file, "frame": "" if frame.index is None else frame.index, "name": frame.name,
           "time": format_time(when), "rows": mask.shape[0], "cols": mask.shape[1],
           "aurora_fraction": float(mask[sky].mean()) if sky.any() else 0.0,
           "mean_p_aurora": float(p_aurora[sky].mean()) if sky.any() else 0.0,
           "patches": patches, "_index": source.index}
    if args.masks:
        mask_path = masks.get(frame.name)
        if mask_path is None:
            raise data.DataError(f"no mask for frame {frame.name} in {args.masks}")
        row.update(frame_scores(mask, read_true_mask(mask_path, mask.shape), sky))
    row["seconds"] = round(seconds + time.perf_counter() - started, 4)
    journal.add(row)
    return row, prepared.sky_found


def segment_files(args, model, preprocessing, sources, masks, field_of_view, journal, skip, progress):
    """Segment every frame of ``sources`` not in ``skip``; returns (rows, skipped messages, frames to warn of).

    The last is a dict of frame names: ``"borderless"`` (no fisheye border
    found) and ``"other_scale"`` (a full scale, 8- or 16-bit, other than the
    training frames', so scaled by it instead of by the camera's range).

    Reader threads read and prepare frames ahead of the model; writer
    threads refine masks and write outputs behind it; the main thread only
    feeds the model. Queues are bounded, so memory stays flat however many
    frames there are.
    """
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor

    files = queue.Queue()
    for source in sources:
        files.put(source)
    workers = args.workers
    frames = queue.Queue(maxsize=2 * workers)
    readers = [threading.Thread(target=_read_worker, args=(files, frames, skip, preprocessing, field_of_view),
                                daemon=True) for _ in range(workers)]
    for reader in readers:
        reader.start()
    rows, skipped, pending = [], [], []
    warn = {"borderless": [], "other_scale": []}
    slots = threading.Semaphore(2 * workers)
    done_readers = 0
    with ThreadPoolExecutor(workers) as writers:
        def collect(block):
            while pending and (block or pending[0].done()):
                future = pending.pop(0)
                try:
                    row, sky_found = future.result()
                except data.DataError as error:
                    skipped.append(str(error))
                    continue
                rows.append(row)
                if not sky_found:
                    warn["borderless"].append(row["name"])
                progress.update(1)

        while done_readers < len(readers):
            item = frames.get()
            kind = item[0]
            if kind == "reader done":
                done_readers += 1
            elif kind == "crashed":
                raise item[1]
            elif kind == "skipped":
                skipped.append(item[2] if item[2].startswith(str(item[1].path)) else f"{item[1].path}: {item[2]}")
                progress.update(1)
            elif kind == "file":
                progress.total = (progress.total or 0) + max(0, item[2] - 1)
                progress.refresh()
            else:
                _, source, frame, prepared, seconds = item
                if preprocessing.get("full_scale") not in (None, frame.full_scale):
                    warn["other_scale"].append(frame.name)
                started = time.perf_counter()
                logits, patches = logit_map(model, prepared.model_input, stride=args.stride,
                                            batch_size=args.batchsize, sky=prepared.sky, adaptive=args.adaptive,
                                            threshold=args.threshold, fine_stride=args.fine_stride)
                p_aurora = aurora_probability(logits)
                p_aurora[~prepared.sky] = 0.0
                seconds += time.perf_counter() - started
                slots.acquire()  # a writer's slot: bounds the frames held in memory
                future = writers.submit(_finish_frame, args, args.save_dir, source, frame, prepared, p_aurora,
                                        p_aurora > args.threshold, patches, masks, journal, seconds)
                future.add_done_callback(lambda _: slots.release())
                pending.append(future)
            collect(block=False)
        collect(block=True)
    return rows, skipped, warn


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with the epilog's examples as written; defaults only where a help string shows them."""


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_HelpFormatter,
        description="Segment aurora in all-sky frames with a model from train.py: a mask, P(aurora) and "
                    "pictures per frame, summary.csv, and a keogram figure per night.",
        epilog="examples:\n"
               "  python segmentation.py --dataset dataset/Unlabelled --model Results/model.keras "
               "--save_dir Results/segmentation --masks dataset/masks\n"
               "  python segmentation.py --dataset /data/gill/2014 --recursive --outputs mask probability "
               "--save_dir gill_2014 --shard 3/8\n"
               "exit codes: 0 all frames done, 1 some frames could not be read (named, skipped), "
               "2 bad input or an output could not be written (nothing lost; --resume continues)")
    essential = parser.add_argument_group("essential")
    essential.add_argument("--dataset", default=None,
                           help="folder of frames (JPEG, PNG, TIFF, FITS, PGM stacks, CDF) or one frame file; "
                                "required except with --merge")
    essential.add_argument("--model", default="Results/model.keras",
                           help="model.keras written by train.py (default: %(default)s)")
    essential.add_argument("--save_dir", default="Results/segmentation",
                           help="folder for the outputs (default: %(default)s)")
    essential.add_argument("--masks", default=None,
                           help="folder of true masks named like the outputs (nonzero = aurora): "
                                "scores every frame in summary.csv and prints the mean IoU")
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--outputs", nargs="+", choices=OUTPUT_KINDS, default=list(DEFAULT_OUTPUTS),
                         metavar="KIND", help=f"what to write per frame, any of {', '.join(OUTPUT_KINDS)} "
                                              f"(default: {' '.join(DEFAULT_OUTPUTS)})")
    outputs.add_argument("--save_probability", action=argparse.BooleanOptionalAction, default=False,
                         help="also write probability/<name>.npy, P(aurora) as float32 (same as adding probability "
                              "to --outputs)")
    outputs.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                         help="replace the outputs of an earlier run in --save_dir")
    outputs.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                         help="continue an interrupted run in --save_dir: frames already done are skipped")
    archive = parser.add_argument_group("archives")
    archive.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=False,
                         help="also segment the frames of sub-folders (one per night); outputs mirror the tree")
    archive.add_argument("--shard", type=shard_value, default=None, metavar="K/N",
                         help="segment only the K-th of N parts of the files (for N jobs); then --merge")
    archive.add_argument("--merge", action=argparse.BooleanOptionalAction, default=False,
                         help="combine finished --shard runs in --save_dir into summary.csv and the night figures")
    archive.add_argument("--workers", type=data.positive_int, default=min(4, os.cpu_count() or 1),
                         help="threads that read and write frames while the model works (default: %(default)s)")
    sky = parser.add_argument_group("sky")
    sky.add_argument("--field_of_view", default=None, metavar="FILE",
                     help="the sky: a picture (nonzero = sky), or with --min_elevation a map of elevation in "
                          "degrees (FITS); default: the fisheye circle found in each frame")
    sky.add_argument("--min_elevation", type=data.elevation, default=None, metavar="DEGREES",
                     help="leave out the sky below this elevation (10 to 20 is usual), by the elevation map of "
                          "--field_of_view or, without one, as if the fisheye circle were equidistant with its edge "
                          "on the horizon; default: the model's own (train.py's --min_elevation without a map) "
                          "unless --field_of_view is given; -90 keeps the whole circle")
    sky.add_argument("--north", choices=NORTH, default="up",
                     help="the side of the frame north is on, for the keograms (default: %(default)s)")
    advanced = parser.add_argument_group("model evaluation (advanced)")
    advanced.add_argument("--stride", type=data.positive_int, default=DEFAULT_STRIDE,
                          help="pixels between evaluated patch centres; 1 = every pixel, exact "
                               "(default: %(default)s)")
    advanced.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                          help="evaluate more patches, down to --fine_stride, where the mask boundary may pass")
    advanced.add_argument("--fine_stride", type=data.positive_int, default=DEFAULT_FINE_STRIDE,
                          help="finest stride near the boundary with --adaptive (default: %(default)s)")
    advanced.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                          help="the pixel step: each pixel's own P(aurora) from its excess over the sky, and the "
                               "mask's boundary on the aurora's edge")
    advanced.add_argument("--threshold", type=data.fraction, default=0.5,
                          help="a pixel is aurora when P(aurora) > threshold (default: %(default)s)")
    advanced.add_argument("--batchsize", type=data.positive_int, default=256,
                          help="patches per model call (default: %(default)s)")
    advanced.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                          help="no progress bar")
    advanced.add_argument("--backend_logs", action=argparse.BooleanOptionalAction, default=False,
                          help="show the Keras backend's own start-up messages")
    return parser


def _error(message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _existing_outputs(save_dir, sources, outputs, shard):
    """Outputs of an earlier run that this one would overwrite (first few), checked before anything is written."""
    save_dir = Path(save_dir)
    found = [path for path in (run_files(save_dir, shard)["summary"], run_files(save_dir, shard)["settings"])
             if path.exists()]
    for source in sources:
        for kind in outputs:
            single = output_path(save_dir, kind, source.name)
            if single.exists():
                found.append(single)
            elif data.frame_suffix(source.path) not in data.PICTURE_EXTENSIONS and single.parent.is_dir():
                # Frames of multi-frame files are <name>_<k>; their count is unknown until read.
                found += sorted(single.parent.glob(f"{Path(source.name).name}_*{OUTPUT_SUFFIX.get(kind, '.png')}"))[:1]
        if len(found) > 1:
            break
    return found


class Run(NamedTuple):
    """What ``check_run`` found: the frames, their true masks, the sky, the model and the run's settings."""

    sources: list
    masks: dict
    field_of_view: object
    model: object
    preprocessing: dict
    settings: dict


def check_run(args, save_dir, files):
    """Every check that can fail on the user's input, before anything is written: a ``Run``.

    Cheapest first; the model is loaded last because it is slow. Raises
    data.UsageError (or OSError) with the one-line message for the user.
    """
    if args.resume and args.overwrite:
        raise data.UsageError("--resume and --overwrite exclude each other: continue the run, or start it again")
    model_path = data.check_model_path(args.model)
    sources = shard_sources(list_sources(args.dataset, args.recursive), args.shard)
    masks = match_masks(sources, args.masks, args.recursive) if args.masks else {}
    check_writable(save_dir)
    settings = run_settings(args, model_path)
    if args.resume:
        if not files["settings"].exists():
            raise data.UsageError(f"cannot resume: {save_dir} holds no run to continue ({files['settings'].name} "
                                  f"is missing); start it without --resume")
        difference = settings_difference(json.loads(files["settings"].read_text())["settings"], settings)
        if difference:
            raise data.UsageError(f"cannot resume the run in {save_dir} with other settings: {difference}")
    elif not args.overwrite:
        existing = _existing_outputs(save_dir, sources, args.outputs, args.shard)
        if existing:
            raise data.UsageError(f"{existing[0]} already exists; use --overwrite to replace, or --resume "
                                  f"to continue that run")
    field_of_view = data.user_sky(args.field_of_view, args.min_elevation)
    data.import_keras(args.backend_logs)
    model, preprocessing = data.load_model(model_path)
    return Run(sources, masks, field_of_view, model, preprocessing, settings)


def open_run(args, save_dir, files, run, columns):
    """Start (or, with ``--resume``, continue) the run's bookkeeping: (journal, rows done before).

    Raises OSError when ``save_dir`` cannot be written.
    """
    save_dir.mkdir(parents=True, exist_ok=True)
    earlier = read_journal(files["journal"], columns) if args.resume else []
    data.write_atomically(files["settings"], lambda handle: handle.write(json.dumps(
        {"settings": run.settings, "shard": list(args.shard) if args.shard else None,
         "preprocessing": run.preprocessing}, indent=2).encode()))
    files["summary"].unlink(missing_ok=True)
    return Journal(files["journal"], columns, fresh=not args.resume), earlier


def report(args, save_dir, rows, all_rows, done_before, seconds, nights, warn, skipped, preprocessing):
    """Print what the run did and what went wrong; returns the exit code (0, or 1 when frames were skipped)."""
    print(f"segmented {len(rows)} frames into {save_dir}" + (f" ({len(rows) / seconds:.2f} frames/s)" if rows else "")
          + (f"; {done_before} done before" if done_before else ""))
    scored = [row for row in all_rows if row.get("iou") not in ("", None)]
    clear = [row for row in all_rows if row.get("false_aurora") not in ("", None)]
    if scored:
        means = {c: float(np.mean([float(r[c]) for r in scored])) for c in ("iou", "precision", "recall")}
        print(f"mean IoU {means['iou']:.4f}  precision {means['precision']:.4f}  recall {means['recall']:.4f}  "
              f"over {len(scored)} frames with true aurora")
    if clear:
        print(f"frames without true aurora ({len(clear)}): "
              f"{np.mean([float(r['false_aurora']) for r in clear]):.2%} of their sky called aurora")
    if nights:
        print(f"night figures and keograms: {', '.join(nights)} in {save_dir / 'night'}")
    if warn["borderless"]:
        horizon = not args.field_of_view and (args.min_elevation is not None
                                              or (preprocessing or {}).get("min_elevation") is not None)
        print(f"{PROG}: {data.borderless_warning(warn['borderless'], horizon)}", file=sys.stderr)
    if warn["other_scale"]:
        print(f"{PROG}: warning: {len(warn['other_scale'])} frame(s) (first: {warn['other_scale'][0]}) have another "
              f"bit depth than the model's training frames (full scale {preprocessing['full_scale']:g}): they are "
              f"scaled by their own full scale, not the camera's range; train on frames of this camera",
              file=sys.stderr)
    for message in skipped:
        print(f"{PROG}: skipped {message}", file=sys.stderr)
    if skipped:
        print(f"{PROG}: {len(skipped)} frame(s) or file(s) could not be read", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    """Run the command line; returns the exit code (0 ok, 1 a frame failed, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        # argparse has printed its message (or the help); hand back its code.
        return exit_request.code
    save_dir = Path(args.save_dir)
    if args.save_probability and "probability" not in args.outputs:
        args.outputs = [*args.outputs, "probability"]
    files = run_files(save_dir, args.shard)
    if args.dataset is None and not args.merge:
        return _error("the following argument is required: --dataset (a folder of frames, or one frame file)")
    if args.merge:
        try:
            count = merge_shards(save_dir, args.quiet)
        except (data.UsageError, OSError) as error:
            return _error(str(error))
        print(f"merged {count} frames into {save_dir / 'summary.csv'}")
        return 0

    try:
        run = check_run(args, save_dir, files)
    except (data.UsageError, OSError) as error:
        return _error(str(error))
    args.patch_size, args.preprocessing = data.patch_size_of(run.model), run.preprocessing
    columns = SUMMARY_COLUMNS + (METRIC_COLUMNS if args.masks else [])
    try:
        journal, earlier = open_run(args, save_dir, files, run, columns + ["_index"])
    except OSError as error:
        return _error(f"cannot write to {save_dir}: {error.strerror or error}")

    from tqdm import tqdm

    started = time.perf_counter()
    progress = tqdm(total=len(run.sources), desc="segmenting", unit="frame", disable=args.quiet, file=sys.stderr)
    try:
        rows, skipped, warn = segment_files(args, run.model, run.preprocessing, run.sources, run.masks,
                                            run.field_of_view, journal, {row["name"] for row in earlier}, progress)
    except OSError as error:
        return _error(f"cannot write outputs to {save_dir}: {error.strerror or error} "
                      f"({getattr(error, 'filename', '') or 'unknown file'}); free space and run again with --resume")
    finally:
        progress.close()
        journal.close()
    seconds = time.perf_counter() - started
    all_rows = earlier + [{key: ("" if value is None else value) for key, value in row.items()} for row in rows]
    if args.shard is None:
        nights = finish_run(save_dir, all_rows, columns, files["summary"], camera_name(args.dataset))
    else:
        write_summary(files["summary"], sort_rows(all_rows), columns)
        nights = []
    return report(args, save_dir, rows, all_rows, len(earlier), seconds, nights, warn, skipped, run.preprocessing)


if __name__ == "__main__":
    sys.exit(main())
