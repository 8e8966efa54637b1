"""Hand an allocation to the official MoLA code (GCYZSL/MoLA), and refuse when it cannot run there.

What the official code accepts, as read from its source (`mola_training.py`,
`src/mola_modeling_llama_hacked.py`, `src/mola_lora_hacked.py`; transformers pinned at 4.28.0):

* It builds `LlamaForCausalLM_d`, its own copy of the LLaMA modelling code, and loads the
  tokenizer with `LlamaTokenizer`: LLaMA checkpoints only.
* Its `LlamaAttention` gives `k_proj` and `v_proj` `num_heads * head_dim` outputs with
  `head_dim = hidden_size // num_heads` (no grouped-query attention), its linears have no bias,
  and its rotary embedding is `LlamaRotaryEmbedding(head_dim)`: base 10000 and no scaling,
  whatever the checkpoint's config says.
* The depth is not fixed: the decoder stack has `config.num_hidden_layers` layers, each adapted
  linear takes its layer index from its module name and its experts from
  `number_experts[index]`. "32" appears only in default argument values, which the exported
  flags replace, so a 40-layer LLaMA runs as well as LLaMA-2-7B's 32 layers; an allocation must
  have as many layers as the model.
* The balance loss (`load_balancing_loss_func`) is added only with `obalance=True` (off by default
  in `mola_training.py`), weighted by `router_aux_loss_coef = 0.001`, a constant in
  `LlamaForCausalLM_d.__init__` that no flag changes. It is what `balance_loss="official"`
  computes here.
* It loads the tokenizer with `LlamaTokenizer.from_pretrained(base_model)`, the slow SentencePiece one:
  the model folder needs a `tokenizer.model` (a `tokenizer.json` alone does not do).

Read at commit 01785c84c70846999638b11b88409fdf86361d9a (`OFFICIAL_COMMIT`). The rest of the export lives
beside this module: `official_training` (a study's training as train() flags), `official_data` (the dataset
layout), `official_checkpoint` (checkpoints both ways) and `official_export` (the folder the user runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from mola_search.allocation import AllocationSpec, to_mola_flags
from mola_search.allocation.spec import OFFICIAL_TARGET_MODULES
from mola_search.errors import UserError
from mola_search.mola.config import OFFICIAL, OFFICIAL_AUX_COEF

OFFICIAL_COMMIT = "01785c84c70846999638b11b88409fdf86361d9a"
"""The commit of https://github.com/GCYZSL/MoLA whose code the official formats were read from."""
OFFICIAL_REPO = "https://github.com/GCYZSL/MoLA"
OFFICIAL_ROPE_THETA = 10000.0
__all__ = ["OFFICIAL_AUX_COEF", "OFFICIAL_COMMIT", "OFFICIAL_REPO", "base_model_config", "check_official_model",
           "official_flags", "official_model_problems", "official_tokenizer_problem"]


class AdapterSettings(Protocol):
    """What the flags carry besides the allocation; a `MoLAConfig` and a `RunConfig` both have it."""

    lora_alpha: float
    lora_dropout: float
    aux_loss_coef: float
    balance_loss: str
    target_modules: tuple[str, ...]


def official_flags(spec: AllocationSpec, model: str,
                   settings: AdapterSettings | None) -> tuple[str, list[str]]:
    """Flags for the official `mola_training.py` that train `spec` on `model` with `settings`, and notes.

    The notes say where the official code cannot do what `settings` did (our per-module balance loss,
    another balance coefficient), or that `settings` are unknown (None: the script's defaults stay);
    they are for a reader, not for the script. A model or allocation the official code cannot run is a
    one-line `UserError` naming every reason.
    """
    targets = check_official_model(spec, model, None if settings is None else settings.target_modules)
    if settings is None:
        return to_mola_flags(spec, base_model=model), [
            "how the study trained its allocations is not recorded, so lora_alpha, lora_dropout and the balance "
            "loss (obalance) are left at the official script's defaults"]
    obalance, notes = _balance(settings)
    flags = to_mola_flags(spec, base_model=model, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                          lora_target_modules=targets, obalance=obalance)
    return flags, notes


def _balance(settings: AdapterSettings) -> tuple[bool, list[str]]:
    """`obalance` for the official script, and what it cannot reproduce (`official_training.balance_flag`)."""
    from mola_search.mola.config import canonical_balance_loss

    return balance_flag(canonical_balance_loss(settings.balance_loss), settings.aux_loss_coef)


def check_official_model(spec: AllocationSpec, model: str, target_modules: Any = None) -> list[str]:
    """The official kinds among `target_modules` (None: all seven), in the official order, when the official
    code can train `spec` on `model`; else a one-line UserError naming every reason (architecture, depth,
    no adaptable module)."""
    config = base_model_config(model)
    problems = official_model_problems(config)
    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None and layers != spec.num_layers:
        problems.append(f"the allocation has {spec.num_layers} layers and the model {layers}")
    targets = [t for t in OFFICIAL_TARGET_MODULES.split(",") if target_modules is None or t in target_modules]
    if not targets:
        problems.append(f"none of the adapted modules {list(target_modules)} is one the official code "
                        f"adapts ({OFFICIAL_TARGET_MODULES})")
    if problems:
        raise UserError(f"the official MoLA code cannot train this allocation on '{model}': " + "; ".join(problems))
    return targets


