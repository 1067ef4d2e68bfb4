"""Layout detection (MSD, h5, SSL4MIS 2D) and the SSL4MIS layout read end to end, on real files."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data.dataset import (
    load_image,
    load_label,
    read_dataset_info,
    read_image_shape,
    read_label_shape,
)
from pipeline.data.layout import detect_layout
from pipeline.data.splits import resolve_split
from pipeline.data.ssl4mis import read_list_files, slice_name_parts, split_from_lists
from pipeline.data.synthetic import write_synthetic_msd, write_synthetic_ssl4mis
from pipeline.data.validate import validate_cases, validate_dataset
from pipeline.errors import ConfigError, DatasetError
from semisam.cli import main


@pytest.fixture(scope="module")
def ssl4mis_root(tmp_path_factory) -> Path:
    """4 training cases as 12 slice files each, 1 val and 1 test volume (12, 40, 32), dataset.json."""
    return write_synthetic_ssl4mis(tmp_path_factory.mktemp("ssl4mis"), num_train=4, num_val=1, num_test=1, seed=2)


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory) -> Path:
    return write_synthetic_msd(tmp_path_factory.mktemp("msd"), num_cases=3, shape=(16, 20, 18), seed=0)


def _h5_folder(root: Path, n: int = 2, values: tuple[int, ...] = (0, 1)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        with h5py.File(root / f"vol{i}.h5", "w") as f:
            f["image"] = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
            f["label"] = np.resize(np.asarray(values, np.uint8), (4, 5, 6))
    return root


# ------------------------------------------------------------------------------------------ detection


def test_detects_each_layout_and_says_what_it_found(ssl4mis_root, msd_root, tmp_path):
    msd = detect_layout(msd_root)
    assert msd.format == "msd" and msd.found == "MSD/nnU-Net layout: imagesTr/ with 3 NIfTI images"
    h5 = detect_layout(_h5_folder(tmp_path / "h5", n=3))
    assert h5.format == "h5" and h5.found == "h5 layout: 3 .h5 files (one case each)"
    ssl = detect_layout(ssl4mis_root)
    assert ssl.format == "ssl4mis"
    assert ssl.found == ("SSL4MIS 2D layout: 48 slice files of 4 cases in data/slices, 2 volume files in data/, "
                         "lists train_slices.list, train.list, val.list, test.list")


def test_volumes_with_list_files_are_ssl4mis_without_slices(tmp_path):
    root = tmp_path / "vols"
    _h5_folder(root / "data", n=2)
    (root / "test.list").write_text("vol0\n")
    assert detect_layout(root).format == "ssl4mis"
    (root / "test.list").unlink()
    assert detect_layout(root).format == "h5"  # the same files without lists: plain h5 volumes


def test_an_empty_folder_says_what_it_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a dataset folder in any known layout.*found no dataset.json, "
                                           "no imagesTr/, 0 .h5 files, no .list files"):
        detect_layout(tmp_path)


def test_a_wrong_format_hints_at_the_layout_found(ssl4mis_root, msd_root):
    with pytest.raises(DatasetError, match=r"imagesTr: folder of training images does not exist; it looks like the "
                                           r"SSL4MIS 2D layout.*data.format: ssl4mis or auto"):
        read_dataset_info(ssl4mis_root, "msd")
    with pytest.raises(DatasetError, match=r"no .h5 files found; it looks like the MSD/nnU-Net layout.*"
                                           r"--format msd"):
        read_dataset_info(msd_root, "h5")


def test_auto_reads_as_the_explicit_format_does(msd_root, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.data.dataset"):
        auto = read_dataset_info(msd_root)  # auto is the default
    assert "detected the MSD/nnU-Net layout" in caplog.text
    explicit = read_dataset_info(msd_root, "msd")
    assert auto.format == explicit.format == "msd" and auto.cases == explicit.cases
    h5 = read_dataset_info(_h5_folder(tmp_path / "h5"), "auto")
    assert h5.format == "h5" and list(h5.cases) == ["vol0", "vol1"]


def test_data_format_defaults_to_auto_and_rejects_unknown():
    assert DataConfig(root="x", split_file="s.json", num_labeled=1).format == "auto"
    with pytest.raises(ConfigError, match="not supported"):
        read_dataset_info(Path("."), "nifti")


def test_validate_without_format_on_an_h5_folder(tmp_path, capsys):
    root = _h5_folder(tmp_path / "h5", n=2)
    assert main(["validate", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{root}: h5 layout: 2 .h5 files (one case each)" in out
    assert "2 cases (2 labeled), labels {0: 'background', 1: 'foreground'}: OK" in out


def test_h5_class_names_come_from_dataset_json(tmp_path, caplog):
    root = _h5_folder(tmp_path / "h5", n=1, values=(0, 1, 2, 3))
    with caplog.at_level(logging.WARNING):
        info = validate_dataset(root)  # no dataset.json: the classes come from the labels, with a warning
    assert info.labels == {0: "background", 1: "class1", 2: "class2", 3: "class3"}
    assert "has no dataset.json" in caplog.text and "values 0..3" in caplog.text
    ignore = _h5_folder(tmp_path / "ignore", n=1, values=(0, 1, 255))  # an ignore mark is not a class: an error
    with pytest.raises(DatasetError, match=r"values \[255\] .*h5 default.*give one with"):
        validate_dataset(ignore)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "RV": 1, "Myo": 2, "LV": 3}}))
    info = validate_dataset(root)
    assert info.labels == {0: "background", 1: "RV", 2: "Myo", 3: "LV"}
    np.testing.assert_array_equal(np.unique(load_label(info, "vol0")), [0, 1, 2, 3])


# ------------------------------------------------------------------------------------------ SSL4MIS names


def test_slice_names_and_list_files(tmp_path):
    assert slice_name_parts("patient001_frame01_slice_7") == ("patient001_frame01", 7)
    assert slice_name_parts("patient001_frame01") is None
    (tmp_path / "train_slices.list").write_text("b_slice_0\nb_slice_1\na_slice_0\n\n")
    (tmp_path / "val.list").write_text("c.h5\n")
    lists = read_list_files(tmp_path)
    assert lists == {"train_slices": ["b", "a"], "val": ["c"]}
    assert split_from_lists(lists) == (["c"], ["b", "a"], "train_slices.list + val.list")
    with pytest.raises(ValueError, match="no train.list"):
        split_from_lists({"test": ["c"]})


# ------------------------------------------------------------------------------------------ SSL4MIS end to end


def test_ssl4mis_synthetic_set_end_to_end(ssl4mis_root):
    info = read_dataset_info(ssl4mis_root)
    assert info.format == "ssl4mis"
    assert list(info.cases) == [f"patient{i:03d}_frame01" for i in range(1, 7)]
    assert info.labels == {0: "background", 1: "anterior", 2: "posterior"}
    train = info.cases["patient001_frame01"]
    assert [p.name for p in train.slices] == [f"patient001_frame01_slice_{n}.h5" for n in range(12)]
    assert train.image == train.label == train.slices[0]
    test = info.cases["patient006_frame01"]
    assert test.slices == () and test.image == ssl4mis_root / "data" / "patient006_frame01.h5"

    # A training case is its slice files stacked in slice order along axis 0.
    image, spacing = load_image(info, "patient001_frame01", normalization="minmax")
    label = load_label(info, "patient001_frame01")
    assert image.shape == label.shape == (12, 40, 32) == read_image_shape(info, "patient001_frame01")
    assert read_label_shape(info, "patient001_frame01") == (12, 40, 32) and spacing == (1.0, 1.0, 1.0)
    for n in (0, 5, 11):
        with h5py.File(ssl4mis_root / "data" / "slices" / f"patient001_frame01_slice_{n}.h5", "r") as f:
            raw_image, raw_label = f["image"][...], f["label"][...]
        np.testing.assert_array_equal(label[n], raw_label)
        np.testing.assert_allclose(image[n], raw_image, atol=1e-6)  # stored already in [0, 1]: minmax keeps it
    assert set(np.unique(label).tolist()) == {0, 1, 2}

    # A test case comes from its volume file.
    with h5py.File(test.image, "r") as f:
        np.testing.assert_array_equal(load_label(info, "patient006_frame01"), f["label"][...])

    # The split comes from the list files when no split file is given.
    split = resolve_split(DataConfig(root=ssl4mis_root, num_labeled=1), info)
    assert split.labeled == ["patient001_frame01"]
    assert split.unlabeled == ["patient002_frame01", "patient003_frame01", "patient004_frame01"]
    assert split.test == ["patient006_frame01"]
    validate_cases(info, split)
    assert validate_dataset(ssl4mis_root).format == "ssl4mis"


def test_validate_cli_reports_the_ssl4mis_layout(ssl4mis_root, capsys):
    assert main(["validate", str(ssl4mis_root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"{ssl4mis_root}: SSL4MIS 2D layout: 48 slice files of 4 cases in data/slices, 2 volume files "
                      "in data/, lists train_slices.list, train.list, val.list, test.list")
    assert out[1] == "lists: train_slices.list 4 cases, train.list 4 cases, val.list 1 cases, test.list 1 cases"
    assert out[2].endswith("6 cases (6 labeled), labels {0: 'background', 1: 'anterior', 2: 'posterior'}: OK")


def test_no_split_file_and_no_list_files_is_a_config_error(msd_root):
    info = read_dataset_info(msd_root)
    with pytest.raises(ConfigError, match="has no list files to split by"):
        resolve_split(DataConfig(root=msd_root, num_labeled=1), info)


def test_ssl4mis_problems_name_the_files(tmp_path, ssl4mis_root):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(ssl4mis_root, root)
    slices = root / "data" / "slices"
    (slices / "notes.h5").write_bytes(b"")                                     # not a slice name
    with h5py.File(slices / "patient002_frame01_slice_3.h5", "w") as f:       # a slice without label
        f["image"] = np.zeros((40, 32), np.float32)
    with h5py.File(slices / "patient003_frame01_slice_4.h5", "w") as f:       # a slice of another size
        f["image"] = np.zeros((40, 30), np.float32)
        f["label"] = np.zeros((40, 30), np.uint8)
    with pytest.raises(DatasetError) as e:
        read_dataset_info(root)
    text = str(e.value)
    assert f"{slices / 'notes.h5'}: not a slice file" in text
    assert "case 'patient002_frame01': 11 of its 12 slice files have a 'label' dataset" in text
    (slices / "notes.h5").unlink()
    (slices / "patient002_frame01_slice_3.h5").unlink()
    info = read_dataset_info(root)
    assert read_image_shape(info, "patient002_frame01") == (11, 40, 32)
    with pytest.raises(DatasetError, match=r"patient003_frame01_slice_4.h5: image slice shape \(40, 30\) differs"):
        load_image(info, "patient003_frame01")


def test_flat_ssl4mis_slices_beside_the_volumes(ssl4mis_root, tmp_path):
    """Issue 18: forks that keep the slice files flat in data/ were read as volumes (2,624 errors)."""
    flat = tmp_path / "flat"
    shutil.copytree(ssl4mis_root, flat)
    for p in (flat / "data" / "slices").glob("*.h5"):
        p.rename(flat / "data" / p.name)
    (flat / "data" / "slices").rmdir()
    layout = detect_layout(flat)
    assert layout.format == "ssl4mis" and "slice files of 4 cases flat in data/ beside the volumes" in layout.found
    nested, info = read_dataset_info(ssl4mis_root), read_dataset_info(flat)
    assert list(info.cases) == list(nested.cases)
    assert [p.name for p in info.cases["patient001_frame01"].slices] == \
        [p.name for p in nested.cases["patient001_frame01"].slices]
    np.testing.assert_array_equal(load_label(info, "patient002_frame01"), load_label(nested, "patient002_frame01"))
    split = resolve_split(DataConfig(root=flat, num_labeled=1), info)
    assert split == resolve_split(DataConfig(root=ssl4mis_root, num_labeled=1), nested)
    assert validate_dataset(flat).format == "ssl4mis"


def test_uamt_h5_folders_with_list_files_give_the_split(tmp_path):
    """Issue 18: UA-MT's <case>/mri_norm2.h5 with train.list/test.list at the root; the lists were ignored."""
    from pipeline.data.synthetic import write_synthetic_h5

    flat = write_synthetic_h5(tmp_path / "h5", num_cases=5, shape=(16, 20, 12), seed=1)
    root = tmp_path / "uamt"
    root.mkdir()
    for p in sorted(flat.glob("case_*.h5")):
        (root / p.stem).mkdir()
        p.rename(root / p.stem / "mri_norm2.h5")
    (root / "train.list").write_text("case_003\ncase_001\ncase_004\n")
    (root / "test.list").write_text("case_000\n")
    layout = detect_layout(root)
    assert layout.format == "h5" and "lists train.list, test.list" in layout.found
    info = read_dataset_info(root)
    split = resolve_split(DataConfig(root=root, num_labeled=1), info)
    assert (split.labeled, split.unlabeled, split.test) == (["case_003"], ["case_001", "case_004"], ["case_000"])


