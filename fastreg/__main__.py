"""The fastreg command line: ``python -m fastreg bench``, ``python -m fastreg demo`` and
``python -m fastreg build``."""

import argparse
import contextlib
import os
import signal
import sys

import torch

from fastreg import bench

BENCH_HELP = """\
Times fastreg against what you would run instead, in the same process: native
F.dropout (forward, backward, forward+backward, for each fastreg mask mode), the fused
bias+dropout+add and bias+GELU+dropout (each mask mode) against their native
composition, and the penalty against a Python loop and torch._foreach_norm, with the
copy bandwidth of the device measured at the same sizes. Each row: median time, GB/s
(bytes the op must move
/ time), that as a share of copy bandwidth, speedup against the native baseline, bytes
autograd keeps for backward per element (dropout, fused) or the relative error against
float64 (penalty). Rows of ops this build lacks say so. The penalty's host overhead:
penalty(list), Penalty(...)(module), penalty_grad_ and prox_l1_ on 148 and 1,000 tiny
CPU tensors against the Python loop, in microseconds (with torch.cat over the same list
for scale).

Method: the impls of each comparison are interleaved, round by round; the speedup is
the median of the per-round ratios, with their interquartile range ("spread too wide"
where it does not support a speedup). On the GPU, L2 is flushed before each timed call.
The JSON is not written into benchmarks/results/ from a run that other processes
competed with (--allow-load overrides). See docs/bench-method.md.

ops: dropout_fwd, dropout_bwd, dropout_fwdbwd, bias_dropout_add, bias_gelu_dropout,
penalty_value, penalty_fwdbwd, penalty_grad, host_penalty, host_penalty_step,
host_penalty_grad, host_prox_l1 (or the groups: dropout, fused, penalty, host, all).
sizes: 2^16 .. 2^28 on the GPU, 2^16 .. 2^24 on the CPU, every other power of two.
penalty parameter sets: mlp (a 50-layer 256x256 MLP: 100 tensors, 3.3M elements),
gpt2 (GPT-2 small: 148 tensors, 124M elements); mlp on the CPU, both on the GPU.
"""


def _checked(parse):
    """An argparse type from a parser that raises ValueError (argparse then says why)."""

    def convert(text):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def _dtypes(text):
    return bench.parse_list(text, list(bench.DTYPES), bench.DTYPE_ALIASES, what="dtype")


def _ops(text):
    return bench.parse_list(text, list(bench.OPS), groups=bench.OP_GROUPS, what="op")


def _params(text):
    return bench.parse_list(text, list(bench.PARAM_SETS), what="parameter set")


def _sizes(text):
    return [bench.parse_size(s) for s in text.split(",") if s.strip()]


def _probability(text):
    p = float(text)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"the dropout probability must be in [0, 1), but got {p}")
    return p


def _positive(text):
    n = int(text)
    if n < 1:
        raise ValueError(f"must be at least 1, but got {n}")
    return n


