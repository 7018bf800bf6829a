"""Does augmentation help? The downstream segmenter (``segmenter.py``), the quality of the pairs
(``quality.py``), the grid of method x N x seed x protocol (``grid.py``, with ``evaluate_cohort``, the
one implementation the service's evaluations and the benchmark call) and the report (``report.py``)."""
