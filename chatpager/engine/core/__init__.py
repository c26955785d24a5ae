"""How a request is kept and paged: requests and their groups, block keys, the block pool, the
block manager and the scheduler. Pure bookkeeping: no tensors, no torch (docs/ARCHITECTURE.md)."""
