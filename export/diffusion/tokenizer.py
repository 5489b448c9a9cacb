"""Prompt tokenizers of diffusion pipelines, written for the torch-free runtime.

:func:`save_tokenizer` takes a transformers tokenizer as a diffusers pipeline
holds it (``CLIPTokenizer``, ``CLIPTokenizerFast``; ``T5TokenizerFast`` for SD3
and FLUX), writes its Rust backend as ``tokenizer.json`` and returns the config
:class:`~enginekit.runtimes.tasks.tokenizers.PromptTokenizer` needs. Before it
returns, the written file is loaded the way the runtime loads it and checked
against the tokenizer on a few probe prompts.

:func:`real_clip_tokenizer` builds a real CLIP tokenizer offline from the BPE
vocabulary that ships in the ``open_clip_torch`` wheel, so the tiny test
pipelines tokenize exactly like SD 1.5 (``pad_token="<|endoftext|>"``) or
SD 2.x and SDXL's second tokenizer (``pad_token="!"``).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers

from enginekit.errors import ArtifactError, ExportError, SourceError
from enginekit.export.json_files import read_json
from enginekit.runtimes.tasks.tokenizers import PromptTokenizer, TokenizerConfig

__all__ = ["TOKENIZER_FILE", "save_tokenizer", "real_clip_tokenizer", "stand_in_t5_tokenizer", "tokenizer_for"]

TOKENIZER_FILE = "tokenizer.json"

# transformers' "no limit" is VERY_LARGE_INTEGER (1e30); a model_max_length this
# big was never set, and padding to it is not what any pipeline means.
_NO_LIMIT = 1_000_000

# Checked against the source tokenizer at export: plain words, case, accents,
# punctuation, emoji, the empty prompt, and one that must be truncated.
_PROBES = ("a photo of a cat", "", "A Café, 2 DOGS & 1 cat!  🐱", "lorem ipsum " * 60)

_INSTALL = "pip install 'enginekit[export]'"


def save_tokenizer(tokenizer: Any, out_dir: Path, *, max_length: int | None = None) -> dict[str, Any]:
    """Write ``out_dir/tokenizer.json`` for ``tokenizer`` and return its manifest config.

    ``max_length`` overrides the tokenizer's ``model_max_length`` (T5 tokenizers
    carry none: SD3 pipelines pass ``max_sequence_length``). The returned dict is
    :meth:`TokenizerConfig.to_dict`: ``kind``, ``file``, ``max_length``,
    ``pad_token``, ``pad_token_id``, ``bos_token_id``, ``eos_token_id``,
    ``vocab_size``, ``lowercase``.
    """
    kind = _kind(tokenizer)
    length = _max_length(tokenizer, max_length)
    if tokenizer.pad_token_id is None:
        raise ExportError(f"{type(tokenizer).__name__} has no pad token; pipelines pad prompts to max_length")
    data = json.loads(_backend(tokenizer).to_str())
    # transformers leaves the padding and truncation of its last call set on the
    # backend; the runtime pads and truncates itself, so none may travel.
    data["padding"] = data["truncation"] = None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / TOKENIZER_FILE
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    try:
        written = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises plain Exception
        raise ExportError(f"the tokenizer written to {path} does not load: {exc}") from exc
    config = TokenizerConfig(
        kind=kind,
        file=TOKENIZER_FILE,
        max_length=length,
        pad_token=str(tokenizer.pad_token),
        pad_token_id=int(tokenizer.pad_token_id),
        bos_token_id=None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id),
        eos_token_id=None if tokenizer.eos_token_id is None else int(tokenizer.eos_token_id),
        vocab_size=written.get_vocab_size(with_added_tokens=True),
        lowercase=_lowercases(data.get("normalizer")),
    ).to_dict()
    _check(tokenizer, written, config)
    return config


def real_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> Any:
    """A transformers ``CLIPTokenizer`` with OpenAI CLIP's real 49408-token vocabulary, built offline.

    SD 1.5 pads with ``"<|endoftext|>"``; SD 2.x and SDXL's ``tokenizer_2`` with ``"!"``.
    """
    CLIPTokenizer = _transformers().CLIPTokenizer
    vocab, merges = _clip_bpe()
    if pad_token not in vocab:
        raise SourceError(f"pad_token {pad_token!r} is not in the CLIP vocabulary; SD uses '<|endoftext|>' or '!'")
    with tempfile.TemporaryDirectory(prefix="enginekit-clip-") as tmp:
        folder = Path(tmp)
        vocab_json = json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False)
        (folder / "vocab.json").write_text(vocab_json, encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        # Read in full here (transformers 4's slow tokenizer reads the files in its
        # constructor), so the folder can go when this returns.
        return CLIPTokenizer.from_pretrained(str(folder), pad_token=pad_token, model_max_length=model_max_length)


def stand_in_t5_tokenizer(vocab_size: int, model_max_length: int = 512) -> Any:
    """A transformers ``T5TokenizerFast`` (SentencePiece unigram) of ``vocab_size`` ids, built offline.

    T5's real ``spiece.model`` is not shipped anywhere this can read without the hub, so the
    seeded pipelines (``tiny-sd3``, ``sd3-medium --random-weights``) tokenize with a stand-in:
    T5's special tokens (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), single characters, then whole
    words from CLIP's BPE vocabulary as ``▁word`` pieces, scored so longer pieces win. The ids
    mean nothing to a trained T5; the pipeline around them is the real one. A folder or hub
    source brings its own tokenizer.
    """
    transformers = _transformers()
    if vocab_size < 64:
        raise SourceError(f"a T5 stand-in tokenizer needs at least 64 ids, not {vocab_size}")
    vocab, _ = _clip_bpe()
    chars = [c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-&:;()"]
    pieces: list[str] = ["▁"] + chars + ["▁" + c for c in chars]
    seen = set(pieces)
    for token in vocab:
        if token.endswith("</w>") and token[:-4].isalpha():
            piece = "▁" + token[:-4]
            if piece not in seen:
                seen.add(piece)
                pieces.append(piece)
        if len(pieces) >= vocab_size - 3:
            break
    pieces = pieces[: vocab_size - 3]
    scored = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    scored += [(p, -10.0 + 0.5 * len(p) - i * 1e-6) for i, p in enumerate(pieces)]
    return transformers.T5TokenizerFast(vocab=scored, extra_ids=0, model_max_length=model_max_length)


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """CLIP's vocabulary and merges, built as OpenAI's simple_tokenizer and open_clip build them."""
    # find_spec locates the package without importing it (open_clip imports torch).
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(f) / "bpe_simple_vocab_16e6.txt.gz" for f in folders), None)
    if path is None or not path.is_file():
        raise SourceError(f"the CLIP BPE vocabulary ships with open_clip_torch: {_INSTALL}")
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    # Line 0 is the header; CLIP keeps the first 49152 - 256 - 2 = 48894 merges,
    # so that 256 bytes x 2 (plain and word-final) + merges + 2 specials = 49408.
    merges = tuple(lines[1 : 49152 - 256 - 2 + 1])
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return tuple(vocab), merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, in the order CLIP's vocabulary uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _kind(tokenizer: Any) -> str:
    for cls in type(tokenizer).__mro__:
        if cls.__name__.startswith("CLIPTokenizer"):
            return "clip"
        if cls.__name__.startswith("T5Tokenizer"):
            return "t5"
    raise ExportError(
        f"cannot export a {type(tokenizer).__name__} prompt tokenizer; "
        "expected CLIPTokenizer(Fast) or T5Tokenizer(Fast)"
    )


def _max_length(tokenizer: Any, max_length: int | None) -> int:
    if max_length is not None:
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ExportError(f"max_length must be a positive int, got {max_length!r}")
        return max_length
    length = getattr(tokenizer, "model_max_length", None)
    if not isinstance(length, int) or not 0 < length < _NO_LIMIT:
        raise ExportError(
            f"{type(tokenizer).__name__} has no model_max_length ({length!r}); pass max_length= "
            "(the pipeline's max_sequence_length for T5)"
        )
    return length


def _backend(tokenizer: Any) -> tokenizers.Tokenizer:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        return backend
    # A slow (pure Python) tokenizer, as transformers < 5 loads CLIPTokenizer:
    # converted the way from_pretrained(use_fast=True) converts it, special tokens included.
    auto = _transformers().AutoTokenizer
    try:
        with tempfile.TemporaryDirectory(prefix="enginekit-tok-") as tmp:
            tokenizer.save_pretrained(tmp)
            fast = auto.from_pretrained(tmp, use_fast=True)
    except Exception as exc:  # transformers raises whatever its converter raises
        raise ExportError(f"cannot convert {type(tokenizer).__name__} to a fast tokenizer: {exc}") from exc
    backend = getattr(fast, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise ExportError(f"transformers has no fast tokenizer for {type(tokenizer).__name__}")
    return backend


def _lowercases(normalizer: Any) -> bool:
    if isinstance(normalizer, dict):
        if normalizer.get("type") == "Lowercase" or (
            normalizer.get("type") == "BertNormalizer" and normalizer.get("lowercase")
        ):
            return True
        return any(_lowercases(v) for v in normalizer.values())
    if isinstance(normalizer, list):
        return any(_lowercases(v) for v in normalizer)
    return False


def _check(tokenizer: Any, written: tokenizers.Tokenizer, config: dict[str, Any]) -> None:
    """Run the written file as the runtime will, and compare its ids with ``tokenizer``'s."""
    try:
        runtime = PromptTokenizer(written, TokenizerConfig.from_dict(config))
    except ArtifactError as exc:
        raise ExportError(f"the saved tokenizer does not load: {exc}") from exc
    got = runtime.encode(list(_PROBES)).input_ids
    want = tokenizer(list(_PROBES), padding="max_length", max_length=config["max_length"], truncation=True)
    for prompt, ours, theirs in zip(_PROBES, got.tolist(), want["input_ids"]):
        if ours != list(theirs):
            raise ExportError(
                f"the saved tokenizer gives other ids than {type(tokenizer).__name__} for {prompt[:40]!r}: "
                f"{ours[:12]}... != {list(theirs)[:12]}..."
            )


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ExportError(f"exporting tokenizers needs transformers: {_INSTALL}") from exc
    return transformers


