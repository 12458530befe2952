"""DPO of M_t on its pairs: the reference is M_t, training moves rewards, a killed run resumes."""

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from esc_evolve.config import ExperimentConfig, validate_config
from esc_evolve.models import load_model
from esc_evolve.models.lineage import adapter_chain, write_lineage
from esc_evolve.pipeline import RunDir
from esc_evolve.pipeline.stages import dpo as dpo_stage
from esc_evolve.training.dpo import LOGGED, NoPairsError, build_dpo_trainer, train_dpo, trl_loss
from esc_evolve.training.settings import resolve_runtime
from tests.sft_fixtures import Interrupted, StopAt

PAIRS = [  # written for the tests
    ("My exam went badly.", "One bad exam hurts, but it does not define you. What subject was it?", "ok ok ok ok"),
    ("I argued with my sister.", "Arguments with family sting. What was it about?", "sorry sorry sorry"),
    ("I can't sleep before work.", "Lying awake before a workday is draining. What keeps your mind busy?", "no no"),
    ("My friend ignores me.", "Being ignored by a friend is lonely. How long has it been?", "fine fine fine"),
]


def _config(tmp_path: Path, model_dir: Path, **dpo) -> ExperimentConfig:
    raw = {
        "run": {"output_dir": str(tmp_path / "runs"), "name": "dpo", "seed": 5},
        "model": {"name": str(model_dir), "device": "cpu"},
        "dpo": {
            "max_steps": 6,
            "save_steps": 2,
            "logging_steps": 1,
            "learning_rate": 5e-3,
            "beta": 0.1,
            "per_device_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "max_length": 128,
            "lora": {"r": 8, "alpha": 16},
            "bf16": False,
            **dpo,
        },
    }
    return validate_config(raw, source="<test>")


def _m0(run_path: Path, model_dir: Path) -> Path:
    """A random (non-zero) LoRA adapter as M0, so that M0 differs from the backbone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    folder = run_path / "m0"
    model.save_pretrained(folder)
    write_lineage(folder, str(model_dir), None)
    return folder


def _write_pairs(run_path: Path, iteration: int = 1) -> None:
    folder = run_path / f"iter{iteration}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))


def _rows() -> list[dict]:
    """PAIRS as conversational preference rows, as `preference.jsonl` holds them."""
    return [
        {
            "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": c}],
            "chosen": [{"role": "assistant", "content": y2}],
            "rejected": [{"role": "assistant", "content": y}],
        }
        for c, y2, y in PAIRS
    ]


def test_loss_options_map_to_trl() -> None:
    from esc_evolve.config import DPOSettings

    assert trl_loss(DPOSettings()) == (["sigmoid"], None)
    assert trl_loss(DPOSettings(loss_type="ipo", rpo_alpha=0.5)) == (["ipo", "sft"], [1.0, 0.5])


@pytest.mark.parametrize("iteration", [1, 2])
def test_the_reference_stays_m_t_while_the_policy_moves(tmp_path: Path, tiny_model_dir: Path, iteration: int) -> None:
    """At step 0 a fresh LoRA makes policy and reference equal, so a reference that were the current policy would
    pass there. After a few steps the policy must differ from M_t while the reference log-probs still equal those
    of M_t loaded on its own: M0 in iteration 1, M0 + a1 (trained by `train_dpo`) in iteration 2."""
    config = _config(tmp_path, tiny_model_dir, max_steps=3)
    run = RunDir.create(config)
    m0 = _m0(run.path, tiny_model_dir)
    _write_pairs(run.path)
    parent = m0 if iteration == 1 else run.path / "iter1/m1"
    if iteration == 2:
        _train(config, run.path, m0)  # M1 = M0 + a1, a real DPO adapter
    rows = [json.loads(line) for line in (run.path / "iter1/preference.jsonl").open()]
    runtime = resolve_runtime(config.model, config.dpo)
    trainer = build_dpo_trainer(config.dpo, config.model, rows, runtime, parent, config.run.seed, tmp_path / "work", [])
    batch = next(iter(trainer.get_train_dataloader()))
    m_t = _completion_logps(load_model(config.model, adapter=parent)[0], batch)
    m_0 = _completion_logps(load_model(config.model, adapter=m0)[0], batch)
    backbone = _completion_logps(load_model(config.model)[0], batch)
    assert not torch.allclose(backbone, m_t, atol=1e-2)  # the backbone is not M_t
    assert (iteration == 1) == torch.allclose(m_0, m_t, atol=1e-2)  # M1 is not M0

    torch.testing.assert_close(_reference_logps(trainer, batch), m_t, atol=1e-3, rtol=0)
    torch.testing.assert_close(_completion_logps(trainer.model, batch), m_t, atol=1e-3, rtol=0)  # step 0: equal
    trainer.train()
    assert trainer.state.global_step == 3
    policy = _completion_logps(trainer.model, batch)
    assert (policy - m_t).abs().max() > 0.05  # the policy moved away from M_t ...
    torch.testing.assert_close(_reference_logps(trainer, batch), m_t, atol=1e-3, rtol=0)  # ... the reference did not

    # What is saved is M_t + the trained adapter: loaded through its lineage, it is the policy.
    saved = tmp_path / "saved"
    trainer.save_model(str(saved))
    write_lineage(saved, config.model.name, parent)
    torch.testing.assert_close(
        _completion_logps(load_model(config.model, adapter=saved)[0], batch), policy, atol=1e-3, rtol=0
    )


def _completion_logps(model, batch) -> torch.Tensor:
    """Summed log-probs of each row's completion tokens (chosen rows, then rejected), in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was_training)
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def _reference_logps(trainer, batch) -> torch.Tensor:
    """The reference log-probs as trl computes them for the loss (adapter disabled), chosen then rejected."""
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    return torch.cat([chosen, rejected]).float()


