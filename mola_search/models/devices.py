"""Device and dtype names: what `device` and `dtype` accept, and what ``auto`` picks on this machine."""

from __future__ import annotations

import torch

from mola_search.errors import UserError

DTYPES: tuple[str, ...] = ("auto", "bf16", "fp32", "fp16")
"""Accepted ``dtype`` names; see ``resolve_dtype`` for what ``auto`` picks."""

DEVICE_CHOICES = "auto, cpu, cuda or cuda:<index>"

_EXPLICIT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def default_device() -> torch.device:
    """CUDA when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def dtype_name(dtype: torch.dtype) -> str | None:
    """The short name (``bf16``, ``fp32``, ``fp16``) of a torch dtype, None for any other."""
    return next((name for name, value in _EXPLICIT_DTYPES.items() if value == dtype), None)
