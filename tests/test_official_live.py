"""Opt-in: checkpoints both ways against the real official MoLA code, when a checkout and its environment exist.

Set MOLA_OFFICIAL_REPO (a checkout of https://github.com/GCYZSL/MoLA; read at commit
01785c84c70846999638b11b88409fdf86361d9a) and MOLA_OFFICIAL_PYTHON (a Python with its pins: torch 1.13.1,
transformers 4.28.0, peft 0.4.0). Skipped otherwise: nothing of the official code is in this repository.

The official side runs on a CPU without training (its Trainer needs CUDA for fp16): it builds its model and
hacked PeftModel with random experts, saves them with its own `save_pretrained`, and loads the checkpoint
mola_search wrote with its own `PeftModel.from_pretrained`. Both ways, the logits must be ours.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from mola_search.mola import MoLAConfig, MoLAModel
from mola_search.mola.official_checkpoint import read_official_checkpoint, write_official_checkpoint

REPO, PYTHON = os.environ.get("MOLA_OFFICIAL_REPO"), os.environ.get("MOLA_OFFICIAL_PYTHON")
pytestmark = [pytest.mark.skipif(not (REPO and PYTHON), reason="set MOLA_OFFICIAL_REPO and MOLA_OFFICIAL_PYTHON"),
              pytest.mark.slow]  # runs the official environment in a process of its own
EXPERTS, TOP_K, RANK = [2, 3, 4, 2], [1, 2, 2, 2], [4, 4, 8, 8]
TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
IDS = [[1, 31, 44, 43, 55, 26, 49, 31, 29, 43, 55, 26, 35, 33, 45, 7, 99, 25]]

OFFICIAL_SIDE = f"""
import sys, torch
sys.path.insert(0, ".")
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
from src.mola_modeling_llama_hacked import LlamaForCausalLM_d
from src.mola_mapping_hacked import get_peft_model
from src.mola_lora_hacked import LoraConfig
from src.mola_peft_model_hacked import PeftModel
base, ours, theirs, logits = sys.argv[1:5]
if sys.argv[5] == "base":
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4)).save_pretrained(base)
    sys.exit(0)
def official(folder=None):
    config = AutoConfig.from_pretrained(base); config.lora_target_modules = {TARGETS!r}
    model = LlamaForCausalLM_d.from_pretrained(base, config=config, torch_dtype=torch.float32)
    if folder is None:
        model = get_peft_model(model, LoraConfig(r={RANK!r}, lora_alpha=16, target_modules={TARGETS!r},
                               lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"),
                               number_experts={EXPERTS!r}, top_k={TOP_K!r})
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or "router" in name:
                    p.normal_(0, 0.3)
        model.save_pretrained(theirs)
    else:
        model = PeftModel.from_pretrained(model, folder, number_experts={EXPERTS!r}, top_k={TOP_K!r})
    model.get_new_parameters({EXPERTS!r}, {TOP_K!r}, False)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor({IDS!r})).logits.float()
torch.save({{"theirs": official(), "ours": official(ours)}}, logits)
"""


def official(tmp_path: Path, step: str) -> None:
    script = tmp_path / "official_side.py"
    script.write_text(OFFICIAL_SIDE)
    args = [str(tmp_path / n) for n in ("base", "ours", "theirs", "logits.pt")]
    done = subprocess.run([PYTHON, str(script), *args, step], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def base_model(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()


def test_checkpoints_both_ways_give_the_official_logits(tmp_path):
    official(tmp_path, "base")
    mine = MoLAModel(base_model(tmp_path), MoLAConfig(experts=tuple(EXPERTS), top_k=tuple(TOP_K),
                                                      rank=tuple(RANK), lora_dropout=0.0)).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in mine.mola_layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
            layer.router.copy_(torch.randn(layer.router.shape, generator=gen) * 0.5)
        ours = mine(input_ids=torch.tensor(IDS)).logits
    write_official_checkpoint(mine, tmp_path / "ours", base_model=str(tmp_path / "base"))
    official(tmp_path, "logits")
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    torch.testing.assert_close(logits["ours"], ours, atol=1e-4, rtol=1e-4)  # ours -> the official loader
    config, tensors = read_official_checkpoint(tmp_path / "theirs", top_k=TOP_K)
    theirs = MoLAModel(base_model(tmp_path), config).eval()
    theirs.load_adapter_weights(tensors)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=torch.tensor(IDS)).logits, logits["theirs"], atol=1e-4, rtol=1e-4)
        plain = base_model(tmp_path)(input_ids=torch.tensor(IDS)).logits
    assert (logits["theirs"] - plain).abs().max() > 1e-2 and (ours - plain).abs().max() > 1e-2


def test_the_official_environment_reads_the_exported_dataset(tmp_path):
    """datasets 2.14.5 (the official pin) loads what this datasets version saved, as mola_training.py does."""
    from mola_search.official.data import official_record, write_official_dataset
    from mola_search.tasks import Example

    examples = [Example(f"Same?\nSentence 1: a{i}\nSentence 2: b\nAnswer:", (" no", " yes"), i % 2) for i in range(5)]
    write_official_dataset({"train": examples, "validation": examples[:2], "test": []}, tmp_path / "data")
    code = ("import sys, datasets; d = datasets.load_from_disk(sys.argv[1]); "
            "print(len(d['train']), '|'.join(d['train']['output']))")
    done = subprocess.run([PYTHON, "-c", code, str(tmp_path / "data")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "5 " + "|".join(official_record(e)["output"] for e in examples)
