"""The sweep runner: every (task, sample, press, ratio) of a config, one row each in a run folder.

A run folder holds config.json (what the rows mean, and every run's provenance), results.csv (one row per
setting, appended after each sample, so an interrupted run resumes where it stopped), costs.csv (KV bytes,
peak memory and speed per context length, press and ratio: evaluation/costs.py), metrics.json and the reports.
Resuming into a folder written by a different config is refused.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import pandas as pd
import torch
from tqdm.auto import tqdm

from adakv.apps.provenance import provenance
from adakv.cache import kept_token_counts

from . import engine, registry, tasks
from .metrics import string_match
from .models import SPLIT_MODELS, model_folder

KEY_COLUMNS = ["task", "context_length", "sample", "press", "ratio"]
DEFAULT_MODEL = "smollm2"


@dataclass
class SweepConfig:
    """What a sweep computes. Fields in `EXECUTION_FIELDS` change how, not what, and may differ on
    resume. Fields in `EXTENDABLE_FIELDS` may differ too: a row depends on its own sample, press and ratio
    only, so a later run into the same folder can add samples, presses or ratios (the folder's config
    then lists everything it holds)."""

    model: str = DEFAULT_MODEL
    tasks: list[str] = field(default_factory=lambda: list(tasks.DEFAULT_TASKS))
    context_lengths: list[int] = field(default_factory=lambda: [1024])
    samples: int = 5
    presses: list[str] = field(default_factory=lambda: ["none", "snapkv", "adakv_snapkv"])
    ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    backend: str | None = None  # None: the presses' default (evict)
    kv_dtype: str | None = None  # the presses' kv_dtype; None: the model's dtype ("none" stays dense in it)
    seed: int = 0
    query_aware: bool = False
    dtype: str = "auto"
    device: str = "cpu"
    fast_path: bool = True
    check_naive: int = 3
    # decode the answers from CUDA graphs where the press allows it (evict backend); "emulate": CPU tests
    cuda_graphs: bool | str = False
    # join q/k/v and gate/up and fuse norms, rotary and SiLU gates in every answer's forwards (CUDA only)
    fused_decode: bool = False
    # measure each (context length, press, ratio)'s KV bytes, peak memory, prefill and decode time (costs.csv)
    costs: bool = True
    # answer every setting of a sample whose cache stacks (backend evict) in one batched decode (engine.py); the
    # answers are each setting's own, but batched products may round differently in bf16, so it is config
    batch_answers: bool = False

    EXECUTION_FIELDS = ("device", "fast_path", "check_naive", "costs")
    EXTENDABLE_FIELDS = ("samples", "presses", "ratios")

    def validate(self) -> None:
        tasks.check_task_names(self.tasks)
        registry.check_presses_available(self.presses)
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}.")
        if not self.context_lengths or min(self.context_lengths) < 32:
            raise ValueError(f"context lengths must be >= 32 tokens, got {self.context_lengths}.")
        bad = [r for r in self.ratios if not 0.0 <= r < 1.0]
        if bad or not self.ratios:
            raise ValueError(f"ratios must be in [0, 1), got {self.ratios}.")
        for what, values in (("presses", self.presses), ("ratios", self.ratios), ("tasks", self.tasks),
                             ("context lengths", self.context_lengths)):  # fmt: skip
            repeated = sorted({value for value in values if values.count(value) > 1}, key=str)
            if repeated:  # the same point twice would be counted as two samples (n = 2, a zero interval)
                raise ValueError(f"{what} name {', '.join(map(str, repeated))} more than once; give each once.")
        for press in self.presses:  # a bad backend, kv_dtype or press argument fails here, before any work
            self.build_press(press, self.ratios[0])
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
        if self.cuda_graphs not in (False, True, "emulate"):
            raise ValueError(f"cuda_graphs must be False, True or 'emulate', got {self.cuda_graphs!r}.")
        if self.cuda_graphs is True and not str(self.device).startswith("cuda"):
            raise ValueError(f"cuda_graphs needs a CUDA device, got device {self.device!r}.")
        if self.fused_decode is not False and (self.fused_decode is not True or not str(self.device).startswith("cuda")):
            raise ValueError(f"fused_decode must be a bool and needs a CUDA device, got {self.fused_decode!r} on {self.device!r}.")
        if self.batch_answers not in (False, True):
            raise ValueError(f"batch_answers must be a bool, got {self.batch_answers!r}.")
        if self.batch_answers and not self.fast_path:
            raise ValueError("batch_answers answers the settings of one dense prefill together: it needs the fast path.")

    def build_press(self, name: str, ratio: float):
        """The press `name` at `ratio` with this sweep's backend and kv_dtype (None for "none")."""
        return registry.build_press(name, ratio, self.backend, self.kv_dtype)

    def settings(self) -> list[tuple[str, float]]:
        """(press, ratio) pairs; "none" runs once, at ratio 0."""
        return [(press, 0.0) if press == registry.NO_PRESS else (press, ratio)
                for press in self.presses for ratio in (self.ratios if press != registry.NO_PRESS else [0.0])]

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in (*self.EXECUTION_FIELDS, *self.EXTENDABLE_FIELDS)}

    def extended_by(self, other: "SweepConfig") -> "SweepConfig":
        """This folder's config grown by a later run's samples, presses and ratios (identity unchanged)."""
        presses = self.presses + [press for press in other.presses if press not in self.presses]
        ratios = sorted(set(self.ratios) | set(other.ratios))
        return replace(other, samples=max(self.samples, other.samples), presses=presses, ratios=ratios)


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _in_hub_cache(name: str) -> bool:
    """Whether `name` is a model id already in the local Hugging Face cache (looked up on disk only)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id, or no huggingface_hub: not in the cache
        return False


def check_model_name(name: str) -> None:
    """Refuse, before any work and without any network, a `--model` that cannot be loaded: allowed are
    "smollm2", a name of `models.SPLIT_MODELS`, a local folder holding a Hugging Face model (config.json),
    or a model id already in the local Hugging Face cache (nothing is downloaded)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a non-empty string, got {name!r}.")
    if name == DEFAULT_MODEL or name in SPLIT_MODELS:
        return
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"Model folder {name!r} holds no config.json: not a Hugging Face model folder.")
        return
    if os.path.exists(path):
        raise ValueError(f"Model {name!r} is a file; give a Hugging Face model folder (with config.json).")
    if _in_hub_cache(name):
        return
    known = ", ".join([DEFAULT_MODEL, *SPLIT_MODELS])
    raise ValueError(f"Unknown model {name!r}: not a known name, not a local model folder and not in the local "
                     f"Hugging Face cache (nothing is downloaded). Known: {known}; or the path of a Hugging Face "
                     "model folder (with config.json).")


