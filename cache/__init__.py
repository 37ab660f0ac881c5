"""The LMDB result cache (frequent results, may lose entries) and the durable job store."""
