"""srae.config: defaults = configs/demo.yaml, YAML round trip, one-line errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from srae.config import (
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    default_config,
    dump_config,
    load_config,
    parse_categories,
    stable_hash,
)
from srae.errors import SraeError

ROOT = Path(__file__).resolve().parents[1]


def test_demo_yaml_is_the_embedded_default():
    assert load_config(ROOT / "configs" / "demo.yaml") == default_config() == ExperimentConfig()


@pytest.mark.parametrize("name", ["cub", "places"])
def test_paper_configs_load_with_paper_settings(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.explainer.n == 5
    assert cfg.explainer.hidden == [800, 100]
    assert cfg.explainer.methods == ["SRAE", "NN", "SAE", "CAE", "Lasso"]
    if name == "cub":
        assert (cfg.dataset.kind, cfg.backbone.name) == ("cub", "vgg19")
        assert (cfg.explainer.n_pos, cfg.explainer.n_neg, cfg.explainer.n_test_neg) == (50, 8000, 2000)
        assert cfg.explainer.lasso_alphas == [2.5, 1.5, 0.5, 0.1]
    else:
        assert (cfg.dataset.kind, cfg.backbone.name) == ("places", "vgg16")
        assert len(cfg.dataset.class_names) == 10 and "kitchen" in cfg.dataset.class_names
        assert (cfg.explainer.n_pos, cfg.explainer.n_neg) == (4000, 20000)


def test_yaml_round_trip(tmp_path):
    cfg = config_from_dict({"name": "x", "categories": [3, 1, 3], "explainer": {"n": 3, "grid": {"eta": [0.5]}}})
    assert cfg.categories == [1, 3]  # sorted, unique
    path = tmp_path / "c.yaml"
    dump_config(cfg, path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["explainer"]["grid"]["eta"] == [0.5]


@pytest.mark.parametrize("name, gone, kept", [
    ("cub", {"classes", "per_class", "size", "seed", "class_names", "places_root", "places_per_class"}, {"url"}),
    ("places", {"classes", "per_class", "size", "seed"}, {"url", "class_names", "places_root"}),
    ("demo", {"url", "class_names", "places_root", "places_per_class"}, {"classes", "per_class", "size", "seed"}),
])
def test_report_config_leaves_out_the_dataset_fields_its_kind_ignores(name, gone, kept):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    shown = yaml.safe_load(dump_config(cfg, applicable_only=True))
    assert not gone & set(shown["dataset"]) and kept <= set(shown["dataset"])
    back = config_from_dict(shown)  # still loads, to the same config but for ignored fields
    assert back.model_dump(exclude={"dataset"}) == cfg.model_dump(exclude={"dataset"})
    assert back.dataset.model_dump(exclude=gone) == cfg.dataset.model_dump(exclude=gone)
    assert set(yaml.safe_load(dump_config(cfg))["dataset"]) >= gone  # the full dump keeps them


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"explainer": {"n": 0}}, "bad.yaml: explainer.n: Input should be greater than or equal to 1"),
        ({"explainer": {"nn": 3}}, "bad.yaml: explainer.nn: unknown field"),
        ({"dataset": {"kind": "mnist"}}, "bad.yaml: dataset.kind: Input should be"),
        ({"masking": {"gammas": [0.5, 1.5]}}, "bad.yaml: masking.gammas: gammas must be in [0, 1)"),
        ({"scoring": {"dask_address": "localhost"}}, "bad.yaml: scoring.dask_address: must look like tcp://host:port"),
        ({"explainer": {"grid": {"beta": []}}}, "bad.yaml: explainer.grid.beta: must list at least one value"),
        ({"categories": [0]}, "bad.yaml: categories: class ids count from 1"),
        ({"categories": [7]}, "bad.yaml: categories: class id 7 exceeds dataset.classes=4"),
        ({"device": "gpu"}, "bad.yaml: device: must be auto, cpu, mps, cuda or cuda:N"),
        ({"backbone": {"fit": {"epochs": 0}}}, "bad.yaml: backbone: demo_cnn with fit.epochs 0 needs a checkpoint"),
    ],
)
def test_errors_are_one_line_naming_the_field(data, expected):
    with pytest.raises(SraeError) as info:
        config_from_dict(data, "bad.yaml")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(expected), msg


def test_several_problems_are_counted_on_the_same_line():
    with pytest.raises(SraeError, match=r"^c: explainer\.n: .*\(\+1 more\)$"):
        config_from_dict({"explainer": {"n": 0, "folds": 0}}, "c")


def test_load_config_file_errors(tmp_path):
    with pytest.raises(SraeError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: demo\nexplainer:\n  n: [1\n")
    with pytest.raises(SraeError, match=r"bad\.yaml:\d+: YAML syntax error"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(SraeError, match="top level must be a mapping"):
        load_config(top)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SraeError, match=r"empty\.yaml: the config file is empty"):
        load_config(empty)


def test_parse_categories():
    assert parse_categories("1-3,35") == [1, 2, 3, 35]
    assert parse_categories(" 5 , 2-2,5") == [2, 5]
    for bad in ("a", "3-1", "0-2", "1-", ","):
        with pytest.raises(SraeError, match="--categories"):
            parse_categories(bad)


def test_label_ids_are_zero_based_and_checked():
    cfg = config_from_dict({"dataset": {"kind": "cub"}, "categories": [1, 20, 35]})
    assert cfg.label_ids(200) == [0, 19, 34]
    assert ExperimentConfig().label_ids(4) == [0, 1, 2, 3]
    with pytest.raises(SraeError, match="class id 35 exceeds the dataset's 30 classes"):
        cfg.label_ids(30)


def test_overrides_are_validated_and_do_not_touch_the_original():
    cfg = ExperimentConfig()
    out = apply_overrides(cfg, categories=[2], dask_address="tcp://10.0.0.1:8786", device="cpu")
    assert (out.categories, out.scoring.dask_address, out.device) == ([2], "tcp://10.0.0.1:8786", "cpu")
    assert cfg.categories is None and cfg.scoring.dask_address is None
    assert out.stage_device(out.explainer.device) == "cpu"
    assert cfg.stage_device(cfg.explainer.device) == "auto"
    with pytest.raises(SraeError, match="overrides: device"):
        apply_overrides(cfg, device="tpu")


def test_section_hash_depends_only_on_the_named_sections():
    a = ExperimentConfig()
    b = config_from_dict({"explainer": {"grid": {"eta": [1.0]}}})
    assert a.section_hash("features", "backbone") == b.section_hash("features", "backbone")
    assert a.section_hash("explainer") != b.section_hash("explainer")
    assert a.section_hash("explainer.grid.beta") == b.section_hash("explainer.grid.beta")
    assert stable_hash({"x": 1, "y": [1, 2]}) == stable_hash({"y": [1, 2], "x": 1})


def test_top_level_seed_is_the_default_of_the_section_seeds(tmp_path):
    def seeds(cfg):
        return cfg.dataset.seed, cfg.backbone.fit.seed, cfg.explainer.seed

    assert seeds(ExperimentConfig()) == (0, 0, 0)
    moved = config_from_dict({"seed": 7})
    assert seeds(moved) == (7, 7, 7)
    # a section's own seed wins, also when it equals the old default 0
    mixed = config_from_dict({"seed": 7, "dataset": {"seed": 1}, "backbone": {"fit": {"seed": 0}},
                              "explainer": {"n": 3}})
    assert seeds(mixed) == (1, 0, 7)
    # model instances without a seed of their own inherit it too; with one, they keep it
    from srae.config import BackboneConfig, DatasetConfig, ExplainerConfig, FitConfig

    built = ExperimentConfig(seed=5, dataset=DatasetConfig(kind="cub"),
                             backbone=BackboneConfig(fit=FitConfig(epochs=2)), explainer=ExplainerConfig(seed=3))
    assert seeds(built) == (5, 5, 3) and built.dataset.kind == "cub" and built.backbone.fit.epochs == 2
    # the effective seeds key the caches and are written out: a dumped config reruns the same
    assert moved.section_hash("explainer") != ExperimentConfig().section_hash("explainer")
    assert moved.section_hash("dataset") != ExperimentConfig().section_hash("dataset")
    path = tmp_path / "seeded.yaml"
    dump_config(moved, path)
    assert yaml.safe_load(path.read_text())["backbone"]["fit"]["seed"] == 7
    assert load_config(path) == moved
    assert seeds(apply_overrides(moved, device="cpu")) == (7, 7, 7)
    with pytest.raises(SraeError, match="^s: seed: "):
        config_from_dict({"seed": "x"}, "s")


@pytest.mark.parametrize("name", ["demo", "cub", "places"])
def test_shipped_configs_keep_their_seeds(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert (cfg.seed, cfg.dataset.seed, cfg.backbone.fit.seed, cfg.explainer.seed) == (0, 0, 0, 0)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"dataset": {"size": 24}}, "bad.yaml: dataset.size: Input should be greater than or equal to 32"),
        ({"dataset": {"size": 2048}}, "bad.yaml: dataset.size: Input should be less than or equal to 1024"),
        ({"dataset": {"kind": "synthrooms", "classes": 11}},
         "bad.yaml: dataset: classes: synthrooms has at most 10 room classes, got 11"),
        ({"features": {"layer": "fc7"}}, "bad.yaml: features.layer: Input should be 'fc6'"),
        ({"backbone": {"input_size": 40}}, "bad.yaml: backbone: input_size: demo_cnn needs a multiple of 16, got 40"),
        ({"backbone": {"name": "vgg16", "input_size": 16}}, "bad.yaml: backbone: input_size: vgg16 needs at least 32"),
        ({"categories": [1, 200001], "dataset": {"kind": "cub"}},
         "bad.yaml: categories: class id 200001 is larger than 100000"),
    ],
)
def test_check_catches_what_the_generators_and_backbones_refuse(data, expected):
    with pytest.raises(SraeError) as info:
        config_from_dict(data, "bad.yaml")
    assert str(info.value).startswith(expected), str(info.value)


def test_config_limits_match_the_code_that_imposes_them(tmp_path):
    from srae import config as C
    from srae.backbones import DEMO_WIDTHS, build_backbone
    from srae.datasets import synthetic
    from srae.datasets.ade20k import PAPER_ROOMS
    from srae.errors import InputError

    assert C.DEMO_CNN_STRIDE == 2 ** len(DEMO_WIDTHS) and C.SYNTHROOMS_MAX_CLASSES == len(PAPER_ROOMS)
    assert C.SYNTH_MAX_SIZE == synthetic.MAX_SIZE
    assert build_backbone("demo_cnn", 2, input_size=48).z_layer == "fc6" and C.FEATURE_LAYERS == ("fc6",)
    with pytest.raises(InputError):
        build_backbone("demo_cnn", 2, input_size=40)  # what the config refuses, the builder refuses
    with pytest.raises(InputError, match="at least 32"):
        synthetic.make_synthbirds(tmp_path, classes=2, per_class=2, size=C.SYNTH_MIN_SIZE - 1)
    config_from_dict({"dataset": {"size": C.SYNTH_MIN_SIZE}, "backbone": {"input_size": 48}})  # accepted


def test_non_utf8_config_is_a_one_line_error(tmp_path):
    bad = tmp_path / "latin1.yaml"
    data = "name: demo\nreport:\n  title: Café\n".encode("latin-1")
    bad.write_bytes(data)
    offset = len(b"name: demo\nreport:\n  title: Caf")
    assert data[offset] == 0xE9
    with pytest.raises(SraeError, match=rf"latin1\.yaml:3: not UTF-8 text \(byte 0xe9 at offset {offset}\)$"):
        load_config(bad)


def test_categories_ranges_are_capped():
    assert parse_categories("99999-100000") == [99999, 100000]
    with pytest.raises(SraeError, match="'1-100001' goes beyond class id 100000"):
        parse_categories("1-100001")


def test_dataset_url_help_names_the_ade20k_link_for_places():
    from srae.config import DatasetConfig

    text = DatasetConfig.model_fields["url"].description
    assert "ADE20K" in text and "CUB_200_2011.tgz" in text


def test_per_term_l2_weights_are_optional_grid_axes():
    """lambda1/2/3 (eq. 5) default to unset, so existing configs (and their cache keys) are
    unchanged; when given they are validated like the other axes."""
    from srae.config import ExperimentConfig

    assert ExperimentConfig().explainer.grid.lambda1 is None
    cfg = ExperimentConfig.model_validate({"explainer": {"grid": {"lambda2": [0.0, 1e-3]}}})
    assert cfg.explainer.grid.lambda2 == [0.0, 1e-3]
    for bad in ([], [-1.0]):
        with pytest.raises(Exception, match="lambda3"):
            config_from_dict({"explainer": {"grid": {"lambda3": bad}}})


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    from srae.config import _UniqueKeyLoader

    """PyYAML keeps the last of two equal keys silently: a repeated section dropped the first."""
    p = tmp_path / "dup.yaml"
    p.write_text("explainer:\n  n: 3\nseed: 1\nexplainer:\n  n: 4\n")
    with pytest.raises(SraeError, match=r"dup.yaml:4: .*key 'explainer' given twice \(first on line 1\)"):
        load_config(p)
    p.write_text("explainer:\n  n: 3\n  hidden: [8]\n  n: 4\n")
    with pytest.raises(SraeError, match=r":4: .*key 'n' given twice \(first on line 2\)"):
        load_config(p)
    p.write_text("explainer: {n: 3}\nreport: {title: a}\n")  # distinct keys still load
    assert load_config(p).explainer.n == 3
    # YAML merge keys still work, and a key may override a merged one (YAML's own rule)
    merged = yaml.load("x: &s {n: 2, hidden: [8]}\nexplainer:\n  <<: *s\n  n: 3\n", Loader=_UniqueKeyLoader)
    assert merged["explainer"] == {"n": 3, "hidden": [8]}
    p.write_text("explainer:\n  <<: {n: 2, hidden: [8]}\n  n: 3\n")
    assert load_config(p).explainer.n == 3 and load_config(p).explainer.hidden == [8]


def test_grid_values_must_be_finite():
    for bad in (".nan", ".inf"):
        with pytest.raises(SraeError, match="explainer.grid.beta: .*finite"):
            config_from_dict(yaml.safe_load(f"explainer: {{grid: {{beta: [{bad}]}}}}"))


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("explainer: {n: true}", "explainer.n"),
        ("explainer: {grid: {beta: [0.1, false]}}", "explainer.grid.beta"),
        ("masking: {gammas: [true]}", "masking.gammas"),
        ("seed: false", "seed"),
    ],
)
def test_a_yaml_boolean_is_not_read_as_a_number(text, field):
    # pydantic's lax mode would turn `n: true` into n = 1 without a word
    with pytest.raises(SraeError, match=rf"^c: {field}: got (true|false|\[.*\]): a YAML boolean"):
        config_from_dict(yaml.safe_load(text), "c")


def test_boolean_fields_still_take_booleans():
    cfg = config_from_dict(yaml.safe_load("backbone: {pretrained: false, fit: {augment: false}}\n"
                                          "explainer: {use_dataset_split: true}"))
    assert cfg.backbone.pretrained is False and cfg.backbone.fit.augment is False
    assert cfg.explainer.use_dataset_split is True
