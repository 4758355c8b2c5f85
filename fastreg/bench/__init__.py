"""The benchmark behind ``python -m fastreg bench`` and the ``benchmarks/`` suite.

Every timed thing is a :class:`Case` (op, impl, dtype, size). :mod:`.grid` lists the
cases, :mod:`.baselines` builds each one's callable (fastreg and the native baselines),
:mod:`.timing` is the timer and the spread statistic, :mod:`.runner` times the
comparisons, :mod:`.load` watches what other processes take, :mod:`.provenance` records
the device and commit, :mod:`.report` prints, writes and plots; :mod:`.memory` is
``bench --memory``; :mod:`.tables` renders the tables of README.md and docs/ from the JSON
in benchmarks/results/ (``python -m fastreg.bench.tables``, not imported here). The names
callers use are importable from here.
"""

from fastreg.bench.baselines import (
    FUSED_UNAVAILABLE,
    PENALTY_UNAVAILABLE,
    Prepared,
    cached_params,
    copy_case,
    dropout_impl,
    fused_impl,
    make_params,
    penalty_api,
    penalty_foreach,
    penalty_grad_foreach,
    penalty_grad_loop,
    penalty_impl,
    penalty_loop,
    penalty_reference,
    prepare,
    saved_bytes,
)
from fastreg.bench.grid import (
    BASELINE,
    COMPILE_IMPL,
    CPU_SIZES,
    DEFAULT_PARAM_SETS,
    DROPOUT_IMPLS,
    DROPOUT_OPS,
    DTYPE_ALIASES,
    DTYPES,
    FAMILY,
    FUSED_IMPLS,
    FUSED_OPS,
    FUSED_WIDTH,
    GPU_SIZES,
    HOST_IMPLS,
    HOST_OPS,
    HOST_SETS,
    HOST_TENSOR_NUMEL,
    OP_GROUPS,
    OP_LABELS,
    OPS,
    PARAM_SETS,
    PENALTY_IMPLS,
    PENALTY_OPS,
    QUICK_DTYPES,
    QUICK_SIZES,
    Case,
    Settings,
    cases,
    human_size,
    param_set_numel,
    param_set_tensors,
    parse_list,
    parse_size,
)
from fastreg.bench.load import OTHERS_LIMIT, LoadMonitor, load_average
from fastreg.bench.provenance import commit, device_name, environment
from fastreg.bench.report import (
    PLOT_MISSING,
    SPEEDUP_LINE,
    SPREAD_TOO_WIDE,
    format_table,
    header_lines,
    is_results_path,
    json_path,
    load_line,
    load_refusal,
    plot,
    report,
    require_matplotlib,
    speedup_cells,
    timing_lines,
    write_json,
)
from fastreg.bench.runner import INTERRUPTED, Progress, comparisons, empty_row, num_threads, run
from fastreg.bench.timing import (
    L2_FLUSH_MIN_BYTES,
    SPREAD_LIMIT,
    Timer,
    l2_flush_bytes,
    quartiles,
    ratio_summary,
    spread_supports,
    time_measurement,
)
