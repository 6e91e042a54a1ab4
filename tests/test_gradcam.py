"""Grad-CAM (srae.gradcam): analytic float64 gradients on a small chain, and any torchvision
CNN (BatchNorm, residual blocks) left untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from srae.errors import InputError
from srae.excitation import excitation_maps
from srae.gradcam import gradcam_maps


def _chain(inplace: bool) -> nn.Sequential:
    torch.manual_seed(2)  # a seed whose maps are not all zero for either unit
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=inplace), nn.Flatten(),
                         nn.Linear(48, 5), nn.ReLU(), nn.Linear(5, 2)).eval()


def _analytic(chain: nn.Sequential, x: torch.Tensor, unit: int, pre_relu: bool) -> np.ndarray:
    """Grad-CAM at the conv output (pre_relu) or the ReLU output, gradients by hand."""
    conv, lin1, lin2 = chain[0], chain[3], chain[5]
    pre = conv(x).detach().double().numpy()  # (B, 3, 4, 4)
    post = np.maximum(pre, 0)
    w1, b1 = lin1.weight.detach().double().numpy(), lin1.bias.detach().double().numpy()
    w2 = lin2.weight.detach().double().numpy()
    out = []
    for b in range(x.shape[0]):
        h = w1 @ post[b].reshape(-1) + b1
        g = (w1.T @ ((h > 0) * w2[unit])).reshape(3, 4, 4)  # d y / d post
        act = post[b]
        if pre_relu:
            g, act = g * (pre[b] > 0), pre[b]
        alpha = g.mean(axis=(1, 2))
        out.append(np.maximum((alpha[:, None, None] * act).sum(0), 0))
    return np.stack(out)


@pytest.mark.parametrize("readout,pre_relu,inplace", [(1, False, False), (0, True, True), (0, True, False)])
def test_matches_analytic_gradients(readout, pre_relu, inplace) -> None:
    chain = _chain(inplace)
    x = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    maps = gradcam_maps(chain, x, [0, 1], readout=readout)
    assert maps.shape == (3, 2, 4, 4)
    for u in range(2):
        ref = _analytic(chain, x, u, pre_relu)
        assert (ref > 0).sum() > 3
        np.testing.assert_allclose(maps[:, u].double().numpy(), ref, atol=1e-6)


def _hook_reference(model: nn.Module, layer: nn.Module, x: torch.Tensor, units: list[int]) -> torch.Tensor:
    """Textbook Grad-CAM with retain_grad on the hooked output, one backward per unit."""
    store = {}
    h = layer.register_forward_hook(lambda m, i, o: store.setdefault("a", o))
    model.eval()
    y = model(x)
    h.remove()
    a = store["a"]
    maps = []
    for u in units:
        (g,) = torch.autograd.grad(y[:, u].sum(), a, retain_graph=True)
        maps.append(torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1)))
    return torch.stack(maps, 1).detach()


def test_resnet_with_batchnorm_is_left_untouched() -> None:
    torch.manual_seed(2)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    model.train()
    model.conv1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # BN running stats included
    x = torch.rand(2, 3, 32, 32)
    maps = gradcam_maps(model, x, [4, 0, 2], readout="layer3", output_size=32)
    assert maps.shape == (2, 3, 32, 32) and bool((maps >= 0).all())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model.layer3.training
    assert not model.conv1.weight.requires_grad and model.fc.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    raw = gradcam_maps(model, x, [4, 0, 2], readout=model.layer3)
    ref = _hook_reference(model, model.layer3, x, [4, 0, 2])
    model.train()
    torch.testing.assert_close(raw, ref, atol=1e-5, rtol=1e-4)
    assert float(raw.sum()) > 0


def test_gradcam_works_where_excitation_refuses() -> None:
    torch.manual_seed(3)
    chain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)).eval()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(InputError, match="BatchNorm2d"):
        excitation_maps(chain, x, [0], readout=2)
    maps = gradcam_maps(chain, x, [0, 1], readout=2, output_size=8)
    torch.testing.assert_close(maps, nn.functional.interpolate(
        _hook_reference(chain, chain[2], x, [0, 1]), size=(8, 8), mode="bilinear", align_corners=False))


def test_bad_readouts() -> None:
    chain = _chain(False)
    x = torch.rand(1, 2, 4, 4)
    with pytest.raises(InputError, match="no submodule"):
        gradcam_maps(chain, x, [0], readout="nope")
    with pytest.raises(InputError, match="not \\(B, C, H, W\\)"):
        gradcam_maps(chain, x, [0], readout=3)
    with pytest.raises(InputError, match="not a submodule"):
        gradcam_maps(chain, x, [0], readout=nn.ReLU())
    with pytest.raises(InputError, match="out of range"):
        gradcam_maps(chain, x, [7], readout=1)
    assert torch.is_grad_enabled()


def test_grad_contexts_dtypes_and_bad_inputs():
    """Heatmap code is often wrapped in no_grad / inference_mode; float64 batches meet float32
    networks; NaN and uint8 images are named instead of failing deep in torch."""
    import torchvision

    from srae.errors import InputError
    from srae.excitation import excitation_maps

    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.rand(2, 3, 32, 32)
    ref = gradcam_maps(m, x, [0, 2], readout="layer4")
    with torch.no_grad():
        assert torch.equal(gradcam_maps(m, x, [0, 2], readout="layer4"), ref)
    with torch.inference_mode():
        assert torch.equal(gradcam_maps(m, x.clone(), [0, 2], readout="layer4"), ref)
    assert torch.is_grad_enabled()
    torch.testing.assert_close(gradcam_maps(m, x.double(), [0, 2], readout="layer4"), ref)
    for bad, what in ((x * float("nan"), "contains NaN"), ((x * 255).to(torch.uint8), "float images")):
        with pytest.raises(InputError, match=f"Grad-CAM input x: .*{what}"):
            gradcam_maps(m, bad, [0], readout="layer4")
    with pytest.raises(InputError, match="expected a flat nn.Sequential, got ResNet"):
        excitation_maps(m, x, [0], readout=None)


def test_half_batches_large_values_empty_batches_and_numpy_readouts():
    """A float16 batch of ordinary images sums past float16's max (65504): it is still finite and
    gives the float32 result; a float64 value beyond float32's range is named after the cast;
    an empty batch is named; a numpy index works as a readout, as in excitation_maps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(16, 3))
    x = torch.rand(2, 3, 224, 224)
    half = x.half()
    assert float(half.float().sum()) > 65504
    for fn in (excitation_maps, gradcam_maps):
        assert torch.equal(fn(net, half, [0], readout=0), fn(net, half.float(), [0], readout=0))
        assert torch.equal(fn(net, x, [1], readout=np.int64(0)), fn(net, x, [1], readout=0))
        with pytest.raises(InputError, match=r"contains NaN or inf \(after the cast to the model's torch.float32\)"):
            fn(net, x.double() * 1e300, [0], readout=0)
        with pytest.raises(InputError, match=r"empty batch \(B = 0\)"):
            fn(net, x[:0], [0], readout=0)
    with pytest.raises(InputError, match="output_size 0: expected a positive int"):
        excitation_maps(net, x, [0], readout=0, output_size=0)
