"""ComfyUI's ComfyMathExpression ("Math Expression"): a formula over linked numbers.

The expression is evaluated by a small evaluator over Python's own parser (:mod:`ast`), never
by ``eval``: it knows numbers, the input names a..z (and ``values``, the list of them), the
arithmetic, bitwise, comparison and boolean operators, ``x if c else y``, and the functions
ComfyUI's node allows (sum, min, max, abs, round, pow, sqrt, ceil, floor, log, log2, log10,
sin, cos, tan, int, float). Anything else (attributes, other names, strings, lambdas,
comprehensions) is a NodeError naming ``expression``, as is a result that is not a finite
number. ComfyUI's node uses simpleeval with the same functions; the templates' version of
the node has three outputs, FLOAT, INT and BOOL, and takes FLOAT, INT or BOOLEAN values.
"""
from __future__ import annotations

import ast
import math
import operator
import string
from typing import Any, Callable

from engine import types as T
from engine.context import NodeError
from engine.node import Grow, Input, Output, define_node

NAMES = tuple(string.ascii_lowercase)
VALUES = Grow("values", min=1, names=NAMES)
#: Exponents and shifts past this are refused: 2 ** 10 ** 9 would hold the job for minutes.
MAX_EXPONENT = 4000
#: Integer results past this many bits are refused before they are computed: ((10 ** 4000) **
#: 4000) ** 2 passes the exponent limit at each step but would hold the server for minutes.
MAX_INT_BITS = 65536


class ExpressionError(ValueError):
    """The expression uses something the evaluator does not allow, or cannot be computed."""


def _too_large(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise ExpressionError(f"the result would have about {bits} binary digits, more than {MAX_INT_BITS}")


def _checked_pow(base: Any, exponent: Any) -> Any:
    if abs(exponent) > MAX_EXPONENT:
        raise ExpressionError(f"the exponent {exponent} is larger than {MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        _too_large(base.bit_length() * exponent)
    return operator.pow(base, exponent)


def _checked_lshift(value: Any, bits: Any) -> Any:
    if abs(bits) > MAX_EXPONENT:
        raise ExpressionError(f"the shift {bits} is larger than {MAX_EXPONENT}")
    if isinstance(value, int) and isinstance(bits, int):
        _too_large(value.bit_length() + bits)
    return operator.lshift(value, bits)


def _checked_mul(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int):
        _too_large(a.bit_length() + b.bit_length())
    return operator.mul(a, b)


def _round(value: Any, digits: Any = None) -> Any:
    """round() with the digits bounded: an integer rounded to -10 ** 8 digits builds 10 ** 10 ** 8."""
    if digits is None:
        return round(value)
    if abs(digits) > MAX_EXPONENT:
        raise ExpressionError(f"round to {digits} digits: at most {MAX_EXPONENT} either way")
    return round(value, digits)


def _sum(*args: Any) -> Any:
    """sum(values) and sum(a, b, c) both work, as in ComfyUI's node."""
    return sum(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else sum(args)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sum": _sum, "min": min, "max": max, "abs": abs, "round": _round, "pow": _checked_pow,
    "sqrt": math.sqrt, "ceil": math.ceil, "floor": math.floor, "log": math.log, "log2": math.log2,
    "log10": math.log10, "sin": math.sin, "cos": math.cos, "tan": math.tan, "int": int, "float": float,
}
BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: _checked_mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _checked_pow,
    ast.BitAnd: operator.and_, ast.BitOr: operator.or_, ast.BitXor: operator.xor,
    ast.LShift: _checked_lshift, ast.RShift: operator.rshift,
}
UNARY: dict[type, Callable[[Any], Any]] = {
    ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert, ast.Not: operator.not_,
}
COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}


