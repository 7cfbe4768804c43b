"""PEFT LoRA adapter folders as `-f` inputs (issue 22): each is θ_0 plus exactly the update PEFT's own
`merge_and_unload()` adds, so merging adapters equals merging the merged-and-unloaded models, bit for bit; what
tatr does not compute (DoRA, biases, modules saved whole) is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tatr import merge  # noqa: E402
from tatr.core.errors import TatrError  # noqa: E402
from tests.lm_fixtures import tiny_llama, tiny_tokenizer  # noqa: E402

VOCAB = len(tiny_tokenizer(bos=False))


def _adapter(root: Path, name: str, seed: int, **config) -> tuple[Path, Path]:
    """(adapter folder, the same adapter merged by PEFT into a full model folder)."""
    torch.manual_seed(seed)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **config
    )
    model = peft.get_peft_model(tiny_llama(VOCAB, seed=0), lora)
    model.save_pretrained(root / name)
    full = model.merge_and_unload()
    full.save_pretrained(root / f"{name}-full")
    return root / name, root / f"{name}-full"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    tiny_llama(VOCAB, seed=0).save_pretrained(root / "base")
    out = {"base": root / "base"}
    out["a"], out["a-full"] = _adapter(root, "a", 1)
    out["b"], out["b-full"] = _adapter(root, "b", 2, use_rslora=True)
    out["c"], out["c-full"] = _adapter(root, "c", 3, alpha_pattern={"v_proj": 32})
    return out


@pytest.mark.parametrize("trust_region", ["off", "zero-shot"])
def test_adapters_merge_as_peft_merged_models(adapters: dict[str, Path], trust_region: str) -> None:
    kwargs = {"method": "ties-sum", "trust_region": trust_region, "q": 0.9, "lam": 0.5}
    expected = merge(adapters["base"], [adapters[f"{t}-full"] for t in "abc"], **kwargs)
    got = merge(adapters["base"], [adapters[t] for t in "abc"], **kwargs)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    moved = [
        k
        for k in expected
        if not torch.equal(
            got[k], merge(adapters["base"], [adapters["a"], adapters["b"]], method="ta", trust_region="off", lam=0.0)[k]
        )
    ]
    assert moved and all(("q_proj" in k or "v_proj" in k or "down_proj" in k) for k in moved)


def test_what_tatr_does_not_compute_is_one_line(adapters: dict[str, Path], tmp_path: Path) -> None:
    for change, message in [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "LoRA biases"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "not a LoRA adapter"),
        ({"lora_alpha": "eight"}, "lora_alpha must be a number"),
    ]:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes((adapters["a"] / "adapter_model.safetensors").read_bytes())
        config = json.loads((adapters["a"] / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(TatrError, match=message) as err:
            merge(adapters["base"], [folder, adapters["b"]], trust_region="off")
        assert "\n" not in str(err.value)
