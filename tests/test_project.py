"""The project's contract with its users and CI: commands in README.md."""

import re

from conftest import ROOT


def fenced_commands(markdown):
    blocks = re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Tests", 1)[1].split("\n## ", 1)[0]
    test_command = fenced_commands(section)[0]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command == "python -m pytest -q" and test_command in ci_lines
    # The JAX pass the README names runs in CI too.
    jax_pass = [line.strip() for line in section.splitlines() if line.strip().startswith("KERAS_BACKEND=jax")]
    assert jax_pass and jax_pass[0] in ci_lines


def quick_start():
    readme = (ROOT / "README.md").read_text()
    return fenced_commands(readme.split("## Quick start", 1)[1].split("\n## ", 1)[0])


def test_quick_start_is_install_train_segment_with_real_paths():
    import shlex

    import segmentation
    import train

    install, train_command, segment_command = quick_start()
    assert install == "python -m pip install -r requirements.txt"
    train_argv = shlex.split(train_command)
    assert train_argv[:2] == ["python", "train.py"]
    train_args = train.build_parser().parse_args(train_argv[2:])
    segment_argv = shlex.split(segment_command)
    assert segment_argv[:2] == ["python", "segmentation.py"]
    segment_args = segmentation.build_parser().parse_args(segment_argv[2:])
    for folder in (*train_args.P_dataset, train_args.U_dataset, segment_args.dataset, segment_args.masks):
        assert (ROOT / folder).is_dir(), folder
    # Segmentation reads the model the training command writes.
    assert (ROOT / segment_args.model) == ROOT / train_args.save_dir / "model.keras"
