"""Seconds per optimizer step of mmard_jax's train step vs an eager PyTorch twin of the same step (issue #13).

The JAX step is the one training runs: ``train.step_spec`` + ``train.make_train_step`` for a job of the run plan
``config.validate`` returns. The PyTorch twin (benchmarks/step_twin.py) computes the same step: same networks and
weights, same PGD, same inner and outer losses, SGD with momentum and weight decay. ``--check`` proves it: both
sides start from the same weights, batch and PGD start, and the loss and updated parameters must agree.

Modes:

- CPU comparison (default): JAX and PyTorch pinned to the same cores (``--cores``; PyTorch gets one thread per
  core, XLA:CPU sizes its pool from the process's affinity), compiled / warmed up, then timed in interleaved rounds
  (a JAX round, a PyTorch round, ...). The speed ratio is printed only when no other process took CPU (see
  `contention`). ``--setting cifar``: ResNet-18 student and ResNet-18 teacher on 32x32x3, batch 32, PGD-10 (ε 8/255,
  α 2/255), configs/cifar10.py's step as shipped; ``--setting mnist``: the demo's step (configs/mnist5k.py).
- ``--check``: the equivalence of the two steps (one float32 step from the same state): exact at test sizes; at
  full size with the attack off, and loosely as configured (PGD's sign(∇) turns rounding into whole steps of α on
  ~1 % of the pixels; see `NO_ATTACK`).
- ``--platform gpu|tpu|cpu``: the CIFAR-10 recipe (WRN-34-10 teacher -> ResNet-18 student, batch 128) in bfloat16
  and float32 on the accelerator, no PyTorch: img/s, MFU, peak device memory, largest batch that fits.
- ``--tiny``: any mode at test sizes (WRN-10-1 teacher, a small BN CNN student, 16x16 images, batch 8, PGD-2).

    PYTHONPATH=. python benchmarks/step_speed.py --settle 600     # both settings -> benchmarks/results/step_speed.md
    PYTHONPATH=. python benchmarks/step_speed.py --setting cifar --unroll 1 --devices 2 --output ''
    PYTHONPATH=. python benchmarks/step_speed.py --check --output benchmarks/results/step_speed_check.md
    PYTHONPATH=. python benchmarks/step_speed.py --platform gpu   # -> benchmarks/results/step_speed_gpu.md

Config fields can be overridden like mmard_jax.main's: ``--config.attack.unroll=10``. ``--settle`` waits for the
1-minute load to fall first (a run started right after another is refused for that one's load).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import gc
import importlib.util
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_twin  # noqa: E402
from benchmark_report import (  # noqa: E402
    cpu_times,
    format_load,
    format_steal,
    load_contention,
    model_convolutions,
    publish,
    wait_for_quiet,
)

from mmard_jax import compilations, parallel, train  # noqa: E402
from mmard_jax import config as config_lib  # noqa: E402
from mmard_jax.attacks import per_example_start  # noqa: E402
from mmard_jax.host_devices import default_host_devices, requested_host_devices  # noqa: E402
from mmard_jax.networks import Network, build_module, inference_logits, init_variables  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REEXEC_MARKER = "STEP_SPEED_REEXEC"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
METHODS = ("mmard", "rslad")
MIB = 2**20


# ----------------------------------------------------------------------------------------------------------------
# Command line and the process (before JAX starts)
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags, plus ``--config.a.b=value`` overrides collected in ``args.overrides``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="cifar,mnist", help="comma-separated: cifar, mnist")
    parser.add_argument("--method", default=",".join(METHODS), help="comma-separated: mmard, rslad")
    parser.add_argument("--check", action="store_true", help="compare one JAX step with one PyTorch step")
    parser.add_argument("--platform", choices=("cpu", "gpu", "tpu"), help="accelerator mode (no PyTorch side)")
    parser.add_argument("--tiny", action="store_true", help="test sizes: small models, batch 8, PGD-2, 16x16")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved JAX / PyTorch rounds after warm-up")
    parser.add_argument("--steps", type=int, help="timed steps per round (default: cifar 2, mnist 10, tiny 2)")
    parser.add_argument("--cores", help="CPU cores to pin both sides to, e.g. '0,1' (default: this process's)")
    parser.add_argument(
        "--devices",
        type=int,
        help="JAX devices (default: the product's: one per core, or what MMARD_JAX_HOST_DEVICES names)",
    )
    parser.add_argument("--unroll", type=int, help="config.attack.unroll (1 = rolled PGD loop)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="compute dtype (PyTorch: autocast; accelerators: only this one)",
    )
    parser.add_argument("--batch", type=int, help="global batch size (config.optim.batch_size)")
    parser.add_argument("--xla_flags", default="", help="extra XLA_FLAGS, e.g. '--xla_cpu_multi_thread_eigen=false'")
    parser.add_argument("--settle", type=float, default=0, help="seconds to wait at most for a quiet machine first")
    parser.add_argument("--peak_gflops", type=float, help="CPU peak to report %% of (default: from /proc/cpuinfo)")
    parser.add_argument("--peak_tflops", type=float, help="accelerator peak for MFU (default: the chip table)")
    parser.add_argument("--max_batch", type=int, help="largest batch tried by the doubling search (accelerators)")
    parser.add_argument("--output", help="markdown report path ('' = print only; default per mode)")
    args, rest = parser.parse_known_args(argv)
    bad = [item for item in rest if not item.startswith("--config.") or "=" not in item]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (config overrides are --config.field=value)")
    args.overrides = [item[len("--config.") :] for item in rest]
    args.methods = tuple(m.strip() for m in args.method.split(",") if m.strip())
    if args.platform and args.check:
        parser.error("--check compares against PyTorch on CPU; it does not combine with --platform")
    if args.devices is None:  # what `python -m mmard_jax.main` picks (mmard_jax/host_devices.py)
        cpu = args.platform in (None, "cpu")
        batch = args.batch or (8 if args.tiny else 32)
        chosen = requested_host_devices() or default_host_devices([batch], len(parse_cores(args.cores)))
        args.devices = chosen if cpu else 1
    return args


def parse_cores(text: str | None) -> set[int]:
    return set(os.sched_getaffinity(0)) if not text else {int(c) for c in text.split(",")}


def wanted_environment(args) -> dict[str, str]:
    """XLA_FLAGS (extra flags; on CPU the host device count) and JAX_PLATFORMS: JAX reads both when it starts."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    flags += [f for f in args.xla_flags.split() if f not in flags]
    if args.platform not in (None, "cpu"):
        return {"XLA_FLAGS": " ".join(flags)}
    return {"XLA_FLAGS": " ".join([*flags, f"{DEVICE_COUNT_FLAG}={args.devices}"]), "JAX_PLATFORMS": "cpu"}


