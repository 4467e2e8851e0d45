"""A Rhai tokenizer and the shorthand rewriting of YAML policies (DESIGN 3).

In a YAML rule, ``workers.filter(gpus > 1).first()`` means
``workers.filter(|w| w.gpus > 1).first()``: inside the argument of a list
helper that takes a function, bare field names refer to the worker. Doing that
with regular expressions would also rewrite names inside strings, property
names after a dot and function names, so the text is tokenized first and only
identifiers in the right places are touched. Single-quoted strings (``'cuda'``,
handy inside YAML) become Rhai strings; in Rhai they would be characters, which
never equal a string.

The rewritten text keeps, for every character, the offset of the character of
the original text it came from, so errors Rhai reports in the generated code
can point back into the YAML file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LexError", "Token", "Fragment", "tokenize", "rewrite", "CLOSURE_METHODS"]

#: List helpers whose argument is a function of the worker (DESIGN 2.3).
CLOSURE_METHODS = frozenset(
    {"filter", "min_by", "max_by", "sum_by", "avg_by", "count", "weighted_random"}
)

#: The worker's name in generated closures; the native evaluator of simple
#: closures (src/native.rs) handles any parameter name, `w` reads best.
ITEM = "w"

#: Rhai keywords and reserved words: never worker fields.
KEYWORDS = frozenset("""
    true false let const if else switch do while until loop for in continue break
    return throw try catch fn private import export as global this is_def_var
    is_def_fn is_shared type_of print debug eval Fn call curry var static shared
    goto exit match case public protected new use with module package super
    thread spawn go sync async await yield default void null nil
""".split())

#: Helpers and state names that keep their meaning inside a shorthand argument
#: when not called (a bare name that is a function stays a function name).
#: `job` is the job being scheduled, never a worker field.
RESERVED_NAMES = frozenset("""
    job now distance hash log queue_depth reject wait dispatch start_worker
    evict evict_least_recently_used evict_lowest_priority evict_idle_workers
    tenant_over_quota tenant_remaining_quota tenant_usage tenant_concurrent_jobs
    tenant_weight model_exists model_size_bytes model_vram_required
    model_context_length gpu_vram_total gpu_vram_free gpu_vram_allocated
    gpu_device_name gpu_utilization gpu_temperature gpus_of
""".split())

# Longest first, so that `..=` wins over `..` and `.`.
_OPERATORS = sorted(
    """?. ?[ ?? :: ..= .. => == != <= >= && || << >> += -= *= /= %= **= **
       <<= >>= &= |= ^= #{ -> ( ) [ ] { } , . ; : + - * / % < > = ! & | ^ ? # @ $ ~"""
    .split(),
    key=len,
    reverse=True,
)


