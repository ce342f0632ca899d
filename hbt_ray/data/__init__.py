"""Data layer: records, readers (LAReQA, MIRACL, generic pairs) and Parquet pair shards."""

from hbt_ray.data.records import (
    PAIR_SCHEMA,
    BadRecords,
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
    "BadRecords",
    "Candidate",
    "DataError",
    "EvalQuery",
    "EvalSet",
    "Pair",
    "PairGroup",
    "data_dir",
]
