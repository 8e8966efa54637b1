"""A task's examples in the official MoLA data layout (GCYZSL/MoLA), and back.

Read from the official code at commit 01785c84c70846999638b11b88409fdf86361d9a (`mola_training.py`,
`utils/prompter.py`, `templates/alpaca.json`, `preparation_scienceqa_data.py`, `evaluation_scienceqa.py`):

* Training reads ``load_from_disk(data_path)["train"]`` (a `DatasetDict` saved with `save_to_disk`, as
  `preparation_scienceqa_data.py` writes ``science_qa.hf``) and renders each row with the Prompter of
  `prompt_template_name` ("alpaca", `OFFICIAL_TEMPLATE`): ``prompt_no_input`` with the `instruction` when
  `input` is empty (``prompt_input`` otherwise), then the `output` appended.
* Evaluation (`evaluation_scienceqa.py`) reads a JSON list (`--test_dataset`) of records with
  `instruction`, `input` and `answer`, greedy-generates after the same template without the output, keeps
  the text after "### Response:" and counts it right when ``The answer is ([A-Z]).`` matches exactly once
  and the letter is `answer`.
* The official ScienceQA records: instruction "Context: ...\\nQuestion: ...\\nOptions: (A) ... (B) ...\\n",
  input "", output "Answer: The answer is B.", answer "B".

Our rendering (`official_record`), so that both official scripts work on any task:

* a classification `Example` becomes instruction = our prompt without its final "Answer:" marker (plus an
  "Options: (A) no (B) yes" line when the verbalizers are not already the option letters " A", " B", ...),
  input = "", output = "Answer: The answer is <letter>." ("The answer is <letter>." when the prompt has
  no marker), answer = the letter;
* an instruction (generative) `Example` becomes instruction = the prompt, input = "", output = the
  target, answer = "" (the official evaluation has nothing to score there).

Columns: the official four (instruction, input, output, answer) plus ours for the exact round trip
(`mola_prompt`, `mola_choices` as JSON text, `mola_label`, `mola_target`; `Example.meta` is not kept),
which the official Trainer drops as unused. Every column is a plain string or integer (`Value`), so
the dataset_info.json holds no feature type newer than the datasets 2.14.5 the official code pins.

Call order: `study_examples(splits, ...)` (the subsets the study used) -> `write_official_dataset(splits,
folder)` (-> ``data_path``) and `write_official_test_json(splits["test"], path)` (-> ``--test_dataset``);
`read_official_dataset(folder)` gives the `Example`s back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mola_search._io import write_json
from mola_search.errors import UserError
from mola_search.tasks import ANSWER_MARKER, SPLITS, Example
from mola_search.tasks.builtin import LETTERS

OFFICIAL_TEMPLATE: dict[str, str] = {
    "prompt_input": "Below is an instruction that describes a task, paired with an input that provides further "
                    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "prompt_no_input": "Below is an instruction that describes a task. Write a response that appropriately "
                       "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    "response_split": "### Response:",
}
"""The official `templates/alpaca.json` (also hard-coded in `evaluation_scienceqa.py`)."""
OFFICIAL_COLUMNS: tuple[str, ...] = ("instruction", "input", "output", "answer")
OUR_COLUMNS: tuple[str, ...] = ("mola_prompt", "mola_choices", "mola_label", "mola_target")


def official_record(example: Example) -> dict[str, Any]:
    """One row of the official layout (the official columns, then ours) for `example`."""
    ours = {"mola_prompt": example.prompt, "mola_choices": json.dumps(list(example.choices)),
            "mola_label": example.label, "mola_target": example.target}
    if example.is_generative:
        return {"instruction": example.prompt, "input": "", "output": example.target, "answer": "", **ours}
    n = len(example.choices)
    if n > len(LETTERS):
        raise UserError(f"an example has {n} choices; the official evaluation reads answers as one letter A-Z")
    letter = LETTERS[example.label]
    body, prefix = example.prompt.rstrip(), ""
    if body.endswith(ANSWER_MARKER):
        body, prefix = body[:-len(ANSWER_MARKER)].rstrip(), f"{ANSWER_MARKER} "
    if [c.strip() for c in example.choices] != list(LETTERS[:n]):
        body += "\nOptions: " + " ".join(f"({LETTERS[i]}) {c.strip()}" for i, c in enumerate(example.choices))
    return {"instruction": body, "input": "", "output": f"{prefix}The answer is {letter}.", "answer": letter, **ours}


def official_text(record: Mapping[str, Any], with_output: bool = True) -> str:
    """The text the official Prompter builds from a row: the alpaca template, then the output (training) or
    nothing (what evaluation generates after)."""
    key = "prompt_input" if record.get("input") else "prompt_no_input"
    text = OFFICIAL_TEMPLATE[key].format(instruction=record["instruction"], input=record.get("input") or "")
    output = record.get("output")
    return f"{text}{output}" if with_output and output else text


def example_from_record(record: Mapping[str, Any]) -> Example:
    """The `Example` a row was written from (without its `meta`)."""
    try:
        choices = tuple(json.loads(record["mola_choices"]))
        return Example(record["mola_prompt"], choices, int(record["mola_label"]), record["mola_target"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"a row of the official dataset was not written by mola_search ({exc}): it needs the "
                        f"columns {', '.join(OUR_COLUMNS)}") from None


def study_examples(splits: Mapping[str, Sequence[Example]], *, train_examples: int | None,
                   eval_examples: int | None, seed: int) -> dict[str, list[Example]]:
    """The examples a run of the study used: `train_examples` of train drawn with `seed`, `eval_examples` of
    validation and test drawn with seed 0, as `mola_search.train.run.prepare` draws them (None: all)."""
    from mola_search.train.run import _subsample

    return {"train": _subsample(list(splits["train"]), train_examples, seed),
            **{s: _subsample(list(splits.get(s, [])), eval_examples, 0) for s in ("validation", "test")}}


def write_official_dataset(splits: Mapping[str, Sequence[Example]], folder: str | Path) -> Path:
    """`splits` (train, validation, test) as a Hugging Face `DatasetDict` saved to `folder`: the official
    ``--data_path``. An empty split is left out (datasets cannot load an empty split back from disk)."""
    import datasets

    features = datasets.Features({**{c: datasets.Value("string") for c in (*OFFICIAL_COLUMNS, *OUR_COLUMNS)},
                                  "mola_label": datasets.Value("int64")})
    tables = {}
    for split, examples in splits.items():
        if not examples:
            continue
        rows = [official_record(ex) for ex in examples]
        tables[split] = datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in features}, features=features)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        datasets.DatasetDict(tables).save_to_disk(str(folder))
    finally:
        if bars:
            datasets.enable_progress_bars()
    return Path(folder)


def read_official_dataset(folder: str | Path) -> dict[str, list[Example]]:
    """The `Example`s of every split of a dataset `write_official_dataset` wrote (train, validation and test
    always, empty when left out)."""
    import datasets

    try:
        data = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"{folder} is not a saved Hugging Face dataset ({exc})") from None
    if not isinstance(data, datasets.DatasetDict):
        raise UserError(f"{folder} holds one dataset, not the DatasetDict of splits the official script reads")
    read = {split: [example_from_record(row) for row in table] for split, table in data.items()}
    return {**{split: [] for split in SPLITS}, **read}


def write_official_test_json(examples: Sequence[Example], path: str | Path) -> Path:
    """The official evaluation's ``--test_dataset``: a JSON list of records (the official columns)."""
    return write_json(path, [{c: official_record(ex)[c] for c in OFFICIAL_COLUMNS} for ex in examples])
