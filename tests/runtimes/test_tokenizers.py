"""Prompt tokenizers: saved at export from transformers, run torch-free with the Rust library.

Which tokenizer we match
------------------------
``PromptTokenizer`` runs the fast tokenizer's own ``tokenizer.json``, so its ids
equal transformers' fast ``CLIPTokenizerFast`` on every prompt. In transformers 5
(installed here; diffusers loads whatever ``CLIPTokenizer`` transformers has)
``CLIPTokenizer`` *is* that fast tokenizer. transformers 4 had a slow,
pure-Python ``CLIPTokenizer`` — the class SD 1.x / 2.x model_index.json files
name — which cleans text first, with ftfy when it is installed and BERT's
BasicTokenizer when not. ``_SlowCLIP``
below is that algorithm, condensed; on ordinary prompts (ASCII, punctuation,
numbers, case, accents, Greek and Cyrillic, emoji, any whitespace, the empty
prompt, truncation) all three agree. They differ on (``SLOW_DIFFERS``):

- slow with ftfy: curly quotes and apostrophes become straight (``don’t`` is
  ``don't``), ligatures (``ﬁ``) and full-width forms (``Ｈｅｌｌｏ``) are unfolded,
  HTML entities (``&amp;``) unescaped, mojibake (``â€™``) repaired;
- slow without ftfy: CJK ideographs are split one per word, and format
  characters (zero-width space, soft hyphen) and U+FFFD are dropped;
- both slow paths drop control characters (``\\x00``, ``\\x07``), and Python's
  ``str.lower`` writes a word-final capital sigma as ``ς`` where the Rust
  normaliser writes ``σ``.

The Rust library cannot run ftfy, and transformers 5 no longer does, so we
match the fast tokenizer and keep these as known differences.

One quirk is shared by every transformers variant: a tokenizer padded with
``"!"`` (SD 2.x, SDXL's ``tokenizer_2``) registers ``"!"`` as a special token,
so a ``!`` in a prompt becomes id 0 (the pad) instead of ``!</w>`` (256), unlike
OpenAI's own tokenizer. We reproduce it, as diffusers' ids are the reference.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import pytest
import regex
import tokenizers

from enginekit.errors import ArtifactError, ExportError, InputError, ManifestError
from enginekit.export.diffusion.tokenizer import real_clip_tokenizer, save_tokenizer
from enginekit.runtimes.tasks.tokenizers import EncodedPrompts, PromptTokenizer, TokenizerConfig

transformers = pytest.importorskip("transformers")

PADS = {"sd15": "<|endoftext|>", "sd2": "!"}

PROMPTS = [
    "a photo of a cat",
    "an astronaut riding a horse on mars",
    "A majestic lion jumping from a big stone at night",
    "portrait of a woman, oil painting, trending on artstation, highly detailed",
    "hello, world! how's it going?",
    "(masterpiece:1.2), best quality; ultra-detailed... [background]",
    "cats & dogs -- 50/50 #tag @user $100 %20 ^_^ *star* ~tilde~",
    "it's they're we've I'm you'll he'd",
    "\"double\" and 'single' quotes",
    "wow!!! really?! a!b",
    "1024x768, 4k, 8K UHD, 3.14159 and 2,718, the year 1999",
    "ThE QuIcK BrOwN FoX",
    "NASA ISS iPhone McDonald's",
    "café crème brûlée, naïve résumé",
    "Ångström Ærø straße İstanbul",
    "e\u0301clair (combining accent, NFC)",
    "Ελληνικά και русский текст",
    "emoji 🐱🚀🔥 and 👍🏽",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n",
    "multiple     spaces\u00a0nbsp\u2003em space",
    "",
    "   ",
    "<|startoftext|>a cat<|endoftext|>",
    "a " * 74,
    "a " * 75,
    "a " * 76,
    "a very long prompt about a castle on a hill, " * 12,
    "supercalifragilisticexpialidocious " * 40,
]

#: Where transformers 4's slow CLIPTokenizer differs from the fast one (and so from us),
#: by its cleaner: "ftfy" when ftfy is installed, "basic" when not.
SLOW_DIFFERS = {
    "don’t say “cheese”": {"ftfy"},
    "ﬁsh and ﬂowers": {"ftfy"},
    "Ｈｅｌｌｏ": {"ftfy"},
    "cats &amp; dogs": {"ftfy"},
    "â€™ mojibake": {"ftfy"},
    "一只猫": {"basic"},
    "zero\u200bwidth": {"basic"},
    "soft\u00adhyphen": {"basic"},
    "cat\ufffddog": {"basic"},
    "cat\x00dog": {"ftfy", "basic"},
    "cat\x07dog": {"ftfy", "basic"},
    "ΣΑΣ": {"ftfy", "basic"},
}


@pytest.fixture(scope="module")
def clip() -> dict:
    """Per variant: the transformers tokenizer, its saved config, and our runtime tokenizer."""
    return {name: real_clip_tokenizer(pad_token=pad) for name, pad in PADS.items()}


@pytest.fixture(scope="module")
def saved(clip: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = {}
    for name, tok in clip.items():
        folder = tmp_path_factory.mktemp(f"tok-{name}")
        config = save_tokenizer(tok, folder)
        out[name] = (folder, config, PromptTokenizer.from_config(folder, config))
    return out


def reference(tok, prompts: list[str]) -> dict:
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True)


# --- the real CLIP vocabulary -------------------------------------------------------------


def test_real_clip_vocabulary(clip: dict) -> None:
    tok = clip["sd15"]
    vocab = tok.get_vocab()
    assert len(vocab) == tok.vocab_size == 49408
    # Ids every SD text encoder was trained on: bytes first, then their word-final forms, then merges.
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["a</w>"] == 320
    assert vocab["photo</w>"] == 1125 and vocab["of</w>"] == 539 and vocab["cat</w>"] == 2368
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_config_records_the_pad_of_each_variant(saved: dict) -> None:
    common = dict(kind="clip", file="tokenizer.json", max_length=77, bos_token_id=49406, eos_token_id=49407,
                  vocab_size=49408, lowercase=True)
    assert saved["sd15"][1] == {**common, "pad_token": "<|endoftext|>", "pad_token_id": 49407}
    assert saved["sd2"][1] == {**common, "pad_token": "!", "pad_token_id": 0}
    for folder, config, runtime in saved.values():
        assert json.loads(json.dumps(config)) == config
        written = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        # transformers leaves padding/truncation set on its backend after a call; none may travel.
        assert written["padding"] is None and written["truncation"] is None
        assert runtime.vocab_size == 49408 and runtime.max_length == 77 and runtime.kind == "clip"


# --- parity with transformers ---------------------------------------------------------------


@pytest.mark.parametrize("variant", list(PADS))
def test_ids_match_transformers(clip: dict, saved: dict, tmp_path: Path, variant: str) -> None:
    # CLIPTokenizer as model_index.json names it (pure Python in transformers 4), and the fast class.
    named = clip[variant]
    named.save_pretrained(tmp_path)
    fast = transformers.CLIPTokenizerFast.from_pretrained(tmp_path)
    runtime = saved[variant][2]
    prompts = PROMPTS + list(SLOW_DIFFERS)
    got = runtime.encode(prompts)
    assert got.input_ids.dtype == got.attention_mask.dtype == "int64"
    assert got.input_ids.shape == got.attention_mask.shape == (len(prompts), 77)
    for tok in (named, fast):
        want = reference(tok, prompts)
        assert got.input_ids.tolist() == want["input_ids"], type(tok).__name__
        assert got.attention_mask.tolist() == want["attention_mask"], type(tok).__name__


@pytest.mark.parametrize("variant", list(PADS))
def test_dropped_counts_what_truncation_removed(clip: dict, saved: dict, variant: str) -> None:
    tok, runtime = clip[variant], saved[variant][2]
    got = runtime.encode(PROMPTS)
    untruncated = [len(ids) for ids in tok(PROMPTS).input_ids]
    assert got.dropped == tuple(max(0, n - 77) for n in untruncated)
    # "a " * n is n tokens plus bos/eos: 75 fit exactly, 76 lose one.
    assert [got.dropped[PROMPTS.index("a " * n)] for n in (74, 75, 76)] == [0, 0, 1]
    long = got.input_ids[PROMPTS.index("supercalifragilisticexpialidocious " * 40)]
    assert long[0] == 49406 and long[-1] == 49407 and got.truncated


def test_bang_pad_makes_bang_a_special_token(clip: dict, saved: dict) -> None:
    wow = clip["sd15"].get_vocab()["wow</w>"]
    sd15, sd2 = (saved[v][2].encode("wow!").input_ids[0, :4].tolist() for v in ("sd15", "sd2"))
    assert sd15 == [49406, wow, 256, 49407]  # "!</w>", as OpenAI's tokenizer has it
    assert sd2 == [49406, wow, 0, 49407]  # "!" is the pad token, so a special token


# --- the slow tokenizer of transformers 4 ----------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _basic_clean(text: str) -> str:
    """BERT's BasicTokenizer as CLIPTokenizer used it (lowercase, accents kept, no punctuation split)."""
    kept = []
    for ch in text:
        if ord(ch) in (0, 0xFFFD) or (ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")):
            continue
        ch = " " if ch in " \t\n\r" or unicodedata.category(ch) == "Zs" else ch
        kept.append(f" {ch} " if any(a <= ord(ch) <= b for a, b in _CJK) else ch)
    return " ".join(t.lower() for t in unicodedata.normalize("NFC", "".join(kept)).split())


def _ftfy_clean(text: str) -> str:
    import ftfy

    return regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


class _SlowCLIP:
    """transformers 4's slow CLIPTokenizer with padding="max_length", truncation=True, condensed."""

    pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )

    def __init__(self, tok, cleaner: str) -> None:
        self.vocab = tok.get_vocab()
        merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
        self.ranks = {tuple(m.split(" ") if isinstance(m, str) else m): i for i, m in enumerate(merges)}
        self.bos, self.eos, self.pad, self.length = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, 77
        # Its added-token trie splits out every special token, the pad included, before cleaning.
        specials = sorted({tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token}, key=len, reverse=True)
        self.specials = regex.compile("(" + "|".join(map(regex.escape, specials)) + ")")
        self.clean = _basic_clean if cleaner == "basic" else _ftfy_clean
        self.bytes = _bytes_to_unicode()

    def bpe(self, token: str) -> tuple[str, ...]:
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def __call__(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.specials.split(text):
            if self.specials.fullmatch(piece):
                ids.append(self.vocab[piece])
                continue
            for word in self.pattern.findall(self.clean(piece)):
                ids += [self.vocab[t] for t in self.bpe("".join(self.bytes[b] for b in word.encode("utf-8")))]
        ids = [self.bos, *ids[: self.length - 2], self.eos]
        return ids + [self.pad] * (self.length - len(ids))


_NO_FTFY = importlib.util.find_spec("ftfy") is None
CLEANERS = ["basic", pytest.param("ftfy", marks=pytest.mark.skipif(_NO_FTFY, reason="ftfy is not installed"))]


@pytest.mark.parametrize("cleaner", CLEANERS)
@pytest.mark.parametrize("variant", list(PADS))
def test_ordinary_prompts_match_the_slow_tokenizer(clip: dict, saved: dict, variant: str, cleaner: str) -> None:
    slow = _SlowCLIP(clip[variant], cleaner)
    got = saved[variant][2].encode(PROMPTS).input_ids.tolist()
    assert got == [slow(p) for p in PROMPTS]


@pytest.mark.parametrize("cleaner", CLEANERS)
def test_where_the_slow_tokenizer_differs(clip: dict, saved: dict, cleaner: str) -> None:
    """The documented differences: we give the fast tokenizer's ids, the slow one cleans first."""
    tok, runtime = clip["sd15"], saved["sd15"][2]
    slow = _SlowCLIP(tok, cleaner)
    prompts = list(SLOW_DIFFERS)
    got = runtime.encode(prompts).input_ids.tolist()
    assert got == reference(tok, prompts)["input_ids"]
    differs = {p for p, ours in zip(prompts, got) if ours != slow(p)}
    assert differs == {p for p, cleaners in SLOW_DIFFERS.items() if cleaner in cleaners}


class CLIPTokenizerStandIn:
    """transformers 4's pure-Python CLIPTokenizer, as far as save_tokenizer can tell: no Rust backend."""

    backend_tokenizer = None

    def __init__(self, tok) -> None:
        self._tok = tok

    def __getattr__(self, name: str):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)


