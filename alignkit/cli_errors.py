"""The exit-code contract of every ``alignkit`` command and the checks that sort an error into it.

Shared by :mod:`alignkit.cli` and the sub-commands that live elsewhere (``alignkit flips``, ``evaluate``),
so that neither imports the other: a usage mistake or bad input is one line on stderr and exit 2, a bug is
a traceback and exit 3, a failed gate exit 1.
"""

from __future__ import annotations


# Exit codes of every command (README, "Exit codes"): 0 success, 1 a gate failed (alignkit flips
# --max-nfr), 2 bad input or usage (argparse's own code too), 3 an internal error (a bug: traceback shown).
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_BUG = 3
_INPUT_ERROR_MODULES = ("alignkit", "transformers.training_args", "transformers.hf_argparser", "yaml", "argparse")


def is_input_error(error: BaseException) -> bool:
    """Whether ``error`` is about the command's input (exit 2, one line) rather than a bug (exit 3).

    Input errors: the named ones (a bad record, an unusable output_dir or checkpoint, a malformed recipe),
    an ``OSError`` about a path (a missing or unwritable file), and a ``ValueError`` raised by a check in
    alignkit itself or in the recipe/argument parsers. A ``ValueError`` raised deep inside a library while
    computing is a bug, as is every other exception.
    """
    from alignkit.checkpoints import CheckpointError
    from alignkit.data.records import RecordError
    from alignkit.output_dir import OutputDirError

    if isinstance(error, (UsageError, RecordError, CheckpointError, OutputDirError)):
        return True
    from alignkit.verifiers.base import UnknownVerifierError, VerifierOptionError

    if isinstance(error, (UnknownVerifierError, VerifierOptionError)):  # a verifier name or option given
        return True
    if isinstance(error, ModuleNotFoundError):  # an optional extra alignkit asks for by name
        return _raised_in(error, ("alignkit",))
    if isinstance(error, OSError) and _raised_in(error, ("transformers", "huggingface_hub", "peft")) \
            and "from_pretrained" in _frame_names(error):
        return True  # a model or adapter that cannot be loaded (not found, not cached, not a model)
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)):
        return True  # a path given on the command line or in a recipe
    if isinstance(error, OSError):
        return error.filename is not None  # e.g. a full or read-only disk under an output path
    if type(error).__module__.split(".")[0] == "yaml":  # a recipe that is not valid YAML
        return True
    if isinstance(error, ValueError) and not isinstance(error, UnicodeError):
        return _innermost_module(error).startswith(_INPUT_ERROR_MODULES)
    return False


def _frames(error: BaseException):
    tb = error.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _frame_names(error: BaseException) -> set[str]:
    return {frame.f_code.co_name for frame in _frames(error)}


def _innermost_module(error: BaseException) -> str:
    """The module of the innermost frame of ``error``'s traceback (``""`` without one)."""
    last = None
    for last in _frames(error):
        pass
    return last.f_globals.get("__name__", "") if last is not None else ""


def _raised_in(error: BaseException, packages: tuple[str, ...]) -> bool:
    """Whether the innermost frame of ``error``'s traceback is in one of ``packages``."""
    return _innermost_module(error).split(".")[0] in packages


class UsageError(ValueError):
    """A command used wrongly: one line, exit 2."""


def check_verifier_name(name: str) -> None:
    """A ``ValueError`` (exit 2) naming the registered verifiers, and the close ones, for an unknown name."""
    from alignkit.verifiers.registry import registered_verifiers, unknown_verifier_message

    if name not in registered_verifiers():
        raise UsageError(unknown_verifier_message(name))
