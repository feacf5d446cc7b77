"""A hostile user's cases (docs/hostile_input.md lists each with the behaviour): never damage a file,
never report a broken model as good, one ``error:`` line for every mistake.

The command-line cases run in-process (``guarded(main)``, what ``train.py`` / ``predict.py`` run),
so each costs milliseconds, not a Python start-up.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE, TINY, make_folder, one_error, run_main
from PIL import Image

from crack_lightning.cli.guard import guarded
from crack_lightning.cli.predict import predict_main
from crack_lightning.data.images import decode_image
from crack_lightning.data.records import read_split_csv
from crack_lightning.errors import BadImageError
from crack_lightning.files import csv_text, csv_value, path_from_csv
from crack_lightning.models.checkpoint import save_release
from crack_lightning.models.classifier import CrackClassifier

TRAIN = [*TINY, "--train.frozen.epochs", "2"]  # the tiny run, two epochs
POS = sorted((SAMPLE / "Positive").glob("*.jpg"))
NEG = sorted((SAMPLE / "Negative").glob("*.jpg"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A release file of a tiny random model (prediction plumbing, not accuracy)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    model = CrackClassifier(pretrained="none", image_size=32)
    model.threshold.fill_(0.4)
    save_release(model, path, half=False)
    return path


def edited(tiny_model, tmp_path, **changes) -> Path:
    """A copy of the release file with hand-edited hyper-parameters or threshold."""
    obj = torch.load(tiny_model, weights_only=True)
    for key, value in changes.items():
        if key == "threshold":
            obj["state_dict"]["threshold"] = torch.tensor(value, dtype=torch.float64)
        else:
            obj["hyper_parameters"][key] = value
    out = tmp_path / "edited.pt"
    torch.save(obj, out)
    return out


def predict(tiny_model, *argv):
    return run_main("predict.py", "--checkpoint", tiny_model, "--engine", "torch", "--workers", "0", *argv, cwd=None)


# ---- predict.py never writes over what it was given ------------------------------------------------
def test_output_equal_to_an_input_image_is_refused(tmp_path, capsys, tiny_model):
    img = tmp_path / "a.jpg"
    shutil.copy(POS[0], img)
    before = img.read_bytes()
    line = one_error(*predict(tiny_model, img, "--output", img)[::2])
    assert "is one of the inputs" in line and img.read_bytes() == before


def test_output_equal_to_the_checkpoint_is_refused(tmp_path, capsys, tiny_model):
    ckpt = tmp_path / "model.pt"
    shutil.copy(tiny_model, ckpt)
    before = ckpt.read_bytes()
    line = one_error(*predict(ckpt, POS[0], "--output", ckpt)[::2])
    assert "is one of the inputs" in line and ckpt.read_bytes() == before


def test_existing_file_not_ours_is_not_replaced(tmp_path, capsys, tiny_model):
    notes = tmp_path / "notes.csv"
    notes.write_text("name,phone\nann,123\n")
    line = one_error(*predict(tiny_model, POS[0], "--output", notes)[::2])
    assert "was not written by crack_lightning" in line and notes.read_text() == "name,phone\nann,123\n"


def test_existing_predictions_are_replaced(tmp_path, capsys, tiny_model):
    out = tmp_path / "preds.csv"
    assert predict(tiny_model, POS[0], "--output", out)[0] == 0
    assert predict(tiny_model, POS[0], POS[1], "--output", out)[0] == 0
    assert len(out.read_text().splitlines()) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv", "preds.metrics.json"]  # no temporary file


@pytest.mark.parametrize("make, flag, expected", [
    (lambda d: d.mkdir() or (d / "a_file").write_text("x") and d / "a_file" / "preds.csv", "--output",
     "is a file, not a folder"),
    (lambda d: d.mkdir() or d, "--output", "is a folder"),
    (lambda d: d.mkdir() or (d / "rep").write_text("x") and d / "rep" / "sub", "--report", "is a file, not a folder"),
])
def test_output_problems_are_found_before_any_work(tmp_path, capsys, tiny_model, make, flag, expected):
    target = make(tmp_path / "o")
    argv = [POS[0]] + ([] if flag == "--output" else ["--output", tmp_path / "p.csv"]) + [flag, target]
    line = one_error(*predict(tiny_model, *argv)[::2])
    assert expected in line
    assert not (tmp_path / "p.csv").exists()


def test_export_into_a_file_or_over_its_own_model_is_refused(tmp_path, capsys, tiny_model):
    blocker = tmp_path / "export"
    blocker.write_text("x")
    line = one_error(*run_main("predict.py", "--checkpoint", tiny_model, "--export", blocker)[::2])
    assert "is a file, not a folder" in line
    out = tmp_path / "exp"
    assert run_main("predict.py", "--checkpoint", tiny_model, "--export", out)[0] == 0
    onnx_before = (out / "model.onnx").read_bytes()
    line = one_error(*run_main("predict.py", "--checkpoint", out / "model.onnx", "--export", out)[::2])
    assert "is one of the inputs" in line and (out / "model.onnx").read_bytes() == onnx_before


def test_localize_output_must_be_a_folder(tmp_path, capsys, tiny_model):
    f = tmp_path / "loc"
    f.write_text("x")
    assert "must be a folder" in one_error(*predict(tiny_model, "--localize", POS[0], "--output", f)[::2])


def test_full_disk_ends_with_one_line_and_keeps_the_old_output(tmp_path, tiny_model):
    """A file-size limit (what a full disk does to a write) while writing the CSV: one line, exit 2,
    the previous predictions intact, no temporary file left."""
    out = tmp_path / "preds.csv"
    out.write_text("path,probability,label,true_label,correct,error\nold,0.1,Negative,,,\n")
    old = out.read_bytes()
    many = [str(p) for p in POS[:40]]
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300)); "
            "from crack_lightning.cli.guard import guarded; from crack_lightning.cli.predict import predict_main; "
            "sys.exit(guarded(lambda: predict_main(sys.argv[1:])))")
    res = subprocess.run([sys.executable, "-c", code, "--checkpoint", str(tiny_model), "--engine", "torch",
                          "--workers", "0", *many, "--output", str(out)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    line = one_error(res.returncode, res.stderr)
    assert "File too large" in line and "nothing half-written" in line
    assert out.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]


# ---- file names ---------------------------------------------------------------------------------------------
def test_non_utf8_and_formula_names_round_trip_through_the_csv(tmp_path, capsys, tiny_model, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    odd = os.fsdecode(bytes(folder) + b"/caf\xe9_\xff.jpg")  # Latin-1 name: not UTF-8
    shutil.copy(POS[0], odd)
    shutil.copy(POS[1], folder / "=HYPERLINK(1).jpg")
    out = tmp_path / "preds.csv"
    monkeypatch.chdir(folder)  # relative inputs: the path cell starts with the name itself
    code, stdout, _ = predict(tiny_model, *sorted(os.listdir(".")), "--output", out)
    assert code == 0
    text = out.read_bytes().decode("utf-8")  # valid UTF-8 throughout
    rows = list(csv.DictReader(io.StringIO(text)))
    cells = {Path(r["path"]).name for r in rows}
    assert "caf\\xe9_\\xff.jpg" in cells
    assert "'=HYPERLINK(1).jpg" in cells  # shown as text, never run as a formula
    assert sorted(os.path.abspath(path_from_csv(r["path"])) for r in rows) == sorted(str(p) for p in folder.iterdir())
    assert "2 image(s)" in stdout


def test_non_utf8_names_in_localize_and_training(tmp_path, capsys, tiny_model):
    photo = os.fsdecode(bytes(tmp_path) + b"/site_\xff.png")
    Image.fromarray(np.concatenate([decode_image(POS[0]), decode_image(NEG[0])], 1)).save(photo)
    out = tmp_path / "loc"
    code, stdout, _ = predict(tiny_model, "--localize", photo, "--output", out)
    assert code == 0 and "site_\\xff.png" in stdout
    summary = (out / "summary.csv").read_text(encoding="utf-8")
    assert path_from_csv(list(csv.DictReader(io.StringIO(summary)))[0]["photo"]) == photo
    data = make_folder(tmp_path / "d", n_per_class=4)
    os.rename(data / "Positive" / "Pos_000.jpg", os.fsdecode(bytes(data) + b"/Positive/\xff=odd.jpg"))
    code, _, err = run_main("train.py", *TRAIN, "--data.root", data, "--output_dir", tmp_path / "runs", "--run_name", "r",
                                    "--train.frozen.epochs", "1")
    assert code == 0, err[-2000:]
    assert all(os.path.exists(r.path) for r in read_split_csv(tmp_path / "runs/r/split.csv"))


def test_csv_text_rule_is_reversible():
    for text in ["=1+1", "+x", "-3", "@a", "'quoted", "''", "plain", "a=b", "\t", "'=already"]:
        assert csv_value(csv_text(text)) == text
        assert not csv_text(text).startswith(("=", "+", "-", "@", "\t"))


# ---- what a model file claims is checked before it is believed ------------------------------------------------
@pytest.mark.parametrize("changes, expected", [
    ({"threshold": float("nan")}, "stored threshold nan is not in (0, 1)"),
    ({"threshold": 5.0}, "stored threshold 5.0 is not in (0, 1)"),
    ({"class_names": ["crack"]}, "class_names must be two different names"),
    ({"image_size": -5}, "image_size must be 0 or 16-4096"),
    ({"drop_rate": "abc"}, "drop_rate must be a number in [0, 1)"),
    ({"backbone": "no_such_net"}, "unknown timm model"),
])
def test_hand_edited_checkpoints_are_refused(tmp_path, capsys, tiny_model, changes, expected):
    line = one_error(*predict(edited(tiny_model, tmp_path, **changes), POS[0], "--output",
                              tmp_path / "p.csv")[::2])
    assert expected in line
    assert not (tmp_path / "p.csv").exists()


def test_a_bad_stored_threshold_can_be_overridden(tmp_path, capsys, tiny_model):
    ckpt = edited(tiny_model, tmp_path, threshold=float("nan"))
    assert predict(ckpt, POS[0], "--output", tmp_path / "p.csv", "--threshold", "0.5")[0] == 0


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp")
    assert guarded(lambda: predict_main(["--checkpoint", str(tiny_model), "--export", str(out)])) == 0
    return out


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "model.onnx").write_bytes(b"garbage" * 100), "not a valid ONNX model"),
    (lambda d: (d / "model.json").write_text("{not json"), "is not a valid model contract"),
    (lambda d: (d / "model.json").write_text(json.dumps({**json.loads((d / "model.json").read_text()),
                                                         "threshold": 5})), "stored threshold 5"),
    (lambda d: (d / "model.json").write_text(json.dumps({**json.loads((d / "model.json").read_text()),
                                                         "preprocessing": {"size": 64, "mean": [0.5] * 3,
                                                                           "std": [0.5] * 3}})),
     "do not belong together"),
    (lambda d: (d / "model.json").unlink(), "needs its contract file"),
])
def test_damaged_exports_are_refused(exported, tmp_path, capsys, damage, expected):
    d = tmp_path / "exp"
    shutil.copytree(exported, d)
    damage(d)
    line = one_error(*run_main("predict.py", "--checkpoint", d / "model.onnx", POS[0], "--output", tmp_path / "p.csv")[::2])
    assert expected in line


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "banana", "cpu:1"])
def test_unavailable_device_is_one_line(tmp_path, capsys, tiny_model, device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert "--device" in one_error(*predict(tiny_model, POS[0], "--device", device, "--output",
                                            tmp_path / "p.csv")[::2])


def test_a_gpu_asked_of_a_machine_without_one_is_one_line_before_any_work(tmp_path, capsys, tiny_model, monkeypatch):
    """--accelerator gpu (prediction over processes) and --trainer.accelerator gpu (training): Lightning
    refuses; the user reads one line naming the flag, and training stops before scanning any data."""
    from lightning.pytorch.accelerators import CUDAAccelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with a GPU
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    line = one_error(*predict(tiny_model, POS[0], "--accelerator", "gpu", "--devices", "1", "--output",
                              tmp_path / "p.csv")[::2])
    assert line.startswith("error: --accelerator gpu --devices 1:") and "use --accelerator cpu" in line
    code, out, err = run_main("train.py", *TRAIN, "--data.root", SAMPLE, "--output_dir", tmp_path / "runs",
                                      "--trainer.accelerator", "gpu")
    assert "use --trainer.accelerator cpu" in one_error(code, err)
    assert "split:" not in out  # no data was scanned
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run folder left


# ---- damaged images: the file's error row, never a crash ------------------------------------------------------
def exif_crasher() -> bytes:
    """A rotated JPEG whose EXIF block makes Pillow's own ``exif_transpose`` raise something other
    than OSError (struct.error, TypeError): found by a seeded search over byte mutations."""
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112], exif[0x010F], exif[0x0110] = 6, "Canon", "EOS"
    buf = io.BytesIO()
    Image.open(POS[0]).save(buf, format="JPEG", exif=exif.tobytes())
    good = buf.getvalue()
    start = good.find(b"Exif\x00\x00") + 6
    rng = random.Random(1)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            data[start + rng.randrange(60)] = rng.randrange(256)
        try:
            img = Image.open(io.BytesIO(bytes(data)))
            if img.getexif().get(0x0112, 1) != 1:
                ImageOps.exif_transpose(img)
        except OSError:
            continue
        except Exception:  # noqa: BLE001 - what we are looking for
            return bytes(data)
    raise AssertionError("no EXIF mutation crashed Pillow: the search needs updating")


def damaged_images(tmp_path) -> dict[str, Path]:
    """One file of each kind of damage that has escaped a decoder before."""
    out = tmp_path / "bad"
    out.mkdir()
    files = {}
    files["exif"] = out / "bad_exif.jpg"
    files["exif"].write_bytes(exif_crasher())
    files["tiff"] = out / "bad_header.tif"
    files["tiff"].write_bytes(b"II*\x00\x08\x00\x00\x00\x01\x00\x00\x01\x03\x00\x01\x00\x00\x00\x00\x00\x00\x00")
    jpeg = POS[1].read_bytes()
    files["cut"] = out / "middle_cut.jpg"
    files["cut"].write_bytes(jpeg[:len(jpeg) // 3] + jpeg[2 * len(jpeg) // 3:])
    files["nan"] = out / "nan.tif"
    Image.fromarray(np.full((32, 32), np.nan, np.float32), mode="F").save(files["nan"])
    files["bomb"] = out / "bomb.png"
    Image.new("1", (15_000, 15_000)).save(files["bomb"])  # 225 megapixels in a few kB
    return files


def test_damaged_images_become_error_rows(tmp_path, capsys, tiny_model):
    files = damaged_images(tmp_path)
    out = tmp_path / "p.csv"
    code, _, err = predict(tiny_model, *files.values(), POS[0], "--output", out)
    assert code == 1 and "Traceback" not in err
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open(encoding="utf-8"))}
    assert rows[POS[0].name]["error"] == "" and rows[POS[0].name]["probability"]
    expected = {"exif": "corrupt", "tiff": "", "cut": "corrupt JPEG data", "nan": "NaN", "bomb": "too large"}
    for kind, path in files.items():
        row = rows[path.name]
        assert row["error"] and expected[kind] in row["error"] and row["probability"] == "", (kind, row)


def test_damaged_images_are_skipped_in_training(tmp_path, capsys):
    data = make_folder(tmp_path / "d", n_per_class=4)
    for path in damaged_images(tmp_path).values():
        shutil.copy(path, data / "Positive" / path.name)
    code, out, err = run_main("train.py", *TRAIN, "--data.root", data, "--output_dir", tmp_path / "runs", "--run_name", "r",
                                      "--train.frozen.epochs", "1")
    assert code == 0, err[-2000:]
    with open(tmp_path / "runs/r/bad_images.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 5
    assert "skipped 5 unusable file(s)" in out


def test_fuzzed_images_never_escape_as_crashes():
    """Seeded byte mutations of real JPEG, PNG, TIFF, BMP and WebP files, and of an EXIF-rotated
    JPEG: each decodes to an RGB array or raises BadImageError, nothing else."""
    rng = random.Random(0)
    seeds = []
    base = Image.open(POS[0]).convert("RGB").resize((48, 48))
    for fmt, kw in (("JPEG", {}), ("PNG", {}), ("TIFF", {}), ("BMP", {}), ("WEBP", {})):
        buf = io.BytesIO()
        base.save(buf, format=fmt, **kw)
        seeds.append(buf.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 8
    buf = io.BytesIO()
    base.save(buf, format="JPEG", exif=exif.tobytes())
    seeds.append(buf.getvalue())
    outcomes = {"ok": 0, "bad": 0}
    for n in range(3000):
        data = bytearray(rng.choice(seeds))
        kind = n % 4
        if kind == 0:  # flip a few bytes anywhere
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:  # damage the header
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(min(64, len(data)))] = rng.randrange(256)
        elif kind == 2:  # truncate
            del data[rng.randrange(1, len(data)):]
        else:  # cut a piece out of the middle, keep the end
            a = rng.randrange(len(data))
            del data[a:a + rng.randint(1, 200)]
        try:
            img = decode_image(bytes(data))
        except BadImageError:
            outcomes["bad"] += 1
            continue
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        outcomes["ok"] += 1
    assert outcomes["bad"] > 500 and outcomes["ok"] > 100  # both paths were exercised


# ---- training refuses data and settings that cannot make an honest model ---------------------------------------
def test_one_class_left_after_conflicts_is_refused(tmp_path, capsys):
    """10 negatives, the same 10 copied into Positive, 10 real positives: after the conflicting copies
    go, no negative is left. Refused before training, with the counts, and no model written."""
    data = make_folder(tmp_path / "d", n_per_class=10)
    for p in (data / "Negative").iterdir():
        shutil.copy(p, data / "Positive" / f"copy_{p.name}")
    code, out, err = run_main("train.py", *TRAIN, "--data.root", data, "--output_dir", tmp_path / "runs", "--run_name", "r")
    line = one_error(code, err)
    assert "too few usable images" in line and "0 Negative" in line and "20 file(s) skipped" in line
    assert not (tmp_path / "runs" / "r").exists()
    assert "identical copy exists under the other class" in out  # the reasons were shown, not only a path


def test_presplit_root_with_an_empty_test_split_is_refused(tmp_path, capsys):
    root = tmp_path / "pre"
    make_folder(root / "train", n_per_class=4, seed=1)
    make_folder(root / "val", n_per_class=2, seed=2)
    (root / "test" / "Negative").mkdir(parents=True)
    (root / "test" / "Positive").mkdir(parents=True)
    line = one_error(*run_main("train.py", *TRAIN, "--data.root", root, "--output_dir", tmp_path / "runs")[::2])
    assert "test" in line and "lack a class" in line


@pytest.mark.parametrize("override, expected", [
    (["--train.frozen.lr", "nan"], "train.frozen.lr: expected float, got 'nan'"),
    (["--train.frozen.lr", "inf"], "train.frozen.lr: expected float, got 'inf'"),
    (["--model.drop_rate", "5"], "model.drop_rate: must be in [0, 1)"),
    (["--model.image_size", "-5"], "model.image_size"),
    (["--data.batch_size", "0"], "data.batch_size: must be > 0"),
])
def test_bad_settings_are_one_line_and_leave_no_folder(tmp_path, capsys, override, expected):
    data = make_folder(tmp_path / "d", n_per_class=2)
    line = one_error(*run_main("train.py", *TRAIN, "--data.root", data, "--output_dir", tmp_path / "runs", *override)[::2])
    assert expected in line and not (tmp_path / "runs").exists()


def test_config_file_not_utf8_or_with_duplicate_keys(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("data:\n  root: caf\xe9\n".encode("latin-1"))
    assert "not a UTF-8 text file" in one_error(*run_main("train.py", "--config", bad)[::2])
    dup = tmp_path / "dup.yaml"
    dup.write_text("data:\n  batch_size: 8\n  batch_size: 64\n")
    assert "'batch_size' appears twice (line 3)" in one_error(*run_main("train.py", "--config", dup)[::2])


def test_a_folder_in_use_by_another_run_is_refused(tmp_path, capsys):
    """Another process holds the folder's lock: refused, naming the holder; nothing written into it."""
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(holder.stdout.readline())
        data = make_folder(tmp_path / "d", n_per_class=2)
        line = one_error(*run_main("train.py", *TRAIN, "--data.root", data, "--output_dir", tmp_path / "runs", "--run_name",
                                           "r")[::2])
        assert f"in use by another run (process {pid}" in line
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock", ".lock.json"]  # nothing of ours written
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_whose_process_was_killed_is_no_lock(tmp_path, capsys):
    """A run killed with SIGKILL leaves its lock file, but the kernel released the lock: the next run goes on."""
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    holder.kill()
    holder.wait()
    assert (run_dir / ".lock").exists() and (run_dir / ".lock.json").exists()
    data = make_folder(tmp_path / "d", n_per_class=4)
    code, _, err = run_main("train.py", *TRAIN, "--data.root", data, "--output_dir", tmp_path / "runs", "--run_name", "r",
                                    "--train.frozen.epochs", "1")
    assert code == 0, err[-2000:]
    assert (run_dir / "model.pt").is_file() and not (run_dir / ".lock").exists()  # released at the end


