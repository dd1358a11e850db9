"""The HTTP service around ``fcn_core``: dynamic batching, limits, metrics, health.

``service`` imports ``fcn_core``, never the reverse. Entry points: ``service.app.create_app``
and the ``fcn-serve`` command (``service.cli``).
"""

from fcn_core import __version__

__all__ = ["__version__"]
