from __future__ import annotations

from pathlib import Path

import pytest

from gmeta.cli import main as cli_main
from gmeta.config import Config, ConfigError, dump_yaml, flatten, load_config, to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"ads_cvr.yaml", "ads_cvr_debug.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_says_how_to_launch(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# launch: gmeta train --config configs/" + path.name)


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, key, fragment", [
    ("meta:\n  inner_lrr: 0.1\n", "meta.inner_lrr", "did you mean 'inner_lr'"),
    ("meta:\n  inner_lr: fast\n", "meta.inner_lr", "expected float, got 'fast'"),
    ("meta:\n  inner_steps: 1.5\n", "meta.inner_steps", "expected int"),
    ("meta:\n  algorithm: foml\n", "meta.algorithm", "one of 'maml', 'reptile', 'erm'"),
    ("meta:\n  inner_lr: -1\n", "meta.inner_lr", "must be > 0"),
    ("train:\n  epochs: 0\n", "train.epochs", "must be >= 1"),
    ("data:\n  split:\n    support_ratio: 1.5\n", "data.split.support_ratio", "(0, 1)"),
    ("features:\n  sparse:\n    - {name: a, num_embeddings: 0}\n", "features.sparse[0].num_embeddings", ">= 1"),
    ("features:\n  sparse:\n    - {name: a, bogus: 1}\n", "features.sparse[0].bogus", "unknown key"),
    ("meta:\n  adapt_dense: [over_arch, head]\n", "meta.adapt_dense[1]", "dlrm head's parts"),
    ("meta: 3\n", "meta", "expected a mapping"),
    ("optim:\n  embedding_optimizer: lion\n", "optim.embedding_optimizer", "one of"),
    ("train:\n  eval_at_end: 'yes'\n", "train.eval_at_end", "expected bool"),
])
def test_config_errors_name_the_key_and_file(tmp_path, text, key, fragment):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(key + ":"), msg
    assert fragment in msg
    assert str(p) in msg


@pytest.mark.parametrize("override, key", [
    ("meta.inner_lr=fast", "meta.inner_lr"),
    ("meta.nope=1", "meta.nope"),
    ("nosection.x=1", "nosection"),
    ("meta.inner_lr.x=1", "meta.inner_lr"),
])
def test_override_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(key), str(e.value)


def test_overrides_apply_with_types():
    cfg = load_config(None, ["meta.inner_lr=0.05", "meta.first_order=true", "model.over_arch=[8, 4]",
                             "train.output_dir=/tmp/x"])
    assert cfg.meta.inner_lr == 0.05 and cfg.meta.first_order is True
    assert cfg.model.over_arch == [8, 4] and cfg.train.output_dir == "/tmp/x"


def test_int_accepted_for_float_and_roundtrip():
    cfg = load_config(None, ["optim.dense_lr=1"])
    assert isinstance(cfg.optim.dense_lr, float)
    import yaml

    again = load_config(None, [])
    assert to_dict(again) == to_dict(Config())
    assert yaml.safe_load(dump_yaml(cfg))["optim"]["dense_lr"] == 1.0
    flat = flatten(to_dict(cfg))
    assert flat["features.sparse.user_id.num_embeddings"] == 20000 and flat["meta.inner_lr"] == cfg.meta.inner_lr


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "meta: [\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- 1\n"))


