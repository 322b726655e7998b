import pytest
import torch

from longtail.engine import checkpoint as ck
from longtail.errors import LongtailError


def test_roundtrip_is_weights_only(tmp_path):
    path = tmp_path / "c" / "last.pt"
    ck.save_checkpoint({"w": torch.arange(3.0), "epoch": 4, "best": None}, path)
    got = ck.load_checkpoint(path)
    assert got["epoch"] == 4 and torch.equal(got["w"], torch.arange(3.0))


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.save_checkpoint({"epoch": 1}, path)

    def explode(fd, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "fsync", explode)
    with pytest.raises(OSError):
        ck.save_checkpoint({"epoch": 2}, path)
    assert ck.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(LongtailError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LongtailError, match="cannot be read"):
        ck.load_checkpoint(tmp_path / "bad.pt")
