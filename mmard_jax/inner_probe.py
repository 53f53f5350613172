"""Where each inner loss puts the training adversarial examples x' relative to the teacher's decision boundary.

MMARD's inner term (docs/method.md §3.1) is meant to drive x' toward the teacher's boundary. This probe checks it:
for a fixed batch of training examples, a teacher and a student, it runs each variant's inner maximisation exactly as
the train step does (`mmard_jax.train.adversarial_examples` with the `StepSpec` of `mmard_jax.train.step_spec`), then
measures at every x':

- the teacher's logit margin ``m = z_y − max_{j≠y} z_j`` (its signed distance to its own boundary, in logits) and |m|;
- whether the teacher misclassifies x' (m < 0), and KL(p_T(x) ‖ p_T(x'));
- whether the student (inference mode) misclassifies x', to see that the attack still attacks the student.

    python -m mmard_jax.inner_probe --config configs/mnist5k.py --teacher runs/mnist5k/teacher \
        --student runs/mnist5k/students/mmard init --out benchmarks/results/inner_probe.md

``--student`` takes one or more student run directories (their 'last' checkpoint, or ``--which best``) or ``init``
(the student as training initialises it). The report is a markdown table per student, and a PNG (box plots of the
teacher margin per variant) beside it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import importlib.util
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from mmard_jax import config as config_lib
from mmard_jax import losses, main, networks, parallel, train
from mmard_jax.attacks import example_keys
from mmard_jax.data import load_dataset
from mmard_jax.data.pipeline import epoch_permutation
from mmard_jax.networks import Network, inference_logits

NATURAL = "natural x (no attack)"
MEASURES = ("margin", "abs_margin", "teacher_error", "teacher_kl", "student_error")


# ----------------------------------------------------------------------------------------------------------------
# Variants: overrides of config.method (and of config.attack for the no-attack reference)
# ----------------------------------------------------------------------------------------------------------------
def variants(gammas=(1.0, 4.0, 16.0), boundaries=losses.BOUNDARY_TERMS) -> dict[str, dict[str, dict]]:
    """{label: {'method': overrides of config.method, 'attack': overrides of config.attack}}.

    The inner losses of docs/method.md §2 (CE of ARD/IAD, RSLAD, AdaAD), then MMARD's inner loss (on the AdaAD base)
    for each boundary term and γ; first the natural input itself as a reference.
    """
    chosen = {
        NATURAL: {"method": {"name": "adaad"}, "attack": {"steps": 0, "init": "none"}},
        "CE (ARD/IAD)": {"method": {"name": "ard"}},
        "RSLAD": {"method": {"name": "rslad"}},
        "AdaAD (γ=0)": {"method": {"name": "adaad"}},
    }
    for boundary in boundaries:
        for gamma in gammas:
            chosen[f"MMARD {boundary} γ={gamma:g}"] = {
                "method": {"name": "adaad", "mmard_inner": True, "gamma": float(gamma), "boundary": boundary}
            }
    return chosen


def _overridden(section, overrides: dict):
    section = copy.deepcopy(section)
    with section.unlocked():
        for field, value in overrides.items():
            setattr(section, field, value)
    return section


def variant_sections(config, variant: dict) -> tuple[Any, Any]:
    """(method section, attack section) of one variant: the config's, with the MMARD parts off unless overridden."""
    method = _overridden(config.method, {"mmard_inner": False, "mmard_outer": False, **variant["method"]})
    return method, _overridden(config.attack, variant.get("attack", {}))


def probe_spec(config, variant: dict, teacher: Network, num_classes: int) -> train.StepSpec:
    """The train step's `StepSpec` for one variant (built by `train.step_spec` from the variant's job plan)."""
    method_cfg, attack = variant_sections(config, variant)
    plan = config_lib.job_plan(
        method_cfg.name, f"students/{method_cfg.name}", config.student.model, method_cfg, attack, config.optim
    )
    return train.step_spec(train.Job(plan, "", teacher), config, num_classes, steps_per_epoch=1)


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------
def teacher_measurements(teacher_nat, teacher_adv, labels) -> dict[str, jax.Array]:
    """Per example: the teacher's margin at x' and its absolute value, whether it errs at x', KL(p_T(x) ‖ p_T(x'))."""
    margin = losses.margin(teacher_adv, labels)
    return {
        "margin": margin,
        "abs_margin": jnp.abs(margin),
        "teacher_error": (jnp.argmax(teacher_adv, -1) != labels).astype(jnp.float32),
        "teacher_kl": losses.kl_div(teacher_nat, teacher_adv),
    }


