"""The frontier study (issue 11) in parts: ``rows`` (the table of rows), ``queue`` (training runs, ``--estimate``),
``speed`` (compiled timings per CPU), ``verdicts`` (summary, plain-curve reading, targets) and ``plot``;
bench/frontier_study.py is its command line."""
