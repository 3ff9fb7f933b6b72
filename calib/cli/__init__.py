"""The ``svdq`` command line: ``svdq {calibrate,eval,finetune,export,save-model} ...``.

* :mod:`calib.cli.main` — the argument parser and dispatch (:func:`main`).
* :mod:`calib.cli.common` — the model / data arguments every command shares.
* one module per command: :mod:`~calib.cli.calibrate`, :mod:`~calib.cli.eval`, :mod:`~calib.cli.finetune`,
  :mod:`~calib.cli.export`, :mod:`~calib.cli.save_model`.
"""

from calib.cli.main import main

__all__ = ["main"]
