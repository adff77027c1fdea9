"""Science frames in: PGM stacks, FITS, CDF, frame names and UT times (data.read_frames and friends)."""

import datetime
import gzip

import numpy as np
import pytest
from PIL import Image

import data

UTC = datetime.timezone.utc


def pgm_frame(pixels, time=None):
    """One binary 16-bit PGM frame as THEMIS writes it: comments, then big-endian counts."""
    header = b"P5\n"
    if time:
        header += f'#"Image request start" {time} UTC\n'.encode()
    header += f"{pixels.shape[1]} {pixels.shape[0]}\n65535\n".encode()
    return header + pixels.astype(">u2").tobytes()


def two_frame_stack():
    first = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    second = 65535 - first
    return first, second, pgm_frame(first, "2014-03-10 06:00:00.063119") + pgm_frame(second, "2014-03-10 06:00:03.5")


@pytest.mark.parametrize("suffix", [".pgm", ".pgm.gz"])
def test_pgm_stack_gives_every_frame_with_counts_names_and_times(tmp_path, suffix):
    first, second, content = two_frame_stack()
    path = tmp_path / f"20140310_0600_gill_themis19_full{suffix}"
    path.write_bytes(gzip.compress(content) if suffix.endswith(".gz") else content)
    frames = list(data.read_frames(path))
    assert [frame.name for frame in frames] == ["20140310_0600_gill_themis19_full_0",
                                                "20140310_0600_gill_themis19_full_1"]
    assert [frame.index for frame in frames] == [0, 1]
    np.testing.assert_array_equal(frames[0].pixels[..., 1], first)
    np.testing.assert_array_equal(frames[1].pixels[..., 0], second)
    assert frames[0].full_scale == 65535
    assert frames[0].time == datetime.datetime(2014, 3, 10, 6, 0, 0, 63119, tzinfo=UTC)
    assert frames[1].time == datetime.datetime(2014, 3, 10, 6, 0, 3, 500000, tzinfo=UTC)


def test_read_image_refuses_a_stack_and_names_it(tmp_path):
    path = tmp_path / "stack.pgm"
    path.write_bytes(two_frame_stack()[2])
    with pytest.raises(data.DataError, match=r"stack\.pgm: holds 2 frames; read it with data\.read_frames"):
        data.read_image(path)


def test_truncated_stack_yields_the_whole_frames_then_names_the_file(tmp_path):
    content = two_frame_stack()[2]
    path = tmp_path / "cut.pgm.gz"
    path.write_bytes(gzip.compress(content[:-5]))
    frames = data.read_frames(path)
    assert next(frames).pixels is not None
    with pytest.raises(data.DataError, match=r"cut\.pgm\.gz: truncated after 1 frames"):
        next(frames)


def test_stack_frame_of_another_size_is_skipped_with_a_reason(tmp_path):
    first = np.zeros((3, 4), np.uint16)
    path = tmp_path / "mixed.pgm"
    path.write_bytes(pgm_frame(first) + pgm_frame(np.zeros((2, 2), np.uint16)) + pgm_frame(first + 7))
    frames = list(data.read_frames(path))
    assert [frame.name for frame in frames] == ["mixed_0", "mixed_1", "mixed_2"]
    assert frames[1].pixels is None and "frame 1 is 2x2 but the first frame is 3x4" in frames[1].error
    assert frames[2].pixels[0, 0, 0] == 7


def test_fits_with_bzero_and_bscale_gives_physical_counts_and_header_time(tmp_path):
    from astropy.io import fits

    counts = np.array([[0, 1000], [30000, 65535]], np.float64)
    hdu = fits.PrimaryHDU(((counts - 32768) / 1.0).astype(np.int16))
    hdu.header["BZERO"] = 32768
    hdu.header["BSCALE"] = 1.0
    hdu.header["OBSDATE"] = "2015-10-07"
    hdu.header["OBSSTART"] = "08:23:51.743"
    path = tmp_path / "PKR_DASC_0558_20151007_082351.743.FITS"
    hdu.writeto(path)
    (frame,) = data.read_frames(path)
    assert frame.name == "PKR_DASC_0558_20151007_082351.743" and frame.index is None
    np.testing.assert_array_equal(frame.pixels[..., 2], counts)
    assert frame.time == datetime.datetime(2015, 10, 7, 8, 23, 51, 743000, tzinfo=UTC)

    scaled = fits.PrimaryHDU(np.array([[1, 2]], np.int16))
    scaled.header["BSCALE"] = 2.5
    scaled.header["BZERO"] = 10.0
    scaled.writeto(tmp_path / "scaled.fits")
    (frame,) = data.read_frames(tmp_path / "scaled.fits")
    np.testing.assert_allclose(frame.pixels[0, :, 0], [12.5, 15.0])


def test_fits_cube_is_one_frame_per_plane(tmp_path):
    from astropy.io import fits

    fits.PrimaryHDU(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)).writeto(tmp_path / "cube.fits")
    frames = list(data.read_frames(tmp_path / "cube.fits"))
    assert [frame.name for frame in frames] == ["cube_0", "cube_1"]
    assert frames[1].pixels[0, 0, 0] == 12


def test_truncated_fits_names_the_file(tmp_path):
    from astropy.io import fits

    fits.PrimaryHDU(np.zeros((64, 64), np.int16)).writeto(tmp_path / "whole.fits")
    (tmp_path / "cut.fits").write_bytes((tmp_path / "whole.fits").read_bytes()[:3000])
    with pytest.raises(data.DataError, match=r"cut\.fits: "):
        list(data.read_frames(tmp_path / "cut.fits"))


