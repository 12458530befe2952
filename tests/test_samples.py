from pathlib import Path

from esc_evolve.data import build_turn_samples, load_conversations
from esc_evolve.data.prompts import build_messages, render_prompt
from esc_evolve.data.schema import merge_consecutive
from tests.conftest import make_record, write_jsonl


def _conversation(tmp_path: Path):
    return load_conversations(write_jsonl(tmp_path / "d.jsonl", [make_record()])).conversations[0]


def test_consecutive_turns_are_merged(tmp_path: Path) -> None:
    merged = merge_consecutive(_conversation(tmp_path).turns)
    assert [t.speaker for t in merged] == ["supporter", "seeker", "supporter", "seeker", "supporter"]
    assert merged[1].text == "hi, I am stressed about work my contract might not be renewed"
    assert merged[2].strategy == "Reflection of feelings"


def test_samples_follow_seeker_turns_and_keep_all_strategies(tmp_path: Path) -> None:
    samples = build_turn_samples([_conversation(tmp_path)], context_window=10)
    # the opening supporter greeting has nothing to respond to
    assert [s.turn_index for s in samples] == [2, 4]
    first = samples[0]
    assert first.response == "That sounds stressful. When will you know?"
    assert first.strategy == "Reflection of feelings"
    assert first.strategies == ("Reflection of feelings", "Question")
    assert [t.speaker for t in first.context] == ["seeker"]
    # the context may not start with a supporter turn (chat templates expect a user message first)
    assert samples[1].context[0].speaker == "seeker"
    assert len(samples[1].context) == 3


def test_window_limits_context(tmp_path: Path) -> None:
    last = build_turn_samples([_conversation(tmp_path)], context_window=1)[-1]
    assert [t.text for t in last.context] == ["in three weeks"]


def test_profile_never_enters_the_prompt(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    sample = build_turn_samples([_conversation(tmp_path)], context_window=0)[-1]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = render_prompt(tokenizer, build_messages(sample.context, "Be kind."))
    assert sample.profile.situation not in prompt
    assert "job crisis" not in prompt.lower() and "anxiety" not in prompt.lower()
    assert prompt.index("Be kind.") < prompt.index("hi, I am stressed")
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    assert prompt.count("<|im_start|>user") == 2 and prompt.count("<|im_start|>assistant") == 2


def test_template_without_system_role_gets_it_folded() -> None:
    class NoSystemTokenizer:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            if messages[0]["role"] == "system":
                raise ValueError("Conversation roles must alternate user/assistant")
            return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render_prompt(NoSystemTokenizer(), messages) == "user:S\n\nU"
