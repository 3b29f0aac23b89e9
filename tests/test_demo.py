"""``kvplug demo``'s reading of the server's KV pool (no server)."""

from kvplug.demo import PoolUse


def test_pool_tokens_are_the_engines_own_count_over_its_kv_cache_groups(tmp_path):
    """With a KV-cache group per layer a block holds one layer's KV: 960 blocks of 32 hold
    1024 tokens (the engine's log), not 30720."""
    log = tmp_path / "vllm-serve.log"
    log.write_text("INFO [kv_cache_utils.py:2327] CPU KV cache size: 1,024 tokens, Maximum "
                   "concurrency for 384 tokens per request: 2.67x\n")
    pool = PoolUse("http://127.0.0.1:1", log)
    pool.blocks, pool.block_size, pool.samples = 960, 32, [0.5, 0.25]
    assert pool.summary() == ("peak 512 tokens (50.0%), decoding 256 tokens (25.0%) of a "
                              "1024-token pool (960 blocks of 32)")
