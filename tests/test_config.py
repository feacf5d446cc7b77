import pytest
import yaml
from conftest import ROOT, run_cli, run_main

from crack_lightning.config.files import dump_yaml, load_config, parse_overrides
from crack_lightning.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_all_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.data.class_names == ["Negative", "Positive"], path


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.frozen\.lrr'"):
        load_config(write(tmp_path, "train:\n  frozen:\n    lrr: 0.1\n"))
    with pytest.raises(ConfigError, match=r"unknown config key 'dataa'"):
        load_config(write(tmp_path, "dataa: {}\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected int, got 'big'"):
        load_config(write(tmp_path, "data:\n  batch_size: big\n"))
    with pytest.raises(ConfigError, match=r"model\.pretrained: 'imagenet' is not one of"):
        load_config(write(tmp_path, "model:\n  pretrained: imagenet\n"))
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected int, got 'True'"):
        load_config(None, [("data.batch_size", "true")])


def test_value_checks():
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(None, [("data.val_fraction", "1.5")])
    with pytest.raises(ConfigError, match="must leave images for training"):
        load_config(None, [("data.val_fraction", "0.5"), ("data.test_fraction", "0.5")])
    with pytest.raises(ConfigError, match="class_names"):
        load_config(None, [("data.class_names", "[a, a]")])


def test_overrides_apply_with_types():
    pairs = parse_overrides(["--trainer.max_epochs", "3", "--data.root=/x", "--train.frozen.lr", "1e-2",
                             "--data.class_names", "[ok, crack]"])
    cfg = load_config(ROOT / "configs/quickstart.yaml", pairs)
    assert cfg.trainer.max_epochs == 3
    assert cfg.data.root == "/x"
    assert cfg.train.frozen.lr == 0.01
    assert cfg.data.class_names == ["ok", "crack"]
    assert cfg.train.frozen.epochs == 15  # untouched value from the file


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--data.root"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["data.root", "x"])


def test_dump_roundtrip():
    """The resolved config a run writes reads back to the same config, every key included."""
    from crack_lightning.config.files import to_dict
    from crack_lightning.config.parser import from_dict

    cfg = load_config(ROOT / "configs/base.yaml", [("data.extra_roots", "a,b"), ("run_name", "off")])
    text = dump_yaml(cfg)
    assert from_dict(yaml.safe_load(text)) == cfg
    assert yaml.safe_load(text) == to_dict(cfg)
    assert cfg.model.backbone == "mobilenetv3_large_100" and cfg.data.extra_roots == ["a", "b"]


def test_cli_print_config_and_errors():
    res = run_main("train.py", "--config", "configs/quickstart.yaml", "--print_config", "--data.batch_size", "7")
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load(res.stdout)["data"]["batch_size"] == 7
    res = run_main("train.py", "--config", "configs/quickstart.yaml", "--data.bogus", "1")
    assert res.returncode == 2
    assert res.stderr.strip() == ("error: unknown config key 'data.bogus' (valid keys here: augment, bad_images, "
                                  "balance_sources, batch_size, class_names, extra_roots, group_pattern, "
                                  "max_per_class, num_workers, prefetch_factor, root, seed, test_fraction, "
                                  "tile_clear_margin, tile_crack_fraction, tile_sizes, val_fraction)")
    assert "Traceback" not in res.stderr
    res = run_main("train.py", "--config", "configs/nope.yaml")
    assert res.returncode == 2 and "config file not found: configs/nope.yaml" in res.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """Every shipped file loads, and every key it sets arrives with the value written (no silent default)."""
    from crack_lightning.config.files import to_dict

    raw = yaml.safe_load(path.read_text())
    resolved = to_dict(load_config(path))

    def check(given, got, where):
        for key, value in given.items():
            if isinstance(value, dict):
                check(value, got[key], f"{where}{key}.")
            else:
                assert got[key] == value or (isinstance(value, str) and got[key] == float(value)), where + key

    check(raw, resolved, "")


def test_text_keys_take_the_value_as_written_and_lists_split_on_commas():
    cfg = load_config(None, [("run_name", "off"), ("data.root", "123"), ("model.weights_file", "yes"),
                             ("data.class_names", "no_crack, crack")])
    assert cfg.run_name == "off" and cfg.data.root == "123" and cfg.model.weights_file == "yes"
    assert cfg.data.class_names == ["no_crack", "crack"]
    assert load_config(None, [("model.weights_file", "null")]).model.weights_file is None
    assert load_config(None, [("trainer.devices", "2")]).trainer.devices == 2  # int or str: YAML decides
    assert load_config(None, [("trainer.devices", "auto")]).trainer.devices == "auto"
    # trainer.max_epochs: Lightning's meaning (the run's total); 0 as 0.2's config files wrote it = no cap
    assert load_config(None, [("trainer.max_epochs", "0")]).trainer.max_epochs is None
    assert load_config(None).trainer.max_epochs is None and load_config(None).trainer.devices == 1


def test_a_config_mistake_is_reported_without_importing_torch():
    """One user-error family (crack_lightning.errors), importable without torch: a typo costs no torch import."""
    import subprocess
    import sys

    code = ("import sys; from crack_lightning.cli.guard import guarded; from crack_lightning.cli.train import train_main; "
            "rc = guarded(lambda: train_main(['--data.bogus', '1'])); "
            "print(rc, 'torch' in sys.modules, 'lightning' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.stdout.split() == ["2", "False", "False"], res.stderr
    assert res.stderr.startswith("error: unknown config key 'data.bogus'")
    code = code.replace("'--data.bogus', '1'", "'--trainer.gradient_clip_vall', '1'")  # a Trainer key, misspelt
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.stdout.split() == ["2", "False", "False"], res.stderr
    assert res.stderr.startswith("error: unknown config key 'trainer.gradient_clip_vall'")
    import inspect

    import lightning as L

    from crack_lightning.config.parser import trainer_argument_names

    assert list(trainer_argument_names()) == [n for n in inspect.signature(L.Trainer.__init__).parameters
                                              if n != "self"]
    from crack_lightning.errors import BadImageError, CheckpointError, UserError

    assert issubclass(CheckpointError, UserError) and issubclass(BadImageError, UserError)


def test_help_lists_every_key_with_type_default_and_description():
    """--help comes from the parsers: every key of the recipe's sections and every lightning.Trainer
    argument, each with its type, default and a description (the sections' docstrings; Lightning's own);
    docs/configuration.md and the stored Trainer help are the same text, up to date."""
    import dataclasses
    import inspect

    import lightning as L

    from crack_lightning.config.parser import TRAINER_OWNED
    from crack_lightning.config.schema import SECTIONS, TOP_LEVEL

    res = run_main("train.py", "--help")
    assert res.returncode == 0
    listed = {ln.split()[0] for ln in res.stdout.splitlines() if ln.startswith("  --")}

    def keys(cls, prefix):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
                yield from keys(type(f.default_factory()), f"{prefix}{f.name}.")
            else:
                yield f"--{prefix}{f.name}"

    expected = {k for name, cls in SECTIONS.items() for k in keys(cls, f"{name}.")} | {f"--{k}" for k in TOP_LEVEL}
    trainer = {f"--trainer.{n}" for n in inspect.signature(L.Trainer.__init__).parameters} - {"--trainer.self"}
    expected |= trainer - {f"--trainer.{n}" for n in TRAINER_OWNED}
    assert expected <= listed, sorted(expected - listed)
    text = " ".join(res.stdout.split())
    assert "--train.frozen.epochs EPOCHS most epochs of this stage (early stopping may end it sooner) " \
           "(type: int, default: 10)" in text
    assert "--model.pretrained {timm,lite0,none} ImageNet weights from timm's hub" in text
    assert "(type: Literal['timm', 'lite0', 'none'], default: lite0)" in text
    undescribed = [k for k in sorted(expected) if f"{k} {k.rsplit('.', 1)[-1].upper()} (type:" in text]
    assert not undescribed, undescribed
    assert "--trainer.gradient_clip_val" in listed and "--trainer.accumulate_grad_batches" in listed
    assert "--trainer.devices DEVICES" in text and "default: 1)" in text.split("--trainer.devices DEVICES")[1][:600]
    check = run_cli("tools/config_reference.py", "--check")
    assert check.returncode == 0, check.stderr


def test_a_partial_section_keeps_the_documented_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  finetune: {epochs: 2}\n"))
    assert cfg.train.finetune.epochs == 2 and cfg.train.finetune.lr == 1e-4  # fine-tuning's own default
    assert cfg.train.frozen.lr == 1e-3 and cfg.train.frozen.epochs == 10
    cfg = load_config(ROOT / "configs/quickstart.yaml", [("train.finetune.epochs", "1")])
    assert cfg.train.finetune.lr == 1e-4 and cfg.train.frozen.lr == 0.003
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.finetune\.lrr'"):
        load_config(write(tmp_path, "train:\n  finetune: {lrr: 2}\n"))
