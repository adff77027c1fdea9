"""Images in, patch arrays out: reading frames, sampling patches, P/U batches, synthetic all-sky frames.

Researchers bring two folders: a few crops or whole frames of clear background
sky (positive, P) and many ordinary frames that mix sky and aurora
(unlabeled, U). This module turns them into what training and segmentation
need:

* ``read_image`` reads any frame (JPEG, PNG, TIFF, BMP, PGM; 8- or 16-bit;
  grey, RGB or RGBA) as float32 RGB in [0, 1];
* ``list_images``, ``extract_patches`` and ``get_data`` turn a folder into a
  patch array without ever holding the whole folder as float32;
* ``make_pu_dataset`` (and ``make_pnu_dataset``) feed ``model.fit`` with
  batches that always hold both classes, because the nnPU correction is
  meaningless in a batch without positives;
* ``synthetic_frame`` and ``write_dataset`` draw all-sky frames with their true
  aurora masks; ``python data.py --out dataset`` regenerates the shipped
  dataset exactly.

Labels follow one convention everywhere: +1 positive (background sky), -1
unlabeled; for PNU learning +1 positive, -1 negative (aurora), 0 unlabeled.
Images are float32 RGB in [0, 1] with shape (rows, cols, 3); patches are
(n, patch_size, patch_size, 3).
"""

import argparse
import datetime
import itertools
import json
import math
import os
import re
import sys
import warnings
import weakref
from pathlib import Path
from typing import NamedTuple

import numpy as np

# The aurora mask threshold of the synthetic frames, in the [0, 1] units of an
# 8-bit pixel: a pixel is aurora where the aurora adds more than 16/255 to its
# brightest channel, about the level of the whole dark sky behind it, so that
# every masked pixel is visibly brighter than clear sky.
MASK_THRESHOLD = 16 / 255


class UsageError(ValueError):
    """A problem with the user's input (flags, files, folders); the CLIs print it in one line and exit with 2."""


class DataError(UsageError):
    """A problem with the user's data; the message is one line naming the file or folder."""


# ------------------------------------------------------------ reading

class _NarrowedByPillow(Exception):
    """Pillow would read this 16-bit colour image at 8-bit precision."""


def _pillow_array(path):
    """Pixels of ``path`` as Pillow decodes them, converting modes numpy cannot hold sensibly."""
    from PIL import Image

    with Image.open(path) as image:
        rawmodes = [str(tile.args[0]) for tile in image.tile if tile.args and isinstance(tile.args, tuple)]
        if image.mode in ("RGB", "RGBA") and any(";16" in rawmode for rawmode in rawmodes):
            # Pillow has no 16-bit colour mode and keeps only the high byte.
            raise _NarrowedByPillow(f"16-bit colour in {path}")
        image.load()
        if image.mode in ("1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBa", "La", "RGBX"):
            # Palette, bilevel and non-RGB colour spaces have no direct RGB
            # meaning as numbers; Pillow's own conversion is the reference.
            image = image.convert("RGBA" if "A" in image.mode or "a" in image.mode else "RGB")
        return np.asarray(image)


def _skimage_array(path):
    """Pixels of ``path`` through scikit-image (imageio/tifffile), for what Pillow cannot read."""
    import skimage.io

    return np.asarray(skimage.io.imread(str(path)))


def _picture_pixels(path):
    """The pixel array of a single-picture file (JPEG, PNG, TIFF, ...), any dtype."""
    try:
        return _pillow_array(path)
    except (_NarrowedByPillow, OSError, ValueError, SyntaxError, EOFError, TypeError) as pillow_error:
        # Pillow cannot read some valid files and would cut 16-bit colour to
        # 8 bits; scikit-image's plug-ins (tifffile, imageio) get a second
        # chance before we give up.
        try:
            return _skimage_array(path)
        except Exception as skimage_error:  # imageio and tifffile raise many unrelated types.
            reason = str(pillow_error).splitlines()[0] if str(pillow_error) else type(pillow_error).__name__
            raise DataError(f"{path}: cannot read image ({reason})") from skimage_error


def full_scale_of(dtype):
    """The count a pixel of this dtype reads at full brightness: 255 (8-bit), 65535 (wider integers), 1.0 (float).

    Wider integers are taken as 16-bit: 16-bit cameras (THEMIS, REGO, DASC)
    store counts up to 65535, and Pillow's 32-bit integer mode "I" also
    holds 16-bit PNGs.
    """
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return 1.0
    if dtype == np.uint8:
        return 255.0
    if dtype.kind in "ui":
        return 65535.0
    if dtype.kind == "f":
        return 1.0
    raise TypeError(f"unsupported pixel type {dtype}")


def _to_rgb_counts(pixels, path):
    """An array of any dtype as float32 counts of shape (rows, cols, 3), and its full scale."""
    try:
        full_scale = full_scale_of(pixels.dtype)
    except TypeError:
        raise DataError(f"{path}: unsupported pixel type {pixels.dtype}") from None
    if pixels.ndim < 2 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise DataError(f"{path}: image has no pixels (shape {pixels.shape})")
    values = np.nan_to_num(pixels.astype(np.float32)) if pixels.dtype.kind == "f" else pixels.astype(np.float32)
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[:, :, 0]
    if values.ndim == 2:
        values = np.repeat(values[:, :, None], 3, axis=2)
    elif values.ndim == 3 and values.shape[2] == 2:
        # Grey plus alpha: the alpha channel says nothing about the sky.
        values = np.repeat(values[:, :, :1], 3, axis=2)
    elif values.ndim == 3 and values.shape[2] == 4:
        values = values[:, :, :3]
    elif not (values.ndim == 3 and values.shape[2] == 3):
        raise DataError(f"{path}: expected a grey, RGB or RGBA image, found pixel array of shape {pixels.shape}")
    return np.ascontiguousarray(values), full_scale


def scale_counts(counts, low, high):
    """Counts to float32 in [0, 1]: ``(counts - low) / (high - low)``, clipped.

    Parameters
    ----------
    counts : ndarray, any shape
        Pixel values in the file's own units (``Frame.pixels``).
    low, high : float
        The counts that become 0 and 1: ``0`` and the dtype's full scale
        (``full_scale_of``) for plain pictures, or a camera's own range
        (``estimate_camera_range``) for science frames.
    """
    if not high > low:
        raise ValueError(f"Invalid range: expected low < high, received {low} and {high}")
    return np.clip((np.asarray(counts, np.float32) - np.float32(low)) / np.float32(high - low), 0.0, 1.0)


class Frame(NamedTuple):
    """One frame of a picture, FITS file, PGM stack or CDF file.

    ``name`` is what its outputs are called: the file name without its
    extensions, with ``_<k>`` (k from 0) for each frame of a multi-frame
    file. ``pixels`` (rows, cols, 3) float32 holds the file's own counts
    (grey repeated into three channels) and ``full_scale`` the count of full
    brightness for the file's data type (``full_scale_of``); ``None`` pixels
    and a one-line ``error`` mark a frame that could not be read. ``time``
    is the UT time of the frame (timezone-aware), or None when unknown.
    """

    name: str
    pixels: "np.ndarray | None"
    full_scale: float
    time: "datetime.datetime | None"
    source: Path
    index: "int | None" = None
    error: "str | None" = None


def read_image(path):
    """Read one image file as float32 RGB in [0, 1].

    Parameters
    ----------
    path : str or pathlib.Path
        Any single-frame file ``read_frames`` reads: JPEG, PNG, TIFF, BMP,
        PGM/PPM, FITS; 8- or 16-bit, grey, grey + alpha, palette, RGB or RGBA.

    Returns
    -------
    image : ndarray of shape (rows, cols, 3), float32
        8-bit values are divided by 255 and 16-bit values by 65535 (the full
        16-bit range, not the camera's own maximum: training and segmentation
        scale science frames by the camera's range instead, see
        ``estimate_camera_range``). Float images are clipped to [0, 1]. Grey
        is repeated into three channels and alpha is dropped.

    Raises
    ------
    DataError
        The file is missing, corrupt, not an image, or holds several frames
        (use ``read_frames``); the message names it.
    """
    frames = list(read_frames(path))
    if len(frames) != 1:
        raise DataError(f"{path}: holds {len(frames)} frames; read it with data.read_frames")
    if frames[0].error:
        raise DataError(frames[0].error)
    return scale_counts(frames[0].pixels, 0.0, frames[0].full_scale)


# File kinds by suffix, lower case; two-part suffixes first.
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".ppm", ".pnm", ".gif")
PGM_EXTENSIONS = (".pgm", ".pgm.gz", ".pgm.bz2")
FITS_EXTENSIONS = (".fits", ".fit", ".fts", ".fits.gz")
CDF_EXTENSIONS = (".cdf",)
IMAGE_EXTENSIONS = PICTURE_EXTENSIONS + PGM_EXTENSIONS + FITS_EXTENSIONS + CDF_EXTENSIONS


def frame_suffix(path):
    """The frame-file suffix of ``path`` in lower case (``.pgm.gz`` whole), or None if it is no frame file."""
    name = Path(path).name.lower()
    for suffix in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def frame_stem(path):
    """The file name of ``path`` without its frame-file suffix (both parts of ``.pgm.gz``)."""
    name = Path(path).name
    suffix = frame_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else Path(path).stem


def read_frames(path, name=None):
    """Yield every frame of a picture, FITS file, PGM stack or CDF file, in file order.

    Parameters
    ----------
    path : str or pathlib.Path
        JPEG, PNG, TIFF, BMP, PPM/PNM, GIF (one frame); PGM, ``.pgm.gz`` and
        ``.pgm.bz2`` stacks of one or more 8- or 16-bit frames, as THEMIS,
        REGO and TREx write them; FITS (``.fits``, ``.fit``, ``.fts``, 2-D
        images or 3-D cubes of frames, BZERO/BSCALE applied by astropy; rows
        as stored, row 0 the file's first row); CDF files of THEMIS level 1
        (each variable of 2-D integer records, e.g. ``thg_asf_gako``, one frame
        per record, times from its epoch variable).
    name : str, optional
        Output name of the file; default ``frame_stem(path)``.

    Yields
    ------
    frame : Frame
        ``name`` is the file's for a single-frame file and ``<name>_<k>``
        for frame k of a multi-frame file, so outputs never collide. A frame
        that cannot be read (a stack whose frames change size) is yielded
        with ``pixels`` None and the reason in ``error``.

    Raises
    ------
    DataError
        The file is missing, corrupt, truncated (after the frames before the
        damage have been yielded) or holds no image; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    name = frame_stem(path) if name is None else name
    suffix = frame_suffix(path)
    if suffix in PGM_EXTENSIONS:
        yield from _read_pgm(path, name)
    elif suffix in FITS_EXTENSIONS:
        yield from _read_fits(path, name)
    elif suffix in CDF_EXTENSIONS:
        yield from _read_cdf(path, name)
    else:
        pixels = _picture_pixels(path)
        counts, full_scale = _to_rgb_counts(pixels, path)
        yield Frame(name, counts, full_scale, _picture_time(path), path)


def _numbered(frames, name):
    """Name a file's frames ``<name>_<k>`` when it holds more than one, ``<name>`` when just one."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        return
    try:
        second = next(frames, None)
    except DataError:
        # The damage comes after the first frame: keep that frame.
        yield first._replace(name=f"{name}_0", index=0)
        raise
    if second is None:
        yield first._replace(name=name, index=None)
        return
    for k, frame in enumerate(itertools.chain([first, second], frames)):
        yield frame._replace(name=f"{name}_{k}", index=k)


def _read_pgm(path, name):
    """Frames of a (possibly compressed) binary PGM stack: P5 headers with comments, then big-endian data."""
    import bz2
    import gzip

    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix.lower(), open)
    try:
        with opener(path, "rb") as stream:
            content = stream.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    if not content.startswith(b"P5"):
        # ASCII (P2) or colour PGM variants: one frame, through Pillow.
        counts, full_scale = _to_rgb_counts(_picture_pixels(path), path)
        yield Frame(name, counts, full_scale, _picture_time(path), path)
        return
    yield from _numbered(_pgm_frames(content, path), name)


def _pgm_frames(content, path):
    """Parse consecutive P5 frames from bytes; the comments before each give its time."""
    position, shape, count = 0, None, 0
    while position < len(content) and content[position:position + 2] == b"P5":
        header, position = _pgm_header(content, position, path)
        width, height, maxval, comments = header
        dtype = np.dtype(">u2") if maxval > 255 else np.dtype("u1")
        size = width * height * dtype.itemsize
        if position + size > len(content):
            raise DataError(f"{path}: truncated after {count} frames (frame {count} has "
                            f"{len(content) - position} of its {size} bytes)")
        pixels = np.frombuffer(content, dtype, width * height, position).reshape(height, width)
        position += size
        while position < len(content) and content[position:position + 1].isspace():
            position += 1
        time = _time_from_comments(comments)
        if shape is not None and (height, width) != shape:
            yield Frame("", None, 0.0, time, path, error=f"{path}: frame {count} is {height}x{width} "
                        f"but the first frame is {shape[0]}x{shape[1]}; skipped")
        else:
            shape = (height, width)
            counts, full_scale = _to_rgb_counts(pixels.astype(np.uint16 if maxval > 255 else np.uint8), path)
            yield Frame("", counts, full_scale, time, path)
        count += 1
    if count == 0:
        raise DataError(f"{path}: not a binary PGM file")


def _pgm_header(content, position, path):
    """The (width, height, maxval, comments) of the P5 header at ``position`` and where its data start."""
    fields, comments = [], []
    position += 2
    while len(fields) < 3:
        while position < len(content) and content[position:position + 1].isspace():
            position += 1
        if position >= len(content):
            raise DataError(f"{path}: truncated PGM header")
        if content[position:position + 1] == b"#":
            end = content.find(b"\n", position)
            end = len(content) if end < 0 else end
            comments.append(content[position + 1:end].decode("latin-1").strip())
            position = end + 1
            continue
        end = position
        while end < len(content) and content[end:end + 1].isdigit():
            end += 1
        if end == position:
            raise DataError(f"{path}: malformed PGM header")
        fields.append(int(content[position:end]))
        position = end
    # Exactly one whitespace byte separates the header from the data.
    width, height, maxval = fields
    if width < 1 or height < 1 or not 0 < maxval < 65536:
        raise DataError(f"{path}: malformed PGM header ({width}x{height}, maxval {maxval})")
    return (width, height, maxval, comments), position + 1


