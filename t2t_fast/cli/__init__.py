"""The ``t2t-fast`` command: ``t2t-fast {train,eval,predict,finetune,bench,info} [options]``.

One module per command in this package, each with ``build_parser()`` / ``main(argv=None)``; the dispatcher
imports only the command it runs."""
import importlib
import sys

COMMANDS = {
    "train": ("t2t_fast.cli.train", "train a T2T-ViT (the paper's recipe; no --data: a built-in demo on 8x8 digits)"),
    "eval": ("t2t_fast.cli.evaluate", "top-1/top-5 of a checkpoint on an ImageFolder"),
    "predict": ("t2t_fast.cli.predict", "classify image files or folders with a checkpoint (top-k classes)"),
    "finetune": ("t2t_fast.cli.finetune", "transfer a checkpoint to a new dataset (the official CIFAR recipe)"),
    "bench": ("t2t_fast.cli.bench", "throughput table, JSON and plot: fused vs reference vs torch.compile"),
    "info": ("t2t_fast.cli.info", "versions and which backends / kernels are available"),
}


def usage():
    lines = ["usage: t2t-fast COMMAND [options]   (t2t-fast COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    """Entry point of ``t2t-fast``; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"t2t-fast: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from t2t_fast.backend import BackendUnavailableError, SettingError

    try:
        module = importlib.import_module(COMMANDS[command][0])
        return module.main(rest)
    except KeyboardInterrupt:  # Ctrl-C before a command's own handler (run_command) is in place
        print("t2t-fast: interrupted", file=sys.stderr)
        return 130
    except (BackendUnavailableError, SettingError) as exc:  # --backend, T2T_FAST_* settings this machine lacks
        print(f"t2t-fast: error: {exc}", file=sys.stderr)
        return 2
