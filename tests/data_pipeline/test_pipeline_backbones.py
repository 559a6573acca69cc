"""The references and edit stages with FLUX.2 klein and Qwen-Image-Edit-Plus (the tiny variants of
``single_subject=`` / ``editor=``), built from the real config files: records, images, provenance,
a crash and resume, and each image against the backbone's own diffusers pipeline."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from pipeline_helpers import compose, run_stages

from data_pipeline.models.diffusion import letterbox
from data_pipeline.models.policies import PolicyEditor
from data_pipeline.shards import read_stage_output

BACKBONES = {
    "tiny_flux2_klein": "Flux2KleinPolicy",
    "tiny_qwen_image_edit_plus": "QwenImageEditPolicy",
}
TARGET = 96  # the composite targets' side; editor=... outputs follow target.model.height/width
REFERENCE = 64  # the tiny single_subject configs' input_size
EDITED = ("attribute", "action")


def _config(name: str, *extra: str):
    return compose(
        [
            "device=cpu",
            "renderer=composite",
            f"target.model.height={TARGET}",
            f"target.model.width={TARGET}",
            f"single_subject={name}",
            f"editor={name}",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def cropped(tmp_path_factory):
    """plan -> prompts -> target (sprites) -> crop: 7 records, one of each kind."""
    out = tmp_path_factory.mktemp("cropped")
    run_stages(out, ["plan", "prompts", "target", "crop"], plan={"num_records": 7, "exclude": ["person"]})
    return out


@pytest.fixture(scope="module", params=list(BACKBONES))
def models(request):
    """(name, references model, edit model) built from conf/pipeline/{single_subject,editor}/NAME.yaml."""
    cfg = _config(request.param)
    return request.param, instantiate(cfg.references.model), instantiate(cfg.edit.model)


@pytest.fixture(scope="module")
def referenced(models, cropped, tmp_path_factory):
    """The crops re-rendered by the backbone (references stage, 3 records per batch, 4 images per call)."""
    name, references, _ = models
    out = tmp_path_factory.mktemp(f"referenced-{name}")
    shutil.copytree(cropped, out, dirs_exist_ok=True)
    summary = run_stages(
        out, ["references"], references={"model": references, "batch_size": 3, "images_per_call": 4}
    )["references"]
    return out, summary


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_configs_build_the_psr_policies(models):
    name, references, editor = models
    for model in (references, editor):
        assert isinstance(model, PolicyEditor) and type(model.policy).__name__ == BACKBONES[name]
        assert model.steps == 4 and BACKBONES[name] in model.description
    assert (references.height, references.width, references.letterbox) == (REFERENCE, REFERENCE, True)
    assert (editor.height, editor.width, editor.letterbox) == (TARGET, TARGET, False)


def test_references_stage_renders_every_crop(models, referenced, cropped):
    name, _, _ = models
    out, summary = referenced
    crops = {r["id"]: r for r in read_stage_output(cropped, "crop")[0]}
    recs = read_stage_output(out, "references")[0]
    assert summary["inputs"] == summary["accepted"] == len(recs) == len(crops) == 7
    assert "single_subject" in summary["model_seconds"]
    pixels = []
    for r in recs:
        assert len(r["references"]) == len(r["categories"]) == len(crops[r["id"]]["crops"])
        prov = r["provenance"]["references"]
        assert BACKBONES[name] in prov["model"] and len(set(prov["seeds"])) == len(r["categories"])
        for p in r["references"]:
            with Image.open(out / p) as im:
                assert im.size == (REFERENCE, REFERENCE) and im.mode == "RGB"
            pixels.append(_pixels(out / p))
    # every reference is its own image (crop, scene prompt and seed differ), none is flat
    assert all(px.std() > 1 for px in pixels)
    assert len({px.tobytes() for px in pixels}) == len(pixels)


def test_edit_stage_edits_only_edited_kinds_at_the_targets_size(models, referenced, tmp_path):
    _, _, editor = models
    out = tmp_path / "run"
    shutil.copytree(referenced[0], out)
    summary = run_stages(out, ["edit"], edit={"kinds": list(EDITED), "model": editor, "batch_size": 2})[
        "edit"
    ]
    assert summary["accepted"] == 7 and "editor" in summary["model_seconds"]
    before = {r["id"]: r for r in read_stage_output(out, "references")[0]}
    edited = 0
    for r in read_stage_output(out, "edit")[0]:
        if r["kind"] in EDITED:
            edited += 1
            assert r["target"].startswith("edit/") and r["target_unedited"] == before[r["id"]]["target"]
            assert r["provenance"]["edit"]["instruction"] == r["edit"]
            new, old = _pixels(out / r["target"]), _pixels(out / r["target_unedited"])
            assert new.shape == old.shape == (TARGET, TARGET, 3) and np.abs(new - old).mean() > 1
        else:
            assert r == before[r["id"]]
    assert edited == 2


def test_a_crashed_references_stage_resumes_to_the_same_records_and_images(
    models, referenced, cropped, tmp_path, monkeypatch
):
    _, references, _ = models
    out = tmp_path / "run"
    shutil.copytree(cropped, out)
    settings = {"model": references, "batch_size": 3, "images_per_call": 4}
    calls = []
    edit = PolicyEditor.edit

    def crash_on_the_third_call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return edit(self, *args, **kwargs)

    monkeypatch.setattr(PolicyEditor, "edit", crash_on_the_third_call)
    with pytest.raises(KeyboardInterrupt):
        run_stages(out, ["references"], references=settings)
    monkeypatch.setattr(PolicyEditor, "edit", edit)
    summary = run_stages(out, ["references"], references=settings)["references"]
    assert 0 < summary["resumed_records"] < 7 and summary["accepted"] == 7
    ref_out = referenced[0]
    resumed, full = read_stage_output(out, "references")[0], read_stage_output(ref_out, "references")[0]
    assert resumed == full
    for r in resumed:
        for p in r["references"]:
            assert (out / p).read_bytes() == (ref_out / p).read_bytes()
    # a finished stage is not run again
    assert run_stages(out, ["references"], references=settings)["references"] == summary


def _pipeline_image(
    name: str, policy, crop: Image.Image, prompt: str, seed: int, monkeypatch, output_type="pil"
):
    """The same crop, prompt and seed through the backbone's own diffusers pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    generator = torch.Generator().manual_seed(seed)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(policy.scheduler_config)
    common = {
        "image": [crop],
        "prompt": prompt,
        "height": REFERENCE,
        "width": REFERENCE,
        "num_inference_steps": 4,
        "generator": generator,
        "output_type": output_type,
    }
    if name == "tiny_flux2_klein":
        from diffusers import Flux2KleinPipeline

        from psr.models.flux2_klein import TINY_MAX_SEQUENCE_LENGTH, TINY_OUT_LAYERS

        pipe = Flux2KleinPipeline(
            transformer=policy.transformer,
            vae=policy.vae,
            text_encoder=policy.text_encoder,
            tokenizer=policy.tokenizer,
            scheduler=scheduler,
            is_distilled=False,
        )
        kw = {
            "guidance_scale": 4.0,
            "max_sequence_length": TINY_MAX_SEQUENCE_LENGTH,
            "text_encoder_out_layers": TINY_OUT_LAYERS,
        }
    else:
        import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as module
        from diffusers import QwenImageEditPlusPipeline

        # the pipeline fixes the areas the config sets (tiny: 64*64 for Qwen2.5-VL and the VAE)
        monkeypatch.setattr(module, "CONDITION_IMAGE_SIZE", policy.condition_area)
        monkeypatch.setattr(module, "VAE_IMAGE_SIZE", policy.reference_area)
        pipe = QwenImageEditPlusPipeline(
            transformer=policy.transformer,
            vae=policy.vae,
            text_encoder=policy.text_encoder,
            tokenizer=policy.tokenizer,
            processor=policy.processor,
            scheduler=scheduler,
        )
        kw = {"negative_prompt": " ", "true_cfg_scale": 4.0}
    pipe.set_progress_bar_config(disable=True)
    return pipe(**common, **kw).images[0]


