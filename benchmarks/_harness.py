"""The benchmark scripts' handle on the one harness, :mod:`fastmae.train.harness` (environment record, synchronised
timing, results JSON rewritten after every row, tables between markers, one-line errors), which ``fastmae bench``
uses too; nothing is defined here."""

from fastmae.train.harness import (  # noqa: F401
    RESULTS,
    Rows,
    cli,
    env_info,
    free_memory,
    is_oom,
    median,
    one_line,
    report,
    results_path,
    row_error,
    sync,
    time_interleaved,
    time_ms,
    write_results,
)
