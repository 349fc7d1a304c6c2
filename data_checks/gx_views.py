"""Data Docs views whose compiled Jinja templates are kept for the life of the process.

Great Expectations builds a fresh Jinja environment for every page view and compiles each of its
~50 templates again on every Data Docs build (three builds per validation: one per table). These
views are the stock ones with a shared in-memory bytecode cache, so a template is compiled once
per process; keys include the template source checksum, so output is unchanged.

Only Great Expectations imports this module (by name, from the docs site configuration written in
:mod:`data_checks.suites`), after Great Expectations itself is loaded.
"""

from __future__ import annotations

import threading

from great_expectations.render.view import DefaultJinjaIndexPageView, DefaultJinjaPageView
from jinja2 import BytecodeCache
from jinja2.bccache import Bucket


class MemoryBytecodeCache(BytecodeCache):
    def __init__(self) -> None:
        self._store: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def load_bytecode(self, bucket: Bucket) -> None:
        with self._lock:
            data = self._store.get(bucket.key)
        if data is not None:
            bucket.bytecode_from_string(data)

    def dump_bytecode(self, bucket: Bucket) -> None:
        data = bucket.bytecode_to_string()
        with self._lock:
            self._store[bucket.key] = data


CACHE = MemoryBytecodeCache()


class PageView(DefaultJinjaPageView):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.env.bytecode_cache = CACHE


class IndexPageView(DefaultJinjaIndexPageView):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.env.bytecode_cache = CACHE
