"""``--where``: a small SQL-like filter over result columns, parsed into a ``pyarrow.compute`` expression.

Why a parser of our own: the filter comes from a command line (and from whoever wrote the job's runbook), so it must
never reach ``eval``, and a SQL engine is a large dependency for one boolean expression. The grammar::

    expr      := and_expr (OR and_expr)*
    and_expr  := not_expr (AND not_expr)*
    not_expr  := NOT not_expr | '(' expr ')' | predicate
    predicate := operand [ cmp operand | IS [NOT] NULL | [NOT] IN '(' literal (',' literal)* ')' ]
    cmp       := = | != | <> | < | <= | > | >=
    operand   := column | "quoted column" | 'string' ('' escapes a quote) | number | TRUE | FALSE

Keywords are case-insensitive. Nulls follow SQL: a comparison with a null is unknown, ``AND``/``OR`` are Kleene, and a
row whose filter is unknown is not selected (``x IN (..)`` is ``x = a OR x = b ...``, so ``NOT IN`` keeps nulls out
too). ``x = NULL`` is refused: it is never true; write ``x IS NULL``.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from farm.export.errors import ExportError

KEYWORDS = frozenset({"AND", "OR", "NOT", "IS", "NULL", "IN", "TRUE", "FALSE"})
COMPARISONS = {"=": "equal", "!=": "not_equal", "<>": "not_equal", "<": "less", "<=": "less_equal"}
COMPARISONS |= {">": "greater", ">=": "greater_equal"}

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>'(?:[^']|'')*')
  | (?P<quoted>"(?:[^"]|"")+")
  | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<op><>|!=|<=|>=|=|<|>)
  | (?P<punct>[(),])
  | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Token:
    kind: str  # string, quoted, number, op, punct, word, end
    text: str
    pos: int


@dataclass(frozen=True)
class Operand:
    """A column or a literal; ``kind`` is ``column``, ``string``, ``number``, ``bool`` or ``null``."""

    kind: str
    value: Any
    pos: int


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise _syntax(text, pos, f"unexpected character {text[pos]!r}")
        if match.lastgroup != "space":
            tokens.append(Token(match.lastgroup or "", match.group(), pos))
        pos = match.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


def _syntax(text: str, pos: int, what: str) -> ExportError:
    return ExportError(f"--where {text!r}: {what} at position {pos} (here: {text[pos : pos + 20]!r})")


class _Parser:
    """Recursive descent over the tokens; builds the expression while checking columns and literal types."""

    def __init__(self, text: str, schema: pa.Schema) -> None:
        self.text = text
        self.schema = schema
        self.tokens = tokenize(text)
        self.i = 0

    # -------------------------------------------------------------- token helpers
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def _is_word(self, *words: str) -> bool:
        return self.tok.kind == "word" and self.tok.text.upper() in words

    def _take_word(self, word: str) -> None:
        if not self._is_word(word):
            raise self._error(f"expected {word}")
        self.i += 1

    def _take_punct(self, char: str) -> None:
        if self.tok.text != char or self.tok.kind != "punct":
            raise self._error(f"expected {char!r}")
        self.i += 1

    def _error(self, what: str) -> ExportError:
        found = self.tok.text or "the end"
        return _syntax(self.text, self.tok.pos, f"{what}, found {found!r}")

    # -------------------------------------------------------------- grammar
    def parse(self) -> pc.Expression:
        expr = self._or()
        if self.tok.kind != "end":
            raise self._error("expected AND, OR or the end of the filter")
        return expr

    def _or(self) -> pc.Expression:
        expr = self._and()
        while self._is_word("OR"):
            self.i += 1
            expr = expr | self._and()
        return expr

    def _and(self) -> pc.Expression:
        expr = self._not()
        while self._is_word("AND"):
            self.i += 1
            expr = expr & self._not()
        return expr

    def _not(self) -> pc.Expression:
        if self._is_word("NOT"):
            self.i += 1
            return ~self._not()
        if self.tok.kind == "punct" and self.tok.text == "(":
            self.i += 1
            expr = self._or()
            self._take_punct(")")
            return expr
        return self._predicate()

    def _predicate(self) -> pc.Expression:
        left = self._operand()
        if self.tok.kind == "op":
            op = self.tok
            self.i += 1
            return self._compare(left, op, self._operand())
        if self._is_word("IS"):
            self.i += 1
            negate = self._is_word("NOT")
            self.i += negate
            self._take_word("NULL")
            expr = self._expr(left)
            return expr.is_valid() if negate else expr.is_null()
        negate = self._is_word("NOT")
        if negate or self._is_word("IN"):
            self.i += negate
            self._take_word("IN")
            expr = self._in(left)
            return ~expr if negate else expr
        if left.kind == "bool" or (left.kind == "column" and pa.types.is_boolean(self._type(left))):
            return self._expr(left)
        raise self._error("expected a comparison (= != <> < <= > >=), IS [NOT] NULL or [NOT] IN (...)")

    def _in(self, left: Operand) -> pc.Expression:
        self._take_punct("(")
        items = [self._operand()]
        while self.tok.text == "," and self.tok.kind == "punct":
            self.i += 1
            items.append(self._operand())
        self._take_punct(")")
        expr = None
        for item in items:
            if item.kind == "column":
                raise _syntax(self.text, item.pos, "IN (...) takes literals, not columns")
            term = self._compare(left, Token("op", "=", item.pos), item)
            expr = term if expr is None else expr | term
        return expr

    def _operand(self) -> Operand:
        tok = self.tok
        self.i += 1
        if tok.kind == "string":
            return Operand("string", tok.text[1:-1].replace("''", "'"), tok.pos)
        if tok.kind == "number":
            is_int = re.fullmatch(r"[-+]?\d+", tok.text) is not None
            return Operand("number", int(tok.text) if is_int else float(tok.text), tok.pos)
        if tok.kind == "quoted":
            return self._column(tok.text[1:-1].replace('""', '"'), tok.pos)
        if tok.kind == "word":
            upper = tok.text.upper()
            if upper in ("TRUE", "FALSE"):
                return Operand("bool", upper == "TRUE", tok.pos)
            if upper == "NULL":
                return Operand("null", None, tok.pos)
            if upper not in KEYWORDS:
                return self._column(tok.text, tok.pos)
        self.i -= 1
        raise self._error("expected a column name or a value")

    def _column(self, name: str, pos: int) -> Operand:
        if name not in self.schema.names:
            raise ExportError(unknown_column(self.text, name, pos, self.schema.names))
        return Operand("column", name, pos)

    # -------------------------------------------------------------- typing
    def _type(self, operand: Operand) -> pa.DataType:
        return self.schema.field(operand.value).type

    def _compare(self, left: Operand, op: Token, right: Operand) -> pc.Expression:
        for side in (left, right):
            if side.kind == "null":
                raise _syntax(self.text, side.pos, "a comparison with NULL is never true; write `column IS NULL`")
        if left.kind != "column" and right.kind == "column":
            left, right = right, left
            op = Token("op", {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op.text, op.text), op.pos)
        lhs, rhs = self._expr(left), self._expr(right, like=left)
        if self._float_against_integers(left, right):
            # Arrow would narrow a float literal that fits float32 (0.5, 1e3) and cast the column to float32 with
            # it, refusing any value past 2**24 (a seed of 834959276): compare in float64 instead. An integer
            # literal still compares integer to integer (exact, also past 2**53).
            lhs = lhs.cast(pa.float64(), safe=False)
        return getattr(pc, COMPARISONS[op.text])(lhs, rhs)

    def _float_against_integers(self, left: Operand, right: Operand) -> bool:
        return (
            left.kind == "column"
            and pa.types.is_integer(self._type(left))
            and right.kind == "number"
            and isinstance(right.value, float)
        )

    def _expr(self, operand: Operand, like: Operand | None = None) -> pc.Expression:
        """``operand`` as an expression; a literal compared with ``like`` (a column) must suit its type."""
        if operand.kind == "column":
            return pc.field(operand.value)
        if like is not None and like.kind == "column":
            return pc.scalar(self._literal_for(operand, like))
        return pc.scalar(operand.value)

    def _literal_for(self, literal: Operand, column: Operand) -> Any:
        kind = self._type(column)
        fits = {
            "number": pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind),
            "string": pa.types.is_string(kind) or pa.types.is_large_string(kind),
            "bool": pa.types.is_boolean(kind),
        }
        if pa.types.is_timestamp(kind) and literal.kind == "string":
            return _timestamp(self.text, literal, kind)
        if not fits.get(literal.kind, False):
            raise _syntax(
                self.text,
                literal.pos,
                f"column {column.value!r} is {kind}; a {literal.kind} ({literal.value!r}) cannot be compared with it",
            )
        return literal.value


def _timestamp(text: str, literal: Operand, kind: pa.TimestampType) -> pa.Scalar:
    try:
        value = dt.datetime.fromisoformat(literal.value)
    except ValueError:
        raise _syntax(
            text, literal.pos, f"{literal.value!r} is not an ISO date/time (e.g. '2026-11-26T12:00')"
        ) from None
    if value.tzinfo is None and kind.tz is not None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return pa.scalar(value, type=kind)


def unknown_column(text: str, name: str, pos: int, available: list[str]) -> str:
    close = difflib.get_close_matches(name, available, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (
        f"--where {text!r}: unknown column {name!r} at position {pos}; {hint}available columns: {', '.join(available)}"
    )


def parse_where(text: str, schema: pa.Schema) -> pc.Expression:
    """``text`` as a boolean expression over ``schema``'s columns; ``ExportError`` (a ``ValueError``) naming the
    position on a syntax error, an unknown column (with the available ones) or a literal that does not suit its
    column's type."""
    if not text or not text.strip():
        raise ExportError('--where is empty; give a condition such as "identity_mean >= 0.6" or leave it out')
    return _Parser(text, schema).parse()


__all__ = ["parse_where", "tokenize"]