def test_a_slow_tokenizer_is_converted(clip: dict, saved: dict, tmp_path: Path) -> None:
    config = save_tokenizer(CLIPTokenizerStandIn(clip["sd2"]), tmp_path)
    assert config == saved["sd2"][1]  # the "!" pad survives save_pretrained -> from_pretrained(use_fast=True)
    runtime = PromptTokenizer.from_config(tmp_path, config)
    assert runtime.encode(PROMPTS).input_ids.tolist() == saved["sd2"][2].encode(PROMPTS).input_ids.tolist()


# --- T5, the other kind ----------------------------------------------------------------------


def _tiny_t5():
    pieces = ["▁a", "▁photo", "▁of", "▁cat", "▁", "a", "c", "t", "o", "f", "p", "h"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((p, -1.0 - i) for i, p in enumerate(pieces))]
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=0)


def test_t5_appends_eos_and_needs_a_max_length(tmp_path: Path) -> None:
    tok = _tiny_t5()
    with pytest.raises(ExportError, match="max_length"):
        save_tokenizer(tok, tmp_path)
    config = save_tokenizer(tok, tmp_path, max_length=6)
    assert [config[k] for k in ("kind", "bos_token_id", "eos_token_id", "pad_token_id")] == ["t5", None, 1, 0]
    runtime = PromptTokenizer.from_config(tmp_path, config)
    got = runtime.encode(["a photo of a cat", "a cat"])
    assert got.input_ids.tolist() == tok(["a photo of a cat", "a cat"], padding="max_length", max_length=6,
                                         truncation=True)["input_ids"]
    assert got.input_ids[0, -1] == 1 and got.dropped == (0, 0)
    assert runtime.encode("a cat a cat a cat a cat").dropped == (3,)