def test_yaml_cannot_construct_python_objects(tmp_path):
    p = _write(tmp_path, "meta: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)


def test_cli_reports_config_error_with_key(tmp_path, capsys):
    p = _write(tmp_path, "meta:\n  inner_lr: fast\n")
    assert cli_main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "meta.inner_lr: expected float, got 'fast'" in err


def test_cli_help_for_every_subcommand(capsys):
    for cmd in ("synth", "prepare", "train", "evaluate"):
        with pytest.raises(SystemExit) as e:
            cli_main([cmd, "--help"])
        assert e.value.code == 0
        assert "--config" in capsys.readouterr().out


def test_exponent_floats_read_as_numbers(tmp_path):
    # PyYAML alone (YAML 1.1) reads 1e-3 as the string '1e-3', which a float key then refused
    p = tmp_path / "c.yaml"
    p.write_text("optim: {dense_lr: 1e-3, embedding_lr: 5E-2}\nmeta: {inner_lr: .5}\n")
    cfg = load_config(p, ["meta.embedding_inner_lr=2e-1"])
    assert (cfg.optim.dense_lr, cfg.optim.embedding_lr, cfg.meta.inner_lr, cfg.meta.embedding_inner_lr) == \
        (1e-3, 5e-2, 0.5, 0.2)
    with pytest.raises(ConfigError, match=r"train.epochs: expected int, got 1000.0"):
        load_config(p, ["train.epochs=1e3"])


def test_dumped_config_reads_back_the_same(tmp_path):
    # text that looks like a number ('1e-5' as a sweep choice) stays text through dump and load
    cfg = load_config(None, ["sweep.params=[{key: optim.dense_weight_decay, choices: ['0', '1e-5']}]",
                             "optim.dense_lr=1e-5"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(cfg))
    back = load_config(p)
    assert back == cfg and back.sweep.params[0].choices == ["0", "1e-5"]



def test_label_values_keep_their_yaml_text(tmp_path):
    # YAML 1.1 reads unquoted yes/no/on/off as booleans and 1.0 as a number: label values
    # are what was written
    cfg = load_config(None, ["features.positive_labels=[yes, On, 1.0, +1]",
                             "features.negative_labels=[no, off, '0', -1]"])
    assert cfg.features.positive_labels == ["yes", "On", "1.0", "+1"]
    assert cfg.features.negative_labels == ["no", "off", "0", "-1"]
    p = _write(tmp_path, "features:\n  positive_labels: [yes, 1]\n  negative_labels: [no, -1]\n")
    from_file = load_config(p)
    assert from_file.features.positive_labels == ["yes", "1"] and from_file.features.negative_labels == ["no", "-1"]
    # and back through a dumped config (the run's config.yaml): still text
    again = _write(tmp_path, dump_yaml(from_file))
    assert load_config(again).features.positive_labels == ["yes", "1"]


def test_text_fields_take_unquoted_yaml_as_written(tmp_path):
    cfg = load_config(None, ["features.task_key=2024", "tracking.run_name=true"])
    assert (cfg.features.task_key, cfg.tracking.run_name) == ("2024", "true")
    assert load_config(_write(tmp_path, "features:\n  label: 1e3\n")).features.label == "1e3"
    # typed fields keep YAML's reading
    typed = load_config(None, ["train.eval_at_end=yes", "data.source.header=no", "data.source.column_names=[a]",
                               "meta.inner_lr=1e-2"])
    assert typed.train.eval_at_end is True and typed.data.source.header is False and typed.meta.inner_lr == 0.01
    # a list item named by a number is found by its text
    named = load_config(None, ["features.sparse=[{name: 7, num_embeddings: 10}]", "features.sparse.7.min_count=2"])
    assert named.features.sparse[0].name == "7" and named.features.sparse[0].min_count == 2


def test_a_config_with_a_base_changes_only_what_it_sets(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text(
        "model:\n  embedding_dim: 8\n  over_arch: [32, 16]\nmeta:\n  inner_lr: 0.2\n  adapt_dense: [over_arch]\n")
    (tmp_path / "mid.yaml").write_text("base: shared/base.yaml\nmodel:\n  over_arch: [7]\n  arch: deepfm\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\nmeta:\n  inner_lr: 0.05\n")
    cfg = load_config(tmp_path / "top.yaml", ["model.embedding_dim=4"])
    assert cfg.model.arch == "deepfm" and cfg.model.over_arch == [7]  # a list is replaced, not merged
    assert cfg.model.embedding_dim == 4 and cfg.meta.inner_lr == 0.05  # the override, then the nearest file
    assert cfg.meta.adapt_dense == ["over_arch"]  # kept from the base
    assert "base" not in dump_yaml(cfg)  # a saved config stands alone


def test_a_bad_base_names_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*missing.yaml \(the base of .*a.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="already in the chain of bases"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "d.yaml").write_text("base: [x]\n")
    with pytest.raises(ConfigError, match=r"^base: must be the path of a config file.*d.yaml"):
        load_config(tmp_path / "d.yaml")
    # an error in a value names the file and the bases under it
    (tmp_path / "e.yaml").write_text("model:\n  embedding_dim: 0\n")
    (tmp_path / "f.yaml").write_text("base: e.yaml\n")
    with pytest.raises(ConfigError, match=r"model.embedding_dim: must be >= 1 \(in .*f.yaml, over .*e.yaml\)"):
        load_config(tmp_path / "f.yaml")
