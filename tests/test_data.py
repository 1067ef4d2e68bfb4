"""Reading, splitting and validating datasets, on synthetic files and (when present) the shared real data."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data.dataset import load_image, load_label, read_dataset_info, read_image_shape
from pipeline.data.splits import Split, resolve_split
from pipeline.data.synthetic import write_split_file, write_synthetic_msd
from pipeline.data.validate import validate_cases, validate_dataset
from pipeline.errors import ConfigError, DatasetError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HIPPO = SHARED / "hippocampus"
MISFITS = SHARED / "hippocampus-misfits"
MSD_LABELS = {"0": "background", "1": "Anterior", "2": "Posterior"}


def _save(path: Path, data: np.ndarray, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, np.diag([*spacing[:3], 1.0]))
    img.set_data_dtype(data.dtype)
    nib.save(img, path)
    return path


def _write_json(path: Path, tree: dict) -> Path:
    path.write_text(json.dumps(tree))
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def synth(tmp_path: Path) -> Path:
    return write_synthetic_msd(tmp_path / "synth", num_cases=8, seed=3)


def _split(**kw) -> Split:
    return Split(labeled=kw.get("labeled", []), unlabeled=kw.get("unlabeled", []), test=kw.get("test", []))


# ------------------------------------------------------------------------------------ synthetic + reading


def test_synthetic_round_trip(synth: Path, tmp_path: Path):
    info = read_dataset_info(synth)
    assert info.format == "msd" and info.num_classes == 3 and info.foreground_classes == [1, 2]
    assert info.labels == {0: "background", 1: "anterior", 2: "posterior"}
    assert list(info.cases) == [f"case_{i:03d}" for i in range(8)] and info.orphan_labels == ()
    means = []
    for case_id in info.cases:
        image, spacing = load_image(info, case_id)
        label = load_label(info, case_id)
        assert image.shape == label.shape == (24, 40, 32)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert np.allclose(spacing, (1.0, 0.8, 1.2), atol=1e-5)
        assert set(np.unique(label).tolist()) == {0, 1, 2}
        assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1.0) < 1e-3
        fg = label > 0
        for axis in range(3):
            present = fg.any(axis=tuple(a for a in range(3) if a != axis))
            assert present.mean() > 0.5 and not (present[0] or present[-1])
        # the organ is brighter than its surroundings after normalisation
        assert image[label == 1].mean() > image[label == 0].mean() + 1.0
        raw = np.asanyarray(nib.load(info.cases[case_id].image).dataobj)
        means.append(float(raw.mean()))
        minmax, _ = load_image(info, case_id, normalization="minmax")
        assert minmax.min() == 0.0 and minmax.max() == pytest.approx(1.0)
    assert max(means) / min(means) > 10  # the raw scale varies by case
    assert json.loads((synth / "splits.json").read_text()) == {
        "test": ["case_000", "case_001"], "train_order": [f"case_{i:03d}" for i in range(2, 8)]}
    again = write_synthetic_msd(tmp_path / "again", num_cases=8, seed=3)
    other = write_synthetic_msd(tmp_path / "other", num_cases=2, seed=4)
    a, b, c = (np.asanyarray(nib.load(d / "imagesTr" / "case_001.nii.gz").dataobj) for d in (synth, again, other))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    validate_dataset(synth)


def test_write_split_file(tmp_path: Path):
    path = write_split_file(tmp_path / "s.json", ["a", "b", "c"], num_test=1)
    assert json.loads(path.read_text()) == {"test": ["a"], "train_order": ["b", "c"]}
    with pytest.raises(ValueError):
        write_split_file(tmp_path / "s.json", ["a"], num_test=2)


def test_unlabeled_case_is_not_an_error(synth: Path):
    (synth / "labelsTr" / "case_005.nii.gz").unlink()
    info = read_dataset_info(synth)
    assert info.cases["case_005"].label is None
    assert info.cases["case_004"].label == synth / "labelsTr" / "case_004.nii.gz"
    with pytest.raises(DatasetError, match="case_005"):
        load_label(info, "case_005")
    validate_dataset(synth)  # an unlabeled case is fine
    validate_cases(info, _split(labeled=["case_002"], unlabeled=["case_005"]))


def test_hidden_files_are_ignored(synth: Path):
    # the MSD tarballs carry macOS '._name.nii.gz' files; they are not cases
    (synth / "imagesTr" / "._case_000.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    (synth / "labelsTr" / "._case_000.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    info = read_dataset_info(synth)
    assert len(info.cases) == 8 and info.orphan_labels == ()


def test_missing_or_bad_dataset_json(synth: Path):
    (synth / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json"):
        read_dataset_info(synth)
    (synth / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="dataset.json"):
        read_dataset_info(synth)
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset_info(synth / "nowhere")


def test_nnunet_naming_and_labels(tmp_path: Path):
    root = tmp_path / "Dataset004_Hippocampus"
    rng = np.random.default_rng(0)
    for name in ("hippo_001", "hippo_002"):
        _save(root / "imagesTr" / f"{name}_0000.nii.gz", rng.normal(size=(8, 9, 10)).astype(np.float32))
    # nnU-Net labels may be stored as float: rounded on read
    _save(root / "labelsTr" / "hippo_001.nii.gz", np.eye(8, 9, dtype=np.float32)[..., None].repeat(10, axis=2) * 2)
    _write_json(root / "dataset.json", {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "hippo": 1,
                                        "tail": 2}, "numTraining": 2, "file_ending": ".nii.gz"})
    info = read_dataset_info(root)
    assert list(info.cases) == ["hippo_001", "hippo_002"]
    assert info.labels == {0: "background", 1: "hippo", 2: "tail"}
    assert info.cases["hippo_001"].image.name == "hippo_001_0000.nii.gz"
    assert info.cases["hippo_002"].label is None
    label = load_label(info, "hippo_001")
    assert label.dtype == np.uint8 and set(np.unique(label).tolist()) == {0, 2}
    # a second channel is refused, naming the file
    _save(root / "imagesTr" / "hippo_001_0001.nii.gz", np.zeros((8, 9, 10), np.float32))
    with pytest.raises(DatasetError, match="hippo_001_0001.nii.gz"):
        read_dataset_info(root)


def test_bad_labels_dict_and_non_integer_label(tmp_path: Path):
    root = tmp_path / "ds"
    _save(root / "imagesTr" / "a.nii.gz", np.ones((4, 5, 6), np.float32))
    _save(root / "labelsTr" / "a.nii.gz", np.full((4, 5, 6), 0.5, np.float32))
    _write_json(root / "dataset.json", {"labels": {"0": "background", "2": "gap"}})
    with pytest.raises(DatasetError, match="0..K-1"):
        read_dataset_info(root)
    _write_json(root / "dataset.json", {"labels": {"background": 0, "region": [1, 2]}})
    with pytest.raises(DatasetError, match="region"):
        read_dataset_info(root)
    _write_json(root / "dataset.json", {"labels": MSD_LABELS})
    info = read_dataset_info(root)
    with pytest.raises(DatasetError, match=r"a\.nii\.gz.*non-integer"):
        load_label(info, "a")


def test_four_d_images(tmp_path: Path):
    root = tmp_path / "ds"
    _save(root / "imagesTr" / "one.nii.gz", np.arange(60, dtype=np.float32).reshape(3, 4, 5, 1))
    _save(root / "imagesTr" / "two.nii.gz", np.ones((3, 4, 5, 2), np.float32))
    _write_json(root / "dataset.json", {"labels": MSD_LABELS})
    info = read_dataset_info(root)
    image, spacing = load_image(info, "one")
    assert image.shape == (3, 4, 5) and spacing == (1.0, 1.0, 1.0)
    with pytest.raises(DatasetError, match=r"two\.nii\.gz.*2 channels"):
        load_image(info, "two")


def test_h5_layout(tmp_path: Path):
    root = tmp_path / "LA"
    rng = np.random.default_rng(1)
    image = rng.normal(size=(10, 12, 8)).astype(np.float32)
    label = (image > 1).astype(np.uint8)
    (root / "0RZDK210BSMWAA6467LU").mkdir(parents=True)
    with h5py.File(root / "0RZDK210BSMWAA6467LU" / "mri_norm2.h5", "w") as f:
        f["image"], f["label"] = image, label
    with h5py.File(root / "plain.h5", "w") as f:
        f["image"] = image * 100 + 5
        f.attrs["spacing"] = [0.625, 0.625, 2.5]
    info = read_dataset_info(root, format="h5")
    assert info.format == "h5" and info.labels == {0: "background", 1: "foreground"}
    assert list(info.cases) == ["0RZDK210BSMWAA6467LU", "plain"]
    la = info.cases["0RZDK210BSMWAA6467LU"]
    assert la.image == la.label == root / "0RZDK210BSMWAA6467LU" / "mri_norm2.h5"
    assert info.cases["plain"].label is None
    img, spacing = load_image(info, "0RZDK210BSMWAA6467LU")
    assert img.shape == (10, 12, 8) and spacing == (1.0, 1.0, 1.0)
    assert np.array_equal(load_label(info, "0RZDK210BSMWAA6467LU"), label)
    img2, spacing2 = load_image(info, "plain")
    assert spacing2 == (0.625, 0.625, 2.5) and np.allclose(img, img2, atol=1e-4)
    with pytest.raises(DatasetError, match="plain"):
        load_label(info, "plain")
    _write_json(root / "dataset.json", {"labels": {"0": "background", "1": "LA", "2": "other"}})
    assert read_dataset_info(root, format="h5").num_classes == 3
    validate_dataset(root, format="h5")


# ------------------------------------------------------------------------------------------------ splits


def test_resolve_split_from_file_and_explicit(synth: Path):
    info = read_dataset_info(synth)
    split = resolve_split(DataConfig(root=synth, split_file=synth / "splits.json", num_labeled=2), info)
    assert split == Split(labeled=["case_002", "case_003"],
                          unlabeled=["case_004", "case_005", "case_006", "case_007"], test=["case_000", "case_001"])
    cut = resolve_split(DataConfig(root=synth, split_file=synth / "splits.json", num_labeled=2, max_unlabeled=1,
                                   max_test=1), info)
    assert cut.unlabeled == ["case_004"] and cut.test == ["case_000"]
    explicit = resolve_split(DataConfig(root=synth, labeled=["case_007"], test=["case_000"]), info)
    assert explicit.labeled == ["case_007"] and explicit.test == ["case_000"]
    assert explicit.unlabeled == [f"case_{i:03d}" for i in range(1, 7)]
    given = resolve_split(DataConfig(root=synth, labeled=["case_007"], unlabeled=["case_001"], test=[]), info)
    assert given == Split(labeled=["case_007"], unlabeled=["case_001"], test=[])


def test_resolve_split_errors(synth: Path):
    info = read_dataset_info(synth)
    with pytest.raises(ConfigError, match=r"'case_0007'.*did you mean 'case_007'"):
        resolve_split(DataConfig(root=synth, labeled=["case_0007"]), info)
    with pytest.raises(ConfigError, match=r"case_001.*in both labeled and test"):
        resolve_split(DataConfig(root=synth, labeled=["case_001"], test=["case_001"]), info)
    with pytest.raises(ConfigError, match="num_labeled=7"):
        resolve_split(DataConfig(root=synth, split_file=synth / "splits.json", num_labeled=7), info)
    with pytest.raises(ConfigError, match="not allowed"):
        resolve_split(DataConfig(root=synth, labeled=["../etc"]), info)
    bad = _write_json(synth / "bad_split.json", {"test": ["case_000", "nope_1"], "train_order": ["case_002"]})
    with pytest.raises(ConfigError, match=r"bad_split\.json.*'nope_1'"):
        resolve_split(DataConfig(root=synth, split_file=bad, num_labeled=1), info)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_split(DataConfig(root=synth, split_file=synth / "missing.json", num_labeled=1), info)
    (synth / "labelsTr" / "case_000.nii.gz").unlink()
    info = read_dataset_info(synth)
    with pytest.raises(ConfigError, match=r"\(test\): case 'case_000' has no label file"):
        resolve_split(DataConfig(root=synth, split_file=synth / "splits.json", num_labeled=1), info)


# -------------------------------------------------------------------------------------------- validation


def test_validate_cases_collects_every_problem(synth: Path):
    labels = synth / "labelsTr"
    _save(labels / "case_002.nii.gz", np.zeros((24, 40, 30), np.uint8), (1.0, 0.8, 1.2))  # wrong shape
    five = np.asanyarray(nib.load(labels / "case_003.nii.gz").dataobj).copy()
    five[5, 5, 5] = 5
    _save(labels / "case_003.nii.gz", five)  # value outside dataset.json
    nan = np.asanyarray(nib.load(synth / "imagesTr" / "case_004.nii.gz").dataobj).copy()
    nan[3, 3, 3] = np.nan
    _save(synth / "imagesTr" / "case_004.nii.gz", nan)
    _truncate(synth / "imagesTr" / "case_000.nii.gz")
    info = read_dataset_info(synth)
    split = _split(labeled=["case_002", "case_003", "case_005"], unlabeled=["case_004", "case_006"],
                   test=["case_000", "case_001"])
    with pytest.raises(DatasetError) as err:
        validate_cases(info, split)
    problems = err.value.problems
    assert len(problems) == 4, problems
    text = str(err.value)
    shapes = "label shape (24, 40, 30) does not match image shape (24, 40, 32)"
    assert f"{labels / 'case_002.nii.gz'}: {shapes}" in text
    assert f"{synth / 'imagesTr' / 'case_002.nii.gz'}" in text
    assert f"{labels / 'case_003.nii.gz'}" in text and "values [5]" in text
    assert f"{synth / 'imagesTr' / 'case_004.nii.gz'}" in text and "non-finite" in text
    assert f"{synth / 'imagesTr' / 'case_000.nii.gz'}: unreadable or truncated" in text
    with pytest.raises(DatasetError, match="truncated"):
        load_image(info, "case_000")


def test_truncated_label_of_labeled_case(synth: Path):
    _truncate(synth / "labelsTr" / "case_002.nii.gz")
    info = read_dataset_info(synth)
    with pytest.raises(DatasetError, match=r"labelsTr/case_002\.nii\.gz: unreadable or truncated"):
        validate_cases(info, _split(labeled=["case_002"]))


def test_unlabeled_label_files_are_never_opened(synth: Path):
    (synth / "labelsTr" / "case_006.nii.gz").write_bytes(b"not a nifti file at all")
    _save(synth / "labelsTr" / "case_007.nii.gz", np.zeros((2, 2, 2), np.uint8))
    info = read_dataset_info(synth)
    split = _split(labeled=["case_002"], unlabeled=["case_006", "case_007"], test=["case_000"])
    validate_cases(info, split)  # the leak rule: these labels are not looked at
    with pytest.raises(DatasetError) as err:
        validate_cases(info, split, check_unlabeled_labels=True)
    assert len(err.value.problems) == 2
    assert "case_006.nii.gz: unreadable" in str(err.value)
    assert "case_007.nii.gz: label shape (2, 2, 2)" in str(err.value)


# --------------------------------------------------------------------------------------------- real data


def _need(path: Path) -> None:
    if not path.is_dir():
        pytest.skip(f"shared data {path} is not present")


@pytest.mark.shared_data
def test_real_hippocampus():
    _need(HIPPO)
    info = read_dataset_info(HIPPO)
    assert len(info.cases) == 260 and sorted(info.labels) == [0, 1, 2] and info.orphan_labels == ()
    assert all(c.label is not None for c in info.cases.values())
    split = resolve_split(DataConfig(root=HIPPO, split_file=HIPPO / "splits.json", num_labeled=1), info)
    assert (len(split.labeled), len(split.unlabeled), len(split.test)) == (1, 199, 60)
    case_id = split.labeled[0]
    image, spacing = load_image(info, case_id)
    assert image.dtype == np.float32 and np.isfinite(image).all()
    assert np.allclose(spacing, 1.0, atol=0.05)
    assert image.shape == read_image_shape(info, case_id) == load_label(info, case_id).shape
    # the float32-stored labels come back as uint8 class values
    assert set(np.unique(load_label(info, "hippocampus_003")).tolist()) == {0, 1, 2}
    validate_cases(info, split)  # every image and every labeled/test label of the benchmark split


def _link(dst: Path, src: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


@pytest.mark.shared_data
def test_real_misfits(tmp_path: Path):
    _need(HIPPO)
    _need(MISFITS)
    root = tmp_path / "mixed"
    for case_id in ("hippocampus_001", "hippocampus_003"):
        _link(root / "imagesTr" / f"{case_id}.nii.gz", HIPPO / "imagesTr" / f"{case_id}.nii.gz")
        _link(root / "labelsTr" / f"{case_id}.nii.gz", HIPPO / "labelsTr" / f"{case_id}.nii.gz")
    _link(root / "imagesTr" / "hippocampus_118.nii.gz", MISFITS / "imagesTr" / "hippocampus_118.nii.gz")
    for case_id in ("hippocampus_010", "hippocampus_281"):
        _link(root / "labelsTr" / f"{case_id}.nii.gz", MISFITS / "labelsTr" / f"{case_id}.nii.gz")
    _write_json(root / "dataset.json", {"labels": MSD_LABELS, "modality": {"0": "MRI"}})
    info = read_dataset_info(root)
    assert list(info.cases) == ["hippocampus_001", "hippocampus_003", "hippocampus_118"]
    assert info.cases["hippocampus_118"].label is None
    assert info.orphan_labels == (root / "labelsTr" / "hippocampus_010.nii.gz",
                                  root / "labelsTr" / "hippocampus_281.nii.gz")
    split = _split(labeled=["hippocampus_001"], unlabeled=["hippocampus_118"], test=["hippocampus_003"])
    with pytest.raises(DatasetError) as err:
        validate_cases(info, split)
    assert len(err.value.problems) == 2
    for path in info.orphan_labels:
        assert any(p.startswith(f"{path}: label file has no image") for p in err.value.problems)


@pytest.mark.shared_data
def test_real_label_shape_mismatch(tmp_path: Path):
    _need(HIPPO)
    _need(MISFITS)
    root = tmp_path / "mismatch"
    _link(root / "imagesTr" / "hippocampus_001.nii.gz", HIPPO / "imagesTr" / "hippocampus_001.nii.gz")
    _link(root / "labelsTr" / "hippocampus_001.nii.gz", MISFITS / "labelsTr" / "hippocampus_281.nii.gz")
    _write_json(root / "dataset.json", {"labels": MSD_LABELS})
    info = read_dataset_info(root)
    image_shape = read_image_shape(info, "hippocampus_001")
    with pytest.raises(DatasetError) as err:
        validate_cases(info, _split(labeled=["hippocampus_001"]))
    (problem,) = err.value.problems
    assert str(root / "labelsTr" / "hippocampus_001.nii.gz") in problem
    assert str(root / "imagesTr" / "hippocampus_001.nii.gz") in problem
    assert "(512, 512, 94)" in problem and str(image_shape) in problem


def test_validate_warns_about_empty_labels_missing_spacing_and_the_h5_slice_axis(tmp_path: Path, caplog):
    """Issue 31 item 7: quiet data problems are said, each in one warning naming the cases."""
    import logging

    root = tmp_path / "h5set"
    root.mkdir()
    rng = np.random.default_rng(2)
    for name, label, spacing in (("a", True, True), ("b", False, True), ("c", True, False)):
        with h5py.File(root / f"{name}.h5", "w") as f:
            f["image"] = rng.normal(size=(6, 8, 10)).astype(np.float32)
            f["label"] = np.zeros((6, 8, 10), np.uint8) if not label else (rng.random((6, 8, 10)) > 0.5).astype(np.uint8)
            if spacing:
                f.attrs["spacing"] = [1.0, 1.0, 2.0]
    with caplog.at_level(logging.WARNING, logger="pipeline.data.validate"):
        validate_dataset(root, format="h5")
    said = [r.getMessage() for r in caplog.records]
    assert any("1 labeled cases have an empty label (all background): b" in m for m in said), said
    assert any("1 of 3 cases record no voxel spacing" in m and "c.h5" in m for m in said), said
    assert any("3D h5 volumes" in m and "(6, 8, 10)" in m for m in said), said
    caplog.clear()
    info = read_dataset_info(root, format="h5")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.validate"):
        validate_cases(info, Split(labeled=["a"], unlabeled=["c"], test=["b"]), slice_axis=2)
    said = [r.getMessage() for r in caplog.records]
    assert any("1 test cases have an empty label" in m and ": b;" in m for m in said), said
    assert any("data.slice_axis=2: slices of 10 along axis 2" in m for m in said), said
