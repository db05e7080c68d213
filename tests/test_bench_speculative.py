"""Prompt-lookup drafting through the engine and the speculative benchmark (its JSON rows)."""

import json

from bench import speculative
from serve.engine import Engine
from tinyllama.inference.generate import SamplingParams
from tinyllama.inference.draft_policy import Fixed
from tinyllama.inference.lookup import NgramDrafter


def test_engine_drafts_by_prompt_lookup(tiny_chat_checkpoint):
    engine = Engine.load(str(tiny_chat_checkpoint), draft="ngram:2", draft_policy=Fixed(3), dtype="float32")
    try:
        assert isinstance(engine.draft, NgramDrafter) and engine.draft.max_ngram == 2
        prompt = "one two three four one two three four one two"
        s = SamplingParams(max_new_tokens=24)
        plain = engine.complete(prompt, s, speculative=False)
        plain_text = "".join(plain)
        spec = engine.complete(prompt, s)
        assert "".join(spec) == plain_text
        assert spec.stats.drafted > 0
    finally:
        engine.close()


def test_bench_speculative_json_rows_with_ngram(tiny_chat_checkpoint, capsys):
    # the old flag name still works, and says which to use
    speculative.main(["--target", str(tiny_chat_checkpoint), "--draft", "ngram", "--prompt-set", "copy",
                      "--k", "2", "--tokens", "8", "--prompts", "2", "--repeats", "1", "--json"])
    captured = capsys.readouterr()
    assert "warning: --draft is an old name: use --model-draft" in captured.err
    out = json.loads(captured.out)
    assert "drafted by ngram:3" in out["pair"] and "copy prompts" in out["pair"]
    rows = {r["config"]: r for r in out["rows"]}
    assert rows["plain target"]["speedup"] == 1.0 and rows["plain target"]["tokens_per_s"] > 0
    k2 = rows["speculative k=2"]
    assert k2["c"] == 0.0 and 0 <= k2["alpha"] <= 1 and k2["theory"] >= 1 and k2["efficiency"] > 0
    # a model draft: the target drafting for itself is always accepted
    speculative.main(["--target", str(tiny_chat_checkpoint), "--model-draft", str(tiny_chat_checkpoint),
                      "--k", "2", "--tokens", "8", "--prompts", "1", "--repeats", "1", "--json",
                      "--draft-p-min", "0.01"])
    rows = {r["config"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["speculative k=2"]["accepted_per_drafted"] == 1.0 and "plain draft" in rows
    assert rows["speculative k=2"]["alpha_by_position"] == [1.0, 1.0]
    # each --draft-p-min adds adaptive and auto rows with that stop, decoding the same tokens
    sure = [r for name, r in rows.items() if ", p-min 0.01 (" in name]
    assert [r["config"].split(" (")[0] for r in sure] == ["speculative adaptive k, p-min 0.01",
                                                         "speculative auto k, p-min 0.01"]
    assert all(r["same_output_as_plain"] == "1/1" for r in sure)


def test_bench_speculative_stops_at_the_end_of_turn_on_held_out_code_prompts(tiny_chat_checkpoint, capsys):
    """--eos: every configuration stops where the target ends its turn (what a user gets), so the
    rows' rates come from each run's own tokens; --prompt-set code takes the held-out code prompts."""
    from tinyllama.formats.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_chat_checkpoint)
    runs = []
    real_decode = speculative.decode_prompts

    def spy(*args, **kwargs):
        runs.append(real_decode(*args, **kwargs))
        return runs[-1]

    speculative.decode_prompts = spy
    try:
        speculative.main(["--target", str(tiny_chat_checkpoint), "-md", str(tiny_chat_checkpoint), "--eos",
                          "--prompt-set", "code", "--k", "1", "--tokens", "40", "--prompts", "2", "--repeats", "1",
                          "--json"])
    finally:
        speculative.decode_prompts = real_decode
    out = json.loads(capsys.readouterr().out)
    assert "held-out code prompts" in out["pair"] and "stopping at the end of turn" in out["pair"]
    ended = [o for run in runs for o in run.outputs if o and o[-1] in tok.stop_ids]
    assert all(len(o) <= 40 for run in runs for o in run.outputs)
    assert all(o.count(s) == 0 for run in runs for o in run.outputs for s in tok.stop_ids if o[-1:] != [s])
    rows = {r["config"]: r for r in out["rows"]}
    assert rows["speculative k=1"]["alpha_by_position"] == [1.0] and rows["speculative k=1"]["same_output_as_plain"] == "2/2"
    assert ended or all(len(o) == 40 for run in runs for o in run.outputs)


def test_bench_speculative_refuses_a_draft_with_other_special_ids(tiny_chat_checkpoint, tmp_path, capsys):
    """A pair that cannot draft (here: the same weights and vocabulary, another EOS) is one line
    naming both folders and the difference, exit status 2, and no table."""
    import shutil

    draft = tmp_path / "draft"
    shutil.copytree(tiny_chat_checkpoint, draft)
    config = draft / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "eos_token": "<unk>"}))
    before = sorted((p, p.stat().st_mtime_ns) for p in [*tmp_path.rglob("*"), *tiny_chat_checkpoint.rglob("*")])
    assert speculative.main(["--target", str(tiny_chat_checkpoint), "-md", str(draft), "--k", "1", "--tokens", "4",
                             "--prompts", "1", "--repeats", "1"]) == 2
    captured = capsys.readouterr()
    assert (f"error: draft {draft} has EOS id 0 ('<unk>') but target {tiny_chat_checkpoint} has EOS id 2 ('</s>')"
            in captured.err)
    assert "Traceback" not in captured.err and captured.out == ""
    assert sorted((p, p.stat().st_mtime_ns) for p in [*tmp_path.rglob("*"), *tiny_chat_checkpoint.rglob("*")]) == before


