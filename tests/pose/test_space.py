"""Search-space tables, the skip rule, arch-spec validation and LUT keys."""

import json

import pytest
from pydantic import ValidationError

from pose.models import PRESETS
from pose.space import (
    CANDIDATE_OPS,
    LARGE,
    SKIP,
    SMALL,
    ArchSpec,
    TableSpec,
    arch_keys,
    fixed_keys,
    get_space,
    layer_key,
    parse_hw,
    space_keys,
    table_keys,
)


def _table(space, hw=(256, 256)):
    return [(layer.c_in, layer.c_out, layer.stride, layer.in_h, layer.in_w) for layer in space.layers(hw)]


def test_small_space_layer_table():
    layers = SMALL.layers((256, 256))
    assert len(layers) == 28
    assert [sum(1 for x in layers if x.stage == s) for s in range(4)] == [4, 6, 10, 8]
    table = _table(SMALL)
    assert table[0] == (16, 24, 2, 128, 128)
    assert table[1] == (24, 24, 1, 64, 64)
    assert table[4] == (24, 32, 2, 64, 64)
    assert table[10] == (32, 64, 2, 32, 32)
    assert table[20] == (64, 96, 1, 16, 16)  # stage 4 keeps 16x16: stride 1
    assert (layers[-1].out_h, layers[-1].out_w) == (16, 16)
    assert SMALL.output_stride == 16


def test_large_space_layer_table():
    layers = LARGE.layers((256, 192))
    assert len(layers) == 34
    assert [sum(1 for x in layers if x.stage == s) for s in range(4)] == [6, 8, 10, 10]
    assert (layers[0].c_in, layers[0].in_h, layers[0].in_w) == (24, 128, 96)
    assert (layers[-1].c_out, layers[-1].out_h, layers[-1].out_w) == (160, 16, 12)
    assert LARGE.output_stride == 16


def test_skip_rule():
    layers = SMALL.layers()
    first_of_stages = [x for x in layers if x.position == 0]
    assert all(SKIP not in x.legal_ops() for x in first_of_stages)
    assert "first layer" in layers[20].skip_reason()  # stage 4 first layer: stride 1 but 64 -> 96
    assert layers[1].legal_ops() == CANDIDATE_OPS
    inline = get_space({"stem_channels": 16, "stages": [[16, 1, 2]]})
    assert "first layer" in inline.layers()[0].skip_reason()
    assert inline.layers()[1].skip_reason() is None


def _ops(space, op="k3e3"):
    return [op] * space.num_layers


def test_arch_spec_errors_name_layer_and_reason():
    with pytest.raises(ValidationError, match="28 searchable layers, arch lists 27"):
        ArchSpec(space="small", ops=_ops(SMALL)[:-1])
    ops = _ops(SMALL)
    ops[5] = "k9e3"
    with pytest.raises(ValidationError, match=r"layer 5 .*unknown op 'k9e3'"):
        ArchSpec(space="small", ops=ops)
    ops = _ops(SMALL)
    ops[4] = SKIP
    with pytest.raises(ValidationError, match=r"layer 4 \(stage 2\): skip is not allowed on the first layer"):
        ArchSpec(space="small", ops=ops)
    with pytest.raises(ValidationError, match="head_style"):
        ArchSpec(space="small", ops=_ops(SMALL), head_style="fancy")


def test_space_errors():
    with pytest.raises(ValueError, match="unknown search space 'medium'"):
        get_space("medium")
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        get_space({"stem_channels": 16, "stages": [[24, 3, 4]]})
    with pytest.raises(ValueError, match="layers must be in 1..64"):
        get_space({"stem_channels": 16, "stages": [[24, 2, 0]]})


def test_arch_spec_file_round_trip(tmp_path):
    path = tmp_path / "arch.json"
    PRESETS["efficientpose-a"].save(path)
    loaded = ArchSpec.load(path)
    assert loaded.ops == PRESETS["efficientpose-a"].ops
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        ArchSpec.load(tmp_path / "bad.json")
    inline = {"space": {"stem_channels": 8, "stages": [[16, 2, 2]]}, "ops": ["k3e3", "skip"]}
    (tmp_path / "inline.json").write_text(json.dumps(inline))
    assert ArchSpec.load(tmp_path / "inline.json").search_space.num_layers == 2


def test_lut_keys():
    layer = SMALL.layers()[0]
    assert layer_key("k5e3", layer) == (
        "mbconv-input:128x128x16-output:64x64x24-kernel:5-expand:3-stride:2-idskip:0-batch:1"
    )
    assert layer_key(SKIP, SMALL.layers()[1]) is None
    # Each stage contributes 6 keys for its first layer and 6 for the identical rest.
    spec = TableSpec(SMALL)
    assert len(space_keys(spec)) == 48
    assert table_keys(spec) == fixed_keys(spec) + space_keys(spec) and len(set(table_keys(spec))) == 51
    assert fixed_keys(spec) == [
        "stem-input:256x256x3-output:128x128x16-batch:1",
        "head-input:16x16x96-output:64x64x16-widths:64,32-style:plain-sic:1-batch:1",
        "overhead-input:256x256x3-batch:1",
    ]
    arch = PRESETS["efficientpose-a"]
    keys = arch_keys(arch, TableSpec.for_arch(arch))
    assert keys[:3] == fixed_keys(TableSpec.for_arch(arch))
    assert sum(k.startswith("mbconv-") for k in keys) == 26  # two skips are free
    assert set(keys) <= set(table_keys(TableSpec.for_arch(arch)))
    with pytest.raises(ValueError, match="does not match the table spec"):
        arch_keys(arch, TableSpec(LARGE))


def test_table_spec_is_one_normalised_value():
    spec = TableSpec("small", [128, 96], 8, 17, [128], "mbv2", 0, threads=2)
    assert spec.space is SMALL and spec.input_hw == (128, 96) and spec.head_widths == (128,) and spec.sic is False
    fields = spec.as_fields()
    assert fields["space"] == SMALL.to_spec().model_dump(mode="json") and fields["input"] == [128, 96]
    assert TableSpec.from_fields(json.loads(json.dumps(fields))) == spec
    assert hash(TableSpec.from_fields(fields)) == hash(spec)
    assert spec.as_fields(space_by_name=True)["space"] == "small"
    inline = TableSpec({"name": "small", "stem_channels": 8, "stages": [[16, 2, 2]]})
    assert inline.as_fields(space_by_name=True)["space"]["stem_channels"] == 8  # not the built-in small
    arch = spec.arch(["k3e3"] * SMALL.num_layers, name="x")
    assert arch.head_widths == (128,) and arch.head_style == "mbv2" and arch.sic is False
    assert TableSpec.for_arch(arch, input_hw=(128, 96), batch=8, joints=17, threads=2) == spec
    for bad, message in (
        ({"batch": 0}, "batch must be >= 1"),
        ({"joints": 0}, "joints must be >= 1"),
        ({"head_widths": ()}, "head_widths"),
        ({"head_style": "fancy"}, "head_style"),
        ({"input_hw": (64,)}, "input_hw"),
    ):
        with pytest.raises(ValueError, match=message):
            TableSpec(SMALL, **bad)


def test_parse_hw():
    assert parse_hw("256x192") == (256, 192)
    with pytest.raises(ValueError, match="HxW"):
        parse_hw("256")
