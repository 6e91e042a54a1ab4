"""Backbones: trunk/head split at Z, readouts, checkpoints, excitation compatibility."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from srae.backbones import (
    build_backbone,
    load_backbone,
    resolve_device,
    save_backbone,
    state_dict_sha256,
)
from srae.errors import InputError
from srae.excitation import excitation_maps

ALLOWED = (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
           nn.Flatten, nn.Dropout)


def _check_split(bb, x: torch.Tensor) -> None:
    """Flat chains of allowed modules, Z = fc6 after its ReLU, head(trunk(x)) == net(x)."""
    for chain in (bb.trunk, bb.head):
        assert all(type(m) in ALLOWED for m in chain), [type(m).__name__ for m in chain]
        assert not any(getattr(m, "inplace", False) for m in chain)
    names = [n for n, _ in bb.trunk.named_children()]
    assert names[-2:] == ["fc6", "relu6"] and isinstance(bb.trunk[-2], nn.Linear)
    assert isinstance(bb.trunk[-1], nn.ReLU)
    assert not any(isinstance(m, nn.Dropout) for m in bb.trunk)
    with torch.no_grad():
        z = bb.trunk(x)
        # Independent reference for Z (first 32 units): relu(W6 flatten(trunk up to fc6) + b6).
        pre = bb.trunk[:-2](x).double()
        w6, b6 = bb.trunk[-2].weight[:32].double(), bb.trunk[-2].bias[:32].double()
        ref = torch.relu(pre @ w6.T + b6)
        np.testing.assert_allclose(z[:, :32].double().numpy(), ref.numpy(), atol=1e-4)
        assert z.shape == (x.shape[0], bb.z_dim) and bool((z >= 0).all())
        logits = bb.head(z)
        assert logits.shape == (x.shape[0], bb.num_classes)
        assert torch.equal(logits, bb.net(x))
        assert torch.equal(logits, bb.model(x))


def test_demo_cnn_structure_and_readouts() -> None:
    bb = build_backbone("demo_cnn", 4, input_size=32, seed=0)
    x = torch.randn(3, 3, 32, 32)
    _check_split(bb, x)
    assert bb.z_dim == 256 and bb.default_readout in bb.readouts
    for b, (ch, side) in enumerate([(16, 16), (32, 8), (64, 4), (64, 2)], start=1):
        idx = bb.readouts[f"pool{b}"]
        assert isinstance(bb.trunk[idx], nn.MaxPool2d)
        with torch.no_grad():
            assert bb.trunk[: idx + 1](x).shape == (3, ch, side, side)
    # same seed, same weights; another seed, other weights
    assert bb.file_sha256 == "" and bb.checkpoint_sha256 == state_dict_sha256(bb.net)
    assert build_backbone("demo_cnn", 4, input_size=32, seed=0).checkpoint_sha256 == bb.checkpoint_sha256
    assert build_backbone("demo_cnn", 4, input_size=32, seed=1).checkpoint_sha256 != bb.checkpoint_sha256
    before = bb.checkpoint_sha256
    with torch.no_grad():
        bb.head[-1].bias[0] += 1e-6  # one weight, one ulp-scale change
    assert bb.checkpoint_sha256 != before


@pytest.mark.parametrize("name,convs,pool3", [("vgg16", 13, 16), ("vgg19", 16, 18)])
def test_vgg_structure(name: str, convs: int, pool3: int) -> None:
    bb = build_backbone(name, 5, pretrained=False, input_size=32, seed=0)
    assert bb.input_size == 32 and bb.z_dim == 4096 and bb.num_classes == 5
    assert sum(isinstance(m, nn.Conv2d) for m in bb.trunk) == convs
    assert bb.readouts["pool3"] == pool3 and bb.readouts["fc6"] == len(bb.trunk) - 2
    assert all(isinstance(bb.trunk[bb.readouts[f"pool{b}"]], nn.MaxPool2d) for b in range(1, 6))
    assert [n for n, _ in bb.head.named_children()] == ["drop6", "fc7", "relu7", "drop7", "fc8"]
    # the chains share modules with the torchvision model: its state_dict is the checkpoint
    assert bb.trunk[0] is bb.net.features[0] and bb.head[-1] is bb.net.classifier[6]
    if name == "vgg16":
        _check_split(bb, torch.randn(2, 3, 32, 32))


def test_checkpoint_prefixes_and_classifier_resize(tmp_path: Path) -> None:
    src = build_backbone("demo_cnn", 7, input_size=32, seed=3)
    sd = {f"module.{k}": v for k, v in src.net.state_dict().items()}
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"state_dict": sd, "epoch": 3}, ckpt)
    same = build_backbone("demo_cnn", 7, ckpt, input_size=32)
    assert same.checkpoint_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(same.net(x), src.net(x))
    resized = build_backbone("demo_cnn", 3, ckpt, input_size=32, seed=9)
    assert resized.head[-1].out_features == 3
    for k, v in resized.net.state_dict().items():
        if not k.startswith("fc8."):
            assert torch.equal(v, src.net.state_dict()[k]), k
    # a new classifier is not in the file: the sha must cover the weights actually used
    assert resized.file_sha256 == ""
    assert resized.checkpoint_sha256 == state_dict_sha256(resized.net) != same.checkpoint_sha256
    assert same.file_sha256 == same.checkpoint_sha256


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    bb = build_backbone("demo_cnn", 4, input_size=48, seed=2)
    sha = save_backbone(bb, tmp_path / "m.safetensors")
    assert sha == hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest()
    # same weights, same bytes: the sha256 keys the feature store
    assert save_backbone(bb, tmp_path / "again.safetensors") == sha
    again = load_backbone(tmp_path / "m.safetensors")
    assert again.input_size == 48 and again.num_classes == 4 and again.checkpoint_sha256 == sha
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(again.forward(x)[1], bb.forward(x)[1])


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="resnet"):
        build_backbone("resnet50", 4)
    with pytest.raises(InputError, match="divisible"):
        build_backbone("demo_cnn", 4, input_size=40)
    with pytest.raises(InputError, match="not found"):
        build_backbone("demo_cnn", 4, tmp_path / "none.pth")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(InputError, match="does not fit"):
        build_backbone("demo_cnn", 4, other)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read"):
        build_backbone("demo_cnn", 4, garbage)


def test_vgg_without_hub_weights_names_the_expected_file(tmp_path: Path) -> None:
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(InputError, match=r"vgg16-397923af\.pth"):
            build_backbone("vgg16", 4)
    finally:
        torch.hub.set_dir(old)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_trunk_and_head_feed_excitation_backprop() -> None:
    bb = build_backbone("demo_cnn", 3, input_size=32, seed=0)
    x = torch.rand(2, 3, 32, 32)
    maps = excitation_maps(bb.model, x, [0, 2], readout=bb.default_readout)
    side = 32 // 2 ** int(bb.default_readout[-1])
    assert maps.shape == (2, 2, side, side) and bool((maps >= 0).all())
    by_index = excitation_maps(bb.model, x, [0, 2], readout=bb.readouts[bb.default_readout])
    assert torch.equal(maps, by_index)


def test_class_count_must_be_a_positive_integer():
    from srae.errors import InputError

    for bad in ("3", 0, 1, 2.0, True):
        with pytest.raises(InputError, match="num_classes must be an integer >= 2"):
            build_backbone("demo_cnn", bad)
    assert build_backbone("demo_cnn", np.int64(3), seed=0).num_classes == 3


def test_default_readout_names_what_each_backbone_uses() -> None:
    """The report names the readout from default_readout (no backbone is built for it)."""
    from srae.backbones import BACKBONES, build_backbone, default_readout

    for name in BACKBONES:
        with torch.device("meta"):
            bb = build_backbone(name, 3, pretrained=False)
        assert bb.default_readout == default_readout(name) and default_readout(name) in bb.heatmap_readouts
