"""Excitation Backprop (srae.excitation) against a hand case and an independent float64
reference: convolutions and average pools as explicit dense matrices, max pooling by loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from srae.errors import InputError
from srae.excitation import (
    excitation_maps,
    excitation_maps_chunked,
    excitation_maps_multi,
    excitation_signals,
    resize_maps,
)

# ---------------------------------------------------------------- float64 reference


def conv_matrix(w: np.ndarray, in_shape, stride, pad, dil) -> tuple[np.ndarray, tuple]:
    """Dense (out_dim, in_dim) matrix of a zero-padded 2-D convolution, built by loops."""
    o_ch, i_ch, kh, kw = w.shape
    _, h, wd = in_shape
    oh = (h + 2 * pad - dil * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * pad - dil * (kw - 1) - 1) // stride + 1
    mat = np.zeros((o_ch * oh * ow, i_ch * h * wd))
    for o in range(o_ch):
        for oy in range(oh):
            for ox in range(ow):
                row = (o * oh + oy) * ow + ox
                for c in range(i_ch):
                    for ky in range(kh):
                        for kx in range(kw):
                            iy, ix = oy * stride - pad + ky * dil, ox * stride - pad + kx * dil
                            if 0 <= iy < h and 0 <= ix < wd:
                                mat[row, (c * h + iy) * wd + ix] += w[o, c, ky, kx]
    return mat, (o_ch, oh, ow)


def avgpool_matrix(in_shape, windows_y, windows_x, divisor) -> np.ndarray:
    """Dense average-pool matrix from explicit windows (lists of (start, end))."""
    c_n, h, wd = in_shape
    oh, ow = len(windows_y), len(windows_x)
    mat = np.zeros((c_n * oh * ow, c_n * h * wd))
    for c in range(c_n):
        for oy, (y0, y1) in enumerate(windows_y):
            for ox, (x0, x1) in enumerate(windows_x):
                div = divisor if divisor else (y1 - y0) * (x1 - x0)
                for iy in range(y0, y1):
                    for ix in range(x0, x1):
                        mat[(c * oh + oy) * ow + ox, (c * h + iy) * wd + ix] = 1.0 / div
    return mat


def maxpool_argmax(a: np.ndarray, shape, k, stride, pad) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Loop max pool on a flat (C*H*W,) vector: outputs and the flat index of each max."""
    c_n, h, wd = shape
    oh = (h + 2 * pad - k) // stride + 1
    ow = (wd + 2 * pad - k) // stride + 1
    out, arg = np.zeros(c_n * oh * ow), np.zeros(c_n * oh * ow, dtype=int)
    for c in range(c_n):
        for oy in range(oh):
            for ox in range(ow):
                best, besti = -math.inf, -1
                for ky in range(k):
                    for kx in range(k):
                        iy, ix = oy * stride - pad + ky, ox * stride - pad + kx
                        if 0 <= iy < h and 0 <= ix < wd:
                            j = (c * h + iy) * wd + ix
                            if a[j] > best:
                                best, besti = a[j], j
                row = (c * oh + oy) * ow + ox
                out[row], arg[row] = best, besti
    return out, arg, (c_n, oh, ow)


