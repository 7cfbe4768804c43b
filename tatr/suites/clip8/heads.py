"""The pretrained open_clip model: finding its weights offline, its image tower, its zero-shot heads.

Weights come from an open_clip model name plus either a pretrained tag (resolved in the local
Hugging Face or open_clip cache, downloaded only when the network is allowed) or a local file.
`HF_HUB_OFFLINE=1` is read at call time: then nothing is fetched, and a missing file is an error
that names every place that was searched.

Activation: open_clip ≥ 2.24 builds `ViT-B-32` with nn.GELU even for the `openai` tag and only
warns; the OpenAI weights (and every task_vectors checkpoint) were trained with QuickGELU. We take
`quick_gelu` from the tag's config (True for `openai`) unless the suite options say otherwise, as
task_vectors' open_clip 2.0 did implicitly. Getting this wrong costs several points of accuracy.

Heads follow task_vectors' `get_zeroshot_classifier`: per class, the mean of the L2-normalised
text embeddings of all templates, normalised again (`open_clip.build_zero_shot_classifier`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tatr.core.errors import TatrError
from tatr.core.registry import did_you_mean

_TRUE = {"1", "on", "yes", "true"}


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def fingerprint(path: Path) -> dict[str, Any]:
    """Identity of a large input file for cache keys: resolved path, size and mtime.

    Hashing 8 fine-tuned ViT-L/14 checkpoints (10 GB) on every run would cost half a minute; a
    changed file changes its size or mtime, which is what build tools rely on too.
    """
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def model_config(model_name: str) -> dict[str, Any]:
    import open_clip

    config = open_clip.get_model_config(model_name)
    if config is None:
        hint = did_you_mean(model_name, open_clip.list_models(), n=3)
        raise TatrError(f"unknown open_clip model '{model_name}'{hint}")
    return config


@dataclass(frozen=True)
class PretrainedSource:
    """Where θ_0 lives on disk, and the tag's settings when it came from a tag."""

    model: str
    path: Path
    tag: str | None
    tag_config: dict[str, Any]
    quick_gelu: bool

    def identity(self) -> dict[str, Any]:
        return {"model": self.model, "tag": self.tag, "file": fingerprint(self.path), "quick_gelu": self.quick_gelu}


def resolve_pretrained(
    model_name: str, pretrained: str, quick_gelu: bool | None = None, cache_dir: str | None = None
) -> PretrainedSource:
    """A pretrained tag or a local file → the local weights file; one-line errors otherwise."""
    import open_clip

    config = model_config(model_name)
    tag_config = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    if quick_gelu is None:
        quick_gelu = bool(config.get("quick_gelu", False) or tag_config.get("quick_gelu", False))
    if tag_config:
        path = _tag_file(model_name, pretrained, tag_config, cache_dir)
        return PretrainedSource(model_name, path, pretrained, tag_config, quick_gelu)
    path = Path(os.path.expandvars(pretrained)).expanduser()
    if not path.is_file():
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise TatrError(
            f"pretrained '{pretrained}' is neither a pretrained tag of {model_name} (known: {tags}) "
            f"nor a file: looked for {path.resolve()}"
        )
    return PretrainedSource(model_name, path, None, {}, quick_gelu)


def _tag_file(model_name: str, tag: str, cfg: dict[str, Any], cache_dir: str | None) -> Path:
    offline = hf_offline()
    looked: list[str] = []
    if cfg.get("hf_hub"):
        from huggingface_hub import constants, hf_hub_download

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" (default file) or "org/repo/file.bin"
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        errors = []
        for name in names:
            try:
                return Path(hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=offline))
            except Exception as exc:  # HF raises many types; all are reported together below
                errors.append(f"{type(exc).__name__}")
                looked.append(f"{repo}/{name}")
        where = cache_dir or constants.HF_HUB_CACHE
        if offline:
            raise TatrError(
                f"HF_HUB_OFFLINE is set and the weights of {model_name}/{tag} are not in the Hugging Face cache "
                f"{where} (looked for {', '.join(looked)}); download them once with network access, or set "
                "suite.pretrained to a local file"
            )
        if not cfg.get("url"):
            raise TatrError(
                f"could not fetch {model_name}/{tag} from the Hugging Face Hub ({', '.join(looked)}: "
                f"{', '.join(errors)}); set suite.pretrained to a local file"
            )
    url = cfg.get("url", "")
    target = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
    if target.is_file():
        return target
    looked.append(str(target))
    if offline:
        raise TatrError(
            f"HF_HUB_OFFLINE is set and the weights of {model_name}/{tag} are not cached "
            f"(looked for {', '.join(looked)}); download them once with network access, or set suite.pretrained "
            "to a local file"
        )
    import open_clip

    return Path(open_clip.download_pretrained_from_url(url, cache_dir=cache_dir))


def preprocess_config(source: PretrainedSource) -> dict[str, Any]:
    """open_clip's evaluation preprocessing for this model and tag, as a plain dict."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    size = model_config(source.model)["vision_cfg"].get("image_size", 224)
    return merge_preprocess_dict(asdict(PreprocessCfg(size=size)), source.tag_config)


def eval_transform(preprocess: dict[str, Any]) -> Any:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**preprocess), is_train=False)


def load_full_model(source: PretrainedSource, device: torch.device) -> nn.Module:
    """The whole pretrained CLIP (text tower included), for θ_0's image tower and the heads."""
    import open_clip

    try:
        model = open_clip.create_model(
            source.model, pretrained=str(source.path), force_quick_gelu=source.quick_gelu, device=device
        )
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        raise TatrError(f"{source.path}: not loadable as open_clip {source.model} weights ({first})") from None
    return model.eval()


def build_vision_tower(model_name: str, quick_gelu: bool) -> nn.Module:
    """An open_clip image tower on the meta device: no memory, no random init; load with assign."""
    from open_clip.model import _build_vision_tower

    config = model_config(model_name)
    with torch.device("meta"):
        return _build_vision_tower(config["embed_dim"], config["vision_cfg"], quick_gelu=quick_gelu)


@torch.no_grad()
def zero_shot_head(
    model: nn.Module, model_name: str, classnames: tuple[str, ...], templates: tuple[str, ...], device: torch.device
) -> Tensor:
    """[classes, dim] head with L2-normalised rows, from the text tower and the templates."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(model_name)
    weights = open_clip.build_zero_shot_classifier(
        model, tokenizer, classnames, templates, num_classes_per_batch=10, device=device
    )
    return weights.T.float().cpu().contiguous()
