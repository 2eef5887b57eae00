"""Classifiers split into ``embed`` (penultimate features x~, dim d) and ``head`` (the last Linear).

The RBC features (spec section 3, eqs. 11-12) need x~_j, the input of the last linear layer, and
the logits ``z_j = head(x~_j)``; every model here therefore satisfies
``forward(x) == head(embed(x))`` and exposes ``feature_dim = d``::

    model = build_model({"name": "lenet5"}, 10, (1, 28, 28), seed=0)
    z = model(x)            # (n, 10)
    h = model.embed(x)      # (n, 84)

Registry :data:`MODELS`: ``mlp``, ``lenet5``, ``resnet18_cifar``, ``resnet34_cifar``,
``resnet18``, ``resnet34``, ``resnet50``.

All models work under ``torch.func`` (``functional_call``, ``jvp``, ``vmap`` of ``grad``). ReLUs
are out-of-place (torchvision's inplace ones do pass ``jvp`` in eval mode; this is a precaution).
What does break the transforms is train-mode BatchNorm, which updates its running statistics in
place (a torch.func transform refuses to mutate a captured buffer).
Wrap virtual steps and meta passes in :func:`frozen_batchnorm_stats`: BatchNorm then normalises
with batch statistics as in training but leaves the running statistics alone (spec section 2),
and the transforms go through.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Mapping

import torch
import torchvision
from torch import nn

from pivotal_ray.config import ConfigError, ModelConfig, _build
from pivotal_ray.core.registry import Registry
from pivotal_ray.core.seeding import derive_seed


class EmbedHeadModel(nn.Module):
    """Base: subclasses set ``self.head`` (nn.Linear(d, C)) and ``self.feature_dim`` and define ``embed``."""

    head: nn.Linear
    feature_dim: int

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # (n, *input_shape) -> (n, d)
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))  # (n, C)


ModelFactory = Callable[[ModelConfig, int, tuple[int, ...]], EmbedHeadModel]
MODELS: Registry[ModelFactory] = Registry("model")


class MLP(EmbedHeadModel):
    """flatten -> ``depth`` x (Linear(width) -> ReLU) -> head Linear(width, C); d = width."""

    def __init__(self, *, in_features: int, width: int, depth: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        self.feature_dim = width

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (n, *shape) -> (n, width)


class LeNet5(EmbedHeadModel):
    """LeNet-5 of the paper's MNIST runs: conv6-conv16-fc120-fc84-fc(C); d = 84.

    conv(5x5, pad 2) -> ReLU -> maxpool 2 -> conv(5x5) -> ReLU -> maxpool 2 -> fc120 -> fc84. For
    1 x 28 x 28 inputs the flattened conv output is 16 x 5 x 5 = 400.
    """

    def __init__(self, *, in_channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()

        def side(s: int) -> int:  # spatial size after the stack: padded conv keeps s, pool, conv -4, pool
            return (s // 2 - 4) // 2

        if side(height) < 1 or side(width) < 1:
            raise ConfigError(f"lenet5 needs images of at least 12 x 12; got {height} x {width}: "
                              "use model.name=mlp or a ResNet")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # (n, 6, H/2, W/2)
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),  # (n, 16, h, w); h = w = 5 for 28 x 28
            nn.Flatten(),  # (n, 400) for 28 x 28
            nn.Linear(16 * side(height) * side(width), 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),  # (n, 84)
        )
        self.head = nn.Linear(84, num_classes)
        self.feature_dim = 84

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (n, C_in, H, W) -> (n, 84)


class ResNetEmbed(EmbedHeadModel):
    """A torchvision ResNet whose ``fc`` is moved out to ``head``; ``embed`` ends at the flattened avgpool."""

    def __init__(self, body: torchvision.models.ResNet, num_classes: int) -> None:
        super().__init__()
        d = body.fc.in_features
        body.fc = nn.Identity()  # torchvision's forward then returns flatten(avgpool(...)): (n, d)
        for m in body.modules():
            if isinstance(m, nn.ReLU):
                # torchvision builds inplace ReLUs; out-of-place ones are safe under every
                # torch.func transform and under create_graph autograd through the virtual step.
                m.inplace = False
        self.body = body
        self.head = nn.Linear(d, num_classes)
        self.feature_dim = d

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (n, 3, H, W) -> (n, d)


_TV_RESNETS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ConfigError(f"model {name!r} needs image inputs (channels, height, width); got input_shape="
                          f"{tuple(input_shape)}: use model.name=mlp for vector data")
    return int(input_shape[0]), int(input_shape[1]), int(input_shape[2])


def _stem(in_channels: int, kernel: int, stride: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, 64, kernel, stride=stride, padding=kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    return conv


def _cifar_resnet(arch: str) -> ModelFactory:
    def build(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> EmbedHeadModel:
        c, _, _ = _image_shape(f"{arch}_cifar", input_shape)
        body = _TV_RESNETS[arch](weights=None)
        # CIFAR variant (He et al. 2016, sec. 4.2 style): 3x3 stride-1 stem, no max-pool, so 32 x 32
        # inputs reach layer4 at 4 x 4 instead of 1 x 1.
        body.conv1 = _stem(c, 3, 1)
        body.maxpool = nn.Identity()
        return ResNetEmbed(body, num_classes)

    return build


def _imagenet_resnet(arch: str) -> ModelFactory:
    def build(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> EmbedHeadModel:
        c, _, _ = _image_shape(arch, input_shape)
        weights = "DEFAULT" if cfg.pretrained else None
        if cfg.pretrained and c != 3:
            raise ConfigError(f"pretrained {arch} needs 3-channel inputs; got {c}: set model.pretrained=false")
        body = _TV_RESNETS[arch](weights=weights)
        if c != 3:
            body.conv1 = _stem(c, 7, 2)
        return ResNetEmbed(body, num_classes)

    return build


@MODELS.register("mlp")
def _mlp(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> EmbedHeadModel:
    return MLP(in_features=math.prod(input_shape), width=cfg.hidden, depth=cfg.depth, num_classes=num_classes)


@MODELS.register("lenet5")
def _lenet5(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> EmbedHeadModel:
    c, h, w = _image_shape("lenet5", input_shape)
    return LeNet5(in_channels=c, height=h, width=w, num_classes=num_classes)


for _arch in ("resnet18", "resnet34"):
    MODELS.register(f"{_arch}_cifar")(_cifar_resnet(_arch))
for _arch in _TV_RESNETS:
    MODELS.register(_arch)(_imagenet_resnet(_arch))


def _model_config(model_cfg: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    if isinstance(model_cfg, ModelConfig):
        return model_cfg
    if isinstance(model_cfg, Mapping):
        return _build(ModelConfig, model_cfg, "the model config")
    raise TypeError(f"model_cfg must be a ModelConfig or a dict; got {type(model_cfg).__name__}")


def build_model(model_cfg: ModelConfig | Mapping[str, Any], num_classes: int, input_shape: tuple[int, ...],
                *, seed: int | None = None) -> EmbedHeadModel:
    """Build the registered model ``model_cfg.name`` (initial weights fixed by ``seed`` when given).

    Parameters
    ----------
    model_cfg : ModelConfig or plain dict (``name``, ``hidden``, ``depth``, ``pretrained``)
    num_classes : C >= 2, the head's output size
    input_shape : shape of one input, e.g. (2,), (1, 28, 28), (3, 32, 32)
    seed : if given, the initial weights are a function of (cfg, shapes, seed) alone and the
        global torch RNG is neither read nor changed; if None, the initialisers draw from the
        global torch RNG as any ``nn.Module`` does (for callers that seed it themselves, e.g.
        under ``torch.random.fork_rng``)

    Returns
    -------
    EmbedHeadModel: ``forward(x) -> (n, C)``, ``embed(x) -> (n, d)``, ``head = nn.Linear(d, C)``,
    ``feature_dim = d``
    """
    cfg = _model_config(model_cfg)
    factory = MODELS.get(cfg.name)
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes} must be >= 2")
    shape = tuple(int(s) for s in input_shape)
    if not shape or min(shape) < 1:
        raise ConfigError(f"input_shape={shape} must be a non-empty tuple of positive sizes")
    if seed is None:
        return factory(cfg, num_classes, shape)
    # nn.Module initialisers draw from the global RNG; fork it so that the weights depend only on
    # `seed` and the caller's RNG state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model", cfg.name))
        return factory(cfg, num_classes, shape)


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, train-mode BatchNorm uses batch statistics but does not update running stats.

    Setting ``track_running_stats=False`` makes ``nn.BatchNorm*`` skip the in-place updates of
    ``running_mean``/``running_var``/``num_batches_tracked`` (which break torch.func transforms
    and must not happen in the virtual step or the meta pass, spec section 2); in eval mode the
    running statistics are still used, so eval behaviour is unchanged.
    """
    bns = [m for m in _batchnorms(model) if m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m in bns:
            m.track_running_stats = True


def has_batchnorm(model: nn.Module) -> bool:
    """True when the model holds BatchNorm layers (their train-mode output depends on the batch)."""
    return bool(_batchnorms(model))


__all__ = [
    "MODELS", "EmbedHeadModel", "MLP", "LeNet5", "ResNetEmbed", "build_model", "frozen_batchnorm_stats",
    "has_batchnorm",
]
