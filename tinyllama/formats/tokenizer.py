"""The Llama-2 tokenizer, offline, on the Rust `tokenizers` library.

    tok = Tokenizer.llama2()                 # built by `make setup`; no model hub needed
    tok.encode("Hello world")                # [1, 15043, 3186]
    tok.decode([1, 15043, 3186])             # "Hello world"
    tok = Tokenizer.from_dir("some/hf/dir")  # any HF tokenizer directory

Where the vocabulary comes from: llama.cpp ships Meta's Llama-2 SentencePiece vocabulary as
`models/ggml-vocab-llama-spm.gguf` (token pieces, scores and types), and the llama-cpp-python
sdist on PyPI carries that file. `build` reads it with gguf-py and writes an HF
`tokenizer.json`: a byte-fallback BPE whose merges are ranked by the SentencePiece score of
the merged piece (what transformers' SentencePiece converter does), with the normalizer
`Prepend("▁") + Replace(" ", "▁")` and no pre-tokenizer, which reproduces llama.cpp's ids on
leading spaces and whitespace-only input. Data preparation encodes whole corpora
through prepare.encoding, on the same backend. The build also keeps llama.cpp's own tokenizer test vectors
(`.inp`/`.out`) beside it, and the tests hold us to them.

Special tokens typed in text are encoded as text (llama.cpp's `parse_special=False`): a
prompt containing "</s>" cannot forge an end-of-sequence.

CLI:  python -m tinyllama tokenizer build [--sdist FILE | --gguf FILE] [--out DIR]
      python -m tinyllama tokenizer encode "some text"
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer

from tinyllama.atomic import atomic_dir
from tinyllama.errors import NotFound, UserError
from tinyllama.formats.gguf_file import gguf_value, open_gguf, read_gguf_vocab
from tinyllama.paths import default_sdist, llama2_dir
from tinyllama.formats.vocab import backend_from_vocab, byte_level_backend, convert_sentencepiece, sentencepiece_model

LLAMA2_VOCAB_MEMBER = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"

class Tokenizer:
    """A Llama tokenizer: ids identical to llama.cpp's for the same vocabulary."""

    def __init__(self, backend: HFTokenizer, *, bos_id: int = 1, eos_id: int = 2, unk_id: int = 0,
                 pad_id: int | None = None, chat_template: str | None = None, source: str = "",
                 sp_model: bytes | None = None, stop_ids: Sequence[int] = (), add_bos: bool = True) -> None:
        """stop_ids: ids besides EOS that end a reply (generation_config.json's eos_token_id,
        a GGUF's end-of-turn token); add_bos: whether a text starts with BOS unless a caller says
        otherwise (the model's own add_bos_token: Llama-2 yes, SmolLM2 and GPT-2 no)."""
        self.add_bos = add_bos
        self.backend = backend
        self.sp_model = sp_model   # the SentencePiece tokenizer.model bytes, copied along on save()
        # Special tokens in user text are plain text, as in llama.cpp with parse_special=False.
        self.backend.encode_special_tokens = True
        self.backend.no_padding()
        self.backend.no_truncation()
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        # Llama-2 has no pad token; padding reuses an existing id (unk) so the vocabulary stays
        # at 32000 and never grows to 32001 (TinyLlama issues #41, #56).
        self.pad_id = unk_id if pad_id is None else pad_id
        self.chat_template = chat_template
        self.stop_ids = tuple(dict.fromkeys([eos_id, *stop_ids]))      # EOS first, no repeats
        self.source = source

    # ---- constructors ------------------------------------------------------------------
    @classmethod
    def llama2(cls) -> "Tokenizer":
        """Meta's Llama-2 tokenizer (32000 tokens), built by `make setup` from registry files."""
        d = llama2_dir()
        if not (d / "tokenizer.json").exists():
            sdist = default_sdist()
            if not sdist.exists():
                raise NotFound(
                    f"the offline Llama-2 tokenizer is not built yet ({d / 'tokenizer.json'} is missing) and "
                    f"the llama-cpp-python sdist it is built from is not at {sdist}; run `make setup` "
                    "(or `python -m tinyllama.formats.tokenizer build --gguf ggml-vocab-llama-spm.gguf`)"
                )
            build_llama2(sdist=sdist, out_dir=d)
        return cls.from_dir(d)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Any HF tokenizer directory: tokenizer.json (+ tokenizer_config.json), or a
        SentencePiece tokenizer.model converted through transformers when that is installed."""
        path = Path(path)
        if not path.is_dir():
            raise NotFound(f"{path}: tokenizer directory not found")
        cfg = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
        if (path / "tokenizer.json").exists():
            try:
                backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:
                raise UserError(f"{path / 'tokenizer.json'}: not a valid tokenizers file: {e}") from None
        elif (path / "tokenizer.model").exists():
            backend = convert_sentencepiece(path)
        else:
            raise NotFound(f"{path}: no tokenizer.json or tokenizer.model in this directory")

        def special(name: str, default: int) -> int:
            tok = cfg.get(name)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                i = backend.token_to_id(tok)
                if i is not None:
                    return i
            return default

        unk = special("unk_token", backend.token_to_id("<unk>") if backend.token_to_id("<unk>") is not None else 0)
        pad_tok = cfg.get("pad_token")
        pad = special("pad_token", unk) if pad_tok else None
        bos = special("bos_token", 1)
        sp = (path / "tokenizer.model").read_bytes() if (path / "tokenizer.model").exists() else None
        return cls(backend, bos_id=bos, eos_id=special("eos_token", 2), unk_id=unk,
                   pad_id=pad, chat_template=_dir_chat_template(path, cfg), source=str(path), sp_model=sp,
                   stop_ids=_generation_eos_ids(path), add_bos=_adds_bos(cfg, backend, bos))

    @classmethod
    def from_gguf_vocab(cls, gguf_path: str | os.PathLike, with_sentencepiece: bool = False,
                        reader=None) -> "Tokenizer":
        """The tokenizer stored in a GGUF (pieces, scores, types, special ids, and the chat
        template when the file has one). `reader`: an already-parsed gguf.GGUFReader of the same
        file (parsing a 32000-token vocabulary takes about a second)."""
        reader = reader if reader is not None else open_gguf(Path(gguf_path))
        vocab = read_gguf_vocab(Path(gguf_path), reader)
        ids, sp = vocab.ids, None
        if vocab.model == "llama":
            table = (vocab.pieces, vocab.scores, vocab.types, ids)
            backend = backend_from_vocab(*table)
            sp = sentencepiece_model(*table) if with_sentencepiece else None
        else:
            backend = byte_level_backend(vocab, gguf_path)
        return cls(backend, bos_id=ids.get("bos", ids["eos"]), eos_id=ids["eos"], unk_id=ids.get("unk", ids["eos"]),
                   pad_id=ids.get("pad"), chat_template=gguf_value(reader, "tokenizer.chat_template"),
                   source=str(gguf_path), sp_model=sp, stop_ids=[ids[k] for k in ("eot", "eom") if k in ids],
                   add_bos=vocab.add_bos)

    @property
    def generation_eos(self) -> int | list[int]:
        """generation_config.json's eos_token_id: EOS, or every id that ends a reply."""
        return self.stop_ids[0] if len(self.stop_ids) == 1 else list(self.stop_ids)

    def with_template(self, chat_template: str | None) -> "Tokenizer":
        """The same tokenizer chatting in another template (what SFT writes beside its model)."""
        other = copy.copy(self)
        other.chat_template = chat_template
        return other

    # ---- encode / decode ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """The ids of `text`; bos: start with BOS (default: as the model does, `add_bos`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self._bos(bos) else []) + ids + ([self.eos_id] if eos else [])

    def _bos(self, bos: bool | None) -> bool:
        return self.add_bos if bos is None else bos

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_piece(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the vocabulary (piece -> id), for data manifests and mismatch checks."""
        vocab = sorted(self.backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()

    # ---- save --------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike) -> None:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into a
        directory that transformers' AutoTokenizer loads with ids identical to ours."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        piece = self.backend.id_to_token
        self.backend.save(str(out / "tokenizer.json"))
        if self.sp_model is not None:
            (out / "tokenizer.model").write_bytes(self.sp_model)
        specials = {"bos_token": piece(self.bos_id), "eos_token": piece(self.eos_id), "unk_token": piece(self.unk_id)}
        config = {
            # Not "LlamaTokenizerFast": transformers 5 rebuilds that class with a Metaspace
            # pre-tokenizer, which drops the separate "▁" of a leading space and so disagrees
            # with llama.cpp (and with this file). The generic class uses tokenizer.json as is.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,
            "pad_token": piece(self.pad_id),
            **specials,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (out / "special_tokens_map.json").write_text(
            json.dumps({**specials, "pad_token": piece(self.pad_id)}, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, source={self.source!r})"


# ---- building from llama.cpp's vocabulary file --------------------------------------------

def _dir_chat_template(path: Path, cfg: dict) -> str | None:
    """The directory's chat template as transformers finds it: chat_template.jinja, else
    tokenizer_config.json's chat_template (a string, or a list of named ones: "default")."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    template = cfg.get("chat_template")
    if (path / "chat_template.json").is_file() and not template:
        template = _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template.strip() else None


def _adds_bos(cfg: dict, backend: HFTokenizer, bos_id: int) -> bool:
    """Whether the model starts a text with BOS: tokenizer_config.json's add_bos_token where it
    says, else what tokenizer.json's post-processor does (as transformers decides)."""
    if isinstance(cfg.get("add_bos_token"), bool):
        return cfg["add_bos_token"]
    ids = backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id


def _generation_eos_ids(path: Path) -> list[int]:
    """generation_config.json's eos_token_id (an int or a list), where the directory has one."""
    f = path / "generation_config.json"
    eos = _read_json(f).get("eos_token_id") if f.is_file() else None
    eos = eos if isinstance(eos, list) else [eos]
    return [int(i) for i in eos if isinstance(i, int)]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _extract_from_sdist(sdist: Path, dest: Path) -> Path:
    """Copies the vocab file and llama.cpp's tokenizer test vectors out of the sdist."""
    wanted = {LLAMA2_VOCAB_MEMBER: "ggml-vocab-llama-spm.gguf",
              LLAMA2_VOCAB_MEMBER + ".inp": "llama-spm-tests.inp",
              LLAMA2_VOCAB_MEMBER + ".out": "llama-spm-tests.out"}
    try:
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                rel = member.name.split("/", 1)[-1]
                if rel in wanted and member.isfile():
                    src = tar.extractfile(member)
                    (dest / wanted.pop(rel)).write_bytes(src.read())
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{sdist}: cannot read the llama-cpp-python sdist: {e}") from None
    if "ggml-vocab-llama-spm.gguf" in wanted.values():
        raise UserError(f"{sdist}: {LLAMA2_VOCAB_MEMBER} is not in this archive")
    return dest / "ggml-vocab-llama-spm.gguf"


def build_llama2(sdist: Path | None = None, gguf: Path | None = None, out_dir: Path | None = None) -> Path:
    """Builds the Llama-2 tokenizer directory atomically."""
    out_dir = Path(out_dir or llama2_dir())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        if gguf is not None:
            vocab = Path(gguf)
            if not vocab.is_file():
                raise NotFound(f"{vocab}: GGUF vocabulary file not found")
            source = str(gguf)
        else:
            sdist = Path(sdist or default_sdist())
            if not sdist.exists():
                raise NotFound(f"{sdist}: llama-cpp-python sdist not found (make setup downloads it)")
            vocab = _extract_from_sdist(sdist, tmp)
            source = f"{sdist.name}:{LLAMA2_VOCAB_MEMBER}"
        reader = open_gguf(vocab)                          # errors name the user's file
        kind = gguf_value(reader, "tokenizer.ggml.model")
        if kind != "llama":
            raise UserError(f"{gguf or vocab}: tokenizer.ggml.model is {kind!r}, expected 'llama' (this builds "
                            "Llama-2's SentencePiece vocabulary)")
        tok = Tokenizer.from_gguf_vocab(vocab, with_sentencepiece=True, reader=reader)
        tok.save(tmp)
        if vocab.parent != tmp:
            vocab = Path(shutil.copyfile(vocab, tmp / "ggml-vocab-llama-spm.gguf"))
        (tmp / "PROVENANCE.txt").write_text(
            "Meta's Llama-2 SentencePiece vocabulary (Llama 2 Community License), as shipped by llama.cpp (MIT)\n"
            f"source: {source}\n"
            f"gguf sha256: {hashlib.sha256(vocab.read_bytes()).hexdigest()}\n"
            f"vocab fingerprint: {tok.fingerprint}\n")
    return out_dir

