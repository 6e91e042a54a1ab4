"""The CLI turns bad input into one line and exit status 2 (no traceback), and `srae features`
reads the data and checkpoint where `srae run` leaves them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from srae.cli import build_parser, main
from srae.errors import InputError, SraeError

CLASSES, PER_CLASS, SIZE = 2, 4, 32


def _config(base: Path) -> Path:
    cfg = {"name": "tiny", "cache_dir": str(base / "cache"), "device": "cpu",
           "dataset": {"kind": "synthbirds", "root": str(base / "data"), "classes": CLASSES,
                       "per_class": PER_CLASS, "size": SIZE},
           "backbone": {"name": "demo_cnn", "input_size": SIZE},
           "features": {"batch_size": 4}}
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def made(tmp_path):
    """A config, its synthetic data where `srae run` generates it, and a demo CNN checkpoint
    where `srae run` saves it."""
    from srae.backbones import build_backbone, save_backbone
    from srae.config import load_config
    from srae.datasets.common import dataset_dir
    from srae.datasets.synthetic import make_synthbirds

    path = _config(tmp_path)
    cfg = load_config(path)
    out = dataset_dir(cfg.dataset)
    out.mkdir(parents=True)
    make_synthbirds(out, classes=CLASSES, per_class=PER_CLASS, size=SIZE, seed=cfg.dataset.seed)
    ckpt = tmp_path / "cache" / "backbones" / "demo_cnn-k" / "model.safetensors"
    save_backbone(build_backbone("demo_cnn", CLASSES, input_size=SIZE, seed=0), ckpt)
    return {"config": path, "cfg": cfg, "checkpoint": ckpt, "base": tmp_path}


def _fails_in_one_line(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit 2 with one stderr line (argparse: usage + one error line)."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err and err[-1].startswith(f"srae {argv[0]}: error: argument ")
        return err[-1]
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith(f"srae {argv[0]}: error: "), err
    return err[0]


# ----------------------------------------------------------------------------- srae features
def test_features_reads_the_data_and_checkpoint_srae_run_made(made, capsys, tmp_path):
    from tasks.download import dataset_dir as pipeline_dataset_dir

    from srae.datasets.common import dataset_dir

    assert pipeline_dataset_dir is dataset_dir  # one definition for the pipeline and the CLI
    store = tmp_path / "stores"
    rc = main(["features", str(made["config"]), "--checkpoint", str(made["checkpoint"]),
               "--store-root", str(store), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and f"({CLASSES * PER_CLASS} images, Z 256-d, {CLASSES} classes)" in out
    assert len(list(store.glob("*.zarr"))) == 1


def test_features_help_says_where_srae_run_leaves_the_checkpoint(capsys):
    with pytest.raises(SystemExit):
        main(["features", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "backbones/<name>-<key>/model.safetensors" in text and "srae run" in text


def test_features_without_generated_data_names_where_it_looked(tmp_path, capsys):
    line = _fails_in_one_line(capsys, ["features", str(_config(tmp_path))])
    assert "no generated synthbirds dataset at" in line and "synthbirds-" in line and "srae run" in line


@pytest.mark.parametrize("args, word", [
    (["--device", "foo"], "--device"),
    (["--device", "cuda:x"], "--device"),
    (["--workers", "-1"], "--workers"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "two"], "--batch-size"),
])
def test_features_bad_options_are_argparse_errors(tmp_path, capsys, args, word):
    line = _fails_in_one_line(capsys, ["features", str(_config(tmp_path)), *args])
    assert word in line


def test_features_library_rejects_bad_values_instead_of_ignoring_them(made):
    from srae.features_cli import features_from_config

    kw = {"checkpoint": made["checkpoint"], "store_root": made["base"] / "s", "progress": False}
    with pytest.raises(InputError, match="batch size 0 must be >= 1"):
        features_from_config(made["cfg"], batch_size=0, **kw)
    with pytest.raises(InputError, match="device 'foo'"):
        features_from_config(made["cfg"], device="foo", **kw)
    assert not (made["base"] / "s").exists()


def test_resolve_device_rejects_garbage_in_one_line():
    from srae.backbones import resolve_device

    with pytest.raises(InputError, match="device 'foo': expected auto, cpu, cuda"):
        resolve_device("foo")
    assert str(resolve_device("cpu")) == "cpu"


def test_features_store_root_that_is_a_file(made, capsys):
    afile = made["base"] / "afile"
    afile.write_text("x")
    line = _fails_in_one_line(capsys, ["features", str(made["config"]), "--checkpoint", str(made["checkpoint"]),
                                       "--store-root", str(afile), "--no-progress"])
    assert "afile is a file, not a directory" in line


def test_truncated_store_metadata_says_delete_it(made, capsys, tmp_path):
    argv = ["features", str(made["config"]), "--checkpoint", str(made["checkpoint"]),
            "--store-root", str(tmp_path / "st"), "--no-progress"]
    assert main(argv) == 0
    store = next((tmp_path / "st").glob("*.zarr"))
    meta = store / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:30])
    capsys.readouterr()
    line = _fails_in_one_line(capsys, argv)
    assert line.endswith(f"store metadata unreadable: {store}; delete it to rebuild (JSONDecodeError in zarr.json)")


def test_root_attrs_reports_unreadable_metadata(tmp_path):
    from srae.stores import root_attrs

    assert root_attrs(tmp_path / "none.zarr") is None
    (tmp_path / "a.zarr").mkdir()
    (tmp_path / "a.zarr" / "zarr.json").write_bytes(b'{"attributes": {"compl')
    with pytest.raises(SraeError, match=r"store metadata unreadable: .*a\.zarr; delete it to rebuild"):
        root_attrs(tmp_path / "a.zarr")
    (tmp_path / "a.zarr" / "zarr.json").write_bytes(b'{"attributes": {"complete": true}}')
    assert root_attrs(tmp_path / "a.zarr") == {"complete": True}


def test_garbage_checkpoint_is_one_short_line(made, capsys, tmp_path):
    from srae.backbones import load_state_dict_file

    bad = tmp_path / "garbage.pth"
    bad.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError) as exc:
        load_state_dict_file(bad)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {bad}: cannot be read (") and "weights_only" not in msg
    line = _fails_in_one_line(capsys, ["features", str(made["config"]), "--checkpoint", str(bad), "--no-progress"])
    assert f"checkpoint {bad}: cannot be read" in line


# ----------------------------------------------------------------------------- config files
def test_non_utf8_yaml_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: demo\n# caf\xe9\n")
    for argv in (["features", str(bad)], ["run", str(bad), "--check"]):
        line = _fails_in_one_line(capsys, argv)
        assert line.endswith(f"{bad}:2: not UTF-8 text (byte 0xe9 at offset 16)")


def test_categories_range_is_capped(tmp_path, capsys):
    line = _fails_in_one_line(capsys, ["run", str(_config(tmp_path)), "--categories", "1-200000", "--check"])
    assert "goes beyond class id 100000" in line


@pytest.mark.parametrize("text", ["", "\n   \n", "# only a comment\n\n# and another\n", "---\n",
                                  "---\n# nothing yet\n...\n"])
def test_an_empty_config_file_is_one_line_naming_it(tmp_path, capsys, monkeypatch, text):
    """An empty config file loaded as all defaults: `srae run empty.yaml` silently ran the
    built-in demo and overwrote reports/demo."""
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    for argv in (["run", str(empty), "--check"], ["run", str(empty)], ["features", str(empty)]):
        line = _fails_in_one_line(capsys, argv)
        assert line.startswith(f"srae {argv[0]}: error: {empty}: the config file is empty"), line
    assert list(tmp_path.iterdir()) == [empty]  # no reports/, no data/: nothing ran


@pytest.mark.parametrize(("value", "ids"), [(2, [2]), ("2", [2]), ("1-2", [1, 2]), (" 2, 1 ", [1, 2]),
                                            ([2, 1], [1, 2])])
def test_config_categories_may_be_one_id_a_range_string_or_a_list(tmp_path, capsys, value, ids):
    from srae.config import config_from_dict, load_config

    path = _config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["categories"] = value
    path.write_text(yaml.safe_dump(cfg))
    assert load_config(path).categories == ids
    assert main(["run", str(path), "--check"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["categories"] == ids
    assert config_from_dict(cfg).categories == ids


@pytest.mark.parametrize(("value", "word"), [("x", "categories: cannot read 'x'"), (0, "class ids count from 1"),
                                             (True, "categories"), ("", "categories: no category given"),
                                             (3, "class id 3 exceeds dataset.classes=2")])
def test_bad_config_categories_are_one_line_naming_file_and_field(tmp_path, capsys, value, word):
    path = _config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["categories"] = value
    path.write_text(yaml.safe_dump(cfg))
    line = _fails_in_one_line(capsys, ["run", str(path), "--check"])
    assert line.startswith(f"srae run: error: {path}: ") and word in line, line


# ----------------------------------------------------------------------------- srae synth
def test_synth_out_is_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = _fails_in_one_line(capsys, ["synth", "birds", "--out", str(afile)])
    assert line.endswith(f"output {afile} is a file, not a directory")


def test_synth_size_has_an_upper_bound(tmp_path, capsys):
    line = _fails_in_one_line(capsys, ["synth", "birds", "--out", str(tmp_path / "o"), "--size", "1100",
                                       "--classes", "2", "--per-class", "2"])
    assert line.endswith("image size must be at most 1024 pixels, got 1100")
    assert not (tmp_path / "o" / "CUB_200_2011").exists()


def test_os_errors_are_a_last_resort_one_liner(tmp_path, capsys, monkeypatch):
    from srae.datasets import synthetic

    def denied(*_a, **_k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "o"))

    monkeypatch.setattr(synthetic, "make_synthbirds", denied)
    line = _fails_in_one_line(capsys, ["synth", "birds", "--out", str(tmp_path / "o")])
    assert line == f"srae synth: error: PermissionError: [Errno 13] Permission denied: '{tmp_path / 'o'}'"


# ----------------------------------------------------------------------------- -v placement
@pytest.mark.parametrize("argv, verbose", [
    (["run", "c.yaml"], False),
    (["run", "-v", "c.yaml"], True),
    (["run", "c.yaml", "--verbose"], True),
    (["-v", "run", "c.yaml"], True),
    (["-v", "run", "-v", "c.yaml"], True),
    (["features", "c.yaml", "-v"], True),
])
def test_verbose_is_accepted_before_and_after_the_subcommand(argv, verbose):
    args = build_parser().parse_args(argv)
    assert args.verbose is verbose and args.command == argv[argv.index("run") if "run" in argv else 0]


@pytest.mark.parametrize("argv, word", [
    (["synth", "birds", "--out", "OUT", "--seed", "-1"], "--seed: -1 must be >= 0"),
    (["download", "cub", "--root", "OUT", "--url", "notaurl"], "not an http(s) URL"),
    (["download", "cub", "--root", "OUT", "--url", "http://[::1"], "Invalid IPv6 URL"),
    (["download", "cub", "--root", "OUT", "--url", "ftp://host/x.tgz"], "not an http(s) URL"),
    (["download", "cub", "--root", "OUT", "--timeout", "-5"], "--timeout"),
    (["download", "cub", "--root", "OUT", "--timeout", "nan"], "finite"),
    (["download", "cub", "--root", "OUT", "--retries", "-1"], "--retries: -1 must be >= 0"),
])
def test_bad_option_values_fail_before_any_work(tmp_path, capsys, argv, word):
    """Values numpy / urllib / sockets would reject with a traceback later are usage errors."""
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert word in _fails_in_one_line(capsys, argv)
    assert not (tmp_path / "out").exists()


def test_negative_seeds_are_config_errors(tmp_path, capsys):
    """numpy rejects negative seeds mid-run; the config check names the field instead."""
    cfg = tmp_path / "c.yaml"
    for text, field in (("seed: -5\n", "seed"), ("explainer: {seed: -1}\n", "explainer.seed")):
        cfg.write_text(text)
        line = _fails_in_one_line(capsys, ["run", str(cfg), "--check"])
        assert f"{field}: Input should be greater than or equal to 0" in line, line


def test_unusable_output_paths_fail_before_the_run(tmp_path, capsys):
    """A file where the run writes a directory, or a missing checkpoint, is one line naming
    the field, before Prefect starts (the run used to fail only at its last stage)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    cfg = tmp_path / "c.yaml"
    cases = [
        ({"report": {"out_dir": str(afile)}}, f"report.out_dir: {afile} is a file, not a directory"),
        ({"cache_dir": str(afile / "cache")}, f"cache_dir: {afile / 'cache'} cannot be created: {afile} is a file"),
        ({"dataset": {"root": str(afile / "d")}}, "dataset.root:"),
        ({"backbone": {"checkpoint": str(tmp_path / "none.pt")}}, "backbone.checkpoint:"),
        ({"dataset": {"kind": "cub", "download": False}},
         f"dataset.root: no cub dataset under {tmp_path / 'data'} and dataset.download is false"),
    ]
    for data, expected in cases:
        base = {"cache_dir": str(tmp_path / "cache"), "report": {"out_dir": str(tmp_path / "r")},
                "dataset": {"root": str(tmp_path / "data")}}
        for key, value in data.items():
            base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
        cfg.write_text(yaml.safe_dump(base))
        line = _fails_in_one_line(capsys, ["run", str(cfg)])
        assert expected in line, line
    assert not (tmp_path / "cache").exists()  # nothing ran


