"""M_t as one servable artifact: its whole adapter chain in a single folder that an engine loads on the backbone.

A model of a run is a chain of LoRA adapters (lineage.py): M2 = base + a0 + a1 + a2, each adapter trained on the
weights with its parents merged in. An engine that serves LoRA adapters on the raw backbone (vLLM's
`LoRARequest`, a vLLM server's `--lora-modules`) applies one adapter, so serving M2 as `a2` alone would drop a0 and
a1. Because merging is additive on every linear layer, M_t's weights are W + sum_i s_i B_i A_i (s_i = alpha_i /
r_i, or alpha_i / sqrt(r_i) with rsLoRA), which is exactly one LoRA of rank sum(r_i) with B = [B_0 | B_1 | ...],
A = [s_0 A_0; s_1 A_1; ...] and scaling 1: peft's `add_weighted_adapter(..., combination_type="cat")`. Where that is
not exact (DoRA, biases, `modules_to_save`, rsLoRA on the first adapter, whose flag the concatenation inherits),
the artifact is the merged weights instead (export.py).

`MODEL/served/` holds the artifact and `esc_served.json` (its kind, rank, the chain it was built from); the marker
is written last, so a folder without it is unfinished and is written again. One-adapter chains (M0) are copied
as they are.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from esc_evolve.config import ModelSettings
from esc_evolve.errors import BackboneError
from esc_evolve.models.lineage import adapter_chain
from esc_evolve.storage import publish_folder, read_json, staging_folder, write_json_atomic

log = logging.getLogger(__name__)

SERVED_DIR = "served"
SERVED_FILE = "esc_served.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
COMBINED = "combined"  # the peft name of the concatenated adapter while it is built

Kind = Literal["lora", "merged"]


@dataclass(frozen=True)
class ServedArtifact:
    """What an engine loads for one model: a LoRA on `base` (kind 'lora') or a whole model folder ('merged')."""

    path: Path
    kind: Kind
    base: str
    rank: int | None  # the LoRA rank (kind 'lora'); vLLM sizes its buffers by it


def served_dir(adapter_dir: Path) -> Path:
    return Path(adapter_dir) / SERVED_DIR


def read_served(adapter_dir: Path) -> ServedArtifact | None:
    """The finished artifact of the model at `adapter_dir`, or None when it was never (completely) written."""
    folder = served_dir(adapter_dir)
    info = read_json(folder / SERVED_FILE)
    if not isinstance(info, dict) or info.get("kind") not in ("lora", "merged"):
        return None
    return ServedArtifact(folder, info["kind"], info["base"], info.get("rank"))


def ensure_served(model: ModelSettings, adapter_dir: Path) -> ServedArtifact:
    """The artifact of `adapter_dir`, written first when missing (runs made before artifacts existed)."""
    return read_served(adapter_dir) or write_served(model, adapter_dir)


def write_served(model: ModelSettings, adapter_dir: Path) -> ServedArtifact:
    """Write `adapter_dir/served/` for the chain ending at `adapter_dir` (see the module docstring)."""
    adapter_dir = Path(adapter_dir)
    base, chain = adapter_chain(adapter_dir)
    base = base or model.name
    configs = [_adapter_config(folder) for folder in chain]
    problem = cat_problem(configs)
    target = served_dir(adapter_dir)
    if problem is not None:
        return _write_merged(model, adapter_dir, base, chain, problem)
    staging = staging_folder(target)
    staging.mkdir(parents=True)
    try:
        if len(chain) == 1:
            for name in ADAPTER_FILES:
                shutil.copy2(chain[0] / name, staging / name)
        else:
            _write_concatenated(model, base, chain, staging)
        rank = int(_adapter_config(staging)["r"])
        write_json_atomic(staging / SERVED_FILE, _marker("lora", base, chain, rank))
        publish_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("served artifact of %s: one LoRA of rank %d from %d adapters -> %s", adapter_dir, rank, len(chain), target)
    return ServedArtifact(target, "lora", base, rank)


def cat_problem(configs: list[dict[str, Any]]) -> str | None:
    """Why concatenating these peft LoRA configs would not give exactly the chain's weights (None: it would)."""
    for index, config in enumerate(configs):
        if config.get("peft_type", "LORA") != "LORA":
            return f"adapter {index} is {config.get('peft_type')}, not LoRA"
        if config.get("use_dora"):
            return f"adapter {index} uses DoRA (a magnitude vector is not a sum of LoRA deltas)"
        if config.get("bias", "none") != "none" or config.get("lora_bias"):
            return f"adapter {index} trains biases, which a concatenated LoRA does not carry"
        if config.get("modules_to_save"):
            return f"adapter {index} saves whole modules ({config['modules_to_save']})"
        if config.get("target_parameters"):
            return f"adapter {index} targets parameters, which peft cannot concatenate"
    if len(configs) > 1 and configs[0].get("use_rslora"):
        # The concatenation copies the first config with alpha = r; with rsLoRA its scaling would be sqrt(r), not 1.
        return "the first adapter uses rsLoRA"
    if len({isinstance(c.get("target_modules"), str) for c in configs}) > 1:
        return "the adapters name their target modules as a mix of lists and patterns"
    return None


