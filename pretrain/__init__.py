"""pretrain: pretraining with FSDP2 across ranks (train, checkpointing, data, metrics), reading
the packed token shards the prepare stage writes.

    python -m pretrain --config pretrain/configs/cpu.yaml          # train(TrainConfig...) as a library
"""
