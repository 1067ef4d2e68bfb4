"""The config tree: loading, typed dotted overrides, unknown keys, validation errors, round trip."""

from __future__ import annotations

import types
import typing
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import BaseModel

from pipeline.config import (
    PseudoLabelConfig,
    RunConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
)
from pipeline.errors import ConfigError

from .conftest import small_config_dict

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "conf" / "demo.yaml"


ROOT = Path(__file__).resolve().parents[1]


def _demo_tree() -> dict:
    return yaml.safe_load(DEMO.read_text())


def _write(tmp_path: Path, tree: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


# ------------------------------------------------------------------------------------------- loading


def test_demo_config_validates():
    cfg = load_config(DEMO)
    assert isinstance(cfg, RunConfig)
    assert cfg.name == "demo" and cfg.rounds == 3
    assert cfg.model.kind == "unet2d" and cfg.model.patch_size == [32, 32] and cfg.model.base_channels == 8
    assert cfg.train.method == "mean_teacher" and cfg.train.iterations == 150
    assert cfg.train.lr == pytest.approx(0.003)
    assert cfg.train.consistency.rampup_iterations == 150 and cfg.train.pseudo_label.weight == 0.5
    assert cfg.data.num_labeled == 2 and cfg.data.split_file == ROOT / "data/demo/splits.json"
    assert cfg.generalist.sam.variant == "tiny"
    assert cfg.workers.sam.num_workers == 2 and cfg.workers.sam.num_cpus == 0.5
    assert cfg.run_dir == ROOT / "runs" / "demo"  # relative paths in conf/demo.yaml mean conf/..


def test_load_missing_file_is_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_load_non_mapping_is_config_error(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


# ----------------------------------------------------------------------------------------- overrides


def test_overrides_are_typed_by_yaml():
    cfg = load_config(DEMO, ["train.iterations=7", "train.lr=1e-2", "data.labeled=[a,b]",
                             "generalist.backend=classical", "train.pseudo_label.enabled=false"])
    assert cfg.train.iterations == 7 and type(cfg.train.iterations) is int
    assert cfg.train.lr == pytest.approx(0.01) and type(cfg.train.lr) is float
    assert cfg.data.labeled == ["a", "b"]
    assert cfg.generalist.backend == "classical"
    assert cfg.train.pseudo_label.enabled is False
    # untouched siblings keep the file's values
    assert cfg.train.labeled_batch_size == 4 and cfg.generalist.sam.variant == "tiny"


def test_parse_override_values():
    assert parse_override("train.iterations=7") == ("train.iterations", 7)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")  # split at the first '=' only
    assert parse_override("workers.address=") == ("workers.address", None)
    key, value = parse_override("train.lr=0.5")
    assert key == "train.lr" and isinstance(value, float) and value == 0.5
    assert parse_override("data.labeled=[a, b]") == ("data.labeled", ["a", "b"])
    assert parse_override("train.pseudo_label.enabled=true") == ("train.pseudo_label.enabled", True)


def test_override_creates_missing_section():
    cfg = load_config(DEMO, ["eval.hd_percentile=90"])
    assert cfg.eval.hd_percentile == 90.0


@pytest.mark.parametrize("text", ["train.iterations", "=5", "train..lr=1", "train.=1"])
def test_malformed_override_is_error(text: str):
    with pytest.raises(ConfigError, match="override"):
        load_config(DEMO, [text])


def test_override_into_a_value_is_error():
    with pytest.raises(ConfigError, match="'iterations' is not a section"):
        load_config(DEMO, ["train.iterations.x=3"])


def test_override_of_unknown_key_names_it():
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["train.iteratons=5"])
    assert "train.iteratons" in str(e.value) and "unknown key" in str(e.value)
    assert str(DEMO) in str(e.value)


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["train.method=foo"])
    msg = str(e.value)
    assert "train.method" in msg and "unknown key" not in msg


def test_bad_number_names_the_key():
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["train.iterations=0"])
    assert "train.iterations" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["data.slice_axis=3"])
    assert "data.slice_axis" in str(e.value)