# a process holding a run folder's lock the way train.py does, printing its pid once it holds it
HOLD_LOCK = ("import sys, os, time, pathlib; from crack_lightning.training.run_folder import RunLock; "
             "lock = RunLock(pathlib.Path(sys.argv[1])); lock.acquire(); print(os.getpid(), flush=True); time.sleep(60)")


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "mine"
    run_dir.mkdir(parents=True)
    (run_dir / "thesis.tex").write_text("precious")
    data = make_folder(tmp_path / "d", n_per_class=2)
    line = one_error(*run_main("train.py", *TRAIN, "--data.root", data, "--output_dir", tmp_path / "runs",
                                       "--run_name", "mine")[::2])
    assert "is not a run" in line and sorted(p.name for p in run_dir.iterdir()) == ["thesis.tex"]


# ---- checkpoints: atomic where they live, and a torn one does not stop --resume ------------------------------------
def test_checkpoints_are_written_in_their_own_folder(tmp_path, monkeypatch):
    """The temporary file is made beside the checkpoint, not under $TMPDIR (where a rename across file
    systems degrades to a copy over the old file); a failing write leaves the old checkpoint intact."""
    from crack_lightning.training.callbacks import AtomicCheckpointIO

    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    path = tmp_path / "ck" / "last.ckpt"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    seen = []

    real_open = os.fdopen

    class Full:  # the disk fills up half-way through the write
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            seen.append(Path(os.readlink(f"/proc/self/fd/{self.f.fileno()}")).parent)  # where the bytes go
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data[:100]))
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_open(fd, *a, **k)))
    with pytest.raises(OSError, match="No space"):
        io_.save_checkpoint({"epoch": 2}, path)
    monkeypatch.setattr(os, "fdopen", real_open)
    assert seen == [path.parent] and not any(elsewhere.iterdir())
    assert torch.load(path, weights_only=True)["epoch"] == 1 and sorted(p.name for p in path.parent.iterdir()) == \
        ["last.ckpt"]


