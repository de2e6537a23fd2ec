"""The tutorial notebooks: stripped in git, built from their sources, and executed top to bottom."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_exist_and_match_sources():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import notebooks as nbtool
    finally:
        sys.path.pop(0)
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["01_wrap_and_evaluate", "02_repair_backdoored_model", "03_filter_poisoned_dataset"]
    for nb_path in NOTEBOOKS:
        src = ROOT / "notebooks" / "src" / (nb_path.stem + ".py")
        built = nbtool.strip(nbtool.parse(src.read_text()))
        on_disk = json.loads(nb_path.read_text())
        assert [c["source"] for c in on_disk["cells"]] == ["".join(c.source) if isinstance(c.source, list) else c.source
                                                            for c in built.cells] or \
            ["".join(c["source"]) for c in on_disk["cells"]] == [c.source for c in built.cells], \
            f"{nb_path.name} is out of date: run python tools/notebooks.py build"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_outputs_are_stripped(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name}: outputs not stripped"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    """Execute with nbclient in a temporary folder (nothing is written into the repository)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    seconds = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 2, "the notebook should show its plots"
    print(f"{path.name}: {seconds:.0f} s")
