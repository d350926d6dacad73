"""Plain-text tables and number formatting for reports (the CLI, the demo, inspection); no third-party dependency."""

from __future__ import annotations

from typing import Any, Sequence


def human_bytes(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB with one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def human_count(n: float) -> str:
    """A count with a k / M / G suffix."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:.0f}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render rows under headers, columns padded; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    t = text.replace(",", "").rstrip("xkMGB%").replace(" Ki", "").replace(" Mi", "").replace(" Gi", "").strip()
    try:
        float(t)
        return True
    except ValueError:
        return False
