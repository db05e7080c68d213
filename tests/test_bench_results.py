"""bench/RESULTS.md after a full `make bench`: what a run writes, what it keeps."""

import pytest

import bench.__main__ as bench_main
from bench.__main__ import GPU_MARKER, full_results, module_of

HEAD = "# Benchmark results\n\nWritten by `make bench` on today.\n"

OLD = """# Benchmark results

Written by `make bench` on an earlier day.

## Decode speed (`python -m bench.decode`)

CPU: old

| old decode |

## Draft size for the real target (`python -m bench.speculative --eos -md DRAFT`)

| a one-off table |

### its subsection

text

## Speculative decoding on a constructed 7B-shaped pair (`python -m bench.speculative --pair 7b`)

CPU: old

| measured 7B pair |

""" + GPU_MARKER + """
## GPU figures

| kept |
"""


def test_a_full_run_rewrites_its_sections_and_keeps_the_rest():
    sections = [("Decode speed (`python -m bench.decode`)", "CPU: new\n\n| new decode |"),
                ("Speculative decoding on a constructed 7B-shaped pair (`python -m bench.speculative --pair 7b`)",
                 "CPU: new\n\nNot measured by default: `python -m bench --full`."),
                ("Server under load (`python -m bench.server_load`)", "CPU: new\n\n| new server |")]
    text = full_results(HEAD, sections, OLD)

    assert text.startswith(HEAD)
    assert "| new decode |" in text and "| old decode |" not in text
    # a placeholder leaves the measured section of the same command in place, in the run's order
    assert "| measured 7B pair |" in text and "Not measured" not in text
    assert text.index("| new decode |") < text.index("| measured 7B pair |") < text.index("| new server |")
    # a section no benchmark writes stays whole, subsections included, after the run's sections
    assert "| a one-off table |\n\n### its subsection\n\ntext" in text
    assert text.index("| new server |") < text.index("| a one-off table |") < text.index(GPU_MARKER)
    assert text.endswith(GPU_MARKER + "\n## GPU figures\n\n| kept |\n")
    assert text.count("## Decode speed") == 1


def test_a_placeholder_with_nothing_measured_before_is_written():
    title = "Speculative decoding on a constructed 7B-shaped pair (`python -m bench.speculative --pair 7b`)"
    text = full_results(HEAD, [(title, "CPU: new\n\nNot measured by default.")], "")
    assert f"## {title}\n\nCPU: new\n\nNot measured by default.\n" in text


def test_module_names_for_only():
    assert module_of("Decode speed (`python -m bench.decode`)") == "decode"
    assert module_of("Real pair (`python -m bench.speculative --eos`)") == "speculative-eos"
    assert module_of("7B (`python -m bench.speculative --pair 7b`)") == "speculative-7b"
    assert module_of("GGUF (`python -m bench.gguf --real-model`)") == "gguf-real-model"


SERVER = "Server under load (`python -m bench.server_load`)"
DECODE = "Decode speed (`python -m bench.decode`)"


def fails():
    raise RuntimeError("a benchmark failed")


def stub_run(tmp_path, monkeypatch, todo):
    """RESULTS.md (as OLD) in tmp_path, and `todo` as the benchmarks a run measures; the file."""
    results = tmp_path / "RESULTS.md"
    results.write_text(OLD)
    monkeypatch.setattr(bench_main, "RESULTS", results)
    monkeypatch.setattr(bench_main, "_sections", lambda args: todo)
    monkeypatch.setattr(bench_main, "machine", lambda: "a test CPU")
    return results


def test_a_run_that_stops_part_way_keeps_what_it_measured(tmp_path, monkeypatch):
    todo = [(SERVER, lambda: "CPU: new\n\n| new server |"), (DECODE, fails)]
    results = stub_run(tmp_path, monkeypatch, todo)
    with pytest.raises(RuntimeError, match="a benchmark failed"):
        bench_main.main([])

    text = results.read_text()
    assert "That run measured 1 of its 2 sections; the others are from an earlier run." in text
    assert "| new server |" in text and "| old decode |" in text and "| a one-off table |" in text
    assert text.endswith(GPU_MARKER + "\n## GPU figures\n\n| kept |\n")

    todo[1] = (DECODE, lambda: "CPU: new\n\n| new decode |")
    assert bench_main.main([]) == 0
    text = results.read_text()
    assert "That run measured" not in text and "| new decode |" in text and "| old decode |" not in text
    assert text.count("| new server |") == 1


def test_only_replaces_each_section_as_it_is_measured(tmp_path, monkeypatch):
    results = stub_run(tmp_path, monkeypatch, [(DECODE, lambda: "CPU: new\n\n| new decode |"), (SERVER, fails)])
    with pytest.raises(RuntimeError, match="a benchmark failed"):
        bench_main.main(["--only", "decode", "server_load"])
    text = results.read_text()
    assert "| new decode |" in text and "| old decode |" not in text and "| a one-off table |" in text
    assert text.startswith("# Benchmark results\n\nWritten by `make bench` on an earlier day.")
