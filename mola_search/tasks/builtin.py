"""The six benchmark tasks: one small row -> Example function each, plus a registry.

Prompt style: a compact instruction in the spirit of MoLA's templates, the
inputs on labelled lines, then the answer marker `Answer:`. Verbalizers are
single tokens (" yes"/" no", " A".." E") because multi-token verbalizers such as
" not equivalent" measurably kept LoRA on SmolLM2 below the majority baseline on
MRPC, while " yes"/" no" reached 70.7%.

Each mapper accepts both the local JSONL schema (/work/shared/data) and the
matching Hugging Face Hub schema; it returns None for a row whose gold answer is
hidden (GLUE test label -1, CommonsenseQA test answerKey ""), so such splits drop out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mola_search.errors import UserError
from mola_search.tasks.example import Example, TaskData
from mola_search.tasks.sources import (
    LAYOUT_HINT,
    HubUnavailable,
    assemble,
    hub_rows,
    local_rows,
    one_line,
)

ANSWER_MARKER = "Answer:"
"""Every built-in prompt ends with this; the answer (" yes", " A", ...) follows directly."""

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_INSTRUCTION = "Answer the multiple-choice question with the letter of the correct option."

Row = Mapping[str, Any]


def qa_prompt(instruction: str, *lines: str) -> str:
    """`instruction`, the input lines, then `Answer:` - one line each."""
    return "\n".join((instruction, *lines, ANSWER_MARKER))


def letter_choices(n: int) -> tuple[str, ...]:
    """(" A", " B", ...) for `n` options: single-token answers, one per option."""
    return tuple(" " + letter for letter in LETTERS[:n])


def option_lines(texts: Sequence[str]) -> list[str]:
    """["A. first", "B. second", ...] - the options as the model reads them."""
    return [f"{LETTERS[i]}. {text}" for i, text in enumerate(texts)]


def letter_index(answer: Any, n: int, labels: Sequence[str] | None = None) -> int | None:
    """Index of the gold option from a letter ("B"), a key in `labels`, or a 0-based int.

    None when the answer is hidden/empty; ValueError when it names no option (a
    data bug worth surfacing rather than silently mislabelling).
    """
    if answer is None or answer == "" or answer == -1:
        return None
    if isinstance(answer, int) and not isinstance(answer, bool):
        idx = answer
    else:
        key = str(answer).strip()
        if labels is not None and key in labels:
            idx = list(labels).index(key)
        elif len(key) == 1 and key.upper() in LETTERS:
            idx = LETTERS.index(key.upper())
        else:
            raise ValueError(f"answer {answer!r} names no option")
    if not 0 <= idx < n:
        raise ValueError(f"answer {answer!r} out of range for {n} options")
    return idx


def binary_label(row: Row) -> int | None:
    """GLUE integer label, None when hidden (-1 on the Hub's test splits)."""
    label = int(row["label"])
    return None if label < 0 else label


# --- the six tasks ---------------------------------------------------------------


def mrpc(row: Row) -> Example | None:
    """MRPC: label 1 = paraphrase, so choices are indexed (" no", " yes")."""
    label = binary_label(row)
    if label is None:
        return None
    prompt = qa_prompt(
        "Tell me if the two sentences are equivalent (paraphrases).",
        f"Sentence 1: {row['sentence1']}",
        f"Sentence 2: {row['sentence2']}",
    )
    return Example(prompt, (" no", " yes"), label, meta={"idx": row.get("idx")})


def rte(row: Row) -> Example | None:
    """RTE: label 0 = entailment, so choices are (" yes", " no") - note the order."""
    label = binary_label(row)
    if label is None:
        return None
    prompt = qa_prompt(
        "Does sentence 1 entail sentence 2?",
        f"Sentence 1: {row['sentence1']}",
        f"Sentence 2: {row['sentence2']}",
    )
    return Example(prompt, (" yes", " no"), label, meta={"idx": row.get("idx")})


def cola(row: Row) -> Example | None:
    """CoLA: label 1 = acceptable, so choices are (" no", " yes")."""
    label = binary_label(row)
    if label is None:
        return None
    prompt = qa_prompt(
        "Is the following sentence grammatically acceptable?",
        f"Sentence: {row['sentence']}",
    )
    return Example(prompt, (" no", " yes"), label, meta={"idx": row.get("idx")})


def _choice_dict_mc(row: Row, question: str) -> Example | None:
    """Shared by CommonsenseQA and OpenBookQA: `choices = {label: [...], text: [...]}`."""
    texts = list(row["choices"]["text"])
    label = letter_index(row.get("answerKey"), len(texts), row["choices"]["label"])
    if label is None:
        return None
    prompt = qa_prompt(MC_INSTRUCTION, f"Question: {question}", *option_lines(texts))
    return Example(prompt, letter_choices(len(texts)), label, meta={"id": row.get("id")})


def commonsenseqa(row: Row) -> Example | None:
    """CommonsenseQA: five options A-E."""
    return _choice_dict_mc(row, row["question"])


def openbookqa(row: Row) -> Example | None:
    """OpenBookQA: four options A-D; the question is in `question_stem`."""
    return _choice_dict_mc(row, row["question_stem"])


SCIENCEQA_META = ("subject", "topic", "category", "skill", "grade", "task")


def scienceqa(row: Row) -> Example | None:
    """ScienceQA (text only): 2-4 options, optional `hint` shown as context.

    `answer` is a letter in MoLA's sample and a 0-based int on the Hub; both work.
    """
    texts = list(row["choices"])
    label = letter_index(row.get("answer"), len(texts))
    if label is None:
        return None
    hint = str(row.get("hint") or "").strip()
    lines = ([f"Context: {hint}"] if hint else []) + [f"Question: {row['question']}"]
    prompt = qa_prompt(MC_INSTRUCTION, *lines, *option_lines(texts))
    meta = {key: row[key] for key in SCIENCEQA_META if key in row}
    return Example(prompt, letter_choices(len(texts)), label, meta=meta)


# --- registry ----------------------------------------------------------------------


def _text_only(dsd: Any) -> Any:
    """Keep ScienceQA problems without an image, without decoding any image."""
    from datasets import Image  # deferred: only on the Hub path

    dsd = dsd.cast_column("image", Image(decode=False))
    dsd = dsd.filter(lambda image: image is None, input_columns="image")
    return dsd.remove_columns("image")


@dataclass(frozen=True)
class TaskSpec:
    """How to get one benchmark: its row mapper and its Hub fallback."""

    name: str
    to_example: Callable[[Row], Example | None]
    hub_path: str
    hub_config: str | None = None
    hub_prepare: Callable[[Any], Any] | None = None
    hub_note: str | None = None


BUILTIN: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("mrpc", mrpc, "nyu-mll/glue", "mrpc"),
        TaskSpec("rte", rte, "nyu-mll/glue", "rte"),
        TaskSpec("cola", cola, "nyu-mll/glue", "cola"),
        TaskSpec(
            "scienceqa",
            scienceqa,
            "derek-thomas/ScienceQA",
            hub_prepare=_text_only,
            hub_note="scienceqa from the Hub = all text-only ScienceQA problems "
            "(image is None), not MoLA's 200/200/200 biology sample",
        ),
        TaskSpec("commonsenseqa", commonsenseqa, "tau/commonsense_qa"),
        TaskSpec("openbookqa", openbookqa, "allenai/openbookqa", "main"),
    )
}