def check_out_folder(out: str) -> None:
    """Refuse, before any work, an `--out` that cannot be a run folder (an existing file, or a folder whose
    config.json is not a readable run config)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is an existing file; give a run folder (new, or one to resume).")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out!r} cannot be created: {parent!r} is a file, not a folder.")
    path = os.path.join(out, "config.json")
    if os.path.isdir(out) and os.path.lexists(path):
        try:
            with open(path) as handle:
                previous = json.load(handle)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path} is not a readable run config ({error}); use another --out folder.") from None
        if not isinstance(previous, dict):
            raise ValueError(f"{path} is not a run config (a JSON object); use another --out folder.")


def load_model(name: str, device: str, dtype: str = "auto"):
    """(model, tokenizer). "smollm2" is the embedded SmolLM2-135M-Instruct; a name of
    `models.SPLIT_MODELS` loads the folder `adakv-eval build-model NAME` converted; anything else goes to
    `from_pretrained` (a local folder or a model already in the Hugging Face cache)."""
    check_model_name(name)
    torch_dtype = DTYPES[dtype] or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    if name == DEFAULT_MODEL:
        from adakv.apps.default_model import load_default_model

        return load_default_model(device=device, dtype=torch_dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in SPLIT_MODELS:
        folder = model_folder(name)
        if not folder.is_dir():
            raise ValueError(f"Model {name!r} is not built yet ({folder} is missing): run `adakv-eval build-model {name}`.")
        name = str(folder)
    # a local folder or the local Hugging Face cache only: nothing may reach a model hub
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, attn_implementation="sdpa",
                                                 local_files_only=True)
    return model.to(device).eval(), tokenizer


def position_margin(length: int) -> int:
    """Positions a sample needs beyond its nominal context length: the generators overshoot by up to about 1%,
    and the question and the answer (at most 50 new tokens) come after the context."""
    return 256 + length // 100


def check_context_fits(model, context_lengths) -> None:
    """Refuse, before any work, a context length whose samples cannot fit the model's position window."""
    window = getattr(model.config, "max_position_embeddings", None)
    if window is None:
        return
    too_long = [length for length in context_lengths if length > window]
    if too_long:
        raise ValueError(f"Context length(s) {too_long} exceed the model's window of {window} tokens "
                         f"(max_position_embeddings).")
    tight = [length for length in context_lengths if length + position_margin(length) > window]
    if tight:
        raise ValueError(f"Context length(s) {tight} leave no room in the model's window of {window} tokens for the "
                         f"question and the answer (and the generators' overshoot of about 1%); use at most "
                         f"{max(n for n in range(window) if n + position_margin(n) <= window)} tokens.")


