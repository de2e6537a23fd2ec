"""Build the tutorial notebooks from their ``.py`` sources, or strip a notebook's outputs.

    python tools/notebooks.py build     # notebooks/src/*.py -> notebooks/*.ipynb (outputs empty)
    python tools/notebooks.py strip NB  # remove outputs and execution counts in place

Sources use ``# %%`` for code cells and ``# %% [markdown]`` for Markdown cells (lines of a
Markdown cell start with ``# ``), the "percent" format editors such as VS Code and Jupytext read.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def parse(source: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cells: list[tuple[str, list[str]]] = []
    for line in source.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
    for kind, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        if kind == "markdown":
            text = "\n".join(ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines)
            nb.cells.append(nbformat.v4.new_markdown_cell(text))
        else:
            nb.cells.append(nbformat.v4.new_code_cell("\n".join(lines)))
    return nb


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: rebuilding does not change the file
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata = {}
    return nb


def write(nb: nbformat.NotebookNode, path: Path) -> None:
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(path)


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        for src in sorted((ROOT / "notebooks" / "src").glob("*.py")):
            out = ROOT / "notebooks" / (src.stem + ".ipynb")
            write(strip(parse(src.read_text())), out)
            print(f"wrote {out.relative_to(ROOT)}")
        return 0
    if argv[:1] == ["strip"] and len(argv) > 1:
        for p in argv[1:]:
            write(strip(nbformat.read(p, as_version=4)), Path(p))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
