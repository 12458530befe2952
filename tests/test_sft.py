"""Phase 1 SFT: loss mask, config plumbing, real steps on a tiny Llama, resume, merge, data-parallel launch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from esc_evolve.config import LoraSettings, validate_config
from esc_evolve.training import settings
from esc_evolve.training.data import build_sft_rows, load_replay, replay_row
from esc_evolve.training.settings import FAMILY_TARGETS, lora_config, resolve_runtime, trl_sft_config
from esc_evolve.training.sft import build_trainer, checkpoint_problem, latest_checkpoint, train_sft
from esc_evolve.training.speed import compact_lm_head_on_cpu
from tests.conftest import write_jsonl
from tests.sft_fixtures import Interrupted, StopAt, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Tiny models gain nothing from threads, and the test machine may be shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(config):
    return build_sft_rows(config.sft, config.data, config.model, config.run.seed)


def _trainer(tmp_path: Path, model_dir: Path, **sft):
    config = tiny_config(tmp_path, model_dir, **sft)
    rows = _rows(config)
    runtime = resolve_runtime(config.model, config.sft)
    return rows, build_trainer(config.sft, config.model, rows, runtime, config.run.seed, tmp_path / "work", [])


def _train(config, out: Path, callbacks=None) -> dict:
    """Phase 1 as a notebook would call it: no run directory, every path given."""
    return train_sft(
        config.sft,
        config.model,
        config.data,
        out / "m0",
        seed=config.run.seed,
        work_dir=out / "sft-checkpoints",
        log_dir=out / "logs" / "tensorboard" / "sft",
        callbacks=callbacks,
    )


# ---------------------------------------------------------------------------------------------------------
# Loss mask


def test_only_the_response_and_its_end_token_are_learned(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows, trainer = _trainer(tmp_path, tiny_model_dir)
    tokenizer = trainer.processing_class
    assert len(trainer.train_dataset) == len(rows.train)
    for row, example in zip(rows.train, trainer.train_dataset, strict=True):
        ids, labels = example["input_ids"], example["labels"]
        learned = [i for i, label in zip(ids, labels, strict=True) if label != -100]
        assert learned == [label for label in labels if label != -100]  # labels are the token ids
        assert tokenizer.decode(learned) == row["completion"][0]["content"] + "<|im_end|>\n"
        start = len(ids) - len(learned)
        assert all(label == -100 for label in labels[:start])  # the whole prefix, then only the response
        context = tokenizer.decode(ids[:start])
        assert context.startswith("<|im_start|>system\n" + row["prompt"][0]["content"])
        assert row["prompt"][-1]["content"] in context
        assert context.endswith("<|im_start|>assistant\n")


def test_padding_does_not_mask_the_end_token_that_is_also_pad(tmp_path: Path, tiny_model_dir: Path) -> None:
    _, trainer = _trainer(tmp_path, tiny_model_dir)
    tokenizer = trainer.processing_class
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end == tokenizer.pad_token_id == tokenizer.eos_token_id
    examples = sorted(trainer.train_dataset, key=lambda e: len(e["input_ids"]))
    short, long = examples[0], examples[-1]
    assert len(short["input_ids"]) < len(long["input_ids"])
    batch = trainer.data_collator([short, long])
    n = len(short["input_ids"])
    assert batch["labels"][0, n - 2].item() == im_end  # "...reply<|im_end|>\n"
    assert (batch["labels"][0, n:] == -100).all() and (batch["input_ids"][0, n:] == im_end).all()
    assert batch["attention_mask"][0, n:].sum() == 0


# ---------------------------------------------------------------------------------------------------------
# Config plumbing


def test_trl_config_takes_every_training_value_from_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: False)
    sft = {
        "learning_rate": 3e-4,
        "epochs": 2,
        "max_steps": 11,
        "per_device_batch_size": 3,
        "gradient_accumulation_steps": 5,
        "max_length": 300,
        "lr_scheduler": "linear",
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "logging_steps": 2,
        "save_steps": 9,
    }
    config = validate_config({"run": {"seed": 7}, "model": {"device": "cpu"}, "sft": sft}, "<test>")
    args = trl_sft_config(config.sft, config.run.seed, tmp_path, resolve_runtime(config.model, config.sft))
    assert (args.learning_rate, args.num_train_epochs, args.max_steps) == (3e-4, 2, 11)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_length) == (3, 5, 300)
    assert (args.lr_scheduler_type.value, args.warmup_steps, args.weight_decay) == ("linear", 0.1, 0.01)
    assert (args.seed, args.logging_steps, args.save_steps) == (7, 2, 9)
    assert args.output_dir == str(tmp_path)
    assert args.completion_only_loss is True and args.assistant_only_loss is False
    assert args.train_sampling_strategy == "group_by_length"
    # CPU defaults: trl would turn on bf16 (emulated on this CPU) and gradient checkpointing
    assert args.bf16 is False and args.gradient_checkpointing is False and args.use_cpu is True


@pytest.mark.parametrize("native", [False, True])
def test_cpu_defaults_follow_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: native)
    config = validate_config({"model": {"device": "cpu"}}, "<test>")
    runtime = resolve_runtime(config.model, config.sft)
    assert runtime.bf16 is native and runtime.fp16 is False and runtime.gradient_checkpointing is False
    assert runtime.dtype == (torch.bfloat16 if native else torch.float32)
    assert runtime.attn_implementation == "eager"


def test_explicit_settings_are_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: True)
    model = {"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa"}
    config = validate_config({"model": model, "sft": {"bf16": False, "gradient_checkpointing": True}}, "<test>")
    runtime = resolve_runtime(config.model, config.sft)
    assert runtime.bf16 is False and runtime.gradient_checkpointing is True
    assert runtime.dtype == torch.float32 and runtime.attn_implementation == "sdpa"


@pytest.mark.parametrize(("bf16_ok", "expected"), [(True, (True, False)), (False, (False, True))])
def test_gpu_defaults(monkeypatch: pytest.MonkeyPatch, bf16_ok: bool, expected: tuple[bool, bool]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    config = validate_config({}, "<test>")
    runtime = resolve_runtime(config.model, config.sft)
    assert runtime.device.type == "cuda"
    assert (runtime.bf16, runtime.fp16) == expected
    assert runtime.gradient_checkpointing is True


def test_lora_config_and_family_defaults() -> None:
    lora = lora_config(LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=["q_proj"]), "llama")
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, set(lora.target_modules)) == (4, 8, 0.1, {"q_proj"})
    assert lora.task_type == "CAUSAL_LM"
    assert lora_config(LoraSettings(), "llama").target_modules == "all-linear"
    family = lora_config(LoraSettings(target_modules=None), "qwen2")
    assert set(family.target_modules) == set(FAMILY_TARGETS["llama"])
    assert lora_config(LoraSettings(target_modules=None), "unknown-family").target_modules is None


# ---------------------------------------------------------------------------------------------------------
# Data: replay mix and held-out slice


def test_replay_formats() -> None:
    chat = replay_row({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})
    assert chat == {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "completion": [{"role": "assistant", "content": "4"}],
    }
    pair = replay_row({"prompt": "Name a colour.", "response": "Blue."})
    assert pair["completion"][0]["content"] == "Blue." and pair["prompt"][-1]["content"] == "Name a colour."
    alpaca = replay_row({"instruction": "Translate.", "input": "hola", "output": "hello"})
    assert alpaca["prompt"][-1]["content"] == "Translate.\n\nhola"
    sharegpt = replay_row({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    assert sharegpt["completion"] == [{"role": "assistant", "content": "hello"}]
    with pytest.raises(ValueError):
        replay_row({"text": "no pair here"})


def test_replay_is_mixed_at_the_configured_ratio(tmp_path: Path, tiny_model_dir: Path) -> None:
    replay = write_jsonl(tmp_path / "replay.jsonl", [{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(5)])
    config = tiny_config(tmp_path, tiny_model_dir, replay_path=str(replay), replay_ratio=0.25, max_train_samples=12)
    rows = _rows(config)
    assert rows.counts["train_samples"] == 12 and rows.counts["replay_samples"] == 3
    assert sum(row["prompt"][-1]["content"].startswith("Q") for row in rows.train) == 3
    assert len(load_replay(replay)) == 5


def test_long_contexts_lose_their_oldest_turns_not_the_response(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from esc_evolve.training.data import _length, fit_to_length

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i} " + "word " * 40} for i in range(7)]
    row = {
        "prompt": [{"role": "system", "content": "Be kind."}, *turns],
        "completion": [{"role": "assistant", "content": "Reply."}],
    }
    assert _length(row, tokenizer) > 150
    assert fit_to_length(row, tokenizer, 150) is True
    assert _length(row, tokenizer) <= 150 and row["completion"][0]["content"] == "Reply."
    assert row["prompt"][0]["content"] == "Be kind." and row["prompt"][1]["role"] == "user"
    assert row["prompt"][-1] == turns[-1]
    assert fit_to_length(row, tokenizer, 150) is False


def test_heldout_slice_is_split_by_conversation(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = tiny_config(tmp_path, tiny_model_dir)
    config = config.model_copy(update={"data": config.data.model_copy(update={"valid_path": None})})
    config.sft.eval_fraction = 0.25
    rows = _rows(config)
    assert rows.counts["eval_samples"] == 2 * 2  # 2 of 8 conversations, 2 samples each
    assert rows.counts["train_samples"] == 6 * 2


# ---------------------------------------------------------------------------------------------------------
# Training on a tiny model


@pytest.mark.parametrize("bf16", [False, True])
def test_training_lowers_the_loss_and_writes_m0(tmp_path: Path, tiny_model_dir: Path, bf16: bool) -> None:
    config = tiny_config(tmp_path, tiny_model_dir, merge_adapter=True, bf16=bf16)
    out = tmp_path / "out"
    summary = _train(config, out)
    assert summary["steps"] == 8 and summary["eval_loss"] < summary["base_eval_loss"] - 0.1
    losses = [
        h["loss"]
        for h in json.loads((latest_checkpoint(out / "sft-checkpoints") / "trainer_state.json").read_text())[
            "log_history"
        ]
        if "loss" in h
    ]
    assert losses[-1] < losses[0]
    assert summary["tokens_per_second"] > 0 and summary["runtime"]["bf16"] is bf16
    m0 = out / "m0"
    assert (m0 / "adapter_config.json").is_file() and (m0 / "adapter_model.safetensors").is_file()
    assert json.loads((m0 / "train_summary.json").read_text())["eval_loss"] == summary["eval_loss"]
    assert not list(out.glob(".m0*"))  # staging folders are gone
    assert _tensorboard_tags(out / "logs" / "tensorboard" / "sft") >= {
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_second",
        "eval/loss",
    }
    assert not (out / "sft-checkpoints" / "runs").exists()
    _merged_model_matches_adapter(config, out)


def _tensorboard_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in folder.glob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    return tags


def _merged_model_matches_adapter(config, run_path: Path) -> None:
    from esc_evolve.models import load_model

    peft_model, _ = load_model(config.model, adapter=run_path / "m0")
    merged = AutoModelForCausalLM.from_pretrained(run_path / "m0-merged").eval()
    ids = torch.randint(10, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)


class FirstStep(TrainerCallback):
    def __init__(self) -> None:
        self.first: int | None = None

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if self.first is None:
            self.first = state.global_step


def test_resume_continues_from_the_last_checkpoint(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = tiny_config(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        _train(config, out, callbacks=[StopAt(6)])  # killed after step 6; the last checkpoint is step 4
    checkpoints = out / "sft-checkpoints"
    assert latest_checkpoint(checkpoints).name == "checkpoint-4" and not (out / "m0").exists()
    # Newer checkpoints that were cut are ignored: one without trainer_state.json, and two whose
    # trainer_state.json is fine but whose weights or optimizer file is truncated (a crash before the disk
    # had them, a full disk).
    (checkpoints / "checkpoint-5").mkdir()
    for step, cut in ((6, "adapter_model.safetensors"), (7, "optimizer.pt")):
        copy = Path(shutil.copytree(checkpoints / "checkpoint-4", checkpoints / f"checkpoint-{step}"))
        data = (copy / cut).read_bytes()
        (copy / cut).write_bytes(data[: len(data) - 100])
    assert checkpoint_problem(checkpoints / "checkpoint-6") == "adapter_model.safetensors is cut short"
    assert checkpoint_problem(checkpoints / "checkpoint-7") == "optimizer.pt is cut short"
    assert checkpoint_problem(checkpoints / "checkpoint-4") is None
    first = FirstStep()
    summary = _train(config, out, callbacks=[first])
    assert first.first == 4 and summary["resumed_from_step"] == 4
    assert summary["steps"] == 8 and summary["session_steps"] == 4
    assert (out / "m0" / "adapter_config.json").is_file()


class KilledAfterTraining(TrainerCallback):
    """Stands in for a kill after the last step, before the adapter is published."""

    def on_train_end(self, args, state, control, **kwargs) -> None:
        raise Interrupted


def test_a_run_killed_after_its_last_step_ends_with_the_same_steps_and_weights(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """No checkpoint at the last step: resumed from one, transformers would train one step more (mid-epoch)."""
    from safetensors.torch import load_file

    config = tiny_config(tmp_path, tiny_model_dir, max_steps=4, save_steps=2)
    whole = _train(config, tmp_path / "whole")
    with pytest.raises(Interrupted):
        _train(config, tmp_path / "killed", callbacks=[KilledAfterTraining()])
    assert sorted(p.name for p in (tmp_path / "killed" / "sft-checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = _train(config, tmp_path / "killed")
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == whole["steps"] == 4
    got, expected = (load_file(tmp_path / run / "m0" / "adapter_model.safetensors") for run in ("killed", "whole"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


# ---------------------------------------------------------------------------------------------------------
# Speed paths give the same loss


def _fused_model(model_dir: Path, attn: str = "sdpa"):
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():  # sharper weights than the random init, so attention masks matter to the loss
        for param in model.parameters():
            param.normal_(0, 0.3)
    add_fused_lm_head(model)
    return model


def test_compact_lm_head_scores_only_labelled_positions(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trl.trainer.utils as trl_utils

    model = _fused_model(tiny_model_dir)
    ids = torch.randint(10, 40000, (2, 24))
    labels = ids.clone()
    labels[:, :18] = -100
    rows: list[int] = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(
        trl_utils._ChunkedLogProbFunction, "apply", lambda h, *a: rows.append(h.shape[0]) or apply(h, *a)
    )

    def loss_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        loss = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
        loss.backward()
        return loss.detach(), model.model.layers[0].mlp.down_proj.weight.grad.clone()

    full = loss_and_grad()
    with compact_lm_head_on_cpu():
        compact = loss_and_grad()
    assert rows == [2 * 23, 2 * 6]  # every shifted position, then only the 6 labelled ones per row
    torch.testing.assert_close(compact, full)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_batches_give_the_padded_loss(tiny_model_dir: Path, attn: str) -> None:
    """trl's padding-free collator (position_ids, no attention mask) is correct for Llama on CPU: transformers
    builds a block-diagonal mask from the position resets. (It is slower than length-grouped batches on CPU,
    where the attention then spans the whole flattened batch; see docs/sft.md.)"""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = _fused_model(tiny_model_dir, attn)
    examples = []
    for length in (30, 17, 24):
        ids = torch.randint(10, 40000, (length,)).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2 :]})
    padded = DataCollatorForLanguageModeling(pad_token_id=2)(examples)
    flat = DataCollatorForLanguageModeling(pad_token_id=2, padding_free=True)(examples)
    with torch.no_grad():
        expected = model(**padded, fused_lm_head=True).loss
        assert torch.allclose(model(**flat, fused_lm_head=True).loss, expected, atol=1e-5)
        leaky = model(
            input_ids=flat["input_ids"],
            labels=flat["labels"],
            position_ids=torch.arange(flat["input_ids"].shape[1])[None],
            fused_lm_head=True,
        ).loss
    assert not torch.allclose(leaky, expected, atol=1e-3)  # the check can tell a leaking mask apart


# ---------------------------------------------------------------------------------------------------------
# Command line and data-parallel launch


def _app():
    import typer

    from esc_evolve.cli.sft_cmd import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # keeps `sft` a subcommand when it is the only one
        pass

    return app


def _write_config(tmp_path: Path, config) -> Path:
    from esc_evolve.config import dump_config

    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config), encoding="utf-8")
    return path


def test_sft_command_runs_and_resume_skips_a_finished_stage(tmp_path: Path, tiny_model_dir: Path) -> None:
    from typer.testing import CliRunner

    config_file = _write_config(tmp_path, tiny_config(tmp_path, tiny_model_dir, max_steps=2))
    runner = CliRunner()
    result = runner.invoke(_app(), ["sft", str(config_file)])
    assert result.exit_code == 0, result.output
    run_path = tmp_path / "runs" / "tiny"
    assert json.loads((run_path / "stages.json").read_text())["sft"]["steps"] == 2
    again = runner.invoke(_app(), ["sft", str(config_file)])
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = runner.invoke(_app(), ["sft", str(config_file), "--resume"])
    assert resumed.exit_code == 0 and "already done" in resumed.output


LAUNCHER = """
import typer
from esc_evolve.cli.sft_cmd import register
app = typer.Typer()
register(app)
@app.callback()
def root() -> None:
    pass
app()
"""


@pytest.mark.slow
def test_two_cpu_processes_train_data_parallel(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`accelerate launch` with configs/accelerate/cpu-2proc.yaml: two gloo processes, one shared run."""
    config_file = _write_config(tmp_path, tiny_config(tmp_path, tiny_model_dir, max_steps=4, save_steps=2))
    launcher = tmp_path / "launch_sft.py"
    launcher.write_text(LAUNCHER, encoding="utf-8")
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(REPO / "configs/accelerate/cpu-2proc.yaml")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, str(launcher), "sft", str(config_file)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "tiny" / "m0" / "train_summary.json").read_text())
    assert summary["runtime"]["processes"] == 2 and summary["steps"] == 4
    # Each step takes one batch per process: 2 x 4 samples.
    assert summary["samples_per_second"] > 0 and summary["session_tokens"] > 0
