"""reparam.errors: every error's family (what exit code the CLI gives it) and the one-line form of any exception."""

import pytest

from reparam import cli, errors
from reparam.errors import one_line


def test_one_line_takes_the_first_non_blank_line():
    assert one_line(ValueError("  bad shape \n  more detail\n")) == "bad shape"
    assert one_line(ValueError("\n\n  late start\nrest")) == "late start"
    assert one_line(ValueError("only line")) == "only line"


def test_one_line_names_the_type_of_a_blank_message():
    assert one_line(RuntimeError()) == "RuntimeError"
    assert one_line(KeyError("")) == "''"  # str(KeyError('')) is "''": a message, not a blank
    assert one_line(OSError("   \n ")) == "OSError"


def test_one_line_says_when_lines_were_left_out():
    assert one_line(ValueError("first\nsecond"), " (more)") == "first (more)"
    assert one_line(ValueError("first\n\n  "), " (more)") == "first"  # blank lines are not left-out text


@pytest.mark.parametrize("name", [n for n in errors.__all__ if n != "one_line"])
def test_every_error_is_a_reparam_error_of_one_family(name):
    cls = getattr(errors, name)
    assert issubclass(cls, errors.ReparamError)
    family = [f for f in (errors.InputError, errors.EquivalenceError) if issubclass(cls, f)]
    assert len(family) <= 1
    code = cli._error_line(cls("problem. fix"))[1]
    expected = {errors.InputError: cli.EXIT_USAGE, errors.EquivalenceError: cli.EXIT_FAILURE}
    assert code == (expected[family[0]] if family else cli.EXIT_FAILURE)
