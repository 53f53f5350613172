"""A PyTorch twin of one ``mmard_jax.train`` step (MMARD and RSLAD), for benchmarks/step_speed.py.

Same networks (weights copied from the Flax variables), same augmentation (random crop with zero padding, flip),
same PGD (start projected, ``x' + α·sign(∇)``, L∞ projection ``x + clip(x' - x, -ε, ε)`` then [0, 1]), same
inner and outer losses (docs/method.md §2-3, written again in PyTorch from mmard_jax/losses.py), and the same SGD
(momentum, weight decay added to the gradient before momentum: ``torch.optim.SGD`` is what optax's chain mirrors).
Eager PyTorch, as the reference implementations of these methods are written.

The twins of the reference architectures come from tests/torch_twins.py; the demo's ``cnn`` has its twin here.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch_twins  # noqa: E402

from mmard_jax import models  # noqa: E402
from mmard_jax.convert import names  # noqa: E402

SUPPORTED_METHODS = ("mmard", "rslad")


# ----------------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------------
class CNN(nn.Module):
    """Twin of ``mmard_jax.models.CNN``; attribute names are the Flax module names (``conv_0``, ``bn_0``, ``hidden``,
    ``head``), so that `load_flax_variables` maps every leaf by name."""

    def __init__(self, *, in_channels, image_size, num_classes, widths, hidden, use_bn, downsample):
        super().__init__()
        self.use_bn, self.pool = use_bn, downsample == "max_pool"
        stride, size, cin = (1 if self.pool else 2), image_size, in_channels
        for index, width in enumerate(widths):
            self.add_module(f"conv_{index}", nn.Conv2d(cin, width, 3, stride, 1, bias=not use_bn))
            if use_bn:
                self.add_module(f"bn_{index}", nn.BatchNorm2d(width))
            size, cin = (size // 2 if self.pool else (size + 1) // 2), width
        self.depth = len(widths)
        features = cin * size * size
        self.hidden = nn.Linear(features, hidden) if hidden else None
        self.head = nn.Linear(hidden or features, num_classes)

    def forward(self, x):
        for index in range(self.depth):
            x = getattr(self, f"conv_{index}")(x)
            if self.use_bn:
                x = getattr(self, f"bn_{index}")(x)
            x = F.relu(x)
            if self.pool:
                x = F.max_pool2d(x, 2)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # Flax flattens NHWC
        if self.hidden is not None:
            x = F.relu(self.hidden(x))
        return self.head(x)


def twin_network(module, image_shape: tuple[int, int, int]) -> nn.Module:
    """The PyTorch twin of a Flax model of ours (ResNet18, WideResNet, CNN), read from the module's fields."""
    if module.mean is not None:
        raise NotImplementedError("the step twin has no input normalisation: leave the model's mean/std empty")
    common = dict(num_classes=module.num_classes, in_channels=image_shape[-1])
    if isinstance(module, models.ResNet18):
        return torch_twins.ResNet18(**common)
    if isinstance(module, models.WideResNet):
        return torch_twins.WideResNet(depth=module.depth, widen_factor=module.widen_factor, **common)
    if isinstance(module, models.CNN):
        options = dict(widths=module.widths, hidden=module.hidden, use_bn=module.use_bn, downsample=module.downsample)
        return CNN(image_size=image_shape[0], **common, **options)
    raise NotImplementedError(f"no PyTorch twin for {type(module).__name__} (ResNet18, WideResNet, CNN)")


def torch_layout_state(module, variables) -> dict[str, np.ndarray]:
    """Flax variables as a PyTorch state dict (NumPy), keys by mmard_jax.convert's naming rule; models without a
    PyTorch reference (``cnn``) map their Flax names one to one."""
    sequentials = getattr(type(module), "torch_sequentials", None) or frozenset()
    return {
        names.torch_key(collection, path, sequentials): names.to_torch_layout(np.asarray(leaf, np.float32))
        for collection, path, leaf in names.flax_leaves(variables)
    }


def load_flax_variables(net: nn.Module, module, variables) -> nn.Module:
    """Copies Flax ``variables`` of ``module`` into its twin ``net``; every twin entry but BN counters must be set."""
    state = {key: torch.tensor(value) for key, value in torch_layout_state(module, variables).items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith(names.BATCHES_TRACKED)]
    if missing or unexpected:
        raise ValueError(f"twin of {type(module).__name__}: missing {missing}, unexpected {unexpected}")
    return net


