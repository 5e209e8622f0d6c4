"""The tiny offline pipelines: real diffusers classes, right shapes, deterministic, flexible sizes."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dit_accel.testing import FAMILIES, VIDEO_FAMILIES, tiny_call_kwargs, tiny_pipeline  # noqa: E402

PIPELINE_CLASSES = {
    "sd3": diffusers.StableDiffusion3Pipeline,
    "flux": diffusers.FluxPipeline,
    "pixart": diffusers.PixArtAlphaPipeline,
    "pixart_sigma": diffusers.PixArtSigmaPipeline,
    "dit": diffusers.DiTPipeline,
    "wan": diffusers.WanPipeline,
    "hunyuan_video": diffusers.HunyuanVideoPipeline,
    "cogvideox": diffusers.CogVideoXPipeline,
}
# DiTPipeline has no height/width arguments: its size is fixed by the transformer's sample_size.
RESIZABLE_IMAGE_FAMILIES = ("sd3", "flux", "pixart", "pixart_sigma")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    spin-waiting made the two-thread run of this file about 7x slower than one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run(family, pipe=None, **overrides) -> torch.Tensor:
    pipe = pipe or tiny_pipeline(family)
    return pipe(**tiny_call_kwargs(family, **overrides))[0]


def expected_shape(family, batch=1, height=128, width=128):
    return (batch, 9, 3, height, width) if family in VIDEO_FAMILIES else (batch, 3, height, width)


def test_families_are_all_covered():
    assert set(FAMILIES) == set(PIPELINE_CLASSES)


@pytest.mark.parametrize("family", FAMILIES)
def test_real_classes_finite_output_of_expected_shape(family):
    pipe = tiny_pipeline(family)
    assert type(pipe) is PIPELINE_CLASSES[family]
    assert type(pipe.transformer).__module__.startswith("diffusers.models.transformers")
    out = run(family, pipe)
    assert out.shape == expected_shape(family)
    assert torch.isfinite(out).all()
    assert out.std() > 0.01  # not a degenerate constant image


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_is_bit_identical_and_seed_matters(family):
    first, second = run(family, tiny_pipeline(family, seed=0)), run(family, tiny_pipeline(family, seed=0))
    assert torch.equal(first, second)
    assert not torch.equal(first, run(family, tiny_pipeline(family, seed=1)))


def test_building_leaves_global_rng_alone():
    state = torch.get_rng_state()
    tiny_pipeline("flux")
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("family", RESIZABLE_IMAGE_FAMILIES)
def test_non_square_images(family):
    pipe = tiny_pipeline(family)
    assert run(family, pipe, height=64, width=96).shape == expected_shape(family, height=64, width=96)
    assert run(family, pipe, height=192, width=128).shape == expected_shape(family, height=192, width=128)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_non_square_video(family):
    assert run(family, height=96, width=128).shape == expected_shape(family, height=96, width=128)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_two(family):
    # CogVideoXPipeline ignores num_videos_per_prompt, so batch through a prompt list everywhere.
    batch = {"class_labels": [1, 2]} if family == "dit" else {"prompt": ["a red circle", "a blue square"]}
    out = run(family, **batch)
    assert out.shape == expected_shape(family, batch=2)
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize("family", RESIZABLE_IMAGE_FAMILIES)
def test_num_images_per_prompt(family):
    assert run(family, num_images_per_prompt=2).shape == expected_shape(family, batch=2)


def test_dit_label_names_work_offline():
    pipe = tiny_pipeline("dit")
    assert run("dit", pipe, class_labels=pipe.get_label_ids(["red circle"])).shape == expected_shape("dit")


def test_sd35_style_overrides():
    pipe = tiny_pipeline("sd3", dual_attention_layers=(0,), qk_norm="rms_norm")
    assert pipe.transformer.transformer_blocks[0].attn2 is not None
    assert torch.isfinite(run("sd3", pipe)).all()


def test_transformer_size_overrides():
    pipe = tiny_pipeline("flux", num_layers=2, num_single_layers=3, num_attention_heads=2, attention_head_dim=32)
    assert (len(pipe.transformer.transformer_blocks), len(pipe.transformer.single_transformer_blocks)) == (2, 3)
    assert sum(pipe.transformer.config.axes_dims_rope) == 32  # re-derived for the new head dim
    assert run("flux", pipe).shape == expected_shape("flux")
    assert len(tiny_pipeline("sd3", num_layers=4).transformer.transformer_blocks) == 4


def test_wan22_two_transformers():
    pipe = tiny_pipeline("wan", two_transformers=True)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio is not None
    calls = []
    pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    pipe.transformer_2.register_forward_hook(lambda *_: calls.append(2))
    assert run("wan", pipe).shape == expected_shape("wan")
    assert set(calls) == {1, 2}


@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_true_cfg_of_guidance_distilled_families(family):
    out = run(family, negative_prompt="a blue square", true_cfg_scale=2.0)
    assert out.shape == expected_shape(family)


def test_unknown_family_names_the_supported_ones():
    for factory in (tiny_pipeline, tiny_call_kwargs):
        with pytest.raises(ValueError) as err:
            factory("sdxl")
        assert all(family in str(err.value) for family in FAMILIES)


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError, match="num_layerz"):
        tiny_pipeline("sd3", num_layerz=3)
    with pytest.raises(ValueError, match="two_transformers"):
        tiny_pipeline("sd3", two_transformers=True)
