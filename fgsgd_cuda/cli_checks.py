"""Range checks of command-line numbers (the training script and the demo): ``parser.error`` naming the option."""
from __future__ import annotations

import argparse
import math


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace, *, at_least_one=(), finite=()) -> None:
    """Options in ``at_least_one`` (counts) must be >= 1; each (option, low, closed) in ``finite`` must be a finite
    number >= low (``closed``) or > low. Options left at None are not checked."""
    for name in at_least_one:
        v = getattr(args, name)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1, got {v}")
    for name, low, closed in finite:
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and (v >= low if closed else v > low)):
            parser.error(f"--{name.replace('_', '-')}: must be a finite number {'>=' if closed else '>'} {low}, "
                         f"got {v}")
