"""Every tutorial runs top to bottom on the embedded model and is stored without outputs.

The notebooks read two environment variables. ``TLMICROSCOPE_SMOKE=1`` (what CI runs) shrinks every
size to the smallest that still runs each cell and code path: seconds of training, a few windows,
numbers with no meaning. ``TLMICROSCOPE_QUICK=1`` is the short run for people (1-9 minutes each);
it is marked ``slow`` and runs under ``make test-full``. Without either, each notebook is sized to
finish within 10 minutes on 2 cores.
"""

from pathlib import Path

import nbformat
import pytest

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("*.ipynb"))


def test_the_six_tutorials_exist():
    names = [p.stem for p in TUTORIALS]
    expected = [
        "01_first_look",
        "02_tuned_lens",
        "03_llm_microscope",
        "04_token_geometry",
        "05_latent_geometry",
        "06_causal",
        "07_lens_bench",
    ]
    missing = [n for n in expected if n not in names]
    assert not missing, f"missing tutorials: {missing}"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_outputs_are_stripped(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"


MODES = [
    pytest.param("smoke", id="smoke"),
    pytest.param("quick", id="quick", marks=pytest.mark.slow),
]


@pytest.mark.embedded
@pytest.mark.tutorials
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(path, mode, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.delenv("TLMICROSCOPE_SMOKE", raising=False)
    monkeypatch.delenv("TLMICROSCOPE_QUICK", raising=False)
    monkeypatch.setenv("TLMICROSCOPE_SMOKE" if mode == "smoke" else "TLMICROSCOPE_QUICK", "1")
    monkeypatch.setenv("TLMICROSCOPE_TUTORIAL_OUT", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    # The last cell prints the paper-vs-here table; it must have produced output.
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert last.outputs, f"{path.name}: the final comparison table printed nothing"