def _read_fits(path, name):
    """Frames of the image HDUs of a FITS file: a 2-D image is one frame, a 3-D cube one per plane."""
    try:
        from astropy.io import fits
    except ImportError:
        raise DataError(f"{path}: reading FITS needs astropy (pip install astropy)") from None

    def frames():
        try:
            with warnings.catch_warnings(), fits.open(path, memmap=False) as hdus:
                # A truncated file warns, then fails on its data: the error says it once.
                warnings.simplefilter("ignore")
                found = False
                for hdu in hdus:
                    if not getattr(hdu, "is_image", False) or hdu.data is None or hdu.data.ndim < 2:
                        continue
                    found = True
                    time = _fits_time(hdu.header)
                    planes = hdu.data if hdu.data.ndim == 3 else hdu.data[None]
                    for plane in planes:
                        counts, full_scale = _to_rgb_counts(np.asarray(plane), path)
                        yield Frame("", counts, full_scale, time, path)
        except (OSError, ValueError, TypeError, IndexError) as error:
            raise DataError(f"{path}: cannot read FITS ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
        if not found:
            raise DataError(f"{path}: FITS file without an image")

    yield from _numbered(frames(), name)


def _read_cdf(path, name):
    """Frames of a CDF file's image variables (2-D records), THEMIS level 1 style, with their epochs."""
    try:
        import cdflib
    except ImportError:
        raise DataError(f"{path}: reading CDF needs cdflib (pip install cdflib)") from None
    try:
        cdf = cdflib.CDF(str(path))
        variables = cdf.cdf_info().zVariables
        images = [v for v in variables
                  if len(cdf.varinq(v).Dim_Sizes) == 2 and min(cdf.varinq(v).Dim_Sizes) >= 16
                  and cdf.varinq(v).Data_Type_Description in ("CDF_UINT1", "CDF_UINT2", "CDF_INT2", "CDF_UINT4",
                                                            "CDF_INT4", "CDF_FLOAT", "CDF_REAL4", "CDF_REAL8",
                                                            "CDF_DOUBLE")]
    except (OSError, ValueError, KeyError, IndexError) as error:
        raise DataError(f"{path}: cannot read CDF ({error})") from None
    if not images:
        raise DataError(f"{path}: CDF file without image variables (2-D records)")

    def frames():
        for variable in images:
            try:
                stack = np.asarray(cdf.varget(variable))
                times = _cdf_times(cdf, variable, variables)
            except (OSError, ValueError, KeyError, IndexError) as error:
                raise DataError(f"{path}: cannot read CDF variable {variable} ({error})") from None
            stack = stack[None] if stack.ndim == 2 else stack
            for k, plane in enumerate(stack):
                counts, full_scale = _to_rgb_counts(plane, path)
                yield Frame("", counts, full_scale, times[k] if k < len(times) else None, path)

    yield from _numbered(frames(), name)


# ------------------------------------------------------------ frame times

def _utc(year, month, day, hour=0, minute=0, second=0, microsecond=0):
    return datetime.datetime(year, month, day, hour, minute, second, microsecond, tzinfo=datetime.timezone.utc)


def _fraction(text):
    """Microseconds of a decimal fraction of a second such as ``.743``."""
    return int(round(float("0" + text) * 1e6)) if text else 0


# File name forms of the camera networks, most specific first; each gives
# year, month, day, hour, minute, second and a fraction of a second.
_NAME_TIMES = (
    # 2017-12-18_03-14-57 (KHO)
    (re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})[_T ](\d{2})[-:](\d{2})[-:](\d{2})(\.\d+)?(?!\d)"),
     lambda g: _utc(int(g[0]), int(g[1]), int(g[2]), int(g[3]), int(g[4]), int(g[5]), _fraction(g[6]))),
    # 20151007_082351.743 (DASC), 20090209_060001 (NORSTAR, TREx)
    (re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})_(\d{2})(\d{2})(\d{2})(\.\d+)?(?!\d)"),
     lambda g: _utc(int(g[0]), int(g[1]), int(g[2]), int(g[3]), int(g[4]), int(g[5]), _fraction(g[6]))),
    # N20040116G050623 (Yellow River Station): date, one letter, time
    (re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})[A-Za-z](\d{2})(\d{2})(\d{2})(?!\d)"),
     lambda g: _utc(int(g[0]), int(g[1]), int(g[2]), int(g[3]), int(g[4]), int(g[5]))),
    # 20140221192040 (NIPR)
    (re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(?!\d)"),
     lambda g: _utc(int(g[0]), int(g[1]), int(g[2]), int(g[3]), int(g[4]), int(g[5]))),
    # 20140310_0600 (THEMIS, REGO, TREx minute files)
    (re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})_(\d{2})(\d{2})(?!\d)"),
     lambda g: _utc(int(g[0]), int(g[1]), int(g[2]), int(g[3]), int(g[4]))),
    # 111220_200933 (KHO Sony): day, month, two-digit year; the camera's
    # EXIF time of that file is 2020-12-11 20:09:13
    (re.compile(r"(?<!\d)(\d{2})(\d{2})(\d{2})_(\d{2})(\d{2})(\d{2})(?!\d)"),
     lambda g: _utc(2000 + int(g[2]), int(g[1]), int(g[0]), int(g[3]), int(g[4]), int(g[5]))),
)


def time_from_name(name):
    """The UT time a file name spells, or None.

    Understands the forms camera networks use: ``2017-12-18_03-14-57``,
    ``20151007_082351.743``, ``N20040116G050623``, ``20140221192040``,
    ``20140310_0600`` and ``111220_200933`` (KHO's day, month, two-digit
    year from 2000);
    a form whose numbers are no valid date (month 13) is skipped.
    """
    for pattern, build in _NAME_TIMES:
        for match in pattern.finditer(str(name)):
            try:
                return build(match.groups())
            except ValueError:
                continue
    return None


