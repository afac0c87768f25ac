"""``proseg prepare --splits FILE``: a given split (store JSON, one-fold JSON/YAML, CSV/TSV), its checks, and that
it comes back exactly in the store's ``splits.json`` (published protocols reproduce)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from proseg.cli.main import app
from proseg.data import DataError
from proseg.data.splits import read_splits_file
from proseg.data.store import open_store
from proseg.fsutil import sha256_file

runner = CliRunner()
PATIENTS = [f"synth-{i:05d}" for i in range(8)]  # the patient ids of `prepare synthetic 0 ... --cases 8`


def _prepare(out: Path, *extra: str) -> object:
    return runner.invoke(app, ["prepare", "synthetic", "0", str(out), "--cases", "8", "--size", "16", "-q",
                               *map(str, extra)])


def _ok(out: Path, *extra: str) -> str:
    res = _prepare(out, *extra)
    assert res.exit_code == 0, res.output
    return res.output


def _fails(out: Path, *extra: str, match: str) -> str:
    res = _prepare(out, *extra)
    text = res.output + (getattr(res, "stderr", "") or "")
    assert res.exit_code == 1, text
    assert "error:" in text and match in text, text
    assert not out.exists()
    return text


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_synthetic_patient_ids(tmp_path: Path) -> None:
    _ok(tmp_path / "ds")
    assert sorted(set(open_store(tmp_path / "ds").patient_ids.tolist())) == PATIENTS


def test_two_fold_file_comes_back_identically(tmp_path: Path) -> None:
    """A published 2-fold protocol (unsorted lists, its own val parts) is reproduced exactly."""
    folds = [
        {"train": ["synth-00005", "synth-00001", "synth-00007"], "val": ["synth-00003"],
         "test": ["synth-00006", "synth-00000", "synth-00002", "synth-00004"]},
        {"train": ["synth-00002", "synth-00000", "synth-00004"], "val": ["synth-00006"],
         "test": ["synth-00001", "synth-00003", "synth-00005", "synth-00007"]},
    ]
    f = _write(tmp_path / "protocol.json", {"num_folds": 2, "folds": folds})
    _ok(tmp_path / "ds", "--splits", f)
    store = open_store(tmp_path / "ds", verify=True)
    written = json.loads((tmp_path / "ds" / "splits.json").read_text())
    assert written["folds"] == folds
    assert written["source"] == "file" and written["sha256"] == sha256_file(f)
    assert written["file"] == str(f.resolve()) and written["num_folds"] == 2 and written["val_drawn"] == [False, False]
    assert store.num_folds == 2 and store.patients(1, "val") == ["synth-00006"]
    assert store.manifest["splits"]["source"] == "file" and store.manifest["splits"]["num_folds"] == 2
    # and a store's own splits.json, given back, reproduces that store's folds
    _ok(tmp_path / "again", "--splits", tmp_path / "ds" / "splits.json")
    assert json.loads((tmp_path / "again" / "splits.json").read_text())["folds"] == folds
    info = runner.invoke(app, ["info", str(tmp_path / "ds")])
    assert info.exit_code == 0 and "from file" in info.output and str(f.resolve()) in info.output
    js = json.loads(runner.invoke(app, ["info", str(tmp_path / "ds"), "--json"]).output)
    assert js["splits"]["source"] == "file" and js["splits"]["sha256"] == sha256_file(f)


def test_random_split_is_recorded_as_random(tmp_path: Path) -> None:
    _ok(tmp_path / "ds")
    js = json.loads(runner.invoke(app, ["info", str(tmp_path / "ds"), "--json"]).output)
    assert js["splits"]["source"] == "random" and "sha256" not in js["splits"]


def test_train_test_file_draws_val_with_seed(tmp_path: Path) -> None:
    f = _write(tmp_path / "tt.json", {"train": PATIENTS[:6], "test": PATIENTS[6:]})
    _ok(tmp_path / "a", "--splits", f, "--val-fraction", "0.34", "--seed", "5")
    _ok(tmp_path / "b", "--splits", f, "--val-fraction", "0.34", "--seed", "5")
    a = json.loads((tmp_path / "a" / "splits.json").read_text())
    assert a == {**json.loads((tmp_path / "b" / "splits.json").read_text()), "file": a["file"]}
    fold = a["folds"][0]
    assert a["num_folds"] == 1 and a["val_drawn"] == [True] and len(fold["val"]) == 2
    assert sorted(fold["train"] + fold["val"]) == PATIENTS[:6] and fold["test"] == PATIENTS[6:]
    assert a["seed"] == 5 and a["val_fraction"] == 0.34


def test_yaml_csv_tsv_forms(tmp_path: Path) -> None:
    y = tmp_path / "s.yaml"
    y.write_text("train: [" + ", ".join(PATIENTS[:5]) + "]\nval: [synth-00005]\ntest: [synth-00006, synth-00007]\n")
    c = tmp_path / "s.csv"
    c.write_text("patient,part\n" + "".join(f"{p},{'train' if i < 5 else 'val' if i == 5 else 'test'}\n"
                                             for i, p in enumerate(PATIENTS)))
    t = tmp_path / "s.tsv"
    t.write_text(c.read_text().replace(",", "\t"))
    want = {"train": PATIENTS[:5], "val": ["synth-00005"], "test": ["synth-00006", "synth-00007"]}
    for name, f in (("y", y), ("c", c), ("t", t)):
        _ok(tmp_path / name, "--splits", f)
        assert json.loads((tmp_path / name / "splits.json").read_text())["folds"] == [want]


@pytest.mark.parametrize(("content", "match"), [
    ({"train": PATIENTS, "test": ["synth-99999"]}, "1 patient(s) not in the source: synth-99999"),
    ({"train": PATIENTS + ["synth-00001"], "test": []}, "patient 'synth-00001' is listed twice in train"),
    ({"train": PATIENTS[:7], "test": ["synth-00007", "synth-00000"]}, "in both train and test"),
    ({"train": PATIENTS[:6], "test": ["synth-00006"]}, "1 patient(s) of the source are in no part: synth-00007"),
    ({"train": [], "test": PATIENTS}, "the train part is empty"),
    ({"train": PATIENTS[:6], "tset": PATIENTS[6:]}, "unknown part(s) tset"),
    ({"folds": [{"train": PATIENTS}], "num_folds": 2}, "num_folds is 2 but the file lists 1 folds"),
    ({"patients": PATIENTS}, "not a split"),
    ({"folds": [{"train": PATIENTS[:7], "test": PATIENTS[7:]},
                {"train": PATIENTS[1:], "test": PATIENTS[:1], "val": PATIENTS[1:2]}]}, "fold 1: patient 'synth-00001'"),
])
def test_bad_split_files_are_refused_naming_the_file(tmp_path: Path, content: object, match: str) -> None:
    f = _write(tmp_path / "bad.json", content)
    text = _fails(tmp_path / "ds", "--splits", f, match=match)
    assert str(f) in text


def test_unlisted_patients_allowed_with_flag(tmp_path: Path) -> None:
    f = _write(tmp_path / "part.json", {"train": PATIENTS[:5], "val": [PATIENTS[5]], "test": [PATIENTS[6]]})
    _ok(tmp_path / "ds", "--splits", f, "--allow-unlisted")
    s = json.loads((tmp_path / "ds" / "splits.json").read_text())
    assert s["unlisted"] == [["synth-00007"]]
    store = open_store(tmp_path / "ds")
    assert "synth-00007" in store.patients(0, "all") and store.rows(0, "test").size == 1
    # --patients drops them from the store instead, and then the file covers every patient
    _ok(tmp_path / "filtered", "--splits", f, "--patients", "synth-0000[0-6]")
    assert json.loads((tmp_path / "filtered" / "splits.json").read_text())["unlisted"] == [[]]


def test_bad_file_kinds(tmp_path: Path) -> None:
    _fails(tmp_path / "ds", "--splits", tmp_path / "missing.json", match="not found")
    (tmp_path / "s.txt").write_text("x")
    _fails(tmp_path / "ds", "--splits", tmp_path / "s.txt", match="unknown --splits file type")
    (tmp_path / "s.json").write_text("{not json")
    _fails(tmp_path / "ds", "--splits", tmp_path / "s.json", match="not valid JSON")
    (tmp_path / "s.csv").write_text("synth-00000,train,extra\n")
    _fails(tmp_path / "ds", "--splits", tmp_path / "s.csv", match="row 1 has 3 column(s)")
    (tmp_path / "n.yaml").write_text("train: [1, 2]\n")
    _fails(tmp_path / "ds", "--splits", tmp_path / "n.yaml", match="patient ids must be strings")


def test_read_splits_file_api(tmp_path: Path) -> None:
    f = _write(tmp_path / "s.json", {"train": ["a", "b", "c"], "test": ["d"]})
    s = read_splits_file(f, ["a", "b", "c", "d"], val_fraction=0.0)
    assert s["folds"] == [{"train": ["a", "b", "c"], "val": [], "test": ["d"]}]
    with pytest.raises(DataError, match="s.json"):
        read_splits_file(f, ["a", "b", "c", "d", "e"])
