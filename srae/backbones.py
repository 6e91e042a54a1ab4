"""The CNNs being explained: torchvision VGG16/VGG19 and a small VGG-style demo CNN.

Every backbone is split at Z (fc6 after its ReLU) into two flat ``nn.Sequential`` chains,
``trunk`` (image -> Z) and ``head`` (Z -> logits), built only from the modules that
:func:`srae.excitation.excitation_maps` understands. The chains share their modules with
``net``, the model whose ``state_dict`` is the checkpoint format (torchvision's layout for
VGG), so training ``net`` trains both halves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from srae.devices import resolve_device  # noqa: F401  (srae.backbones.resolve_device, as before)
from srae.errors import InputError
from srae.images import IMAGENET_MEAN, IMAGENET_STD, preprocess, preprocessing_dict

if TYPE_CHECKING:
    from srae.fit import FitResult

log = logging.getLogger(__name__)

BACKBONES: tuple[str, ...] = ("demo_cnn", "vgg16", "vgg19")
DEMO_WIDTHS: tuple[int, ...] = (16, 32, 64, 64)
DEMO_FC: int = 256

__all__ = [
    "BACKBONES", "Backbone", "build_backbone", "build_demo_cnn", "build_vgg", "file_sha256",
    "fit", "load_backbone", "load_state_dict_file", "preprocess", "resolve_device",
    "save_backbone", "state_dict_sha256",
]


@dataclass
class Backbone:
    """A classifier split at Z, with its readout layers and preprocessing."""

    name: str
    net: nn.Module
    trunk: nn.Sequential  # image -> Z (ends with fc6's ReLU); children named conv1_1, pool1, ...
    head: nn.Sequential  # Z -> logits
    readouts: dict[str, int]  # layer name -> index in trunk
    default_readout: str
    input_size: int
    num_classes: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    z_layer: str = "fc6"
    checkpoint_path: Path | None = None
    file_sha256: str = ""  # sha256 of the file all weights came from ("" if they did not)

    @property
    def heatmap_readouts(self) -> list[str]:
        """The trunk layers a heatmap can be read out at, in layer order: those before the
        flatten (spatial maps; fc6 and after have no image layout)."""
        flat = next((i for i, m in enumerate(self.trunk) if isinstance(m, nn.Flatten)), len(self.trunk))
        return [name for name, i in sorted(self.readouts.items(), key=lambda t: t[1]) if i < flat]

    def check_readout(self, name: str) -> int:
        """The trunk index of heatmap readout ``name``; an unusable name is a one-line error."""
        if name not in self.heatmap_readouts:
            raise InputError(f"heatmaps.readout: {name!r} is not a readout of {self.name} "
                             f"(one of {', '.join(self.heatmap_readouts)}; default {self.default_readout})")
        return self.readouts[name]

    @property
    def checkpoint_sha256(self) -> str:
        """What identifies these weights (a feature-fingerprint input): the checkpoint
        file's sha256, else a hash of the weights themselves (random init, resized
        classifier), computed on each access."""
        return self.file_sha256 or state_dict_sha256(self.net)

    @property
    def z_dim(self) -> int:
        linears = [m for m in self.trunk if isinstance(m, nn.Linear)]
        return int(linears[-1].out_features)

    @property
    def model(self) -> nn.Sequential:
        """trunk followed by head as one named chain (same modules; image -> logits)."""
        return nn.Sequential(OrderedDict([*self.trunk.named_children(), *self.head.named_children()]))

    def preprocessing(self) -> dict:
        return preprocessing_dict(self.input_size, self.mean, self.std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (B, 3, S, S) -> (Z, logits)."""
        z = self.trunk(x)
        return z, self.head(z)

    def to(self, device: str | torch.device) -> Backbone:
        self.net.to(device)
        self.trunk.to(device)
        self.head.to(device)
        return self

    def eval(self) -> Backbone:
        self.net.eval()
        self.trunk.eval()
        self.head.eval()
        return self


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's weights (names, dtypes, shapes, bytes): identifies weights
    that do not come from one file (random init, a resized classifier)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` or torch checkpoint (plain, or under ``state_dict`` /
    ``model``), with DataParallel ``module.`` prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # many formats, many failure types: report them as one line
        raise InputError(f"checkpoint {path}: cannot be read ({_one_line_reason(exc)})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"checkpoint {path}: not a state dict of tensors")
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def _one_line_reason(exc: BaseException) -> str:
    """The gist of a loader error in one line: torch's weights-only failures carry
    paragraphs of advice around the actual reason, which is kept alone."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        detail = next((ln for ln in lines[1:] if not ln.startswith(("Please file", "Check the documentation"))), "")
        return f"not a weights-only torch file: {detail}" if detail else "not a weights-only torch file"
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _split(name: str, net: nn.Module, layers: list[tuple[str, nn.Module]], n_trunk: int,
           input_size: int, num_classes: int, default_readout: str) -> Backbone:
    trunk = nn.Sequential(OrderedDict(layers[:n_trunk]))
    head = nn.Sequential(OrderedDict(layers[n_trunk:]))
    readouts = {lname: i for i, (lname, _) in enumerate(layers[:n_trunk])}
    return Backbone(name=name, net=net, trunk=trunk, head=head, readouts=readouts,
                    default_readout=default_readout, input_size=input_size,
                    num_classes=num_classes)


def default_readout(name: str) -> str:
    """The heatmap readout layer a backbone uses unless ``heatmaps.readout`` says otherwise."""
    return "pool2" if name == "demo_cnn" else "pool3"


def build_demo_cnn(num_classes: int, input_size: int = 64,
                   widths: Sequence[int] = DEMO_WIDTHS, fc: int = DEMO_FC) -> Backbone:
    """VGG-style CNN for CPU: per block conv3x3 -> ReLU -> maxpool, then
    fc6 -> ReLU (= Z) -> fc7 -> ReLU -> fc8. No BatchNorm (Excitation BP needs plain chains)."""
    if input_size % (2 ** len(widths)) != 0:
        raise InputError(f"demo_cnn input_size {input_size}: must be divisible by {2 ** len(widths)}")
    layers: list[tuple[str, nn.Module]] = []
    cin = 3
    for b, cout in enumerate(widths, start=1):
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [(f"conv{b}_1", conv), (f"relu{b}_1", nn.ReLU()), (f"pool{b}", nn.MaxPool2d(2))]
        cin = cout
    side = input_size // (2 ** len(widths))
    layers += [("flatten", nn.Flatten()), ("fc6", nn.Linear(cin * side * side, fc)), ("relu6", nn.ReLU())]
    n_trunk = len(layers)
    layers += [("fc7", nn.Linear(fc, fc)), ("relu7", nn.ReLU()), ("fc8", nn.Linear(fc, num_classes))]
    net = nn.Sequential(OrderedDict(layers))
    readout = default_readout("demo_cnn") if len(widths) >= 2 else "pool1"
    return _split("demo_cnn", net, layers, n_trunk, input_size, num_classes, readout)


def build_vgg(name: str, num_classes: int, input_size: int = 224) -> Backbone:
    """torchvision VGG16/VGG19 (random init) split at fc6's ReLU; in-place ReLUs replaced."""
    import torchvision

    net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    for seq in (net.features, net.classifier):
        for i, m in enumerate(seq):
            if isinstance(m, nn.ReLU):
                seq[i] = nn.ReLU()
    layers: list[tuple[str, nn.Module]] = []
    block, k = 1, 0
    for m in net.features:
        if isinstance(m, nn.Conv2d):
            k += 1
            layers.append((f"conv{block}_{k}", m))
        elif isinstance(m, nn.ReLU):
            layers.append((f"relu{block}_{k}", m))
        else:
            layers.append((f"pool{block}", m))
            block, k = block + 1, 0
    cls = net.classifier
    layers += [("avgpool", net.avgpool), ("flatten", nn.Flatten()), ("fc6", cls[0]), ("relu6", cls[1])]
    n_trunk = len(layers)
    layers += [("drop6", cls[2]), ("fc7", cls[3]), ("relu7", cls[4]), ("drop7", cls[5]), ("fc8", cls[6])]
    return _split(name, net, layers, n_trunk, input_size, num_classes, default_readout(name))


def _hub_checkpoint(name: str) -> Path:
    import torchvision

    weights = getattr(torchvision.models, f"{name.upper()}_Weights").IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _load_weights(bb: Backbone, path: Path) -> None:
    """Load ``path`` into ``bb.net``; a classifier with another class count is replaced by
    a freshly initialised one (fine-tuning starts from it)."""
    sd = load_state_dict_file(path)
    own = bb.net.state_dict()
    fc8 = [k for k in own if k.endswith(".weight")][-1].rsplit(".", 1)[0]
    resized = fc8 + ".weight" in sd and sd[fc8 + ".weight"].shape != own[fc8 + ".weight"].shape
    if resized:
        log.info("checkpoint %s: classifier %s resized from %d to %d classes",
                 path, fc8, sd[fc8 + ".weight"].shape[0], bb.num_classes)
        sd = {k: v for k, v in sd.items() if not k.startswith(fc8 + ".")}
    missing = [k for k in own if k not in sd and not (resized and k.startswith(fc8 + "."))]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise InputError(f"checkpoint {path}: does not fit {bb.name} "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    bad = [k for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        raise InputError(f"checkpoint {path}: shape mismatch for {bad[:4]} in {bb.name}")
    bb.net.load_state_dict(sd, strict=False)
    bb.checkpoint_path = path
    bb.file_sha256 = "" if resized else file_sha256(path)


def build_backbone(name: str, num_classes: int, checkpoint: str | Path | None = None, *,
                   pretrained: bool = True, input_size: int | None = None,
                   seed: int | None = None) -> Backbone:
    """Build ``"demo_cnn"``, ``"vgg16"`` or ``"vgg19"`` for ``num_classes`` classes.

    Weights: ``checkpoint`` if given; for VGG without one, the ImageNet weights in the
    torch hub cache when ``pretrained`` (never downloaded here), else random init
    (seeded by ``seed``). ``input_size`` defaults to 64 (demo CNN) / 224 (VGG).
    ``file_sha256`` is the file's sha256 when all weights come from one file, else "";
    ``checkpoint_sha256`` always identifies the weights.
    """
    if name not in BACKBONES:
        raise InputError(f"backbone {name!r}: expected one of {', '.join(BACKBONES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise InputError(f"backbone {name}: num_classes must be an integer >= 2, got {num_classes!r}")
    if checkpoint is None and name != "demo_cnn" and pretrained:
        checkpoint = _hub_checkpoint(name)
        if not checkpoint.is_file():
            raise InputError(f"backbone {name}: no checkpoint given and ImageNet weights not in the "
                             f"torch hub cache ({checkpoint}); run `srae download {name}`, or set backbone.checkpoint, "
                             "or backbone.pretrained: false (random init)")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if name == "demo_cnn":
            bb = build_demo_cnn(num_classes, input_size or 64)
        else:
            bb = build_vgg(name, num_classes, input_size or 224)
    if checkpoint is not None:
        _load_weights(bb, Path(checkpoint))
    return bb.eval()


def save_backbone(bb: Backbone, path: str | Path) -> str:
    """Write the weights as safetensors (with arch metadata); returns the file's sha256 and
    records it as the backbone's checkpoint."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in bb.net.state_dict().items()}
    # One metadata key: safetensors writes its metadata map in hash order, so several keys
    # would make the bytes (and the sha256 the features are keyed by) vary between runs.
    info = {"arch": bb.name, "num_classes": bb.num_classes, "input_size": bb.input_size}
    from srae.stores import temp_beside

    tmp = temp_beside(path)
    save_file(sd, str(tmp), metadata={"srae": json.dumps(info, sort_keys=True)})
    tmp.replace(path)
    bb.checkpoint_path = path
    bb.file_sha256 = file_sha256(path)
    return bb.file_sha256


def load_backbone(path: str | Path) -> Backbone:
    """Rebuild a backbone written by :func:`save_backbone` from its file alone."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("srae", "{}"))
    except Exception as exc:  # safetensors and json raise their own error types
        raise InputError(f"checkpoint {path}: not a safetensors file from srae ({exc})") from exc
    if not {"arch", "num_classes", "input_size"} <= meta.keys():
        raise InputError(f"checkpoint {path}: lacks the srae arch/num_classes/input_size metadata")
    return build_backbone(meta["arch"], int(meta["num_classes"]), path,
                          input_size=int(meta["input_size"]))


def fit(*args: Any, **kwargs: Any) -> FitResult:
    """Train or fine-tune a backbone: :func:`srae.fit.fit` (imported on call, because
    srae.fit itself imports this module)."""
    from srae.fit import fit as _fit

    return _fit(*args, **kwargs)
