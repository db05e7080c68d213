"""pretrain: raw text and code -> packed token shards (prepare, corpus, shards), then pretraining
with FSDP2 across ranks (train, checkpointing, data, metrics).

    python -m pretrain.prepare RAW --out data/tokens/natural      # or python -m pretrain.corpus
    python -m pretrain --config pretrain/configs/cpu.yaml          # train(TrainConfig...) as a library
"""
