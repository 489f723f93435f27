"""minituner.files: atomic writes of a file and of a directory of files that belong together."""

from __future__ import annotations

import pytest

from minituner.files import atomic_directory, atomic_file, refuse_pickle, write_text


def test_atomic_file_replaces_or_keeps(tmp_path):
    p = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_file(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]  # no temporary left behind
    write_text(p, "new")
    assert p.read_text() == "new"


def test_atomic_directory_all_or_nothing_and_keeps_other_files(tmp_path):
    d = tmp_path / "model"
    with atomic_directory(d) as tmp:
        (tmp / "config.json").write_text("1")
        (tmp / "model.safetensors").write_text("w1")
    (d / "tokenizer.json").write_text("tok")  # a file the save does not produce
    (d / "sub").mkdir()
    (d / "sub" / "x").write_text("x")
    with pytest.raises(RuntimeError):
        with atomic_directory(d) as tmp:
            (tmp / "model.safetensors").write_text("w2")
            raise RuntimeError("crash before the config is written")
    assert (d / "model.safetensors").read_text() == "w1"  # never new weights beside an old config
    assert (d / "config.json").read_text() == "1"
    with atomic_directory(d) as tmp:
        (tmp / "config.json").write_text("2")
        (tmp / "model.safetensors").write_text("w2")
    assert {f.name: f.read_text() for f in d.iterdir() if f.is_file()} == {
        "config.json": "2", "model.safetensors": "w2", "tokenizer.json": "tok"}
    assert (d / "sub" / "x").read_text() == "x"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model"]  # nothing left aside


def test_refuse_pickle_names_the_conversion(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        refuse_pickle(tmp_path / "pytorch_model.bin")
    refuse_pickle(tmp_path / "model.safetensors")  # fine
