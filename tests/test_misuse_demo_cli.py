"""`adakv demo` (and `python -m adakv`) refuses a wrong value with one line on stderr and exit status 2, never a
torch traceback (issue 22): a device that is not one or is not there, repeated ratios, a context longer than the
essays or than SmolLM2 reads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from adakv.apps.cli import main as cli_main
from adakv.apps.devices import check_device


def refusal(capsys, *arguments: str) -> str:
    """The one line `adakv demo ARGUMENTS` writes on stderr when it exits with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", *arguments])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adakv demo: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


@pytest.mark.parametrize("device", ["bogus", "gpu", "cuda:x", ""])
def test_a_word_that_is_not_a_device_is_refused(capsys, device):
    line = refusal(capsys, "--device", device)
    assert f"--device {device!r} is not a device; use cpu or cuda" in line


def test_a_device_kind_the_demo_does_not_run_on_is_refused(capsys):
    assert "run on cpu or cuda (cuda:N for the N-th GPU), not meta" in refusal(capsys, "--device", "meta")


def test_a_gpu_that_is_not_there_is_refused(capsys):
    line = refusal(capsys, "--device", "cuda:99")
    expected = "CUDA is not available here" if not torch.cuda.is_available() else "this machine has"
    assert "--device 'cuda:99'" in line and expected in line


def test_repeated_ratios_are_refused(capsys):
    assert "--ratios names 0.5 more than once" in refusal(capsys, "--ratios", "0.5", "0.75", "0.5")


def test_earlier_checks_still_end_in_one_line(capsys):
    assert "--depth must be in [0, 1], got 1.5" in refusal(capsys, "--depth", "1.5")
    assert "--ratios must be in (0, 1), got 1.0" in refusal(capsys, "--ratios", "1.0")


def test_check_device_takes_what_the_machine_has():
    assert check_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert check_device("cuda:0") == torch.device("cuda:0")


def test_python_dash_m_adakv_prints_one_line_and_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "adakv", "demo", "--device", "bogus"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "adakv demo: error: --device 'bogus' is not a device; use cpu or cuda (cuda:N for the N-th GPU)."


@pytest.mark.slow
def test_a_context_longer_than_smollm2_reads_is_refused_after_loading_it(capsys):
    """In the default cache folder, as the demo itself uses it (converted there on the first run, which prints
    its progress on stderr before the error line)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--context-length", "9000"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "adakv demo: error: --context-length 9000: SmolLM2 reads at most 8192 positions, and the template, "
        "question and answer need about 64; use at most 8128."
    )


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"device": "bogus"}, ValueError, r"load_default_model: device 'bogus' is not a device"),
        ({"device": "meta"}, ValueError, r"the default model runs on cpu, cuda, mps, xpu, not meta"),
        ({"dtype": "half-ish"}, TypeError, r"dtype must be a floating torch.dtype.*got 'half-ish'"),
        ({"dtype": torch.int8}, TypeError, r"dtype must be a floating torch.dtype"),
        ({"attn_implementation": "flash_attention_2"}, ValueError, r"attn_implementation must be one of \('sdpa', 'eager'\)"),
    ],
)
def test_load_default_model_checks_its_arguments_before_loading(arguments, error, message, monkeypatch):
    from adakv.apps import default_model

    monkeypatch.setattr(default_model, "convert_default_model", lambda *a: pytest.fail("a model was converted"))
    monkeypatch.setattr(default_model, "default_model_folder", lambda: pytest.fail("a model was looked for"))
    with pytest.raises(error, match=message):
        default_model.load_default_model(**arguments)
