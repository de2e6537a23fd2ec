"""``Report``: one per run, written as JSON (machine-readable), Markdown (for people) and PNG plots."""

from __future__ import annotations

import datetime as _dt
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_path, atomic_write_json, atomic_write_text


def environment_info() -> dict[str, Any]:
    """Versions and hardware a reviewer needs to reproduce a number."""
    import robustkit

    info: dict[str, Any] = {
        "robustkit": robustkit.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


@dataclass
class Table:
    """A titled table: a list of rows sharing (mostly) the same keys."""

    title: str
    rows: list[dict[str, Any]]
    note: str | None = None

    def columns(self) -> list[str]:
        cols: list[str] = []
        for row in self.rows:
            cols += [k for k in row if k not in cols]
        return cols

    def to_markdown(self) -> str:
        cols = self.columns()
        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        if not self.rows:
            return "\n".join(lines + ["(no rows)", ""])
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join(" --- " for _ in cols) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |")
        return "\n".join(lines + [""])


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


@dataclass
class Report:
    """Everything one run measured.

    ``tables`` hold the numbers, ``metrics`` a flat dict for scripts, ``figures`` the
    PNG files (relative to the output folder), ``notes`` caveats a reviewer must read
    (e.g. a randomized defense attacked without EOT).
    """

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    environment: dict[str, Any] = field(default_factory=environment_info)
    tables: list[Table] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float | None = None

    def add_table(self, title: str, rows: list[dict[str, Any]], note: str | None = None) -> Table:
        table = Table(title, rows, note)
        self.tables.append(table)
        return table

    def table(self, title: str) -> Table:
        for t in self.tables:
            if t.title == title:
                return t
        raise KeyError(f"no table {title!r}; tables: {[t.title for t in self.tables]}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        d = dict(d)
        d["tables"] = [Table(**t) for t in d.get("tables", [])]
        return cls(**d)

    def to_markdown(self) -> str:
        lines = [f"# {self.name}", "", f"Created {self.created}."]
        if self.seconds is not None:
            lines[-1] += f" Run time {self.seconds:.1f} s."
        lines.append("")
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        if self.tables:
            lines += ["## Results", ""]
            for t in self.tables:
                lines.append(t.to_markdown())
        if self.figures:
            lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in self.figures] + [""]
        env = ", ".join(f"{k} {v}" for k, v in self.environment.items() if v is not None)
        lines += ["## Environment", "", env, ""]
        return "\n".join(lines)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``report.json`` and ``report.md`` into ``out_dir`` (atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return {
            "json": atomic_write_json(out / "report.json", self.to_dict()),
            "markdown": atomic_write_text(out / "report.md", self.to_markdown()),
        }

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        import json

        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)
