"""The quickstart notebook runs top to bottom (in its tiny random configuration, D2L_NOTEBOOK_TINY=1) in a
Jupyter kernel of this interpreter, and shows what it promises: the internalization, the three answers, the
adapter plot, a training run and its loss curve."""

import json
import re
import sys
from pathlib import Path

import jax
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPOSITORY = Path(__file__).resolve().parent.parent
NOTEBOOK = REPOSITORY / "experiments" / "notebooks" / "quickstart.ipynb"
KERNEL = "d2l-jax-tests"


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernel spec for this interpreter, visible to this test only (JUPYTER_PATH), not installed anywhere."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("D2L_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # The kernel shares the suite's compilation cache (tests/conftest.py) and its XLA flags (inherited): the
    # notebook's tiny model and hypernetwork are the ones tests/launch build, so their programs compile once.
    if jax.config.jax_compilation_cache_dir:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return KERNEL


def test_quickstart_notebook_runs(kernel):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # shipped without outputs
    client = nbclient.NotebookClient(
        notebook, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(REPOSITORY)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "tiny random configuration: True" in text
    assert len(re.findall(r"internalized haystack\.txt: \d+ tokens, \d+ chunks, adapter rank \d+ \(", text)) == 2
    for line in ("D2L, document internalized (not in the prompt): ", "base model, no document: ", "base model, document in the prompt: "):
        assert line in text
    assert re.search(r"memory:  adapter [\d.]+ \w+, key/value cache", text)
    assert re.search(r"trained 3 steps in \d+ s", text) and re.search(r"loss [\d.]+ at step 1 -> [\d.]+ at step 3", text)
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == 2  # the adapter's norms per layer and the loss curve
