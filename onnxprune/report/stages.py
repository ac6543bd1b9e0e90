"""Depth per stage, read from ``analyze --json`` structures (the report's structure diagram; docs/report.md).

A stage is a run of consecutive top-level residual blocks with the same output shape (channels and spatial
size; the same rule as SLP's ``--min-blocks-per-stage``, onnxprune.importance.slp.stage_of): a stride or a
change of width starts the next one. Its depth is its number of blocks, and of chain convs inside those blocks.
A model without residual blocks (a plain conv chain) is split into runs of chain convs with the same spatial
size, between stride breaks. Before and after pruning, stages are matched by shape, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stage:
    shape: tuple  # the blocks' (or convs') output shape after the batch
    blocks: list[str] = field(default_factory=list)  # joins of the stage's top-level residual blocks, in order
    convs: int = 0  # chain convs in the stage

    @property
    def label(self) -> str:
        return "×".join(str(d) for d in self.shape) if self.shape else "?"


def _top_level(blocks: list[dict]) -> dict[int, int]:
    """Block index -> index of the outermost block containing it (itself for a top-level block)."""
    parent = {b["index"]: b.get("parent") for b in blocks}
    top = {}
    for index in parent:
        k = index
        while parent.get(k) is not None and parent[k] in parent:
            k = parent[k]
        top[index] = k
    return top


def stages(structure: dict) -> list[Stage]:
    """The stages of a structure (``Structure.to_dict()``), in order."""
    blocks = sorted(structure.get("residual_blocks", []), key=lambda b: b["index"])
    convs = structure.get("convs", [])
    if not blocks:
        return _chain_stages(convs)
    top = _top_level(blocks)
    result: list[Stage] = []
    stage_of: dict[int, Stage] = {}
    for b in blocks:
        if top[b["index"]] != b["index"]:
            continue
        shape = tuple((b.get("output_shape") or [None])[1:])
        if not result or result[-1].shape != shape:
            result.append(Stage(shape))
        result[-1].blocks.append(b["join"])
        stage_of[b["index"]] = result[-1]
    for c in convs:
        if c.get("block") is not None and top.get(c["block"]) in stage_of:
            stage_of[top[c["block"]]].convs += 1
    return result


def _chain_stages(convs: list[dict]) -> list[Stage]:
    result: list[Stage] = []
    for c in convs:
        shape = tuple((c.get("output_shape") or [None, None])[2:])  # spatial size alone: widths vary within a stage
        if not result or result[-1].shape != shape:
            result.append(Stage(shape))
        result[-1].convs += 1
    return result


@dataclass
class StageChange:
    before: Stage
    after: Stage | None  # None: the stage is gone
    removed: list[str]  # joins of the stage's blocks that the plan removed


def compare_stages(before: dict, after: dict | None, removed: list[str] = ()) -> list[StageChange]:
    """Each stage of ``before`` with its match in ``after`` (the next stage of the same shape; None without
    ``after`` or when none is left) and the blocks of it in ``removed``."""
    later = stages(after) if after is not None else []
    gone = set(removed)
    result, k = [], 0
    for stage in stages(before):
        match = next((j for j in range(k, len(later)) if later[j].shape == stage.shape), None)
        if match is not None:
            k = match + 1
        result.append(StageChange(stage, later[match] if match is not None else None,
                                  [j for j in stage.blocks if j in gone]))
    return result
