"""Expectations every contract module uses: column sets and the dtypes that count as numbers."""

import great_expectations as gx

E = gx.expectations
INTEGER_TYPES = ["int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64"]
NUMBER_TYPES = [*INTEGER_TYPES, "float", "float16", "float32", "float64", "Float32", "Float64"]


def exact_columns(*names: str) -> list:
    """The table has exactly ``names`` and none of them is null."""
    return [
        E.ExpectTableColumnsToMatchSet(column_set=list(names), exact_match=True),
        *[E.ExpectColumnValuesToNotBeNull(column=c) for c in names],
    ]
