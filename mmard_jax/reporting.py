"""What a user sees: metrics as JSONL and TensorBoard events, a progress bar, training curves and result tables."""

from __future__ import annotations

import io
import json
import os
import sys

import jax

from mmard_jax import storage

METRICS_FILE = "metrics.jsonl"


def import_tensorboardx():
    """tensorboardX (event files without TensorFlow), imported without PyTorch. Its writer imports torch when it is
    installed, only to accept torch tensors, and that took 2-3 s of every run's start-up (benchmarks/start_up.py); we
    pass Python numbers."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX expects
        try:
            import tensorboardX
        finally:
            del sys.modules["torch"]
    import tensorboardX

    return tensorboardX


class MetricsLog:
    """Appends {'kind', 'step', ...values} lines to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    Only process 0 writes; other processes get a log that discards everything.
    """

    def __init__(self, directory: str, *, tensorboard: bool = True):
        directory = storage.path(directory)
        self.path = directory / METRICS_FILE
        self.enabled = jax.process_index() == 0
        self._file = None
        self._tb = None
        if self.enabled:
            # A kill mid-write may have left half a record: the appender starts ours on a line of their own.
            self._file = storage.LineAppender(self.path)
            if tensorboard:
                tensorboardx = import_tensorboardx()
                storage.register_tensorboard_remote_writers()
                self._tb = tensorboardx.SummaryWriter(os.fspath(directory / "tensorboard"))

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in record.items():
                if name not in ("kind", "step") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{name}", value, int(step))

    def read(self, kind: str) -> list[dict]:
        """Records of one kind written so far (also by an earlier, resumed run), the last one per step."""
        return read_metrics(self.path, kind)

    def close(self) -> None:
        """Closes both outputs even when the first fails (a full disk); the first error is raised once."""
        file, self._file = self._file, None
        tb, self._tb = self._tb, None
        try:
            if file is not None:
                file.close()
        finally:
            if tb is not None:
                tb.close()


def _plain(value):
    try:
        return float(value) if not isinstance(value, (str, bool, int)) else value
    except (TypeError, ValueError):
        return str(value)


def read_metrics(path: str, kind: str) -> list[dict]:
    """Records of ``kind`` in a metrics.jsonl file; a step logged twice (before and after a resume) keeps its last."""
    path = storage.path(path)
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("kind") == kind:
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


class _NoBar:
    """No bar; ``write`` still prints (on process 0 only, so N processes do not print every line N times)."""

    def __init__(self, prints: bool = True):
        self.prints = prints

    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def write(self, text):
        if self.prints:
            print(text, file=sys.stderr, flush=True)

    def close(self):
        pass


def progress_bar(total: int, initial: int, description: str, *, enabled: bool = True):
    """A tqdm bar (steps, rate, ETA) on process 0; a stand-in without a bar elsewhere or when disabled."""
    if not enabled or jax.process_index() != 0:
        return _NoBar(prints=jax.process_index() == 0)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True)


def epoch_line(name: str, record: dict) -> str:
    """One line per epoch for the console."""
    parts = [f"{name} epoch {record['epoch']}"]
    for key in ("train_loss", "train_accuracy_adv", "train_accuracy_nat", "clean_acc", "pgd_acc", "lr"):
        if key in record:
            parts.append(f"{key}={record[key]:.4g}")
    return "  ".join(parts)


def plot_curves(histories: dict[str, list[dict]], path: str) -> None:
    """A PNG with training loss, clean accuracy and PGD accuracy per epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("train_loss", "training loss"), ("clean_acc", "clean accuracy"), ("pgd_acc", "PGD accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name, records in histories.items():
            points = [(r["epoch"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    storage.path(path).write_bytes(png.getvalue())


ATTACK_TITLES = {
    "clean": "Clean",
    "fgsm": "FGSM",
    "pgd": "PGD",
    "cw": "CW∞",
    "autoattack": "AutoAttack",
}


def results_markdown(results: dict[str, dict], *, title: str, notes: list[str] = ()) -> str:
    """A table in the papers' format: one row per model, accuracy (%) under each attack."""
    columns = [c for c in ATTACK_TITLES if any(c in r["accuracy"] for r in results.values())]
    lines = [f"## {title}", ""]
    lines.append("| model | " + " | ".join(ATTACK_TITLES[c] for c in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for name, result in results.items():
        cells = [f"{100 * result['accuracy'][c]:.2f}" if c in result["accuracy"] else "" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"- {note}" for note in notes)
    return "\n".join(lines) + "\n"


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """'10,20' -> (10, 20): trace the training steps taken from 10 up to 20; '' -> None. ValueError otherwise."""
    if not text.strip():
        return None
    try:
        start, stop = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"profile_steps must be 'start,stop' (two ints), got {text!r}") from None
    if not 0 <= start < stop:
        raise ValueError(f"profile_steps must satisfy 0 <= start < stop, got {text!r}")
    return start, stop


class StepProfiler:
    """Traces the training steps in ``[start, stop)`` with jax.profiler into ``directory``.

    The trace (``plugins/profile/<run>/*.xplane.pb`` and a Perfetto ``*.trace.json.gz``) opens in TensorBoard's profile
    plugin or at ui.perfetto.dev. A run resumed past ``start`` traces nothing.
    """

    def __init__(self, steps: str, directory):
        self.window = parse_profile_steps(steps)
        self.directory = directory
        self.active = False

    def before_step(self, step: int) -> None:
        """Called with the number of steps taken so far."""
        if self.window is not None and step == self.window[0]:
            jax.profiler.start_trace(os.fspath(self.directory), create_perfetto_trace=True)
            self.active = True

    def after_step(self, step: int, outputs) -> None:
        if self.active and step >= self.window[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def write_results(workdir, summary: dict, table: str, histories: dict[str, list[dict]]) -> None:
    """results.json, results.md and curves.png in ``workdir`` (process 0 only); prints the table."""
    if jax.process_index() != 0:
        return
    workdir = storage.path(workdir)
    (workdir / "results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (workdir / "results.md").write_text(table, encoding="utf-8")
    if any(histories.values()):
        plot_curves(histories, workdir / "curves.png")
    print(table, flush=True)
