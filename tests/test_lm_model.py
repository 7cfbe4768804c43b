"""θ_0 of the causal-LM suite from a GGUF file: dequantized once into a plain Hugging Face folder whose logits
equal the GGUF-loaded model's (issue 21), cached by the file's sha256; bad inputs are one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package comes with the [lm] extra")

from tatr.core.errors import TatrError
from tatr.suites.causal_lm.model import SOURCE_FILE, dequantized, load_causal_lm
from tests.lm_fixtures import tiny_llama, tiny_tokenizer, write_gguf


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = tiny_tokenizer(bos=False)
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_llama(len(tok), seed=3), tok)


def test_the_dequantized_folder_is_the_gguf_model(gguf_file: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = dequantized(gguf_file, cache_root=tmp_path)
    model, tok = load_causal_lm(folder)
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    text = "the cat sat on a mat while dogs ran"
    assert tok.encode(text) == ref_tok.encode(text)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    source = json.loads((folder / SOURCE_FILE).read_text())
    assert source["gguf"] == "tiny.gguf" and len(source["sha256"]) == 64
    assert source["parameters"] == sum(p.numel() for p in model.parameters())
    stamp = os.stat(folder / "model.safetensors").st_mtime_ns
    assert dequantized(gguf_file, cache_root=tmp_path) == folder  # read from the cache, not rebuilt
    assert os.stat(folder / "model.safetensors").st_mtime_ns == stamp


def test_bad_inputs_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(TatrError, match="no such GGUF file"):
        dequantized(tmp_path / "absent.gguf", cache_root=tmp_path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(TatrError, match="cannot read this GGUF"):
        dequantized(junk, cache_root=tmp_path / "cache")
    assert not any((tmp_path / "cache" / "lm-models").glob("*/model.safetensors"))  # nothing half-written
    with pytest.raises(TatrError, match="not a Hugging Face model folder"):
        load_causal_lm(tmp_path)


def test_prepare_lm_from_a_given_gguf(
    gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tatr.cli import main

    monkeypatch.setenv("TATR_CACHE", str(tmp_path))
    assert main(["prepare-lm", "--gguf", str(gguf_file)]) in (0, None)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    folder = Path(line.removeprefix("wrote ").split(":")[0])
    assert folder.parent == tmp_path / "lm-models" and (folder / "model.safetensors").is_file()
    assert main(["prepare-lm", "--gguf", str(tmp_path / "nope.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"tatr: error: {tmp_path / 'nope.gguf'}: no such GGUF file"


def test_tatr_merge_reads_gguf_inputs_as_their_dequantized_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    from tatr import merge
    from tatr.cli import main

    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    tok = tiny_tokenizer(bos=False)
    files = [write_gguf(tmp_path / f"m{i}.gguf", tiny_llama(len(tok), seed=i), tok) for i in range(3)]
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "-p", str(files[0]), "-f", str(files[1]), str(files[2]), "-o", str(out)]) in (0, None)
    assert capsys.readouterr().err.count("quantized approximation") == 1
    folders = [dequantized(f, cache_root=tmp_path / "cache") for f in files]
    expected = merge(folders[0], folders[1:], q=0.99, lam=0.3)
    got = load_file(str(out))
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
