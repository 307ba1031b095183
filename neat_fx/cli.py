"""`neat-fx`: the command line."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="neat-fx",
        description=(
            "NEAT for any PyTorch model as a compiler pass: capture the graph, match linear ops by "
            "pattern, insert NEAT adapters, train them, fold W0 + ΔW into the weights."
        ),
    )
    parser.add_argument("--version", action="version", version=f"neat-fx {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
