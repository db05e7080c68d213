"""SFT: Guanaco parsing, data loading and masks, the transformers face of our model, and real
trl + peft + bitsandbytes runs (full, LoRA, QLoRA) on a tiny preset on the CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinyllama import Llama, ModelConfig, load_checkpoint, save_checkpoint
from tinyllama.formats.chat import CHAT_TEMPLATE, ChatFormatError, encode_chat
from tinyllama.errors import NotFound

pytest.importorskip("trl")
pytest.importorskip("peft")
# every run here trains under dtype auto unless it names a dtype (make test-dtype forces the other one)
pytestmark = pytest.mark.dtype_auto

from sft.data import (  # noqa: E402
    IGNORE_INDEX,
    SAMPLE_PATH,
    DataError,
    LoadStats,
    TokenStats,
    load_conversations,
    parse_guanaco,
    read_conversations_jsonl,
    split_eval,
    to_guanaco,
    tokenize_conversations,
)
from sft.modeling import TinyLlamaForCausalLM  # noqa: E402
from sft.train import SFTArgs, SFTError, run_sft  # noqa: E402

Q = {"role": "user", "content": "What does `len()` do?"}
A = {"role": "assistant", "content": "Return the number of items in a container."}


# ---- Guanaco text -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("### Human: hi### Assistant: hello", [("user", "hi"), ("assistant", "hello")]),
    ("  ###Human:hi\n\n###  Assistant :  hello  \n", [("user", "hi"), ("assistant", "hello")]),
    ("### Human: a### Assistant: b### Human: c### Assistant: d",
     [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]),
    # "###" that is not a turn marker stays content (markdown headings in answers)
    ("### Human: title?### Assistant: ### Heading\ntext", [("user", "title?"), ("assistant", "### Heading\ntext")]),
    # a trailing unanswered question is kept; the conversation still has an assistant turn
    ("### Human: a### Assistant: b### Human: c", [("user", "a"), ("assistant", "b"), ("user", "c")]),
])
def test_parse_guanaco(text, expected):
    messages = parse_guanaco(text)
    assert [(m["role"], m["content"]) for m in messages] == expected
    assert parse_guanaco(to_guanaco(messages)) == messages


@pytest.mark.parametrize("text, message", [
    ("### Human: only a question", "no assistant turn"),
    ("### Assistant: hello", "roles out of order"),
    ("### Human: a### Human: b### Assistant: c", "roles out of order"),
    ("### Human: ### Assistant: answer", "empty text"),
    ("### Human: q### Assistant:   ", "empty text"),
    ("preamble ### Human: q### Assistant: a", "text before the first"),
    ("no markers at all", "no '### Human:'"),
])
def test_parse_guanaco_errors(text, message):
    with pytest.raises(ChatFormatError, match=message):
        parse_guanaco(text)


def test_shipped_sample_is_valid_guanaco():
    lines = SAMPLE_PATH.read_text().splitlines()
    assert len(lines) >= 500
    assert all(json.loads(line)["text"].startswith("### Human: ") for line in lines)
    convs = load_conversations("sample")
    assert len(convs) == len(lines)
    assert sum(len(c) > 2 for c in convs) > 50          # some multi-turn conversations


# ---- JSONL and splits -------------------------------------------------------------------------

def test_jsonl_record_shapes(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join([
        json.dumps({"text": "### Human: a### Assistant: b"}),
        json.dumps({"messages": [{"role": "system", "content": "be brief"}, Q, A]}),
        json.dumps({"prompt": "p", "completion": "c"}),
        "",
    ]))
    convs = read_conversations_jsonl(f)
    assert [len(c) for c in convs] == [2, 3, 2]
    assert convs[1][0] == {"role": "system", "content": "be brief"}
    assert convs[2][1] == {"role": "assistant", "content": "c"}


@pytest.mark.parametrize("line, message", [
    ("{not json", "d.jsonl:2: invalid JSON"),
    (json.dumps({"messages": [Q]}), "d.jsonl:2: no assistant turn"),
    (json.dumps({"messages": [A, Q]}), "d.jsonl:2: turn 0: roles out of order"),
    (json.dumps({"prompt": "p"}), "d.jsonl:2: field 'prompt' without a 'response'"),
    (json.dumps({"question": "q"}), "d.jsonl:2: no 'text', 'messages' or 'prompt' field"),
    (json.dumps(["a list"]), "d.jsonl:2: expected a JSON object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, line, message):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "### Human: a### Assistant: b"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        read_conversations_jsonl(f)
    stats = LoadStats()
    assert len(read_conversations_jsonl(f, skip_invalid=True, stats=stats)) == 1
    assert (stats.read, stats.skipped) == (2, 1)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        load_conversations(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no conversations"):
        load_conversations(str(tmp_path / "empty.jsonl"))


def test_split_eval_is_deterministic_and_disjoint():
    convs = [[Q, {"role": "assistant", "content": f"answer {i}"}] for i in range(40)]
    train, held = split_eval(convs, 0.1, seed=3)
    assert (len(train), len(held)) == (36, 4)
    assert split_eval(convs, 0.1, seed=3) == (train, held)
    assert not {c[1]["content"] for c in train} & {c[1]["content"] for c in held}
    assert split_eval(convs, 0.0, seed=3) == (convs, [])


# ---- tokens and masks ---------------------------------------------------------------------------

def test_labels_are_assistant_tokens_only(llama2_tokenizer):
    tok = llama2_tokenizer
    conv = [{"role": "system", "content": "be brief"}, Q, A, {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": "You are welcome."}]
    [row] = tokenize_conversations([conv], tok, max_len=512)
    ids, labels = row["input_ids"], row["labels"]
    assert ids == encode_chat(tok, conv)[0]
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    # exactly the two replies, each followed by its EOS
    assert tok.decode(trained) == A["content"] + "You are welcome."
    assert trained.count(tok.eos_id) == 2 and trained[-1] == tok.eos_id
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))


def test_length_policy_truncates_or_drops(llama2_tokenizer):
    tok = llama2_tokenizer
    long_question = [{"role": "user", "content": "why " * 100}, A]
    long_answer = [Q, {"role": "assistant", "content": "because " * 100}]
    stats = TokenStats()
    rows = tokenize_conversations([long_question, long_answer, [Q, A]], tok, max_len=40, stats=stats)
    assert (stats.examples, stats.truncated, stats.dropped) == (2, 1, 1)
    assert len(rows[0]["input_ids"]) == 40 and rows[0]["labels"][-1] != IGNORE_INDEX
    assert "truncated" in stats.describe() and "1 dropped" in stats.describe()


# ---- the transformers face of tinyllama.model.model.Llama -----------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A random tinyllama-debug base with the real Llama-2 tokenizer (32000 tokens)."""
    from tinyllama import Tokenizer

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tinyllama-debug")
    out = tmp_path_factory.mktemp("sft") / "base"
    save_checkpoint(Llama(cfg), Tokenizer.llama2(), out)
    return out


