"""JSON Lines data, Hugging Face tokenizer directories and prompt / response loss masks (calib.data): a real
tokenizer trained here with ``tokenizers`` and saved with ``PreTrainedTokenizerFast.save_pretrained`` (no
download), real files."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from calib.data import JsonlFields, file_kind, load_stream, load_tokens, masked_mean, token_batches

TEXT = "the quick brown fox jumps over the lazy dog . a stitch in time saves nine . " * 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A WordLevel tokenizer directory (tokenizer.json + tokenizer_config.json, eos token ``</s>``)."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return path, tok


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_text_field_with_a_tokenizer_directory_equals_the_library_encoding(tok_dir, tmp_path):
    d, tok = tok_dir
    records = [{"text": "the quick brown fox", "id": 1}, {"text": "a stitch in time", "id": 2}]
    data = _jsonl(tmp_path / "d.jsonl", records)
    ids = load_tokens(data, vocab_size=100, tokenizer=d)
    eos = tok.token_to_id("</s>")
    want = [*tok.encode("the quick brown fox").ids, eos, *tok.encode("a stitch in time").ids, eos]
    assert ids.tolist() == want and len(want) == 10  # words, not bytes; eos after each record


def test_jsonl_is_detected_by_content_and_other_field_names_work(tmp_path):
    data = _jsonl(tmp_path / "records.txt", [{"body": "hé"}, {"body": "ab"}])
    assert file_kind(data) == "jsonl"
    ids = load_tokens(data, 256, fields=JsonlFields(text="body"))  # byte-level without a tokenizer
    assert ids.tolist() == list("hé".encode()) + list(b"ab")
    (tmp_path / "plain.txt").write_text("{ not json\n")
    assert file_kind(tmp_path / "plain.txt") == "text"


def test_prompt_response_mask_marks_only_response_tokens(tok_dir, tmp_path):
    d, tok = tok_dir
    recs = [{"q": "the quick", "a": "brown fox jumps"}, {"q": "a stitch", "a": "in time"}]
    data = _jsonl(tmp_path / "pairs.jsonl", recs)
    ids, mask = load_stream(data, 100, tokenizer=d, fields=JsonlFields(prompt="q", response="a"))
    eos = tok.token_to_id("</s>")
    want_ids, want_mask = [], []
    for r in recs:
        p, a = tok.encode(r["q"]).ids, tok.encode(r["a"]).ids
        want_ids += [*p, *a, eos]
        want_mask += [False] * len(p) + [True] * (len(a) + 1)
    assert ids.tolist() == want_ids and mask.tolist() == want_mask
    # batches carry the mask of each label (shifted by one, like the labels)
    (b,) = token_batches(ids, seq_len=len(ids) - 1, batch=1, mask=mask)
    assert b["loss_mask"].tolist() == [want_mask[1:]]
    assert b["labels"].tolist() == [want_ids[1:]]


def test_masked_mean_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(3, 7, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.5
    ref = sum(float(losses[i, j]) for i in range(3) for j in range(7) if mask[i, j]) / int(mask.sum())
    assert abs(float(masked_mean(losses, mask)) - ref) < 1e-6
    assert float(masked_mean(losses, None)) == pytest.approx(float(losses.double().mean()), abs=1e-6)


@pytest.mark.parametrize(
    "lines, needle",
    [
        (['{"text": "ok"}', '{"text": "broken"'], "line 2: not valid JSON"),
        (['{"text": "ok"}', "", "[1, 2]"], "line 3: a JSON object is expected"),
        (['{"text": "ok"}', '{"txt": "x"}'], "line 2: no field 'text'"),
        (['{"text": 5}'], "line 1: field 'text' must be a string"),
    ],
)
def test_malformed_jsonl_fails_naming_file_and_line(tmp_path, lines, needle):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=needle) as info:
        load_tokens(data, 256)
    assert str(data) in str(info.value)


def test_half_a_pair_and_pairs_on_plain_text_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--prompt-field and --response-field go together"):
        JsonlFields(prompt="q")
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(ValueError, match="need JSON Lines data"):
        load_stream(tmp_path / "t.txt", 256, fields=JsonlFields(prompt="q", response="a"))


def test_tokenizer_directory_asking_for_remote_code_is_refused(tok_dir, tmp_path):
    d, _ = tok_dir
    bad = tmp_path / "remote"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tok.MyTokenizer", None]}
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "t.txt").write_text("the fox")
    with pytest.raises(ValueError, match=r"asks for its own code \(auto_map"):
        load_tokens(tmp_path / "t.txt", 100, tokenizer=bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="cannot be read offline"):
        load_tokens(tmp_path / "t.txt", 100, tokenizer=empty)
