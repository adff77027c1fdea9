"""The tutorial notebook runs top to bottom, and its committed copy carries its outputs.

The notebook is executed headless with nbclient on an in-memory copy, in the
project root, with the ``python3`` kernel. Nothing is written back: the file
in the repository keeps the outputs it was committed with.
"""

import base64
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "pulearn.ipynb"
CELL_TIMEOUT_S = 300
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def execute(notebook):
    """Run every cell of ``notebook`` in place; nbclient raises CellExecutionError on the first error."""
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()
    return notebook


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_kernel_runs_this_python():
    # The "python3" kernel must be the interpreter running the tests (the virtual
    # environment with the project's requirements), not some other Python on PATH.
    probe = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    execute(probe)
    printed = probe.cells[0].outputs[0]["text"].strip()
    assert Path(printed).resolve() == Path(sys.executable).resolve()


def test_stored_notebook_has_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cells = code_cells(notebook)
    assert cells, "pulearn.ipynb has no code cells"
    for index, cell in enumerate(cells):
        assert cell.execution_count == index + 1, f"code cell {index} was not run in order: {cell.source[:60]!r}"
        assert cell.outputs, f"code cell {index} has no stored output: {cell.source[:60]!r}"
        errors = [output for output in cell.outputs if output.output_type == "error"]
        assert not errors, f"code cell {index} stored an error: {errors[0].get('ename')}"


def test_stored_figures_are_embedded_png():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    images = [output["data"]["image/png"] for cell in code_cells(notebook) for output in cell.outputs
              if "data" in output and "image/png" in output["data"]]
    assert len(images) >= 5, f"expected the notebook's figures as PNG outputs, found {len(images)}"
    for image in images:
        assert base64.b64decode(image).startswith(PNG_SIGNATURE)


@pytest.mark.slow
def test_notebook_executes_without_errors():
    stored = NOTEBOOK.read_bytes()
    entries_before = {path.name for path in ROOT.iterdir()} - {"__pycache__", ".pytest_cache"}
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Clearing the outputs first makes sure every output checked below is fresh.
    for cell in code_cells(notebook):
        cell.outputs = []
        cell.execution_count = None
    execute(notebook)
    for index, cell in enumerate(code_cells(notebook)):
        assert not [output for output in cell.outputs if output.output_type == "error"], f"code cell {index} failed"
        assert cell.outputs, f"code cell {index} printed nothing: {cell.source[:60]!r}"
    assert NOTEBOOK.read_bytes() == stored, "executing the notebook changed the committed file"
    entries_after = {path.name for path in ROOT.iterdir()} - {"__pycache__", ".pytest_cache"}
    assert entries_after == entries_before, f"the notebook left files in the project root: {entries_after - entries_before}"
