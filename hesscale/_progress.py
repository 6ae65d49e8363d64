"""Progress bars on standard error: tqdm when installed, a plain counter otherwise."""

from __future__ import annotations

import sys


class _PlainProgress:
    """A fallback progress display when tqdm is not installed."""

    def __init__(self, total, desc, unit):
        self.total, self.desc, self.n = total, desc, 0

    def update(self, k=1):
        self.n += k
        print(f"\r{self.desc}: {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def set_postfix_str(self, text):
        pass

    def close(self):
        print(file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        print(file=sys.stderr)


def progress(total: int, desc: str, unit: str = "it"):
    """A progress bar (tqdm when available) on standard error."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
