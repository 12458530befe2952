"""The vLLM backend without vLLM: a fake `vllm` module records what the backend builds and sends. Which folder
is served for base, m0, m1, m2 (each model's whole chain, never its last adapter alone), the engine's arguments,
and prompts as token ids with exactly one BOS under a Llama-3-style template."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from esc_evolve.config import GenerationSettings, ModelSettings, VLLMSettings
from esc_evolve.data.prompts import encode_prompt, render_prompt
from esc_evolve.generation import GenerationRequest, build_generator
from esc_evolve.generation.vllm_backend import encode_rendered, vllm_lora_rank
from esc_evolve.models.served import served_dir
from tests.test_chain_artifact import CHAIN, _train_like_a_run

LLAMA3_TEMPLATE = (
    r"{{ bos_token }}{% for message in messages %}"
    r"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    r"+ message['content'] | trim + '<|eot_id|>' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


class FakeLLM:
    """Records the engine's arguments and every generate call; answers "ok" to each prompt."""

    built: list[FakeLLM] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.calls = kwargs, []
        FakeLLM.built.append(self)

    def generate(self, prompts, params, lora_request=None):
        self.calls.append({"prompts": prompts, "params": params, "lora": lora_request})
        done = SimpleNamespace(text="ok", finish_reason="stop", stop_reason=None, token_ids=[7, 8])
        return [SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=[done]) for p in prompts]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    FakeLLM.built = []
    vllm = ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, lambda **kwargs: kwargs
    request = ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, lora_id, path: SimpleNamespace(name=name, id=lora_id, path=path)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    return FakeLLM


@pytest.fixture(scope="module")
def run_models(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> list[Path]:
    """m0, iter1/m1, iter2/m2 saved as a run saves them (no served artifact yet: the backend writes it)."""
    return _train_like_a_run(tiny_model_dir, tmp_path_factory.mktemp("run"), CHAIN)


def _model(model_dir: Path) -> ModelSettings:
    return ModelSettings(name=str(model_dir), device="cpu", dtype="float32")


def test_each_model_is_served_as_its_whole_chain(fake_vllm, run_models: list[Path], tiny_model_dir: Path) -> None:
    settings = GenerationSettings(backend="vllm", max_new_tokens=4)
    request = GenerationRequest(messages=[{"role": "user", "content": "hi"}], id="r")
    sent = {}
    for name, adapter in [("base", None), *zip(("m0", "m1", "m2"), run_models, strict=True)]:
        generator = build_generator(_model(tiny_model_dir), settings, adapter, seed=3)
        assert generator.generate([request], progress=False)[0].text == "ok"
        engine = fake_vllm.built[-1]
        assert Path(engine.kwargs["model"]) == tiny_model_dir  # the raw backbone, for every model
        sent[name] = (engine.kwargs, engine.calls[0]["lora"])
    assert "enable_lora" not in sent["base"][0] and sent["base"][1] is None
    ranks = {"m0": 4, "m1": 4 + 8, "m2": 4 + 8 + 2}
    for name, adapter in zip(("m0", "m1", "m2"), run_models, strict=True):
        kwargs, lora = sent[name]
        assert Path(lora.path) == served_dir(adapter) and lora.name == name  # the chain, not the last adapter
        assert kwargs["enable_lora"] and kwargs["max_lora_rank"] == vllm_lora_rank(ranks[name])


def test_engine_settings_pass_through(fake_vllm, tiny_model_dir: Path) -> None:
    vllm = VLLMSettings(tensor_parallel_size=2, max_num_seqs=512, engine_kwargs={"max_model_len": 4096, "seed": 9})
    build_generator(_model(tiny_model_dir), GenerationSettings(backend="vllm", vllm=vllm), seed=1)
    kwargs = fake_vllm.built[-1].kwargs
    assert (kwargs["tensor_parallel_size"], kwargs["max_num_seqs"], kwargs["max_model_len"]) == (2, 512, 4096)
    assert kwargs["seed"] == 9  # engine_kwargs win
    assert VLLMSettings().chunk_size >= 1024


def test_lora_ranks_round_up_to_what_vllm_accepts() -> None:
    assert [vllm_lora_rank(r) for r in (4, 8, 12, 48, 300, 384)] == [8, 8, 16, 64, 320, 512]


@pytest.fixture
def llama3_tokenizer(tiny_model_dir: Path):
    """The backbone's BPE with Llama-3's special tokens, template, and a post-processor that adds the BOS to
    plain text, as Llama-3's tokenizer does."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tokenizer = copy.deepcopy(AutoTokenizer.from_pretrained(tiny_model_dir))
    tokenizer.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
        }
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return tokenizer


def test_prompts_reach_vllm_as_ids_with_one_bos(fake_vllm, llama3_tokenizer) -> None:
    from esc_evolve.generation.vllm_backend import VLLMGenerator

    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "I feel alone."}]
    rendered = render_prompt(llama3_tokenizer, chat)
    bos = llama3_tokenizer.bos_token_id
    assert rendered.startswith("<|begin_of_text|>")
    assert llama3_tokenizer(rendered)["input_ids"].count(bos) == 2  # what LLM.generate(text) would have sent

    generator = VLLMGenerator.__new__(VLLMGenerator)  # without __init__, which starts an engine
    generator.llm, generator.tokenizer = FakeLLM(), llama3_tokenizer
    generator.config, generator.seed = GenerationSettings(), 0
    requests = [
        GenerationRequest(prompt=rendered, id="rendered"),
        GenerationRequest(messages=chat, id="chat"),
        GenerationRequest(prompt="plain text", id="plain"),
        GenerationRequest(messages=chat, continuation="The emotion", id="continued"),
    ]
    results = generator.generate(requests, progress=False)
    sent = [p["prompt_token_ids"] for p in generator.llm.calls[0]["prompts"]]
    assert [ids.count(bos) for ids in sent] == [1, 1, 1, 1]
    assert [ids[0] for ids in sent] == [bos] * 4
    assert sent[0] == sent[1] == encode_prompt(llama3_tokenizer, chat)  # rendered or not: the same ids
    assert sent[0] == encode_rendered(llama3_tokenizer, rendered)
    assert [r.prompt_tokens for r in results] == [len(ids) for ids in sent]