def prepare_run_folder(out: str, config: SweepConfig, device=None) -> SweepConfig:
    """Create the folder and config.json, or check that an existing one was written by a config of the
    same identity (then config.json lists the union of both runs' samples, presses and ratios).
    config.json's "provenance" lists every run into the folder, oldest first (`run_provenance`, on the
    config's device by default). Returns the folder's config (what config.json now says)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "config.json")
    folder_config = config
    runs = []
    if os.path.exists(path):
        with open(path) as handle:
            written = json.load(handle)
        runs = written.get("provenance", [])  # none in a folder written before provenance was recorded
        # a field added after the folder was written counts as its default there
        previous = SweepConfig(**{k: v for k, v in written.items() if k in SweepConfig.__dataclass_fields__})
        previous_identity, identity = previous.identity(), config.identity()
        differing = sorted(k for k in identity if previous_identity[k] != identity[k])
        if differing:
            details = "; ".join(f"{k}: folder has {previous_identity[k]!r}, asked {identity[k]!r}" for k in differing)
            raise ValueError(f"{out} holds a run with a different config ({details}). Use another --out folder, "
                             "or settings that differ only in samples, presses and ratios to resume or extend it.")
        folder_config = previous.extended_by(config)
    entry = run_provenance(config, config.device if device is None else device)
    with open(path, "w") as handle:
        json.dump(dict(asdict(folder_config), provenance=[*runs, entry]), handle, indent=2)
    return folder_config


def run_provenance(config: SweepConfig, device) -> dict:
    """`provenance(device)` of one run into a folder, plus what that run was asked: the sample seed, the
    samples, tasks, context lengths, presses and ratios, and the decode switches (a resumed or extended
    folder then says which run wrote which rows)."""
    asked = {key: getattr(config, key) for key in ("samples", "tasks", "context_lengths", "presses", "ratios",
                                                    "cuda_graphs", "fused_decode", "batch_answers", "dtype", "backend",
                                                    "kv_dtype")}
    return dict(provenance(device), seed=config.seed, asked=asked)


def copy_rows(source: str, out: str, config: SweepConfig, press: str) -> int:
    """Start the new run folder `out` of `config` with the rows of `press` that the run folder `source` holds for
    config's tasks, samples and context lengths, when `source` ran the same sweep but for its tasks (a row depends
    on its own task, sample, press and ratio only, so those rows are what `config` would compute: the task
    filter's "none" rows serve the sweep on the kept tasks). Its config.json names where they came from, first in
    its provenance. Returns the rows copied; 0, with nothing written, when `out` holds results already or
    `source` is not the same sweep."""
    if os.path.exists(os.path.join(out, "results.csv")) or not os.path.isfile(os.path.join(source, "config.json")):
        return 0
    with open(os.path.join(source, "config.json")) as handle:
        written = json.load(handle)
    previous = SweepConfig(**{k: v for k, v in written.items() if k in SweepConfig.__dataclass_fields__})
    if replace(previous, tasks=list(config.tasks)).identity() != config.identity() or press not in config.presses:
        return 0
    results = read_results(source)
    if results.empty:
        return 0
    rows = results[(results.press == press) & results.task.isin(config.tasks) & (results["sample"] < config.samples)
                   & results.context_length.isin(config.context_lengths)]
    if rows.empty:
        return 0
    os.makedirs(out, exist_ok=True)
    rows.to_csv(os.path.join(out, "results.csv"), index=False)
    entry = {"copied_rows": {"from": os.path.basename(os.path.abspath(source)), "press": press, "rows": len(rows),
                             "tasks": sorted(set(rows.task)), "source_provenance": written.get("provenance", [])}}
    with open(os.path.join(out, "config.json"), "w") as handle:
        json.dump(dict(asdict(config), provenance=[entry]), handle, indent=2)
    return len(rows)


def read_results(out: str) -> pd.DataFrame:
    path = os.path.join(out, "results.csv")
    return pd.read_csv(path, keep_default_na=False) if os.path.exists(path) else pd.DataFrame()


def _row_key(task, length, index, press, ratio) -> tuple:
    return (task, int(length), int(index), press, round(float(ratio), 6))


def done_keys(results: pd.DataFrame) -> set[tuple]:
    if results.empty:
        return set()
    return {_row_key(*row) for row in results[KEY_COLUMNS].itertuples(index=False)}


def _append_rows(out: str, rows: list[dict]) -> None:
    path = os.path.join(out, "results.csv")
    pd.DataFrame(rows).to_csv(path, mode="a", header=not os.path.exists(path), index=False)


class Timing:
    """Wall-clock totals of the fast path and of the naive loop on the settings checked both ways."""

    def __init__(self):
        self.prefills: list[float] = []
        self.fast: list[float] = []
        self.naive: list[float] = []
        self.fast_checked: list[float] = []  # the fast path's seconds on the settings also run naively
        self.mismatches: list[dict] = []
        self.checked = 0
        self.warm = False  # the first sample of each task is not timed: first uses compile and capture
        self.compress: list[float] = []  # batched answers: each batched setting's compression
        self.batched: list[tuple[int, float]] = []  # batched answers: (settings, seconds) of each sample's decodes

    def summary(self, settings_per_context: int) -> dict:
        """Mean seconds of the timed samples' phases; the comparison with the naive loop once settings were
        checked both ways. {} before any sample was timed."""
        if not (self.prefills and self.fast):
            return {}
        prefill = sum(self.prefills) / len(self.prefills)
        n = settings_per_context
        summary = {"dense_prefill_s": prefill, "fast_per_setting_s": sum(self.fast) / len(self.fast),
                   "settings_per_context": n}
        if self.batched:
            summary["batched_answers"] = {
                "samples": len(self.batched),
                "settings_per_sample": sum(count for count, _ in self.batched) / len(self.batched),
                "decode_s_per_sample": sum(seconds for _, seconds in self.batched) / len(self.batched),
                "compress_per_setting_s": sum(self.compress) / max(len(self.compress), 1),
            }
        if self.naive:
            naive = sum(self.naive) / len(self.naive)
            fast_checked = sum(self.fast_checked) / len(self.fast_checked)
            summary.update({
                "naive_per_setting_s": naive,
                "fast_per_setting_s_on_checked": fast_checked,
                # paired: both ways on the same settings (the checked ones), so cheap and costly presses do not mix
                "speedup": n * naive / (prefill + n * fast_checked),
                "settings_checked_both_ways": self.checked,
                "answer_mismatches": self.mismatches,
            })
        return summary


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(function, *args):
    """(result, seconds). On CUDA the device is synchronised at both ends, so that work queued by one timed
    call (a prefill's kernels) is not counted in the next one."""
    _synchronize()
    start = time.perf_counter()
    result = function(*args)
    _synchronize()
    return result, time.perf_counter() - start


def run_sample(model, tokenizer, config: SweepConfig, sample, todo, timing: Timing, device) -> list[dict]:
    """Answer one sample under every (press, ratio) in `todo`; return the result rows."""
    context_ids, question_ids = engine.encode_prompt(tokenizer, sample, device)
    window = getattr(model.config, "max_position_embeddings", None)
    total = context_ids.shape[1] + question_ids.shape[1] + sample.max_new_tokens
    if window is not None and total > window:
        raise ValueError(f"{sample.task} sample {sample.index} needs {total} positions; the model has {window}.")
    dense = None
    if config.fast_path:
        dense, seconds = _timed(engine.dense_prefill, model, context_ids)
        if timing.warm:
            timing.prefills.append(seconds)
    rows = []
    check_every = max(1, len(todo) // max(config.check_naive, 1))  # checks spread over the presses
    presses = [config.build_press(press_name, ratio) for press_name, ratio in todo]
    batched = _batched_answers(model, tokenizer, config, sample, dense, presses, question_ids, timing)
    for position, (press_name, ratio) in enumerate(todo):
        press = presses[position]
        if dense is not None:
            if position in batched:
                answer, seconds = batched[position]
            else:
                (answer, _), seconds = _timed(engine.fast_answer, model, tokenizer, dense, press, question_ids,
                                              sample.max_new_tokens, config.cuda_graphs, config.fused_decode)
            if timing.warm:
                timing.fast.append(seconds)
            if timing.checked < config.check_naive and timing.warm and position % check_every == 0:
                (naive, _), naive_seconds = _timed(engine.naive_answer, model, tokenizer, press, context_ids,
                                                   question_ids, sample.max_new_tokens, config.cuda_graphs, config.fused_decode)
                timing.naive.append(naive_seconds)
                timing.fast_checked.append(seconds)
                timing.checked += 1
                if naive != answer:
                    timing.mismatches.append({"task": sample.task, "sample": sample.index, "press": press_name,
                                              "ratio": ratio, "fast": answer, "naive": naive})
        else:
            (answer, _), seconds = _timed(engine.naive_answer, model, tokenizer, press, context_ids, question_ids,
                                          sample.max_new_tokens, config.cuda_graphs, config.fused_decode)
        rows.append({
            "task": sample.task, "context_length": sample.metadata["context_length"], "sample": sample.index,
            "press": press_name, "ratio": ratio, "score": string_match(answer, sample.answers),
            "answer": answer, "expected": json.dumps(sample.answers), "depth": sample.metadata.get("depth", ""),
            "context_tokens": context_ids.shape[1], "seconds": round(seconds, 4),
        })
    return rows


def _batched_answers(model, tokenizer, config: SweepConfig, sample, dense, presses, question_ids, timing: Timing) -> dict:
    """{position in `presses`: (answer, seconds)} of the settings answered in one batched decode
    (`engine.batched_fast_answers`; config.batch_answers and the fast path only). A row's seconds are its own
    compression plus its share of the batched decode. Settings that cannot join (`engine.batch_refusal`: "none",
    backend mask, compression during decoding) or whose cache did not stack are left to the caller."""
    if not config.batch_answers or dense is None:
        return {}
    positions = [position for position, press in enumerate(presses) if engine.batch_refusal(press, model) is None]
    if not positions:
        return {}
    answers, compress, decode = engine.batched_fast_answers(
        model, tokenizer, dense, [presses[p] for p in positions], question_ids, sample.max_new_tokens,
        config.cuda_graphs, config.fused_decode)  # fmt: skip
    answered = [(p, a, c) for p, a, c in zip(positions, answers, compress) if a is not None]
    if timing.warm and answered:
        timing.batched.append((len(answered), decode))
        timing.compress.extend(c for _, _, c in answered)
    share = decode / max(len(answered), 1)
    return {p: (a, c + share) for p, a, c in answered}


def run_sweep(config: SweepConfig, out: str, model=None, tokenizer=None, progress: bool = True,
              deadline: float | None = None) -> pd.DataFrame:
    """Run (or resume) the sweep into folder `out`; returns all its result rows.

    deadline: a `time.monotonic()` time by which the run should end (a device call's limit): no sample starts
    once the longest sample so far would end past it, and the costs, budgets and reports, which need every
    row, wait for a later run that finds them all (each costs row is measured only while there is time too).
    An interrupted run resumes where it stopped, as after any interruption."""
    config.validate()
    check_out_folder(out)
    if model is None or tokenizer is None:
        model, tokenizer = load_model(config.model, config.device, config.dtype)
    check_context_fits(model, config.context_lengths)
    folder_config = prepare_run_folder(out, config, device=next(model.parameters()).device)
    done = done_keys(read_results(out))
    settings = config.settings()
    # sample-major order, so that an interrupted run holds about as many samples of every task
    jobs = [(length, task, index) for length in config.context_lengths for index in range(config.samples)
            for task in config.tasks]
    remaining = sum(_row_key(task, length, index, *s) not in done for length, task, index in jobs for s in settings)
    haystack = tasks.Haystack(tokenizer)
    timing = Timing()
    device = next(model.parameters()).device
    pending = [job for job in jobs if any(_row_key(job[1], job[0], job[2], *s) not in done for s in settings)]
    longest, stopped = 0.0, False
    with tqdm(total=remaining, disable=not progress, desc="sweep", unit="answer") as bar:
        for position, (length, task, index) in enumerate(pending):
            if deadline is not None and time.monotonic() + longest > deadline:
                stopped = True
                break
            started = time.monotonic()
            todo = [s for s in settings if _row_key(task, length, index, *s) not in done]
            sample = tasks.generate(task, index, haystack, length, config.seed, config.query_aware)
            timing.warm = position >= min(len(config.tasks), len(pending) - 1)
            rows = run_sample(model, tokenizer, config, sample, todo, timing, device)
            _append_rows(out, rows)
            _save_timing(out, timing.summary(len(settings)))
            bar.update(len(rows))
            longest = max(longest, time.monotonic() - started)
    timing_summary = timing.summary(len(settings))
    _report_timing(timing_summary, progress)
    if stopped:
        if progress:
            print(f"Stopped at the deadline: {out} holds {len(read_results(out))} rows; run again to resume.")
        return read_results(out)
    if config.costs:  # this run's settings, as a user runs them (evaluation/costs.py)
        from .costs import record_costs

        record_costs(model, tokenizer, config, haystack, out, device, deadline)
        if deadline is not None and not costs_complete(config, out):
            return read_results(out)
    _record_budgets(model, tokenizer, folder_config, haystack, out, device)  # the folder's first adaptive press
    from .report import write_reports

    write_reports(out, timing=timing_summary or None)
    return read_results(out)


def costs_complete(config: SweepConfig, out: str) -> bool:
    """Whether out/costs.csv holds every (context length, press, ratio) of `config`."""
    from .costs import COST_KEYS, read_costs

    done = read_costs(out)
    seen = set() if done.empty else {(int(c), p, round(float(r), 6)) for c, p, r in done[COST_KEYS].itertuples(index=False)}
    return all((int(length), press, round(float(ratio), 6)) in seen
               for length in config.context_lengths for press, ratio in config.settings())


def _save_timing(out: str, summary: dict) -> None:
    """Keep the fast-path timing in metrics.json as soon as it exists (an interrupted run keeps it too)."""
    if not summary:
        return
    path = os.path.join(out, "metrics.json")
    metrics = {}
    if os.path.exists(path):
        with open(path) as handle:
            metrics = json.load(handle)
    metrics["fast_path_timing"] = summary
    with open(path, "w") as handle:
        json.dump(metrics, handle, indent=2, default=str)


def _report_timing(summary: dict, verbose: bool) -> None:
    if not summary or not verbose:
        return
    batched = summary.get("batched_answers")
    if batched:
        print(f"Batched answers: {batched['settings_per_sample']:.1f} settings per sample compressed in "
              f"{batched['compress_per_setting_s']:.3f} s each, then decoded together in "
              f"{batched['decode_s_per_sample']:.2f} s per sample.")
    if "speedup" not in summary:
        print(f"One prefill, many settings: dense prefill {summary['dense_prefill_s']:.2f} s, then "
              f"{summary['fast_per_setting_s']:.3f} s per setting.")
        return
    print(f"One prefill, many settings: dense prefill {summary['dense_prefill_s']:.2f} s, then "
          f"{summary['fast_per_setting_s']:.2f} s per setting; "
          f"on the {summary['settings_checked_both_ways']} settings timed both ways the naive loop took "
          f"{summary['naive_per_setting_s']:.2f} s per setting, the fast path "
          f"{summary['fast_per_setting_s_on_checked']:.2f} s. "
          f"Speedup for {summary['settings_per_context']} settings per context: {summary['speedup']:.2f}x.")
    if summary["answer_mismatches"]:
        print(f"WARNING: fast path and naive loop disagreed on {len(summary['answer_mismatches'])} answers: "
              f"{summary['answer_mismatches']}")


def _record_budgets(model, tokenizer, config: SweepConfig, haystack, out: str, device) -> None:
    """Per-head kept token counts of the first adaptive press, on the first sample, at the middle ratio."""
    adaptive = [p for p in config.presses if registry.PRESSES.get(p, ("", False))[1]]
    ratios = sorted(r for r in config.ratios if r > 0)
    if not adaptive or not ratios:
        return
    press_name, ratio = adaptive[0], ratios[len(ratios) // 2]
    sample = tasks.generate(config.tasks[0], 0, haystack, config.context_lengths[0], config.seed, config.query_aware)
    context_ids, _ = engine.encode_prompt(tokenizer, sample, device)
    press = config.build_press(press_name, ratio)
    engine.attach_tokenizer(press, tokenizer)
    dense = engine.dense_prefill(model, context_ids)
    with press(model):
        cache = engine.compressed_cache(dense, press)
        counts = kept_token_counts(cache)
    rows = [{"press": press_name, "ratio": ratio, "task": sample.task, "layer": layer, "head": head,
             "kept": int(kept[0, head]), "context_tokens": context_ids.shape[1]}
            for layer, kept in sorted(counts.items()) for head in range(kept.shape[1])]
    pd.DataFrame(rows).to_csv(os.path.join(out, "budgets.csv"), index=False)
