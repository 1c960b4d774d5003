"""One clock for every measurement of how long work takes.

A GPU runs kernels asynchronously: a call returns once its kernels are queued, so a clock read
right after it times the launches, not the work. Every interval measured here (the precision
and teacher-form timings, stacked versus loop, the duration estimate, an epoch's seconds, the
benchmarks) waits for the device's queued work before reading the clock, at the start and at
the end. On a CPU, which runs synchronously, that wait is free.

- `synchronize(device)`: wait for the device's queued work.
- `Stopwatch(device)`: `start()` and `elapsed()` synchronise, then read `time.perf_counter`.
- `seconds_per_call(fn, device, repeats, warmup)`: the mean seconds of one call of `fn`.

Wall-clock stamps (when a run started, for a report) are not intervals and use `time` directly.
"""
from time import perf_counter

import torch


def synchronize(device):
    """Wait until every kernel queued on `device` (a torch.device or its name) has finished.

    CUDA and MPS queue work asynchronously; a CPU device returns at once.
    """
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


class Stopwatch:
    """Seconds of device work: start() and elapsed() each synchronise `device`, then read
    time.perf_counter, so the interval covers the work queued in between, not its launches.

    >>> watch = Stopwatch(torch.device('cuda')).start()
    >>> ...; seconds = watch.elapsed()

    elapsed() may be read several times (each reading synchronises again); it raises
    RuntimeError before start().
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self._start = None

    def start(self):
        """Synchronise, then start (or restart) the interval. Returns self."""
        synchronize(self.device)
        self._start = perf_counter()
        return self

    def elapsed(self):
        """Seconds (float) since start(), after the work queued until now has finished."""
        if self._start is None:
            raise RuntimeError('Stopwatch.elapsed() before start()')
        synchronize(self.device)
        return perf_counter() - self._start


def seconds_per_call(fn, device, repeats=1, warmup=0):
    """Mean seconds of one call of fn() over `repeats` timed calls, after `warmup` untimed ones
    (one-time kernel choices, allocations, cuDNN's autotuning), with `device` synchronised before
    the first timed call and after the last. repeats >= 1."""
    if repeats < 1:
        raise ValueError(f'repeats must be at least 1, got {repeats}')
    for _ in range(warmup):
        fn()
    watch = Stopwatch(device).start()
    for _ in range(repeats):
        fn()
    return watch.elapsed() / repeats