def test_adapter_is_our_model(base_dir):
    hf = TinyLlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    ours, _ = load_checkpoint(base_dir, dtype=torch.float32)
    ids = torch.randint(3, 32000, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=0)
    assert hf.tinyllama_config == ours.config
    assert set(hf.state_dict()) == set(ours.state_dict())     # the same HF names, nothing added
    assert hf.llama.model is hf.model                          # one module tree, shared


def test_adapter_ties_the_embeddings_of_a_tied_model(tmp_path):
    """A tied model (SmolLM2) stores no lm_head.weight: the adapter ties it to the embedding, as
    transformers' LlamaForCausalLM does, instead of initialising a fresh one."""
    from tinyllama import Tokenizer

    torch.manual_seed(0)
    save_checkpoint(Llama(ModelConfig.from_name("tinyllama-debug").replace(tie_embeddings=True)), Tokenizer.llama2(),
                    tmp_path / "tied")
    hf = TinyLlamaForCausalLM.from_pretrained(str(tmp_path / "tied"), dtype=torch.float32).eval()
    ours, _ = load_checkpoint(tmp_path / "tied", dtype=torch.float32)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight is hf.llama.lm_head.weight
    ids = torch.randint(3, 32000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=0)


def test_adapter_loss_masks_and_packing(base_dir):
    hf = TinyLlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    a, b = torch.randint(3, 32000, (1, 9)), torch.randint(3, 32000, (1, 6))
    la, lb = a.clone(), b.clone()
    la[:, :4] = IGNORE_INDEX
    with torch.no_grad():
        loss_a = hf(a, labels=la).loss
        manual = torch.nn.functional.cross_entropy(hf(a).logits[0, 3:-1], a[0, 4:])
        torch.testing.assert_close(loss_a, manual)
        # padding-free packing: two examples in one row, positions restart at 0
        packed = hf(torch.cat([a, b], 1), labels=torch.cat([la, lb], 1),
                    position_ids=torch.cat([torch.arange(9), torch.arange(6)])[None])
        n_a, n_b = 5, 5                                              # targets per example after the shift
        expected = (hf(a, labels=la).loss * n_a + hf(b, labels=lb).loss * n_b) / (n_a + n_b)
        torch.testing.assert_close(packed.loss, expected)
        # each packed example sees only itself
        torch.testing.assert_close(packed.logits[:, 9:], hf(b).logits)
        # right padding leaves real tokens untouched; left padding is refused
        padded = torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)
        mask = torch.tensor([[1] * 6 + [0] * 3])
        torch.testing.assert_close(hf(padded, attention_mask=mask).logits[:, :6], hf(b).logits)
        with pytest.raises(ValueError, match="left padding"):
            hf(padded, attention_mask=mask.flip(1))


