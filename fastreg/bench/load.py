"""How much other processes competed with a run: :class:`LoadMonitor` reads the CPU
time of the whole machine (``/proc/stat``) less that of this process and its
descendants, and samples the 1-minute load average before, during and after. A run that
others took more than ``OTHERS_LIMIT`` of the machine's CPU time from counts as
competed with; :func:`fastreg.bench.report.load_refusal` then keeps its JSON out of
``benchmarks/results/``."""

import os
import re
import time


def load_average():
    """The 1-minute load average, or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# Other processes' share of the machine's CPU time during a run above which the run
# counts as competed with (10%: 0.2 of a core on 2 CPUs, 1.6 cores on 16).
OTHERS_LIMIT = 0.10


def machine_cpu_seconds():
    """(CPU seconds every process has used, number of CPUs counted) from /proc/stat
    (user, nice, system, irq, softirq and steal: time a hypervisor gave to others counts
    too), or (None, None) where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        fields = [int(v) for v in lines[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None, None
    cpus = sum(1 for line in lines[1:] if re.match(r"cpu\d+ ", line)) or os.cpu_count()
    fields += [0] * (8 - len(fields))
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]
    return busy / os.sysconf("SC_CLK_TCK"), cpus


def own_cpu_seconds():
    """CPU seconds of this process (every thread), of its children it has waited for and
    of its living descendants (torch.compile's workers), or None where unknown."""
    try:
        import resource
    except ImportError:
        return None
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total + _descendants_cpu_seconds()


def _descendants_cpu_seconds():
    """utime + stime of the living descendants of this process, from /proc/<pid>/stat."""
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return 0.0
    children, cpu = {}, {}
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        rest = text[text.rindex(")") + 2 :].split()  # the fields after the command name
        try:
            pid, ppid = int(entry), int(rest[1])
            cpu[pid] = (int(rest[11]) + int(rest[12])) / tick
        except (IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, list(children.get(os.getpid(), ()))
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += children.get(pid, ())
    return total


class LoadMonitor:
    """How much other processes competed with a run: the CPU time that the machine used
    less that of this process and its descendants, over the run's wall time and the
    CPUs (the share of the machine they took); and the 1-minute load average before the
    run, every `interval_s` during it (a thread) and after.

    ``with LoadMonitor(own_threads) as monitor: ...``, then ``monitor.result``; or
    :meth:`start` and :meth:`stop`. The readers are arguments so that tests can fake them.
    """

    def __init__(
        self,
        own_threads=1,
        interval_s=2.0,
        *,
        clock=time.perf_counter,
        machine=machine_cpu_seconds,
        own=own_cpu_seconds,
        load=load_average,
    ):
        self.own_threads = own_threads
        self.interval_s = interval_s
        self._clock, self._machine, self._own, self._load = clock, machine, own, load
        self.samples = []
        self.result = None
        self._thread = None
        self._stop = None

    def start(self):
        import threading

        self._t0, (self._busy0, self._cpus), self._own0 = (
            self._clock(),
            self._machine(),
            self._own(),
        )
        self.load_before = self._load()
        self._stop = threading.Event()
        if self.interval_s:
            self._thread = threading.Thread(
                target=self._sample, daemon=True, name="fastreg-load-monitor"
            )
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            value = self._load()
            if value is not None:
                self.samples.append(value)

    def stop(self):
        """The verdict: a dict with load_before, load_max (during, before and after
        included), load_after, load_samples, cpus, others_cpu_share, competed and why."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        wall = self._clock() - self._t0
        busy, cpus = self._machine()
        own = self._own()
        after = self._load()
        loads = [v for v in [self.load_before, *self.samples, after] if v is not None]
        share = None
        if None not in (busy, self._busy0, own, self._own0) and wall > 0 and cpus:
            others = (busy - self._busy0) - (own - self._own0)
            share = max(0.0, others) / (wall * cpus)
        cpus = cpus or os.cpu_count() or 1
        if share is not None:
            competed = share > OTHERS_LIMIT
            why = (
                f"other processes took {share:.0%} of the {cpus} CPUs' time during the run "
                f"(limit {OTHERS_LIMIT:.0%})"
            )
        elif loads:
            # no CPU accounting: the load average beyond this run's own threads
            excess = max(loads) - self.own_threads
            competed = excess > OTHERS_LIMIT * cpus
            why = (
                f"the 1-minute load average reached {max(loads):.2f} on {cpus} CPUs, "
                f"{self.own_threads} of them this run's threads"
            )
        else:
            competed, why = False, "no load information on this system"
        self.result = {
            "load_before": self.load_before,
            "load_max": max(loads) if loads else None,
            "load_after": after,
            "load_samples": len(self.samples),
            "cpus": cpus,
            "others_cpu_share": share,
            "competed": competed,
            "why": why,
            "wall_s": wall,
        }
        return self.result

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
