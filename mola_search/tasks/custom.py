"""User-defined tasks: `custom:<task.yaml>` (classification) and `instruct:<path|hub id>` (generative).

A custom task YAML, paths relative to the YAML's folder::

    name: sentiment
    files: {train: train.jsonl, validation: val.jsonl, test: test.jsonl}   # test optional
    template: "Review: {text}\\nIs the review positive?\\nAnswer:"
    # either a label column and its answer words (list indexed by label, or value -> word) ...
    label_field: label
    label_words: [" no", " yes"]          # or {neg: " no", pos: " yes"}
    # ... or lettered options (the template must contain {options}):
    # options_field: options              # list of option texts per row
    # answer_field: answer                # letter "B" or 0-based index 1

Answer words get a leading space when they lack one, so every answer starts with
a space like the built-in verbalizers. Everything is validated on load and each
problem is reported as a one-line UserError.

Instruction data: Alpaca prompt (with or without `### Input:`), ending in
`### Response:`; the target is `" " + output` - a leading space like every
classification answer, so "the answer follows the prompt after one space" holds
for all tasks. Rows with an empty output are skipped and counted in `notes`.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Callable, Mapping

from mola_search.errors import UserError
from mola_search.tasks.builtin import letter_choices, option_lines, to_examples
from mola_search.tasks.example import SPLITS, Example, TaskData
from mola_search.tasks.sources import (
    HubUnavailable,
    assemble,
    hub_rows,
    local_rows,
    read_rows,
)

Row = Mapping[str, Any]


# --- custom classification tasks ------------------------------------------------------


def template_fields(template: str) -> set[str]:
    """Top-level field names a `str.format` template uses ("{a.b[0]}" -> "a")."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise UserError(f"template is not a valid str.format template: {err}") from None
    names = set()
    for _, field_name, _, _ in parsed:
        if field_name is None:
            continue
        base = field_name.split(".", 1)[0].split("[", 1)[0]
        if not base or base.isdigit():
            raise UserError(f"template field {{{field_name}}} must name a row field")
        names.add(base)
    return names


