"""Data layer: records, readers (LAReQA, MIRACL, Tatoeba bitext, generic pairs) and Parquet pair shards."""

from hbt_ray.data.records import (
    BITEXT_GROUPS,
    PAIR_SCHEMA,
    BadRecords,
    BitextSet,
    Candidate,
    DataError,
    EvalQuery,
    EvalSet,
    Pair,
    PairGroup,
    data_dir,
)

__all__ = [
    "PAIR_SCHEMA",
    "BITEXT_GROUPS",
    "BadRecords",
    "BitextSet",
    "Candidate",
    "DataError",
    "EvalQuery",
    "EvalSet",
    "Pair",
    "PairGroup",
    "data_dir",
]
