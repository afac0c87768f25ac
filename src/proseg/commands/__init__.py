"""What the commands do, above the engine: the cores of ``proseg evaluate``, ``predict`` and ``demo``.

The CLI modules (:mod:`proseg.cli`) parse arguments and call these; nothing here imports :mod:`proseg.cli`.

* ``evaluate``: :func:`~proseg.commands.evaluate.evaluate_checkpoint` (score a checkpoint on a split) and
  :func:`~proseg.commands.evaluate.summary_table`;
* ``predict``: :func:`~proseg.commands.predict.predict_path` (maps for raw input files), built from
  ``inputs`` (finding and reading the inputs), ``preprocess`` (to the model's space and back) and ``outputs``
  (writing NIfTI / PNG / HDF5 maps);
* ``demo``: :func:`~proseg.commands.demo.run_demo` (prepare, train two models side by side, evaluate, report).

Import the submodules directly (``from proseg.commands.evaluate import evaluate_checkpoint``); this package
module imports nothing, so loading one command does not load the others.
"""
