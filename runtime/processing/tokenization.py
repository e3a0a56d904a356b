"""Text tokenization for the runtime, without transformers.

Both Kandinsky 2.1 text encoders see fixed-length 77-token inputs:

* the prior's ``CLIPTokenizer`` is called with ``padding="max_length"``,
  ``max_length=tokenizer.model_max_length`` (77) and ``truncation=True``;
* the decoders' ``XLMRobertaTokenizer`` is called with ``padding="max_length"``, ``max_length=77``
  (hard-coded in diffusers), ``truncation=True`` and ``add_special_tokens=True``.

In transformers 5 both are thin wrappers over a ``tokenizers.Tokenizer``, so loading the same
``tokenizer.json`` with the ``tokenizers`` package and enabling right-side truncation (which reserves
room for the special tokens the post-processor adds, so the end-of-sequence token survives) and
right-side padding to ``max_length`` with the pad id reproduces their ``input_ids`` and
``attention_mask``. Padding and truncation stored inside ``tokenizer.json`` are ignored on purpose:
they are reset and enabled here with explicit values.

Prompt size (issue 18 §1.2): a prompt over :data:`MAX_PROMPT_BYTES` of UTF-8 is refused before any
work (a 5 MB prompt used to take 24 s and 1.3 GB inside ``tokenizers``). Below the cap, a long
prompt is cut to a head that already fills the 77 tokens (:meth:`TextTokenizer._head`), which
gives the ids of the whole prompt, since truncation keeps only the first tokens. The head ends
just before a space, a boundary every pre-tokenizer of the two Kandinsky tokenizers splits at
(CLIP's regex split, XLM-R's whitespace split): the words before it tokenize as they do in the
whole prompt. A tokenizer of another layout (:func:`_cuts_at_spaces`) is tokenized whole.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from kandinsky_trt.runtime.contract.errors import KandinskyTrtError, PipelineInputError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
DEFAULT_MAX_LENGTH = 77  # both Kandinsky 2.1 text encoders
# Largest prompt accepted, in bytes of UTF-8: ~100x what 77 tokens can hold, tokenized in < 0.5 s.
MAX_PROMPT_BYTES = 64 * 1024
HEAD_CHARS = 512  # first head tried for a long prompt; grown x4 until it fills max_length tokens
# CLIP's pre-tokenizer regex: none of its alternatives matches a space.
CLIP_SPLIT_PATTERN = ("<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]"
                      "|[^\\s\\p{L}\\p{N}]+")
# Pre-tokenizers that only split (never join pieces), and those that always split at a space.
_SPLITTERS = {"Sequence", "WhitespaceSplit", "Whitespace", "BertPreTokenizer", "Metaspace", "Split", "ByteLevel",
              "Digits", "Punctuation"}
# Normalizers that act per character (or collapse whitespace into one space).
_PER_CHARACTER = {"Sequence", "NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Precompiled", "Strip", "StripAccents",
                  "BertNormalizer", "Replace"}


class TokenizerFileError(KandinskyTrtError, ValueError):
    """A tokenizer file or folder that is unreadable, corrupt, or lacks a needed setting."""


def _load_backend(path: Path) -> Tokenizer:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file: expected a tokenizer.json at {path}, found nothing")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for parse errors
        raise TokenizerFileError(
            f"tokenizer file {path}: expected a valid tokenizers JSON file, failed to parse it ({exc})"
        ) from exc


def check_prompt_size(text: str, name: str = "prompt") -> str:
    """``text`` unchanged, or :class:`PipelineInputError` if over :data:`MAX_PROMPT_BYTES` of UTF-8."""
    size = len(text) if text.isascii() else len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_PROMPT_BYTES:
        raise PipelineInputError(f"{name}: expected at most {MAX_PROMPT_BYTES} bytes of UTF-8, found {size}")
    return text


def _space_boundary(node: dict | None) -> bool:
    """Whether a pre-tokenizer (JSON) always puts a piece boundary at a space and only ever splits."""
    if not isinstance(node, dict) or node.get("type") not in _SPLITTERS:
        return False
    kind = node["type"]
    if kind == "Sequence":
        children = node.get("pretokenizers", [])
        return all(c.get("type") in _SPLITTERS for c in children) and any(_space_boundary(c) for c in children)
    if kind == "Metaspace":
        return node.get("split", True) is True
    if kind == "ByteLevel":
        return node.get("use_regex", True) is True
    if kind == "Split":
        return node.get("pattern") == {"Regex": CLIP_SPLIT_PATTERN} and node.get("invert") is True
    return kind in ("WhitespaceSplit", "Whitespace", "BertPreTokenizer")


def _per_character(node: dict | None) -> bool:
    if node is None:
        return True
    if not isinstance(node, dict) or node.get("type") not in _PER_CHARACTER:
        return False
    if node["type"] == "Sequence":
        return all(_per_character(c) for c in node.get("normalizers", []))
    return node["type"] != "Replace" or node.get("content") == " "


def _cuts_at_spaces(backend: Tokenizer) -> bool:
    """Whether a prompt's head ending before a space tokenizes as the same words of the whole prompt:
    the pre-tokenizer splits at every space, the normalizer works per character and no added token
    holds a space (added tokens are matched before either)."""
    config = json.loads(backend.to_str())
    spaced = any(" " in t.get("content", "") for t in config.get("added_tokens", []))
    return not spaced and _space_boundary(config.get("pre_tokenizer")) and _per_character(config.get("normalizer"))


def _token_content(value: Any) -> str | None:
    """A special token as stored by transformers: a plain string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerFileError(f"{path}: expected a readable JSON object, failed ({exc})") from exc
    if not isinstance(data, dict):
        raise TokenizerFileError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


