"""Layer lists such as "all", "28", "0,3-5,20-" or "end-2": which of a model's layers a setting applies to.

A spec is "all" or comma-separated parts; a part is one term or a range of two, "a-b" (inclusive) or "a-"
(from a to the last layer). A term is a layer index counted from the first layer (0-based), or "end-k"
counted from the end: with N layers, end-k is layer N - k, so end-1 is the last layer and end-2 the
second to last (Python's [-k]). Examples on a 30-layer model: "end-2" -> {28}; "end-4-" -> {26..29};
"20-end-3" -> {20..27}. Syntax is checked without the model (parse_layers); indices are resolved, and
checked to exist, once the layer count is known (resolve_layers).
"""

from __future__ import annotations

import re

from shared.types.errors import ConfigError

_TERM = r"(\d+|end-\d+)"
_PART = re.compile(rf"{_TERM}(-{_TERM}?)?")
LAYERS_HELP = ("'all', or layer indices and ranges such as 0,3-5,20- (20-: 20 to the last); end-k counts from the "
               "end: end-1 is the last layer, end-2 the second to last, end-4- the last four")


def _term(text: str) -> int:
    """A term as an int: an index >= 0, or -k for end-k (k >= 1)."""
    if text.startswith("end-"):
        k = int(text[4:])
        if k < 1:
            raise ValueError("end-0 is past the last layer")
        return -k
    return int(text)


def parse_layers(spec: str) -> list[tuple[int, int | None]]:
    """Inclusive ranges, negative terms counting from the end: "all" -> [(0, None)];
    "0,3-5,20-" -> [(0, 0), (3, 5), (20, None)]; "end-2" -> [(-2, -2)]. ConfigError on bad syntax."""
    if spec == "all":
        return [(0, None)]
    ranges = []
    for part in spec.split(","):
        match = _PART.fullmatch(part.strip())
        try:
            if match is None:
                raise ValueError("not a term or a range")
            first, dash, last = _term(match[1]), match[2], match[3]
            end = None if dash and last is None else _term(last) if last else first
            if end is not None and (first < 0) == (end < 0) and end < first:
                raise ValueError("a range runs backwards")
        except ValueError as exc:
            raise ConfigError(f"attention layers '{spec}': {exc}; use {LAYERS_HELP}") from None
        ranges.append((first, end))
    return ranges


def resolve_layers(spec: str, num_layers: int) -> frozenset[int]:
    """The layer indices of a model with num_layers layers that spec names. ConfigError when a term names a
    layer the model does not have or a range is empty."""
    layers: set[int] = set()
    for first, last in parse_layers(spec):
        a, b = (t + num_layers if t is not None and t < 0 else t for t in (first, last))
        b = num_layers - 1 if b is None else b
        if not 0 <= a < num_layers or not 0 <= b < num_layers or b < a:
            raise ConfigError(f"attention layers '{spec}': names a layer outside 0-{num_layers - 1} "
                              f"(end-1 = {num_layers - 1}) or an empty range")
        layers.update(range(a, b + 1))
    return frozenset(layers)