def test_dpo_trains_m1_on_top_of_m0_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _config(tmp_path, tiny_model_dir)
    run = RunDir.create(config)
    m0 = _m0(run.path, tiny_model_dir)
    _write_pairs(run.path)
    with pytest.raises(Interrupted):
        _train(config, run.path, m0, callbacks=[StopAt(3)])  # killed after the step-2 checkpoint
    assert not (run.path / "iter1/m1").exists()
    stale = run.path / "iter1/.m1.staging"  # as a save killed midway leaves it
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"cut")
    (stale / "from-an-older-save.txt").write_text("stale")
    summary = _train(config, run.path, m0)
    assert not stale.exists() and not (run.path / "iter1/m1/from-an-older-save.txt").exists()
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 6 and summary["pairs"] == 4
    assert summary["rewards_margins_last"] > summary["rewards_margins_first"]  # chosen pulled above rejected
    assert "rewards_accuracies_mean" in summary and "logps_chosen_last" in summary
    base, chain = adapter_chain(run.path / "iter1/m1")
    assert base == str(tiny_model_dir) and chain == [m0.resolve(), (run.path / "iter1/m1").resolve()]
    assert json.loads((run.path / "iter1/m1/train_summary.json").read_text())["steps"] == 6
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    m1_logits, m0_logits = (_logits(config, adapter, ids) for adapter in (run.path / "iter1/m1", m0))
    assert not torch.allclose(m1_logits, m0_logits, atol=1e-4)  # training moved M1 away from M0


def test_no_pairs_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _config(tmp_path, tiny_model_dir)
    run = RunDir.create(config)
    (run.path / "iter1").mkdir()
    (run.path / "iter1/preference.jsonl").write_text("")
    with pytest.raises(NoPairsError, match="no preference pair was kept"):
        _train(config, run.path, _m0(run.path, tiny_model_dir))


def test_a_corrupt_preference_line_is_reported_by_file_and_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    from esc_evolve.errors import DataFormatError

    config = _config(tmp_path, tiny_model_dir)
    run = RunDir.create(config)
    _write_pairs(run.path)
    preference = run.path / "iter1/preference.jsonl"
    lines = preference.read_text().splitlines(keepends=True)
    preference.write_text(lines[0] + "\n" + lines[1][:40] + "\n" + "".join(lines[2:]))
    with pytest.raises(DataFormatError, match=rf"{preference}:3: not a preference pair \(Expecting"):
        _train(config, run.path, run.path / "m0")
    preference.write_text(lines[0] + json.dumps({"prompt": [], "chosen": []}) + "\n")
    with pytest.raises(DataFormatError, match=rf"{preference}:2: not a preference pair \(missing field 'rejected'\)"):
        _train(config, run.path, run.path / "m0")


