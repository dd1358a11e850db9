"""FCN semantic segmentation core: models, data, metrics, weights format, training.

Knows nothing about HTTP; the ``service`` package builds on it, never the reverse.
"""

__version__ = "0.1.0"
