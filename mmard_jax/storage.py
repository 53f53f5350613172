"""Where the product reads and writes: local folders and object stores (``gs://``, ``s3://``) alike, via etils.epath.

Every path under a workdir (checkpoints, metrics, TensorBoard events, results, curves, the teacher run, the compilation
cache, profiles) is built here, so ``--workdir gs://bucket/run`` on a Cloud TPU VM behaves like ``runs/x`` on a laptop.
Object stores cannot append to an object: :class:`LineAppender` appends to a local file but rewrites a remote one whole.
"""

from __future__ import annotations

import io
import os
from typing import IO

from etils import epath

REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")


def is_remote(location: str | os.PathLike) -> bool:
    return os.fspath(location).startswith(REMOTE_SCHEMES)


def path(location: str | os.PathLike) -> epath.Path:
    """An ``epath.Path`` for ``location``: a remote URI as it is, a local path absolute (Orbax refuses relative ones)."""
    text = os.fspath(location)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def ends_mid_line(file: epath.Path) -> bool:
    """True if ``file`` exists, is not empty and its last byte is not a newline (a write cut short by a kill)."""
    if not file.exists():
        return False
    with file.open("rb") as f:
        size = f.seek(0, io.SEEK_END)
        if size == 0:
            return False
        f.seek(size - 1)
        return f.read(1) != b"\n"


class LineAppender:
    """Appends lines to a text file; each :meth:`flush` makes what was written durable.

    Local: an open file in append mode. Remote: the object is read once and rewritten whole at every flush.
    """

    def __init__(self, file: epath.Path):
        self.file = file
        file.parent.mkdir(parents=True, exist_ok=True)
        start_on_new_line = ends_mid_line(file)
        self._remote = is_remote(file)
        self._lines: list[str] = []
        self._handle: IO[str] | None = None
        if self._remote:
            self._lines = [file.read_text(encoding="utf-8")] if file.exists() else []
        else:
            self._handle = open(file, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        if start_on_new_line:
            self.write("\n")

    def write(self, text: str) -> None:
        if self._handle is not None:
            self._handle.write(text)
        else:
            self._lines.append(text)

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()
        else:
            self.file.write_text("".join(self._lines), encoding="utf-8")

    def close(self) -> None:
        try:
            self.flush()
        finally:  # a failed flush (full disk) must not leave the file open
            if self._handle is not None:
                self._handle.close()
                self._handle = None


class _RemoteEventFile:
    """What tensorboardX's RecordWriter needs of a file (write, flush, close), on an epath object."""

    def __init__(self, location: str):
        self._file = epath.Path(location).open("wb")

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _RemoteEventFiles:
    """A tensorboardX writer factory for object-store URIs (tensorboardX's own needs google-cloud-storage / boto3)."""

    def open(self, location: str) -> _RemoteEventFile:
        return _RemoteEventFile(location)

    def directory_check(self, location: str) -> None:
        epath.Path(location).mkdir(parents=True, exist_ok=True)


def register_tensorboard_remote_writers() -> None:
    """Routes tensorboardX event files under ``gs://``/``s3://``/... through epath."""
    from tensorboardX import record_writer

    for scheme in REMOTE_SCHEMES:
        record_writer.register_writer_factory(scheme.split(":")[0], _RemoteEventFiles())
