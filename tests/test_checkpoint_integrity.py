"""Damaged checkpoints are never loaded silently: each save records a SHA-256 of its arrays, every restore checks it.

Resuming falls back to the newest intact save and moves damaged newer ones aside; evaluation, teachers and export
refuse a damaged save rather than read another step's weights.
"""

import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmard_jax import checkpoint as ckpt_lib
from mmard_jax import parallel
from mmard_jax.train import TrainState


def state(scale: float) -> dict:
    """A small state whose array (16 KiB of noise) Orbax cannot compress: a flipped byte lands in the data."""
    noise = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    return {"params": {"dense": {"kernel": noise * scale, "bias": np.full(3, scale, np.float32)}}, "batch_stats": {}}


SIGNATURE = ckpt_lib.shape_signature(state(1.0))


def abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def save_steps(directory, steps, evaluations=None) -> None:
    checkpoints = ckpt_lib.RunCheckpoints(directory, keep=len(steps), async_save=False)
    for step in steps:
        evaluation = {"pgd_acc": evaluations[step], "clean_acc": 1.0} if evaluations else None
        checkpoints.save(step, state(step), {"step": step}, evaluation)
    checkpoints.close()


def largest_state_file(folder: Path) -> Path:
    return max((p for p in (folder / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_byte(folder: Path) -> None:
    """Flips one bit in the middle of the largest file of a save's arrays (the array data itself)."""
    file = largest_state_file(folder)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def truncate(folder: Path) -> None:
    file = largest_state_file(folder)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def delete(folder: Path) -> None:
    largest_state_file(folder).unlink()


def break_meta(folder: Path) -> None:
    (folder / "meta" / "metadata").write_text('{"step": 2, "mod')


DAMAGES = {"flipped byte": flip_byte, "truncated file": truncate, "deleted file": delete}


def kernel(variables) -> np.ndarray:
    return np.asarray(variables["params"]["dense"]["kernel"])


def step_folders(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir())


# ----------------------------------------------------------------------------------------------------------
# The hash


def test_a_flipped_byte_loaded_silently_without_the_hash_and_is_refused_with_it(tmp_path, monkeypatch):
    """Orbax keeps no checksum of the arrays: a save made without the hash (as before it existed) loads the flipped
    byte as another value. The same flip in a save with the hash is refused, naming the step folder."""
    with monkeypatch.context() as patch:
        patch.setattr(ckpt_lib, "state_digest", lambda tree: None)
        save_steps(tmp_path / "unhashed", [1])
    flip_byte(tmp_path / "unhashed" / "1")
    silently_changed = kernel(ckpt_lib.load_variables(tmp_path / "unhashed", "last")[0])
    assert silently_changed.shape == (64, 64) and not np.array_equal(silently_changed, kernel(state(1)))

    save_steps(tmp_path / "hashed", [1])
    assert np.array_equal(kernel(ckpt_lib.load_variables(tmp_path / "hashed", "last")[0]), kernel(state(1)))
    flip_byte(tmp_path / "hashed" / "1")
    folder = tmp_path / "hashed" / "1"
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match=rf"checkpoint {folder}: the stored data differ"):
        ckpt_lib.load_variables(tmp_path / "hashed", "last")


def test_the_hash_survives_save_and_restore_of_a_replicated_train_state_and_sees_any_change(tmp_path):
    """A TrainState replicated over the 8 test devices, saved asynchronously, resumes with the recorded hash (a normal
    resume passes) and also loads as plain dicts for evaluation; a changed value, dtype or order of leaves, or a
    changed shape, changes the hash."""
    mesh = parallel.make_mesh()
    host = TrainState(
        step=np.int32(5),
        params=state(1)["params"],
        batch_stats={},
        opt_state=({"trace": state(2)["params"]}, {"count": np.int32(5)}),
        key=np.array([0, 7], np.uint32),
    )
    replicated = parallel.replicate(host, mesh)
    assert len(replicated.params["dense"]["kernel"].sharding.device_set) == 8
    digest = ckpt_lib.state_digest(replicated)
    assert digest == ckpt_lib.state_digest(host)  # one replica, read on the host, is the whole array

    checkpoints = ckpt_lib.RunCheckpoints(tmp_path, keep=2, async_save=True)
    checkpoints.save(5, replicated, {"step": 5})
    checkpoints.close()
    resumed = ckpt_lib.RunCheckpoints(tmp_path, keep=2, async_save=True)
    targets = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), replicated)
    restored, meta = resumed.restore_latest(targets, SIGNATURE)
    resumed.close()
    assert meta[ckpt_lib.DIGEST_KEY] == digest and ckpt_lib.state_digest(restored) == digest
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(restored), host))
    assert np.array_equal(kernel(ckpt_lib.load_variables(tmp_path, "last")[0]), kernel(state(1)))

    changed_value = host.replace(step=np.int32(6))
    swapped = host.replace(opt_state=({"trace": state(1)["params"]}, {"count": np.int32(5)}), params=state(2)["params"])
    other_dtype = host.replace(key=host.key.astype(np.int32))
    other_shape = host.replace(key=host.key.reshape(2, 1))
    variants = [ckpt_lib.state_digest(t) for t in (changed_value, swapped, other_dtype, other_shape)]
    assert len({digest, *variants}) == 5


