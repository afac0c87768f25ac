"""Fault injection on the data layer: ``prepare --force`` over a user's folder, a full disk, malformed pickle
entries and other reader type faults, damaged or altered stores, and the error types of user mistakes.

Nothing here fills a real disk: ENOSPC is injected by monkeypatching ``os.posix_fallocate`` / ``np.save``. The
one real full-disk test mounts a 1 MiB tmpfs and is skipped unless the process may mount (root).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from proseg.cli.main import app
from proseg.data import DataError
from proseg.data.prepare import prepare
from proseg.data.readers import list_cases, read_samples
from proseg.data.store import open_store
from tests.data.data_builders import disk, make_lidc_pickle, make_npc

runner = CliRunner()
SYN = ("--cases", "8", "--size", "32", "--raters", "2", "--folds", "2", "-q")


def _invoke(*args: object) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    out = res.output  # stdout and stderr interleaved (click >= 8.2)
    # an uncaught exception also gives exit code 1 under CliRunner: it must not count as a clean refusal
    assert res.exception is None or isinstance(res.exception, SystemExit), (out, res.exception)
    return res.exit_code, out


def _store(path: Path, seed: int = 0, *extra: str) -> Path:
    code, out = _invoke("prepare", "synthetic", seed, path, *SYN, *extra)
    assert code == 0, out
    return path


def _checksums(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def _error_lines(out: str) -> list[str]:
    assert "Traceback" not in out, out
    return [ln for ln in out.splitlines() if ln.startswith("error:")]


# ---- 1. --force replaces only a store or an empty folder ---------------------------------------------------------
def test_force_refuses_a_folder_holding_user_files(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("three years of work")
    code, text = _invoke("prepare", "synthetic", 0, out, *SYN, "--force")
    assert code == 1 and len(_error_lines(text)) == 1
    assert str(out) in text and "nothing was deleted" in text
    assert (out / "thesis.tex").read_text() == "three years of work" and sorted(os.listdir(out)) == ["thesis.tex"]
    assert _leftovers(tmp_path) == []
    # a manifest.json that is not a proseg manifest does not make it a store
    (out / "manifest.json").write_text(json.dumps({"name": "my web app", "version": "1.0"}))
    code, text = _invoke("prepare", "synthetic", 0, out, *SYN, "--force")
    assert code == 1 and "is not a proseg dataset" in text and (out / "thesis.tex").exists()
    # a plain file at OUT is never replaced either
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    code, text = _invoke("prepare", "synthetic", 0, f, *SYN, "--force")
    assert code == 1 and "is not a folder" in text and f.read_text() == "keep"


def test_force_replaces_a_store_or_an_empty_folder_but_not_a_store_with_extra_files(tmp_path: Path) -> None:
    out = _store(tmp_path / "ds", 0)
    before = _checksums(out)
    _store(out, 1, "--force")  # a store: replaced
    assert _checksums(out) != before and open_store(out).manifest["source"]["path"] == "seed=1"
    assert _leftovers(tmp_path) == []
    (out / "my_notes.md").write_text("do not lose")  # a store holding a user's file: refused, nothing deleted
    code, text = _invoke("prepare", "synthetic", 2, out, *SYN, "--force")
    assert code == 1 and "my_notes.md" in text and (out / "my_notes.md").exists()
    assert open_store(out).manifest["source"]["path"] == "seed=1"
    empty = tmp_path / "empty"
    empty.mkdir()
    _store(empty, 0, "--force")
    assert open_store(empty, verify=True).manifest["counts"]["rows"] == 8


def test_force_refusal_is_a_value_error_through_the_api(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"mine: is not a proseg dataset.*nothing was deleted"):
        prepare("synthetic", 0, out, force=True, num_folds=2, synthetic_options={"cases": 4, "size": 16})
    assert sorted(os.listdir(out)) == ["data.csv"]


# ---- 2. a full disk is one error line, not SIGBUS; nothing is left behind, the old OUT survives ------------------
def _no_space(*args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_prepare_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _store(tmp_path / "ds", 0)
    before = _checksums(old)
    monkeypatch.setattr(os, "posix_fallocate", _no_space)
    code, text = _invoke("prepare", "synthetic", 1, old, *SYN, "--force")
    lines = _error_lines(text)
    assert code == 1 and len(lines) == 1, text
    assert "no space left on the device writing" in lines[0] and "images.npy" in lines[0]
    assert ".tmp-" not in lines[0]  # names OUT's file, not the deleted temporary copy
    assert _leftovers(tmp_path) == [] and _checksums(old) == before
    code, text = _invoke("prepare", "synthetic", 1, tmp_path / "new", *SYN)
    assert code == 1 and not (tmp_path / "new").exists() and _leftovers(tmp_path) == []


def test_disk_full_on_an_ordinary_write_without_fallocate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """File systems without fallocate (EOPNOTSUPP) fall back to plain writes, whose ENOSPC is reported too."""
    import proseg.data.prepare as prep

    monkeypatch.setattr(os, "posix_fallocate", lambda *a: (_ for _ in ()).throw(OSError(errno.EOPNOTSUPP, "nope")))

    def save(path: object, arr: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prep.np, "save", save)
    code, text = _invoke("prepare", "synthetic", 1, tmp_path / "ds", *SYN)
    lines = _error_lines(text)
    assert code == 1 and len(lines) == 1 and "no space left" in lines[0] and "rater_present.npy" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_fallocate_unsupported_still_writes_the_same_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _store(tmp_path / "a", 3)
    monkeypatch.setattr(os, "posix_fallocate", lambda *a: (_ for _ in ()).throw(OSError(errno.EINVAL, "nope")))
    b = _store(tmp_path / "b", 3)
    sa, sb = _checksums(a), _checksums(b)
    sa.pop("manifest.json"), sb.pop("manifest.json")  # holds the creation time
    assert sa == sb and open_store(b, verify=True).verify() == []


def _can_mount_tmpfs(where: Path) -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True).returncode
    return ok == 0


def test_real_full_tmpfs(tmp_path: Path) -> None:
    """On a real 1 MiB tmpfs: exit 1 with one line (the old code died with SIGBUS, exit 135)."""
    small = tmp_path / "small"
    if not _can_mount_tmpfs(small):
        pytest.skip("needs root and a mountable tmpfs")
    try:
        cmd = [sys.executable, "-c", "from proseg.cli.main import main; main()", "prepare", "synthetic", "0"]
        old = small / "ds"
        first = subprocess.run([*cmd, str(old), "--cases", "4", "--size", "32", "--folds", "2", "-q"],
                               capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        before = _checksums(old)
        res = subprocess.run([*cmd, str(old), "--cases", "40", "--size", "64", "--force", "-q"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 1, (res.returncode, res.stderr)
        lines = _error_lines(res.stderr)
        assert len(lines) == 1 and "no space left on the device writing" in lines[0], res.stderr
        assert _leftovers(small) == [] and _checksums(old) == before
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


# ---- 3. malformed pickle entries and other reader type faults -----------------------------------------------------
def _pickle(path: Path, data: object) -> Path:
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return path


def _entry(**over: object) -> dict:
    e = {"image": np.zeros((16, 16), np.uint8), "masks": [disk(16, 3).astype(np.uint8)] * 2,
         "series_uid": "LIDC-IDRI-0001_1.2.3"}
    e.update(over)
    return e


@pytest.mark.parametrize("masks", [5, None, 2.5, np.zeros((16, 16), np.uint8)], ids=["int", "none", "float", "2d"])
def test_pickle_masks_not_a_sequence(tmp_path: Path, masks: object) -> None:
    p = _pickle(tmp_path / "x.pickle", {"good": _entry(), "bad": _entry(masks=masks)})
    with pytest.raises(DataError, match=r"x\.pickle \[entry 'bad'\]: 'masks' must be a list of H x W arrays"):
        list_cases("lidc-pickle", p)


@pytest.mark.parametrize(("over", "match"), [
    ({"image": [[1, 2], [3]]}, r"'image' is not an array"),
    ({"image": "not pixels"}, r"'image' must be a numeric array"),
    ({"image": {"a": 1}}, r"'image' must be a numeric array"),
    ({"image": np.ones((16, 16), np.complex64)}, r"'image' must be a numeric array"),
    ({"masks": [[[0, 1], [1]], disk(16, 3)]}, r"mask 0 is not an array"),
    ({"masks": [None, disk(16, 3)]}, r"mask 0 must be a numeric array"),
], ids=["ragged-image", "str-image", "dict-image", "complex-image", "ragged-mask", "none-mask"])
def test_pickle_entry_type_faults(tmp_path: Path, over: dict, match: str) -> None:
    p = _pickle(tmp_path / "x.pickle", {"good": _entry(), "bad": _entry(**over)})
    with pytest.raises(DataError, match=r"x\.pickle \[entry 'bad'\]: " + match):
        list(read_samples("lidc-pickle", p))


def test_pickle_faults_are_one_line_through_prepare(tmp_path: Path) -> None:
    src = make_lidc_pickle(tmp_path / "ok.pickle")
    data = pickle.loads(src.read_bytes())
    data[next(iter(data))]["masks"] = 7
    src.write_bytes(pickle.dumps(data))
    code, text = _invoke("prepare", "lidc-pickle", src, tmp_path / "ds", "--folds", "2", "-q")
    lines = _error_lines(text)
    assert code == 1 and len(lines) == 1 and "ok.pickle [entry" in lines[0] and "'masks'" in lines[0]


def test_npy_complex_image_and_npc_text_spacing(tmp_path: Path) -> None:
    src = tmp_path / "f"
    (src / "c1").mkdir(parents=True)
    np.save(src / "c1" / "image.npy", np.ones((8, 8), np.complex64))
    np.save(src / "c1" / "mask_a.npy", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"image\.npy: image has a complex dtype"):
        list(read_samples("folder", src))
    import h5py

    npc = make_npc(tmp_path / "npc", cases=("Sample_1",))
    f = next(npc.rglob("*.h5"))
    with h5py.File(f, "a") as h:
        del h["voxel_spacing"]
        h["voxel_spacing"] = "1.0 mm"
    with pytest.raises(DataError, match=r"Sample_1\.h5: voxel_spacing is not a list of numbers"):
        list(read_samples("npc", npc))


# ---- 4. integrity checks whenever a store is opened ---------------------------------------------------------------
def test_info_refuses_a_truncated_store(tmp_path: Path) -> None:
    ds = _store(tmp_path / "ds")
    p = ds / "images.npy"
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size - 100)
    code, text = _invoke("info", ds)
    lines = _error_lines(text)
    assert code == 1 and len(lines) == 1
    assert "images.npy" in lines[0] and f"{size - 100} bytes, expected {size}" in lines[0]
    assert "(N, C, H, W) = (8, 1, 32, 32) float32 (truncated)" in lines[0]
    with pytest.raises(DataError, match=r"images\.npy: .* \(truncated\)"):
        open_store(ds, verify=False)


def test_damaged_header_missing_file_and_replaced_array(tmp_path: Path) -> None:
    ds = _store(tmp_path / "ds")
    good = (ds / "masks.npy").read_bytes()
    (ds / "masks.npy").write_bytes(b"garbage" + good[7:])
    with pytest.raises(DataError, match=r"masks\.npy: not a valid \.npy file"):
        open_store(ds)
    np.save(ds / "masks.npy", np.zeros((8, 2, 32, 32), np.int16))  # right shape, wrong dtype
    with pytest.raises(DataError, match=r"masks\.npy: holds a \(8, 2, 32, 32\) int16 array, the manifest says"):
        open_store(ds)
    (ds / "masks.npy").unlink()
    with pytest.raises(DataError, match=r"masks\.npy: missing"):
        open_store(ds)
    ds2 = _store(tmp_path / "ds2")
    (ds2 / "splits.json").write_text((ds2 / "splits.json").read_text()[:-20])
    code, text = _invoke("info", ds2)
    assert code == 1 and "splits.json" in text and "bytes, the manifest recorded" in text


def _train_cfg(path: Path) -> object:
    from proseg.engine.config import Config

    cfg = Config()
    cfg.data.path = str(path)
    cfg.data.fold = 0
    cfg.data.augment = False
    return cfg


def test_training_refuses_a_store_altered_after_prepare(tmp_path: Path) -> None:
    from proseg.engine.data import train_data

    ds = _store(tmp_path / "ds")
    train_data(_train_cfg(ds))  # the intact store loads
    p = ds / "masks.npy"
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 1  # one flipped bit: same size and header, only the checksum can tell
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"masks\.npy: sha256 mismatch: the file was altered after prepare; "
                                        r"re-run proseg prepare"):
        train_data(_train_cfg(ds))
    # the cheap checks alone let it through: plain `info` still works, --verify reports it
    assert open_store(ds).masks.shape == (8, 2, 32, 32)
    code, text = _invoke("info", ds)
    assert code == 0, text
    code, text = _invoke("info", ds, "--verify")
    assert code == 1 and "MISMATCH: masks.npy" in text


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    ds = _store(tmp_path / "ds")
    man = json.loads((ds / "manifest.json").read_text())
    man["format_version"] = 99
    (ds / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match=r"manifest\.json: format_version 99 is newer than this proseg can read"):
        open_store(ds)
    code, text = _invoke("info", ds)
    assert code == 1 and "format_version 99" in text
    del man["format_version"]  # a store from before the field: version 1
    (ds / "manifest.json").write_text(json.dumps(man))
    assert open_store(ds).format_version == 1
    man["format_version"] = "2"
    (ds / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match=r"invalid format_version '2'"):
        open_store(ds)
    man["format_version"] = 99  # unreadable here, but still a proseg store: --force may replace it
    (ds / "manifest.json").write_text(json.dumps(man))
    _store(ds, 0, "--force")
    assert open_store(ds).format_version == 1


def test_manifest_that_disagrees_with_itself(tmp_path: Path) -> None:
    ds = _store(tmp_path / "ds")
    man = json.loads((ds / "manifest.json").read_text())
    man["counts"]["rows"] = 9
    (ds / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match=r"manifest\.json: shapes .* disagree with counts\.rows=9"):
        open_store(ds)
    del man["files"]
    (ds / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match=r"manifest\.json: not a proseg manifest \(no 'files' entry\)"):
        open_store(ds)


# ---- 5. user mistakes are ConfigError / DataError -----------------------------------------------------------------
def test_engine_data_config_errors(tmp_path: Path) -> None:
    from proseg.engine.config import Config
    from proseg.engine.data import train_data
    from proseg.errors import ConfigError

    with pytest.raises(ConfigError, match="no dataset: set data.path"):
        train_data(Config())
    cfg = _train_cfg(_store(tmp_path / "ds"))
    cfg.data.fold = 5
    with pytest.raises(ConfigError, match=r"data\.fold=5 but .* has 2 folds \(0\.\.1\)"):
        train_data(cfg)
    store = open_store(tmp_path / "ds")
    with pytest.raises(DataError, match=r"fold 7 does not exist, the dataset has 2 folds"):
        store.rows(7, "train")
    with pytest.raises(DataError, match=r"no volume 'nope'"):
        store.volume("nope")
    with pytest.raises(DataError, match="unknown format"):
        list_cases("dicom", tmp_path)
    code, text = _invoke("prepare", "synthetic", 0, tmp_path / "r0", "--raters", "0", "-q")
    assert code == 1 and len(_error_lines(text)) == 1 and "--raters" in text