def test_each_reference_equals_the_backbones_diffusers_pipeline(models, referenced, cropped, monkeypatch):
    """The first record's references (as the stage saved them, 4 images per call) and one crop sampled
    alone in fp32, against the pipeline fed the letterboxed crop, the scene prompt and the record's seed.

    Tolerances: fp32 images 1e-5 on [0, 1] (the same fp32 ops up to the order of a few; tests/models
    measure <= 1e-6); saved PNGs 1 of 255 (a value near a rounding edge, or a batched matmul, may land
    on the other 8-bit level). A tiny random model barely reads its references (another crop moves
    the image by ~1e-4, below 8 bits), so the fp32 comparison is the one that checks the reference
    path; the other crop must move the image by more than 10x its tolerance.
    """
    name, references, _ = models
    out, _ = referenced
    record = sorted(read_stage_output(out, "references")[0], key=lambda r: r["index"])[0]
    crops = []
    for crop_path in record["crops"]:
        with Image.open(cropped / crop_path) as im:
            crops.append(im.convert("RGB"))
    seeds, prompts = record["provenance"]["references"]["seeds"], record["scene_prompts"]
    for k, ref_path in enumerate(record["references"]):
        fitted = letterbox(crops[k], REFERENCE)
        theirs = np.asarray(
            _pipeline_image(name, references.policy, fitted, prompts[k], seeds[k], monkeypatch),
            dtype=np.int16,
        )
        ours = _pixels(out / ref_path)
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1
    policy = references.policy
    (ours,) = references.sample([crops[0]], [prompts[0]], [seeds[0]])
    theirs, other = (
        _pipeline_image(
            name, policy, letterbox(c, REFERENCE), prompts[0], seeds[0], monkeypatch, "pt"
        ).float()
        for c in (crops[0], crops[1])
    )
    assert ours.shape == theirs.shape == (3, REFERENCE, REFERENCE)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (other - theirs).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["flux2_klein", "qwen_image_edit_plus", *BACKBONES])
def test_configs_pass_psr_datas_key_check(name):
    """What psr-data checks before anything is built (the paths.* keys are part of its schema)."""
    from psr.config import check_config

    check_config(_config(name, "paths.klein=/m/klein", "paths.qwen_image_edit=/m/qwen"), "data")


def test_real_configs_need_their_path_and_name_it(tmp_path):
    from hydra.errors import InstantiationException
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationToMissingValueError

    for name, key in (("flux2_klein", "paths.klein"), ("qwen_image_edit_plus", "paths.qwen_image_edit")):
        cfg = _config(name)
        for group in ("references", "edit"):
            with pytest.raises(InterpolationToMissingValueError, match=key):
                OmegaConf.to_container(cfg[group].model, resolve=True)
        missing = _config(name, f"{key}={tmp_path / 'nowhere'}")
        with pytest.raises(
            InstantiationException, match=f"FileNotFoundError.*{key}=.*nowhere does not exist"
        ):
            instantiate(missing.references.model.policy)