def _parse_iso(text):
    """``2014-03-10 06:00:00.063119 UTC`` or ``2015-10-07T08:23:51.743`` as an aware UTC datetime, or None."""
    match = re.search(r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(\.\d+)?", text)
    if not match:
        return None
    g = match.groups()
    try:
        return _utc(int(g[0]), int(g[1]), int(g[2]), int(g[3]), int(g[4]), int(g[5]), _fraction(g[6]))
    except ValueError:
        return None


def _time_from_comments(comments):
    """A PGM frame's time from its header comments (``"Image request start" 2014-03-10 06:00:00.063 UTC``)."""
    for key in ("image request start", "image readout start", "exposure start"):
        for comment in comments:
            if comment.lower().lstrip('"').startswith(key):
                return _parse_iso(comment)
    return None


def _fits_time(header):
    """A FITS frame's time: DATE-OBS (with TIME-OBS or UT), or DASC's OBSDATE and OBSSTART."""
    for date_key, time_keys in (("DATE-OBS", ("TIME-OBS", "UT", "UTSTART")), ("OBSDATE", ("OBSSTART",)),
                                ("DATE", ("TIME-OBS", "UT"))):
        date = header.get(date_key)
        if not isinstance(date, str):
            continue
        if "T" in date:
            return _parse_iso(date)
        for time_key in time_keys:
            if isinstance(header.get(time_key), str):
                return _parse_iso(f"{date.strip()} {header[time_key].strip()}")
    return None


def _cdf_times(cdf, variable, variables):
    """Times of a CDF image variable's records from its DEPEND_0 or ``<variable>_epoch`` variable."""
    import cdflib

    try:
        epoch = cdf.varattsget(variable).get("DEPEND_0")
    except (ValueError, KeyError):
        epoch = None
    if not isinstance(epoch, str) or epoch not in variables:
        epoch = f"{variable}_epoch" if f"{variable}_epoch" in variables else None
    if epoch is None:
        return []
    values = np.atleast_1d(cdflib.cdfepoch.to_datetime(cdf.varget(epoch)))
    return [_parse_iso(str(value)) for value in values]


def _picture_time(path):
    """A picture's time from its EXIF DateTimeOriginal or DateTime (taken as UT), or None."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            exif = image.getexif()
            text = exif.get_ifd(0x8769).get(36867) or exif.get(306)
    except (OSError, ValueError, SyntaxError, EOFError, TypeError, AttributeError, KeyError):
        return None
    if not isinstance(text, str):
        return None
    match = re.match(r"(\d{4}):(\d{2}):(\d{2}) (\d{2}):(\d{2}):(\d{2})", text.strip())
    if not match:
        return None
    try:
        return _utc(*(int(group) for group in match.groups()))
    except ValueError:
        return None


def frame_time(frame):
    """A frame's UT time: its file's own (``Frame.time``), else its file name's (``time_from_name``), else None."""
    return frame.time or time_from_name(frame.source.name)


def list_images(folder, recursive=False):
    """Frame files of ``folder``, sorted; hidden files and other suffixes skipped.

    Parameters
    ----------
    folder : str or pathlib.Path
        A folder.
    recursive : bool
        Also search its sub-folders (a folder of nights); files are sorted
        by their path relative to ``folder``.

    Returns
    -------
    paths : list of pathlib.Path
        Files with a suffix of ``IMAGE_EXTENSIONS`` (``frame_suffix``).

    Raises
    ------
    DataError
        The folder does not exist, is not a folder or holds no frame file.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    paths = sorted(
        (path for path in candidates
         if not any(part.startswith(".") for part in path.relative_to(folder).parts)
         and frame_suffix(path) and path.is_file()),
        key=lambda path: path.relative_to(folder).parts,
    )
    if not paths:
        where = " or its sub-folders" if recursive else " (sub-folders are searched with --recursive)"
        raise DataError(f"{folder}: no image files{where}; expected {', '.join(IMAGE_EXTENSIONS)}")
    return paths


# ------------------------------------------------------------ preprocessing

# What a model was trained on travels with it (``save_model`` writes it into
# the ``.keras`` file, ``load_model`` reads it back), so that segmentation
# prepares frames exactly as training did. Models saved before this existed
# have none and get LEGACY_PREPROCESSING: frames divided by their full scale,
# no normalization.
PREPROCESSING_VERSION = 6
LEGACY_PREPROCESSING = {"version": 0, "normalize": "none", "camera_range": None, "full_scale": None}

# Background normalization (``normalize_frame``). The sky's background is the
# lower envelope of the frame's brightness over BACKGROUND_SCALE of the sky's
# diameter: moonlight, haze, twilight and horizon glow change more slowly
# than that across the sky, while most aurora is narrower, so it stays out
# of it and remains as excess above it. A quarter of the diameter left the
# inside of wide bands in the background.
BACKGROUND_SCALE = 0.5
# Per block of the background grid, this percentile of the pixels: below the
# stars and below aurora that covers most of the block.
BACKGROUND_QUANTILE = 25
# The background grid has about this many blocks across the sky.
BACKGROUND_BLOCKS = 48
# ``train.py --background_sectors N`` takes the outer part of the sky's
# radial profile per azimuth sector, N around the sky: the glow of a town,
# of the moon low in the sky or of twilight brightens one side of the
# horizon, and changes faster with elevation than the background grid
# follows. 0, the default, is one profile all round, as in models saved
# with preprocessing version 1. This many is the value to try first.
BACKGROUND_SECTORS = 12
# Excess over the background in units of the pixel noise is compressed by
# asinh(excess / NORMALIZE_SOFTENING): linear up to a few noise levels,
# logarithmic for bright aurora, stars and the moon.
NORMALIZE_SOFTENING = 3.0
# A monochrome camera's three channels would all repeat one excess. Instead
# they hold the excess over backgrounds of these scales (fractions of the
# sky's diameter, see BACKGROUND_SCALE): the first keeps the inside of wide
# bands, the smaller ones take out the moon's glow and other humps of the
# sky that the first leaves standing, and that look like diffuse aurora to
# a model that sees a patch at a time. Models saved before (preprocessing
# version 2 and older) have one scale in every channel.
GREY_SCALES = (0.5, 0.2, 0.08)
NORMALIZATIONS = ("background", "none")
# ``train.py --position`` adds three channels that say where in the sky a
# pixel lies (``position_channels``): glow fixed to the camera (a town on
# one horizon, the rim's airglow ring, a mast) then need not look unlike
# aurora in a patch to be learnt as background where P shows it. They span
# 0 to POSITION_SCALE, about the range of the excess channels' sky.
# Models saved before (preprocessing version 3 and older) have 3 channels.
POSITION_SCALE = 2.0
# ``train.py --sky_template`` takes P's median excess at each place in the sky
# (``sky_template``, a grid of SKY_TEMPLATE_CELLS cells across the sky's
# diameter) off every frame's excess: light fixed to the camera that the
# background grid does not follow (the rim's glow, a town, a moon that stands
# still over a set's minutes) is then no excess, in P and in U alike. Coarse
# on purpose: a grid as fine as the pixels would also take in P's own stars
# and noise, and P frames would look unlike U frames. At most
# SKY_TEMPLATE_FRAMES P frames, evenly spread, are read for it.
SKY_TEMPLATE_CELLS = 32
SKY_TEMPLATE_FRAMES = 100
# With the template, bright sky is also left out of the background
# (``bright_sky``, the model's ``mask_bright``, version 6): wide aurora
# otherwise lifts the background estimate of the sky around it, far beyond
# itself, and a frame with aurora then reads darker than P's frames all over,
# which a P-versus-U classifier takes for aurora and which pulls the prior
# estimate down. Bright means more than BRIGHT_LEVELS noise levels above P's
# template once smoothed by a Gaussian of BRIGHT_SMOOTHING pixels (a pixel's
# own noise stays far below it), grown by BRIGHT_GROWTH pixels to take in
# the aurora's fainter edges. Light that P shows at the same place (the
# rim's glow, a moon that stays put) is in the template and so stays in the
# background, as without.
BRIGHT_LEVELS = 2.0
BRIGHT_SMOOTHING = 1.5
BRIGHT_GROWTH = 3


def borderless_warning(names, horizon=False):
    """The one-line warning for frames where ``sky_mask`` found no fisheye border (``names``: non-empty).

    ``horizon``: the sky is cut by ``Horizon`` (``--min_elevation`` without a map).
    """
    sky = ("the frame's centre is taken for the zenith and half its longer side for the horizon" if horizon
           else "their whole frame counts as sky")
    return (f"warning: no fisheye border found in {len(names)} frame(s) (first: {names[0]}): {sky}; give the sky "
            f"with --field_of_view")


def sky_mask(image, threshold=None, smoothing=5, min_border_fraction=0.005, min_sky_fraction=0.2):
    """Detect the sky (the fisheye circle) of an all-sky frame.

    The border around the circle is black: close to the frame's darkest
    level, while even a dark sky has noise and stars above it. The border is
    taken to be the near-dark pixels connected to the frame's edges; the sky
    is the largest connected region of what remains.

    Parameters
    ----------
    image : ndarray of shape (rows, cols, 3), float32
        RGB in [0, 1].
    threshold : float, optional
        A pixel is near dark when the mean of its channel maximum over a
        ``smoothing`` x ``smoothing`` square is <= this. Default
        (``border_threshold``): relative to the level and noise of the
        frame's corners, which lie outside the circle of a fisheye frame, so
        that 8-bit frames and science frames with a noisy, non-zero border
        are treated alike.
    smoothing : int
        Side of that square in pixels; averaging keeps single dark pixels of
        a noisy sky out of the border.
    min_border_fraction : float
        Edge-connected dark regions smaller than this fraction of the frame
        are not a border (a dark corner of an ordinary frame).
    min_sky_fraction : float
        A sky region smaller than this fraction of the frame is not the
        circle (on a dark frame it can be the aurora alone).

    Returns
    -------
    sky : ndarray of shape (rows, cols), bool
        True inside the sky. All True when no border or no plausible circle
        is found (``sky.all()`` tells the caller it fell back).

    Notes
    -----
    Keeping only the largest non-border region drops text and time stamps
    printed in the black corners. Dark sky connected to the border by
    near-dark pixels (e.g. below the horizon) is counted as border, which
    is harmless because such pixels are background anyway. Averaging would
    move the edge up to ``smoothing // 2`` pixels into the border, so dark
    pixels that close to the averaged border are added back to it.
    """
    from scipy import ndimage

    rows, cols = image.shape[:2]
    # Arrays are deleted as soon as they are used: a 4096x4096 frame makes
    # each of them 16 to 64 MB.
    brightness = image.max(axis=2)  # (rows, cols) float32
    if threshold is None:
        threshold = border_threshold(brightness, smoothing)
        if threshold is None:
            return np.ones((rows, cols), dtype=bool)
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
    everything = np.ones((rows, cols), dtype=bool)
    if border.sum() < min_border_fraction * rows * cols:
        return everything
    sky_labels, count = ndimage.label(~border)
    if count == 0:
        return everything
    sizes = np.bincount(sky_labels.ravel())
    sizes[0] = 0
    if sizes.max() < min_sky_fraction * rows * cols:
        return everything
    return sky_labels == np.argmax(sizes)


def border_threshold(brightness, smoothing=5):
    """The brightness below which a pixel may be the dark border of a fisheye frame, or None if there is none.

    The four corners of a fisheye frame lie outside its circle. Their
    median is the border's level and their spread its noise; the threshold
    is that level plus four noise levels of a ``smoothing``-wide average, or
    3% of the way up to the sky's brightness (the frame's 75th
    percentile: the border takes up to half of a frame), whichever is more,
    and at least 0.01 (2.5 of 255). Corners about as bright as the sky (a
    frame filled by sky) mean there is no border.
    """
    rows, cols = brightness.shape
    side = max(3, min(rows, cols) // 20)
    corners = np.concatenate([brightness[:side, :side].ravel(), brightness[:side, -side:].ravel(),
                              brightness[-side:, :side].ravel(), brightness[-side:, -side:].ravel()])
    level = float(np.median(corners))
    noise = 1.4826 * float(np.median(np.abs(corners - level)))
    sky_level = float(np.percentile(brightness[:: max(1, rows // 256), :: max(1, cols // 256)], 75))
    if sky_level - level < 0.02:
        return None
    return max(0.01, level + max(4 * noise / smoothing, 0.03 * (sky_level - level)))


def read_field_of_view(path, shape=None, min_elevation=None):
    """A user's field of view: which pixels are sky, from a mask image or an elevation map.

    Parameters
    ----------
    path : str or pathlib.Path
        A picture whose nonzero pixels are sky (``eraseMap.bmp`` style), or,
        with ``min_elevation``, a map of each pixel's elevation in degrees
        (a FITS file such as DASC's ``*_El.FIT``; NaN or values outside
        [-90, 90] are not sky).
    shape : (int, int), optional
        The frames' (rows, cols); checked when given.
    min_elevation : float, optional
        Degrees above the horizon; pixels below it are not sky. All-sky
        practice cuts the lowest 10 to 20 degrees, where horizon glow, town
        lights and trees are.

    Returns
    -------
    sky : ndarray of shape (rows, cols), bool

    Raises
    ------
    DataError
        Unreadable file, more than one frame, or another shape than ``shape``.
    """
    frames = list(read_frames(path))
    if len(frames) != 1 or frames[0].pixels is None:
        raise DataError(f"{path}: a field of view must be one picture or map")
    values = frames[0].pixels[..., 0]
    if min_elevation is None:
        sky = values > 0
    else:
        with np.errstate(invalid="ignore"):
            sky = np.isfinite(values) & (values >= min_elevation) & (values <= 90)
    if shape is not None and sky.shape != tuple(shape):
        raise DataError(f"{path}: field of view is {sky.shape[0]}x{sky.shape[1]} but the frames are "
                        f"{shape[0]}x{shape[1]}")
    if not sky.any():
        raise DataError(f"{path}: the field of view holds no sky pixel"
                        + (f" at or above {min_elevation} degrees" if min_elevation is not None else ""))
    return sky


class Horizon(NamedTuple):
    """The sky found in each frame (``sky_mask``), less what lies below ``min_elevation`` degrees.

    For ``--min_elevation`` without an elevation map. Each pixel's elevation
    is that of an equidistant fisheye whose circle's edge is the horizon
    (``fisheye_elevation``). Pass it where a field of view goes
    (``prepare_frame``); in a frame in which no fisheye border is found the
    frame's centre is the zenith and half its longer side the horizon's
    distance (``sky_coordinates``). Unlike a field of view, it
    leaves how the frame is prepared (background, template, positions) as
    without it: patches are drawn, scored and masked above the cut only.
    """

    min_elevation: float

    def cut(self, sky):
        """``sky`` (rows, cols) bool less its pixels below ``min_elevation``."""
        return sky & (fisheye_elevation(sky) >= self.min_elevation) if sky.any() else sky


def fisheye_elevation(sky):
    """Each pixel's elevation in degrees, for an equidistant fisheye whose horizon is the edge of ``sky``.

    Parameters
    ----------
    sky : ndarray of shape (rows, cols), bool
        The fisheye circle (``sky_mask``); at least one pixel.

    Returns
    -------
    elevation : ndarray of shape (rows, cols), float32
        ``90 * (1 - r)`` at ``r`` sky radii from the circle's centre
        (``sky_coordinates``): 90 at the zenith, 0 on the circle's edge,
        negative beyond it. All-sky lenses are close to equidistant, but a
        lens whose view is narrower than 180 degrees puts the edge above
        the horizon; a calibrated map (``read_field_of_view``) is exact.
    """
    down, right = sky_coordinates(sky)
    return (90.0 * (1.0 - np.hypot(down, right))).astype(np.float32)


def user_sky(path=None, min_elevation=None):
    """The sky of ``--field_of_view`` and ``--min_elevation``, for ``prepare_frame``.

    A bool array from the file at ``path`` (``read_field_of_view``), else a
    ``Horizon`` when only ``min_elevation`` is given, else None (the sky
    found in each frame).
    """
    if path:
        return read_field_of_view(path, min_elevation=min_elevation)
    return Horizon(min_elevation) if min_elevation is not None else None


def estimate_camera_range(samples, full_scale):
    """The counts that become 0 and 1 for one camera: (low, high).

    Parameters
    ----------
    samples : list of ndarray
        Counts (any shape) from the training frames of the camera.
    full_scale : float
        Their data type's full scale (``full_scale_of``).

    Returns
    -------
    low, high : float
        8-bit frames: 0 and 255, as every picture viewer shows them. Other
        frames: the 0.5th and 99.9th percentiles of all the counts. Science
        cameras use a small part of their 16-bit range (DASC: 343 to 1484)
        above a pedestal (THEMIS: about 3300), so dividing by 65535 would
        leave every frame near black.
    """
    if full_scale == 255.0:
        return 0.0, 255.0
    pooled = np.concatenate([np.asarray(sample, np.float32).ravel()[::7] for sample in samples])
    low, high = (float(value) for value in np.percentile(pooled, [0.5, 99.9]))
    if not high > low:
        high = low + 1.0
    return low, high


def sky_background(image, sky, scale=BACKGROUND_SCALE, quantile=BACKGROUND_QUANTILE, blocks=BACKGROUND_BLOCKS,
                   sectors=0, leave_out=None):
    """The sky's smooth background brightness, without stars or aurora.

    Parameters
    ----------
    image : ndarray of shape (rows, cols, channels), float32
    sky : ndarray of shape (rows, cols), bool
        Only these pixels are used.
    scale : float
        Width of the smoothing window, as a fraction of the sky's diameter.
    quantile : float
        Percentile of each block's sky pixels, in (0, 100).
    blocks : int
        Blocks of the coarse grid across the sky's diameter.
    sectors : int
        Azimuth sectors of the outer profile (``BACKGROUND_SECTORS``); 0 =
        one profile all round.
    leave_out : ndarray of shape (rows, cols), bool, optional
        Sky pixels not to take levels from (``bright_sky``); the sky's
        centre and size still come from ``sky``.

    Returns
    -------
    background : ndarray of shape (rows, cols, channels), float32

    Notes
    -----
    First the sky's radial profile: the ``quantile`` percentile of each of
    ``blocks`` rings around the sky's centre, flat inside half the radius.
    Vignetting, the airglow ring and the glow of the horizon are (nearly)
    the same all round and change fast toward the rim, faster than any
    window over the sky could follow; aurora covers a small part of an
    outer ring. With ``sectors``, what the outer half of the sky keeps above
    that profile is taken again per azimuth sector (``_sector_profile``):
    glow on one side of the horizon. Then, on the frame minus that
    profile, the rest: the sky is cut into square blocks (``blocks`` across
    its diameter), each summarised by the ``quantile`` percentile of its sky
    pixels (blocks with less than a quarter sky are left out); the block
    values are replaced by their median over a window of ``scale`` of the
    diameter, blocks outside the sky take the nearest value, and the result
    is smoothed by one block and interpolated bilinearly to every pixel.
    Working on rings and blocks keeps a 4096x4096 frame to a few thousand
    numbers: the cost is that of one pass over a subsample of the pixels.
    """
    from scipy import ndimage

    rows, cols, channels = image.shape
    sky_rows, sky_cols = np.nonzero(sky)
    if sky_rows.size == 0:
        return np.zeros_like(image)
    diameter = max(sky_rows.max() - sky_rows.min(), sky_cols.max() - sky_cols.min()) + 1
    centre = ((sky_rows.min() + sky_rows.max()) / 2, (sky_cols.min() + sky_cols.max()) / 2)
    cell = max(1, int(round(diameter / blocks)))
    step = max(1, cell // 12)  # about 144 pixels a block are plenty for a percentile
    cell -= cell % step
    grid_rows, grid_cols = -(-rows // cell), -(-cols // cell)
    # Subsampled first, so that a large frame is never copied whole; cell is
    # a multiple of step, so blocks still start on sampled pixels.
    per_block = cell // step
    masked, values = sky[::step, ::step], image[::step, ::step]
    if leave_out is not None:
        masked = masked & ~leave_out[::step, ::step]
    profile = _radial_profile(values, masked, centre, step, diameter / 2, blocks, quantile)
    if sectors:
        profile = _sector_profile(profile, values, masked, centre, step, diameter / 2, blocks // 2, quantile, sectors)
    values = values - profile(*np.ogrid[:masked.shape[0], :masked.shape[1]], step=step)
    padding = ((0, grid_rows * per_block - masked.shape[0]), (0, grid_cols * per_block - masked.shape[1]))
    masked = np.pad(masked, padding).reshape(grid_rows, per_block, grid_cols, per_block).transpose(0, 2, 1, 3)
    values = np.pad(values, padding + ((0, 0),)).reshape(grid_rows, per_block, grid_cols, per_block, channels)
    values = values.transpose(0, 2, 4, 1, 3)
    values = np.where(masked[:, :, None], values, np.nan).reshape(grid_rows, grid_cols, channels, -1)
    grid = _nan_percentile(values, quantile)
    grid[masked.reshape(grid_rows, grid_cols, -1).mean(axis=-1) < 0.25] = np.nan
    window = max(3, int(round(scale * diameter / cell)) | 1)
    half = window // 2
    padded = np.pad(grid, ((half, half), (half, half), (0, 0)), constant_values=np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (window, window), axis=(0, 1))
    grid = _nan_percentile(windows.reshape(grid_rows, grid_cols, channels, -1), 50)
    missing = ~np.isfinite(grid[..., 0])
    if missing.all():
        grid = np.zeros_like(grid)
        missing[:] = False
    nearest = ndimage.distance_transform_edt(missing, return_distances=False, return_indices=True)
    grid = ndimage.gaussian_filter(grid[nearest[0], nearest[1]], (1, 1, 0)).astype(np.float32)
    # Bilinear between block centres, one axis at a time (a full-size
    # skimage resize of a 4096x4096 frame took seconds). The repeated last
    # block gives the last pixels an upper neighbour.
    grid = np.pad(grid, ((0, 1), (0, 1), (0, 0)), mode="edge")
    row_lower, row_weight = _block_weights(rows, cell, grid_rows)
    col_lower, col_weight = _block_weights(cols, cell, grid_cols)
    along_rows = grid[row_lower] * (1 - row_weight)[:, None, None] + grid[row_lower + 1] * row_weight[:, None, None]
    full = along_rows[:, col_lower] * (1 - col_weight)[None, :, None]
    full += along_rows[:, col_lower + 1] * col_weight[None, :, None]
    for start in range(0, rows, 256):  # in blocks of rows: a 4096x4096 profile is 200 MB
        full[start:start + 256] += profile(*np.ogrid[start:min(start + 256, rows), :cols])
    return full


def _radial_profile(values, masked, centre, step, radius, rings, quantile):
    """The ``quantile`` percentile of the sky in each of ``rings`` rings: a function of (row, col) -> (..., channels).

    ``values`` and ``masked`` are the frame and its sky sampled every
    ``step`` pixels; the returned function takes full-resolution row and
    column indices (or sampled ones with ``step``).
    """
    sample_rows, sample_cols = np.ogrid[:masked.shape[0], :masked.shape[1]]
    distance = np.hypot(sample_rows * step - centre[0], sample_cols * step - centre[1])
    ring = np.minimum((distance / max(radius, 1.0) * rings).astype(np.intp), rings)[masked]
    levels = _percentile_by_group(ring, values[masked], rings + 1, quantile)
    known = np.isfinite(levels[:, 0])
    radii = (np.arange(rings + 1) + 0.5) * radius / rings
    if not known.any():
        levels[:], known[:] = 0.0, True
    levels = np.stack([np.interp(radii, radii[known], levels[known, c]) for c in range(values.shape[2])], axis=1)
    levels = ndimage_median3(levels)
    # Inside half the radius the profile stays flat: the sky near the zenith
    # changes little from ring to ring, and there a ring is so small that
    # an arc or a patch across the zenith fills it.
    inner = radii < radius / 2
    if inner.any() and not inner.all():
        levels[inner] = levels[np.argmax(~inner)]

    # A table by whole pixels of radius: a lookup per pixel instead of an
    # interpolation (a 4096x4096 frame has 16 million of them).
    reach = int(np.ceil(np.hypot(*centre) + np.hypot(values.shape[0] * step, values.shape[1] * step))) + 2
    table = np.stack([np.interp(np.arange(reach), radii, levels[:, c]) for c in range(levels.shape[1])],
                     axis=1).astype(np.float32)

    def profile(rows, cols, step=1):
        at = np.hypot(np.float32(rows * step - centre[0]), np.float32(cols * step - centre[1]))
        return table[np.minimum(np.rint(at).astype(np.intp), reach - 1)]

    return profile


def _percentile_by_group(group, values, groups, quantile, min_count=8):
    """The ``quantile`` percentile of ``values`` (n, channels) in each group 0 .. ``groups`` - 1 of ``group`` (n,).

    Returns (groups, channels) float32, NaN where a group has fewer than
    ``min_count`` values.
    """
    order = np.argsort(group, kind="stable")
    group, values = group[order], values[order]
    bounds = np.searchsorted(group, np.arange(groups + 1))
    levels = np.full((groups, values.shape[1]), np.nan, np.float32)
    for k in range(groups):
        inside = values[bounds[k]:bounds[k + 1]]
        if len(inside) >= min_count:
            levels[k] = np.percentile(inside, quantile, axis=0)
    return levels


def _sector_profile(profile, values, masked, centre, step, radius, rings, quantile, sectors):
    """``profile`` plus what the outer sky keeps above it, per ring and azimuth sector: a function like it.

    The ``quantile`` percentile of ``values - profile`` in each cell of
    ``rings`` rings by ``sectors`` sectors, the median of each cell and its
    8 neighbours (sectors wrap around), weighted from 0 at half the radius
    to 1 at three quarters, where the zenith's sky is left to the grid
    (``sky_background``). Between sector centres the levels are
    interpolated linearly in azimuth.
    """
    sample_rows, sample_cols = np.ogrid[:masked.shape[0], :masked.shape[1]]
    down, across = sample_rows * step - centre[0], sample_cols * step - centre[1]
    ring = np.minimum((np.hypot(down, across) / max(radius, 1.0) * rings).astype(np.intp), rings)
    sector = ((np.arctan2(down, across) + np.pi) / (2 * np.pi) * sectors).astype(np.intp) % sectors
    cell = (ring * sectors + sector)[masked]
    excess = (values - profile(sample_rows, sample_cols, step=step))[masked]
    levels = np.nan_to_num(_percentile_by_group(cell, excess, (rings + 1) * sectors, quantile))
    levels = levels.reshape(rings + 1, sectors, -1)
    ring_index = np.arange(rings + 1)
    neighbours = [levels[np.clip(ring_index + dr, 0, rings)][:, (np.arange(sectors) + ds) % sectors]
                  for dr in (-1, 0, 1) for ds in (-1, 0, 1)]
    levels = np.median(np.stack(neighbours), axis=0)
    radii = (ring_index + 0.5) / rings
    levels *= np.clip((radii - 0.5) / 0.25, 0, 1)[:, None, None].astype(np.float32)

    def sector_profile(rows, cols, step=1):
        down, across = np.float32(rows * step - centre[0]), np.float32(cols * step - centre[1])
        at = np.clip(np.rint(np.hypot(down, across) / max(radius, 1.0) * rings - 0.5), 0, rings).astype(np.intp)
        position = (np.arctan2(down, across) + np.float32(np.pi)) / np.float32(2 * np.pi) * sectors - 0.5
        lower = np.floor(position).astype(np.intp)
        weight = (position - lower)[..., None]
        extra = levels[at, lower % sectors] * (1 - weight) + levels[at, (lower + 1) % sectors] * weight
        return profile(rows, cols, step=step) + extra

    return sector_profile


def ndimage_median3(levels):
    """A running median of 3 along the first axis (ends kept): one noisy ring does not make a step."""
    smoothed = levels.copy()
    if len(levels) >= 3:
        smoothed[1:-1] = np.median(np.stack([levels[:-2], levels[1:-1], levels[2:]]), axis=0)
    return smoothed


def _block_weights(length, cell, blocks):
    """For each pixel of an axis, the block whose centre is at or before it and the weight of the next one."""
    position = np.clip((np.arange(length, dtype=np.float32) + 0.5) / cell - 0.5, 0, blocks - 1)
    lower = position.astype(np.intp)
    return lower, (position - lower).astype(np.float32)


def _nan_percentile(values, percentile):
    """Percentile over the last axis ignoring NaN (nearest rank), NaN where all are NaN.

    ``numpy.nanpercentile`` loops in Python over the other axes; sorting
    once (NaN sorts last) and picking a rank per row is vectorised.
    """
    ordered = np.sort(values, axis=-1)
    counts = np.isfinite(values).sum(axis=-1)
    rank = np.round(percentile / 100 * np.maximum(counts - 1, 0)).astype(np.intp)
    picked = np.take_along_axis(ordered, rank[..., None], axis=-1)[..., 0]
    return np.where(counts > 0, picked, np.nan)


def pixel_noise(image, sky, floor, background=None):
    """Per-channel standard deviation of the pixel noise, robustly, from neighbour differences.

    Differences of sky pixels one and two columns apart cancel everything
    that varies slowly (background, moonlight), so their median absolute
    deviation / (0.6745 * sqrt(2)) estimates the noise; the larger of the
    two is kept, because JPEG compression and optics wider than a pixel
    smooth neighbouring pixels together. Aurora is not slow: the rays of an
    arc would inflate the estimate, and the noise of a frame with aurora
    would then read larger than that of a frame without, a difference a
    P-versus-U classifier learns instead of the aurora. With ``background``
    given, the estimate is repeated on the pairs of pixels that both lie
    within 1.5 first estimates of the sky's median level above the
    background, which leaves out aurora, its brighter shot noise and stars
    (and reads about 0.8 of the full noise, the same for every frame).
    Returns an ndarray of shape (channels,), float32, each at least
    ``floor`` (half a count: compression can flatten a dark sky to a single
    value).
    """
    step = max(1, image.shape[0] // 512)
    rows = image[::step]
    quiet = None

    def estimate(lag):
        pairs = sky[::step, lag:] & sky[::step, :-lag]
        if quiet is not None:
            pairs &= quiet[:, lag:] & quiet[:, :-lag]
        differences = (rows[:, lag:] - rows[:, :-lag])[pairs]
        if len(differences) < 16:
            return None
        centred = differences - np.median(differences, axis=0)
        # The MAD of integer counts moves in whole counts (2.1 or 3.15 of
        # 255); the standard deviation within 4 MADs does not.
        spread = np.maximum(1.4826 * np.median(np.abs(centred), axis=0), floor * np.sqrt(2))
        inside = np.abs(centred) < 4 * spread
        clipped = np.sqrt(np.sum(np.where(inside, centred, 0) ** 2, axis=0) / np.maximum(inside.sum(axis=0), 1))
        return clipped / np.sqrt(2)

    def noise():
        found = [value for value in (estimate(1), estimate(2)) if value is not None]
        return np.maximum(np.max(found, axis=0), floor).astype(np.float32) if found else None

    first = noise()
    if first is None:
        return np.full(image.shape[2], floor, np.float32)
    if background is None:
        return first
    # Pairs of the sky's own level only: within 1.5 first estimates of the
    # sky's median excess over its background (the background is a lower
    # envelope), so that aurora and its brighter shot noise stay out.
    residual = rows - background[::step]
    level = np.median(residual[sky[::step]], axis=0) if sky.any() else 0.0
    quiet = (np.abs(residual - level) < 1.5 * first).all(axis=2)
    refined = noise()
    return first if refined is None else refined


def normalize_frame(image, sky, quantum, method="background", sectors=0, grey_scales=None, position=False,
                    template=None, mask_bright=False):
    """What the model sees of a frame: excess over the sky's background in units of the pixel noise.

    Parameters
    ----------
    image : ndarray of shape (rows, cols, 3), float32
        The frame in [0, 1] (``scale_counts``).
    sky : ndarray of shape (rows, cols), bool
    quantum : float
        One count of the frame in these units (1/255 for 8-bit frames), the
        smallest noise level believed.
    method : {"background", "none"}
        ``"none"`` returns ``image`` unchanged: for training images that are
        patches themselves and have no sky around them to estimate a
        background from.
    sectors : int
        ``sky_background``'s azimuth sectors (the model's
        ``background_sectors``; 0 for models saved before them).
    grey_scales : sequence of 3 floats, optional
        For models of monochrome cameras (``GREY_SCALES``): channel k is the
        excess of the channels' mean over the background of scale
        ``grey_scales[k]``, instead of each colour over one background.
    position : bool
        Append the three ``position_channels`` (the model's ``position``).
    template : array_like of shape (cells, cells, 3), optional
        The model's ``sky_template`` (``build_sky_template``), in noise
        levels: taken off the excess before the asinh.
    mask_bright : bool
        With ``template``: the backgrounds are taken from the sky less its
        ``bright_sky`` (the model's ``mask_bright``; False for models saved
        before it).

    Returns
    -------
    normalized : ndarray of shape (rows, cols, 3), or (rows, cols, 6) with ``position``, float32
        ``asinh((image - background) / (noise * NORMALIZE_SOFTENING))`` per
        channel (``sky_background``, ``pixel_noise``), 0 outside the sky;
        less the ``template`` where one is given; then, with ``position``,
        where each pixel lies.

    Notes
    -----
    The result does not change when a frame is made brighter or darker, or
    its colour balance changes, or a smooth glow (moon, twilight, haze,
    horizon) is added: only local structure above the sky's noise remains,
    which is what aurora is. P and U frames taken in different conditions
    then differ in their aurora, not in their sky.
    """
    if method == "none":
        return image
    if method != "background":
        raise ValueError(f"Invalid method: expected one of {NORMALIZATIONS}, received {method!r}")
    bright = None
    if template is not None and mask_bright:
        bright = bright_sky(image, sky, quantum, sectors, bool(grey_scales), template)
    if grey_scales:
        grey = image.mean(axis=2, keepdims=True, dtype=np.float32)
        normalized = np.empty((*image.shape[:2], len(grey_scales)), np.float32)
        for channel, scale in enumerate(grey_scales):  # one channel at a time: a 4096x4096 frame's is 64 MB
            normalized[..., channel] = _excess(grey, sky, quantum, sectors, scale, bright)[..., 0]
    else:
        normalized = _excess(image, sky, quantum, sectors, BACKGROUND_SCALE, bright)
    if template is not None:
        excess = np.float32(NORMALIZE_SOFTENING) * np.sinh(normalized)
        excess -= template_at(template, sky)
        excess /= np.float32(NORMALIZE_SOFTENING)
        normalized = np.arcsinh(excess, out=excess)  # in place: one full-size temporary, not three
    normalized[~sky] = 0.0
    if position:
        normalized = np.concatenate([normalized, position_channels(sky)], axis=2)
    return normalized


def position_channels(sky):
    """Where each pixel lies in the sky: ndarray of shape (rows, cols, 3), float32, 0 outside ``sky``.

    Channel 0 is the distance from the sky's centre (the zenith of a
    fisheye frame), channels 1 and 2 the offsets along rows (down) and
    columns (right); all in units of the sky's radius, times
    ``POSITION_SCALE``. So the rim is at ``POSITION_SCALE`` in channel 0,
    whatever the frame's size.
    """
    if not sky.any():
        return np.zeros((*sky.shape, 3), np.float32)
    down, right = np.broadcast_arrays(*sky_coordinates(sky))
    channels = np.stack([np.hypot(down, right), down, right], axis=2) * np.float32(POSITION_SCALE)
    channels[~sky] = 0.0
    return channels.astype(np.float32)


def sky_coordinates(sky):
    """Each row's and column's offset from the sky's centre, in sky radii: arrays of shape (rows, 1) and (1, cols).

    The centre and radius are those of the sky's bounding box, so a fisheye
    circle maps to the unit disc whatever the frame's size. ``sky`` must
    hold at least one pixel.
    """
    rows, cols = np.nonzero(sky)
    radius = max(rows.max() - rows.min(), cols.max() - cols.min(), 1) / 2
    down = ((np.arange(sky.shape[0], dtype=np.float32) - (rows.min() + rows.max()) / 2) / radius)[:, None]
    right = ((np.arange(sky.shape[1], dtype=np.float32) - (cols.min() + cols.max()) / 2) / radius)[None, :]
    return down, right


def _template_cells(sky, cells):
    """The (row, column) grid cell of every sky pixel: two int arrays over ``sky``'s True pixels, in row order."""
    down, right = sky_coordinates(sky)
    row = np.clip(((down + 1) / 2 * cells).astype(np.intp), 0, cells - 1)
    col = np.clip(((right + 1) / 2 * cells).astype(np.intp), 0, cells - 1)
    row, col = np.broadcast_arrays(row, col)
    return row[sky], col[sky]


