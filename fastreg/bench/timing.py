"""The one timer and the one spread statistic: :class:`Timer` times callables in blocks,
:meth:`Timer.interleaved` several of them round by round; :func:`quartiles` and
:func:`ratio_summary` turn per-round times into a median and its interquartile range.
``python -m fastreg bench``, ``bench --memory`` and the scripts in ``benchmarks/`` time
with them (docs/bench-method.md).

* Variants interleaved. The variants of one comparison are timed round after round, each
  round one block of calls of every variant, the order rotated from round to round; each
  round gives a ratio baseline time / variant time. The speedup is the median of these
  per-round ratios and the spread their interquartile range: a machine that slows down
  for a while slows every variant of the rounds it hits, and the ratio of one round stays
  fair. A spread that holds 1.0, or is wider than half its median, does not support a
  speedup (:func:`spread_supports`).
* GPU timing measures HBM, not L2: before each timed call a buffer of 256 MB (or four
  times the L2, if larger) is written, outside the timed region, as
  ``triton.testing.do_bench`` does, and each call is timed by its own pair of CUDA events
  (``l2_flush=False``: blocks of back-to-back calls between two events instead, which is
  what a training loop of small tensors sees: launch overhead included).

What comes from ``torch.utils.benchmark`` and what is ours: each impl's per-round times
are summarised by its ``Measurement`` (median, IQR; :func:`time_measurement`). Ours,
because torch's does not do it: interleaving the variants round by round and the ratios
per round (``blocked_autorange`` and ``adaptive_autorange`` time one statement's blocks
back to back); the blocks themselves (``Timer.timeit`` adds two untimed warm-up calls to
every block, which would double or triple a run of large sizes, so a CPU block is timed
by ``timeit.Timer`` with the garbage collector off, as torch's Timer does inside); and the
L2 flush between calls and per-call CUDA events (torch's Timer reads a host clock around
a synchronise).
"""

import math
import statistics
import time
import timeit

import torch

L2_FLUSH_MIN_BYTES = 256 * 2**20  # triton.testing.do_bench's cache buffer


