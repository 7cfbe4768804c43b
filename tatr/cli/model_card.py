"""The `README.md` model card of a merged model folder (`tatr merge --out FOLDER`).

What mergekit's card says (the base, the inputs, the method, the configuration), and what a reader needs to
trust and redo the merge: each input's sha256, the trust-region mode, q and the fraction of coordinates
dropped per parameter group, the tatr version and the command.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tatr.core.cache import file_digest
from tatr.core.lora import CONFIG, WEIGHTS, is_adapter_folder
from tatr.core.model_folders import weight_map

MARKER = "<!-- merged with tatr -->"  # a folder holding this card may be replaced by a new merge


def input_digest(path: Path) -> str:
    """sha256 of a checkpoint file; of a model folder, sha256 over its weight files' `name sha256` lines
    (sorted by name; a LoRA adapter's config and weights), so the same folder always agrees."""
    if not path.is_dir():
        return file_digest(path)
    if is_adapter_folder(path):
        shards = [path / CONFIG, path / WEIGHTS]
    else:
        files = weight_map(path)
        shards = sorted({files} if isinstance(files, Path) else set(files.values()))
    lines = "".join(f"{f.name} {file_digest(f)}\n" for f in shards)
    return hashlib.sha256(lines.encode()).hexdigest()


def digests_in_background(paths: Sequence[Path]) -> Callable[[], dict[Path, str]]:
    """Start hashing `paths` on a second thread, and return the call that waits for their digests.

    Why: hashing every input is a read of every byte at ~0.6 GB/s (16 s of a 45 s 1B-parameter merge, T = 4);
    hashlib and file reads release the GIL, so on a second core it overlaps the merge instead of following it.
    A daemon thread, so that a merge that stops on an error exits at once instead of waiting for the hashes."""
    done: dict[Path, str] = {}
    failed: list[BaseException] = []

    def work() -> None:
        try:
            for p in dict.fromkeys(paths):
                done[p] = input_digest(p)
        except BaseException as exc:  # raised again by the waiting call, in the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=work, name="tatr-digests", daemon=True)
    thread.start()

    def wait() -> dict[Path, str]:
        thread.join()
        if failed:
            raise failed[0]
        return done

    return wait


def group_of(key: str) -> str:
    """A parameter group: the key with its layer numbers as `*` (model.layers.*.mlp.up_proj.weight)."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", key)


def dropped_by_group(mask: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    groups: dict[str, tuple[int, int]] = {}
    for key, (dropped, numel) in mask.items():
        d, n = groups.get(group_of(key), (0, 0))
        groups[group_of(key)] = (d + dropped, n + numel)
    return groups


def model_card(
    base: Path,
    inputs: Sequence[Path],
    settings: Mapping[str, object],
    mask: Mapping[str, tuple[int, int]] | None,
    version: str,
    command: str | None = None,
    sections: Sequence[str] = (),
    digests: Mapping[Path, str] | None = None,
) -> str:
    """The card's text; `sections` (markdown, e.g. the mergekit YAML merged) go before the command; `digests`
    (`digests_in_background`'s) where the inputs were hashed already."""
    digest = (lambda p: digests[p]) if digests is not None else input_digest
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, tatr, trust-region]",
        "---",
        MARKER,
        "# Merged model",
        "",
        f"Merged with [tatr](https://arxiv.org/abs/2501.15065) {version}: θ = θ_0 + λ·M over the task vectors "
        "τ_t = θ_t − θ_0, with the trust region dropping the coordinates where the task vectors conflict most.",
        "",
        "## Inputs",
        "",
        "| role | path | sha256 |",
        "|---|---|---|",
        f"| base (θ_0) | `{base}` | `{digest(base)}` |",
        *(f"| task {i} | `{p}` | `{digest(p)}` |" for i, p in enumerate(inputs, 1)),
        "",
        "## Configuration",
        "",
        *(f"- {name}: `{value}`" for name, value in settings.items()),
        "",
    ]
    if mask:
        total_d = sum(d for d, _ in mask.values())
        total_n = sum(n for _, n in mask.values())
        lines += [
            "## Trust region",
            "",
            f"{total_d:,} of {total_n:,} merged coordinates dropped "
            f"({100 * total_d / max(total_n, 1):.3f}%), per group:",
            "",
            "| parameter group | dropped | coordinates | fraction |",
            "|---|---:|---:|---:|",
            *(
                f"| `{g}` | {d:,} | {n:,} | {100 * d / max(n, 1):.3f}% |"
                for g, (d, n) in dropped_by_group(mask).items()
            ),
            "",
        ]
    lines += [*sections]
    command = command if command is not None else shlex.join(["tatr", *sys.argv[1:]])
    lines += ["## Command", "", "```", command, "```", ""]
    return "\n".join(lines)
