"""Load tests of the stack: Locust scenarios, SLO thresholds, the gate and a benchmark.

`python -m loadtests` (make loadtest) runs the gate; `python -m loadtests.bench` (make bench)
the side-by-side benchmark. See loadtests/README.md.
"""
