"""Training loop: soft class targets, tumour-fraction regression, hybrid layer unfreezing.

Loss per tile = soft cross-entropy between the class logits and the tile's
tumour class fractions (only where the tile is at least ``min_tumour``
tumour: the class of a tile without tumour is meaningless) + binary
cross-entropy between the tumour logit and the tile's tumour fraction (where
known). Inception-v3 adds ``AUX_LOSS_WEIGHT`` x the auxiliary head's class loss.

Unfreezing schedules (:class:`TrainConfig.unfreeze`):

* ``full`` - every parameter trains from the first epoch (full fine-tuning);
* ``head`` - only the heads train (linear probing);
* ``hybrid`` - the heads train first, then the last backbone blocks are
  unfrozen one by one, up to ``hybrid_blocks``, over equal shares of the epochs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from her2_core.aggregate import class_percentages
from model_training.augment import Augment
from model_training.models import AUX_LOSS_WEIGHT, TileClassifier, count_parameters, set_trainable_blocks
from model_training.tileset import TileSet

UNFREEZE = ("full", "head", "hybrid")
#: Softmax temperatures tried by :func:`calibrate_temperature`.
TEMPERATURES = np.geomspace(0.1, 2.0, 33)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (recorded in the checkpoint and the model card)."""

    arch: str = "tiny"
    n_classes: int = 4
    input_size: int | None = None
    epochs: int = 10
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    unfreeze: str = "full"
    hybrid_blocks: int = 2
    augment: bool = True
    class_balance: bool = False
    min_tumour: float = 0.05
    seed: int = 0
    imagenet_weights: str | None = None

    def __post_init__(self) -> None:
        if self.unfreeze not in UNFREEZE:
            raise ValueError(f"unfreeze must be one of {UNFREEZE}, got {self.unfreeze!r}")


@dataclass
class TrainResult:
    """The trained model and what training cost."""

    model: TileClassifier
    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    max_trainable_parameters: int = 0
    total_parameters: int = 0
    temperature: float = 1.0


def class_targets(tiles: TileSet, n_classes: int, min_tumour: float) -> tuple[np.ndarray, np.ndarray]:
    """Soft class targets (N, n_classes) and the mask of tiles whose class loss counts.

    4 classes: the tile's tumour class fractions. 3 classes (1+/2+/3+, no IHC 0):
    the 1+..3+ fractions renormalised, counted only where they make up at least
    half of the tile's tumour. Tiles with a known tumour fraction below
    ``min_tumour`` never count.
    """
    fractions = tiles.class_fractions.astype(np.float32)
    tumour = tiles.tumour_fraction
    mask = ~(np.isfinite(tumour) & (tumour < min_tumour))
    if n_classes == 3:
        stained = fractions[:, 1:].sum(axis=1)
        mask &= stained >= 0.5
        fractions = fractions[:, 1:] / np.maximum(stained, 1e-6)[:, None]
    return fractions, mask


def balanced_class_weights(targets: np.ndarray) -> np.ndarray:
    """Per-class loss weights (C,) inverse to the classes' total target mass, mean 1 over present classes."""
    mass = targets.sum(axis=0)
    weights = np.where(mass > 0, 1.0 / np.maximum(mass, 1e-9), 0.0)
    return (weights / weights[mass > 0].mean()).astype(np.float32)


