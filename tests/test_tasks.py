"""Tests for mola_search.tasks: real-data splits and verbalizers, custom YAML tasks,
instruction data, error messages and the seeded validation carve.

Real data: $MOLA_DATA_DIR, else ../shared/data next to the repository; the
real-data tests skip (with the path) when neither exists.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from mola_search.errors import UserError
from mola_search.tasks import ANSWER_MARKER, SPLITS, TASKS, Example, TaskData, load_task

DATA_DIR = Path(os.environ.get("MOLA_DATA_DIR") or Path(__file__).parents[1].parent / "shared" / "data")
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "mrpc" / "train.jsonl").is_file(),
    reason=f"real data not found at {DATA_DIR} (set MOLA_DATA_DIR or place shared/data next to the repo)",
)

# task -> (train + validation after carving, test, number of choices, README balance check)
EXPECTED = {
    "mrpc": (3668 + 408, 1725, 2),
    "rte": (2490, 277, 2),
    "cola": (8551, 1043, 2),
    "scienceqa": (400, 200, None),
    "commonsenseqa": (9741, 1221, 5),
    "openbookqa": (4957 + 500, 500, 4),
}
SHIPPED_VALIDATION = {"mrpc": 408, "scienceqa": 200, "openbookqa": 500}
CARVED_VALIDATION = {"rte": 249, "cola": 500, "commonsenseqa": 500}


@pytest.fixture(scope="module")
def tasks() -> dict[str, TaskData]:
    if not (DATA_DIR / "mrpc" / "train.jsonl").is_file():
        pytest.skip(f"real data not found at {DATA_DIR}")
    return {name: load_task(name, DATA_DIR) for name in TASKS}


def _key(ex: Example) -> object:
    """Row identity for disjointness checks: GLUE idx, QA id, else the prompt itself."""
    return ex.meta.get("idx", ex.meta.get("id", ex.prompt))


# --- real data ---------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("name", TASKS)
def test_split_sizes_and_disjointness(tasks: dict[str, TaskData], name: str) -> None:
    td = tasks[name]
    train_plus_val, test, _ = EXPECTED[name]
    sizes = {split: len(td.splits[split]) for split in SPLITS}
    assert tuple(td.splits) == SPLITS
    assert sizes["train"] + sizes["validation"] == train_plus_val
    assert sizes["test"] == test
    expected_val = SHIPPED_VALIDATION.get(name) or CARVED_VALIDATION[name]
    assert sizes["validation"] == expected_val
    if name in CARVED_VALIDATION:
        assert any("carved" in note and "seed 0" in note for note in td.notes)
        assert any(note.startswith("test = official validation") for note in td.notes)
    if name != "scienceqa":  # ScienceQA rows have no id; its splits are disjoint by construction
        train_keys = {_key(ex) for ex in td.splits["train"]}
        assert not train_keys & {_key(ex) for ex in td.splits["validation"]}
    assert td.source == str(DATA_DIR / name)


@needs_data
@pytest.mark.parametrize("name", TASKS)
def test_labels_choices_and_prompts(tasks: dict[str, TaskData], name: str) -> None:
    td = tasks[name]
    n_choices = EXPECTED[name][2]
    for split in SPLITS:
        for ex in td.splits[split]:
            assert ex.prompt.endswith("\n" + ANSWER_MARKER)
            assert all(c.startswith(" ") and len(c.split()) == 1 for c in ex.choices)
            assert 0 <= ex.label < len(ex.choices)
            assert ex.target is None
            if n_choices is not None:
                assert len(ex.choices) == n_choices
            else:
                assert 2 <= len(ex.choices) <= 4
                assert ex.choices == tuple(" " + c for c in "ABCD"[: len(ex.choices)])
    # every label value actually occurs in train (no constant-label bug)
    assert len({ex.label for ex in td.splits["train"]}) == (n_choices or 4)


@needs_data
def test_known_rows(tasks: dict[str, TaskData]) -> None:
    mrpc = tasks["mrpc"].splits["train"][0]  # Amrozi pair, label 1 = paraphrase
    assert mrpc.prompt.startswith("Tell me if the two sentences are equivalent (paraphrases).\nSentence 1: Amrozi")
    assert "\nSentence 2: Referring to him" in mrpc.prompt
    assert mrpc.choices == (" no", " yes") and mrpc.answer == " yes"
    assert tasks["mrpc"].splits["train"][1].answer == " no"  # Yucaipa pair, label 0

    rte_test = tasks["rte"].splits["test"]
    assert rte_test[0].meta["idx"] == 0 and rte_test[0].answer == " no"  # Reeve: label 1 = not entailed
    assert rte_test[1].answer == " yes"  # antibiotics: label 0 = entailment
    assert rte_test[0].prompt.startswith("Does sentence 1 entail sentence 2?\n")

    cola_test = tasks["cola"].splits["test"]
    assert cola_test[0].answer == " yes" and cola_test[4].answer == " no"
    assert "Sentence: As you eat the most, you want the least." in cola_test[4].prompt

    csqa = tasks["commonsenseqa"].splits["test"][0]  # revolving door -> bank (A)
    assert csqa.answer == " A" and "\nA. bank\n" in csqa.prompt and "\nE. new york\nAnswer:" in csqa.prompt

    obqa = tasks["openbookqa"].splits["train"][0]  # "The sun is responsible for" -> D
    assert obqa.answer == " D" and obqa.meta["id"] == "7-980"
    assert "Question: The sun is responsible for\nA. puppies" in obqa.prompt

    sqa = tasks["scienceqa"].splits["train"][0]  # Logan's blue eyes, answer A, with hint
    assert sqa.answer == " A" and sqa.choices == (" A", " B")
    assert "\nContext: Read the description of a trait.\nLogan has blue eyes.\nQuestion: " in sqa.prompt
    assert sqa.meta["topic"] == "biology"


@needs_data
def test_majority_baseline(tasks: dict[str, TaskData]) -> None:
    assert tasks["mrpc"].majority_baseline("validation") == pytest.approx(279 / 408)  # 0.684
    assert tasks["mrpc"].majority_baseline("test") == pytest.approx(1147 / 1725)
    assert tasks["cola"].majority_baseline("test") == pytest.approx(721 / 1043)
    sample = tasks["mrpc"].splits["test"][:10]  # the subsample a run scored: counted on it, label from train
    assert tasks["mrpc"].majority_baseline("test", sample) == sum(ex.label == 1 for ex in sample) / 10
    with pytest.raises(UserError, match="unknown split"):
        tasks["mrpc"].majority_baseline("dev")


@needs_data
def test_env_data_dir_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOLA_DATA_DIR", str(DATA_DIR))
    assert load_task("RTE").source == str(DATA_DIR / "rte")


@needs_data
def test_carve_is_seeded(tasks: dict[str, TaskData]) -> None:
    again = load_task("rte", DATA_DIR, val_seed=0)
    other = load_task("rte", DATA_DIR, val_seed=1)
    ids = lambda td, split: [ex.meta["idx"] for ex in td.splits[split]]  # noqa: E731
    assert ids(again, "validation") == ids(tasks["rte"], "validation")
    assert ids(again, "train") == ids(tasks["rte"], "train")
    assert ids(other, "validation") != ids(again, "validation")
    assert len(ids(other, "validation")) == 249
    assert ids(other, "test") == ids(again, "test")  # test never depends on the seed
    assert sorted(ids(other, "train") + ids(other, "validation")) == list(range(2490))
    assert any("seed 1" in note for note in other.notes)


@needs_data
def test_instruct_folder() -> None:
    td = load_task(f"instruct:{DATA_DIR / 'instruct'}")
    assert [len(td.splits[s]) for s in SPLITS] == [4798, 200, 200]
    assert any("skipped 2 rows with an empty output" in note for note in td.notes)
    assert any(note.startswith("test = validation") for note in td.notes)
    assert td.is_generative and math.isnan(td.majority_baseline("test"))
    ex = td.splits["train"][1]  # "Arrange the following musical notes", input "G, B, E"
    assert ex.choices == () and ex.label == -1 and ex.answer == " E, G, B"
    assert "### Instruction:\nArrange the following musical notes\n\n### Input:\nG, B, E\n\n" in ex.prompt
    assert ex.prompt.endswith("### Response:")
    no_input = td.splits["validation"][0]
    assert "### Input:" not in no_input.prompt and no_input.prompt.endswith("### Response:")
    # a relative reference is resolved under the data dir too
    assert len(load_task("instruct:instruct", DATA_DIR).splits["validation"]) == 200


# --- errors -------------------------------------------------------------------------------


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(UserError) as err:
        load_task("sst2")
    msg = str(err.value)
    assert "sst2" in msg and all(t in msg for t in TASKS)
    assert "custom:" in msg and "instruct:" in msg and "\n" not in msg


def test_missing_data_offline_is_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_task("mrpc", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "mrpc" / "train.jsonl") in msg and "does not exist" in msg
    assert "Hugging Face Hub is unreachable" in msg and "HF_HUB_OFFLINE" in msg
    assert "`data_dir`" in msg and "MOLA_DATA_DIR" in msg  # the CLI shows it as --data-dir (test_errors)
    assert err.value.__cause__ is None and err.value.__suppress_context__

    monkeypatch.delenv("MOLA_DATA_DIR", raising=False)
    with pytest.raises(UserError, match="no data dir was given and the Hugging Face Hub is unreachable"):
        load_task("openbookqa")
    with pytest.raises(UserError, match="not a local file or folder"):
        load_task("instruct:no/such/thing")


def test_example_invariants() -> None:
    with pytest.raises(ValueError):
        Example("p", (" no", " yes"), 2)
    with pytest.raises(ValueError):
        Example("p", (), 0, target=" x")
    ex = Example("p", [" a", " b"], 1, meta={"k": 1})  # type: ignore[arg-type]
    assert ex.choices == (" a", " b") and hash(ex) == hash(Example("p", (" a", " b"), 1))


# --- custom YAML tasks ----------------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _yaml(tmp_path: Path, body: str) -> str:
    path = tmp_path / "task.yaml"
    path.write_text(body, encoding="utf-8")
    return f"custom:{path}"


SENTIMENT = """\
name: sentiment
files: {{train: data/train.jsonl, validation: data/val.jsonl{test}}}
template: "Review: {{text}}\\nIs the review positive?\\nAnswer:"
label_field: label
label_words: {words}
"""


@pytest.fixture()
def sentiment_dir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(40)]
    _jsonl(tmp_path / "data" / "train.jsonl", rows)
    _jsonl(tmp_path / "data" / "val.jsonl", rows[:6])
    _jsonl(tmp_path / "data" / "test.jsonl", rows[:4])
    return tmp_path


def test_custom_label_words_happy_path(sentiment_dir: Path) -> None:
    ref = _yaml(sentiment_dir, SENTIMENT.format(test=", test: data/test.jsonl", words='["no", " yes"]'))
    td = load_task(ref)
    assert td.name == "sentiment" and [len(td.splits[s]) for s in SPLITS] == [40, 6, 4]
    ex = td.splits["train"][1]
    assert ex.prompt == "Review: review 1\nIs the review positive?\nAnswer:"
    assert ex.choices == (" no", " yes") and ex.answer == " yes"  # leading space added to "no"


def test_custom_mapping_words_and_carve(sentiment_dir: Path) -> None:
    ref = _yaml(sentiment_dir, SENTIMENT.format(test="", words='{0: " bad", 1: " good"}'))
    td = load_task(ref, val_seed=3)
    assert [len(td.splits[s]) for s in SPLITS] == [36, 4, 6]  # 10% of 40 carved; val file = test
    assert any("no test file given" in n for n in td.notes) and any("seed 3" in n for n in td.notes)
    assert td.splits["test"][0].choices == (" bad", " good")


def test_custom_options_happy_path(tmp_path: Path) -> None:
    rows = [
        {"q": "2+2?", "opts": ["3", "4", "5"], "ans": "B"},
        {"q": "Sky?", "opts": ["blue", "green"], "ans": 0},
    ]
    for split in ("train", "val"):
        _jsonl(tmp_path / f"{split}.jsonl", rows)
    ref = _yaml(
        tmp_path,
        'name: qa\nfiles: {train: train.jsonl, validation: val.jsonl, test: val.jsonl}\n'
        'template: "Question: {q}\\n{options}\\nAnswer:"\noptions_field: opts\nanswer_field: ans\n',
    )
    first, second = load_task(ref).splits["train"]
    assert first.prompt == "Question: 2+2?\nA. 3\nB. 4\nC. 5\nAnswer:"
    assert first.choices == (" A", " B", " C") and first.answer == " B"
    assert second.choices == (" A", " B") and second.answer == " A"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("name: x\ntemplate: 'T {text}'\nlabel_field: label\nlabel_words: [a, b]\n", "missing key 'files'"),
        (
            "name: x\nfiles: {train: data/train.jsonl, validation: data/val.jsonl}\n"
            "label_field: label\nlabel_words: [a, b]\n",
            "missing key 'template'",
        ),
        (
            "name: x\nfiles: {train: data/train.jsonl}\ntemplate: 'T {text}'\n"
            "label_field: label\nlabel_words: [a, b]\n",
            "missing key 'validation'",
        ),
        (
            "name: x\nfiles: {train: data/train.jsonl, validation: data/val.jsonl}\n"
            "template: 'T {review}'\nlabel_field: label\nlabel_words: [a, b]\n",
            "template field 'review' is not in the data",
        ),
        (
            "name: x\nfiles: {train: data/train.jsonl, validation: data/val.jsonl}\n"
            "template: 'T {text}'\nlabel_field: label\nlabel_words: {0: a, 2: b}\n",
            "label value 1 is not in label_words",
        ),
        (
            "name: x\nfiles: {train: data/nope.jsonl, validation: data/val.jsonl}\n"
            "template: 'T {text}'\nlabel_field: label\nlabel_words: [a, b]\n",
            "train file .*nope.jsonl does not exist",
        ),
        (
            "name: x\nfiles: {train: data/train.jsonl, validation: data/val.jsonl}\n"
            "template: 'T {text}'\n",
            "either label_field \\+ label_words or options_field \\+ answer_field",
        ),
        (
            "name: x\nfiles: {train: data/train.jsonl, validation: data/val.jsonl}\n"
            "template: 'T {text}'\noptions_field: text\nanswer_field: label\n",
            "must contain \\{options\\}",
        ),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_custom_errors(sentiment_dir: Path, body: str, match: str) -> None:
    with pytest.raises(UserError, match=match) as err:
        load_task(_yaml(sentiment_dir, body))
    assert "\n" not in str(err.value)


def test_custom_missing_yaml(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_task(f"custom:{tmp_path / 'absent.yaml'}")
    with pytest.raises(UserError, match="needs a path"):
        load_task("custom:")


# --- instruction data from a single file ------------------------------------------------------


def test_instruct_single_file_carves_validation(tmp_path: Path) -> None:
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(30)]
    rows.append({"instruction": "Empty.", "input": "", "output": "  "})
    _jsonl(tmp_path / "alpaca.jsonl", rows)
    td = load_task(f"instruct:{tmp_path / 'alpaca.jsonl'}")
    assert [len(td.splits[s]) for s in SPLITS] == [27, 3, 3]
    assert td.splits["test"] == td.splits["validation"]
    assert any("skipped 1 rows" in n for n in td.notes)
    _jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(UserError, match="needs 'instruction' and 'output'"):
        load_task(f"instruct:{tmp_path / 'bad.jsonl'}")


# --- Hub path (faked: no network here) ---------------------------------------------------------


@pytest.fixture()
def fake_hub(monkeypatch: pytest.MonkeyPatch):
    """Route `datasets.load_dataset` to an in-memory DatasetDict; returns the call log."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("MOLA_DATA_DIR", raising=False)
    monkeypatch.setattr("mola_search.hub.offline_reason", lambda: None)  # pretend the Hub is reachable
    calls: list[tuple] = []

    def install(result) -> list[tuple]:
        def load_dataset(path, name=None, **kwargs):
            calls.append((path, name))
            if isinstance(result, Exception):
                raise result
            return result

        monkeypatch.setattr(datasets, "load_dataset", load_dataset)
        return calls

    return install


