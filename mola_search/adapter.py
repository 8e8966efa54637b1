"""The one contract every fine-tuning method implements: MoLA (`mola.MoLAModel`) and the baselines (`methods`).

It lives this low (beside `models`, below `mola`) so `MoLAModel` can subclass it without importing
`methods`; the registry that maps a saved folder's kind to its class is `methods.ADAPTERS`.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mola_search._io import atomic_write_text, json_safe

METHOD_FILE = "mola_method.json"
"""The kind record: written into every saved adapter folder, whatever its method (see `Adapter.save_adapter`)."""


class Adapter(nn.Module, abc.ABC):
    """Base class of the fine-tuning methods: a frozen base model plus the parameters one method trains.

    mola-search compares MoLA with four baselines (LoRA, prompt tuning, LLaMA-Adapter, full
    fine-tuning). The trainer, the scorers, the run folder and `init_from` treat them all alike
    through this class, so a method is added by subclassing it and registering the subclass
    (`methods.register`); nothing else needs to know the method exists.

    Note:
        The call order for an adapter, as `train.run.execute` drives it:

        1. Build it on a base model, which it modifies in place and freezes:
           `mola.get_mola_model` / `MoLAModel(base, config)`, or `methods.build_baseline(config, base)`.
        2. Optionally start from a saved adapter: `methods.load_adapter_into(model, folder)` reads the
           folder's kind record, checks it names this class's `kind`, then calls `load_adapter`.
        3. Train: the optimizer gets `trainable_parameters()`; each forward is
           ``model(input_ids, attention_mask, position_ids, logits_to_keep=k).logits``, and the
           loss adds `auxiliary_loss()` when it is not None.
        4. Describe the run: `num_trainable()`, `num_base()` and `method_info`.
        5. `save_adapter(folder, **metadata)`: the method's own files (`write_adapter_files`), then
           the kind record `mola_method.json` (`adapter_record`), written last.

    Subclasses must set `kind` and implement `write_adapter_files` and `load_adapter`; the other
    members have defaults that suit a method whose base weights stay frozen and that adds no loss term.
    """

    kind: ClassVar[str]
    """The method's name as `method` spells it ("mola", "lora", ...), recorded in every folder it saves."""

    # --- what training needs ------------------------------------------------------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the optimizer moves: those with ``requires_grad``."""
        return (p for p in self.parameters() if p.requires_grad)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def num_base(self) -> int:
        """Parameter count of the base model. Default: every frozen parameter; a method that trains
        base weights (full fine-tuning) or adds frozen ones overrides it."""
        return sum(p.numel() for p in self.parameters() if not p.requires_grad)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """A term the training loop adds to the task loss after each forward (MoLA's load balancing);
        None: nothing to add."""
        return None

    @property
    def method_info(self) -> dict[str, Any]:
        """What a run record should say about how the method was set up (rank rule, upcasts, ...);
        empty when there is nothing beyond the allocation."""
        return {}

    @property
    def base_model_name(self) -> str:
        """The base model's name as the run gave it, for the kind record."""
        return ""

    # --- saving and loading -------------------------------------------------------
    def save_adapter(self, folder: str | Path, **metadata: Any) -> Path:
        """Write the adapter into `folder` (created if needed): the method's files, then the kind record.

        `metadata` (e.g. ``task="mrpc"``) is kept in the record, and by MoLA in its config's `extra`.
        Returns the folder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.write_adapter_files(folder, metadata)
        record = json_safe(self.adapter_record(metadata))
        atomic_write_text(folder / METHOD_FILE, json.dumps(record, indent=2, default=str, allow_nan=False) + "\n")
        return folder

    def save_pretrained(self, folder: str | Path, **metadata: Any) -> Path:
        """`save_adapter` under PEFT's name."""
        return self.save_adapter(folder, **metadata)

    def adapter_record(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """The kind record's content: `kind` (what loading dispatches on), then a description of the run."""
        return {"kind": self.kind, "method": self.kind, "base_model": self.base_model_name, **self.method_info,
                "trainable_params": self.num_trainable(), "base_params": self.num_base(), "metadata": metadata}

    @abc.abstractmethod
    def write_adapter_files(self, folder: Path, metadata: dict[str, Any]) -> None:
        """Write the method's weights (and its own config) into the existing `folder`."""

    @abc.abstractmethod
    def load_adapter(self, folder: Path) -> None:
        """Load the weights saved in `folder` into this already built adapter; a folder that does not fit
        (another allocation, rank, depth or model) is a one-line `UserError`."""
