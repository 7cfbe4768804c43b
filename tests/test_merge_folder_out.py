"""`tatr merge --out FOLDER` (issue 22): a Hugging Face model folder that transformers loads, with the merged
weights bit for bit, shards under the size asked for, the base's config and tokenizer, a model card that names
every input's sha256 and the trust region's cut per parameter group, and no input ever overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from tatr.cli import main  # noqa: E402
from tatr.cli.model_card import input_digest  # noqa: E402
from tatr.io.model_folder_writer import parse_size  # noqa: E402
from tests.lm_fixtures import tiny_llama, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    tok = tiny_tokenizer(bos=False)
    out = {}
    for i, name in enumerate(["base", "a", "b"]):
        model = tiny_llama(len(tok), seed=0)
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name, max_shard_size="40KB")
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def _merge(folders: dict[str, Path], out: Path, *extra: str) -> int:
    args = ["merge", "-p", str(folders["base"]), "-f", str(folders["a"]), str(folders["b"]), "--quiet"]
    return main([*args, "--method", "ties-sum", "--q", "0.99", "--lam", "0.5", "-o", str(out), *extra])


def test_the_folder_loads_and_holds_the_merge(folders: dict[str, Path], tmp_path: Path) -> None:
    assert _merge(folders, tmp_path / "merged.safetensors") in (0, None)
    assert _merge(folders, tmp_path / "out", "--out-shard-size", "30KB") in (0, None)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    per_shard = {s: [k for k, v in index["weight_map"].items() if v == s] for s in shards}
    sizes = {s: sum(t.numel() * t.element_size() for t in load_file(str(out / s)).values()) for s in shards}
    assert len(shards) > 1 and all(sizes[s] <= 30_000 or len(per_shard[s]) == 1 for s in shards)  # one big tensor
    single = load_file(str(tmp_path / "merged.safetensors"))
    assert set(index["weight_map"]) == set(single)
    for shard in shards:
        for key, value in load_file(str(out / shard)).items():
            assert torch.equal(value, single[key]) and value.dtype == single[key].dtype, key
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.state_dict()["model.norm.weight"], single["model.norm.weight"])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.encode("the cat sat") == transformers.AutoTokenizer.from_pretrained(folders["base"]).encode(
        "the cat sat"
    )
    card = (out / "README.md").read_text()
    for name in ("base", "a", "b"):
        assert input_digest(folders[name]) in card
    assert "| `model.layers.*.mlp.up_proj.weight` |" in card and "q: `0.99`" in card and "ties_k" in card
    assert _merge(folders, out) in (0, None)  # an earlier tatr merge may be replaced: one file now
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()


def test_digests_in_background_are_the_card_digests(folders: dict[str, Path], tmp_path: Path) -> None:
    """The inputs hashed on a second thread give `input_digest`'s values, for folders and files; a failure is
    raised in the waiting thread."""
    from tatr.cli.model_card import digests_in_background

    single = tmp_path / "one.safetensors"
    single.write_bytes(b"not a checkpoint, just bytes")
    paths = [folders["base"], folders["a"], single, folders["a"]]
    assert digests_in_background(paths)() == {p: input_digest(p) for p in paths}
    with pytest.raises(FileNotFoundError):
        digests_in_background([tmp_path / "missing.safetensors"])()


def test_folder_outputs_refuse_what_they_cannot_write_safely(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in folders["a"].iterdir()}
    cases = {
        str(folders["a"]): "is (inside) an input",
        str(folders["base"] / "sub"): "is (inside) an input",
    }
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    cases[str(user)] = "not empty and not an earlier tatr merge"
    for out, message in cases.items():
        assert _merge(folders, Path(out)) == 2
        assert message in capsys.readouterr().err
    assert _merge(folders, tmp_path / "x", "--out-shard-size", "lots") == 2
    assert "--out-shard-size must be a size" in capsys.readouterr().err
    assert (user / "notes.txt").read_text() == "mine"
    assert {p.name: p.stat().st_mtime_ns for p in folders["a"].iterdir()} == before
    file_base = tmp_path / "base.safetensors"
    assert _merge(folders, tmp_path / "m.safetensors") in (0, None)
    (tmp_path / "m.safetensors").rename(file_base)
    assert main(["merge", "-p", str(file_base), "-f", str(folders["a"]), "-o", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "-p must be a Hugging Face model folder" in capsys.readouterr().err


def test_sizes_and_shards_follow_transformers() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1000") == 1000
