"""`tatr merge --out FOLDER` out of core (issue 22, items 1 and 4): the merged tensors stream into the shards, so
no merged model is held, and the folder is the in-memory merge's folder file by file.

References: the shard split and the index are huggingface_hub's `split_torch_state_dict_into_shards` (the library
itself, run here on the merged tensors), the shard files are what safetensors' `save_file` writes for the same
tensors (parsed header and data bytes; its metadata order is a hash map's, so its bytes are not reproducible),
the weights are the single-file merge's, and transformers loads the folder with its embeddings tied.
"""

from __future__ import annotations

import errno
import gc
import json
import struct
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from tatr.cli import main  # noqa: E402
from tatr.core.errors import TatrError  # noqa: E402
from tatr.core.streamed_safetensors import SafetensorsStream  # noqa: E402
from tatr.io.model_folder_writer import INDEX, ShardedFolder, streamed_model_folder  # noqa: E402
from tests.lm_fixtures import tiny_llama, tiny_tokenizer  # noqa: E402

SHARD = "15KB"  # the tiny Llama is ~56 KB in bf16: at least 3 shards


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """θ_0 and two fine-tunes: sharded bf16 Llama folders with tied embeddings and a tokenizer."""
    root = tmp_path_factory.mktemp("bf16")
    tok = tiny_tokenizer(bos=False)
    out = {}
    for i, name in enumerate(["base", "a", "b"]):
        model = tiny_llama(len(tok), seed=0).to(torch.bfloat16)
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_((0.02 * torch.randn(p.shape, generator=g)).to(p.dtype))
        model.save_pretrained(root / name, max_shard_size="20KB")
        tok.save_pretrained(root / name)
        out[name] = root / name
    assert (out["base"] / INDEX).is_file() and "lm_head.weight" not in json.loads((out["base"] / INDEX).read_text())
    return out


def _merge(folders: dict[str, Path], out: Path, method: str, *extra: str) -> int | None:
    args = ["merge", "-p", str(folders["base"]), "-f", str(folders["a"]), str(folders["b"]), "--quiet"]
    args += ["--method", method, "--trust-region", "zero-shot", "--q", "0.9", "--lam", "0.7", "-o", str(out)]
    return main([*args, *extra])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tatr-tmp-"))


