"""Checkpoint conversions: HF CLIPVisionModel and task_vectors pickles → open_clip `visual.*` keys.

Each mapping is checked the way it is used: random models on both sides, convert, load into
open_clip, and compare image features. The pickle reader is checked to run none of the file's code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from tatr.cli import main as cli_main
from tatr.core.checkpoints import load_state_dict, save_state_dict
from tatr.core.errors import TatrError
from tatr.suites.clip8.convert import (
    PickleNeedsTrust,
    check_architecture,
    convert,
    load_any,
    load_pickled_module,
    open_clip_visual,
    visual_shapes,
)
from tests.clip_fixtures import MODEL, forget_module, random_clip, save_task_vectors_pickle, throwaway_module

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _hf_config(**overrides):
    base = dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
        projection_dim=512,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    base.update(overrides)
    return transformers.CLIPVisionConfig(**base)


def _jitter(model: nn.Module, seed: int) -> nn.Module:
    """Move every weight off its init (LayerNorms at exactly 1/0 would hide a swapped mapping)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _load_visual(clip: nn.Module, visual: dict[str, torch.Tensor]) -> nn.Module:
    clip.visual.load_state_dict({k.removeprefix("visual."): v for k, v in visual.items()}, strict=True)
    return clip


# --- Hugging Face ------------------------------------------------------------------------------


def test_hf_clip_vision_with_projection_matches_open_clip_features():
    torch.manual_seed(1)
    hf = _jitter(transformers.CLIPVisionModelWithProjection(_hf_config()), 1)
    converted = open_clip_visual(hf.state_dict(), "hf")
    assert converted.source_format == "hf-clip-vision"
    assert converted.from_pretrained == []
    check_architecture(converted.state_dict, visual_shapes(MODEL), "hf", MODEL)
    clip = _load_visual(random_clip(seed=3), converted.state_dict)
    x = _images(n=1)
    with torch.no_grad():
        ours = clip.encode_image(x)
        theirs = hf(pixel_values=x).image_embeds
    diff = (ours - theirs).abs().max().item()
    assert diff < TOL, diff


TINY = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16
)


def _tiny_open_clip_tower(seed: int) -> nn.Module:
    """open_clip's VisionTransformer at the tiny HF config's size (head width 64 → 2 heads)."""
    from open_clip.model import _build_vision_tower

    torch.manual_seed(seed)
    cfg = {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16, "mlp_ratio": 2.0}
    return _build_vision_tower(32, cfg, quick_gelu=True).eval()


@pytest.mark.parametrize("legacy_prefix", [False, True])
def test_hf_folder_without_projection_converts_via_cli(tmp_path: Path, legacy_prefix: bool):
    """FusionBench's `tanganke/clip-vit-base-patch32_<task>`: CLIPVisionModel, no projection."""
    torch.manual_seed(2)
    hf = _jitter(transformers.CLIPVisionModel(_hf_config(projection_dim=32, **TINY)), 2)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    if legacy_prefix:  # transformers 4.x wrote `vision_model.*` keys, as the Hub checkpoints have
        sd = load_state_dict(folder / "model.safetensors")
        save_state_dict({f"vision_model.{k}": v for k, v in sd.items()}, folder / "model.safetensors")
    out = tmp_path / "ft.safetensors"
    assert cli_main(["convert", str(folder), str(out)]) == 0
    with safe_open(str(out), "pt") as fh:
        assert fh.metadata()["tatr.from_pretrained"] == "visual.proj"
    visual = load_state_dict(out)
    assert "visual.proj" not in visual
    tower = _tiny_open_clip_tower(seed=4)
    visual["visual.proj"] = tower.proj.detach().clone()  # the frozen projection comes from θ_0
    tower.load_state_dict({k.removeprefix("visual."): v for k, v in visual.items()}, strict=True)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = tower(x)
        theirs = hf(pixel_values=x).pooler_output @ tower.proj
    assert (ours - theirs).abs().max().item() < TOL
    # a q/k swap in the stacked in_proj would break the agreement: the check can fail
    w = tower.transformer.resblocks[0].attn.in_proj_weight
    with torch.no_grad():
        w.copy_(torch.cat([w[128:256], w[:128], w[256:]]))
        assert (tower(x) - theirs).abs().max().item() > 100 * TOL


def test_hf_checkpoint_of_another_architecture_is_refused(tmp_path: Path, capsys):
    transformers.CLIPVisionModel(_hf_config(**TINY)).save_pretrained(tmp_path / "small")
    out = tmp_path / "out.safetensors"
    assert cli_main(["convert", str(tmp_path / "small"), str(out), "--model", MODEL]) == 2
    err = capsys.readouterr().err
    assert "visual.class_embedding' has shape (128,) but ViT-B-32 expects (768,)" in err
    assert not out.exists()


def test_hf_unknown_key_is_an_error_not_skipped():
    hf = transformers.CLIPVisionModel(
        _hf_config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    )
    sd = dict(hf.state_dict())
    sd["encoder.layers.0.adapter.weight"] = torch.zeros(2)
    with pytest.raises(TatrError, match=r"adapter\.weight' is not part of a HF CLIP vision model"):
        open_clip_visual(sd, "x")


def test_vit_b16_checkpoint_refused_for_b32(tmp_path: Path):
    state = {k: torch.zeros(s, device="cpu") for k, s in visual_shapes("ViT-B-16").items()}
    path = tmp_path / "b16.safetensors"
    save_state_dict(state, path)
    expected = r"positional_embedding' has shape \(197, 768\) but ViT-B-32 expects \(50, 768\); .*architecture"
    with pytest.raises(TatrError, match=expected):
        convert(path, tmp_path / "o.safetensors", model="ViT-B-32")