def reference(chain: nn.Sequential, x: np.ndarray, unit: int, contrastive: bool) -> dict[int, np.ndarray]:
    """Signal at every module output (key -1: the input) for one image, float64."""
    a, shape = x.reshape(-1).astype(np.float64), x.shape
    saved = []  # per module: ("mat", M, a) / ("max", arg, in_dim) / ("pass",)
    for m in chain:
        if isinstance(m, nn.Conv2d):
            mat, new = conv_matrix(m.weight.detach().double().numpy(), shape, m.stride[0], m.padding[0],
                                   m.dilation[0])
            saved.append(("mat", mat, a))
            a = mat @ a + np.repeat(m.bias.detach().double().numpy(), new[1] * new[2])
            shape = new
        elif isinstance(m, nn.Linear):
            mat = m.weight.detach().double().numpy()
            saved.append(("mat", mat, a))
            a, shape = mat @ a + m.bias.detach().double().numpy(), (mat.shape[0],)
        elif isinstance(m, nn.ReLU):
            saved.append(("pass",))
            a = np.maximum(a, 0)
        elif isinstance(m, nn.MaxPool2d):
            out, arg, new = maxpool_argmax(a, shape, m.kernel_size, m.stride, m.padding)
            saved.append(("max", arg, a.size))
            a, shape = out, new
        elif isinstance(m, nn.AvgPool2d):
            k, s = m.kernel_size, m.stride
            c, h, w = shape
            wy = [(i * s, i * s + k) for i in range((h - k) // s + 1)]
            wx = [(i * s, i * s + k) for i in range((w - k) // s + 1)]
            mat = avgpool_matrix(shape, wy, wx, k * k)
            saved.append(("mat", mat, a))
            a, shape = mat @ a, (c, len(wy), len(wx))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            c, h, w = shape
            o = m.output_size
            win = [(math.floor(i * h / o), math.ceil((i + 1) * h / o)) for i in range(o)]
            mat = avgpool_matrix(shape, win, win, None)
            saved.append(("mat", mat, a))
            a, shape = mat @ a, (c, o, o)
        else:  # Flatten, Dropout: flat vectors already
            saved.append(("pass",))
    top = max(i for i, s in enumerate(saved) if s[0] == "mat" and isinstance(chain[i], (nn.Conv2d, nn.Linear)))
    p = np.zeros_like(a)
    p[unit] = 1.0
    out = {len(chain) - 1: p}

    def rule(mat, act, sig):
        z = mat @ act
        r = np.where(z == 0, 0.0, sig / np.where(z == 0, 1.0, z))
        return act * (mat.T @ r)

    for i in range(len(chain) - 1, -1, -1):
        s = saved[i]
        if s[0] == "mat":
            mwp = rule(np.clip(s[1], 0, None), s[2], p)
            if contrastive and i == top:
                mwp = mwp - rule(np.clip(-s[1], 0, None), s[2], p)
            p = mwp
        elif s[0] == "max":
            q = np.zeros(s[2])
            np.add.at(q, s[1], p)
            p = q
        out[i - 1] = p
    return out


# ---------------------------------------------------------------- test nets


def _init(chain: nn.Sequential, seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in chain:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
                m.bias.copy_(0.05 + 0.25 * torch.rand(m.bias.shape, generator=g))  # positive biases
    return chain.eval()


def net_a() -> nn.Sequential:
    return _init(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),               # 0-2: 4x6x6
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),               # 3-5: 6x3x3
        nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),        # 6-8: 20
        nn.Linear(20, 7), nn.ReLU(), nn.Dropout(0.5), nn.Linear(7, 3),           # 9-12
    ), seed=1)


def net_b() -> nn.Sequential:
    return _init(nn.Sequential(
        nn.Conv2d(2, 3, 3, dilation=1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),  # 3x4x4
        nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten(),             # 36
        nn.Linear(36, 4), nn.ReLU(),
    ), seed=2)


def _x(shape, seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- tests


def test_hand_case() -> None:
    l1, l2 = nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        l1.weight.copy_(torch.tensor([[1.0, 0.5], [-1.0, 2.0]]))
        l2.weight.copy_(torch.tensor([[1.0, -2.0]]))
    chain = nn.Sequential(l1, nn.ReLU(), l2)
    x = torch.tensor([[1.0, 2.0]])
    mwp = excitation_signals(chain, x, [0], readout=None, contrastive=False)
    cmwp = excitation_signals(chain, x, [0], readout=None, contrastive=True)
    torch.testing.assert_close(mwp, torch.tensor([[[0.5, 0.5]]]))
    torch.testing.assert_close(cmwp, torch.tensor([[[0.5, -0.5]]]))


@pytest.mark.parametrize("make,shape,readouts", [(net_a, (2, 3, 12, 12), [2, 5, None]),
                                                 (net_b, (2, 2, 9, 9), [2, None])])
def test_matches_float64_reference(make, shape, readouts) -> None:
    chain = make()
    x = _x(shape)
    n_out = chain(x).shape[1]
    units = list(range(n_out))
    for ro in readouts:
        key = -1 if ro is None else ro
        mwp = excitation_signals(chain, x, units, readout=ro, contrastive=False)
        cmwp = excitation_signals(chain, x, units, readout=ro, contrastive=True)
        for b in range(shape[0]):
            for u in units:
                ref = reference(chain, x[b].numpy(), u, False)[key]
                ref_c = reference(chain, x[b].numpy(), u, True)[key]
                scale = np.abs(ref).max()
                assert scale > 0
                assert np.abs(mwp[b, u].reshape(-1).double().numpy() - ref).max() <= 1e-5 * scale
                assert np.abs(cmwp[b, u].reshape(-1).double().numpy() - ref_c).max() <= 1e-4 * scale
        # the map is max(0, channel sum) of the c-MWP signal
        if ro is not None:
            maps = excitation_maps(chain, x, units, readout=ro)
            torch.testing.assert_close(maps, cmwp.sum(2).clamp(min=0))


def test_mwp_sums_to_one_at_every_layer() -> None:
    chain, x = net_a(), _x((2, 3, 12, 12), seed=3)
    layers = excitation_signals(chain, x, [0, 1, 2], readout=None, contrastive=False, all_layers=True)
    assert sorted(layers) == list(range(-1, len(chain)))
    for i, sig in layers.items():
        sums = sig.flatten(2).sum(2)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    # c-MWP: +1 and -1 cancel below the contrasted top layer
    layers = excitation_signals(chain, x, [1], readout=None, contrastive=True, all_layers=True)
    for i in range(-1, 12):
        assert abs(float(layers[i].sum())) < 1e-5 * float(layers[i].abs().sum())


def test_per_image_units_and_batching_match_single_calls() -> None:
    chain, x = net_a(), _x((3, 3, 12, 12), seed=4)
    per_image = torch.tensor([[2, 0], [1, 1], [0, 2]])
    maps = excitation_maps(chain, x, per_image, readout=2, output_size=12)
    assert maps.shape == (3, 2, 12, 12)
    for b in range(3):
        for j in range(2):
            one = excitation_maps(chain, x[b:b + 1], [int(per_image[b, j])], readout=2, output_size=12)
            torch.testing.assert_close(maps[b, j], one[0, 0], atol=1e-6, rtol=1e-5)


def test_multi_head_equals_separate_chains() -> None:
    chain, x = net_a(), _x((2, 3, 12, 12), seed=5)
    trunk, head = chain[:10], chain[10:]
    enc = _init(nn.Sequential(nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU()), seed=6)
    a, b = excitation_maps_multi(trunk, [(head, [0, 2]), (enc, [1])], x, readout=5, output_size=7)
    torch.testing.assert_close(a, excitation_maps(nn.Sequential(*trunk, *head), x, [0, 2], readout=5,
                                                  output_size=7))
    torch.testing.assert_close(b, excitation_maps(nn.Sequential(*trunk, *enc), x, [1], readout=5,
                                                  output_size=7))


def test_chunked_units_equal_one_pass_over_all_units() -> None:
    chain, x = net_a(), _x((2, 3, 12, 12), seed=8)
    trunk, head = chain[:9], chain[9:11]  # head = [Linear, ReLU]: 7 hidden units, like Z
    units = [6, 0, 3, 5, 1, 2, 4]
    whole = excitation_maps(nn.Sequential(*trunk, *head), x, units, readout=5, output_size=9)
    for chunk in (1, 3, 7, 50):
        parts = list(excitation_maps_chunked(trunk, head, units, x, readout=5, chunk=chunk, output_size=9))
        assert [s for s, _ in parts] == list(range(0, 7, chunk))
        torch.testing.assert_close(torch.cat([m for _, m in parts], dim=1), whole, atol=1e-6, rtol=1e-5)
    mwp = torch.cat([m for _, m in excitation_maps_chunked(trunk, head, units, x, readout=5, chunk=2,
                                                           contrastive=False)], dim=1)
    torch.testing.assert_close(mwp, excitation_maps(nn.Sequential(*trunk, *head), x, units, readout=5,
                                                    contrastive=False))
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InputError, match="chunk"):
            next(excitation_maps_chunked(trunk, head, units, x, readout=5, chunk=bad))
    with pytest.raises(InputError, match="empty"):
        next(excitation_maps_chunked(trunk, head, [], x, readout=5, chunk=2))


def _bilinear_ref(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    h, w = img.shape
    out = np.zeros((oh, ow))
    for i in range(oh):
        sy = max((i + 0.5) * h / oh - 0.5, 0.0)
        y0 = int(sy)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(ow):
            sx = max((j + 0.5) * w / ow - 0.5, 0.0)
            x0 = int(sx)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[i, j] = ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x1])
                         + fy * ((1 - fx) * img[y1, x0] + fx * img[y1, x1]))
    return out


