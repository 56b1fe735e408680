"""``moert demo``: the main job on the built-in default.

Until drop-in offloading of whole models lands, the demo is the runtime tour (``moert tour``).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moert import tour

    tour.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from moert import tour

    return tour.run(args)
