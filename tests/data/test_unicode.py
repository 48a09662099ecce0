"""Any language, any size: normalisation, <unk>, byte mode, documents, streaming, the cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, assert_user_error, call, needs_shared_data, tiny_config

from charlm.config import DataConfig
from charlm.data.corpus import load_corpus
from charlm.data.text import BOS, EOS, TextSettings, iter_file_text, units_of
from charlm.data.vocab import BOS_TOKEN, EOS_TOKEN, UNK, Vocab

TANG = SHARED_DATA / "chinese" / "tang_poems.txt"


def corpus(tmp_path, text: str | bytes, **data):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "input.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return load_corpus(DataConfig(path=str(path), **data), cache=tmp_path / "cache")


def test_astral_characters_are_one_unit(tmp_path):
    text = "𠀀𠀁 ab\n" * 50  # CJK Extension B: outside the BMP
    c = corpus(tmp_path, text)
    assert {"𠀀", "𠀁"} <= set(c.vocab.chars)
    assert c.train_ids.numel() + c.val_ids.numel() == len(text)  # one id per code point


def test_normalize_and_newlines(tmp_path):
    text = "cafe\u0301\r\nna\u00efve\r\n" * 30  # e + combining acute; CRLF line ends
    plain = corpus(tmp_path / "a", text)
    nfc = corpus(tmp_path / "b", text, normalize="NFC", newlines="lf")
    assert "\u0301" in plain.vocab.chars and "\r" in plain.vocab.chars
    assert "\u0301" not in nfc.vocab.chars and "é" in nfc.vocab.chars and "\r" not in nfc.vocab.chars
    nfkc = corpus(tmp_path / "c", "ﬁve ① " * 40, normalize="NFKC")
    assert "ﬁ" not in nfkc.vocab.chars and "1" in nfkc.vocab.chars


def test_min_freq_and_max_vocab_map_rare_characters_to_unk(tmp_path):
    text = "aaaaabbbbcccdde" * 20 + "zq"
    c = corpus(tmp_path / "a", text, min_freq=30)
    assert c.vocab.specials == (UNK,) and c.vocab.chars == ["a", "b", "c", "d"]
    unk = c.vocab.special_id(UNK)
    train_text = text[: int(len(text) * 0.9)]
    assert int((c.train_ids.long() == unk).sum()) == train_text.count("e")  # every 'e' is trained as <unk>
    assert any("trained as <unk>" in n for n in c.notices)
    top = corpus(tmp_path / "b", text, max_vocab=3)
    assert len(top.vocab) == 3 and top.vocab.chars == ["a", "b"]


def test_unk_at_eval_and_in_prompts(tmp_path, write_config, capsys):
    path = tmp_path / "t.txt"
    path.write_text("the cat sat on the mat. " * 40, encoding="utf-8")
    config = write_config(tiny_config(path, data={"min_freq": 2}))
    assert call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "run"))[0] == 0
    other = tmp_path / "other.txt"
    other.write_text("the dog sat on the log. " * 5, encoding="utf-8")
    code, out, err = call(capsys, "eval", "--checkpoint", str(tmp_path / "run"), "--text", str(other), "--json")
    result = json.loads(out)
    assert result["oov_chars"] == 5 * 4 and result["oov_rule"] == "scored as <unk>"  # d, g, g... counted
    assert result["chars"] == len("the dog sat on the log. " * 5) - 1  # nothing dropped: <unk> is scored
    code, out, err = call(
        capsys, "sample", "--checkpoint", str(tmp_path / "run"), "--prompt", "the dog", "--length", "5", "--seed", "1"
    )
    assert code == 0 and out.startswith("the dog") and "'d', 'g'" in err and "<unk>" in err


def test_byte_mode_vocabulary_and_round_trip(tmp_path):
    text = "héllo wörld 漢字 𠀀\n" * 30
    c = corpus(tmp_path, text, unit="bytes")
    assert c.vocab.unit == "bytes" and len(c.vocab) == 256 and c.val_oov_chars == 0
    ids = torch.cat([c.train_ids, c.val_ids])
    assert c.vocab.decode(ids) == text and ids.numel() == len(text.encode("utf-8"))


def test_byte_stream_decoder_waits_for_whole_characters():
    vocab = Vocab([], "bytes")
    decoder = vocab.stream_decoder()
    pieces = [decoder.feed(b) for b in "漢a".encode()]
    assert pieces == ["", "", "漢", "a"]  # the 3-byte character appears once complete
    bad = [decoder.feed(b) for b in (0xE6, 0xBC, ord("x"))]  # a cut sequence, then ASCII
    assert "".join(bad) == "\ufffdx"  # replaced, never an exception
    assert decoder.feed(0xE6) == "" and decoder.flush() == "\ufffd"


def test_byte_mode_eval_reports_bits_per_byte_and_per_char(tmp_path, write_config, capsys):
    path = tmp_path / "t.txt"
    path.write_text("über naïve café, déjà vu. " * 40, encoding="utf-8")
    config = write_config(tiny_config(path, data={"unit": "bytes"}))
    assert call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "run"))[0] == 0
    code, out, err = call(capsys, "eval", "--checkpoint", str(tmp_path / "run"), "--text", str(path), "--json")
    r = json.loads(out)
    text = path.read_text(encoding="utf-8")
    assert r["unit"] == "bytes" and r["bytes"] == len(text.encode("utf-8")) - 1 and r["chars"] == len(text) - 1
    total_bits = r["bits_per_byte"] * r["bytes"]
    assert r["bpc"] == pytest.approx(total_bits / r["chars"]) and r["bpc"] > r["bits_per_byte"]
    assert r["loss_nats"] == pytest.approx(r["bits_per_byte"] * math.log(2))
    code, out, err = call(
        capsys,
        "sample",
        "--checkpoint",
        str(tmp_path / "run"),
        "--prompt",
        "über",
        "--length",
        "60",
        "--seed",
        "2",
        "--temperature",
        "1.5",
    )
    assert code == 0 and out.startswith("über")
    out.encode("utf-8")  # printable: valid UTF-8 (partial sequences waited or were replaced)


def test_documents_mode_units():
    settings = TextSettings(documents="lines")
    assert units_of("ab\n\ncd\n", settings).tolist() == [BOS, 97, 98, EOS, BOS, 99, 100, EOS]
    assert units_of("x", settings).tolist() == [BOS, 120, EOS]


def test_documents_mode_trains_and_stops_at_the_end_marker(tmp_path, write_config, capsys):
    path = tmp_path / "poems.txt"
    path.write_text("".join(f"line {i % 7} of poem\n" for i in range(300)), encoding="utf-8")
    config = write_config(
        tiny_config(path, data={"documents": "lines"}, train={"max_steps": 60, "lr": 0.02, "eval_interval": 60})
    )
    assert call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "run"))[0] == 0
    c = load_corpus(DataConfig(path=str(path), documents="lines"))
    assert c.vocab.specials == (BOS_TOKEN, EOS_TOKEN) and "\n" not in c.vocab.chars
    code, out, err = call(
        capsys,
        "sample",
        "--checkpoint",
        str(tmp_path / "run"),
        "--prompt",
        "l",
        "--length",
        "200",
        "--stop-at-end",
        "--temperature",
        "0",
    )
    assert code == 0 and out.startswith("l") and out.count("\n") == 1  # one document, then stop
    code, out, err = call(
        capsys,
        "sample",
        "--checkpoint",
        str(tmp_path / "run"),
        "--prompt",
        "l",
        "--length",
        "60",
        "--num-samples",
        "2",
        "--stop-at-end",
        "--temperature",
        "0",
    )
    samples = [line for line in out.splitlines() if not line.startswith("==>")]
    assert len(samples) == 2 and all(s.startswith("l") for s in samples)


def test_stop_at_end_needs_documents(tmp_path, write_config, capsys, text_file):
    config = write_config(tiny_config(text_file))
    assert call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "run"))[0] == 0
    assert_user_error(
        call(capsys, "sample", "--checkpoint", str(tmp_path / "run"), "--stop-at-end"),
        "--stop-at-end needs a model trained with data.documents: lines",
    )


def test_streamed_reading_across_chunk_boundaries(tmp_path):
    path = tmp_path / "t.txt"
    text = "".join(f"漢字{i} é\n" for i in range(2000))
    path.write_text(text, encoding="utf-8")
    pieces = list(iter_file_text(path, chunk_bytes=101))  # splits multi-byte characters everywhere
    assert "".join(pieces) == text and len(pieces) > 50
    assert all(p.endswith("\n") for p in pieces)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(("é" * 500).encode() + b"\xff\n")
    with pytest.raises(Exception, match="bad byte 0xff at byte offset 1000"):
        list(iter_file_text(bad, chunk_bytes=77))


def test_cache_hit_is_memory_mapped_and_instant(tmp_path):
    text = "the quick brown fox\n" * 500
    first = corpus(tmp_path, text)
    assert not any("from the cache" in n for n in first.notices)
    again = corpus(tmp_path, text)
    assert any("from the cache" in n for n in again.notices)
    assert torch.equal(first.train_ids, again.train_ids) and first.fingerprint == again.fingerprint
    assert again.train_ids.untyped_storage().filename.endswith("ids.bin")  # mmap, not a copy
    changed = corpus(tmp_path, text + "!")
    assert changed.fingerprint != first.fingerprint  # content is part of the key
    other_settings = corpus(tmp_path, text, unit="bytes")
    assert other_settings.fingerprint != first.fingerprint


def test_thousands_of_files_and_undecodable_ones(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(2000):
        (folder / f"{i:05d}.txt").write_text(f"file {i}\n", encoding="utf-8")
    (folder / "01000-latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(Exception, match=r"01000-latin1.txt is not valid UTF-8: bad byte 0xe9 at byte offset 3"):
        load_corpus(DataConfig(path=str(folder)), cache=tmp_path / "cache")
    c = load_corpus(DataConfig(path=str(folder), on_decode_error="skip"), cache=tmp_path / "cache")
    assert any("warning: skipping" in n and "01000-latin1.txt" in n for n in c.notices)
    assert c.train_ids.numel() + c.val_ids.numel() == sum(len(f"file {i}\n") for i in range(2000))


@needs_shared_data(TANG)
def test_chinese_end_to_end(tmp_path, write_config, capsys):
    """Tang poems: 6,000 distinct characters; embeddings; a Chinese prompt; a Chinese held-out text."""
    config = write_config(
        tiny_config(
            TANG,
            data={"val_fraction": 0.02},
            model={"hidden_size": 32, "embedding_dim": 16},
            train={"max_steps": 4, "eval_interval": 4, "batch_size": 8, "seq_len": 32},
        )
    )
    code, out, err = call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "vocabulary 5" in out or "vocabulary 6" in out  # ~6,000 symbols
    code, out, err = call(
        capsys,
        "sample",
        "--checkpoint",
        str(tmp_path / "run"),
        "--prompt",
        "春眠不覺曉",
        "--length",
        "20",
        "--seed",
        "0",
    )
    assert code == 0 and out.startswith("春眠不覺曉") and len(out.strip()) == 25
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(Path(TANG).read_text(encoding="utf-8")[-3000:], encoding="utf-8")
    code, out, err = call(capsys, "eval", "--checkpoint", str(tmp_path / "run"), "--text", str(held_out), "--json")
    assert code == 0 and json.loads(out)["chars"] > 2900
