"""The command-line contract every ``python -m ...`` of the project keeps.

Bad input the user can fix is a :class:`UserError`; :func:`run_command` turns it (and an OSError of the
machine: a full disk, a read-only directory) into one ``error: ...`` line on stderr and exit status 2, never a
traceback. :class:`ArgumentParser` gives usage errors the same line; ``--threads`` is the same flag everywhere.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable

import torch

__all__ = ["UserError", "ENVIRONMENT_ERRNOS", "WRITE_HINT", "run_command", "ArgumentParser", "MAX_THREADS",
           "add_threads_argument", "set_threads", "positive_int", "counts"]


class UserError(Exception):
    """Bad input the user can fix. Command lines print its one-line message and exit with status 2."""


# What the machine, not the program, got wrong: a full disk, a read-only or foreign file system, a failing device.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})
WRITE_HINT = ("free some space or make the directory writable, then run the command again (a training stage goes on "
              "from its last checkpoint with --resume)")


def run_command(body: Callable[[], object]) -> int:
    """Run a command line's work: 0 when it ends, 2 with its one ``error: ...`` line when it raises UserError
    or an OSError of the machine (:data:`ENVIRONMENT_ERRNOS`: a disk that filled up during the work)."""
    try:
        body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror}{where}; {WRITE_HINT}", file=sys.stderr)
        return 2
    return 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other bad input: ``error: ...``, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


MAX_THREADS = 1024  # more would only wait for each other; 2**31 overflowed torch's int


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: the CPU threads PyTorch computes with (default: one per core)."""
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for PyTorch (default: one per physical core); on a machine busy with other "
                             "work, --threads 1 can be several times faster than threads that wait for each other")


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def counts(text: str) -> list[int]:
    """An argparse type: comma-separated whole numbers >= 1 ("1,16"), for benches that sweep a setting."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers, e.g. 1,16") \
            from None
    if not all(1 <= value <= MAX_THREADS for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1 and at most {MAX_THREADS}")
    return values


def set_threads(threads: int | None) -> None:
    """Apply ``--threads``: a UserError below 1 or above MAX_THREADS."""
    if threads is None:
        return
    if not 1 <= threads <= MAX_THREADS:
        raise UserError(f"--threads must be >= 1 and at most {MAX_THREADS}, got {threads}")
    torch.set_num_threads(threads)