def test_resume_falls_back_to_the_newest_readable_checkpoint_and_keeps_history(tmp_path, capsys):
    data = make_folder(tmp_path / "d", n_per_class=8)
    args = [*TRAIN, "--data.root", data, "--output_dir", tmp_path / "runs", "--run_name", "r",
            "--train.frozen.epochs", "3", "--train.frozen.patience", "100"]
    assert run_main("train.py", *args)[0] == 0
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "checkpoints/frozen/done.json").unlink()  # as if stopped before the stage ended
    (run_dir / "metrics.json").unlink()
    best = torch.load(run_dir / "checkpoints/frozen/best.ckpt", weights_only=True)
    (run_dir / "checkpoints/frozen/last.ckpt").write_bytes(b"")  # torn by an interruption
    before = (run_dir / "logs/frozen/metrics.csv").read_text().splitlines()
    code, _, err = run_main("train.py", *args, "--resume")
    assert code == 0, err[-2000:]
    assert "skipping a damaged checkpoint" in err
    info = json.loads((run_dir / "checkpoints/frozen/done.json").read_text())
    assert info["resumed_from_epoch"] == best["epoch"] + 1
    after = list(csv.DictReader((run_dir / "logs/frozen/metrics.csv").open()))
    epochs = sorted({int(float(r["epoch"])) for r in after if r.get("val_loss")})
    assert epochs == [0, 1, 2]  # every epoch's validation row, those before the resume included
    assert len(after) >= len(before) - 1


