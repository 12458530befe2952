"""The whole pipeline on a tiny model, with pairs worth keeping.

A random tiny model never writes a reflection that parses, so every pair would be dropped and each DPO stage
would only copy its parent. The `scripted` generation backend answers reflection fields and refinements from a
script and passes everything else (drafts y, evaluation replies, the smoke reply) to the real transformers
engine on the tiny model. Select it with `generation.backend=scripted` after `register_scripted_backend()`;

    python -m tests.pipeline_fixtures run CONFIG [--set KEY=VALUE ...] [--resume]

is `esc-evolve run` with it registered, for tests that run the pipeline in a subprocess (run from the repository
root); a stage run in its own process (`run.stage_processes`) is started through this module too. All text here
is written for the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from esc_evolve.generation.types import GenerationRequest, GenerationResult, Generator

SCRIPTED = "scripted"
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quickstart.yaml"

FIELD_ANSWERS = {
    "emotion": " anxious.",
    "intensity": " 4",
    "situation": " a contract that may not be renewed.",
    "profile": " keeps things short.",
    "need": " reassurance.",
    "critique": " named the contract and the wait.",
}
REFINED = (
    "Waiting to hear must be exhausting. What would help most right now?",
    "That sounds like a lot to carry on your own. What has been the hardest part?",
    "It makes sense that this weighs on you. Who could you lean on this week?",
    "You have been dealing with so much. What would make tomorrow a little easier?",
)


SITUATION_LINE = re.compile(r"^The person is dealing with (.*)$", re.MULTILINE)
QUOTED_SEEKER = re.compile(r'^Person: "(.*)"$', re.MULTILINE)


def is_refinement(request: GenerationRequest) -> bool:
    """A refinement request: its system message carries the reflection (see evolve/refinement.py)."""
    messages = request.messages or []
    return bool(messages) and "What you noticed about this person" in messages[0]["content"]


def field_answer(request: GenerationRequest) -> str:
    """A reflection field's scripted answer. The situation names the content words of what the seeker said in the
    question's conversation (as a model that read it would), so it is grounded; a seeker who said nothing specific
    ("hey") gets FIELD_ANSWERS' situation, which names nothing they said: generic, and the pair is dropped."""
    name = str(request.id).rsplit(":", 1)[1]
    if name != "situation":
        return FIELD_ANSWERS[name]
    from esc_evolve.evolve.grounding import content_words

    said = QUOTED_SEEKER.findall((request.messages or [])[-1]["content"])
    found = list(dict.fromkeys(w for text in said for w in content_words(text)))[:4]
    return f" what they told me about {' '.join(found)}." if found else FIELD_ANSWERS["situation"]


def using_the_reflection(reply: str, request: GenerationRequest) -> str:
    """`reply`, naming the situation the refinement's system message carries (as a refinement that uses the
    reflection does); `reply` alone when the message carries none."""
    from esc_evolve.evolve.grounding import content_words

    found = SITUATION_LINE.findall((request.messages or [{}])[0].get("content", ""))
    named = content_words(found[0])[:3] if found else []
    return f"{reply} You mentioned {' and '.join(named)}." if named else reply


def refined_reply(request: GenerationRequest) -> str:
    """One of REFINED, chosen by the seeker's last message (hashlib: the same in every process), naming the
    reflected situation."""
    said = (request.messages or [])[-1]["content"]
    reply = REFINED[int(hashlib.sha256(said.encode("utf-8")).hexdigest(), 16) % len(REFINED)]
    return using_the_reflection(reply, request)


class ScriptedReflections(Generator):
    """Reflection fields and refinements from the script; every other request to `real`."""

    def __init__(self, real: Generator) -> None:
        self.real = real
        self.tokenizer = real.tokenizer
        self.max_context = getattr(real, "max_context", None)

    def generate(self, requests: Sequence[GenerationRequest], progress: bool = True) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        passed = []
        for index, request in enumerate(requests):
            if request.continuation:  # a reflection field, answered after its prefix
                results[index] = GenerationResult(field_answer(request), 5, "stop_string", request.id)
            elif is_refinement(request):
                results[index] = GenerationResult(refined_reply(request), 20, "stop", request.id)
            else:
                passed.append(index)
        if passed:
            answers = self.real.generate([requests[i] for i in passed], progress=progress)
            for index, answer in zip(passed, answers, strict=True):
                results[index] = answer
        return [r for r in results if r is not None]

    def close(self) -> None:
        self.real.close()


def register_scripted_backend() -> None:
    """Register `scripted` (once per process)."""
    from esc_evolve.generation.factory import BACKENDS, register_backend

    if SCRIPTED in BACKENDS.entries:
        return

    @register_backend(SCRIPTED)
    def _scripted(model: Any, generation: Any, adapter: Path | None, seed: int) -> Generator:
        return ScriptedReflections(BACKENDS.get("transformers")(model, generation, adapter, seed))


