"""Pass name -> class, from the one explicit tuple ``onnxpress.passes.ALL``."""

from __future__ import annotations

import functools

from onnxpress.errors import UsageError
from onnxpress.pass_infra import Pass


@functools.cache
def registry() -> dict[str, type[Pass]]:
    from onnxpress.passes import ALL  # the core never imports a specific pass, only the list

    table: dict[str, type[Pass]] = {}
    for cls in ALL:
        if cls.name in table:
            raise RuntimeError(f"duplicate pass name '{cls.name}': {table[cls.name].__name__} and {cls.__name__}")
        table[cls.name] = cls
    return table


def get_pass_class(name: str) -> type[Pass]:
    table = registry()
    if name not in table:
        raise UsageError(f"unknown pass '{name}' (valid passes: {', '.join(sorted(table))})")
    return table[name]