def environment_suffices(args) -> bool:
    """In-process use (tests): the extra flags are set and JAX has enough devices of the right platform."""
    have = os.environ.get("XLA_FLAGS", "").split()
    platform_ok = args.platform not in (None, "cpu") or jax.default_backend() == "cpu"
    return all(f in have for f in args.xla_flags.split()) and platform_ok and jax.device_count() >= args.devices


def prepare_process(args, *, may_reexec: bool) -> None:
    """Pins the process to ``--cores`` and starts JAX with `wanted_environment`: as a script, by running itself again
    with it (every thread is then born pinned, and JAX reads the flags); in-process callers must have set it."""
    cores = parse_cores(args.cores)
    wanted = wanted_environment(args)
    pinned = cores == os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    if pinned and all(os.environ.get(key) == value for key, value in wanted.items()):
        return
    if may_reexec and not os.environ.get(REEXEC_MARKER):
        os.environ.update(wanted)
        os.environ[REEXEC_MARKER] = "1"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if not environment_suffices(args):
        raise RuntimeError(f"JAX must start with {wanted}; run this file as a script, or set them before JAX starts")


# ----------------------------------------------------------------------------------------------------------------
# The machine: load, CPU time, run-queue wait, resident memory, peak FLOP/s
# ----------------------------------------------------------------------------------------------------------------
def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_peak_gflops(cores: int, override: float | None = None) -> tuple[float, str]:
    """(peak FP32 GFLOP/s, how it was computed): cores x GHz x FLOPs/cycle, FLOPs/cycle = fp32 lanes of the widest
    FMA vector unit (avx512f: 16, avx2+fma: 8, else 4) x 2 FMA units x 2 FLOPs per FMA. GHz: /proc/cpuinfo 'cpu MHz'
    (the nominal clock under a hypervisor; turbo would raise the peak). XLA counts an FMA as 2 FLOPs too."""
    if override:
        return override, f"{override:g} GFLOP/s (--peak_gflops)"
    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
    ghz = float(info.get("cpu MHz", "0") or 0) / 1000
    peak = cores * ghz * lanes * 2 * 2
    isa = {16: "avx512f", 8: "avx2+fma", 4: "sse"}[lanes]
    return peak, (
        f"{cores} cores x {ghz:.2f} GHz x ({lanes} fp32 lanes ({isa}) x 2 FMA units x 2 FLOPs/FMA) = {peak:.0f} GFLOP/s"
    )


