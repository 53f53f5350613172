"""The official CIFAR archive source without the internet: a local HTTP server plays the download site.

Every failure must raise an exception that `python -m mmard_jax.main` turns into one `error:` message
and exit status 2 (ValueError / FileNotFoundError), name the fix, and leave no partial file behind.
"""

import hashlib
import http.server
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from mmard_jax import config as config_lib
from mmard_jax.config import base_config
from mmard_jax.data import sources

REPO = Path(__file__).resolve().parents[1]
FILENAME = "cifar-10-python.tar.gz"
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _fake_cifar10(seed=0, per_file=2):
    """(tar.gz bytes in the official cifar-10-python layout, expected train images, expected test labels)."""
    spec = sources.archive_spec("cifar10")
    rng = np.random.default_rng(seed)
    buffer, train_images, test_labels = io.BytesIO(), [], None
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for member in spec.train_members + spec.test_members:
            images = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, 10, per_file)]
            data = images.transpose(0, 3, 1, 2).reshape(per_file, 3072)
            payload = pickle.dumps({b"data": data, b"labels": labels}, protocol=3)
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
            if member in spec.train_members:
                train_images.append(images)
            else:
                test_labels = labels
    return buffer.getvalue(), np.concatenate(train_images), np.asarray(test_labels)


ARCHIVE, TRAIN_IMAGES, TEST_LABELS = _fake_cifar10()


class _Site(http.server.BaseHTTPRequestHandler):
    """GET /<route>/<file>: ok, wrong (other bytes), truncated (half the body), hang, error500; else 404."""

    timeout = 5  # a stuck client cannot hold a handler thread longer

    def do_GET(self):
        route = self.path.strip("/").split("/")[0]
        if route == "ok":
            self._send(ARCHIVE)
        elif route == "wrong":
            self._send(ARCHIVE[::-1])
        elif route == "truncated":
            self._send(ARCHIVE, stop=len(ARCHIVE) // 2)
        elif route == "hang":
            self._send(ARCHIVE, stop=10)
            self.server.release.wait(5)
        elif route == "error500":
            self.send_error(500)
        else:
            self.send_error(404)

    def _send(self, body, stop=None):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:stop])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def site():
    """Base URL of the local site; the server and its thread stop at teardown."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Site)
    server.release = threading.Event()
    server.handle_error = lambda *args: None  # a client that hung up is not a test failure
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def fake_official(monkeypatch):
    """The fake archive's digests become the official ones; downloads go to a closed port unless a test says."""
    spec = sources.archive_spec("cifar10")
    assert spec.url == OFFICIAL_URL
    monkeypatch.setitem(
        sources.CIFAR_ARCHIVES,
        "cifar10",
        spec._replace(sha256=hashlib.sha256(ARCHIVE).hexdigest(), md5=hashlib.md5(ARCHIVE).hexdigest()),
    )
    monkeypatch.delenv(sources.CACHE_ENV, raising=False)
    monkeypatch.setenv(sources.MIRROR_ENV, _closed_port_url())  # nothing here may reach the internet


def _cfg(cache, **overrides):
    cfg = base_config().data
    cfg.archive_dir = str(cache)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _load_error(cfg, expected_type=sources.DataUnavailableError):
    with pytest.raises(expected_type) as info:
        sources.load_dataset(cfg)
    assert isinstance(info.value, (ValueError, FileNotFoundError))  # what main() turns into exit status 2
    return str(info.value)


def _files(folder):
    return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).exists() else []


def _assert_fix_named(message, path):
    assert OFFICIAL_URL in message and f"-o {path} " in message and "curl" in message


# ----------------------------------------------------------------------------------------------
# Defaults
# ----------------------------------------------------------------------------------------------


def test_cifar_configs_use_the_archive_by_default(tmp_path, monkeypatch):
    data = base_config().data
    assert data.source == "cifar_archive" and data.download is True and data.archive_dir == ""
    assert sources.default_archive_dir() == os.path.expanduser(os.path.join("~", ".cache", "mmard_jax"))
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path))
    assert sources.default_archive_dir() == str(tmp_path)
    monkeypatch.setenv(sources.MIRROR_ENV, "https://mirror.example/cifar/")
    assert sources.archive_url(sources.archive_spec("cifar10")) == f"https://mirror.example/cifar/{FILENAME}"


