"""calib: the calibration pipeline and the application around it.

    from calib import CalibConfig, calibrate
    report = calibrate(model, forward_loop, CalibConfig(svdq=SVDQConfig(rank=32)))   # Megatron or torch

* :mod:`calib.calibrate` — :func:`calibrate` / :class:`CalibConfig`: statistics, decomposition and
  installation of every target (through :mod:`lora.install`), static activation ranges.
* :mod:`calib.report` — the calibration report (:class:`CalibReport`).
* :mod:`calib.rtn` — the round-to-nearest baseline.
* :mod:`calib.train` — fine-tuning (``svdq finetune``); :mod:`calib.data` / :mod:`calib.corpus` — data.
* :mod:`calib.models` — model sources of the command line; :mod:`calib.tiny_moe` — the demo GPT-MoE.
* :mod:`calib.cli` — the ``svdq`` command line; :mod:`calib.quickstart` / :mod:`calib.pretrain`.
"""

from calib.calibrate import CalibConfig, calibrate
from calib.report import CalibReport

__all__ = ["CalibConfig", "CalibReport", "calibrate"]
