"""Import a PyTorch or RobustBench checkpoint as a teacher: ``python -m mmard_jax.import_teacher``.

    # a file and the architecture it holds
    python -m mmard_jax.import_teacher --source model.pt --model wrn-34-10 --num-classes 10 --out teachers/trades
    # a RobustBench model, read where RobustBench's load_model keeps it (models/cifar10/Linf/<name>.pt)
    python -m mmard_jax.import_teacher --robustbench Zhang2019Theoretically --dataset cifar10 --threat-model Linf \\
        --model-dir models --out teachers/trades
    # then distil from it
    python -m mmard_jax.main --config configs/cifar10.py --config.teacher.checkpoint=teachers/trades

The output directory is a checkpoint of ours (``checkpoints/0``) that records the architecture and input
normalisation, so ``--config.teacher.checkpoint=DIR`` needs no further model settings, plus ``import.json``
(source file, its SHA-256, every key read past and why). PyTorch files are read with ``weights_only=True``;
``.safetensors`` files need no PyTorch. Errors print one message and exit with status 2.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

from absl import logging as absl_logging

from mmard_jax import checkpoint as ckpt_lib
from mmard_jax import config as config_lib
from mmard_jax import convert, networks, storage
from mmard_jax.convert import robustbench
from mmard_jax.models import MODEL_NAMES

EXIT_USAGE = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mmard_jax.import_teacher", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--source", help="a PyTorch (.pt/.pth, weights only) or .safetensors file")
    source.add_argument("--robustbench", metavar="NAME", help="a RobustBench model name (see --list)")
    source.add_argument("--list", action="store_true", help="list the supported RobustBench names and exit")
    parser.add_argument("--out", help="output directory (a teacher checkpoint of ours)")
    parser.add_argument("--model", help=f"with --source: our architecture name ({', '.join(MODEL_NAMES)})")
    parser.add_argument("--num-classes", type=int, help="with --source: number of classes")
    parser.add_argument(
        "--model-kwargs", default="", help="with --source: architecture options, e.g. depth=28,widen_factor=10"
    )
    parser.add_argument("--mean", default="", help="with --source: per-channel input mean applied by the model")
    parser.add_argument("--std", default="", help="with --source: per-channel input std applied by the model")
    parser.add_argument("--dataset", default="cifar10", choices=sorted(robustbench.NUM_CLASSES))
    parser.add_argument("--threat-model", default="Linf", choices=robustbench.THREAT_MODELS)
    parser.add_argument("--model-dir", default="models", help="RobustBench's model_dir")
    parser.add_argument("--image-shape", default="32,32,3", help="H,W,C of the inputs (CIFAR: 32,32,3)")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    return parser.parse_args(argv)


def model_section(args: argparse.Namespace):
    """(model config section, num_classes, source file, RobustBench name or None) the arguments describe."""
    if args.robustbench:
        entry = robustbench.lookup(args.robustbench, args.dataset, args.threat_model)
        path = robustbench.robustbench_file(args.model_dir, args.dataset, args.threat_model, args.robustbench)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no file at {path!r}: download it on a machine with internet with RobustBench, e.g. "
                f"robustbench.utils.load_model({args.robustbench!r}, model_dir={args.model_dir!r}, "
                f"dataset={args.dataset!r}, threat_model={args.threat_model!r}), and copy {path} here"
            )
        section = config_lib.model_config(entry.model, **entry.kwargs)
        section.mean, section.std = entry.mean, entry.std
        return section, robustbench.NUM_CLASSES[args.dataset], path, args.robustbench
    for flag, value in (("--model", args.model), ("--num-classes", args.num_classes)):
        if value is None:
            raise ValueError(f"{flag} is required with --source")
    section = config_lib.model_config(args.model, **parse_kwargs(args.model_kwargs))
    section.mean, section.std = parse_floats("--mean", args.mean), parse_floats("--std", args.std)
    return section, args.num_classes, args.source, None


def parse_kwargs(text: str) -> dict:
    """'depth=28,activation=swish' -> {'depth': 28, 'activation': 'swish'} (ints where they parse)."""
    kwargs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-kwargs: expected key=value, got {item!r}")
        kwargs[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return kwargs


def parse_floats(flag: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def parse_image_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--image-shape must be H,W,C (e.g. 32,32,3), got {text!r}")
    return shape


def import_teacher(args: argparse.Namespace) -> dict:
    """Converts the source and writes the checkpoint; returns the import record (also written as import.json)."""
    if not args.out:
        raise ValueError("--out is required")
    if ckpt_lib.read_run_meta(args.out) is not None and not args.overwrite:
        raise ValueError(f"{args.out!r} already holds a checkpoint; choose another --out or pass --overwrite")
    section, num_classes, path, robustbench_name = model_section(args)
    image_shape = parse_image_shape(args.image_shape)
    module = networks.build_module(section, num_classes)
    variables, dropped = convert.convert_state_dict(convert.read_state_dict(path), module, image_shape)
    model = json.loads(section.to_json())
    record = {
        "source": os.path.abspath(path),
        "sha256": convert.file_sha256(path),
        "robustbench": robustbench_name,
        "model": model,
        "num_classes": num_classes,
        "image_shape": list(image_shape),
        "dropped_keys": dropped,
    }
    out = storage.path(args.out)
    if args.overwrite and (out / "checkpoints").exists():
        (out / "checkpoints").rmtree()
    ckpt_lib.write_variables(
        args.out,
        variables,
        {
            "job": "imported",
            "model": model,
            "num_classes": num_classes,
            "source": record["source"],
            "sha256": record["sha256"],
        },
    )
    (out / "import.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's info and warnings are not for this command's user
    if args.list:
        for (dataset, threat), table in robustbench.ENTRIES.items():
            for name, entry in sorted(table.items()):
                print(f"{dataset:9s} {threat:5s} {name:40s} {entry.model} {entry.kwargs}  {entry.note}")
        return 0
    try:
        record = import_teacher(args)
    except (ValueError, FileNotFoundError, ImportError, convert.ConversionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"imported {record['source']} as {record['model']['name']} {record['model']['kwargs']} -> {args.out}")
    for reason, count in collections.Counter(record["dropped_keys"].values()).items():
        print(f"read past {count} key(s): {reason} (listed in import.json)")
    config = f"configs/{args.dataset}.py" if record["robustbench"] else "CONFIG"
    print(f"distil from it: python -m mmard_jax.main --config {config} --config.teacher.checkpoint={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