def frame_template(excess, sky, cells=SKY_TEMPLATE_CELLS):
    """The median of ``excess`` (rows, cols, channels) in each of cells x cells cells of the sky.

    NaN in cells with less than a quarter of the fullest cell's sky pixels.
    """
    row, col = _template_cells(sky, cells)
    cell = row * cells + col
    order = np.argsort(cell, kind="stable")
    starts = np.searchsorted(cell[order], np.arange(cells * cells + 1))
    values = excess[sky][order]
    medians = np.full((cells * cells, excess.shape[2]), np.nan, np.float32)
    counts = np.diff(starts)
    # A cell the rim only grazes holds a few pixels and a noisy median: left to its neighbours.
    for index in np.flatnonzero(counts >= counts.max() / 4):
        medians[index] = np.median(values[starts[index]:starts[index + 1]], axis=0)
    return medians.reshape(cells, cells, excess.shape[2])


def sky_template(frame_templates):
    """The median of ``frame_template``s over frames, empty cells given their nearest filled cell's value.

    Returns an ndarray of shape (cells, cells, channels), float32, in noise
    levels (the model's ``sky_template``); zeros when no cell has sky.
    """
    from scipy import ndimage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # cells no frame's sky reaches: NaN, filled below
        template = np.nanmedian(np.stack(frame_templates), axis=0)
    empty = np.isnan(template[..., 0])
    if empty.all():
        return np.zeros_like(template, dtype=np.float32)
    if empty.any():
        _, (rows, cols) = ndimage.distance_transform_edt(empty, return_indices=True)
        template = template[rows, cols]
    return template.astype(np.float32)


def build_sky_template(paths, preprocessing, field_of_view=None, frames=SKY_TEMPLATE_FRAMES):
    """The ``sky_template`` of P's frames: their median excess at each place in the sky, in noise levels.

    Parameters
    ----------
    paths : list of pathlib.Path
        The P frame files; at most ``frames`` frames are read, from files
        spread evenly over the list. Unreadable files are passed over here
        (``frame_patches`` reports them).
    preprocessing : dict
        The model's settings, without a ``sky_template``. With
        ``mask_bright`` the frames are read twice: the bright sky is found
        against the template of the first reading, and the second adds what
        P's excess keeps above it once its bright sky is left out of the
        background (P's stars).
    field_of_view : ndarray of shape (rows, cols), bool, optional
        As for ``prepare_frame``.

    Returns
    -------
    ndarray of shape (SKY_TEMPLATE_CELLS, SKY_TEMPLATE_CELLS, 3), float32
        Cell (i, j) covers rows i and columns j of a SKY_TEMPLATE_CELLS grid
        over the sky's bounding square (``sky_coordinates``).
    """
    chosen = paths[:: max(1, math.ceil(len(paths) / frames))]
    template = sky_template(_frame_templates(chosen, {**preprocessing, "sky_template": None}, field_of_view,
                                             frames))
    if preprocessing.get("mask_bright"):
        residual = sky_template(_frame_templates(chosen, {**preprocessing, "sky_template": template.tolist()},
                                                 field_of_view, frames))
        template = template + residual
    return template


def _frame_templates(paths, preprocessing, field_of_view, frames):
    """``frame_template`` of each of the first ``frames`` readable frames of ``paths``, as prepared."""
    templates = []
    for path in paths:
        try:
            for frame in read_frames(path):
                if frame.error or len(templates) >= frames:
                    continue
                prepared = prepare_frame(frame.pixels, frame.full_scale, preprocessing, field_of_view)
                if prepared.sky.any():
                    # Laid over the circle, as normalize_frame reads it back.
                    excess = np.float32(NORMALIZE_SOFTENING) * np.sinh(prepared.model_input[..., :3])
                    templates.append(frame_template(excess, prepared.circle))
        except DataError:
            continue
    if not templates:
        raise DataError("no P frame could be read for the sky template")
    return templates


def template_at(template, sky):
    """``sky_template`` read at every pixel of a frame with this sky (bilinear): (rows, cols, channels) float32."""
    template = np.asarray(template, np.float32)
    if not sky.any():
        return np.zeros((*sky.shape, template.shape[2]), np.float32)
    down, right = sky_coordinates(sky)
    # Separable: rows (rows x cells) @ template @ columns (cells x cols), per channel.
    rows = _interpolation_matrix(down[:, 0], template.shape[0])
    cols = _interpolation_matrix(right[0], template.shape[1])
    return np.einsum("rk,klc,ql->rqc", rows, template, cols, optimize=True).astype(np.float32)


def _interpolation_matrix(offsets, cells):
    """Linear interpolation weights (len(offsets), cells) of cell centres at (k + 0.5) / cells across [-1, 1]."""
    position = np.clip((offsets + 1) / 2 * cells - 0.5, 0, cells - 1)
    lower = np.minimum(position.astype(np.intp), max(cells - 2, 0))
    weight = (position - lower).astype(np.float32)
    matrix = np.zeros((len(offsets), cells), np.float32)
    index = np.arange(len(offsets))
    matrix[index, lower] = 1 - weight
    if cells > 1:
        matrix[index, lower + 1] += weight
    return matrix


def _excess(image, sky, quantum, sectors, scale, leave_out=None):
    """``asinh((image - background) / (noise * NORMALIZE_SOFTENING))`` per channel, for ``normalize_frame``."""
    background = sky_background(image, sky, scale=scale, sectors=sectors, leave_out=leave_out)
    noise = pixel_noise(image, sky, 0.5 * quantum, background)
    normalized = background  # reused in place: one full-size temporary, not three
    np.subtract(image, background, out=normalized)
    normalized /= noise * np.float32(NORMALIZE_SOFTENING)
    return np.arcsinh(normalized, out=normalized)


def bright_sky(image, sky, quantum, sectors, grey, template):
    """The sky that stands above P's ``sky_template``: aurora, and what else P does not show there.

    Parameters
    ----------
    image : ndarray of shape (rows, cols, 3), float32
        The frame in [0, 1].
    sky : ndarray of shape (rows, cols), bool
    quantum, sectors
        As for ``normalize_frame``.
    grey : bool
        A monochrome camera's model: the channels' mean is looked at, against
        the template's first channel (the widest background scale).
    template : array_like of shape (cells, cells, 3)
        The model's ``sky_template``, in noise levels.

    Returns
    -------
    ndarray of shape (rows, cols), bool
        Sky pixels whose excess over a first background (``sky_background``
        of ``BACKGROUND_SCALE``), in noise levels, less the template, smoothed
        by ``BRIGHT_SMOOTHING`` pixels, exceeds ``BRIGHT_LEVELS`` in any
        channel; grown by ``BRIGHT_GROWTH`` pixels. None are (all False)
        where they would leave less than a fifth of the sky: a background
        needs sky to be taken from.
    """
    from scipy import ndimage

    if grey:
        image = image.mean(axis=2, keepdims=True, dtype=np.float32)
    # The excess a model without ``mask_bright`` sees, back in noise levels.
    excess = np.float32(NORMALIZE_SOFTENING) * np.sinh(_excess(image, sky, quantum, sectors, BACKGROUND_SCALE))
    excess -= template_at(template, sky)[..., :excess.shape[2]]
    excess[~sky] = 0.0
    above = ndimage.gaussian_filter(excess, (BRIGHT_SMOOTHING, BRIGHT_SMOOTHING, 0)).max(axis=2) > BRIGHT_LEVELS
    bright = ndimage.binary_dilation(above & sky, iterations=BRIGHT_GROWTH) & sky
    if bright.sum() > 0.8 * sky.sum():
        bright[:] = False
    return bright


class Prepared(NamedTuple):
    """A frame ready for the model.

    ``image`` (rows, cols, 3) float32 in [0, 1], for pictures and the mask
    refinement; ``model_input`` (rows, cols, 3) float32, what the model's
    patches are cut from; ``sky`` (rows, cols) bool, where patches are
    drawn, scored and masked; ``sky_found``, False when no fisheye border
    was found and the whole frame counts as sky; ``quantum``, one count of
    the frame in ``image`` units; ``circle`` (rows, cols) bool, the sky the
    frame was prepared over: ``sky`` before a ``Horizon`` cut.
    """

    image: np.ndarray
    model_input: np.ndarray
    sky: np.ndarray
    sky_found: bool
    quantum: float
    circle: np.ndarray


def frame_range(full_scale, preprocessing):
    """The (low, high) counts a frame of this full scale is scaled by under ``preprocessing``.

    The camera's range when the frame has the full scale the model was
    trained on, else the frame's own full scale (``0`` to 255 or 65535).
    """
    camera_range = preprocessing.get("camera_range")
    if camera_range and preprocessing.get("full_scale") == full_scale:
        return tuple(camera_range)
    return 0.0, float(full_scale)


def prepare_frame(pixels, full_scale, preprocessing, field_of_view=None):
    """Scale, find the sky of, and normalize one frame, as the model was trained (``Prepared``).

    Parameters
    ----------
    pixels : ndarray of shape (rows, cols, 3), float32
        Counts (``Frame.pixels``).
    full_scale : float
        ``Frame.full_scale``.
    preprocessing : dict
        The model's settings (``LEGACY_PREPROCESSING`` keys): ``normalize``,
        ``camera_range`` and ``full_scale``.
    field_of_view : ndarray of shape (rows, cols), bool, or Horizon, optional
        The user's sky (``user_sky``): a bool array, or the horizon to cut
        from the sky found; default: ``sky_mask``, cut at the model's own
        ``min_elevation`` when it has one (``--min_elevation`` without a
        map in training).
    """
    low, high = frame_range(full_scale, preprocessing)
    image = scale_counts(pixels, low, high)
    if field_of_view is None and preprocessing.get("min_elevation") is not None:
        field_of_view = Horizon(preprocessing["min_elevation"])
    if field_of_view is None or isinstance(field_of_view, Horizon):
        sky = sky_mask(image)
        found = not sky.all()
    else:
        if field_of_view.shape != image.shape[:2]:
            raise DataError(f"the field of view is {field_of_view.shape[0]}x{field_of_view.shape[1]} but the "
                            f"frame is {image.shape[0]}x{image.shape[1]}")
        sky, found = field_of_view, True
    quantum = 1.0 / (high - low)
    model_input = normalize_frame(image, sky, quantum, preprocessing.get("normalize", "none"),
                                  preprocessing.get("background_sectors", 0), preprocessing.get("grey_scales"),
                                  bool(preprocessing.get("position")), preprocessing.get("sky_template"),
                                  bool(preprocessing.get("mask_bright")))
    # The background, the template and the positions are those of the whole
    # circle, whatever the cut: it only narrows the sky that is used.
    used = field_of_view.cut(sky) if isinstance(field_of_view, Horizon) else sky
    return Prepared(image, model_input, used, found, quantum, sky)


