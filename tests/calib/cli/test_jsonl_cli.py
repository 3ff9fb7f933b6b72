"""JSON Lines data through the command line: ``svdq eval`` on prompt / response pairs counts only the
response tokens; a Hugging Face tokenizer directory (built here, offline) feeds ``--tokenizer DIR``; a
malformed line exits 2 naming the file and line before the model is built."""

import json

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from calib.data import JsonlFields, load_stream, token_batches
from tests.helpers.cli import run_cli_cases

WORDS = "the quick brown fox jumps over the lazy dog a stitch in time saves nine".split()


def test_eval_on_pairs_counts_response_tokens_and_tokenizer_dirs_work(tmp_path):
    recs = [
        {"q": " ".join(WORDS[i % 7 : i % 7 + 4]), "a": " ".join(WORDS[i % 5 : i % 5 + 6])} for i in range(300)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    tok_dir = tmp_path / "tok"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(tok_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "a", "a": "b"}\n{"q": "a", "a": \n')
    pair = ["--prompt-field", "q", "--response-field", "a"]
    common = ["eval", "--model", "tiny", "--batch", "2"]
    results = run_cli_cases(
        [
            [*common, "--data", data, *pair, "--json", tmp_path / "bytes.json"],
            [*common, "--data", data, *pair, "--tokenizer", tok_dir, "--json", tmp_path / "tok.json"],
            [*common, "--data", bad, *pair],
        ]
    )
    assert [c for c, _, _ in results] == [0, 0, 2], [e[-1500:] for _, _, e in results]
    assert f"{bad} line 2: not valid JSON" in results[2][2].strip().splitlines()[-1]
    fields = JsonlFields(prompt="q", response="a")
    for name, tokenizer in (("bytes", None), ("tok", tok_dir)):
        ids, mask = load_stream(data, 256, tokenizer=tokenizer, fields=fields)
        batches = token_batches(ids, 32, 2, mask=mask)  # the tiny model's sequence length
        want = sum(int(b["loss_mask"].sum()) for b in batches)
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        assert doc["tokens"] == want and 0 < want < sum(b["labels"].numel() for b in batches), name
        assert doc["loss"] > 0
