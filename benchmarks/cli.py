"""What the benchmark command lines share: value types for argparse (the tools' too), one-line
errors with exit status 2, and SIGTERM turned into SystemExit so that cleanup in ``finally``
runs."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator

BAD_INPUT = 2  # the exit status of every tool of the project for bad input


def error(message: str) -> int:
    """Print one ``error:`` line on stderr; return the bad-input exit status."""
    print(f"error: {message}", file=sys.stderr)
    return BAD_INPUT


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error:`` line (not the usage block), exit status 2."""

    def error(self, message: str):
        raise SystemExit(error(f"{message} (see --help)"))


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``, else argparse's one usage line."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum, {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # what argparse names in its message
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """An argparse type: a float above 0 (a tolerance, a timeout)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{value} is not above 0")
    return value


def fraction(text: str) -> float:
    """An argparse type: a float in [0, 1] (a share, e.g. hw_decoder_load)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1]")
    return value


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """While inside, SIGTERM (e.g. ``timeout``'s) raises SystemExit(143) in the main thread.

    Python's default for SIGTERM kills the process at once: no ``finally`` runs, and the
    temporary lists a benchmark wrote stay behind. As SystemExit it unwinds like Ctrl-C.
    """

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class BenchmarkInputError(ValueError):
    """A benchmark's bad flag or value, found before measuring; the message is one line."""