# --- task_vectors pickles ------------------------------------------------------------------------


def test_task_vectors_pickle_is_read_without_its_classes(tmp_path: Path):
    clip = random_clip(seed=5)
    path = tmp_path / "finetuned.pt"
    save_task_vectors_pickle(path, clip)
    # the file names a class that no longer exists: a plain unpickle fails ...
    with pytest.raises((ModuleNotFoundError, AttributeError)):
        torch.load(path, weights_only=False)
    # ... the weights-only reader refuses it with a pointer to `tatr convert` ...
    with pytest.raises(TatrError, match="tatr convert"):
        load_state_dict(path)
    # ... and the safe reader recovers exactly the parameters
    out = tmp_path / "finetuned.safetensors"
    converted = convert(path, out, model=MODEL)
    assert converted.source_format == "task-vectors"
    assert "model.logit_scale" in converted.dropped and "model.token_embedding.weight" in converted.dropped
    visual = load_state_dict(out)
    expected = {f"visual.{k}": v for k, v in clip.visual.state_dict().items()}
    assert visual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(visual[key], value), key
    x = _images(n=1, seed=2)
    with torch.no_grad():
        assert torch.equal(_load_visual(random_clip(seed=6), visual).encode_image(x), clip.encode_image(x))


def test_safe_reader_runs_no_code_from_the_pickle(tmp_path: Path):
    marker = tmp_path / "pwned"
    module = throwaway_module("tv_evil")

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    Payload.__module__ = "tv_evil"
    module.Payload = Payload
    carrier = nn.Linear(2, 2)
    carrier.payload = Payload()
    path = tmp_path / "evil.pt"
    torch.save({"model": carrier}, path)  # any container: the payload runs when unpickled
    forget_module("tv_evil")
    with pytest.raises(TatrError):
        load_any(path)
    assert not marker.exists()
    # the same file through the trusted path really executes the payload: the check above can fail
    with pytest.raises(TatrError):
        load_pickled_module(path, trust_pickle=True)
    assert marker.exists()


def _subclass_pickle(path: Path) -> nn.Module:
    """A module with a buffer of a tensor subclass: rebuilding it needs the subclass's code."""
    module = throwaway_module("tv_subclass")

    class Scaled(torch.Tensor):
        pass

    Scaled.__module__ = "tv_subclass"
    Scaled.__qualname__ = "Scaled"
    module.Scaled = Scaled
    layer = nn.Linear(3, 3)
    layer.register_buffer("extra", torch.ones(3).as_subclass(Scaled))
    torch.save(layer, path)
    return layer


def test_tensor_subclass_needs_trust_pickle(tmp_path: Path):
    path = tmp_path / "sub.pt"
    try:
        layer = _subclass_pickle(path)
        with pytest.raises(PickleNeedsTrust, match="--trust-pickle"):
            load_pickled_module(path)
        sd = load_pickled_module(path, trust_pickle=True)  # class importable: trusted path works
        assert set(sd) == {"weight", "bias", "extra"}
        assert torch.equal(sd["weight"], layer.weight.detach())
    finally:
        forget_module("tv_subclass")


def test_cli_convert_says_when_trust_is_needed(tmp_path: Path):
    path = tmp_path / "sub.pt"
    try:
        _subclass_pickle(path)
    finally:
        forget_module("tv_subclass")
    proc = subprocess.run(
        [sys.executable, "-m", "tatr", "convert", str(path), str(tmp_path / "o.safetensors")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("tatr: error:") and "Traceback" not in proc.stderr
    assert "rerun with --trust-pickle" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_plain_state_dicts_in_every_open_clip_wrapping(tmp_path: Path):
    tower = _tiny_open_clip_tower(seed=7)
    visual = {f"visual.{k}": v for k, v in tower.state_dict().items()}
    text = {"token_embedding.weight": torch.randn(10, 8), "transformer.resblocks.0.ln_1.weight": torch.ones(8)}
    full = {**visual, **text, "logit_scale": torch.tensor(4.6)}
    variants = {
        "full.safetensors": full,
        "bare.pt": tower.state_dict(),
        "ddp.pt": {f"module.{k}": v for k, v in full.items()},
        "tv_weights.pt": {f"model.{k}": v for k, v in full.items()},
    }
    for name, sd in variants.items():
        path = tmp_path / name
        if path.suffix == ".pt":
            torch.save(dict(sd), path)
        else:
            save_state_dict(sd, path)
        converted = load_any(path)
        assert converted.state_dict.keys() == visual.keys(), name
        assert all(torch.equal(converted.state_dict[k], v) for k, v in visual.items()), name
        if name != "bare.pt":
            assert len(converted.dropped) == 3, name  # text tower and logit scale left out, and said so
    with pytest.raises(TatrError, match="not a CLIP image encoder in a known layout"):
        open_clip_visual({"fc.weight": torch.zeros(2, 2)}, "mlp.pt")


def test_convert_rejects_bad_arguments(tmp_path: Path):
    with pytest.raises(TatrError, match="no such file"):
        convert(tmp_path / "missing.pt", tmp_path / "o.safetensors")
    with pytest.raises(TatrError, match=r"must be a \.safetensors"):
        convert(tmp_path / "missing.pt", tmp_path / "o.pt")
    with pytest.raises(TatrError, match="unknown open_clip model 'ViT-B-33'; did you mean"):
        visual_shapes("ViT-B-33")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(TatrError, match="not a CLIP vision model"):
        load_any(tmp_path / "hf")
