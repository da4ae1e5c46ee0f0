"""Declared constraints on option values, checked in one place with one error format.

Every user-settable value — a stage option, a QuantConfig field, a pipeline's
calibration setting, a grid key, a command-line option — is declared with a
constraint (as scikit-learn's ``_parameter_constraints``) and checked by
:func:`validate` when the file or command line is read, so a value of the
wrong type is never read by its truthiness or silently truncated:

    validate("range_setting", "percentile", 10.0, Real(50, 100, lo_open=True))
    # ConfigError: range_setting option 'percentile' must be a number in (50, 100], got 10.0

Each constraint also knows values it rejects and valid values on its
boundaries, from which the tests generate malformed inputs.
"""

from __future__ import annotations

import math
import re
from typing import Any, NoReturn

import numpy as np

from tinyptq.errors import ConfigError

_INT_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")


def _shown(value: Any) -> str:
    """``repr`` of a value for an error line (numpy scalars as Python ones, cut to 60 characters)."""
    if isinstance(value, np.generic):
        value = value.item()
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fail(owner: str, name: str, description: str, value: Any) -> NoReturn:
    """Raise the one-line ConfigError of an option whose value breaks its constraint."""
    raise ConfigError(f"{owner} option '{name}' must be {description}, got {_shown(value)}")


def validate(owner: str, name: str, value: Any, constraint: Constraint) -> Any:
    """``value`` normalized (ints as int, reals as float), or ConfigError in the one format."""
    if not constraint.accepts(value):
        fail(owner, name, constraint.description, value)
    return constraint.normalize(value)


