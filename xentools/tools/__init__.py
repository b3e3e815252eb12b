"""Tools: the `xentools` command line, benchmarks and guest image boot tests.

Owns: user-facing commands, their one-line errors and exit codes. Must not: be imported by
any other layer.
"""
