"""Progress that reads well on a terminal AND in a log file.

tqdm redraws one line with carriage returns; written to a file (nohup, CI, `> run.log`) those
updates pile up on a single line. So: a tqdm bar when the stream is a terminal, otherwise plain
lines ("desc: 120/800 items (15%), 3.2 items/s, 38 s") every `every_s` seconds or 25% of the
work, plus one at the end. Both expose the tqdm subset xmodal uses: update, set_postfix, close,
and the context-manager protocol.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO


def is_terminal(stream: Optional[TextIO] = None) -> bool:
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class PlainProgress:
    """Periodic one-line progress for non-terminal streams."""

    def __init__(self, total: Optional[int], desc: str = "", unit: str = "it", stream: Optional[TextIO] = None,
                 every_s: float = 30.0, every_fraction: float = 0.25, initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.every_s, self.every_fraction = every_s, every_fraction
        self.n = self._start = int(initial)  # a resumed epoch starts part-way
        self.postfix = ""
        self.t0 = self._last_t = time.monotonic()
        self._last_n = self.n
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        frac_step = (self.total or 0) * self.every_fraction
        if now - self._last_t >= self.every_s or (frac_step and self.n - self._last_n >= frac_step):
            self._emit(now)

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def _emit(self, now: float) -> None:
        elapsed = max(now - self.t0, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        tail = f", {self.postfix}" if self.postfix else ""
        rate = (self.n - self._start) / elapsed
        print(f"{self.desc}: {done} {self.unit}{pct}, {rate:.1f} {self.unit}/s, {elapsed:.0f} s{tail}",
              file=self.stream, flush=True)
        self._last_t, self._last_n = now, self.n

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._last_n or self.n == self._start:
                self._emit(time.monotonic())

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs: Any) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> "_Silent":
        return self
    def __exit__(self, *exc) -> None: ...


def progress(total: Optional[int], desc: str = "", unit: str = "it", enabled: Optional[bool] = True,
             stream: Optional[TextIO] = None, leave: bool = True, initial: int = 0, **plain_kw: Any):
    """A tqdm bar on a terminal, PlainProgress lines elsewhere, nothing when `enabled` is False.

    `enabled=None` means: only on a terminal (the quiet default for library calls).
    """
    stream = sys.stderr if stream is None else stream
    if enabled is False or (enabled is None and not is_terminal(stream)):
        return _Silent()
    if is_terminal(stream):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave, file=stream, initial=initial)
    return PlainProgress(total, desc=desc, unit=unit, stream=stream, initial=initial, **plain_kw)
