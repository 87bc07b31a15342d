"""The before/after summary table that ``llmprune prune`` and ``llmprune recover`` print."""

from __future__ import annotations


def render_table(title: str, rows: list[tuple[str, str, str]], output_dir: str | None = None) -> str:
    """A title, a rule, then ``rows`` in three aligned columns (label left, values right)."""
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [title, "-" * len(title)]
    lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    if output_dir:
        lines.append(f"saved to {output_dir}")
    return "\n".join(lines)