def test_home_in_config_paths_is_expanded(tmp_path, monkeypatch):
    from srae.config import ExperimentConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = ExperimentConfig.model_validate({"cache_dir": "~/cache", "report": {"out_dir": "~/r"}})
    assert cfg.cache_dir == tmp_path / "cache" and cfg.report.out_dir == tmp_path / "r"


def test_features_on_a_missing_device_leaves_no_store(made, capsys, tmp_path):
    """The device is checked before the store is created (an empty store was left behind)."""
    store = tmp_path / "stores"  # cuda:99: no machine has it, with or without CUDA
    line = _fails_in_one_line(capsys, ["features", str(made["config"]), "--checkpoint", str(made["checkpoint"]),
                                       "--store-root", str(store), "--no-progress", "--device", "cuda:99"])
    assert "cuda:99" in line and "CUDA" in line
    assert not store.exists() or not list(store.glob("*.zarr*"))


def test_download_root_that_is_a_file_names_the_option(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "--root" in _fails_in_one_line(capsys, ["download", "cub", "--root", str(afile)])


@pytest.mark.parametrize("argv, prog, extra", [
    (["run", "configs/demo.yaml", "--bogus"], "srae run", "--bogus"),
    (["synth", "birds", "--out", "OUT", "--zzz", "1"], "srae synth", "--zzz 1"),
    (["--bogus"], "srae", "--bogus"),
])
def test_unknown_options_are_reported_by_the_subcommand(capsys, argv, prog, extra):
    """`srae run X --bogus` printed the top-level usage, which does not list run's options."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[0].startswith(f"usage: {prog} ")
    assert err[-1] == f"{prog}: error: unrecognized arguments: {extra}"


def test_run_without_a_config_outside_the_checkout_uses_the_built_in_demo(tmp_path, monkeypatch, capsys):
    """`srae run` outside the repository used to fail with "configs/demo.yaml: config file not
    found", although that file only repeats the built-in defaults."""
    from srae.config import default_config, dump_config

    monkeypatch.chdir(tmp_path)
    assert main(["run", "--check"]) == 0
    assert capsys.readouterr().out == dump_config(default_config())
    assert main(["run", "missing.yaml", "--check"]) == 2  # a named config must exist
    assert "missing.yaml: config file not found" in capsys.readouterr().err


def test_a_bad_heatmap_readout_fails_before_the_run(tmp_path, capsys):
    """`heatmaps.readout: pool9` used to pass --check, fit the backbone, train every explainer,
    then fail every category at the heatmaps stage and exit 0; fc6 was even listed as valid."""
    from srae.config import default_config, dump_config

    for readout, ok in (("pool9", False), ("fc6", False), ("flatten", False), ("pool3", True)):
        cfg = yaml.safe_load(dump_config(default_config()))
        cfg["heatmaps"]["readout"] = readout
        path = tmp_path / f"{readout}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["run", str(path), "--check"]) == (0 if ok else 2)
        err = capsys.readouterr().err.strip().splitlines()
        if not ok:
            assert err == [f"srae run: error: heatmaps.readout: {readout!r} is not a readout of demo_cnn (one of "
                           "conv1_1, relu1_1, pool1, conv2_1, relu2_1, pool2, conv3_1, relu3_1, pool3, conv4_1, "
                           "relu4_1, pool4; default pool2)"]


def test_vgg_heatmap_readouts_are_the_spatial_layers_in_order():
    import torch

    from srae.backbones import build_backbone

    with torch.device("meta"):
        bb = build_backbone("vgg16", 3, pretrained=False)
    names = bb.heatmap_readouts
    assert names[:5] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1"] and names[-2:] == ["pool5", "avgpool"]
    assert "fc6" not in names and "flatten" not in names and bb.check_readout("pool4") == bb.readouts["pool4"]


def test_download_defaults_to_the_roots_the_configs_read(monkeypatch, tmp_path, capsys):
    """`srae download cub` put the archive under data/datasets while configs/cub.yaml reads
    data/datasets/cub, so `srae run` downloaded and extracted it a second time."""
    import srae.datasets.download as dl
    from srae.config import load_config

    seen = {}

    def fake(name, root, **kw):
        seen[name] = root
        return root

    monkeypatch.setattr(dl, "download", fake)
    root = Path(__file__).resolve().parents[1]
    cub, places = load_config(root / "configs" / "cub.yaml"), load_config(root / "configs" / "places.yaml")
    monkeypatch.chdir(tmp_path)
    for name in ("cub", "places", "ade20k"):
        assert main(["download", name]) == 0
    assert seen["cub"] == Path(cub.dataset.root)
    assert seen["ade20k"] == Path(places.dataset.root)
    assert seen["places"] / "places365" == Path(places.dataset.places_root)


def test_a_failed_run_states_its_error_once_per_layer_not_three_times():
    """Prefect echoes the error that ends a flow twice more (flow-run ERROR + final state);
    srae keeps the failed task's line and its own closing one."""
    import logging
    import sys

    from srae.run_cli import _drop_flow_failure_echo, _drop_tracebacks

    def record(msg: str, exc: bool = False) -> logging.LogRecord:
        info = None
        if exc:
            try:
                raise ValueError("boom")
            except ValueError:
                info = sys.exc_info()
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, msg, None, info)

    echo = ["Encountered exception during execution: DownloadError('could not download')",
            "Finished in state Failed('Flow run encountered an exception: DownloadError: could not download')"]
    kept = ["Beginning flow run 'x' for flow 'srae-pipeline'", "Finished in state Completed()",
            "report: reports/demo/report.html"]
    assert [m for m in echo + kept if _drop_flow_failure_echo(record(m))] == kept
    rec = record("Task run failed", exc=True)
    assert _drop_tracebacks(rec) and rec.exc_info is None  # the line stays, its traceback goes


def test_run_with_a_dead_dask_address_fails_before_anything_starts(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: x\ncache_dir: {tmp_path / 'cache'}\nreport: {{out_dir: {tmp_path / 'r'}}}\n")
    line = _fails_in_one_line(capsys, ["run", str(cfg), "--dask-address", f"tcp://127.0.0.1:{port}"])
    assert "no Dask scheduler answers" in line
    assert not (tmp_path / "cache").exists()  # nothing ran
