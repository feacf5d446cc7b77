"""Hostile input, third round (docs/hostile_input.md, cases 57-): runs that cannot be corrupted, models and
folders that are not ours left alone, caches and configs that cannot be turned against the user."""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE, TINY, make_folder, one_error, run_cli, run_main
from PIL import Image

from crack_lightning.data.images import decode_image
from crack_lightning.errors import BadImageError

POS = sorted((SAMPLE / "Positive").glob("*.jpg"))
NEG = sorted((SAMPLE / "Negative").glob("*.jpg"))


def tiny_run(tmp_path: Path, name: str = "r", *extra: str) -> tuple[list[str], Path]:
    data = make_folder(tmp_path / "d", n_per_class=8)
    args = [*TINY, "--data.root", str(data), "--output_dir", str(tmp_path / "runs"), "--run_name", name,
            "--train.frozen.epochs", "2", *extra]
    res = run_main("train.py", *args)
    assert res.returncode == 0, res.stderr[-2000:]
    return args, tmp_path / "runs" / name


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- a run folder is the run's own: resumed only as itself, relocatable ----------------------------------
def test_resume_with_settings_that_change_the_model_or_data_is_refused_before_any_file_changes(tmp_path):
    args, run = tiny_run(tmp_path)
    before = snapshot(run)
    for change, key in ((["--data.class_names", "Positive,Negative"], "data.class_names"),
                        (["--model.head_hidden", "8"], "model.head_hidden"), (["--data.seed", "7"], "data.seed")):
        line = one_error(*run_main("train.py", *args, *change, "--resume")[::2])
        assert key in line and "other settings" in line
        assert snapshot(run) == before  # config.yaml, model.pt, checkpoints: not a byte changed
    # what may change on a resume: epochs, patience, batch size, workers
    res = run_main("train.py", *args, "--train.frozen.epochs", "3", "--data.batch_size", "2", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]


def test_a_copied_run_resumes_from_its_own_checkpoints_and_never_touches_the_original(tmp_path):
    args, run = tiny_run(tmp_path)
    info = json.loads((run / "checkpoints/frozen/done.json").read_text())
    assert info["best"] == "checkpoints/frozen/best.ckpt"  # relative: the folder can move
    original = snapshot(run)
    copy = tmp_path / "elsewhere" / "r"
    shutil.copytree(run, copy)
    (copy / "checkpoints/frozen/done.json").unlink()  # the copy's stage trains again from its own last.ckpt
    moved_args = [a if a != str(tmp_path / "runs") else str(tmp_path / "elsewhere") for a in args]
    res = run_main("train.py", *moved_args, "--train.frozen.epochs", "3", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert snapshot(run) == original  # the original run: not a byte changed
    assert json.loads((copy / "checkpoints/frozen/done.json").read_text())["best"] == "checkpoints/frozen/best.ckpt"
    # a run written before paths were relative names its own files absolutely: read as this folder's
    old = {**info, "best": str(tmp_path / "gone" / "checkpoints/frozen/best.ckpt")}
    (copy / "checkpoints/frozen/done.json").write_text(json.dumps(old))
    from crack_lightning.training.run_folder import read_done

    assert read_done(copy / "checkpoints/frozen/done.json")["best"] == "checkpoints/frozen/best.ckpt"


def test_a_split_image_deleted_before_resume_is_one_line(tmp_path):
    args, run = tiny_run(tmp_path)
    (run / "checkpoints/frozen/done.json").unlink()
    victim = next((tmp_path / "d" / "Positive").glob("*.jpg"))
    victim.unlink()
    line = one_error(*run_main("train.py", *args, "--resume")[::2])
    assert "gone" in line and victim.name in line


def test_seeds_outside_what_numpy_takes_are_one_line(tmp_path):
    for key in ("--seed", "--data.seed"):
        assert "0 to 4294967295" in one_error(*run_main("train.py", *TINY, key, "-1")[::2])


def test_more_nodes_than_this_launch_has_is_one_line_not_a_silent_wait(tmp_path, monkeypatch):
    for name in ("MASTER_ADDR", "NODE_RANK", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "LSB_JOBID"):
        monkeypatch.delenv(name, raising=False)
    line = one_error(*run_main("predict.py", str(POS[0]), "--num_nodes", "2", "--output", tmp_path / "p.csv")[::2])
    assert "multi-node" in line
    line = one_error(*run_main("train.py", *TINY, "--data.root", SAMPLE, "--trainer.num_nodes", "2", "--output_dir",
                               tmp_path / "runs")[::2])
    assert "multi-node" in line and not (tmp_path / "runs").exists()


# ---- configs: bounded, and no code runs that the user did not ask for -------------------------------------
def test_yaml_bombs_and_deep_nesting_are_one_line(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb.write_text("\n".join(lines) + "\n")
    assert "YAML aliases" in one_error(*run_main("train.py", "--config", bomb)[::2])
    deep = tmp_path / "deep.yaml"
    deep.write_text("data:\n  root: " + "[" * 3000 + "]" * 3000 + "\n")
    assert "nested deeper" in one_error(*run_main("train.py", "--config", deep)[::2])
    assert "YAML aliases" in one_error(*run_main("train.py", "--data.extra_roots", "&a [" + ", ".join(
        ["*a"] * 70) + "]")[::2])


def test_a_class_path_outside_lightning_is_refused_before_anything_is_imported(tmp_path):
    (tmp_path / "evil.py").write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('x')\n"
                                      "class X:\n    pass\n")
    for args in (["--trainer.logger", "evil.X"], ["--trainer.callbacks", "[{class_path: evil.X}]"],
                 ["--trainer.logger", "{class_path: evil.X, init_args: {}}"]):
        res = run_cli("train.py", *TINY, *args, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}, timeout=120)
        assert res.returncode == 2 and "not one of Lightning's classes" in res.stderr, res.stderr
    assert not (tmp_path / "RAN").exists()


