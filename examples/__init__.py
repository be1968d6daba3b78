"""Runnable examples (each a script); ``architectures`` is shared with the tests and the
benchmarks. A package so that it shadows the top-level ``examples`` that Opacus installs."""
