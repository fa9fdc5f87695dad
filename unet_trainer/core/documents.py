"""Reading the small documents people hand us: YAML configs and recipes, JSON settings files.

A document must be UTF-8 text, and its mappings and lists may nest at most :data:`MAX_NESTING`
deep. Real ones nest a few levels (``model: {unet: {filters: [...]}}`` is three); the bound keeps
a hostile file from exhausting the parsers' recursion, which would end in a traceback thousands
of lines long instead of one line naming the file.

YAML is read by PyYAML's safe loader (a subclass that only counts depth), so a document never
runs code. Errors carry what went wrong without the path: the caller names the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

# Mappings and lists inside one another, the top level counting as 1.
MAX_NESTING = 32


class DocumentError(ValueError):
    """A document that is not UTF-8 text, or nests too deeply; the message omits the path."""


def read_utf8(path: Path) -> str:
    """The text of ``path``, which must be UTF-8.

    Raises:
        DocumentError: a byte sequence that is not UTF-8 (its offset named).
        OSError: the file cannot be read.
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start} is not UTF-8); save it as UTF-8"
        ) from None


def _too_deep(where: str = "") -> DocumentError:
    return DocumentError(f"nested deeper than {MAX_NESTING} levels of mappings and lists{where}")


class _BoundedSafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing collections nested deeper than :data:`MAX_NESTING`."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        # Composing recurses once per level (and constructing after it): stop before Python's limit.
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        if self.depth >= MAX_NESTING:
            raise _too_deep(f" (at line {self.peek_event().start_mark.line + 1})")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load(text)``, with nesting bounded.

    Raises:
        DocumentError: nested deeper than :data:`MAX_NESTING` (the line named).
        yaml.YAMLError: not valid YAML.
    """
    loader = _BoundedSafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def check_nesting(value: Any) -> None:
    """Refuse a value (parsed JSON, a config stored in a checkpoint) whose dicts and lists nest
    deeper than :data:`MAX_NESTING`; walks without recursion.

    Raises:
        DocumentError: too deep.
    """
    pending = [(value, 1)]
    # The deepest level each container was reached at: one shared many times (a pickle's or
    # YAML's references) is walked again only from deeper, so the walk stays linear; a cycle
    # is infinitely deep and is refused.
    reached: dict[int, int] = {}
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > MAX_NESTING:
            raise _too_deep()
        if reached.get(id(item), 0) >= depth:
            continue
        reached[id(item)] = depth
        pending.extend((child, depth + 1) for child in children)


def load_json_text(text: str) -> Any:
    """``json.loads(text)``, with nesting bounded.

    Raises:
        DocumentError: nested deeper than :data:`MAX_NESTING`.
        json.JSONDecodeError: not valid JSON.
    """
    try:
        value = json.loads(text)
    except RecursionError:  # nested beyond what the parser itself can take
        raise _too_deep() from None
    check_nesting(value)
    return value