class LexError(Exception):
    """Text that is not an expression; ``offset`` is where, in the original."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


@dataclass
class Token:
    kind: str  # "ident", "number", "string", "op", "space", "comment"
    text: str
    start: int
    end: int


@dataclass
class Fragment:
    """Rewritten code, one line, and the original offset of each character."""

    code: str
    origin: list[int] = field(default_factory=list)

    def original_offset(self, index: int) -> int:
        if not self.origin:
            return 0
        return self.origin[max(0, min(index, len(self.origin) - 1))]

    def add(self, text: str, offset: int, spread: bool = False) -> None:
        """Appends ``text``; with ``spread`` its characters map one to one onto
        the original from ``offset`` on, otherwise they all map to ``offset``."""
        self.code += text
        self.origin.extend(offset + i if spread else offset for i in range(len(text)))


def _is_ident_start(c: str) -> bool:
    return c == "_" or ("a" <= c <= "z") or ("A" <= c <= "Z")


def _is_ident_char(c: str) -> bool:
    return _is_ident_start(c) or c.isdigit()


def _scan_quoted(text: str, i: int, quote: str) -> int:
    """Index just past the string that starts at ``i``."""
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == quote:
            return j + 1
        if c == "\n" and quote != "`":
            break
        j += 1
    raise LexError(f"the string starting here is never closed (no closing {quote})", i)


def _scan_number(text: str, i: int) -> int:
    j = i + 1
    hex_like = text[i] == "0" and j < len(text) and text[j] in "xXoObB"
    while j < len(text):
        c = text[j]
        if _is_ident_char(c):
            j += 1
            if c in "eE" and not hex_like and j < len(text) and text[j] in "+-":
                j += 1
        elif c == "." and j + 1 < len(text) and text[j + 1].isdigit():
            j += 1  # a decimal point; `1.max(2)` stays a method call
        else:
            break
    return j


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            j = i
            while j < len(text) and text[j].isspace():
                j += 1
            kind = "space"
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = len(text) if j < 0 else j
            kind = "comment"
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise LexError("comment starting here is never closed (missing */)", i)
            j += 2
            kind = "comment"
        elif c in "\"'`":
            j = _scan_quoted(text, i, c)
            kind = "string"
        elif c.isdigit():
            j = _scan_number(text, i)
            kind = "number"
        elif _is_ident_start(c):
            j = i + 1
            while j < len(text) and _is_ident_char(text[j]):
                j += 1
            kind = "ident"
        else:
            op = next((o for o in _OPERATORS if text.startswith(o, i)), None)
            if op is None:
                raise LexError(f"unexpected character {c!r}", i)
            j = i + len(op)
            kind = "op"
        tokens.append(Token(kind, text[i:j], i, j))
        i = j
    return tokens


def _single_to_double(token: Token) -> str:
    """'it''s' style is YAML's business; here `\\'` is an escaped quote."""
    body = token.text[1:-1].replace("\\'", "'")
    out, escaped = [], False
    for c in body:
        if c == '"' and not escaped:
            out.append('\\"')
        else:
            out.append(c)
        escaped = c == "\\" and not escaped
    return '"' + "".join(out) + '"'


_CLOSING = {"(": ")", "[": "]", "{": "}", "#{": "}", "?[": "]"}
# After these, `|` starts a closure rather than meaning bitwise or.
_EXPRESSION_EXPECTED = {"(", "[", "{", "#{", ",", "=", ":", "=>", "return", "&&", "||",
                        "!", "==", "!=", "<", ">", "<=", ">=", "+", "-", "*", "/", "%"}


def rewrite(text: str, *, shorthand: bool = True) -> Fragment:
    """Rewrites one Rhai expression into a single line of Rhai.

    Single-quoted strings become strings; comments go and line breaks become
    spaces (the expression is placed on one generated line). With
    ``shorthand``, the argument of each list helper of ``CLOSURE_METHODS`` that
    is not already a closure becomes ``|w| ...`` with bare names read from the
    worker. Raises LexError for unbalanced brackets or a top-level ``;``.
    """
    tokens = tokenize(text)
    code = [t for t in tokens if t.kind not in ("space", "comment")]
    if not code:
        raise LexError("the expression is empty", 0)
    # For each significant token, the one before and after it.
    prev = {id(t): (code[k - 1] if k else None) for k, t in enumerate(code)}
    nxt = {id(t): (code[k + 1] if k + 1 < len(code) else None) for k, t in enumerate(code)}

    out = Fragment("")
    stack: list[tuple[Token, bool]] = []  # open bracket, whether it opened a shorthand
    shorthand_depth = 0  # brackets open inside the current shorthand argument
    declared: set[str] = set()  # closure parameters seen inside it
    in_params = False  # between the bars of an explicit closure's parameter list
    for t in tokens:
        if t.kind in ("space", "comment"):
            if not out.code.endswith(" "):
                out.add(" ", t.start)
            continue
        before, after = prev[id(t)], nxt[id(t)]
        if t.kind == "op" and t.text in _CLOSING:
            opens = (
                shorthand and shorthand_depth == 0 and t.text == "("
                and before is not None and before.kind == "ident"
                and before.text in CLOSURE_METHODS
                and (p := prev[id(before)]) is not None and p.text in (".", "?.")
                and after is not None and after.text not in (")", "|", "||")
                and not (after.text == "Fn" and after.kind == "ident")
            )
            stack.append((t, opens))
            out.add(t.text, t.start, spread=True)
            if opens:
                out.add(f"|{ITEM}| ", t.start + 1)
                shorthand_depth, declared = 1, set()
            elif shorthand_depth:
                shorthand_depth += 1
            continue
        if t.kind == "op" and t.text in (")", "]", "}"):
            if not stack or _CLOSING[stack[-1][0].text] != t.text:
                expected = f"expected {_CLOSING[stack[-1][0].text]!r}" if stack else "nothing open"
                raise LexError(f"unbalanced {t.text!r} ({expected})", t.start)
            stack.pop()
            if shorthand_depth:
                shorthand_depth -= 1
            out.add(t.text, t.start, spread=True)
            continue
        if t.text == ";" and not stack:
            raise LexError("a single expression is expected here: no ';'", t.start)
        if shorthand_depth and t.kind == "op" and t.text in ("|", "||"):
            starts = before is None or before.text in _EXPRESSION_EXPECTED
            if t.text == "|" and (starts or in_params):
                in_params = not in_params
        if t.kind == "string" and t.text.startswith("'"):
            out.add(_single_to_double(t), t.start)
            continue
        if t.kind == "ident" and shorthand_depth:
            if in_params or (before is not None and before.text in ("let", "const", "for")):
                declared.add(t.text)  # a closure parameter or a local variable
            elif _is_worker_field(t, before, after, declared):
                if t.text == ITEM:
                    raise LexError(
                        f"'{ITEM}' is implicit in this shorthand: write the field alone "
                        f"(gpus > 1) or a whole closure (|{ITEM}| {ITEM}.gpus > 1)", t.start)
                out.add(f"{ITEM}.", t.start)
        out.add(t.text, t.start, spread=True)
    if stack:
        opened = stack[-1][0]
        raise LexError(f"{opened.text!r} is never closed", opened.start)
    return _strip(out)


def _strip(fragment: Fragment) -> Fragment:
    code, origin = fragment.code, fragment.origin
    while code.endswith(" "):
        code, origin = code[:-1], origin[:-1]
    while code.startswith(" "):
        code, origin = code[1:], origin[1:]
    return Fragment(code, origin)


def _is_worker_field(t: Token, before: Token | None, after: Token | None,
                     declared: set[str]) -> bool:
    if t.text in KEYWORDS or t.text in RESERVED_NAMES or t.text in declared:
        return False
    if before is not None and before.text in (".", "?.", "::"):
        return False  # a property or method name, or a namespace path
    if after is not None and after.text in ("(", ":", "::"):
        return False  # a function call, a map key, a namespace
    return True