def to_tensor(tiles: np.ndarray) -> torch.Tensor:
    """uint8 NHWC tiles -> float32 NCHW RGB/255 (the model's input convention)."""
    return torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float().div_(255.0)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean over tiles of the cross-entropy against soft targets (weight 0: tile ignored)."""
    loss = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)
    return (loss * weight).sum() / weight.sum().clamp_min(1e-6)


def tile_loss(out, targets: torch.Tensor, weight: torch.Tensor, tumour: torch.Tensor) -> torch.Tensor:
    """Class loss (+ auxiliary) + tumour-fraction BCE on the tiles where it is known."""
    loss = soft_cross_entropy(out.logits, targets, weight)
    if out.aux_logits is not None:
        loss = loss + AUX_LOSS_WEIGHT * soft_cross_entropy(out.aux_logits, targets, weight)
    known = torch.isfinite(tumour)
    if known.any():
        loss = loss + F.binary_cross_entropy_with_logits(out.tumour_logit[known], tumour[known])
    return loss


def _stage_blocks(config: TrainConfig, n_blocks: int, epoch: int) -> int:
    """Number of trainable backbone blocks at ``epoch`` under the unfreezing schedule."""
    if config.unfreeze == "full":
        return n_blocks
    if config.unfreeze == "head":
        return 0
    stages = min(config.hybrid_blocks, n_blocks) + 1
    return min(stages - 1, epoch * stages // max(1, config.epochs))


def fit(train: TileSet, config: TrainConfig, progress: bool = True) -> TrainResult:
    """Train a new :class:`TileClassifier` on ``train``; deterministic given ``config.seed``."""
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    weights = Path(config.imagenet_weights) if config.imagenet_weights else None
    model = TileClassifier(config.arch, config.n_classes, config.input_size, weights)
    targets, mask = class_targets(train, config.n_classes, config.min_tumour)
    keep = np.flatnonzero(mask | np.isfinite(train.tumour_fraction))
    if len(keep) == 0:
        raise ValueError("no training tiles with a usable target")
    tile_weight = mask.astype(np.float32)  # class-loss weight per tile
    if config.class_balance:
        tile_weight *= targets @ balanced_class_weights(targets[mask])
    augment = Augment() if config.augment else None
    steps_per_epoch = -(-len(keep) // config.batch_size)
    result = TrainResult(model, config, total_parameters=count_parameters(model))
    optimiser = None
    blocks = -1
    start = time.perf_counter()
    for epoch in range(config.epochs):
        wanted = _stage_blocks(config, len(model.blocks), epoch)
        if wanted != blocks:  # a new unfreezing stage: fresh optimiser over the trainable parameters
            blocks = wanted
            set_trainable_blocks(model, blocks)
            params = [p for p in model.parameters() if p.requires_grad]
            optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
            result.max_trainable_parameters = max(result.max_trainable_parameters, count_parameters(model, True))
        lr = 0.5 * config.lr * (1 + np.cos(np.pi * epoch / config.epochs))  # cosine decay per epoch
        for group in optimiser.param_groups:
            group["lr"] = lr
        model.train()
        order = keep[torch.randperm(len(keep), generator=g).numpy()]
        total, seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                   disable=not progress, leave=False)
        for step in bar:
            idx = np.sort(order[step * config.batch_size : (step + 1) * config.batch_size])
            x = to_tensor(train.tiles[idx])
            if augment is not None:
                x = augment(x, g)
            out = model(x)
            loss = tile_loss(out, torch.from_numpy(targets[idx]), torch.from_numpy(tile_weight[idx]),
                             torch.from_numpy(train.tumour_fraction[idx]).float())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        result.history.append({"epoch": epoch + 1, "loss": total / seen, "lr": lr, "trainable_blocks": blocks,
                               "trainable_parameters": count_parameters(model, True),
                               "seconds": time.perf_counter() - start})
        if progress:
            print(f"epoch {epoch + 1}/{config.epochs}: loss {total / seen:.4f}, {blocks} trainable blocks, "
                  f"{time.perf_counter() - start:.0f} s")
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


@torch.no_grad()
def predict(model: TileClassifier, tiles: np.ndarray, batch_size: int = 32, progress: bool = False,
            logits: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, C) (or, with ``logits``, the class logits) and tumour fractions (N,) of uint8 tiles."""
    model.eval()
    classes, tumour = [], []
    for i in tqdm(range(0, len(tiles), batch_size), desc="predicting", unit="batch", disable=not progress,
                  leave=False):
        out = model(to_tensor(tiles[i : i + batch_size]))
        classes.append((out.logits if logits else F.softmax(out.logits, dim=1)).numpy())
        tumour.append(torch.sigmoid(out.tumour_logit).numpy())
    n_classes = len(model.classes)
    return (np.concatenate(classes) if classes else np.zeros((0, n_classes), np.float32),
            np.concatenate(tumour) if tumour else np.zeros(0, np.float32))


def calibrate_temperature(model: TileClassifier, val: TileSet, candidates: np.ndarray = TEMPERATURES) -> float:
    """Set (and return) the softmax temperature that best reproduces the validation slides' class percentages.

    The worker turns tile probabilities into tumour-area percentages and
    applies the 10 % thresholds of ASCO/CAP to them, so the probabilities must
    be calibrated as *area shares*: the temperature minimises the mean
    absolute error between predicted and true slide percentages on the
    validation slides (never the test centre). 4-class heads only.
    """
    if len(model.classes) != 4 or not len(val):
        return float(model.temperature)
    model.temperature.fill_(1.0)
    logits, tumour = predict(model, val.tiles, logits=True)
    truth = np.array([s.percentages for s in val.slides])
    slides = np.unique(val.slide)
    errors = []
    for t in candidates:
        probs = F.softmax(torch.from_numpy(logits / t), dim=1).numpy()
        pct = np.array([list(class_percentages(probs[val.slide == s], tumour[val.slide == s]).values())
                        for s in slides])
        errors.append(np.nanmean(np.abs(pct - truth[slides])))
    best = float(candidates[int(np.argmin(errors))])
    model.temperature.fill_(best)
    return best


def save_checkpoint(result: TrainResult, path: Path, tile_size: int, mpp: float, extra: dict | None = None) -> None:
    """Weights + everything needed to rebuild, evaluate and export the model."""
    torch.save({"config": asdict(result.config), "state_dict": result.model.state_dict(), "tile_size": tile_size,
                "mpp": mpp, "history": result.history, "seconds": result.seconds,
                "max_trainable_parameters": result.max_trainable_parameters,
                "total_parameters": result.total_parameters, **(extra or {})}, path)


def load_checkpoint(path: Path) -> tuple[TileClassifier, dict]:
    """The model of a checkpoint (eval mode) and the checkpoint's metadata."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    config = TrainConfig(**ckpt["config"])
    model = TileClassifier(config.arch, config.n_classes, config.input_size)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt
