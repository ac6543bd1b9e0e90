"""The HTML report of a run (``--report OUT.html`` on prune, heal, score, analyze and bench; docs/report.md).

``render(run)`` turns a run (onnxprune.report.run.gather: the verb's JSON-able result, its plan, the models before
and after, the command and the environment) into one self-contained page: CSS inline, charts as inline SVG
(onnxprune.report.svg), nothing fetched when it is viewed. Each section is a small function of the run that
returns None when the run has no such data; the page lists those as not part of this run. ``write_report`` is the
edge: it writes the page atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from onnxprune.report import svg
from onnxprune.report.stages import compare_stages
from onnxprune.report.svg import CellRow, Mark, Series, esc
from onnxprune.report.text import human

CSS = """
:root { --ink: #1d2430; --muted: #5b6675; --line: #d9dee5; --ok: #1e7b34; --warn: #b35c00; --bad: #b3261e;
        --accent: #1f77b4; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 48px; }
header h1 { font-size: 22px; margin: 0 0 4px; }
header .sub { color: var(--muted); margin: 0 0 14px; word-break: break-all; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 12px; font-weight: 600; font-size: 13px;
         color: #fff; margin-left: 8px; vertical-align: middle; }
.badge.ok { background: var(--ok); } .badge.warn { background: var(--warn); } .badge.bad { background: var(--bad); }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0 4px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; min-width: 140px; }
.card .k { color: var(--muted); font-size: 12px; } .card .v { font-size: 20px; font-weight: 600; }
nav { margin: 14px 0 0; font-size: 13px; } nav a { margin-right: 12px; color: var(--accent); text-decoration: none; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 18px;
          margin: 16px 0; overflow-x: auto; }
section h2 { font-size: 17px; margin: 0 0 10px; }
section h3 { font-size: 14px; margin: 16px 0 6px; color: var(--muted); }
p.note { color: var(--muted); margin: 6px 0; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
th { font-weight: 600; color: var(--muted); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.better { color: var(--ok); } td.worse { color: var(--bad); }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px;
      white-space: pre-wrap; word-break: break-all; }
ul.names { columns: 2; margin: 4px 0 10px; padding-left: 20px; font-size: 13px; }
ul.names code { word-break: break-all; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
svg { max-width: 100%; height: auto; }
details summary { cursor: pointer; color: var(--accent); margin: 6px 0; }
footer { color: var(--muted); font-size: 12px; margin-top: 20px; }
"""

STATUS = {0: ("PASSED", "ok"), 4: ("TARGET MISSED", "warn")}


class Raw(str):
    """Text already in HTML (a chart, a link): not escaped again."""


def cell(value: object) -> str:
    return value if isinstance(value, Raw) else esc("" if value is None else value)


def table(header: Sequence[str], rows: Iterable[Sequence[object]], numeric: Iterable[int] = (),
          classes: Callable[[int, int], str] | None = None) -> str:
    """An HTML table; columns in ``numeric`` right-aligned; ``classes(row, column)`` adds a class to a cell."""
    right = set(numeric)
    head = "".join(f'<th{" class=num" if k in right else ""}>{esc(h)}</th>' for k, h in enumerate(header))
    body = []
    for i, row in enumerate(rows):
        tds = []
        for k, value in enumerate(row):
            names = " ".join(n for n in ("num" if k in right else "", classes(i, k) if classes else "") if n)
            tds.append(f'<td{f" class={chr(34)}{names}{chr(34)}" if names else ""}>{cell(value)}</td>')
        body.append(f"<tr>{''.join(tds)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.3g} ms"


def num(x: float | None) -> str:
    return "-" if x is None else human(x)


def names(items: Sequence[object]) -> str:
    return "<ul class=names>" + "".join(f"<li><code>{esc(i)}</code></li>" for i in items) + "</ul>"


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    body: str


# ---------------------------------------------------------------------------------------------------- accessors

def _result(run: dict) -> dict:
    return run.get("result") or {}


def _plan(run: dict) -> dict:
    return run.get("plan") or {}


def _predicted(run: dict) -> dict:
    return _plan(run).get("predicted") or {}


def _models(run: dict) -> tuple[dict | None, dict | None]:
    models = run.get("models") or {}
    return models.get("before"), models.get("after")


def _removed(run: dict) -> list[str]:
    return list(_result(run).get("removed_blocks") or _plan(run).get("remove_blocks") or [])


def _repair(run: dict) -> dict | None:
    return _result(run).get("repair") or _plan(run).get("repair")


# ---------------------------------------------------------------------------------------------------- sections

def header(run: dict) -> str:
    """Title, status, the model, and the run's key figures as cards."""
    r, verb = _result(run), run.get("verb", "run")
    label, kind = STATUS.get(run.get("status", 0), (f"exit {run.get('status')}", "bad"))
    before, after = _models(run)
    model = (before or {}).get("path") or r.get("model") or ""
    cards = []
    if r.get("method"):
        cards.append(("method", r["method"]))
    if r.get("measured_speedup") is not None:
        target = f" (target {r['target_speedup']}x)" if r.get("target_speedup") else ""
        cards.append(("measured speed-up" + target, f"{r['measured_speedup']:.2f}x"))
    if r.get("speedup") is not None:
        cards.append(("speed-up of the second model", f"{r['speedup']:.2f}x"))
    if r.get("removed_blocks") is not None:
        cards.append(("blocks removed", str(len(r["removed_blocks"]))))
    if r.get("merged"):
        cards.append(("conv runs merged", str(len(r["merged"]))))
    if r.get("macs_reduction") is not None:
        cards.append(("MACs", f"-{100 * r['macs_reduction']:.1f}%"))
    if (r.get("after_healing") or {}).get("agreement") is not None:
        cards.append(("agreement after healing", pct(r["after_healing"]["agreement"])))
    elif (r.get("verification") or {}).get("agreement") is not None:
        cards.append(("top-1 agreement (verification)", pct(r["verification"]["agreement"])))
    if verb == "score" and r.get("blocks") is not None:
        cards.append(("blocks scored", str(len(r["blocks"]))))
        cards.append(("samples", str(r.get("samples"))))
    if before and verb in ("analyze", "score", "bench"):
        s = before["structure"]
        removable = sum(b["removable"] for b in s["residual_blocks"])
        cards += [("MACs per sample", num(s.get("macs"))), ("parameters", num(s.get("params"))),
                  ("residual blocks", f"{len(s['residual_blocks'])} ({removable} removable)")]
    if verb == "bench":
        cards += [(f"latency {Path(m['model']).name}", ms(m.get("latency_s"))) for m in r.get("models", [])]
    message = f'<p class="note">{esc(r["message"])}</p>' if r.get("message") else ""
    card_html = "".join(f'<div class=card><div class=k>{esc(k)}</div><div class=v>{esc(v)}</div></div>'
                        for k, v in cards)
    return (f"<header><h1>onnxprune {esc(verb)}<span class='badge {kind}'>{esc(label)}</span></h1>"
            f"<p class=sub>{esc(model)}{' → ' + esc(after['path']) if after else ''}</p>{message}"
            f"<div class=cards>{card_html}</div></header>")


def changes(run: dict) -> Section | None:
    """The model before and after: what was removed, merged, dropped and fitted, by node name; sizes; op counts."""
    before, after = _models(run)
    if before is None:
        return None
    parts = []
    if after is not None:
        parts.append(_size_table(before, after))
        parts.append(_change_lists(run))
        title = "Model before and after"
    else:
        s = before["structure"]
        parts.append(table(["", "value"], [["nodes", before["nodes"]], ["MACs per sample", num(s.get("macs"))],
                                           ["parameters", num(s.get("params"))],
                                           ["residual blocks", len(s["residual_blocks"])],
                                           ["chain convs", len(s["convs"])], ["opset", s["model"].get("opset")],
                                           ["producer", s["model"].get("producer")]], numeric=[1]))
        title = "Model"
    parts.append("<h3>Op counts</h3>" + op_table(before["ops"], after["ops"] if after else None))
    return Section("model", title, "".join(parts))


def _size_table(before: dict, after: dict) -> str:
    a, b = before["structure"], after["structure"]
    rows = []
    for label, x, y in (("nodes", before["nodes"], after["nodes"]), ("MACs per sample", a.get("macs"), b.get("macs")),
                        ("parameters", a.get("params"), b.get("params")),
                        ("residual blocks", len(a["residual_blocks"]), len(b["residual_blocks"])),
                        ("chain convs", len(a["convs"]), len(b["convs"]))):
        change = f"{100 * (y / x - 1):+.1f}%" if x else "-"
        rows.append([label, num(x), num(y), change])
    return table(["", "before", "after", "change"], rows, numeric=[1, 2, 3])


def _merge_names(entry: object) -> str:
    if isinstance(entry, dict):
        text = " + ".join(entry.get("convs", []))
        return text + (f" (identity of {entry['fold_identity']} folded in)" if entry.get("fold_identity") else "")
    return " + ".join(entry) if isinstance(entry, list) else str(entry)


def _change_lists(run: dict) -> str:
    r, plan = _result(run), _plan(run)
    lists = [("Blocks removed", _removed(run)),
             ("Blocks replaced by their shortcut", plan.get("replace_with_shortcut") or []),
             ("Conv runs merged", [_merge_names(m) for m in (r.get("merged") or plan.get("merge") or [])]),
             ("Convs dropped", r.get("dropped_convs") or plan.get("drop_convs") or []),
             ("Activations dropped", r.get("dropped_activations") or plan.get("drop_activations") or [])]
    parts = [f"<h3>{esc(title)} ({len(items)})</h3>{names(items)}" for title, items in lists if items]
    repair = _repair(run)
    if repair and repair.get("maps"):
        rows = [[Raw(f"<code>{esc(m.get('source'))}</code> → <code>{esc(m.get('target'))}</code>"),
                 "×".join(map(str, m.get("channels", []))), f"{m.get('error_before', float('nan')):.3f}",
                 f"{m.get('error_after', float('nan')):.3f}", m.get("placed")] for m in repair["maps"]]
        parts.append(f"<h3>Linear maps fitted (repair, {len(rows)})</h3>"
                     + table(["cut (read → stands in for)", "map", "error before", "error after", "placed"], rows,
                             numeric=[2, 3])
                     + f'<p class=note>fitted on {repair.get("samples")} samples, ridge {repair.get("ridge")}, '
                       f'{"sequentially" if repair.get("sequential") else "independently"}; error: relative squared '
                       "error at the cut</p>")
    if not parts:
        parts.append("<p class=note>No structural change: the graph keeps every block and conv.</p>")
    return "".join(parts)


def op_table(before: dict[str, int], after: dict[str, int] | None) -> str:
    """Nodes by op type, before and after (the convention of Polygraphy's and onnxsim's summaries)."""
    if after is None:
        return table(["op", "count"], [[op, n] for op, n in before.items()] + [["total", sum(before.values())]],
                     numeric=[1])
    ops = list(before) + [op for op in after if op not in before]
    rows = [[op, before.get(op, 0), after.get(op, 0), after.get(op, 0) - before.get(op, 0)] for op in ops]
    rows.append(["total", sum(before.values()), sum(after.values()), sum(after.values()) - sum(before.values())])
    def styled(i: int, k: int) -> str:
        return ("better" if rows[i][3] < 0 else "worse" if rows[i][3] > 0 else "") if k == 3 else ""

    return table(["op", "before", "after", "change"], [[*r[:3], f"{r[3]:+d}" if r[3] else "0"] for r in rows],
                 numeric=[1, 2, 3], classes=styled)


def structure_diagram(run: dict) -> Section | None:
    """Depth per stage before and after: one row of squares per stage, one square per block."""
    before, after = _models(run)
    if before is None:
        return None
    stage_changes = compare_stages(before["structure"], after["structure"] if after else None, _removed(run))
    if not stage_changes:
        return None
    rows = []
    for k, ch in enumerate(stage_changes):
        st = ch.before
        if st.blocks:
            cells = ["removed" if j in ch.removed else "kept" for j in st.blocks]
            tips = st.blocks
            depth = f"{len(st.blocks)} blocks, {st.convs} convs"
            if after is not None:
                left = ch.after
                depth = (f"{len(st.blocks)} → {len(left.blocks) if left else 0} blocks, "
                         f"{st.convs} → {left.convs if left else 0} convs")
        else:
            cells, tips = ["fixed"] * st.convs, []
            depth = f"{st.convs} convs" + (f" → {ch.after.convs if ch.after else 0}" if after is not None else "")
        rows.append(CellRow(f"stage {k + 1}: {st.label}", cells, depth, tips))
    legend = ("<p class=note>A stage is a run of residual blocks with the same output shape (channels × height × "
              "width); a square is a block (hover for its join node), crossed out when the plan removed it. Depths "
              "after come from analysing the written model (merges can fold blocks without removing them).</p>")
    return Section("stages", "Structure by stage", svg.cell_rows(rows, title="depth per stage") + legend)


def block_table(run: dict) -> Section | None:
    """analyze: the residual blocks and the conv chain."""
    before, _ = _models(run)
    if run.get("verb") != "analyze" or before is None:
        return None
    s = before["structure"]
    rows = [[b["index"], Raw(f"<code>{esc(b['join'])}</code>"), b["shortcut"],
             "yes" if b["removable"] else f"no: {b.get('reason')}", num(b["params"]), num(b["macs"]),
             pct(b.get("macs_share"))] for b in s["residual_blocks"]]
    convs = [[c["index"], Raw(f"<code>{esc(c['name'])}</code>"), "×".join(map(str, c["kernel"])),
              "×".join(map(str, c["stride"])), c["groups"], f"{c['in_channels']}→{c['out_channels']}",
              c.get("activation") or "", num(c["macs"])] for c in s["convs"]]
    body = table(["#", "join", "shortcut", "removable", "params", "MACs", "share"], rows, numeric=[0, 4, 5, 6])
    body += (f"<details><summary>conv chain ({len(convs)} convs, stride breaks at "
             f"{', '.join(map(str, s.get('stride_breaks', []))) or 'none'})</summary>"
             + table(["#", "conv", "kernel", "stride", "groups", "channels", "activation", "MACs"], convs,
                     numeric=[0, 4, 7]) + "</details>")
    body += "".join(f"<p class=note>note: {esc(n)}</p>" for n in s.get("notes", []))
    return Section("blocks", "Residual blocks and conv chain", body)


def scores(run: dict) -> Section | None:
    """Per-block scores: SLP's (score verb, prune --method slp: the first round), SGLP's GradNorms."""
    r, predicted, removed = _result(run), _predicted(run), set(_removed(run))
    if run.get("verb") == "score" and r.get("blocks"):
        blocks = r["blocks"]
        chart = svg.bar_chart([b["join"] for b in blocks], [b["score"] for b in blocks],
                              value_label="SLP score: 1 - CKA without the block (lower = less important)")
        ranked = sorted(blocks, key=lambda b: b["score"])
        rows = [[k + 1, Raw(f"<code>{esc(b['join'])}</code>"), f"{b['score']:.5f}", num(b.get("macs")),
                 num(b.get("params"))] for k, b in enumerate(ranked)]
        note = (f"<p class=note>feature tensor <code>{esc(r.get('feature_tensor'))}</code>, {r.get('samples')} "
                f"samples of {esc(r.get('data'))}{' (RANDOM inputs)' if r.get('random_data') else ''}</p>")
        return Section("scores", "Block scores (SLP)", note + chart + "<h3>Ranked, least important first</h3>"
                       + table(["rank", "block", "score", "MACs", "params"], rows, numeric=[0, 2, 3, 4]))
    if predicted.get("scores"):
        blocks = predicted["scores"]
        chart = svg.bar_chart([b["join"] for b in blocks], [b["score"] for b in blocks],
                              [k for k, b in enumerate(blocks) if b["join"] in removed],
                              value_label="SLP score in the first round (red: removed)")
        history = predicted.get("history") or []
        rows = [[k + 1, Raw(f"<code>{esc(h['removed'])}</code>"), f"{h['score']:.5f}",
                 pct(h.get("macs_reduction"))] for k, h in enumerate(history)]
        body = chart + ("<h3>Removal order (re-scored after each removal)</h3>"
                        + table(["step", "block removed", "score then", "MACs removed so far"], rows,
                                numeric=[0, 2, 3]) if rows else "")
        return Section("scores", "Block scores (SLP)", body)
    if predicted.get("grad_norm"):
        norms = predicted["grad_norm"]
        joins = list(norms)
        chart = svg.bar_chart(joins, [norms[j] for j in joins], [k for k, j in enumerate(joins) if j in removed],
                              value_label=f"GradNorm on {predicted.get('grad_norm_targets')} (red: removed)")
        return Section("scores", "Block scores (SGLP GradNorm)", chart)
    if r.get("history") and all("score" in h for h in r["history"]):  # an SLP run without a plan file
        h = r["history"]
        return Section("scores", "Block scores (SLP)", svg.bar_chart([x["removed"] for x in h],
                                                                     [x["score"] for x in h],
                                                                     value_label="SLP score when removed"))
    return None


def cka(run: dict) -> Section | None:
    """SGLP's CKA matrix with the segment boundaries, the segments, and the segmentation loss by K."""
    predicted = _predicted(run)
    if not predicted.get("cka"):
        return None
    segments = predicted.get("segments") or []
    starts = [s["layers"][0] for s in segments]
    layers = predicted.get("layers") or []
    chart = svg.heatmap(predicted["cka"], starts, labels=[f"{k}: {name}" for k, name in enumerate(layers)],
                        title="CKA between layer outputs")
    rows = [[k, f"{s['layers'][0]}..{s['layers'][1]}", len(s.get("blocks", [])), s.get("removable"), s.get("removed")]
            for k, s in enumerate(segments)]
    body = (f"<div class=row><div>{chart}</div><div>"
            + table(["segment", "layers", "blocks", "removable", "removed"], rows, numeric=[0, 2, 3, 4]))
    losses = predicted.get("segment_losses") or []
    if losses:
        ks = list(range(1, len(losses) + 1))
        chosen = len(segments)
        marks = [Mark(chosen, losses[chosen - 1], f"K = {chosen} ({predicted.get('segments_chosen_by')})")] \
            if 0 < chosen <= len(losses) else []
        body += svg.line_chart([Series("loss", ks, losses, dots=True)], "segments K", "segmentation loss", marks,
                               width=420, height=240)
    body += "</div></div>"
    body += (f"<p class=note>{predicted.get('cka_estimator', 'CKA')} on {predicted.get('cka_samples')} samples; "
             "layer 0 is the stem, then one layer per residual block; red lines start segments.</p>")
    return Section("cka", "CKA matrix and segments (SGLP)", body)


def latency_rows(run: dict) -> Section | None:
    """LayerMerge: the latency table's rows the chosen plan uses, what each saves, and the search's attempts."""
    r, predicted = _result(run), _predicted(run)
    rows = predicted.get("rows")
    attempts = r.get("attempts") or predicted.get("attempts") or []
    if rows is None and not attempts:
        return None
    body = ""
    if predicted.get("whole_s"):
        whole, fixed, chosen = predicted["whole_s"], predicted.get("fixed_s", 0.0), predicted.get("latency_s")
        body += table(["", "latency (table)"], [
            ["whole original model", ms(whole)], ["part no row may change (fixed)", ms(fixed)],
            ["chosen plan, predicted", ms(chosen)],
            ["predicted saving", f"{ms(whole - chosen)} ({pct(1 - chosen / whole)}, {whole / chosen:.2f}x)"],
            ["rows in the table", predicted.get("table_rows")]], numeric=[1])
    if rows:
        table_rows, saved = [], 0.0
        for row in rows:
            original = row.get("original_latency_s")
            saving = original - row["latency_s"] if original is not None else None
            saved += saving or 0.0
            kept = ", ".join(row.get("keep") or [])
            dropped = ", ".join(row.get("drop") or [])
            what = (f"block <code>{esc(row.get('block'))}</code>" if row["kind"] == "remove block" and row.get("block")
                    else f"<code>{esc(kept)}</code>" if kept else "(nothing kept)")
            table_rows.append([row["kind"], Raw(what + (f"<br>drops <code>{esc(dropped)}</code>" if dropped else "")),
                               "×".join(map(str, row.get("kernel") or [])) if row["kind"] != "remove block" else "-",
                               ms(original), ms(row["latency_s"]),
                               ms(saving), f"{row['importance']:.4f}"])
        body += ("<h3>Rows the chosen plan changes</h3>"
                 + table(["change", "convs", "kernel", "original rows", "this row", "saves", "importance"],
                         table_rows, numeric=[3, 4, 5, 6])
                 + f"<p class=note>together they save {ms(saved)} of predicted latency; importance: the row's CKA "
                   "score change (0 = as the original).</p>")
    if attempts:
        a_rows = [[a["attempt"], ms(a.get("budget_s")), f"{a['predicted_speedup']:.3f}x", f"{a['speedup']:.3f}x",
                   ms(a.get("original_s")), ms(a.get("measured_s")), a.get("rows_changed")] for a in attempts]
        body += ("<h3>Search attempts (the budget is tightened or loosened by what was measured)</h3>"
                 + table(["attempt", "budget", "predicted", "measured", "original", "pruned", "rows changed"],
                         a_rows, numeric=[0, 1, 2, 3, 4, 5, 6]))
    return Section("latency", "Latency table and what the plan saves (LayerMerge)", body)


def trade_off(run: dict) -> Section | None:
    """The predicted trade-off curve (LayerMerge's DP for every budget) with the chosen plan and the attempts."""
    r, predicted = _result(run), _predicted(run)
    curve = r.get("pareto")
    if not curve:
        return None
    xs = [p["predicted_speedup"] for p in curve]
    ys = [p["importance"] for p in curve]
    series = [Series("predicted optimum per budget", xs, ys)]
    marks = []
    attempts = r.get("attempts") or []
    if attempts:
        series.append(Series("attempts (predicted)", [a["predicted_speedup"] for a in attempts],
                             [a["importance"] for a in attempts], colour="#7f7f7f", line=False))
    if predicted.get("latency_s") and predicted.get("whole_s"):
        chosen_x = predicted["whole_s"] / predicted["latency_s"]
        measured_x = r.get("measured_speedup", float("nan"))
        marks.append(Mark(chosen_x, predicted.get("importance", 0.0),
                          f"chosen: {chosen_x:.2f}x predicted, {measured_x:.2f}x measured"))
    shown = trade_off_range(xs, r.get("target_speedup"), [m.x for m in marks] + [a["predicted_speedup"]
                                                                                 for a in attempts])
    if r.get("target_speedup"):
        visible = [y for x, y in zip(xs, ys) if x <= shown[1]] or ys
        series.append(Series(f"target {r['target_speedup']}x", [r["target_speedup"]] * 2,
                             [min(visible), max(visible)], colour="#2ca02c"))
    chart = svg.line_chart(series, "predicted speed-up", "summed importance (0 = the original)", marks,
                           width=900, height=340, x_range=shown, title="predicted trade-off")
    cut = (f" (shown up to {shown[1]:.2f}x; the fastest plan is predicted at {max(xs):.2f}x)" if shown[1] < max(xs)
           else "")
    return Section("trade-off", "Predicted trade-off curve", chart
                   + f"<p class=note>{len(curve)} points, one DP table for every latency budget{cut}; higher is closer "
                     "to the original.</p>")


def trade_off_range(xs: Sequence[float], target: float | None, marked: Sequence[float]) -> tuple[float, float]:
    """The speed-ups a trade-off chart shows: from the slowest plan to about twice the target's distance from 1x
    (and past every marked point), not to the fastest plan the options allow, far from any target."""
    low, high = min(xs), max(xs)
    if target:
        high = min(high, max([1 + 2 * (target - 1), *(1 + 1.25 * (m - 1) for m in marked)]))
    return low - 0.02 * (high - low), high + 0.02 * (high - low)


def backend_text(backend: dict | str | None) -> str:
    """'ort-cpu on AMD EPYC, 2 threads' for a backend's description (``Backend.describe()``)."""
    if not isinstance(backend, dict):
        return str(backend or "")
    device = str(backend.get("device") or "")
    threads = "" if "thread" in device else f", {backend.get('threads') or 'all'} threads"
    return f"{backend.get('backend')} on {device}{threads}"


def measured(run: dict) -> Section | None:
    """Latency distributions over rounds, measured side by side (bench, prune's speed-up measurement)."""
    r = _result(run)
    groups, rows = [], []
    if r.get("latency_rounds_s"):
        for name, key in (("original", "original"), ("pruned", "pruned")):
            groups.append((name, [1e3 * t for t in r["latency_rounds_s"][key]]))
        rows = [["original", ms(r.get("original_latency_s")), "1.00x"],
                ["pruned", ms(r.get("pruned_latency_s")), f"{r.get('measured_speedup', float('nan')):.3f}x"]]
    elif run.get("verb") == "bench" and r.get("models"):
        for k, m in enumerate(r["models"]):
            groups.append((Path(m["model"]).name, [1e3 * t for t in m.get("rounds_s", [])]))
            rows.append([m["model"], ms(m["latency_s"]),
                         "1.00x" if k == 0 else f"{r['speedup']:.3f}x" if r.get("speedup") else "-"])
    elif r.get("original_latency_s") is not None:
        rows = [["original", ms(r["original_latency_s"]), "1.00x"],
                ["pruned", ms(r.get("pruned_latency_s")), f"{r.get('measured_speedup', float('nan')):.3f}x"]]
    if not rows:
        return None
    where = backend_text(r.get("backend"))
    batch = r.get("latency_batch") or r.get("batch")
    body = table(["model", "median latency", "speed-up (median of per-round ratios)"], rows, numeric=[1, 2])
    if any(values for _, values in groups):
        body += svg.box_plot(groups, "milliseconds per run (one dot per round)", width=900)
    body += (f"<p class=note>{where}, batch {batch}; the models take turns in each round, so a slow spell of the "
             "machine hits both.</p>")
    return Section("measured", "Measured latency", body)


def accuracy(run: dict) -> Section | None:
    """Verification, agreement (and accuracy) before pruning, after pruning, after repair and after healing, and
    the healing curves."""
    r, plan = _result(run), _plan(run)
    parts = []
    stages = [(title, r[key]) for key, title in (("before_pruning", "original"), ("after_pruning", "pruned"),
                                                 ("after_healing", "healed")) if isinstance(r.get(key), dict)]
    if stages:
        rows = [[title, pct(m.get("agreement")), pct(m.get("accuracy")) if "accuracy" in m else "-",
                 f"{m['mean_kl']:.4f}" if m.get("mean_kl") is not None else "-"] for title, m in stages]
        parts.append(f"<h3>On the {r.get('held_back_samples', '')} held-back samples</h3>"
                     + table(["model", "top-1 agreement with the original", "top-1 accuracy", "mean KL"], rows,
                             numeric=[1, 2, 3]))
        parts.append(svg.bar_chart([t for t, _ in stages], [100 * (m.get("agreement") or 0) for _, m in stages],
                                   value_label="agreement with the original, %", label_width=120, width=520))
    repair_agreement = r.get("repair_agreement") or (r.get("agreement") if isinstance(r.get("agreement"), dict)
                                                     else None)
    if repair_agreement and repair_agreement.get("pruned") is not None:
        parts.append("<h3>Repair (on the fitting data)</h3>" + table(
            ["model", "top-1 agreement with the original"],
            [["pruned", pct(repair_agreement["pruned"])], ["repaired", pct(repair_agreement.get("repaired"))]],
            numeric=[1]))
    history = (plan.get("healing") or {}).get("history") or []
    if history:
        parts.append(_healing_curves(history, (plan.get("healing") or {}).get("best_step")))
    for key, title in (("verification", "Verification of the written model"),
                       ("repaired_verification", "Verification after repair"),
                       ("healed_verification", "Verification after healing")):
        if isinstance(r.get(key), dict):
            parts.append(f"<h3>{title}</h3>" + verification_table(r[key]))
    if not parts:
        return None
    return Section("accuracy", "Accuracy and agreement", "".join(parts))


def _healing_curves(history: list[dict], best_step: int | None) -> str:
    steps = [h["step"] for h in history]
    charts = []
    with_loss = [h for h in history if h.get("loss") is not None]
    if with_loss:
        charts.append(svg.line_chart([Series("training loss", [h["step"] for h in with_loss],
                                             [h["loss"] for h in with_loss], dots=True)],
                                     "step", "loss (mean since the last evaluation)", width=440, height=260))
    best = [h for h in history if h["step"] == best_step]
    marks = [Mark(best_step, 100 * best[0]["agreement"], f"kept: step {best_step}")] if best else []
    charts.append(svg.line_chart([Series("held-back agreement", steps, [100 * h["agreement"] for h in history],
                                         dots=True)], "step", "held-back agreement, %", marks, width=440, height=260))
    return "<h3>Healing</h3><div class=row>" + "".join(f"<div>{c}</div>" for c in charts) + "</div>"


def verification_table(v: dict) -> str:
    rows = [["result", "PASSED" if v.get("passed") else "FAILED"], ["checker", v.get("checker")],
            ["interface", v.get("interface")], ["onnxruntime", v.get("provider")], ["inputs", v.get("inputs")],
            ["function", "preserved (within tolerance)" if v.get("preserves_function") else "may change"],
            ["finite outputs", "yes" if v.get("finite") else "no"]]
    if v.get("agreement") is not None:
        rows.append(["top-1 agreement with the original", pct(v["agreement"])])
    for o in v.get("outputs", []):
        rows.append([f"output {o.get('name')}", f"max abs diff {o.get('max_abs', float('nan')):.3g}, cosine "
                                                f"{o.get('cosine', float('nan')):.6f}"])
    return table(["", ""], [r for r in rows if r[1] is not None])


def run_info(run: dict) -> Section:
    """The command, exit status, provider, backend, data, versions, machine and effective configuration."""
    r = _result(run)
    rows = [["command", Raw(f"<code>{esc(run.get('command', ''))}</code>")],
            ["exit status", run.get("status", 0)], ["created", run.get("created")]]
    if r.get("provider"):
        rows.append(["onnxruntime provider (used)", r["provider"]])
    backend = r.get("backend")
    if isinstance(backend, dict):
        rows.append(["latency backend", backend_text(backend)])
        rows += [[f"backend {k}", v] for k, v in (backend.get("versions") or {}).items()]
    for key, label in (("data", "data"), ("teacher", "teacher"), ("output", "output"), ("plan", "plan")):
        if r.get(key) and isinstance(r[key], str):
            rows.append([label, Raw(f"<code>{esc(r[key])}</code>")])
    rows += [[k, v] for k, v in (run.get("versions") or {}).items()]
    rows += [[k.replace("_", " "), v] for k, v in (run.get("machine") or {}).items()]
    body = table(["", ""], rows)
    if run.get("config"):
        body += ("<h3>Effective configuration (a --config file that repeats the run)</h3><pre>"
                 + esc(toml_lines(run["config"])) + "</pre>")
    notes = list(r.get("notes") or [])
    body += "".join(f"<p class=note>note: {esc(n)}</p>" for n in notes)
    return Section("run", "Run", body)


def toml_lines(config: dict) -> str:
    """A flat configuration as TOML lines (``key = value``), what ``--config`` reads (README, "Config files")."""
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in config.items())


SECTIONS: tuple[tuple[str, Callable[[dict], Section | None]], ...] = (
    ("Model before and after", changes), ("Structure by stage", structure_diagram),
    ("Residual blocks and conv chain", block_table), ("Block scores", scores), ("CKA matrix and segments", cka),
    ("Latency table and what the plan saves", latency_rows), ("Predicted trade-off curve", trade_off),
    ("Measured latency", measured), ("Accuracy and agreement", accuracy),
)
# What a verb's report can never have (not listed as missing from it).
_NEVER = {scores.__name__, cka.__name__, latency_rows.__name__, trade_off.__name__, measured.__name__,
          accuracy.__name__}
_NOT_FOR = {"analyze": _NEVER,
            "score": _NEVER - {scores.__name__} | {block_table.__name__},
            "bench": _NEVER - {measured.__name__} | {block_table.__name__, structure_diagram.__name__}}


def _script_json(data: object) -> str:
    """JSON safe inside a <script> element."""
    text = json.dumps(data, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(run: dict) -> str:
    """The whole report page of ``run`` (onnxprune.report.run.gather)."""
    present, absent = [], []
    for title, make in SECTIONS:
        section = make(run)
        if section is not None:
            present.append(section)
        elif make.__name__ not in _NOT_FOR.get(run.get("verb"), {block_table.__name__}):
            absent.append(title)
    present.append(run_info(run))
    nav = "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in present)
    sections = "".join(f'<section id="{s.id}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in present)
    missing = (f"<p class=note>Not part of this run: {esc(', '.join(absent))}.</p>" if absent else "")
    title = f"onnxprune {run.get('verb', '')} report"
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            f"{header(run)}<nav>{nav}</nav>{missing}{sections}"
            f"<footer>Written by onnxprune {esc((run.get('versions') or {}).get('onnxprune', ''))}; self-contained "
            "(nothing is fetched). The run's result as JSON is in the element #onnxprune-result.</footer>"
            f'<script type="application/json" id="onnxprune-result">{_script_json(_result(run))}</script>'
            "</main></body></html>\n")


def write_report(path: str | os.PathLike[str], run: dict) -> Path:
    """Render ``run`` and write it to ``path`` atomically (temporary file, then rename)."""
    from onnxprune import outputs

    return outputs.write_text(path, render(run))