@pytest.mark.parametrize("method", ["ta", "ties-sum"])
def test_the_streamed_folder_is_the_in_memory_folder(folders: dict[str, Path], tmp_path: Path, method: str) -> None:
    streamed, memory, single = tmp_path / "streamed", tmp_path / "memory", tmp_path / "single.safetensors"
    assert _merge(folders, streamed, method, "--low-memory", "--out-shard-size", SHARD) in (0, None)
    assert _merge(folders, memory, method, "--in-memory", "--out-shard-size", SHARD) in (0, None)
    assert _merge(folders, single, method, "--in-memory") in (0, None)
    files = _files(streamed)
    assert files == _files(memory)  # every file byte for byte: shards, index, config, tokenizer, card
    assert "## Trust region" in files["README.md"].decode() and "config.json" in files and "tokenizer.json" in files
    index = json.loads(files[INDEX])
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and _leftovers(tmp_path) == []

    # the weights: the single-file merge's, bit for bit, in θ_0's dtypes (bf16) and keys (no lm_head: tied)
    reference = load_file(str(single))
    loaded = {k: v for shard in shards for k, v in load_file(str(streamed / shard)).items()}
    assert set(loaded) == set(reference) and "lm_head.weight" not in loaded
    for key, value in reference.items():
        assert value.dtype == loaded[key].dtype == torch.bfloat16, key
        assert torch.equal(value.view(torch.int16), loaded[key].view(torch.int16)), key

    # the split and the index: huggingface_hub's own, on the merged tensors in θ_0's (the base index's) order
    order = list(json.loads((folders["base"] / INDEX).read_text())["weight_map"])
    split = huggingface_hub.split_torch_state_dict_into_shards({k: loaded[k] for k in order}, max_shard_size=SHARD)
    assert index == {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    assert {name: set(keys) for name, keys in split.filename_to_tensors.items()} == {
        s: {k for k, v in index["weight_map"].items() if v == s} for s in shards
    }

    # each shard: what safetensors' save_file writes for its tensors (header as parsed JSON, data bytes)
    for shard in shards:
        with safe_open(str(streamed / shard), "pt") as fh:
            metadata = fh.metadata()
        assert metadata["format"] == "pt" and f"method={method} " in metadata["tatr"]
        save_file(load_file(str(streamed / shard)), str(tmp_path / "ref.safetensors"), metadata=metadata)
        assert _header(streamed / shard) == _header(tmp_path / "ref.safetensors"), shard

    model = transformers.AutoModelForCausalLM.from_pretrained(streamed)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    state = model.state_dict()
    assert torch.equal(state["model.embed_tokens.weight"], reference["model.embed_tokens.weight"])
    assert torch.equal(state["model.layers.1.mlp.down_proj.weight"], reference["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize(("flag", "bound"), [("--low-memory", 1), ("--in-memory", None)])
def test_out_of_core_no_merged_model_is_held(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, bound: int | None
) -> None:
    """At every write into a shard, count the tensors written before that are still alive: out of core at most
    one (the one just handed over may linger in a frame); in memory all of them (the merged dict), which shows
    the count can fail."""
    alive_at_put = _watch_puts(monkeypatch, ShardedFolder)
    assert _merge(folders, tmp_path / "out", "ties-sum", flag, "--out-shard-size", SHARD) in (0, None)
    assert len(alive_at_put) == len(load_file_keys(tmp_path / "out")) > 10
    if bound is None:
        assert alive_at_put == list(range(len(alive_at_put)))
    else:
        assert max(alive_at_put) <= bound


def _watch_puts(monkeypatch: pytest.MonkeyPatch, sink: type) -> list[int]:
    """At each `sink.put`, how many tensors put before are still alive (appended to the list returned)."""
    written: list[weakref.ref] = []
    alive_at_put: list[int] = []
    original = sink.put

    def watching(self: object, key: str, tensor: torch.Tensor) -> None:
        gc.collect()
        alive_at_put.append(sum(ref() is not None for ref in written))
        written.append(weakref.ref(tensor))
        original(self, key, tensor)

    monkeypatch.setattr(sink, "put", watching)
    return alive_at_put


def load_file_keys(folder: Path) -> list[str]:
    return list(json.loads((folder / INDEX).read_text())["weight_map"])


def test_an_error_mid_stream_leaves_no_folder_and_no_temporary(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills after a few tensors were written into their shards: one line, no folder, no temporary;
    an earlier tatr merge in the place of the output stays as it was."""
    out = tmp_path / "out"
    original = SafetensorsStream.put
    calls = []

    def filling(self: SafetensorsStream, key: str, tensor: torch.Tensor) -> None:
        calls.append(key)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, key, tensor)

    monkeypatch.setattr(SafetensorsStream, "put", filling)
    assert _merge(folders, out, "ta", "--low-memory", "--out-shard-size", SHARD) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and str(out) in err[0]
    assert not out.exists() and _leftovers(tmp_path) == [] and len(calls) == 6
    monkeypatch.setattr(SafetensorsStream, "put", original)
    assert _merge(folders, out, "ta", "--low-memory", "--out-shard-size", SHARD) in (0, None)
    before = _files(out)
    calls.clear()
    monkeypatch.setattr(SafetensorsStream, "put", filling)
    assert _merge(folders, out, "ties-sum", "--low-memory", "--out-shard-size", SHARD) == 2
    assert _files(out) == before and _leftovers(tmp_path) == []


def test_the_sharded_sink_patches_in_any_order_and_refuses_a_gap(folders: dict[str, Path], tmp_path: Path) -> None:
    """Tensors put in any order land in their shards; a patch (TIES' zero-sum coordinates) rewrites only its
    coordinates; a tensor left unwritten or a card not set commits nothing."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"w.{i}": torch.randn(40, 25, generator=g).to(torch.bfloat16) for i in range(5)}
    tensors["ids"] = torch.arange(7)
    layout = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    out = tmp_path / "sink"
    with streamed_model_folder(out, layout, folders["base"], folders["base"], 4500, {"tatr": "x"}) as folder:
        for key in reversed(list(tensors)):
            folder.put(key, tensors[key])
        idx = torch.tensor([0, 7, 999])
        folder.patch("w.2", idx, torch.tensor([1.5, -0.0, 3.0]))
        folder.card = "card"
    tensors["w.2"].view(-1)[idx] = torch.tensor([1.5, -0.0, 3.0], dtype=torch.bfloat16)
    index = json.loads((out / INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 3 and (out / "README.md").read_text() == "card"
    for name in set(index["weight_map"].values()):
        for key, value in load_file(str(out / name)).items():
            assert torch.equal(value.view(-1).view(torch.uint8), tensors[key].view(-1).view(torch.uint8)), key
    for missing_card in (False, True):
        with (
            pytest.raises(RuntimeError, match="not written" if not missing_card else "card was not set"),
            streamed_model_folder(tmp_path / "gap", layout, folders["base"], folders["base"], 4500, {}) as folder,
        ):
            for key, value in tensors.items():
                if missing_card or key != "w.3":
                    folder.put(key, value)
            folder.card = None if missing_card else "card"
        assert not (tmp_path / "gap").exists() and _leftovers(tmp_path) == []
    with (
        pytest.raises(TatrError, match=r"has no config\.json"),
        streamed_model_folder(tmp_path / "x", layout, tmp_path, tmp_path, 4500, {}),
    ):
        pass


def test_a_lora_output_out_of_core_is_the_in_memory_one(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--out-format lora streams the merge into a scratch file beside the output (no merged model held), which
    the SVDs read a tensor at a time: the adapter equals the in-memory merge's, and the scratch is gone."""
    flags = ("--out-format", "lora", "--rank", "4")
    alive_at_put = _watch_puts(monkeypatch, SafetensorsStream)
    assert _merge(folders, tmp_path / "low", "ties-sum", "--low-memory", *flags) in (0, None)
    assert len(alive_at_put) > 10 and max(alive_at_put) <= 1
    monkeypatch.undo()
    assert _merge(folders, tmp_path / "mem", "ties-sum", "--in-memory", *flags) in (0, None)
    low, mem = (
        load_file(str(tmp_path / "low" / "adapter_model.safetensors")),
        load_file(str(tmp_path / "mem" / "adapter_model.safetensors")),
    )
    assert list(low) == list(mem) and len(low) > 4
    assert all(torch.equal(low[k].view(torch.uint8), mem[k].view(torch.uint8)) for k in low)
    for name in ("adapter_config.json", "README.md"):
        assert (tmp_path / "low" / name).read_bytes() == (tmp_path / "mem" / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["low", "mem"]
