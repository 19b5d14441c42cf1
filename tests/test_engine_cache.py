import torch

from kvlib.engine.cache import KVCache


def test_a_pooled_buffer_taken_in_inference_mode_is_writable_outside_it():
    """The pool reuses a freed cache's buffer; one first allocated under inference_mode must not
    become an inference tensor that a later, ordinary caller cannot write."""
    args = (2, 1, 4, 8, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        first = KVCache(*args)
        first.append(torch.ones(2, 1, 3, 4), torch.ones(2, 1, 3, 4))
    del first
    again = KVCache(*args)
    again.append(torch.full((2, 1, 3, 4), 2.0), torch.full((2, 1, 3, 4), 2.0))
    assert torch.equal(again.read(0, 3)[0], torch.full((2, 1, 3, 4), 2.0))


def test_a_live_cache_is_never_handed_out_again():
    args = (2, 1, 4, 8, torch.float32, torch.device("cpu"))
    a, b = KVCache(*args), KVCache(*args)
    a.append(torch.ones(2, 1, 3, 4), torch.ones(2, 1, 3, 4))
    b.append(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4))
    assert torch.equal(a.read(0, 3)[0], torch.ones(2, 1, 3, 4))
