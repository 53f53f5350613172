"""A thin layer over Orbax: one CheckpointManager per run that keeps the latest N saves and the best one.

A run's checkpoint directory holds ``<step>/`` folders, each with two items, ``state`` (the train state pytree) and
``meta`` (JSON: the config, the data position, the model section), plus Orbax's ``metrics`` for the saves made after
an evaluation. Orbax's preservation policies keep the newest ``keep`` saves and the one with the highest PGD accuracy
(the earliest of equals). Orbax writes into a temporary directory and renames it on commit, so a process killed
mid-save leaves the previous checkpoints intact. Shapes are checked against Orbax's own metadata of the saved arrays.

Runs written before this layout (``latest/<step>`` and ``best/<step>`` folders) still load for evaluation, export and
as teachers; resuming their training is refused with a message.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mmard_jax import storage

BEST_METRIC = "pgd_acc"
LEGACY_SUBDIRS = ("best", "latest")  # the two-manager layout of earlier versions


class IncompatibleCheckpointError(ValueError):
    """A checkpoint whose model or shapes differ from the current run's."""


def shape_signature(tree) -> dict[str, list[int]]:
    """{'path/to/leaf': shape} for every array (or array metadata) leaf of a pytree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): list(getattr(leaf, "shape", np.shape(leaf))) for path, leaf in flat}


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


def _best_rank(metrics: dict) -> tuple[float, int]:
    """Orders saves by PGD accuracy, the earlier of two equal ones ranking higher."""
    return metrics[BEST_METRIC], -metrics["step"]


def _manager(directory: epath.Path, *, keep: int | None = None, async_save: bool = False) -> ocp.CheckpointManager:
    """A manager for ``directory``; read-only when ``keep`` is None."""
    if keep is None:
        options = ocp.CheckpointManagerOptions(read_only=True)
    else:
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(n=keep),
                ocp.checkpoint_managers.BestN(get_metric_fn=_best_rank, n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            best_fn=_best_rank,  # makes Orbax write each save's metrics, read back by _best_step
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def _best_step(manager: ocp.CheckpointManager) -> int | None:
    """The save with the best metrics (None when no save has any)."""
    ranked = [(_best_rank(m), step) for step in manager.all_steps() if (m := manager.metrics(step))]
    return max(ranked)[1] if ranked else None


def saved_signature(manager: ocp.CheckpointManager, step: int) -> dict[str, list[int]]:
    """The shapes of a save's {'params', 'batch_stats'}, from Orbax's metadata of the stored arrays."""
    saved = manager.item_metadata(step)["state"]
    return shape_signature({"params": saved["params"], "batch_stats": saved.get("batch_stats") or {}})


def check_shapes(manager: ocp.CheckpointManager, step: int, expected: dict, where, model=None) -> None:
    """IncompatibleCheckpointError listing the differences when the saved shapes are not ``expected``."""
    problems = signature_mismatch(expected, saved_signature(manager, step))
    if problems:
        raise IncompatibleCheckpointError(
            f"checkpoint {where} does not fit this run (saved model: {model or '?'}):\n  "
            + "\n  ".join(problems)
            + "\nUse a fresh --workdir, or the config the checkpoint was made with."
        )


class RunCheckpoints:
    """The checkpoints of one training run: the newest ``keep`` saves and the best evaluated one."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        self.directory = storage.path(directory)
        if any((self.directory / sub).is_dir() for sub in LEGACY_SUBDIRS):
            raise IncompatibleCheckpointError(
                f"{self.directory} holds checkpoints in the layout of an earlier version (latest/, best/); they load "
                "for evaluation, export and as a teacher, but their training cannot be resumed. Use a fresh --workdir."
            )
        self.manager = _manager(self.directory, keep=keep, async_save=async_save)

    def save(self, step: int, state, meta: dict, evaluation: dict | None = None) -> None:
        """Saves (asynchronously when configured); ``evaluation`` ({'pgd_acc': ...}) ranks it for the best save.

        A repeated step is ignored."""
        if self.manager.latest_step() == step:
            return
        metrics = {**evaluation, "step": step} if evaluation else None
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, metrics=metrics)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def read_meta(self, which: str = "latest") -> dict | None:
        """The metadata of the newest ('latest') or best ('best') save, or None when there is none."""
        step = self.manager.latest_step() if which == "latest" else _best_step(self.manager)
        return None if step is None else _read_meta(self.manager, step)

    def restore_latest(self, abstract_state, expected_signature: dict):
        """(state, meta) of the newest save, placed like ``abstract_state``; None when the run is new.

        Raises IncompatibleCheckpointError when the saved parameter shapes differ from ``expected_signature``.
        """
        step = self.manager.latest_step()
        if step is None:
            return None
        meta = _read_meta(self.manager, step)
        check_shapes(self.manager, step, expected_signature, self.directory / str(step), meta.get("model"))
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored.state, meta

    def wait(self) -> None:
        """Blocks until every asynchronous save has been committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def checkpoint_dir(run_dir: str | os.PathLike) -> epath.Path:
    """Where a run directory keeps its checkpoints: ``run_dir/checkpoints`` (training runs, imports) or itself."""
    run_dir = storage.path(run_dir)
    nested = run_dir / "checkpoints"
    return nested if nested.is_dir() else run_dir


def _candidates(directory: epath.Path, which: str) -> list[tuple[epath.Path, str]]:
    """(manager directory, 'best' | 'newest' save in it) to try in order: the current layout, or the legacy one
    (whose best/ folder holds just the best save)."""
    legacy = [directory / sub for sub in LEGACY_SUBDIRS if (directory / sub).is_dir()]
    if legacy:
        return [(path, "newest") for path in legacy if which == "best" or path.name == "latest"]
    return [(directory, "best"), (directory, "newest")] if which == "best" else [(directory, "newest")]


def read_run_meta(run_dir: str | os.PathLike) -> dict | None:
    """The metadata of a run directory's newest save (model config, ...); None if it has none."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return None
    for path, _ in _candidates(directory, "newest"):
        manager = _manager(path)
        try:
            step = manager.latest_step()
            if step is not None:
                return _read_meta(manager, step)
        finally:
            manager.close()
    return None


