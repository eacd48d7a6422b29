"""Model zoo: published sizes, head variants, output resolution."""

import pytest
import torch

from pose.counting import count
from pose.models import PRESETS, build_model
from pose.space import ArchSpec


@pytest.mark.parametrize(
    ("name", "params_m", "gflops"),
    [("efficientpose-a", 1.3, 0.7), ("efficientpose-b", 3.3, 1.5), ("efficientpose-c", 5.0, 2.0)],
)
def test_presets_match_published_size(name, params_m, gflops):
    counts = count(build_model(name, joints=16), (256, 256))
    assert round(counts.params / 1e6, 1) == params_m
    # Published GFLOPs are rounded to one decimal; C is printed as 2.0 for our exact 1.945.
    assert abs(counts.gflops_paper - gflops) < 0.06


def test_exact_preset_counts():
    """Exact values pin the block definition (hidden widths, biases, head) against silent changes."""
    expected = {"efficientpose-a": 1_299_360, "efficientpose-b": 3_252_912, "efficientpose-c": 5_002_312}
    for name, params in expected.items():
        model = build_model(name, joints=16)
        assert sum(p.numel() for p in model.parameters()) == params, name


def test_simplebaseline_r50_matches_published_size():
    counts = count(build_model("simplebaseline-r50", joints=17), (256, 192))
    assert round(counts.params / 1e6, 1) == 34.0
    assert abs(counts.gflops_paper - 8.9) < 0.1
    counts_square = count(build_model("simplebaseline-r50", joints=17), (256, 256))
    assert round(counts_square.gflops_paper, 1) == 12.0
    # true MACs count the deconvs at input resolution, so they are lower than the paper convention
    assert counts.gmacs < counts.gflops_paper


def test_mobilenetv2_baseline_matches_table3():
    counts = count(build_model("mobilenetv2", joints=16), (256, 256))
    assert round(counts.params / 1e6, 1) == 1.5
    assert abs(counts.gflops_paper - 0.73) < 0.01


@pytest.mark.parametrize("widths", [(64, 32), (64, 64), (96, 96)])
@pytest.mark.parametrize("style", ["plain", "mbv1", "mbv2"])
@pytest.mark.parametrize("sic", [True, False])
def test_head_variants_give_quarter_resolution(widths, style, sic):
    arch = PRESETS["efficientpose-a"].model_copy(update={"head_widths": widths, "head_style": style, "sic": sic})
    model = build_model(ArchSpec.model_validate(arch.model_dump()), joints=17).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 96))
    assert out.shape == (1, 17, 32, 24)


def test_head_variant_costs_are_ordered():
    """Table 7/8: wider heads cost more; MBV1-style upsampling costs less than plain."""
    base = PRESETS["efficientpose-a"]

    def head_flops(**update):
        model = build_model(ArchSpec.model_validate({**base.model_dump(), **update}), 16)
        counts = count(model, (256, 256))
        return sum(v[0] for k, v in counts.per_module.items() if k.startswith("head"))

    plain = head_flops()
    assert head_flops(head_widths=(64, 64)) > plain
    assert head_flops(head_widths=(96, 96)) > head_flops(head_widths=(64, 64))
    assert head_flops(head_style="mbv1") < plain
    assert head_flops(sic=False) < plain


def test_all_models_forward_and_residuals():
    for name in ["efficientpose-b", "mobilenetv2", "simplebaseline-r50"]:
        model = build_model(name, joints=16).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 64)).shape == (1, 16, 16, 16)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown architecture 'resnet-9000'"):
        build_model("resnet-9000")
