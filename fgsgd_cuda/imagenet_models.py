"""Models of :mod:`fgsgd_cuda.train_imagenet`: torchvision's ResNets, SE-ResNets on them, and a tiny CNN.

- ``resnet18/34/50/101/152``: torchvision's ResNet (v1.5: the stride sits on the 3×3 conv of a bottleneck),
  randomly initialised (``weights=None``).
- ``se_resnet50/101``: the same ResNet with a squeeze-and-excitation module (Hu et al. 2018) in every
  bottleneck, after the last batch norm and before the residual addition: global average pool, 1×1 conv with
  bias C → C/16, ReLU, 1×1 conv with bias C/16 → C, sigmoid, channel-wise scale (as timm's legacy_seresnet /
  Cadene's pretrainedmodels; 28,088,024 / 49,326,872 parameters with 1000 classes).
- ``tiny``: a few 3×3 convs with batch norm, for tests and smoke runs; no torchvision.

torchvision is imported only inside the functions that build its models (it does not import against every
torch build), so importing this module never needs it.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
SE_RESNETS = {"se_resnet50": (3, 4, 6, 3), "se_resnet101": (3, 4, 23, 3)}
ARCHS = ("tiny", *TORCHVISION_RESNETS, *SE_RESNETS)
SE_REDUCTION = 16


class TinyCNN(nn.Module):
    """Four 3×3 conv + batch norm + ReLU blocks (two of them stride 2), global average pooling, a linear
    classifier. Its 3×3 convs are FG-SGD's manifold weights; it runs in a second on 16×16 images on a CPU."""

    def __init__(self, num_classes: int = 1000, width: int = 16):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(3, width, 1), *block(width, width, 1), *block(width, 2 * width, 2),
                                      *block(2 * width, 2 * width, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class SEModule(nn.Module):
    """Squeeze-and-excitation on ``channels`` channels: x · sigmoid(fc2(relu(fc1(mean_hw(x))))), with fc1, fc2
    1×1 convs with bias, C → max(1, C // reduction) → C."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.relu(self.fc1(s))))


@functools.lru_cache(maxsize=None)
def se_bottleneck_class() -> type:
    """torchvision's ``Bottleneck`` with an :class:`SEModule` (``self.se``) after ``bn3``, before the residual
    addition. Made on first use (the base class needs torchvision)."""
    from torchvision.models.resnet import Bottleneck

    class SEBottleneck(Bottleneck):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.se = SEModule(self.bn3.num_features, SE_REDUCTION)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.se(self.bn3(self.conv3(out)))
            return self.relu(out + identity)

    SEBottleneck.__module__ = __name__
    return SEBottleneck


def se_resnet(layers, num_classes: int = 1000) -> nn.Module:
    """torchvision's ``ResNet`` of SE bottlenecks with ``layers`` blocks per stage."""
    from torchvision.models.resnet import ResNet

    return ResNet(se_bottleneck_class(), list(layers), num_classes=num_classes)


def build_model(arch: str, num_classes: int = 1000) -> nn.Module:
    """A randomly initialised model of ``arch`` (one of :data:`ARCHS`) with ``num_classes`` outputs."""
    if arch == "tiny":
        return TinyCNN(num_classes)
    if arch in SE_RESNETS:
        return se_resnet(SE_RESNETS[arch], num_classes)
    if arch in TORCHVISION_RESNETS:
        import torchvision

        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    raise ValueError(f"arch: unknown architecture {arch!r}; expected one of {ARCHS}")
