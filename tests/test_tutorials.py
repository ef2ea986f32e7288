"""Every tutorial runs top to bottom on the embedded model, in quick mode, and is stored without outputs.

Quick mode (``TLMICROSCOPE_QUICK=1``) is an environment variable the notebooks read to shorten
training and sweeps; without it each notebook is sized to finish within 10 minutes on 2 cores.
"""

import os
from pathlib import Path

import nbformat
import pytest

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("*.ipynb"))


def test_the_six_tutorials_exist():
    names = [p.stem for p in TUTORIALS]
    expected = ["01_first_look", "02_tuned_lens", "03_llm_microscope", "04_token_geometry",
                "05_latent_geometry", "06_causal"]
    missing = [n for n in expected if n not in names]
    assert not missing, f"missing tutorials: {missing}"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_outputs_are_stripped(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"


@pytest.mark.embedded
@pytest.mark.tutorials
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("TLMICROSCOPE_QUICK", "1")
    monkeypatch.setenv("TLMICROSCOPE_TUTORIAL_OUT", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    # The last cell prints the paper-vs-here table; it must have produced output.
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert last.outputs, f"{path.name}: the final comparison table printed nothing"
