"""Markdown tables for the result scripts in this folder."""

from __future__ import annotations

from pathlib import Path


def emit_table(header: list[str], rows: list[list[str]], out: str | None) -> str:
    """Print a Markdown table of `rows` under `header` and write it to `out` when given."""
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    print(table)
    if out:
        Path(out).write_text(table + "\n")
    return table
