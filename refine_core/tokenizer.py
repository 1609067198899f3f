"""Tokenizers behind one small interface: a built-in byte tokenizer and Hugging Face tokenizers.

Spec §1: documents and prompts are tokenized as raw text with ``add_special_tokens=False`` (no BOS, no chat
template), and the pad token is EOS when the tokenizer has none. :class:`Tokenizer` captures exactly what the rest
of ``refine_core`` needs, so ``encode`` never adds special tokens whichever implementation is behind it.

* :class:`ByteTokenizer`: UTF-8 bytes 0..255 plus pad/eos/bos at 256..258 (vocabulary 259). Needs no files and no
  network; the tiny configs and the tests use it.
* :class:`HFTokenizer`: any ``transformers.AutoTokenizer`` (a hub name, a local directory, or an s3:// copy).
* :func:`load_tokenizer` turns a config string into one of them; :func:`train_bpe_tokenizer` trains a small
  byte-level BPE with the ``tokenizers`` library and saves it so that ``AutoTokenizer`` loads it offline.

Every tokenizer has a :meth:`~Tokenizer.fingerprint`, a hash of its vocabulary and rules, that prepared data and
checkpoints record so that a stage can refuse data tokenized with another vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from refine_core import storage

logger = logging.getLogger(__name__)

# The file that marks a directory as one of our own (non-HF) tokenizers.
REFINE_TOKENIZER_FILE = "refine_tokenizer.json"
# Files that mark a directory as a Hugging Face tokenizer.
_HF_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model")


@runtime_checkable
class Tokenizer(Protocol):
    """What ``refine_core`` needs from a tokenizer (spec §1)."""

    name: str

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (every id is ``< vocab_size``)."""
        ...

    @property
    def pad_token_id(self) -> int: ...

    @property
    def eos_token_id(self) -> int: ...

    @property
    def bos_token_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]:
        """Token ids of raw ``text``; never adds special tokens (spec §1)."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, possibly in parallel."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def fingerprint(self) -> str:
        """A stable hex hash identifying the vocabulary and tokenization rules."""
        ...

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write the tokenizer so that :func:`load_tokenizer` on ``directory`` gives an identical one."""
        ...


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then ``<pad>`` = 256, ``<eos>`` = 257, ``<bos>`` = 258 (vocabulary 259)."""

    PAD, EOS, BOS = 256, 257, 258
    _SPECIAL_TEXT = {PAD: "<pad>", EOS: "<eos>", BOS: "<bos>"}

    def __init__(self) -> None:
        self.name = "byte"

    @property
    def vocab_size(self) -> int:
        return 259

    @property
    def pad_token_id(self) -> int:
        return self.PAD

    @property
    def eos_token_id(self) -> int:
        return self.EOS

    @property
    def bos_token_id(self) -> int | None:
        return self.BOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Bytes to text; invalid UTF-8 (e.g. a sequence cut mid-character) becomes U+FFFD."""
        out: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
            elif i in self._SPECIAL_TEXT:
                if not skip_special_tokens:
                    out.append(run.decode("utf-8", errors="replace"))
                    run.clear()
                    out.append(self._SPECIAL_TEXT[i])
            else:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary 0..258")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def fingerprint(self) -> str:
        return _sha256_json({"type": "byte", "version": 1, "vocab_size": 259, "specials": [256, 257, 258]})

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        info = {"type": "byte", "version": 1, "pad_token_id": self.PAD, "eos_token_id": self.EOS,
                "bos_token_id": self.BOS, "vocab_size": self.vocab_size}
        (path / REFINE_TOKENIZER_FILE).write_text(json.dumps(info, indent=1) + "\n")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class HFTokenizer:
    """A ``transformers`` tokenizer behind the :class:`Tokenizer` interface.

    Spec §1: the pad token is set to EOS when the tokenizer has none (and :meth:`save_pretrained` keeps that).
    """

    def __init__(self, hf_tokenizer: Any, name: str | None = None) -> None:
        tok = hf_tokenizer
        if tok.eos_token_id is None:
            raise ValueError(
                f"tokenizer {name or tok.name_or_path!r} has no EOS token; REFINE pads with EOS (spec §1). "
                "Use a tokenizer with an eos_token or set one in its tokenizer_config.json."
            )
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token  # spec §1
        self.hf = tok
        self.name = name or str(tok.name_or_path)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
                        local_files_only: bool = True) -> HFTokenizer:
        """Load with ``AutoTokenizer``.

        Args:
            name_or_path: a local tokenizer directory, or a hub name when ``local_files_only`` is False.
            cache_dir: hub cache directory (``{cache_dir}/hf`` is used).
            local_files_only: never touch the network.
        """
        from transformers import AutoTokenizer

        kwargs: dict[str, Any] = {"local_files_only": local_files_only}
        if cache_dir is not None:
            kwargs["cache_dir"] = str(storage.expand_cache_dir(cache_dir) / "hf")
        try:
            tok = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
        except Exception as exc:  # transformers raises OSError, ValueError, hub errors...
            where = "the local directory" if local_files_only else "the hub"
            raise ValueError(
                f"could not load tokenizer {str(name_or_path)!r} from {where}: {type(exc).__name__}: {exc}. "
                "Without network access set HF_HUB_OFFLINE=1 to use a cached download, or set model.tokenizer to "
                "a local tokenizer directory, an s3:// URI, or 'byte'."
            ) from exc
        return cls(tok, name=str(name_or_path))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)  # includes added tokens, unlike ``hf.vocab_size``

    @property
    def pad_token_id(self) -> int:
        return int(self.hf.pad_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.hf.bos_token_id is None else int(self.hf.bos_token_id)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None and backend.truncation is None:
            # The Rust tokenizer directly: parallel, and without transformers' "longer than model_max_length"
            # warnings for long documents (we truncate ourselves, keeping the first tokens, spec §1).
            return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        return [self.hf.encode(t, add_special_tokens=False) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> str:
        """sha256 over the serialised tokenizer (vocabulary, merges, normaliser, pre-tokeniser) and special ids.

        The Rust tokenizer's runtime truncation/padding settings are left out: ``transformers`` changes them
        whenever it is called with ``truncation=``/``padding=``, which must not change the fingerprint.
        """
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:
            state = json.loads(backend.to_str())
            state.pop("truncation", None)
            state.pop("padding", None)
        else:  # slow (Python) tokenizers: the vocabulary is all we can read
            state = sorted(self.hf.get_vocab().items())
        return _sha256_json({"tokenizer": state, "pad": self.pad_token_id, "eos": self.eos_token_id,
                             "bos": self.bos_token_id})

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        self.hf.save_pretrained(str(directory))

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, pad={self.pad_token_id}, "
                f"eos={self.eos_token_id})")


def _tokenizer_dir(path: Path) -> Path:
    """The directory inside ``path`` that holds the tokenizer files (``path`` itself or ``path/tokenizer``)."""
    for candidate in (path, path / "tokenizer"):
        if candidate.is_dir() and any((candidate / f).exists() for f in (REFINE_TOKENIZER_FILE, *_HF_TOKENIZER_FILES)):
            return candidate
    listing = sorted(p.name for p in path.iterdir())[:20] if path.is_dir() else []
    raise ValueError(
        f"{path} holds no tokenizer: expected {REFINE_TOKENIZER_FILE} (ours) or tokenizer_config.json / "
        f"tokenizer.json (Hugging Face) in it or in its tokenizer/ subdirectory; found {listing}. "
        "Point model.tokenizer at a tokenizer directory, or use 'byte'."
    )


def load_tokenizer(spec: str | os.PathLike[str], cache_dir: str | os.PathLike[str] = "~/.cache/refine") -> Tokenizer:
    """A tokenizer from a config string.

    Args:
        spec: ``"byte"``; a local directory (one written by :meth:`ByteTokenizer.save_pretrained`, a Hugging Face
            tokenizer directory, or a checkpoint directory with either in it or in its ``tokenizer/``
            subdirectory); an ``s3://bucket/prefix`` holding such a directory; or a hub name ``org/name``.
        cache_dir: where s3 and hub downloads are cached.

    Returns:
        A :class:`ByteTokenizer` or :class:`HFTokenizer`.
    """
    text = os.fspath(spec)
    if text == "byte":
        return ByteTokenizer()
    if storage.is_s3_uri(text) or Path(os.path.expanduser(text)).exists():
        path = storage.resolve(text, cache_dir)
        if not path.is_dir():
            raise ValueError(f"tokenizer location {text!r} is a file ({path}); point it at the directory holding it.")
        directory = _tokenizer_dir(path)
        marker = directory / REFINE_TOKENIZER_FILE
        if marker.exists():
            info = json.loads(marker.read_text())
            if info.get("type") != "byte":
                raise ValueError(f"{marker} names tokenizer type {info.get('type')!r}; this version knows 'byte'.")
            return ByteTokenizer()
        return HFTokenizer.from_pretrained(directory, local_files_only=True)
    if storage.is_hub_name(text):
        name = text[len("hf://") :] if text.startswith("hf://") else text
        return HFTokenizer.from_pretrained(name, cache_dir=cache_dir, local_files_only=False)
    raise ValueError(
        f"tokenizer {text!r} is not 'byte', an existing directory, an s3:// URI or a hub name org/name; "
        "fix model.tokenizer."
    )


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike[str],
                        eos_token: str = "<|endoftext|>", pad_token: str = "<|pad|>") -> HFTokenizer:
    """Train a byte-level BPE tokenizer and save it where ``AutoTokenizer`` loads it offline.

    Args:
        texts: the training corpus (iterated once).
        vocab_size: total vocabulary, the 256 byte symbols and the two specials included (>= 258).
        out_dir: where ``tokenizer.json`` and ``tokenizer_config.json`` are written.
        eos_token, pad_token: the special tokens (ids 0 and 1).

    Returns:
        The trained tokenizer, loaded back from ``out_dir``.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 byte symbols + 2 specials.")
    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token, pad_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rust.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=rust, eos_token=eos_token, pad_token=pad_token).save_pretrained(
        str(out_dir)
    )
    logger.info("trained a byte-level BPE tokenizer with %d tokens into %s", rust.get_vocab_size(), out_dir)
    return HFTokenizer.from_pretrained(out_dir, local_files_only=True)
