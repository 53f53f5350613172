"""RobustBench teachers we can import: name -> architecture, input normalisation and class count.

Each entry mirrors the model definition of RobustBench's CIFAR-10/100 model zoo for that name (checked by hand
against its ``model_zoo/cifar10.py`` and ``cifar100.py``). RobustBench's ``load_model`` keeps a downloaded file
at ``<model_dir>/<dataset>/<threat_model>/<name>.pt``; :func:`robustbench_file` finds it there.
"""

from __future__ import annotations

import dataclasses
import os

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
THREAT_MODELS = ("Linf",)


@dataclasses.dataclass(frozen=True)
class RobustBenchEntry:
    """How to rebuild one RobustBench model in our zoo."""

    model: str  # our registry name
    kwargs: dict
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    note: str = ""


def _trades_wrn(depth: int, widen_factor: int, note: str = "", **normalisation) -> RobustBenchEntry:
    return RobustBenchEntry("wide_resnet", {"depth": depth, "widen_factor": widen_factor}, note=note, **normalisation)


def _dm_wrn(depth: int, widen_factor: int, mean, std, note: str = "") -> RobustBenchEntry:
    kwargs = {"depth": depth, "widen_factor": widen_factor, "activation": "swish"}
    return RobustBenchEntry("dm_wide_resnet", kwargs, mean, std, note)


def _dm_preact18(mean, std, note: str = "") -> RobustBenchEntry:
    return RobustBenchEntry("dm_preact_resnet", {"depth": 18, "activation": "swish"}, mean, std, note)


_C10, _C100 = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}, {"mean": CIFAR100_MEAN, "std": CIFAR100_STD}

# (dataset, threat model) -> name -> entry. Notes: training data and clean / AutoAttack accuracy (%) as listed in
# RobustBench's model_info files.
ENTRIES: dict[tuple[str, str], dict[str, RobustBenchEntry]] = {
    ("cifar10", "Linf"): {
        "Zhang2019Theoretically": _trades_wrn(34, 10, "TRADES; 84.92 / 53.08"),
        "Rice2020Overfitting": _trades_wrn(34, 20, "PGD-AT with early stopping; 85.34 / 53.42", **_C10),
        "Carmon2019Unlabeled": _trades_wrn(28, 10, "RST, extra data; 89.69 / 59.53"),
        "Cui2020Learnable_34_10": _trades_wrn(34, 10, "LBGAT; 88.22 / 52.86"),
        "Cui2020Learnable_34_20": _trades_wrn(34, 20, "LBGAT; 88.70 / 53.57"),
        "Gowal2020Uncovering_28_10_extra": _dm_wrn(28, 10, **_C10, note="extra data; 89.48 / 62.80"),
        "Gowal2020Uncovering_34_20": _dm_wrn(34, 20, **_C10, note="85.64 / 56.86"),
        "Gowal2020Uncovering_70_16": _dm_wrn(70, 16, **_C10, note="85.29 / 57.20"),
        "Gowal2020Uncovering_70_16_extra": _dm_wrn(70, 16, **_C10, note="extra data; 91.10 / 65.88"),
        "Rebuffi2021Fixing_28_10_cutmix_ddpm": _dm_wrn(28, 10, **_C10, note="generated data; 87.33 / 60.75"),
        "Rebuffi2021Fixing_70_16_cutmix_ddpm": _dm_wrn(70, 16, **_C10, note="generated data; 88.54 / 64.25"),
        "Rebuffi2021Fixing_70_16_cutmix_extra": _dm_wrn(70, 16, **_C10, note="extra data; 92.23 / 66.58"),
        "Rebuffi2021Fixing_R18_ddpm": _dm_preact18(**_C10, note="generated data; 83.53 / 56.66"),
    },
    ("cifar100", "Linf"): {
        "Cui2020Learnable_34_10_LBGAT6": _trades_wrn(34, 10, "LBGAT β = 6; 60.64 / 29.33"),
        "Cui2020Learnable_34_10_LBGAT0": _trades_wrn(34, 10, "LBGAT β = 0; 70.25 / 27.16"),
        "Cui2020Learnable_34_20_LBGAT6": _trades_wrn(34, 20, "LBGAT β = 6; 62.55 / 30.20"),
        "Sehwag2021Proxy": _trades_wrn(34, 10, "generated data; 65.93 / 31.15"),
        "Gowal2020Uncovering": _dm_wrn(70, 16, **_C100, note="60.86 / 30.03"),
        "Gowal2020Uncovering_extra": _dm_wrn(70, 16, **_C100, note="extra data; 69.15 / 36.88"),
        "Rebuffi2021Fixing_28_10_cutmix_ddpm": _dm_wrn(28, 10, **_C100, note="generated data; 62.41 / 32.06"),
        "Rebuffi2021Fixing_70_16_cutmix_ddpm": _dm_wrn(70, 16, **_C100, note="generated data; 63.56 / 34.64"),
        "Rebuffi2021Fixing_R18_ddpm": _dm_preact18(**_C100, note="generated data; 56.87 / 28.50"),
    },
}


def supported_names(dataset: str, threat_model: str) -> list[str]:
    return sorted(ENTRIES.get((dataset, threat_model), {}))


def lookup(name: str, dataset: str, threat_model: str) -> RobustBenchEntry:
    """The entry for ``name``; ValueError listing the supported names otherwise."""
    if (dataset, threat_model) not in ENTRIES:
        pairs = ", ".join(f"--dataset {d} --threat-model {t}" for d, t in ENTRIES)
        raise ValueError(
            f"no RobustBench teachers for dataset {dataset!r}, threat model {threat_model!r}; supported: {pairs}"
        )
    table = ENTRIES[(dataset, threat_model)]
    if name not in table:
        raise ValueError(
            f"RobustBench model {name!r} is not supported for {dataset} {threat_model}; supported names:\n  "
            + "\n  ".join(f"{n}  ({table[n].model}, {table[n].note})" for n in supported_names(dataset, threat_model))
        )
    return table[name]


def robustbench_file(model_dir: str, dataset: str, threat_model: str, name: str) -> str:
    """Where RobustBench's ``load_model(name, model_dir, dataset, threat_model)`` stores the file."""
    return os.path.join(model_dir, dataset, threat_model, f"{name}.pt")
