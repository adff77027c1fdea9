"""Tests for data.py: reading frames, patches, P/U batches, the synthetic generator and dataset."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------ read_image

def save(path, array, mode=None, **options):
    """Write ``array`` with Pillow and return the path."""
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    image.save(path, **options)
    return path


def test_read_png_8bit_grey_is_repeated_to_rgb(tmp_path):
    grey = np.array([[0, 51, 255], [1, 2, 3]], np.uint8)
    image = data.read_image(save(tmp_path / "grey.png", grey))
    assert image.dtype == np.float32 and image.shape == (2, 3, 3)
    np.testing.assert_array_equal(image, np.repeat(grey[..., None] / np.float32(255), 3, axis=2))


def test_read_png_rgb_exact(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(data.read_image(save(tmp_path / "rgb.png", rgb)), rgb / np.float32(255))


def test_read_png_rgba_drops_alpha(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (4, 6, 4), dtype=np.uint8)
    image = data.read_image(save(tmp_path / "rgba.png", rgba))
    np.testing.assert_array_equal(image, rgba[..., :3] / np.float32(255))


def test_read_png_grey_alpha_drops_alpha(tmp_path):
    grey_alpha = np.random.default_rng(2).integers(0, 256, (3, 3, 2), dtype=np.uint8)
    image = data.read_image(save(tmp_path / "la.png", grey_alpha, "LA"))
    np.testing.assert_array_equal(image, np.repeat(grey_alpha[..., :1] / np.float32(255), 3, axis=2))


def test_read_palette_png_gives_its_colours(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (0, 128, 255)
    Image.fromarray(rgb).quantize(4).save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    np.testing.assert_array_equal(data.read_image(tmp_path / "palette.png"), rgb / np.float32(255))


def test_read_png_16bit_grey_divides_by_65535(tmp_path):
    counts = np.array([[0, 1000, 65535], [300, 40000, 12]], np.uint16)
    image = data.read_image(save(tmp_path / "deep.png", counts))
    np.testing.assert_allclose(image[..., 1], counts / 65535.0, rtol=0, atol=1e-7)
    assert image.shape == (2, 3, 3) and image.dtype == np.float32


def test_read_pgm_16bit_like_themis(tmp_path):
    counts = np.array([[0, 1000], [40000, 65535]], np.uint16)
    image = data.read_image(save(tmp_path / "themis.pgm", counts))
    np.testing.assert_allclose(image, np.repeat(counts[..., None] / 65535.0, 3, axis=2), atol=1e-7)


def test_read_tiff_16bit_grey(tmp_path):
    counts = np.array([[0, 2**15, 65535]], np.uint16)
    image = data.read_image(save(tmp_path / "deep.tif", counts))
    np.testing.assert_allclose(image[0, :, 2], counts[0] / 65535.0, atol=1e-7)


def test_read_tiff_16bit_rgb(tmp_path):
    import tifffile

    counts = np.random.default_rng(3).integers(0, 65536, (4, 5, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tiff", counts, photometric="rgb")
    np.testing.assert_allclose(data.read_image(tmp_path / "rgb16.tiff"), counts / 65535.0, atol=1e-7)


def test_read_float_tiff_is_clipped(tmp_path):
    values = np.array([[-0.5, 0.25, 1.5]], np.float32)
    image = data.read_image(save(tmp_path / "float.tif", values, "F"))
    np.testing.assert_array_equal(image[0, :, 0], [0.0, 0.25, 1.0])


def test_read_jpeg_close_to_written_colour(tmp_path):
    rgb = np.full((16, 16, 3), (30, 160, 70), np.uint8)
    image = data.read_image(save(tmp_path / "frame.jpg", rgb, quality=95))
    np.testing.assert_allclose(image, rgb / 255.0, atol=3 / 255)


def test_read_bmp_and_pgm_exact(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    np.testing.assert_array_equal(data.read_image(save(tmp_path / "frame.bmp", rgb)), rgb / np.float32(255))
    image = data.read_image(save(tmp_path / "frame.pgm", grey))
    np.testing.assert_array_equal(image, np.repeat(grey[..., None] / np.float32(255), 3, axis=2))


def test_read_corrupt_file_names_it(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(data.DataError, match=r"broken\.png: cannot read image"):
        data.read_image(path)


def test_read_missing_file_names_it(tmp_path):
    with pytest.raises(data.DataError, match=r"absent\.jpg: no such file"):
        data.read_image(tmp_path / "absent.jpg")


def test_data_error_is_a_value_error():
    assert issubclass(data.DataError, ValueError)


# ------------------------------------------------------------ list_images

def test_list_images_sorted_skipping_hidden_and_other_files(tmp_path):
    pixel = np.zeros((2, 2), np.uint8)
    for name in ("b.png", "a.JPG", "c.tif", ".hidden.png", "notes.txt", "model.keras"):
        (tmp_path / name).write_bytes(b"")
    save(tmp_path / "d.pgm", pixel)
    (tmp_path / "sub.png").mkdir()
    assert [path.name for path in data.list_images(tmp_path)] == ["a.JPG", "b.png", "c.tif", "d.pgm"]


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(data.DataError, match=r"nowhere: no such folder"):
        data.list_images(tmp_path / "nowhere")


def test_list_images_not_a_folder(tmp_path):
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"file\.png: not a folder"):
        data.list_images(tmp_path / "file.png")


@pytest.mark.parametrize("names", [[], ["readme.txt", ".secret.png"]])
def test_list_images_without_images(tmp_path, names):
    for name in names:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(data.DataError, match=rf"{tmp_path.name}: no image files"):
        data.list_images(tmp_path)


# ------------------------------------------------------------ extract_patches

def numbered_image(rows, cols):
    """(rows, cols, 3) float array whose channel 0 holds row * cols + col, so positions can be read back."""
    index = np.arange(rows * cols, dtype=np.float64).reshape(rows, cols)
    return np.stack([index, index + 0.25, index + 0.5], axis=2)


def test_grid_patches_positions_row_major():
    image = numbered_image(7, 9)
    patches = data.extract_patches(image, 3, stride=2)
    # Windows per axis: (7 - 3) // 2 + 1 = 3 rows, (9 - 3) // 2 + 1 = 4 columns.
    assert patches.shape == (12, 3, 3, 3) and patches.dtype == np.float32
    expected = [row * 9 + col for row in (0, 2, 4) for col in (0, 2, 4, 6)]
    np.testing.assert_array_equal(patches[:, 0, 0, 0], expected)
    np.testing.assert_array_equal(patches[5], image[2:5, 2:5])


def test_grid_stride_one_gives_every_window():
    patches = data.extract_patches(numbered_image(5, 6), 2, stride=1)
    assert patches.shape == (4 * 5, 2, 2, 3)


def test_random_patches_are_true_windows_inside_the_image():
    image = numbered_image(10, 12)
    patches = data.extract_patches(image, 4, n=300, rng=np.random.default_rng(0))
    assert patches.shape == (300, 4, 4, 3)
    rows, cols = np.divmod(patches[:, 0, 0, 0].astype(int), 12)
    assert rows.max() <= 6 and cols.max() <= 8
    for patch, row, col in zip(patches[:20], rows, cols):
        np.testing.assert_array_equal(patch, image[row:row + 4, col:col + 4])
    # Uniform over the 7 x 9 positions: every one of them is drawn.
    assert len(set(zip(rows, cols))) == 63


def test_random_patches_reproducible_with_seeded_rng():
    image = numbered_image(20, 20)
    first = data.extract_patches(image, 5, n=10, rng=np.random.default_rng(7))
    again = data.extract_patches(image, 5, n=10, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("mode", [dict(n=5), dict(stride=3)])
def test_image_exactly_patch_sized_gives_one_patch(mode):
    image = numbered_image(4, 4)
    patches = data.extract_patches(image, 4, rng=np.random.default_rng(0), **mode)
    assert patches.shape == (1, 4, 4, 3)
    np.testing.assert_array_equal(patches[0], image)


def test_image_smaller_than_patch_names_file_and_both_sizes():
    with pytest.raises(data.DataError, match=r"tiny\.png: image is 3x40 pixels, smaller than the 4x4 patch"):
        data.extract_patches(np.zeros((3, 40, 3)), 4, n=1, name="tiny.png")


@pytest.mark.parametrize("mode", [dict(), dict(n=2, stride=2)])
def test_patches_need_exactly_one_of_n_and_stride(mode):
    with pytest.raises(ValueError, match="exactly one of n and stride"):
        data.extract_patches(np.zeros((8, 8, 3)), 4, **mode)


@pytest.mark.parametrize("argument", ["patch_size", "n", "stride"])
def test_patch_sizes_must_be_positive(argument):
    values = dict(patch_size=4, n=None, stride=2) if argument != "n" else dict(patch_size=4, n=2)
    values[argument] = 0
    with pytest.raises(ValueError, match=f"Invalid {argument}: expected an integer >= 1"):
        data.extract_patches(np.zeros((8, 8, 3)), **values)


def test_patches_need_a_three_axis_image():
    with pytest.raises(ValueError, match=r"expected shape \(rows, cols, channels\), received \(8, 8\)"):
        data.extract_patches(np.zeros((8, 8)), 4, stride=4)


# ------------------------------------------------------------ get_data

def test_get_data_mixed_sizes(tmp_path):
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (40, 50, 3)), ("b.png", (8, 8, 3)), ("c.png", (64, 20, 3))):
        save(tmp_path / name, rng.integers(0, 256, shape, dtype=np.uint8))
    patches = data.get_data(tmp_path, 8, 5, np.random.default_rng(1), quiet=True)
    # The 8x8 image gives its single patch.
    assert patches.shape == (5 + 1 + 5, 8, 8, 3) and patches.dtype == np.float32
    np.testing.assert_array_equal(patches[5], data.read_image(tmp_path / "b.png"))


def test_get_data_skips_corrupt_and_too_small_with_warnings(tmp_path):
    save(tmp_path / "good.png", np.full((16, 16), 200, np.uint8))
    save(tmp_path / "small.png", np.zeros((4, 30), np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.warns(UserWarning) as caught:
        patches = data.get_data(tmp_path, 8, 3, np.random.default_rng(0), quiet=True)
    messages = " | ".join(str(warning.message) for warning in caught)
    assert "broken.jpg: cannot read image" in messages
    assert "small.png: image is 4x30 pixels, smaller than the 8x8 patch" in messages
    assert patches.shape == (3, 8, 8, 3)
    np.testing.assert_allclose(patches, 200 / 255, atol=1e-7)


def test_get_data_without_usable_image(tmp_path):
    save(tmp_path / "small.png", np.zeros((4, 4), np.uint8))
    with pytest.warns(UserWarning, match="small.png"):
        with pytest.raises(data.DataError, match=rf"{tmp_path.name}: none of its 1 image files could be used"):
            data.get_data(tmp_path, 8, 3, np.random.default_rng(0), quiet=True)


def test_get_data_missing_folder(tmp_path):
    with pytest.raises(data.DataError, match="missing: no such folder"):
        data.get_data(tmp_path / "missing", 8, 3, np.random.default_rng(0), quiet=True)


# ------------------------------------------------------------ data_shuffle

def test_data_shuffle_reproducible_and_keeps_pairs():
    X = np.arange(20).reshape(10, 2)
    Y = np.where(np.arange(10) % 3 == 0, 1, -1)  # +1 P, -1 U
    first, labels = data.data_shuffle(X, Y, seed=3)
    again, _ = data.data_shuffle(X, Y, seed=3)
    other, _ = data.data_shuffle(X, Y, seed=4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(Y[first[:, 0] // 2], labels)  # each sample keeps its label
    assert sorted(labels) == sorted(Y)


def test_data_shuffle_length_mismatch():
    with pytest.raises(ValueError, match="received 3 samples and 2 labels"):
        data.data_shuffle(np.zeros(3), np.zeros(2), seed=0)


# ------------------------------------------------------------ P/U batches

def tagged_patches(n, start, size=4):
    """(n, size, size, 3) float32 patches filled with their own id, start .. start + n - 1."""
    ids = np.arange(start, start + n, dtype=np.float32)
    return np.broadcast_to(ids[:, None, None, None], (n, size, size, 3)).copy()


def test_pu_batches_labels_composition_and_one_pass_over_u():
    P, U = tagged_patches(7, 0), tagged_patches(50, 1000)
    batches = data.make_pu_dataset(P, U, batch_size=8, p_fraction=0.25, seed=1, augment=False)
    # n_p = round(8 * 0.25) = 2, n_u = 6, ceil(50 / 6) = 9 batches.
    assert len(batches) == 9
    seen_u = []
    for index in range(len(batches)):
        x, y = batches[index]
        assert x.shape == (8, 4, 4, 3) and x.dtype == np.float32 and y.dtype == np.float32
        np.testing.assert_array_equal(y, [1, 1, -1, -1, -1, -1, -1, -1])
        ids = x[:, 0, 0, 0]
        assert np.all(ids[:2] < 1000) and np.all(ids[2:] >= 1000)
        seen_u.extend(ids[2:])
    assert set(seen_u) == set(range(1000, 1050))


def test_pu_positives_cycle_evenly():
    P, U = tagged_patches(5, 0), tagged_patches(40, 1000)
    batches = data.make_pu_dataset(P, U, 4, seed=0, augment=False, steps_per_epoch=10)
    assert len(batches) == 10
    drawn = np.concatenate([batches[i][0][:2, 0, 0, 0] for i in range(10)])
    # 20 draws from 5 positives, each permutation used whole: 4 each.
    np.testing.assert_array_equal(np.bincount(drawn.astype(int)), [4] * 5)


@pytest.mark.parametrize("p_fraction, n_p", [(0.01, 1), (0.5, 2), (0.99, 3)])
def test_pu_every_batch_has_both_classes(p_fraction, n_p):
    batches = data.make_pu_dataset(tagged_patches(3, 0), tagged_patches(9, 100), 4, p_fraction=p_fraction)
    for index in range(len(batches)):
        _, y = batches[index]
        assert (y == 1).sum() == n_p and (y == -1).sum() == 4 - n_p


def test_pu_batches_deterministic_for_a_seed_and_new_each_epoch():
    rng = np.random.default_rng(0)
    P, U = rng.random((10, 4, 4, 3), dtype=np.float32), rng.random((30, 4, 4, 3), dtype=np.float32)
    first = data.make_pu_dataset(P, U, 6, seed=5)
    again = data.make_pu_dataset(P, U, 6, seed=5)
    other = data.make_pu_dataset(P, U, 6, seed=6)
    np.testing.assert_array_equal(first[2][0], again[2][0])
    assert not np.array_equal(first[2][0], other[2][0])
    epoch_one = first[0][0]
    first.on_epoch_end()
    assert not np.array_equal(first[0][0], epoch_one)


def test_augmentation_gives_the_eight_orientations():
    patch = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)
    augmented = data.augment_patches(np.repeat(patch, 400, axis=0), np.random.default_rng(0))
    orientations = {np.rot90(view, k).tobytes() for view in (patch[0], patch[0][:, ::-1]) for k in range(4)}
    assert {sample.tobytes() for sample in augmented} == orientations


def test_background_jitter_moves_each_patch_s_excess_by_its_own_amount_within_the_sky():
    rng = np.random.default_rng(0)
    excess = rng.normal(0.0, 1.0, (300, 8, 8, 3)).astype(np.float32)
    patches = np.arcsinh(excess / data.NORMALIZE_SOFTENING)
    patches[:, :2] = 0.0  # rows outside the sky
    plain = data.augment_patches(patches, np.random.default_rng(1))
    moved = data.augment_patches(patches, np.random.default_rng(1), offset=2.0)
    sky = (plain != 0).any(axis=-1)
    np.testing.assert_array_equal(moved[~sky], 0.0)
    shift = data.NORMALIZE_SOFTENING * (np.sinh(moved) - np.sinh(plain))  # in noise levels, same orientations
    per_patch = [shift[k][sky[k]] for k in range(len(shift))]
    assert all(np.ptp(values, axis=0).max() < 1e-4 for values in per_patch)  # one amount per patch and channel
    amounts = np.array([values[0] for values in per_patch])
    assert np.abs(amounts).max() <= 2.0 + 1e-4 and np.abs(amounts).max() > 1.8 and abs(amounts.mean()) < 0.2
    assert np.corrcoef(amounts[:, 0], amounts[:, 1])[0, 1] < 0.3  # each channel its own


def test_pu_batch_size_too_small():
    with pytest.raises(ValueError, match="Invalid batchsize: every batch needs at least 2 patches"):
        data.make_pu_dataset(tagged_patches(2, 0), tagged_patches(2, 10), 1)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_pu_fraction_out_of_range(fraction):
    with pytest.raises(ValueError, match="Invalid p_fraction: expected 0 < p_fraction < 1"):
        data.make_pu_dataset(tagged_patches(2, 0), tagged_patches(2, 10), 4, p_fraction=fraction)


def test_pu_empty_unlabeled_set():
    with pytest.raises(ValueError, match=r"Invalid U: expected patches of shape"):
        data.make_pu_dataset(tagged_patches(2, 0), np.zeros((0, 4, 4, 3)), 4)


def test_pnu_batches_hold_all_three_labels():
    batches = data.make_pnu_dataset(tagged_patches(4, 0), tagged_patches(4, 100), tagged_patches(20, 1000), 7,
                                    augment=False)
    # n_p = n_n = round(7 / 3) = 2, n_u = 3; ceil(20 / 3) = 7 batches.
    assert len(batches) == 7
    for index in range(len(batches)):
        x, y = batches[index]
        np.testing.assert_array_equal(y, [1, 1, -1, -1, 0, 0, 0])
        ids = x[:, 0, 0, 0]
        assert np.all(ids[:2] < 100) and np.all((ids[2:4] >= 100) & (ids[2:4] < 1000)) and np.all(ids[4:] >= 1000)


def test_steps_per_epoch_sets_the_epoch_and_must_be_positive():
    batches = data.make_pu_dataset(tagged_patches(2, 0), tagged_patches(9, 10), 4, steps_per_epoch=11)
    assert len(batches) == 11 and batches[10][0].shape == (4, 4, 4, 3)
    with pytest.raises(IndexError, match="batch index 11 out of range for 11 batches"):
        batches[11]
    with pytest.raises(ValueError, match="Invalid steps_per_epoch: expected an integer >= 1, received 0"):
        data.make_pu_dataset(tagged_patches(2, 0), tagged_patches(9, 10), 4, steps_per_epoch=0)


def test_pnu_fraction_out_of_range():
    with pytest.raises(ValueError, match="Invalid n_fraction: expected 0 < n_fraction < 1, received 1.5"):
        data.make_pnu_dataset(tagged_patches(2, 0), tagged_patches(2, 0), tagged_patches(2, 0), 6, n_fraction=1.5)


def test_pnu_batch_size_too_small():
    with pytest.raises(ValueError, match="Invalid batchsize: every batch needs at least 3 patches"):
        data.make_pnu_dataset(tagged_patches(2, 0), tagged_patches(2, 0), tagged_patches(2, 0), 2)


def test_pu_batches_feed_keras_fit_epoch_after_epoch():
    import keras

    P, U = tagged_patches(6, 0, size=8) / 10, tagged_patches(20, 1, size=8) / 30
    batches = data.make_pu_dataset(P, U, 4)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(iter(batches), steps_per_epoch=len(batches), epochs=2, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 2
    assert batches.epoch >= 1  # the iterator moved on to a new epoch's order


def test_labels_outside_the_convention_are_refused():
    with pytest.raises(ValueError, match=r"Invalid labels: expected \+1 positive, -1 unlabeled, received 0"):
        data.data_shuffle(np.zeros((3, 2)), np.array([1, 0, 1]), seed=0)
    data.data_shuffle(np.zeros((3, 2)), np.array([1, 0, -1]), seed=0, allowed=data.PNU_LABELS)
    with pytest.raises(ValueError, match=r"received 2"):
        data.check_labels([1, 2, -1])


# ------------------------------------------------------------ synthetic frames

def test_frame_deterministic_for_a_seed():
    image, mask = data.synthetic_frame(96, seed=4)
    again, mask_again = data.synthetic_frame(96, seed=4)
    other, _ = data.synthetic_frame(96, seed=5)
    assert image.dtype == np.uint8 and image.shape == (96, 96, 3)
    assert mask.dtype == np.bool_ and mask.shape == (96, 96)
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(mask, mask_again)
    assert not np.array_equal(image, other)


def test_frame_mask_covers_the_bright_structures():
    image, mask = data.synthetic_frame(256, seed=0)
    sky, _ = data.synthetic_frame(256, seed=0, aurora=False)
    inside = circle(256, 256)
    green = image[..., 1].astype(float)
    assert 0.05 < mask[inside].mean() < 0.5
    assert green[mask].mean() > 2.5 * green[inside & ~mask].mean()
    # The same sky without aurora: in the mask the aurora adds clearly
    # visible light, outside it almost none.
    added = image.astype(float).max(axis=2) - sky.astype(float).max(axis=2)
    assert np.median(added[mask]) > 40
    assert abs(np.mean(added[inside & ~mask])) < 2


def test_most_frames_have_moderate_aurora_cover():
    covers = [data.synthetic_frame(128, seed=seed)[1][circle(128, 128)].mean() for seed in range(10)]
    assert sum(0.03 <= cover <= 0.55 for cover in covers) >= 8


def circle(rows, cols, margin=0):
    """The sky circle the generator draws (diameter min(rows, cols) - 2, centred), grown by ``margin`` pixels."""
    radius = min(rows, cols) / 2 - 1 + margin
    row, col = np.ogrid[:rows, :cols]
    return np.hypot(row - (rows - 1) / 2, col - (cols - 1) / 2) <= radius


def test_frame_black_outside_the_circle_non_square():
    image, mask = data.synthetic_frame(seed=2, rows=80, cols=140)
    assert image.shape == (80, 140, 3) and mask.shape == (80, 140)
    outside = ~circle(80, 140)
    # Beyond the one-pixel rim ramp the sensor reads 0 to 3.
    assert image[~circle(80, 140, margin=1)].max() <= 3
    assert image[:, :20].max() <= 3 and not mask[outside].any()
    assert image[circle(80, 140)].mean() > 8


def test_frame_without_aurora_has_empty_mask():
    image, mask = data.synthetic_frame(64, seed=1, aurora=False)
    assert not mask.any() and image.max() > 0


def test_frame_brightness_scales_the_mask():
    masks = [data.synthetic_frame(96, seed=3, brightness=value)[1] for value in (0.0, 0.5, 1.0, 2.0)]
    assert not masks[0].any()
    assert masks[1].sum() <= masks[2].sum() <= masks[3].sum() and masks[2].any()
    assert not (masks[1] & ~masks[2]).any()


@pytest.mark.parametrize("arguments, message", [
    (dict(size=8), "Invalid rows: expected an integer >= 16, received 8"),
    (dict(cols=10), "Invalid cols: expected an integer >= 16, received 10"),
    (dict(seed=-1), "Invalid seed: expected an integer >= 0"),
    (dict(brightness=-0.1), "Invalid brightness: expected brightness >= 0"),
    (dict(arc_width=0), "Invalid arc_width: expected arc_width > 0"),
    (dict(cloud_cover=1.5), "Invalid cloud_cover: expected 0 <= cloud_cover <= 1"),
])
def test_frame_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        data.synthetic_frame(**arguments)


# ------------------------------------------------------------ write_dataset / main

TINY = ["--n_positive", "4", "--n_unlabelled", "3", "--size", "48", "--seed", "1"]


def file_bytes(root):
    return {path.relative_to(root): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_main_writes_a_consistent_dataset(tmp_path, capsys):
    assert data.main(["--out", str(tmp_path / "set"), *TINY]) == 0
    root = tmp_path / "set"
    positives = data.list_images(root / "Positive")
    frames = data.list_images(root / "Unlabelled")
    masks = data.list_images(root / "masks")
    assert [path.name for path in positives] == ["sky_000.png", "sky_001.png", "sky_002.png", "sky_003.png"]
    assert [path.stem for path in frames] == [path.stem for path in masks] == ["frame_000", "frame_001", "frame_002"]
    # Positives are whole frames, so border and horizon are as common in P as in U.
    assert all(data.read_image(path).shape == (48, 48, 3) for path in positives)
    for frame, mask_path in zip(frames, masks):
        mask = np.asarray(Image.open(mask_path))
        assert mask.dtype == np.uint8 and mask.shape == (48, 48) and set(np.unique(mask)) <= {0, 255}
        assert data.read_image(frame).shape == (48, 48, 3)
    assert "background fraction" in capsys.readouterr().out
    assert (root / "frames.csv").read_text().startswith("file,seed,aurora,")


def test_main_is_deterministic_and_refuses_to_overwrite(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert data.main(["--out", str(first), *TINY]) == 0
    assert data.main(["--out", str(second), *TINY]) == 0
    assert file_bytes(first) == file_bytes(second)
    capsys.readouterr()
    assert data.main(["--out", str(first), *TINY]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "first: already holds a generated dataset; pass --overwrite" in error
    assert data.main(["--out", str(first), "--overwrite", "--n_positive", "1", "--n_unlabelled", "1",
                      "--size", "32"]) == 0
    assert len(list((first / "Unlabelled").iterdir())) == 1


@pytest.mark.slow
def test_the_shipped_dataset_regenerates_byte_for_byte(tmp_path):
    # dataset/README.md promises it: `python data.py --out dataset --overwrite`.
    assert data.main(["--out", str(tmp_path / "set")]) == 0
    shipped = {path: content for path, content in file_bytes(ROOT / "dataset").items() if path.name != "README.md"}
    assert file_bytes(tmp_path / "set") == shipped


def test_write_dataset_prior(tmp_path):
    summary = data.write_dataset(tmp_path, n_positive=1, n_unlabelled=4, size=64, seed=0, aurora_fraction=0.0)
    assert summary["prior_sky"] == 1.0 and summary["prior_frame"] == 1.0


def test_main_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        data.main(["--size", "8"])
    assert exit_info.value.code == 2
    assert "--size: expected a frame side >= 16 pixels, received 8" in capsys.readouterr().err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        data.main(["--help"])
    assert "(default: dataset)" in capsys.readouterr().out


def test_import_has_no_side_effects(tmp_path):
    code = "import sys, data; print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT)}, check=True)
    assert result.stdout.strip() == "[]" and list(tmp_path.iterdir()) == []
