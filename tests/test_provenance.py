"""Provenance recorded with every result: the keys, the commit, the command (CPU only)."""

from __future__ import annotations

import importlib.util
import json
import platform
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
import transformers

from adakv.apps import provenance as module
from adakv.apps.provenance import provenance
from adakv.evaluation.runner import SweepConfig, prepare_run_folder

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"gpu", "device", "torch", "transformers", "triton", "vllm", "python", "platform", "adakv_commit",
        "adakv_dirty", "date", "command"}  # fmt: skip
RUN_KEYS = KEYS | {"seed", "asked"}  # a run folder's entry: the provenance and what the run was asked
needs_git = pytest.mark.skipif(
    shutil.which("git") is None or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode,
    reason="needs git and this repository's checkout",
)  # fmt: skip


def test_every_key_with_this_process_values():
    record = provenance("cpu")
    assert set(record) == KEYS
    assert record["gpu"] is None and record["device"] == "cpu"
    assert record["torch"] == torch.__version__ and record["transformers"] == transformers.__version__
    assert record["python"] == platform.python_version() and record["platform"] == platform.platform()
    for name in ("triton", "vllm"):  # read from the installed metadata, None when not installed
        installed = importlib.util.find_spec(name) is not None
        assert (record[name] is not None) == installed
    if importlib.util.find_spec("vllm") is None:
        assert "vllm" not in sys.modules
    json.dumps(record)  # JSON-ready as it is


def test_date_is_utc_iso_to_the_second():
    record = provenance("cpu")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record["date"]), record["date"]
    date = datetime.fromisoformat(record["date"])
    assert date.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - date) < timedelta(minutes=5)


def test_command_is_this_process_argv(monkeypatch):
    command = provenance("cpu")["command"]
    assert command == shlex.join(["python", *sys.argv])
    assert shlex.split(command)[1:] == sys.argv  # the test runner's own argv
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_evict.py", "--tag", "two words"])
    assert provenance("cpu")["command"] == "python benchmarks/bench_evict.py --tag 'two words'"


@needs_git
def test_commit_of_this_checkout(monkeypatch):
    monkeypatch.delenv("ADAKV_COMMIT", raising=False)
    record = provenance("cpu")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", record["adakv_commit"]) and record["adakv_commit"] == head
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True).stdout
    assert type(record["adakv_dirty"]) is bool and record["adakv_dirty"] == bool(status.strip())


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_no_commit_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAKV_COMMIT", raising=False)
    outside = tmp_path / "site-packages" / "adakv"
    outside.mkdir(parents=True)
    (outside / "__init__.py").write_text("")
    monkeypatch.setattr(module, "PACKAGE", outside)  # an installed wheel, not in any repository
    record = provenance("cpu")
    assert record["adakv_commit"] is None and record["adakv_dirty"] is None
    # a wheel installed inside another checkout (a virtual environment in a repository): git does not
    # track its files, so that repository's commit is not the package's
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert subprocess.run(["git", "-C", str(outside), "rev-parse", "--git-dir"], capture_output=True).returncode == 0
    record = provenance("cpu")
    assert record["adakv_commit"] is None and record["adakv_dirty"] is None
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))  # no git at all: still no failure
    assert provenance("cpu")["adakv_commit"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_asked_without_cuda_does_not_fail():
    assert provenance()["device"] == "cpu" and provenance()["gpu"] is None
    record = provenance("cuda")
    assert set(record) == KEYS and record["gpu"] is None
    assert provenance(torch.device("cpu"))["device"] == "cpu"


def test_benchmark_meta_holds_the_provenance():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_decode_limit", ROOT / "benchmarks" / "bench_decode_limit.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    meta = bench.run_meta(2, 3e12, 2**30, device="cpu")
    assert KEYS <= set(meta)
    assert meta["device"] == "cpu" and meta["gpu"] is None
    assert meta["layers"] == 2 and meta["copy_bandwidth_tb_s"] == 3.0 and meta["weight_gib"] == 1.0
    assert meta["command"] == shlex.join(["python", *sys.argv])
    assert meta["adakv_commit"] == provenance("cpu")["adakv_commit"]


def test_run_folder_records_every_run(tmp_path):
    out = str(tmp_path / "run")
    prepare_run_folder(out, SweepConfig(samples=1))
    first = json.loads((tmp_path / "run" / "config.json").read_text())
    assert first["samples"] == 1 and len(first["provenance"]) == 1 and set(first["provenance"][0]) == RUN_KEYS
    assert first["provenance"][0]["device"] == "cpu"
    prepare_run_folder(out, SweepConfig(samples=2), device=torch.device("cpu"))  # a resumed run: one more entry
    second = json.loads((tmp_path / "run" / "config.json").read_text())
    assert second["samples"] == 2 and second["provenance"][0] == first["provenance"][0]
    assert len(second["provenance"]) == 2 and set(second["provenance"][1]) == RUN_KEYS
    assert [run["asked"]["samples"] for run in second["provenance"]] == [1, 2]


def test_each_run_entry_says_its_seed_and_what_it_asked(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    monkeypatch.setattr(sys, "argv", ["adakv-eval", "run", "--seed", "5", "--out", out])
    prepare_run_folder(out, SweepConfig(samples=3, seed=5, presses=["none", "snapkv"], ratios=[0.5]))
    prepare_run_folder(out, SweepConfig(samples=3, seed=5, presses=["none", "pyramidkv"], ratios=[0.75]))
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    first, second = written["provenance"]
    assert first["seed"] == second["seed"] == 5 and written["seed"] == 5
    assert first["asked"]["presses"] == ["none", "snapkv"] and first["asked"]["ratios"] == [0.5]
    assert second["asked"]["presses"] == ["none", "pyramidkv"] and second["asked"]["ratios"] == [0.75]
    assert written["presses"] == ["none", "snapkv", "pyramidkv"] and written["ratios"] == [0.5, 0.75]
    assert first["command"] == f"python adakv-eval run --seed 5 --out {out}"
    assert first["torch"] == torch.__version__ and first["transformers"] == transformers.__version__
    assert first["asked"]["cuda_graphs"] is False and first["asked"]["fused_decode"] is False


def test_run_folder_written_before_provenance_resumes(tmp_path):
    old = asdict(SweepConfig())
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = prepare_run_folder(str(tmp_path), SweepConfig(samples=7))
    written = json.loads((tmp_path / "config.json").read_text())
    assert config.samples == 7 and written["samples"] == 7 and len(written["provenance"]) == 1
    assert {k: written[k] for k in old if k != "samples"} == {k: v for k, v in old.items() if k != "samples"}


def test_a_copy_without_git_takes_the_declared_commit(tmp_path, monkeypatch):
    outside = tmp_path / "copy" / "adakv"
    outside.mkdir(parents=True)
    (outside / "__init__.py").write_text("")
    monkeypatch.setattr(module, "PACKAGE", outside)  # a working tree copied to a GPU machine, without .git
    monkeypatch.setenv("ADAKV_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    record = provenance("cpu")
    assert record["adakv_commit"] == "0123456789abcdef0123456789abcdef01234567" and record["adakv_dirty"] is None


@needs_git
def test_the_declared_commit_wins_over_the_checkouts(monkeypatch):
    """A GPU machine's copy of the tree may hold an older commit's .git with the sent tree as changes."""
    monkeypatch.setenv("ADAKV_COMMIT", "fedcba9876543210fedcba9876543210fedcba98")
    record = provenance("cpu")
    assert record["adakv_commit"] == "fedcba9876543210fedcba9876543210fedcba98" and record["adakv_dirty"] is None