def probe_body(spec: train.StepSpec, variables, teacher_vars, images, labels, keys):
    """(measurements, x') of one batch, per device: augmentation and inner maximisation as in `train_step_body`."""
    keys = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    x = train.augment_images(spec, keys[:, 0], images)
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=None,
        key=None,
    )
    teacher_nat = lax.stop_gradient(inference_logits(spec.teacher, teacher_vars, x))
    x_adv = train.adversarial_examples(spec, state, teacher_vars, x, labels, keys[:, 1], teacher_nat)
    student_adv = inference_logits(spec.student, variables, x_adv)
    measures = teacher_measurements(teacher_nat, inference_logits(spec.teacher, teacher_vars, x_adv), labels)
    measures["student_error"] = (jnp.argmax(student_adv, -1) != labels).astype(jnp.float32)
    return measures, x_adv


def compiled_probe(spec: train.StepSpec, mesh):
    """jit(shard_map(`probe_body`)): variables replicated, the batch split over the mesh's data axis."""
    data = P(spec.axis_name)
    mapped = jax.shard_map(
        functools.partial(probe_body, spec),
        mesh=mesh,
        in_specs=(P(), P(), data, data, data),
        out_specs=(data, data),
        check_vma=False,
    )
    return jax.jit(mapped)


def probe_variant(run, student_vars, teacher_vars, images, labels, *, batch_size: int, seed: int):
    """(measurements {name: [N]}, x' [N, ...]) of ``run`` (a `compiled_probe`) over the examples, in batches of the
    training batch size. Example i draws its start (and augmentation) from ``fold_in(PRNGKey(seed), i)``, the same
    for every variant.
    """
    if len(labels) % batch_size:
        raise ValueError(f"{len(labels)} examples is not a multiple of the batch size {batch_size}")
    keys = example_keys(jax.random.PRNGKey(seed), jnp.arange(len(labels)))
    outputs = [
        jax.device_get(run(student_vars, teacher_vars, *(a[i : i + batch_size] for a in (images, labels, keys))))
        for i in range(0, len(labels), batch_size)
    ]
    measures = {name: np.concatenate([m[name] for m, _ in outputs]) for name in MEASURES}
    return measures, np.concatenate([x for _, x in outputs])


