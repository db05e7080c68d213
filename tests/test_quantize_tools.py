"""Importance-matrix quants, the llama-perplexity quality table and --target-size, through
llama.cpp's own tools (built once per machine from the sdist: the first run takes minutes)."""

import json

import pytest
import torch

from tinyllama import Llama, ModelConfig, save_checkpoint

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make setup")

from quantize.__main__ import main  # noqa: E402
from quantize.export import ExportError, quantize_gguf, write_gguf  # noqa: E402
from quantize.imatrix import QuantizeError, texts  # noqa: E402
from quantize.pipeline import export, parse_size  # noqa: E402
from tinyllama.formats.gguf_file import file_type_name, open_gguf  # noqa: E402


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """Python's help texts: ~100k tokens of English about Python."""
    from pydoc_data.topics import topics

    p = tmp_path_factory.mktemp("calib") / "python-help.txt"
    p.write_text("\n\n".join(t for _, t in sorted(topics.items())))
    return p


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama2_tokenizer, calibration):
    """d_model 256 (k-quants and i-quants apply to every matrix), trained for a few seconds on
    the calibration text so that its distributions are peaked like a real model's."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="qt", n_layer=2, d_model=256, n_head=4, n_kv_head=2, ffn_dim=512, max_seq_len=256)
    model = Llama(cfg)
    ids = torch.tensor(llama2_tokenizer.encode(calibration.read_text()[:200_000]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
        batch = torch.stack([ids[s:s + 65] for s in starts])
        torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    d = tmp_path_factory.mktemp("qt") / "model"
    save_checkpoint(model, llama2_tokenizer, d)
    return d


def test_parse_size():
    assert parse_size("550MB") == 550_000_000 and parse_size("600MiB") == 600 * 2**20
    assert parse_size("0.5 GB") == 500_000_000 and parse_size("1024") == 1024
    with pytest.raises(ExportError, match="expected a size such as 550MB"):
        parse_size("big")


def test_new_types_without_a_matrix_and_iq3_needs_one(model_dir, tmp_path):
    rows = export(model_dir, ["q3_k_m", "q4_k_s", "q5_k_s", "iq4_xs", "iq4_nl", "q2_k"], tmp_path / "g")
    for t, path, _ in rows:
        assert file_type_name(open_gguf(path)) == t.upper()
        llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False).close()      # llama.cpp loads it
    with pytest.raises(ExportError, match="iq3_m: an i-quant below 4 bits needs an importance matrix"):
        export(model_dir, ["iq3_m"], tmp_path / "h")
    assert not (tmp_path / "h").exists()                          # nothing half-written, no empty folder
    f32 = write_gguf(model_dir, tmp_path / "m.gguf", "f32")
    with pytest.raises(ExportError, match="needs an importance matrix"):
        quantize_gguf(f32, tmp_path / "x.gguf", "iq3_m")
    assert not (tmp_path / "x.gguf").exists()


def test_calibration_texts(llama2_tokenizer, tmp_path, calibration):
    held_note = texts(calibration, llama2_tokenizer, shards=())
    assert held_note[0] == held_note[1] and "no validation shards to hold out" in held_note[2]
    with pytest.raises(QuantizeError, match="no calibration text: give --calibration FILE"):
        texts(None, llama2_tokenizer, shards=(str(tmp_path / "none"),))
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(QuantizeError, match="empty.txt: the file is empty"):
        texts(tmp_path / "empty.txt", llama2_tokenizer)
    with pytest.raises(FileNotFoundError, match="--calibration .*nope.txt: no such file"):
        texts(tmp_path / "nope.txt", llama2_tokenizer)


@pytest.mark.slow
@pytest.mark.usefixtures("llama_cpp_tools")
def test_imatrix_quants_quality_table_and_reuse(model_dir, calibration, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)            # no data/tokens here: the calibration file is the only text
    out = tmp_path / "gguf"
    argv = ["--model", str(model_dir), "--type", "q4_k_m", "iq4_xs", "iq3_m", "--imatrix", "--calibration",
            str(calibration), "--ctx", "128", "--chunks", "16", "--quality", "--quality-chunks", "8", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    print(printed)                         # shown if an assertion below fails
    assert "importance matrix and quality: " in printed and "no validation shards" in printed
    matrix = out / "qt.imatrix"
    assert matrix.is_file() and json.loads((out / "qt.imatrix.json").read_text())["chunks"] == 16
    for t in ("Q4_K_M", "IQ4_XS", "IQ3_M"):
        assert (out / f"qt-{t}.gguf").is_file()
    rows = {line.split("|")[1].strip(): line.split("|") for line in printed.splitlines()
            if line.startswith("| ") and "type" not in line}
    assert set(rows) >= {"PyTorch (float32)", "q4_k_m", "iq4_xs", "iq3_m"}
    torch_ppl, q4_ppl = float(rows["PyTorch (float32)"][4]), float(rows["q4_k_m"][4])
    assert 0.9 < q4_ppl / torch_ppl < 1.2                      # llama-perplexity agrees with our protocol
    klds = {t: float(rows[t][5]) for t in ("q4_k_m", "iq4_xs", "iq3_m")}
    assert 0 < klds["q4_k_m"] < klds["iq3_m"]                  # fewer bits, more divergence
    assert list(out.glob(".*")) == []                          # no temporaries left
    # the same request reuses the matrix instead of recomputing it
    assert main(argv[:4] + ["--imatrix", "--calibration", str(calibration), "--ctx", "128", "--chunks", "16",
                            "--out", str(out), "--no-verify"]) == 0
    assert "reusing the importance matrix" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.usefixtures("llama_cpp_tools")
def test_the_imatrix_reaches_the_quantizer(model_dir, calibration, tmp_path, monkeypatch):
    """With a matrix, the matmul weights it measured (every block's, and the output projection's)
    quantize differently; the token embeddings, which no matmul reads, do not."""
    from gguf import GGUFReader

    monkeypatch.chdir(tmp_path)
    common = ["--model", str(model_dir), "--type", "q4_k_m", "--calibration", str(calibration), "--ctx", "128",
              "--no-verify"]
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert main(common + ["--imatrix", "--chunks", "8", "--out", str(tmp_path / "imatrix")]) == 0

    def tensors(folder):
        return {t.name: bytes(t.data) for t in GGUFReader(folder / "qt-Q4_K_M.gguf").tensors}

    plain, weighted = tensors(tmp_path / "plain"), tensors(tmp_path / "imatrix")
    assert plain["token_embd.weight"] == weighted["token_embd.weight"]
    assert plain["blk.0.attn_q.weight"] != weighted["blk.0.attn_q.weight"]
    assert plain["output.weight"] != weighted["output.weight"]


@pytest.mark.slow
@pytest.mark.usefixtures("llama_cpp_tools")
def test_target_size_picks_the_best_type_that_fits(model_dir, calibration, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sizes = {t: export(model_dir, [t], tmp_path / t)[0][1].stat().st_size for t in ("q4_k_m", "q8_0")}
    budget = (sizes["q4_k_m"] + sizes["q8_0"]) // 2                 # q8_0 does not fit, q4_k_m does
    out = tmp_path / "picked"
    assert main(["--model", str(model_dir), "--target-size", str(budget), "--calibration", str(calibration),
                 "--ctx", "128", "--quality-chunks", "8", "--out", str(out), "--no-verify"]) == 0
    printed = capsys.readouterr().out
    [written] = list(out.glob("*.gguf"))
    assert written.stat().st_size <= budget and "(chosen)" in printed
    assert [line for line in printed.splitlines() if line.startswith("| q8_0 |")][0].split("|")[3].strip() == "no"
    chosen = [line for line in printed.splitlines() if "(chosen)" in line][0]
    fitting = [line for line in printed.splitlines() if "| yes |" in line]
    assert float(chosen.split("|")[4]) == min(float(line.split("|")[4]) for line in fitting)
    assert list(out.glob(".*")) == []
    assert main(["--model", str(model_dir), "--target-size", "1MB", "--calibration", str(calibration),
                 "--ctx", "128", "--out", str(tmp_path / "tiny")]) == 2
    assert "no type" in capsys.readouterr().err and not list((tmp_path).glob("tiny*/*.gguf"))
