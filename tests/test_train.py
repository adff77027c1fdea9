"""train.py through its CLI, as a user runs it, on tiny folders in tmp_path."""

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import train
from conftest import ROOT, write_png


def dark_sky(rng, size):
    """A noisy dark frame: the positive (background) class."""
    sky = 0.08 + 0.03 * rng.standard_normal((size, size, 3))
    return np.clip(sky, 0, 1)


def with_aurora(rng, size):
    """Dark sky with a bright green band across the left half: aurora."""
    frame = dark_sky(rng, size)
    frame[:, : size // 2, 1] = 0.7 + 0.05 * rng.standard_normal((size, size // 2))
    return frame


# U holds 4 dark frames and 4 with a band over their left half; a 16-pixel
# patch centred in a 48-pixel frame holds band pixels for 24 of its 33
# centres across, so 4/8 * 24/33 of U's patches are aurora.
PRIOR = round(1 - 0.5 * 24 / 33, 3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """P: 6 dark frames. U: 4 dark + 4 half-aurora frames. N: 4 aurora crops."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name in ("P", "U", "N"):
        (root / name).mkdir()
    for i in range(6):
        write_png(root / "P" / f"p{i}.png", dark_sky(rng, 48))
    for i in range(4):
        write_png(root / "U" / f"sky{i}.png", dark_sky(rng, 48))
        write_png(root / "U" / f"aurora{i}.png", with_aurora(rng, 48))
        write_png(root / "N" / f"n{i}.png", with_aurora(rng, 48)[:, :24])
    return root


def base_args(folders, save_dir, *extra):
    return ["--P_dataset", str(folders / "P"), "--U_dataset", str(folders / "U"),
            "--save_dir", str(save_dir), "--patch_size", "16", "--P_n", "200", "--U_n", "400",
            "--epochs", "1", "--batchsize", "32", "--quiet", "--prior", str(PRIOR), *extra]


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):
    """One CNN training run shared by the output checks."""
    save_dir = tmp_path_factory.mktemp("run") / "Results"
    code = train.main(base_args(folders, save_dir, "--model", "CNN", "--epochs", "2"))
    assert code == 0
    return save_dir


def test_cli_writes_every_output(trained):
    for name in ("model.keras", "config.json", "history.csv", "loss.png", "prediction.png"):
        assert (trained / name).stat().st_size > 0, name
    assert not (trained / "backup").exists()


def test_config_records_the_resolved_settings(trained, folders):
    config = json.loads((trained / "config.json").read_text())
    assert config["prior"] == config["prior_given"] == PRIOR
    assert config["method"] == "nnPU" and config["balanced"] is True and config["loss"] == "logistic"
    assert config["model"] == "CNN" and config["background_jitter"] == 0.0  # patches: no excess to move
    assert config["P_dataset"] == [str(folders / "P")]
    assert config["P_frames"] == 6 and config["U_frames"] == 8
    assert config["P_patches"] == [180, 20] and config["U_patches"] == [360, 40]
    assert config["epochs_run"] == 2 and config["status"] == "ok" and config["failure"] is None
    assert config["rare_aurora_note"] is None  # a CNN, and aurora in about a third of U
    import keras

    assert config["backend"] == keras.backend.backend() and config["device"] in ("CPU", "GPU")
    assert set(config["versions"]) >= {"keras", "numpy"}
    # 48-pixel frames are three 16-pixel patches wide: too small to normalize by a background.
    assert config["preprocessing"]["normalize"] == "none"
    assert config["preprocessing"]["camera_range"] == [0.0, 255.0]


def test_history_has_risks_per_epoch(trained):
    with open(trained / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for key in ("loss", "positive_risk", "negative_risk", "val_pu_zero_one_risk", "val_nnpu_risk"):
        assert np.isfinite(float(rows[-1][key])), key


def test_learning_rate_falls_to_zero_along_a_cosine(trained):
    # Two epochs: after the first the cosine is half-way down, after the last at 0.
    with open(trained / "history.csv", newline="") as f:
        rates = [float(row["learning_rate"]) for row in csv.DictReader(f)]
    lr = json.loads((trained / "config.json").read_text())["lr"]
    assert rates[0] == pytest.approx(lr / 2, rel=1e-3)
    assert rates[-1] == pytest.approx(0.0, abs=lr * 1e-6)


@pytest.mark.slow
def test_saved_model_loads_in_a_fresh_process_without_project_modules(trained):
    script = (
        "import sys, keras, numpy as np\n"
        f"m = keras.models.load_model({str(trained / 'model.keras')!r}, compile=False)\n"
        "assert 'PULoss' not in sys.modules and 'train' not in sys.modules\n"
        "out = m.predict(np.zeros((3, 16, 16, 3), 'float32'), verbose=0)\n"
        "print(tuple(m.input_shape), out.shape, out.dtype)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "(None, 16, 16, 3) (3, 1) float32"


@pytest.mark.slow
def test_resnet18_classifies_held_out_patches_in_inference_mode(folders, tmp_path):
    save_dir = tmp_path / "Results"
    code = train.main(base_args(folders, save_dir, "--epochs", "3"))
    assert code == 0
    import keras

    model = keras.models.load_model(save_dir / "model.keras", compile=False)
    rng = np.random.default_rng(123)  # fresh patches the training never saw
    background = np.stack([dark_sky(rng, 16) for _ in range(50)]).astype("float32")
    aurora = np.stack([with_aurora(rng, 32)[:16, :16] for _ in range(50)]).astype("float32")
    logits = model.predict(np.concatenate([background, aurora]), verbose=0).ravel()
    accuracy = np.mean((logits > 0) == np.r_[np.ones(50), np.zeros(50)].astype(bool))
    assert accuracy >= 0.9, accuracy


def test_no_nnpu_selects_upu_and_no_balanced_the_plain_risk(folders, tmp_path):
    args = train.build_parser().parse_args(base_args(folders, tmp_path, "--no-nnPU", "--no-balanced"))
    loss = train.make_loss(args, 0.4)
    assert type(loss).__name__ == "PULoss" and loss.nnPU is False and loss.balanced is False
    loss = train.make_loss(train.build_parser().parse_args(base_args(folders, tmp_path)), 0.4)
    assert loss.nnPU is True and loss.balanced is True and loss.loss == "logistic" and loss.prior == 0.4


def test_n_dataset_selects_pnu_and_trains(folders, tmp_path):
    save_dir = tmp_path / "pnu"
    code = train.main(base_args(folders, save_dir, "--model", "CNN", "--N_dataset", str(folders / "N"),
                                "--eta", "0.5", "--N_n", "100"))
    assert code == 0
    config = json.loads((save_dir / "config.json").read_text())
    assert config["method"] == "PNU" and config["N_patches"] == 100


@pytest.mark.parametrize("extra,message", [
    (["--prior", "1.5"], r"argument --prior: expected 0 < prior < 1, received 1.5"),
    (["--prior", "abc"], r"argument --prior: expected a number in \(0, 1\), received 'abc'"),
    (["--epochs", "0"], r"argument --epochs: expected an integer >= 1, received 0"),
    (["--batchsize", "1"], r"--batchsize: every batch needs P and U patches"),
    (["--nnPU", "False"], r"unrecognized arguments: False"),
    (["--eta", "0.5"], r"--eta needs --N_dataset"),
    (["--N_dataset", "."], r"--N_dataset needs --eta"),
    (["--N_dataset", ".", "--eta", "2"], r"--eta: expected -1 <= eta <= 1, received 2.0"),
    (["--gamma", "2"], r"--gamma: expected 0 <= gamma <= 1, received 2.0"),
    (["--beta", "-1"], r"--beta: expected beta >= 0, received -1.0"),
    (["--model", "VGG"], r"argument --model: invalid choice: 'VGG'"),
    (["--patch_size", "64"], r"P: none of its 6 files gave a frame usable for 64x64 patches"),
    (["--seed", "-1"], r"argument --seed: expected an integer >= 0, received -1"),
    (["--P_n_sacrifice", "-2"], r"argument --P_n_sacrifice: expected an integer >= 0, received -2"),
    (["--min_elevation", "90"], r"argument --min_elevation: expected degrees from -90 to below 90, received 90.0"),
    (["--background_sectors", "-1"], r"argument --background_sectors: expected an integer >= 0, received -1"),
    # 48x48 images are patches (under 4 patches a side): no sky around them to take sectors of.
    (["--background_sectors", "12"], r"--background_sectors needs the background normalization"),
    (["--position"], r"--position needs the background normalization"),
    (["--sky_template"], r"--sky_template needs the background normalization"),
    (["--background_jitter", "1"], r"--background_jitter needs the background normalization"),
    (["--background_jitter", "-1"], r"argument --background_jitter: expected a number >= 0, received -1.0"),
])
def test_bad_flags_exit_2_with_one_line(folders, tmp_path, capsys, extra, message):
    save_dir = tmp_path / "out"
    assert run_main(base_args(folders, save_dir, *extra)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # Skipped files are warned about one line each; the error is one line.
    assert all(line.startswith("train.py: warning:") for line in lines[:-1]), lines
    assert lines[-1].startswith("train.py: error:") and re.search(message, lines[-1]), lines
    assert not save_dir.exists()


def run_main(argv):
    """main()'s exit code, whether it returns it or argparse exits."""
    try:
        return train.main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_missing_and_empty_folders(folders, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train.main(base_args(folders, tmp_path / "o", "--P_dataset", str(tmp_path / "nope"))) == 2
    assert "--P_dataset" in capsys.readouterr().err
    assert train.main(base_args(folders, tmp_path / "o", "--U_dataset", str(tmp_path / "empty"))) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and len(err.strip().splitlines()) == 1


def test_existing_model_is_not_overwritten(folders, tmp_path, capsys):
    save_dir = tmp_path / "Results"
    save_dir.mkdir()
    (save_dir / "model.keras").write_bytes(b"earlier run")
    assert train.main(base_args(folders, save_dir)) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (save_dir / "model.keras").read_bytes() == b"earlier run"
    assert train.main(base_args(folders, save_dir, "--model", "CNN", "--overwrite")) == 0
    assert (save_dir / "model.keras").read_bytes() != b"earlier run"


@pytest.mark.slow
def test_cli_runs_as_a_script(folders, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--P_dataset" in result.stdout and "(default: auto)" in result.stdout
    assert "(default: None)" not in result.stdout and "(default: False)" not in result.stdout
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *base_args(folders, tmp_path, "--prior", "2")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_unseen_patches_are_ten_times_the_draw_within_their_memory_cap(folders, tmp_path, monkeypatch):
    args = train.build_parser().parse_args(base_args(folders, tmp_path / "out"))
    preprocessing = train.resolve_preprocessing(args, train.frame_files([args.U_dataset], False))
    P, U, N = train.load_patch_sets(args, preprocessing, np.random.default_rng(0))
    assert N is None and len(P.unseen) >= 2000 and len(U.unseen) >= 4000
    # Room for 500 16x16 patches only: the unseen draw shrinks, the training draw does not.
    monkeypatch.setattr(train, "UNSEEN_BYTES", 500 * 4 * 3 * 16 * 16)
    P, U, _ = train.load_patch_sets(args, preprocessing, np.random.default_rng(0))
    assert len(U.unseen) == 500 and len(P.unseen) == 500 and len(U.patches) == 400


def test_rare_aurora_note_points_resnet18_at_the_cnn_only_when_aurora_is_rare():
    note = train.rare_aurora_note(0.98, "ResNet18")
    assert "prior 0.980" in note and "2.0% of its patches" in note and "--model CNN" in note
    assert train.rare_aurora_note(train.RARE_PRIOR - 0.01, "ResNet18") is None
    assert train.rare_aurora_note(0.99, "CNN") is None


def test_rare_aurora_note_points_position_models_at_a_run_without_it():
    note = train.rare_aurora_note(train.POSITION_RARE_PRIOR, "CNN", position=True)
    assert "--position" in note and "prior 0.950" in note
    assert train.rare_aurora_note(train.POSITION_RARE_PRIOR - 0.01, "CNN", position=True) is None


def test_model_auto_is_the_resnet18_unless_aurora_is_rare():
    assert train.choose_network("auto", train.RARE_PRIOR - 0.01) == "ResNet18"
    assert train.choose_network("auto", train.RARE_PRIOR) == "CNN"
    assert train.choose_network("ResNet18", 0.99) == "ResNet18"
    assert train.choose_network("CNN", 0.5) == "CNN"


def test_rare_aurora_trains_the_cnn_by_default_and_says_so(folders, tmp_path, capsys):
    args = [arg for arg in base_args(folders, tmp_path, "--attempts", "1") if arg != "--quiet"]
    args[args.index("--prior") + 1] = "0.98"
    code = train.main(args)
    out, err = capsys.readouterr()
    assert code in (0, train.EXIT_TRAINING_FAILED), err  # 1 epoch on 400 patches may collapse
    assert "training the small CNN" in out and "note:" not in err
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"] == "CNN" and config["model_flag"] == "auto" and config["rare_aurora_note"] is None
    if code == 0:
        import keras

        weights = keras.models.load_model(tmp_path / "model.keras", compile=False).count_params()
        assert weights < 100_000, weights  # the CNN's tens of thousands, not the ResNet18's millions


def test_the_rare_aurora_note_reaches_stderr_even_with_quiet(folders, tmp_path, capsys, monkeypatch):
    def fake_train(args):
        return {"frames_without_border": {"P": [], "U": []}, "U_frames_unlike_P": [],
                "rare_aurora_note": train.rare_aurora_note(0.985, args.model)}

    monkeypatch.setattr(train, "train", fake_train)
    assert train.main(base_args(folders, tmp_path / "a", "--model", "ResNet18")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: note: aurora is rare in U (prior 0.985")
    assert train.main(base_args(folders, tmp_path / "b", "--model", "CNN")) == 0
    assert capsys.readouterr().err == ""
