"""Training schedule, data order, config validation and size parsing of ``svdq finetune`` / ``export``."""

import math

import pytest

from calib.cli.common import parse_size
from calib.train import TrainConfig, batch_index, checkpoint_name, complete_checkpoints, lr_at


def _reference_lr(k, steps, lr, warmup, m):
    """float64 reference: linear warmup to lr, then cosine from lr to m·lr over the remaining steps."""
    if k < warmup:
        return lr * (k + 1) / warmup
    t = (k - warmup) / max(1, steps - warmup)
    return lr * m + lr * (1 - m) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("steps,warmup,m", [(100, 10, 0.1), (10, 0, 0.0), (7, 7, 0.5), (5, 10, 0.1)])
def test_warmup_cosine_schedule_matches_the_float64_reference(steps, warmup, m):
    cfg = TrainConfig(steps=steps, lr=3e-3, warmup=warmup, min_lr_ratio=m)
    lrs = [lr_at(k, cfg) for k in range(steps)]
    for k, got in enumerate(lrs):
        assert got == pytest.approx(_reference_lr(k, steps, 3e-3, warmup, m), rel=1e-12, abs=0)
    w = min(warmup, steps)
    assert all(a < b for a, b in zip(lrs[:w], lrs[1:w]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[w:], lrs[w + 1 :]))  # then decays
    if warmup:
        assert lrs[0] == pytest.approx(3e-3 / warmup)
    if steps > warmup + 1:
        assert lrs[warmup] == pytest.approx(3e-3)
        assert lr_at(steps, cfg) == pytest.approx(3e-3 * m)  # the cosine ends at min_lr_ratio · lr


def test_batch_order_is_a_fresh_permutation_every_epoch():
    n = 7
    epochs = [[batch_index(e * n + i, n, seed=3) for i in range(n)] for e in range(3)]
    assert all(sorted(order) == list(range(n)) for order in epochs)
    assert epochs[0] != epochs[1]
    assert [batch_index(k, n, seed=3) for k in range(21)] == sum(epochs, [])  # a function of the step
    assert [batch_index(k, n, seed=4) for k in range(n)] != epochs[0]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(steps=0), "--steps"),
        (dict(steps=5, lr=0), "--lr"),
        (dict(steps=5, warmup=-1), "--warmup"),
        (dict(steps=5, min_lr_ratio=1.5), "--min-lr-ratio"),
        (dict(steps=5, grad_clip=-1), "--grad-clip"),
        (dict(steps=5, batch=0), "--batch"),
        (dict(steps=5, dropout=1.0), "--dropout"),
    ],
)
def test_train_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("4096") == 4096
    for bad in ("lots", "2XB", "-1GB", "0"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_only_complete_checkpoint_directories_count(tmp_path):
    for step in (5, 10, 15):
        (tmp_path / checkpoint_name(step)).mkdir()
        if step != 15:
            (tmp_path / checkpoint_name(step) / "state.json").write_text("{}")
    (tmp_path / ".step-000020.tmp123").mkdir()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000005", "step-000010"]
    assert complete_checkpoints(tmp_path / "missing") == []


def test_resume_check_reads_checkpoints_from_before_a_config_field_existed(tmp_path):
    """A checkpoint whose stored config lacks a later field (``dropout``) counts as that field's default."""
    import json

    from calib.train import check_resumable

    old = TrainConfig(steps=5).to_dict()
    del old["dropout"], old["version"]  # nor had it a schema version
    (tmp_path / "state.json").write_text(json.dumps({"config": old}))
    check_resumable(tmp_path, TrainConfig(steps=5))
    with pytest.raises(ValueError, match="dropout"):
        check_resumable(tmp_path, TrainConfig(steps=5, dropout=0.1))


def test_train_config_dict_round_trip_and_unknown_fields():
    cfg = TrainConfig(steps=7, lr=2e-3, dropout=0.1)
    d = cfg.to_dict()
    assert d["version"] == TrainConfig.VERSION and TrainConfig.from_dict(d) == cfg
    assert cfg.replace(steps=9) == TrainConfig(steps=9, lr=2e-3, dropout=0.1)
    with pytest.raises(ValueError, match=r"^TrainConfig: unknown field\(s\) \['stpes'\]"):
        TrainConfig.from_dict({"steps": 3, "stpes": 4})
