"""Prompt tokenizers for diffusion pipelines, run without transformers.

Export writes the transformers tokenizer's Rust backend to ``tokenizer.json``
(:func:`enginekit.export.diffusion.tokenizer.save_tokenizer`) with a small
config beside it in the manifest; :class:`PromptTokenizer` loads both and
reproduces what a diffusers pipeline gets from::

    tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)

that is: normalise and split with the tokenizer's own rules, keep at most
``max_length`` minus the special tokens of the content, wrap it in the special
tokens (``<|startoftext|> ... <|endoftext|>`` for CLIP, ``... </s>`` for T5),
pad with the tokenizer's pad id. The ids are those of transformers' fast
tokenizer, token for token (``tests/runtimes/test_tokenizers.py`` says where the old
slow CLIPTokenizer differs). Imports numpy and ``tokenizers`` only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

import numpy as np

from enginekit.errors import ArtifactError, InputError, ManifestError, need, one_line

__all__ = ["TokenizerConfig", "EncodedPrompts", "PromptTokenizer", "KINDS"]

#: Tokenizer families a pipeline may hold: CLIP's BPE (SD 1.x, 2.x, XL) and T5 (SD3, FLUX).
KINDS = ("clip", "t5")


@dataclass(frozen=True)
class TokenizerConfig:
    """What the manifest records about one tokenizer; :meth:`to_dict` is its JSON form."""

    kind: str  # one of KINDS
    #: The tokenizer.json, relative to the component folder.
    file: str
    #: Every prompt is padded or truncated to this many ids (CLIP: 77).
    max_length: int
    pad_token: str
    #: Taken from the tokenizer: SD 1.5 pads with <|endoftext|> (49407), SD 2.x with "!" (0).
    pad_token_id: int
    bos_token_id: int | None
    eos_token_id: int | None
    #: Ids the tokenizer can produce, added tokens included; a text encoder's embedding must cover them.
    vocab_size: int
    #: Whether the normaliser lowercases (CLIP does); recorded for readers, tokenizer.json applies it.
    lowercase: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> TokenizerConfig:
        """Parse :meth:`to_dict` output; a missing, unknown or mistyped field is a ManifestError."""
        where = "manifest.json tokenizer"
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ManifestError(f"{where}: unknown field {unknown[0]!r}")
        missing = [n for n in names if n not in data]
        if missing:
            raise ManifestError(f"{where}: missing field {missing[0]!r}")
        for name, types, optional in (
            ("kind", str, False),
            ("file", str, False),
            ("max_length", int, False),
            ("pad_token", str, False),
            ("pad_token_id", int, False),
            ("bos_token_id", int, True),
            ("eos_token_id", int, True),
            ("vocab_size", int, False),
            ("lowercase", bool, False),
        ):
            value = data[name]
            if value is None and optional:
                continue
            # bool is an int in Python; a `true` max_length is a bug, not a 1.
            if not isinstance(value, types) or (types is int and isinstance(value, bool)):
                want = types.__name__ + (" or null" if optional else "")
                raise ManifestError(f"{where}: {name} must be {want}, got {value!r}")
        if data["kind"] not in KINDS:
            raise ManifestError(f"{where}: kind must be one of {list(KINDS)}, got {data['kind']!r}")
        file = PurePosixPath(data["file"])
        if not data["file"] or file.is_absolute() or ".." in file.parts:
            raise ManifestError(f"{where}: file must be a path inside the component folder, got {data['file']!r}")
        if data["max_length"] < 1 or data["vocab_size"] < 1:
            raise ManifestError(f"{where}: max_length and vocab_size must be positive")
        return cls(**{n: data[n] for n in names})


@dataclass(frozen=True, eq=False)
class EncodedPrompts:
    """Token ids for a batch of prompts, as a CLIP or T5 text encoder takes them."""

    #: int64, (N, max_length): special tokens, content, then padding.
    input_ids: np.ndarray
    #: int64, (N, max_length): 1 on special and content tokens, 0 on padding. Kept apart from
    #: the ids because CLIP's pad id may equal its eos id.
    attention_mask: np.ndarray
    #: Content tokens each prompt lost to truncation (0 when it fit).
    dropped: tuple[int, ...]

    @property
    def truncated(self) -> bool:
        return any(self.dropped)


class PromptTokenizer:
    """Prompts in, fixed-length id arrays out; a ``tokenizers.Tokenizer`` plus its config.

    Takes over ``tokenizer`` and clears its own padding and truncation: this class
    pads and truncates, so encoding mutates nothing shared and one instance can
    serve several threads.
    """

    def __init__(self, tokenizer: Any, config: TokenizerConfig) -> None:
        self.config = config
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        where = f"tokenizer {config.file!r}"
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size != config.vocab_size:
            raise ArtifactError(
                f"{where} has {size} tokens, the manifest says {config.vocab_size}; re-export the model"
            )
        specials = self._tok.post_process(self._tok.encode("", add_special_tokens=False)).ids
        expected = [i for i in (config.bos_token_id, config.eos_token_id) if i is not None]
        if specials != expected:
            raise ArtifactError(
                f"{where} wraps a prompt in ids {specials}, the manifest's bos/eos are {expected}; re-export the model"
            )
        self._budget = config.max_length - self._tok.num_special_tokens_to_add(False)
        if self._budget < 1:
            raise ManifestError(
                f"manifest.json tokenizer: max_length {config.max_length} leaves no room for a prompt beside {specials}"
            )

    @classmethod
    def from_config(cls, root: Path, config: Mapping[str, Any] | TokenizerConfig) -> PromptTokenizer:
        """Load ``root / config["file"]``; a bad config is a ManifestError, a bad file an ArtifactError."""
        cfg = config if isinstance(config, TokenizerConfig) else TokenizerConfig.from_dict(config)
        path = Path(root) / cfg.file
        if not path.is_file():
            raise ArtifactError(f"tokenizer file {path} is missing; re-export the model")
        tokenizers = need("tokenizers", "Prompt tokenization (text-to-image)", "pipelines")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises plain Exception with serde's message
            first = one_line(exc)
            raise ArtifactError(f"tokenizer file {path} cannot be read: {first}") from exc
        return cls(tok, cfg)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def max_length(self) -> int:
        return self.config.max_length

    @property
    def pad_token_id(self) -> int:
        return self.config.pad_token_id

    @property
    def vocab_size(self) -> int:
        """Ids this tokenizer can produce are below this; compare with the text encoder's."""
        return self.config.vocab_size

    def encode(self, prompts: str | Sequence[str], max_length: int | None = None) -> EncodedPrompts:
        """Tokenize, truncate and pad ``prompts`` (a bare string is one prompt) to
        ``max_length`` ids (default: the config's; T5 takes the pipeline's ``max_sequence_length``).

        Truncation keeps the special tokens and drops content from the right, as
        transformers does; :attr:`EncodedPrompts.dropped` says how much went.
        """
        length = self.config.max_length if max_length is None else int(max_length)
        budget = length - (self.config.max_length - self._budget)
        if budget < 1:
            raise InputError(f"max_length {length} leaves no room for a prompt beside the special tokens")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence):
            raise InputError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
        texts = list(prompts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"prompt {i} must be a string, got {type(text).__name__}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800"): not text any tokenizer takes
                raise InputError(f"prompt {i} is not valid Unicode text ({exc.reason} at character "
                                 f"{exc.start}: {text[exc.start]!r})") from None
        ids = np.full((len(texts), length), self.config.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(texts), length), dtype=np.int64)
        dropped: list[int] = []
        for row, enc in enumerate(self._tok.encode_batch(texts, add_special_tokens=False)):
            over = max(0, len(enc.ids) - budget)
            if over:
                enc.truncate(budget)
            full = self._tok.post_process(enc).ids
            ids[row, : len(full)] = full
            mask[row, : len(full)] = 1
            dropped.append(over)
        return EncodedPrompts(input_ids=ids, attention_mask=mask, dropped=tuple(dropped))

    def __repr__(self) -> str:
        c = self.config
        return f"PromptTokenizer(kind={c.kind!r}, max_length={c.max_length}, vocab_size={c.vocab_size})"
