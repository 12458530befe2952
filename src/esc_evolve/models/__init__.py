"""Backbone resolution (aliases, GGUF conversion, hub ids), device/dtype choice, loading with adapters."""

from esc_evolve.models.backbone import resolve_backbone
from esc_evolve.models.loading import load_model, load_tokenizer, select_device, select_dtype

__all__ = ["load_model", "load_tokenizer", "resolve_backbone", "select_device", "select_dtype"]