def test_bench_speculative_runs_transformers_assisted_generation_beside_ours(tiny_chat_checkpoint, llama2_tokenizer,
                                                                            tmp_path, capsys):
    """A checkpoint-directory pair: transformers' plain and assisted generate run on the same
    prompts, and every output agrees token for token with ours; a draft that is not a checkpoint
    directory skips them, saying why."""
    import torch

    from tinyllama import Llama, ModelConfig, save_checkpoint

    torch.manual_seed(1)            # another, smaller model in the same vocabulary: some drafts rejected
    draft = tmp_path / "draft"
    save_checkpoint(Llama(ModelConfig.from_name("tinyllama-debug").replace(n_layer=1, d_model=32, n_head=2,
                                                                           n_kv_head=1, ffn_dim=64)),
                    llama2_tokenizer, draft)
    speculative.main(["--target", str(tiny_chat_checkpoint), "-md", str(draft), "--k", "1", "3", "--tokens", "12",
                      "--prompts", "2", "--repeats", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    rows = {r["config"]: r for r in out["rows"]}
    hf = [r for r in out["rows"] if r["config"].startswith("transformers")]
    names = [r["config"] for r in hf]
    assert names[0] == "transformers plain generate" and names[1].startswith("transformers assisted, its defaults")
    assert names[2:] == ["transformers assisted k=1 (constant)", "transformers assisted k=3 (constant)"]
    assert all(r["tokens_per_s"] > 0 and r["same_output_as_plain"] == "2/2" for r in hf)
    assert hf[0]["speedup"] == 1.0 and all(r["speedup"] > 0 for r in hf)
    assert rows["speculative k=3"]["vs_transformers"] > 0 and rows["plain target"]["vs_transformers"] > 0
    assert rows["speculative k=3"]["same_output_as_plain"] == "2/2"
    last = out["rows"][-1]
    assert last["config"].startswith("ours, fastest (") and "vs transformers assisted, fastest (" in last["config"]
    assert last["vs_transformers"] > 0
    assert f"transformers assisted by {draft}" in out["pair"]

    speculative.main(["--target", str(tiny_chat_checkpoint), "-md", "ngram", "--k", "1", "--tokens", "4",
                      "--prompts", "1", "--repeats", "1", "--json"])
    captured = capsys.readouterr()
    assert "transformers' assisted generation skipped: no HF-format draft" in captured.err
    assert not any(r["config"].startswith("transformers") for r in json.loads(captured.out)["rows"])


def test_bench_draft_confidence_on_a_model_drafting_for_itself(tiny_chat_checkpoint, capsys):
    """A model drafting for itself is always right: alpha 1 among the positions at every threshold,
    all of them drafted at P = 0; the paired runs report one ratio per pair."""
    from bench import draft_confidence

    ckpt = str(tiny_chat_checkpoint)
    assert draft_confidence.main(["--target", ckpt, "-md", ckpt, "--prompts", "2", "--tokens", "8",
                                  "--pairs", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    thresholds = [r for r in rows if r[0].strip() in {f"{t:g}" for t in draft_confidence.THRESHOLDS}]
    assert [r[0].strip() for r in thresholds][:1] == ["0"] and thresholds[0][1].strip() == "100%"
    assert all(r[2].strip() in ("1.00", "-") for r in thresholds) and thresholds[0][2].strip() == "1.00"
    assert "2 pairs of runs in alternating order" in out
    assert draft_confidence.main(["--target", ckpt, "-md", "nope.gguf", "--pairs", "0"]) == 2