def test_validate_names_data_name_for_the_archive_source():
    config = base_config()
    config.data.name = "mnist"
    with pytest.raises(ValueError, match=r"config\.data\.name.*cifar10, cifar100"):
        config_lib.validate(config)


# ----------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------


def test_download_then_load_from_cache(tmp_path, site, monkeypatch):
    monkeypatch.setenv(sources.MIRROR_ENV, f"{site}/ok/")
    cache = tmp_path / "cache"
    dataset = sources.load_dataset(_cfg(cache))
    assert _files(cache) == [FILENAME] and (cache / FILENAME).read_bytes() == ARCHIVE
    np.testing.assert_array_equal(dataset.train.images, TRAIN_IMAGES)
    np.testing.assert_array_equal(dataset.test.labels, TEST_LABELS)
    # The cached copy is used from then on: the site is not asked again.
    monkeypatch.setenv(sources.MIRROR_ENV, _closed_port_url())
    np.testing.assert_array_equal(sources.load_dataset(_cfg(cache)).test.labels, TEST_LABELS)


def test_cache_env_sets_the_default_folder(tmp_path, site, monkeypatch):
    monkeypatch.setenv(sources.MIRROR_ENV, f"{site}/ok")
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "env_cache"))
    sources.load_dataset(_cfg(""))
    assert _files(tmp_path / "env_cache") == [FILENAME]


def test_progress_bar_shows_bytes(tmp_path, site, capsys):
    spec = sources.archive_spec("cifar10")
    dest = tmp_path / FILENAME
    sources.download_archive(f"{site}/ok/{FILENAME}", dest, sha256=spec.sha256, md5=spec.md5, progress=True)
    err = capsys.readouterr().err
    assert FILENAME in err and "100%" in err and "B/s" in err
    assert dest.read_bytes() == ARCHIVE


def test_no_network(tmp_path):
    url = os.environ[sources.MIRROR_ENV]  # a closed port: connection refused
    message = _load_error(_cfg(tmp_path / "cache"))
    assert f"could not download {url}/{FILENAME}" in message and "offline" in message
    _assert_fix_named(message, tmp_path / "cache" / FILENAME)
    assert _files(tmp_path / "cache") == []


@pytest.mark.parametrize("route,status", [("missing", "HTTP 404"), ("error500", "HTTP 500")])
def test_http_error(tmp_path, site, monkeypatch, route, status):
    monkeypatch.setenv(sources.MIRROR_ENV, f"{site}/{route}")
    message = _load_error(_cfg(tmp_path))
    assert status in message and sources.MIRROR_ENV in message
    _assert_fix_named(message, tmp_path / FILENAME)
    assert _files(tmp_path) == []


def test_connection_dropped_mid_file(tmp_path, site, monkeypatch):
    monkeypatch.setenv(sources.MIRROR_ENV, f"{site}/truncated")
    message = _load_error(_cfg(tmp_path))
    # Python's http.client may report the short body itself (IncompleteRead) or return it short.
    assert "stopped after" in message or "IncompleteRead" in message
    _assert_fix_named(message, tmp_path / FILENAME)
    assert _files(tmp_path) == []


def test_stalled_server_times_out(tmp_path, site, monkeypatch):
    monkeypatch.setenv(sources.MIRROR_ENV, f"{site}/hang")
    monkeypatch.setattr(sources, "READ_TIMEOUT_S", 0.3)
    message = _load_error(_cfg(tmp_path))
    assert "no answer within 0.3 s" in message
    assert _files(tmp_path) == []


def test_download_with_wrong_digests_is_deleted_unread(tmp_path, site, monkeypatch):
    monkeypatch.setenv(sources.MIRROR_ENV, f"{site}/wrong")
    message = _load_error(_cfg(tmp_path), sources.ArchiveDigestError)
    assert "not the official archive" in message and "deleted unread" in message
    _assert_fix_named(message, tmp_path / FILENAME)
    assert _files(tmp_path) == []


