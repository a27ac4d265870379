"""The benchmark lab (``python -m bench.lab``), its apps and clients, and the micro-benchmarks.

A package so that workers can import the lab's handlers as ``bench.apps:NAME``.
"""
