"""``moert`` command line: a thin layer over the API.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand (or ``--help``) needs them, so ``moert --help``
stays fast and importing moert stays lean.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

__all__ = ["main", "COMMANDS"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("moert.cli.demo", "run the main job on the built-in default (or --model PATH)"),
    "tour": ("moert.cli.tour", "a short tour of the runtime on the CPU twin: pool, cache, copy engine"),
    "trace": ("moert.cli.trace", "capture routing traces from a model, or convert peers' formats"),
    "simulate": (
        "moert.cli.simulate",
        "replay a routing trace through the real cache under several policies",
    ),
    "train": ("moert.cli.train", "train an expert predictor on a trace"),
    "eval": ("moert.cli.eval", "evaluate an expert predictor on a trace"),
    "info": ("moert.cli.info", "which backends were compiled and which can run"),
}


# optional dependency -> the extra of pyproject.toml that installs it
_EXTRAS = {"transformers": "models", "triton": "kernels", "matplotlib": "plot"}


def _available() -> dict[str, tuple[str, str]]:
    found = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = (module, help_text)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moert",
        description="moert: run Mixture-of-Experts models with experts offloaded to host memory, "
        "and compare expert predictors and cache policies on the same work.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        # Bad input (a missing or malformed file, a bad option): one line naming it, not a traceback.
        print(f"moert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(
            f"moert {args.command}: error: this needs {exc.name}, an optional dependency: "
            f"pip install 'moert[{extra}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
