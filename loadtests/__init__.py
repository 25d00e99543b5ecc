"""Load tests of the stack, as a client sees it: Locust scenarios, SLO thresholds, the gate.

`python -m loadtests` (make loadtest) runs the gate. See loadtests/README.md. (The
white-box benchmark of the layers is bench/, `make bench`.)
"""