def import_keras(show_backend_logs=False):
    """Import Keras for a command-line tool, without the backend's start-up chatter.

    TensorFlow prints C++ log lines to the terminal when it loads (oneDNN
    notes, "Could not find cuda drivers", and on a machine without a GPU an
    ``E0000 ... failed call to cuInit`` that reads like a failure). Some of
    them are written before its logging reads ``TF_CPP_MIN_LOG_LEVEL``, so
    the import runs with the process's standard error sent to a temporary
    file, replayed only if the import fails. ``show_backend_logs`` (the
    ``--backend_logs`` flag, or ``TF_CPP_MIN_LOG_LEVEL`` set by the user)
    leaves everything as the backend prints it.
    """
    import os
    import tempfile

    if show_backend_logs or "keras" in sys.modules or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        import keras

        return keras
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # later messages, such as the cuInit error, too
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            import keras
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return keras


# ------------------------------------------------------------ the model: saving, loading, feeding

# The member of a ``.keras`` file that holds its preprocessing; Keras ignores
# it, so ``keras.models.load_model`` still reads the file without this project.
PREPROCESSING_MEMBER = "aurora_preprocessing.json"


def save_model(model, path, preprocessing):
    """Save ``model`` to the ``.keras`` file ``path`` with its ``preprocessing`` inside.

    The file is written under a temporary name and renamed, so an
    interrupted save never leaves a file that looks complete.
    """
    import zipfile

    path = Path(path)
    partial = path.with_name(f".{path.stem}.partial.keras")
    model.save(partial)
    with zipfile.ZipFile(partial, "a") as archive:
        archive.writestr(PREPROCESSING_MEMBER, json.dumps(preprocessing, indent=2))
    partial.replace(path)


def load_model(path):
    """Load a ``.keras`` patch classifier and the preprocessing it was trained with.

    Parameters
    ----------
    path : str or pathlib.Path
        A ``.keras`` file made of stock Keras layers (``train.py``'s, or
        any model with the same input and output).

    Returns
    -------
    model : keras.Model
        Input ``(None, patch, patch, 3)`` float32 (6 channels with
        ``position``), output ``(None, 1)``: one logit per patch, > 0 =
        background.
    preprocessing : dict
        What ``prepare_frame`` needs; ``LEGACY_PREPROCESSING`` for a file
        without it (a model saved before preprocessing existed, or by hand):
        frames divided by their full scale, not normalized.

    Raises
    ------
    UsageError
        The file is missing, is not ``.keras``, cannot be loaded, has the
        wrong input or output shape, or needs a newer version of this
        project. The message names the file.
    """
    import zipfile

    path = check_model_path(path)
    import keras

    try:
        # compile=False: inference needs no loss, and the training loss is a
        # custom object that only resolves where PULoss is imported.
        model = keras.models.load_model(path, compile=False)
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            preprocessing = (json.loads(archive.read(PREPROCESSING_MEMBER)) if PREPROCESSING_MEMBER in names
                             else dict(LEGACY_PREPROCESSING))
    except (ValueError, KeyError, TypeError, OSError, zipfile.BadZipFile) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot load model {path}: {first_line}") from None
    if preprocessing.get("version", 0) > PREPROCESSING_VERSION:
        raise UsageError(f"model {path} was saved by a newer version of this project (preprocessing version "
                         f"{preprocessing['version']}); update the project to use it")
    patch_size_of(model, name=path)
    if model.input_shape[3] != input_channels(preprocessing):
        raise UsageError(f"invalid model {path}: its input has {model.input_shape[3]} channels but its "
                         f"preprocessing gives {input_channels(preprocessing)}")
    output_shape = model.output_shape
    if not (isinstance(output_shape, tuple) and len(output_shape) == 2 and output_shape[1] == 1):
        raise UsageError(f"invalid model {path}: expected output shape (None, 1), received {output_shape}")
    return model, preprocessing


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
        Must have input shape ``(None, patch, patch, channels)`` with
        ``patch`` an int and ``channels`` 3, or 6 for a model that also sees
        where a patch lies (``position_channels``).
    name : str or Path
        What to call the model in the error message (its file).

    Raises
    ------
    UsageError
        If the input shape is anything else (several inputs, unknown or
        non-square size, not 3 or 6 channels).
    """
    shape = model.input_shape
    valid = (
        isinstance(shape, tuple)
        and len(shape) == 4
        and isinstance(shape[1], int)
        and shape[1] > 0
        and shape[1] == shape[2]
        and shape[3] in (3, 6)
    )
    if not valid:
        raise UsageError(f"invalid model {name}: expected input shape (None, patch, patch, 3) (or 6 channels with "
                         f"positions), received {shape}")
    return shape[1]


def input_channels(preprocessing):
    """Channels of the patches a model with this ``preprocessing`` takes: 3, or 6 with ``position``."""
    return 6 if preprocessing.get("position") else 3


# One compiled forward pass per loaded model, made for the Keras backend in
# use. The functions hold only a weak reference to the model, so that the
# cache entry (and the compiled graph) goes away with it.
_FORWARD_PASSES = weakref.WeakKeyDictionary()


def _forward_pass(model):
    """A function from a (n, p, p, channels) float32 array to the model's (n, 1) logits in inference mode."""
    forward = _FORWARD_PASSES.get(model)
    if forward is not None:
        return forward
    import keras

    model_ref = weakref.ref(model)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        # A tf.function with a None batch dimension, traced once for every
        # batch size: cheaper per call than predict_on_batch.
        patch_size = patch_size_of(model)
        spec = tf.TensorSpec((None, patch_size, patch_size, model.input_shape[3]), tf.float32)
        forward = tf.function(lambda patches: model_ref()(patches, training=False), input_signature=[spec])
    elif backend == "jax":
        import jax

        # A jitted stateless call; predict_logits pads batches to a few
        # sizes, so it compiles a few times, not once per batch size.
        jitted = jax.jit(lambda trainable, other, patches: model_ref().stateless_call(
            trainable, other, patches, training=False)[0])

        def forward(patches):
            model = model_ref()
            return jitted([v.value for v in model.trainable_variables],
                          [v.value for v in model.non_trainable_variables], patches)
    else:
        def forward(patches):
            return keras.ops.convert_to_numpy(model_ref().predict_on_batch(patches))
    _FORWARD_PASSES[model] = forward
    return forward


def predict_logits(model, patches, batch_size=256):
    """Feed patches to the model in inference mode and return their logits.

    This is the one place where a trained model is called, by training
    (validation, the prior) and segmentation alike, on every Keras backend.

    Parameters
    ----------
    model : keras.Model
        Input ``(None, patch, patch, channels)``, output ``(None, 1)``.
    patches : ndarray of shape (n, patch, patch, channels), float32
        Prepared as the model was trained (``prepare_frame``).
    batch_size : int
        Patches per model call; bounds the activation memory.

    Returns
    -------
    logits : ndarray of shape (n,), float32
        One logit per patch; > 0 means background, P(aurora) = sigmoid(-logit).
    """
    import keras

    forward = _forward_pass(model)
    # JAX compiles once per batch shape, and TensorFlow's CPU kernels keep a
    # cache entry per shape (memory grew with every new batch size: a long
    # archive run met hundreds of them). A short batch is padded to the next
    # power of two, so that few shapes ever occur.
    pad = keras.backend.backend() in ("jax", "tensorflow")
    logits = np.empty(len(patches), dtype=np.float32)
    for start in range(0, len(patches), batch_size):
        batch = np.ascontiguousarray(patches[start : start + batch_size], dtype=np.float32)
        count = len(batch)
        if pad and count < batch_size:
            padded = min(batch_size, 1 << (count - 1).bit_length())
            batch = np.concatenate([batch, np.zeros((padded - count, *batch.shape[1:]), np.float32)])
        # (batch, 1) logits -> (batch,)
        logits[start : start + count] = np.asarray(forward(batch), dtype=np.float32).reshape(-1)[:count]
    return logits


# ------------------------------------------------------------ patches

def _check_count(value, argument):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Invalid {argument}: expected an integer >= 1, received {value!r}")
    return int(value)


def extract_patches(image, patch_size, n=None, stride=None, rng=None, name=None):
    """Square patches of an image: ``n`` at random positions or a regular grid every ``stride`` pixels.

    Parameters
    ----------
    image : ndarray of shape (rows, cols, channels)
        Any dtype; patches are returned as float32.
    patch_size : int
        Patch side in pixels.
    n : int, optional
        Number of random patches; top-left corners are uniform over every
        position where the patch fits, drawn with replacement.
    stride : int, optional
        Grid step in pixels; top-left corners at (0, 0), (0, stride), ...
        in row-major order, last ones where the patch still fits.
    rng : numpy.random.Generator, optional
        Source of the random positions (``n`` only); a fresh unseeded one if
        omitted.
    name : str, optional
        File name used in error messages.

    Returns
    -------
    patches : ndarray of shape (k, patch_size, patch_size, channels), float32
        k = n for random patches; for the grid, the windows per axis
        multiplied: ``((rows - patch_size) // stride + 1) * ((cols - patch_size) // stride + 1)``
        (no padding: a margin narrower than the stride is not covered).

    Raises
    ------
    DataError
        The image is smaller than the patch in either axis.
    ValueError
        Not exactly one of ``n`` and ``stride``, or a size below 1.

    Notes
    -----
    Patches are gathered from ``numpy.lib.stride_tricks.sliding_window_view``,
    a zero-copy view, so only the k returned patches are ever copied. An
    image exactly patch-sized has a single position and gives one patch in
    either mode.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"Invalid image: expected shape (rows, cols, channels), received {image.shape}")
    patch_size = _check_count(patch_size, "patch_size")
    if (n is None) == (stride is None):
        raise ValueError(f"Invalid arguments: give exactly one of n and stride, received n={n!r}, stride={stride!r}")
    rows, cols = image.shape[:2]
    if rows < patch_size or cols < patch_size:
        where = f"{name}: " if name else ""
        raise DataError(f"{where}image is {rows}x{cols} pixels, smaller than the {patch_size}x{patch_size} patch")
    # (rows - p + 1, cols - p + 1, channels, p, p) -> (..., p, p, channels), still a view.
    windows = np.lib.stride_tricks.sliding_window_view(image, (patch_size, patch_size), axis=(0, 1))
    windows = windows.transpose(0, 1, 3, 4, 2)
    if n is not None:
        n = _check_count(n, "n")
        if rows == patch_size and cols == patch_size:
            n = 1
        rng = np.random.default_rng() if rng is None else rng
        top = rng.integers(0, rows - patch_size + 1, size=n)
        left = rng.integers(0, cols - patch_size + 1, size=n)
    else:
        stride = _check_count(stride, "stride")
        top, left = np.meshgrid(np.arange(0, rows - patch_size + 1, stride),
                                np.arange(0, cols - patch_size + 1, stride), indexing="ij")
        top, left = top.ravel(), left.ravel()
    return windows[top, left].astype(np.float32, copy=False)


def get_data(folder, patch_size, n_per_image, rng, quiet=False):
    """Random patches from every image of a folder (the seed's name).

    Parameters
    ----------
    folder : str or pathlib.Path
        Folder of images, read with ``list_images``.
    patch_size : int
        Patch side in pixels.
    n_per_image : int
        Random patches per image; an image exactly patch-sized gives its one patch.
    rng : numpy.random.Generator
        Source of the patch positions.
    quiet : bool
        No progress bar.

    Returns
    -------
    patches : ndarray of shape (n, patch_size, patch_size, 3), float32
        Images in name order, ``n_per_image`` consecutive patches each.

    Raises
    ------
    DataError
        The folder is missing or empty, or no image in it could be used.

    Notes
    -----
    Images are read one at a time and only their patches are kept, so a
    folder of 2,000 480x480 frames costs 2,000 * n_per_image patches of memory,
    not the 5.5 GB the frames would take as float32. Frames of different sizes
    are fine. A corrupt file or an image smaller than the patch is reported
    with ``warnings.warn`` and skipped, so that one bad frame in thousands is
    not fatal.
    """
    from tqdm.auto import tqdm

    patch_size = _check_count(patch_size, "patch_size")
    n_per_image = _check_count(n_per_image, "n_per_image")
    paths = list_images(folder)
    patches = []
    for path in tqdm(paths, desc=f"patches from {Path(folder).name or folder}", unit="image", disable=quiet):
        try:
            image = read_image(path)
            patches.append(extract_patches(image, patch_size, n=n_per_image, rng=rng, name=str(path)))
        except DataError as error:
            warnings.warn(f"skipping {error}", stacklevel=2)
    if not patches:
        raise DataError(f"{folder}: none of its {len(paths)} image files could be used "
                        f"for {patch_size}x{patch_size} patches")
    return np.concatenate(patches)


def sample_patches(image, sky, patch_size, n, rng):
    """``n`` random patches of ``image`` whose centre pixel is sky, drawn with replacement.

    Parameters
    ----------
    image : ndarray of shape (rows, cols, channels)
        At least ``patch_size`` in both axes.
    sky : ndarray of shape (rows, cols), bool
    patch_size, n : int
    rng : numpy.random.Generator

    Returns
    -------
    patches : ndarray of shape (n, patch_size, patch_size, channels), float32
        Patches lie wholly inside the frame, so their centres are at least
        ``patch_size // 2`` pixels from its edges; when no sky pixel is that
        far in, any position is used.
    centres : ndarray of shape (n, 2), int
        (row, col) of each patch's centre pixel.
    """
    rows, cols = image.shape[:2]
    centre = patch_size // 2
    allowed = sky[centre:rows - patch_size + 1 + centre, centre:cols - patch_size + 1 + centre]
    tops, lefts = np.nonzero(allowed)
    if tops.size == 0:
        tops, lefts = np.nonzero(np.ones((rows - patch_size + 1, cols - patch_size + 1), bool))
    chosen = rng.integers(0, tops.size, size=n)
    windows = np.lib.stride_tricks.sliding_window_view(image, (patch_size, patch_size), axis=(0, 1))
    patches = windows[tops[chosen], lefts[chosen]].transpose(0, 2, 3, 1).astype(np.float32)
    return patches, np.stack([tops[chosen] + centre, lefts[chosen] + centre], axis=1)


def sky_conditions(prepared):
    """A short description of a frame's sky, to compare frames: ndarray of shape (7,), float32.

    Taken from the darkest parts of the sky, which aurora rarely fills, as
    logs of ratios: the 5th percentile of the sky per channel; that of its
    outer rim (beyond 0.8 of the radius) over that of its middle (horizon
    glow, twilight); of its brighter half over its darker half (moonlight
    from one side); of the brightest eighth of the rim over the whole rim
    (a town's glow on one horizon); and the pixel noise over the level.
    Aurora that fills half the sky moves the last three as well.
    """
    image, sky = prepared.image, prepared.sky
    if not sky.any():
        sky = np.ones(sky.shape, bool)
    rows, cols = np.nonzero(sky)
    centre_row, centre_col = (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2
    radius = max(rows.max() - rows.min(), cols.max() - cols.min()) / 2 + 1
    step = max(1, len(rows) // 50_000)
    rows, cols = rows[::step], cols[::step]
    pixels = image[rows, cols]
    distance = np.hypot(rows - centre_row, cols - centre_col) / radius
    angle = np.arctan2(rows - centre_row, cols - centre_col)

    def dark(chosen):
        return float(np.percentile(pixels[chosen].mean(axis=1), 5)) + 1e-3 if chosen.any() else 1e-3

    level = np.percentile(pixels, 5, axis=0) + 1e-3
    turns = np.linspace(0, np.pi, 4, endpoint=False)
    side = max(abs(np.log(dark((np.cos(angle - turn) > 0) & (distance < 0.8))
                          / dark((np.cos(angle - turn) < 0) & (distance < 0.8)))) for turn in turns)
    rim = dark(distance > 0.8)
    eighth = np.floor((angle + np.pi) / (np.pi / 4)).astype(int) % 8
    rim_side = max(np.log(dark((distance > 0.8) & (eighth == k)) / rim) for k in range(8))
    noise = float(np.mean(pixel_noise(image, prepared.sky, 0.5 * prepared.quantum)))
    return np.array([*np.log(level), np.log(rim / dark(distance < 0.5)), side, rim_side,
                     np.log((noise + 1e-4) / level.mean())], np.float32)


class PatchSet(NamedTuple):
    """Patches of many frames: ``patches`` (n, p, p, 3) float32 cut from the prepared frames,
    ``frame_of`` (n,) int the frame of each patch, ``centres`` (n, 2) int its centre (row, col)
    in that frame, ``names`` the frames' names in reading order, ``conditions`` (frames, 7) their
    ``sky_conditions``, ``skyless`` the names of frames in which no fisheye border was found, and
    ``unseen`` (m, p, p, 3) float32 or None, more patches of the same frames drawn separately
    (other random positions, which may overlap the first ones), to check a model trained on
    ``patches`` on patches apart from them."""

    patches: np.ndarray
    frame_of: np.ndarray
    centres: np.ndarray
    names: list
    conditions: np.ndarray
    skyless: list
    unseen: np.ndarray = None


def frame_patches(paths, patch_size, total, rng, preprocessing, field_of_view=None, quiet=False, desc="patches",
                  unseen=0, unseen_rng=None):
    """About ``total`` random patches with sky centres, from every frame of the files ``paths``.

    Parameters
    ----------
    paths : list of pathlib.Path
        Frame files (``list_images``); multi-frame files give patches from
        each of their frames.
    patch_size : int
    total : int
        Patches wanted: ``ceil(total / files)`` per file, shared among its
        frames, so a file of many frames does not outweigh the others.
    rng : numpy.random.Generator
    preprocessing : dict
        How frames are prepared (``prepare_frame``).
    field_of_view : ndarray of shape (rows, cols), bool, optional
    quiet : bool
        No progress bar.
    desc : str
        Progress bar label.
    unseen : int
        At most this many more patches, spread over the frames the same way
        and drawn with ``unseen_rng``, so that ``rng``'s draws, and with them
        the training patches, are the same with or without them.
    unseen_rng : numpy.random.Generator, optional
        Needed when ``unseen`` > 0.

    Returns
    -------
    PatchSet

    Raises
    ------
    DataError
        No frame could be used. Unreadable frames and frames smaller than the
        patch are reported with ``warnings.warn`` and skipped, so that one bad
        frame in thousands is not fatal.

    Notes
    -----
    Frames are read and prepared one at a time and only their patches are
    kept: a folder of 2,000 480x480 frames costs its patches of memory, not
    the 5.5 GB the frames would take as float32.
    """
    from tqdm.auto import tqdm

    patch_size = _check_count(patch_size, "patch_size")
    per_file = max(1, math.ceil(_check_count(total, "total") / len(paths)))
    unseen_per_file = math.ceil(unseen / len(paths))
    patches, frame_of, centres, names, conditions, skyless, extra = [], [], [], [], [], [], []
    for path in tqdm(paths, desc=desc, unit="file", disable=quiet):
        try:
            frames = [frame for frame in read_frames(path) if _usable(frame)]
        except DataError as error:
            warnings.warn(f"skipping {error}", stacklevel=2)
            continue
        per_frame = max(1, math.ceil(per_file / max(1, len(frames))))
        for frame in frames:
            rows, cols = frame.pixels.shape[:2]
            if rows < patch_size or cols < patch_size:
                warnings.warn(f"skipping {frame.source}: image is {rows}x{cols} pixels, smaller than the "
                              f"{patch_size}x{patch_size} patch", stacklevel=2)
                continue
            prepared = prepare_frame(frame.pixels, frame.full_scale, preprocessing, field_of_view)
            cut, where = sample_patches(prepared.model_input, prepared.sky, patch_size, per_frame, rng)
            if unseen_per_file:
                extra.append(sample_patches(prepared.model_input, prepared.sky, patch_size,
                                            math.ceil(unseen_per_file / max(1, len(frames))), unseen_rng)[0])
            patches.append(cut)
            centres.append(where)
            frame_of.append(np.full(per_frame, len(names)))
            names.append(frame.name)
            conditions.append(sky_conditions(prepared))
            if not prepared.sky_found and min(rows, cols) > 4 * patch_size:
                skyless.append(frame.name)
    if not patches:
        raise DataError(f"{paths[0].parent}: none of its {len(paths)} files gave a frame usable "
                        f"for {patch_size}x{patch_size} patches")
    patches, frame_of, centres = np.concatenate(patches), np.concatenate(frame_of), np.concatenate(centres)
    if len(patches) > total:
        keep = np.sort(rng.choice(len(patches), total, replace=False))
        patches, frame_of, centres = patches[keep], frame_of[keep], centres[keep]
    extra = np.concatenate(extra) if extra else None
    if extra is not None and len(extra) > unseen:
        extra = extra[np.sort(unseen_rng.choice(len(extra), unseen, replace=False))]
    return PatchSet(patches, frame_of, centres, names, np.stack(conditions), skyless, extra)


def _usable(frame):
    if frame.error:
        warnings.warn(f"skipping {frame.error}", stacklevel=3)
        return False
    return True


def survey_frames(paths, patch_size, files=40):
    """What training needs to know of its frames before it reads them all: their scale and size.

    Reads every frame of up to ``files`` files spread evenly over ``paths``.

    Returns
    -------
    survey : dict
        ``full_scale`` (of most frames), ``camera_range`` (``estimate_camera_range``
        over the frames of that full scale), ``min_side`` (the smallest
        frame side seen) and ``grey`` (every frame seen has three equal
        channels: a monochrome camera).
    """
    chosen = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, min(files, len(paths))).astype(int))]
    by_scale, min_side, grey = {}, None, True
    for path in chosen:
        try:
            for frame in read_frames(path):
                if frame.pixels is None:
                    continue
                by_scale.setdefault(frame.full_scale, []).append(frame.pixels[::3, ::3])
                side = min(frame.pixels.shape[:2])
                grey = grey and _is_grey(frame.pixels)
                min_side = side if min_side is None else min(min_side, side)
        except DataError:
            continue  # frame_patches reports it
    if not by_scale:
        return {"full_scale": 255.0, "camera_range": [0.0, 255.0], "min_side": patch_size, "grey": False}
    full_scale = max(by_scale, key=lambda scale: len(by_scale[scale]))
    return {"full_scale": full_scale, "camera_range": list(estimate_camera_range(by_scale[full_scale], full_scale)),
            "min_side": min_side, "grey": grey}


def _is_grey(pixels):
    """Whether a frame's three channels are equal: grey, repeated (``Frame``)."""
    return bool(np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2]))