def test_the_readmes_logger_example_trains(tmp_path):
    data = make_folder(tmp_path / "d", n_per_class=8)
    res = run_main("train.py", *TINY, "--data.root", data, "--output_dir", tmp_path / "runs", "--run_name", "r",
                   "--train.frozen.epochs", "1", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger")
    assert res.returncode == 0, res.stderr[-2000:]
    assert list((tmp_path / "runs" / "lightning_logs").rglob("metrics.csv"))


# ---- images: what a container says is not what it holds ----------------------------------------------------
def test_an_ico_wrapping_a_huge_png_is_refused_before_decoding():
    inner = io.BytesIO()
    Image.new("1", (14_000, 14_000)).save(inner, format="PNG")  # 196 megapixels in a few kB
    png = inner.getvalue()
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(BadImageError, match="not an image in a supported format"):
        decode_image(ico)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50_000_000  # the inner image (196 MB as pixels) was never decoded
    for fmt in ("GIF", "PPM", "ICO"):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buf, format=fmt)
        with pytest.raises(BadImageError, match="not an image in a supported format"):
            decode_image(buf.getvalue())


# ---- models and folders crack_lightning did not write are not replaced or removed ----------------------------
def test_calibrate_site_never_replaces_a_model_it_did_not_write_as_a_site_model(tmp_path, trained_run):
    shipped = tmp_path / "crack_lite0_field.pt"
    shutil.copy(ROOT / "models" / "crack_lite0_field.pt", shipped)
    for victim in (shipped, trained_run / "model.pt"):  # a shipped model, a run's model: release files of ours
        before = victim.read_bytes()
        line = one_error(*run_main("predict.py", *NEG[:2], "--calibrate-site", victim,
                                   "--calibrate-mode", "threshold")[::2])
        assert "was not written by crack_lightning" in line and victim.read_bytes() == before
    site = tmp_path / "site.pt"
    for _ in range(2):  # an earlier calibration's output is replaced
        res = run_main("predict.py", "--checkpoint", trained_run / "model.pt", *NEG[:2], "--calibrate-site", site,
                       "--calibrate-mode", "threshold", "--calibrate-anyway")
        assert res.returncode == 0, res.stderr[-2000:]


