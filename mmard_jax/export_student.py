"""Export a trained network as a PyTorch state dict: ``python -m mmard_jax.export_student``.

    python -m mmard_jax.export_student --run runs/cifar10/students/mmard --out student.pt
    python -m mmard_jax.export_student --run runs/cifar10/students/mmard --out student.safetensors --which last

``--run`` is a run directory of ours (a student, a teacher, or an imported teacher). The file loads with
``load_state_dict(strict=True)`` into the PyTorch reference definition of the architecture (kuangliu's ResNet-18 /
PreAct ResNet-18 / MobileNetV2, the TRADES WideResNet without ``sub_block1``, DeepMind's WideResNet / PreAct
ResNet). Input normalisation is not part of a state dict: ``<out>.json`` next to the file records the model's
mean/std (and the architecture) for whoever builds the PyTorch model. ``.safetensors`` needs no PyTorch.
"""

from __future__ import annotations

import argparse
import json
import sys

import ml_collections
from absl import logging as absl_logging

from mmard_jax import checkpoint as ckpt_lib
from mmard_jax import convert, networks, storage

EXIT_USAGE = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mmard_jax.export_student", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory (e.g. runs/cifar10/students/mmard)")
    parser.add_argument("--out", required=True, help="output file: *.pt / *.pth (PyTorch) or *.safetensors")
    parser.add_argument("--which", default="best", choices=("best", "last"), help="checkpoint to export")
    return parser.parse_args(argv)


def export(run_dir: str, out: str, which: str = "best") -> dict:
    """Writes the state dict of a run's checkpoint to ``out``; returns the record written to ``<out>.json``."""
    if storage.is_remote(out):
        raise ValueError(f"--out {out!r}: write the file locally, then copy it (gsutil cp / gcloud storage cp)")
    variables, meta = ckpt_lib.load_variables(ckpt_lib.checkpoint_dir(run_dir), which)
    if not meta.get("model"):
        raise ValueError(f"the checkpoint in {run_dir!r} does not record its model; it cannot be exported")
    model = ml_collections.ConfigDict(meta["model"])
    module = networks.build_module(model, _num_classes(variables, meta))
    state_dict = convert.export_state_dict(module, variables)
    convert.write_state_dict(out, state_dict)
    record = {"run": run_dir, "step": meta.get("step"), "which": which, "model": meta["model"], "keys": len(state_dict)}
    with open(f"{out}.json", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return record


def _num_classes(variables: dict, meta: dict) -> int:
    """Recorded by imports; otherwise the width of the one top-level dense layer (the logits)."""
    if meta.get("num_classes"):
        return int(meta["num_classes"])
    heads = [m["kernel"] for m in variables["params"].values() if "kernel" in m and m["kernel"].ndim == 2]
    if len(heads) != 1:
        raise ValueError("cannot tell the number of classes from the checkpoint")
    return int(heads[0].shape[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's info and warnings are not for this command's user
    try:
        record = export(args.run, args.out, args.which)
    except (ValueError, FileNotFoundError, ImportError, convert.ConversionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    model = record["model"]
    print(f"wrote {args.out}: {record['keys']} tensors of {model['name']} {model['kwargs']} (step {record['step']})")
    if model.get("mean"):
        print(f"the model normalises its input: mean {model['mean']}, std {model['std']} (see {args.out}.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
