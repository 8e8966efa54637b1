"""Official MoLA checkpoints (GCYZSL/MoLA) <-> mola_search adapters, both ways.

Read from the official code at commit 01785c84c70846999638b11b88409fdf86361d9a (`OFFICIAL_COMMIT`):
`src/mola_lora_hacked.py` (`LoraMoE_Layer.update_layer`, `Linear_MoE.forward`) and
`src/mola_peft_model_hacked.py` (`PeftModel.save_pretrained`, `get_peft_model_state_dict_moe`,
`set_peft_model_state_dict_moe`), with the peft 0.4.0 it pins.

The official layout: `mola_training.py` ends with `model.save_pretrained(output_dir)`, which writes

* ``adapter_config.json``: peft's `LoraConfig`, e.g. ``{"peft_type": "LORA", "task_type": "CAUSAL_LM",
  "r": [8, 8, ...] (one rank per layer), "lora_alpha": 16, "lora_dropout": 0.05, "target_modules":
  ["q_proj", ...], "bias": "none", "base_model_name_or_path": ..., "fan_in_fan_out": false,
  "inference_mode": true, "init_lora_weights": true, "modules_to_save": null, "layers_to_transform":
  null, "layers_pattern": null, "revision": null}``;
* ``adapter_model.bin`` (`torch.save` of a dict; ``adapter_model.safetensors`` with
  `safe_serialization=True`, which peft's loader prefers when both exist).

Its tensors, for decoder layer l, module m (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``) and
expert e (the module dicts' ".default" is dropped on saving, so ``lora_A.default_0`` becomes ``lora_A_0``):

* ``base_model.model.model.layers.{l}.{m}.lora_A_{e}.weight``  (r_l, d_in)     expert e's A
* ``base_model.model.model.layers.{l}.{m}.lora_B_{e}.weight``  (d_out, r_l)    expert e's B
* ``base_model.model.model.layers.{l}.{m}.router.router.weight``  (experts_l, d_in)  the router, no bias

A Trainer checkpoint's full state dict names them ``lora_A.default_{e}.weight`` (read as well; its base
weights are ignored). The official forward of a module is ours: x W^T + sum over the top-k experts of
w_e * B_e A_e dropout(x) * lora_alpha / r_l, with w the fp32 softmax of x R^T cut to the top-k and
renormalised. Ours stacks the experts: ``{module}.lora_A`` (experts, r, d_in) = A_e stacked,
``{module}.lora_B`` (d_out, experts, r) = B_e stacked on dim 1, ``{module}.router`` = R.

Not in an official checkpoint: the experts per layer (counted here from the tensors) and the top-k per
layer (the official scripts take it as a flag). `write_official_checkpoint` adds ``allocation.json`` (the
allocation spec, top-k included), which the official code ignores and `read_official_checkpoint` reads;
without it top-k is the `top_k` argument, else the official scripts' default 2 (capped by the layer's
experts) and the config's `extra` says it was assumed.

Call order: `is_official_checkpoint(path)` (cheap, config only) -> `read_official_checkpoint(path)` ->
(`MoLAConfig`, tensors in our names) for `MoLAModel.load_adapter_weights`; or the converters
`convert_official_to_adapter` / `convert_adapter_to_official`; `load_official_into(model, path)` for
`mola-train --init-from`, `as_adapter_folder(path, scratch)` for `mola-search analyze`.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mola_search._io import atomic_write_bytes, read_json, write_json
from mola_search.allocation import load_spec
from mola_search.allocation.spec import OFFICIAL_TARGET_MODULES
from mola_search.errors import UserError
from mola_search.mola.config import CONFIG_NAME, OFFICIAL, WEIGHTS_NAME, MoLAConfig
from mola_search.mola.official import OFFICIAL_COMMIT

OFFICIAL_BIN, OFFICIAL_SAFETENSORS = "adapter_model.bin", "adapter_model.safetensors"
SIDECAR = "allocation.json"
OFFICIAL_KINDS: tuple[str, ...] = tuple(OFFICIAL_TARGET_MODULES.split(","))
"""The modules the official LLaMA code can adapt, in its default `lora_target_modules` order."""
OFFICIAL_DEFAULT_TOP_K = 2
_PREFIX = "base_model.model."
_MODULE = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")
_KEY = re.compile(r"base_model\.model\.(?P<module>model\.layers\.\d+\.(?:self_attn|mlp)\.\w+)\."
                  r"(?:(?P<part>lora_[AB])(?:_|\.default_)(?P<expert>\d+)|router\.router)\.weight")


def official_key(module: str, part: str, expert: int | None = None) -> str:
    """The official tensor name of `part` ("lora_A", "lora_B" of `expert`, or "router") of `module`
    (our module name, e.g. "model.layers.3.mlp.up_proj")."""
    if part == "router":
        return f"{_PREFIX}{module}.router.router.weight"
    return f"{_PREFIX}{module}.{part}_{expert}.weight"


def to_official_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our adapter tensors (`MoLAModel.adapter_state_dict()`) under the official names, one tensor per expert."""
    out: dict[str, torch.Tensor] = {}
    for module in sorted(k[:-len(".lora_A")] for k in tensors if k.endswith(".lora_A")):
        match = _MODULE.fullmatch(module)
        if match is None or match.group(2) not in OFFICIAL_KINDS:
            raise UserError(f"the adapter's module '{module}' is not one the official LLaMA code adapts "
                            f"(model.layers.<l>.self_attn|mlp.<{'|'.join(OFFICIAL_KINDS)}>)")
        a, b, router = (tensors[f"{module}.{p}"] for p in ("lora_A", "lora_B", "router"))
        for e in range(a.shape[0]):
            out[official_key(module, "lora_A", e)] = a[e].detach().contiguous().clone()
            out[official_key(module, "lora_B", e)] = b[:, e].detach().contiguous().clone()
        out[official_key(module, "router")] = router.detach().contiguous().clone()
    return out