def official_tokenizer_problem(model: str) -> str | None:
    """Why the official `LlamaTokenizer.from_pretrained(model)` cannot load `model`'s tokenizer (None if it can,
    or if that cannot be told: a Hub model while offline). It needs the SentencePiece `tokenizer.model`."""
    from mola_search.models import DEFAULT_MODEL, tiny_layers

    name = (model or "").strip()
    if not name or name.lower() == DEFAULT_MODEL or tiny_layers(name) is not None:
        return (f"'{name or DEFAULT_MODEL}' uses the embedded SmolLM2 tokenizer, a tokenizer.json without the "
                "SentencePiece tokenizer.model that the official LlamaTokenizer loads")
    folder = Path(name).expanduser()
    if folder.is_dir():
        if (folder / "tokenizer.model").is_file():
            return None
        return (f"'{name}' has no tokenizer.model (SentencePiece), which the official LlamaTokenizer loads "
                "(a tokenizer.json alone does not do)")
    return _hub_tokenizer_problem(name)


def _hub_tokenizer_problem(repo: str) -> str | None:
    """`official_tokenizer_problem` for a Hub id: the local cache first, then the Hub when it is reachable."""
    import huggingface_hub

    from mola_search.hub import offline_reason

    try:
        cached = huggingface_hub.try_to_load_from_cache(repo, "tokenizer.model")
        if isinstance(cached, str):
            return None
        if cached is None and offline_reason():
            return None  # cannot tell: the official script will say so itself
        if cached is None and huggingface_hub.file_exists(repo, "tokenizer.model"):
            return None
    except Exception:  # an invalid repo id, a Hub error: not ours to refuse on
        return None
    return (f"the Hub model '{repo}' has no tokenizer.model (SentencePiece), which the official LlamaTokenizer "
            "loads")


def official_model_problems(config: Any) -> list[str]:
    """Why the official LLaMA code cannot load and run a model with this Hugging Face config ([] if it can)."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        return [f"it is a '{model_type}' model and the official code builds LLaMA only (LlamaForCausalLM_d)"]
    problems = []
    heads, hidden = config.num_attention_heads, config.hidden_size
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if kv_heads != heads:
        problems.append(f"it uses grouped-query attention ({kv_heads} key/value heads for {heads} query heads), "
                        "while the official attention has one key/value head per query head")
    if (getattr(config, "head_dim", None) or hidden // heads) != hidden // heads:
        problems.append(f"its head_dim {config.head_dim} is not hidden_size / num_attention_heads, "
                        "which the official attention assumes")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", OFFICIAL_ROPE_THETA)))
    if theta != OFFICIAL_ROPE_THETA or rope.get("rope_type", "default") != "default":
        problems.append(f"its rotary embedding (theta {theta:g}, type {rope.get('rope_type', 'default')}) is not the "
                        f"official code's fixed theta {OFFICIAL_ROPE_THETA:g} without scaling")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("its projections have biases, the official ones none")
    return problems


def base_model_config(model: str) -> Any:
    """The Hugging Face config of a model name as mola_search accepts it (models.py), without its weights."""
    from transformers import AutoConfig

    from mola_search.hub import offline_reason
    from mola_search.models import resolve_model_source, tiny_layers, tiny_llama

    layers = tiny_layers(model)
    if layers is not None:  # built in code: no config file anywhere
        return tiny_llama(num_layers=layers).config
    source = resolve_model_source(model)
    offline = {"local_files_only": True} if not Path(source).is_dir() and offline_reason() else {}
    try:
        return AutoConfig.from_pretrained(source, **offline)
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot tell whether the official MoLA code runs '{model}': its config could not be "
                        f"read ({reason})") from None


def balance_flag(balance_loss: str, coef: float) -> tuple[bool, list[str]]:
    """`obalance` for the official script, and what it cannot reproduce of the study's balance loss."""
    if coef == 0:
        return False, []
    if balance_loss == OFFICIAL:
        if coef == OFFICIAL_AUX_COEF:
            return True, []
        return True, [f"the balance loss was weighted {coef:g}; the official code always weights it "
                      f"{OFFICIAL_AUX_COEF:g} (router_aux_loss_coef, no flag)"]
    return False, [f"trained with the per-module balance loss (coefficient {coef:g}), which the official code "
                   "does not have: these flags turn its balance loss off; --obalance True would add its own "
                   f"(pooled per decoder layer, summed over layers, coefficient {OFFICIAL_AUX_COEF:g}) instead"]
