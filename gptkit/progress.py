"""Progress for long work: a tqdm bar on a terminal, plain lines that stay readable in a log file."""

from __future__ import annotations

import sys
import time


class PlainProgress:
    """Progress as plain lines (to stderr): what the toolkit shows when tqdm is not installed or the
    output is not a terminal (a log file, a scheduler's output), where a redrawn bar would leave a
    line per redraw. A line every ~10% of the total (without a total: every `every_s` seconds only) and
    at least every `every_s` seconds, with rate and ETA."""

    def __init__(self, iterable=None, total=None, initial=0, desc="progress", unit="it", every_s: float = 60.0, **_):
        self.iterable, self.total, self.n, self.desc, self.unit = iterable, total, initial, desc, unit
        self.start_n, self.t0 = initial, time.perf_counter()
        self.every, self.every_s, self.t_last, self.postfix = max(1, total // 10) if total else 0, every_s, self.t0, ""

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, k: int = 1) -> None:
        before, self.n = self.n, self.n + k
        now = time.perf_counter()
        crossed = self.every and self.n // self.every != before // self.every
        if crossed or self.n == self.total or now - self.t_last >= self.every_s:
            self.t_last = now
            rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
            of = f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else ""
            eta = f" | eta {_hms((self.total - self.n) / rate)}" if self.total and rate > 0 else ""
            print(f"{self.desc}: {self.n}{of} | {rate:,.1f} {self.unit}/s | elapsed {_hms(now - self.t0)}{eta}"
                  f"{self.postfix}", file=sys.stderr, flush=True)

    def set_postfix(self, refresh: bool = True, **kwargs) -> None:
        self.postfix = "".join(f" | {k} {v}" for k, v in kwargs.items())

    def close(self) -> None:
        if not self.total and self.n != self.start_n:  # without a total: say where it ended
            self.every_s = 0.0
            self.update(0)

    write = staticmethod(print)


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar (rate and ETA) on a terminal; plain progress lines when tqdm is not installed or
    stderr is not a terminal, so a redirected log stays readable."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return PlainProgress(iterable, **kwargs)
    if not sys.stderr.isatty():
        return PlainProgress(iterable, **kwargs)
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def progress_write(line: str) -> None:
    """print() that does not break a live progress bar."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(line)
    else:
        tqdm.write(line)
