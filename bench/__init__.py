"""``fcn-bench``: benchmarks of the model, the service and a plain server, on one machine.

The folder is ``bench/`` in the repository and installs as ``fcn_bench`` (a top-level
``bench`` in site-packages would clash with other projects'), so the modules import each other
relatively and run under either name. Imports go one way: ``plan`` and ``records`` hold the
data; ``targets`` and ``report`` read it; ``run`` fills it.
"""