def test_interrupted_download_leaves_nothing(tmp_path, site, monkeypatch):
    monkeypatch.setenv(sources.MIRROR_ENV, f"{site}/ok")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "_write", interrupt)
    with pytest.raises(KeyboardInterrupt):
        sources.load_dataset(_cfg(tmp_path))
    assert _files(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# What is already in the cache folder
# ----------------------------------------------------------------------------------------------


def _wrong_archive(folder):
    """A file where the archive belongs, with a pickle that would create a marker file if ever unpickled."""

    class Marker:
        def __reduce__(self):
            return (open, (str(folder / "unpickled"), "w"))

    payload = pickle.dumps({b"data": Marker(), b"labels": [0]}, protocol=3)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    path = folder / FILENAME
    path.write_bytes(buffer.getvalue())
    return path


def test_wrong_cached_file_is_refused_without_download(tmp_path):
    path = _wrong_archive(tmp_path)
    message = _load_error(_cfg(tmp_path, download=False), sources.ArchiveDigestError)
    assert str(path) in message and "refusing to unpickle" in message and "Delete it" in message
    assert "--config.data.download=True" in message
    _assert_fix_named(message, path)
    assert _files(tmp_path) == [FILENAME]  # the user's file is left alone, and never unpickled


def test_wrong_cached_file_is_replaced_by_a_verified_download(tmp_path, site, monkeypatch):
    path = _wrong_archive(tmp_path)
    monkeypatch.setenv(sources.MIRROR_ENV, f"{site}/ok")
    dataset = sources.load_dataset(_cfg(tmp_path))
    np.testing.assert_array_equal(dataset.test.labels, TEST_LABELS)
    assert path.read_bytes() == ARCHIVE and _files(tmp_path) == [FILENAME]


def test_wrong_cached_file_stays_when_the_replacement_fails(tmp_path, site, monkeypatch):
    path = _wrong_archive(tmp_path)
    before = path.read_bytes()
    monkeypatch.setenv(sources.MIRROR_ENV, f"{site}/wrong")
    message = _load_error(_cfg(tmp_path), sources.ArchiveDigestError)
    _assert_fix_named(message, path)
    assert path.read_bytes() == before and _files(tmp_path) == [FILENAME]


def test_missing_file_without_download(tmp_path):
    message = _load_error(_cfg(tmp_path, download=False))
    assert "config.data.archive_dir" in message and "--config.data.download=True" in message
    _assert_fix_named(message, tmp_path / FILENAME)


def test_archive_dir_is_a_file(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    message = _load_error(_cfg(not_a_folder))
    assert f"config.data.archive_dir={not_a_folder} is a file" in message and sources.CACHE_ENV in message
    message = _load_error(_cfg(not_a_folder / "sub"))  # a folder below a file cannot be created
    assert f"cannot write a file in {not_a_folder / 'sub'}" in message and "--config.data.archive_dir" in message
    assert _files(tmp_path) == ["file"]


def test_archive_path_is_a_folder(tmp_path):
    (tmp_path / FILENAME).mkdir()
    message = _load_error(_cfg(tmp_path))
    assert f"{tmp_path / FILENAME} is a folder" in message
    _assert_fix_named(message, tmp_path / FILENAME)


# ----------------------------------------------------------------------------------------------
# TFDS never prepared (tfds is installed here without TensorFlow)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("explicit_dir", [True, False])
def test_tfds_never_prepared(tmp_path, monkeypatch, explicit_dir):
    # Through TFDS_DATA_DIR (data_dir '') tfds fails differently: KeyError "splits is empty".
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    message = _load_error(_cfg(tmp_path, source="tfds", data_dir=str(tmp_path) if explicit_dir else ""))
    for part in (
        f"config.data.data_dir={tmp_path}",
        "tfds build cifar10 --file_format=array_record",
        f"--data_dir {tmp_path}",
        "--config.data.source=cifar_archive",
    ):
        assert part in message
    assert _files(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# End to end: the command a new user types
# ----------------------------------------------------------------------------------------------


def test_main_without_network_prints_one_error_and_exits_2(tmp_path):
    cache = tmp_path / "empty"
    cache.mkdir()
    env = {**os.environ, sources.MIRROR_ENV: _closed_port_url(), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmard_jax.main",
            "--config",
            "configs/cifar10.py",
            "--workdir",
            str(tmp_path / "run"),
            f"--config.data.archive_dir={cache}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and output.count("error:") == 1
    _assert_fix_named(result.stderr, cache / FILENAME)
    assert _files(cache) == []
