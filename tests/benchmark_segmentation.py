"""Benchmark segmentation speed and memory, the training input pipeline, and archive runs.

Run from the project folder::

    python tests/benchmark_segmentation.py --model Results/model.keras
    python tests/benchmark_segmentation.py --model Results/model.keras --large     # adds a 4096x4096 frame
    python tests/benchmark_segmentation.py --model Results/model.keras --archive   # folder runs of 50 to 500 frames
    python tests/benchmark_segmentation.py --only_preparation                      # data.prepare_frame alone

It prints one table, one row per segmentation method: seconds per frame,
patches evaluated, peak memory, agreement (IoU of the aurora masks) with the
exact ``--stride 1`` masks of the same frames, and the speed-up over the
seed's method; then the exact mode's throughput against bare model calls,
the training pipeline against ``fit`` on in-memory arrays, and start-up times.

Every method runs in its own Python process, so that its peak memory (the
process's maximum resident set size, ``ru_maxrss``) is its own and includes
TensorFlow and the model, as a user would see it.

The frames are the generator's all-sky frames with aurora
(``data.synthetic_frame(size, seed=i)``), so the masks have real boundaries.

The seed's method, re-implemented here: every stride-1 patch of the frame
built in one array, then ``model.predict(batch_size=512)``. For a 480x480
frame that array is 2.8 GB, so by default it is timed on a block of
``--seed_block_rows`` rows (all columns) and its time is extrapolated per
patch to the whole frame, and its memory by adding the rest of the array;
``--seed_block_rows 0`` runs it on the whole frame. Its mask is the exact
mask (the same reflect padding), so it gets no IoU column of its own.

The file is named ``benchmark_*.py`` so that pytest does not collect it: it
takes minutes and its numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Methods in the order of the table: name, segment_frame arguments.
# The batch size is --batchsize unless a method sets its own. The table
# compares ways of computing the model's map, so masks are P(aurora) > 0.5
# without the mask refinement (refine=False); the default method's worker
# times the refinement separately.
METHODS = {
    "exact (--stride 1)": dict(stride=1, adaptive=False),
    "default (--stride 16 --adaptive --fine_stride 2)": dict(stride=16, adaptive=True, fine_stride=2),
    "default, --batchsize 1024": dict(stride=16, adaptive=True, fine_stride=2, batch_size=1024),
    "fine stride 1 (--fine_stride 1)": dict(stride=16, adaptive=True, fine_stride=1),
    "plain grid (--stride 4 --no-adaptive)": dict(stride=4, adaptive=False),
}
METHODS = {name: dict(refine=False, **settings) for name, settings in METHODS.items()}
EXACT = "exact (--stride 1)"
DEFAULT = "default (--stride 16 --adaptive --fine_stride 2)"
SEED = "seed (all patches, predict)"


# ---------------------------------------------------------------------------
# Workers: one method in one process, results as one JSON line on stdout
# ---------------------------------------------------------------------------


def _max_rss_mb(who=resource.RUSAGE_SELF):
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(who).ru_maxrss / 1024


def _frames(size, count, preprocessing):
    """The generator's aurora frames, prepared as the model was trained (``data.prepare_frame``)."""
    import data

    return [data.prepare_frame(data.synthetic_frame(size, seed=seed)[0].astype("float32"), 255.0, preprocessing)
            for seed in range(count)]


