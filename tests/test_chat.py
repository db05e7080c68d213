"""The one chat format: golden strings, ids equal to llama.cpp's and transformers', the SFT mask."""

import pytest

from tinyllama import Tokenizer
from tinyllama.formats.chat import CHAT_TEMPLATE, ChatFormatError, encode_chat, render_chat
from tinyllama.paths import llama2_dir

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What does len() return?"},
    {"role": "assistant", "content": "The number of items in a container."},
    {"role": "user", "content": "And for a string?"},
    {"role": "assistant", "content": "Its length in characters:\n\n    len('abc') == 3"},
]


def test_golden_strings():
    assert render_chat(CONVERSATION[:3]) == (
        "<s><|system|>\nYou are a helpful assistant.</s>\n"
        "<|user|>\nWhat does len() return?</s>\n"
        "<|assistant|>\nThe number of items in a container.</s>")
    assert render_chat(CONVERSATION[1:2], add_generation_prompt=True) == (
        "<s><|user|>\nWhat does len() return?</s>\n<|assistant|>\n")


@pytest.mark.parametrize("n_turns", [2, 3, 5])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_ids_equal_llama_cpp_and_transformers(llama2_tokenizer, tmp_path, n_turns, generation_prompt):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    messages = CONVERSATION[:n_turns]
    ours, _ = encode_chat(llama2_tokenizer, messages, add_generation_prompt=generation_prompt)
    text = render_chat(messages, add_generation_prompt=generation_prompt)
    llm = llama_cpp.Llama(model_path=str(llama2_dir() / "ggml-vocab-llama-spm.gguf"), vocab_only=True, verbose=False)
    try:
        assert ours == llm.tokenize(text.encode(), add_bos=False, special=True)   # BOS is in the template
    finally:
        llm.close()
    tok = Tokenizer.from_dir(llama2_dir())
    tok.chat_template = CHAT_TEMPLATE
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
    assert ours == list(hf_ids)
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt) == text


def test_only_assistant_tokens_are_targets(llama2_tokenizer):
    ids, target = encode_chat(llama2_tokenizer, CONVERSATION, for_training=True)
    assert len(ids) == len(target) and ids[0] == 1 and not target[0]
    learned = [i for i, t in zip(ids, target) if t]
    eos_positions = [i for i, t in enumerate(ids) if t == 2]
    assert len(eos_positions) == 5 and sum(target[p] for p in eos_positions) == 2   # assistant EOS only
    text = llama2_tokenizer.decode(learned, skip_special=False)
    assert text == "The number of items in a container.</s>Its length in characters:\n\n    len('abc') == 3</s>"


def test_eos_typed_in_a_message_stays_text(llama2_tokenizer):
    messages = [{"role": "user", "content": "print('</s>')"}, {"role": "assistant", "content": "ok"}]
    ids, _ = encode_chat(llama2_tokenizer, messages)
    assert ids.count(2) == 2                      # the two turn ends, not the one in the text


@pytest.mark.parametrize("messages, message", [
    ([], "empty conversation"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "assistant", "content": "hi"}], "out of order"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "out of order"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system turn may only come first"),
    ([{"role": "user", "content": "   "}, {"role": "assistant", "content": "b"}], "empty text"),
    ([{"role": "bot", "content": "a"}], "unknown role"),
    ([{"content": "a"}], "turn 0: no 'role' field"),
    (["a"], "turn 0: expected"),
])
def test_bad_conversations_are_named(llama2_tokenizer, messages, message):
    with pytest.raises(ChatFormatError, match=message):
        encode_chat(llama2_tokenizer, messages, for_training=True)
