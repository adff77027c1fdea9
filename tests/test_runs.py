"""segmentation.py over archives: science files, times, nights and keograms, outputs, resume, shards, arrays.

The model is ``centre_model`` of test_segmentation.py: a pixel is aurora
exactly when its red value is above 0.5, so every mask is known in advance.
"""

import csv
import datetime
import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data
import segmentation
from conftest import ROOT, write_png
from test_segmentation import centre_model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.keras"
    centre_model().save(path)
    return path


def band_frame(row, rows=24, cols=20):
    """A dark fisheye-free frame with a bright red band of 3 rows starting at ``row``."""
    frame = np.full((rows, cols, 3), 0.2, np.float32)
    frame[row:row + 3, :, 0] = 0.9
    return frame


def pgm_stack(frames, times):
    """Binary 16-bit PGM frames with THEMIS-style time comments (grey = the red channel)."""
    content = b""
    for frame, time in zip(frames, times):
        counts = np.rint(frame[..., 0] * 65535).astype(">u2")
        content += (f'P5\n#"Image request start" {time} UTC\n{counts.shape[1]} {counts.shape[0]}\n65535\n'.encode()
                    + counts.tobytes())
    return content


def run(capsys, *argv):
    code = segmentation.main([str(a) for a in argv] + ["--quiet"])
    return code, capsys.readouterr()


def summary(save_dir, name="summary.csv"):
    with open(save_dir / name, newline="") as handle:
        return list(csv.DictReader(handle))


def without_seconds(rows):
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


@pytest.fixture
def night(tmp_path):
    """Six PNG frames a minute apart whose band moves down 2 rows a frame, named by their time."""
    folder = tmp_path / "night"
    folder.mkdir()
    for k in range(6):
        write_png(folder / f"20140310_06{k:02d}00_cam.png", band_frame(2 + 2 * k))
    return folder


# ------------------------------------------------------------ science files and times

def test_science_files_give_a_row_per_frame_with_its_time(tmp_path, model_file, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "20140310_0600_gill_themis19_full.pgm.gz").write_bytes(gzip.compress(pgm_stack(
        [band_frame(4), band_frame(8)], ["2014-03-10 06:00:00.063", "2014-03-10 06:00:03.063"])))
    from astropy.io import fits

    hdu = fits.PrimaryHDU(np.rint(band_frame(10)[..., 0] * 1000).astype(np.int16))
    hdu.header["OBSDATE"], hdu.header["OBSSTART"] = "2015-10-07", "08:23:51.743"
    hdu.writeto(folder / "PKR_DASC_0558_20151007_082351.743.FITS")
    out = tmp_path / "out"
    code, captured = run(capsys, "--dataset", folder, "--model", model_file, "--save_dir", out, "--stride", 1,
                         "--no-refine")
    assert code == 0, captured.err
    rows = summary(out)[:-1]
    assert [(row["file"], row["frame"], row["name"], row["time"]) for row in rows] == [
        ("20140310_0600_gill_themis19_full.pgm.gz", "0", "20140310_0600_gill_themis19_full_0", "2014-03-10T06:00:00.063Z"),
        ("20140310_0600_gill_themis19_full.pgm.gz", "1", "20140310_0600_gill_themis19_full_1", "2014-03-10T06:00:03.063Z"),
        ("PKR_DASC_0558_20151007_082351.743.FITS", "", "PKR_DASC_0558_20151007_082351.743", "2015-10-07T08:23:51.743Z"),
    ]
    mask = np.asarray(Image.open(out / "mask" / "20140310_0600_gill_themis19_full_1.png")) > 0
    assert mask[8:11].all() and not mask[:8].any() and not mask[11:].any()


