"""The helper that packs a data folder into parts for a lent GPU machine."""
import importlib.util
import tarfile

from conftest import ROOT, SAMPLE


def test_pack_data_splits_and_keeps_every_file(tmp_path):
    spec = importlib.util.spec_from_file_location("pack_data", ROOT / "bench" / "pack_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    parts = mod.pack(SAMPLE, tmp_path / "parts", first_mib=0.2, mib=0.5)
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