MEMORY_HF = ("llama-lora", "t5", "bert")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastreg", description="fastreg: fused dropout and L1/L2 penalties."
    )
    sub = parser.add_subparsers(dest="command", metavar="{bench,demo,build}")

    b = sub.add_parser(
        "bench",
        help="benchmark fastreg against native PyTorch",
        description=BENCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where to run (default: cuda when a GPU is visible, else cpu)",
    )
    b.add_argument(
        "--quick",
        action="store_true",
        help="a small grid (float32; 2^16 and 2^20 on the CPU, up to 2^24 on the "
        "GPU; the mlp parameter set) with shorter timing",
    )
    b.add_argument(
        "--dtype",
        type=_checked(_dtypes),
        metavar="LIST",
        help="comma-separated: float32, bfloat16, float16 (default: all three; "
        "float32 with --quick; with --memory, one: the model's dtype)",
    )
    b.add_argument(
        "--sizes",
        type=_checked(_sizes),
        metavar="LIST",
        help="dropout sizes in elements, comma-separated: 65536, 2^20, 16M",
    )
    b.add_argument(
        "--params",
        type=_checked(_params),
        metavar="LIST",
        help="penalty parameter sets, comma-separated: mlp, gpt2",
    )
    b.add_argument(
        "--ops",
        type=_checked(_ops),
        metavar="LIST",
        help="comma-separated ops or groups (default: all)",
    )
    b.add_argument(
        "--compile",
        action="store_true",
        help="add torch.compile of the native composition as a further baseline "
        "(compiles once per case: slow to start)",
    )
    b.add_argument(
        "--p", type=_checked(_probability), default=0.5, help="dropout probability (default: 0.5)"
    )
    b.add_argument(
        "--repeats",
        type=_checked(_positive),
        metavar="N",
        help="least number of rounds per comparison, one timed block of each impl "
        "per round (default: 5; 3 with --quick)",
    )
    b.add_argument(
        "--no-l2-flush",
        action="store_true",
        help="on the GPU, time blocks of back-to-back calls instead of flushing L2 "
        "before each call (small sizes then run from L2, launch overhead "
        "included)",
    )
    b.add_argument(
        "--allow-load",
        action="store_true",
        help="write the JSON into benchmarks/results/ even when other processes "
        "competed with the run (the JSON records the load)",
    )
    b.add_argument(
        "--threads",
        type=_checked(_positive),
        metavar="N",
        help="CPU threads (torch.set_num_threads; default: torch's choice)",
    )
    b.add_argument(
        "--json",
        metavar="PATH",
        help="also write the results as JSON; a folder (or a path ending in /) "
        "gets <device>.json, as in benchmarks/results/",
    )
    b.add_argument(
        "--plot",
        metavar="PATH",
        help="also draw bandwidth against size per impl as a PNG (needs matplotlib)",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    m = b.add_argument_group(
        "--memory",
        "train a small GPT-style model with nn.Dropout and fastreg.Dropout in "
        "each mask mode and report memory and step time (instead of the op benchmark); "
        "defaults: CPU 2 layers, width 128, 4 heads, batch 4, sequence 128, vocab 512; "
        "GPU GPT-2 small: 12 layers, width 768, 12 heads, batch 8, sequence 1024, vocab 50304",
    )
    m.add_argument("--memory", action="store_true", help="run the memory report")
    m.add_argument(
        "--model",
        choices=("all", "both", "own", "gpt2", "hf") + MEMORY_HF,
        default="all",
        help="fastreg's own GPT-style model, Hugging Face GPT-2 (eager attention; "
        "defaults: CPU 2 layers, width 64, 2 heads, batch 1, sequence 512, "
        "vocab 512; GPU 12 layers, width 768, 12 heads, batch 4, sequence "
        "1024), both of them, one of the Hugging Face models that show "
        "the dropped tensor regenerated (llama-lora: a PEFT LoRA Llama, t5, "
        "bert; defaults: CPU 1 layer, width 256, MLP 688, 4 heads, batch 1, "
        "sequence 512, vocab 512, LoRA r=8), hf (those three), or all "
        "(default); the options below shape every model",
    )
    m.add_argument("--layers", type=_checked(_positive), metavar="N", help="transformer blocks")
    m.add_argument("--width", type=_checked(_positive), metavar="N", help="model width")
    m.add_argument("--heads", type=_checked(_positive), metavar="N", help="attention heads")
    m.add_argument("--batch", type=_checked(_positive), metavar="N", help="batch size")
    m.add_argument("--seq", type=_checked(_positive), metavar="N", help="sequence length")
    m.add_argument("--vocab", type=_checked(_positive), metavar="N", help="vocabulary size")
    m.add_argument(
        "--steps",
        type=_checked(_positive),
        default=5,
        metavar="N",
        help="timed training steps after one warm-up (default: 5)",
    )
    m.add_argument(
        "--dropout",
        type=_checked(_probability),
        metavar="P",
        help="the model's dropout probability (default: 0.1)",
    )
    b.set_defaults(func=run_bench)

    d = sub.add_parser(
        "demo",
        help="dropout and L1/L2 penalties against overfitting",
        description="Part 1: 20 noisy samples of y = x + 0.3 noise, a "
        "1-300-300-1 MLP without regularization, with fastreg.Dropout(0.5), "
        "with an L2 and with an L1 penalty: train and test loss. Part 2: an "
        "MLP on scikit-learn's digits with and without dropout (0.2 and 0.5): "
        "test accuracy. CPU, fixed seeds, under a minute.",
    )
    d.add_argument(
        "--plot",
        metavar="PATH",
        help="draw the fitted curves of part 1 over the data as a PNG (needs matplotlib)",
    )
    d.add_argument(
        "--seed",
        type=int,
        default=0,
        help="first of part 1's three seeds: SEED, SEED+1, SEED+2 (default: 0)",
    )
    d.add_argument("--no-digits", action="store_true", help="skip part 2")
    d.set_defaults(func=run_demo)

    from fastreg import _build

    k = sub.add_parser(
        "build",
        help="compile the kernels against the torch installed here",
        description=_build.BUILD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _build.add_arguments(k)
    k.set_defaults(func=run_build)
    return parser


def _device(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "fastreg bench: --device cuda, but torch sees no GPU "
            f"(torch {torch.__version__}, CUDA {torch.version.cuda})"
        )
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def run_bench(args):
    from fastreg.bench import memory

    device = _device(args)
    if args.memory and args.plot:
        raise SystemExit("fastreg bench: --plot draws the op benchmark; --memory has no plot")
    if args.plot:
        try:
            bench.require_matplotlib()  # fail now, not after the run
        except ImportError as error:
            raise SystemExit(f"fastreg bench: {error}") from None
    with bench.num_threads(args.threads):
        env = bench.environment(device)
        settings = bench.Settings(p=args.p)
        monitor = bench.LoadMonitor(own_threads=torch.get_num_threads() if device == "cpu" else 1)
        if args.memory:
            return _run_memory(args, device, env, settings, memory, monitor)
        timer = bench.Timer(
            device,
            repeats=args.repeats or (3 if args.quick else 5),
            min_time_s=0.1 if args.quick else 0.3,
            l2_flush=not args.no_l2_flush,
        )
        grid = bench.cases(
            device,
            ops=args.ops or bench.OPS,
            dtypes=args.dtype,
            sizes=args.sizes,
            params=args.params,
            quick=args.quick,
            compile=args.compile,
        )
        with monitor, _sigterm_interrupts():
            rows, copy_rows = bench.run(grid, device, settings, timer, not args.no_progress)
        env["load"] = monitor.result
        print(bench.format_table(rows, env, settings, timer), flush=True)
        if args.json:
            _write_json(args, env, bench.report(env, settings, copy_rows, rows))
        if args.plot:
            try:
                print(f"plot: {bench.plot(rows, copy_rows, env, args.plot)}")
            except ValueError as error:  # nothing to draw (say, interrupted before any row)
                raise SystemExit(f"fastreg bench: {error}") from None
    return 0


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a time limit, such as `timeout`'s) raises KeyboardInterrupt inside, so that
    the bench reports and writes what it has timed instead of losing it."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_json(args, env, doc):
    """Writes the JSON, unless it goes to benchmarks/results/ from a run that other
    processes competed with (SystemExit then, after the table)."""
    path = bench.json_path(args.json, env)
    refusal = None if args.allow_load else bench.load_refusal(path, env.get("load"))
    if refusal:
        raise SystemExit(f"fastreg bench: {refusal}")
    print(f"\njson: {bench.write_json(path, doc)}", flush=True)


def _run_memory(args, device, env, settings, memory, monitor):
    import dataclasses

    given = {
        k: getattr(args, k)
        for k in ("layers", "width", "heads", "batch", "seq", "vocab")
        if getattr(args, k) is not None
    }
    if args.dropout is not None:
        given["p"] = args.dropout
    cfg = dataclasses.replace(memory.DEFAULTS[device], **given)
    gpt2_cfg = dataclasses.replace(memory.GPT2_DEFAULTS[device], **given)
    dtypes = args.dtype or ["float32"]
    if len(dtypes) != 1:
        raise SystemExit("fastreg bench --memory: give one --dtype")
    dtype = bench.DTYPES[dtypes[0]]
    hf_cfg = dataclasses.replace(memory.HF_DEFAULTS[device], **given)
    own = args.model in ("all", "both", "own")
    gpt2 = args.model in ("all", "both", "gpt2")
    hf = (
        memory.HF_MODELS
        if args.model in ("all", "hf")
        else (args.model,)
        if args.model in memory.HF_MODELS
        else ()
    )
    bar = bench.Progress(
        len(memory.VARIANTS) * own
        + len(memory.GPT2_VARIANTS) * gpt2
        + len(memory.HF_VARIANTS) * len(hf),
        enabled=not args.no_progress,
    )
    with monitor:
        rows = memory.run(cfg, device, dtype, args.steps, bar) if own else None
        gpt2_rows = memory.run_gpt2(gpt2_cfg, device, dtype, args.steps, bar) if gpt2 else None
        hf_rows = memory.run_hf(hf_cfg, device, dtype, args.steps, bar, hf) if hf else None
    env["load"] = monitor.result
    bar.done()
    lines = bench.header_lines(env)
    if own:
        print(memory.format_table(rows, cfg, dtypes[0], args.steps, lines), flush=True)
    else:
        print("\n".join(lines))
    if gpt2:
        print(memory.format_gpt2_table(gpt2_rows, gpt2_cfg, dtypes[0], args.steps), flush=True)
    if hf:
        print(memory.format_hf_tables(hf_rows, hf_cfg, dtypes[0], args.steps), flush=True)
    if args.json:
        _write_json(
            args,
            env,
            bench.report(
                env,
                settings,
                [],
                [],
                memory={
                    "config": dataclasses.asdict(cfg),
                    "dtype": dtypes[0],
                    "steps": args.steps,
                    "rows": rows,
                    "gpt2": None
                    if gpt2_rows is None
                    else {
                        "config": dataclasses.asdict(gpt2_cfg),
                        "rows": gpt2_rows,
                        "korthikanti_layer_bytes": memory.korthikanti(gpt2_cfg),
                    },
                    "hf": None
                    if hf_rows is None
                    else {"config": dataclasses.asdict(hf_cfg), "models": hf_rows},
                },
            ),
        )
    return 0


def run_demo(args):
    from fastreg import demo

    try:
        demo.main(seed=args.seed, plot_path=args.plot, skip_digits=args.no_digits)
    except ImportError as error:
        raise SystemExit(f"fastreg demo: {error}") from None
    return 0


def run_build(args):
    from fastreg import _build, _ops

    if args.print_cache:
        env = {"FASTREG_CPU_ONLY": "1"} if args.cpu_only else {}
        with _environ(env):
            print(os.path.join(_build.cache_root(), _build.cache_key(_build.spec())))
        return 0
    loaded = getattr(_ops._C, "__file__", None) if _ops.BACKEND == "extension" else None
    if loaded and not loaded.startswith(_build.cache_root()):
        print(
            f"note: an installed fastreg._C ({_ops._C.__file__}) is loaded first; the "
            "cached build is used where it is missing",
            file=sys.stderr,
        )
    try:
        path = _build.build_in_subprocess(
            force=args.force, cpu_only=args.cpu_only, verbose=args.verbose
        )
    except RuntimeError as error:
        raise SystemExit(str(error)) from None
    print(f"{path}\n`import fastreg` in a new process loads it.")
    return 0


@contextlib.contextmanager
def _environ(values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None):
    """Entry point of ``python -m fastreg`` and of the ``fastreg`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # as git: no command prints the help and succeeds
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