def test_labeled_patients_reproduce_ssl4mis_acdc_slices_exactly():
    """Issue 18: SSL4MIS counts labeled patients (``patients_to_slices``: the first N lines of
    train_slices.list). ``data.num_labeled_patients`` gives the very same labeled slices on ../shared's ACDC."""
    from tests.conftest import shared_path

    root = shared_path("acdc")
    ssl4mis_table = {3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664}  # SSL4MIS's ref_dict for ACDC
    slices = [ln.strip() for ln in (root / "train_slices.list").read_text().splitlines() if ln.strip()]
    info = read_dataset_info(root)
    for patients, n_slices in ssl4mis_table.items():
        split = resolve_split(DataConfig(root=root, num_labeled_patients=patients), info)
        labeled = set(split.labeled)
        assert len(split.labeled) == 2 * patients  # ED and ES frames
        theirs = [s for s in slices if slice_name_parts(s)[0] in labeled]
        assert theirs == slices[:n_slices], patients  # the same slices, in the same order
    with pytest.raises(ConfigError, match="num_labeled_patients=140 but train_order has only 70 patients"):
        resolve_split(DataConfig(root=root, num_labeled_patients=140), info)  # SSL4MIS's "140" is 70 patients
    with pytest.raises(ValueError, match="not both"):
        DataConfig(root=root, num_labeled=6, num_labeled_patients=3)


