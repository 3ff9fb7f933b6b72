"""Token streams for the command line: a real BPE tokenizer (trained here with ``tokenizers``), byte-level
text, ``.npy`` ids, and every input error naming its file."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from calib.data import fingerprint, load_tokens, token_batches

TEXT = "the quick brown fox jumps over the lazy dog. " * 50 + "a stitch in time saves nine. " * 50


def _bpe(tmp_path, vocab_size=60):
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return tok, path


def test_tokenizer_ids_equal_the_library_encoding_of_each_file(tmp_path):
    tok, path = _bpe(tmp_path)
    d = tmp_path / "texts"
    d.mkdir()
    (d / "b.txt").write_text(TEXT[500:900])
    (d / "a.txt").write_text(TEXT[:500])
    ids = load_tokens(d, vocab_size=tok.get_vocab_size(), tokenizer=path)
    want = tok.encode(TEXT[:500], add_special_tokens=False).ids + tok.encode(TEXT[500:900]).ids
    assert ids.dtype == torch.long and ids.tolist() == want  # sorted file order, exact ids
    assert len(want) < 900  # really sub-word tokens, not bytes
    assert load_tokens(d, 10_000, max_tokens=7, tokenizer=path).tolist() == want[:7]


def test_tokenizer_ids_beyond_the_model_vocabulary_fail_naming_the_tokenizer(tmp_path):
    tok, path = _bpe(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 20\).*tokenizer .*vocabulary 60"):
        load_tokens(text, vocab_size=20, tokenizer=path)


def test_tokenizer_errors(tmp_path):
    _, path = _bpe(tmp_path)
    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(10))
    with pytest.raises(ValueError, match="applies to text data only"):
        load_tokens(ids, 256, tokenizer=path)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok \xff\xfe")
    with pytest.raises(ValueError, match="bin.txt: not UTF-8"):
        load_tokens(binary, 256, tokenizer=path)
    with pytest.raises(FileNotFoundError, match="tokenizer .*missing.json does not exist"):
        load_tokens(binary, 256, tokenizer=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json cannot be read"):
        load_tokens(binary, 256, tokenizer=bad)


def test_byte_level_npy_and_builtin_streams(tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes("héllo".encode())
    assert load_tokens(text, 256).tolist() == list("héllo".encode())
    arr = tmp_path / "ids.npy"
    np.save(arr, np.array([[3, 1], [4, 1]], dtype=np.int32))
    assert load_tokens(arr, 5).tolist() == [3, 1, 4, 1]
    builtin = load_tokens("builtin", 256, max_tokens=1000)
    assert builtin.numel() == 1000 and int(builtin.max()) < 256
    assert fingerprint(builtin) == fingerprint(builtin.clone()) != fingerprint(builtin[:-1])


def test_token_batches_are_consecutive_shifted_windows():
    ids = torch.arange(100)
    batches = token_batches(ids, seq_len=4, batch=3)
    assert len(batches) == 100 // 15
    b = batches[1]
    assert b["tokens"][0].tolist() == [15, 16, 17, 18] and b["labels"][0].tolist() == [16, 17, 18, 19]
    assert b["tokens"][2].tolist() == [25, 26, 27, 28]
    with pytest.raises(ValueError, match="fewer than one batch"):
        token_batches(ids[:10], seq_len=4, batch=3)