class TextTokenizer:
    """Fixed-length tokenizer reproducing the diffusers Kandinsky pipelines' tokenizer calls.

    Args:
        path: the ``tokenizer.json`` file.
        max_length: sequence length after padding/truncation (77 for both Kandinsky encoders).
        pad_token: the padding token's text (e.g. ``"<pad>"``, ``"<|endoftext|>"``).
        pad_id: the padding token's id; give it instead of, or together with, ``pad_token``.
    """

    def __init__(
        self,
        path: str | Path,
        max_length: int = DEFAULT_MAX_LENGTH,
        pad_token: str | None = None,
        pad_id: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ValueError(f"max_length: expected an integer >= 2, found {max_length!r}")
        self.max_length = max_length
        self._backend = _load_backend(self.path)
        self._heads = _cuts_at_spaces(self._backend)
        self.pad_token, self.pad_id = self._resolve_pad(pad_token, pad_id)
        # Whatever tokenizer.json stored is discarded: the settings below are the pipelines' own.
        self._backend.no_padding()
        self._backend.no_truncation()
        self._backend.enable_truncation(max_length=max_length, strategy="longest_first", direction="right")
        self._backend.enable_padding(
            direction="right", pad_id=self.pad_id, pad_type_id=0, pad_token=self.pad_token, length=max_length
        )

    def _resolve_pad(self, pad_token: str | None, pad_id: int | None) -> tuple[str, int]:
        if pad_token is None and pad_id is None:
            raise ValueError(f"pad_token/pad_id: expected at least one for {self.path}, found neither")
        if pad_token is not None:
            token_id = self._backend.token_to_id(pad_token)
            if token_id is None:
                raise TokenizerFileError(
                    f"pad_token: expected {pad_token!r} in the vocabulary of {self.path}, it is absent"
                )
            if pad_id is not None and pad_id != token_id:
                raise ValueError(f"pad_id: {pad_token!r} has id {token_id} in {self.path}, found pad_id={pad_id}")
            return pad_token, token_id
        token = self._backend.id_to_token(pad_id)
        if token is None:
            raise TokenizerFileError(f"pad_id: expected an id in the vocabulary of {self.path}, found {pad_id}")
        return token, int(pad_id)

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int | None = DEFAULT_MAX_LENGTH) -> TextTokenizer:
        """Load a transformers tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``).

        The pad token is read from ``tokenizer_config.json`` (or ``special_tokens_map.json``).
        ``max_length=None`` takes ``model_max_length`` from the config, as the prior pipeline does;
        the decoder pipelines always use 77.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder: expected a directory at {folder}, found nothing")
        config = cls._read_config(folder)
        pad_token = _token_content(config.get("pad_token"))
        if pad_token is None:
            raise TokenizerFileError(f"{folder}: expected a pad_token in {TOKENIZER_CONFIG_FILE}, found none")
        if max_length is None:
            max_length = config.get("model_max_length")
            if not isinstance(max_length, int) or max_length < 2 or max_length > 1_000_000:
                raise TokenizerFileError(
                    f"{folder / TOKENIZER_CONFIG_FILE}: expected an integer model_max_length, found {max_length!r}"
                )
        return cls(folder / TOKENIZER_FILE, max_length=max_length, pad_token=pad_token)

    @staticmethod
    def _read_config(folder: Path) -> dict:
        """tokenizer_config.json, with special_tokens_map.json filling gaps (older save formats)."""
        config: dict = {}
        special = folder / SPECIAL_TOKENS_FILE
        if special.is_file():
            config.update(_read_json(special))
        main = folder / TOKENIZER_CONFIG_FILE
        if main.is_file():
            config.update({k: v for k, v in _read_json(main).items() if v is not None})
        return config

    @classmethod
    def from_manifest_entry(cls, entry: dict, base_dir: str | Path) -> TextTokenizer:
        """Build from a manifest ``tokenizers`` entry ``{file, max_length, pad_id}``."""
        try:
            file, max_length, pad_id = entry["file"], entry["max_length"], entry["pad_id"]
        except (KeyError, TypeError) as exc:
            raise TokenizerFileError(
                f"tokenizer manifest entry: expected keys file, max_length, pad_id, found {entry!r}"
            ) from exc
        return cls(Path(base_dir) / file, max_length=max_length, pad_id=pad_id)

    def encode(self, prompts: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize ``prompts`` to ``(input_ids, attention_mask)``, both int64 ``[n, max_length]``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError(f"prompts: expected a non-empty list of str, found {prompts!r}")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts[{i}]: expected str, found {type(prompt).__name__}")
            check_prompt_size(prompt, "prompt" if len(prompts) == 1 else f"prompts[{i}]")
        encodings = self._backend.encode_batch([self._head(p) for p in prompts], add_special_tokens=True)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        if ids.shape != (len(prompts), self.max_length):
            raise RuntimeError(
                f"tokenizer {self.path}: expected [{len(prompts)}, {self.max_length}] ids, found {ids.shape}"
            )
        return ids, mask

    def _head(self, prompt: str) -> str:
        """The shortest head of ``prompt`` tried that ends before a space and fills ``max_length``
        tokens (truncation then gives the whole prompt's ids), else ``prompt`` itself."""
        length = HEAD_CHARS
        while self._heads and length < len(prompt):
            cut = prompt.find(" ", length)
            if cut < 0:
                break
            if sum(self._backend.encode(prompt[:cut], add_special_tokens=True).attention_mask) == self.max_length:
                return prompt[:cut]
            length = cut * 4
        return prompt

    def __repr__(self) -> str:
        return (
            f"TextTokenizer({str(self.path)!r}, max_length={self.max_length}, "
            f"pad_token={self.pad_token!r}, pad_id={self.pad_id})"
        )