# -------------------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_in_yaml(tmp_path: Path):
    tree = _demo_tree()
    tree["bogus"] = 1
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, tree))
    assert "bogus: unknown key" in str(e.value)


def test_unknown_nested_key_in_yaml(tmp_path: Path):
    tree = _demo_tree()
    tree["train"]["iteratons"] = 5
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, tree))
    assert "train.iteratons: unknown key" in str(e.value)


def test_unknown_deeply_nested_key_in_yaml(tmp_path: Path):
    tree = _demo_tree()
    tree["train"]["consistency"]["ema"] = 0.9
    tree["workers"]["sam"]["gpus"] = 1
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, tree))
    msg = str(e.value)
    assert "train.consistency.ema: unknown key" in msg and "workers.sam.gpus: unknown key" in msg


# ------------------------------------------------------------------------------------ cross-checks


@pytest.mark.parametrize("name", ["../evil", "a/b", "/abs", ".hidden", ""])
def test_unsafe_run_name_is_refused(name: str):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [f"name={name!s}" if name else "name=''"])
    assert "run name" in str(e.value)


def test_safe_run_name_is_accepted():
    assert load_config(DEMO, ["name=exp-1.a_b"]).name == "exp-1.a_b"


def test_patch_size_must_match_model_kind():
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["model.kind=unet3d"])  # demo patch_size has 2 numbers
    assert "patch_size" in str(e.value) and "unet3d" in str(e.value)
    with pytest.raises(ConfigError, match="patch_size"):
        load_config(DEMO, ["model.patch_size=[16,16,16]"])  # 3 numbers for unet2d
    cfg = load_config(DEMO, ["model.kind=unet3d", "model.patch_size=[16,16,16]"])
    assert cfg.model.patch_size == [16, 16, 16]


def test_missing_data_split_is_error(tmp_path: Path):
    tree = _demo_tree()
    del tree["data"]["split_file"]
    del tree["data"]["num_labeled"]  # num_labeled alone is allowed: an SSL4MIS folder's list files split it
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, tree))
    assert "data" in str(e.value) and "split_file" in str(e.value)


def test_split_file_needs_num_labeled(tmp_path: Path):
    tree = _demo_tree()
    del tree["data"]["num_labeled"]
    with pytest.raises(ConfigError, match="num_labeled"):
        load_config(_write(tmp_path, tree))


def test_missing_data_section_is_error(tmp_path: Path):
    tree = _demo_tree()
    del tree["data"]
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, tree))
    assert "data" in str(e.value)


def test_explicit_case_lists_stand_in_for_a_split_file():
    tree = small_config_dict(Path("/d"), Path("/r"))
    tree["data"] = {"root": "/d", "labeled": ["c1"], "unlabeled": ["c2"], "test": ["c3"]}
    cfg = config_from_dict(tree)
    assert cfg.data.split_file is None and cfg.data.labeled == ["c1"] and cfg.data.test == ["c3"]


# ----------------------------------------------------------------------------------------- round trip


def test_dump_reload_round_trip():
    cfg = load_config(DEMO, ["train.iterations=7", "data.labeled=[a,b]", "model.dropout=0.25"])
    tree = yaml.safe_load(dump_config(cfg))
    again = config_from_dict(tree)
    assert again == cfg
    assert again.model_dump(mode="json") == cfg.model_dump(mode="json")
    assert isinstance(again.data.root, Path)


def test_dump_reload_round_trip_small_config(tmp_path: Path):
    cfg = config_from_dict(small_config_dict(tmp_path / "data", tmp_path / "runs"))
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    changed = cfg.model_copy(deep=True)
    changed.train.iterations = 99
    assert config_from_dict(yaml.safe_load(dump_config(changed))) != cfg


def test_validate_assignment():
    cfg = load_config(DEMO)
    with pytest.raises(ValueError):
        cfg.train.iterations = 0