def test_resize_is_bilinear_half_pixel() -> None:
    m = _x((1, 1, 3, 4), seed=7).double()
    got = resize_maps(m, (7, 5))[0, 0].numpy()
    np.testing.assert_allclose(got, _bilinear_ref(m[0, 0].numpy(), 7, 5), atol=1e-12)
    assert resize_maps(m, None) is m


def test_inplace_relu_vgg_leaves_model_untouched() -> None:
    # torchvision's VGG layout in miniature: in-place ReLUs, AdaptiveAvgPool, Dropout classifier
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2))
    classifier = nn.Sequential(nn.Linear(32, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, 16),
                               nn.ReLU(True), nn.Dropout(), nn.Linear(16, 4))
    chain = nn.Sequential(*features, nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), *classifier)
    chain.train()
    features[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in chain.state_dict().items()}
    x = _x((2, 3, 16, 16), seed=8)
    maps = excitation_maps(chain, x, [1, 3], readout=2, output_size=16)
    clean = nn.Sequential(*[nn.ReLU() if isinstance(m, nn.ReLU) else m for m in chain])
    torch.testing.assert_close(maps, excitation_maps(clean, x, [1, 3], readout=2, output_size=16))
    assert maps.shape == (2, 2, 16, 16) and bool((maps >= 0).all()) and float(maps.sum()) > 0
    assert all(torch.equal(before[k], v) for k, v in chain.state_dict().items())
    assert chain.training and all(m.training for m in chain)
    assert not features[0].weight.requires_grad and features[3].weight.requires_grad
    assert all(p.grad is None for p in chain.parameters())