PU_LABELS = (1.0, -1.0)
PNU_LABELS = (1.0, -1.0, 0.0)


def check_labels(labels, allowed=PU_LABELS):
    """Refuse labels outside the convention, before they reach a loss that cannot refuse them.

    ``PULoss`` runs inside a compiled graph and cannot raise: labels other
    than +1 (positive) and -1 (unlabeled) are silently ignored there, and
    0/1 labels make every batch look as if it had no unlabeled sample.

    Raises
    ------
    ValueError
        A label outside ``allowed``, naming it.
    """
    values = np.unique(np.asarray(labels, dtype=np.float64))
    wrong = [value for value in values if value not in allowed]
    if wrong:
        names = "+1 positive, -1 unlabeled" if len(allowed) == 2 else "+1 positive, -1 negative, 0 unlabeled"
        raise ValueError(f"Invalid labels: expected {names}, received {', '.join(f'{v:g}' for v in wrong[:5])}")


def data_shuffle(X, Y, seed, allowed=PU_LABELS):
    """The same reproducible random permutation of samples and labels (the seed's name).

    Parameters
    ----------
    X : ndarray of shape (n, ...)
    Y : ndarray of shape (n, ...)
        Labels: +1 positive, -1 unlabeled (PNU: ``allowed=PNU_LABELS``, -1
        negative, 0 unlabeled); others are refused (``check_labels``).
    seed : int
        Same seed, same permutation.
    allowed : tuple of float
        The label values accepted.

    Returns
    -------
    X, Y : ndarrays
        Shuffled copies.
    """
    X, Y = np.asarray(X), np.asarray(Y)
    if len(X) != len(Y):
        raise ValueError(f"Invalid arrays: expected as many labels as samples, "
                         f"received {len(X)} samples and {len(Y)} labels")
    check_labels(Y, allowed)
    order = np.random.default_rng(seed).permutation(len(X))
    return X[order], Y[order]


# ------------------------------------------------------------ batches

def augment_patches(patches, rng, offset=0.0):
    """Each patch in one of its 8 orientations (flips and 90-degree rotations), chosen at random.

    The sky in a fisheye frame has no preferred orientation, so every
    symmetry of the square is an equally plausible view of the same sky.

    Parameters
    ----------
    patches : ndarray of shape (n, p, p, channels)
        Square patches; not modified.
    rng : numpy.random.Generator
    offset : float
        For patches of ``normalize_frame``'s excess: each patch's first
        three channels are also moved by its own random amount, uniform in
        [-offset, offset] noise levels per channel (in the excess, before
        the asinh; outside the sky they stay 0). See ``train.BACKGROUND_JITTER``.

    Returns
    -------
    augmented : ndarray of shape (n, p, p, channels), same dtype
    """
    orientation = rng.integers(0, 8, size=len(patches))
    augmented = np.empty_like(patches)
    # One vectorised transform per orientation class rather than per sample.
    for code in range(8):
        chosen = np.flatnonzero(orientation == code)
        if chosen.size == 0:
            continue
        block = np.rot90(patches[chosen], k=code % 4, axes=(1, 2))
        augmented[chosen] = block[:, :, ::-1] if code >= 4 else block
    if offset:
        augmented = shift_excess(augmented, rng.uniform(-offset, offset, size=(len(augmented), 1, 1, 3)))
    return augmented


def shift_excess(patches, levels):
    """Patches of ``normalize_frame``'s output with their excess moved by ``levels`` noise levels.

    Parameters
    ----------
    patches : ndarray of shape (n, p, p, channels), float32
        Not modified. The first three channels are the excess (asinh of
        noise levels over ``NORMALIZE_SOFTENING``); position channels, if
        any, are kept.
    levels : float or array_like broadcastable to (n, 1, 1, 3)
        Added to the excess before the asinh, per patch and channel.

    Returns
    -------
    ndarray like ``patches``; the outside of the sky (every channel 0) stays 0.
    """
    shifted = patches.copy()
    sky = (patches != 0).any(axis=-1, keepdims=True)
    softening = np.float32(NORMALIZE_SOFTENING)
    moved = np.arcsinh(np.sinh(patches[..., :3]) + np.asarray(levels, np.float32) / softening)
    shifted[..., :3] = np.where(sky, moved, 0.0)
    return shifted


def _stream_indices(seed, stream, length, start, count):
    """Positions ``start .. start + count`` of an endless stream of fresh permutations of ``range(length)``."""
    positions = np.arange(start, start + count)
    cycles = positions // length
    indices = np.empty(count, dtype=np.int64)
    for cycle in np.unique(cycles):
        order = np.random.default_rng([seed, 0, stream, int(cycle)]).permutation(length)
        chosen = cycles == cycle
        indices[chosen] = order[positions[chosen] % length]
    return indices


def _check_patches(array, argument):
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 4 or array.shape[0] == 0:
        raise ValueError(f"Invalid {argument}: expected patches of shape (n >= 1, p, p, channels), "
                         f"received {array.shape}")
    return array


def _check_batch_size(batch_size, minimum):
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < minimum:
        raise ValueError(f"Invalid batchsize: every batch needs at least {minimum} patches, one per class, "
                         f"received {batch_size!r}")
    return int(batch_size)


def _check_fraction(value, argument):
    if not 0.0 < value < 1.0:
        raise ValueError(f"Invalid {argument}: expected 0 < {argument} < 1, received {value}")
    return float(value)


class _Batches:
    """Batches drawn from several labelled patch streams in fixed numbers per batch.

    The last stream (U) defines the epoch: each epoch visits its samples
    once in a fresh order. The other streams cycle through reshuffled
    permutations for as long as training lasts. Every batch is a pure
    function of (seed, epoch, batch index), so the batches are reproducible.
    ``batches[i]`` is batch i of the current epoch (``epoch``); iterating
    yields batches epoch after epoch without end, which is what
    ``model.fit(iter(batches), steps_per_epoch=len(batches))`` consumes on
    every Keras backend.
    """

    def __init__(self, arrays, labels, counts, seed, augment, steps_per_epoch, offset=0.0):
        self.arrays, self.counts, self.offset = arrays, counts, float(offset)
        # (batch,) labels, the same for every batch: streams in order.
        self.labels = np.concatenate([np.full(count, label, np.float32) for label, count in zip(labels, counts)])
        self.seed, self.augment = int(seed), bool(augment)
        if steps_per_epoch is None:
            self.steps = math.ceil(len(arrays[-1]) / counts[-1])
        else:
            self.steps = _check_count(steps_per_epoch, "steps_per_epoch")
        self.epoch = 0
        self._epoch_order = (None, None)

    def __len__(self):
        return self.steps

    def _unlabeled_order(self):
        epoch, order = self._epoch_order
        if epoch != self.epoch:
            order = np.random.default_rng([self.seed, 1, self.epoch]).permutation(len(self.arrays[-1]))
            self._epoch_order = (self.epoch, order)
        return order

    def __getitem__(self, index):
        if not 0 <= index < self.steps:
            raise IndexError(f"batch index {index} out of range for {self.steps} batches")
        parts = []
        for stream, (array, count) in enumerate(zip(self.arrays[:-1], self.counts[:-1])):
            start = (self.epoch * self.steps + index) * count
            parts.append(array[_stream_indices(self.seed, stream, len(array), start, count)])
        # The last batch of an epoch wraps to the start of the epoch's
        # order, so that every batch has the same shape.
        count = self.counts[-1]
        positions = np.arange(index * count, (index + 1) * count) % len(self.arrays[-1])
        parts.append(self.arrays[-1][self._unlabeled_order()[positions]])
        x = np.concatenate(parts)
        if self.augment:
            x = augment_patches(x, np.random.default_rng([self.seed, 2, self.epoch, index]), self.offset)
        return x, self.labels

    def on_epoch_end(self):
        self.epoch += 1

    def __iter__(self):
        while True:
            for index in range(self.steps):
                yield self[index]
            self.on_epoch_end()


class PUBatches(_Batches):
    """PU batches for ``model.fit``; see ``make_pu_dataset`` for the arguments.

    ``batches[i]`` is ``(x, y)``: x (batch_size, p, p, 3) float32 with the
    n_p P patches first, y (batch_size,) float32, +1 for P and -1 for U.
    """

    def __init__(self, P, U, batch_size, p_fraction=0.5, seed=0, augment=True, steps_per_epoch=None, offset=0.0):
        P, U = _check_patches(P, "P"), _check_patches(U, "U")
        batch_size = _check_batch_size(batch_size, 2)
        n_p = int(np.clip(round(batch_size * _check_fraction(p_fraction, "p_fraction")), 1, batch_size - 1))
        super().__init__([P, U], [1.0, -1.0], [n_p, batch_size - n_p], seed, augment, steps_per_epoch, offset)


class PNUBatches(_Batches):
    """PNU batches for ``model.fit``; see ``make_pnu_dataset`` for the arguments.

    ``batches[i]`` is ``(x, y)``: P patches first, then N, then U; y is
    +1 for P, -1 for N and 0 for U.
    """

    def __init__(self, P, N, U, batch_size, p_fraction=1 / 3, n_fraction=1 / 3, seed=0, augment=True,
                 steps_per_epoch=None, offset=0.0):
        P, N, U = _check_patches(P, "P"), _check_patches(N, "N"), _check_patches(U, "U")
        batch_size = _check_batch_size(batch_size, 3)
        n_p = int(np.clip(round(batch_size * _check_fraction(p_fraction, "p_fraction")), 1, batch_size - 2))
        n_n = int(np.clip(round(batch_size * _check_fraction(n_fraction, "n_fraction")), 1, batch_size - n_p - 1))
        super().__init__([P, N, U], [1.0, -1.0, 0.0], [n_p, n_n, batch_size - n_p - n_n], seed, augment,
                         steps_per_epoch, offset)


def make_pu_dataset(P, U, batch_size, p_fraction=0.5, seed=0, augment=True, steps_per_epoch=None, offset=0.0):
    """Training batches for PU learning in which every batch holds both P and U patches.

    Parameters
    ----------
    P : ndarray of shape (n_P, p, p, 3), float32
        Positive (background) patches, label +1.
    U : ndarray of shape (n_U, p, p, 3), float32
        Unlabeled patches, label -1.
    batch_size : int
        Patches per batch, at least 2.
    p_fraction : float
        Share of P in a batch, in (0, 1):
        ``n_p = clip(round(batch_size * p_fraction), 1, batch_size - 1)`` and
        ``n_u = batch_size - n_p``.
    seed : int
        Same seed, same batches, epoch after epoch.
    augment : bool
        Each patch in a random one of its 8 orientations (``augment_patches``).
    steps_per_epoch : int, optional
        Batches per epoch; default ``ceil(n_U / n_u)``, so that one epoch
        visits every U patch once (the last batch wraps around to the start).
    offset : float
        With ``augment``, each patch's excess also moved by up to this many
        noise levels (``augment_patches``); 0 for patches that are not
        ``normalize_frame``'s excess.

    Returns
    -------
    batches : PUBatches
        ``batches[i]`` is ``(x, y)`` with x of shape (batch_size, p, p, 3)
        float32, the n_p P patches first, and y of shape (batch_size,)
        float32: +1 for P, -1 for U. Train with
        ``model.fit(iter(batches), steps_per_epoch=len(batches), epochs=...)``.

    Raises
    ------
    ValueError
        batch_size below 2, p_fraction outside (0, 1), or empty P or U.

    Notes
    -----
    The nnPU correction is meaningless in a batch without positives, and with
    100 P against 2,000 U a plain shuffle puts none in most small batches;
    hence the fixed numbers. P, the small set, is drawn by cycling through
    reshuffled permutations, so each P patch appears about equally often. A
    batch is one fancy-indexing gather per stream, far cheaper than a
    training step; the arrays are not copied.
    """
    return PUBatches(P, U, batch_size, p_fraction, seed, augment, steps_per_epoch, offset)


