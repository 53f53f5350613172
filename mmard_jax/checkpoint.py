"""A thin layer over Orbax: one CheckpointManager per run that keeps the latest N saves and the best one.

A run's checkpoint directory holds ``<step>/`` folders, each with two items, ``state`` (the train state pytree) and
``meta`` (JSON: the config, the data position, the model section), plus Orbax's ``metrics`` for the saves made after
an evaluation. Orbax's preservation policies keep the newest ``keep`` saves and the one with the highest PGD accuracy
(the earliest of equals). Orbax writes into a temporary directory and renames it on commit, so a process killed
mid-save leaves the previous checkpoints intact. Shapes are checked against Orbax's own metadata of the saved arrays.

Integrity: Orbax stores the arrays without a checksum, so a flipped byte in a saved array loads silently with another
value. Every save therefore records in its meta (``state_sha256``) a SHA-256 of the state's array contents, computed
on the host before the state is handed to Orbax, and every restore recomputes it on the arrays it read
(:func:`state_digest`): a difference, like any file Orbax or TensorStore cannot read, raises
:class:`CorruptCheckpointError` naming the step folder. Saves made before this check (no ``state_sha256``) load
unchecked.

What happens to a damaged save depends on who reads it:

- Resuming (:meth:`RunCheckpoints.read_meta` / :meth:`RunCheckpoints.restore_latest`) falls back to the newest intact
  save, logs a warning naming each damaged newer save and why, and renames those to ``corrupt-<step>-<n>`` (a name
  Orbax does not read as a step), so the run saves that step again and the next resume does not meet them. When no
  save is intact nothing is moved and the error lists them all. Failures that say the storage could not be reached
  (permissions, network, memory) are raised as they are and move nothing.
- Evaluation, teachers and export (:func:`load_variables`) never replace the save asked for by another step's
  weights: a damaged one is refused. The one exception is the earlier layout, whose ``latest/`` folder may hold a copy
  of the ``best/`` save: that copy of the same step is read instead.

Runs written before this layout (``latest/<step>`` and ``best/<step>`` folders) still load for evaluation, export and
as teachers; resuming their training is refused with a message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mmard_jax import parallel, storage

BEST_METRIC = "pgd_acc"
LEGACY_SUBDIRS = ("best", "latest")  # the two-manager layout of earlier versions
DIGEST_KEY = "state_sha256"  # the meta entry holding the SHA-256 of the saved state's arrays
ASIDE_PREFIX = "corrupt-"  # damaged saves are renamed <ASIDE_PREFIX><step>-<n>
# TensorStore status codes that mean stored bytes are missing or do not decode. The others (UNAVAILABLE,
# PERMISSION_DENIED, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...) say the storage could not be read just now.
DAMAGE_CODES = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "INVALID_ARGUMENT")

logger = logging.getLogger(__name__)


class IncompatibleCheckpointError(ValueError):
    """A checkpoint whose model or shapes differ from the current run's."""


class CorruptCheckpointError(IncompatibleCheckpointError):
    """A save whose files cannot be read, or whose arrays differ from the ones that were saved."""


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


# ----------------------------------------------------------------------------------------------------------
# Content hash