def write_cdf(path, images, epochs, variable="thg_asf_test"):
    import cdflib.cdfwrite

    cdf = cdflib.cdfwrite.CDF(str(path), cdf_spec={"Majority": "Row_major"})
    try:
        if images is not None:
            cdf.write_var({"Variable": variable, "Data_Type": cdflib.cdfwrite.CDF.CDF_UINT2, "Num_Elements": 1,
                           "Rec_Vary": True, "Dim_Sizes": list(images.shape[1:])}, var_data=images)
        cdf.write_var({"Variable": f"{variable}_epoch", "Data_Type": cdflib.cdfwrite.CDF.CDF_EPOCH,
                       "Num_Elements": 1, "Rec_Vary": True, "Dim_Sizes": []},
                      var_data=np.array(cdflib.cdfepoch.compute_epoch(epochs)))
    finally:
        cdf.close()


def test_cdf_image_variable_gives_a_frame_per_record_with_epoch_times(tmp_path):
    images = (np.arange(2 * 16 * 16, dtype=np.uint16).reshape(2, 16, 16) * 7)
    path = tmp_path / "thg_l1_asf_test_2011010617_v01.cdf"
    write_cdf(path, images, [[2011, 1, 6, 17, 0, 0, 53], [2011, 1, 6, 17, 0, 3, 38]])
    frames = list(data.read_frames(path))
    assert [frame.name for frame in frames] == ["thg_l1_asf_test_2011010617_v01_0", "thg_l1_asf_test_2011010617_v01_1"]
    np.testing.assert_array_equal(frames[1].pixels[..., 0], images[1])
    assert frames[1].time == datetime.datetime(2011, 1, 6, 17, 0, 3, 38000, tzinfo=UTC)


def test_cdf_without_image_variables_is_refused_by_name(tmp_path):
    path = tmp_path / "empty.cdf"
    write_cdf(path, None, [[2011, 1, 6, 17, 0, 0, 0]])
    with pytest.raises(data.DataError, match=r"empty\.cdf: CDF file without image variables"):
        list(data.read_frames(path))


@pytest.mark.parametrize("name, expected", [
    ("20140221192040.jpg", (2014, 2, 21, 19, 20, 40, 0)),
    ("PKR_DASC_0558_20151007_082351.743.FITS", (2015, 10, 7, 8, 23, 51, 743000)),
    ("20140310_0600_gill_themis19_full.pgm.gz", (2014, 3, 10, 6, 0, 0, 0)),
    ("LYR-Sony-111220_200933.jpg", (2020, 12, 11, 20, 9, 33, 0)),
    ("N20040116G050623.jpg", (2004, 1, 16, 5, 6, 23, 0)),
    ("W8446B185_2017-12-18_03-14-57.img", (2017, 12, 18, 3, 14, 57, 0)),
    ("20090209_060001_gill_nascam-iccd02_5577_001000ms.png", (2009, 2, 9, 6, 0, 1, 0)),
])
def test_time_from_each_file_name_form(name, expected):
    assert data.time_from_name(name) == datetime.datetime(*expected, tzinfo=UTC)


@pytest.mark.parametrize("name", ["frame_000.png", "20141310_0600.png", "sky_2.png", "00001.png"])
def test_unparsable_or_impossible_times_are_none(name):
    assert data.time_from_name(name) is None


def test_exif_time_comes_before_the_file_name(tmp_path):
    image = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    exif = Image.Exif()
    exif[306] = "2020:12:11 20:09:13"
    image.save(tmp_path / "LYR-Sony-111220_200933.jpg", exif=exif)
    (frame,) = data.read_frames(tmp_path / "LYR-Sony-111220_200933.jpg")
    assert data.frame_time(frame) == datetime.datetime(2020, 12, 11, 20, 9, 13, tzinfo=UTC)
    image.save(tmp_path / "20140221192040.png")
    (frame,) = data.read_frames(tmp_path / "20140221192040.png")
    assert frame.time is None and data.frame_time(frame) == datetime.datetime(2014, 2, 21, 19, 20, 40, tzinfo=UTC)


def test_frame_suffix_and_stem_take_both_parts_of_pgm_gz():
    assert data.frame_suffix("a/b.PGM.gz") == ".pgm.gz" and data.frame_stem("a/b.PGM.gz") == "b"
    assert data.frame_stem("x/PKR_DASC_0558_20151007_082351.743.FITS") == "PKR_DASC_0558_20151007_082351.743"
    assert data.frame_suffix("notes.txt") is None and data.frame_suffix(".png") is None


def test_list_images_recursive_sorts_by_relative_path(tmp_path):
    for relative in ("night2/a.png", "night1/b.fits", "night1/a.pgm.gz", "top.cdf", "night1/.hidden/c.png",
                     "night3/deeper/d.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    names = [str(path.relative_to(tmp_path)) for path in data.list_images(tmp_path, recursive=True)]
    assert names == ["night1/a.pgm.gz", "night1/b.fits", "night2/a.png", "night3/deeper/d.png", "top.cdf"]
    assert [path.name for path in data.list_images(tmp_path)] == ["top.cdf"]
    with pytest.raises(data.DataError, match=r"no image files \(sub-folders are searched with --recursive\)"):
        data.list_images(tmp_path / "night3")
