"""Human-readable tables for the terminal."""

from __future__ import annotations

from onnxprune.graph.analysis import Structure


def human(n: float) -> str:
    """1234567 -> '1.23 M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g}"


def table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def structure_report(s: Structure, source: str) -> str:
    m = s.model
    inputs = ", ".join(f"{i['name']} {i['shape']}" for i in m["inputs"])
    removable = sum(b.removable for b in s.residual_blocks)
    lines = [
        f"{source}: opset {m.get('opset')}, {m.get('producer') or 'unknown producer'}, {m['nodes']} nodes, input {inputs}",
        f"{human(s.macs)} MACs per sample, {human(s.params)} parameters",
        f"{len(s.residual_blocks)} residual blocks ({removable} removable), "
        f"{len(s.convs)} convs on the main chain, {len(s.shortcut_convs)} on shortcuts, "
        f"{len(s.stride_breaks)} stride breaks, {len(s.barriers)} barriers",
        "",
    ]
    if s.residual_blocks:
        rows = [
            [str(b.index), b.join, b.shortcut, "yes" if b.removable else f"no: {b.reason}",
             human(b.params), human(b.macs), f"{100 * b.macs_share:.1f}%"]
            for b in s.residual_blocks
        ]
        lines.append(table(rows, ["#", "join", "shortcut", "removable", "params", "MACs", "share"], right={0, 4, 5, 6}))
    for note in s.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
