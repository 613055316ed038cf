"""The summary table ``tierflow run`` and ``tierflow demo`` print: every system's rows, whole in an
80-column terminal — the metric with its unit and ↑/↓ for the better direction, the system's value,
the baseline's short name and value, the ratio (green where the system wins), and under each
system the regime its rows are about."""

from __future__ import annotations

import textwrap

from rich.console import Console
from rich.markup import escape

from flows.registry import system as lookup
from tasks.common.summary import Row

ARROW = {"higher": "↑", "lower": "↓"}
# (header, width, right-aligned): 9 + 19 + 8 + 9 + 8 + 6 and five gaps of two: 69 columns
COLUMNS = (("system", 9, False), ("metric", 19, False), ("value", 8, True), ("vs", 9, False), ("base", 8, True),
           ("ratio", 6, True))
GAP = "  "
INDENT = COLUMNS[0][1] + len(GAP)
WIDTH = 80


def number(value: float | None) -> str:
    """Four significant digits, without an exponent for the figures a run reports."""
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _line(cells: list[str], styles: list[str] | None = None) -> str:
    out = []
    for (_, width, right), cell, style in zip(COLUMNS, cells, styles or [""] * len(cells)):
        text = cell[:width].rjust(width) if right else cell[:width].ljust(width)
        out.append(f"[{style}]{escape(text)}[/]" if style else escape(text))
    return GAP.join(out).rstrip()


def summary_lines(summaries: list[dict]) -> list[str]:
    """The table as console-markup lines, none wider than 80 columns."""
    lines = [_line([h for h, _, _ in COLUMNS], ["bold"] * len(COLUMNS)), "─" * 69]
    for summary in summaries:
        system = lookup(summary["system"])
        rows = summary["rows"]
        if not rows:
            lines.append(_line([summary["system"], "no baseline ran"], ["bold", ""]))
        for i, row in enumerate(rows):
            wins = Row(**row).wins
            star = "*" if row["simulated"] else ""
            first = i == 0 or rows[i - 1]["metric"] != row["metric"]
            lines.append(_line([summary["system"] if i == 0 else "",
                                f"{row['metric']} {row['unit']} {ARROW[row['better']]}" if first else "",
                                number(row["value"]) + star if first else "", system.short_name(row["baseline"]),
                                number(row["baseline_value"]),
                                "—" if row["ratio"] is None else f"{row['ratio']:.2f}×"],
                               ["bold", "", "", "", "", "green" if wins else "red"]))
        regime = summary.get("regime") or (rows[0]["regime"] if rows else "")
        for part in textwrap.wrap(f"regime: {regime}", WIDTH - INDENT):
            lines.append(" " * INDENT + f"[dim]{escape(part)}[/]")
    return lines


def print_summaries(summaries: list[dict], console: Console | None = None) -> None:
    """The table, then per system its wall time, overhead share and results folder."""
    console = console or Console()
    for line in summary_lines(summaries):
        console.print(line, highlight=False, soft_wrap=True)
    if any(row["simulated"] for s in summaries for row in s["rows"]):
        console.print("[dim]* rests on simulated quantities (the run's report says which)[/dim]")
    for s in summaries:
        timing = (f"{s['wall_seconds']:.0f} s, {100 * s['overhead_share']:.0f}% overhead"
                  if s.get("wall_seconds") is not None and s.get("overhead_share") is not None else "")
        where = s["results"] + (f" → {s['store']}" if s.get("store") else "")
        console.print(f"{s['system']}: {timing}{'; ' if timing else ''}{where}", highlight=False)
