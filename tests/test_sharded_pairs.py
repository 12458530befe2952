"""Sharded pair generation: N workers each write the contexts of their shard, a merge writes pairs.jsonl, and the
result is byte for byte the one a single worker writes (transformers backend, tiny model, sampled drafts)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from esc_evolve.cli.app import app
from esc_evolve.config import load_config
from esc_evolve.errors import ConfigError, RunBusyError
from esc_evolve.evolve.loop import generate_pairs
from esc_evolve.evolve.pairs import parse_shard, select_shard, shard_file, shard_files, shard_lock_file, shard_of
from esc_evolve.generation.types import GenerationResult, Generator
from esc_evolve.models.lineage import write_lineage
from esc_evolve.pipeline import RunDir, RunLayout, RunLock
from esc_evolve.pipeline.stages import pairs as pairs_stage
from tests.test_evolve_loop import NoRiskDetector, select_contexts

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _overrides(root: Path, name: str, model_dir: Path) -> list[str]:
    return [
        f"run.output_dir={root}",
        f"run.name={name}",
        f"model.name={model_dir}",
        "model.device=cpu",
        "generation.batch_size=1",  # each prompt alone: no batch neighbour can change a logit in the last bit
        "generation.max_new_tokens=4",
        "generation.temperature=0.8",  # drafts are sampled: their seeds must not depend on the worker
        "evolve.contexts_per_iteration=6",
        "evolve.reflection_max_new_tokens=3",
        "data.context_window=3",
    ]


def _make_run(root: Path, name: str, model_dir: Path, m0: Path | None = None) -> RunDir:
    """A run directory with config.yaml and an M0 (a random LoRA, or a copy of `m0`)."""
    config = load_config(REPO / "configs" / "quickstart.yaml", _overrides(root, name, model_dir))
    run = RunDir.create(config)
    target = run.layout.model_dir(0)
    if m0 is not None:
        shutil.copytree(m0, target)
        return run
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora).save_pretrained(target)
    write_lineage(target, str(model_dir), None)
    return run


@pytest.fixture
def no_risk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The packaged risk detector is not what these tests are about (and costs seconds per load)."""
    monkeypatch.setattr("esc_evolve.evolve.loop.default_detector", NoRiskDetector)


def test_two_shards_merged_equal_one_worker(tmp_path: Path, varied_model_dir: Path, no_risk: None) -> None:
    sharded = _make_run(tmp_path, "sharded", varied_model_dir)
    single = _make_run(tmp_path, "single", varied_model_dir, m0=sharded.layout.model_dir(0))
    pairs_file = sharded.layout.pairs_file(1)
    sizes = [pairs_stage(sharded, 1, shard=(k, 2))["contexts"] for k in (0, 1)]
    assert sorted(sizes) != [0, 6] and sum(sizes) == 6  # both workers had work
    assert len(shard_files(pairs_file)) == 2 and not pairs_file.exists()
    merged = pairs_stage(sharded, 1)
    assert shard_files(pairs_file) == []  # folded in and removed
    alone = pairs_stage(single, 1)
    assert merged["contexts"] == alone["contexts"] == 6
    assert pairs_file.read_bytes() == single.layout.pairs_file(1).read_bytes()
    assert sharded.layout.preference_file(1).read_bytes() == single.layout.preference_file(1).read_bytes()


class SeedRecorder(Generator):
    """Answers every request with the same text and records the seed each draft carried."""

    tokenizer = None

    def __init__(self) -> None:
        self.draft_seeds: dict[str, int | None] = {}

    def generate(self, requests, progress=True):
        for r in requests:
            is_probe = str(r.id).startswith("probe:")  # M_t's drafts for the probes of generic answers
            if not r.continuation and "What you noticed" not in r.messages[0]["content"] and not is_probe:
                self.draft_seeds[r.id] = r.seed
        return [GenerationResult("I hear you. How are you feeling today?", 9, "stop", r.id) for r in requests]


def test_a_draft_s_seed_depends_on_its_sample_not_its_place(tmp_path: Path) -> None:
    config = load_config(REPO / "configs" / "quickstart.yaml", ["evolve.contexts_per_iteration=8"])
    contexts = select_contexts(config, 1)

    def seeds(samples, chunk_size: int, name: str) -> dict[str, int | None]:
        recorder = SeedRecorder()
        generate_pairs(
            config.evolve, samples, recorder, tmp_path / f"{name}.jsonl", iteration=1, seed=42,
            system_prompt=None, chunk_size=chunk_size, risk_detector=NoRiskDetector(),
        )  # fmt: skip
        return recorder.draft_seeds

    whole = seeds(contexts, 8, "whole")
    assert len(set(whole.values())) == 8 and None not in whole.values()
    assert seeds(contexts[::-1], 3, "reversed") == whole
    shard = select_shard(contexts, 1, 3)
    assert seeds(shard, 1, "shard") == {s.sample_id: whole[s.sample_id] for s in shard}


def test_shards_are_stable_and_cover_every_context() -> None:
    ids = [f"conv{i}:turn{j}" for i in range(20) for j in range(3)]
    shards = [[i for i in ids if shard_of(i, 4) == k] for k in range(4)]
    assert sorted(sum(shards, [])) == sorted(ids) and all(shards)
    assert shard_of("conv3:turn1", 4) == shard_of("conv3:turn1", 4)  # zlib.crc32, not the salted hash()
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x/2", "1"):
        with pytest.raises(ConfigError, match="k/N"):
            parse_shard(bad)


def test_a_shard_still_being_written_is_not_merged(tmp_path: Path, tiny_model_dir: Path) -> None:
    run = _make_run(tmp_path, "busy", tiny_model_dir)
    shard = shard_file(run.layout.pairs_file(1), 0, 2)
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_text("")
    with RunLock(shard_lock_file(shard)), pytest.raises(RunBusyError):
        pairs_stage(run, 1)


def test_the_commands_check_their_arguments(tmp_path: Path, tiny_model_dir: Path) -> None:
    run = _make_run(tmp_path, "cli", tiny_model_dir)
    result = runner.invoke(app, ["pairs", str(run.path), "-i", "1", "--set", "evolve.contexts_per_iteration=3"])
    assert result.exit_code == 2 and "only generation." in result.output
    result = runner.invoke(app, ["pairs", str(run.path), "-i", "1", "--shard", "2/2"])
    assert result.exit_code == 2 and "k/N" in result.output
    result = runner.invoke(app, ["dpo", str(tmp_path / "nothing"), "-i", "1"])
    assert result.exit_code == 2 and "not a run directory" in result.output


@pytest.mark.slow
def test_two_worker_processes_merge_to_one_worker_s_file(tmp_path: Path, varied_model_dir: Path) -> None:
    """The same as the first test with `esc-evolve pairs --shard k/2` in two processes at once."""
    sharded = _make_run(tmp_path, "sharded", varied_model_dir)
    single = _make_run(tmp_path, "single", varied_model_dir, m0=sharded.layout.model_dir(0))
    command = [sys.executable, "-m", "esc_evolve.cli.app", "pairs", str(sharded.path), "-i", "1", "--shard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([*command, f"{k}/2"], cwd=REPO, env=env) for k in (0, 1)]
    assert [w.wait(timeout=600) for w in workers] == [0, 0]
    done = runner.invoke(app, ["pairs", str(sharded.path), "-i", "1"])
    assert done.exit_code == 0, done.output
    assert RunLayout(sharded.path).stages_file.is_file()  # the merge recorded the stage
    pairs_stage(single, 1)
    assert sharded.layout.pairs_file(1).read_bytes() == single.layout.pairs_file(1).read_bytes()
