"""A thin layer over Orbax: the latest N checkpoints plus the best one, with JSON metadata.

A run directory holds ``latest/<step>/`` (the newest ``keep`` saves) and ``best/<step>/`` (the one save with the
highest robust accuracy so far). Each save has two items: ``state`` (the train state pytree) and ``meta`` (JSON:
the config, the data position, a signature of the parameter shapes). Orbax writes into a temporary directory and
renames it on commit, so a process killed mid-save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mmard_jax import storage


class IncompatibleCheckpointError(ValueError):
    """A checkpoint whose model or shapes differ from the current run's."""


def shape_signature(tree) -> dict[str, list[int]]:
    """{'path/to/leaf': shape} for every array leaf: what must match for a checkpoint to be resumable."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): list(np.shape(leaf)) for path, leaf in flat}


def signature_mismatch(expected: dict, found: dict, limit: int = 5) -> list[str]:
    """Human-readable differences between two shape signatures (empty if they agree)."""
    problems = [f"missing in checkpoint: {k} {v}" for k, v in expected.items() if k not in found]
    problems += [f"unexpected in checkpoint: {k} {v}" for k, v in found.items() if k not in expected]
    problems += [
        f"{k}: checkpoint has shape {found[k]}, the model needs {v}"
        for k, v in expected.items()
        if k in found and list(found[k]) != list(v)
    ]
    return problems[:limit]


def _manager(directory: epath.Path, keep: int, async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(directory, options=options)


def _save_args(state, meta) -> ocp.args.Composite:
    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


class RunCheckpoints:
    """The latest-N and best checkpoints of one training run."""

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = storage.path(directory)
        self.latest = _manager(self.directory / "latest", keep, async_save)
        self.best = _manager(self.directory / "best", 1, async_save)

    def save(self, step: int, state, meta: dict) -> None:
        """Saves into latest/ (asynchronously when configured); a repeated step is ignored."""
        if self.latest.latest_step() != step:
            self.latest.save(step, args=_save_args(state, meta))

    def save_best(self, step: int, state, meta: dict) -> None:
        """Replaces best/ with this state (the caller decides that it is better)."""
        if self.best.latest_step() != step:
            self.best.save(step, args=_save_args(state, meta))

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def read_meta(self, which: str = "latest") -> dict | None:
        """The metadata of the newest save in ``which`` ('latest' or 'best'), or None when there is none."""
        return read_meta(getattr(self, which))

    def restore_latest(self, abstract_state, expected_signature: dict):
        """(state, meta) of the newest save, placed like ``abstract_state``; None when the run is new.

        Raises IncompatibleCheckpointError when the saved parameter shapes differ from ``expected_signature``.
        """
        step = self.latest.latest_step()
        if step is None:
            return None
        meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        check_signature(meta, expected_signature, self.directory / "latest" / str(step))
        restored = self.latest.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored.state, meta

    def wait(self) -> None:
        """Blocks until every asynchronous save has been committed."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        self.best.close()


def read_meta(manager: ocp.CheckpointManager) -> dict | None:
    step = manager.latest_step()
    if step is None:
        return None
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def check_signature(meta: dict, expected_signature: dict, where: str | os.PathLike) -> None:
    problems = signature_mismatch(expected_signature, meta.get("signature", {}))
    if problems:
        saved_model = meta.get("model", "?")
        raise IncompatibleCheckpointError(
            f"checkpoint {where} does not fit this run (saved model: {saved_model}):\n  "
            + "\n  ".join(problems)
            + "\nUse a fresh --workdir, or the config the checkpoint was made with."
        )


def _host_target(manager: ocp.CheckpointManager, step: int):
    """A restore target of host (NumPy) arrays with the saved shapes: whatever the device topology of the run that
    saved it (say a 2-process or TPU-pod run), a checkpoint then loads into any process, to be placed by the caller."""
    saved = manager.item_metadata(step)["state"]
    return jax.tree.map(lambda leaf: np.empty(leaf.shape, leaf.dtype), saved)


def checkpoint_dir(run_dir: str | os.PathLike) -> epath.Path:
    """Where a run directory keeps its checkpoints: ``run_dir/checkpoints`` (training runs, imports) or itself."""
    run_dir = storage.path(run_dir)
    nested = run_dir / "checkpoints"
    return nested if nested.is_dir() else run_dir


def read_run_meta(run_dir: str | os.PathLike) -> dict | None:
    """The metadata of a run directory's newest 'latest' save (model config, signature, ...); None if it has none."""
    path = checkpoint_dir(run_dir) / "latest"
    if not path.is_dir():
        return None
    manager = ocp.CheckpointManager(
        path, options=ocp.CheckpointManagerOptions(read_only=True), item_handlers={"meta": ocp.JsonCheckpointHandler()}
    )
    try:
        return read_meta(manager)
    finally:
        manager.close()


def write_variables(run_dir: str | os.PathLike, variables: dict, meta: dict) -> epath.Path:
    """Writes network variables as step 0 of ``run_dir/checkpoints``, the layout :func:`load_variables` and a
    teacher checkpoint setting read; the meta gets the shape signature. Returns the checkpoint directory."""
    directory = storage.path(run_dir) / "checkpoints"
    state = {"params": variables["params"], "batch_stats": variables.get("batch_stats") or {}}
    checkpoints = RunCheckpoints(directory, keep=1, async_save=False)
    try:
        checkpoints.save(0, state, {**meta, "step": 0, "signature": shape_signature(state)})
    finally:
        checkpoints.close()
    return directory


def load_variables(run_dir: str | os.PathLike, which: str, expected_signature: dict | None = None) -> tuple[dict, dict]:
    """(variables, meta) of a run's 'best' or 'last' checkpoint: variables = {'params', 'batch_stats'} as NumPy arrays.

    ``run_dir`` is a run directory of ours (holding latest/ and best/). 'best' falls back to 'last' when no best
    save exists (a run with no periodic evaluation).
    """
    run_dir = storage.path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at '{run_dir}'")
    subdirs = ["best", "latest"] if which == "best" else ["latest"]
    for sub in subdirs:
        path = run_dir / sub
        if not path.is_dir():
            continue
        manager = ocp.CheckpointManager(
            path,
            options=ocp.CheckpointManagerOptions(read_only=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )
        try:
            step = manager.latest_step()
            if step is None:
                continue
            meta = read_meta(manager)
            if expected_signature is not None:
                check_signature(meta, expected_signature, path / str(step))
            target = _host_target(manager, step)
            state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        finally:
            manager.close()
        variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {}) or {}}
        return variables, meta
    raise FileNotFoundError(f"no checkpoint under '{run_dir}' (looked in {', '.join(subdirs)})")
