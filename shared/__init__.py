"""What the master and the worker both import: the wire protocol and its channel."""
