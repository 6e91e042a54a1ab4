"""The experiment configuration: pydantic models for every stage, YAML load/dump.

One :class:`ExperimentConfig` describes a whole run (dataset -> backbone -> features ->
explainers -> heatmaps -> scoring -> masking -> report). The defaults of every model
*are* the demo experiment (synthetic birds + the small demo CNN), so
``ExperimentConfig()`` equals ``configs/demo.yaml``. Bad input is reported as one line
naming the field and the reason (:class:`srae.errors.SraeError`).

Category numbering: ``categories`` counts classes from 1 in the dataset's class order
(the ids of CUB's ``classes.txt``); internally (labels, the ``category`` column of the
metrics table) classes are 0-based.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from srae.devices import check_device  # the Device field rule; also importable as srae.config.check_device
from srae.errors import SraeError

METHODS: tuple[str, ...] = ("SRAE", "NN", "SAE", "CAE", "Lasso")
DatasetKind = Literal["synthbirds", "synthrooms", "cub", "places"]


def md5_hex(value: str) -> str:
    """``value`` lower-cased if it is an md5 (32 hex digits), else ValueError."""
    if not re.fullmatch(r"[0-9a-fA-F]{32}", value):
        raise ValueError(f"expected 32 hex digits (an md5), got {value!r}")
    return value.lower()


Md5 = Annotated[str, AfterValidator(md5_hex)]


# Limits the generators and backbones impose, checked here so `srae run --check` catches them
# without importing torch (tests compare them with the code that imposes them).
SYNTH_MIN_SIZE = 32  # srae.datasets.synthetic._check_sizes
SYNTH_MAX_SIZE = 1024  # srae.datasets.synthetic.MAX_SIZE
SYNTHROOMS_MAX_CLASSES = 10  # len(srae.datasets.ade20k.PAPER_ROOMS)
DEMO_CNN_STRIDE = 16  # 2 ** len(srae.backbones.DEMO_WIDTHS): the demo CNN's input side must divide by it
VGG_MIN_INPUT = 32  # five 2x2 max-pools
FEATURE_LAYERS: tuple[str, ...] = ("fc6",)  # Z of every backbone (Backbone.z_layer)
MAX_CATEGORY_ID = 100_000  # --categories: larger ids are typos (CUB has 200 classes, Places365 365)


Device = Annotated[str, AfterValidator(check_device)]
# Paths from a config or the command line: "~" means the home directory, as in a shell.
UserPath = Annotated[Path, AfterValidator(lambda p: p.expanduser())]
MethodName = Literal["SRAE", "NN", "SAE", "CAE", "Lasso"]


def _takes_bool(annotation: Any) -> bool:
    """Whether a field type admits a bool anywhere (or holds a nested model, which checks itself)."""
    if annotation in (bool, Any, object) or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return True
    return any(_takes_bool(a) for a in get_args(annotation))


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, dict):
        return any(_has_bool(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_bool(v) for v in value)
    return False


class _Model(BaseModel):
    """Strict base: unknown keys are errors, assignments are validated, and a YAML boolean is
    never read as a number (pydantic's lax mode would turn ``n: true`` into ``n = 1``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: Any) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and _has_bool(value) and not _takes_bool(field.annotation):
            shown = str(value).lower() if isinstance(value, bool) else repr(value)
            raise ValueError(f"got {shown}: a YAML boolean (true/false) is not a valid value here")
        return value


class DatasetConfig(_Model):
    """Which dataset, where it lives, and (synthetic only) how to generate it."""

    kind: DatasetKind = "synthbirds"
    root: UserPath = Path("data/datasets/synthbirds")
    download: bool = Field(True, description="fetch/generate the data when root is missing")
    url: str | None = Field(None, description="archive URL: cub: the CUB_200_2011.tgz link (None: the "
                                              "built-in one); places: your ADE20K zip link (registration "
                                              "needed; None: a zip placed in root)")
    md5: Md5 | None = Field(None, description="md5 of the archive at url (or placed by hand) when it is not "
                                              "the official file, e.g. a repackaged mirror; None: the published "
                                              "checksum (cub), none published (ADE20K: unverified)")
    classes: int = Field(4, ge=2, description="synthetic only: number of classes")
    per_class: int = Field(96, ge=4, description="synthetic only: images per class")
    size: int = Field(96, ge=SYNTH_MIN_SIZE, le=SYNTH_MAX_SIZE, description="synthetic only: image side in pixels")
    seed: int = Field(0, ge=0, description="synthetic only: generator seed (default: the top-level seed)")
    design: Literal["factorial", "unique"] = Field(
        "factorial", description="synthetic only: class design; factorial: every trait (object) is shared by "
                                 "two classes, so only a class's combination of traits tells it apart; unique: "
                                 "the earlier design, where with few classes one trait identifies a class")
    class_names: list[str] | None = Field(None, description="places only: which scene classes, in order")
    places_root: UserPath | None = Field(None, description="places only: Places365 lists/images added for training")
    places_per_class: int | None = Field(None, ge=1, description="places only: Places365 images per class and split")

    def unused_fields(self) -> set[str]:
        """Fields this dataset kind ignores: the generator's on real data, the archive URL on
        generated data, the Places365/class-list reader options on CUB-style data."""
        unused = {"classes", "per_class", "size", "seed", "design"} if not self.kind.startswith("synth") else {"url", "md5"}
        if self.kind in ("synthbirds", "cub"):
            unused |= {"class_names", "places_root", "places_per_class"}
        return unused

    @model_validator(mode="after")
    def _generator_limits(self) -> DatasetConfig:
        if self.kind == "synthrooms" and self.design == "factorial" and self.classes < 3:
            raise ValueError(f"design: factorial rooms need at least 3 classes (each object shared by two "
                             f"rooms), got {self.classes}; use design: unique")
        if self.kind == "synthrooms" and self.classes > SYNTHROOMS_MAX_CLASSES:
            raise ValueError(f"classes: synthrooms has at most {SYNTHROOMS_MAX_CLASSES} room classes, "
                             f"got {self.classes}")
        if self.kind == "cub" and self.md5 is not None and self.url is None:
            # the official archive has its published checksum: another md5 would only make a
            # good download fail (and be deleted and fetched again)
            raise ValueError("md5: set only with url (the mirror whose archive it checks)")
        return self


class FitConfig(_Model):
    """Training the backbone on the dataset (srae.fit): from scratch (demo CNN) or fine-tuning VGG.

    ``epochs: 0`` uses the checkpoint (or the ImageNet weights) as it is."""

    epochs: int = Field(16, ge=0)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    weight_decay: float = Field(1e-4, ge=0)
    augment: bool = True
    seed: int = Field(0, ge=0, description="shuffling, augmentation, dropout, head init (default: the top-level seed)")
    device: Device = "auto"


class BackboneConfig(_Model):
    """The CNN to explain."""

    name: Literal["demo_cnn", "vgg16", "vgg19"] = "demo_cnn"
    checkpoint: UserPath | None = Field(None, description="weights file to start from (None: scratch / ImageNet)")
    pretrained: bool = Field(True, description="VGG without checkpoint: start from ImageNet weights")
    input_size: int | None = Field(None, ge=16, description="input side in pixels (None: 64 for demo_cnn, 224 for VGG); "
                                                            "a small one makes VGG fit a CPU")
    fit: FitConfig = FitConfig()

    @model_validator(mode="after")
    def _usable(self) -> BackboneConfig:
        if self.fit.epochs == 0 and self.name == "demo_cnn" and self.checkpoint is None:
            raise ValueError("demo_cnn with fit.epochs 0 needs a checkpoint")
        if self.input_size is not None:
            if self.name == "demo_cnn" and self.input_size % DEMO_CNN_STRIDE:
                raise ValueError(f"input_size: demo_cnn needs a multiple of {DEMO_CNN_STRIDE}, got {self.input_size}")
            if self.name != "demo_cnn" and self.input_size < VGG_MIN_INPUT:
                raise ValueError(f"input_size: {self.name} needs at least {VGG_MIN_INPUT}, got {self.input_size}")
        return self


class FeaturesConfig(_Model):
    """Extraction of the Z layer into the Zarr feature store."""

    layer: Literal["fc6"] = Field("fc6", description="the Z layer stored (fc6 after its ReLU; the only one "
                                                     "every backbone exposes)")
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)
    device: Device = "auto"