def _leaf_name(path) -> tuple[str, ...]:
    """A leaf's path as plain names: the same for a dataclass field, a dict key or a list index of that name, so the
    state saved from a TrainState and the nested dicts Orbax restores without a target hash alike."""
    return tuple(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def _spans_processes(leaf) -> bool:
    """True for an array split over devices of other processes: no single host holds all of it."""
    return isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated


def state_digest(tree) -> str | None:
    """SHA-256 of a pytree's arrays: each leaf's path, dtype, shape and bytes, leaves in order of their paths.

    A changed value, dtype or shape, or two leaves swapping places, changes it; the container types do not (see
    :func:`_leaf_name`). The arrays are fetched with one ``jax.device_get``; a replicated array is read from one of
    its devices. None when an array is split across processes (no host could hash it whole).
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if any(_spans_processes(leaf) for _, leaf in flat):
        return None
    arrays = jax.device_get([leaf for _, leaf in flat])
    digest = hashlib.sha256()
    for name, array in sorted(zip((_leaf_name(path) for path, _ in flat), arrays, strict=True), key=lambda x: x[0]):
        array = np.ascontiguousarray(array)
        digest.update(json.dumps([name, array.dtype.name, array.shape]).encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def verify_digest(state, meta: dict, folder) -> None:
    """CorruptCheckpointError when ``state`` (as restored from ``folder``) does not hash to the digest its meta
    recorded at save time; saves without a digest (made before it was recorded) pass unchecked."""
    expected = meta.get(DIGEST_KEY)
    if expected is None:
        return
    found = state_digest(state)
    if found is not None and found != expected:
        raise CorruptCheckpointError(
            f"checkpoint {folder}: the stored data differ from what was saved (SHA-256 of the arrays {found}, "
            f"recorded at save time {expected}); its files were changed or damaged after the save"
        )


# ----------------------------------------------------------------------------------------------------------
# Reading saves


def _cause(err: BaseException) -> str:
    """``Type: first line`` of an exception, without the long TensorStore spec."""
    text = str(err).strip().split("\n")[0].split(" [tensorstore_spec=")[0]
    return f"{type(err).__name__}: {text[:300]}"


def _is_damage(err: Exception) -> bool:
    """True when ``err`` says the stored files are missing or undecodable (not that the storage was unreachable)."""
    if isinstance(err, FileNotFoundError | json.JSONDecodeError | UnicodeDecodeError | KeyError):
        return True
    return isinstance(err, ValueError) and str(err).startswith(DAMAGE_CODES)


@contextlib.contextmanager
def _reading(folder, *, every_error: bool) -> Iterator[None]:
    """Turns a failure to read the save in ``folder`` into one CorruptCheckpointError naming it (the original chained):
    every exception when ``every_error``, else only those that say its files are damaged (:func:`_is_damage`).
    IncompatibleCheckpointErrors pass unchanged."""
    try:
        yield
    except IncompatibleCheckpointError:
        raise
    except Exception as err:
        if not (every_error or _is_damage(err)):
            raise
        raise CorruptCheckpointError(f"checkpoint {folder} cannot be read ({_cause(err)})") from err


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


@contextlib.contextmanager
def _opened(directory: epath.Path) -> Iterator[ocp.CheckpointManager]:
    """A read-only manager for ``directory``, closed on exit; a save Orbax cannot list raises CorruptCheckpointError."""
    with _reading(directory, every_error=True):
        manager = _manager(directory)
    try:
        yield manager
    finally:
        manager.close()


def _read_meta(manager: ocp.CheckpointManager, step: int, folder) -> dict:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"checkpoint {folder}: its meta is a JSON {type(meta).__name__}, not an object")
    return meta


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


def _aside_path(directory: epath.Path, step: int) -> epath.Path:
    """``directory/corrupt-<step>-<n>`` with the smallest n not taken."""
    n = 0
    while (directory / f"{ASIDE_PREFIX}{step}-{n}").exists():
        n += 1
    return directory / f"{ASIDE_PREFIX}{step}-{n}"


class RunCheckpoints:
    """The checkpoints of one training run: the newest ``keep`` saves and the best evaluated one."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        self.directory = storage.path(directory)
        if any((self.directory / sub).is_dir() for sub in LEGACY_SUBDIRS):
            raise IncompatibleCheckpointError(
                f"{self.directory} holds checkpoints in the layout of an earlier version (latest/, best/); they load "
                "for evaluation, export and as a teacher, but their training cannot be resumed. Use a fresh --workdir."
            )
        with _reading(self.directory, every_error=False):  # Orbax reads every save's metrics here
            self.manager = _manager(self.directory, keep=keep, async_save=async_save)

    def save(self, step: int, state, meta: dict, evaluation: dict | None = None) -> None:
        """Saves (asynchronously when configured); ``evaluation`` ({'pgd_acc': ...}) ranks it for the best save.

        The meta records the state's :func:`state_digest`, computed before Orbax takes the state. A repeated step is
        ignored."""
        if self.manager.latest_step() == step:
            return
        digest = state_digest(state)
        if digest is not None:
            meta = {**meta, DIGEST_KEY: digest}
        metrics = {**evaluation, "step": step} if evaluation else None
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, metrics=metrics)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _folder(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def read_meta(self, which: str = "latest") -> dict | None:
        """The metadata of the newest ('latest') or the best ('best') save, or None when there is none.

        'latest' is the newest save whose meta reads; newer saves with a damaged meta are set aside as in
        :meth:`restore_latest` (which also checks the arrays). A damaged best save raises CorruptCheckpointError."""
        if which == "latest":
            return self._newest_intact(lambda step, folder: _read_meta(self.manager, step, folder))
        step = _best_step(self.manager)
        if step is None:
            return None
        with _reading(self._folder(step), every_error=True):
            return _read_meta(self.manager, step, self._folder(step))

    def restore_latest(self, abstract_state, expected_signature: dict):
        """(state, meta) of the newest intact save, placed like ``abstract_state``; None when the run is new.

        Damaged newer saves are set aside with a warning (see the module docstring). Raises
        IncompatibleCheckpointError when the saved parameter shapes differ from ``expected_signature``, and
        CorruptCheckpointError listing the saves when none is intact.
        """

        def restore(step: int, folder: epath.Path):
            meta = _read_meta(self.manager, step, folder)
            check_shapes(self.manager, step, expected_signature, folder, meta.get("model"))
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            state = self.manager.restore(step, args=args).state
            verify_digest(state, meta, folder)
            return state, meta

        return self._newest_intact(restore)

    def _newest_intact(self, load: Callable[[int, epath.Path], Any]):
        """``load(step, folder)`` of the newest save it reads without damage (None when there is no save).

        The damaged newer saves are set aside; when no save is intact, CorruptCheckpointError lists them all and
        nothing is moved."""
        damaged: list[tuple[int, CorruptCheckpointError]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            folder = self._folder(step)
            try:
                with _reading(folder, every_error=False):
                    result = load(step, folder)
            except CorruptCheckpointError as err:
                damaged.append((step, err))
                continue
            if damaged:
                self._set_aside(damaged, folder)
            return result
        if damaged:
            raise CorruptCheckpointError(
                f"no intact checkpoint in {self.directory}; every save is damaged:\n  "
                + "\n  ".join(str(err) for _, err in damaged)
                + "\nNothing was moved. Restore these folders from a copy, or use a fresh --workdir."
            )
        return None

    def _set_aside(self, damaged: list[tuple[int, CorruptCheckpointError]], resumed_from: epath.Path) -> None:
        """Renames each damaged save to ``corrupt-<step>-<n>`` (the first process does, the others wait), then
        re-reads the step list: the run saves those steps anew, and the next resume does not meet them."""
        parallel.barrier("checkpoints/damage-found")  # every process has read them before they move
        if jax.process_index() == 0:
            for step, err in damaged:
                folder, aside = self._folder(step), _aside_path(self.directory, step)
                try:
                    folder.rename(aside)
                except Exception as move_err:
                    raise CorruptCheckpointError(
                        f"{err}\nIt could not be moved aside to {aside} ({_cause(move_err)}); move or delete it by "
                        "hand, then run again."
                    ) from move_err
                logger.warning("%s.\nMoved it to %s; resuming from %s.", err, aside, resumed_from)
        parallel.barrier("checkpoints/set-aside")
        self.manager.reload()

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
    """The metadata of a run directory's newest save (model config, ...); None if it has none.

    A meta that cannot be read raises CorruptCheckpointError naming its folder."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return None
    for path, _ in _candidates(directory, "newest"):
        with _opened(path) as manager:
            step = manager.latest_step()
            if step is not None:
                with _reading(path / str(step), every_error=True):
                    return _read_meta(manager, step, path / str(step))
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


def _load_step(manager: ocp.CheckpointManager, step: int, folder, expected_signature: dict | None):
    """(variables, meta) of one save, its digest verified; any failure to read it raises CorruptCheckpointError."""
    with _reading(folder, every_error=True):
        meta = _read_meta(manager, step, folder)
        if expected_signature is not None:
            check_shapes(manager, step, expected_signature, folder, meta.get("model"))
        target = _host_target(manager, step)
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    verify_digest(state, meta, folder)
    return {"params": state["params"], "batch_stats": state.get("batch_stats", {}) or {}}, meta


def _legacy_copy(directory: epath.Path, path: epath.Path, step: int) -> epath.Path | None:
    """The earlier layout's latest/ folder when it holds a copy of best/'s save ``step``, else None."""
    latest = directory / "latest"
    return latest if path == directory / "best" and (latest / str(step)).is_dir() else None


def load_variables(run_dir: str | os.PathLike, which: str, expected_signature: dict | None = None) -> tuple[dict, dict]:
    """(variables, meta) of a run's 'best' or 'last' save: variables = {'params', 'batch_stats'} as NumPy arrays.

    ``run_dir`` is a checkpoint directory of ours. 'best' falls back to the newest save when no save was evaluated.
    A damaged save is refused (CorruptCheckpointError naming its folder), never replaced by another step's weights;
    in the earlier layout a damaged best/ save is read from latest/ when that holds the same step.
    """
    directory = storage.path(run_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at '{directory}'")
    tried = []
    for path, kind in _candidates(directory, which):
        tried.append(f"{kind} in {path}")
        with _opened(path) as manager:
            step = _best_step(manager) if kind == "best" else manager.latest_step()
            if step is None:
                continue
            try:
                return _load_step(manager, step, path / str(step), expected_signature)
            except CorruptCheckpointError as err:
                copy = _legacy_copy(directory, path, step)
                if copy is None:
                    raise
                logger.warning("%s.\nReading the copy of step %d in %s instead.", err, step, copy)
        with _opened(copy) as manager:
            return _load_step(manager, step, copy / str(step), expected_signature)
    raise FileNotFoundError(f"no checkpoint under '{directory}' (looked for {'; '.join(tried)})")
