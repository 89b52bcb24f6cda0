"""Shared pieces of the benchmark scripts (run as ``python bench/<script>.py``, so this directory is on sys.path)."""

from __future__ import annotations

import platform
import re
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is empty on many Linux machines)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_section(path: Path, section: str, heading: str, title: str = "# Benchmarks") -> None:
    """Replace the section of ``path`` that starts with the line ``heading`` (up to the next ``## `` heading) by
    ``section``, or append it; a missing file starts with ``title``. Other sections are left alone."""
    path = Path(path)
    old = path.read_text() if path.exists() else title + "\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = section.rstrip("\n") + "\n\n"
    new = pattern.sub(lambda _: section, old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + section
    path.write_text(new.rstrip("\n") + "\n")
