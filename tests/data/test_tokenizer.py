"""Tokenizers: the byte tokenizer, a locally trained BPE through AutoTokenizer, load_tokenizer dispatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refine_core import tokenizer as tokenizer_lib
from refine_core.data.sources import synthetic_documents
from refine_core.tokenizer import (
    REFINE_TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer((d.text for d in synthetic_documents(32, 300)), vocab_size=400, out_dir=out)
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_byte_round_trip_and_specials() -> None:
    tok = ByteTokenizer()
    text = "Héllo, wörld! 🙂\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # raw bytes, no BOS/EOS added (spec §1)
    assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (259, 256, 257, 258)
    assert tok.decode([*ids, 257, 256]) == text
    assert tok.decode([104, 105, 257], skip_special_tokens=False) == "hi<eos>"
    assert tok.encode_batch(["a", "bc"]) == [[97], [98, 99]]
    assert isinstance(tok, Tokenizer)


def test_byte_decode_replaces_invalid_utf8_and_rejects_unknown_ids() -> None:
    tok = ByteTokenizer()
    cut = tok.encode("é")[:1]  # a character cut in half by truncation
    assert tok.decode([104, *cut]) == "h\ufffd"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([300])


def test_byte_save_and_load(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    tok.save_pretrained(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / REFINE_TOKENIZER_FILE).read_text())["type"] == "byte"
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert isinstance(loaded, ByteTokenizer)
    assert loaded.fingerprint() == tok.fingerprint() == ByteTokenizer().fingerprint()
    assert load_tokenizer("byte").fingerprint() == tok.fingerprint()


def test_trained_bpe_loads_offline_through_autotokenizer(bpe_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(bpe_dir), local_files_only=True)
    tok = load_tokenizer(str(bpe_dir))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.vocab_size == len(hf) == 400
    assert tok.eos_token_id == hf.convert_tokens_to_ids("<|endoftext|>")
    assert tok.pad_token_id == hf.convert_tokens_to_ids("<|pad|>")
    assert tok.bos_token_id is None
    text = "The old river crossed the bridge. Ünïcode too!"
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.eos_token_id not in ids and tok.pad_token_id not in ids
    assert len(ids) < len(text)  # merges were learned
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_hf_fingerprint_is_stable_and_identifies_the_vocabulary(bpe_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(str(bpe_dir))
    fp = tok.fingerprint()
    assert len(fp) == 64
    tok.hf("some text", truncation=True, max_length=2)  # changes the Rust tokenizer's runtime state
    assert tok.fingerprint() == fp
    tok.save_pretrained(tmp_path / "copy")
    assert load_tokenizer(str(tmp_path / "copy")).fingerprint() == fp
    other = train_bpe_tokenizer(["completely different words here"] * 20, vocab_size=300, out_dir=tmp_path / "o")
    assert other.fingerprint() != fp
    assert fp != ByteTokenizer().fingerprint()


def test_pad_defaults_to_eos_and_survives_save(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.train_from_iterator(["a b c d"] * 10, trainers.BpeTrainer(vocab_size=270, special_tokens=["</s>"],
                                                                   show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=rust, eos_token="</s>").save_pretrained(tmp_path / "nopad")
    tok = load_tokenizer(str(tmp_path / "nopad"))
    assert tok.pad_token_id == tok.eos_token_id  # spec §1
    tok.save_pretrained(tmp_path / "again")
    again = load_tokenizer(str(tmp_path / "again"))
    assert again.pad_token_id == again.eos_token_id
    assert again.fingerprint() == tok.fingerprint()


def test_checkpoint_dir_with_tokenizer_subdir(bpe_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt / "tokenizer").mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"")
    load_tokenizer(str(bpe_dir)).save_pretrained(ckpt / "tokenizer")
    assert load_tokenizer(str(ckpt)).fingerprint() == load_tokenizer(str(bpe_dir)).fingerprint()


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="model.tokenizer"):
        load_tokenizer("no/such/local/dir")
    with pytest.raises(ValueError, match="at least|too small"):
        train_bpe_tokenizer(["x"], vocab_size=100, out_dir=tmp_path / "small")


def test_hub_name_failure_explains_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    seen = {}

    def fake_from_pretrained(name: str, **kwargs: object) -> None:
        seen.update(kwargs, name=name)
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        load_tokenizer("fla-hub/delta_net-1.3B-100B", cache_dir="/tmp/refine-cache")
    assert seen["name"] == "fla-hub/delta_net-1.3B-100B"
    assert seen["local_files_only"] is False
    assert str(seen["cache_dir"]).startswith("/tmp/refine-cache")


def test_load_tokenizer_from_s3(tmp_path: Path, s3) -> None:
    from refine_core.storage import upload_dir

    ByteTokenizer().save_pretrained(tmp_path / "tok")
    upload_dir(tmp_path / "tok", "s3://bkt/tiny/tokenizer")
    tok = load_tokenizer("s3://bkt/tiny", cache_dir=tmp_path / "cache")  # finds the tokenizer/ subdir
    assert isinstance(tok, ByteTokenizer)


def test_protocol_lists_the_interface() -> None:
    for name in ("encode", "encode_batch", "decode", "fingerprint", "save_pretrained", "vocab_size",
                 "pad_token_id", "eos_token_id", "bos_token_id"):
        assert hasattr(tokenizer_lib.Tokenizer, name)
