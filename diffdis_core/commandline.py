"""What the three command lines (``diffdis``, ``diffdis-train``, ``diffdis-evaluate``) share: one-line
errors, exit codes, option types that refuse bad numbers at parse time, and ``--base none``."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

from .errors import DiffDISError

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (``error: ...``, exit 2) like every other error here."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def error_line(error: BaseException) -> str:
    """The error's message. A DataLoader worker's error (an unreadable image) comes back with the worker's
    traceback in its message; the user gets its last line, the message itself."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1].split(f"{type(error).__name__}: ", 1)[-1]
    return str(error)


def run_main(run: Callable[[], int]) -> int:
    """Run a command's body: a ``DiffDISError`` is one ``error:`` line (once under ``accelerate launch``,
    where every process meets it) and exit 2; Ctrl-C is ``interrupted`` and exit 130."""
    try:
        return run()
    except DiffDISError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def base_option(value: str | None) -> str | None:
    """``--base``: a folder or repo id; ``none`` (any case) for no base."""
    return None if value is None or str(value).lower() == "none" else value


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _shown(bound: float) -> str:
    """A bound as the user types it: whole numbers in full (a seed's 18446744073709551615, not 1.84467e+19)."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def number(kind: type = float, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> Callable[[str], int | float]:
    """An argparse ``type`` for a finite ``kind`` (int or float) in [low, high] (``low_open``: > low)."""

    def parse(text: str) -> int | float:
        value = _number(kind, text)
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if low_open else '>='} {_shown(low)}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {_shown(high)}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse
