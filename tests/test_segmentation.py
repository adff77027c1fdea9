"""segmentation.py: window arithmetic on hand-made arrays, tiny fixed-weight
models, the fisheye detector, and the CLI on folders of synthetic frames.

The models are stock Keras layers with weights set by hand, so every logit is
a known function of the patch:

- ``centre_model``: logit = GAIN * (0.5 - red value of the centre pixel), so
  a pixel is aurora (P(aurora) > 0.5) exactly when its red value is > 0.5.
- ``linear_model``: logit = sum(kernel * patch) + bias with a seeded random
  kernel, so every pixel of the patch matters and padding errors show.
- ``mean_model``: logit = GAIN * (0.3 - mean of the patch), smooth in space.
"""

import csv
import re

import keras
import numpy as np
import pytest
from PIL import Image

import data
import segmentation
from conftest import write_png
from data import sky_mask
from segmentation import (
    grid_coordinates,
    interpolate_grid,
    interpolation_weights,
    logit_map,
    logits_at,
    mask_metrics,
    pad_frame,
    patch_windows,
)

GAIN = 20.0
PATCH = 5


# ---------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------


def patch_conv_model(patch_size, kernel, bias):
    """One valid Conv2D over the whole patch: logit = sum(kernel * patch) + bias."""
    inputs = keras.Input((patch_size, patch_size, 3))
    conv = keras.layers.Conv2D(1, patch_size, padding="valid")
    outputs = keras.layers.Flatten()(conv(inputs))  # (n, 1)
    model = keras.Model(inputs, outputs)
    conv.set_weights([kernel.reshape(patch_size, patch_size, 3, 1).astype(np.float32), np.array([bias], np.float32)])
    return model


