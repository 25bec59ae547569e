"""Model registry: ``build_model(name, in_channels, num_classes, image_size)``.

Names:

- ``small_cnn``, ``mlp``: fast CPU networks (:mod:`raymeta.models.small`).
- ``resnet8``, ``resnet20``, ``resnet32``, ``resnet56``: CIFAR-style ResNets
  (:mod:`raymeta.models.resnet_cifar`).
- ``char_lstm``: a character-level 2-layer LSTM language model (:mod:`raymeta.models.charlstm`;
  ``num_classes`` is the vocabulary size).
- ``resnet18``: the CIFAR-style ResNet-18 of the MLR-SNet paper — torchvision's ``resnet18``
  with a 3x3 stride-1 stem and no max-pool.
- ``tv:NAME`` (or a bare torchvision name such as ``mobilenet_v2``, ``shufflenet_v2_x1_0``):
  any torchvision classification model, built untrained with ``num_classes`` outputs and its
  first convolution rebuilt for ``in_channels``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from raymeta.errors import ConfigError
from raymeta.models.charlstm import build_char_lstm
from raymeta.models.resnet_cifar import CifarResNet
from raymeta.models.small import MLP, SmallCNN


def _resnet18_cifar(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "small_cnn": SmallCNN,
    "mlp": MLP,
    "resnet8": lambda c, k, s: CifarResNet(8, c, k),
    "resnet20": lambda c, k, s: CifarResNet(20, c, k),
    "resnet32": lambda c, k, s: CifarResNet(32, c, k),
    "resnet56": lambda c, k, s: CifarResNet(56, c, k),
    "resnet18": _resnet18_cifar,
    "char_lstm": build_char_lstm,
}


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Rebuild the first ``Conv2d`` of ``model`` with ``in_channels`` inputs (same geometry)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(
                        parent,
                        name,
                        nn.Conv2d(
                            in_channels,
                            child.out_channels,
                            child.kernel_size,
                            child.stride,
                            child.padding,
                            bias=child.bias is not None,
                        ),
                    )
                return


def check_model_name(name: str) -> None:
    """Check that ``name`` names a model :func:`build_model` can build (in the driver, before
    any worker starts).

    Raises:
        ConfigError: the name is unknown (one line with the accepted names).
    """
    if name in MODELS or name.removeprefix("tv:") in _torchvision_names():
        return
    raise ConfigError(
        f"unknown model {name!r}; accepted: {', '.join(MODELS)}, or tv:NAME for a torchvision "
        "classification model (e.g. tv:mobilenet_v2)"
    )


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build an untrained model by registry name.

    Args:
        name: a key of :data:`MODELS`, ``tv:NAME`` or a torchvision classification model name.
        in_channels: image channels ``C`` of inputs ``(B, C, S, S)``.
        num_classes: number of output logits.
        image_size: side ``S`` of the square input images.

    Raises:
        ConfigError: the name is unknown.
    """
    check_model_name(name)
    if name in MODELS:
        return MODELS[name](in_channels, num_classes, image_size)
    import torchvision

    model = torchvision.models.get_model(
        name.removeprefix("tv:"), weights=None, num_classes=num_classes
    )
    _adapt_first_conv(model, in_channels)
    return model
