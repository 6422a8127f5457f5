"""Every figure the README quotes is the figure of the one results file it names (CPU only, no model).

The README's "Measured" section holds markdown tables. Each row names one results file in its last cell,
says what was measured in its first cell, and quotes numbers in the cells between. FIGURES below maps
each row's first cell to its file and to a function that reads, from that file, every number the row
quotes, in order and formatted as the README prints it. So the test fails when the README changes a
number, when the file does, when a row's label changes (its conditions: case, ratio, model, length),
when a row appears that FIGURES does not know or disappears, and when the README quotes a measured
figure (ms, s, GiB, MiB, TB/s, a speed-up or a percentage) in its prose, outside these tables.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MiB = 2**20

# a number as the README prints it ("4.83", "131,072", "1.94" of "1.94x", "97.8" of "97.8%"), or a failure
NUMBER = re.compile(r"out of memory|\d[\d,]*(?:\.\d+)?")
# a measured figure with its unit, which only the Measured tables may quote
FIGURE_WITH_UNIT = re.compile(
    r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(?:ms|s|GiB|MiB|KiB|GB|TB/s)(?![\w/])|(?<![\w.])\d+(?:\.\d+)?(?:x|%)(?!\w)"
)


def one(rows: list[dict], **match) -> dict:
    """The one row whose fields equal `match`."""
    hits = [row for row in rows if all(row.get(key) == value for key, value in match.items())]
    assert len(hits) == 1, f"{len(hits)} rows match {match}"
    return hits[0]


def f1(value: float) -> str:
    return f"{value:.1f}"


def f2(value: float) -> str:
    return f"{value:.2f}"


def f3(value: float) -> str:
    return f"{value:.3f}"


def tokens(count: int) -> str:
    return f"{count:,}"


def decode_case(batch: int, context: int):
    """KV GiB held (dense, press), dense eager ms, press graph ms and x limit, all four switches ms and x limit."""

    def read(data: dict) -> list[str]:
        assert data["meta"]["device"] == "NVIDIA H200" and data["meta"]["layers"] == 32
        rows = [row for row in data["rows"] if row["batch"] == batch and row["context"] == context]
        dense = one(rows, method="dense-eager")
        graph = one(rows, method="adaptive-snapkv-evict-graph", ratio=0.75)
        fastest = one(rows, method="adaptive-snapkv-evict-graph-joined-fused-gemv", ratio=0.75)
        return [
            f2(dense["kv_gib"]), f2(graph["kv_gib"]), f2(dense["decode_ms"]),
            f2(graph["decode_ms"]), f2(graph["ratio_to_limit"]),
            f2(fastest["decode_ms"]), f2(fastest["ratio_to_limit"]),
        ]  # fmt: skip

    return read


def compiled_dense(batch: int, context: int):
    def read(data: dict) -> list[str]:
        assert data["meta"]["device"] == "NVIDIA H200" and data["meta"]["layers"] == 32
        return [f2(one(data["rows"], batch=batch, context=context, method="dense-compiled")["decode_ms"])]

    return read


def cpu_decode(data: dict) -> list[str]:
    row = one(data["rows"], context=8192, ratio=0.5)
    assert data["machine"].endswith("2 torch threads")
    dense, evict = row["blocks"]["dense"], row["blocks"]["evict_segments"]
    assert len(dense) == len(evict)
    assert row["ms_per_step"]["dense"] == statistics.median(dense)  # "median of N blocks"
    assert row["ms_per_step"]["evict_segments"] == statistics.median(evict)
    return [f1(row["ms_per_step"]["dense"]), f1(row["ms_per_step"]["evict_segments"]), str(len(dense))]


def long_context_dense(data: dict) -> list[str]:
    assert data["meta"]["device"] == "NVIDIA H100 80GB HBM3" and data["meta"]["layers"] == 32
    fits = one(data["results"], method="dense", context=131072)
    fails = one(data["results"], method="dense", context=262144)
    return [tokens(fits["context"]), f2(fits["peak_gib"]), tokens(fails["context"]),
            "out of memory" if fails.get("error") == "OOM" else "ran"]  # fmt: skip


def long_context_chunked(device: str, context: int, with_time: bool):
    def read(data: dict) -> list[str]:
        assert data["meta"]["device"] == device and data["meta"]["layers"] == 32
        row = one(data["results"], method="ada_snapkv-evict-chunked", context=context)
        assert row["ratio"] == 0.875 and row["chunk_size"] == 32768
        figures = [tokens(row["context"]), f2(row["peak_gib"]), f2(row["kv_gib"])]
        return figures + [f1(row["prefill_s"])] if with_time else figures

    return read


def decoding_press(data: dict) -> list[str]:
    meta = data["meta"]
    assert (meta["device"], meta["layers"], meta["prompt"], meta["interval"], meta["target"]) == ("NVIDIA H200", 4, 32768, 512, 2048)
    press, dense = data["results"]["decoding-ada_snapkv-evict"][-1], data["results"]["dense"][-1]
    return [f1(press["kv_bytes"] / MiB), tokens(press["generated"]), f1(dense["kv_bytes"] / MiB), tokens(dense["generated"])]


def kvzip_scores(data: dict) -> list[str]:
    scores = data["by_press_ratio"]
    kvzip = one(scores, press="adakv_model_kvzip", ratio=0.75)
    snapkv = one(scores, press="snapkv", ratio=0.75)
    none = one(scores, press="none")
    assert kvzip["n"] == snapkv["n"] == none["n"]
    return [f3(kvzip["score"]), f3(snapkv["score"]), f3(none["score"]), f1(100 * kvzip["score"] / none["score"]), str(kvzip["n"])]


def kvzip_run(folder: str, context_length: int):
    def read(data: dict) -> list[str]:
        config = json.loads((ROOT / "evaluation" / "results" / folder / "config.json").read_text())
        assert config["model"] == "qwen2.5-coder-1.5b" and context_length in config["context_lengths"]
        assert not config.get("query_aware") and len(config["tasks"]) == 3  # query-agnostic, three needle tasks
        return kvzip_scores(data)

    return read


RESULTS = "benchmarks/results/"
FIGURES = {
    # first cell of the README row: (the results file it names, what its other cells quote)
    "1 x 32k": (RESULTS + "decode_limit_NVIDIA_H200_combine2.json", decode_case(1, 32768)),
    "1 x 128k": (RESULTS + "decode_limit_NVIDIA_H200_combine2.json", decode_case(1, 131072)),
    "8 x 32k": (RESULTS + "decode_limit_NVIDIA_H200_combine2_b8.json", decode_case(8, 32768)),
    "transformers' compiled dense decoding (StaticCache, `torch.compile` reduce-overhead), H200, 1 x 32k, an earlier run of the same benchmark":
        (RESULTS + "decode_limit_NVIDIA_H200_b1.json", compiled_dense(1, 32768)),
    "the same, 1 x 128k": (RESULTS + "decode_limit_NVIDIA_H200_b1.json", compiled_dense(1, 131072)),
    "the same, 8 x 32k": (RESULTS + "decode_limit_NVIDIA_H200_b8b.json", compiled_dense(8, 32768)),
    "CPU decode step, SmolLM2-135M at 8k tokens, 2 torch threads: dense / AdaptivePress(SnapKV) r = 0.5 evict":
        (RESULTS + "cpu_decode_smollm2.json", cpu_decode),
    "prefill on one H100 80 GB, dense": (RESULTS + "bench_long_context_NVIDIA_H100_80GB_HBM3.json", long_context_dense),
    "prefill on one H100 80 GB, chunked (32k chunks), AdaptivePress(SnapKV) r = 0.875 evict":
        (RESULTS + "bench_long_context_NVIDIA_H100_80GB_HBM3.json", long_context_chunked("NVIDIA H100 80GB HBM3", 524288, False)),
    "the same on one H200": (RESULTS + "bench_long_context_NVIDIA_H200_1M.json", long_context_chunked("NVIDIA H200", 1048576, True)),
    "KV held over a long generation, H200, 4 layers, 32k-token prompt: DecodingPress(AdaptivePress(SnapKV), 512, 2048) evict / dense":
        (RESULTS + "bench_decoding_press_NVIDIA_H200.json", decoding_press),
    "Qwen2.5-Coder-1.5B-Instruct, 4k tokens, query-agnostic, three needle tasks: score at ratio 0.75 of model-wide KVzip / uniform SnapKV / uncompressed":
        ("evaluation/results/qwen2.5-coder-1.5b_4k_h200/metrics.json", kvzip_run("qwen2.5-coder-1.5b_4k_h200", 4096)),
    "the same at 8k tokens":
        ("evaluation/results/qwen2.5-coder-1.5b_8k_h200/metrics.json", kvzip_run("qwen2.5-coder-1.5b_8k_h200", 8192)),
}  # fmt: skip


def measured_section(text: str) -> str:
    start = text.index("\n## Measured\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def measured_rows(section: str) -> dict[str, tuple[str, list[str]]]:
    """{first cell: (linked results file, numbers of the cells between)} of every body row of every table."""
    lines = section.splitlines()
    rows = {}
    for index, line in enumerate(lines):
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue  # not a table row, or a separator
        if index + 1 < len(lines) and lines[index + 1].startswith("|") and set(lines[index + 1]) <= set("|-: "):
            continue  # a header
        row = cells(line)
        link = re.fullmatch(r"\[[^\]]+\]\(([^)]+)\)", row[-1])
        assert link, f"the last cell of {row[0]!r} must link its results file, got {row[-1]!r}"
        assert row[0] not in rows, f"two rows are labelled {row[0]!r}"
        rows[row[0]] = (link.group(1), NUMBER.findall(" | ".join(row[1:-1]).replace("**", "")))
    return rows


def prose(text: str) -> str:
    """The README without fenced or indented code, inline code, and the Measured tables."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    section = measured_section(text)
    text = text.replace(section, "\n".join(line for line in section.splitlines() if not line.startswith("|")))
    lines = [line for line in text.splitlines() if not line.startswith("    ")]
    return re.sub(r"`[^`]*`", "", "\n".join(lines))


def test_measured_rows_are_the_ones_checked_here():
    rows = measured_rows(measured_section(README.read_text()))
    assert sorted(rows) == sorted(FIGURES), (
        f"rows only in the README: {sorted(set(rows) - set(FIGURES))}; rows only here: {sorted(set(FIGURES) - set(rows))}"
    )


@pytest.mark.parametrize("label", list(FIGURES))
def test_each_figure_equals_its_results_file(label):
    path, read = FIGURES[label]
    linked, quoted = measured_rows(measured_section(README.read_text()))[label]
    assert linked == path, f"{label!r} names {linked}, expected {path}"
    expected = read(json.loads((ROOT / path).read_text()))
    assert quoted == expected, f"{label!r}: the README quotes {quoted}, {path} gives {expected}"


def test_no_measured_figure_outside_the_measured_tables():
    found = FIGURE_WITH_UNIT.findall(prose(README.read_text()))
    assert not found, f"figures quoted outside the Measured tables (move them there, with their file): {found}"


def test_readme_links_resolve():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links {target}, which does not exist"


def test_readme_is_a_short_guide():
    assert len(README.read_text().splitlines()) <= 400
