"""Progress for long loops: a tqdm bar on a terminal, periodic log lines elsewhere.

In a pod or a CI log a tqdm bar is a stream of carriage returns; there we log one line
every `interval` seconds (and at the end) instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

log = logging.getLogger("cdsp.progress")

LOG_INTERVAL_S = 30.0


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class LogProgress:
    """The non-terminal stand-in for tqdm: same iteration and `set_postfix`, log lines instead."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None, interval: float):
        self.iterable, self.desc, self.interval = iterable, desc, interval
        self.total = total if total is not None else getattr(iterable, "__len__", lambda: None)()
        self.postfix: dict[str, Any] = {}
        self.n = 0

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def _line(self, elapsed: float) -> str:
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = self.n / elapsed if elapsed > 0 else 0.0
        extra = "".join(f" {k}={_fmt(v)}" for k, v in self.postfix.items())
        return f"{self.desc}: {done}{pct} {elapsed:.0f}s {rate:.2f} it/s{extra}"

    def __iter__(self) -> Iterator:
        start = last = time.monotonic()
        for item in self.iterable:
            yield item
            self.n += 1
            now = time.monotonic()
            if now - last >= self.interval:
                log.info(self._line(now - start))
                last = now
        log.info(self._line(time.monotonic() - start))

    def __len__(self) -> int:
        return self.total or 0


def progress(iterable: Iterable, desc: str, total: int | None = None, *, enabled: bool = True,
             interval: float = LOG_INTERVAL_S) -> Any:
    """Wrap a long loop: tqdm when stderr is a terminal, else a log line every `interval` s.

    `enabled=False` (e.g. on DDP ranks other than 0) returns the iterable untouched but
    still accepts `set_postfix`.
    """
    if not enabled:
        return _Quiet(iterable)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False)
    return LogProgress(iterable, desc, total, interval)


class _Quiet:
    def __init__(self, iterable: Iterable):
        self.iterable = iterable

    def set_postfix(self, **values: Any) -> None:
        pass

    def __iter__(self) -> Iterator:
        return iter(self.iterable)