def l2_flush_bytes(device):
    """Bytes written before each timed CUDA call: 256 MB, or four times the L2 if larger
    (an H200 has 60 MB of L2)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
    return max(L2_FLUSH_MIN_BYTES, 4 * l2)


class Timer:
    """Seconds per call of a callable, in blocks of calls.

    A block is `number` calls: as many as it takes to last `min_block_s` (sized from a
    timed call after the warm-up call), or the `number` given. On the CPU each block is
    timed by ``timeit.Timer`` (gc off while timing) with `clock` (``time.perf_counter``;
    ``time.process_time`` leaves out the time the process was descheduled).
    On the GPU, with `l2_flush` (the default there) every call is preceded by a write of
    :func:`l2_flush_bytes` bytes and timed by its own pair of CUDA events, the flush
    outside them, so that what is timed reads its inputs from HBM rather than from L2;
    without it a block is timed back to back between two events.

    ``timer(fn)`` times one callable (median of at least `repeats` blocks, more while it
    has run less than `min_time_s`, at most 10 * repeats); :meth:`interleaved` times
    several round by round, for per-round ratios.
    """

    def __init__(
        self,
        device,
        repeats=5,
        min_time_s=0.3,
        min_block_s=None,
        l2_flush=None,
        number=None,
        clock=time.perf_counter,
    ):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.repeats = max(1, repeats)
        self.min_time_s = min_time_s
        self.min_block_s = min_block_s if min_block_s is not None else (1e-3 if self.cuda else 2e-3)
        self.l2_flush = self.cuda if l2_flush is None else bool(l2_flush) and self.cuda
        self.number = number
        self.clock = clock
        self._flush_buffer = None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def flush(self):
        """Evicts the inputs from L2: writes a buffer larger than it (not timed)."""
        if self._flush_buffer is None:
            self._flush_buffer = torch.empty(
                l2_flush_bytes(self.device) // 4, dtype=torch.int32, device=self.device
            )
        self._flush_buffer.zero_()

    @staticmethod
    def _event():
        return torch.cuda.Event(enable_timing=True)

    def _block(self, fn, number):
        """Seconds per call over one block of `number` calls."""
        if self.cuda and self.l2_flush:
            pairs = [(self._event(), self._event()) for _ in range(number)]
            for start, end in pairs:
                self.flush()
                start.record()
                fn()
                end.record()
            pairs[-1][1].synchronize()
            return sum(s.elapsed_time(e) for s, e in pairs) / 1e3 / number
        if self.cuda:
            start, end = self._event(), self._event()
            start.record()
            for _ in range(number):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / number
        # timeit.Timer, as torch.utils.benchmark.Timer does inside (gc off while timing);
        # torch's own timeit() adds two untimed warm-up calls to every block.
        return timeit.Timer(fn, timer=self.clock).timeit(number) / number

    def _number(self, first):
        """Calls per block, from the time of one call."""
        cap = 1_000 if self.l2_flush else 10_000
        return max(1, min(cap, math.ceil(self.min_block_s / max(first, 1e-9))))

    def _calibrate(self, fn):
        """Warms `fn` up and returns its calls per block."""
        self.sync()
        fn()  # warm-up: lazy init, allocator, compile
        self.sync()
        if self.number:
            return self.number
        return self._number(self._block(fn, 1))  # a second warm-up, to size the blocks

    def __call__(self, fn):
        """(median seconds per call, number of timed calls)"""
        if self.number:
            number = self._calibrate(fn)
            times, spent = [], 0.0
        else:
            self.sync()
            fn()
            self.sync()
            first = self._block(fn, 1)
            number = self._number(first)
            times = [first] if number == 1 else []
            spent = first
        while len(times) < self.repeats or (
            spent < self.min_time_s and len(times) < 10 * self.repeats
        ):
            t = self._block(fn, number)
            times.append(t)
            spent += t * number
        return statistics.median(times), len(times) * number

    def interleaved(self, fns):
        """Times the callables of `fns` ({name: fn}) round by round: each round one block
        of every callable, the order rotated by one from round to round. At least
        `repeats` rounds, more while the rounds have taken less than `min_time_s` of wall
        time per callable (at most 10 * repeats).

        Returns ({name: [seconds per call, one per round]}, {name: calls per block},
        {name: error}); a callable that raises is dropped from the rounds with its error."""
        numbers, errors = {}, {}
        for name, fn in fns.items():
            try:
                numbers[name] = self._calibrate(fn)
            except Exception as error:  # one broken impl must not lose the comparison
                errors[name] = error
        names = [n for n in fns if n in numbers]
        times = {n: [] for n in names}
        spent, rounds = 0.0, 0
        while names and (
            rounds < self.repeats
            or (spent < self.min_time_s * len(names) and rounds < 10 * self.repeats)
        ):
            shift = rounds % len(names)
            for name in names[shift:] + names[:shift]:
                wall = time.perf_counter()
                try:
                    t = self._block(fns[name], numbers[name])
                except Exception as error:
                    errors[name] = error
                    continue
                times[name].append(t)
                spent += time.perf_counter() - wall  # flushes included: bounds the run
            for name in [n for n in names if n in errors]:
                names.remove(name)
                del times[name]
            rounds += 1
        return times, numbers, errors


def quartiles(values):
    """(q1, median, q3) of `values` (all three the value itself for one value)."""
    values = sorted(values)
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


SPREAD_LIMIT = 0.5  # an interquartile range wider than this share of the median is too wide


def ratio_summary(base_times, times):
    """The per-round ratios base / impl of two equally long lists of per-round times:
    {"speedup": median, "speedup_q1", "speedup_q3", "speedup_min", "speedup_max",
    "speedup_clear": whether the spread supports the ratio}."""
    if len(base_times) != len(times) or not times:
        raise ValueError(
            f"per-round times must pair up, but got {len(base_times)} baseline "
            f"and {len(times)} impl rounds"
        )
    ratios = [b / t for b, t in zip(base_times, times)]
    q1, median, q3 = quartiles(ratios)
    return {
        "speedup": median,
        "speedup_q1": q1,
        "speedup_q3": q3,
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "speedup_clear": spread_supports(median, q1, q3),
    }


def spread_supports(median, q1, q3):
    """False when the per-round ratios cannot say which is faster (their interquartile
    range holds 1.0) or scatter too widely (a range wider than SPREAD_LIMIT of the
    median)."""
    if q1 < 1.0 < q3:
        return False
    return (q3 - q1) <= SPREAD_LIMIT * median


def time_measurement(times, number, case, threads):
    """A torch.utils.benchmark Measurement of one impl's per-round times: its median and
    interquartile range are the row's."""
    from torch.utils.benchmark.utils.common import Measurement, TaskSpec

    spec = TaskSpec(
        stmt=case.impl,
        setup="pass",
        label=case.op,
        sub_label=f"{case.dtype} {case.size_label}",
        description=case.impl,
        num_threads=threads,
    )
    return Measurement(number_per_run=number, raw_times=[t * number for t in times], task_spec=spec)
