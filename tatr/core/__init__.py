"""The numerical core: checkpoints → task vectors → sensitivity → conflict Ω → mask → merge.

It imports torch and safetensors only (the import-linter contract in pyproject.toml holds it to
that) and works on any mapping of names to tensors: CLIP, an LLM, a toy MLP. Read it in this
order: `vectors` (τ_t = θ_t − θ_0, validated at the door), `trust_region` (Ω by prefix sums and
the exact radix select), `components`, `methods` (one generalized task-arithmetic merge) and
`options` (each method's options, declared once), `sparsify`, `passes` and `merging` (the
streaming passes and `MergePlan`), `gradients` (exemplar sensitivities) and `classify` (the one
cosine-to-head rule). `checkpoints`, `torchfile`, `torch_unpickler` and `pickled_modules` read
files without running code from them; `outputs` and `cache` own every write; `errors` and
`registry` give one-line errors and did-you-mean lookups.
"""