class Evaluator:
    """Walks the parsed expression, allowing only the node kinds listed above."""

    def __init__(self, names: dict[str, Any]) -> None:
        self.names = names

    def run(self, text: str) -> Any:
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as exc:
            raise ExpressionError(f"not a valid expression ({exc.msg})") from None
        return self.visit(tree.body)

    def visit(self, node: ast.AST) -> Any:
        handler = getattr(self, f"_{type(node).__name__}", None)
        if handler is None:
            raise ExpressionError(f"'{ast.unparse(node)}' is not allowed (numbers, a..z, operators and "
                                  f"{', '.join(FUNCTIONS)} only)")
        return handler(node)

    def _Constant(self, node: ast.Constant) -> Any:
        if isinstance(node.value, (bool, int, float)):
            return node.value
        raise ExpressionError(f"{node.value!r} is not a number")

    def _Name(self, node: ast.Name) -> Any:
        if node.id in self.names:
            return self.names[node.id]
        if node.id in ("True", "False"):
            return node.id == "True"
        raise ExpressionError(f"'{node.id}' is not a linked value (link values.{node.id}) or a known name")

    def _BinOp(self, node: ast.BinOp) -> Any:
        op = BINARY.get(type(node.op))
        if op is None:
            raise ExpressionError(f"the operator in '{ast.unparse(node)}' is not allowed")
        return op(self.visit(node.left), self.visit(node.right))

    def _UnaryOp(self, node: ast.UnaryOp) -> Any:
        return UNARY[type(node.op)](self.visit(node.operand))

    def _BoolOp(self, node: ast.BoolOp) -> Any:
        result = self.visit(node.values[0])
        for value in node.values[1:]:  # short-circuit, as Python's and/or
            if bool(result) == isinstance(node.op, ast.Or):
                return result
            result = self.visit(value)
        return result

    def _Compare(self, node: ast.Compare) -> bool:
        left = self.visit(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            check = COMPARE.get(type(op))
            if check is None:
                raise ExpressionError(f"the comparison in '{ast.unparse(node)}' is not allowed")
            right = self.visit(comparator)
            if not check(left, right):
                return False
            left = right
        return True

    def _IfExp(self, node: ast.IfExp) -> Any:
        return self.visit(node.body) if self.visit(node.test) else self.visit(node.orelse)

    def _Call(self, node: ast.Call) -> Any:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
            raise ExpressionError(f"'{ast.unparse(node.func)}(...)' is not an allowed function "
                                  f"({', '.join(FUNCTIONS)}; positional arguments only)")
        return FUNCTIONS[node.func.id](*(self.visit(arg) for arg in node.args))

    def _Subscript(self, node: ast.Subscript) -> Any:
        return self.visit(node.value)[self.visit(node.slice)]


def evaluate(expression: str, values: dict[str, Any]) -> Any:
    """The expression's value with ``values`` bound by name (and as the list ``values``)."""
    names: dict[str, Any] = {**values, "values": list(values.values())}
    try:
        return Evaluator(names).run(expression)
    except ExpressionError:
        raise
    except (ArithmeticError, ValueError, TypeError, IndexError, RecursionError) as exc:
        raise ExpressionError(f"cannot be computed: {exc}") from None


def _number(value: Any, name: str) -> Any:
    if isinstance(value, (bool, int, float)):
        return value
    raise NodeError(f"expected a number or a boolean, got {type(value).__name__}", name)


@define_node(
    "ComfyMathExpression",
    category="logic",
    display_name="Math Expression",
    inputs=[Input("expression", T.STRING, default="a + b", multiline=True),
            # ComfyUI's growing inputs a..z (at least one), sent as values.a, values.b, ...
            *VALUES.inputs("FLOAT,INT,BOOLEAN")],
    outputs=[Output("FLOAT", T.FLOAT), Output("INT", T.INT), Output("BOOL", T.BOOLEAN)],
)
def math_expression(ctx, expression: str, **values: Any):
    """Compute a formula over the linked numbers (``(a // 32) * 32``, ``a > 2048``) and give it as
    a float, an int (truncated) and a boolean, so one node can size a latent or switch a branch."""
    if not expression.strip():
        raise NodeError("the expression is empty", "expression")
    bound = {key.split(".", 1)[1]: _number(value, key) for key, value in values.items() if value is not None}
    try:
        result = evaluate(expression, bound)
    except ExpressionError as exc:
        raise NodeError(f"'{expression}': {exc}", "expression") from None
    if not isinstance(result, (bool, int, float)):
        raise NodeError(f"'{expression}' gives {type(result).__name__}, not a number", "expression")
    try:
        as_float = float(result)
    except OverflowError:
        raise NodeError(f"'{expression}' gives a number too large for a float", "expression") from None
    if not math.isfinite(as_float):
        raise NodeError(f"'{expression}' gives {as_float}, not a finite number", "expression")
    return (as_float, int(result), bool(result))
