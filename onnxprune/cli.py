"""Command line: argument parsing only; every verb calls onnxprune.api.

Every failure the user can fix ends with one line on stderr ("onnxprune: error: ...") and exit
status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from onnxprune import __version__, api
from onnxprune.errors import OnnxPruneError

DESCRIPTION = """\
onnxprune makes exported ONNX networks shallower and faster, after export, without the training
code: it finds residual blocks and conv chains in the graph, scores them, removes or merges them,
and writes a verified ONNX file.

verbs:
  analyze   residual blocks, shortcuts, removability, cost, and the conv chain of a model
  apply     apply a plan (blocks to remove, activations to drop, convs to merge) and verify the result
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxprune", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser(
        "analyze", help="show the residual blocks and conv chain of a model",
        description="Find the residual blocks (join, fork, shortcut kind, removable, params, MACs) and the "
        "conv chain (kernel, stride, groups, channels, activation) of an ONNX model. With --json, print "
        "one JSON object with the keys residual_blocks, convs, links, spans, stride_breaks, barriers, "
        "macs, params, model and notes.",
    )
    p.add_argument("model", help="path of the .onnx file (external data is read from beside it)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.set_defaults(run=_analyze)

    p = verbs.add_parser(
        "apply", help="apply a plan to a model, verify the result and write it",
        description="Apply PLAN (JSON) to MODEL and write the verified result to OUT. A plan lists "
        "'remove_blocks' (join names from analyze --json), 'replace_with_shortcut' (projection blocks), "
        "'drop_activations' (activation node names, or the conv they follow) and 'merge' (lists of "
        "consecutive chain conv names; activations between them are dropped, identity residuals they "
        "cover are folded in). A plan for another model, a node that does not exist, a block that is not "
        "removable or a merge across a barrier is refused before anything is written. The result is "
        "checked with onnx.checker, run with onnxruntime and compared with the original on random inputs.",
    )
    p.add_argument("model", help="the original .onnx file (never modified)")
    p.add_argument("plan", help="the plan .json file")
    p.add_argument("-o", "--output", required=True, help="where to write the rewritten .onnx file")
    p.add_argument("--json", action="store_true", help="print one JSON object (plan summary, verification)")
    p.set_defaults(run=_apply)
    return parser


def _analyze(args: argparse.Namespace) -> int:
    from onnxprune.report.text import structure_report

    structure = api.analyze(args.model)
    if args.json:
        json.dump(structure.to_dict(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(structure_report(structure, args.model))
    return 0


def _apply(args: argparse.Namespace) -> int:
    result = api.apply(args.model, args.plan, args.output)
    if args.json:
        result.pop("verification_text")
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        summary = result["plan"]
        print(f"removed {len(summary['removed_blocks'])} blocks, replaced {len(summary['replaced_with_shortcut'])} "
              f"by their shortcut, dropped {len(summary['dropped_activations'])} activations, "
              f"merged {len(summary['merged'])} conv runs")
        print(result["verification_text"])
        print(f"wrote {result['output']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except OnnxPruneError as exc:
        if args.debug:
            raise
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader (head, less) went away: not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("onnxprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an input we did not foresee: still one line, unless --debug
        if args.debug:
            raise
        print(f"onnxprune: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
