"""Small report writers shared by the stages: Markdown tables, CSV, figures, provenance lines."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from psamf.io import atomic_path, write_text
from psamf.metrics import CONVENTIONS


def fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return "nan" if x != x else f"{x:.{digits}f}"
    return str(x)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def provenance(corpus: str, av_simulated: bool, text_features: str | None = None) -> str:
    """The line every report carries: which corpus, and whether AV features were simulated."""
    av = "SIMULATED acoustic/visual features (psamf data simulate-av)" if av_simulated else "acoustic/visual features from the corpus"
    text = f"; text features: {text_features}" if text_features else ""
    return f"Corpus: `{corpus}`; {av}{text}."


def conventions_note(keys: Sequence[str]) -> str:
    return "Metric conventions:\n" + "".join(f"- `{k}`: {CONVENTIONS[k]}\n" for k in keys if k in CONVENTIONS)


def write_csv(path: str | Path, df: pd.DataFrame) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


__all__ = ["fmt", "markdown_table", "provenance", "conventions_note", "write_csv", "save_figure", "write_text"]
