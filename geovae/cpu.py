"""How a run's helper threads share the CPU with the model.

While the model computes on the CPU, a run also reads tiles (:mod:`geovae.segment.reader`),
traces polygons (:mod:`geovae.vector.stream`) and formats them (:mod:`geovae.vector.formats`)
in threads of their own. The model's intra-op threads meet at a barrier after every
operator, so a core taken by a helper stalls all of them: on a machine that other processes
keep busy, a run whose helpers compete with its model falls behind a loop that does the same
work one step after another. Two rules keep the helpers off the model's cores:

* **Fewer of them where cores are taken.** Pools of helper threads are sized from the cores
  actually free: the cores this process may run on (``os.sched_getaffinity``) less the
  threads of other processes that are running or ready to run (:func:`others_load`), never
  more than a quiet machine would get.
* **Lower priority.** Each helper thread lowers its own scheduling priority by
  :data:`HELPER_NICE` when it starts (Linux keeps a nice value per thread;
  ``os.setpriority`` on the thread's native id), so a core wanted by both goes to the
  model's thread first, and a helper runs when the model waits (the run's bounded queues
  make the model wait when a helper falls too far behind, so it is never starved for good).
  Elsewhere the call does nothing.
"""

from __future__ import annotations

import glob
import math
import os
import statistics
import sys
import threading
import time

__all__ = [
    "HELPER_NICE",
    "available_cores",
    "free_cores",
    "helper_threads",
    "lower_priority",
    "others_load",
    "thread_nice",
]

#: How much a helper thread lowers its priority: at nice 5 the kernel gives a thread about a
#: third of the CPU time of a nice-0 thread that wants the same core (CFS weights 335 / 1024).
HELPER_NICE = 5


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; ``os.cpu_count`` where unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _running_threads(stat_files: list[str]) -> int:
    n = 0
    for f in stat_files:
        try:
            with open(f) as fh:
                # "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the last ")"
                if fh.read().rpartition(")")[2].split()[0] == "R":
                    n += 1
        except (OSError, IndexError):
            continue
    return n


def others_load(samples: int = 5, interval: float = 0.004) -> float:
    """Threads of other processes running or ready to run, now (the median of a few looks).

    On Linux: the machine's runnable threads (``/proc/loadavg``'s fourth field) less this
    process's own (``/proc/self/task/*/stat`` in state R). The load averages would not do:
    they include this process's own recent work and lag by a minute. Elsewhere: the last
    minute's load average (0 where there is none).
    """
    try:
        tasks = glob.glob("/proc/self/task/*/stat")
        looks = []
        for i in range(samples):
            if i:
                time.sleep(interval)
            with open("/proc/loadavg") as fh:
                running = int(fh.read().split()[3].partition("/")[0])
            looks.append(max(0, running - _running_threads(tasks)))
        return float(statistics.median(looks))
    except (OSError, ValueError, IndexError):
        pass
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def free_cores(cores: int | None = None, load: float | None = None) -> int:
    """Cores not kept busy by other work: ``cores`` less the rounded ``load``, at least 0.

    Args:
        cores: the cores to count from; None: :func:`available_cores`.
        load: other processes' runnable threads; None: :func:`others_load`.
    """
    n = available_cores() if cores is None else cores
    if load is None:
        load = others_load()
    return max(0, n - math.floor(load + 0.5))


def helper_threads(want: int, cores: int | None = None, load: float | None = None) -> int:
    """Threads for a pool of helper work: ``want`` at most, no more than the free cores, at least 1.

    Args:
        want: what a quiet machine would get.
        cores, load: as :func:`free_cores` takes them (for tests and callers that know).
    """
    return max(1, min(want, free_cores(cores, load)))


def lower_priority(nice: int | None = None) -> int | None:
    """Give the calling thread the main thread's nice value plus ``nice`` (at most 19;
    None: :data:`HELPER_NICE`, read at the call).

    Call it first thing in a helper thread (a pool's ``initializer``). Relative to the main
    thread, not to the caller's own value: a thread started by a helper inherits the helper's
    value, and calling it again there changes nothing.

    Returns:
        The thread's nice value, or None where threads have no nice value of their own (not
        Linux) or it cannot be read or changed.
    """
    if not sys.platform.startswith("linux"):
        return None
    tid = threading.get_native_id()
    nice = HELPER_NICE if nice is None else nice
    try:
        # On Linux the process id names the main thread, and PRIO_PROCESS of a thread id one thread.
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + nice)
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None


def thread_nice(thread: threading.Thread) -> int | None:
    """A running thread's nice value (Linux), or None."""
    if not sys.platform.startswith("linux") or thread.native_id is None:
        return None
    try:
        return os.getpriority(os.PRIO_PROCESS, thread.native_id)
    except OSError:
        return None
