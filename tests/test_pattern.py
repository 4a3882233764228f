import pytest

from megatron_hybrid import pattern as pattern_lib
from megatron_hybrid.pattern import PatternError, describe, parse


def test_parse_layers_and_counts():
    p = parse("M-M*-M-")
    assert p.text == str(p) == "M-M*-M-"
    assert p.layers == "M-M*-M-"
    assert p.num_layers == 7
    assert p.counts == {"M": 3, "*": 1, "-": 3, "E": 0, "H": 0}
    assert p.explicit_stages is None


def test_parse_strips_stage_boundaries_from_layers():
    p = parse("M-M*|-ME-")
    assert p.text == "M-M*|-ME-"
    assert p.layers == "M-M*-ME-"
    assert p.num_layers == 8
    assert p.counts == {"M": 3, "*": 1, "-": 3, "E": 1, "H": 0}
    assert p.explicit_stages == ("M-M*", "-ME-")


def test_invalid_symbol_names_position_and_valid_symbols():
    with pytest.raises(PatternError) as err:
        parse("M-M-x")
    message = str(err.value)
    assert message == (
        "invalid symbol 'x' at position 4 of 'M-M-x': valid symbols are M (Mamba-2), "
        "* (attention), - (MLP), E (MoE), H (parallel heads), | (pipeline-stage boundary)"
    )
    assert "\n" not in message


def test_lowercase_and_space_are_invalid():
    with pytest.raises(PatternError, match="invalid symbol 'm' at position 0"):
        parse("m-")
    with pytest.raises(PatternError, match="invalid symbol ' ' at position 2"):
        parse("M- M")


def test_empty_pattern():
    with pytest.raises(PatternError, match="empty pattern.*valid symbols are M"):
        parse("")


@pytest.mark.parametrize(
    "text, stage, position",
    [("M-||M-", 1, 3), ("|M-", 0, 0), ("M-|", 1, 2), ("|", 0, 0)],
)
def test_empty_stage(text, stage, position):
    with pytest.raises(PatternError) as err:
        parse(text)
    assert f"empty pipeline stage {stage} at position {position} of {text!r}" in str(err.value)


def test_pattern_is_frozen():
    p = parse("M-")
    with pytest.raises(AttributeError):
        p.text = "M*"


def test_explicit_stages_are_honoured_exactly():
    p = parse("M-M-M|*-|M-")
    assert p.stages(3) == ("M-M-M", "*-", "M-")
    assert p.stage_offsets(3) == (0, 5, 7)


def test_explicit_stage_count_must_equal_pp():
    p = parse("M-M*|-M-")
    with pytest.raises(PatternError) as err:
        p.stages(4)
    assert "marks 2 pipeline stages" in str(err.value)
    assert "pipeline size is 4" in str(err.value)
    with pytest.raises(PatternError, match="2 pipeline stages"):
        p.stages(3)


def test_explicit_stages_are_ignored_without_pipeline():
    assert parse("M-M*|-M-").stages(1) == ("M-M*-M-",)


def test_even_split_without_boundaries():
    p = parse("M-M*M-M*")
    assert p.stages(1) == ("M-M*M-M*",)
    assert p.stages(2) == ("M-M*", "M-M*")
    assert p.stages(4) == ("M-", "M*", "M-", "M*")
    assert p.stage_offsets(4) == (0, 2, 4, 6)


def test_uneven_split_is_refused_with_working_sizes():
    p = parse("M-M*-M-")
    with pytest.raises(PatternError) as err:
        p.stages(2)
    message = str(err.value)
    assert "cannot split the 7 layers" in message
    assert "pipeline sizes that divide 7 are 1, 7" in message
    assert "'|'" in message and "'M-M*|-M-'" in message  # a ready-to-paste uneven split


def test_more_stages_than_layers_is_refused():
    with pytest.raises(PatternError, match="divide 2 are 1, 2"):
        parse("M-").stages(3)


@pytest.mark.parametrize("pp", [0, -1, 1.0])
def test_pipeline_size_must_be_positive_int(pp):
    with pytest.raises(PatternError, match="positive integer"):
        parse("M-").stages(pp)


def test_with_stages_inserts_boundaries():
    p = parse("M-M*-M-").with_stages([3, 2, 2])
    assert p.text == "M-M|*-|M-"
    assert p.stages(3) == ("M-M", "*-", "M-")
    assert parse("M-|M*-M-").with_stages([7]).text == "M-M*-M-"


@pytest.mark.parametrize("sizes", [[3, 3], [7, 0], []])
def test_with_stages_rejects_bad_sizes(sizes):
    with pytest.raises(PatternError, match="sum to the 7 layers"):
        parse("M-M*-M-").with_stages(sizes)


def test_drop_layers_without_boundaries():
    assert parse("M-M*-M-").drop_layers([3, 4]).text == "M-MM-"


def test_drop_layers_across_stages_keeps_boundaries():
    p = parse("M-M*|-M-|M*-")
    pruned = p.drop_layers([1, 3, 5, 8])
    assert pruned.text == "MM|--|M-"
    assert pruned.stages(3) == ("MM", "--", "M-")


def test_drop_layers_refuses_to_empty_a_stage():
    with pytest.raises(PatternError, match=r"would leave stage 1 \('-M-'\)"):
        parse("M-M*|-M-").drop_layers([4, 5, 6])


def test_drop_layers_refuses_out_of_range():
    with pytest.raises(PatternError, match=r"\[7\] are outside 0..6"):
        parse("M-M*-M-").drop_layers([7])


def test_describe_lists_counts_and_stages():
    text = describe(parse("M-M*-M-M*"), pp=3)
    assert "9 layers: 4 Mamba-2, 2 attention, 3 MLP" in text
    assert "stage 0: layers 0-2 M-M (2 Mamba-2, 1 MLP)" in text
    assert "stage 2: layers 6-8 -M* (1 Mamba-2, 1 attention, 1 MLP)" in text
    assert "params" not in text


def test_describe_with_params_per_stage_and_total():
    params = [1_000_000_000, 200_000_000, 30_000_000, 45_600_000, 169_000, 31_000]
    text = describe(parse("M-M|*-M"), pp=2, params_per_layer=params)
    lines = text.splitlines()
    assert lines[1].endswith("1.23B params")
    assert lines[2].endswith("45.8M params")
    assert lines[3] == "decoder layers: 1.28B params"


def test_describe_checks_params_length():
    with pytest.raises(ValueError, match="2 entries but 'M-M' has 3 layers"):
        describe(parse("M-M"), params_per_layer=[1, 2])


@pytest.mark.parametrize(
    "n, text",
    [(1_234_000_000, "1.23B"), (45_600_000, "45.6M"), (169_000, "169k"), (512, "512"),
     (999_999, "1M"), (0, "0")],
)
def test_format_count(n, text):
    assert pattern_lib._format_count(n) == text
