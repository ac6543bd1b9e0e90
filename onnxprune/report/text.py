"""Human-readable output for the terminal: every verb's text form of its result (the CLI prints these)."""

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


def eval_text(result: dict) -> str:
    lines = [f"data: {result['data']}", f"onnxruntime provider: {result['provider']}"]
    if "accuracy" in result:
        lines.append(f"top-1 accuracy: {100 * result['accuracy']:.2f}% on {result['samples']} samples")
    if "agreement" in result:
        lines.append(f"top-1 agreement with {result['reference']}: {100 * result['agreement']:.2f}%, "
                     f"mean KL {result['mean_kl']:.4g}")
        if "reference_accuracy" in result:
            lines.append(f"reference top-1 accuracy: {100 * result['reference_accuracy']:.2f}%")
    return "\n".join(lines)


def apply_text(result: dict) -> str:
    summary = result["plan"]
    return "\n".join([
        f"removed {len(summary['removed_blocks'])} blocks, replaced {len(summary['replaced_with_shortcut'])} "
        f"by their shortcut, dropped {len(summary['dropped_activations'])} activations, "
        f"merged {len(summary['merged'])} conv runs",
        result["verification_text"],
        f"wrote {result['output']}",
    ])


def score_text(result: dict) -> str:
    ranks = {b["join"]: r for r, b in enumerate(sorted(result["blocks"], key=lambda b: b["score"]), start=1)}
    rows = [[b["join"], f"{b['score']:.6f}", str(ranks[b["join"]]), human(b["macs"])] for b in result["blocks"]]
    return "\n".join([
        f"data: {result['data']}; feature tensor {result['feature_tensor']}; provider {result['provider']}; "
        f"{result['seconds']:.1f} s",
        table(rows, ["join", "score (1 - CKA)", "rank", "MACs"], right={1, 2, 3}),
    ])


def prune_text(result: dict) -> str:
    lines = [f"{result['method']}: removed {len(result['removed_blocks'])} blocks, MACs "
             f"{result['macs_before'] / 1e6:.2f} M -> {result['macs_after'] / 1e6:.2f} M "
             f"(-{100 * result['macs_reduction']:.1f}%), provider {result['provider']}"]
    if "measured_speedup" in result:
        lines.append(f"latency on {result['backend']['backend']} ({result['backend']['device']}), batch "
                     f"{result['latency_batch']}: {1e3 * result['original_latency_s']:.3f} ms -> "
                     f"{1e3 * result['pruned_latency_s']:.3f} ms, measured speed-up {result['measured_speedup']:.3f}x "
                     f"(target {result['target_speedup']}x"
                     + (f"; {result['measured_speedup_in_search']:.3f}x in the search, with placeholder maps"
                        if "measured_speedup_in_search" in result else "") + ")")
    lines += [f"note: {note}" for note in result.get("notes", [])]
    if "segments" in result:
        lines += sglp_lines(result)
    lines += [f"data: {result['data']}", result["verification_text"]]
    if "repair" in result:
        lines += repair_lines(result["repair"], result["repair_agreement"])
    if "healing" in result:
        lines += healing_lines(result)
    lines.append(f"wrote {result['output']} and {result['plan']}")
    return "\n".join(lines)


def sglp_lines(result: dict) -> list[str]:
    """SGLP's segments (chosen how, the blocks in each, those removed) and GradNorm's targets."""
    segments = result["segments"]
    lines = [f"{len(segments)} segments ({'given' if result['segments_chosen_by'] == 'given' else 'elbow of the loss'}),"
             f" blocks ranked by GradNorm on {result['grad_norm_targets']}:"]
    for k, s in enumerate(segments):
        lines.append(f"  segment {k}: {len(s['blocks'])} blocks, removed {len(s['removed'])}"
                     + (f" ({', '.join(s['removed'])})" if s["removed"] else ""))
    if "plot" in result:
        lines.append(f"CKA matrix: {result['plot']}")
    return lines