def read_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets the process's RSS high-water mark (Linux: ``5 > /proc/self/clear_refs``); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM (since the last reset), else getrusage's ru_maxrss (since the process started)."""
    kib = read_status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def runqueue_wait_seconds() -> float:
    """Seconds the threads of this process spent runnable but waiting for a CPU (/proc/self/task/*/schedstat)."""
    total = 0
    for task in Path("/proc/self/task").glob("*/schedstat"):
        try:
            total += int(task.read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


@dataclasses.dataclass
class Round:
    """One timed round of one side."""

    step_seconds: list[float]
    cpu_seconds: float  # process CPU time (all threads) during the round
    wait_seconds: float  # run-queue wait of the process's threads during the round
    peak_rss: int  # bytes: high-water mark during the round (the whole process)
    start_rss: int
    ended: float = 0.0  # time.monotonic() at its end


def timed_round(run_step, steps: int) -> Round:
    """Runs ``steps`` blocking steps; per-step wall times and the process's CPU, run-queue wait and memory."""
    reset_peak_rss()
    start_rss = (read_status_kib("VmRSS") or 0) * 1024
    wait, cpu = runqueue_wait_seconds(), time.process_time()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    cpu, wait = time.process_time() - cpu, runqueue_wait_seconds() - wait
    return Round(times, cpu, wait, peak_rss_bytes(), start_rss, time.monotonic())


def busy_cores(rounds: list[Round]) -> float:
    """Mean number of cores this process kept busy over ``rounds`` (CPU seconds / wall seconds)."""
    return sum(r.cpu_seconds for r in rounds) / max(sum(sum(r.step_seconds) for r in rounds), 1e-9)


def wait_share(rounds: list[Round], cores: int) -> float:
    """Run-queue wait as a share of the core-seconds the process was pinned to during ``rounds``."""
    return sum(r.wait_seconds for r in rounds) / max(sum(sum(r.step_seconds) for r in rounds) * cores, 1e-9)


def recent_busy_cores(rounds: list[Round], window: float = 60.0) -> float:
    """Cores this process kept busy over the rounds that ended in the last ``window`` seconds of the run (what the
    1-minute load average at its end mostly saw of it)."""
    last = max(r.ended for r in rounds)
    return busy_cores([r for r in rounds if r.ended >= last - window])


def contention(load_before, load_after, own_after: float, rounds: dict[str, list[Round]], cores: int) -> str | None:
    """Why the timings are not to be trusted, or None.

    A load average counts runnable threads, this benchmark's own included, so: (1) the 1-minute load *before* it
    started must fit in the cores it does not use, with half a core to spare (threshold = CPUs - pinned + 0.5);
    (2) so must the 1-minute load *after* minus ``own_after``, the cores this process kept busy in its last minute
    (`recent_busy_cores`); (3) during each side's
    rounds, another process taking our cores shows as our threads waiting on the run queue (> 10 % of the pinned
    core-seconds) *while* we used < 90 % of them. Neither sign alone suffices: a side that cannot fill its cores
    (eager Python between kernels, serial ops) has a low CPU share on a quiet machine, and a side that runs more
    threads than cores (2 host devices on 2 cores) waits on the run queue behind its own threads.
    """
    verdict = load_contention(load_before, load_after, own_after, cores)
    if verdict:
        return verdict
    for side, side_rounds in rounds.items():
        share, waited = busy_cores(side_rounds) / cores, wait_share(side_rounds, cores)
        if waited > 0.1 and share < 0.9:
            return (
                f"contended: during the {side} rounds the process got {share:.0%} of its cores and waited {waited:.0%}"
            )
    return None


# ----------------------------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------------------------
def config_file(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def apply_overrides(config, overrides: list[str]) -> None:
    """``a.b=value`` items: the value is a Python literal (or a plain string), cast to the field's type."""
    for item in overrides:
        path, _, text = item.partition("=")
        *parents, field = path.split(".")
        node = config
        for name in parents:
            node = getattr(node, name)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        current = getattr(node, field)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        setattr(node, field, value)


def make_tiny(config) -> None:
    """Test sizes: a WRN-10-1 teacher, a small BatchNorm CNN student, batch 8, 2 PGD steps that still reach ε."""
    config.teacher.model = config_lib.model_config("wide_resnet", depth=10, widen_factor=1)
    config.student.model = config_lib.model_config("cnn", widths=(8, 16), hidden=0, use_bn=True, downsample="stride")
    config.optim.batch_size = 8
    config.attack.steps = 2
    config.attack.step_size = config.attack.eps / 2
    config.attack.unroll = min(config.attack.unroll, 2)


def benchmark_config(args, setting: str):
    """(config, image shape, description) of the step to measure."""
    if args.platform:
        config = config_lib.cifar_config("cifar10")  # WRN-34-10 teacher, ResNet-18 student, batch 128, PGD-10
        if args.platform != "cpu":
            config = config_lib.for_accelerator(config, args.platform)
        shape, what = (32, 32, 3), "CIFAR-10 recipe: WRN-34-10 teacher -> ResNet-18 student"
    elif setting == "cifar":
        config = config_lib.cifar_config("cifar10")  # configs/cifar10.py as shipped
        config.teacher.model = config_lib.model_config("resnet18")
        config.optim.batch_size = 32
        shape, what = (32, 32, 3), "CIFAR-shaped: ResNet-18 teacher -> ResNet-18 student (configs/cifar10.py step)"
    elif setting == "mnist":
        config = config_file("mnist5k")
        shape, what = (28, 28, 1), "MNIST-5k demo step (configs/mnist5k.py)"
    else:
        raise ValueError(f"--setting: unknown setting {setting!r} (cifar, mnist)")
    if args.tiny:
        make_tiny(config)
        shape = (16, 16, shape[-1])
        what = f"tiny {setting}: WRN-10-1 teacher -> CNN(8, 16)+BN student, {'x'.join(map(str, shape))}"
    config.stages, config.baselines = "distill", ""
    apply_overrides(config, flag_overrides(args) + args.overrides)
    return config, shape, what


def flag_overrides(args) -> list[str]:
    """The plain flags --unroll, --batch, --dtype as config overrides."""
    fields = {"attack.unroll": args.unroll, "optim.batch_size": args.batch, "dtype": args.dtype}
    return [f"{field}={value}" for field, value in fields.items() if value is not None]


# ----------------------------------------------------------------------------------------------------------------
# The JAX side: the step training runs
# ----------------------------------------------------------------------------------------------------------------
NUM_CLASSES = 10
STEPS_PER_EPOCH = 1000  # only the learning-rate schedule reads it; step 0 is at the base rate either way


@dataclasses.dataclass
class JaxSide:
    config: object
    job: object
    spec: object
    mesh: object
    student_module: object  # the plain (float32) module the state's variables belong to
    teacher: object  # Network
    state: object  # replicated TrainState
    teacher_vars: object
    images: object  # global uint8 NHWC batch
    labels: object
    host_images: object
    host_labels: object


def synthetic_batch(batch: int, image_shape, seed: int = 0):
    """uint8 NHWC images and int32 labels (speed does not depend on pixel values)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, *image_shape), dtype=np.uint8)
    return images, rng.integers(0, NUM_CLASSES, batch).astype(np.int32)


QUICK_COMPILE = {"xla_backend_optimization_level": 0}  # for programs run once: compiles ~6x faster on XLA:CPU


def run_once(fn, *args):
    """``jax.jit(fn)(*args)`` compiled without backend optimisation (set-up work, not measured)."""
    return jax.jit(fn).lower(*args).compile(compiler_options=QUICK_COMPILE)(*args)


def fresh_variables(module, seed: int, image_shape) -> dict:
    return init_variables(module, jax.random.PRNGKey(seed), image_shape)


def build_jax_side(config, method: str, image_shape, devices: int) -> JaxSide:
    """The job of ``method`` from the validated run plan, its StepSpec, a fresh state and a random teacher."""
    config.method.name = method
    if method == "mmard":  # the twin's MMARD: AdaAD + both parts, the heaviest MMARD step (results recorded with it)
        config.method.mmard_base, config.method.mmard_parts = "adaad", "both"
    plan = config_lib.validate(config, device_count=devices)
    (job_plan,) = plan.students
    teacher_module = build_module(config.teacher.model, NUM_CLASSES, dtype=config.dtype)
    teacher_plain = build_module(config.teacher.model, NUM_CLASSES)
    teacher = Network(teacher_module, fresh_variables(teacher_plain, 1, image_shape))
    job = train.Job(job_plan, "/unused", teacher)
    spec = train.step_spec(job, config, NUM_CLASSES, STEPS_PER_EPOCH)
    student_module = build_module(config.student.model, NUM_CLASSES)
    variables = fresh_variables(student_module, 0, image_shape)
    mesh = parallel.make_mesh(jax.devices()[:devices])
    state = parallel.replicate(train.create_train_state(variables, spec.tx, jax.random.PRNGKey(5)), mesh)
    host_images, host_labels = synthetic_batch(config.optim.batch_size, image_shape)
    images, labels = parallel.global_batch((host_images, host_labels), mesh)
    return JaxSide(
        config, job, spec, mesh, student_module, teacher, state, parallel.replicate(teacher.variables, mesh),
        images, labels, host_images, host_labels,
    )  # fmt: skip


@dataclasses.dataclass
class Compiled:
    executable: object
    lower_seconds: float
    compile_seconds: float


def compile_step(side: JaxSide) -> Compiled:
    """train.make_train_step lowered and compiled for the side's arguments (with the product's XLA options, as
    parallel.compile_synchronized compiles it), timed."""
    start = time.perf_counter()
    lowered = train.make_train_step(side.spec, side.mesh).lower(side.state, side.teacher_vars, side.images, side.labels)
    lowered_at = time.perf_counter()
    executable = lowered.compile(compiler_options=compilations.compiler_options())
    return Compiled(executable, lowered_at - start, time.perf_counter() - lowered_at)


def step_flops(side: JaxSide, compiled: Compiled) -> tuple[float, float]:
    """(FLOPs of one step over all devices, FLOPs the compiled program's cost analysis reports).

    XLA's cost analysis counts a while-loop body once, whatever its trip count, so a rolled PGD loop's steps
    would be missing: the model count comes from the same step lowered with the attack fully unrolled (HLO cost
    analysis of the lowered program, no compilation). Per device, times the device count. The models are traced with
    XLA's own convolution there (``benchmark_report.model_convolutions``): the count is the direct convolutions', what
    the PyTorch twin computes, not that of the product's CPU forms (Winograd's F(2x2, 3x3) multiplies 2.25x less).
    """
    unrolled = dataclasses.replace(
        side.spec, attack=dataclasses.replace(side.spec.attack, unroll=max(1, side.spec.attack.steps))
    )
    with model_convolutions("xla"):
        step = train.make_train_step(unrolled, side.mesh)
        lowered = step.lower(side.state, side.teacher_vars, side.images, side.labels)
    devices = side.mesh.size
    own = compiled.executable.cost_analysis()
    own = own[0] if isinstance(own, list | tuple) else own
    return float(lowered.cost_analysis()["flops"]) * devices, float(own.get("flops", float("nan"))) * devices


def jax_runner(side: JaxSide, compiled: Compiled):
    """A blocking step closure; its first call donates ``side.state`` (read what needs it before)."""
    cell = {"state": side.state}

    def run():
        cell["state"], metrics = compiled.executable(cell["state"], side.teacher_vars, side.images, side.labels)
        jax.block_until_ready((cell["state"], metrics))
        return metrics

    return run


def step_inputs(side: JaxSide, state):
    """(augmented batch, PGD start, JAX's adversarial batch) of the step at ``state`` (float NHWC), drawn as
    train.train_step_body draws them on one device (the global example index is its position in the batch), and
    x' from train.adversarial_examples, the attack the step runs."""
    spec = side.spec

    def start(state, images):
        augment_keys, attack_keys = train.step_keys(state, jnp.arange(images.shape[0]))
        x = train.augment_images(spec, augment_keys, images)
        return x, per_example_start(attack_keys, x, **spec.attack.start), attack_keys

    def attack(state, teacher_vars, x, labels, keys):
        teacher_nat = inference_logits(spec.teacher, teacher_vars, x)
        return train.adversarial_examples(spec, state, teacher_vars, x, labels, keys, teacher_nat)

    x, x_init, keys = run_once(start, state, side.host_images)
    teacher_vars = jax.device_get(side.teacher.variables)
    x_adv = jax.jit(attack)(state, teacher_vars, x, side.host_labels, keys)
    return jax.device_get((x, x_init, x_adv))


# ----------------------------------------------------------------------------------------------------------------
# The PyTorch side
# ----------------------------------------------------------------------------------------------------------------
def build_twin(side: JaxSide):
    """The twin step with the side's student and teacher weights, at the step's learning rate."""
    state = jax.device_get(side.state)
    student = step_twin.twin_network(side.student_module, side.host_images.shape[1:])
    step_twin.load_flax_variables(
        student, side.student_module, {"params": state.params, "batch_stats": state.batch_stats}
    )
    teacher = step_twin.twin_network(side.teacher.module, side.host_images.shape[1:])
    step_twin.load_flax_variables(teacher, side.teacher.module, jax.device_get(side.teacher.variables))
    lr = float(train.learning_rate_schedule(side.job.plan.optim, STEPS_PER_EPOCH)(int(state.step)))
    autocast = torch.bfloat16 if side.config.dtype == "bfloat16" else None
    return step_twin.make_twin_step(side.spec, side.job.plan, student, teacher, lr, autocast)


def nchw(array):
    """NHWC NumPy / JAX array -> NCHW torch tensor."""
    return torch.tensor(np.asarray(array)).permute(0, 3, 1, 2).contiguous()


def torch_runner(side: JaxSide, twin):
    """A step closure of the twin on the side's batch (augmentation and PGD start drawn in PyTorch)."""
    images, labels = nchw(side.host_images), torch.from_numpy(side.host_labels.astype("int64"))
    return lambda: twin(images, labels)


# ----------------------------------------------------------------------------------------------------------------
# --check: the two steps agree
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Largest relative gaps a check allows (None: reported only) and what the check covers."""

    name: str
    loss: float
    params: float  # ||p_jax - p_torch|| / ||p_torch|| over all parameters after the step
    update: float | None  # ||u_jax - u_torch|| / ||u_torch||, u = the step's change of all parameters
    x_adv: float  # share of the adversarial batch's pixels that differ
    covers: str


# At test sizes float32 rounding stays at ~1e-6: the whole step must agree tightly.
EXACT = Tolerance("the step", 1e-4, 1e-4, 1e-3, 0.01, "the whole step, PGD included (test sizes)")
# At full size the gradient's rounding grows through every BatchNorm backward (measured ~5e-3 at ResNet-18's stem,
# 1e-7 at its head), and PGD's sign(∇) turns rounding-level gradient differences into whole steps of α on a few
# pixels, which then move the loss and the update: the attack is compared exactly at test sizes, everything else at
# full size with the attack off, and the step as configured only loosely.
NO_ATTACK = Tolerance("PGD-0", 1e-4, 1e-4, 1e-2, 0.0, "networks, BatchNorm, losses and SGD with the attack off")
CHAOTIC = Tolerance("as configured", 1e-3, 1e-3, None, 0.05, "the step as configured (sign flips in PGD: loose)")


def relative_gap(a, b) -> float:
    """||a - b|| / ||b||."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(b)), 1e-30))


def compare_step(side: JaxSide) -> dict:
    """One step on both sides from the same weights, batch and PGD start: loss, parameter and update gaps."""
    host_state = jax.device_get(side.state)
    x, x_init, jax_x_adv = step_inputs(side, host_state)
    twin = build_twin(side)
    torch_loss, torch_x_adv = twin.step(nchw(x), nchw(x_init), torch.from_numpy(side.host_labels.astype("int64")))
    new_state, metrics = compile_step(side).executable(side.state, side.teacher_vars, side.images, side.labels)
    new_state, metrics = jax.device_get((new_state, metrics))

    def torch_layout(variables):
        return step_twin.torch_layout_state(side.student_module, variables)

    before, jax_after = torch_layout({"params": host_state.params}), torch_layout({"params": new_state.params})
    torch_after = {key: value.detach().numpy() for key, value in twin.student.state_dict().items()}
    flat = lambda tree: np.concatenate([np.ravel(tree[key]) for key in sorted(before)])  # noqa: E731
    update_torch = flat(torch_after) - flat(before)
    stats = torch_layout({"batch_stats": new_state.batch_stats})
    return {
        "jax_loss": float(metrics["loss"]),
        "torch_loss": torch_loss,
        "loss_gap": abs(float(metrics["loss"]) - torch_loss) / max(abs(torch_loss), 1e-30),
        "params_gap": relative_gap(flat(jax_after), flat(torch_after)),
        "x_adv_differ": float(np.mean(np.abs(nchw(jax_x_adv).numpy() - torch_x_adv.numpy()) > 1e-6)),
        "update_gap": relative_gap(flat(jax_after) - flat(before), update_torch),
        "update_norm": float(np.linalg.norm(update_torch)),
        "running_mean_gap": max(
            (relative_gap(stats[key], torch_after[key]) for key in stats if key.endswith("running_mean")), default=0.0
        ),
    }


def within(result: dict, tolerance: Tolerance) -> bool:
    update_ok = tolerance.update is None or result["update_gap"] <= tolerance.update
    gaps_ok = result["loss_gap"] <= tolerance.loss and result["params_gap"] <= tolerance.params
    return gaps_ok and update_ok and result["x_adv_differ"] <= tolerance.x_adv


def check_mode(args, settings) -> tuple[dict, list[str]]:
    """--check: per setting and method, the JAX step and the twin's from the same start (float32)."""
    results, rows = {}, []
    checks = (EXACT,) if args.tiny else (NO_ATTACK, CHAOTIC)
    for setting, (config, shape, what) in settings.items():
        if config.dtype != "float32":
            raise ValueError("--check compares float32 steps")
        for method, tolerance in ((m, t) for m in args.methods for t in checks):
            trial = config.copy_and_resolve_references()
            trial.attack.steps = 0 if tolerance is NO_ATTACK else trial.attack.steps
            result = compare_step(build_jax_side(trial, method, shape, args.devices))
            result["passed"] = within(result, tolerance)
            results[f"{setting}/{method}" + ("/no_attack" if tolerance is NO_ATTACK else "")] = result
            rows.append(
                f"| {what} / {method} | {tolerance.name} | {result['jax_loss']:.6f} | {result['torch_loss']:.6f} | "
                f"{result['loss_gap']:.1e} | {result['params_gap']:.1e} | {result['update_gap']:.1e} | "
                f"{result['running_mean_gap']:.1e} | {result['x_adv_differ']:.2%} | "
                f"{'yes' if result['passed'] else 'NO'} |"
            )
    results["passed"] = all(r["passed"] for r in results.values())
    limits = [
        f"- {t.name}: {t.covers}; loss gap <= {t.loss:g}, parameter gap <= {t.params:g}, update gap "
        + (f"<= {t.update:g}" if t.update else "reported")
        + f", x' pixels that differ <= {t.x_adv:.0%}"
        for t in checks
    ]
    return results, [
        "- relative gaps: loss; all parameters after the step; the update (their change); x' pixels that differ: "
        "JAX's attack (train.adversarial_examples, from the same start) vs the twin's, by more than 1e-6",
        *limits,
        "",
        "| step | check | JAX loss | PyTorch loss | loss gap | parameter gap | update gap | BN running-mean gap | "
        "x' pixels that differ | agree |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "BatchNorm running variances are not compared: PyTorch updates them with the unbiased batch variance.",
    ]


# ----------------------------------------------------------------------------------------------------------------
# CPU comparison: interleaved rounds
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SideResult:
    rounds: list[Round]
    first_step: float  # seconds: JAX's first run of the compiled program, PyTorch's warm-up step
    lower_seconds: float = -1.0  # JAX only
    compile_seconds: float = -1.0

    @property
    def steps(self) -> list[float]:
        return [t for r in self.rounds for t in r.step_seconds]


def first_call_seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def interleaved(runs: dict, rounds: int, steps: int) -> dict[str, list[Round]]:
    """``rounds`` rounds of each side in turn (a busy spell on the machine then hits both)."""
    timings = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            timings[name].append(timed_round(run, steps))
    return timings


def measure_method(args, config, shape, method: str, steps: int) -> dict:
    """Compile, warm up and time both sides of one method's step."""
    side = build_jax_side(config.copy_and_resolve_references(), method, shape, args.devices)
    compiled = compile_step(side)
    flops, own_flops = step_flops(side, compiled)
    run_torch = torch_runner(side, build_twin(side))  # before the JAX step donates the initial state
    run_jax = jax_runner(side, compiled)
    jax_first = first_call_seconds(run_jax)
    torch_first = first_call_seconds(run_torch)
    timings = interleaved({"JAX": run_jax, "PyTorch": run_torch}, args.rounds, steps)
    return {
        "JAX": SideResult(timings["JAX"], jax_first, compiled.lower_seconds, compiled.compile_seconds),
        "PyTorch": SideResult(timings["PyTorch"], torch_first),
        "flops": flops,
        "own_flops": own_flops,
        "memory": compiled.executable.memory_analysis(),
        "batch": side.config.optim.batch_size,
        "spec": side.spec,
    }


def side_row(method: str, name: str, result: SideResult, batch: int, flops: float, peak: float, cores: int) -> str:
    """One table row: wall times, throughput, compilation, memory, CPU use and FLOP rate of one side."""
    median, best = statistics.median(result.steps), min(result.steps)
    cpu_per_step = sum(r.cpu_seconds for r in result.rounds) / len(result.steps)
    rss = max(r.peak_rss for r in result.rounds) / MIB
    growth = max(r.peak_rss - r.start_rss for r in result.rounds) / MIB
    compiled = f"{result.lower_seconds:.1f} + {result.compile_seconds:.1f}" if result.lower_seconds >= 0 else "-"
    gflops = flops / median / 1e9
    return (
        f"| {method} | {name} | {median:.4g} | {best:.4g} | {cpu_per_step:.4g} | {batch / median:.1f} | {compiled} | "
        f"{result.first_step:.3g} | {rss:.0f} (+{growth:.0f}) | {busy_cores(result.rounds):.2f} / {cores} | "
        f"{wait_share(result.rounds, cores):.0%} | {gflops:.3g} | {gflops / peak:.1%} |"
    )


def compare_mode(args, settings, load_before, times_before) -> tuple[dict, list[str]]:
    """Both sides per setting and method; a ratio only where `contention` finds nothing."""
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    peak, peak_text = cpu_peak_gflops(cores, args.peak_gflops)
    measured = {}
    for setting, (config, shape, what) in settings.items():
        steps = args.steps or (2 if setting == "cifar" or args.tiny else 10)
        for method in args.methods:
            measured[(setting, what, method)] = measure_method(args, config, shape, method, steps)
    load_after = os.getloadavg()
    own_after = recent_busy_cores([r for m in measured.values() for n in ("JAX", "PyTorch") for r in m[n].rounds])
    lines = [
        f"- load average before {format_load(load_before)}, after {format_load(load_after)}; "
        f"{format_steal(times_before, cpu_times())}",
        f"- CPU peak: {peak_text}",
        f"- {args.rounds} interleaved rounds (JAX, PyTorch, JAX, ...) after compilation and one warm-up step each; "
        "median and min over every timed step",
        "",
    ]
    results = {}
    for (setting, what, method), m in measured.items():
        spec, memory = m["spec"], m["memory"]
        attack = spec.attack
        lines += [
            f"## {what}: {method}",
            "",
            f"- batch {m['batch']}, PGD-{attack.steps} (ε {attack.eps:.4g}, α {attack.step_size:.4g}, init "
            f"{attack.init}, unroll {attack.unroll}), compute {settings[setting][0].dtype}, {args.devices} JAX "
            f"device(s), PyTorch {torch.get_num_threads()} thread(s)",
            f"- FLOPs per step {m['flops'] / 1e9:.4g} G: XLA's cost analysis of this step lowered with the PGD loop "
            f"fully unrolled and direct convolutions (it counts a loop body once; the compiled program's own analysis, "
            f"of the product's convolution forms, says {m['own_flops'] / 1e9:.4g} G)",
            f"- XLA buffers: arguments {memory.argument_size_in_bytes / MIB:.0f} MiB, temporaries "
            f"{memory.temp_size_in_bytes / MIB:.0f} MiB, outputs {memory.output_size_in_bytes / MIB:.0f} MiB",
            "",
            "| method | side | median s/step | min s/step | CPU s/step | img/s | lower + compile (s) | first step (s) "
            "| peak RSS MiB (+ over round start) | busy cores | run-queue wait | GFLOP/s | % of peak |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in ("JAX", "PyTorch"):
            lines.append(side_row(method, name, m[name], m["batch"], m["flops"], peak, cores))
        verdict = contention(load_before, load_after, own_after, {n: m[n].rounds for n in ("JAX", "PyTorch")}, cores)
        ratio = statistics.median(m["PyTorch"].steps) / statistics.median(m["JAX"].steps)
        results[f"{setting}/{method}"] = {"ratio": ratio, "verdict": verdict}
        lines += ["", f"- {verdict}" if verdict else f"- speed-up, PyTorch median / JAX median: **{ratio:.2f}x**", ""]
    return results, lines


# ----------------------------------------------------------------------------------------------------------------
# Accelerators: img/s, MFU, memory, largest batch
# ----------------------------------------------------------------------------------------------------------------
# Dense peak TFLOP/s per chip (no structured sparsity), by device_kind substring, first match wins. float32: the
# TF32 tensor-core rate on NVIDIA (XLA's default precision lets f32 convolutions and dots use TF32 on Ampere and
# later), and the bf16 rate on TPU (the default precision of an f32 matmul is one bf16 pass).
ACCELERATOR_PEAKS = (
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): SXM 1,979 bf16 / 989 TF32 with sparsity;
    # FP32 without tensor cores 67 TFLOP/s (SXM), 51 (PCIe).
    (("H100", "PCIe"), "H100 PCIe", {"bfloat16": 756.5, "float32": 378.0}),
    (("H100",), "H100 SXM", {"bfloat16": 989.4, "float32": 494.7}),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): the H100 SXM's compute.
    (("H200",), "H200 SXM", {"bfloat16": 989.4, "float32": 494.7}),
    # NVIDIA A100 datasheet: bf16 312, TF32 156 (FP32 19.5).
    (("A100",), "A100", {"bfloat16": 312.0, "float32": 156.0}),
    # Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): bf16 per chip.
    (("TPU v4",), "TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    (("TPU v5 lite",), "TPU v5e", {"bfloat16": 197.0, "float32": 197.0}),
    (("TPU v5",), "TPU v5p", {"bfloat16": 459.0, "float32": 459.0}),
    (("TPU v6",), "TPU v6e", {"bfloat16": 918.0, "float32": 918.0}),
)
DTYPES = ("bfloat16", "float32")  # bfloat16 first: it needs less memory, so the device's high-water mark fits it


def accelerator_peak(device_kind: str, dtype: str, args) -> tuple[float | None, str]:
    """(peak TFLOP/s or None, its name) for one chip."""
    if args.peak_tflops:
        return args.peak_tflops, "--peak_tflops"
    if args.platform == "cpu":
        return cpu_peak_gflops(len(os.sched_getaffinity(0)), args.peak_gflops)[0] / 1000, "CPU fp32 vector peak"
    for parts, name, peaks in ACCELERATOR_PEAKS:
        if all(part in device_kind for part in parts):
            return peaks[dtype], f"{name} {dtype} dense"
    return None, f"unknown chip {device_kind!r}: pass --peak_tflops"


def is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def device_peak_bytes() -> tuple[int, str]:
    """The first device's high-water mark (never reset: process-wide), or the process's peak RSS on CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return peak_rss_bytes(), "process peak RSS"


def largest_batch(args, config, shape, method: str, start: int, cap: int) -> tuple[int, str]:
    """Doubles the batch from ``start`` until a step fails with an out-of-memory error or ``cap`` is passed."""
    fits, batch = start, start * 2
    while batch <= cap:
        trial = config.copy_and_resolve_references()
        trial.optim.batch_size = batch
        try:
            side = build_jax_side(trial, method, shape, args.devices)
            jax_runner(side, compile_step(side))()
        except Exception as error:  # XlaRuntimeError, at compile or run time
            if not is_out_of_memory(error):
                raise
            return fits, f"{batch} is out of memory"
        finally:
            side = None
            gc.collect()
        fits, batch = batch, batch * 2
    return fits, f"{batch} not tried (--max_batch {cap})"


def accelerator_row(args, config, shape, method: str, steps: int) -> tuple[dict, str]:
    """Compiles, runs and times one method's step in ``config.dtype``: (results, table row)."""
    side = build_jax_side(config, method, shape, args.devices)
    compiled = compile_step(side)
    flops, _ = step_flops(side, compiled)
    run = jax_runner(side, compiled)
    first = first_call_seconds(run)
    median = statistics.median(timed_round(run, steps).step_seconds)
    peak, peak_name = accelerator_peak(jax.devices()[0].device_kind, config.dtype, args)
    memory = compiled.executable.memory_analysis()
    buffers = memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
    peak_bytes, peak_kind = device_peak_bytes()
    batch, tflops = config.optim.batch_size, flops / median / 1e12
    mfu = tflops / peak if peak else None
    row = (
        f"| {method} | {config.dtype} | {median:.4g} | {batch / median:.1f} | {compiled.lower_seconds:.1f} + "
        f"{compiled.compile_seconds:.1f} | {first:.3g} | {flops / 1e9:.4g} | {tflops:.3g} | {peak_name} "
        f"({peak or 0:g} TFLOP/s) | {'n/a' if mfu is None else f'{mfu:.1%}'} | {buffers / 2**30:.2f} | "
        f"{peak_bytes / 2**30:.2f} ({peak_kind}) |"
    )
    results = {"img_s": batch / median, "mfu": mfu, "peak_bytes": peak_bytes, "buffer_bytes": buffers}
    return {**results, "unroll": side.spec.attack.unroll}, row


def accelerator_mode(args, settings) -> tuple[dict, list[str]]:
    """Each method in bfloat16 then float32 at the recipe's batch, then the largest batch of the first method."""
    if jax.default_backend() != args.platform:
        raise RuntimeError(f"--platform {args.platform}, but JAX runs on {jax.default_backend()}")
    ((config, shape, what),) = settings.values()
    steps, batch = args.steps or (2 if args.tiny else 10), config.optim.batch_size
    results, rows, dtypes = {}, [], DTYPES if args.dtype is None else (args.dtype,)
    for dtype in dtypes:
        for method in args.methods:
            trial = config.copy_and_resolve_references()
            trial.dtype = dtype
            results[f"{method}/{dtype}"], row = accelerator_row(args, trial, shape, method, steps)
            rows.append(row)
    cap = args.max_batch or (4096 if args.platform != "cpu" else 2 * batch)
    searches = []
    for dtype in dtypes:
        trial = config.copy_and_resolve_references()
        trial.dtype = dtype
        fits, stop = largest_batch(args, trial, shape, args.methods[0], batch, cap)
        results[f"largest_batch/{dtype}"] = fits
        searches.append(f"- {dtype}: {fits} ({stop})")
    unroll = next(iter(results.values()))["unroll"]
    cpu_peak = [f"- CPU peak: {cpu_peak_gflops(len(os.sched_getaffinity(0)), args.peak_gflops)[1]}"]
    return results, [
        f"- device: {jax.devices()[0].device_kind} x {args.devices} ({jax.default_backend()}), {what}, batch {batch}, "
        f"PGD-{config.attack.steps} (unroll {unroll}); {steps} timed steps after compilation and a first step",
        "- MFU: FLOPs per step (XLA's cost analysis of the step lowered with the PGD loop fully unrolled) / median "
        "s/step / peak",
        *(cpu_peak if args.platform == "cpu" else []),
        "- peak memory: the device's high-water mark since the process started (JAX cannot reset it), so a row shows "
        "the largest of its own and every row above; XLA buffers: the compiled program's own arguments, "
        "temporaries and outputs",
        "",
        "| method | dtype | median s/step | img/s | lower + compile (s) | first step (s) | GFLOP/step | TFLOP/s | "
        "peak | MFU | XLA buffers GiB | peak memory GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Largest batch that fits ({args.methods[0]}, doubling from {batch}):",
        "",
        *searches,
    ]


# ----------------------------------------------------------------------------------------------------------------
# Report and entry point
# ----------------------------------------------------------------------------------------------------------------
def header(title: str, argv: list[str]) -> list[str]:
    info = cpuinfo()
    xla_flags = os.environ.get("XLA_FLAGS", "") or "(none)"
    return [
        f"# {title}",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `PYTHONPATH=. python benchmarks/step_speed.py {' '.join(argv)}`",
        f"- machine: {platform.platform()}, {info.get('model name', platform.processor() or 'unknown CPU')}, "
        f"{os.cpu_count()} CPUs, pinned to cores {sorted(os.sched_getaffinity(0))}; Python "
        f"{platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices), "
        f"torch {torch.__version__}; XLA_FLAGS {xla_flags}",
    ]


TITLES = {
    "check": "Train step: JAX vs its PyTorch twin, equivalence",
    "compare": "Train-step speed on CPU: JAX (mmard_jax.train) vs an eager PyTorch twin",
    "accelerator": "Train-step speed on an accelerator",
}


def default_output(args) -> str:
    if args.tiny or args.check:
        return ""
    if args.platform:
        return f"benchmarks/results/step_speed_{args.platform}.md"
    return "benchmarks/results/step_speed.md"


def main(argv: list[str] | None = None, *, may_reexec: bool = False) -> dict:
    """Runs the mode the flags ask for, publishes the report, returns the results (``passed`` for --check)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    prepare_process(args, may_reexec=may_reexec)
    wait_for_quiet(len(os.sched_getaffinity(0)), args.settle)
    load_before, times_before = os.getloadavg(), cpu_times()
    names = ("cifar",) if args.platform else tuple(s.strip() for s in args.setting.split(","))
    settings = {name: benchmark_config(args, name) for name in names}
    if args.check:
        mode, (results, lines) = "check", check_mode(args, settings)
    elif args.platform:
        mode, (results, lines) = "accelerator", accelerator_mode(args, settings)
    else:
        mode, (results, lines) = "compare", compare_mode(args, settings, load_before, times_before)
    report = header(TITLES[mode], argv) + lines
    publish("\n".join(report) + "\n", default_output(args) if args.output is None else args.output)
    return results


if __name__ == "__main__":
    sys.exit(0 if main(may_reexec=True).get("passed", True) else 1)