TASKS: tuple[str, ...] = ("mrpc", "rte", "cola", "scienceqa", "commonsenseqa", "openbookqa")
assert set(TASKS) == set(BUILTIN)


# --- loading -----------------------------------------------------------------------


def to_examples(
    rows: list[Row], mapper: Callable[[Row], Example | None], where: str
) -> tuple[list[Example], int]:
    """Map rows, dropping hidden-answer rows; returns (examples, number dropped).

    A malformed row becomes a one-line UserError naming `where` and the row number.
    """
    out: list[Example] = []
    dropped = 0
    for i, row in enumerate(rows, start=1):
        try:
            ex = mapper(row)
        except UserError as err:
            raise UserError(f"{where}, row {i}: {err}") from None
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{where}, row {i}: malformed row ({type(err).__name__}: {one_line(err)})") from None
        if ex is None:
            dropped += 1
        else:
            out.append(ex)
    return out, dropped


def load_builtin(spec: TaskSpec, data_dir: Path | None, val_seed: int) -> TaskData:
    """Local `<data_dir>/<task>/<split>.jsonl` when present, else the Hub, else a UserError."""
    notes: list[str] = []
    if data_dir is not None:
        folder = data_dir / spec.name
        try:
            raw = local_rows(folder)
            source = str(folder)
        except FileNotFoundError as missing:
            where_local = f"{missing} does not exist"
            raw = None
    else:
        where_local = "no data dir was given"
        raw = None
    if raw is None:
        hub_id = spec.hub_path + (f" ({spec.hub_config})" if spec.hub_config else "")
        try:
            raw = hub_rows(spec.hub_path, spec.hub_config, spec.hub_prepare)
        except HubUnavailable as err:
            raise UserError(
                f"no data for task {spec.name!r}: {where_local} and the Hugging Face Hub is "
                f"unreachable for {hub_id} ({err}); {LAYOUT_HINT}"
            ) from None
        source = f"hf://{spec.hub_path}" + (f"/{spec.hub_config}" if spec.hub_config else "")
        notes.append(f"loaded from the Hugging Face Hub: {hub_id} ({where_local})")
        if spec.hub_note:
            notes.append(spec.hub_note)
    found: dict[str, list[Example]] = {}
    for split, rows in raw.items():
        examples, dropped = to_examples(rows, spec.to_example, f"{source} [{split}]")
        if examples and dropped:
            notes.append(f"{split}: dropped {dropped} rows without a gold answer")
        found[split] = examples
    return assemble(spec.name, found, source=source, val_seed=val_seed, notes=notes)
