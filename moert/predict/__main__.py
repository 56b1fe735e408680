"""``python -m moert.predict train|eval ...``: the ``moert train`` / ``moert eval`` subcommands on their own."""

from __future__ import annotations

import argparse
import importlib
import sys

MODULES = {"train": "moert.cli.train", "eval": "moert.cli.eval"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moert.predict")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in MODULES.items():
        p = sub.add_parser(name)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    args = parser.parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
