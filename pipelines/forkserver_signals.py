"""Imported first by the PIL workers' forkserver (its preload, ``pil.worker_context``): SIGTERM
blocked there, so the server never dies of one, and every worker it forks starts with it
blocked (``pil.bind_to_rank`` then takes it from the rank alone). SIGINT is ignored here for
the same reason: a worker forked by the server gets back the SIGINT handler the server had
when its preload ended, and Python's default raises KeyboardInterrupt. A Ctrl-C reaching a
worker that had not yet run ``bind_to_rank`` (the second worker, still starting while the
first one's batch arrives) ended it quietly, and the rank's next batch failed with "DataLoader
worker (pid(s) ...) exited unexpectedly".

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


if in_forkserver():
    # The server's own SIGINT handler is SIG_IGN anyway (multiprocessing.forkserver.main sets
    # it), but only after the preload, and each child gets back what was there before.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # as in pil.bind_to_rank
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