def test_gradient_checkpointing_keeps_names_and_gradients(base_dir):
    hf = TinyLlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).train()
    ids = torch.randint(3, 32000, (2, 12))

    def grads():
        hf.zero_grad()
        hf(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in hf.named_parameters()}

    plain = grads()
    hf.activation_checkpointing_enable()
    assert hf.is_checkpointing_blocks
    names = set(hf.state_dict())
    checkpointed = grads()
    hf.activation_checkpointing_disable()
    assert not hf.is_checkpointing_blocks and set(hf.state_dict()) == names
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n])


# ---- real fine-tuning runs -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    lines = SAMPLE_PATH.read_text().splitlines()[:160]
    out = tmp_path_factory.mktemp("sft-data") / "small.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def lora_run(base_dir, small_data):
    """LoRA at the default dtype, 54 steps. Forced to bf16 (make test-dtype) on a CPU that only
    emulates it, this run takes ~8 minutes instead of ~12 s (CPU_ISA=avx2 on an AMX Xeon), so
    it is skipped there: the two-step bf16 runs of test_bf16_autocast_on_the_cpu_keeps_float32_weights
    check that path on every CPU."""
    from tinyllama import precision

    if precision.forced_dtype() is torch.bfloat16 and not precision.has_bf16_instructions():
        pytest.skip("auto forced to bf16 on a CPU that emulates it: 54 LoRA steps would take ~8 minutes")
    out = base_dir.parent / "lora"
    args = SFTArgs(base=base_dir, out=out, data=str(small_data), method="lora", epochs=3, lr=5e-3,
                   batch_size=8, eval_fraction=0.1, progress=False, lora_r=8, lora_alpha=16)
    return run_sft(args)


