"""Loaded engines kept across stages, so evaluate and benchmark do not load the same weights twice."""

from __future__ import annotations

from collections import OrderedDict

from quant_release.engines import LoadedEngine, get_backend
from quant_release.records import EngineHandle


class EnginePool:
    """Keeps the last few loaded engines so evaluate and benchmark do not load the same weights twice."""

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._engines: OrderedDict[str, LoadedEngine] = OrderedDict()

    def get(self, handle: EngineHandle) -> LoadedEngine:
        key = handle.model_dump_json(exclude={"weight_bytes", "load_seconds"})
        if key in self._engines:
            self._engines.move_to_end(key)
            return self._engines[key]
        while len(self._engines) >= self.capacity:
            _, oldest = self._engines.popitem(last=False)
            oldest.close()
        engine = get_backend(handle.kind).load(handle)
        self._engines[key] = engine
        return engine

    def close(self) -> None:
        while self._engines:
            _, engine = self._engines.popitem()
            engine.close()