@pytest.mark.parametrize("training_scale, warned", [(255.0, True), (65535.0, False)])
def test_frames_of_another_bit_depth_than_the_training_frames_are_named(tmp_path, capsys, training_scale, warned):
    model = tmp_path / "model.keras"
    data.save_model(centre_model(), model, {"version": 1, "normalize": "none", "camera_range": [0.0, training_scale],
                                            "full_scale": training_scale})
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "20140310_0600_gill_themis19_full.pgm.gz").write_bytes(gzip.compress(pgm_stack(
        [band_frame(4), band_frame(8)], ["2014-03-10 06:00:00.063", "2014-03-10 06:00:03.063"])))
    code, captured = run(capsys, "--dataset", folder, "--model", model, "--save_dir", tmp_path / "out", "--stride", 1,
                         "--no-refine")
    assert code == 0, captured.err
    message = "2 frame(s) (first: 20140310_0600_gill_themis19_full_0) have another bit depth"
    assert (message in captured.err) is warned, captured.err
    # The band frames have no fisheye circle, which is said too, once.
    assert captured.err.count("warning: no fisheye border found in 2 frame(s)") == 1, captured.err


def test_rows_follow_time_not_file_names(tmp_path, model_file, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    write_png(folder / "a_20200101_000200.png", band_frame(3))
    write_png(folder / "b_20200101_000100.png", band_frame(3))
    out = tmp_path / "out"
    assert run(capsys, "--dataset", folder, "--model", model_file, "--save_dir", out)[0] == 0
    assert [row["file"] for row in summary(out)] == ["b_20200101_000100.png", "a_20200101_000200.png", "mean"]


def test_unknown_times_stay_empty_and_frames_are_not_skipped(tmp_path, model_file, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    write_png(folder / "frame_000.png", band_frame(3))
    out = tmp_path / "out"
    code, _ = run(capsys, "--dataset", folder, "--model", model_file, "--save_dir", out)
    assert code == 0 and summary(out)[0]["time"] == ""
    assert not (out / "night").exists()


def test_truncated_stack_is_named_its_whole_frames_kept_and_exit_1(tmp_path, model_file, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    content = pgm_stack([band_frame(4), band_frame(6)], ["2014-03-10 06:00:00", "2014-03-10 06:00:03"])
    (folder / "cut.pgm.gz").write_bytes(gzip.compress(content[:-10]))
    write_png(folder / "fine.png", band_frame(5))
    out = tmp_path / "out"
    code, captured = run(capsys, "--dataset", folder, "--model", model_file, "--save_dir", out)
    assert code == 1
    assert "cut.pgm.gz: truncated after 1 frames" in captured.err
    assert sorted(row["name"] for row in summary(out)[:-1]) == ["cut_0", "fine"]


# ------------------------------------------------------------ nights and keograms

def test_night_figure_and_keogram_follow_the_moving_band(night, tmp_path, model_file, capsys):
    out = tmp_path / "out"
    code, captured = run(capsys, "--dataset", night, "--model", model_file, "--save_dir", out, "--stride", 1,
                         "--no-refine", "--outputs", "mask")
    assert code == 0, captured.err
    (figure,) = (out / "night").glob("*.png")
    (arrays,) = (out / "night").glob("*keogram*.npz")
    assert figure.stat().st_size > 0 and "night" in figure.name
    keogram = np.load(arrays)
    assert keogram["mask"].shape == (24, 6) and len(keogram["time"]) == 6
    assert str(keogram["time"][0]).startswith("2014-03-10T06:00:00")
    # Column k (frame k) is aurora on rows 2 + 2k .. 4 + 2k: the band moves 2 rows a frame.
    for k in range(6):
        np.testing.assert_array_equal(np.flatnonzero(keogram["mask"][:, k] > 0.5), np.arange(2 + 2 * k, 5 + 2 * k))
    np.testing.assert_allclose(keogram["aurora_fraction"], 3 / 24)


def test_north_down_turns_the_keogram_over(night, tmp_path, model_file, capsys):
    out = tmp_path / "out"
    assert run(capsys, "--dataset", night, "--model", model_file, "--save_dir", out, "--stride", 1, "--no-refine",
               "--outputs", "mask", "--north", "down")[0] == 0
    (arrays,) = (out / "night").glob("*keogram*.npz")
    assert np.flatnonzero(np.load(arrays)["mask"][:, 0] > 0.5).tolist() == [19, 20, 21]


def test_keogram_line_and_night_groups_split_at_long_gaps():
    sky = np.zeros((5, 5), bool)
    sky[1:, :4] = True  # zenith (row 2, col 1)
    values = np.arange(25, dtype=np.float32).reshape(5, 5)
    line = segmentation.keogram_line(values, sky, "up")
    assert np.isnan(line[0]) and line[1:].tolist() == [6, 11, 16, 21]
    rows = [{"file": f"cam/{k}.png", "rows": 9, "cols": 9, "name": str(k),
             "time": (datetime.datetime(2020, 1, 1) + datetime.timedelta(hours=h)).strftime("%Y-%m-%dT%H:%M:%S.000Z")}
            for k, h in enumerate([0, 0.5, 1, 1.5, 9, 9.5, 10])]
    groups = segmentation.night_groups(rows)
    assert [len(night) for _, night in groups] == [4, 3]
    assert groups[0][0].startswith("cam_9x9_20200101_0000")


# ------------------------------------------------------------ outputs a user chooses

def test_outputs_choose_what_is_written(night, tmp_path, model_file, capsys):
    out = tmp_path / "out"
    assert run(capsys, "--dataset", night, "--model", model_file, "--save_dir", out, "--outputs", "mask",
               "probability")[0] == 0
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith(".")) == [
        "mask", "night", "probability", "run.json", "summary.csv"]
    assert len(list((out / "probability").glob("*.npy"))) == 6


def test_field_of_view_limits_the_sky(tmp_path, model_file, capsys):
    frame = band_frame(4)
    frame[:, :, 0] = 0.9  # all "aurora"
    write_png(tmp_path / "all.png", frame)
    view = np.zeros(frame.shape[:2], np.uint8)
    view[:, :10] = 255
    Image.fromarray(view).save(tmp_path / "view.png")
    out = tmp_path / "out"
    code, captured = run(capsys, "--dataset", tmp_path / "all.png", "--model", model_file, "--save_dir", out,
                         "--field_of_view", tmp_path / "view.png", "--outputs", "mask")
    assert code == 0, captured.err
    mask = np.asarray(Image.open(out / "mask" / "all.png")) > 0
    assert mask[:, :10].all() and not mask[:, 10:].any()
    assert float(summary(out)[0]["aurora_fraction"]) == 1.0  # of the sky the user gave


def test_min_elevation_alone_cuts_the_horizon_off_each_fisheye_circle(tmp_path, model_file, capsys):
    rows, cols = np.ogrid[:48, :48]
    distance = np.hypot(rows - 23.5, cols - 23.5) / 20  # in radii of a circle 40 pixels across
    frame = np.zeros((48, 48, 3), np.float32)
    frame[distance <= 1] = [0.9, 0.3, 0.3]  # all "aurora"
    (tmp_path / "frames").mkdir()
    write_png(tmp_path / "frames" / "all.png", frame)
    (tmp_path / "masks").mkdir()
    Image.fromarray(((distance <= 1) * 255).astype(np.uint8)).save(tmp_path / "masks" / "all.png")
    out = tmp_path / "out"
    code, captured = run(capsys, "--dataset", tmp_path / "frames", "--model", model_file, "--save_dir", out,
                         "--min_elevation", "45", "--outputs", "mask", "--masks", tmp_path / "masks")
    assert code == 0, captured.err
    mask = np.asarray(Image.open(out / "mask" / "all.png")) > 0
    # 45 degrees: half the radius of an equidistant fisheye.
    assert mask[distance < 0.45].all() and not mask[distance > 0.55].any()
    # Of the sky above 45 degrees; the true aurora below it is not asked for.
    assert float(summary(out)[0]["aurora_fraction"]) == 1.0 and float(summary(out)[0]["iou"]) == 1.0
    assert json.loads((out / "run.json").read_text())["settings"]["min_elevation"] == 45.0


def test_min_elevation_on_a_frame_without_a_border_cuts_around_its_centre_and_says_so(tmp_path, model_file, capsys):
    frame = np.full((24, 24, 3), 0.9, np.float32)  # all "aurora", no border
    write_png(tmp_path / "all.png", frame)
    out = tmp_path / "out"
    code, captured = run(capsys, "--dataset", tmp_path / "all.png", "--model", model_file, "--save_dir", out,
                         "--min_elevation", "0", "--outputs", "mask")
    assert code == 0, captured.err
    assert "the frame's centre is taken for the zenith and half its longer side for the horizon" in captured.err
    mask = np.asarray(Image.open(out / "mask" / "all.png")) > 0
    assert mask[12, 12] and not mask[0, 0] and not mask[-1, -1]


# ------------------------------------------------------------ resume

def five_frames(folder):
    folder.mkdir()
    for k in range(5):
        write_png(folder / f"frame_{k}.png", band_frame(2 + 3 * k))
    return folder


def test_resume_after_a_crash_at_any_point_ends_as_an_uninterrupted_run(tmp_path, model_file, capsys, monkeypatch):
    frames = five_frames(tmp_path / "frames")
    args = ["--dataset", frames, "--model", model_file, "--workers", 1]
    assert run(capsys, *args, "--save_dir", tmp_path / "whole")[0] == 0
    whole = without_seconds(summary(tmp_path / "whole"))
    original_outputs = segmentation.write_outputs
    original_summary = segmentation.write_summary

    def crash_in_outputs(save_dir, name, *rest, **keywords):
        if name == "frame_2":  # after the mask of frame 2, before its figure
            data.save_png(segmentation.output_path(save_dir, "mask", name), np.zeros((2, 2), np.uint8))
            raise KeyboardInterrupt
        return original_outputs(save_dir, name, *rest, **keywords)

    def crash_in_summary(*arguments):
        raise KeyboardInterrupt

    for point, target, crash in (("outputs", "write_outputs", crash_in_outputs),
                                 ("summary", "write_summary", crash_in_summary)):
        out = tmp_path / point
        monkeypatch.setattr(segmentation, target, crash)
        with pytest.raises(KeyboardInterrupt):
            segmentation.main([str(a) for a in args] + ["--save_dir", str(out), "--quiet"])
        monkeypatch.setattr(segmentation, "write_outputs", original_outputs)
        monkeypatch.setattr(segmentation, "write_summary", original_summary)
        assert not (out / "summary.csv").exists()
        code, captured = run(capsys, *args, "--save_dir", out, "--resume")
        assert code == 0, captured.err
        assert without_seconds(summary(out)) == whole, point
        for name in ("frame_0", "frame_2", "frame_4"):
            np.testing.assert_array_equal(np.asarray(Image.open(out / "mask" / f"{name}.png")),
                                          np.asarray(Image.open(tmp_path / "whole" / "mask" / f"{name}.png")))
        assert not list(out.rglob(".*.partial"))


def test_resume_is_refused_without_a_run_or_with_other_settings(tmp_path, model_file, capsys):
    frames = five_frames(tmp_path / "frames")
    out = tmp_path / "out"
    code, captured = run(capsys, "--dataset", frames, "--model", model_file, "--save_dir", out, "--resume")
    assert code == 2 and "holds no run to continue" in captured.err and not out.exists()
    assert run(capsys, "--dataset", frames, "--model", model_file, "--save_dir", out)[0] == 0
    before = (out / "summary.csv").read_bytes()
    code, captured = run(capsys, "--dataset", frames, "--model", model_file, "--save_dir", out, "--resume",
                         "--stride", 4)
    assert code == 2 and "--stride (16 then, 4 now)" in captured.err
    assert (out / "summary.csv").read_bytes() == before
    other = tmp_path / "other.keras"
    centre_model(7).save(other)
    code, captured = run(capsys, "--dataset", frames, "--model", other, "--save_dir", out, "--resume")
    assert code == 2 and "model file contents" in captured.err


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_summary(tmp_path, model_file):
    """SIGKILL at a random moment, twice, then --resume: the same summary and masks as one whole run."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(30):
        write_png(frames / f"frame_{k:02d}.png", band_frame(1 + k % 20))
    command = [sys.executable, str(ROOT / "segmentation.py"), "--dataset", str(frames), "--model", str(model_file),
               "--quiet", "--stride", "1"]
    subprocess.run(command + ["--save_dir", str(tmp_path / "whole")], check=True, capture_output=True)
    out = str(tmp_path / "killed")

    def resume():
        # As the tool says: a run killed before it wrote run.json (on a loaded
        # machine, while loading the model) is started again, not resumed.
        return ["--resume"] if (tmp_path / "killed" / "run.json").exists() else []

    rng = np.random.default_rng(0)
    for delay in rng.uniform(4.0, 7.0, size=2):
        process = subprocess.Popen(command + ["--save_dir", out] + resume(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    result = subprocess.run(command + ["--save_dir", out] + resume(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert without_seconds(summary(tmp_path / "killed")) == without_seconds(summary(tmp_path / "whole"))
    for k in (0, 13, 29):
        name = f"frame_{k:02d}.png"
        assert (tmp_path / "killed" / "mask" / name).read_bytes() == (tmp_path / "whole" / "mask" / name).read_bytes()


# ------------------------------------------------------------ shards

def test_three_shards_merged_equal_one_run(tmp_path, model_file, capsys, night):
    args = ["--dataset", night, "--model", model_file, "--outputs", "mask"]
    assert run(capsys, *args, "--save_dir", tmp_path / "whole")[0] == 0
    out = tmp_path / "sharded"
    for part in ("1/3", "2/3", "3/3"):
        assert run(capsys, *args, "--save_dir", out, "--shard", part)[0] == 0
    counts = [len(summary(out, f"summary.shard-{k}-of-3.csv")) - 1 for k in (1, 2, 3)]
    assert counts == [2, 2, 2]
    code, captured = run(capsys, "--save_dir", out, "--merge")
    assert code == 0 and "merged 6 frames" in captured.out
    assert without_seconds(summary(out)) == without_seconds(summary(tmp_path / "whole"))
    whole_keogram = np.load(next((tmp_path / "whole" / "night").glob("*.npz")))
    merged_keogram = np.load(next((out / "night").glob("*.npz")))
    np.testing.assert_array_equal(whole_keogram["mask"], merged_keogram["mask"])


def test_merge_refuses_missing_shards(tmp_path, model_file, capsys, night):
    out = tmp_path / "sharded"
    assert run(capsys, "--dataset", night, "--model", model_file, "--save_dir", out, "--shard", "1/2",
               "--outputs", "mask")[0] == 0
    code, captured = run(capsys, "--dataset", night, "--save_dir", out, "--merge")
    assert code == 2 and "shard 2/2 has not finished" in captured.err


@pytest.mark.parametrize("shard", ["0/3", "4/3", "1/0", "2", "a/b"])
def test_bad_shards_are_one_line_errors(tmp_path, model_file, capsys, shard):
    code, captured = run(capsys, "--dataset", tmp_path, "--model", model_file, "--save_dir", tmp_path / "o",
                         "--shard", shard)
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert "argument --shard: expected K/N" in lines[-1] and "Traceback" not in captured.err


# ------------------------------------------------------------ frames in memory

def test_segment_arrays_on_a_uint16_time_series(tmp_path):
    frames = np.stack([np.rint(band_frame(2 + k)[..., 0] * 65535).astype(np.uint16) for k in range(3)])
    result = segmentation.segment_arrays(centre_model(), frames, stride=1, refine=False)
    assert result["mask"].shape == (3, 24, 20) and result["p_aurora"].dtype == np.float32
    for k in range(3):
        assert np.flatnonzero(result["mask"][k][:, 0]).tolist() == [2 + k, 3 + k, 4 + k]
    np.testing.assert_allclose(result["aurora_fraction"], 3 / 24)
    with pytest.raises(ValueError, match=r"Invalid frames: expected shape \(time, rows, cols\)"):
        segmentation.segment_arrays(centre_model(), frames[0])
