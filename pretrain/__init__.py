"""Pretraining: raw text and code -> packed token shards, then FSDP2 training (not built yet)."""
