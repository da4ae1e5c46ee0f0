"""first_line: the one-line reason of an exception in user messages."""

from __future__ import annotations

import pytest

from tinyptq.errors import first_line


@pytest.mark.parametrize("message", ["", "   ", "\n\n", " \t\n  \n"])
def test_an_empty_or_blank_message_gives_the_type_name(message):
    assert first_line(ValueError(message)) == "ValueError"
    assert first_line(RuntimeError()) == "RuntimeError"


def test_the_first_non_empty_line_is_kept():
    exc = RuntimeError("\n   \n  first line  \nsecond line\nthird")
    assert first_line(exc) == "first line"


def test_a_long_line_is_cut_to_the_limit():
    exc = OSError("x" * 500 + "\nmore")
    assert first_line(exc) == "x" * 200
    assert first_line(exc, 120) == "x" * 120
    assert first_line(OSError("short"), 120) == "short"


def test_a_message_of_several_arguments_and_a_key_error():
    # str() of an exception with several arguments is their tuple; of a KeyError, the quoted key
    assert first_line(ValueError("a", 1)) == "('a', 1)"
    assert first_line(KeyError("missing")) == "'missing'"
