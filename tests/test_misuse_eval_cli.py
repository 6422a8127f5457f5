"""Misuse of `adakv-eval` ends in a clear error (exit status 2, what was wrong and what is allowed), never in a
raw FileExistsError / FileNotFoundError / hub-connection traceback; nothing tries to reach a model hub."""

from __future__ import annotations

import json

import pytest

from adakv.evaluation.cli import main as cli_main
from adakv.evaluation.models import SPLIT_MODELS
from adakv.evaluation.report import check_run_folder
from adakv.evaluation.runner import check_model_name, load_model


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Any attempt to load through transformers' from_pretrained fails the test (it could reach the hub)."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"from_pretrained called with {args} {kwargs}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_args(out, *extra):
    return ["run", "--presses", "none", "--tasks", "niah_single", "--context-length", "64", "--samples", "1",
            "--out", str(out), "--quiet", *extra]


def test_run_out_pointing_at_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    assert cli_main(run_args(target)) == 2
    err = capsys.readouterr().err
    assert "adakv-eval run: error:" in err and "is an existing file" in err and "run folder" in err
    assert "Traceback" not in err and target.read_text() == "keep me"


def test_run_out_below_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert cli_main(run_args(tmp_path / "f" / "run")) == 2
    err = capsys.readouterr().err
    assert "adakv-eval run: error:" in err and "cannot be created" in err and "is a file, not a folder" in err


def test_run_out_with_an_unreadable_config_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{not json")
    assert cli_main(run_args(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "is not a readable run config" in err and "another --out folder" in err


def test_report_on_a_missing_folder_is_refused(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "adakv-eval report: error:" in err and "does not exist" in err and "adakv-eval run --out" in err
    assert not (tmp_path / "missing").exists()


def test_report_on_a_file_or_a_folder_without_results_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli_main(["report", str(tmp_path / "file")]) == 2
    assert "is a file, not a run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no results.csv" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "summary.md").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.csv").write_text("a,b\n1,2\n")
    assert cli_main(["report", str(tmp_path / "other")]) == 2
    assert "lacks the column(s)" in capsys.readouterr().err
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "results.csv").write_text("")
    with pytest.raises(ValueError, match="not a results table"):
        check_run_folder(str(tmp_path / "blank"))


def test_report_on_a_run_folder_still_works(tmp_path, capsys):
    rows = "task,context_length,sample,press,ratio,score,answer,expected,depth,context_tokens,seconds\n"
    rows += "niah_single,64,0,none,0.0,1.0,x,\"[\"\"x\"\"]\",,60,0.1\n"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.csv").write_text(rows)
    assert cli_main(["report", str(tmp_path / "run")]) == 0
    assert "Score by press and compression ratio" in capsys.readouterr().out


def test_unknown_model_is_refused_listing_the_known_names(tmp_path, capsys):
    assert cli_main(run_args(tmp_path / "x", "--model", "smollm3-9000")) == 2
    err = capsys.readouterr().err
    assert "adakv-eval run: error: Unknown model 'smollm3-9000'" in err
    assert "Known: smollm2, " + ", ".join(SPLIT_MODELS) in err and "nothing is downloaded" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()
    # a hub-style id not in the local cache: refused the same way, without a connection attempt
    assert cli_main(run_args(tmp_path / "x", "--model", "HuggingFaceTB/no-such-model")) == 2
    assert "Unknown model 'HuggingFaceTB/no-such-model'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_model_folder_without_config_and_model_file_are_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="holds no config.json"):
        check_model_name(str(tmp_path / "folder"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_model(str(tmp_path / "weights.bin"), "cpu")
    with pytest.raises(ValueError, match="non-empty string"):
        check_model_name("")


def test_known_names_pass_the_model_check(tmp_path):
    check_model_name("smollm2")
    for name in SPLIT_MODELS:
        check_model_name(name)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    check_model_name(str(tmp_path / "hf"))


@pytest.mark.parametrize("option, value, message", [
    ("--ratios", "0.5,half", "--ratios takes numbers"),
    ("--context-length", "64,long", "--context-length takes integers"),
    ("--threads", "0", "--threads must be >= 1"),
])
def test_bad_numbers_name_the_option(tmp_path, capsys, option, value, message):
    assert cli_main(run_args(tmp_path / "x", option, value)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_files_of_the_model_commands_are_clear_errors(tmp_path, capsys):
    assert cli_main(["split-gguf", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "adakv-eval split-gguf: error:" in err and "none.gguf" in err and "Traceback" not in err


@pytest.mark.parametrize("device, message", [
    ("bogus", "--device 'bogus' is not a device; use cpu or cuda"),
    ("meta", "run on cpu or cuda (cuda:N for the N-th GPU), not meta"),
    ("cuda:99", "--device 'cuda:99': "),
])
def test_a_device_that_is_not_one_or_not_there_is_one_line(tmp_path, capsys, device, message):
    assert cli_main(run_args(tmp_path / "x", "--device", device)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("option, values, message", [
    ("--ratios", ["0.5", "0.5"], "ratios name 0.5 more than once"),
    ("--ratios", ["0.25,0.5,0.25"], "ratios name 0.25 more than once"),
    ("--presses", ["none", "snapkv", "snapkv"], "presses name snapkv more than once"),
    ("--tasks", ["niah_single", "niah_single"], "tasks name niah_single more than once"),
])
def test_a_point_named_twice_is_refused(tmp_path, capsys, option, values, message):
    arguments = run_args(tmp_path / "x")
    if option in arguments:  # replace the default value of the option
        at = arguments.index(option)
        arguments[at + 1 : at + 2] = values
    else:
        arguments += [option, *values]
    assert cli_main(arguments) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
