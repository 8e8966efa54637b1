"""`mola-search report / analyze / compare` end to end on studies built in code (test_results.make_study)."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

from mola_search.cli.common import run_main
from mola_search.cli.search import main
from helpers import effect_study, make_study, random_allocations, trial

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _sparse_score(allocation, rng) -> float:
    """Only the top quarter (layers 6-7) matters, with a concave gain; plus run noise."""
    return 0.05 * sum(math.log1p(c) for c in allocation[6:]) + rng.normal(0, 0.005)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A built study (no training): 5 shape seeds + 30 random trials + pilot replicates, 5 finalists x 3
    seeds (1000..1002) with per-example test scores, noise.json with two --auto-fidelity rounds, and
    trained-looking adapters for the best finalist and the rectangle seed."""
    early = {s: {k: -0.6 + 0.001 * i + 0.01 * ((i * 7 + k * 3) % 5) for k in range(3)}
             for i, s in enumerate(("triangle", "inverted_triangle", "rectangle"))}
    folder = effect_study(tmp_path_factory.mktemp("studies") / "sparse", _sparse_score,
                          noise_rounds=[(early, {"max_train_examples": 64})])
    _add_adapters(folder)
    return folder


def _add_adapters(folder: Path) -> None:
    """Give the best finalist and the rectangle seed adapters + router stats, as a real study has."""
    from mola_search.analysis.studydata import load_study
    from mola_search.mola import MoLAConfig, MoLAModel
    from mola_search.models import tiny_llama

    data = load_study(folder)
    for fin in {data.best_finalist().label: data.best_finalist(), "r": data.finalist_for_seed("rectangle")}.values():
        experts = fin.allocation
        config = MoLAConfig(experts=experts, top_k=tuple(min(2, e) for e in experts), rank=(4,) * len(experts),
                            target_modules=("q_proj", "v_proj", "down_proj"))
        model = MoLAModel(tiny_llama(num_layers=len(experts)), config)
        with torch.no_grad():
            for name, layer in model.mola_layers.items():
                layer.lora_B.normal_(generator=torch.Generator().manual_seed(layer.layer_index))
        ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
        model.eval()
        with torch.no_grad(), model.collecting_router_stats():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        for run in fin.run_folders():
            model.save_adapter(run / "adapter")
            (run / "router_stats.json").write_text(json.dumps(model.router_stats()))


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    length, kind = struct.unpack(">I4s", raw[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", raw[16:24])
    crc = struct.unpack(">I", raw[29:33])[0]
    assert crc == zlib.crc32(raw[12:29]) & 0xFFFFFFFF, f"{path.name}: IHDR checksum"
    assert raw.rstrip(b"\x00")[-8:-4] == b"IEND", f"{path.name} is truncated"
    return width, height


def _report(folder: Path, capsys) -> Path:
    rc = run_main("mola-search", main, ["report", str(folder), "--bootstrap", "300"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    page = Path(out[-1])
    assert page == folder / "report" / "index.html" and page.is_file()
    return page


def test_report_html_embeds_valid_pngs_and_the_right_numbers(study: Path, capsys) -> None:
    from mola_search.analysis.studydata import load_study
    from mola_search.analysis.adapter import analyze_adapter

    page = _report(study, capsys)
    html = page.read_text()
    referenced = re.findall(r'<img src="([^"]+)"', html)
    on_disk = sorted(p.name for p in page.parent.glob("*.png"))
    assert sorted(referenced) == on_disk  # every PNG is embedded, every embedded PNG exists
    assert {"allocations.png", "trials_heatmap.png", "importance.png", "layer_effects.png", "history.png",
            "redundancy.png", "routing.png", "balance.png"} <= set(on_disk)
    for name in on_disk:
        w, h = _png_size(page.parent / name)
        assert 300 < w < 2000 and 150 < h < 2000, (name, w, h)
    assert "http://" not in html and "https://" not in html  # readable offline

    md = (page.parent / "summary.md").read_text()
    data = load_study(study)
    # the noise floor comes first: its line, the allocation x seed table, the auto-fidelity rounds
    assert md.index("## 1. Noise floor") < md.index("## 2. Results")
    assert data.noise.line()[1:] in md
    tri = data.noise.scores["triangle"]
    assert f"| triangle | {tri[0]:.4f} | {tri[1]:.4f} | {tri[2]:.4f} |" in md
    assert "--auto-fidelity: 2 rounds" in md and "| 1 | max_train_examples=64 |" in md
    # result table: the finalist chosen on validation, its mean test score over its seeds (1000..1002)
    best = data.best_finalist()
    assert sorted(best.test) == [1000, 1001, 1002]
    assert best.val_mean == max(f.val_mean for f in data.finalists)
    mean = sum(best.test.values()) / len(best.test)
    assert re.search(rf"\| \*\*best[^|]*\*\* \| {re.escape(best.name)} \|[^\n]*\| {mean:.4f} ± ", md)
    assert "chosen by mean validation `gold_logprob`" in md and "3 seeds x 60 examples" in md
    assert "| rectangle | " in md.split("against every seeded shape")[1]
    # which layers deserve more experts: the headline from the intervals, the informative top quarter, a CI
    assert "The top quarter (layers 6-7) deserves more experts: +" in md and "experts moved into the top quarter" in md
    assert "Supported: top quarter (layers 6-7): +" in md
    assert re.search(r"\| top quarter \(layers 6-7\) \| \+0\.\d+ \| \[\+0\.\d+, \+0\.\d+\] \| yes", md)
    assert "with the training seed as a blocking factor (6 seed blocks" in md
    assert "importance of the encoding parameters over the 35 complete trials at the study seed" in md  # no replicates
    # every trial count the report quotes is the same census (summary.md, the heatmap, importance, provenance)
    census = data.census_text()
    assert census.startswith("41 complete (6 at other training seeds: the pilot's; ") and md.count(census) >= 3
    # redundancy table: the best allocation's layer-0 weight-update distance, recomputed from its adapter
    analysis = analyze_adapter(best.adapters()[0])
    assert f"| 0 | {best.allocation[0]} | " in md
    assert f"{analysis.layer_means('delta')[0]:.4f}" in md
    assert f"{analysis.routing.balance[0]:.3f}" in md
    # provenance
    assert "tiny-llama-L8" in md and "per_layer" in md and "optuna 5" in md.lower()
    assert "still running" not in md


def test_study_summary_is_the_report_s_first_sections_without_figures(study: Path, tmp_path: Path) -> None:
    from mola_search.analysis.report import study_summary
    from mola_search.analysis.studydata import load_study

    copy = tmp_path / "sparse"
    shutil.copytree(study, copy, ignore=shutil.ignore_patterns("report"))
    md = study_summary(copy, n_boot=200)
    titles = re.findall(r"^## (.+)$", md, flags=re.M)
    assert titles == ["Decision", "1. Noise floor", "2. Results", "Which layers deserve more experts"]
    assert load_study(copy).noise.line()[1:] in md and "The top quarter (layers 6-7) deserves more experts" in md
    assert not list(copy.rglob("*.png"))


def test_report_on_an_interrupted_study_says_so(study: Path, tmp_path: Path, capsys) -> None:
    import optuna

    copy = tmp_path / "sparse"
    shutil.copytree(study, copy, ignore=shutil.ignore_patterns("report"))
    (copy / "summary.md").unlink()
    shutil.rmtree(next((copy / "finalists").iterdir()) / "seed1002")  # one finalist run never finished
    s = optuna.load_study(study_name="sparse", storage=f"sqlite:///{copy / 'study.db'}")
    s.ask()  # a trial left RUNNING, as a killed study leaves it
    page = _report(copy, capsys)
    text = page.read_text()
    assert "still running or was interrupted" in text
    assert "1 trial(s)" in text and "fewer than 3 finished seeds" in text


def test_analyze_cli_prints_per_layer_table(study: Path, capsys, tmp_path: Path) -> None:
    from mola_search.analysis.studydata import load_study

    adapter = load_study(study).best_finalist().adapters()[0]
    rc = run_main("mola-search", main, ["analyze", str(adapter), "--out", str(tmp_path / "fig")])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [line for line in out.splitlines() if re.match(r"\s+\d+\s", line)]
    assert len(lines) == 8
    assert {p.name for p in (tmp_path / "fig").glob("*.png")} == {"redundancy.png", "routing.png", "balance.png"}
    rc = run_main("mola-search", main, ["analyze", str(adapter), "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert rc == 0 and payload["balance_is_exact"] is True and len(payload["layers"]) == 8


def test_compare_two_studies(study: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    shutil.copytree(study, other, ignore=shutil.ignore_patterns("report"))
    rc = run_main("mola-search", main, ["compare", str(study), str(other), "--out", str(tmp_path / "cmp"),
                                        "--bootstrap", "200"])
    page = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and page == tmp_path / "cmp" / "index.html"
    html = page.read_text()
    for src in re.findall(r'<img src="([^"]+)"', html):
        _png_size(page.parent / src)
    assert "Agreement: the block with the largest supported gain sits at a similar depth" in html


@pytest.mark.parametrize("args, message", [
    (["report", "{tmp}"], "is not a mola-search study folder"),
    (["report", "{tmp}/missing"], "is not a folder"),
    (["analyze", "{tmp}"], "adapter_config.json is missing"),
    (["compare", "{tmp}"], "at least two study folders"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path: Path, capsys) -> None:
    rc = run_main("mola-search", main, [a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith("mola-search: error:")


def test_report_refuses_a_study_with_one_completed_trial(tmp_path: Path, capsys) -> None:
    folder = make_study(tmp_path / "one", [trial("seed:rectangle", (5,) * 8, -0.6)])
    rc = run_main("mola-search", main, ["report", str(folder)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "has 1 completed trial;" in err and "at least 2" in err and "at least 10" in err


def test_effects_figure_draws_an_estimate_outside_its_interval(tmp_path: Path) -> None:
    """matplotlib's yerr refuses an interval that does not contain its point; the figure draws it as it is."""
    from mola_search.analysis import figures
    from mola_search.analysis.importance import Effect, EffectEstimate

    layers = EffectEstimate([Effect("layer 0", (0, 0), 0.5, 0.1, 0.4), Effect("layer 1", (1, 1), -0.2, -0.3, 0.1)],
                            12, 1.0, 0.5)
    blocks = EffectEstimate([Effect("bottom", (0, 0), -0.1, 0.0, 0.2), Effect("top", (1, 1), 0.1, -0.2, 0.05)],
                            12, 1.0, 0.5)
    assert [e.outside for e in layers.effects] == [True, False] and all(e.outside for e in blocks.effects)
    path = figures.effects_over_depth(tmp_path / "effects.png", layers, blocks, 2)
    assert _png_size(path)[0] > 300


def test_report_on_a_study_with_too_few_runs_for_its_layers(tmp_path: Path, capsys) -> None:
    """Six noiseless runs, eight layers: too few degrees of freedom for a per-layer estimate (the report says
    so), while the four blocks (three contrasts, two residual degrees of freedom) show the built-in effect."""
    allocs = random_allocations(6, 31)
    folder = make_study(tmp_path / "thin", [trial("random", a, 0.01 * sum(a[6:])) for a in allocs])
    page = _report(folder, capsys)
    md = (page.parent / "summary.md").read_text()
    assert "too few runs for a per-layer estimate" in md
    assert "No noise floor: no noise floor was measured" in md
    assert "The top quarter (layers 6-7) deserves more experts: +0.06" in md  # 8 x 0.01 x 6/8, noiseless


def test_report_on_an_old_format_study(tmp_path: Path, capsys) -> None:
    """Seeds 0..2, accuracy only, no per-example scores, no noise.json, best chosen on test: still reported."""
    from helpers import finalist, old_metrics

    trials = [trial("tpe" if i else "seed:rectangle", a, 0.6 + 0.01 * i, train_seed=None)
              for i, a in enumerate(random_allocations(12, 9))]
    fins = [finalist(n, trials[n]["origin"], trials[n]["allocation"],
                     {k: old_metrics(0.6 + n / 100, 0.7 - n / 100 + k / 100) for k in range(3)}) for n in (0, 11)]
    folder = make_study(tmp_path / "old", trials, fins, old=True,
                        best={"experts": list(trials[0]["allocation"]), "trial": 0,
                              "chosen_by": "mean test accuracy over 3 seeds"})
    md = (_report(folder, capsys).parent / "summary.md").read_text()
    assert "validation `accuracy`" in md and "this study recorded accuracy only" in md
    assert "pair per-seed means only" in md and "3 seeds (per-seed)" in md
    assert "best_allocation.json was chosen on the test split" in md
    assert "picks trial 11 (tpe), not the exported rectangle" in md