def worker_segment(args, started):
    """Segment ``args.frames`` frames with one method; save the masks; report times and memory."""
    import data

    keras = data.import_keras()  # noqa: F841  (timed: this is the backend's import)
    imported = time.time()
    import segmentation

    model, preprocessing = data.load_model(args.model)
    loaded = time.time()
    frames = _frames(args.size, args.frames, preprocessing)
    settings = {"batch_size": args.batchsize, **METHODS[args.worker]}
    patch_size = data.patch_size_of(model)
    # The first frame includes tracing the forward pass: timed separately.
    # The exact mode traces on a corner, to spare a whole extra exact frame.
    warm = frames[0]
    if args.worker == EXACT:
        warm = warm._replace(image=warm.image[:64, :64], model_input=warm.model_input[:64, :64], sky=warm.sky[:64, :64])
    warm_p, warm_mask, _ = segmentation.segment_frame(model, warm, preprocessing, **settings)
    first_frame = time.time()
    if args.worker == DEFAULT:
        # Imports scikit-image's random walker, outside the timed frames.
        segmentation.finish_mask(warm, warm_p, warm_mask, patch_size, preprocessing)
    seconds, patches, masks = [], [], []
    bare, refine_seconds = [], []
    for prepared in frames:
        if args.worker == EXACT:
            bare.append(_bare_throughput(segmentation, model, prepared.model_input, args.batchsize))
        start = time.perf_counter()
        p_aurora, mask, count = segmentation.segment_frame(model, prepared, preprocessing, **settings)
        seconds.append(time.perf_counter() - start)
        patches.append(count)
        masks.append(mask)
        if args.worker == DEFAULT:
            start = time.perf_counter()
            segmentation.finish_mask(prepared, p_aurora, mask, patch_size, preprocessing)
            refine_seconds.append(time.perf_counter() - start)
    if args.worker == EXACT:
        bare.append(_bare_throughput(segmentation, model, frames[-1].model_input, args.batchsize))
    np.save(args.masks_file, np.stack(masks))
    return {
        "seconds": seconds,
        "patches": patches,
        "max_rss_mb": _max_rss_mb(),
        "import_s": imported - started,
        "load_s": loaded - imported,
        "first_frame_s": first_frame - loaded,
        "bare": bare,
        "refine_s": refine_seconds,
    }


def _bare_throughput(segmentation, model, image, batch_size, count=4096):
    """Patches per second of the model alone on pre-built batches of this frame's patches.

    Returns (forward pass of ``predict_logits``, ``model.predict``), both on
    the same array of ``count`` contiguous patches.
    """
    import data

    patch_size = data.patch_size_of(model)
    windows = segmentation.patch_windows(segmentation.pad_frame(image, patch_size), patch_size)
    rows = np.random.default_rng(0).integers(0, image.shape[0], count)
    cols = np.random.default_rng(1).integers(0, image.shape[1], count)
    patches = np.ascontiguousarray(windows[rows, cols])
    start = time.perf_counter()
    data.predict_logits(model, patches, batch_size)
    forward = count / (time.perf_counter() - start)
    model.predict(patches[:batch_size], batch_size=batch_size, verbose=0)  # traces predict once
    start = time.perf_counter()
    model.predict(patches, batch_size=batch_size, verbose=0)
    predict = count / (time.perf_counter() - start)
    return forward, predict


def worker_seed(args, started):
    """The seed's method on a block of rows of each frame (or the whole frame)."""
    import data

    data.import_keras()
    import segmentation

    model, preprocessing = data.load_model(args.model)
    patch_size = data.patch_size_of(model)
    frames = [prepared.model_input for prepared in _frames(args.size, args.frames, preprocessing)]
    block_rows = args.seed_block_rows or args.size
    # The seed's predict traces once for a night of frames; not timed.
    model.predict(np.zeros((512, patch_size, patch_size, 3), np.float32), batch_size=512, verbose=0)
    seconds, block_bytes = [], 0
    for image in frames:
        start = time.perf_counter()
        windows = segmentation.patch_windows(segmentation.pad_frame(image, patch_size), patch_size)
        # (block_rows * cols, p, p, 3): every stride-1 patch of the block in one array.
        patches = np.ascontiguousarray(windows[:block_rows]).reshape(-1, patch_size, patch_size, 3)
        logits = model.predict(patches, batch_size=512, verbose=0).reshape(block_rows, image.shape[1])
        mask = logits < 0  # noqa: F841  (the seed's mask: P(aurora) > 0.5)
        seconds.append((time.perf_counter() - start) * image.shape[0] / block_rows)
        block_bytes = patches.nbytes
        del patches, windows
    full_bytes = args.size * args.size * patch_size * patch_size * 3 * 4
    return {
        "seconds": seconds,
        "patches": [args.size * args.size] * len(frames),
        "max_rss_mb": _max_rss_mb() + (full_bytes - block_bytes) / 2**20,
        "extrapolated": block_rows < args.size,
        "block_rows": block_rows,
    }


