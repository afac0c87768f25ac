"""``proseg prepare`` / ``proseg info`` end to end through the CLI, the store, and the split properties."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from proseg.cli.main import app
from proseg.data import DataError
from proseg.data.prepare import prepare
from proseg.data.preprocess import INTENSITY_MODES, canonical_intensity, recorded_intensity, resolve_intensity
from proseg.data.splits import make_splits
from proseg.data.store import open_store
from proseg.errors import ProsegWarning
from tests.data.data_builders import make_lidc_kaggle, make_npc, make_qubiq, write_png

runner = CliRunner()


def _run(*args: str) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_cli_prepare_info_lidc_kaggle(tmp_path: Path) -> None:
    src = make_lidc_kaggle(tmp_path / "src", patients=("LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003",
                                                         "LIDC-IDRI-0004"), slices=2)
    out = tmp_path / "ds"
    text = _run("prepare", "lidc-kaggle", src, out, "--folds", "2", "--val-fraction", "0.5", "--seed", "3", "-q")
    assert "16 slices" in text and "4 patients" in text
    store = open_store(out)
    m = store.manifest
    assert m["counts"] == {"rows": 16, "cases": 16, "volumes": 16, "patients": 4, "absent_annotations": 0}
    assert m["shapes"] == {"images": [16, 1, 16, 16], "masks": [16, 4, 16, 16]}
    assert m["intensity"]["mode"] == "uint8" and m["rater_order"] == "as-stored"
    assert m["splits"]["seed"] == 3 and store.splits["seed"] == 3 and store.num_folds == 2
    assert store.images.dtype == np.float32 and store.masks.dtype == np.uint8
    assert 0.0 <= store.images.min() and store.images.max() <= 1.0
    assert store.verify() == []
    # the stored row equals the PNG / 255 and the masks the {0,255} PNGs
    from PIL import Image

    row = int(np.flatnonzero(store.case_ids == "LIDC-IDRI-0003/nodule-1/slice-1")[0])
    png = np.asarray(Image.open(src / "LIDC-IDRI-0003/nodule-1/images/slice-1.png"))
    np.testing.assert_allclose(store.images[row, 0], png / 255.0, atol=1e-7)
    msk = np.asarray(Image.open(src / "LIDC-IDRI-0003/nodule-1/mask-2/slice-1.png"))
    np.testing.assert_array_equal(store.masks[row, 2], msk // 255)
    # every LIDC slice is its own 2D case (volume of one slice); parts partition patients
    vr = store.volume_rows(store.rows(0, "test"))
    for vid, rows in vr.items():
        assert len(rows) == 1 and store.volume_ids[rows[0]] == store.case_ids[rows[0]] == vid
        assert vid.endswith(f"/slice-{store.slice_indices[rows[0]]}")
    for k in range(2):
        parts = [set(store.patient_ids[store.rows(k, p)]) for p in ("train", "val", "test")]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert set.union(*parts) == set(store.patient_ids)
    text = _run("info", out)
    assert "4 patients" in text and "mean pairwise Dice" in text and "fold 1" in text
    st = json.loads(_run("info", out, "--json", "--verify"))
    assert st["patients"] == 4 and st["checksums_ok"] is True
    # raters are disks of radius 1+r(+1): Dice of rater 0 vs 1 per slice is hand-computable
    from tests.data.data_builders import disk

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    expect01 = np.mean([dice(disk(16, 1 + k), disk(16, 2 + k)) for k in (0, 1)])
    assert st["pairwise_dice_matrix"][0][1] == pytest.approx(expect01)
    assert st["empty_fraction"] == [0.0, 0.0, 0.0, 0.0]


def test_prepare_refuses_existing_out_and_force_replaces(tmp_path: Path) -> None:
    src = make_lidc_kaggle(tmp_path / "src", nodules=1, slices=2)
    out = tmp_path / "ds"
    out.mkdir()
    res = runner.invoke(app, ["prepare", "lidc-kaggle", str(src), str(out), "--folds", "2", "-q"])
    assert res.exit_code == 1 and "already exists (use --force" in res.output
    _run("prepare", "lidc-kaggle", src, out, "--folds", "2", "--force", "-q")
    assert open_store(out).manifest["counts"]["rows"] == 4
    assert out.stat().st_mode & 0o777 == 0o755  # a shared dataset stays readable by the team (mkdtemp gives 0700)
    assert _leftovers(tmp_path) == []


def test_failed_prepare_leaves_nothing(tmp_path: Path) -> None:
    src = make_lidc_kaggle(tmp_path / "src", nodules=1, slices=2)
    write_png(src / "LIDC-IDRI-0002/nodule-0/mask-1/slice-1.png", np.full((16, 16), 9, np.uint8))
    out = tmp_path / "out" / "ds"
    out.parent.mkdir()
    res = runner.invoke(app, ["prepare", "lidc-kaggle", str(src), str(out), "--folds", "2", "-q"])
    assert res.exit_code == 1
    assert "mask-1/slice-1.png: mask is not binary" in res.output
    assert not out.exists() and _leftovers(out.parent) == []
    # an existing store survives a failed --force
    good = tmp_path / "good"
    make_lidc_kaggle(good, nodules=1, slices=2)
    _run("prepare", "lidc-kaggle", good, out, "--folds", "2", "-q")
    res = runner.invoke(app, ["prepare", "lidc-kaggle", str(src), str(out), "--folds", "2", "--force", "-q"])
    assert res.exit_code == 1 and open_store(out).verify() == []
    assert _leftovers(out.parent) == []


def test_prepare_size_pad_area_ranked_intensity(tmp_path: Path) -> None:
    a = tmp_path / "a"
    img = np.zeros((8, 4), np.float32)
    img[:, :] = 10.0
    for c in ("c1", "c2"):
        (a / c).mkdir(parents=True)
        np.save(a / c / "image.npy", img)
        big = np.zeros((8, 4), np.uint8)
        big[1:7, 1:3] = 1
        small = np.zeros((8, 4), np.uint8)
        small[3:5, 1:3] = 1
        np.save(a / c / "mask_1.npy", big)  # stored first, but larger
        np.save(a / c / "mask_2.npy", small)
    out = tmp_path / "ds"
    prepare("folder", a, out, size=16, intensity="none", rater_order="area-ranked", num_folds=2)
    s = open_store(out)
    assert s.manifest["target_size"] == 16 and s.images.shape == (2, 1, 16, 16)
    assert s.rater_names == ["rank-0", "rank-1"] and s.manifest["source_rater_names"] == ["1", "2"]
    assert s.rater_perm[0].tolist() == [1, 0]
    # padded 8x4 -> 8x8 (2 columns of 0 each side), resized x2 bilinearly
    np.testing.assert_allclose(s.images[0, 0, :, 5:11], 10.0, atol=1e-5)  # edge columns blend with the pad
    np.testing.assert_allclose(s.images[0, 0, :, :3], 0.0, atol=1e-5)
    assert set(np.unique(s.masks)) <= {0, 1}
    assert s.masks[0, 0].sum() == 2 * 2 * 4 and s.masks[0, 1].sum() == 6 * 2 * 4  # nearest x2: area x4
    assert json.loads((out / "volumes.json").read_text())["c1"]["geometry"] == {
        "orig_hw": [8, 4], "pad": [0, 0, 2, 2], "padded": 8, "size": 16}
    out2 = tmp_path / "z"
    prepare("folder", a, out2, intensity="zscore", num_folds=2)
    assert open_store(out2).manifest["intensity"]["mode"] == "zscore"
    np.testing.assert_allclose(open_store(out2).images[0], 0.0)  # constant image: std 0 -> 1


def test_prepare_npc_volumes_and_2d_slices(tmp_path: Path) -> None:
    out = tmp_path / "ds3"
    prepare("npc", make_npc(tmp_path / "npc", cases=("Sample_1", "Sample_2", "Sample_3")), out, num_folds=3)
    s = open_store(out)
    assert len(s) == 9 and s.images.shape == (9, 3, 16, 16)
    assert s.manifest["intensity"]["mode"] == "zscore"
    vr = s.volume_rows(np.arange(9)[::-1])
    assert list(vr) == ["Sample_3", "Sample_2", "Sample_1"] and vr["Sample_1"].tolist() == [0, 1, 2]
    assert s.volumes["Sample_2"]["spacing"] == [3.0, 0.5, 0.5] and s.volumes["Sample_2"]["num_slices"] == 3
    v = s.volume("Sample_2")
    assert v.image.shape == (3, 3, 16, 16) and v.masks.shape == (4, 3, 16, 16)
    out2 = tmp_path / "ds2"
    prepare("npc", make_npc(tmp_path / "npc2", cases=("Sample_1", "Sample_2"), two_d=True), out2, num_folds=2)
    s2 = open_store(out2)
    assert s2.manifest["counts"]["volumes"] == 2 and s2.volume_ids.tolist()[:3] == ["Sample_1"] * 3
    assert s2.slice_indices.tolist() == [0, 1, 2, 0, 1, 2]


def test_prepare_qubiq_keeps_affine_and_7_raters(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    _run("prepare", "qubiq", make_qubiq(tmp_path / "q", cases=4, raters=7), out, "--folds", "2", "-q")
    s = open_store(out)
    assert s.num_raters == 7 and s.rater_names[-1] == "seg07"
    np.testing.assert_allclose(s.volumes["case01"]["affine"], np.diag([0.5, 0.5, 1.0, 1.0]))


def test_prepare_errors(tmp_path: Path) -> None:
    src = make_lidc_kaggle(tmp_path / "src", nodules=1, slices=1)
    with pytest.raises(DataError, match="cannot make 4 patient-level folds from 2"):
        prepare("lidc-kaggle", src, tmp_path / "o1")
    with pytest.raises(DataError, match="no cases match the patient filter"):
        prepare("lidc-kaggle", src, tmp_path / "o2", patients=["LIDC-IDRI-9*"], num_folds=2)
    with pytest.raises(DataError, match="unknown format"):
        prepare("dicom", src, tmp_path / "o3")
    res = runner.invoke(app, ["info", str(tmp_path)])
    assert res.exit_code == 1 and "not a prepared dataset" in res.output
    assert _leftovers(tmp_path) == []


def test_prepare_synthetic_cli(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    _run("prepare", "synthetic", "7", out, "--cases", "12", "--size", "32", "--raters", "3", "-q")
    s = open_store(out)
    assert s.images.shape == (12, 1, 32, 32) and s.rater_names == ["r0-over", "r1-under", "r2-smooth"]
    assert s.manifest["counts"]["patients"] == 12 and s.manifest["source"]["path"] == "seed=7"
    from proseg.data.synthetic import generate

    np.testing.assert_array_equal(s.masks[5].astype(bool), generate([5], seed=7, size=32, num_raters=3).masks[0])


def test_splits_properties() -> None:
    pids = [f"P{i:03d}" for i in range(23)]
    sp = make_splits(pids * 3, num_folds=4, val_fraction=0.2, seed=11)
    assert sp == make_splits(list(reversed(pids)), num_folds=4, val_fraction=0.2, seed=11)  # deterministic
    assert sp != make_splits(pids, num_folds=4, val_fraction=0.2, seed=12)
    tests = [p for f in sp["folds"] for p in f["test"]]
    assert sorted(tests) == pids  # each patient tested exactly once
    for f in sp["folds"]:
        tr, va, te = set(f["train"]), set(f["val"]), set(f["test"])
        assert not (tr & va) and not (tr & te) and not (va & te) and tr | va | te == set(pids)
        assert len(va) == round(0.2 * (len(tr) + len(va)))
        assert 5 <= len(te) <= 6
    assert all(len(f["val"]) == 0 for f in make_splits(pids, 2, 0.0, 0)["folds"])


def test_failure_while_writing_removes_the_temporary_folder(tmp_path: Path, monkeypatch) -> None:
    import proseg.data.prepare as prep

    src = make_lidc_kaggle(tmp_path / "src", nodules=1, slices=1)
    (tmp_path / "o").mkdir()

    def boom(path):
        assert ".tmp-" in str(path)  # writing happens in the temporary sibling
        raise OSError("disk full")

    monkeypatch.setattr(prep, "sha256_file", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare("lidc-kaggle", src, tmp_path / "o" / "ds", num_folds=2)
    assert list((tmp_path / "o").iterdir()) == []


def test_intensity_uint8_keeps_reading_and_accepting_its_old_spelling_unit8(tmp_path: Path) -> None:
    src = make_lidc_kaggle(tmp_path / "src", nodules=1, slices=1)
    out = tmp_path / "ds"
    # the old spelling is still accepted on the command line (a deprecated alias), and recorded as uint8
    res = runner.invoke(app, ["prepare", "lidc-kaggle", str(src), str(out), "--folds", "2", "--intensity", "unit8",
                              "-q"])
    assert res.exit_code == 0, res.output
    assert "warning: --intensity unit8 is the old spelling of uint8" in res.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["intensity"]["mode"] == man["intensity"]["requested"] == "uint8"
    # a store written before the rename (its manifest says unit8) opens, verifies and reports uint8
    man["intensity"]["mode"] = man["intensity"]["requested"] = "unit8"
    (out / "manifest.json").write_text(json.dumps(man))
    store = open_store(out, verify=True)
    assert store.manifest["intensity"]["mode"] == store.manifest["intensity"]["requested"] == "uint8"
    assert json.loads(_run("info", out, "--json"))["intensity"] == "uint8"
    assert "intensity uint8" in _run("info", out)
    with pytest.warns(ProsegWarning, match="old spelling"):
        prepare("lidc-kaggle", src, tmp_path / "api", num_folds=2, intensity="unit8")
    assert open_store(tmp_path / "api").manifest["intensity"]["requested"] == "uint8"


def test_canonical_intensity_maps_only_the_old_spelling() -> None:
    assert canonical_intensity("unit8") == "uint8"
    assert [canonical_intensity(m) for m in INTENSITY_MODES] == list(INTENSITY_MODES)
    assert "unit8" not in INTENSITY_MODES
    assert resolve_intensity("unit8", "float32") == resolve_intensity("auto", "uint8") == "uint8"
    # what manifests and checkpoints record: the manifest's dict, or a bare mode in old checkpoints
    assert recorded_intensity({"mode": "unit8", "requested": "auto"}) == recorded_intensity("unit8") == "uint8"
    assert recorded_intensity({"mode": "zscore"}) == "zscore"
    assert recorded_intensity(None) is None and recorded_intensity({}) is None


def test_info_json_with_one_rater_is_valid_json(tmp_path: Path) -> None:
    out = tmp_path / "one"
    _run("prepare", "synthetic", "1", out, "--cases", "4", "--size", "16", "--raters", "1", "--folds", "2", "-q")
    st = json.loads(_run("info", out, "--json"), parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert st["pairwise_dice"] is None and st["num_raters"] == 1


def test_npc_same_patient_as_3d_and_2d_files_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "npc"
    make_npc(src / "validation", cases=("Sample_1", "Sample_2"))
    make_npc(src / "training_2d", cases=("Sample_1",), two_d=True)
    with pytest.raises(DataError, match="both slice 0 of volume 'Sample_1'"):
        prepare("npc", src, tmp_path / "ds", num_folds=2)
    assert not (tmp_path / "ds").exists()