def test_a_real_torchvision_vgg_is_left_as_it_was() -> None:
    """torchvision's own VGG11 (in-place ReLUs, Dropout, AdaptiveAvgPool) in train mode with a
    frozen layer: maps at pool2 as for its out-of-place twin; weights, flags and mode unchanged."""
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11(weights=None, num_classes=5)
    chain = nn.Sequential(*vgg.features, vgg.avgpool, nn.Flatten(), *vgg.classifier).train()
    chain[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in chain.state_dict().items()}
    flags = [p.requires_grad for p in chain.parameters()]
    x = _x((2, 3, 32, 32), seed=9)
    maps = excitation_maps(chain, x, [0, 4], readout=5, output_size=32)  # 5: the second MaxPool
    clean = nn.Sequential(*[nn.ReLU() if isinstance(m, nn.ReLU) else m for m in chain])
    torch.testing.assert_close(maps, excitation_maps(clean, x, [0, 4], readout=5, output_size=32))
    assert maps.shape == (2, 2, 32, 32) and float(maps.sum()) > 0
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in chain)
    assert all(torch.equal(before[k], v) for k, v in chain.state_dict().items())
    assert [p.requires_grad for p in chain.parameters()] == flags and all(m.training for m in chain)
    assert all(p.grad is None for p in chain.parameters())


def test_unsupported_modules_are_named() -> None:
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    with pytest.raises(InputError, match=r"module 1 \(BatchNorm2d\)"):
        excitation_maps(bn, _x((1, 3, 8, 8)), [0], readout=0)
    block = torchvision.models.resnet.BasicBlock(4, 4)
    res = nn.Sequential(nn.Conv2d(3, 4, 3), block, nn.Flatten(), nn.Linear(144, 2))
    with pytest.raises(InputError, match=r"module 1 \(BasicBlock\)"):
        excitation_maps(res, _x((1, 3, 8, 8)), [0], readout=0)