def make_pnu_dataset(P, N, U, batch_size, p_fraction=1 / 3, n_fraction=1 / 3, seed=0, augment=True,
                     steps_per_epoch=None, offset=0.0):
    """Training batches for PNU learning in which every batch holds P, N and U patches.

    Parameters
    ----------
    P : ndarray of shape (n_P, p, p, 3), float32
        Positive (background) patches, label +1.
    N : ndarray of shape (n_N, p, p, 3), float32
        Negative (aurora) patches, label -1.
    U : ndarray of shape (n_U, p, p, 3), float32
        Unlabeled patches, label 0.
    batch_size : int
        Patches per batch, at least 3.
    p_fraction, n_fraction : float
        Shares of P and N, each in (0, 1); each count is rounded and kept at
        >= 1, and U gets the rest (at least 1).
    seed, augment, steps_per_epoch, offset
        As in ``make_pu_dataset``; an epoch visits every U patch once and P
        and N cycle.

    Returns
    -------
    batches : PNUBatches
        ``batches[i]`` is ``(x, y)``, the P patches first, then N, then U;
        y is (batch_size,) float32: +1 for P, -1 for N, 0 for U.

    Raises
    ------
    ValueError
        batch_size below 3, a fraction outside (0, 1), or an empty set.
    """
    return PNUBatches(P, N, U, batch_size, p_fraction, n_fraction, seed, augment, steps_per_epoch, offset)


# ------------------------------------------------------------ synthetic all-sky frames

def _smooth_field(rng, rows, cols, scale):
    """A smooth random field of shape (rows, cols), float32, zero mean and unit spread, blobs ~``scale`` pixels."""
    from skimage.transform import resize

    # Cubic upsampling of a coarse random grid costs a fraction of a large
    # Gaussian blur at full resolution and gives the same kind of field.
    coarse = rng.standard_normal((int(rows / scale) + 3, int(cols / scale) + 3))
    field = resize(coarse, (rows, cols), order=3, mode="edge", anti_aliasing=False).astype(np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _profile(distance, half_width, power):
    """Flat-topped band profile: 1 at the centre, 0.5 at ``half_width``, falling steeply beyond."""
    return np.exp2(-np.abs(distance / half_width) ** power)


def _aurora_structures(rng, u, v, fields, arc_width):
    """Aurora emission of a frame before scaling by brightness, shape (rows, cols, 3), float32.

    ``u`` and ``v`` are the column and row coordinates in units of the circle
    radius (0 at the zenith); ``fields`` are shared smooth random fields for
    texture. Profiles are flat-topped with steep sides, so the emission
    crosses the mask threshold within a few pixels and the mask boundary is
    where the aurora visibly ends.
    """
    shape = np.broadcast_shapes(u.shape, v.shape)
    emission = np.zeros(shape + (3,), np.float32)
    kind = rng.choice(["arcs", "arcs and patches", "patches"], p=[0.45, 0.4, 0.15])
    n_arcs = 0 if kind == "patches" else int(rng.integers(1, 4))
    n_patches = 0 if kind == "arcs" else int(rng.integers(1, 4))
    for _ in range(n_arcs):
        band = rng.random() < 0.35  # Wide folded bands rather than thin quiet arcs.
        angle = rng.uniform(0, np.pi)
        along = u * np.cos(angle) + v * np.sin(angle)
        across = -u * np.sin(angle) + v * np.cos(angle)
        # Centre line: offset, curvature of the auroral oval, and folds.
        offset, curvature = rng.uniform(-0.65, 0.65), rng.uniform(-0.4, 0.4)
        fold, fold_k, fold_phase = rng.uniform(0, 0.15 if band else 0.06), rng.uniform(2, 6), rng.uniform(0, 2 * np.pi)
        centre = offset + curvature * along**2 + fold * np.sin(fold_k * along + fold_phase)
        slope = 2 * curvature * along + fold * fold_k * np.cos(fold_k * along + fold_phase)
        distance = (across - centre) / np.sqrt(1 + slope**2)
        half_width = arc_width * (rng.uniform(0.12, 0.22) if band else rng.uniform(0.07, 0.13))
        half_width = half_width * (1 + 0.3 * np.sin(rng.uniform(1, 4) * along + rng.uniform(0, 2 * np.pi)))
        # Rays stretch the band on one side (the poleward edge of real arcs).
        rayed = rng.random() < 0.6
        side = rng.choice([-1.0, 1.0])
        stretch = 1 + (rng.uniform(0.3, 1.0) if rayed else 0.0)
        one_side = np.where(distance * side > 0, half_width * stretch, half_width)
        intensity = _profile(distance, one_side, 6)
        # Arcs may end inside the sky.
        length, middle = rng.uniform(0.7, 2.5), rng.uniform(-0.5, 0.5)
        intensity *= _profile(along - middle, length, 6)
        if rayed:
            # Striations across the arc: a random 1-D pattern along it, rays
            # a few pixels wide, dimming the band by at most a third so that
            # the gaps between rays stay above the mask threshold.
            spacing = rng.uniform(0.015, 0.04)
            knots = np.arange(-1.6, 1.6 + spacing, spacing)
            pattern = np.interp(along, knots, rng.random(knots.size))
            intensity *= 1 - rng.uniform(0.1, 0.35) * pattern**2
        mix = rng.uniform(0, 2 * np.pi)
        intensity *= np.clip(1 + 0.15 * (np.cos(mix) * fields[0] + np.sin(mix) * fields[1]), 0.6, 1.4)
        level = rng.uniform(0.3, 0.75)
        green = np.array([rng.uniform(0.4, 0.6), 1.0, rng.uniform(0.25, 0.42)], np.float32)
        emission += (level * intensity)[..., None] * green
        if rng.random() < 0.35:
            # Red-magenta fringe (630 nm oxygen) on the rayed side, inside the band.
            fringe = _profile(distance * side - 0.7 * one_side, 0.45 * one_side, 4)
            fringe *= _profile(along - middle, length, 6)
            emission += (rng.uniform(0.25, 0.5) * level * fringe)[..., None] * np.array([1.0, 0.12, 0.4], np.float32)
        if rng.random() < 0.2:
            # Purple lower border (nitrogen) on the other side.
            fringe = _profile(distance * side + 0.75 * half_width, 0.35 * half_width, 4)
            fringe *= _profile(along - middle, length, 6)
            emission += (rng.uniform(0.25, 0.45) * level * fringe)[..., None] * np.array([0.6, 0.15, 0.85], np.float32)
    for _ in range(n_patches):
        # Diffuse patches: irregular blobs with soft texture but a clear edge.
        radius, angle = 0.75 * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        du, dv = u - radius * np.cos(angle), v - radius * np.sin(angle)
        tilt = rng.uniform(0, np.pi)
        major, minor = arc_width * rng.uniform(0.12, 0.3), arc_width * rng.uniform(0.08, 0.2)
        a = (du * np.cos(tilt) + dv * np.sin(tilt)) / major
        b = (-du * np.sin(tilt) + dv * np.cos(tilt)) / minor
        mix = rng.uniform(0, 2 * np.pi)
        warp = np.cos(mix) * fields[2] + np.sin(mix) * fields[1]
        # An additive, bounded warp keeps the edge irregular without
        # spawning detached specks far from the patch.
        intensity = _profile(np.sqrt(a**2 + b**2) + 0.2 * np.clip(warp, -1.5, 1.5), 1.0, 6)
        intensity *= np.clip(1 + 0.2 * (np.sin(mix) * fields[0] - np.cos(mix) * fields[2]), 0.6, 1.4)
        level = rng.uniform(0.3, 0.6)
        green = np.array([rng.uniform(0.4, 0.6), 1.0, rng.uniform(0.3, 0.45)], np.float32)
        emission += (level * intensity)[..., None] * green
    return emission


def synthetic_frame(size=256, seed=0, aurora=True, brightness=1.0, arc_width=1.0, cloud_cover=0.3,
                    rows=None, cols=None, moon=0.0, haze=0.0, twilight=0.0, town_glow=0.0, obstruction=False,
                    overlay_text=False, cover=(0.04, 0.55), bit_depth=8, grey=False, site=0):
    """Draw one synthetic all-sky camera frame and its true aurora mask.

    The frame imitates a colour fisheye camera such as NIPR's at Syowa: a
    sky circle of diameter ``min(rows, cols)`` with black outside; a dark,
    slightly tinted sky brightening toward the horizon, with sensor noise;
    stars, some coloured; a faint green airglow ring near the horizon, a
    mottled galactic band and thin grey clouds; and, with ``aurora=True``,
    green arcs and folded bands with ray striations and diffuse patches,
    some with red or purple fringes.

    Parameters
    ----------
    size : int
        Side of a square frame in pixels (at least 16); ignored for an axis
        given by ``rows`` or ``cols``.
    seed : int
        Non-negative; the same seed gives the same frame. The background does
        not depend on ``aurora``, so ``aurora=False`` gives the same sky with
        the aurora removed.
    aurora : bool
        Draw aurora; without it the mask is all False.
    brightness : float
        Scales the aurora emission (>= 0); at 1 the aurora adds about 75 to
        190 of 255 to the green channel of its brightest parts.
    arc_width : float
        Scales the widths of arcs, bands and patches (> 0); at 1 arcs and
        bands are about 0.15 to 0.45 of the circle radius across (18 to 56
        pixels in a 256-pixel frame), more on their rayed side.
    cloud_cover : float
        Fraction of the sky under thin cloud, in [0, 1]. Clouds add grey
        light, hide stars and dim the aurora by up to a third.
    rows, cols : int, optional
        Frame shape for non-square frames.
    moon : float
        Moonlight, >= 0 (1 is a bright moon): broadband glow over the whole
        sky, strongest toward the moon, which is a saturated disc when it is
        above the horizon; moonlit clouds turn bright.
    haze : float
        Haze or thin high cloud, in [0, 1]: uniform scattered light that
        grows toward the horizon and with ``moon``, fewer stars, and a
        blurred, dimmer aurora.
    twilight : float
        Twilight, >= 0 (1 is bright): a broad glow rising from one side of
        the horizon, orange low and blue higher up.
    town_glow : float
        Town lights, >= 0: a narrow orange glow along part of the horizon,
        which also lights the clouds from below.
    obstruction : bool
        A dark building and a mast in front of part of the sky.
    overlay_text : bool
        A white time stamp and station name in the frame's corners, outside
        the circle, as many cameras print them.
    cover : (float, float)
        The structures are redrawn (a few tries at most) until the mask
        covers a fraction of the sky in this range at brightness 1.
    bit_depth : {8, 16}
        8 gives uint8 counts; 16 gives uint16 counts of a science camera:
        a pedestal of 3300 plus 16 counts per 8-bit step.
    grey : bool
        A monochrome camera behind a 557.7 nm filter: one channel, the
        green one, shape (rows, cols).
    site : int
        The camera's site: where its town and obstruction are. They do not
        move from frame to frame, so they depend on ``site``, not ``seed``.

    Returns
    -------
    image : ndarray of shape (rows, cols, 3), uint8
        (rows, cols) with ``grey``; uint16 with ``bit_depth=16``.
    mask : ndarray of shape (rows, cols), bool
        True where the aurora adds more than ``MASK_THRESHOLD`` (16/255) to
        the brightest channel as seen through the clouds and haze; False
        outside the circle and behind the obstruction.

    Notes
    -----
    With the defaults the structures are drawn until they cover 4% to 55%
    of the sky at brightness 1, so most aurora frames have a clearly
    visible but not overwhelming aurora. Structure shapes depend on
    ``seed``, ``arc_width`` and ``cover`` but not on ``brightness``, the
    clouds or the other sky conditions, which come from random streams of
    their own: with every condition at its default the frame is the same
    as before the conditions existed.
    """
    rows = size if rows is None else rows
    cols = size if cols is None else cols
    for argument, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 16:
            raise ValueError(f"Invalid {argument}: expected an integer >= 16, received {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"Invalid seed: expected an integer >= 0, received {seed!r}")
    if not brightness >= 0:
        raise ValueError(f"Invalid brightness: expected brightness >= 0, received {brightness}")
    if not arc_width > 0:
        raise ValueError(f"Invalid arc_width: expected arc_width > 0, received {arc_width}")
    if not 0 <= cloud_cover <= 1:
        raise ValueError(f"Invalid cloud_cover: expected 0 <= cloud_cover <= 1, received {cloud_cover}")
    for argument, value in (("moon", moon), ("twilight", twilight), ("town_glow", town_glow)):
        if not value >= 0:
            raise ValueError(f"Invalid {argument}: expected {argument} >= 0, received {value}")
    if not 0 <= haze <= 1:
        raise ValueError(f"Invalid haze: expected 0 <= haze <= 1, received {haze}")
    if not (len(cover) == 2 and 0 <= cover[0] <= cover[1] <= 1):
        raise ValueError(f"Invalid cover: expected (low, high) with 0 <= low <= high <= 1, received {cover!r}")
    if bit_depth not in (8, 16):
        raise ValueError(f"Invalid bit_depth: expected 8 or 16, received {bit_depth!r}")
    from skimage.filters import gaussian

    # Separate streams, so that the sky does not change when the aurora is
    # switched off and the aurora does not change with the cloud cover.
    sky_rng, star_rng, cloud_rng, aurora_rng, noise_rng = (np.random.default_rng([int(seed), k]) for k in range(5))
    radius = min(rows, cols) / 2 - 1  # pixels
    v = ((np.arange(rows, dtype=np.float32) - (rows - 1) / 2) / radius)[:, None]
    u = ((np.arange(cols, dtype=np.float32) - (cols - 1) / 2) / radius)[None, :]
    r = np.sqrt(u**2 + v**2)
    inside = r <= 1
    fields = [_smooth_field(sky_rng, rows, cols, radius / scale) for scale in (2.5, 5, 9)]

    # Dark sky, tinted (real patches range from brownish to purple to teal),
    # brighter toward the horizon and toward a town on one side.
    level = sky_rng.uniform(0.04, 0.09)
    tint = np.array([1.04, 1.0, 0.87], np.float32) * np.exp(sky_rng.normal(0, 0.12, 3)).astype(np.float32)
    town_direction = sky_rng.uniform(0, 2 * np.pi)
    town = np.clip(u * np.cos(town_direction) + v * np.sin(town_direction), 0, None) ** 2 * r**2
    sky = level * (1 + sky_rng.uniform(0.3, 0.9) * r**3)[..., None] * tint
    sky += (sky_rng.uniform(0, 0.06) * town)[..., None] * np.array([1.2, 1.0, 0.7], np.float32)
    # Airglow: a faint green ring near the horizon, patchy.
    ring = np.exp(-(((r - sky_rng.uniform(0.8, 0.92)) / 0.08) ** 2)) * np.clip(1 + 0.3 * fields[1], 0.4, 1.6)
    sky += (sky_rng.uniform(0.008, 0.025) * ring)[..., None] * np.array([0.6, 1.0, 0.5], np.float32)
    # Galactic band: a mottled strip across the sky with extra stars.
    galaxy_direction, galaxy_offset = sky_rng.uniform(0, np.pi), sky_rng.uniform(-0.5, 0.5)
    galaxy_width = sky_rng.uniform(0.1, 0.22)
    galaxy_distance = u * np.sin(galaxy_direction) - v * np.cos(galaxy_direction) - galaxy_offset
    galaxy = np.exp(-((galaxy_distance / galaxy_width) ** 2))
    galaxy_light = (sky_rng.uniform(0.008, 0.025) * galaxy * np.clip(1 + 0.6 * fields[2], 0, 2))[..., None]
    galaxy_light = galaxy_light * np.array([1.05, 1.0, 0.9], np.float32)

    # Stars: uniform over the sky plus a denser galactic band; fluxes follow
    # a power law, so most are faint and a few are bright; colours range
    # from blue-white to orange.
    n_stars = star_rng.poisson(0.007 * np.pi * radius**2)
    star_r, star_angle = np.sqrt(star_rng.random(n_stars)), star_rng.uniform(0, 2 * np.pi, n_stars)
    star_row = np.clip(np.round((rows - 1) / 2 + radius * star_r * np.sin(star_angle)), 0, rows - 1).astype(int)
    star_col = np.clip(np.round((cols - 1) / 2 + radius * star_r * np.cos(star_angle)), 0, cols - 1).astype(int)
    in_band = star_rng.random(n_stars) < 0.25 + 0.75 * galaxy[star_row, star_col]
    star_row, star_col = star_row[in_band], star_col[in_band]
    flux = np.minimum(0.15 * (1 + star_rng.pareto(1.3, star_row.size)), 1.5)
    warmth = star_rng.random(star_row.size)
    colour = np.stack([0.85 + 0.3 * warmth, 0.95 + 0.05 * warmth, 1.15 - 0.5 * warmth], axis=1)
    strongly = star_rng.random(star_row.size) < 0.1
    colour[strongly] *= star_rng.uniform(0.5, 1.5, (strongly.sum(), 3))
    stars = np.zeros((rows, cols, 3), np.float32)
    np.add.at(stars, (star_row, star_col), (flux[:, None] * colour).astype(np.float32))
    stars = gaussian(stars, sigma=0.6, channel_axis=-1, preserve_range=True).astype(np.float32)

    # Thin clouds: a smooth field thresholded at the requested cover, so
    # that ``cloud_cover`` of the sky has some cloud; opacity grows from
    # the edge of each cloud inward.
    cloud_field = (0.75 * _smooth_field(cloud_rng, rows, cols, radius / 3)
                   + 0.25 * _smooth_field(cloud_rng, rows, cols, radius / 10))
    if cloud_cover > 0:
        threshold = np.quantile(cloud_field[inside][::7], 1 - cloud_cover)
        cloud = np.clip((cloud_field - threshold) / 0.7, 0, 1) * cloud_rng.uniform(0.5, 0.9)
    else:
        cloud = np.zeros((rows, cols), np.float32)
    cloud_light = cloud_rng.uniform(0.02, 0.05)

    emission = np.zeros((rows, cols, 3), np.float32)
    if aurora:
        for _ in range(6):
            emission = _aurora_structures(aurora_rng, u, v, fields, arc_width)
            covered = (emission.max(axis=2) > MASK_THRESHOLD)[inside].mean()
            if cover[0] <= covered <= cover[1]:
                break
        emission *= np.float32(brightness)
    emission *= (1 - cloud / 3)[..., None]

    conditions = moon or haze or twilight or town_glow or obstruction
    if conditions:
        light, cloud_lighting, star_factor, blocked = _sky_conditions(
            np.random.default_rng([int(seed), 5]), np.random.default_rng([int(site), 7]), u, v, r, moon, haze,
            twilight, town_glow, obstruction)
        if haze:
            # Haze scatters the aurora's light: a blurred, dimmer aurora.
            emission = (1 - 0.3 * haze) * gaussian(emission, sigma=1 + 0.02 * haze * radius, channel_axis=-1,
                                                    preserve_range=True).astype(np.float32)
    mask = (emission.max(axis=2) > MASK_THRESHOLD) & inside

    clear = (1 - cloud)[..., None]
    if conditions:
        signal = (sky + light + (galaxy_light + stars) * clear * star_factor
                  + (cloud_light * cloud)[..., None] + cloud[..., None] * cloud_lighting + emission)
        signal[blocked] = sky[blocked] * 0.3
        mask &= ~blocked
    else:
        signal = sky + (galaxy_light + stars) * clear + (cloud_light * cloud)[..., None] + emission
    # Read noise plus shot noise that grows with the signal.
    signal += noise_rng.standard_normal(signal.shape, dtype=np.float32) * np.sqrt(0.007**2 + 0.0003 * signal)
    # Beyond the lens circle the sensor is dark: counts of 0 to 3 of 255. A
    # one-pixel ramp at the rim avoids a jagged edge.
    rim = np.clip((1 - r) * radius + 0.5, 0, 1)[..., None]
    dark = noise_rng.integers(0, 4, signal.shape).astype(np.float32) / 255
    frame = rim * signal + (1 - rim) * dark
    if overlay_text:
        frame = _stamp_text(frame, np.random.default_rng([int(seed), 6]), r)
    if grey:
        frame = frame[:, :, 1]
    if bit_depth == 16:
        return np.round(3300 + np.clip(frame, 0, None) * 255 * 16).clip(0, 65535).astype(np.uint16), mask
    image = np.round(np.clip(frame, 0, 1) * 255).astype(np.uint8)
    return image, mask


def _sky_conditions(rng, site_rng, u, v, r, moon, haze, twilight, town_glow, obstruction):
    """Light that is not aurora, for ``synthetic_frame``: moon, haze, twilight, town lights, obstructions.

    ``rng`` draws what changes from frame to frame (moon, twilight),
    ``site_rng`` what belongs to the camera's site (town, obstruction).

    ``u``, ``v`` and ``r`` are the frame's coordinates in units of the
    circle radius (0 at the zenith, 1 on the horizon). Returns ``light``
    (rows, cols, 3), the broadband light added to the sky; ``cloud_lighting``
    (rows, cols, 3), the light a fully opaque cloud adds (moonlit or lit by
    the town from below); ``star_factor`` (float), how much of the stars
    and galactic band the haze lets through; and ``blocked`` (rows, cols)
    bool, the pixels behind the obstruction.
    """
    shape = np.broadcast_shapes(u.shape, v.shape)
    angle = np.arctan2(v, u)
    r = np.minimum(r, 1.0)  # beyond the horizon the sensor is dark anyway
    light = np.zeros(shape + (3,), np.float32)
    cloud_lighting = np.zeros(shape + (3,), np.float32)
    # Moonlight: elevation between just below the horizon and high up; its
    # glow falls off with the distance to the moon and rises toward the
    # horizon, where the light crosses more air.
    moon_angle, moon_elevation = rng.uniform(0, 2 * np.pi), rng.uniform(-0.15, 0.6)
    moon_u, moon_v = (1 - moon_elevation) * np.cos(moon_angle), (1 - moon_elevation) * np.sin(moon_angle)
    moon_distance = np.sqrt((u - moon_u) ** 2 + (v - moon_v) ** 2)
    white = np.array([1.0, 0.97, 0.9], np.float32)
    if moon:
        glow = 0.03 + 0.1 * np.exp(-moon_distance / 0.6) + 0.3 * np.exp(-((moon_distance / 0.1) ** 2))
        glow = glow * (1 + 0.6 * r**2) * moon
        if moon_elevation > 0.05:
            glow = glow + 3.0 * moon * (moon_distance < 0.025)  # the moon's disc, saturated
        light += glow[..., None] * white
        cloud_lighting += (0.12 * moon * (1 + 0.5 * np.exp(-moon_distance / 0.5)))[..., None] * white
    if haze:
        scatter = haze * (0.025 + 0.05 * r**4 + 0.08 * moon * np.exp(-moon_distance / 0.8))
        light += scatter[..., None] * white
    if twilight:
        side = np.cos(angle - rng.uniform(0, 2 * np.pi))
        glow = twilight * 0.3 * np.exp(-(1 - r) / 0.35) * ((1 + side) / 2) ** 2
        low = np.exp(-(1 - r) / 0.12)[..., None]
        colour = low * np.array([1.0, 0.7, 0.45], np.float32) + (1 - low) * np.array([0.6, 0.75, 1.0], np.float32)
        light += glow[..., None] * colour
    if town_glow:
        town_angle, town_width = site_rng.uniform(0, 2 * np.pi), site_rng.uniform(0.3, 0.8)
        spread = np.angle(np.exp(1j * (angle - town_angle)))  # in (-pi, pi]
        along = np.exp(-((spread / town_width) ** 2))
        sodium = np.array([1.0, 0.75, 0.4], np.float32)
        light += (town_glow * 0.35 * np.exp(-(1 - r) / 0.07) * along)[..., None] * sodium
        cloud_lighting += (town_glow * 0.15 * (0.3 + along))[..., None] * sodium
    blocked = np.zeros(shape, bool)
    if obstruction:
        # A building on the horizon: a block of random height over an arc of
        # azimuth, and a thin mast reaching further in.
        start, width, height = site_rng.uniform(0, 2 * np.pi), site_rng.uniform(0.3, 0.9), site_rng.uniform(0.06, 0.16)
        offset = np.mod(angle - start, 2 * np.pi)
        blocked |= (offset < width) & (r > 1 - height)
        mast_angle, mast_length = site_rng.uniform(0, 2 * np.pi), site_rng.uniform(0.2, 0.4)
        across = np.abs(-u * np.sin(mast_angle) + v * np.cos(mast_angle))
        along_mast = u * np.cos(mast_angle) + v * np.sin(mast_angle)
        blocked |= (across < 0.012) & (along_mast > 1 - mast_length) & (r <= 1)
    star_factor = 1 - 0.8 * haze
    return light, cloud_lighting, star_factor, blocked


def _stamp_text(frame, rng, r):
    """Print a time stamp and a station name in white in the corners of ``frame``, outside the circle."""
    from PIL import Image, ImageDraw

    rows, cols = frame.shape[:2]
    layer = Image.new("L", (cols, rows), 0)
    draw = ImageDraw.Draw(layer)
    stamp = f"20{rng.integers(10, 25)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d} " \
            f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}:{rng.integers(0, 60):02d} UT"
    draw.text((2, 2), stamp, fill=255)
    draw.text((2, rows - 12), "SYNTHETIC STN", fill=255)
    text = (np.asarray(layer, np.float32) / 255)[..., None]
    text *= (r > 1)[..., None]  # never over the sky
    return frame * (1 - text) + text


# ------------------------------------------------------------ writing files

def write_atomically(path, write):
    """Write a file through ``write(handle)`` under a temporary name, then rename it into place.

    A run killed at any moment (even with SIGKILL) leaves either the whole
    file or none, never a file that looks complete but is not.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as handle:
            write(handle)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def save_png(path, array, optimize=False):
    """Save a uint8 array (rows, cols) or (rows, cols, 3) as a PNG, atomically (``write_atomically``).

    ``optimize`` compresses harder (slower): the shipped dataset uses it.
    """
    from PIL import Image

    write_atomically(path, lambda handle: Image.fromarray(array).save(handle, format="png", optimize=optimize))


# ------------------------------------------------------------ the shipped dataset

def write_dataset(root, n_positive=40, n_unlabelled=40, size=256, seed=0, aurora_fraction=0.75, overwrite=False):
    """Write a synthetic P/U dataset with true masks.

    Layout (file stems shared between ``Unlabelled`` and ``masks``)::

        root/Positive/sky_000.png ...    aurora-free whole frames
        root/Unlabelled/frame_000.png    whole frames, ``aurora_fraction`` with aurora
        root/masks/frame_000.png         uint8, 255 = aurora, 0 = background
        root/frames.csv                  generator settings of every file

    Parameters
    ----------
    root : str or pathlib.Path
        Output folder, created if missing.
    n_positive, n_unlabelled : int
        Number of Positive and Unlabelled images (>= 1).
    size : int
        Frame side in pixels.
    seed : int
        Same seed, same files, byte for byte.
    aurora_fraction : float
        Share of Unlabelled frames with aurora, in [0, 1].
    overwrite : bool
        Replace an earlier dataset's files; without it an existing one is refused.

    Returns
    -------
    summary : dict
        Counts and the class prior of the Unlabelled frames: ``prior_sky``, the
        fraction of sky-circle pixels that are background, and ``prior_frame``,
        the fraction of all frame pixels that are background.

    Raises
    ------
    DataError
        ``root`` already holds generated files and ``overwrite`` is False.
    """
    n_positive, n_unlabelled = _check_count(n_positive, "n_positive"), _check_count(n_unlabelled, "n_unlabelled")
    if not 0 <= aurora_fraction <= 1:
        raise ValueError(f"Invalid aurora_fraction: expected 0 <= aurora_fraction <= 1, received {aurora_fraction}")
    root = Path(root)
    folders = {name: root / name for name in ("Positive", "Unlabelled", "masks")}
    ours = [*folders["Positive"].glob("sky_*.png"), *folders["Unlabelled"].glob("frame_*.png"),
            *folders["masks"].glob("frame_*.png")]
    if ours and not overwrite:
        raise DataError(f"{root}: already holds a generated dataset; pass --overwrite to replace it")
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: exists and is not a folder")
    for path in ours:
        # Only files with our own names are removed, so that a smaller
        # dataset leaves no stale frames behind and nothing else is touched.
        path.unlink()
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    rows = []

    def draw(aurora):
        settings = dict(seed=int(rng.integers(2**31)), aurora=aurora, brightness=round(rng.uniform(0.6, 1.4), 3),
                        arc_width=round(rng.uniform(0.7, 1.4), 3), cloud_cover=round(rng.uniform(0.0, 0.6), 3))
        image, mask = synthetic_frame(size, **settings)
        return image, mask, settings

    for index in range(n_positive):
        image, _, settings = draw(aurora=False)
        # Whole frames, not crops of clear sky: P must show the horizon and the
        # black border as often as U does, or PU learning calls them aurora.
        name = f"sky_{index:03d}.png"
        save_png(folders["Positive"] / name, image, optimize=True)
        rows.append(dict(file=f"Positive/{name}", **settings, aurora_pixels=0.0))

    with_aurora = np.zeros(n_unlabelled, bool)
    with_aurora[rng.permutation(n_unlabelled)[:int(round(aurora_fraction * n_unlabelled))]] = True
    radius = size / 2 - 1
    centre = (size - 1) / 2
    pixel = np.arange(size) - centre
    sky = np.hypot(pixel[:, None], pixel[None, :]) <= radius
    background_in_sky = background_in_frame = 0
    for index in range(n_unlabelled):
        image, mask, settings = draw(aurora=bool(with_aurora[index]))
        name = f"frame_{index:03d}.png"
        save_png(folders["Unlabelled"] / name, image, optimize=True)
        save_png(folders["masks"] / name, (mask * 255).astype(np.uint8), optimize=True)
        background_in_sky += int((sky & ~mask).sum())
        background_in_frame += int((~mask).sum())
        rows.append(dict(file=f"Unlabelled/{name}", **settings, aurora_pixels=round(float(mask[sky].mean()), 4)))

    with open(root / "frames.csv", "w", encoding="utf-8") as table:
        table.write(",".join(rows[0]) + "\n")
        table.writelines(",".join(str(value) for value in row.values()) + "\n" for row in rows)
    return dict(root=str(root), n_positive=n_positive, n_unlabelled=n_unlabelled,
                prior_sky=background_in_sky / (n_unlabelled * int(sky.sum())),
                prior_frame=background_in_frame / (n_unlabelled * size * size))


def _number(text, kind, accept, expected):
    """An argparse value: ``kind(text)`` (int or float) for which ``accept`` holds, else the message ``expected``."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, received {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, received {value}")
    return value


