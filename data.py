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
import functools
import itertools
import math
import re
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

# The aurora mask threshold of the synthetic frames, in the [0, 1] units of an
# 8-bit pixel: a pixel is aurora where the aurora adds more than 16/255 to its
# brightest channel, about the level of the whole dark sky behind it, so that
# every masked pixel is visibly brighter than clear sky.
MASK_THRESHOLD = 16 / 255


class DataError(ValueError):
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


def data_shuffle(X, Y, seed):
    """The same reproducible random permutation of samples and labels (the seed's name).

    Parameters
    ----------
    X : ndarray of shape (n, ...)
    Y : ndarray of shape (n, ...)
        Labels: +1 positive, -1 unlabeled (PNU: -1 negative, 0 unlabeled).
    seed : int
        Same seed, same permutation.

    Returns
    -------
    X, Y : ndarrays
        Shuffled copies.
    """
    X, Y = np.asarray(X), np.asarray(Y)
    if len(X) != len(Y):
        raise ValueError(f"Invalid arrays: expected as many labels as samples, "
                         f"received {len(X)} samples and {len(Y)} labels")
    order = np.random.default_rng(seed).permutation(len(X))
    return X[order], Y[order]


# ------------------------------------------------------------ batches

def augment_patches(patches, rng):
    """Each patch in one of its 8 orientations (flips and 90-degree rotations), chosen at random.

    The sky in a fisheye frame has no preferred orientation, so every
    symmetry of the square is an equally plausible view of the same sky.

    Parameters
    ----------
    patches : ndarray of shape (n, p, p, channels)
        Square patches; not modified.
    rng : numpy.random.Generator

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
    return augmented


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


@functools.cache
def _batch_classes():
    """The PyDataset subclasses, built on first use so that importing data.py does not import Keras.

    Reading images and drawing frames need no TensorFlow, whose import takes
    seconds; only training does.
    """
    import keras

    class _Batches(keras.utils.PyDataset):
        """Batches drawn from several labelled patch streams in fixed numbers per batch.

        The last stream (U) defines the epoch: each epoch visits its samples
        once in a fresh order. The other streams cycle through reshuffled
        permutations for as long as training lasts. Every batch is a pure
        function of (seed, epoch, batch index), so the batches are
        reproducible and safe for Keras's worker threads.
        """

        def _setup(self, arrays, labels, counts, seed, augment, steps_per_epoch):
            self.arrays, self.counts = arrays, counts
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
                x = augment_patches(x, np.random.default_rng([self.seed, 2, self.epoch, index]))
            return x, self.labels

        def on_epoch_end(self):
            self.epoch += 1

    class PUSequence(_Batches):
        """PU batches for ``model.fit``; see ``make_pu_dataset`` for the arguments.

        ``batches[i]`` is ``(x, y)``: x (batch_size, p, p, 3) float32 with the
        n_p P patches first, y (batch_size,) float32, +1 for P and -1 for U.
        """

        def __init__(self, P, U, batch_size, p_fraction=0.5, seed=0, augment=True, steps_per_epoch=None, **kwargs):
            super().__init__(**kwargs)
            P, U = _check_patches(P, "P"), _check_patches(U, "U")
            batch_size = _check_batch_size(batch_size, 2)
            n_p = int(np.clip(round(batch_size * _check_fraction(p_fraction, "p_fraction")), 1, batch_size - 1))
            self._setup([P, U], [1.0, -1.0], [n_p, batch_size - n_p], seed, augment, steps_per_epoch)

    class PNUSequence(_Batches):
        """PNU batches for ``model.fit``; see ``make_pnu_dataset`` for the arguments.

        ``batches[i]`` is ``(x, y)``: P patches first, then N, then U; y is
        +1 for P, -1 for N and 0 for U.
        """

        def __init__(self, P, N, U, batch_size, p_fraction=1 / 3, n_fraction=1 / 3, seed=0, augment=True,
                     steps_per_epoch=None, **kwargs):
            super().__init__(**kwargs)
            P, N, U = _check_patches(P, "P"), _check_patches(N, "N"), _check_patches(U, "U")
            batch_size = _check_batch_size(batch_size, 3)
            n_p = int(np.clip(round(batch_size * _check_fraction(p_fraction, "p_fraction")), 1, batch_size - 2))
            n_n = int(np.clip(round(batch_size * _check_fraction(n_fraction, "n_fraction")), 1, batch_size - n_p - 1))
            self._setup([P, N, U], [1.0, -1.0, 0.0], [n_p, n_n, batch_size - n_p - n_n], seed, augment,
                        steps_per_epoch)

    for batch_class in (PUSequence, PNUSequence):
        # Module-level names, so that reprs read data.PUSequence and pickle
        # (spawned Keras workers) finds the classes through __getattr__.
        batch_class.__qualname__ = batch_class.__name__
        batch_class.__module__ = __name__
    return PUSequence, PNUSequence


def __getattr__(name):
    # ``data.PUSequence`` is resolved lazily so that importing data.py
    # (for reading images or drawing frames) never pays for importing Keras.
    if name in ("PUSequence", "PNUSequence"):
        return dict(zip(("PUSequence", "PNUSequence"), _batch_classes()))[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_pu_dataset(P, U, batch_size, p_fraction=0.5, seed=0, augment=True, steps_per_epoch=None, **kwargs):
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
    **kwargs
        Passed to ``keras.utils.PyDataset`` (``workers``, ``max_queue_size``, ...).

    Returns
    -------
    batches : PUSequence
        A ``keras.utils.PyDataset``; ``batches[i]`` is ``(x, y)`` with x of
        shape (batch_size, p, p, 3) float32, the n_p P patches first, and y of
        shape (batch_size,) float32: +1 for P, -1 for U.

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
    PUSequence = _batch_classes()[0]
    return PUSequence(P, U, batch_size, p_fraction, seed, augment, steps_per_epoch, **kwargs)


def make_pnu_dataset(P, N, U, batch_size, p_fraction=1 / 3, n_fraction=1 / 3, seed=0, augment=True,
                     steps_per_epoch=None, **kwargs):
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
    seed, augment, steps_per_epoch, **kwargs
        As in ``make_pu_dataset``; an epoch visits every U patch once and P
        and N cycle.

    Returns
    -------
    batches : PNUSequence
        ``batches[i]`` is ``(x, y)``, the P patches first, then N, then U;
        y is (batch_size,) float32: +1 for P, -1 for N, 0 for U.

    Raises
    ------
    ValueError
        batch_size below 3, a fraction outside (0, 1), or an empty set.
    """
    PNUSequence = _batch_classes()[1]
    return PNUSequence(P, N, U, batch_size, p_fraction, n_fraction, seed, augment, steps_per_epoch,
                       **kwargs)


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
                    overlay_text=False, cover=(0.04, 0.55), bit_depth=8, grey=False):
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
            np.random.default_rng([int(seed), 5]), u, v, r, moon, haze, twilight, town_glow, obstruction)
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