def _pad_token(tok_dir: Path) -> str:
    """The pad token a config folder's tokenizer declares (special_tokens_map wins, as in transformers)."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = tok_dir / name
        if path.is_file():
            pad = read_json(path).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad:
                return str(pad)
    return "<|endoftext|>"


def tokenizer_for(folder: Path, name: str) -> Any:
    """The tokenizer saved in ``folder/name``, or the real CLIP BPE with that folder's pad token
    (a T5 stand-in for a config folder's T5 tokenizer: see :func:`stand_in_t5_tokenizer`)."""
    tok_dir = folder / name
    config = read_json(tok_dir / "tokenizer_config.json") if (tok_dir / "tokenizer_config.json").is_file() else {}
    if str(config.get("tokenizer_class", "")).startswith("T5"):
        if (tok_dir / "tokenizer.json").is_file() or (tok_dir / "spiece.model").is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(tok_dir), use_fast=True)
        enc_cfg = folder / name.replace("tokenizer", "text_encoder") / "config.json"
        vocab = int(read_json(enc_cfg).get("vocab_size", 32128)) if enc_cfg.is_file() else 32128
        return stand_in_t5_tokenizer(min(vocab, 32100), int(config.get("model_max_length", 512)))
    if (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(tok_dir))
    max_len = int(read_json(tok_dir / "tokenizer_config.json").get("model_max_length", 77)) if (
        tok_dir / "tokenizer_config.json").is_file() else 77
    return real_clip_tokenizer(pad_token=_pad_token(tok_dir), model_max_length=max_len)
