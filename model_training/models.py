"""Tile classifiers: a tiny CNN (the bundled default) and six torchvision architectures.

Every model is a :class:`TileClassifier`: a backbone producing one feature
vector per tile, a class head (3 classes 1+/2+/3+ as in the dual-centre study,
or 4 classes 0/1+/2+/3+ for ASCO/CAP) and a tumour-fraction head. The model
takes RGB/255 of Macenko-normalised tiles (float32 NCHW in [0, 1]) at any
size: it resizes to its ``input_size`` (Inception-v3: 299) by area averaging
(two constant matrix products, so the resize exports to ONNX) and applies the
ImageNet mean/std inside the graph, so the exported ONNX needs no
preprocessing beyond the worker's ``/255``.

Backbones are ordered lists of **blocks** (input to output) for hybrid
unfreezing (:func:`set_trainable_blocks`): the heads are always trainable,
and the last ``k`` blocks can be unfrozen progressively.

ImageNet weights are never downloaded: ``imagenet_weights`` is a local
``state_dict`` file of the torchvision model (1000-class head), e.g. one the
user copied from a machine with internet access.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torchvision.models as tvm
from torch import nn

from her2_core.aggregate import CLASSES
from model_training import ARCHITECTURES

#: Class names of the two heads: 4 for ASCO/CAP, 3 (no IHC 0) as in the dual-centre study.
HEAD_CLASSES: dict[int, tuple[str, ...]] = {4: CLASSES, 3: CLASSES[1:]}
#: Native input size per architecture (the tiny CNN sees the full 512 px tile).
DEFAULT_INPUT_SIZE = {"tiny": 512, "alexnet": 224, "vgg16": 224, "resnet34": 224, "densenet121": 224,
                      "inception_v3": 299, "swin_t": 224}
#: Smallest input each architecture accepts (Inception-v3 with auxiliary logits needs 299).
MIN_INPUT_SIZE = {"tiny": 32, "alexnet": 63, "vgg16": 32, "resnet34": 32, "densenet121": 32,
                  "inception_v3": 299, "swin_t": 32}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Weight of Inception-v3's auxiliary-logit loss (as in the Inception paper / torchvision references).
AUX_LOSS_WEIGHT = 0.4


class TileOutput(NamedTuple):
    """Raw outputs: class logits (N, C), tumour logit (N,), auxiliary class logits (Inception, training only)."""

    logits: torch.Tensor
    tumour_logit: torch.Tensor
    aux_logits: torch.Tensor | None


@dataclass
class Backbone:
    """Feature extractor (N, 3, S, S) -> (N, F), its blocks for unfreezing, and an optional auxiliary head."""

    features: nn.Module
    n_features: int
    blocks: list[nn.Module]
    aux_classifier: nn.Linear | None = None


def _conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    padding = 0 if kernel == stride else kernel // 2
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _tiny(n_classes: int) -> Backbone:
    """~250 k parameters: a 4x4/4 patchify stem, three stride-2 3x3 stages, one 3x3 stage, global pooling."""
    widths = (24, 32, 64, 128, 128)
    blocks = [_conv(3, widths[0], 4, 4), _conv(widths[0], widths[1], 3, 2), _conv(widths[1], widths[2], 3, 2),
              _conv(widths[2], widths[3], 3, 2), _conv(widths[3], widths[4], 3, 1)]
    features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Backbone(features, widths[-1], blocks)


def _alexnet(m: tvm.AlexNet, n_classes: int) -> Backbone:
    m.classifier[-1] = nn.Identity()
    f = m.features
    return Backbone(m, 4096, [f[0:3], f[3:6], f[6:8], f[8:10], f[10:], m.classifier])


def _vgg16(m: tvm.VGG, n_classes: int) -> Backbone:
    m.classifier[-1] = nn.Identity()
    pools = [i for i, layer in enumerate(m.features) if isinstance(layer, nn.MaxPool2d)]
    starts = [0] + [p + 1 for p in pools[:-1]]
    return Backbone(m, 4096, [m.features[s : p + 1] for s, p in zip(starts, pools)] + [m.classifier])


def _resnet34(m: tvm.ResNet, n_classes: int) -> Backbone:
    m.fc = nn.Identity()
    return Backbone(m, 512, [nn.ModuleList([m.conv1, m.bn1]), m.layer1, m.layer2, m.layer3, m.layer4])


def _densenet121(m: tvm.DenseNet, n_classes: int) -> Backbone:
    m.classifier = nn.Identity()
    f = m.features
    return Backbone(m, 1024, [nn.ModuleList([f.conv0, f.norm0]),
                              nn.ModuleList([f.denseblock1, f.transition1]),
                              nn.ModuleList([f.denseblock2, f.transition2]),
                              nn.ModuleList([f.denseblock3, f.transition3]),
                              nn.ModuleList([f.denseblock4, f.norm5])])


def _inception_v3(m: tvm.Inception3, n_classes: int) -> Backbone:
    m.fc = nn.Identity()
    m.AuxLogits.fc = nn.Linear(m.AuxLogits.fc.in_features, n_classes)
    stem = [m.Conv2d_1a_3x3, m.Conv2d_2a_3x3, m.Conv2d_2b_3x3, m.Conv2d_3b_1x1, m.Conv2d_4a_3x3]
    return Backbone(m, 2048, [nn.ModuleList(stem),
                              nn.ModuleList([m.Mixed_5b, m.Mixed_5c, m.Mixed_5d]),
                              nn.ModuleList([m.Mixed_6a, m.Mixed_6b, m.Mixed_6c, m.Mixed_6d, m.Mixed_6e]),
                              nn.ModuleList([m.Mixed_7a, m.Mixed_7b, m.Mixed_7c])],
                    aux_classifier=m.AuxLogits.fc)


def _swin_t(m: tvm.SwinTransformer, n_classes: int) -> Backbone:
    m.head = nn.Identity()
    f = m.features
    return Backbone(m, 768, [f[0], nn.ModuleList([f[1], f[2]]), nn.ModuleList([f[3], f[4]]),
                             nn.ModuleList([f[5], f[6]]), nn.ModuleList([f[7], m.norm])])


_TORCHVISION: dict[str, tuple[Callable[..., nn.Module], Callable[[nn.Module, int], Backbone]]] = {
    "alexnet": (tvm.alexnet, _alexnet),
    "vgg16": (tvm.vgg16, _vgg16),
    "resnet34": (tvm.resnet34, _resnet34),
    "densenet121": (tvm.densenet121, _densenet121),
    "inception_v3": (lambda **kw: tvm.inception_v3(aux_logits=True, init_weights=True, **kw), _inception_v3),
    "swin_t": (tvm.swin_t, _swin_t),
}


def build_backbone(arch: str, n_classes: int, imagenet_weights: Path | None = None) -> Backbone:
    """The backbone of ``arch``, with ImageNet weights loaded from a local file if given."""
    if arch == "tiny":
        if imagenet_weights is not None:
            raise ValueError("the tiny CNN has no ImageNet weights; drop --imagenet-weights")
        return _tiny(n_classes)
    if arch not in _TORCHVISION:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    make, adapt = _TORCHVISION[arch]
    model = make(weights=None)
    if imagenet_weights is not None:
        state = torch.load(imagenet_weights, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{imagenet_weights} is not a torchvision {arch} ImageNet state_dict: {exc}") from exc
    return adapt(model, n_classes)


@lru_cache(maxsize=16)
def area_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix whose row i averages input pixels over output pixel i's footprint (box filter)."""
    edges = np.arange(n_out + 1) * n_in / n_out
    lo, hi = edges[:-1, None], edges[1:, None]
    pixels = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, pixels + 1) - np.maximum(lo, pixels), 0.0, None)
    return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def area_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, C, H, W) to (N, C, size, size) by area averaging (antialiased; ONNX: two MatMuls)."""
    rows = torch.from_numpy(area_resize_matrix(int(x.shape[-2]), size))
    cols = torch.from_numpy(area_resize_matrix(int(x.shape[-1]), size))
    return torch.matmul(torch.matmul(rows, x), cols.T)


class TileClassifier(nn.Module):
    """Backbone + class head + tumour-fraction head; input RGB/255 (N, 3, H, W)."""

    def __init__(self, arch: str, n_classes: int = 4, input_size: int | None = None,
                 imagenet_weights: Path | None = None) -> None:
        super().__init__()
        if n_classes not in HEAD_CLASSES:
            raise ValueError(f"n_classes must be one of {sorted(HEAD_CLASSES)}, got {n_classes}")
        self.arch = arch
        self.classes = HEAD_CLASSES[n_classes]
        self.input_size = input_size or DEFAULT_INPUT_SIZE[arch]
        if self.input_size < MIN_INPUT_SIZE[arch]:
            raise ValueError(f"{arch} needs input_size >= {MIN_INPUT_SIZE[arch]}, got {self.input_size}")
        backbone = build_backbone(arch, n_classes, imagenet_weights)
        self.features = backbone.features
        self.blocks = backbone.blocks
        self.aux_classifier = backbone.aux_classifier
        self.classifier = nn.Linear(backbone.n_features, n_classes)
        self.tumour = nn.Linear(backbone.n_features, 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        #: Softmax temperature of the class logits, 1 while training, set by calibration afterwards.
        self.register_buffer("temperature", torch.ones(()))
        self.trainable_blocks = len(self.blocks)

    def forward(self, x: torch.Tensor) -> TileOutput:
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = area_resize(x, self.input_size)
        out = self.features((x - self.mean) / self.std)
        aux = None
        if isinstance(out, tvm.InceptionOutputs):
            out, aux = out.logits, out.aux_logits
        return TileOutput(self.classifier(out) / self.temperature, self.tumour(out).squeeze(1), aux)

    def train(self, mode: bool = True) -> TileClassifier:
        """Train mode, except frozen blocks stay in eval mode (their BatchNorm statistics are kept)."""
        super().train(mode)
        for block in self.blocks[: len(self.blocks) - self.trainable_blocks]:
            block.eval()
        return self


def set_trainable_blocks(model: TileClassifier, k: int) -> None:
    """Train the heads and the last ``k`` backbone blocks; freeze the rest (``k = len(blocks)``: all)."""
    k = max(0, min(k, len(model.blocks)))
    model.trainable_blocks = k
    for p in model.features.parameters():
        p.requires_grad_(False)
    for block in model.blocks[len(model.blocks) - k :]:
        for p in block.parameters():
            p.requires_grad_(True)
    if k == len(model.blocks):  # everything, including parameters outside the listed blocks
        for p in model.features.parameters():
            p.requires_grad_(True)
    for head in (model.classifier, model.tumour, model.aux_classifier):
        if head is not None:
            for p in head.parameters():
                p.requires_grad_(True)
    model.train(model.training)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