def test_bad_readout_and_units() -> None:
    chain, x = net_a(), _x((1, 3, 12, 12))
    with pytest.raises(InputError, match="below the top affine layer"):
        excitation_maps(chain, x, [0], readout=12)
    with pytest.raises(InputError, match="not a \\(C, H, W\\) map"):
        excitation_maps(chain, x, [0], readout=8)
    with pytest.raises(InputError, match="index 3 out of range"):
        excitation_maps(chain, x, [3], readout=2)
    with pytest.raises(InputError, match="readout 20"):
        excitation_maps(chain, x, [0], readout=20)
    named = nn.Sequential(__import__("collections").OrderedDict(
        [("conv", chain[0]), ("relu", chain[1]), ("pool1", chain[2]), *[(str(i), m) for i, m in enumerate(chain[3:])]]))
    torch.testing.assert_close(excitation_maps(named, x, [0], readout="pool1"),
                               excitation_maps(chain, x, [0], readout=2))


def test_full_fp32_restores_flags() -> None:
    from srae.excitation import full_fp32

    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with full_fp32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (conv, mm)


def test_full_fp32_holds_until_the_last_overlapping_block_exits() -> None:
    """Two threads whose blocks overlap (A enters, B enters, A exits, B exits): TF32 must stay
    off until B exits, then the flags are what A found (a plain save/restore turns cuDNN's
    TF32 back on under B when A exits)."""
    import threading

    from srae.excitation import full_fp32

    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    before = flags()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
    try:
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
        seen: dict[str, tuple[bool, bool]] = {}

        def a() -> None:
            with full_fp32():
                a_in.set()
                b_in.wait(5)
            a_out.set()

        def b() -> None:
            a_in.wait(5)
            with full_fp32():
                b_in.set()
                a_out.wait(5)
                seen["B after A exited"] = flags()
            seen["after both"] = flags()

        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert seen["B after A exited"] == (False, False)
        assert seen["after both"] == (True, True)
        # nested in one thread, and an exception inside, restore too
        with pytest.raises(RuntimeError):
            with full_fp32():
                with full_fp32():
                    raise RuntimeError("inside")
        assert flags() == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_bad_units_are_named() -> None:
    """An empty unit list (e.g. a Lasso that selected no dims) says so, not 'float64 dtype'."""
    from srae.errors import InputError
    from srae.excitation import excitation_maps

    chain = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    x = torch.rand(2, 4)
    with pytest.raises(InputError, match="units: empty"):
        excitation_maps(chain, x, [], readout=None)
    with pytest.raises(InputError, match="integer output indices"):
        excitation_maps(chain, x, [0.5], readout=None)
    with pytest.raises(InputError, match="index 2 out of range"):
        excitation_maps(chain, x, [2], readout=None)


def test_subnormal_denominators_count_as_zero() -> None:
    """Long L2-regularised training leaves weights near 1e-42 (subnormal in float32); a unit
    whose positive weights are all that small must give a zero signal, not inf/NaN maps."""
    from srae.excitation import excitation_signals

    lin = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1e-42, 2e-42, 1e-42], [0.5, 0.25, 1.0]]))
    assert lin.weight[0, 0] != 0 and lin.weight[0, 0].abs() < torch.finfo(torch.float32).tiny
    chain = torch.nn.Sequential(lin)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    for contrastive in (False, True):
        sig = excitation_signals(chain, x, [0, 1], readout=None, contrastive=contrastive)
        assert torch.isfinite(sig).all()
        assert torch.equal(sig[0, 0], torch.zeros(3))
    # the normal unit is untouched: MWP = a_j w_j / z, summing to 1
    mwp = excitation_signals(chain, x, [1], readout=None, contrastive=False)[0, 0]
    torch.testing.assert_close(mwp, torch.tensor([0.5, 0.5, 3.0]) / 4.0)