def healing_lines(result: dict) -> list[str]:
    """What healing did, and agreement (accuracy) on the held-back samples before pruning, after, and healed."""
    h = result["healing"]
    lines = [f"healed: {h['steps']} steps of {h['batch']} ({h['epochs']:.1f} epochs over {h['train_samples']} samples"
             f"{', labels' if h['labels'] else ', no labels'}{augmentation(h)}) on {h['device']} "
             f"in {h['seconds']:.0f} s; kept the checkpoint of step {h['best_step']} (lowest held-back KL)"]
    rows = []
    for stage, title in (("before_pruning", "original"), ("after_pruning", "pruned"), ("after_healing", "healed")):
        m = result[stage]
        rows.append([title, f"{100 * m['agreement']:.1f}%", f"{100 * m['accuracy']:.1f}%" if "accuracy" in m else "-",
                     f"{m['mean_kl']:.4f}"])
    lines.append(f"on the {result['held_back_samples']} held-back samples:")
    lines.append(table(rows, ["model", "agreement", "top-1", "mean KL"], right={1, 2, 3}))
    lines += [f"note: {h['note']}"] if h.get("note") else []
    return lines


def repair_lines(record: dict, agreement: dict) -> list[str]:
    """The maps a repair fitted (where each went, the error at its cut before and after) and agreement."""
    lines = [f"repaired: {len(record['maps'])} linear maps fitted on {record['samples']} samples "
             f"({'sequentially' if record['sequential'] else 'independently'}, ridge {record['ridge']:g}) in "
             f"{record['seconds']:.1f} s"]
    rows = [[m["target"], "x".join(map(str, m["channels"])), f"{m['error_before']:.3f}", f"{m['error_after']:.3f}",
             m["placed"]] for m in record["maps"]]
    if rows:
        lines.append(table(rows, ["cut (original tensor)", "map", "error before", "after", "placed"], right={2, 3}))
    lines += [f"note: {note}" for note in record["notes"]]
    lines.append(f"top-1 agreement with the original on the fitting data: pruned {100 * agreement['pruned']:.1f}%, "
                 f"repaired {100 * agreement['repaired']:.1f}%" if agreement.get("pruned") is not None else
                 "agreement: the model's first output is not (samples, classes)")
    return lines


def repair_text(result: dict) -> str:
    return "\n".join([f"data: {result['data']}; teacher: {result['teacher']}",
                      *repair_lines(result["repair"], result["agreement"]), result["verification_text"],
                      f"wrote {result['output']} and {result['plan']}"])


def augmentation(record: dict) -> str:
    """', crop+flip', ', crop+flip+mixup' or '' for a healing record."""
    if not record["augment"]:
        return ""
    return ", crop+flip+mixup" if record.get("mixup") else ", crop+flip"


def heal_text(result: dict) -> str:
    return "\n".join([f"data: {result['data']}; teacher: {result['teacher']}", *healing_lines(result),
                      result["verification_text"], f"wrote {result['output']} and {result['plan']}"])


def latency_text(result: dict) -> str:
    lines = [f"{result['rows']} distinct rows for {result['options']} options on {result['backend']} "
             f"({result['device']}), batch {result['batch']}: whole model {1e3 * result['whole_s']:.3f} ms, "
             f"fixed part {1e3 * result['fixed_s']:.3f} ms"]
    if "map_rows" in result:
        lines.append(f"{result['map_rows']} of the rows are fitted maps that may replace a removed block "
                     "(maps folded into their neighbour have no row)")
    lines += [f"note: {note}" for note in result.get("notes", [])]
    lines.append(f"wrote {result['output']}")
    return "\n".join(lines)


def bench_text(result: dict) -> str:
    b = result["backend"]
    lines = [f"{b['backend']} on {b['device']}, batch {result['batch']}"]
    lines += [f"  {m['model']}: {1e3 * m['latency_s']:.3f} ms (median)" for m in result["models"]]
    if "speedup" in result:
        first, other = (m["model"] for m in result["models"])
        lines.append(f"speed-up of {other} over {first}: {result['speedup']:.3f}x (median of {result['rounds']} rounds)")
    return "\n".join(lines)


