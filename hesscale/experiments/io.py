"""Results on disk and progress on screen, shared by the experiments."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch


def atomic_write_json(path: str | Path, data) -> None:
    """Write JSON so that a reader (or a rerun after a kill) never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultFileError(RuntimeError):
    """A results or checkpoint file that cannot be read (malformed, foreign or hostile)."""


def read_json(path: str | Path, what: str = "results file"):
    """A JSON file written by :func:`atomic_write_json`; a malformed one raises
    :class:`ResultFileError` naming it and saying how to recompute it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultFileError(
            f"{path}: not a readable {what} ({err}); delete it to compute it again"
        ) from err


def environment_record() -> dict:
    """What produced a result: machine, versions, threads, device."""
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
