"""Small report writers shared by the stages: Markdown tables, CSV, figures, provenance lines."""
from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape

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


def ci_bars(df: pd.DataFrame, users: Sequence[str], group_col: str, groups: dict[str, str],
            panels: dict[str, str], title: str):
    """Per-user grouped bars with 95% CI error bars: one panel per metric column (`<m>`, `<m>_lo`,
    `<m>_hi`; panels maps it to its y label), one bar per group (`groups`: value of `group_col` ->
    legend label). A missing value is marked n/a on the axis (the tables say why)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 1.2 * len(users)), 3.3 * len(panels)), sharex=True)
    x = np.arange(len(users))
    w = 0.8 / len(groups)
    for ax, (metric, ylabel) in zip(np.atleast_1d(axes), panels.items()):
        for i, (g, label) in enumerate(groups.items()):
            sub = df[df[group_col] == g].set_index("user").reindex(list(users))
            err = np.vstack([sub[metric] - sub[f"{metric}_lo"], sub[f"{metric}_hi"] - sub[metric]])
            pos = x + (i - (len(groups) - 1) / 2) * w
            ax.bar(pos, sub[metric], w, yerr=np.nan_to_num(np.abs(err)), capsize=2, label=label)
            for p in pos[sub[metric].isna().to_numpy()]:
                ax.text(p, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="grey")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    first, last = np.atleast_1d(axes)[0], np.atleast_1d(axes)[-1]
    first.legend(fontsize=7, ncol=3)
    last.set_xticks(x, list(users), rotation=45, ha="right", fontsize=8)
    fig.suptitle(title)
    return fig


def _num(x: Any, digits: int = 3, scale: float = 1.0) -> str:
    """A number for a page: `digits` decimals after `scale`; None or NaN shows as n/a."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x * scale:.{digits}f}"


def _md_code(text: str) -> Markup:
    """Escape, then show Markdown `code` spans (the provenance line's) as <code>."""
    parts = str(escape(text)).split("`")
    return Markup("".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)))


def embed_png(path: str | Path, alt: str) -> Markup:
    """An <img> carrying the PNG itself, so the page needs no other file."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return Markup('<img alt="{}" src="data:image/png;base64,{}">').format(alt, data)


def _is_nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


# Autoescape on: user names, notes and config values reach the pages. StrictUndefined: a template
# that names a missing value fails at build time instead of printing an empty cell.
PAGES = Environment(loader=PackageLoader("psamf.reports", "templates"), autoescape=select_autoescape(["j2", "html"]),
                    undefined=StrictUndefined, keep_trailing_newline=True)
PAGES.filters.update(num=_num, md_code=_md_code, fmt=fmt)
PAGES.tests["nan"] = _is_nan
PAGES.globals["png"] = embed_png


def render(template: str, **context: Any) -> str:
    """One page from psamf/reports/templates/<template>."""
    return PAGES.get_template(template).render(**context)


def html_page(title: str, body: str) -> str:
    """A page around an already-built HTML body (the LOO and tune reports)."""
    return render("page.html.j2", title=title, body=Markup(body))


def html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    return render("table.html.j2", rows=rows, columns=columns)


__all__ = ["fmt", "markdown_table", "provenance", "conventions_note", "write_csv", "save_figure", "write_text",
           "ci_bars", "html_page", "html_table", "embed_png", "render"]