# ----------------------------------------------------------------------------------------------------------
# Resuming


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_falls_back_to_the_newest_intact_save_and_moves_the_damaged_one_aside(tmp_path, caplog, damage):
    save_steps(tmp_path, [1, 2])
    DAMAGES[damage](tmp_path / "2")
    checkpoints = ckpt_lib.RunCheckpoints(tmp_path, keep=2, async_save=False)
    assert checkpoints.read_meta("latest")["step"] == 2  # its meta is intact: train.py checks it, then restores
    with caplog.at_level(logging.WARNING, logger=ckpt_lib.__name__):
        restored, meta = checkpoints.restore_latest(abstract(state(1)), SIGNATURE)
    assert meta["step"] == 1 and np.array_equal(kernel(restored), kernel(state(1)))
    warnings = [r.getMessage() for r in caplog.records if r.name == ckpt_lib.__name__]
    assert len(warnings) == 1 and f"checkpoint {tmp_path / '2'}" in warnings[0]
    assert f"Moved it to {tmp_path / 'corrupt-2-0'}" in warnings[0] and f"resuming from {tmp_path / '1'}" in warnings[0]
    assert step_folders(tmp_path) == ["1", "corrupt-2-0"] and checkpoints.latest_step() == 1

    # The run reaches step 2 again: that save is written (not skipped as a repeated step) and is what resumes next.
    checkpoints.save(2, state(20), {"step": 2})
    checkpoints.close()
    assert step_folders(tmp_path) == ["1", "2", "corrupt-2-0"]
    reopened = ckpt_lib.RunCheckpoints(tmp_path, keep=2, async_save=False)
    restored, meta = reopened.restore_latest(abstract(state(1)), SIGNATURE)
    reopened.close()
    assert meta["step"] == 2 and np.array_equal(kernel(restored), kernel(state(20)))


def test_a_broken_meta_falls_back_in_read_meta_too(tmp_path, caplog):
    """train.py reads the newest meta before restoring: a broken one is set aside there, not raised as a JSON error."""
    save_steps(tmp_path, [1, 2])
    break_meta(tmp_path / "2")
    checkpoints = ckpt_lib.RunCheckpoints(tmp_path, keep=2, async_save=False)
    with caplog.at_level(logging.WARNING, logger=ckpt_lib.__name__):
        assert checkpoints.read_meta("latest")["step"] == 1
    assert "JSONDecodeError" in caplog.text and f"checkpoint {tmp_path / '2'} cannot be read" in caplog.text
    assert step_folders(tmp_path) == ["1", "corrupt-2-0"]
    assert checkpoints.restore_latest(abstract(state(1)), SIGNATURE)[1]["step"] == 1
    checkpoints.close()


def test_no_intact_save_is_an_error_listing_each_and_moves_nothing(tmp_path):
    save_steps(tmp_path, [1, 2])
    flip_byte(tmp_path / "2")
    delete(tmp_path / "1")
    checkpoints = ckpt_lib.RunCheckpoints(tmp_path, keep=2, async_save=False)
    with pytest.raises(ckpt_lib.CorruptCheckpointError) as info:
        checkpoints.restore_latest(abstract(state(1)), SIGNATURE)
    checkpoints.close()
    message = str(info.value)
    assert message.startswith(f"no intact checkpoint in {tmp_path}")
    assert f"checkpoint {tmp_path / '2'}: the stored data differ" in message
    assert f"checkpoint {tmp_path / '1'} cannot be read (ValueError: " in message
    assert "Nothing was moved" in message and step_folders(tmp_path) == ["1", "2"]
    assert isinstance(info.value, ckpt_lib.IncompatibleCheckpointError)  # main: one "error:" line, exit status 2


