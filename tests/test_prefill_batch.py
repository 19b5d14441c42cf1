"""forward.prefill_batch: several sequences' new tokens (misses at scattered slots, then the
question) in one pass give each sequence what its own prefill gives: the same last logits and KV."""

from __future__ import annotations

import pytest
import torch

from test_engine_door import tiny_engine
from tiny_models import random_ids


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batched_prefill_equals_each_sequence_on_its_own(family):
    from kvlib.engine.compose import ChunkKV, compose
    from kvlib.engine.forward import prefill_batch
    from kvlib.engine.generate import start
    from kvlib.engine.session import compute_misses

    engine = tiny_engine(family, 7)
    layouts, suffixes = [], []
    for seed, sizes in ((1, (6, 8, 5)), (2, (9, 4, 7, 3))):
        ids = [random_ids(n, seed * 50 + n) for n in sizes]
        layouts.append([engine.encode(i) if k % 2 == 0 else ChunkKV(i, None, None) for k, i in enumerate(ids)])
        suffixes.append(random_ids(4 + seed, seed).tolist())
    alone, batched, seqs = [], [], []
    for layout, suffix in zip(layouts, suffixes):
        own = compose(engine.lm, engine.context, layout, "rerope", extra=len(suffix) + 2)
        compute_misses(engine.lm, own, layout)
        alone.append((own, start(engine.lm, own, suffix, max_new_tokens=1).first_logits))
        mine = compose(engine.lm, engine.context, layout, "rerope", extra=len(suffix) + 2)
        at = torch.cat([torch.arange(s, s + layout[i].n_tokens) for s, i in mine.misses])
        ids = torch.cat([layout[i].token_ids for _, i in mine.misses])
        end = mine.cache.length
        mine.cache.commit(end + len(suffix))
        seqs.append((mine.cache, torch.cat([ids, torch.tensor(suffix)]), torch.cat([at, torch.arange(end, end + len(suffix))])))
        batched.append(mine)
    logits = prefill_batch(engine.lm, seqs)
    assert logits.shape[0] == 2
    for (own, first), mine, got in zip(alone, batched, logits):
        torch.testing.assert_close(got, first, atol=1e-5, rtol=1e-5)
        n = own.cache.length
        assert mine.cache.length == n
        torch.testing.assert_close(mine.cache.k[:, :, :n], own.cache.k[:, :, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.cache.v[:, :, :n], own.cache.v[:, :, :n], atol=1e-5, rtol=1e-5)
