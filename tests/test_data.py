"""Pretraining data: prepare (raw -> shards) and the mixture loader (shards -> blocks)."""

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from pretrain.data import BatchLoader, FeistelPermutation, Mixture
from prepare.prepare import PrepareConfig, prepare
from tinyllama.formats.shards import PackedSource, ShardError, ShardWriter
from prepare.sources import SourceError
from prepare.units import read_documents

DOCS = [f"Document {i}: " + " ".join(["the quick brown fox", "def f(x): return x", "naïve 東京"][i % 3] for _ in range(i % 7 + 1))
        for i in range(60)]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def run_prepare(src, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("shard_tokens", 1024)
    kw.setdefault("progress", False)
    return prepare(PrepareConfig(source=str(src), out=out, **kw))


def read_split(out, split):
    m = json.loads((out / "manifest.json").read_text())
    return np.concatenate([np.fromfile(out / s["file"], dtype="<u2") for s in m["splits"][split]["shards"]])


# ---- prepare ---------------------------------------------------------------------------

def test_shards_decode_back_to_the_documents(tmp_path, llama2_tokenizer):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    m = run_prepare(src, tmp_path / "out", val_fraction=0.1)
    period = 10
    expected = {"train": [], "validation": []}
    for i, d in enumerate(DOCS):
        expected["validation" if i % period == period // 2 else "train"] += llama2_tokenizer.encode(d, bos=True, eos=True)
    for split in ("train", "validation"):
        assert read_split(tmp_path / "out", split).tolist() == expected[split]
    assert m["documents"] == 60 and m["tokens"] == sum(map(len, expected.values()))
    # fixed-size shards; only the last one is short, and it is not padded
    shards = m["splits"]["train"]["shards"]
    assert all(s["tokens"] == 1024 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 1024
    assert m["tokenizer"]["fingerprint"] == llama2_tokenizer.fingerprint
    assert "BOS + tokens + EOS" in m["separator_policy"]


def test_worker_count_does_not_change_the_bytes(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS * 5)
    run_prepare(src, tmp_path / "one", name="x", workers=1, chunk_docs=7)
    run_prepare(src, tmp_path / "two", name="x", workers=2, chunk_docs=7)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(files) > 3
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


def test_every_input_type_gives_the_same_tokens(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = DOCS[:20]
    write_jsonl(tmp_path / "a.jsonl", docs)
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "a.jsonl").read_bytes()))
    pq.write_table(pa.table({"content": docs}), tmp_path / "a.parquet")
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, d in enumerate(docs):
        (txt / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    ref = [d.text for d in read_documents(tmp_path / "a.jsonl")]
    assert ref == docs
    assert [d.text for d in read_documents(tmp_path / "a.jsonl.zst")] == docs
    assert [d.text for d in read_documents(tmp_path / "a.parquet")] == docs          # "content" found by default
    assert [d.text for d in read_documents(txt)] == docs


def test_code_directory_selected_by_extension(tmp_path):
    code = tmp_path / "repo"
    (code / "pkg" / "tests").mkdir(parents=True)
    (code / "pkg" / "a.py").write_text("print('a')\n")
    (code / "pkg" / "b.c").write_text("int main(void) { return 0; }\n")
    (code / "pkg" / "tests" / "test_a.py").write_text("assert True\n")
    (code / "pkg" / "blob.bin").write_bytes(b"\x00\x01")
    origins = [d.origin for d in read_documents(code, extensions=(".py",), exclude=("tests",))]
    assert [o.rsplit("/", 1)[-1] for o in origins] == ["a.py"]
    assert len(list(read_documents(code, extensions=(".py", ".c")))) == 3


def test_text_field_and_slimpajama_github_filter(tmp_path):
    rows = [{"body": "kept natural text", "meta": {"redpajama_set_name": "RedPajamaC4"}},
            {"body": "dropped github code", "meta": {"redpajama_set_name": "RedPajamaGithub"}},
            {"body": "kept too", "meta": json.dumps({"redpajama_set_name": "RedPajamaArXiv"})}]
    f = tmp_path / "sp.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = run_prepare(f, tmp_path / "out", text_field="body", val_fraction=0)
    assert m["documents"] == 2 and m["skipped"]["filtered"] == 1


# ---- bad input -------------------------------------------------------------------------

def assert_nothing_written(tmp_path, out_name="out"):
    assert not (tmp_path / out_name).exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_malformed_jsonl_line_stops_with_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "broken\n{"text": "fine again"}\n')
    with pytest.raises(SourceError, match=r"bad.jsonl:2: malformed JSON"):
        run_prepare(f, tmp_path / "out")
    assert_nothing_written(tmp_path)
    m = run_prepare(f, tmp_path / "out", skip_bad=True, val_fraction=0)
    assert m["documents"] == 2 and m["skipped"]["bad"] == 1 and "bad.jsonl:2" in m["skipped"]["examples"][0]


def test_missing_text_field_names_line_and_fields(tmp_path):
    f = tmp_path / "nofield.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "no text here", "id": 3}\n')
    with pytest.raises(SourceError, match=r"nofield.jsonl:2: no text field.*fields: body, id"):
        run_prepare(f, tmp_path / "out")
    with pytest.raises(SourceError, match=r"nofield.jsonl:1: no field 'content'"):
        run_prepare(f, tmp_path / "out", text_field="content")
    assert_nothing_written(tmp_path)


def test_truncated_zst_is_an_error(tmp_path):
    import zstandard

    data = zstandard.ZstdCompressor().compress(("".join(json.dumps({"text": d}) + "\n" for d in DOCS)).encode())
    f = tmp_path / "cut.jsonl.zst"
    f.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SourceError, match=r"cut.jsonl.zst: truncated zstd stream"):
        run_prepare(f, tmp_path / "out")
    assert_nothing_written(tmp_path)
    f.write_bytes(b"\x28\xb5\x2f\xfd garbage that is not zstd")
    with pytest.raises(SourceError, match=r"cut.jsonl.zst: (corrupt|truncated) zstd"):
        run_prepare(f, tmp_path / "out")


def test_empty_documents_and_non_utf8_are_counted(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(b'{"text": "good one"}\n{"text": ""}\n{"text": "   \\n "}\n{"text": "bad \xff\xfe bytes"}\n')
    m = run_prepare(f, tmp_path / "out", val_fraction=0)
    assert m["documents"] == 2 and m["skipped"]["empty"] == 2 and m["skipped"]["repaired_utf8"] == 1
    d = tmp_path / "code"
    d.mkdir()
    (d / "ok.py").write_text("x = 1\n")
    (d / "latin1.py").write_bytes(b"# caf\xe9\n")
    m = run_prepare(d, tmp_path / "out2", val_fraction=0)
    assert m["documents"] == 1 and m["skipped"]["bad"] == 1      # non-UTF-8 source files are skipped


def test_no_documents_at_all(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text('{"text": ""}\n')
    with pytest.raises(SourceError, match="no documents"):
        run_prepare(f, tmp_path / "out")
    assert_nothing_written(tmp_path)


def test_missing_source_and_offline_hub_name(tmp_path):
    with pytest.raises(SourceError, match="no such file or directory"):
        run_prepare(tmp_path / "nope.jsonl", tmp_path / "out")
    with pytest.raises(SourceError, match="cerebras/SlimPajama-627B: cannot open Hugging Face dataset"):
        run_prepare("cerebras/SlimPajama-627B", tmp_path / "out")
    assert_nothing_written(tmp_path)


def test_cli_errors_are_clear(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text("not json\n")
    r = subprocess.run([sys.executable, "-m", "prepare", str(f), "--out", str(tmp_path / "out"), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "bad.jsonl:1: malformed JSON" in r.stderr and "Traceback" not in r.stderr
    assert_nothing_written(tmp_path)


# ---- loading ---------------------------------------------------------------------------

def synthetic_source(path, tokens, fingerprint="fp", name=None):
    """A source whose stream is 0, 1, 2, ... so every block identifies itself."""
    path.mkdir(parents=True)
    w = ShardWriter(path, "train", 1000)
    w.add(np.arange(tokens, dtype=np.uint16))
    v = ShardWriter(path, "validation", 1000)
    v.add(np.arange(50, dtype=np.uint16))
    manifest = {"format": "tinyllama-packed-v1", "name": name or path.name, "tokenizer": {"fingerprint": fingerprint},
                "splits": {"train": w.close(), "validation": v.close()}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return PackedSource(path)


def test_feistel_is_a_permutation():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        perm = FeistelPermutation(n, seed=5)
        assert sorted(perm(i) for i in range(n)) == list(range(n))
    assert [FeistelPermutation(1000, 1)(i) for i in range(10)] != [FeistelPermutation(1000, 2)(i) for i in range(10)]


def test_blocks_are_input_and_shifted_target(tmp_path):
    src = synthetic_source(tmp_path / "a", 5000)
    assert src.block(3, 100).tolist() == list(range(300, 401))          # crosses no boundary
    assert src.read(990, 20).tolist() == list(range(990, 1010))         # crosses a shard boundary
    mix = Mixture({"a": src}, {"a": 1.0}, seq_len=100)
    x, y = next(iter(BatchLoader(mix, micro_batch=4)))
    assert x.shape == y.shape == (4, 100) and (y[:, :-1] == x[:, 1:]).all()


def test_mixture_proportions(tmp_path):
    nat = synthetic_source(tmp_path / "natural", 20000)
    code = synthetic_source(tmp_path / "code", 9000)
    mix = Mixture({"natural": nat, "code": code}, {"natural": 0.693584, "code": 0.306416}, seq_len=64, seed=3)
    counts = Counter(mix.locate(g)[0] for g in range(20000))
    assert abs(counts["natural"] / 20000 - 0.693584) < 0.002
    per_period = Counter(mix.locate(g)[0] for g in range(1000, 2000))
    assert per_period == Counter({"natural": 694, "code": 306})
    # the k-th sample of each source is numbered consecutively, without gaps
    ks = [k for g in range(3000) for s, k in [mix.locate(g)] if s == "code"]
    assert ks == list(range(len(ks)))


def test_ranks_and_workers_read_disjoint_data_and_cover_it(tmp_path):
    src = synthetic_source(tmp_path / "a", 64 * 48 + 1)                 # exactly 48 blocks of 64
    mix = Mixture({"a": src}, {"a": 1.0}, seq_len=64, seed=1)
    seen = []
    for rank in range(2):
        loader = iter(BatchLoader(mix, micro_batch=3, rank=rank, world_size=2, num_workers=2))
        for _ in range(8):                                              # 2 ranks × 8 batches × 3 = 48 samples
            x, _ = next(loader)
            seen += (x[:, 0] // 64).tolist()
    assert sorted(seen) == list(range(48))                              # one epoch: each block exactly once
    second = [mix.source_block(g)[1] for g in range(48, 96)]
    assert sorted(second) == list(range(48)) and second != [mix.source_block(g)[1] for g in range(48)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_the_identical_next_batches(tmp_path, workers):
    a = synthetic_source(tmp_path / "a", 30000)
    b = synthetic_source(tmp_path / "b", 12000)
    mix = Mixture({"a": a, "b": b}, {"a": 0.7, "b": 0.3}, seq_len=32, seed=7)
    loader = BatchLoader(mix, micro_batch=4, rank=1, world_size=2, num_workers=workers)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))                 # survives serialisation
    expected = [next(it)[0] for _ in range(4)]
    resumed = BatchLoader(mix, micro_batch=4, rank=1, world_size=2, num_workers=workers)
    resumed.load_state_dict(state)
    got = [x for x, _ in (next(resumed) for _ in range(4))]
    assert all((e == g).all() for e, g in zip(expected, got))


def test_resume_with_changed_data_is_refused(tmp_path):
    a = synthetic_source(tmp_path / "a", 30000)
    b = synthetic_source(tmp_path / "b", 12000)
    state = BatchLoader(Mixture({"a": a, "b": b}, {"a": 0.7, "b": 0.3}, seq_len=32), micro_batch=4).state_dict()
    other = BatchLoader(Mixture({"a": a, "b": b}, {"a": 0.5, "b": 0.5}, seq_len=32), micro_batch=4)
    with pytest.raises(ShardError, match="data configuration changed"):
        other.load_state_dict(state)


def test_tokenizer_mismatch_is_refused(tmp_path):
    a = synthetic_source(tmp_path / "a", 3000, fingerprint="aaaa")
    b = synthetic_source(tmp_path / "b", 3000, fingerprint="bbbb")
    with pytest.raises(ShardError, match="different tokenizer"):
        Mixture({"a": a}, {"a": 1.0}, seq_len=32, tokenizer_fingerprint="bbbb")
    with pytest.raises(ShardError, match="different tokenizers"):
        Mixture({"a": a, "b": b}, {"a": 0.5, "b": 0.5}, seq_len=32)


def test_damaged_shards_are_detected(tmp_path):
    synthetic_source(tmp_path / "a", 3000)
    shard = tmp_path / "a" / "train-00001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(ShardError, match=r"train-00001.bin: \d+ bytes, manifest.json says"):
        PackedSource(tmp_path / "a")
    shard.write_bytes(b"\x00" * len(data))
    PackedSource(tmp_path / "a")                                        # same size: only the checksum knows
    with pytest.raises(ShardError, match=r"train-00001.bin: sha256 differs"):
        PackedSource(tmp_path / "a", verify=True)
    with pytest.raises(ShardError, match="manifest.json: not found"):
        PackedSource(tmp_path / "missing")


def test_uint32_shards_hold_ids_past_65535_and_say_so(tmp_path):
    ids = np.arange(70000, 73000, dtype=np.uint32)
    w = ShardWriter(tmp_path, "train", 1000, dtype=np.dtype("<u4"))
    w.add(ids)
    manifest = {"format": "tinyllama-packed-v1", "name": "wide", "dtype": "uint32", "tokenizer": {"fingerprint": "fp"},
                "splits": {"train": w.close()}}
    assert (tmp_path / "train-00000.bin").stat().st_size == 4 * 1000
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    src = PackedSource(tmp_path)
    assert src.read(990, 20).tolist() == list(range(70990, 71010))     # across a shard boundary
    manifest["dtype"] = "float32"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="manifest.json: dtype 'float32'; token shards are 'uint16' or 'uint32'"):
        PackedSource(tmp_path)
    manifest["dtype"] = "uint16"                                        # 4-byte ids read as 2-byte ones
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="train-00000.bin: 4000 bytes, manifest.json says 2000"):
        PackedSource(tmp_path)


def test_source_smaller_than_a_block(tmp_path):
    a = synthetic_source(tmp_path / "a", 20)
    with pytest.raises(ShardError, match="fewer than one block"):
        Mixture({"a": a}, {"a": 1.0}, seq_len=64)
