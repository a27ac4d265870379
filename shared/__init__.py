"""What the master and the worker both import: the wire protocol and its channel,
and what both sides must do alike (exit codes, logs, event loop, CPU policy,
accept errors, app specs, the optional python-prctl)."""
