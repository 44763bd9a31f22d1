"""The class table: what each output channel means (raster value, name, colour).

One table travels from the user's ``--classes`` through training into the model file and
out to every product (the class raster's colour table and category names, the polygons'
``class_name``, the report, styles). This module parses it and holds its conventions;
:mod:`geovae.products` writes and reads it in the outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from geovae.errors import OptionError

__all__ = ["CLASS_NODATA", "DEFAULT_COLORS", "ClassSpec", "check_class_ids", "parse_classes", "rgb"]

#: Nodata value of the class raster, so class ids are 0..254.
CLASS_NODATA = 255

#: A palette for classes that come without colours (tab10-like, readable over imagery).
DEFAULT_COLORS: list[tuple[int, int, int]] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def rgb(color: Sequence[Any]) -> tuple[int, int, int]:
    """A class colour as three integers (red, green, blue); a fourth value (alpha) is dropped.

    Args:
        color: the colour's values, as a model file, a config or a colour table gives them.

    Returns:
        ``(red, green, blue)``.

    Raises:
        ValueError: fewer than three values.
    """
    if len(color) < 3:
        raise ValueError(f"class colour {list(color)!r}: give red, green and blue")
    return int(color[0]), int(color[1]), int(color[2])


def check_class_ids(ids: Any, where: str) -> None:
    """Refuse class ids the class raster cannot hold (0..254, each once).

    Args:
        ids: the class ids.
        where: what holds them, for the message (``--classes``, a model file...).

    Raises:
        OptionError: naming the first offending id.
    """
    seen: set[int] = set()
    for c in ids:
        if int(c) != c or not 0 <= int(c) < CLASS_NODATA:
            raise OptionError(
                f"{where}: class id {c} is out of range; class ids must be 0..{CLASS_NODATA - 1} "
                f"({CLASS_NODATA} marks nodata in the class raster)"
            )
        if int(c) in seen:
            raise OptionError(f"{where}: class id {c} is given twice; name each id once")
        seen.add(int(c))


@dataclass
class ClassSpec:
    """The classes a model predicts: raster value, name and colour of each output channel.

    Attributes:
        ids: value in the label raster (and in the predicted class raster) of channel i.
        names: human name of channel i.
        colors: RGB colour of channel i.
    """

    ids: list[int]
    names: list[str]
    colors: list[tuple[int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.colors:
            self.colors = [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(len(self.ids))]

    @property
    def num_classes(self) -> int:
        return len(self.ids)

    def lookup(self) -> dict[int, int]:
        """Raster value -> output channel index."""
        return {cid: i for i, cid in enumerate(self.ids)}


def parse_classes(classes: str | Mapping[Any, Any]) -> dict[int, str]:
    """Parse a class specification into ``{raster value: name}``.

    Args:
        classes: ``"1:developed,5:forest"`` (names may be omitted: ``"1,5"``), or a mapping
            ``{1: "developed"}`` (keys may be numeric strings, as YAML and JSON give them).

    Returns:
        Class ids in ascending order with their names.

    Raises:
        OptionError: if the specification is malformed or names an id twice.
    """
    hint = "expected comma-separated ID:NAME pairs such as '1:developed,5:forest'"
    out: dict[int, str] = {}
    if isinstance(classes, Mapping):
        items = [(k, v) for k, v in classes.items()]
    elif isinstance(classes, str):
        items = []
        for part in classes.split(","):
            part = part.strip()
            if not part:
                continue
            key, _, name = part.partition(":")
            items.append((key.strip(), name.strip()))
    else:
        raise OptionError(f"--classes {classes!r}: {hint}")
    for key, name in items:
        try:
            cid = int(str(key).strip())
        except ValueError:
            raise OptionError(f"--classes {classes!r}: {key!r} is not an integer class id; {hint}") from None
        if cid in out:
            raise OptionError(f"--classes {classes!r}: class id {cid} is given twice; name each id once")
        out[cid] = str(name).strip() if name not in (None, "") else f"class {cid}"
    if not out:
        raise OptionError(f"--classes {classes!r}: no classes given; {hint}")
    return dict(sorted(out.items()))
