"""The study folder's format has one owner (mola_search.search.study.StudyFolder): the runner, `export` and the
report agree on labels, paths and which trial is "the best"."""

from __future__ import annotations

import json

import pytest

from mola_search.analysis.studydata import load_study
from mola_search.search.study.best import exported_best as best_spec
from mola_search.errors import UserError
from mola_search.search.study import Origin, StudyFolder, finalist_label
from helpers import finalist, make_study, run_metrics, trial

L = 8


def test_finalist_labels_and_run_folders_round_trip(tmp_path) -> None:
    label = finalist_label(7, "seed:inverted_triangle")
    assert label == "t007-seed_inverted_triangle"
    assert StudyFolder.parse_finalist_label(label) == (7, "seed:inverted_triangle")
    assert StudyFolder.parse_finalist_label(finalist_label(12, "tpe")) == (12, "tpe")
    assert StudyFolder.parse_finalist_label(finalist_label(3, "oneshot:top1")) == (3, "oneshot:top1")
    assert StudyFolder.parse_finalist_label("report") is None
    assert StudyFolder(tmp_path).finalist_run_dir(label, 1001) == tmp_path / "finalists" / label / "seed1001"


def test_origin_is_the_one_reader_and_writer_of_the_origin_format() -> None:
    seed = Origin.seed("triangle")
    assert seed.text == "seed:triangle" and seed.is_seed and seed.name == "triangle"
    assert Origin.from_label(seed.label) == seed
    top = Origin.oneshot("top", 2)
    assert top.text == "oneshot:top2" and top.is_oneshot_top and not top.is_seed and top.name == "oneshot:top2"
    assert not Origin.oneshot("rank", 5).is_oneshot_top
    assert Origin("tpe").name == "tpe" and not Origin("tpe").is_seed


def test_export_and_the_report_pick_the_best_study_seed_trial_not_a_lucky_pilot_run(tmp_path) -> None:
    """Without best_allocation.json, export's best is the best trial trained with the study seed; a pilot run
    at seed 2 scored higher but was trained under other random numbers."""
    folder = make_study(tmp_path / "s", [
        trial("seed:rectangle", [2] * L, -0.70, train_seed=0),
        trial("tpe", [1, 1, 2, 2, 2, 2, 3, 3], -0.65, train_seed=0),
        trial("seed:triangle", [3, 3, 3, 2, 2, 1, 1, 1], -0.40, train_seed=2, pilot=True),
    ], finished=False)
    spec, meta = best_spec(folder)
    assert spec.experts == (1, 1, 2, 2, 2, 2, 3, 3) and meta["validation_score"] == pytest.approx(-0.65)
    assert meta["trial"] == 1 and "study seed" in meta["chosen_by"]


def test_finalist_runs_are_read_the_way_the_runner_writes_them(tmp_path) -> None:
    alloc = [2] * L
    folder = make_study(tmp_path / "s", [trial("seed:rectangle", alloc, -0.7)], [
        finalist(0, "seed:rectangle", alloc, {1001: run_metrics(1001, -0.6, [-0.5, -0.7], [1, 0]),
                                              1000: run_metrics(1000, -0.65, [-0.6, -0.8], [1, 0])})])
    runs = StudyFolder(folder).finalist_runs()
    assert [label for label, _ in runs] == [finalist_label(0, "seed:rectangle")]
    assert [seed for seed, _, _ in runs[0][1]] == [1000, 1001]
    assert all(run == StudyFolder(folder).finalist_run_dir(runs[0][0], seed) for seed, run, _ in runs[0][1])
    data = load_study(folder)
    assert [(f.label, f.origin, sorted(f.test)) for f in data.finalists] == [
        ("t000-seed_rectangle", "seed:rectangle", [1000, 1001])]
    # a half-written run (no metrics.json) is not a finished run
    (StudyFolder(folder).finalist_run_dir(runs[0][0], 1002)).mkdir()
    assert [seed for seed, _, _ in StudyFolder(folder).finalist_runs()[0][1]] == [1000, 1001]


def test_a_study_folder_without_its_storage_is_one_error(tmp_path) -> None:
    folder = make_study(tmp_path / "s", [trial("seed:rectangle", [2] * L, -0.7)])
    (folder / "study.db").unlink()
    with pytest.raises(UserError, match="no study.db: the study never started"):
        best_spec(folder)
    (folder / "best_allocation.json").write_text(json.dumps({"experts": [2] * L}))  # best_allocation.json wins
    with pytest.raises(UserError):  # an incomplete spec file is refused by the spec reader, not guessed
        best_spec(folder)