def demo_text(result: dict) -> str:
    p = result["pruned"]
    lines = [
        f"model: {result['model']} ({p['method']}, target {p['target_speedup']}x on {p['backend']['backend']}, "
        f"batch {p['latency_batch']})",
        f"latency: {1e3 * p['original_latency_s']:.2f} ms -> {1e3 * p['pruned_latency_s']:.2f} ms, "
        f"measured speed-up {p['measured_speedup']:.2f}x",
        f"removed {len(p['removed_blocks'])} blocks, merged {len(p['merged'])} conv runs; "
        f"MACs -{100 * p['macs_reduction']:.1f}%",
        f"top-1 on {result['test_data']}:",
    ]
    rows = [["original", f"{100 * result['accuracy_before']:.2f}%", "-"],
            ["pruned", f"{100 * result['accuracy_after']:.2f}%", f"{100 * result['agreement']:.2f}%"]]
    repaired = "accuracy_repaired" in result
    if repaired:
        rows.append(["pruned + repaired", f"{100 * result['accuracy_repaired']:.2f}%",
                     f"{100 * result['agreement_repaired']:.2f}%"])
    if "healed" in result:
        rows.append([f"pruned + {'repaired + ' if repaired else ''}healed", f"{100 * result['accuracy_healed']:.2f}%",
                     f"{100 * result['agreement_healed']:.2f}%"])
    lines.append(table(rows, ["model", "top-1", "agreement with the original"], right={1, 2}))
    files = ([result["pruned_model"]] if repaired else []) + [p["output"], p["plan"]]
    if repaired:
        r = p["repair"]
        lines.append(f"repaired without training: {len(r['maps'])} linear maps fitted on {r['samples']} calibration "
                     f"images in {r['seconds']:.0f} s (the latency above includes them)")
    if "healed" in result:
        h = result["healed"]["healing"]
        lines.append(f"healed without labels on {h['train_samples']} calibration images ({h['steps']} steps of "
                     f"{h['batch']}, {h['epochs']:.0f} epochs{augmentation(h)}) in {h['seconds']:.0f} s on {h['device']}")
        files += [result["healed"]["output"], result["healed"]["plan"]]
    lines.append("files: " + ", ".join(files))
    return "\n".join(lines)


def train_prune_text(result: dict) -> str:
    """``train-prune``: the gated blocks with their final theta and when each was pruned, then the files."""
    training = result["training"]
    rows = [[join, f"{theta:.3f}", str(result["pruned_at"].get(join, "-"))]
            for join, theta in zip(result["blocks"], result["final_theta"])]
    lines = [f"trained {training['steps']} steps of {training['batch']} ({training['epochs']:.1f} epochs, loss: "
             f"{training['loss']}) in {training['seconds']:.0f} s; removed {len(result['removed_blocks'])} of "
             f"{len(result['blocks'])} gated blocks; MACs {-100 * result['macs_reduction']:+.1f}%",
             table(rows, ["block (join)", "theta", "pruned at step"], right={1, 2})]
    if "measured_speedup" in result:
        lines.append(f"measured speed-up {result['measured_speedup']:.2f}x on {result['backend']['backend']} at batch "
                     f"{result['latency_batch']} (target {result['target_speedup']}x)")
    for name in ("original", "pruned"):
        held = result[f"held_back_{name}"]
        parts = [f"{k} {100 * v:.1f}%" for k, v in held.items() if k in ("accuracy", "agreement")]
        lines.append(f"held back, {name}: " + ", ".join(parts))
    lines.append(f"files: {result['output']}, {result['plan']}, {result['thetas']}, {result['plot']}")
    lines.append(result["verification_text"])
    return "\n".join(lines)