def worker_training(args, started):
    """Seconds per training step: the P/U batches against fit on pre-built arrays."""
    import data

    keras = data.import_keras()
    import train
    from PULoss import PULoss

    rng = np.random.default_rng(0)
    P = rng.random((2000, 32, 32, 3), dtype=np.float32)
    U = rng.random((4000, 32, 32, 3), dtype=np.float32)
    batch_size = args.train_batchsize
    results = {}
    for name, steps in (("CNN", args.train_steps), ("ResNet18", args.train_steps_resnet)):
        keras.utils.set_random_seed(0)
        model = train.MODELS[name](32)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=PULoss(prior=0.7))
        # Pre-built arrays holding the very batches the pipeline draws, in order.
        pipeline = data.make_pu_dataset(P, U, batch_size, seed=0, augment=True, steps_per_epoch=steps)
        batches = [pipeline[i] for i in range(steps)]
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        del batches
        # Warm-up: traces the train step for both inputs.
        warm = data.make_pu_dataset(P, U, batch_size, seed=1, steps_per_epoch=5)
        model.fit(iter(warm), steps_per_epoch=5, epochs=1, verbose=0, shuffle=False)
        model.fit(x[: 5 * batch_size], y[: 5 * batch_size], batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
        timings = {"pipeline": [], "arrays": []}
        # Alternating halves: a change in the machine's load hits both alike.
        for _ in range(2):
            start = time.perf_counter()
            half_batches = data.make_pu_dataset(P, U, batch_size, seed=0, augment=True, steps_per_epoch=steps // 2)
            model.fit(iter(half_batches), steps_per_epoch=steps // 2, epochs=1, verbose=0, shuffle=False)
            timings["pipeline"].append((time.perf_counter() - start) / (steps // 2))
            start = time.perf_counter()
            half = steps // 2 * batch_size
            model.fit(x[:half], y[:half], batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
            timings["arrays"].append((time.perf_counter() - start) / (steps // 2))
        results[name] = {"steps": steps, **{key: float(np.sum(value)) / 2 for key, value in timings.items()}}
    return results


def run_worker(args, worker, extra=()):
    """Run this script as a worker process; return its JSON report."""
    command = [sys.executable, __file__, "--worker", worker, "--model", str(args.model), "--size", str(args.size),
               "--frames", str(args.frames), "--batchsize", str(args.batchsize),
               "--seed_block_rows", str(args.seed_block_rows), "--train_steps", str(args.train_steps),
               "--train_steps_resnet", str(args.train_steps_resnet),
               "--train_batchsize", str(args.train_batchsize), "--started", repr(time.time()), *extra]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {worker} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# The 4096x4096 frame through the command line, in a child process
# ---------------------------------------------------------------------------


def large_frame_run(args, folder):
    """Segment one 4096x4096 frame with ``segmentation.py`` (default settings, all outputs written)."""
    import data
    from PIL import Image

    frames = Path(folder) / "large"
    frames.mkdir()
    image, _ = data.synthetic_frame(4096, seed=0)
    Image.fromarray(image).save(frames / "large_4096.png")
    del image
    wall, rows, peak_mb = _cli_run(args, frames, Path(folder) / "large_out")
    return {"wall_s": wall, "frame_s": float(rows[0]["seconds"]), "patches": int(rows[0]["patches"]),
            "max_rss_mb": peak_mb}


# ---------------------------------------------------------------------------
# Archive runs: a folder through the command line against frames in memory
# ---------------------------------------------------------------------------


def _archive_folder(folder, count, size, unique=50):
    """``count`` PNG frames of the generator in ``folder``: ``unique`` different ones, repeated under new names."""
    import shutil

    import data
    from PIL import Image

    folder.mkdir(parents=True)
    for k in range(count):
        target = folder / f"frame_{k:04d}.png"
        if k < unique:
            Image.fromarray(data.synthetic_frame(size, seed=k)[0]).save(target)
        else:
            shutil.copyfile(folder / f"frame_{k % unique:04d}.png", target)
    return folder


def _cli_run(args, frames, out, *extra, trace=None):
    """segmentation.py on ``frames`` in a child process: (wall seconds, summary rows without the mean, peak RSS MB).

    With ``trace`` (a list), appends (masks written, peak RSS MB so far)
    every two seconds while it runs (Linux, from /proc; nothing elsewhere).
    """
    command = [sys.executable, str(ROOT / "segmentation.py"), "--dataset", str(frames), "--model", str(args.model),
               "--save_dir", str(out), "--quiet", *extra]
    # A wrapper process whose only child is segmentation.py, so that its
    # RUSAGE_CHILDREN peak is that run's alone.
    wrapper = ("import resource, subprocess, sys, time; start = time.perf_counter(); "
               "code = subprocess.run(sys.argv[1:]).returncode; wall = time.perf_counter() - start; "
               "print(code, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    process = subprocess.Popen([sys.executable, "-c", wrapper, *command], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT)
    if trace is not None:
        while process.poll() is None:
            peak = _child_peak_mb(process.pid)
            if peak is not None:
                trace.append((len(list((Path(out) / "mask").glob("*.png"))), peak))
            time.sleep(2)
    stdout, stderr = process.communicate()
    # The last line is the wrapper's; segmentation.py's own lines come before it.
    code, wall, peak_kb = stdout.strip().splitlines()[-1].split()
    if int(code) != 0:
        raise RuntimeError(f"segmentation.py on {frames} failed:\n{stderr[-3000:]}")
    with open(Path(out) / "summary.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["file"] != "mean"]
    return float(wall), rows, int(peak_kb) / 1024


def _child_peak_mb(pid):
    """Peak RSS (VmHWM) in MB of the first child of process ``pid`` so far, or None where /proc cannot tell."""
    try:
        child = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0]
        for line in Path(f"/proc/{child}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, IndexError, ValueError):
        return None
    return None


def worker_in_memory(args, started):
    """The same frames decoded first, then prepared, segmented, refined and written one after another."""
    import data

    data.import_keras()
    import segmentation

    model, preprocessing = data.load_model(args.model)
    frames = [next(data.read_frames(path)) for path in data.list_images(args.archive_frames)]
    outputs = args.archive_outputs.split(",")
    out = Path(args.archive_out)
    patch_size = data.patch_size_of(model)
    # Traces the forward pass and imports the refinement, outside the timing.
    prepared = data.prepare_frame(frames[0].pixels, frames[0].full_scale, preprocessing)
    p_aurora, mask, _ = segmentation.segment_frame(model, prepared, preprocessing, refine=False)
    segmentation.finish_mask(prepared, p_aurora, mask, patch_size, preprocessing)
    start = time.perf_counter()
    for frame in frames:
        prepared = data.prepare_frame(frame.pixels, frame.full_scale, preprocessing)
        p_aurora, mask, _ = segmentation.segment_frame(model, prepared, preprocessing)
        segmentation.write_outputs(out, frame.name, prepared.image, prepared.sky, p_aurora, mask, outputs)
    return {"seconds": time.perf_counter() - start, "frames": len(frames), "max_rss_mb": _max_rss_mb()}


def archive_runs(args, folder):
    """Frames per second of folder runs against the same work on frames in memory; peak memory by folder size."""
    results = {}
    frames_200 = _archive_folder(Path(folder) / "frames_200", 200, args.size)
    for label, outputs in (("all outputs", "mask,color_filter,overlay,figure"), ("masks only", "mask")):
        wall, rows, peak = _cli_run(args, frames_200, Path(folder) / f"cli_{len(results)}", "--outputs",
                                    *outputs.split(","))
        memory = run_worker(args, "in memory", ["--archive_frames", str(frames_200), "--archive_outputs", outputs,
                                                "--archive_out", str(Path(folder) / f"memory_{len(results)}")])
        results[label] = {"cli_fps": len(rows) / wall, "memory_fps": memory["frames"] / memory["seconds"],
                          "cli_peak_mb": peak, "memory_peak_mb": memory["max_rss_mb"]}
    for count in (50, 500) if args.archive_memory else ():
        frames = _archive_folder(Path(folder) / f"frames_{count}", count, args.size)
        trace = []
        wall, rows, peak = _cli_run(args, frames, Path(folder) / f"cli_{count}", "--outputs", "mask", trace=trace)
        # Whether the peak still rises late in the run (a leak) or stops after a warm-up.
        by_frames = {done: max([mb for written, mb in trace if written <= done], default=None)
                     for done in range(100, count + 1, 100)}
        results[f"{count} frames, masks only"] = {"cli_fps": len(rows) / wall, "cli_peak_mb": peak,
                                                 "peak_by_frames": by_frames}
    return results


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def iou(predicted, truth):
    union = np.count_nonzero(predicted | truth)
    return np.count_nonzero(predicted & truth) / union if union else 1.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="Results/model.keras", help=".keras model saved by train.py")
    parser.add_argument("--size", type=int, default=480, help="side of the synthetic frames in pixels")
    parser.add_argument("--frames", type=int, default=2, help="frames per method (seeds 0, 1, ...)")
    parser.add_argument("--batchsize", type=int, default=256, help="patches per model call (segmentation.py's default)")
    parser.add_argument("--seed_block_rows", type=int, default=48,
                        help="rows of each frame the seed's method is timed on, extrapolated per patch; 0 = all")
    parser.add_argument("--large", action=argparse.BooleanOptionalAction, default=False,
                        help="also segment a 4096x4096 frame with segmentation.py and report its peak memory")
    parser.add_argument("--training", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the training input pipeline")
    parser.add_argument("--archive", action=argparse.BooleanOptionalAction, default=False,
                        help="folder runs of 200 frames against the same work in memory, and peak memory at 50 "
                             "and 500 frames")
    parser.add_argument("--only_archive", action=argparse.BooleanOptionalAction, default=False,
                        help="measure the archive runs alone")
    parser.add_argument("--archive_memory", action=argparse.BooleanOptionalAction, default=True,
                        help="with the archive runs, the 50- and 500-frame runs for peak memory")
    parser.add_argument("--archive_frames", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--archive_outputs", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--archive_out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--only_preparation", action=argparse.BooleanOptionalAction, default=False,
                        help="time data.prepare_frame alone, as each kind of model prepares frames, and stop")
    parser.add_argument("--train_steps", type=int, default=300, help="timed training steps of the CNN")
    parser.add_argument("--train_steps_resnet", type=int, default=100, help="timed training steps of the ResNet18")
    parser.add_argument("--train_batchsize", type=int, default=64, help="training batch size (train.py's default)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--masks_file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        started = args.started if args.started is not None else time.time()
        if args.worker == SEED:
            report = worker_seed(args, started)
        elif args.worker == "training":
            report = worker_training(args, started)
        elif args.worker == "in memory":
            report = worker_in_memory(args, started)
        else:
            report = worker_segment(args, started)
        print(json.dumps(report))
        return 0

    if args.only_preparation:
        print_preparation(args)
        return 0
    if not Path(args.model).is_file():
        parser.error(f"model file not found: {args.model} (train one with train.py, or pass --model)")
    load = lambda: open("/proc/loadavg").read().split()[:3]  # noqa: E731
    print(f"model {args.model}, {args.frames} frames of {args.size}x{args.size}, "
          f"load average at start {' '.join(load())}", flush=True)
    if args.only_archive:
        with tempfile.TemporaryDirectory() as folder:
            print_archive(archive_runs(args, folder), args)
        print(f"load average at end {' '.join(load())}")
        return 0
    with tempfile.TemporaryDirectory() as folder:
        reports, masks = {}, {}
        for method in METHODS:
            masks_file = Path(folder) / f"masks_{len(reports)}.npy"
            reports[method] = run_worker(args, method, ["--masks_file", str(masks_file)])
            masks[method] = np.load(masks_file)
            print(f"  {method}: done", flush=True)
        reports[SEED] = run_worker(args, SEED)
        print(f"  {SEED}: done", flush=True)
        large = large_frame_run(args, folder) if args.large else None
        training = run_worker(args, "training") if args.training else None
        archive = archive_runs(args, folder) if args.archive else None
    end_load = load()

    seed_seconds = float(np.mean(reports[SEED]["seconds"]))
    header = ["method", "frame", "s/frame", "patches/frame", "peak RSS MB", "IoU vs stride 1", "speed-up vs seed"]
    rows = []
    seed_report = reports[SEED]
    note = f" (timed on {seed_report['block_rows']} rows, extrapolated)" if seed_report["extrapolated"] else ""
    rows.append([SEED + note, f"{args.size}x{args.size}", f"{seed_seconds:.1f}",
                 f"{np.mean(seed_report['patches']):.0f}", f"~{seed_report['max_rss_mb']:.0f}", "= exact", "1.0x"])
    for method, report in reports.items():
        if method == SEED:
            continue
        seconds = float(np.mean(report["seconds"]))
        agreement = min(iou(a, b) for a, b in zip(masks[method], masks[EXACT]))
        rows.append([method, f"{args.size}x{args.size}", f"{seconds:.2f}", f"{np.mean(report['patches']):.0f}",
                     f"{report['max_rss_mb']:.0f}", f"{agreement:.4f} (min)", f"{seed_seconds / seconds:.0f}x"])
    if large is not None:
        rows.append(["default, segmentation.py CLI (refined mask, all outputs)", "4096x4096", f"{large['frame_s']:.1f}",
                     str(large["patches"]), f"{large['max_rss_mb']:.0f}", "-", "-"])
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()

    exact = reports[EXACT]
    exact_rate = np.sum(exact["patches"]) / np.sum(exact["seconds"])
    forward_rate = float(np.median([b[0] for b in exact["bare"]]))
    predict_rate = float(np.median([b[1] for b in exact["bare"]]))
    print(f"exact mode: {exact_rate:.0f} patches/s = {exact_rate / forward_rate:.2f}x the bare forward pass on "
          f"pre-built batches ({forward_rate:.0f} patches/s), {exact_rate / predict_rate:.2f}x model.predict "
          f"on them ({predict_rate:.0f} patches/s); batch {args.batchsize}")
    if training is not None:
        for name, result in training.items():
            print(f"training {name}, batch {args.train_batchsize}, {result['steps']} steps each: P/U pipeline "
                  f"{result['pipeline'] * 1000:.1f} ms/step, in-memory arrays {result['arrays'] * 1000:.1f} ms/step: "
                  f"pipeline throughput {result['arrays'] / result['pipeline']:.2f}x")
    default = reports[DEFAULT]
    print(f"mask refinement (--refine, on by default in segmentation.py, not in the table's times): "
          f"{np.median(default['refine_s']):.2f} s per {args.size}x{args.size} frame (median)")
    print(f"start-up to first frame: TensorFlow import {default['import_s']:.1f} s, model load "
          f"{default['load_s']:.1f} s, first {args.size}x{args.size} frame {default['first_frame_s']:.1f} s "
          f"(includes tracing), total {default['import_s'] + default['load_s'] + default['first_frame_s']:.1f} s")
    if large is not None:
        print(f"4096x4096: segmentation.py wall {large['wall_s']:.1f} s (start-up, segmentation and writing all "
              f"outputs); peak RSS of the child {large['max_rss_mb']:.0f} MB")
    if archive is not None:
        print_archive(archive, args)
    print(f"load average at end {' '.join(end_load)} (2-core machine shared with other jobs)")
    return 0


def print_preparation(args):
    """Seconds of ``data.prepare_frame`` per frame, colour and grey, by what the model's preprocessing asks."""
    import data

    template = np.zeros((data.SKY_TEMPLATE_CELLS, data.SKY_TEMPLATE_CELLS, 3)).tolist()
    kinds = {"background": {}, "--sky_template (version 5)": {"sky_template": template},
             "--sky_template, bright sky left out (version 6)": {"sky_template": template, "mask_bright": True}}
    print(f"data.prepare_frame, {args.size}x{args.size} generator frames, median of {args.frames} frames after one "
          f"unmeasured; load average {open('/proc/loadavg').read().split()[0]}")
    for colour in (True, False):
        frames = [data.synthetic_frame(args.size, seed=k)[0].astype(np.float32) for k in range(args.frames + 1)]
        if not colour:
            frames = [np.repeat(frame.mean(axis=2, keepdims=True), 3, axis=2) for frame in frames]
        for name, extra in kinds.items():
            preprocessing = {"version": data.PREPROCESSING_VERSION, "normalize": "background", "full_scale": 255.0,
                             "camera_range": [0.0, 255.0], "background_sectors": 0,
                             "grey_scales": None if colour else list(data.GREY_SCALES), **extra}
            seconds = []
            for frame in frames:
                started = time.perf_counter()
                data.prepare_frame(frame, 255.0, preprocessing)
                seconds.append(time.perf_counter() - started)
            print(f"  {'colour' if colour else 'grey'}, {name}: {np.median(seconds[1:]) * 1000:.0f} ms per frame")


def print_archive(results, args):
    for label, result in results.items():
        line = f"archive, {args.size}x{args.size}, {label}: segmentation.py on a folder {result['cli_fps']:.2f} frames/s"
        if "memory_fps" in result:
            line += (f", the same on frames in memory {result['memory_fps']:.2f} frames/s "
                     f"({result['cli_fps'] / result['memory_fps']:.0%}); peak RSS {result['cli_peak_mb']:.0f} MB "
                     f"(in memory, 200 frames held: {result['memory_peak_mb']:.0f} MB)")
        else:
            line += f"; peak RSS {result['cli_peak_mb']:.0f} MB"
        known = {done: mb for done, mb in result.get("peak_by_frames", {}).items() if mb is not None}
        if known:
            line += " (after " + ", ".join(f"{done} frames {mb:.0f} MB" for done, mb in known.items()) + ")"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
