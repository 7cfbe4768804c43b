"""A tiny random-init BERT with its own WordPiece vocabulary, and generated text tasks, made on the spot.

Nothing is downloaded: the vocabulary is written by the test, the model is `BertModel(BertConfig(...))`
saved as safetensors, and the tasks are template sentences whose class word decides the label, in
all three task file formats (JSONL, CSV, one folder per class).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

COLORS = ("red", "green", "blue", "yellow")
ANIMALS = ("cat", "dog", "bird", "fish")
SIZES = ("tiny", "small", "large", "huge")
FILLER = ("the", "a", "is", "very", "near", "old", "new", "and", "with", "this", "one", "here", "seen", "today")
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def make_tiny_bert(folder: Path, pooling: str | None = None, layers: int = 2, hidden: int = 32) -> Path:
    """A random BERT (seeded) with a tokenizer over this file's words; `pooling` adds sentence-transformers files."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = [*SPECIAL, *sorted({*COLORS, *ANIMALS, *SIZES, *FILLER, "text", "about", "of", "in"}), ".", ","]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    if pooling is not None:
        (folder / "modules.json").write_text(
            json.dumps(
                [
                    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                ]
            )
        )
        (folder / "1_Pooling").mkdir(exist_ok=True)
        flags = {
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": pooling == "max",
            "pooling_mode_mean_sqrt_len_tokens": False,
        }
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden, **flags}))
    return folder


def sentences(classes: tuple[str, ...], per_class: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for label in classes:
        for _ in range(per_class):
            words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
            words.insert(rng.randint(0, len(words)), label)
            rows.append((" ".join(words) + ".", label))
    return rows


def make_tasks(folder: Path, per_class: int = 24) -> Path:
    """Three tasks, one per file format, and the tasks.yaml that lists them."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "colors.jsonl").open("w") as fh:
        for text, label in sentences(COLORS, per_class, 1):
            fh.write(json.dumps({"text": text, "label": label}) + "\n")
    with (folder / "animals.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sentence", "kind"])
        writer.writerows(sentences(ANIMALS, per_class, 2))
    for i, (text, label) in enumerate(sentences(SIZES, per_class, 3)):
        (folder / "sizes" / label).mkdir(parents=True, exist_ok=True)
        (folder / "sizes" / label / f"{i:04d}.txt").write_text(text)
    (folder / "tasks.yaml").write_text(
        "tasks:\n"
        "  - {name: colors, file: colors.jsonl, templates: ['this text is about {label}.', '{label}.']}\n"
        "  - {name: animals, file: animals.csv, text_field: sentence, label_field: kind}\n"
        "  - name: sizes\n    file: sizes\n    labels: {tiny: tiny, small: small, large: large, huge: huge}\n"
    )
    return folder / "tasks.yaml"


TINY_OPTIONS = {
    "max_length": 16,
    "n_train": 12,
    "n_val": 4,
    "n_test": 6,
    "finetune_steps": 6,
    "finetune_batch": 8,
    "finetune_lr": 1e-3,
    "progress": False,
}