class Constraint:
    """What values an option accepts; subclasses say how to check, describe and probe it."""

    description = "a valid value"
    metavar = "TEXT"  # how a command-line option of this kind is shown in --help

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is valid."""
        raise NotImplementedError

    def normalize(self, value: Any) -> Any:
        """A valid value in its plain Python form."""
        return value

    def from_text(self, text: str) -> Any:
        """The value a command-line string stands for (left as text when it is none)."""
        return text

    def invalid_examples(self) -> list[Any]:
        """Values of the wrong type or out of range (as a YAML file could hold them)."""
        raise NotImplementedError

    def boundary_examples(self) -> list[Any]:
        """Valid values on the edges of the accepted set."""
        raise NotImplementedError

    def invalid_texts(self) -> list[str]:
        """Command-line strings that must be rejected."""
        return [str(v) for v in self.invalid_examples() if isinstance(v, (int, float, str))]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r})"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_, np.complexfloating)):
        return False
    return isinstance(value, (int, float, np.integer, np.floating))


def _range_text(noun: str, lo: Any, hi: Any, lo_open: bool, hi_open: bool, fmt: Any) -> str:
    """'an integer in [1, 8]', 'a number > 0', 'an integer' ..."""
    if lo is not None and hi is not None:
        return f"{noun} in {'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{noun} {'>' if lo_open else '>='} {fmt(lo)}"
    if hi is not None:
        return f"{noun} {'<' if hi_open else '<='} {fmt(hi)}"
    return noun


class Integer(Constraint):
    """An integer (never a bool, float or string) in [lo, hi]; None leaves that side open."""

    metavar = "INTEGER"

    def __init__(self, lo: int | None = None, hi: int | None = None) -> None:
        self.lo, self.hi = lo, hi
        self.description = _range_text("an integer", lo, hi, False, False, str)

    def accepts(self, value: Any) -> bool:
        """Integers within the bounds."""
        if not _is_int(value):
            return False
        return (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)

    def normalize(self, value: Any) -> int:
        """As a Python int."""
        return int(value)

    def from_text(self, text: str) -> Any:
        """Digits become an int; anything else ('2.5', 'ten') stays text and is rejected."""
        return int(text) if _INT_TEXT.match(text) else text

    def invalid_examples(self) -> list[Any]:
        """Out of range by one, fractional, integral float, numeric string, bool, null."""
        base = self.lo if self.lo is not None else (self.hi if self.hi is not None else 0)
        out: list[Any] = []
        if self.lo is not None:
            out.append(self.lo - 1)
        if self.hi is not None:
            out.append(self.hi + 1)
        return out + [base + 0.5, float(base), str(base), True, None]

    def boundary_examples(self) -> list[Any]:
        """The bounds themselves."""
        return [b for b in (self.lo, self.hi) if b is not None] or [0]

    def invalid_texts(self) -> list[str]:
        """Out of range by one, fractional, not a number."""
        base = self.lo if self.lo is not None else (self.hi if self.hi is not None else 0)
        out = [str(self.lo - 1)] if self.lo is not None else []
        out += [str(self.hi + 1)] if self.hi is not None else []
        return out + [f"{base}.5", "ten", ""]


class Real(Constraint):
    """A finite number (int or float, never a bool or string) between lo and hi."""

    metavar = "FLOAT"

    def __init__(
        self, lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
    ) -> None:
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.description = _range_text("a number", lo, hi, lo_open, hi_open, "{:g}".format)

    def accepts(self, value: Any) -> bool:
        """Finite numbers within the bounds."""
        if not _is_real(value) or not math.isfinite(value):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return self.hi is None or not (value > self.hi or (self.hi_open and value == self.hi))

    def normalize(self, value: Any) -> float:
        """As a Python float."""
        return float(value)

    def from_text(self, text: str) -> Any:
        """A float when the text is one ('nan' and 'inf' too, rejected later)."""
        try:
            return float(text)
        except ValueError:
            return text

    def _outside(self) -> list[float]:
        out = []
        if self.lo is not None:
            out.append(float(self.lo) if self.lo_open else math.nextafter(self.lo, -math.inf))
        if self.hi is not None:
            out.append(float(self.hi) if self.hi_open else math.nextafter(self.hi, math.inf))
        return out

    def invalid_examples(self) -> list[Any]:
        """Just outside each bound, NaN, infinity, numeric string, bool, null."""
        return [*self._outside(), math.nan, math.inf, str(self.boundary_examples()[0]), True, None]

    def boundary_examples(self) -> list[Any]:
        """Each bound, or the closest valid float to an open one."""
        out = []
        if self.lo is not None:
            out.append(math.nextafter(self.lo, math.inf) if self.lo_open else float(self.lo))
        if self.hi is not None:
            out.append(math.nextafter(self.hi, -math.inf) if self.hi_open else float(self.hi))
        return out or [0.0]

    def invalid_texts(self) -> list[str]:
        """Just outside each bound, 'nan', not a number."""
        return [*(repr(v) for v in self._outside()), "nan", "ten"]


class Boolean(Constraint):
    """A real bool (YAML's bare true / false); never a string such as 'false' nor 0 / 1."""

    description = "a boolean (true or false, unquoted)"

    def accepts(self, value: Any) -> bool:
        """Only bool values."""
        return isinstance(value, (bool, np.bool_))

    def normalize(self, value: Any) -> bool:
        """As a Python bool."""
        return bool(value)

    def invalid_examples(self) -> list[Any]:
        """Booleans as strings and as integers, null."""
        return ["false", "true", "no", 0, 1, None]

    def boundary_examples(self) -> list[Any]:
        """Both values."""
        return [False, True]


class Options(Constraint):
    """One of a fixed set of strings (case-sensitive)."""

    def __init__(self, *choices: str) -> None:
        self.choices = tuple(choices)
        self.description = "one of " + ", ".join(f"'{c}'" for c in self.choices)

    def accepts(self, value: Any) -> bool:
        """Exactly one of the choices."""
        return isinstance(value, str) and value in self.choices

    def invalid_examples(self) -> list[Any]:
        """An unknown name, a choice in other case, a number, a bool, null."""
        out: list[Any] = ["no-such-choice"]
        upper = self.choices[0].upper()
        if upper not in self.choices:
            out.append(upper)
        return out + [1, True, None]

    def boundary_examples(self) -> list[Any]:
        """Every choice."""
        return list(self.choices)


class Text(Constraint):
    """A non-empty string."""

    description = "a non-empty string"

    def accepts(self, value: Any) -> bool:
        """Strings with at least one character."""
        return isinstance(value, str) and value != ""

    def invalid_examples(self) -> list[Any]:
        """Empty, a number, a bool, null."""
        return ["", 3, True, None]

    def boundary_examples(self) -> list[Any]:
        """A one-character string."""
        return ["x"]


class Switch(Constraint):
    """'on' / 'off' (any case); YAML reads bare on / off as booleans, so those count too."""

    description = "on or off"

    def accepts(self, value: Any) -> bool:
        """Booleans and the strings on / off."""
        return isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("on", "off"))

    def normalize(self, value: Any) -> str:
        """'on' or 'off'."""
        if isinstance(value, bool):
            return "on" if value else "off"
        return value.lower()

    def invalid_examples(self) -> list[Any]:
        """Other words, booleans as strings, numbers, null."""
        return ["maybe", "true", 1, None]

    def boundary_examples(self) -> list[Any]:
        """Both spellings of both states."""
        return ["on", "off", True, False]


