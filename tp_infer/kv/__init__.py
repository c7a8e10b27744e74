"""The KV cache: the paged pool on every rank; on rank 0 the block allocator and the prefix tree over token ids."""
