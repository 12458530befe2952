"""Models: the one loading path for every stage.

`backbone.py` resolves a name (alias, with its GGUF converted once; local folder; hub id); `lineage.py` stores
M_t as a chain of LoRA adapters; `loading.py` picks device and dtype and loads a model with its adapter chain, and
its tokenizer (the adapter's own when it saved one), so that prompts are rendered with the tokenizer that
generates from them. `served.py` writes each model's whole chain as one artifact an engine serves on the
backbone (`MODEL/served/`); `export.py` writes one merged folder.
"""

from esc_evolve.models.backbone import resolve_backbone
from esc_evolve.models.loading import load_model, load_tokenizer, select_device, select_dtype

__all__ = ["load_model", "load_tokenizer", "resolve_backbone", "select_device", "select_dtype"]