# ----------------------------------------------------------------------------------------------------------------
# Losses (mmard_jax/losses.py in PyTorch)
# ----------------------------------------------------------------------------------------------------------------
def kl_div(p_logits, q_logits, reduction: str = "none"):
    """``KL(softmax(p) ‖ softmax(q))`` per example, reduced like losses.reduce_per_example."""
    log_p, log_q = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    per_example = (log_p.exp() * (log_p - log_q)).sum(-1)
    if reduction == "none":
        return per_example
    if reduction == "sum":
        return per_example.sum()
    if reduction == "batchmean":
        return per_example.sum() / per_example.shape[0]
    return per_example.sum() / (per_example.numel() * log_p.shape[-1])


def centred_unit(z):
    z = z.float() - z.float().mean(-1, keepdim=True)
    return z * torch.rsqrt(torch.clamp((z * z).sum(-1, keepdim=True), min=1e-24))


def info_nce(u, v, labels, *, tau: float, mask_same_class: bool):
    """Symmetric InfoNCE over the batch; same-label off-diagonal pairs leave the denominators."""
    u, v = centred_unit(u), centred_unit(v)
    positives = torch.arange(u.shape[0])
    same = (labels[:, None] == labels[None, :]) & (positives[None, :] != positives[:, None])
    total = 0.0
    for rows, columns in ((u, v), (v, u)):
        similarity = rows @ columns.T / tau
        if mask_same_class:
            similarity = similarity.masked_fill(same, float("-inf"))
        total = total + F.cross_entropy(similarity, positives)
    return 0.5 * total


@dataclasses.dataclass(frozen=True)
class TwinMethod:
    """The inner loss (per example, maximised by PGD) and outer loss of MMARD (AdaAD + both parts) or RSLAD."""

    name: str
    cfg: dict

    @property
    def attack_needs_teacher_adv(self) -> bool:
        return self.name == "mmard"

    def inner(self, views: dict, labels):
        if self.name == "rslad":
            return kl_div(views["teacher_nat"], views["student_adv"])
        return kl_div(views["teacher_adv"], views["student_adv"]) + self.cfg["gamma"] * kl_div(
            views["teacher_nat"], views["teacher_adv"]
        )

    def outer(self, views: dict, labels):
        reduction = self.cfg["kl_reduction"]
        weight = self.cfg["rslad_adv_weight"] if self.name == "rslad" else self.cfg["alpha"]
        teacher_for_adv = views["teacher_nat"] if self.name == "rslad" else views["teacher_adv"]
        loss = weight * kl_div(teacher_for_adv, views["student_adv"], reduction) + (1.0 - weight) * kl_div(
            views["teacher_nat"], views["student_nat"], reduction
        )
        if self.name == "rslad":
            return loss
        vertex_t = views["teacher_adv" if self.cfg["teacher_vertex"] == "adversarial" else "teacher_nat"].detach()
        a, b = views["student_nat"], views["student_adv"]
        options = dict(tau=self.cfg["tau_mi"], mask_same_class=self.cfg["mask_same_class"])
        edges = (info_nce(a, b, labels, **options), info_nce(a, vertex_t, labels, **options))
        edges += (info_nce(b, vertex_t, labels, **options),)
        return loss + self.cfg["mi_beta"] * sum(w * e for w, e in zip(self.cfg["mi_weights"], edges, strict=True))


def twin_method(method_cfg) -> TwinMethod:
    """The twin of a config's method section; MMARD only with its defaults' boundary term (KL)."""
    cfg = method_cfg.to_dict()
    name = cfg["name"]
    if name not in SUPPORTED_METHODS or (name == "rslad" and (cfg["mmard_inner"] or cfg["mmard_outer"])):
        raise NotImplementedError(f"the step twin implements {SUPPORTED_METHODS} (plain), not {name!r}")
    if name == "mmard" and (cfg["mmard_base"], cfg["mmard_parts"]) != ("adaad", "both"):
        raise NotImplementedError("the step twin implements MMARD as AdaAD + both parts (method.mmard_base/parts)")
    if name == "mmard" and cfg["boundary"] != "kl":
        raise NotImplementedError("the step twin implements MMARD's 'kl' boundary term only")
    return TwinMethod(name, cfg)


