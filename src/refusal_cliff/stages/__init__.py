"""One module per verb: its config, its per-batch job, and its `run_<verb>`, which reads the previous
stage's artifacts and writes its own into a run folder.

Imports `report`, `compute` and `core`; `demo` and `repair_demo` run the other stages in order.
"""
