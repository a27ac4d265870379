"""A module that fails on import, as an app with a bug in it would."""

raise RuntimeError("this module is broken on purpose")
