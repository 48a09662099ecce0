"""Vocabulary, text reading, train/val split and the TBPTT batch layout."""

from __future__ import annotations

import pytest
import torch
from conftest import SHAKESPEARE, needs_shared_data

from charlm.config import DataConfig
from charlm.data.batches import TBPTTBatches
from charlm.data.builtin import python_stdlib_files
from charlm.data.corpus import load_corpus
from charlm.data.sources import read_text
from charlm.data.text import DataError
from charlm.data.vocab import Vocab


def test_vocab_round_trip_with_astral_characters():
    text = "ab 𠀀c\n漢字𠀀"  # U+20000 is outside the BMP: one unit, not a surrogate pair
    vocab = Vocab.from_text(text)
    assert vocab.chars == sorted(set(text)) and "𠀀" in vocab.chars
    ids = vocab.encode(text).ids
    assert ids.numel() == len(text) and ids.dtype == torch.uint8
    assert vocab.decode(ids) == text
    assert Vocab.from_dict(vocab.to_dict()) == vocab


def test_vocab_drops_and_counts_unknown_characters():
    vocab = Vocab.from_text("abc")
    encoded = vocab.encode("abxcyy")
    assert vocab.decode(encoded.ids) == "abc" and encoded.oov_chars == 3


def test_prompts_with_unseen_characters_fail_without_unk():
    from charlm.data.text import TextSettings
    from charlm.inference.sample import prompt_ids

    with pytest.raises(Exception, match=r"2 character\(s\) the model never saw.*'x', 'y'"):
        prompt_ids(Vocab.from_text("abc"), "axy", TextSettings())


def test_read_file_folder_and_glob(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first\n", encoding="utf-8")
    (tmp_path / ".hidden").write_text("hidden", encoding="utf-8")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\x00\x00")
    assert read_text(str(tmp_path / "a.txt")) == "first\n"
    assert read_text(str(tmp_path)) == "first\nsecond"  # sorted, binary and hidden files left out
    assert read_text(str(tmp_path / "*.txt")) == "first\nsecond"


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "is empty"),
        (b"\n\n\n", "only whitespace"),
        (b"abc\x00def", "binary file"),
        (b"caf\xc3\xa9 ok, then bad \xff here", r"not valid UTF-8: bad byte 0xff at byte offset 19"),
    ],
)
def test_bad_text_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_text(str(path))


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match="data path not found"):
        read_text(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="no files match"):
        read_text(str(tmp_path / "*.nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        read_text(str(tmp_path / "empty"))


def corpus_of(path, cache, **data):
    return load_corpus(DataConfig(path=str(path), **data), cache=cache)


def test_split_is_a_contiguous_tail(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 10, encoding="utf-8")
    corpus = corpus_of(path, tmp_path / "cache", val_fraction=0.1)
    assert corpus.vocab.decode(corpus.train_ids) == ("abcdefghij" * 10)[:90]
    assert corpus.vocab.decode(corpus.val_ids) == "abcdefghij"


def test_corpus_vocab_comes_from_training_text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("aaaabbbbcc" * 9 + "abxyzabcab", encoding="utf-8")
    corpus = corpus_of(path, tmp_path / "cache")
    assert corpus.vocab.chars == ["a", "b", "c"]
    assert corpus.val_oov_chars == 3 and corpus.val_ids.numel() == 7


def test_validation_needs_known_characters(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("aaaabbbbcc" * 9 + "xyzxyzxyzx", encoding="utf-8")
    with pytest.raises(DataError, match="validation text has 0 character"):
        corpus_of(path, tmp_path / "cache")


def test_tbptt_windows_continue_each_stream():
    ids = torch.arange(0, 101, dtype=torch.int32)
    batches = TBPTTBatches(ids, batch_size=4, seq_len=10)  # L = 25 inputs per stream
    assert batches.windows_per_epoch == 3  # 10 + 10 + 5
    x0, y0 = batches.window(0)
    x1, y1 = batches.window(1)
    x2, _ = batches.window(2)
    assert x0.shape == (4, 10) and x2.shape == (4, 5) and x0.dtype == torch.int64
    torch.testing.assert_close(y0, x0 + 1)
    assert torch.equal(x1[:, 0], x0[:, -1] + 1)  # window k+1 starts where window k ended
    assert torch.equal(x0[:, 0], torch.tensor([0, 25, 50, 75]))
    seen = torch.cat([batches.window(k)[0] for k in range(3)], dim=1).flatten()
    assert torch.equal(seen.sort().values, torch.arange(100))  # one epoch = every position once


def test_random_offsets_shift_each_epoch_within_a_window():
    ids = torch.arange(0, 101, dtype=torch.int32)
    batches = TBPTTBatches(ids, batch_size=4, seq_len=10, random_offsets=True, seed=5)
    assert batches.length == (100 - 9) // 4 == 22 and batches.windows_per_epoch == 3
    offsets = [batches.offset(e) for e in range(40)]
    assert offsets[0] == 0 and all(0 <= s < 10 for s in offsets)
    assert len(set(offsets)) > 3  # they do move
    assert offsets == [TBPTTBatches(ids, 4, 10, True, seed=5).offset(e) for e in range(40)]  # from seed and epoch alone
    assert offsets != [TBPTTBatches(ids, 4, 10, True, seed=6).offset(e) for e in range(40)]
    for epoch in range(40):
        s = offsets[epoch]
        windows = [batches.window(k, epoch=epoch) for k in range(3)]
        x = torch.cat([w[0] for w in windows], dim=1)  # [4, 22]
        y = torch.cat([w[1] for w in windows], dim=1)
        torch.testing.assert_close(y, x + 1)
        # stream b is ids[s + 22b : s + 22(b+1)], read window after window
        torch.testing.assert_close(x, torch.arange(s, s + 88).view(4, 22))
    assert int(batches.window(2, epoch=offsets.index(9))[1].max()) <= 100  # the largest shift still fits


def test_random_offsets_off_is_the_plain_layout():
    ids = torch.arange(0, 101, dtype=torch.int32)
    plain, off = TBPTTBatches(ids, 4, 10), TBPTTBatches(ids, 4, 10, random_offsets=False, seed=3)
    for epoch in (0, 1, 7):
        assert off.offset(epoch) == 0
        for k in range(3):
            assert torch.equal(off.window(k, epoch=epoch)[0], plain.window(k)[0])


def test_tbptt_needs_one_window():
    with pytest.raises(DataError, match=r"batch_size x train.seq_len \+ 1 = 41"):
        TBPTTBatches(torch.arange(40), batch_size=4, seq_len=10)
    with pytest.raises(DataError, match=r"\+ 9 for train.random_offsets"):
        TBPTTBatches(torch.arange(41), batch_size=4, seq_len=10, random_offsets=True)
    TBPTTBatches(torch.arange(50), batch_size=4, seq_len=10, random_offsets=True)


def test_builtin_stdlib_corpus():
    files = python_stdlib_files()
    assert len(files) > 300
    assert not any(part in ("site-packages", "test", "tests") for f in files for part in f.parts[-4:-1])
    assert sum(f.stat().st_size for f in files) > 5_000_000


@needs_shared_data(SHAKESPEARE)
def test_tiny_shakespeare_split_and_vocabulary(tmp_path):
    corpus = corpus_of(SHAKESPEARE, tmp_path / "cache")
    assert len(corpus.vocab) == 65
    assert corpus.train_ids.numel() == 1_003_854 and corpus.val_ids.numel() == 111_540  # 90/10, contiguous
    assert corpus.val_oov_chars == 0
