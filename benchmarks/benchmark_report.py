"""What every benchmark script does with its markdown report: print it, and write it where --out/--output says."""

from __future__ import annotations

from pathlib import Path


def publish(report: str, path: str | Path | None) -> None:
    """Prints ``report``; writes it to ``path`` too (parent folders created) unless ``path`` is empty."""
    print(report)
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report, encoding="utf-8")