def from_official_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official adapter tensors under our names (`{module}.lora_A` / `.lora_B` / `.router`), experts stacked.

    Keys that are neither LoRA nor router tensors (a Trainer checkpoint's base weights) are ignored; an
    expert missing, or a router whose rows are not the module's expert count, is a one-line UserError."""
    parts: dict[str, dict[str, Any]] = defaultdict(lambda: {"lora_A": {}, "lora_B": {}, "router": None})
    for key, value in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            if "lora_" in key or "router" in key:
                raise UserError(f"official checkpoint tensor '{key}' is not named as the official code saves "
                                f"them ({official_key('model.layers.<l>.<module>', 'lora_A', 0)}, ...)")
            continue
        slot = parts[match.group("module")]
        if match.group("part"):
            slot[match.group("part")][int(match.group("expert"))] = value
        else:
            slot["router"] = value
    out: dict[str, torch.Tensor] = {}
    for module, slot in sorted(parts.items()):
        count = len(slot["lora_A"])
        wanted = set(range(count))
        router = slot["router"]
        if set(slot["lora_A"]) != wanted or set(slot["lora_B"]) != wanted or router is None or router.shape[0] != count:
            raise UserError(f"official checkpoint module '{module}' is incomplete: it needs lora_A_e and lora_B_e "
                            f"for e = 0..{count - 1} and a router with {count} rows")
        out[f"{module}.lora_A"] = torch.stack([slot["lora_A"][e] for e in range(count)]).float()
        out[f"{module}.lora_B"] = torch.stack([slot["lora_B"][e] for e in range(count)], dim=1).float()
        out[f"{module}.router"] = router.float().contiguous()
    if not out:
        raise UserError("the official checkpoint holds no lora_A_<e> / router tensors: not a MoLA checkpoint")
    return out


def is_official_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a folder the official code saved: a peft LoRA `adapter_config.json` (not ours) and
    `adapter_model.bin` or `.safetensors`. Reads the config only."""
    folder = Path(path)
    raw = read_json(folder / CONFIG_NAME) if folder.is_dir() else None
    if raw is None or raw.get("peft_type") != "LORA" or "experts" in raw or "method" in raw:
        return False
    return (folder / OFFICIAL_BIN).is_file() or (folder / OFFICIAL_SAFETENSORS).is_file()


TopK = int | tuple[int, ...] | list[int] | None
"""One top-k for every layer, one per layer, or None (allocation.json beside the checkpoint, else 2)."""


def read_official_checkpoint(path: str | Path, top_k: TopK = None) -> tuple[MoLAConfig, dict[str, torch.Tensor]]:
    """(A `MoLAConfig`, the adapter tensors in our names) of an official checkpoint folder.

    Experts per layer come from the tensors, ranks, alpha, dropout and the base model from its
    adapter_config.json, top-k from `top_k` (one int or one per layer), else from `allocation.json`
    beside it, else the official default 2 per layer (`extra["top_k_assumed"]`). The balance loss is the
    official one at coefficient 0: the official default (`obalance=False`), and unknown for this checkpoint.
    """
    folder = Path(path)
    if not is_official_checkpoint(folder):
        raise UserError(f"{folder} is not an official MoLA checkpoint: it needs a peft LoRA {CONFIG_NAME} "
                        f"and {OFFICIAL_BIN} (what the official mola_training.py saves)")
    raw = read_json(folder / CONFIG_NAME) or {}
    tensors = from_official_tensors(_load_official_weights(folder))
    experts, kinds = _experts_per_layer(tensors, raw)
    rank = _ranks(raw, tensors, len(experts))
    chosen, assumed = _top_k(folder, top_k, experts)
    config = MoLAConfig(experts=tuple(experts), top_k=chosen, rank=rank, target_modules=kinds,
                        lora_alpha=raw.get("lora_alpha", 16), lora_dropout=raw.get("lora_dropout", 0.05),
                        balance_loss=OFFICIAL, aux_loss_coef=0.0, base_model=raw.get("base_model_name_or_path") or "",
                        source="official", extra={"official_checkpoint": str(folder), "top_k_assumed": assumed})
    return config, tensors


def _load_official_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: the safetensors file when there is one (as peft's loader), else the .bin."""
    safe, binary = folder / OFFICIAL_SAFETENSORS, folder / OFFICIAL_BIN
    try:
        if safe.is_file():
            from safetensors.torch import load_file

            return load_file(str(safe))
        loaded = torch.load(binary, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle, zip or safetensors error: the file is not what it claims
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"{safe if safe.is_file() else binary} is not a readable weights file "
                        f"({type(exc).__name__}: {reason})") from None
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{binary} does not hold a dict of tensors (a state dict)")
    return loaded


def _experts_per_layer(tensors: Mapping[str, torch.Tensor],
                       raw: Mapping[str, Any]) -> tuple[list[int], tuple[str, ...]]:
    """Experts of each layer (every adapted module of a layer has the layer's count) and the adapted kinds."""
    per_layer: dict[int, set[int]] = defaultdict(set)
    kinds: set[str] = set()
    for key, value in tensors.items():
        if key.endswith(".router"):
            match = _MODULE.fullmatch(key[:-len(".router")])
            assert match is not None  # from_official_tensors accepted only such names
            per_layer[int(match.group(1))].add(value.shape[0])
            kinds.add(match.group(2))
    ranks = raw.get("r")
    layers = len(ranks) if isinstance(ranks, list) else max(per_layer) + 1
    missing = [j for j in range(layers) if j not in per_layer]
    if missing or max(per_layer) >= layers:
        raise UserError(f"the official checkpoint's tensors cover layers {sorted(per_layer)} but its r lists "
                        f"{layers} layers: every layer needs its experts")
    uneven = [j for j, counts in per_layer.items() if len(counts) > 1]
    if uneven:
        raise UserError(f"layer {uneven[0]} of the official checkpoint has modules with {sorted(per_layer[uneven[0]])} "
                        "experts; the official code gives every module of a layer number_experts[layer]")
    unknown = sorted(kinds - set(OFFICIAL_KINDS))
    if unknown:
        raise UserError(f"the official checkpoint adapts {unknown}, which the official LLaMA code does not")
    return [per_layer[j].pop() for j in range(layers)], tuple(k for k in OFFICIAL_KINDS if k in kinds)


def _ranks(raw: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], layers: int) -> tuple[int, ...]:
    """The rank of each layer: adapter_config.json's r (a list per layer, or one int), checked against A's rows."""
    r = raw.get("r", 8)
    ranks = tuple(int(x) for x in r) if isinstance(r, list) else (int(r),) * layers
    for key, value in tensors.items():
        if key.endswith(".lora_A"):
            j = int(_MODULE.fullmatch(key[:-len(".lora_A")]).group(1))  # type: ignore[union-attr]
            if value.shape[1] != ranks[j]:
                raise UserError(f"official checkpoint tensor {key} has rank {value.shape[1]} but its "
                                f"{CONFIG_NAME} gives layer {j} r={ranks[j]}")
    return ranks


