"""The tutorial notebooks: built from their sources, stripped in git, and executed top to bottom.

The notebooks are generated from ``notebooks/src/*.py`` by ``tools/notebooks.py``. The fast
tests check that the committed ``.ipynb`` files match their sources and carry no outputs; the
slow ones execute each notebook with nbclient, in a temporary folder, on a kernel that is this
very interpreter, and check that the numbers each notebook prints tell its story. Run
``pytest tests/test_notebooks.py --durations=0`` to see how long each one took.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NAMES = ["01_wrap_and_evaluate", "02_repair_backdoored_model", "03_filter_poisoned_dataset"]
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))


def _nbtool():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import notebooks as nbtool
    finally:
        sys.path.pop(0)
    return nbtool


def test_every_notebook_has_a_source():
    assert [p.stem for p in NOTEBOOKS] == NAMES
    assert sorted(p.stem for p in (NB_DIR / "src").glob("*.py")) == NAMES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_its_source(path):
    import nbformat

    nbtool = _nbtool()
    built = nbtool.strip(nbtool.parse((NB_DIR / "src" / f"{path.stem}.py").read_text()))
    on_disk = nbformat.read(path, as_version=4)
    assert [(c.cell_type, c.source) for c in on_disk.cells] == [(c.cell_type, c.source) for c in built.cells], \
        f"{path.name} is out of date: run python tools/notebooks.py build"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_outputs_are_stripped(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"
    for cell in nb["cells"]:
        assert cell.get("metadata", {}) == {}, f"{path.name}: cell metadata (timings, tags) not stripped"
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name}: outputs not stripped"


# ----------------------------------------------------------------------------- execution
def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                out.append(o.text)
            elif o.output_type in ("execute_result", "display_data"):
                out.append(o.get("data", {}).get("text/plain", ""))
    return "".join(out)


def _pct(s: str) -> float:
    return float(s.rstrip("%")) / 100


def _check_01(text: str, workdir: Path) -> None:
    rows = re.findall(r"^(undefended|noise\+bilateral)\s+(.+?)\s+([\d.]+)%\s+([\d.]+)%\s+[\d.]+$", text, re.M)
    attacks = {(m, a.strip()) for m, a, _, _ in rows}
    assert {("undefended", "PGD-Linf 8/255"), ("noise+bilateral", "PGD-Linf 8/255"),
            ("noise+bilateral", "EOT-PGD-Linf 8/255 (EOT=8)"), ("noise+bilateral", "AutoAttack rand")} <= attacks, rows
    for _, _, clean, robust in rows:
        assert _pct(clean) >= 0.9 and 0 <= _pct(robust) <= _pct(clean)
    bench = re.search(r"robustbench.eval.benchmark: clean ([\d.]+)%, AutoAttack-standard ([\d.]+)%", text)
    assert bench and 0 <= _pct(bench.group(2)) <= _pct(bench.group(1))


def _check_02(text: str, workdir: Path) -> None:
    for attack in ("BadNets", "Blended"):
        victim = re.search(rf"^{attack}\s+victim: ACC ([\d.]+)%\s+ASR ([\d.]+)%", text, re.M)
        assert victim and _pct(victim.group(1)) >= 0.9 and _pct(victim.group(2)) >= 0.9, "the backdoor was not implanted"
        for defense in ("FineTune", "FT-SAM", "SkipSuppression"):
            row = re.search(rf"^\| {attack} \| {defense} \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+) \|$", text, re.M)
            assert row, f"DER table lacks {attack} / {defense}"
            assert 0 <= float(row.group(4)) <= 1
            if defense == "FT-SAM":  # the notebook's headline: FT-SAM removes both backdoors
                assert _pct(row.group(2)) <= 0.2
    assert (workdir / "runs" / "notebook02" / "repaired_badnets.pt").is_file()  # written under the cwd only


CHECKS = {"01_wrap_and_evaluate": _check_01, "02_repair_backdoored_model": _check_02}
PROBE = "import sys, resource\nprint('KERNEL', sys.prefix, resource.getrusage(resource.RUSAGE_SELF).ru_utime)"


def _snapshot(folder: Path) -> set:
    return {p for p in folder.rglob("*") if "__pycache__" not in p.parts}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch, record_property):
    """Execute with nbclient in a temporary folder (nothing is written into the repository)."""
    import nbformat
    from nbclient import NotebookClient

    # The kernel must be this interpreter (this venv), whatever kernelspecs the machine has:
    # JUPYTER_PATH comes first in the kernelspec search, so a 'python3' spec there wins.
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (robustkit tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    workdir = tmp_path / "work"
    workdir.mkdir()

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    before, committed = _snapshot(NB_DIR), path.read_bytes()
    t0 = time.perf_counter()
    client = NotebookClient(nb, timeout=900, startup_timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()
    seconds = time.perf_counter() - t0

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0]
    text = _text(nb)
    probe = re.search(r"^KERNEL (\S+) ([\d.]+)$", text, re.M)
    assert probe and Path(probe.group(1)).resolve() == Path(sys.prefix).resolve(), "the kernel was another Python"
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 2, "the notebook should show its plots"
    if path.stem in CHECKS:
        CHECKS[path.stem](text, workdir)
    assert _snapshot(NB_DIR) == before and path.read_bytes() == committed, "executing the notebook wrote into notebooks/"
    record_property("wall_seconds", round(seconds, 1))
    record_property("kernel_cpu_seconds", float(probe.group(2)))
    print(f"{path.name}: {seconds:.0f} s wall, {float(probe.group(2)):.0f} s kernel CPU")