def _write_concatenated(model: ModelSettings, base: str, chain: list[Path], out: Path) -> None:
    """peft's exact `cat` combination of every adapter of `chain`, loaded side by side on the backbone."""
    from peft import PeftModel

    backbone = _load_backbone(model.model_copy(update={"name": base}))
    names = [f"a{i}" for i in range(len(chain))]
    peft_model = PeftModel.from_pretrained(backbone, str(chain[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], chain[1:], strict=True):
        peft_model.load_adapter(str(folder), adapter_name=name)
    peft_model.add_weighted_adapter(names, [1.0] * len(names), COMBINED, combination_type="cat")
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        peft_model.save_pretrained(scratch, selected_adapters=[COMBINED])  # peft writes it to scratch/combined/
        for name in ADAPTER_FILES:
            shutil.move(str(Path(scratch) / COMBINED / name), out / name)


def _load_backbone(model: ModelSettings) -> Any:
    """The backbone on the CPU (the GPU may still hold a trainer): only its module structure matters here, the
    LoRA weights stay fp32 (peft's autocast) whatever the backbone's dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    from esc_evolve.models.backbone import resolve_backbone
    from esc_evolve.models.loading import select_dtype

    source = resolve_backbone(model.name, model.cache_dir)
    dtype = select_dtype(model.dtype, torch.device("cpu"))
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, revision=model.revision, dtype=dtype, trust_remote_code=model.trust_remote_code
        )
    except OSError as exc:
        raise BackboneError(f"cannot load {model.name!r} ({source}): {exc}") from None


def _write_merged(model: ModelSettings, adapter_dir: Path, base: str, chain: list[Path], why: str) -> ServedArtifact:
    from esc_evolve.models.export import export_merged

    log.info("served artifact of %s: merged weights (%s, so a concatenated LoRA would not be exact)", adapter_dir, why)
    target = served_dir(adapter_dir)
    (target / SERVED_FILE).unlink(missing_ok=True)  # unfinished until the marker is written again
    export_merged(model, adapter_dir, target, force=True)
    write_json_atomic(target / SERVED_FILE, {**_marker("merged", base, chain, None), "why": why})
    return ServedArtifact(target, "merged", base, None)


def _marker(kind: Kind, base: str, chain: list[Path], rank: int | None) -> dict[str, Any]:
    """The marker's content; the chain relative to the artifact, so a moved run directory stays readable."""
    import os

    here = chain[-1] / SERVED_DIR
    return {"kind": kind, "base": base, "rank": rank, "chain": [os.path.relpath(f, here) for f in chain]}


def _adapter_config(folder: Path) -> dict[str, Any]:
    file = folder / "adapter_config.json"
    if not file.is_file():
        raise BackboneError(f"{folder} is not a LoRA adapter folder (no adapter_config.json)")
    return json.loads(file.read_text(encoding="utf-8"))
