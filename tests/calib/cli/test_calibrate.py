"""``svdq calibrate``: real runs on the built-in model, a factory model and tokenized text; every input
error exits 2 before any output."""

import json

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lora.io.svdq_export import read_export_metadata
from tests.helpers.cli import no_temporaries, run_cli_cases, svdq


def test_calibrate_builtin_model_and_corpus(tmp_path):
    proc = svdq("calibrate", "--out", tmp_path / "out", "--tokens", "4096", "--rank", "8")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["rows"]) == 8
    assert all(r["final_error"] < r["rtn_error"] for r in report["rows"])
    assert "mean relative output error" in proc.stdout
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    user = read_export_metadata(tmp_path / "out" / "model")["user"]
    assert user["model"]["spec"] == "tiny" and user["model"]["config"]["hidden"] == 64
    assert user["calibration"]["tokens"] == 4096 and user["calibration"]["svdq"]["rank"] == 8
    assert not no_temporaries(tmp_path)


def test_calibrate_factory_model_on_a_text_file_and_a_tokenized_corpus(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text.read_text()], trainers.BpeTrainer(vocab_size=40, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"vocab_size": 48, "num_layers": 1}))
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"vocab_size": 20, "num_layers": 1}))
    tokenized = ["--data", text, "--tokenizer", tmp_path / "tokenizer.json", "--model", "tiny"]
    cases = [
        [
            "calibrate",
            "--out",
            tmp_path / "o",
            "--model",
            "tests.helpers.factories:make_byte_mlp",
            "--data",
            text,
        ]
        + ["--rank", "8", "--tokens", "8192"],
        ["calibrate", "--out", tmp_path / "t", *tokenized, "--model-config", small, "--rank", "4"]
        + ["--mode", "layerwise", "--act-range", "dynamic"],
        [
            "eval",
            "--checkpoint",
            tmp_path / "t" / "model",
            "--data",
            text,
            "--tokenizer",
            tmp_path / "tokenizer.json",
        ],
        ["calibrate", "--out", tmp_path / "bad", *tokenized, "--model-config", tiny],
    ]
    results = run_cli_cases(cases)
    for argv, (code, _, err) in zip(cases[:3], results):
        assert code == 0, (argv, err[-3000:])
    rows = json.loads((tmp_path / "o" / "report.json").read_text())["rows"]
    assert [r["layer"] for r in rows] == ["up", "down"]  # lm_head excluded by default
    calibration = read_export_metadata(tmp_path / "t" / "model")["user"]["calibration"]
    assert calibration["mode"] == "layerwise" and calibration["act_range"] == "dynamic"
    t_report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert t_report["mode"] == "layerwise" and t_report["act_range"] == "dynamic"
    assert read_export_metadata(tmp_path / "t" / "model")["user"]["calibration"]["tokenizer"].endswith(
        ".json"
    )
    assert "perplexity" in results[2][1]
    assert results[3][0] == 2 and "token ids must lie in [0, 20)" in results[3][2]
    assert "vocabulary 40" in results[3][2] and not (tmp_path / "bad").exists()


def test_calibrate_input_errors_exit_2_before_any_output(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    big = tmp_path / "ids.npy"
    np.save(big, np.array([1, 2, 300], dtype=np.int64))
    floats = tmp_path / "f.npy"
    np.save(floats, np.array([1.5, 2.0]))
    unknown = tmp_path / "cfg.json"
    unknown.write_text(json.dumps({"layers": 3}))
    taken = tmp_path / "taken"
    (taken / "model").mkdir(parents=True)
    cases = [
        (("--data", tmp_path / "missing.txt"), "does not exist"),
        (("--data", empty), "holds no tokens"),
        (("--data", big), "token ids must lie in [0, 256)"),
        (("--data", floats), "must be integers"),
        (("--model", "tests.helpers.factories:not_a_module"), "not an nn.Module"),
        (("--model", "nonsense"), "module:function"),
        (("--model-config", unknown), "unknown TinyMoEConfig fields: ['layers']"),
        (("--model", f"megatron:{tmp_path}/nowhere"), "nowhere does not exist"),
        (("--tokenizer", tmp_path / "none.json"), "tokenizer"),
    ]
    argvs = [["calibrate", "--out", tmp_path / f"out{i}", *args] for i, (args, _) in enumerate(cases)]
    argvs.append(["calibrate", "--out", taken])
    results = run_cli_cases(argvs)
    for i, ((args, message), (code, _, err)) in enumerate(zip(cases, results)):
        assert code == 2, (args, err[-2000:])
        assert message in err and err.strip().splitlines()[-1].startswith("svdq calibrate: error: "), err
        assert not (tmp_path / f"out{i}").exists()
    assert results[-1][0] == 2 and "model exists" in results[-1][2] and not any((taken / "model").iterdir())
