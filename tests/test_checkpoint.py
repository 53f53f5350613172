"""One Orbax manager per run: the latest N saves and the best evaluated one are kept; shapes come from Orbax."""

import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmard_jax import checkpoint as ckpt_lib


def variables(scale: float, width: int = 3) -> dict:
    return {"params": {"dense": {"kernel": np.full((2, width), scale, np.float32)}}, "batch_stats": {}}


def test_latest_n_and_the_best_save_are_kept(tmp_path):
    """PGD accuracies 0.1, 0.5, 0.3, 0.5, 0.2, 0.1 at steps 1-6, keep=2: steps 5 and 6 stay as the latest, step 2 as
    the best (the earlier of two equal accuracies); load_variables('best') reads it, 'last' reads step 6."""
    checkpoints = ckpt_lib.RunCheckpoints(tmp_path, keep=2, async_save=False)
    for step, accuracy in enumerate([0.1, 0.5, 0.3, 0.5, 0.2, 0.1], start=1):
        checkpoints.save(step, variables(step), {"step": step, "model": "m"}, {"pgd_acc": accuracy, "clean_acc": 1.0})
    checkpoints.save(7, variables(7), {"step": 7})  # a periodic save without an evaluation
    checkpoints.close()
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 6, 7]
    best, meta = ckpt_lib.load_variables(tmp_path, "best")
    assert meta["step"] == 2 and best["params"]["dense"]["kernel"][0, 0] == 2
    assert ckpt_lib.load_variables(tmp_path, "last")[1]["step"] == 7
    reopened = ckpt_lib.RunCheckpoints(tmp_path, keep=2, async_save=False)
    assert reopened.read_meta("best")["step"] == 2 and reopened.read_meta("latest")["step"] == 7
    reopened.close()


def test_best_falls_back_to_the_newest_save_without_evaluations(tmp_path):
    checkpoints = ckpt_lib.RunCheckpoints(tmp_path, keep=2, async_save=False)
    checkpoints.save(3, variables(3), {"step": 3})
    checkpoints.close()
    assert ckpt_lib.load_variables(tmp_path, "best")[1]["step"] == 3


def test_shapes_are_checked_against_orbax_metadata(tmp_path):
    checkpoints = ckpt_lib.RunCheckpoints(tmp_path, keep=2, async_save=False)
    checkpoints.save(1, variables(1, width=3), {"step": 1, "model": {"name": "mlp"}})
    checkpoints.close()
    expected = ckpt_lib.shape_signature(variables(0, width=4))
    with pytest.raises(
        ckpt_lib.IncompatibleCheckpointError,
        match=r"kernel'\]: checkpoint has shape \[2, 3\], "
        r"the model needs \[2, 4\]",
    ):
        ckpt_lib.load_variables(tmp_path, "best", expected)
    assert ckpt_lib.load_variables(tmp_path, "best", ckpt_lib.shape_signature(variables(0)))[1]["step"] == 1


def test_runs_in_the_earlier_two_folder_layout_still_load_but_do_not_resume(tmp_path):
    """Earlier versions kept latest/<step> and best/<step> with two managers."""
    for sub, steps in (("latest", (4, 5)), ("best", (2,))):
        manager = ocp.CheckpointManager(
            tmp_path / sub, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        )
        for step in steps:
            args = ocp.args.Composite(
                state=ocp.args.StandardSave(variables(step)), meta=ocp.args.JsonSave({"step": step})
            )
            manager.save(step, args=args)
        manager.wait_until_finished()
        manager.close()
    assert ckpt_lib.load_variables(tmp_path, "best")[1]["step"] == 2
    assert ckpt_lib.load_variables(tmp_path, "last")[1]["step"] == 5
    assert ckpt_lib.read_run_meta(tmp_path)["step"] == 5
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="earlier version"):
        ckpt_lib.RunCheckpoints(tmp_path)
