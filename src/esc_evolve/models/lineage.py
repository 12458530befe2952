"""Models as chains of LoRA adapters: M0 = base + a0, M1 = M0 + a1, M2 = M1 + a2.

Each iteration trains a fresh adapter on top of M_t with M_t's adapter merged into the weights, so M_t is both
the starting point and the DPO reference. Storing each model as its adapter plus a pointer to its parent keeps a
run small (one adapter per model, not one full copy of the weights); loading merges the parents in order.

Every adapter folder written by esc-evolve holds `esc_lineage.json`: the base model name and the parent adapter
folder (relative to this one), or null for M0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from esc_evolve.errors import BackboneError

LINEAGE_FILE = "esc_lineage.json"


def write_lineage(adapter_dir: Path, base: str, parent: Path | None) -> None:
    relative = None
    if parent is not None:
        relative = str(Path(_relpath(parent.resolve(), adapter_dir.resolve())))
    (adapter_dir / LINEAGE_FILE).write_text(json.dumps({"base": base, "parent": relative}, indent=2) + "\n")


def adapter_chain(adapter_dir: str | Path) -> tuple[str | None, list[Path]]:
    """(base model name, adapter folders from the root to `adapter_dir`). A plain peft folder: (None, [it])."""
    chain: list[Path] = []
    current: Path | None = Path(adapter_dir).expanduser().resolve()
    base = None
    while current is not None:
        if not (current / "adapter_config.json").is_file():
            raise BackboneError(f"{current} is not a LoRA adapter folder (no adapter_config.json)")
        if current in chain:
            raise BackboneError(f"adapter lineage loops at {current}")
        chain.append(current)
        info = _read(current)
        base = info.get("base", base) if base is None else base
        parent = info.get("parent")
        current = (current / parent).resolve() if parent else None
    return base, chain[::-1]


def apply_chain(model: Any, chain: list[Path], merge_last: bool = False) -> Any:
    """Merge every adapter but the last into the weights; attach the last (merged too if asked)."""
    from peft import PeftModel

    for index, folder in enumerate(chain):
        model = PeftModel.from_pretrained(model, str(folder))
        if index < len(chain) - 1 or merge_last:
            model = model.merge_and_unload()
    return model


def base_of(adapter_dir: Path) -> str:
    """The base model peft recorded in a plain adapter folder (for folders without a lineage file)."""
    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def _read(folder: Path) -> dict[str, Any]:
    file = folder / LINEAGE_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def _relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target, start)