class Optional(Constraint):
    """``inner`` or None (YAML null)."""

    def __init__(self, inner: Constraint) -> None:
        self.inner = inner
        self.description = f"{inner.description} or null"
        self.metavar = inner.metavar

    def accepts(self, value: Any) -> bool:
        """None or what ``inner`` accepts."""
        return value is None or self.inner.accepts(value)

    def normalize(self, value: Any) -> Any:
        """None, or ``inner``'s normal form."""
        return None if value is None else self.inner.normalize(value)

    def from_text(self, text: str) -> Any:
        """As ``inner`` reads it."""
        return self.inner.from_text(text)

    def invalid_examples(self) -> list[Any]:
        """``inner``'s, without null."""
        return [v for v in self.inner.invalid_examples() if v is not None]

    def boundary_examples(self) -> list[Any]:
        """Null and ``inner``'s."""
        return [None, *self.inner.boundary_examples()]

    def invalid_texts(self) -> list[str]:
        """``inner``'s."""
        return self.inner.invalid_texts()


class IntList(Constraint):
    """A non-empty list of distinct integers in [lo, hi] (e.g. candidate bit-widths), kept sorted.

    The command line (and a grid cell) may give it as comma-separated text: ``"2,3,4"``.
    """

    metavar = "INTS"

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.description = f"a non-empty list of distinct integers from {lo} to {hi}"

    def accepts(self, value: Any) -> bool:
        """Lists (or tuples) of distinct in-range integers, or such comma-separated text."""
        if isinstance(value, str):
            value = self.from_text(value)
        return (
            isinstance(value, (list, tuple))
            and len(value) > 0
            and all(_is_int(v) and self.lo <= v <= self.hi for v in value)
            and len(set(value)) == len(value)
        )

    def normalize(self, value: Any) -> list[int]:
        """A sorted list of ints."""
        if isinstance(value, str):
            value = self.from_text(value)
        return sorted(int(v) for v in value)

    def from_text(self, text: str) -> Any:
        """'2,3,4' -> [2, 3, 4] (text that is not such a list stays text and is rejected)."""
        parts = [p.strip() for p in str(text).split(",")]
        return [int(p) for p in parts] if all(_INT_TEXT.match(p) for p in parts) else text

    def invalid_examples(self) -> list[Any]:
        """Empty, out of range, repeated, fractional, a bare number, null."""
        return [[], [self.lo - 1], [self.hi + 1], [self.lo, self.lo], [self.lo + 0.5], self.lo, None]

    def boundary_examples(self) -> list[Any]:
        """One value at each bound, and both."""
        return [[self.lo], [self.hi], [self.lo, self.hi]]

    def invalid_texts(self) -> list[str]:
        """Out of range, repeated, not numbers."""
        return [str(self.lo - 1), f"{self.lo},{self.lo}", "a,b", ""]


# ----------------------------------------------- shared by several surfaces
# numpy's and Keras's seeding take 0 .. 2**32 - 1
SEED = Integer(0, 2**32 - 1)
CALIB_SAMPLES = Integer(1, None)
BATCH_SIZE = Integer(1, 2**20)
WORKERS = Integer(1, None)