def test_labeled_patients_need_consecutive_frames(tmp_path):
    from pipeline.data.splits import first_patients

    pattern = DataConfig.model_fields["patient_pattern"].default
    order = ["patient001_frame01", "patient001_frame12", "patient002_frame01", "patient003_frame01"]
    assert first_patients(order, 1, pattern) == 2 and first_patients(order, 3, pattern) == 4
    assert first_patients(order, 4, pattern) is None
    assert first_patients(["a", "b"], 1, pattern) == 1  # a case the pattern does not match is its own patient
    with pytest.raises(ConfigError, match="patient 'patient001' are not consecutive"):
        first_patients(["patient001_frame01", "patient002_frame01", "patient001_frame12"], 3, pattern)


def test_classes_come_from_the_labels_without_dataset_json(tmp_path, caplog):
    """Issue 18: an SSL4MIS folder without dataset.json gave one error per file ("values [2] not in the
    labels [0, 1] of the h5 default"); the classes now come from the labeled and test cases' labels, with
    a warning, and reach the config that every actor gets."""
    from pipeline.data.validate import labels_from_data
    from pipeline.preflight import preflight
    from tests.conftest import small_config

    root = write_synthetic_ssl4mis(tmp_path / "ssl", num_train=4, num_val=1, num_test=1, seed=3, class_names=False)
    info = read_dataset_info(root)
    split = resolve_split(DataConfig(root=root, num_labeled=1), info)
    with pytest.raises(DatasetError, match="not in the labels"):
        validate_cases(info, split)  # what a run met before
    assert labels_from_data(info, split) == {0: "background", 1: "class1", 2: "class2"}
    cfg = small_config(root, tmp_path / "runs", data={"root": str(root), "split_file": None, "num_labeled": 1,
                                                      "format": "ssl4mis", "slice_axis": 0})
    with caplog.at_level(logging.WARNING):
        cfg2, info2, _ = preflight(cfg)
    assert cfg2.data.labels == {0: "background", 1: "class1", 2: "class2"} and info2.num_classes == 3
    assert any("classes taken from the labels" in r.message for r in caplog.records)
    assert labels_from_data(read_dataset_info(write_synthetic_ssl4mis(tmp_path / "named", seed=3)), split) is None


def test_a_bad_split_says_how_the_dataset_was_read(msd_root):
    """Issue 18: "bad split (140 problems): case ... is not in the dataset" never said what layout was read."""
    info = read_dataset_info(msd_root)
    with pytest.raises(ConfigError, match=r"was read as the MSD/nnU-Net layout: imagesTr/ with 3 NIfTI images"):
        resolve_split(DataConfig(root=msd_root, labeled=["patient099_frame01"], test=[]), info)
