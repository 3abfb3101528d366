"""rlr.atomic: the one atomic-write helper."""
import json
import os

import pytest

from rlr.atomic import atomic_open, atomic_save, atomic_write_json, atomic_write_text


def test_writes_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(target.parent) == ["metrics.json"]


def test_failure_inside_keeps_the_old_file(tmp_path):
    target = tmp_path / "config.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as handle:
            handle.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.json"]


def test_two_writers_use_distinct_temporaries(tmp_path):
    target = tmp_path / "x.bin"
    with atomic_open(target) as first, atomic_open(target) as second:
        assert first.name != second.name
        first.write(b"1")
        second.write(b"2")
    assert target.read_bytes() in (b"1", b"2")


def test_atomic_save_and_bad_mode(tmp_path):
    target = tmp_path / "c.pt"
    atomic_save(target, lambda f: f.write(b"payload"))
    assert target.read_bytes() == b"payload"
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(target, "a"):
            pass
