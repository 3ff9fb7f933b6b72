"""Python API errors that name the culprit (issue 19, class 7): config fields checked against their
annotations in ``__post_init__``, numerics errors carrying the module name, float64 refused up front."""

import math

import pytest
import torch
from torch import nn

import svdq
from svdq import SVDQConfig


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"rank": "16"}, "SVDQConfig.rank must be int, got '16' (str)"),
        ({"rank": 2.5}, "SVDQConfig.rank must be int, got 2.5"),
        ({"rank": True}, "SVDQConfig.rank must be int"),
        ({"damp": math.nan}, "SVDQConfig.damp must be float (finite), got nan"),
        ({"refine_tol": math.inf}, "SVDQConfig.refine_tol must be float (finite)"),
        ({"alphas": (0.1, "x")}, "SVDQConfig.alphas must be tuple[float, ...]"),
        ({"whiten": 1}, "SVDQConfig.whiten must be bool"),
        ({"weight_format": 4}, "SVDQConfig.weight_format must be str"),
    ],
)
def test_svdq_config_names_the_field_and_type(fields, needle):
    with pytest.raises(ValueError) as info:
        SVDQConfig(**fields)
    assert needle in str(info.value)


def test_other_configs_get_the_same_checks():
    from calib.calibrate import CalibConfig
    from calib.train import TrainConfig
    from lora.config import LoraConfig

    cases = [
        (lambda: LoraConfig(rank="8"), "LoraConfig.rank must be int"),
        (lambda: LoraConfig(alpha=math.nan), "LoraConfig.alpha must be float | None"),
        (lambda: LoraConfig(rank_pattern={"*": 2.0}), "LoraConfig.rank_pattern must be dict[str, int]"),
        (lambda: CalibConfig(storage=3), "CalibConfig.storage must be str"),
        (lambda: CalibConfig(svdq={"rank": 4}), "CalibConfig.svdq must be SVDQConfig"),
        (lambda: TrainConfig(steps=3, lr=math.inf), "TrainConfig.lr must be float (finite)"),
        (lambda: TrainConfig(steps="3"), "TrainConfig.steps must be int"),
    ]
    for make, needle in cases:
        with pytest.raises(ValueError) as info:
            make()
        assert needle in str(info.value)
    # valid values of the annotated types still pass: ints for floats, lists normalized to tuples
    assert SVDQConfig(damp=0, alphas=[0.5]).alphas == (0.5,)
    assert LoraConfig(alpha=16, targets=["*"]).targets == ("*",)


def test_tiny_moe_config_checks_types_and_values():
    from calib.tiny_moe import TinyMoEConfig

    for fields, needle in [
        ({"dtype": "float33"}, "TinyMoEConfig.dtype must be one of"),
        ({"num_layers": 0}, "TinyMoEConfig.num_layers must be ≥ 1"),
        ({"hidden": "64"}, "TinyMoEConfig.hidden must be int"),
        ({"topk": 5}, "TinyMoEConfig.topk 5 must be at most num_experts 4"),
        ({"hidden": 30, "heads": 4}, "multiple of heads"),
        ({"fp8": "e5m2", "spec": "te"}, "TinyMoEConfig.fp8 must be None or one of"),
    ]:
        with pytest.raises(ValueError) as info:
            TinyMoEConfig.from_dict(fields)
        assert needle in str(info.value)


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).to(dtype)


def test_numerics_errors_carry_the_module_name():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = 1e37  # finite, but its square overflows float32
    x = torch.randn(16, 64)
    with pytest.raises(ValueError, match=r"^0: "):
        svdq.quantize(model, SVDQConfig(rank=8), lambda m: m(x), progress=False, report=False)
    assert isinstance(model[0], nn.Linear)  # nothing replaced


def test_float64_models_are_refused_up_front_naming_the_module():
    model = _mlp(torch.float64)
    calls = []
    with pytest.raises(ValueError, match=r"^0: weight dtype torch.float64 is not supported"):
        svdq.quantize(model, SVDQConfig(rank=8), lambda m: calls.append(1), progress=False, report=False)
    assert calls == []  # before any calibration pass
