"""`kubemaas-operator` (also `python -m kubemaas_operator`): render, crd, run."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kubemaas_operator.crd import crd_yaml
from kubemaas_operator.render import run_render
from kubemaas_operator.settings import OperatorSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubemaas-operator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    render = commands.add_parser(
        "render", help="print the objects the operator would create for ModelServices, offline"
    )
    render.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                        help="YAML file (multi-document), directory of them, or - for stdin; repeatable")
    render.add_argument("-n", "--namespace", default="default",
                        help="namespace of ModelServices that name none (like kubectl apply -n)")

    crd = commands.add_parser("crd", help="print the ModelService CustomResourceDefinition")
    crd.add_argument("-o", "--output", metavar="FILE", help="write it to FILE instead of stdout")

    commands.add_parser(
        "run", help="run the operator (settings from KUBEMAAS_OPERATOR_* environment variables)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "crd":
        text = crd_yaml()
        if args.output:
            Path(args.output).write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    settings = OperatorSettings.from_env(os.environ)
    if args.command == "render":
        return run_render(args.filename, args.namespace, settings)
    if args.command == "run":
        from kubemaas_operator.run import run_operator  # kopf is imported only to run

        run_operator(settings)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
