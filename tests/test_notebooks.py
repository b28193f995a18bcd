"""Every notebook runs headless top to bottom, offline on a CPU, with small settings, and draws
its figures."""
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_draws(path, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPOPUP_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("XLA_FLAGS", "")  # the kernel on one CPU device, as a laptop
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    nbclient.NotebookClient(nb, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 4  # curves, kept fraction per layer, a mask, the sweep
    assert (tmp_path / "edgepopup_runs" / "k_sweep" / "results.csv").exists()
