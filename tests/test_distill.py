"""sft.distill: every assistant turn of the training split becomes the teacher's greedy reply to
the conversation so far; held-out conversations stay unanswered; the file is what
`python -m sft --data` reads; bad input exits non-zero and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sft.data import load_conversations, split_eval
from sft.distill import distill, distill_conversation, main
from tinyllama.inference.backends import load_backend
from tinyllama.formats.chat import encode_chat
from tinyllama.inference.generate import generate

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What does `len()` do?"},
                  {"role": "assistant", "content": "Returns the number of items."}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "And `abs()`?"},
                  {"role": "assistant", "content": "The absolute value."},
                  {"role": "user", "content": "Its signature?"},
                  {"role": "assistant", "content": "abs(x, /)"}]},
    {"text": "### Human: What is `zip()`?### Assistant: Iterates in parallel."},
    {"prompt": "Explain `map()`.", "response": "Applies a function to each item."},
]


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    return path


def greedy_reply(backend, tok, messages, n) -> str:
    backend.reset()
    ids = encode_chat(tok, messages, add_generation_prompt=True)[0]
    return tok.decode([t for t in generate(backend, ids, max_new_tokens=n, stop_ids=[tok.eos_id]) if t != tok.eos_id])


def test_assistant_turns_are_the_teachers_greedy_replies(tiny_chat_checkpoint, data_file, tmp_path):
    out = tmp_path / "distill.jsonl"
    counts = distill(tiny_chat_checkpoint, str(data_file), out, max_new_tokens=8, eval_fraction=0.25, seed=1,
                     progress=False)
    convs = load_conversations(str(data_file))
    train, held = split_eval(convs, 0.25, seed=1)
    assert counts["held_out"] == len(held) == 1 and counts["conversations"] == len(train) == 3
    written = load_conversations(str(out))               # readable by python -m sft --data
    assert len(written) == 3
    backend, tok = load_backend(tiny_chat_checkpoint, dtype=None)      # the stored dtype, as distill runs it
    try:
        for original, answered in zip(train, written):
            assert [m["role"] for m in answered] == [m["role"] for m in original]
            for i, (o, a) in enumerate(zip(original, answered)):
                if o["role"] == "assistant":             # the teacher's reply to its own history
                    assert a["content"] == greedy_reply(backend, tok, answered[:i], 8)
                else:
                    assert a == o
    finally:
        backend.close()
    assert counts["teacher_replies"] == sum(m["role"] == "assistant" for c in written for m in c)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".distill")]     # no temp file left


def test_an_empty_teacher_reply_ends_the_conversation_before_its_question(monkeypatch):
    import sft.distill as d

    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]
    replies = iter(["first", "  "])                       # answers the first question, then nothing
    monkeypatch.setattr(d, "teacher_reply", lambda *a, **k: next(replies))
    assert distill_conversation(None, None, conv, 4) == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "first"}]
    replies = iter([""])                                  # nothing at all: the conversation goes
    assert distill_conversation(None, None, conv, 4) == []


def test_bad_input_exits_2_and_writes_nothing(tiny_chat_checkpoint, data_file, tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    assert main(["--teacher", str(tmp_path / "missing"), "--data", str(data_file), "--out", str(out)]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CONVERSATIONS[0]) + "\n{\"messages\": []}\n")
    assert main(["--teacher", str(tiny_chat_checkpoint), "--data", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2:" in err and "empty conversation" in err
    assert main(["--teacher", str(tiny_chat_checkpoint), "--data", str(data_file), "--out", str(out),
                 "--max-new-tokens", "0"]) == 2
    assert not out.exists()


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "sft.distill", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    assert "--teacher" in r.stdout and "sequence-level" in r.stdout


def test_code_prompts_split_by_name_and_read_the_same_every_run():
    """The distillation and measurement code prompts never share a function, the split follows
    the name alone (a prompt stays on its side whatever else this Python has), and no text
    carries a memory address that would change between runs."""
    import re
    import subprocess
    import sys

    from sft.prompts import CodePrompt, code_prompts

    train, held = code_prompts()
    assert len(train) >= 100 and len(held) >= 10
    assert not {p.name for p in train} & {p.name for p in held}
    assert len({p.name for p in train + held}) == len(train) + len(held)
    assert all(not p.held_out for p in train) and all(p.held_out for p in held)
    assert CodePrompt("textwrap.dedent", "x").held_out == CodePrompt("textwrap.dedent", "y").held_out
    assert not [p.text for p in train + held if re.search(r"0x[0-9a-f]{4,}", p.text)]
    again = subprocess.run([sys.executable, "-c", "from sft.prompts import code_prompts; "
                            "print(repr([p.text for p in sum(code_prompts(), [])]))"],
                           capture_output=True, text=True, check=True).stdout
    assert again.strip() == repr([p.text for p in train + held])


def test_code_prompts_and_sampled_answers_never_touch_what_the_benchmark_measures(tiny_chat_checkpoint, tmp_path):
    """The distillation data and bench.speculative's prompts are disjoint: no held-out chat
    question (the split bench.chat_prompts takes) and no held-out code prompt is answered; sampled
    answers come beside the greedy ones, seeded by the prompt, so a second run writes the same."""
    import json

    from sft.prompts import code_prompts

    out = tmp_path / "d.jsonl"
    counts = distill(tiny_chat_checkpoint, "sample", out, max_new_tokens=4, progress=False, code=True, samples=1)
    records = [json.loads(line) for line in out.read_text().split("\n")[:-1]]
    assert counts["conversations"] == len(records)
    sources = {r["source"] for r in records}
    convs = load_conversations("sample")
    _, held = split_eval(convs, 0.05, seed=42)                      # bench.chat_prompts' held-out questions
    held_sources = {f"sample:{i}" for i, c in enumerate(convs) if any(c is h for h in held)}
    assert held_sources and not sources & held_sources
    assert not sources & {f"code:{p.name}" for p in code_prompts()[1]}
    assert {f"code:{p.name}" for p in code_prompts()[0]} <= sources
    assert {r["decoding"] for r in records} == {"greedy", "sampled:1"}
    again = tmp_path / "e.jsonl"
    distill(tiny_chat_checkpoint, "sample", again, max_new_tokens=4, progress=False, code=True, samples=1, limit=5)
    first = again.read_text().split("\n")[:-1]
    assert first == out.read_text().split("\n")[:len(first)]


def test_a_stopped_distillation_resumes_where_it_stopped(tiny_chat_checkpoint, data_file, tmp_path, monkeypatch):
    """Answers reach OUT.partial one line at a time; a second run answers only what is missing
    (a last line cut short by the stop is answered again) and OUT appears whole at the end."""
    import sft.distill as d

    out = tmp_path / "d.jsonl"
    full = distill(tiny_chat_checkpoint, str(data_file), tmp_path / "ref.jsonl", max_new_tokens=4, eval_fraction=0.25,
                   seed=1, progress=False)
    lines = [line + "\n" for line in (tmp_path / "ref.jsonl").read_text().split("\n")[:-1]]
    (tmp_path / "d.jsonl.partial").write_text(lines[0] + lines[1][:20])         # one whole answer, one cut
    asked = []
    real = d.distill_conversation
    monkeypatch.setattr(d, "distill_conversation", lambda *a, **k: asked.append(a[2]) or real(*a, **k))
    counts = distill(tiny_chat_checkpoint, str(data_file), out, max_new_tokens=4, eval_fraction=0.25, seed=1,
                     progress=False)
    assert len(asked) == full["conversations"] - 1
    assert out.read_text() == "".join(lines) and not (tmp_path / "d.jsonl.partial").exists()
    assert counts["conversations"] == full["conversations"] and counts["teacher_replies"] == full["teacher_replies"]
