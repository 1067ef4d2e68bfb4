"""Render benchmark results as Markdown (for docs/benchmarks.md).

    .venv/bin/python -m benchmarks.report                                  # benchmarks/results/perf.json
    .venv/bin/python -m benchmarks.report benchmarks/results/perf_quick.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "results" / "perf.json"


def _cell(text: object) -> str:
    """A table cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _goal(goal: dict | None) -> str:
    if not goal:
        return ""
    op = {"<=": "≤", ">=": "≥"}.get(goal.get("op"), goal.get("op", ""))
    return f"{op} {goal.get('value')} ({goal.get('text', '')})"


def _machine(entry: dict) -> str:
    m = entry.get("machine", {})
    return (f"{m.get('cpu_count', '?')} CPUs ({m.get('cpu_model') or 'unknown CPU'}), {m.get('memory_gib', '?')} GiB, "
            f"{m.get('platform', '?')}, torch {m.get('torch', '?')}, Ray {m.get('ray', '?')}")


def perf_table(results: dict) -> str:
    """The figures of a perf.json as a Markdown table (one row per figure, in file order), followed by the
    machines, dates and commands they were measured with."""
    figures = results.get("figures", {})
    lines = ["| Figure | Measured | Ratio | Goal | Result |", "|---|---|---|---|---|"]
    for name, f in figures.items():
        if f.get("status") == "error":
            lines.append(f"| {_cell(name)} | {_cell(f.get('error', ''))} | | | error |")
            continue
        result = f.get("status", "")
        if f.get("why"):
            result += f": {f['why']}"
        ratio = f.get("ratio")
        ratio_text = f"{ratio:.3g}" if isinstance(ratio, (int, float)) else ""
        title = f.get("title", name)
        if f.get("quick"):
            title += " (--quick)"
        lines.append(f"| {_cell(title)} | {_cell(f.get('summary', ''))} | {ratio_text} "
                     f"({_cell(f.get('ratio_means', ''))}) | {_cell(_goal(f.get('goal')))} | {_cell(result)} |")
    runs: dict[tuple[str, str], list[str]] = {}
    for name, f in figures.items():
        key = (_machine(f), f.get("command", ""))
        runs.setdefault(key, []).append(f"{name} ({f.get('date', '?')[:10]}, {f.get('seconds', '?')} s)")
    lines.append("")
    for (machine, command), names in runs.items():
        lines.append(f"Measured on {machine} with `{command}`: {', '.join(names)}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else DEFAULT
    print(perf_table(json.loads(path.read_text())), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
