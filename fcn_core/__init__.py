"""FCN semantic segmentation core: models, data, metrics, the weights format, the in-process
inference path (``fcn_core.inference``), training and distillation.

Knows nothing about HTTP; the ``service`` package builds on it, never the reverse. Importing
the package itself is light (no torch), so ``fcn_core.files`` serves the client too.
"""

__version__ = "0.1.0"