def centre_model(patch_size=PATCH):
    kernel = np.zeros((patch_size, patch_size, 3), np.float32)
    kernel[patch_size // 2, patch_size // 2, 0] = -GAIN
    return patch_conv_model(patch_size, kernel, 0.5 * GAIN)


def linear_model(patch_size, seed=0):
    kernel = np.random.default_rng(seed).standard_normal((patch_size, patch_size, 3)).astype(np.float32)
    return patch_conv_model(patch_size, kernel, 0.1), kernel


def mean_model(patch_size=PATCH):
    kernel = np.full((patch_size, patch_size, 3), -GAIN / (3 * patch_size**2), np.float32)
    return patch_conv_model(patch_size, kernel, 0.3 * GAIN)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.keras"
    centre_model().save(path)
    return path


def half_frame(rows=12, cols=16, aurora_cols=6):
    """Red 0.9 in the first ``aurora_cols`` columns, 0.2 elsewhere: no border."""
    frame = np.full((rows, cols, 3), 0.2, np.float32)
    frame[:, :aurora_cols, 0] = 0.9
    return frame


def fisheye_frame(size=40, radius=16):
    """A bright disc (red 0.9 on its left half, 0.2 on its right) on a black border."""
    rows, cols = np.mgrid[:size, :size]
    inside = (rows - size / 2) ** 2 + (cols - size / 2) ** 2 <= radius**2
    frame = np.zeros((size, size, 3), np.float32)
    frame[inside] = 0.2
    frame[inside & (cols < size / 2), 0] = 0.9
    return frame, inside


# ---------------------------------------------------------------------------
# Window arithmetic
# ---------------------------------------------------------------------------


def test_pad_frame_reflects_odd_and_even_patches():
    image = np.arange(12, dtype=np.float32).reshape(3, 4, 1).repeat(3, axis=2)
    odd = pad_frame(image, 5)  # 2 before, 2 after
    assert odd.shape == (7, 8, 3)
    np.testing.assert_array_equal(odd[2:5, 2:6], image)
    np.testing.assert_array_equal(odd[2, :, 0], [2, 1, 0, 1, 2, 3, 2, 1])
    even = pad_frame(image, 4)  # 2 before, 1 after
    assert even.shape == (6, 7, 3)
    np.testing.assert_array_equal(even[2, :, 0], [2, 1, 0, 1, 2, 3, 2])


def test_pad_frame_smaller_than_half_patch_reflects_repeatedly():
    image = np.array([[[1.0] * 3, [2.0] * 3]], np.float32)  # 1 row, 2 cols
    padded = pad_frame(image, 7)
    assert padded.shape == (7, 8, 3)
    # Triangle wave over the columns, the single row repeated.
    np.testing.assert_array_equal(padded[3, :, 0], [2, 1, 2, 1, 2, 1, 2, 1])
    np.testing.assert_array_equal(padded[:, 3, 0], [1] * 7)  # column 0 of the frame


@pytest.mark.parametrize("patch_size", [4, 5])
def test_patch_windows_are_views_centred_on_their_pixel(patch_size):
    image = np.random.default_rng(1).random((6, 7, 3)).astype(np.float32)
    padded = pad_frame(image, patch_size)
    windows = patch_windows(padded, patch_size)
    assert windows.shape == (6, 7, patch_size, patch_size, 3)
    assert np.shares_memory(windows, padded)
    centre = patch_size // 2
    np.testing.assert_array_equal(windows[:, :, centre, centre], image)
    np.testing.assert_array_equal(windows[2, 3], padded[2 : 2 + patch_size, 3 : 3 + patch_size])


def test_grid_coordinates_include_the_last_pixel():
    np.testing.assert_array_equal(grid_coordinates(10, 4), [0, 4, 8, 9])
    np.testing.assert_array_equal(grid_coordinates(9, 4), [0, 4, 8])
    np.testing.assert_array_equal(grid_coordinates(3, 8), [0, 2])
    np.testing.assert_array_equal(grid_coordinates(1, 4), [0])
    np.testing.assert_array_equal(grid_coordinates(5, 1), np.arange(5))
    with pytest.raises(ValueError, match="Invalid grid"):
        grid_coordinates(5, 0)


def test_interpolation_weights_hand_computed():
    lower, weight = interpolation_weights(10, grid_coordinates(10, 4))
    np.testing.assert_array_equal(lower, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(weight, [0, 0.25, 0.5, 0.75, 0, 0.25, 0.5, 0.75, 0, 1])


def test_interpolation_equals_node_values_exactly_at_nodes():
    rows, cols, stride = 11, 14, 4
    row_grid, col_grid = grid_coordinates(rows, stride), grid_coordinates(cols, stride)
    nodes = np.random.default_rng(2).normal(0, 5, (len(row_grid), len(col_grid))).astype(np.float32)
    full = interpolate_grid(nodes, row_grid, col_grid, rows, cols)
    assert full.shape == (rows, cols) and full.dtype == np.float32
    np.testing.assert_array_equal(full[np.ix_(row_grid, col_grid)], nodes)


def test_interpolation_of_single_row_and_single_pixel_grids():
    np.testing.assert_array_equal(interpolate_grid(np.array([[3.0]]), [0], [0], 1, 1), [[3.0]])
    # Nodes at columns 0, 2, 4, 5 (the last interval is shorter).
    row = interpolate_grid(np.array([[0.0, 2.0, 3.0, 5.0]]), [0], grid_coordinates(6, 2), 1, 6)
    np.testing.assert_array_equal(row, [[0.0, 1.0, 2.0, 2.5, 3.0, 5.0]])


def test_interpolation_reproduces_a_bilinear_field():
    rows, cols = 9, 13
    row_grid, col_grid = grid_coordinates(rows, 3), grid_coordinates(cols, 5)
    field = lambda r, c: 0.5 * r - 0.25 * c + 0.1 * r * c + 1.0  # noqa: E731  bilinear per cell
    nodes = field(*np.meshgrid(row_grid, col_grid, indexing="ij")).astype(np.float32)
    full = interpolate_grid(nodes, row_grid, col_grid, rows, cols)
    np.testing.assert_allclose(full, field(*np.mgrid[:rows, :cols]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Logit maps
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size, shape", [(5, (7, 9)), (4, (6, 5)), (5, (1, 2))])
def test_stride_one_equals_direct_per_patch_evaluation(patch_size, shape):
    model, kernel = linear_model(patch_size)
    image = np.random.default_rng(3).random((*shape, 3)).astype(np.float32)
    logits, patches = logit_map(model, image, stride=1, batch_size=7)
    assert logits.shape == shape and logits.dtype == np.float32
    assert patches == shape[0] * shape[1]
    # Patches built by hand: np.pad reflect, then plain slicing.
    before, after = patch_size // 2, patch_size - 1 - patch_size // 2
    padded = np.pad(image, ((before, after), (before, after), (0, 0)), mode="reflect")
    expected = np.array(
        [[np.sum(padded[r : r + patch_size, c : c + patch_size] * kernel) + 0.1 for c in range(shape[1])]
         for r in range(shape[0])]
    )
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_logits_at_arbitrary_centres_and_batch_size_do_not_matter():
    model, _ = linear_model(4, seed=5)
    image = np.random.default_rng(4).random((8, 6, 3)).astype(np.float32)
    windows = patch_windows(pad_frame(image, 4), 4)
    rows, cols = np.array([0, 7, 3, 3]), np.array([5, 0, 2, 2])
    full, _ = logit_map(model, image, stride=1)
    np.testing.assert_allclose(logits_at(model, windows, rows, cols, batch_size=3), full[rows, cols], atol=1e-5)
    np.testing.assert_allclose(logits_at(model, windows, rows, cols, batch_size=1), full[rows, cols], atol=1e-5)


def test_grid_mode_is_close_to_stride_one_on_a_smooth_field():
    rows, cols = np.mgrid[:30, :34]
    brightness = 0.3 + 0.25 * np.sin(rows / 9.0) * np.cos(cols / 11.0)
    image = np.repeat(brightness[..., None], 3, axis=2).astype(np.float32)
    model = mean_model()
    exact, exact_patches = logit_map(model, image, stride=1)
    coarse, coarse_patches = logit_map(model, image, stride=4)
    assert coarse_patches == len(grid_coordinates(30, 4)) * len(grid_coordinates(34, 4)) < exact_patches / 10
    np.testing.assert_array_equal(coarse[::4, ::4], exact[::4, ::4])
    # Bilinear error grows with the curvature, which is largest in the first
    # rows, where the reflect padding folds the field.
    assert np.max(np.abs(coarse - exact)) < 0.05 * np.ptp(exact)
    iou = mask_metrics(coarse < 0, exact < 0)["iou"]
    assert iou > 0.95


def test_points_outside_the_sky_are_skipped_without_changing_the_sky():
    frame, _ = fisheye_frame(40, 16)
    sky = sky_mask(frame)
    model = mean_model()
    for stride in (1, 4):
        everywhere, all_patches = logit_map(model, frame, stride=stride)
        skipping, patches = logit_map(model, frame, stride=stride, sky=sky)
        assert patches < 0.9 * all_patches
        np.testing.assert_array_equal(skipping[sky], everywhere[sky])


# ---------------------------------------------------------------------------
# Adaptive grid: coarse to fine (the default mode)
# ---------------------------------------------------------------------------


def edge_frame(rows=64, cols=80):
    """Grey brightness 0.05 above a wavy edge, 0.55 below it, blurred over about 3 pixels.

    Through mean_model the logit is about +5 far above the edge and -5 far
    below it, and crosses 0 once along every column.
    """
    row, col = np.mgrid[:rows, :cols]
    edge = 0.4 * rows + 0.15 * rows * np.sin(col / 13.0)
    brightness = 0.3 + 0.25 * np.tanh((row - edge) / 3.0)
    return np.repeat(brightness[..., None], 3, axis=2).astype(np.float32)


def test_threshold_logit_and_cells_to_refine_hand_computed():
    assert segmentation.threshold_logit(0.5) == 0.0
    assert segmentation.threshold_logit(0.2) == pytest.approx(np.log(4.0))
    assert segmentation.threshold_logit(0.0) == np.inf and segmentation.threshold_logit(1.0) == -np.inf
    grid = np.array([[-1.0, 2.0, 3.0], [-2.0, 5.0, 4.0], [-3.0, -4.0, 9.0]], np.float32)
    exact = np.ones((3, 3), bool)
    # Cells (0, 0), (1, 0) and (1, 1) have corners on both sides of 0.
    np.testing.assert_array_equal(segmentation.cells_to_refine(grid, exact, 0.0, 0.0), [[1, 0], [1, 1]])
    # Corner 2.0 is within 2.5 of 0, so cell (0, 1) joins.
    np.testing.assert_array_equal(segmentation.cells_to_refine(grid, exact, 0.0, 2.5), [[1, 1], [1, 1]])
    # A cell with an interpolated (not exact) corner is never refined.
    exact[0, 0] = False
    np.testing.assert_array_equal(segmentation.cells_to_refine(grid, exact, 0.0, 0.0), [[0, 0], [1, 1]])
    # Threshold 0: every finite logit is aurora, nothing to refine.
    assert not segmentation.cells_to_refine(grid, np.ones((3, 3), bool), np.inf, 1.0).any()


def test_next_stride_divides_so_that_grids_nest():
    assert [segmentation._next_stride(s) for s in (16, 8, 2, 12, 9, 5)] == [8, 4, 1, 6, 3, 1]
    for rows, stride in [(37, 16), (40, 12), (9, 5)]:
        finer = segmentation._next_stride(stride)
        assert set(grid_coordinates(rows, stride)) <= set(grid_coordinates(rows, finer))


@pytest.mark.parametrize("stride, threshold", [(8, 0.5), (16, 0.5), (12, 0.3)])
def test_adaptive_grid_mask_equals_stride_one_mask_with_fewer_patches(stride, threshold):
    # The edge is a smooth curve that crosses each column once and bends
    # slowly, so every cell it crosses has corners on both sides of it (or
    # close to it, within the margin) and is refined down to stride 1:
    # the masks are equal.
    image = edge_frame()
    model = mean_model()
    boundary = segmentation.threshold_logit(threshold)
    exact, exact_patches = logit_map(model, image, stride=1)
    refined, patches = logit_map(model, image, stride=stride, adaptive=True, threshold=threshold, margin=1.0,
                                 fine_stride=1)
    exact_mask, refined_mask = exact < boundary, refined < boundary
    assert 0.1 < exact_mask.mean() < 0.9  # the boundary really crosses the frame
    plain, _ = logit_map(model, image, stride=stride)
    assert ((plain < boundary) != exact_mask).any()  # so interpolation alone is not exact here
    np.testing.assert_array_equal(refined_mask, exact_mask)
    assert patches < exact_patches / 2
    # Next to the boundary the logits are the evaluated ones, not interpolated.
    boundary_pixels = np.zeros_like(exact_mask)
    boundary_pixels[:-1] |= exact_mask[:-1] != exact_mask[1:]
    boundary_pixels[:, :-1] |= exact_mask[:, :-1] != exact_mask[:, 1:]
    np.testing.assert_allclose(refined[boundary_pixels], exact[boundary_pixels], rtol=1e-5, atol=1e-5)


def test_adaptive_grid_refines_only_near_the_boundary():
    image = edge_frame()
    model = mean_model()
    coarse, coarse_patches = logit_map(model, image, stride=8)
    refined, patches = logit_map(model, image, stride=8, adaptive=True, margin=0.0)
    assert coarse_patches < patches < image.shape[0] * image.shape[1] / 3
    # The coarse nodes are evaluated in both, and cells without the boundary
    # keep the coarse interpolation.
    np.testing.assert_array_equal(refined[::8, ::8], coarse[::8, ::8])
    assert np.count_nonzero(refined == coarse) > 0.5 * refined.size


def test_adaptive_grid_skips_points_outside_the_sky_and_handles_thin_frames():
    frame, _ = fisheye_frame(40, 16)
    sky = sky_mask(frame)
    model = centre_model()
    exact, _ = logit_map(model, frame, stride=1, sky=sky)
    refined, patches = logit_map(model, frame, stride=8, sky=sky, adaptive=True, fine_stride=1)
    everywhere, all_patches = logit_map(model, frame, stride=8, adaptive=True, fine_stride=1)
    assert patches < all_patches
    np.testing.assert_array_equal((refined < 0)[sky], (exact < 0)[sky])
    for shape in [(1, 9), (7, 1), (1, 1)]:
        image = np.random.default_rng(9).random((*shape, 3)).astype(np.float32)
        logits, _ = logit_map(model, image, stride=4, adaptive=True)
        assert logits.shape == shape


def test_adaptive_grid_stops_at_the_fine_stride():
    image = edge_frame()
    model = mean_model()
    exact, _ = logit_map(model, image, stride=1)
    to_one, one_patches = logit_map(model, image, stride=16, adaptive=True, fine_stride=1)
    to_two, two_patches = logit_map(model, image, stride=16, adaptive=True, fine_stride=2)
    assert two_patches < one_patches
    # The stride-2 nodes are the same in both; the pixels between them differ.
    np.testing.assert_array_equal(to_two[::2, ::2], to_one[::2, ::2])
    assert not np.array_equal(to_two, to_one)
    assert mask_metrics(to_two < 0, exact < 0)["iou"] > 0.98


def test_adaptive_grid_margin_and_fine_stride_must_be_valid():
    with pytest.raises(ValueError, match="Invalid margin: expected margin >= 0, received -1.0"):
        logit_map(mean_model(), edge_frame(8, 8), stride=4, adaptive=True, margin=-1.0)
    with pytest.raises(ValueError, match="Invalid fine_stride: expected an int >= 1, received 0"):
        logit_map(mean_model(), edge_frame(8, 8), stride=4, adaptive=True, fine_stride=0)


# ---------------------------------------------------------------------------
# Mask refinement
# ---------------------------------------------------------------------------


def disc_frame(size=96, radius=20, centre=None, seed=0):
    """A dark noisy sky (0.03) with a green disc (0.45) whose edge is blurred over a pixel; and the disc."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    centre_row, centre_col = centre or (size / 2, size / 2)
    distance = np.hypot(rows - centre_row, cols - centre_col)
    disc = distance <= radius
    glow = 0.42 / (1 + np.exp(3 * (distance - radius)))  # 0.21 on the edge, 0.02 a pixel out
    frame = 0.03 + glow[..., None] * np.array([0.5, 1.0, 0.4]) + 0.004 * rng.standard_normal((size, size, 3))
    return np.clip(frame, 0, 1).astype(np.float32), disc


def disk_mask(mask, radius, grow):
    """``mask`` dilated (grow=True) or eroded by a disc of ``radius`` pixels."""
    from scipy import ndimage
    from skimage.morphology import disk

    operation = ndimage.binary_dilation if grow else ndimage.binary_erosion
    return operation(mask, disk(radius))


def iou_of(predicted, truth):
    return mask_metrics(predicted, truth)["iou"]


def test_refine_mask_moves_a_loose_boundary_onto_the_edge():
    frame, disc = disc_frame()
    sky = np.ones(disc.shape, bool)
    # A 16-pixel patch classifier's mask overshoots by up to about 5 pixels
    # (the erosion that makes aurora seeds) or falls short by a few.
    loose_masks = [disk_mask(disc, 2, grow=True), disk_mask(disc, 4, grow=True), disk_mask(disc, 3, grow=False),
                   disk_mask(disc, 5, grow=False)]
    refined = [segmentation.refine_mask(frame, loose, sky, patch_size=16) for loose in loose_masks]
    assert refined[0].dtype == bool and refined[0].shape == disc.shape
    assert max(iou_of(loose, disc) for loose in loose_masks) < 0.85
    for mask in refined[1:]:
        np.testing.assert_array_equal(mask, refined[0])
    # Within a pixel of the true edge (pixels half a pixel out are still
    # clearly brighter than the sky), everywhere along it.
    assert not (refined[0] & ~disk_mask(disc, 1, grow=True)).any()
    assert refined[0][disk_mask(disc, 1, grow=False)].all()
    assert iou_of(refined[0], disc) > 0.93


def test_refine_mask_keeps_thin_parts_and_adds_nothing_far_away():
    frame, disc = disc_frame(size=160, radius=20, centre=(120, 120))
    line = np.zeros(disc.shape, bool)
    line[10:13, 5:90] = True  # 3 pixels wide: no seed survives the erosion
    sky = np.ones(disc.shape, bool)
    np.testing.assert_array_equal(segmentation.refine_mask(frame, line, sky, patch_size=16), line)
    # With a seeded part too, the thin line is still kept. In tiles of 16
    # pixels, those around the line see no aurora seed within their margin
    # and keep the mask (random_walker alone would renumber a lone
    # background label 2 as 1, i.e. call the whole tile aurora).
    both = disk_mask(disc, 4, grow=True) | line
    for tile in (512, 16):
        refined = segmentation.refine_mask(frame, both, sky, patch_size=16, tile=tile)
        assert refined[line].all()
        assert not (refined & ~disk_mask(disc | line, 5, grow=True)).any()
        assert iou_of(refined, disc | line) > 0.95
    empty = np.zeros(disc.shape, bool)
    np.testing.assert_array_equal(segmentation.refine_mask(frame, empty, sky, patch_size=16), empty)


def test_refine_mask_keeps_a_thin_arm_of_a_thick_part_in_any_tiling():
    frame, disc = disc_frame(size=128, radius=15, centre=(64, 25))
    arm = np.zeros(disc.shape, bool)
    arm[62:66, 25:125] = True  # 4 pixels wide, from the disc's centre to near the frame's edge
    frame[arm] = frame[disc][0]  # as bright as the disc's centre
    truth = disc | arm
    sky = np.ones(disc.shape, bool)
    loose = disk_mask(truth, 3, grow=True)
    for tile in (512, 32):
        refined = segmentation.refine_mask(frame, loose, sky, patch_size=16, tile=tile)
        # The arm is kept to its end, though its far part shares no tile
        # (with margin) with the disc's seeds when the tiles are small.
        assert refined[arm].all(), tile
        assert iou_of(refined, truth) > iou_of(loose, truth)


def excess_of(frame):
    """The excess map segmentation computes from a normalized frame (background-normalized preprocessing)."""
    sky = np.ones(frame.shape[:2], bool)
    normalized = data.normalize_frame(frame, sky, 1 / 255)
    return segmentation.excess_map(normalized, {"normalize": "background"})


def model_probability(mask, inside=0.95, outside=0.05):
    """A model's patch P(aurora): ``inside`` on ``mask``, ``outside`` elsewhere."""
    return np.where(mask, inside, outside).astype(np.float32)


def test_pixel_mask_trims_a_mask_far_too_wide():
    # A model mask 12 pixels wider than the disc all round (more than the
    # erosion of the random walker's seeds undoes): the excess finds the
    # disc and the faint wing of its glow (a few noise levels a pixel or two
    # out, so the mask ends within 3 pixels of the disc's half maximum).
    frame, disc = disc_frame(size=256, radius=20)
    sky = np.ones(disc.shape, bool)
    loose = disk_mask(disc, 12, grow=True)
    plain = segmentation.refine_mask(frame, loose, sky, patch_size=16)
    p_model = model_probability(loose)
    probability, refined = segmentation.pixel_mask(p_model, excess_of(frame), sky)
    assert refined[disc].all() and not refined[~disk_mask(disc, 3, grow=True)].any()
    assert iou_of(refined, disc) > 0.75 > 0.5 > iou_of(plain, disc)
    np.testing.assert_array_equal(refined, probability > 0.5)
    assert (probability <= p_model + 1e-6).all()  # a pixel is aurora only if its patch is
    assert np.percentile(probability[~disk_mask(disc, 3, grow=True)], 99) < 0.1  # the sky, noise and all


def test_pixel_mask_drops_a_part_of_the_mask_with_nothing_in_it():
    frame, disc = disc_frame(size=256, radius=16, centre=(60, 60))
    sky = np.ones(disc.shape, bool)
    empty_sky = np.zeros_like(disc)
    empty_sky[160:190, 160:190] = True  # the model's mistake: plain sky
    probability, refined = segmentation.pixel_mask(model_probability(disk_mask(disc, 4, grow=True) | empty_sky),
                                                   excess_of(frame), sky)
    assert not refined[150:200, 150:200].any()
    assert probability[150:200, 150:200].max() <= 0.5
    assert refined[disc].all() and not refined[~disk_mask(disc, 3, grow=True)].any()


def test_pixel_mask_probability_follows_the_excess():
    # The excess rises along the columns; the patch certainly holds aurora.
    excess = np.tile(np.linspace(0.0, 12.0, 121, dtype=np.float32), (20, 1))
    sky = np.ones(excess.shape, bool)
    probability, mask = segmentation.pixel_mask(np.ones(excess.shape, np.float32), excess, sky)
    edge = int(np.argmin(np.abs(excess[0] - segmentation.PIXEL_EDGE_EXCESS)))
    assert probability[0, edge] == pytest.approx(0.5, abs=1e-6)
    assert (np.diff(probability[0]) >= 0).all() and probability[0, 0] < 0.02 and probability[0, -1] > 0.99
    np.testing.assert_array_equal(mask, excess > segmentation.PIXEL_EDGE_EXCESS)
    # A stricter threshold, a smaller mask; a patch the model doubts, less of it.
    strict = segmentation.pixel_mask(np.ones(excess.shape, np.float32), excess, sky, 0.9)[1]
    assert not (strict & ~mask).any() and strict.sum() < mask.sum()
    assert segmentation.pixel_mask(np.full(excess.shape, 0.7, np.float32), excess, sky)[1].sum() < mask.sum()
    # Nothing reaches a clear detection: no aurora, and no pixel above the threshold.
    faint = excess * (0.9 * segmentation.PIXEL_SEED_EXCESS / 12.0)
    probability, mask = segmentation.pixel_mask(np.ones(excess.shape, np.float32), faint, sky)
    assert not mask.any() and probability.max() <= 0.5 and probability.max() > 0.4
    # Outside the sky: nothing.
    sky[:, 100:] = False
    probability, mask = segmentation.pixel_mask(np.ones(excess.shape, np.float32), excess, sky)
    assert not mask[:, 100:].any() and not probability[:, 100:].any() and mask.any()


def test_pixel_mask_arguments_are_checked():
    with pytest.raises(ValueError, match="Invalid p_aurora or excess: expected shape"):
        segmentation.pixel_mask(np.zeros((4, 5), np.float32), np.zeros((4, 4), np.float32), np.ones((4, 4), bool))


def test_refine_mask_arguments_are_checked():
    frame, disc = disc_frame(size=40, radius=10)
    sky = np.ones(disc.shape, bool)
    with pytest.raises(ValueError, match=r"Invalid mask or sky: expected shape \(40, 40\)"):
        segmentation.refine_mask(frame, disc[:-1], sky, patch_size=16)
    with pytest.raises(ValueError, match="Invalid patch_size: expected an int >= 1, received 0"):
        segmentation.refine_mask(frame, disc, sky, patch_size=0)
    with pytest.raises(ValueError, match="Invalid tile: expected an int >= 1, received 0"):
        segmentation.refine_mask(frame, disc, sky, patch_size=16, tile=0)


def test_refine_mask_tiles_sky_and_gain_do_not_change_the_answer():
    frame, disc = disc_frame(size=120, radius=30, centre=(50, 64))
    sky = np.zeros(disc.shape, bool)
    sky[:, :100] = True  # the disc reaches past the sky's edge
    loose = disk_mask(disc, 3, grow=True)
    whole = segmentation.refine_mask(frame, loose, sky, patch_size=16, tile=512)
    assert not whole[~sky].any()
    assert iou_of(whole, disc & sky) > 0.93
    np.testing.assert_array_equal(segmentation.refine_mask(frame, loose, sky, patch_size=16, tile=40), whole)
    # A camera with a quarter of the gain (a 14-bit sensor read as 16-bit):
    # the log-brightness steps are the same, so is the mask.
    dim = segmentation.refine_mask(frame / 4, loose, sky, patch_size=16)
    assert np.count_nonzero(dim != whole) <= 2


# ---------------------------------------------------------------------------
# Fisheye circle, scores, colours
# ---------------------------------------------------------------------------


def test_sky_mask_finds_the_circle():
    frame, inside = fisheye_frame(60, 25)
    sky = sky_mask(frame)
    assert sky.dtype == bool and sky.shape == (60, 60)
    assert sky[inside].all()
    np.testing.assert_array_equal(sky, inside)
    assert not sky[0, 0] and not sky[-1, -1]


def test_sky_mask_dark_noisy_sky_with_border_and_a_time_stamp():
    rng = np.random.default_rng(6)
    frame, inside = fisheye_frame(60, 25)
    frame[inside] = np.clip(0.04 + 0.02 * rng.standard_normal((np.count_nonzero(inside), 3)), 0, 1)
    frame[1:4, 1:10] = 1.0  # white text in a corner of the border
    sky = sky_mask(frame)
    assert sky[inside].mean() > 0.99
    assert not sky[2, 5]


def test_sky_mask_without_border_is_everything():
    rng = np.random.default_rng(7)
    frame = np.clip(0.05 + 0.02 * rng.standard_normal((30, 50, 3)), 0, 1).astype(np.float32)
    assert sky_mask(frame).all()
    assert sky_mask(np.zeros((10, 10, 3), np.float32)).all()


def test_mask_metrics_hand_computed_and_empty_masks():
    predicted = np.array([[1, 1, 0, 0]], bool)
    truth = np.array([[0, 1, 1, 0]], bool)
    assert mask_metrics(predicted, truth) == {"iou": 1 / 3, "precision": 0.5, "recall": 0.5}
    empty = np.zeros((2, 2), bool)
    assert mask_metrics(empty, empty) == {"iou": 1.0, "precision": 1.0, "recall": 1.0}
    assert mask_metrics(empty, ~empty) == {"iou": 0.0, "precision": 1.0, "recall": 0.0}


def test_color_filter_is_black_for_background_and_bright_yellow_for_aurora():
    colors = segmentation.color_filter(np.array([[1.0, 0.0, 0.5]], np.float32))
    assert colors.dtype == np.uint8 and colors.shape == (1, 3, 3)
    assert colors[0, 1].max() < 10  # background: black
    assert colors[0, 0, 0] > 240 and colors[0, 0, 1] > 240 and colors[0, 0, 2] < 200  # aurora: yellow
    luminance = colors[0].astype(float) @ [0.299, 0.587, 0.114]
    assert luminance[1] < luminance[2] < luminance[0]  # brighter means more likely aurora, in grey too


def test_overlay_draws_the_mask_in_magenta_and_leaves_the_rest():
    shown = np.full((7, 7, 3), 100, np.uint8)
    mask = np.zeros((7, 7), bool)
    mask[2:5, 2:5] = True
    drawn = segmentation.overlay(shown, mask)
    np.testing.assert_array_equal(drawn[~mask], shown[~mask])
    np.testing.assert_array_equal(drawn[2, 2], segmentation.MASK_COLOUR)  # outline
    assert drawn[3, 3, 1] < 100 < drawn[3, 3, 0]  # inside: magenta blended in


def test_model_input_shape_must_be_square_rgb():
    model = keras.Sequential([keras.Input((4, 6, 3)), keras.layers.Flatten(), keras.layers.Dense(1)])
    with pytest.raises(data.UsageError, match=r"expected input shape \(None, patch, patch, 3\)"):
        data.patch_size_of(model)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def run(capsys, *argv):
    code = segmentation.main([str(a) for a in argv] + ["--quiet"])
    return code, capsys.readouterr()


def read_summary(save_dir):
    with open(save_dir / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_outputs_summary_and_iou(tmp_path, model_file, capsys):
    frames, masks, out = tmp_path / "frames", tmp_path / "masks", tmp_path / "out"
    frames.mkdir()
    masks.mkdir()
    write_png(frames / "half.png", half_frame(12, 16, aurora_cols=6))
    truth = np.zeros((12, 16), np.uint8)
    truth[:, :8] = 255  # 8 true aurora columns, 6 predicted: IoU 6/8
    Image.fromarray(truth).save(masks / "half.png")
    code, captured = run(capsys, "--dataset", frames, "--model", model_file, "--save_dir", out,
                         "--masks", masks, "--stride", 1, "--save_probability", "--no-refine")
    assert code == 0, captured.err
    assert "mean IoU 0.7500" in captured.out

    mask = np.asarray(Image.open(out / "mask" / "half.png"))
    assert mask.dtype == np.uint8 and mask.shape == (12, 16)
    expected = np.zeros((12, 16), np.uint8)
    expected[:, :6] = 255
    np.testing.assert_array_equal(mask, expected)

    probability = np.load(out / "probability" / "half.npy")
    assert probability.dtype == np.float32 and probability.shape == (12, 16)
    red = np.rint(np.array([0.9, 0.2]) * 255) / 255  # the PNG's 8-bit values
    p_expected = 1 / (1 + np.exp(GAIN * (0.5 - red)))
    np.testing.assert_allclose(probability[:, 0], p_expected[0], rtol=1e-4)
    np.testing.assert_allclose(probability[:, -1], p_expected[1], rtol=1e-4)

    colors = np.asarray(Image.open(out / "color_filter" / "half.png"))
    assert colors.shape == (12, 16, 3) and colors.dtype == np.uint8
    np.testing.assert_array_equal(colors, segmentation.color_filter(probability))
    overlaid = np.asarray(Image.open(out / "overlay" / "half.png"))
    assert overlaid.shape == (12, 16, 3) and overlaid.dtype == np.uint8
    np.testing.assert_array_equal(overlaid[:, 5], np.tile(segmentation.MASK_COLOUR, (12, 1)))  # mask outline
    assert (overlaid[:, 6:, 0] == overlaid[:, 6:, 1]).all()  # grey background untouched
    figure = Image.open(out / "figure" / "half.png")
    assert figure.mode in ("RGB", "RGBA") and figure.size[0] > figure.size[1] * 2

    rows = read_summary(out)
    assert list(rows[0]) == ["file", "frame", "name", "time", "rows", "cols", "aurora_fraction", "mean_p_aurora",
                             "seconds", "patches", "true_fraction", "iou", "precision", "recall", "false_aurora"]
    assert [row["file"] for row in rows] == ["half.png", "mean"]
    assert (rows[0]["frame"], rows[0]["name"], rows[0]["time"]) == ("", "half", "")
    assert (rows[0]["rows"], rows[0]["cols"], rows[0]["patches"]) == ("12", "16", str(12 * 16))
    assert float(rows[0]["aurora_fraction"]) == pytest.approx(6 / 16)
    assert float(rows[0]["mean_p_aurora"]) == pytest.approx(probability.mean(), rel=1e-5)
    assert float(rows[0]["true_fraction"]) == pytest.approx(0.5)
    assert float(rows[0]["iou"]) == pytest.approx(0.75)
    assert float(rows[0]["precision"]) == pytest.approx(1.0)
    assert float(rows[0]["recall"]) == pytest.approx(0.75)
    assert rows[0]["false_aurora"] == ""  # only for frames without true aurora


def test_cli_refine_snaps_a_loose_mask_and_no_refine_keeps_the_threshold(tmp_path, capsys):
    # A model that calls a 15-pixel patch aurora when its mean brightness is
    # above 0.1, i.e. when about a quarter of it covers the disc: its mask
    # runs a few pixels past the disc, as a PU patch classifier's does.
    patch = 15
    model_path = tmp_path / "loose.keras"
    patch_conv_model(patch, np.full((patch, patch, 3), -GAIN / (3 * patch**2), np.float32), 0.1 * GAIN).save(model_path)
    frame, disc = disc_frame()
    frames, masks = tmp_path / "frames", tmp_path / "masks"
    frames.mkdir()
    masks.mkdir()
    write_png(frames / "disc.png", frame)
    Image.fromarray(disc.astype(np.uint8) * 255).save(masks / "disc.png")
    scores = {}
    for flag in ("--refine", "--no-refine"):
        out = tmp_path / flag
        code, captured = run(capsys, "--dataset", frames, "--model", model_path, "--save_dir", out, "--masks", masks,
                             "--save_probability", flag)
        assert code == 0, captured.err
        scores[flag] = float(read_summary(out)[0]["iou"])
        mask = np.asarray(Image.open(out / "mask" / "disc.png")) > 0
        assert mask_metrics(mask, disc)["iou"] == pytest.approx(scores[flag])
        # The pixel P(aurora) written agrees with the mask, refined or not.
        np.testing.assert_array_equal(mask, np.load(out / "probability" / "disc.npy") > 0.5)
    assert scores["--no-refine"] < 0.85
    assert scores["--refine"] > 0.93


def test_cli_fisheye_frame_counts_only_the_sky(tmp_path, model_file, capsys):
    frame, inside = fisheye_frame(40, 16)
    write_png(tmp_path / "sky.png", frame)
    out = tmp_path / "out"
    code, captured = run(capsys, "--dataset", tmp_path / "sky.png", "--model", model_file, "--save_dir", out,
                         "--save_probability", "--stride", 1)
    assert code == 0, captured.err
    mask = np.asarray(Image.open(out / "mask" / "sky.png")) > 0
    probability = np.load(out / "probability" / "sky.npy")
    sky = sky_mask(frame)
    assert not mask[~sky].any() and (probability[~sky] == 0).all()
    row = read_summary(out)[0]
    assert "iou" not in row
    assert float(row["aurora_fraction"]) == pytest.approx(mask[sky].mean())
    assert 0.4 < float(row["aurora_fraction"]) < 0.6
    assert int(row["patches"]) == np.count_nonzero(sky)


@pytest.mark.parametrize("kind", ["grey", "16-bit", "rgba", "non-square", "tiny"])
def test_cli_odd_frames_are_segmented_at_their_own_size(tmp_path, model_file, capsys, kind):
    frames = tmp_path / "frames"
    frames.mkdir()
    shape = {"non-square": (9, 23), "tiny": (2, 3)}.get(kind, (10, 12))
    values = np.random.default_rng(8).random(shape)
    if kind == "16-bit":
        Image.fromarray((values * 65535).astype(np.uint16)).save(frames / "f.png")
    elif kind == "rgba":
        rgba = np.dstack([values] * 3 + [np.ones(shape)])
        Image.fromarray((rgba * 255).astype(np.uint8), "RGBA").save(frames / "f.png")
    elif kind == "grey":
        Image.fromarray((values * 255).astype(np.uint8), "L").save(frames / "f.png")
    else:
        write_png(frames / "f.png", np.dstack([values] * 3))
    out = tmp_path / "out"
    code, captured = run(capsys, "--dataset", frames, "--model", model_file, "--save_dir", out)
    assert code == 0, captured.err
    mask = np.asarray(Image.open(out / "mask" / "f.png"))
    assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}


def test_cli_refuses_to_overwrite_then_overwrites(tmp_path, model_file, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    write_png(frames / "a.png", half_frame())
    out = tmp_path / "out"
    args = ["--dataset", frames, "--model", model_file, "--save_dir", out]
    assert run(capsys, *args)[0] == 0
    before = (out / "mask" / "a.png").stat().st_mtime_ns
    code, captured = run(capsys, *args)
    assert code == 2
    assert captured.err.startswith("segmentation.py: error: ") and "already exists" in captured.err
    assert "--overwrite" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert (out / "mask" / "a.png").stat().st_mtime_ns == before
    assert run(capsys, *args, "--overwrite")[0] == 0


def test_cli_skips_a_corrupt_frame_and_exits_1(tmp_path, model_file, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    write_png(frames / "good.png", half_frame())
    (frames / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    code, captured = run(capsys, "--dataset", frames, "--model", model_file, "--save_dir", out)
    assert code == 1
    assert "broken.png" in captured.err
    assert (out / "mask" / "good.png").exists() and not (out / "mask" / "broken.png").exists()
    assert [row["file"] for row in read_summary(out)] == ["good.png", "mean"]


def save_model_with_input(path, shape):
    model = keras.Sequential([keras.Input(shape), keras.layers.Flatten(), keras.layers.Dense(1)])
    model.save(path)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing model", "model file not found"),
        ("not .keras", "expected a .keras file"),
        ("corrupt model", "cannot load model"),
        ("grey model", r"expected input shape \(None, patch, patch, 3\)"),
        ("missing dataset", "frames_missing"),
        ("empty dataset", "frames_empty"),
        ("save_dir under a file", "is not a folder"),
        ("mask missing", "no mask for frame"),
        ("mask size", "is 5x5"),
        ("corrupt mask", "masks/a.png"),
        ("bad stride", "--stride"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, model_file, capsys, case, message):
    frames = tmp_path / "frames"
    frames.mkdir()
    write_png(frames / "a.png", half_frame())
    out = tmp_path / "out"
    args = {"--dataset": frames, "--model": model_file, "--save_dir": out}
    extra = []
    if case == "missing model":
        args["--model"] = tmp_path / "nope.keras"
    elif case == "not .keras":
        args["--model"] = tmp_path / "model.h5"
        args["--model"].write_bytes(b"x")
    elif case == "corrupt model":
        args["--model"] = tmp_path / "corrupt.keras"
        args["--model"].write_bytes(b"not a zip")
    elif case == "grey model":
        args["--model"] = save_model_with_input(tmp_path / "grey.keras", (5, 5, 1))
    elif case == "missing dataset":
        args["--dataset"] = tmp_path / "frames_missing"
    elif case == "empty dataset":
        args["--dataset"] = tmp_path / "frames_empty"
        args["--dataset"].mkdir()
    elif case == "save_dir under a file":
        (tmp_path / "file.txt").write_text("x")
        args["--save_dir"] = out = tmp_path / "file.txt" / "out"
    elif case in ("mask missing", "mask size", "corrupt mask"):
        masks = tmp_path / "masks"
        masks.mkdir()
        name = "other.png" if case == "mask missing" else "a.png"
        Image.fromarray(np.zeros((5, 5), np.uint8)).save(masks / name)
        if case == "corrupt mask":
            (masks / name).write_bytes(b"not a png")
        extra = ["--masks", masks]
    elif case == "bad stride":
        extra = ["--stride", "0"]
    argv = [item for pair in args.items() for item in pair] + extra
    code, captured = run(capsys, *argv)
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("segmentation.py: error: ")
    assert re.search(message, lines[-1])
    assert "Traceback" not in captured.err
    assert not out.exists()


def test_cli_help_returns_0_and_shows_defaults(capsys):
    code = segmentation.main(["--help"])
    assert code == 0
    help_text = capsys.readouterr().out
    for flag in ("--dataset", "--model", "--save_dir", "--stride", "--batchsize", "--threshold", "--masks",
                 "--save_probability", "--overwrite", "--quiet", "--adaptive", "--fine_stride", "--refine"):
        assert flag in help_text
    assert re.search(r"\(default:\s+16\)", help_text) and "--no-adaptive" in help_text and "--no-refine" in help_text


def test_predict_logits_pads_short_batches_without_changing_a_logit():
    import train

    model = train.build_cnn(8)
    patches = np.random.default_rng(0).random((37, 8, 8, 3)).astype("float32")
    direct = keras.ops.convert_to_numpy(model(patches, training=False)).reshape(-1)
    # 37 = 32 + 5 with batches of 32: the last batch of 5 is padded to 8 and cut back.
    np.testing.assert_allclose(data.predict_logits(model, patches, batch_size=32), direct, atol=1e-5)
    np.testing.assert_allclose(data.predict_logits(model, patches[:1]), direct[:1], atol=1e-5)
