"""`selfablate <command>`: one parser built from the commands their modules register
(`config.Command`); flags are generated from the options' dataclasses (types, choices and help text
come from the fields and their docstrings), so there is no hand-kept flag list."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Literal, NoReturn, Sequence

from .config import PRESETS, Command, field_docs, field_type, get_preset, list_item_type, literal_choices, parse_list
from .errors import SelfAblateError
from .files import check_output_folder

# -- flags from dataclasses -------------------------------------------------------------------


def add_fields(parser: argparse.ArgumentParser, cls: type, title: str, base: Any = None) -> None:
    """One --flag per field of dataclass `cls`. Defaults are left unset (SUPPRESS) so that only
    what the user typed overrides the preset; the help shows `base`'s values (the default
    preset's) where given, else the dataclass's."""
    group = parser.add_argument_group(title)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        kind = field_type(cls, f.name)
        flag = "--" + f.name.replace("_", "-")
        value = f.default if base is None else getattr(base, f.name)
        # argparse formats help with %: a literal one (a docstring's "95%") must be doubled.
        shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) \
            if isinstance(value, tuple) else value
        help_text = f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif getattr(kind, "__origin__", None) is Literal:
            group.add_argument(flag, choices=literal_choices(cls, f.name), default=argparse.SUPPRESS, help=help_text)
        elif list_item_type(kind) is not None:
            group.add_argument(flag, type=list_type(list_item_type(kind)), default=argparse.SUPPRESS,
                               metavar=f"{f.name.upper()},...", help=help_text)
        else:
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def list_type(item: Any) -> Callable[[str], tuple]:
    """argparse's `type` for a list-valued field: `config.parse_list`, its error as argparse's."""
    def parse(text: str) -> tuple:
        try:
            return parse_list(item, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def overrides(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}


def build(cls: type, ns: argparse.Namespace, base: Any = None) -> Any:
    """The dataclass from `base` (or its defaults) with the user's flags applied."""
    return dataclasses.replace(base, **overrides(ns, cls)) if base is not None else cls(**overrides(ns, cls))


# -- the commands -------------------------------------------------------------------------------

DEFAULT_PRESET = "cpu-small"
"""The preset a command with presets starts from when no --preset is given."""

COMMAND_MODULES = ("train", "eval.lm", "generate", "checkpoint", "eval.evaluate", "report.circuits", "sae.train",
                   "explain.run",
                   "reproduce")
"""Where the commands live: each module registers its own as COMMAND (reproduce also REPORT_COMMAND)."""


def commands() -> list[Command]:
    found = []
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"selfablate.{name}")
        found += [getattr(module, attr) for attr in ("COMMAND", "REPORT_COMMAND") if hasattr(module, attr)]
    return found


def add_command(sub: argparse._SubParsersAction, command: Command) -> None:
    p = sub.add_parser(command.name, help=command.help, description=command.help)
    for arg in command.args:
        if arg.default is not None:
            # argparse passes a string default through `type` too: the list default is parsed alike
            p.add_argument("--" + arg.name.replace("_", "-"), dest=arg.name, default=arg.default, help=arg.help,
                           type=list_type(arg.item) if arg.item else None)
        else:
            p.add_argument(arg.name, nargs=arg.nargs, choices=arg.choices, help=arg.help)
    bases = {}
    if command.preset:
        p.add_argument("--preset", default=DEFAULT_PRESET, help=f"one of {', '.join(PRESETS)} (default: "
                       f"{DEFAULT_PRESET}; the defaults below are its values)")
        bases = {type(c): c for c in get_preset(DEFAULT_PRESET)}
    for cls in command.options:
        add_fields(p, cls, cls.__doc__.splitlines()[0] if cls.__doc__ else cls.__name__, bases.get(cls))
    p.set_defaults(command=command)


def run(command: Command, ns: argparse.Namespace) -> None:
    """Build the command's options from the flags (over the preset's values) and call it."""
    defaults = (command.base(ns) if command.base else None) or (get_preset(ns.preset) if command.preset else ())
    bases = {type(c): c for c in defaults}
    options = [build(cls, ns, bases.get(cls)) for cls in command.options]
    for opts in options:  # where results go is checked before any compute
        if isinstance(getattr(opts, "out", None), str) and opts.out:
            check_output_folder(opts.out)
    command.run(*options, **{arg.name: getattr(ns, arg.name) for arg in command.args})


# -- parser -----------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one line (its usage of a command runs to 30 lines and hides the error)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="selfablate", description="Train self-ablating transformers and evaluate their interpretability.")
    sub = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")
    for command in commands():
        add_command(sub, command)
    return parser


def _kernel_warnings_on_one_line() -> None:
    """The C kernels' warnings (no compiler, a failed build) as one line each, without a source line.
    Installed once per process: main() may run many times (tests), each would wrap the last."""
    from .ops.kernels import KernelWarning

    default = warnings.showwarning
    if getattr(default, "selfablate_one_line", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, KernelWarning):
            print(message, file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    show.selfablate_one_line = True  # type: ignore[attr-defined]
    warnings.showwarning = show


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or torchrun's stop), raised where the process is, like Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    ns = make_parser().parse_args(argv)
    _kernel_warnings_on_one_line()
    # Only the main thread may set a handler; elsewhere (a thread of a host program) SIGTERM stays its own.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        run(ns.command, ns)
    except SelfAblateError as e:
        print(f"selfablate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"selfablate: {what}; what was finished is intact (train: continue with --resume; reproduce: "
              "run the same command again)", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
