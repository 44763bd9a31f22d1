"""The fixed option values: each set defined once (geovae.choices) and every user of it agrees."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from geovae import choices
from geovae.cli import cli
from geovae.errors import OptionError
from geovae.products import POLYGON_FORMATS, check_formats, polygon_format
from geovae.segment import SegmentOptions


def test_every_polygon_format_has_a_suffix_and_a_driver() -> None:
    assert tuple(POLYGON_FORMATS) == choices.POLYGON_FORMAT_NAMES


def test_polygon_format_takes_what_users_type() -> None:
    assert polygon_format(" .GPKG ") == "gpkg"


def test_polygon_format_refuses_others_naming_the_choices() -> None:
    with pytest.raises(OptionError, match="use geojson, gpkg, parquet"):
        polygon_format("shp")


def test_segment_options_normalise_formats_in_the_given_order() -> None:
    assert SegmentOptions(formats=("Parquet", ".gpkg", "parquet")).formats == ("parquet", "gpkg")


def test_check_formats_reads_a_command_line_list() -> None:
    assert check_formats("gpkg,geojson", pixel_coords=False) == ["gpkg", "geojson"]


def test_segment_options_refuse_an_unknown_precision() -> None:
    with pytest.raises(OptionError, match="auto, fp32, bf16, fp16"):
        SegmentOptions(precision="int8")


@pytest.mark.parametrize(
    ("command", "option", "values"),
    [
        ("segment", "--precision", choices.PRECISIONS),
        ("train", "--sampler", choices.SAMPLERS),
        ("vectorize", "--connectivity", tuple(str(c) for c in choices.CONNECTIVITIES)),
    ],
)
def test_the_cli_offers_exactly_the_defined_choices(command: str, option: str, values: tuple[str, ...]) -> None:
    res = CliRunner().invoke(cli, [command, option, "x"])
    assert res.exit_code == 2
    assert f"'x' is not one of {', '.join(map(repr, values))}." in res.output


def test_the_cli_refuses_an_unknown_polygon_format() -> None:
    res = CliRunner().invoke(cli, ["segment", "x.tif", "-m", "m.safetensors", "--formats", "gpkg,shp"])
    assert res.exit_code == 2
    assert "choose from geojson, gpkg, parquet" in res.output