def _top_k(folder: Path, top_k: Any, experts: list[int]) -> tuple[tuple[int, ...], bool]:
    """(top-k per layer, whether it was assumed): the argument, else allocation.json, else the official default."""
    if top_k is None and (folder / SIDECAR).is_file():
        top_k = load_spec(folder / SIDECAR).top_k
    if top_k is None:
        return tuple(min(OFFICIAL_DEFAULT_TOP_K, e) for e in experts), True
    values = (int(top_k),) * len(experts) if isinstance(top_k, int) else tuple(int(k) for k in top_k)
    if len(values) != len(experts) or any(not 1 <= k <= e for k, e in zip(values, experts)):
        raise UserError(f"`top_k` {list(values)} does not fit the official checkpoint's experts {experts}: "
                        "give one value per layer, each between 1 and the layer's experts")
    return values, False


def _our_adapter(source: Any) -> tuple[MoLAConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of a `MoLAModel` or of one of our adapter folders."""
    from mola_search.mola.model import MoLAModel

    if isinstance(source, MoLAModel):
        return source.mola_config, source.adapter_state_dict()
    folder = Path(source)
    config = MoLAConfig.load(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    from safetensors.torch import load_file

    return config, load_file(str(weights))


def official_adapter_config(config: MoLAConfig, kinds: tuple[str, ...], base_model: str | None) -> dict[str, Any]:
    """The official adapter_config.json (peft 0.4.0 `LoraConfig`) for `config`."""
    alpha = int(config.lora_alpha) if float(config.lora_alpha).is_integer() else config.lora_alpha
    return {"base_model_name_or_path": base_model or config.base_model or None, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
            "layers_to_transform": None, "lora_alpha": alpha, "lora_dropout": config.lora_dropout,
            "modules_to_save": None, "peft_type": "LORA", "r": list(config.rank), "revision": None,
            "target_modules": list(kinds), "task_type": "CAUSAL_LM"}


def write_official_checkpoint(source: Any, out: str | Path, *, base_model: str | None = None) -> Path:
    """Write a `MoLAModel`'s adapter, or one of our adapter folders, as the official code saves one.

    `out` gets adapter_config.json, adapter_model.bin and allocation.json (our spec, top-k included);
    `base_model` (default: the adapter's) is what the config names. Everything is checked before anything
    is written: modules the official code cannot adapt are a one-line UserError.
    """
    folder = Path(out)
    if (folder / OFFICIAL_SAFETENSORS).is_file():  # ours, say: peft would load it before the .bin
        raise UserError(f"`out` {folder} holds {OFFICIAL_SAFETENSORS}, which the official loader would read "
                        f"instead of {OFFICIAL_BIN}: pass another folder")
    config, tensors = _our_adapter(source)
    official = to_official_tensors(tensors)
    kinds = tuple(k for k in OFFICIAL_KINDS if any(f".{k}.router." in key for key in official))
    buffer = io.BytesIO()
    torch.save(official, buffer)
    atomic_write_bytes(folder / OFFICIAL_BIN, buffer.getvalue())
    write_json(folder / CONFIG_NAME, official_adapter_config(config, kinds, base_model))
    write_json(folder / SIDECAR, {**config.spec.to_dict(), "note": "mola_search's allocation of this official "
                                  "checkpoint; the official code ignores this file and takes top_k as a flag",
                                  "official_commit": OFFICIAL_COMMIT})
    return folder


def convert_official_to_adapter(src: str | Path, dst: str | Path, top_k: TopK = None) -> Path:
    """An official checkpoint folder as one of our adapter folders (adapter_config.json + safetensors)."""
    from safetensors.torch import save

    folder = Path(dst)
    if (folder / OFFICIAL_BIN).is_file():  # the source itself, say: its adapter_config.json would be replaced
        raise UserError(f"`dst` {folder} holds an official {OFFICIAL_BIN}: pass another folder")
    config, tensors = read_official_checkpoint(src, top_k)
    atomic_write_bytes(folder / WEIGHTS_NAME, save(tensors))
    config.save(folder)
    return folder


def convert_adapter_to_official(src: str | Path, dst: str | Path, *, base_model: str | None = None) -> Path:
    """One of our adapter folders as an official checkpoint folder (`write_official_checkpoint`)."""
    return write_official_checkpoint(src, dst, base_model=base_model)


def as_adapter_folder(path: str | Path, scratch: str | Path, top_k: TopK = None) -> Path:
    """`path` itself when it is one of our adapter folders, else the official checkpoint there converted into
    `scratch` (a folder the caller owns, e.g. a temporary one): what `mola-search analyze` reads."""
    if not is_official_checkpoint(path):
        return Path(path)
    return convert_official_to_adapter(path, Path(scratch) / "adapter", top_k)


def load_official_into(model: Any, path: str | Path) -> None:
    """Start a `MoLAModel` from an official checkpoint (`init_from`): its allocation, ranks, adapted modules and
    lora_alpha must be the model's; top-k is the model's own (the checkpoint does not record it)."""
    from mola_search.mola.model import MoLAModel

    if not isinstance(model, MoLAModel):
        raise UserError(f"`init_from` {path} is an official MoLA checkpoint but this run's method is "
                        f"'{getattr(model, 'method', type(model).__name__)}'; pass `method` mola")
    own = model.mola_config
    saved, tensors = read_official_checkpoint(path)  # its top-k (perhaps assumed) is not used: the run's is
    kinds = tuple(sorted({name.rsplit(".", 1)[-1] for name in model.mola_layers}))
    problems = []
    if (saved.experts, saved.rank) != (own.experts, own.rank):
        problems.append(f"its experts {list(saved.experts)} and ranks {list(saved.rank)} are not this run's "
                        f"{list(own.experts)} and {list(own.rank)} (pass `allocation` with its experts)")
    if tuple(sorted(saved.target_modules)) != kinds:
        problems.append(f"it adapts {list(saved.target_modules)}, this run {list(kinds)} (pass `target_modules`)")
    if saved.lora_alpha != own.lora_alpha:
        problems.append(f"its lora_alpha is {saved.lora_alpha:g}, this run's {own.lora_alpha:g} (pass `lora_alpha`)")
    if problems:
        raise UserError(f"`init_from` {path}: " + "; ".join(problems))
    model.load_adapter_weights(tensors)
