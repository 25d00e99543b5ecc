"""`make bench`: our layers (and, side by side, the alternatives) on this machine's cores.

Split by job: settings (BENCH_*), processes (start, pin, measure, stop), load (the load
generators and their output), configs (what is compared), report (the markdown), profile
(py-spy attribution to server/hot_path.py's functions), tools (what gets installed).
See bench/README.md.
"""
