"""prepare: raw text and code -> packed token shards (tinyllama.formats.shards), the data every
training stage reads.

    python -m prepare RAW --out data/tokens/natural      # a file, folder or hub dataset (prepare.prepare)
    python -m prepare.corpus --out data                  # the default offline corpus (make data)

Rooms: sources (document readers) -> units (the source cut into independent pieces of work) ->
parts (each unit's tokens, written atomically) -> engine (datatrove's local pool or SLURM) ->
merge (parts into shards and the manifest). encoding and pieces tokenize at corpus speed.
"""