def write_variables(run_dir: str | os.PathLike, variables: dict, meta: dict) -> epath.Path:
    """Writes network variables as step 0 of ``run_dir/checkpoints``, the layout :func:`load_variables` and a
    teacher checkpoint setting read. Returns the checkpoint directory."""
    directory = storage.path(run_dir) / "checkpoints"
    state = {"params": variables["params"], "batch_stats": variables.get("batch_stats") or {}}
    checkpoints = RunCheckpoints(directory, keep=1, async_save=False)
    try:
        checkpoints.save(0, state, {**meta, "step": 0})
    finally:
        checkpoints.close()
    return directory


def _host_target(manager: ocp.CheckpointManager, step: int):
    """A restore target of host (NumPy) arrays with the saved shapes: whatever the device topology of the run that
    saved it (say a 2-process or TPU-pod run), a checkpoint then loads into any process, to be placed by the caller."""
    saved = manager.item_metadata(step)["state"]
    return jax.tree.map(lambda leaf: np.empty(leaf.shape, leaf.dtype), saved)


def load_variables(run_dir: str | os.PathLike, which: str, expected_signature: dict | None = None) -> tuple[dict, dict]:
    """(variables, meta) of a run's 'best' or 'last' save: variables = {'params', 'batch_stats'} as NumPy arrays.

    ``run_dir`` is a checkpoint directory of ours. 'best' falls back to the newest save when no save was evaluated.
    """
    directory = storage.path(run_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at '{directory}'")
    tried = []
    for path, kind in _candidates(directory, which):
        tried.append(f"{kind} in {path}")
        manager = _manager(path)
        try:
            step = _best_step(manager) if kind == "best" else manager.latest_step()
            if step is None:
                continue
            meta = _read_meta(manager, step)
            if expected_signature is not None:
                check_shapes(manager, step, expected_signature, path / str(step), meta.get("model"))
            target = _host_target(manager, step)
            state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        finally:
            manager.close()
        variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {}) or {}}
        return variables, meta
    raise FileNotFoundError(f"no checkpoint under '{directory}' (looked for {'; '.join(tried)})")
