"""The LMDB result cache and the durable job store (issue 5; nothing here yet)."""