def test_calibration_refuses_photos_that_show_cracks_unless_told(tmp_path):
    """The released model is sure these show cracks: a 'crack-free' site set of them would teach the
    refitted head to miss cracks. Refused (both modes), or done with a warning when told."""
    for mode in ("head", "threshold"):
        line = one_error(*run_main("predict.py", *POS[:3], "--calibrate-site", tmp_path / f"{mode}.pt",
                                   "--calibrate-mode", mode)[::2])
        assert "look cracked" in line and "--calibrate-anyway" in line and not (tmp_path / f"{mode}.pt").exists()
    res = run_main("predict.py", *POS[:2], *NEG[:2], "--calibrate-site", tmp_path / "forced.pt", "--calibrate-anyway")
    assert res.returncode == 0 and "look cracked" in res.stderr and (tmp_path / "forced.pt").is_file()


def test_calibration_starts_from_the_threshold_given(tmp_path, trained_run):
    res = run_main("predict.py", "--checkpoint", trained_run / "model.pt", *NEG[:2], "--calibrate-site",
                   tmp_path / "s.pt", "--calibrate-mode", "threshold", "--threshold", "0.999", "--calibrate-anyway")
    assert res.returncode == 0, res.stderr[-2000:]
    info = torch.load(tmp_path / "s.pt", weights_only=True)["metrics"]["site_calibration"]
    assert info["threshold_before"] == 0.999 and info["threshold"] >= 0.999


def test_a_shards_folder_not_ours_is_neither_used_nor_removed(tmp_path, trained_run):
    shards = tmp_path / ".p.csv.shards"
    shards.mkdir()
    (shards / "notes.txt").write_text("mine")
    line = one_error(*run_main("predict.py", "--checkpoint", trained_run / "model.pt", str(POS[0]), "--output",
                               tmp_path / "p.csv", "--accelerator", "cpu", "--devices", "2")[::2])
    assert "did not write" in line and (shards / "notes.txt").read_text() == "mine"


def test_report_with_per_photo_modes_is_refused(tmp_path):
    for mode in ("--localize", "--explain"):
        line = one_error(*run_main("predict.py", str(POS[0]), mode, "--report", tmp_path / "r",
                                   "--output", tmp_path / "o")[::2])
        assert "--report" in line and not (tmp_path / "r").exists()


# ---- caches verify what they read -------------------------------------------------------------------------
def test_a_damaged_onnx_cache_is_rebuilt_not_believed(tmp_path, monkeypatch):
    from crack_lightning.inference.predictor import Predictor

    monkeypatch.setenv("CRACK_LIGHTNING_CACHE", str(tmp_path / "cache"))
    first = [r.probability for r in Predictor(num_workers=0).iter_rows(POS[:2] + NEG[:2])]
    (cached,) = (tmp_path / "cache" / "onnx").glob("*.onnx")
    good = cached.read_bytes()
    for damage in (good[: len(good) // 2], b"\x00" * 64, good[:-1] + bytes([good[-1] ^ 1])):
        cached.write_bytes(damage)
        again = [r.probability for r in Predictor(num_workers=0).iter_rows(POS[:2] + NEG[:2])]
        assert again == first and cached.read_bytes() == good  # made again, and the cache mended


# ---- library calls do what a caller means ----------------------------------------------------------------
def test_iter_rows_takes_one_path_as_one_image(capsys):
    from crack_lightning.inference.predictor import Predictor

    rows = list(Predictor(num_workers=0).iter_rows(str(POS[0])))
    assert len(rows) == 1 and rows[0].path == str(POS[0]) and rows[0].error == ""
    assert capsys.readouterr().err == ""  # a library call draws no progress bar unless asked


def test_numeric_options_are_finite_or_one_usage_line(tmp_path):
    for args in (["--threshold", "nan"], ["--tile", "inf"], ["--batch-size", "-3"], ["--workers", "x"]):
        res = run_main("predict.py", str(POS[0]), *args, "--output", tmp_path / "p.csv")
        assert res.returncode == 2 and "Traceback" not in res.stderr and args[0] in res.stderr, res.stderr
