"""One-epoch runs of every architecture on a tiny synthetic set; metrics files complete and in range."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from her2_core.aggregate import CLASSES
from model_training import ARCHITECTURES
from model_training.models import TileClassifier, count_parameters, set_trainable_blocks
from model_training.recipes import run_training
from model_training.train import TrainConfig, class_targets

pytestmark = pytest.mark.train

SCALARS = ("macro_auc", "accuracy", "macro_f1", "qwk")


def _small(data, n_train=12):
    return {"train": data["train"].take(np.arange(min(n_train, len(data["train"])))), "test": data["test"]}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_epoch_of_every_architecture_writes_complete_metrics(arch, tiny_data, tmp_path):
    size = 299 if arch == "inception_v3" else 64
    config = TrainConfig(arch=arch, input_size=size, epochs=1, batch_size=6, lr=1e-3, augment=arch == "tiny")
    run_training(_small(tiny_data), config, tmp_path, n_boot=20, progress=False)
    assert (tmp_path / "model.pt").is_file()
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    for level in ("tile", "slide", "patient"):
        m = metrics[level]
        for key in SCALARS:
            assert key in m and key in m["ci95"]
        for key in ("macro_auc", "accuracy", "macro_f1"):
            assert 0.0 <= m[key] <= 1.0, (level, key, m[key])
        assert -1.0 <= m["qwk"] <= 1.0
        assert set(m["per_class_auc"]) == set(CLASSES)
        assert all(0.0 <= v <= 1.0 for v in m["per_class_auc"].values() if np.isfinite(v))
        assert np.array(m["confusion"]).shape == (4, 4) and np.array(m["confusion"]).sum() == m["n"]
    for name in ("roc_tile.png", "roc_slide.png", "confusion_tile.png", "confusion_slide.png"):
        assert (tmp_path / "test" / name).stat().st_size > 1000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train_seconds"] > 0 and summary["total_parameters"] > 0


def test_inception_has_auxiliary_logits_in_training_only():
    model = TileClassifier("inception_v3", 4)
    model.train()
    out = model(torch.rand(2, 3, 299, 299))
    assert out.aux_logits is not None and out.aux_logits.shape == (2, 4)
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 512, 512)).aux_logits is None  # resized to 299 inside


def test_hybrid_unfreezing_grows_trainable_parameters(tiny_data, tmp_path):
    model = TileClassifier("resnet34", 4, input_size=64)
    counts = []
    for k in range(len(model.blocks) + 1):
        set_trainable_blocks(model, k)
        counts.append(count_parameters(model, trainable_only=True))
    assert counts == sorted(counts) and counts[0] < 10_000 and counts[-1] == count_parameters(model)
    config = TrainConfig(arch="resnet34", input_size=64, epochs=3, unfreeze="hybrid", hybrid_blocks=2, batch_size=6)
    run_training(_small(tiny_data), config, tmp_path, n_boot=0, progress=False)
    history = json.loads((tmp_path / "summary.json").read_text())["history"]
    assert [h["trainable_blocks"] for h in history] == [0, 1, 2]
    assert history[0]["trainable_parameters"] < history[1]["trainable_parameters"] < history[2]["trainable_parameters"]


def test_three_class_head_targets_exclude_ihc_zero(tiny_data):
    train = tiny_data["train"]
    targets, mask = class_targets(train, 3, min_tumour=0.05)
    assert targets.shape == (len(train), 3)
    assert np.allclose(targets[mask].sum(axis=1), 1.0, atol=1e-5)
    assert (train.class_fractions[mask][:, 1:].sum(axis=1) >= 0.5).all()


def test_imagenet_weights_load_from_a_local_file_only(tmp_path):
    import torchvision

    reference = torchvision.models.resnet34(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet34.pth")
    model = TileClassifier("resnet34", 4, input_size=64, imagenet_weights=tmp_path / "resnet34.pth")
    assert torch.equal(model.features.layer4[0].conv1.weight, reference.layer4[0].conv1.weight)
    with pytest.raises(ValueError, match="not a torchvision alexnet ImageNet state_dict"):
        TileClassifier("alexnet", 4, imagenet_weights=tmp_path / "resnet34.pth")


def test_balanced_class_weights_equalise_class_mass():
    from model_training.train import balanced_class_weights

    targets = np.array([[1, 0, 0, 0]] * 6 + [[0, 1, 0, 0]] * 2 + [[0, 0, 0.5, 0.5]] * 2, dtype=np.float32)
    w = balanced_class_weights(targets)
    assert w[3] > 0 and np.allclose((targets * w).sum(axis=0), (targets * w).sum(axis=0)[0])
    assert np.isclose(w.mean(), 1.0)