# -------------------------------------------------------------------------------------- forbid extra


def _model_classes(annotation, seen: set[type]) -> None:
    """Every BaseModel class reachable from a type annotation (through Optional, list, etc.)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation in seen:
            return
        seen.add(annotation)
        for field in annotation.model_fields.values():
            _model_classes(field.annotation, seen)
        return
    origin = typing.get_origin(annotation)
    if origin is not None or isinstance(annotation, types.UnionType):
        for arg in typing.get_args(annotation):
            _model_classes(arg, seen)


def test_every_section_forbids_extra_keys():
    seen: set[type] = set()
    _model_classes(RunConfig, seen)
    names = {c.__name__ for c in seen}
    # the walk reaches the deep sections (so the check below is not vacuous)
    assert {"RunConfig", "DataConfig", "ModelConfig", "TrainConfig", "ConsistencyConfig", "PseudoLabelConfig",
            "PromptConfig", "GeneralistConfig", "SamConfig", "ClassicalConfig", "WorkersConfig",
            "ActorResources", "SamPoolConfig", "EvalConfig"} <= names
    lax = sorted(c.__name__ for c in seen if c.model_config.get("extra") != "forbid")
    assert lax == []


def test_every_default_instance_section_forbids_extra(tmp_path: Path):
    cfg = config_from_dict({"data": {"root": str(tmp_path), "labeled": [], "unlabeled": [], "test": []}})

    def walk(obj, path: str) -> list[str]:
        bad = [] if obj.model_config.get("extra") == "forbid" else [path]
        for name in type(obj).model_fields:
            value = getattr(obj, name)
            if isinstance(value, BaseModel):
                bad += walk(value, f"{path}.{name}")
        return bad

    assert walk(cfg, "<root>") == []
    # and a key added at any section really is refused
    for section in ["train.consistency", "train.pseudo_label", "generalist.classical", "workers.trainer", "eval"]:
        tree = cfg.model_dump(mode="json")
        node = tree
        for k in section.split("."):
            node = node[k]
        node["zzz"] = 1
        with pytest.raises(ConfigError, match=rf"{section}\.zzz: unknown key"):
            config_from_dict(tree)


def test_relative_paths_resolve_against_the_config_file_and_overrides_against_cwd(tmp_path, monkeypatch):
    """Issue 8: under `ray job submit --working-dir` relative paths used to resolve inside Ray's package."""
    conf = tmp_path / "project" / "conf"
    conf.mkdir(parents=True)
    (conf / "c.yaml").write_text(yaml.safe_dump({
        "output_dir": "../runs", "data": {"root": "../data/x", "split_file": "../data/x/splits.json", "num_labeled": 1},
        "generalist": {"sam": {"checkpoint": "s3://bucket/sam.pth"}}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(conf / "c.yaml")
    assert cfg.data.root == tmp_path / "project" / "data" / "x"
    assert cfg.output_dir == str(tmp_path / "project" / "runs")
    assert str(cfg.generalist.sam.checkpoint).startswith("s3:/")  # URLs are left alone
    cfg = load_config(conf / "c.yaml", ["data.root=mine", "output_dir=s3://bucket/runs"])
    assert cfg.data.root == elsewhere / "mine"
    assert cfg.output_dir == "s3://bucket/runs" and str(cfg.run_dir) == "s3://bucket/runs/run"


def test_a_run_folder_from_before_a_new_setting_resumes_and_real_changes_are_refused(synthetic_root, tmp_path):
    """A run folder written before a setting existed (its config.yaml lacks the key) resumes: the setting's
    default is what the older version did. A changed value is still refused, by name."""
    import yaml

    from pipeline.resume import prepare_run_dir
    from tests.conftest import small_config

    cfg = small_config(synthetic_root, tmp_path)
    prepare_run_dir(cfg)
    saved = cfg.run_dir / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    for key in ("ensemble", "point_jitter", "box_margin_jitter", "threshold_jitter"):
        del old["prompts"][key]              # as written before the prompt ensemble existed
    del old["train"]["pseudo_label"]["uncertainty_weighting"]
    saved.write_text(yaml.safe_dump(old))
    prepare_run_dir(cfg)                      # resumes
    assert yaml.safe_load(saved.read_text())["prompts"]["ensemble"] == 1
    saved.write_text(yaml.safe_dump(old))  # the old folder again; now resumed with a real change
    with pytest.raises(ConfigError, match=r"differs in: prompts\.ensemble\)"):
        prepare_run_dir(small_config(synthetic_root, tmp_path, prompts={"ensemble": 3}))


def test_a_saved_config_without_a_setting_whose_default_changed_keeps_what_it_ran_with(synthetic_root, tmp_path):
    """train.pseudo_label.loss/schedule were added with the strong form (ce_dice, up) as default; the default
    is now the published form (mse, down). A folder saved before they existed ran with ce_dice/up: resuming
    it with today's defaults is a real change and is refused by name; with the strong form it resumes."""
    import yaml

    from pipeline.config import with_defaults
    from pipeline.resume import prepare_run_dir
    from tests.conftest import small_config

    strong = {"pseudo_label": {"loss": "ce_dice", "schedule": "up", "weight": 0.5}}
    cfg = small_config(synthetic_root, tmp_path, train=strong)
    assert (cfg.train.pseudo_label.loss, cfg.train.pseudo_label.schedule) == ("ce_dice", "up")
    prepare_run_dir(cfg)
    saved = cfg.run_dir / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["train"]["pseudo_label"]["loss"], old["train"]["pseudo_label"]["schedule"]
    filled = with_defaults(old)["train"]["pseudo_label"]
    assert (filled["loss"], filled["schedule"]) == ("ce_dice", "up")
    saved.write_text(yaml.safe_dump(old))
    plain = small_config(synthetic_root, tmp_path, train={"pseudo_label": {"weight": 0.5}})  # today's defaults
    assert (plain.train.pseudo_label.loss, plain.train.pseudo_label.schedule) == ("mse", "down")
    with pytest.raises(ConfigError, match=r"train\.pseudo_label\.loss.*train\.pseudo_label\.schedule"):
        prepare_run_dir(plain)
    prepare_run_dir(cfg)  # the form it ran with: resumes


def test_shipped_configs_load_and_name_the_term_form_they_say():
    """Every conf/*.yaml validates; the hippocampus preset is the published SemiSAM term (the default), the
    strong-term preset differs from it only in the term's form and name, and the demo uses the strong form."""
    forms = {}
    for path in sorted((REPO / "conf").glob("*.yaml")):
        pl = load_config(path).train.pseudo_label
        forms[path.stem] = (pl.loss, pl.schedule, pl.weight)
    default = PseudoLabelConfig()
    assert (default.loss, default.schedule, default.weight) == ("mse", "down", 0.05)
    assert forms["hippocampus"] == ("mse", "down", 0.05)
    assert forms["hippocampus_strong_term"] == forms["demo"][:2] + (0.5,) == ("ce_dice", "up", 0.5)
    official, strong = (load_config(REPO / "conf" / f"{n}.yaml").model_dump(mode="json")
                        for n in ("hippocampus", "hippocampus_strong_term"))
    for tree in (official, strong):
        del tree["name"]
        for key in ("loss", "schedule", "weight", "rampup_iterations"):
            del tree["train"]["pseudo_label"][key]
    assert official == strong


@pytest.mark.parametrize("override", ["train.lr=inf", "train.consistency.weight=inf", "train.pseudo_label.weight=nan",
                                      "generalist.auto_min_gain=-inf"])
def test_non_finite_numbers_are_refused_by_key(override, tmp_path):
    """lr=inf trained to a NaN loss and test Dice 0 with exit 0 (issue 16 item 6): refused before any work."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        load_config(Path(__file__).resolve().parents[1] / "conf" / "demo.yaml", [override])


def test_more_rounds_on_resume_keep_the_schedule_the_run_started_with(synthetic_root, tmp_path):
    """Issue 17: `rounds` set the run-long schedules (UA-MT's threshold ramp, the published term's
    ramp-down), so a run resumed with more rounds trained its next round on another schedule than the one
    its first rounds followed. The schedule is now fixed when the run folder is created."""
    import yaml

    from pipeline.resume import prepare_run_dir
    from pipeline.training.loop import SpecialistTrainer
    from tests.conftest import small_config

    cfg, _ = prepare_run_dir(small_config(synthetic_root, tmp_path, rounds=3))
    assert cfg.train.schedule_rounds == 3
    assert yaml.safe_load((cfg.run_dir / "config.yaml").read_text())["train"]["schedule_rounds"] == 3
    more, _ = prepare_run_dir(small_config(synthetic_root, tmp_path, rounds=5))  # resumed with 2 more rounds
    assert (more.rounds, more.train.schedule_rounds) == (5, 3)
    assert SpecialistTrainer(more, 3, torch.device("cpu")).total_iterations == 3 * more.train.iterations
    with pytest.raises(ConfigError, match=r"differs in: train\.schedule_rounds"):
        prepare_run_dir(small_config(synthetic_root, tmp_path, rounds=5, train={"schedule_rounds": 5}))
    # a folder written before the key existed (3 rounds) ran with its own rounds as the schedule
    saved = cfg.run_dir / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["train"]["schedule_rounds"]
    old["rounds"] = 3
    saved.write_text(yaml.safe_dump(old))
    assert prepare_run_dir(small_config(synthetic_root, tmp_path, rounds=4))[0].train.schedule_rounds == 3


def test_a_preset_says_only_how_it_differs_from_its_base(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("name: b\noutput_dir: runs\ndata:\n  root: data\n  num_labeled: 2\n"
                    "train:\n  iterations: 30\n  pseudo_label:\n    weight: 0.05\n    loss: mse\n")
    (tmp_path / "presets").mkdir()
    preset = tmp_path / "presets" / "strong.yaml"
    preset.write_text("base: ../base.yaml\nname: s\ntrain:\n  pseudo_label:\n    weight: 0.5\n")
    cfg = load_config(preset)
    assert cfg.name == "s" and cfg.train.pseudo_label.weight == 0.5
    assert cfg.train.pseudo_label.loss == "mse" and cfg.train.iterations == 30 and cfg.data.num_labeled == 2
    assert cfg.data.root == (tmp_path / "data").resolve()  # the base's paths resolve against the base's folder
    assert load_config(preset, ["train.pseudo_label.weight=0.1"]).train.pseudo_label.weight == 0.1
    base.write_text("base: presets/strong.yaml\n")
    with pytest.raises(ConfigError, match="is its own base"):
        load_config(preset)
    preset.write_text("base: ../nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml does not exist \(the base of .*strong.yaml\)"):
        load_config(preset)


def test_the_shipped_strong_term_preset_is_its_base_with_the_strong_term():
    root = Path(__file__).resolve().parents[1] / "conf"
    base = load_config(root / "hippocampus.yaml").model_dump(mode="json")
    strong = load_config(root / "hippocampus_strong_term.yaml").model_dump(mode="json")
    assert strong["train"]["pseudo_label"] | {"weight": 0.05, "loss": "mse", "schedule": "down"} == base["train"]["pseudo_label"]
    strong["train"]["pseudo_label"], strong["name"] = base["train"]["pseudo_label"], base["name"]
    assert strong == base


def test_local_cluster_size_auto_is_what_the_machine_has():
    """``workers.local_num_cpus/local_num_gpus: auto`` (like None) leave the count to Ray's detection of this
    machine; a number is passed on; anything else is refused by key."""
    from pipeline.config import WorkersConfig
    from pipeline.ray_runtime import local_cluster_size

    assert local_cluster_size(WorkersConfig(local_num_cpus="auto", local_num_gpus="auto")) == (None, None)
    assert local_cluster_size(WorkersConfig()) == (None, None)
    assert local_cluster_size(WorkersConfig(local_num_cpus=2, local_num_gpus=0)) == (2, 0)
    demo = REPO / "conf" / "demo.yaml"
    assert load_config(demo, ["workers.local_num_cpus=auto"]).workers.local_num_cpus == "auto"
    with pytest.raises(ConfigError, match="local_num_cpus"):
        load_config(demo, ["workers.local_num_cpus=all"])


def test_the_gpu_preset_is_acdc_with_the_literature_budget_on_gpus():
    """conf/acdc_gpu.yaml: conf/acdc.yaml's data, model and method with SSL4MIS's ACDC budget (30,000
    iterations in all, batch 12 + 12, 256 x 256 crops, SGD 0.01 with poly decay 0.9, weight decay 1e-4),
    the trainer on a GPU of its own and the SAM actors on the other GPUs."""
    gpu = load_config(REPO / "conf" / "acdc_gpu.yaml")
    cpu = load_config(REPO / "conf" / "acdc.yaml")
    assert gpu.rounds * gpu.train.iterations == 30_000
    assert (gpu.train.labeled_batch_size, gpu.train.unlabeled_batch_size, gpu.model.patch_size) == (12, 12, [256, 256])
    assert (gpu.train.optimizer, gpu.train.lr, gpu.train.lr_schedule, gpu.train.lr_poly_power,
            gpu.train.weight_decay) == ("sgd", 0.01, "poly", 0.9, 1e-4)
    assert gpu.device == "cuda" and gpu.workers.trainer.num_gpus == 1 and gpu.workers.sam.num_gpus == 1
    assert gpu.workers.local_num_cpus == "auto"
    assert (gpu.data, gpu.train.method, gpu.generalist) == (cpu.data, cpu.train.method, cpu.generalist.model_copy(
        update={"sam": cpu.generalist.sam.model_copy(update={"embed_batch_size": gpu.generalist.sam.embed_batch_size})}))


# -- whole-value mappings replace the base's; what a base gave is logged and printable -----
def test_a_whole_value_mapping_replaces_the_bases_and_sections_still_merge(tmp_path, caplog):
    import logging

    root = Path(__file__).resolve().parents[1]
    preset = tmp_path / "la.yaml"
    preset.write_text(yaml.safe_dump({"base": str(root / "conf" / "acdc.yaml"),
                                      "data": {"labels": {0: "background", 1: "LA"}},
                                      "workers": {"sam": {"resources": {"sam_gpu": 1}}}}))
    with caplog.at_level(logging.INFO, logger="pipeline.config"):
        cfg = load_config(preset)
    assert cfg.data.labels == {0: "background", 1: "LA"}  # not {0, 1: LA, 2: MYO, 3: LV}
    assert cfg.workers.sam.resources == {"sam_gpu": 1.0}
    acdc = load_config(root / "conf" / "acdc.yaml")
    assert cfg.data.root == acdc.data.root and cfg.train.iterations == acdc.train.iterations  # sections merge
    assert cfg.workers.sam.num_workers == acdc.workers.sam.num_workers
    line = next(r.getMessage() for r in caplog.records if "from its base" in r.getMessage())
    assert "data.root" in line and "train.iterations" in line and "data.labels" not in line.split("(")[1].split(")")[0]


def test_config_resolved_prints_what_a_run_would_use(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    preset = tmp_path / "la.yaml"
    preset.write_text(yaml.safe_dump({"base": str(root / "conf" / "acdc.yaml"),
                                      "data": {"labels": {0: "background", 1: "LA"}}}))
    out = subprocess.run([str(Path(sys.executable).parent / "semisam"), "config", "--resolved", str(preset),
                          "rounds=5"], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    tree = yaml.safe_load(out.stdout)
    assert tree["rounds"] == 5 and tree["data"]["labels"] == {"0": "background", "1": "LA"}
    assert tree["train"]["iterations"] == load_config(root / "conf" / "acdc.yaml").train.iterations
