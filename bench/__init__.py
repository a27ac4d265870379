"""The benchmark lab (``python -m bench.lab``), its apps and clients, and the micro-benchmarks.

``bench.server`` (the dispatcher under test) and ``bench.load`` (the load
client) serve the tests too. A package so that workers can import the
lab's handlers as ``bench.apps:NAME``.
"""