def test_full_disk_during_training_is_one_line_and_no_torn_checkpoint(tmp_path):
    """Writes beyond 2 MB fail (what a full disk does): the first checkpoint cannot be written. One
    line, exit 2, no partial checkpoint, and (nothing trained) no run folder left to block a re-run."""
    data = make_folder(tmp_path / "d", n_per_class=4)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000)); "
            "from crack_lightning.cli.guard import guarded; from crack_lightning.cli.train import train_main; "
            "sys.exit(guarded(lambda: train_main(sys.argv[1:])))")
    res = subprocess.run([sys.executable, "-c", code, *map(str, TRAIN), "--data.root", str(data), "--output_dir",
                          str(tmp_path / "runs"), "--run_name", "r"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert "File too large" in one_error(res.returncode, res.stderr)
    assert not (tmp_path / "runs" / "r").exists()


def test_per_photo_and_report_outputs_replace_only_our_own_files(tmp_path, capsys, tiny_model):
    """--localize and --report write into folders: a file of the same name that crack_lightning did not
    write (a PNG without our Software tag, a CSV with another header) is refused; our own are replaced."""
    out = tmp_path / "loc"
    out.mkdir()
    photo = tmp_path / "site.png"
    Image.fromarray(np.concatenate([decode_image(POS[0]), decode_image(NEG[0])], 1)).save(photo)
    foreign = out / "site_heatmap.png"
    Image.new("RGB", (8, 8)).save(foreign)
    line = one_error(*predict(tiny_model, "--localize", photo, "--output", out)[::2])
    assert "was not written by crack_lightning" in line and "site_heatmap.png" in line
    foreign.unlink()
    assert predict(tiny_model, "--localize", photo, "--output", out)[0] == 0
    assert predict(tiny_model, "--localize", photo, "--output", out)[0] == 0  # ours: replaced
    report = tmp_path / "rep"
    report.mkdir()
    Image.new("RGB", (8, 8)).save(report / "roc.png")
    line = one_error(*predict(tiny_model, POS[0], NEG[0], "--output", tmp_path / "p.csv", "--report",
                              report)[::2])
    assert "roc.png" in line and not (tmp_path / "p.csv").exists()


def test_export_replaces_only_an_earlier_export(tmp_path, capsys, tiny_model):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "model.json").write_text('{"my": "notes"}')
    line = one_error(*run_main("predict.py", "--checkpoint", tiny_model, "--export", out)[::2])
    assert "model.json" in line and (out / "model.json").read_text() == '{"my": "notes"}'
    (out / "model.json").unlink()
    assert run_main("predict.py", "--checkpoint", tiny_model, "--export", out)[0] == 0
    assert run_main("predict.py", "--checkpoint", tiny_model, "--export", out)[0] == 0  # ours: replaced
