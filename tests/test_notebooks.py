"""Execute the notebooks headless in smoke mode; check they are committed without outputs."""
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["Classifier.ipynb", "VAE.ipynb", "Visualization.ipynb"]  # in dependency order


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs_and_parameters_first(name):
    nb = json.loads((ROOT / name).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), f"clear the outputs of {name}"
    first = "".join(code[0]["source"])
    assert "SMOKE" in first and "DATA_DIR" in first and "training.setting(" in first  # read from the environment


def test_notebooks_run_in_smoke_mode(monkeypatch):
    """All three in one test, in order: each reads the checkpoints of those before it (also under pytest -n)."""
    for key, value in dict(SMOKE="1", DATASET="synthetic", RETRAIN="1", MPLBACKEND="Agg", ATLAS="1").items():
        monkeypatch.setenv(key, value)
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / name, as_version=4)
        client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
        try:
            client.execute()
        except CellExecutionError as e:  # the first failing cell, with its traceback
            pytest.fail(f"{name} failed:\n{e}")
        out = ROOT / "outputs" / "smoke" / name  # beside the smoke run's figures, apart from a full run's
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{name}: {errors}"
    assert (ROOT / "outputs" / "smoke" / "atlas" / "index.html").is_file()  # Visualization's last cell (ATLAS=1)