def positive_int(text):
    """argparse type: an integer >= 1 (shared by the CLIs of data.py, train.py and segmentation.py)."""
    return _number(text, int, lambda value: value >= 1, "an integer >= 1")


def fraction(text):
    """argparse type: a number in [0, 1]."""
    return _number(text, float, lambda value: 0 <= value <= 1, "a number in [0, 1]")


def nonnegative_int(text):
    """argparse type: an integer >= 0 (numpy seeds cannot be negative)."""
    return _number(text, int, lambda value: value >= 0, "an integer >= 0")


def nonnegative_float(text):
    """argparse type: a finite number >= 0."""
    return _number(text, float, lambda value: 0 <= value < np.inf, "a number >= 0")


def elevation(text):
    """argparse type: degrees above the horizon, from -90 to below 90."""
    return _number(text, float, lambda value: -90 <= value < 90, "degrees from -90 to below 90")


def _frame_size(text):
    """argparse type: a frame side of at least 16 pixels."""
    value = positive_int(text)
    if value < 16:
        raise argparse.ArgumentTypeError(f"expected a frame side >= 16 pixels, received {value}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="data.py",
        description="Write a synthetic all-sky P/U dataset with true aurora masks (the shipped dataset/).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", default="dataset", help="output folder (Positive/, Unlabelled/, masks/)")
    parser.add_argument("--n_positive", type=positive_int, default=40, help="number of aurora-free Positive images")
    parser.add_argument("--n_unlabelled", type=positive_int, default=40, help="number of Unlabelled frames")
    parser.add_argument("--size", type=_frame_size, default=256, help="frame side in pixels")
    parser.add_argument("--aurora_fraction", type=fraction, default=0.75,
                        help="share of Unlabelled frames with aurora")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="random seed; the same seed writes the same files")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                        help="replace the files of an earlier dataset in --out")
    return parser


def main(argv=None):
    """Command line: ``python data.py --out dataset`` regenerates the shipped dataset exactly."""
    args = build_parser().parse_args(argv)
    try:
        summary = write_dataset(args.out, args.n_positive, args.n_unlabelled, args.size, args.seed,
                                args.aurora_fraction, args.overwrite)
    except DataError as error:
        print(f"data.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {summary['n_positive']} Positive and {summary['n_unlabelled']} Unlabelled images with masks to "
          f"{summary['root']}; background fraction of the Unlabelled sky {summary['prior_sky']:.3f}, "
          f"of whole frames {summary['prior_frame']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