@pytest.mark.slow
def test_lora_lowers_the_loss_and_writes_a_chat_model(lora_run, llama2_tokenizer):
    s = lora_run.summary
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.5, s
    # the default dtype: measured here, float32 where bf16 is emulated, or forced (make test-dtype)
    assert s["dtype_reason"].startswith(("auto: bf16 matmul", "auto: float32: no bf16 matrix instructions",
                                         "auto: TINYLLAMA_AUTO_DTYPE=")) and s["dtype"] in ("float32", "bfloat16")
    assert s["train"]["examples"] == 144 and s["eval"]["examples"] == 16
    out = lora_run.out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "sft_summary.json"):
        assert (out / name).is_file(), name
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == CHAT_TEMPLATE
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 32000   # no added tokens
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    log_rows = [json.loads(x) for x in (out / "sft_log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in log_rows) and any("eval_loss" in r for r in log_rows)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no temp leftovers

    # transformers reads the saved template and renders ids equal to ours
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(out))
    conv = [Q, A, {"role": "user", "content": "And `max()`?"}]
    rendered = hf_tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert hf_tok(rendered, add_special_tokens=False)["input_ids"] == \
        encode_chat(llama2_tokenizer, conv, add_generation_prompt=True)[0]


@pytest.mark.slow
def test_merged_model_equals_base_plus_adapter(lora_run, base_dir):
    """What SFT trained (peft LoRA over our model), the merged directory through
    tinyllama.load_checkpoint, and transformers' own LlamaForCausalLM + peft adapter agree."""
    assert_merged_is_what_lora_trained(lora_run, base_dir)


def assert_merged_is_what_lora_trained(result, base_dir) -> None:
    """The model run_sft hands back, its merged directory and transformers + peft on the saved
    adapter compute the same logits in float32, whatever dtype the run trained in (to float32
    rounding: the merge folds B·A into W)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ids = torch.randint(3, 32000, (1, 20))
    merged, _ = load_checkpoint(result.out, dtype=torch.float32)
    trained = result.model.eval()
    hf_base = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    hf_lora = PeftModel.from_pretrained(hf_base, str(result.out / "adapter")).eval()
    with torch.no_grad():
        ours = merged(ids)
        torch.testing.assert_close(trained(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hf_lora(input_ids=ids).logits.float(), ours, rtol=1e-4, atol=1e-4)
        base, _ = load_checkpoint(base_dir, dtype=torch.float32)
        assert (base(ids) - ours).abs().max() > 1e-3                 # the adapter did change the model


@pytest.mark.slow
def test_full_finetune_saves_what_it_trained(base_dir, small_data, tmp_path):
    result = run_sft(SFTArgs(base=base_dir, out=tmp_path / "full", data=str(small_data), method="full",
                             max_steps=4, lr=1e-3, progress=False))
    assert result.summary["steps"] == 4 and not (tmp_path / "full" / "adapter").exists()
    saved, _ = load_checkpoint(tmp_path / "full", dtype=torch.float32)
    ids = torch.randint(3, 32000, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(input_ids=ids).logits, saved(ids), rtol=0, atol=0)


def test_qlora_gradients_equal_a_dequantized_base(base_dir):
    """nf4 + LoRA gives the gradients of a float model holding the dequantized weights, also
    after an evaluation pass (which, left alone, makes bitsandbytes' CPU path drop autograd)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from sft.train import ALL_PROJECTIONS, load_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJECTIONS, init_lora_weights=False)
    torch.manual_seed(0)
    q = get_peft_model(load_model(base_dir, "qlora", "cpu", torch.float32), lora)
    ref_base = TinyLlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    n_quantized = 0
    for name, module in q.get_base_model().named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            target = ref_base.get_submodule(name.replace(".base_layer", ""))
            target.weight.data = bnb.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float32)
            n_quantized += 1
    assert n_quantized == 7 * ref_base.tinyllama_config.n_layer
    ref = get_peft_model(ref_base, lora)
    set_peft_model_state_dict(ref, get_peft_model_state_dict(q))
    ids = torch.randint(3, 32000, (2, 16))
    q.eval()
    with torch.no_grad():
        q(input_ids=ids)                                    # an evaluation pass first
    for m in (q, ref):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    ref_grads = dict((n, p.grad) for n, p in ref.named_parameters() if p.requires_grad)
    for n, p in q.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_qlora_trains_nf4_on_cpu(base_dir, small_data, tmp_path):
    import bitsandbytes as bnb

    result = run_sft(SFTArgs(base=base_dir, out=tmp_path / "qlora", data=str(small_data), method="qlora",
                             max_steps=3, lr=1e-3, progress=False, lora_r=4, lora_alpha=8))
    model = result.model.get_base_model()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_type == "nf4" and q_proj.base_layer.weight.quant_state.nested
    assert model.is_checkpointing_blocks                         # on by default for qlora
    assert result.summary["steps"] == 3
    merged, tok = load_checkpoint(tmp_path / "qlora")
    assert tok.chat_template == CHAT_TEMPLATE and merged.lm_head.weight.dtype == torch.float32


# ---- bad input -----------------------------------------------------------------------------------

def test_bad_requests_write_nothing(base_dir, small_data, tmp_path):
    out = tmp_path / "out"
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "### Human: a### Assistant: b"}) + "\n{oops\n")
    cases = [
        (dict(base=tmp_path / "missing"), SFTError, "missing: no such file or directory"),
        (dict(base=gpt2), SFTError, "not a Llama model"),
        (dict(method="dpo"), SFTError, "--method 'dpo'"),
        (dict(lora_r=0), SFTError, "--lora-r must be positive"),
        (dict(target_modules=["qkv"]), SFTError, "unknown qkv"),
        (dict(data=str(bad)), DataError, "bad.jsonl:2: invalid JSON"),
        (dict(seq_len=8), SFTError, "no training example fits --seq-len 8"),
        (dict(out=tmp_path / "no" / "such" / "dir"), NotFound, "output folder does not exist"),
    ]

    for overrides, error, message in cases:
        args = dict(base=base_dir, out=out, data=str(small_data), method="lora", max_steps=1, progress=False)
        args.update(overrides)
        with pytest.raises(error, match=message):
            run_sft(SFTArgs(**args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "gpt2"]


def test_cli_help_and_error_exit(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "sft", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--base", "--method", "--lora-r", "--packing", "### Human:", "assistant tokens only"):
        assert flag in help_text
    r = subprocess.run([sys.executable, "-m", "sft", "--base", str(tmp_path), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "error: --base" in r.stderr and "no config.json" in r.stderr


# ---- the chat model in llama.cpp ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.llamacpp
def test_gguf_of_the_chat_model_chats_in_llama_cpp_with_our_template(lora_run, llama2_tokenizer, tmp_path):
    """SFT -> quantize: llama.cpp reads the template from the GGUF, renders the same prompt ids
    as encode_chat, and chats with the model (Q8_0)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from quantize.export import quantize_gguf, write_gguf
    from tinyllama.formats.gguf_file import read_metadata

    f32 = write_gguf(lora_run.out, tmp_path / "chat-f32.gguf", "f32")
    q8 = quantize_gguf(f32, tmp_path / "chat-q8_0.gguf", "q8_0")
    template = read_metadata(q8)["tokenizer.chat_template"]
    assert template == CHAT_TEMPLATE
    conv = [{"role": "system", "content": "Answer briefly."}, Q, A, {"role": "user", "content": "And `max()`?"}]
    prompt = Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")(messages=conv).prompt
    llm = llama_cpp.Llama(model_path=str(q8), n_ctx=256, verbose=False, seed=0)
    try:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert ids == encode_chat(llama2_tokenizer, conv, add_generation_prompt=True)[0]
        reply = llm.create_chat_completion(messages=conv, max_tokens=8, temperature=0.0)
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["prompt_tokens"] == len(ids)
    finally:
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_autocast_on_the_cpu_keeps_float32_weights(base_dir, small_data, tmp_path, method):
    """--dtype bfloat16 on a CPU (what `auto` picks where bf16 is native): float32 master weights
    under bf16 autocast (trl's bf16=True); the model handed back computes as its checkpoint does
    (accelerate's autocast forward is taken off it), bitwise for full fine-tuning, to the
    merge's rounding for LoRA. Runs on every CPU (two short steps even where bf16 is emulated)."""
    result = run_sft(SFTArgs(base=base_dir, out=tmp_path / "bf16", data=str(small_data), method=method,
                             max_steps=2, lr=5e-3, batch_size=4, progress=False, dtype="bfloat16"))
    s = result.summary
    assert s["dtype"] == "bfloat16" and s["dtype_reason"] == "as asked" and s["steps"] == 2
    assert math.isfinite(s["train_loss"])
    assert all(p.dtype == torch.float32 for p in result.model.parameters() if p.requires_grad)
    saved, _ = load_checkpoint(tmp_path / "bf16")
    assert saved.lm_head.weight.dtype == torch.float32
    if method == "lora":
        assert_merged_is_what_lora_trained(result, base_dir)
        return
    ids = torch.randint(3, 32000, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(input_ids=ids).logits, saved(ids), rtol=0, atol=0)