def test_every_meta_broken_is_a_clear_error(tmp_path):
    save_steps(tmp_path, [1])
    break_meta(tmp_path / "1")
    checkpoints = ckpt_lib.RunCheckpoints(tmp_path, keep=2, async_save=False)
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match=rf"checkpoint {tmp_path / '1'} cannot be read \(JSON"):
        checkpoints.read_meta("latest")
    checkpoints.close()
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match=rf"checkpoint {tmp_path / '1'} cannot be read \(JSON"):
        ckpt_lib.read_run_meta(tmp_path)


def test_a_storage_failure_is_raised_as_it_is_and_moves_nothing(tmp_path, monkeypatch):
    """Only damaged files are set aside: an unreachable store says nothing about the save."""
    save_steps(tmp_path, [1, 2])
    checkpoints = ckpt_lib.RunCheckpoints(tmp_path, keep=2, async_save=False)

    def unavailable(*args, **kwargs):
        raise ValueError("UNAVAILABLE: the bucket did not answer")

    monkeypatch.setattr(checkpoints.manager, "restore", unavailable)
    with pytest.raises(ValueError, match="^UNAVAILABLE") as info:
        checkpoints.restore_latest(abstract(state(1)), SIGNATURE)
    assert not isinstance(info.value, ckpt_lib.CorruptCheckpointError)
    assert step_folders(tmp_path) == ["1", "2"]
    monkeypatch.undo()
    checkpoints.close()


# ----------------------------------------------------------------------------------------------------------
# Evaluation, teachers, export


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_best_save_is_refused_not_replaced(tmp_path, damage):
    """Step 1 is the best (PGD 0.9 against 0.2); damaged, it is refused rather than swapped for step 2's weights."""
    save_steps(tmp_path, [1, 2], evaluations={1: 0.9, 2: 0.2})
    assert ckpt_lib.load_variables(tmp_path, "best")[1]["step"] == 1
    DAMAGES[damage](tmp_path / "1")
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match=rf"checkpoint {tmp_path / '1'}[: ]"):
        ckpt_lib.load_variables(tmp_path, "best")
    assert ckpt_lib.load_variables(tmp_path, "last")[1]["step"] == 2  # the other save is untouched and intact
    assert step_folders(tmp_path) == ["1", "2"]


def test_a_damaged_last_save_is_refused(tmp_path):
    save_steps(tmp_path, [1, 2])
    truncate(tmp_path / "2")
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match=rf"checkpoint {tmp_path / '2'} cannot be read"):
        ckpt_lib.load_variables(tmp_path, "last")


def legacy_run(directory: Path, latest_steps) -> None:
    """The earlier two-manager layout: best/<2> and latest/<steps>, without hashes."""
    for sub, steps in (("latest", latest_steps), ("best", (2,))):
        manager = ocp.CheckpointManager(directory / sub, options=ocp.CheckpointManagerOptions(create=True))
        for step in steps:
            args = ocp.args.Composite(state=ocp.args.StandardSave(state(step)), meta=ocp.args.JsonSave({"step": step}))
            manager.save(step, args=args)
        manager.wait_until_finished()
        manager.close()


def test_a_damaged_legacy_best_is_read_from_its_copy_in_latest(tmp_path, caplog):
    legacy_run(tmp_path, latest_steps=(2, 3))
    delete(tmp_path / "best" / "2")
    with caplog.at_level(logging.WARNING, logger=ckpt_lib.__name__):
        variables, meta = ckpt_lib.load_variables(tmp_path, "best")
    assert meta["step"] == 2 and np.array_equal(kernel(variables), kernel(state(2)))
    assert f"checkpoint {tmp_path / 'best' / '2'} cannot be read" in caplog.text
    assert f"copy of step 2 in {tmp_path / 'latest'}" in caplog.text


def test_a_damaged_legacy_best_without_a_copy_is_refused(tmp_path):
    legacy_run(tmp_path, latest_steps=(3,))
    delete(tmp_path / "best" / "2")
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match=rf"checkpoint {tmp_path / 'best' / '2'} cannot be read"):
        ckpt_lib.load_variables(tmp_path, "best")