def test_hub_glue_hidden_test_labels(fake_hub) -> None:
    from datasets import Dataset, DatasetDict

    def rows(n: int, label: int | None = None) -> Dataset:
        return Dataset.from_list(
            [{"sentence1": f"a{i}", "sentence2": f"b{i}", "label": i % 2 if label is None else label, "idx": i}
             for i in range(n)]
        )

    calls = fake_hub(DatasetDict(train=rows(50), validation=rows(8), test=rows(7, label=-1)))
    td = load_task("mrpc")
    assert calls == [("nyu-mll/glue", "mrpc")]
    assert td.source == "hf://nyu-mll/glue/mrpc"
    assert [len(td.splits[s]) for s in SPLITS] == [45, 5, 8]  # hidden test dropped -> validation is test
    assert any("loaded from the Hugging Face Hub" in n for n in td.notes)


def test_hub_scienceqa_text_only(fake_hub) -> None:
    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

    png = bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
    )
    feats = Features({"image": Image(), "question": Value("string"), "choices": Sequence(Value("string")),
                      "answer": Value("int64"), "hint": Value("string"), "topic": Value("string")})

    def rows(n: int) -> Dataset:
        return Dataset.from_list(
            [{"image": {"bytes": png, "path": None} if i % 3 == 0 else None, "question": f"q{i}",
              "choices": ["x", "y", "z"], "answer": i % 3, "hint": "", "topic": "physics"} for i in range(n)],
            features=feats,
        )

    fake_hub(DatasetDict(train=rows(30), validation=rows(9), test=rows(9)))
    td = load_task("scienceqa")
    assert [len(td.splits[s]) for s in SPLITS] == [20, 6, 6]  # every third row had an image
    ex = td.splits["train"][0]  # row 1: answer index 1 -> " B"
    assert ex.answer == " B" and "Context:" not in ex.prompt and ex.meta["topic"] == "physics"


def test_hub_errors_are_one_line(fake_hub) -> None:
    fake_hub(ConnectionError("Couldn't reach huggingface.co\nTraceback-ish detail"))
    with pytest.raises(UserError) as err:
        load_task("cola")
    msg = str(err.value)
    assert "\n" not in msg and "ConnectionError: Couldn't reach huggingface.co" in msg
    assert "no data dir was given" in msg and "nyu-mll/glue (cola)" in msg