def tiny_run_overrides(output_dir: Path, model_dir: Path, iterations: int = 2) -> list[str]:
    """`--set` values for a quick run of configs/quickstart.yaml on a tiny model (a few seconds a stage), with
    the scripted backend: every stage does real work, DPO included."""
    return [
        f"run.output_dir={output_dir}",
        f"model.name={model_dir}",
        f"generation.backend={SCRIPTED}",
        "generation.max_new_tokens=8",
        "generation.batch_size=2",  # pairs are appended per chunk of 2 contexts
        "data.context_window=3",  # reflection prompts quote the context: keep them inside the tiny model's 512
        "sft.max_steps=4",
        "sft.save_steps=2",
        "sft.max_eval_samples=4",
        "sft.max_length=256",
        "sft.learning_rate=0.01",  # steps large enough that every adapter visibly moves
        "sft.warmup_ratio=0",
        "sft.bf16=false",  # the same numerics on every CPU
        f"evolve.iterations={iterations}",
        "evolve.contexts_per_iteration=4",
        "dpo.max_steps=2",
        "dpo.save_steps=1",
        "dpo.gradient_accumulation_steps=1",
        "dpo.max_length=256",
        "dpo.learning_rate=0.005",
        "dpo.warmup_ratio=0",
        "dpo.bf16=false",
        "eval.max_contexts=6",
        "eval.bootstrap_samples=20",
    ]


def set_args(overrides: list[str]) -> list[str]:
    return [arg for value in overrides for arg in ("--set", value)]


# ---------------------------------------------------------------------------------------------------------
# The pipeline in a subprocess, and what two runs must have in common


def run_command(output_dir: Path, model_dir: Path, iterations: int, extra: Sequence[str] = ()) -> list[str]:
    """`esc-evolve run ... --resume` with the scripted backend (--resume also starts a new run)."""
    overrides = [*tiny_run_overrides(output_dir, model_dir, iterations), *extra]
    return [sys.executable, "-m", "tests.pipeline_fixtures", "run", str(CONFIG), *set_args(overrides), "--resume"]


def run_env(hash_seed: int) -> dict[str, str]:
    """The environment of a pipeline subprocess: its own hash seed, one torch thread (the same numerics on any
    machine load), no network."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PYTHONHASHSEED": str(hash_seed),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }


def run_to_end(
    output_dir: Path, model_dir: Path, hash_seed: int, iterations: int = 1, extra: Sequence[str] = ()
) -> Path:
    """Run the tiny pipeline to its end in a fresh process; the run directory."""
    log = output_dir / f"process-{hash_seed}.log"
    output_dir.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run(
            run_command(output_dir, model_dir, iterations, extra),
            cwd=REPO,
            env=run_env(hash_seed),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    assert done.returncode == 0, log.read_text()[-4000:]
    return output_dir / "quickstart"


# Summary fields that differ between two runs of one config by design: clocks, throughput, where a resumed
# session started, and the run's own path.
VOLATILE = {
    "finished",
    "created",
    "wall_seconds",
    "setup_seconds",
    "session_seconds",
    "session_steps",
    "session_tokens",
    "tokens_per_second",
    "samples_per_second",
    "train_loss_session_mean",
    "resumed_from_step",
    "git_commit",
}


def comparable(value: Any, root: Path) -> Any:
    """`value` (parsed JSON) without VOLATILE keys, the run directory's path replaced by RUN."""
    if isinstance(value, dict):
        return {k: comparable(v, root) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [comparable(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(str(root), "RUN")
    return value


def results_of(run_dir: Path) -> dict[str, Any]:
    """What a run produced: every JSON-lines file (pairs, preference pairs, responses) as text, every adapter's
    tensors, metrics.json and stages.json (both through `comparable`)."""
    from safetensors.torch import load_file

    adapters = sorted(run_dir.glob("m0/adapter_model.safetensors")) + sorted(
        run_dir.glob("iter*/m*/adapter_model.safetensors")
    )
    return {
        "jsonl": {str(f.relative_to(run_dir)): f.read_text(encoding="utf-8") for f in sorted(run_dir.rglob("*.jsonl"))},
        "adapters": {str(f.parent.relative_to(run_dir)): load_file(f) for f in adapters},
        "metrics": comparable(json.loads((run_dir / "metrics.json").read_text()), run_dir),
        "stages": comparable(json.loads((run_dir / "stages.json").read_text()), run_dir),
    }


def assert_same_results(got: dict[str, Any], expected: dict[str, Any], atol: float = 0.0) -> None:
    """Equal results; adapter weights may differ by `atol` (0: bit for bit)."""
    import torch

    assert got["jsonl"].keys() == expected["jsonl"].keys()
    for name, text in expected["jsonl"].items():
        assert got["jsonl"][name] == text, name
    assert got["adapters"].keys() == expected["adapters"].keys()
    for model, tensors in expected["adapters"].items():
        assert got["adapters"][model].keys() == tensors.keys(), model
        for key, tensor in tensors.items():
            torch.testing.assert_close(got["adapters"][model][key], tensor, atol=atol, rtol=0, msg=f"{model} {key}")
    assert got["stages"] == expected["stages"], differences(got["stages"], expected["stages"])
    assert got["metrics"] == expected["metrics"], differences(got["metrics"], expected["metrics"])


def differences(got: Any, expected: Any, path: str = "") -> list[str]:
    """Where two parsed JSON values differ, as `path: got != expected` lines (for a readable failure)."""
    if isinstance(got, dict) and isinstance(expected, dict):
        keys = sorted(set(got) | set(expected))
        return [d for k in keys for d in differences(got.get(k), expected.get(k), f"{path}/{k}")]
    if isinstance(got, list) and isinstance(expected, list) and len(got) == len(expected):
        return [
            d for i, (g, e) in enumerate(zip(got, expected, strict=True)) for d in differences(g, e, f"{path}[{i}]")
        ]
    return [] if got == expected else [f"{path}: {got!r} != {expected!r}"]


if __name__ == "__main__":
    register_scripted_backend()
    from esc_evolve.cli.app import main
    from esc_evolve.pipeline import processes

    processes.ENTRY_MODULE = "tests.pipeline_fixtures"  # stages in their own processes have `scripted` too

    main()
