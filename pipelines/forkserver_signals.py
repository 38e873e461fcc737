"""Imported first by the PIL workers' forkserver (its preload, ``pil.worker_context``): SIGTERM
blocked there, so the server never dies of one, and every worker it forks starts with it
blocked (``pil.bind_to_rank`` then takes it from the rank alone).

torchrun stops a rank with ``killpg`` (each rank runs in a session of its own), and a
scheduler or ``kill -TERM -PGID`` signals the whole group: the server got it too, and died.
Its orphaned workers then end at DataLoader's watchdog check, the rank counts them dead (a
forkserver child's exit code reads 255 once the server is gone), and the batch or two the
rank still reads before its step-boundary save fail ("DataLoader worker (pid(s) ...) exited
unexpectedly"). The server still ends with its rank: it exits when the rank's end closes
the pipe it watches.

The mask cannot come from the rank: subprocess-style spawning, which starts the server,
clears it. Anywhere but in the server this module does nothing.
"""

from __future__ import annotations

import signal
import sys


def in_forkserver() -> bool:
    # python -B -c 'from multiprocessing.forkserver import main; main(...)'
    return any(a.startswith("from multiprocessing.forkserver import main") for a in sys.orig_argv)


if hasattr(signal, "sigwaitinfo") and in_forkserver():  # as in pil.bind_to_rank
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