# ----------------------------------------------------------------------------------------------------------------
# Augmentation, PGD, the step
# ----------------------------------------------------------------------------------------------------------------
def augment(images_uint8, crop_padding: int, flip: bool, generator: torch.Generator):
    """NCHW float in [0, 1], each image randomly cropped (zero padding) and flipped, as mmard_jax.data.augment."""
    x = images_uint8.float() / 255.0
    if crop_padding:
        size = x.shape[-2:]
        padded = F.pad(x, (crop_padding,) * 4)
        offsets = torch.randint(0, 2 * crop_padding + 1, (x.shape[0], 2), generator=generator).tolist()
        x = torch.stack([p[:, t : t + size[0], s : s + size[1]] for p, (t, s) in zip(padded, offsets, strict=True)])
    if flip:
        mirror = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x


def project(x_adv, x, eps: float):
    return torch.clamp(x + torch.clamp(x_adv - x, -eps, eps), 0.0, 1.0)


def random_start(x, attack, generator: torch.Generator):
    """The PGD start of mmard_jax.attacks.random_start (L∞), before projection."""
    if attack.init == "normal":
        return x + attack.init_scale * torch.randn(x.shape, generator=generator)
    if attack.init == "uniform":
        return x + (2 * torch.rand(x.shape, generator=generator) - 1) * attack.eps
    if attack.init == "none":
        return x
    raise NotImplementedError(f"the step twin has no {attack.init!r} start")


def pgd(inner: Callable, x, x_init, attack):
    """L∞ PGD ascent on ``inner(x').sum()`` from the projected start; gradients w.r.t. x' only."""
    x_adv = project(x_init, x, attack.eps)
    for _ in range(attack.steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(inner(x_adv).sum(), x_adv)
        x_adv = project(x_adv.detach() + attack.step_size * grad.sign(), x, attack.eps)
    return x_adv.detach()


@dataclasses.dataclass
class TwinStep:
    """One optimizer step of the twin; ``attack`` is mmard_jax's PGDSpec (norm 'linf')."""

    student: nn.Module
    teacher: nn.Module
    method: TwinMethod
    attack: object
    optimizer: torch.optim.Optimizer
    crop_padding: int
    flip: bool
    autocast: torch.dtype | None = None  # torch.bfloat16: mixed precision like the JAX bfloat16 compute
    generator: torch.Generator = dataclasses.field(default_factory=lambda: torch.Generator().manual_seed(0))

    def _forward(self, net: nn.Module, x):
        with torch.autocast("cpu", dtype=self.autocast, enabled=self.autocast is not None):
            return net(x).float()

    def __call__(self, images_nchw_uint8, labels) -> float:
        """A full step as the training loop runs it: augmentation and random start drawn here; the outer loss."""
        x = augment(images_nchw_uint8, self.crop_padding, self.flip, self.generator)
        return self.step(x, random_start(x, self.attack, self.generator), labels)[0]

    def step(self, x, x_init, labels):
        """The step from a given augmented batch and PGD start (NCHW): (outer loss, the adversarial batch x')."""
        student, teacher = self.student, self.teacher
        teacher.eval()
        with torch.no_grad():
            teacher_nat = self._forward(teacher, x)
        student.eval()

        def inner(x_adv):
            views = {"student_adv": self._forward(student, x_adv), "teacher_nat": teacher_nat}
            if self.method.attack_needs_teacher_adv:
                views["teacher_adv"] = self._forward(teacher, x_adv)
            return self.method.inner(views, labels)

        x_adv = pgd(inner, x, x_init, self.attack)
        student.train()
        views = {"student_adv": self._forward(student, x_adv), "student_nat": self._forward(student, x)}
        views["teacher_nat"] = teacher_nat
        if self.method.name == "mmard":
            with torch.no_grad():
                views["teacher_adv"] = self._forward(teacher, x_adv)
        loss = self.method.outer(views, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item(), x_adv


def make_twin_step(spec, job_plan, student_net, teacher_net, learning_rate: float, autocast=None) -> TwinStep:
    """The twin of the JAX step ``spec`` (train.StepSpec) of ``job_plan``: SGD as train.make_optimizer."""
    if spec.attack.norm != "linf":
        raise NotImplementedError("the step twin runs L∞ PGD only")
    optim = job_plan.optim
    if optim.grad_clip_norm > 0:
        raise NotImplementedError("the step twin has no gradient clipping")
    for parameter in teacher_net.parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.SGD(
        student_net.parameters(),
        lr=learning_rate,
        momentum=optim.momentum,
        weight_decay=optim.weight_decay,
        nesterov=optim.nesterov,
    )
    return TwinStep(
        student=student_net,
        teacher=teacher_net,
        method=twin_method(job_plan.method_cfg),
        attack=spec.attack,
        optimizer=optimizer,
        crop_padding=spec.crop_padding,
        flip=spec.flip,
        autocast=autocast,
    )