# --- the runtime stands alone ----------------------------------------------------------------


def test_runtime_imports_without_torch_or_transformers(saved: dict) -> None:
    folder, config, runtime = saved["sd2"]
    code = textwrap.dedent(
        f"""
        import json, sys
        BLOCKED = {{"torch", "transformers", "diffusers"}}

        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test)", name=name)
                return None

        sys.meta_path.insert(0, _Block())
        from pathlib import Path
        from enginekit.runtimes.tasks.tokenizers import PromptTokenizer
        tok = PromptTokenizer.from_config(Path({str(folder)!r}), json.loads({json.dumps(config)!r}))
        out = tok.encode(["a photo of a cat!", ""])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"ids": out.input_ids.tolist(), "heavy": heavy}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert out["ids"] == runtime.encode(["a photo of a cat!", ""]).input_ids.tolist()


def test_encode_takes_a_bare_string_and_an_empty_batch(saved: dict) -> None:
    runtime = saved["sd15"][2]
    one = runtime.encode("a photo of a cat")
    assert isinstance(one, EncodedPrompts) and one.input_ids.shape == (1, 77) and one.dropped == (0,)
    none = runtime.encode([])
    assert none.input_ids.shape == (0, 77) and none.dropped == () and not none.truncated


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts", [[1], ["a cat", None], [b"a cat"], 5, None])
def test_non_string_prompt_is_an_input_error(saved: dict, prompts) -> None:
    with pytest.raises(InputError, match="string"):
        saved["sd15"][2].encode(prompts)


def test_missing_or_unreadable_file_is_an_artifact_error(saved: dict, tmp_path: Path) -> None:
    config = saved["sd15"][1]
    with pytest.raises(ArtifactError, match="missing; re-export"):
        PromptTokenizer.from_config(tmp_path, config)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(ArtifactError, match="cannot be read") as info:
        PromptTokenizer.from_config(tmp_path, config)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"kind": None}, "kind must be str"),
        ({"kind": "gpt2"}, "kind must be one of"),
        ({"max_length": True}, "max_length must be int"),
        ({"max_length": "77"}, "max_length must be int"),
        ({"pad_token_id": 1.5}, "pad_token_id must be int"),
        ({"bos_token_id": "x"}, "bos_token_id must be int or null"),
        ({"file": "../tokenizer.json"}, "inside the component folder"),
        ({"file": "/etc/tokenizer.json"}, "inside the component folder"),
        ({"max_length": 0}, "must be positive"),
        ({"surprise": 1}, "unknown field 'surprise'"),
    ],
)
def test_bad_config_is_a_manifest_error(saved: dict, change: dict, match: str) -> None:
    folder, config, _ = saved["sd15"]
    with pytest.raises(ManifestError, match=match):
        PromptTokenizer.from_config(folder, {**config, **change})


def test_config_must_match_the_file(saved: dict) -> None:
    folder, config, _ = saved["sd15"]
    with pytest.raises(ManifestError, match="missing field 'vocab_size'"):
        PromptTokenizer.from_config(folder, {k: v for k, v in config.items() if k != "vocab_size"})
    with pytest.raises(ManifestError, match="expected a JSON object"):
        PromptTokenizer.from_config(folder, ["tokenizer.json"])
    rust = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))  # loaded once: 0.2 s a time
    for change, error, match in [
        ({"vocab_size": 49409}, ArtifactError, "49408 tokens, the manifest says 49409"),
        ({"bos_token_id": None}, ArtifactError, r"wraps a prompt in ids \[49406, 49407\]"),
        ({"max_length": 2}, ManifestError, "leaves no room"),
    ]:
        with pytest.raises(error, match=match):
            PromptTokenizer(rust, TokenizerConfig.from_dict({**config, **change}))
    assert TokenizerConfig.from_dict(config).to_dict() == config


def test_export_refuses_what_it_cannot_save(clip: dict, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="cannot export a str prompt tokenizer"):
        save_tokenizer("openai/clip-vit-large-patch14", tmp_path)
    with pytest.raises(ExportError, match="max_length must be a positive int"):
        save_tokenizer(clip["sd15"], tmp_path, max_length=0)
