"""Fixed samples of examples: the same examples on every run, chosen by content hash.

Both data preparation (`supportlm.train.data.dataset`) and the mixture weights
(`supportlm.train.data.mixture`) sample, so the sampling sits below both of them.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict

from supportlm.errors import SupportLMError
from supportlm.train.data.examples import Example


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sample_examples(examples: list[Example], max_examples: int) -> list[Example]:
    """A deterministic sample of `max_examples` examples, in their original order.

    Keeps the examples with the smallest content hash rather than the first ones, because files
    are often sorted (the Bitext CSV by intent) and the first few hundred would be one intent.
    """
    if max_examples < 1:
        raise SupportLMError(f"max_examples must be at least 1, got {max_examples}.")
    if len(examples) <= max_examples:
        return list(examples)
    by_hash = sorted(
        range(len(examples)), key=lambda i: sha256_text(json.dumps(examples[i].messages))
    )
    chosen = by_hash[:max_examples]
    return [examples[i] for i in sorted(chosen)]


def stratified_sample(examples: list[Example], size: int) -> list[Example]:
    """A fixed sample of `size` examples, each stratum (intent, else task) in proportion.

    Within a stratum examples are ranked by content hash, and the k-th of n gets the key
    (k + 0.5) / n: taking the smallest keys gives every stratum its share to within one example.
    The sample is the same on every run and at every evaluation of a run, so successive
    validation losses compare checkpoints on the same questions. Kept in the original order.
    """
    if len(examples) <= size:
        return list(examples)
    strata: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        strata[str(example.meta.get("intent") or example.meta.get("task") or "")].append(index)
    keys: dict[int, tuple[float, str]] = {}
    for indices in strata.values():
        hashes = {i: sha256_text(json.dumps(examples[i].messages)) for i in indices}
        for rank, index in enumerate(sorted(indices, key=hashes.__getitem__)):
            keys[index] = ((rank + 0.5) / len(indices), hashes[index])
    chosen = sorted(keys, key=keys.__getitem__)[:size]
    return [examples[i] for i in sorted(chosen)]