def _sky_conditions(rng, u, v, r, moon, haze, twilight, town_glow, obstruction):
    """Light that is not aurora, for ``synthetic_frame``: moon, haze, twilight, town lights, obstructions.

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
        town_angle = rng.uniform(0, 2 * np.pi)
        spread = np.angle(np.exp(1j * (angle - town_angle)))  # in (-pi, pi]
        along = np.exp(-((spread / rng.uniform(0.3, 0.8)) ** 2))
        sodium = np.array([1.0, 0.75, 0.4], np.float32)
        light += (town_glow * 0.35 * np.exp(-(1 - r) / 0.07) * along)[..., None] * sodium
        cloud_lighting += (town_glow * 0.15 * (0.3 + along))[..., None] * sodium
    blocked = np.zeros(shape, bool)
    if obstruction:
        # A building on the horizon: a block of random height over an arc of
        # azimuth, and a thin mast reaching further in.
        start, width = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.9)
        offset = np.mod(angle - start, 2 * np.pi)
        blocked |= (offset < width) & (r > 1 - rng.uniform(0.06, 0.16))
        mast_angle = rng.uniform(0, 2 * np.pi)
        across = np.abs(-u * np.sin(mast_angle) + v * np.cos(mast_angle))
        along_mast = u * np.cos(mast_angle) + v * np.sin(mast_angle)
        blocked |= (across < 0.012) & (along_mast > 1 - rng.uniform(0.2, 0.4)) & (r <= 1)
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


# ------------------------------------------------------------ the shipped dataset

def _save_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path, optimize=True)


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
        _save_png(folders["Positive"] / name, image)
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
        _save_png(folders["Unlabelled"] / name, image)
        _save_png(folders["masks"] / name, (mask * 255).astype(np.uint8))
        background_in_sky += int((sky & ~mask).sum())
        background_in_frame += int((~mask).sum())
        rows.append(dict(file=f"Unlabelled/{name}", **settings, aurora_pixels=round(float(mask[sky].mean()), 4)))

    with open(root / "frames.csv", "w", encoding="utf-8") as table:
        table.write(",".join(rows[0]) + "\n")
        table.writelines(",".join(str(value) for value in row.values()) + "\n" for row in rows)
    return dict(root=str(root), n_positive=n_positive, n_unlabelled=n_unlabelled,
                prior_sky=background_in_sky / (n_unlabelled * int(sky.sum())),
                prior_frame=background_in_frame / (n_unlabelled * size * size))


def positive_int(text):
    """argparse type: an integer >= 1 (shared by the CLIs of data.py, train.py and segmentation.py)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, received {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, received {value}")
    return value


def fraction(text):
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], received {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], received {value}")
    return value


def _nonnegative_int(text):
    """argparse type: an integer >= 0 (numpy seeds cannot be negative)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, received {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, received {value}")
    return value


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
    parser.add_argument("--seed", type=_nonnegative_int, default=0,
                        help="random seed; the same seed writes the same files")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier dataset in --out")
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
