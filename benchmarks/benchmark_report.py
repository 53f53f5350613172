"""What benchmark scripts share: publishing the markdown report, and telling a quiet machine from a shared one."""

from __future__ import annotations

import os
import time
from pathlib import Path


def publish(report: str, path: str | Path | None) -> None:
    """Prints ``report``; writes it to ``path`` too (parent folders created) unless ``path`` is empty."""
    print(report)
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report, encoding="utf-8")


def load_threshold(cores: int) -> float:
    """The 1-minute load that other processes may put on a machine whose ``cores`` a benchmark uses."""
    return (os.cpu_count() or cores) - cores + 0.5


def wait_for_quiet(cores: int, limit: float) -> None:
    """Waits (at most ``limit`` seconds) until the 1-minute load falls to `load_threshold`: a run started right after
    another one (or a build) would otherwise be refused for that one's load, which takes minutes to decay."""
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] > load_threshold(cores) and time.monotonic() < deadline:
        time.sleep(5)


def load_contention(load_before, load_after, own_after: float, cores: int) -> str | None:
    """Why the machine was not quiet enough to trust a timing ratio, or None.

    A load average counts runnable threads, the benchmark's own included, so (1) the 1-minute load *before* it started
    must fit in the cores it does not use, with half a core to spare (threshold = CPUs - pinned cores + 0.5), and
    (2) so must the 1-minute load *after* minus ``own_after``, the cores the benchmark kept busy in its last minute.
    """
    threshold = load_threshold(cores)
    if load_before[0] > threshold:
        return f"contended: 1-minute load before {load_before[0]:.2f} > {threshold:.1f} (CPUs - pinned cores + 0.5)"
    if load_after[0] - own_after > threshold:
        return (
            f"contended: 1-minute load after {load_after[0]:.2f} minus this process's {own_after:.2f} busy cores "
            f"= {load_after[0] - own_after:.2f} > {threshold:.1f}"
        )
    return None


def format_load(load) -> str:
    return " / ".join(f"{value:.2f}" for value in load) + " (1 / 5 / 15 min)"
