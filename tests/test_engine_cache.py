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


def test_a_full_pool_drops_free_buffers_of_any_size_to_make_room():
    """Past its byte budget the pool drops free buffers, largest first, to keep the new one; buffers
    of other sizes (here 1k and 2k slots) must be told apart by identity, not by comparing values."""
    from kvlib.engine.cache import BufferPool

    slot_bytes = 2 * 2 * 1 * 4 * 4  # K and V, 2 layers, 1 head, head dim 4, float32
    pool = BufferPool(max_bytes=4096 * slot_bytes)
    take = lambda capacity: pool.take(2, 1, capacity, 4, torch.float32, torch.device("cpu"))  # noqa: E731
    small, big = take(1000), take(2000)  # 1,024 and 2,048 slots: 3,072 of the 4,096 allowed
    assert [b.shape[3] for b in pool.buffers] == [1024, 2048]
    del small, big  # both free now
    bigger = take(3000)  # 3,072 slots: only the 1,024-slot buffer may stay beside it
    assert [b.shape[3] for b in pool.buffers] == [1024, 3072] and pool.buffers[1] is bigger
