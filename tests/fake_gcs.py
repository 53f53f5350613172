"""Runs ``python -m mmard_jax.main`` with ``gs://`` served from a local folder, offline, and fails on a stray path.

    python tests/fake_gcs.py ROOT -- --config configs/tiny.py --workdir gs://bucket/run

- ``gs://<bucket>/<key>`` is ``ROOT/<bucket>/<key>``: the fsspec protocol that etils.epath uses for ``gs://`` (when
  TensorFlow is absent, as here) is replaced by a local filesystem under ROOT; Orbax's TensorStore arrays, which would
  go to the real GCS service, are written to the same folder; Orbax's query of the bucket's settings answers "flat
  namespace", the default of a GCS bucket.
- Guards: ``open``, ``os.makedirs``, ``os.mkdir``, ``os.stat``, ``os.listdir`` and ``os.path.*`` raise when handed a
  ``gs:`` path, so a workdir path that skips epath (``os.path.join(workdir, ...)`` then ``open``) fails the run instead
  of quietly writing to a local folder named ``gs:``.
"""

from __future__ import annotations

import builtins
import functools
import os
import sys

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class StrayPathError(AssertionError):
    pass


def _is_gs(value) -> bool:
    try:
        return os.fspath(value).startswith(("gs:", b"gs:"))
    except TypeError:
        return False


def _guard(function):
    @functools.wraps(function)
    def guarded(*args, **kwargs):
        if args and _is_gs(args[0]):
            raise StrayPathError(f"{function.__qualname__}({args[0]!r}): a gs:// path reached the OS directly")
        return function(*args, **kwargs)

    return guarded


def install(root: str) -> None:
    """Serves gs:// from ``root`` and installs the guards (in this process)."""
    root = os.path.abspath(root)

    def local(path: str) -> str:
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return os.path.join(root, path[len(prefix) :])
        return path

    class FakeGCS(DirFileSystem):
        """'bucket/key' names (as gcsfs gives them) over the local folder ROOT."""

        protocol = ("gs", "gcs")

        def __init__(self, *args, finalize_on_close=None, **kwargs):
            super().__init__(path=root, fs=LocalFileSystem())

        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path) if not isinstance(path, str) else path
            for prefix in ("gs://", "gcs://"):
                if path.startswith(prefix):
                    return path[len(prefix) :].rstrip("/")
            return path.rstrip("/")

    fsspec.register_implementation("gcs", FakeGCS, clobber=True)
    fsspec.register_implementation("gs", FakeGCS, clobber=True)

    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils

    normalize = tensorstore_utils._normalize_path
    tensorstore_utils._normalize_path = lambda path: normalize(local(path))
    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False  # a bucket-settings query to the GCS service

    builtins.open = _guard(builtins.open)
    for module, names in (
        (os, ("makedirs", "mkdir", "stat", "listdir", "remove", "rename", "replace")),
        (os.path, ("exists", "isdir", "isfile", "getsize", "abspath", "realpath")),
    ):
        for name in names:
            setattr(module, name, _guard(getattr(module, name)))


if __name__ == "__main__":
    separator = sys.argv.index("--")
    install(sys.argv[1])
    from absl import app

    from mmard_jax import main

    app.run(main.main, argv=["mmard_jax.main", *sys.argv[separator + 1 :]], flags_parser=main.parse_flags)
