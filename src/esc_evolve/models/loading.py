"""Load a backbone (and optionally a LoRA adapter) on the right device with the right dtype."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from esc_evolve.config import ModelSettings
from esc_evolve.errors import BackboneError
from esc_evolve.models.backbone import resolve_backbone
from esc_evolve.models.lineage import adapter_chain, apply_chain

log = logging.getLogger(__name__)


def select_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise BackboneError("model.device is 'cuda' but no CUDA device is available")
    return torch.device(requested)


def select_dtype(requested: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 is emulated there and ~10x slower); bf16 on GPUs that have it, else fp16."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(config: ModelSettings, adapter: str | Path | None = None) -> Any:
    """The tokenizer of a model: the one saved with its adapter when there is one (training may change the chat
    template), else the backbone's. Every prompt of a model is rendered with what this returns."""
    from transformers import AutoTokenizer

    folder = Path(adapter) if adapter is not None else None
    if folder is not None and (folder / "tokenizer_config.json").is_file():
        source, revision = str(folder), None
    else:
        if folder is not None:
            config = _config_of_adapter(config, folder)
        source, revision = resolve_backbone(config.name, config.cache_dir), config.revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=config.trust_remote_code)
    except OSError as exc:
        raise BackboneError(f"cannot load the tokenizer of {config.name!r} ({source}): {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ModelSettings, adapter: str | Path | None = None, merge: bool = False) -> tuple[Any, Any]:
    """Return (model, tokenizer) in eval mode on the selected device.

    `adapter` is a LoRA folder; if it was written by esc-evolve (M1, M2, ...), its parent adapters are merged in
    first and its recorded base model is used. `merge` also merges the last adapter (faster inference, and the
    starting point for training the next adapter).
    """
    from transformers import AutoModelForCausalLM

    chain: list[Path] = []
    if adapter is not None:
        config = _config_of_adapter(config, Path(adapter))
        chain = adapter_chain(adapter)[1]
    device = select_device(config.device)
    dtype = select_dtype(config.dtype, device)
    source = resolve_backbone(config.name, config.cache_dir)
    tokenizer = load_tokenizer(config, adapter)
    extra = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=config.revision,
            dtype=dtype,
            trust_remote_code=config.trust_remote_code,
            **extra,
        )
    except OSError as exc:
        raise BackboneError(f"cannot load {config.name!r} ({source}): {exc}") from None
    if chain:
        model = apply_chain(model, chain, merge_last=merge)
    model.to(device).eval()
    log.info("loaded %s on %s as %s", config.name, device, dtype)
    return model, tokenizer


def _config_of_adapter(config: ModelSettings, adapter: Path) -> ModelSettings:
    """`config` with the base model the adapter chain was trained on (written in its lineage file)."""
    base, _ = adapter_chain(adapter)
    if base and base != config.name:
        log.info("adapter %s was trained on %s; loading that base instead of %s", adapter, base, config.name)
        return config.model_copy(update={"name": base})
    return config
