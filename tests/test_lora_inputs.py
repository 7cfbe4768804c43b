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


def _svd_reference(delta: torch.Tensor, new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft/tuners/lora/model.py::_svd_generalized_task_arithmetic_weighted_adapter's cut (0.21, clamp=None,
    full_matrices=True, driver=None), literally: returns (lora_A, lora_B)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=True, driver=None)
    U = U[:, :new_rank]
    S = S[:new_rank]
    U = U @ torch.diag(S)
    Vh = Vh[:new_rank, :]
    return Vh, U


def test_a_lora_output_is_the_merged_update_peft_loads(adapters: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tatr.cli import main
    from tatr.core.lora import lora_factors

    args = ["merge", "-p", str(adapters["base"]), "-f", str(adapters["a"]), str(adapters["b"]), "--quiet"]
    args += ["--trust-region", "off", "--lam", "0.5"]
    assert main([*args, "-o", str(tmp_path / "full")]) in (0, None)
    assert main([*args, "-o", str(tmp_path / "lora"), "--out-format", "lora", "--rank", "8"]) in (0, None)
    base = transformers.AutoModelForCausalLM.from_pretrained(adapters["base"])
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "lora").merge_and_unload()
    full = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    got, want = loaded.state_dict(), full.state_dict()
    for key in want:  # rank 8 ≥ the two rank-4 updates: exact up to float rounding
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=2e-6)
    factors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert {k.split(".lora_")[0] for k in factors} == {
        f"base_model.model.{k.removesuffix('.weight')}"
        for k in want
        if any(m in k for m in ("q_proj", "v_proj", "down_proj"))
    }
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 7, generator=g)
    for r in (1, 3, 7):
        a, b = lora_factors(delta, r)
        ref_a, ref_b = _svd_reference(delta, r)
        torch.testing.assert_close(b @ a, ref_b @ ref_a, rtol=1e-5, atol=1e-5)
    assert main([*args, "-o", str(tmp_path / "x"), "--out-format", "lora"]) == 2  # no --rank: one line