def test_an_iteration_without_pairs_gives_its_parent_unchanged_with_a_valid_lineage(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The no-pairs path copies M_{t-1}: the copy answers exactly as its parent, and its lineage names the
    parent's own parent, so the chain has no link twice (iteration 1: M0 on the backbone; iteration 2: M1 on M0)."""
    from esc_evolve.pipeline.stages import copy_model

    config = _config(tmp_path, tiny_model_dir)
    run = RunDir.create(config)
    m0 = _m0(run.path, tiny_model_dir)
    ids = torch.tensor([[5, 9, 2, 7, 1, 3]])
    for iteration in (1, 2):
        (run.path / f"iter{iteration}").mkdir(exist_ok=True)
        (run.path / f"iter{iteration}/preference.jsonl").write_text("")
    summary = dpo_stage(run, 1)
    m1 = run.path / "iter1/m1"
    assert summary == {"iteration": 1, "pairs": 0, "steps": 0, "unchanged_from": "m0"}
    assert adapter_chain(m1) == (str(tiny_model_dir), [m1.resolve()])
    torch.testing.assert_close(_logits(config, m1, ids), _logits(config, m0, ids))

    _random_adapter_on(config, m0, m1)  # as if iteration 1 had trained: M1 = M0 + a1
    summary = dpo_stage(run, 2)
    m2 = run.path / "iter2/m2"
    assert summary == {"iteration": 2, "pairs": 0, "steps": 0, "unchanged_from": "m1"}
    assert adapter_chain(m2) == (str(tiny_model_dir), [m0.resolve(), m2.resolve()])
    torch.testing.assert_close(_logits(config, m2, ids), _logits(config, m1, ids))
    assert not torch.allclose(_logits(config, m2, ids), _logits(config, m0, ids), atol=1e-4)
    copy_model(m2, run.path / "elsewhere" / "copy")  # a copy of a copy still points at M0
    assert adapter_chain(run.path / "elsewhere" / "copy")[1][0] == m0.resolve()


def _logits(config: ExperimentConfig, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    model, _ = load_model(config.model, adapter=adapter)
    with torch.no_grad():
        return model(ids).logits


def _random_adapter_on(config: ExperimentConfig, parent: Path, out: Path) -> None:
    """A random (non-zero) LoRA adapter trained, as it were, on top of `parent`, saved to `out` with its lineage."""
    import shutil

    from peft import LoraConfig, get_peft_model

    merged, _ = load_model(config.model, adapter=parent, merge=True)
    torch.manual_seed(1)
    shutil.rmtree(out, ignore_errors=True)
    get_peft_model(
        merged, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).save_pretrained(out)
    write_lineage(out, config.model.name, parent)


def test_pipeline_stage_logs_dpo_under_its_own_tensorboard_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    """DPO's TensorBoard events go to logs/tensorboard/dpo1, not into SFT's folder."""
    from tests.test_sft import _tensorboard_tags

    config = _config(tmp_path, tiny_model_dir, max_steps=2)
    run = RunDir.create(config)
    _m0(run.path, tiny_model_dir)
    _write_pairs(run.path)
    summary = dpo_stage(run, 1)
    assert summary["iteration"] == 1 and summary["steps"] == 2
    boards = run.path / "logs" / "tensorboard"
    assert "train/rewards/margins" in _tensorboard_tags(boards / "dpo1")
    assert not (boards / "sft").exists()


def _train(config: ExperimentConfig, run_path: Path, m0: Path, callbacks=None) -> dict:
    """DPO as a notebook would call it: no run directory, every path given."""
    folder = run_path / "iter1"
    return train_dpo(
        config.dpo,
        config.model,
        m0,
        folder / "preference.jsonl",
        folder / "m1",
        seed=config.run.seed,
        work_dir=folder / "dpo-checkpoints",
        callbacks=callbacks,
    )


# ---------------------------------------------------------------------------------------------------------
# Speed: the reference scored once before training, pairs grouped by length, SFT's fast paths


class Logs(TrainerCallback):
    """Every training log at full precision (the summary rounds to 4 decimals)."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self.threads: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.threads.append(torch.get_num_threads())

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.history.append({key: logs[key] for key in ("loss", *LOGGED) if key in logs})


@pytest.mark.parametrize("reference", ["current", "m0"])
def test_a_precomputed_reference_trains_as_one_scored_in_each_step(
    tmp_path: Path, tiny_model_dir: Path, reference: str
) -> None:
    """precompute_ref_log_probs moves the reference forwards out of the steps and nothing else: the loss, rewards
    and log-probs of every step are those of the reference scored inside the step, with the adapter disabled
    (reference M_t) and with a separate model (`dpo.reference: m0` in iteration 2)."""
    config = _config(tmp_path, tiny_model_dir, max_steps=3, epochs=2)
    run = RunDir.create(config)
    m0 = _m0(run.path, tiny_model_dir)
    _write_pairs(run.path)
    parent, other = m0, None
    if reference == "m0":
        parent, other = run.path / "m1", m0
        _random_adapter_on(config, m0, parent)
    runs = {}
    for precompute in (False, True):
        settings = config.dpo.model_copy(update={"precompute_ref_log_probs": precompute})
        logs = Logs()
        out = tmp_path / f"precompute-{precompute}"
        summary = train_dpo(
            settings, config.model, parent, run.path / "iter1/preference.jsonl", out / "m",
            seed=config.run.seed, work_dir=out / "work", callbacks=[logs], reference=other,
        )  # fmt: skip
        assert summary["steps"] == 3
        runs[precompute] = logs.history
    on_the_fly, precomputed = runs[False], runs[True]
    assert len(on_the_fly) == len(precomputed) == 3 and set(on_the_fly[0]) == {"loss", *LOGGED}
    assert on_the_fly[-1]["rewards/margins"] != 0  # the policy moved: a reference that followed it would show
    for step_a, step_b in zip(on_the_fly, precomputed, strict=True):
        for key, value in step_a.items():
            if key == "rewards/accuracies" and abs(step_a["rewards/margins"]) < 1e-4:
                continue  # a tie (the policy is still the reference): float noise decides chosen > rejected
            assert step_b[key] == pytest.approx(value, abs=1e-5, rel=1e-5), key


def test_speed_settings_reach_trl(tmp_path: Path) -> None:
    from esc_evolve.config import DPOSettings
    from esc_evolve.training.dpo import trl_dpo_config

    runtime = resolve_runtime(validate_config({"model": {"device": "cpu"}}, "<test>").model, DPOSettings(bf16=False))
    args = trl_dpo_config(DPOSettings(), 1, tmp_path, runtime)
    assert args.precompute_ref_log_probs is True and args.train_sampling_strategy == "group_by_length"
    assert args.include_num_input_tokens_seen == "non_padding"
    off = DPOSettings(precompute_ref_log_probs=False, group_by_length=False)
    args = trl_dpo_config(off, 1, tmp_path, runtime)
    assert args.precompute_ref_log_probs is False and args.train_sampling_strategy == "random"


def test_pairs_are_grouped_by_their_longer_side(tmp_path: Path, tiny_model_dir: Path) -> None:
    """transformers' length-grouped sampler cannot measure trl's tokenised pairs by itself; ours tells it the
    length of each pair's longer padded row, and every pair is still drawn once per epoch."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    config = _config(tmp_path, tiny_model_dir, max_length=40)
    m0 = _m0(RunDir.create(config).path, tiny_model_dir)
    long = "It sounds like a lot at once. " * 12  # past max_length: counted as truncated
    rows = [
        {"prompt": [{"role": "user", "content": c}], "chosen": [{"role": "assistant", "content": y2}],
         "rejected": [{"role": "assistant", "content": long if i == 0 else y}]}
        for i, (c, y2, y) in enumerate(PAIRS)
    ]  # fmt: skip
    runtime = resolve_runtime(config.model, config.dpo)
    trainer = build_dpo_trainer(config.dpo, config.model, rows, runtime, m0, config.run.seed, tmp_path / "work", [])
    data = trainer.train_dataset
    expected = [
        min(len(p) + max(len(c), len(r)), 40)
        for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True)
    ]
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == expected and expected[0] == 40
    assert sorted(sampler) == list(range(len(rows)))
    batches = list(trainer.get_train_dataloader())
    assert sum(len(batch["input_ids"]) for batch in batches) == 2 * len(rows)  # chosen and rejected rows


def test_dpo_trains_with_sfts_fast_paths_and_its_thread_setting(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LM head scores only reply tokens, in the precomputed reference pass and in the steps; the model is
    loaded with the runtime's attention; `dpo.num_threads` is what training runs with; the summary says so."""
    import trl.trainer.utils as trl_utils

    config = _config(tmp_path, tiny_model_dir, max_steps=2, num_threads=1)
    run = RunDir.create(config)
    m0 = _m0(run.path, tiny_model_dir)
    _write_pairs(run.path)
    scored: list[int] = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(
        trl_utils._ChunkedLogProbFunction, "apply", lambda h, *a: scored.append(h.shape[0]) or apply(h, *a)
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    logs = Logs()
    try:
        summary = _train(config, run.path, m0, callbacks=[logs])
    finally:
        torch.set_num_threads(threads)
    assert logs.threads == [1] and summary["runtime"]["torch_threads"] == 1
    assert summary["runtime"]["bf16"] is False and summary["tokens_per_second"] > 0
    # Scored: the reply tokens (each with its end-of-turn tokens) of every pair, not every position; once in the
    # reference pass (2 batches of 2 pairs, before training) and once in the 2 steps (2 pairs each).
    replies = sum(_reply_tokens(config, pair) for pair in _rows())
    assert len(scored) == 4 and sum(scored[:2]) == sum(scored[2:]) == replies


def _reply_tokens(config: ExperimentConfig, row: dict) -> int:
    from esc_evolve.data.prompts import encode_prompt

    tokenizer = load_model(config.model)[1]
    prompt = len(encode_prompt(tokenizer, row["prompt"]))
    sides = [row["prompt"] + row[side] for side in ("chosen", "rejected")]
    return sum(len(encode_prompt(tokenizer, chat, add_generation_prompt=False)) - prompt for chat in sides)


def test_build_dpo_trainer_uses_the_runtime_attention(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _config(tmp_path, tiny_model_dir)
    m0 = _m0(RunDir.create(config).path, tiny_model_dir)
    runtime = resolve_runtime(config.model, config.dpo)
    trainer = build_dpo_trainer(config.dpo, config.model, _rows(), runtime, m0, config.run.seed, tmp_path / "work", [])
    assert runtime.attn_implementation == "eager" == trainer.model.config._attn_implementation


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The precomputed reference log-probs are not in the checkpoint: a resumed run scores the pairs again with
    the same reference (M_t, the adapter disabled), and ends with the weights of a run that was never stopped."""
    from safetensors.torch import load_file

    config = _config(tmp_path, tiny_model_dir, epochs=2, max_steps=-1)  # 4 pairs, 2 per step: 4 steps
    assert config.dpo.precompute_ref_log_probs and config.dpo.group_by_length
    ends = {}
    for name in ("whole", "killed"):
        run_path = tmp_path / name
        run_path.mkdir()
        m0 = _m0(run_path, tiny_model_dir)
        _write_pairs(run_path)
        if name == "killed":
            with pytest.raises(Interrupted):
                _train(config, run_path, m0, callbacks=[StopAt(3)])  # killed after the step-2 checkpoint
        summary = _train(config, run_path, m0)
        assert summary["steps"] == 4 and summary["resumed_from_step"] == (2 if name == "killed" else None)
        ends[name] = load_file(run_path / "iter1/m1/adapter_model.safetensors")
    assert ends["whole"].keys() == ends["killed"].keys()
    for key, value in ends["whole"].items():
        torch.testing.assert_close(ends["killed"][key], value, atol=1e-6, rtol=1e-5)