class HParamGrid(_Model):
    """Cross-validated grid of the neural explainers (paper eq. 5). Each list is one axis."""

    beta: list[float] = [0.1, 1.0]
    eta: list[float] = [0.1]
    q: list[float] = [10.0]
    lr: list[float] = [1e-2]
    weight_decay: list[float] = [1e-4]
    # eq. 5's L2 weights one by one (encoder, decoder, v); unset: weight_decay for all three
    lambda1: list[float] | None = None
    lambda2: list[float] | None = None
    lambda3: list[float] | None = None

    @field_validator("beta", "eta", "q", "lr", "weight_decay", "lambda1", "lambda2", "lambda3")
    @classmethod
    def _non_empty(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("must list at least one value")
        if not all(math.isfinite(x) for x in v):
            raise ValueError("values must be finite (no nan/inf)")
        if any(x < 0 for x in v):
            raise ValueError("values must be >= 0")
        return v


class ExplainerConfig(_Model):
    """Per-category explanation modules: methods, sizes, sample counts, CV grid."""

    methods: list[MethodName] = list(METHODS)
    n: int = Field(5, ge=1, description="number of x-features")
    hidden: list[int] = Field([64, 32], description="encoder hidden sizes (paper: 800, 100)")
    n_pos: int = Field(40, ge=1, description="positives for training; the rest test (paper CUB: 50)")
    n_neg: int = Field(96, ge=1, description="negatives for training (paper CUB: 8000)")
    n_test_neg: int = Field(48, ge=1, description="negatives for testing (paper CUB: 2000)")
    use_dataset_split: bool = Field(False, description="draw train/test from the dataset's own split")
    positive_factor: float = Field(1.0, gt=0, description="positives' total weight relative to negatives'")
    folds: int = Field(2, ge=1, description="CV folds on the training set (1: no CV, first grid point)")
    grid: HParamGrid = HParamGrid()
    max_epochs: int = Field(150, ge=1)
    patience: int = Field(15, ge=1)
    batch_size: int = Field(64, ge=1)
    lasso_alpha: float | None = Field(
        None, gt=0, description="alpha of the Lasso column in Table 1 (paper CUB: 2.5); None: chosen per "
                                "category by CV among lasso_alphas, selecting at most n dims")
    lasso_alphas: list[float] = Field([1.0, 0.5, 0.2, 0.1, 0.05, 0.01], description="Table 2a / 5 sweep")
    refit_seeds: int = Field(2, ge=1, description="final fits per category from different inits; the best-fitting is kept")
    cv_rule: Literal["best", "one_se", "spread"] = Field(
        "best", description="best: lowest CV criterion; one_se: the most regularised config within one "
                            "standard error of it (faithfulness alone favours the weakest eta/beta); spread: "
                            "among configs within max(1 SE, 10%) of the best, the one whose validation "
                            "explanations spread over most x-features (largest n_eff; no labels used)")
    revive: bool = Field(True, description="re-initialise an x-feature that fired on no training sample for a "
                                           "whole epoch (false: leave it dead)")
    predictor_bias: bool = Field(False, description="give y-bar = v.E a bias term (off in the paper: then the "
                                                    "contributions v_i E_i sum to y-bar exactly)")
    group_size: int = Field(4, ge=1, description="categories per mapped task")
    stack_categories: bool | None = Field(
        None, description="train the categories of a group in shared stacks: faster on a GPU, but a category's "
                          "explainers then depend on the categories trained beside it (None: on a GPU only)")
    device: Device = "auto"
    seed: int = Field(0, ge=0, description="sample design, CV folds, inits (default: the top-level seed)")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one method")
        if len(set(v)) != len(v):
            raise ValueError("lists a method twice")
        return v

    @field_validator("hidden")
    @classmethod
    def _hidden(cls, v: list[int]) -> list[int]:
        if any(h < 1 for h in v):
            raise ValueError("hidden sizes must be >= 1")
        return v

    @field_validator("lasso_alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        if any(a <= 0 for a in v):
            raise ValueError("alphas must be > 0")
        return v


Z_DIMS_CPU = 64  # Z dims sampled by default when heatmaps are drawn on a CPU


class HeatmapsConfig(_Model):
    """c-MWP heatmaps of x-features, of y-hat (ExcitationBP) and of sampled Z dims."""

    readout: str | None = Field(None, description="trunk layer read out (None: backbone default)")
    splits: list[Literal["train", "test"]] = ["test"]
    max_images: int | None = Field(16, ge=1, description="positive images per category and split")
    images: Literal["positives", "all"] = Field(
        "positives", description="which images of a split get stored heatmaps: the category's annotated positives "
                                 "(all that locality, orthogonality, the masking test and the figures use), or all "
                                 "of its sample design in that split (the positives plus every sampled negative: "
                                 "maps of what the x-features respond to on other classes; ~n_test_neg more "
                                 "images per category)")
    z_dims: int | Literal["all"] | None = Field(
        None, description="Z column: locality of this many sampled Z dims (their maps stored; 0: no Z column), "
                          "or 'all' (the paper's column: every dim, scored as drawn, no maps stored); "
                          "None: all on a CUDA GPU, 64 elsewhere")
    gradcam: bool = Field(True, description="also Grad-CAM on y-hat at the same readout: a second heatmap method "
                                            "beside ExcitationBP, scored for locality (column 'Grad-CAM')")
    z_chunk: int = Field(256, ge=1, description="Z dims per top-down pass when all are scored, on up to 4 images "
                                                "(memory vs speed; a pass out of memory is retried with half)")
    batch_size: int = Field(16, ge=1)
    device: Device = "auto"

    @field_validator("z_dims")
    @classmethod
    def _z_dims(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and not isinstance(v, bool) and v < 0:
            raise ValueError("must be >= 0, 'all' or null")
        return v

    def effective_z_dims(self, device: str) -> int | str:
        """``z_dims`` as it applies on ``device`` (a resolved device name): None means every
        dim on a CUDA GPU (the paper's column) and :data:`Z_DIMS_CPU` sampled ones elsewhere:
        on a CPU drawing 4096 maps per image would take hours per category."""
        if self.z_dims is not None:
            return self.z_dims
        return "all" if str(device).startswith("cuda") else Z_DIMS_CPU


class ScoringConfig(_Model):
    """Dask-parallel locality/orthogonality scoring."""

    dask_address: str | None = Field(None, description="tcp://host:8786 of an existing cluster")
    n_workers: int = Field(1, ge=1, description="local cluster size when no address is given")
    threads_per_worker: int = Field(1, ge=1)
    processes: bool = Field(False, description="local cluster with worker processes (else threads)")

    @field_validator("dask_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(tcp|tls|inproc|ucx|ws|wss)://\S+$", v):
            raise ValueError("must look like tcp://host:port")
        return v


class MaskingConfig(_Model):
    """Mask + inpaint + reclassify (Table 2b / 4)."""

    enabled: bool = True
    gammas: list[float] = [0.01, 0.05, 0.1, 0.3]
    max_images: int | None = Field(16, ge=1)

    @field_validator("gammas")
    @classmethod
    def _gammas(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= g < 1.0 for g in v):
            raise ValueError("gammas must be in [0, 1)")
        return v


class CausalConfig(_Model):
    """Causal ground truth on synthetic data: each part swapped in counterfactual renders of
    test positives, the CNN's y-hat measured (``part_effect``); ignored on real data."""

    enabled: bool = True
    max_images: int | None = Field(16, ge=2, description="test positives per category (null: all)")


class ReportConfig(_Model):
    """Where the report goes and what it contains."""

    out_dir: UserPath = Path("reports/demo")
    figures: bool = True
    title: str | None = None
    max_figure_categories: int = Field(4, ge=1)
    figure_scale: Literal["row", "map"] = Field("row", description="Fig. 4 grids: row: each map to its own max "
                                                                   "times its share of the row's largest |v_i E_i| "
                                                                   "(a panel is as bright as it contributes); map: "
                                                                   "each map to its own maximum")
    include_config: bool = Field(True, description="show the run's config (with this machine's paths) in report.html")


class ExperimentConfig(_Model):
    """A whole experiment. Defaults = the demo (configs/demo.yaml)."""

    name: str = "demo"
    cache_dir: UserPath = Path("data/cache")
    categories: list[int] | None = Field(None, description="1-based class ids; None: all")
    device: Device | None = Field(None, description="overrides every stage's device when set")
    seed: int = Field(0, ge=0, description="default of dataset.seed, backbone.fit.seed and explainer.seed where a "
                                     "section sets none (its own seed wins); filled in on validation")
    dataset: DatasetConfig = DatasetConfig()
    backbone: BackboneConfig = BackboneConfig()
    features: FeaturesConfig = FeaturesConfig()
    explainer: ExplainerConfig = ExplainerConfig()
    heatmaps: HeatmapsConfig = HeatmapsConfig()
    scoring: ScoringConfig = ScoringConfig()
    masking: MaskingConfig = MaskingConfig()
    causal: CausalConfig = CausalConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="before")
    @classmethod
    def _inherit_seed(cls, data: Any) -> Any:
        """Give the seeded sections that set no seed of their own the top-level ``seed``."""
        seed = data.get("seed", 0) if isinstance(data, dict) else None
        if not isinstance(seed, int) or isinstance(seed, bool):
            return data  # not a mapping, or a bad seed that the field validation reports
        return {**data, **{p[0]: _fill_seed(data.get(p[0], _MISSING), p[1:], seed) for p in SEEDED_SECTIONS}}

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", v):
            raise ValueError("use letters, digits, '_', '-', '.'")
        return v

    @field_validator("categories")
    @classmethod
    def _cats(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("empty list (use null for all categories)")
        if any(c < 1 for c in v):
            raise ValueError("class ids count from 1")
        if max(v) > MAX_CATEGORY_ID:
            raise ValueError(f"class id {max(v)} is larger than {MAX_CATEGORY_ID}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _synthetic_sizes(self) -> ExperimentConfig:
        if self.categories is not None and self.dataset.kind.startswith("synth"):
            if max(self.categories) > self.dataset.classes:
                raise ValueError(
                    f"categories: class id {max(self.categories)} exceeds dataset.classes={self.dataset.classes}"
                )
        return self

    # ------------------------------------------------------------------ helpers
    def label_ids(self, num_classes: int) -> list[int]:
        """0-based labels selected by ``categories`` for a dataset with ``num_classes`` classes."""
        if self.categories is None:
            return list(range(num_classes))
        bad = [c for c in self.categories if c > num_classes]
        if bad:
            raise SraeError(f"categories: class id {bad[0]} exceeds the dataset's {num_classes} classes")
        return [c - 1 for c in self.categories]

    def stage_device(self, stage_device: str) -> str:
        """The device a stage runs on: the global override if set, else the stage's own."""
        return self.device or stage_device

    def section_hash(self, *sections: str) -> str:
        """Short stable hash of the named sections (dotted paths allowed): a cache-key part."""
        dump = self.model_dump(mode="json")
        picked = {s: _dotted(dump, s) for s in sections}
        return stable_hash(picked)


# Sections (paths from the root) that have a ``seed`` of their own, defaulting to the top-level one.
SEEDED_SECTIONS: tuple[tuple[str, ...], ...] = (("dataset",), ("backbone", "fit"), ("explainer",))
_MISSING: Any = object()


def _fill_seed(section: Any, path: tuple[str, ...], seed: int) -> Any:
    """``section`` (dict, model or missing) with ``seed`` set at ``path`` unless given there;
    anything else (e.g. ``null``) unchanged, for the field validation to report."""
    section = {} if section is _MISSING else section
    if isinstance(section, BaseModel):
        if path:
            child = getattr(section, path[0])
            filled = _fill_seed(child, path[1:], seed)
            return section if filled is child else section.model_copy(update={path[0]: filled})
        return section if "seed" in section.model_fields_set else section.model_copy(update={"seed": seed})
    if isinstance(section, dict):
        if path:
            return {**section, path[0]: _fill_seed(section.get(path[0], _MISSING), path[1:], seed)}
        return section if "seed" in section else {**section, "seed": seed}
    return section


def _dotted(d: dict[str, Any], path: str) -> Any:
    cur: Any = d
    for part in path.split("."):
        cur = cur[part]
    return cur


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), truncated: stable across runs."""
    payload = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(payload).hexdigest()[:length]


# ---------------------------------------------------------------------- errors, YAML
def format_validation_error(exc: ValidationError, source: str | None = None) -> str:
    """One line: ``source: field.path: reason`` (+ how many more problems there are)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "config"
    msg = str(first.get("msg", "invalid"))
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    msg = re.sub(r"^Value error, ", "", msg)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    prefix = f"{source}: " if source else ""
    where = "" if loc == "config" and re.match(r"^[\w.]+: ", msg) else f"{loc}: "
    return f"{prefix}{where}{msg}{more}".replace("\n", " ")


def config_from_dict(data: dict[str, Any] | None, source: str | None = None) -> ExperimentConfig:
    """Validate a plain dict; errors become one-line :class:`SraeError`.

    ``categories`` may be given as a list of 1-based ids, one id (``3``) or a string
    (``"1-20,35"``, :func:`parse_categories`); it is stored as the sorted list."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SraeError(f"{source or 'config'}: top level must be a mapping, got {type(data).__name__}")
    if "categories" in data:
        data = {**data, "categories": normalize_categories(data["categories"], f"{source or 'config'}: categories")}
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise SraeError(format_validation_error(exc, source)) from None


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML experiment file."""
    p = Path(path)
    if not p.is_file():
        raise SraeError(f"{p}: config file not found")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SraeError(f"{p}: cannot read the config ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SraeError(f"{p}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SraeError(f"{where}: YAML syntax error: {reason}") from None
    if data is None:  # empty, blank or only comments: not "every default" (that would run the demo)
        raise SraeError(f"{p}: the config file is empty; write at least one setting, e.g. `name: myrun` "
                        "(every other field has the demo's default)")
    return config_from_dict(data, str(p))


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last
    silently, so a repeated section would drop the settings of the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: its keys may be overridden here, as YAML intends
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys: PyYAML's own rules apply
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def dump_config(config: ExperimentConfig, path: str | Path | None = None, *, applicable_only: bool = False) -> str:
    """YAML text of ``config`` (written to ``path`` when given). ``applicable_only`` leaves out
    the dataset fields its kind ignores (:meth:`DatasetConfig.unused_fields`), as a report
    shows it; the text still loads to an equivalent config."""
    data = config.model_dump(mode="json")
    if applicable_only:
        for name in config.dataset.unused_fields():
            data["dataset"].pop(name, None)
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text)
    return text


def default_config() -> ExperimentConfig:
    """The embedded demo experiment (identical to configs/demo.yaml)."""
    return ExperimentConfig()


def parse_categories(spec: str, what: str = "--categories") -> list[int]:
    """Parse ``"1-20,35"`` into sorted unique 1-based ids; bad syntax -> one-line error
    starting with ``what`` (the option or field the spec came from)."""
    out: set[int] = set()
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise SraeError(f"{what}: cannot read {part!r} (expected e.g. 1-20,35)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if lo < 1 or hi < lo:
            raise SraeError(f"{what}: bad range {part!r} (ids count from 1, low-high)")
        if hi > MAX_CATEGORY_ID:
            raise SraeError(f"{what}: {part!r} goes beyond class id {MAX_CATEGORY_ID}")
        out.update(range(lo, hi + 1))
    if not out:
        raise SraeError(f"{what}: no category given")
    return sorted(out)


def normalize_categories(value: Any, what: str = "categories") -> Any:
    """``categories`` as a config file, a flow parameter or a deployment's ``-p`` may give it:
    one id (``3``, as ``-p categories=3`` arrives) -> ``[3]``, a string (``"1-3,5"``, also
    ``"3"``) -> its ids, a list or None unchanged. Anything else (a bool, a float) is left for
    the config's validation to reject in one line."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, str):
        return parse_categories(value, what)
    return value


def apply_overrides(
    config: ExperimentConfig,
    *,
    categories: list[int] | None = None,
    dask_address: str | None = None,
    device: str | None = None,
) -> ExperimentConfig:
    """A copy of ``config`` with the CLI / deployment overrides applied and re-validated."""
    data = config.model_dump(mode="json")
    if categories is not None:
        data["categories"] = categories
    if dask_address is not None:
        data["scoring"]["dask_address"] = dask_address
    if device is not None:
        data["device"] = device
    return config_from_dict(data, "overrides")
