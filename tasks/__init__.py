"""personcar stage logic: importable, typed functions behind the DAG tasks and the ``personcar`` CLI.

Heavy libraries (TensorFlow, Great Expectations) are imported inside the functions that need
them, never at module level, so the DAG file stays fast to parse.
"""

__version__ = "0.1.0"
