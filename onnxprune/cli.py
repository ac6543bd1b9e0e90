"""Command line: argument parsing only; every verb calls onnxprune.api.

Every failure the user can fix ends with one line on stderr ("onnxprune: error: ...") and exit
status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except OnnxPruneError as exc:
        if args.debug:
            raise
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return 1
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