def _require(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in cfg or cfg[key] in (None, ""):
        raise UserError(f"{where}: missing key {key!r}")
    return cfg[key]


def _label_lookup(words: Any, where: str) -> tuple[tuple[str, ...], dict[str, int]]:
    """(choices, str(label value) -> index) from a list or a value->word mapping."""
    if isinstance(words, list):
        pairs = list(enumerate(words))
    elif isinstance(words, dict):
        pairs = list(words.items())
    else:
        raise UserError(f"{where}: label_words must be a list or a mapping value -> word")
    if len(pairs) < 2:
        raise UserError(f"{where}: label_words needs at least two answers")
    choices = []
    for _, word in pairs:
        if not isinstance(word, str) or not word.strip():
            raise UserError(f"{where}: label_words entries must be non-empty strings, got {word!r}")
        choices.append(word if word[0].isspace() else " " + word)
    if len(set(choices)) != len(choices):
        raise UserError(f"{where}: label_words must be distinct")
    return tuple(choices), {_key(value): i for i, (value, _) in enumerate(pairs)}


def _key(value: Any) -> str:
    """Compare label values as text, so 1, "1" and 1.0 all match a YAML key 1."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _answer_index(answer: Any, n: int) -> int:
    """Letter ("B", case-insensitive) or 0-based int; digit strings are ambiguous, so refused."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        idx = answer
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        idx = ord(answer.strip().upper()) - ord("A")
    else:
        raise ValueError(f"answer {answer!r} is neither a letter nor a 0-based integer")
    if not 0 <= idx < n:
        raise ValueError(f"answer {answer!r} out of range for {n} options")
    return idx


def custom_mapper(cfg: Mapping[str, Any], where: str) -> Callable[[Row], Example]:
    """Validate the YAML's prompt/answer keys and return a row -> Example function."""
    template = _require(cfg, "template", where)
    if not isinstance(template, str):
        raise UserError(f"{where}: template must be a string")
    fields = template_fields(template)
    label_mode = "label_field" in cfg or "label_words" in cfg
    options_mode = "options_field" in cfg or "answer_field" in cfg
    if label_mode == options_mode:
        raise UserError(
            f"{where}: give either label_field + label_words or options_field + answer_field"
        )
    fill = _template_filler(template, fields, where)
    if label_mode:
        return _label_mapper(cfg, fill, where)
    return _options_mapper(cfg, fields, fill, where)


_Filler = Callable[[Row, Mapping[str, str]], str]


def _template_filler(template: str, fields: set[str], where: str) -> _Filler:
    """(row, extra fields) -> prompt; a template field missing from both, or a misfit, is a UserError."""

    def fill(row: Row, extra: Mapping[str, str]) -> str:
        missing = sorted(f for f in fields if f not in row and f not in extra)
        if missing:
            raise UserError(
                f"{where}: template field {missing[0]!r} is not in the data "
                f"(row fields: {', '.join(sorted(row))})"
            )
        try:
            return template.format(**row, **extra)
        except (KeyError, IndexError, AttributeError, ValueError) as err:
            raise UserError(f"{where}: template does not fit the data ({err!r})") from None

    return fill


def _label_mapper(cfg: Mapping[str, Any], fill: _Filler, where: str) -> Callable[[Row], Example]:
    """label_field + label_words: the row's label value picks one of the answer words."""
    label_field = _require(cfg, "label_field", where)
    choices, lookup = _label_lookup(_require(cfg, "label_words", where), where)

    def to_example(row: Row) -> Example:
        if label_field not in row:
            raise UserError(f"{where}: label_field {label_field!r} is not in the data")
        value = row[label_field]
        if _key(value) not in lookup:
            raise UserError(
                f"{where}: label value {value!r} is not in label_words "
                f"(known: {', '.join(lookup)})"
            )
        return Example(fill(row, {}), choices, lookup[_key(value)], meta=_meta(row))

    return to_example


def _options_mapper(cfg: Mapping[str, Any], fields: set[str], fill: _Filler, where: str) -> Callable[[Row], Example]:
    """options_field + answer_field: lettered options filled into {options}, the answer a letter or index."""
    options_field = _require(cfg, "options_field", where)
    answer_field = _require(cfg, "answer_field", where)
    if "options" not in fields:
        raise UserError(f"{where}: with options_field the template must contain {{options}}")

    def to_mc_example(row: Row) -> Example:
        for key in (options_field, answer_field):
            if key not in row:
                raise UserError(f"{where}: field {key!r} is not in the data")
        options = row[options_field]
        if not isinstance(options, list) or not 2 <= len(options) <= 26:
            raise UserError(f"{where}: {options_field!r} must be a list of 2 to 26 option texts")
        try:
            label = _answer_index(row[answer_field], len(options))
        except ValueError as err:
            raise UserError(f"{where}: {err}") from None
        prompt = fill(row, {"options": "\n".join(option_lines([str(o) for o in options]))})
        return Example(prompt, letter_choices(len(options)), label, meta=_meta(row))

    return to_mc_example


def _meta(row: Row) -> dict[str, Any]:
    return {key: row[key] for key in ("idx", "id") if key in row}


def load_custom(spec_path: str) -> tuple[str, dict[str, list[Example]], str]:
    """Read and validate a custom task YAML; returns (name, examples per split, source)."""
    import yaml  # deferred: only custom tasks need it

    path = Path(spec_path).expanduser()
    if not path.is_file():
        raise UserError(f"custom task file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    where = str(path)
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: expected a mapping with name, files, template, ...")
    name = _require(cfg, "name", where)
    files = _require(cfg, "files", where)
    if not isinstance(files, dict):
        raise UserError(f"{where}: files must map split -> path")
    unknown = sorted(set(files) - set(SPLITS))
    if unknown:
        raise UserError(f"{where}: unknown split {unknown[0]!r} in files; valid: {', '.join(SPLITS)}")
    for split in ("train", "validation"):
        _require(files, split, f"{where}: files")
    mapper = custom_mapper(cfg, where)
    found: dict[str, list[Example]] = {}
    for split, rel in files.items():
        data_path = (path.parent / str(rel)).expanduser()
        if not data_path.is_file():
            raise UserError(f"{where}: {split} file {data_path} does not exist")
        rows = read_rows(data_path)
        if not rows:
            raise UserError(f"{where}: {split} file {data_path} has no rows")
        found[split], _ = to_examples(rows, mapper, f"{data_path}")
    return str(name), found, where


# --- instruction data ------------------------------------------------------------------

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_example(row: Row) -> Example | None:
    """Alpaca-style generative example; None when the output is empty (nothing to learn)."""
    instruction = str(row["instruction"]).strip()
    output = str(row.get("output") or "")
    if not output.strip():
        return None
    inp = str(row.get("input") or "").strip()
    template = ALPACA_WITH_INPUT if inp else ALPACA_NO_INPUT
    prompt = template.format(instruction=instruction, input=inp)
    return Example(prompt, (), -1, target=" " + output.strip(), meta={"has_input": bool(inp)})


def load_instruct(ref: str, data_dir: Path | None) -> tuple[dict[str, list[Example]], str, list[str]]:
    """Examples per split from a JSONL/JSON file, a folder of <split>.jsonl, or a Hub id.

    A relative path that is not found from the working directory is also tried
    under the data dir, so `instruct:instruct` works with `--data-dir`.
    """
    path = Path(ref).expanduser()
    if not path.exists() and data_dir is not None and (data_dir / ref).exists():
        path = data_dir / ref
    if path.is_dir():
        try:
            raw = local_rows(path, required=("train",))
        except FileNotFoundError as missing:
            raise UserError(f"instruction data folder {path} has no {Path(str(missing)).name}") from None
        source = str(path)
    elif path.is_file():
        raw = {"train": read_rows(path)}
        source = str(path)
    else:
        try:
            raw = hub_rows(ref)
        except HubUnavailable as err:
            raise UserError(
                f"no instruction data {ref!r}: it is not a local file or folder and the "
                f"Hugging Face Hub is unreachable ({err}); pass a .jsonl file or a folder "
                "with train.jsonl / validation.jsonl"
            ) from None
        source = f"hf://{ref}"
    notes = [
        "instruction data: Alpaca prompt ending in '### Response:'; target = ' ' + output"
    ]
    found: dict[str, list[Example]] = {}
    for split, rows in raw.items():
        if rows and not {"instruction", "output"} <= set(rows[0]):
            raise UserError(
                f"{source} [{split}]: instruction data needs 'instruction' and 'output' fields "
                f"(and optional 'input'); found: {', '.join(sorted(rows[0]))}"
            )
        found[split], skipped = to_examples(rows, alpaca_example, f"{source} [{split}]")
        if skipped:
            notes.append(f"{split}: skipped {skipped} rows with an empty output")
    return found, source, notes


def build_instruct(ref: str, data_dir: Path | None, val_seed: int) -> TaskData:
    """Instruction data as a task; test repeats validation (no benchmark to protect)."""
    found, source, notes = load_instruct(ref, data_dir)
    name = "instruct:" + (Path(source).name if not source.startswith("hf://") else ref)
    return assemble(
        name, found, source=source, val_seed=val_seed, notes=notes, missing_test="test_is_validation"
    )


def build_custom(spec_path: str, val_seed: int) -> TaskData:
    """A custom YAML task; without a test file the validation file becomes test."""
    name, found, source = load_custom(spec_path)
    return assemble(
        name,
        found,
        source=source,
        val_seed=val_seed,
        notes=[f"custom task from {source}"],
        hidden_test_note="no test file given",
    )
