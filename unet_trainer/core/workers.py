"""Worker processes for the data commands (preparing, writing the phantom): a pool whose workers take
one torch thread each and end with the process that started them, SIGKILL included.

A leaf (nothing from the package).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import torch

# prctl's option number (linux/prctl.h): the signal a process gets when its parent ends.
_PR_SET_PDEATHSIG = 1


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool of ``workers`` workers, each started by :func:`start_worker`."""
    context = multiprocessing.get_context()
    # Forked or spawned workers are the children of this process, so one that finds another
    # parent when it starts knows this process already died.
    parent = os.getpid() if context.get_start_method() in ("fork", "spawn") else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=start_worker, initargs=(parent,))


def _arm_parent_death_signal() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent ends (``prctl(PR_SET_PDEATHSIG)``).

    Returns:
        Whether it is armed (False on other systems, or where ``prctl`` cannot be called).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    # An orphan is adopted by init (or a subreaper): its parent's PID changes.
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def start_worker(parent: int | None) -> None:
    """Pool initializer: one torch thread per worker, and the worker ends with its parent
    (:func:`die_with_parent`).

    One thread, because each worker handles a whole case and more would only oversubscribe the
    cores; and because a forked child must not use the OpenMP thread pool its parent had started (a
    parent that resampled or ran a model before): GNU OpenMP's pool does not survive a fork, and the
    child's first parallel resampling would wait for its threads forever.
    """
    torch.set_num_threads(1)
    die_with_parent(parent)


def die_with_parent(parent: int | None) -> None:
    """Pool initializer: end this worker when its parent process ends, however it ends.

    A parent killed by SIGKILL cannot shut its pool down, and the workers would wait for jobs
    forever, adopted by init. On Linux the kernel kills the worker with its parent (the parent
    thread, strictly: the pool's workers are started by the thread calling it, which waits for
    them); elsewhere a daemon thread polls the parent's PID.

    Args:
        parent: the PID the parent had (the process starting the pool), or None when the worker is
            started by an intermediary (the forkserver, which ends with that process in turn).
    """
    if not _arm_parent_death_signal():
        threading.Thread(target=_watch_parent, args=(os.getppid(),), name="watch-parent", daemon=True).start()
    if parent is not None and os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)
