"""Test set-up: 8 host CPU devices, set before JAX starts; the `slow` tests start first; temporary files stay under
pytest's own temporary folder."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Tests marked `slow` (minute-long end-to-end runs in subprocesses, no shared fixtures) run first, the others keep
    their order: with `pytest -n 2` a minute-long test started last would leave the other worker idle at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True, scope="session")
def temporary_files_under_pytests_folder(tmp_path_factory):
    """``tempfile``'s folder for the session is one under pytest's (which pytest prunes): tfds's
    ``DatasetInfo.initialize_from_bucket`` leaves an empty ``tmp*tfds`` folder in it at every builder construction
    when the data is not prepared, dozens per run otherwise left in /tmp."""
    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
    yield
    tempfile.tempdir = previous
