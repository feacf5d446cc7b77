"""The benchmark scripts: bench/run.py end to end (tiny sizes) and the data packer for a lent GPU."""
import importlib.util
import json
import tarfile

import pytest
from conftest import ROOT, SAMPLE, run_cli


def test_pack_data_splits_and_keeps_every_file(tmp_path):
    spec = importlib.util.spec_from_file_location("pack_data", ROOT / "tools" / "pack_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    parts = mod.pack([SAMPLE], tmp_path / "parts", first_mib=0.2, mib=0.5)
    assert len(parts) > 2
    names = []
    for p in parts:
        with tarfile.open(p) as tar:
            names += tar.getnames()
    expected = sorted(f"sample/{f.relative_to(SAMPLE)}" for f in SAMPLE.rglob("*") if f.is_file())
    assert sorted(names) == expected
    with tarfile.open(parts[0]) as tar:
        tar.extractall(tmp_path / "out", filter="data")
    first = sorted((tmp_path / "out").rglob("*.jpg"))[0]
    assert first.read_bytes() == (SAMPLE / first.relative_to(tmp_path / "out" / "sample")).read_bytes()


def test_pack_data_from_split_keeps_only_the_listed_splits(tmp_path):
    """--from-split: only train/val rows of a split.csv, N per label; a root it does not list packs whole."""
    spec = importlib.util.spec_from_file_location("pack_data", ROOT / "tools" / "pack_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    files = sorted(f for f in SAMPLE.rglob("*.jpg"))
    split = tmp_path / "split.csv"
    rows = ["path,label,split"] + [f"{f},{int(f.parent.name == 'Positive')},{('train', 'val', 'test')[i % 3]}"
                                   for i, f in enumerate(files)]
    split.write_text("\n".join(rows) + "\n")
    kept = mod.select(files, split, ["train", "val"], per_class=10)
    assert len(kept) == 20 and sum(f.parent.name == "Positive" for f in kept) == 10
    test_rows = {files[i] for i in range(2, len(files), 3)}
    assert not test_rows & set(kept)
    assert mod.select(files, tmp_path / "split.csv", ["test"], 0) == sorted(test_rows)
    other = [tmp_path / "split.csv"]  # not listed: kept whole
    assert mod.select(other, split, ["train"], 1) == other


@pytest.mark.slow
def test_bench_run_measures_every_row_and_writes_json_and_table(tmp_path):
    """A tiny CPU run of the one benchmark command: every figure present, positive, consistent."""
    out = tmp_path / "results.json"
    res = run_cli("bench/run.py", "--data", str(SAMPLE), "--images", "32", "--train-images", "16", "--steps", "1",
                  "--epochs", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["hardware"]["cpu_count"] >= 1 and r["hardware"]["gpu"] is None
    for row in r["pipeline"].values():
        assert row["images_per_s_per_worker"] > 0 and row["image_size"] == 224
    p = r["predict"]
    assert p["images"] == 32 and p["ours"]["engine"] == "onnxruntime" and p["ours"]["resize_on"] == "loader workers"
    assert p["ours"]["images_per_s"] > 0 and p["ours"]["loader_alone_images_per_s"] > 0
    assert abs(p["speedup"] - p["ours"]["images_per_s"] / p["plain_baseline"]["images_per_s"]) < 0.02 * p["speedup"]
    t = r["training"]
    assert t["frozen"]["speedup"] > 0 and t["finetune"]["ours_images_per_s"] > 0 and t["batch"] == 32
    table = out.with_suffix(".md").read_text()
    assert "predict, JPEG -> CSV" in table and "decode only (resize left to the GPU)" in table
    assert "device_resize" not in r  # the GPU check runs only on a GPU


@pytest.mark.slow
def test_bench_loader_rates_every_way_of_shipping(tmp_path):
    out = tmp_path / "loader.json"
    res = run_cli("bench/loader.py", "--images", "24", "--batch", "8", "--workers", "0", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["images"] == 24 and r["batch"] == 8 and r["image_size"] == 224
    assert set(r["rates"]) == {"float32", "uint8", "deferred"}
    for way in r["rates"].values():
        assert set(way) == {"0", "1"}
        assert all(v["images_per_s"] > 0 and v["main_process_cpu_us_per_image"] > 0 for v in way.values())
    assert "| deferred |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_bench_compile_compares_eager_compiled_and_onnxruntime(tmp_path):
    """Inference rows only (compiling the training step costs CI a minute more): every row
    measured, the speed-up and pay-back derived from the measured rates."""
    out = tmp_path / "compile.json"
    # aot_eager: the script's own logic (rows, speed-up, pay-back) without inductor's C++ build (40 s here),
    # which the benchmark itself runs; a failing compiler is tested as a finding in the bench's own run
    res = run_cli("bench/compile.py", "--batch", "2", "--steps", "1", "--rows", "inference", "--backend",
                  "aot_eager", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["compile_backend"] == "aot_eager"
    assert r["device"] == "cpu" and r["batch"] == 2 and r["image_size"] == 224 and r["precision"] == "fp32"
    assert set(r["rows"]) == {"inference, eager", "inference, compiled", "inference, onnxruntime"}
    assert all(row["images_per_s"] > 0 and row["first_call_s"] >= 0 for row in r["rows"].values())
    eager, compiled = r["rows"]["inference, eager"], r["rows"]["inference, compiled"]
    assert abs(compiled["speedup_vs_eager"] - compiled["images_per_s"] / eager["images_per_s"]) < 0.01
    assert (compiled["break_even_images"] is None) == (compiled["images_per_s"] <= eager["images_per_s"])
    assert "| inference, compiled |" in out.with_suffix(".md").read_text()


def test_interpolate_tool_mixes_a_finished_run_and_rechooses_its_threshold(trained_run, tmp_path, capsys):
    """tools/interpolate.py: a finished run averaged with its start, re-thresholded on its own
    validation split, written as a run folder that predict.py and experiments/loso.py take."""
    import torch
    from conftest import run_main

    from crack_lightning.models.checkpoint import load_model, save_release

    spec = importlib.util.spec_from_file_location("interpolate_tool", ROOT / "tools" / "interpolate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    first = load_model(trained_run / "model.pt")  # a start that differs from the run: its head halved
    first.head[1].weight.data.mul_(0.5)
    start = tmp_path / "start.pt"
    save_release(first, start, half=False)
    out = tmp_path / "wise"
    args = ["--start", str(start), "--tuned", str(trained_run), "--num-workers", "0"]
    assert tool.main([*args, "--alpha", "0.25", "--output", str(out)]) == 0
    a = torch.load(start, weights_only=True)["state_dict"]
    b = torch.load(trained_run / "model.pt", weights_only=True)["state_dict"]
    mixed = torch.load(out / "model.pt", weights_only=True)
    assert not torch.allclose(a["head.1.weight"], b["head.1.weight"].float())
    assert torch.allclose(mixed["state_dict"]["head.1.weight"].float(),
                          0.75 * a["head.1.weight"] + 0.25 * b["head.1.weight"].float(), atol=2e-3)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interpolate"] == 0.25 and metrics["threshold"] == mixed["threshold"]
    assert metrics["after"]["test"]["n"] == 40 and (out / "test_predictions.csv").is_file()
    pred = run_main("predict.py", SAMPLE / "Positive", "--checkpoint", out / "model.pt", "--output", tmp_path / "p.csv")
    assert pred.returncode == 0 and "100 image(s)" in pred.stdout
    capsys.readouterr()
    assert tool.main([*args, "--output", str(out)]) == 2 and "exists" in capsys.readouterr().err
    assert tool.main([*args, "--output", str(tmp_path / "w2"), "--path-map", f"{SAMPLE}=/nowhere"]) == 2
    assert "--path-map" in capsys.readouterr().err and not (tmp_path / "w2").exists()
