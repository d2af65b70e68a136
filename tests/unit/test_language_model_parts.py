"""The pure parts behind real language models: the Hugging Face tokenizer
adapter (on a real SentencePiece-style and a real byte-level BPE tokenizer,
built here with `tokenizers`), chat templates, model archives, and the
builder's config adapter."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from terrace_runtime.genai_builder import flatten_rope
from terrace_runtime.hf_tokenizer import ChatTemplateError, HFTokenizer, TokenizerError
from terrace_runtime.uris import ModelURIError, unpack
from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def _sentencepiece_like(folder: Path, *, template: str | None = None) -> Path:
    """Gemma/Llama style: ▁ marks a space, <0xNN> pieces are byte fallback."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for piece in ["▁Paris", "▁The", "▁capital", "▁is", ".", "é", "<0x0A>", "<0xC3>", "<0xA9>"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "add_bos_token": True}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    return folder


def _byte_level(folder: Path) -> Path:
    """GPT-2 style byte-level BPE: 'Ġ' is a space byte, 'Ã' + '©' are é's bytes."""
    vocab = {"<|endoftext|>": 0, "Hello": 1, "Ġworld": 2, "Ã": 3, "©": 4, "!": 5}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder


def test_sentencepiece_pieces_map_to_bytes(tmp_path):
    tok = HFTokenizer(_sentencepiece_like(tmp_path))
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert tok.token_bytes(vocab["▁Paris"]) == b" Paris"
    assert tok.token_bytes(vocab["<0x0A>"]) == b"\n"
    # A multi-byte character split into byte pieces: bytes each, shown as bytes:.
    assert tok.token_bytes(vocab["<0xC3>"]) + tok.token_bytes(vocab["<0xA9>"]) == "é".encode()
    assert tok.token_text(vocab["<0xC3>"]) == "bytes:\\xc3"
    # Special tokens have no bytes (never shown as text) but a name.
    assert tok.token_bytes(1) == b"" and tok.token_text(1) == "<eos>"
    assert tok.eos_ids == frozenset({1, 3}) and tok.bos_id == 2
    assert tok.never_sampled == (2,)


def test_bos_is_added_once(tmp_path):
    tok = HFTokenizer(_sentencepiece_like(tmp_path))
    ids = tok.encode("▁Paris")
    assert ids[0] == 2 and ids.count(2) == 1
    assert tok.encode("<bos>▁Paris").count(2) == 1  # a template that writes bos_token itself
    assert tok.encode("▁Paris", add_bos=False)[0] != 2


def test_byte_level_bpe_pieces_map_to_bytes(tmp_path):
    tok = HFTokenizer(_byte_level(tmp_path))
    assert tok.token_bytes(2) == b" world"
    assert tok.token_bytes(3) + tok.token_bytes(4) == "é".encode()
    assert tok.eos_ids == frozenset({0}) and tok.bos_id is None and tok.never_sampled == ()


def test_chat_template_renders_and_errors_are_clear(tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tok = HFTokenizer(_sentencepiece_like(tmp_path, template=template))
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "<bos><user>hi<assistant>"
    failing = "{{ raise_exception('only user and assistant roles') }}"
    bad = HFTokenizer(_sentencepiece_like(tmp_path, template=failing))
    with pytest.raises(ChatTemplateError, match="only user and assistant"):
        bad.render_chat([{"role": "system", "content": "x"}])


def test_base_model_without_template_and_the_packaged_qa_template(tmp_path):
    folder = _sentencepiece_like(tmp_path)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        HFTokenizer(folder).render_chat([{"role": "user", "content": "hi"}])
    qa = HFTokenizer(folder, chat_template="qa")
    text = qa.render_chat(
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of Italy?"},
            {"role": "assistant", "content": "Rome."},
            {"role": "user", "content": "What is the capital of France?"},
        ]
    )
    assert text == (
        "<bos>Answer briefly.\n\nQ: What is the capital of Italy?\nA: Rome.\n"
        "Q: What is the capital of France?\nA:"
    )
    with pytest.raises(TokenizerError, match="chat template 'nope.jinja'"):
        HFTokenizer(folder, chat_template="nope.jinja")


def test_missing_or_broken_tokenizer_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        HFTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizers cannot read"):
        HFTokenizer(tmp_path)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_archives_unpack_once_to_the_model_folder(tmp_path):
    archive = _tar(tmp_path / "gemma.tar.gz", {"gemma/config.json": b"{}", "gemma/a.bin": b"x"})
    folder = unpack(archive)
    assert folder.name == "gemma" and (folder / "config.json").read_bytes() == b"{}"
    (folder / "marker").write_text("kept")
    assert (unpack(archive) / "marker").exists()  # not unpacked twice
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(flat, "w") as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("tokenizer.json", "{}")
    assert sorted(p.name for p in unpack(flat).iterdir()) == ["config.json", "tokenizer.json"]


def test_archives_that_escape_their_folder_are_refused(tmp_path):
    with pytest.raises(ModelURIError, match="cannot unpack"):
        unpack(_tar(tmp_path / "evil.tar", {"../outside.txt": b"x"}))
    assert not (tmp_path / "outside.txt").exists()
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../outside.txt", "x")
    with pytest.raises(ModelURIError, match="unsafe member"):
        unpack(evil)


def test_builder_sees_flat_rope_settings():
    class Config:
        rope_parameters = {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        }

    config = flatten_rope(Config())
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert config.rope_local_base_freq == 1e4 and config.rope_theta == 1e6

    class Flat:
        rope_parameters = {"rope_type": "yarn", "factor": 4.0}

    assert flatten_rope(Flat()).rope_parameters == {"rope_type": "yarn", "factor": 4.0}


def test_convert_names_what_a_folder_lacks(tmp_path):
    from terrace_runtime.convert import ConversionError, convert

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConversionError, match="not a Hugging Face model folder"):
        convert(empty, "onnx-int4", tmp_path / "out")
    (empty / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="no tokenizer.json"):
        convert(empty, "torch", tmp_path / "out")
    with pytest.raises(ConversionError, match="no such file or folder"):
        convert(tmp_path / "missing", "torch", tmp_path / "out")
    assert not (tmp_path / "out").exists()
