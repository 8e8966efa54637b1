"""`mola-search report / analyze / compare` end to end on small synthetic studies (seconds)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

from mola_search.cli.common import run_main
from mola_search.cli.search import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _study(folder: Path, **overrides) -> Path:
    from mola_search.search.config import StudyConfig
    from mola_search.search.runner import run_study

    raw = {"task": "mrpc", "model": "tiny-llama-L8", "objective": "synthetic:sparse", "space": "per_layer",
           "sampler": "random", "scheduler": "none", "executor": "local", "trials": 40, "finalist_top_n": 1,
           "finalist_seeds": 2, "out": str(folder), "study_name": folder.name,
           "fidelity": {"rungs": [1.0]}, **overrides}
    run_study(StudyConfig.from_dict(raw), folder)
    return folder


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A 40-trial synthetic:sparse study (per-layer encoding) with finalists, plus trained-looking adapters."""
    folder = _study(tmp_path_factory.mktemp("studies") / "sparse")
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
    # result table: the best finalist's mean test score over its seeds
    best = data.best_finalist()
    mean = sum(best.test.values()) / len(best.test)
    assert f"{mean:.4f} ± " in md
    # which layers matter: the informative top quarter (layers 6-7) is found, with a CI
    assert "Supported: top quarter (layers 6-7): +" in md
    assert re.search(r"\| top quarter \(layers 6-7\) \| \+0\.\d+ \| \[\+0\.\d+, \+0\.\d+\] \| yes \|", md)
    # redundancy table: the best allocation's layer-0 weight-update distance, recomputed from its adapter
    analysis = analyze_adapter(best.adapters()[0])
    assert f"| 0 | {best.allocation[0]} | " in md
    assert f"{analysis.layer_means('delta')[0]:.4f}" in md
    assert f"{analysis.routing.balance[0]:.3f}" in md
    # provenance
    assert "tiny-llama-L8" in md and "per_layer" in md and "optuna 5" in md.lower()
    assert "still running" not in md


def test_report_on_an_interrupted_study_says_so(study: Path, tmp_path: Path, capsys) -> None:
    import optuna

    copy = tmp_path / "sparse"
    shutil.copytree(study, copy, ignore=shutil.ignore_patterns("report"))
    (copy / "summary.md").unlink()
    shutil.rmtree(next((copy / "finalists").iterdir()) / "seed1")  # one finalist run never finished
    s = optuna.load_study(study_name="sparse", storage=f"sqlite:///{copy / 'study.db'}")
    s.ask()  # a trial left RUNNING, as a killed study leaves it
    page = _report(copy, capsys)
    text = page.read_text()
    assert "still running or was interrupted" in text
    assert "1 trial(s)" in text and "fewer than 2 finished seeds" in text


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
    folder = _study(tmp_path / "one", trials=1, seed_names=["rectangle"], finalist_seeds=0)
    rc = run_main("mola-search", main, ["report", str(folder)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "has 1 completed trial;" in err and "at least 2" in err and "at least 10" in err