def summarize(measures: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean and quartiles of the margin and |margin|; teacher and student error rates; mean KL."""
    row = {}
    for name in ("margin", "abs_margin"):
        q25, q50, q75 = np.percentile(measures[name], [25, 50, 75])
        row.update({f"{name}_mean": measures[name].mean(), f"{name}_q25": q25, f"{name}_q50": q50, f"{name}_q75": q75})
    row.update({name: measures[name].mean() for name in ("teacher_error", "teacher_kl", "student_error")})
    return {name: float(value) for name, value in row.items()}


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def load_config(path: str):
    """``get_config()`` of a config file (configs/*.py)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def probe_examples(dataset, num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num_examples`` training examples in epoch 0's order (uint8 images, labels)."""
    train_split = dataset.train
    if num_examples > train_split.num_examples:
        raise ValueError(f"--num_examples {num_examples} exceeds the {train_split.num_examples} training examples")
    order = epoch_permutation(train_split.num_examples, seed, 0)[:num_examples]
    return np.asarray(train_split.images)[order], np.asarray(train_split.labels)[order]


def student_variables(config, dataset, student: str, which: str) -> dict:
    """A student run directory's variables, or ``'init'``: the variables training starts from (`train._train`)."""
    if student == "init":
        module = networks.build_module(config.student.model, dataset.num_classes, dtype=config.dtype)
        init_key, _ = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), False))
        return networks.init_variables(module, init_key, dataset.image_shape)
    network, _ = networks.load_network(
        config.student.model,
        student,
        num_classes=dataset.num_classes,
        image_shape=dataset.image_shape,
        dtype=config.dtype,
        which=which,
    )
    return network.variables


def teacher_network(config, dataset, teacher_dir: str) -> Network:
    """The teacher a distillation run of ``config`` would use, from a teacher run directory (`main.teacher_network`)."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.teacher.checkpoint = os.path.abspath(teacher_dir)
    plan = config_lib.job_plan(
        "teacher", "teacher", config.teacher.model, config.teacher.method, config.teacher.attack, config.teacher.optim
    )
    return main.teacher_network(config, plan, dataset, None, None, may_train=False)


def run_probe(
    config, teacher: Network, students: dict[str, dict], images, labels, chosen: dict, *, mesh, num_classes, seed
):
    """{student label: {variant label: measurements}} for every student and variant (``seed``: see `probe_variant`)."""
    results = {name: {} for name in students}
    for label, variant in chosen.items():
        run = compiled_probe(probe_spec(config, variant, teacher, num_classes), mesh)
        for name, variables in students.items():
            results[name][label] = probe_variant(
                run,
                variables,
                teacher.variables,
                images,
                labels,
                batch_size=config.optim.batch_size,
                seed=seed,
            )[0]
    return results


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
HEADER = (
    "| variant | margin mean | margin q25 / q50 / q75 | abs margin mean | abs margin q25 / q50 / q75 "
    "| teacher error | KL(p_T(x) ‖ p_T(x')) | student error |\n|---|---|---|---|---|---|---|---|"
)


def markdown_table(summaries: dict[str, dict[str, float]]) -> str:
    """One row per variant: margins in logits, error rates in %, KL in nats."""
    lines = [HEADER]
    for label, s in summaries.items():
        quartiles = [" / ".join(f"{s[f'{n}_q{q}']:.2f}" for q in (25, 50, 75)) for n in ("margin", "abs_margin")]
        lines.append(
            f"| {label} | {s['margin_mean']:.2f} | {quartiles[0]} | {s['abs_margin_mean']:.2f} | {quartiles[1]} "
            f"| {100 * s['teacher_error']:.1f} % | {s['teacher_kl']:.3f} | {100 * s['student_error']:.1f} % |"
        )
    return "\n".join(lines)


def plot_margins(results: dict[str, dict[str, dict]], path: str | os.PathLike) -> None:
    """Box plots of the teacher's margin at x', one panel per student, one box per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    fig, axes = plt.subplots(
        1, len(results), figsize=(6 * len(results), 0.45 * len(first) + 1.5), sharey=True, squeeze=False
    )
    for ax, (name, per_variant) in zip(axes[0], results.items(), strict=True):
        labels = list(per_variant)[::-1]
        ax.boxplot(
            [per_variant[v]["margin"] for v in labels], orientation="horizontal", showfliers=False, showmeans=True
        )
        ax.set_yticks(range(1, len(labels) + 1), labels)
        ax.axvline(0.0, color="red", lw=1)
        ax.set_xlabel("teacher margin z_y − max_{j≠y} z_j at x' (logits)")
        ax.set_title(f"student: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results, *, command: str, config, num_examples: int, png_name: str, notes=()) -> str:
    """The markdown report: how it was run, then one table per student."""
    attack = config.attack
    lines = [
        "# Inner-loss probe: where x' lies relative to the teacher's decision boundary",
        "",
        f"`{command}`",
        "",
        f"Run {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')} on {platform.node() or 'host'} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, JAX {jax.__version__} on "
        f"{jax.device_count()} {jax.default_backend()} device(s)).",
        "",
        f"{num_examples} training examples (the first of epoch 0's order, augmented as in training); every variant runs "
        f"the train step's inner maximisation (PGD-{attack.steps}, ε = {attack.eps:g}, α = {attack.step_size:g}, "
        "the method's start) in batches of the training batch size, each example with the same keys in every variant. "
        "Margin: the teacher's z_y − max_{j≠y} z_j at x' (logits; < 0: the teacher errs). KL in nats. "
        "Student error: the student, inference mode, misclassifies x'.",
        *(f"\n{note}" for note in notes),
    ]
    for name, per_variant in results.items():
        summaries = {label: summarize(measures) for label, measures in per_variant.items()}
        lines += ["", f"## Student: {name}", "", markdown_table(summaries)]
    lines += ["", f"![teacher margin at x' per variant]({png_name})", ""]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the config file the teacher and student were trained with")
    parser.add_argument("--teacher", required=True, help="the teacher run directory (e.g. runs/mnist5k/teacher)")
    parser.add_argument("--student", nargs="+", required=True, help="student run directories, or 'init'")
    parser.add_argument("--which", default="last", choices=("last", "best"), help="student checkpoint to read")
    parser.add_argument("--out", default="", help="markdown report path; the PNG is written beside it")
    parser.add_argument("--num_examples", type=int, default=1024)
    parser.add_argument("--gammas", default="1,4,16", help="comma-separated γ of the MMARD variants")
    parser.add_argument("--boundaries", default=",".join(losses.BOUNDARY_TERMS), help="comma-separated boundaries")
    parser.add_argument("--seed", type=int, default=None, help="keys and examples (default: config.seed)")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's header (repeatable)")
    return parser.parse_args(argv)


def main_cli(argv=None) -> str:
    """Runs the probe and writes the report (and its PNG); returns the report."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    config = load_config(args.config)
    main.use_default_host_devices(config)  # one XLA:CPU device per core, as training has: before JAX's backends start
    seed = config.seed if args.seed is None else args.seed
    dataset = load_dataset(config.data)
    mesh = parallel.make_mesh()
    teacher = teacher_network(config, dataset, args.teacher)
    students = {name: student_variables(config, dataset, name, args.which) for name in args.student}
    images, labels = probe_examples(dataset, args.num_examples, seed)
    chosen = variants(
        tuple(float(g) for g in args.gammas.split(",") if g), tuple(b for b in args.boundaries.split(",") if b)
    )
    results = run_probe(
        config, teacher, students, images, labels, chosen, mesh=mesh, num_classes=dataset.num_classes, seed=seed
    )
    out = Path(args.out) if args.out else None
    png = out.with_suffix(".png") if out else Path("inner_probe.png")
    command = "python -m mmard_jax.inner_probe " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = report(results, command=command, config=config, num_examples=len(labels), png_name=png.name, notes=args.note)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        plot_margins(results, png)
    return text


if __name__ == "__main__":
    main_cli()
