"""ClassAds: the one module of gwms that talks to HTCondor's ClassAd library.

Every parse and every evaluation is done by ``classad2`` (shipped in the ``htcondor`` wheel):
three-valued logic, ``MY.``/``TARGET.``, ``=?=``, the function library, all exactly as in
HTCondor.  This module adds only what classad2 does not do for us:

* **Strictness.**  ``classad2.ClassAd(text)`` ignores anything after the closing ``]``, the
  old-syntax parser silently drops bad lines, ``ExprTree(text)`` accepts ``1; b = 2``, and
  classad2's parse-next entry point is HTCondor's *file* reader (it skips a leading ``{``,
  and after an empty ``[]`` it reads the following lines as old syntax).  Input from the
  network or from a user must be rejected instead, with an error that says what and where
  (DESIGN.md).  We get that from classad2's own ad parser by appending an attribute with a
  secret name just before the final ``]``: it is in the parsed ad exactly when the ad ran
  to the end of the text.  We never tokenise or parse ClassAd text ourselves.
* **Exact wire form.**  classad2 prints reals with 16 significant digits, which does not
  round-trip a double; :func:`encode` writes literal reals itself (Python's shortest exact
  ``repr``) and leaves everything else to classad2's printer.
* **A guard against classad2 crashes.**  The parser limits bracket nesting (about 165 levels),
  but a left-associative chain such as ``1+1+...+1`` parses to a tree as deep as it is long,
  and classad2 recurses over it: its printer, copier and evaluator die with SIGSEGV at about
  24,000 levels, its parser at about 300,000 (default 8 MB stack).  Text that could hold a
  tree deeper than :data:`MAX_TREE_DEPTH` is refused before classad2 sees it.
* **HTCondor's conventions** where classad2 leaves them to the caller: how a constraint's
  non-boolean value counts (like condor_q), old-syntax string escaping (like
  condor_status -long), and JSON output (like condor_q -json).
* **HTCondor's matchmaking scope rule**: evaluated against a target, an unscoped name the ad
  lacks is looked up in the target (``Memory >= 1024`` in a job means the slot's Memory).
  classad2 does that only in a process-wide mode that switches on by accident, so we make the
  references explicit instead (see "Matchmaking scope" below).

classad2 keeps its last error message in a process-wide variable, so the diagnostics here
assume the Twisted way of calling it from one thread at a time.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from typing import Final

import os

# classad2 has HTCondor's own evaluation mode (unscoped names that an ad lacks are looked up in
# the match target; HTCondor's extra functions such as stringListMember; MY.x without a target)
# behind a process-wide switch that importing htcondor2 turns on, and that some classad2 calls
# turn on as a side effect. Turn it on once, here, so that every gwms process evaluates the way
# an HTCondor pool does from its first expression on, instead of depending on what ran before.
# ONLY_ENV keeps htcondor2 from looking for an HTCondor installation's configuration files.
os.environ.setdefault("CONDOR_CONFIG", "ONLY_ENV")
import htcondor2  # noqa: E402,F401  (imported for its side effect, see above)

import classad2  # noqa: E402
from classad2 import ClassAdException, Value  # noqa: E402

# Whether classad2 itself now resolves an unscoped name a match's MY ad lacks in its TARGET.
# When it does (the usual case), matching evaluates directly; the rewriting below (explicit
# TARGET. prefixes) is the fallback for a classad2 that cannot be put in that mode.
_NATIVE_FALL_THROUGH = classad2.ExprTree("Foo").eval(classad2.ClassAd("[a = 1]"), classad2.ClassAd("[Foo = 7]")) == 7

__all__ = [
    "ClassAd",
    "ExprTree",
    "ClassAdError",
    "Constraint",
    "ERROR",
    "MAX_TREE_DEPTH",
    "parse_expr",
    "parse_new",
    "parse_old",
    "parse_ad",
    "parse_ads",
    "encode",
    "decode",
    "quote",
    "evaluate_constraint",
    "compile_constraint",
    "symmetric_match",
    "requirements_met",
    "rank",
    "references",
    "conjuncts",
    "project",
    "without",
    "to_python",
    "format_old",
    "evaluate",
]

ClassAd = classad2.ClassAd
ExprTree = classad2.ExprTree

#: Deepest expression tree we let in.  classad2 crashed at ~24,000 levels (selection chains,
#: 8 MB stack; ~31,000 for arithmetic); 10,000 leaves room for smaller thread stacks.
MAX_TREE_DEPTH: Final = 10_000
# classad2's recursive-descent parser stops every recursion (brackets, unary operators,
# ?:) at about 500 levels, so those contribute at most this much depth to any tree.
_PARSER_RECURSION: Final = 1_000
# Only left-associative chains grow without that limit, and each of their levels costs at
# least two characters ("+1", ".b"), so text up to this length is safe without looking at it.
_SAFE_LENGTH: Final = 2 * (MAX_TREE_DEPTH - _PARSER_RECURSION)
# Error-path probes re-parse the text; above this size we skip them rather than let a stream
# of huge bad frames cost ten parses each.
_PROBE_LIMIT: Final = 64 * 1024
_EXCERPT: Final = 80

_WS: Final = " \t\n\r\v\f"  # C isspace(), which is what classad2's lexer skips
# HTCondor attribute names as old-syntax files and condor_status -long spell them.
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names classad2 can only write quoted (checked against its printer: 'true' = 1, ...).
_RESERVED: Final = frozenset({"true", "false", "undefined", "error", "is", "isnt", "parent"})

# The end marker: an attribute appended just before the last ']' of text we parse.  Input
# cannot name it (the name is random per process and never leaves it), so it appears in the
# parsed ad only if the ad did not close before it, i.e. if the ad runs to the end.  The
# newline ends a // comment first; classad2 accepts the ';' even after a ';' or a '['.
_END_NAME: Final = "_gwms_end_" + secrets.token_hex(16)
_END_ATTRIBUTE: Final = f"\n;'{_END_NAME}' = 1\n]"


class ClassAdError(ValueError):
    """A malformed ad or expression.

    The message says what is wrong (classad2's own parser message where it has one), names the
    line for old syntax, and quotes the offending text, cut to about 80 characters with "...".
    ``reason``, ``text`` and ``line`` are kept as attributes for callers that format their own.
    """

    def __init__(self, reason: str, text: str | bytes | None = None, *, line: int | None = None) -> None:
        self.reason = reason
        self.text = text
        self.line = line
        message = reason if line is None else f"line {line}: {reason}"
        if text is not None:
            message = f"{message}: {_excerpt(text)}"
        super().__init__(message)


def _excerpt(text: str | bytes) -> str:
    # repr() so that newlines, control characters and invalid bytes show up visibly.
    if len(text) > _EXCERPT:
        text = text[: _EXCERPT - 3] + ("..." if isinstance(text, str) else b"...")
    return repr(text)


class _ErrorValue:
    """The ClassAd value ERROR as :func:`evaluate` returns it: false in a test, "error" when printed."""

    _instance: _ErrorValue | None = None

    def __new__(cls) -> _ErrorValue:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "classads.ERROR"

    def __str__(self) -> str:
        return "error"


#: What :func:`evaluate` returns for ERROR (UNDEFINED comes back as None).  classad2's own
#: ``Value.Error`` is an IntEnum equal to 1, i.e. *true* in an ``if``: never hand that out.
ERROR: Final = _ErrorValue()


# ---------------------------------------------------------------------------------------------
# Parsing with classad2, strictly
# ---------------------------------------------------------------------------------------------


def _defines(ad: ClassAd, name: str) -> bool:
    """Whether ``ad`` has attribute ``name``, without converting its value to Python.

    ``name in ad`` (Mapping.__contains__) converts the value, and the first nested ad classad2
    converts makes it import htcondor2, which switches classad2 to old-ClassAd semantics for the
    whole process (see "Matchmaking scope" below): checking for a name must not do that.
    """
    try:
        ad.lookup(name)
    except KeyError:
        return False
    return True


def _parse_to_end(body: str) -> ClassAd | None:
    """classad2's ad for ``body`` + the end marker, if the ad reached the marker; else None.

    ``body`` is text up to (without) the ']' that must close the ad.
    """
    try:
        ad = ClassAd(body + _END_ATTRIBUTE)
    except (ClassAdException, ValueError):
        return None
    if not _defines(ad, _END_NAME):
        return None  # the ad closed earlier: something follows it
    del ad[_END_NAME]
    return ad


def _parse_whole_ad(text: str) -> ClassAd | None:
    """classad2's ad if ``text`` is exactly one new-syntax ad (white space around it), else None."""
    body = text.rstrip(_WS)
    if not body.endswith("]"):
        return None
    return _parse_to_end(body[:-1])


def _try_parse_expr(text: str) -> ExprTree | None:
    """classad2's tree for ``text`` if the whole text is exactly one expression, else None.

    classad2 has no public strict expression parser (``ExprTree("1; b = 2")`` is ``1``), so we
    parse "[a = TEXT" + end marker and require the marker and exactly one other attribute.
    A ';' in the text could still redefine a itself ("1; a = 2"), so text containing ';' is
    parsed once more under another name: no injected attribute can match both names.
    """
    ad = _parse_to_end("[a = " + text)
    if ad is None or len(ad) != 1:
        return None
    try:
        expr = ad.lookup("a")
    except KeyError:
        return None
    if ";" in text:
        other = _parse_to_end("[b = " + text)
        if other is None or len(other) != 1 or not _defines(other, "b"):
            return None
    return expr


# ---------------------------------------------------------------------------------------------
# Diagnostics (error path only)
# ---------------------------------------------------------------------------------------------

# Two syntax errors whose classad2 messages differ from each other.  classad2 does not clear
# its last-error text on success, and many errors (an unterminated string, a missing value)
# leave it untouched, so a message read after a failure may belong to an earlier parse.
_SENTINELS: Final = ("[a = (1 ]", "[a = 1 b]")


def _classad2_message(attempt: Callable[[], object]) -> str | None:
    """classad2's own message for the failure ``attempt()`` raises, or None if it set none."""
    for sentinel in _SENTINELS:
        try:
            ClassAd(sentinel)
        except ClassAdException:
            pass
        before = classad2.lastError()
        try:
            attempt()
        except (ClassAdException, ValueError):
            pass
        else:
            return None
        after = classad2.lastError()
        if after != before:
            return " ".join(after.split()) or None
    return None


_LEX_WORDS: Final = {
    "LEX_SEMICOLON": "';'",
    "LEX_COMMA": "','",
    "LEX_COLON": "':'",
    "LEX_QMARK": "'?'",
    "LEX_BOUND_TO": "'='",
    "LEX_SELECTION": "'.'",
    "LEX_OPEN_BOX": "'['",
    "LEX_CLOSE_BOX": "']'",
    "LEX_OPEN_PAREN": "'('",
    "LEX_CLOSE_PAREN": "')'",
    "LEX_OPEN_BRACE": "'{'",
    "LEX_CLOSE_BRACE": "'}'",
    "LEX_END_OF_INPUT": "end of input",
    "LEX_IDENTIFIER": "a name",
    "LEX_INTEGER_VALUE": "an integer",
    "LEX_REAL_VALUE": "a real number",
    "LEX_STRING_VALUE": "a string",
    "LEX_BOOLEAN_VALUE": "a boolean",
    "LEX_UNDEFINED_VALUE": "undefined",
    "LEX_ERROR_VALUE": "error",
    "LEX_TOKEN_ERROR": "an invalid character",
    "LEX_TOKEN_TOO_LONG": "a token that is too long",
}
_LEX_RE = re.compile(r"LEX_[A-Z_]+")
_AFTER_EXPR_RE = re.compile(r"while parsing classad: expected LEX_SEMICOLON or LEX_CLOSE_BOX but got (LEX_[A-Z_]+)")


def _lex_word(token: str) -> str:
    return _LEX_WORDS.get(token, token)


def _explain(message: str) -> str:
    """classad2's message in words, followed by the message itself."""
    words = _LEX_RE.sub(lambda m: _lex_word(m.group(0)), message)
    words = words.replace("exptected", "expected").replace(" ,", ",")
    for context in ("while parsing classad: ", "while parsing expression list: "):
        words = words.replace(context, "")
    return f"{words} (classad2: {message})"


def _nesting_hint(text: str) -> str:
    # A hint only: counting brackets here is not parsing, it just suggests the likely cause.
    if max(text.count("("), text.count("["), text.count("{")) > 150:
        return "; brackets may be nested deeper than classad2's limit (about 160 levels)"
    return ""


_EXPR_PROBES: Final = (
    ('"', "unterminated string literal (missing closing '\"')"),
    ('")', "unterminated string literal (missing closing '\"')"),
    ("'", "unterminated quoted attribute name (missing closing \"'\")"),
    ("*/", "unterminated /* comment"),
    ("*/ 0", "unterminated /* comment"),
    (")", "unbalanced brackets: missing ')'"),
    ("))", "unbalanced brackets: missing '))'"),
    (")))", "unbalanced brackets: missing ')))'"),
    ("}", "unbalanced brackets: missing '}'"),
    ("]", "unbalanced brackets: missing ']'"),
    (" 0", "incomplete expression: an operator is missing its right-hand operand"),
)

_AD_PROBES: Final = (
    ('"', "unterminated string literal (missing closing '\"')"),
    ('")', "unterminated string literal (missing closing '\"')"),
    ("'", "unterminated quoted attribute name (missing closing \"'\")"),
    ("*/", "unterminated /* comment"),
    (")", "unbalanced brackets: missing ')'"),
    ("}", "unbalanced brackets: missing '}'"),
    ("", "missing the closing ']' of the ad"),
    ("]", "unbalanced brackets: missing ']]'"),
    (" 0", "incomplete ad: the last attribute is missing its value"),
)

_NO_DETAIL: Final = "syntax error (classad2 gives no detail; look for a missing value, operator, quote or bracket)"


def _diagnose_expr(text: str) -> str:
    if len(text) <= _PROBE_LIMIT:
        for suffix, reason in _EXPR_PROBES:
            if _try_parse_expr(text + suffix) is not None:
                return reason
    try:
        ClassAd("[a = " + text + "\n]")
    except (ClassAdException, ValueError):
        pass
    else:
        # classad2 read an ad out of "[a = TEXT]", so the expression ended early and a ']'
        # or ';' of the text closed it or started another attribute.
        return "unexpected text after a complete expression (an unmatched ']' or a ';')"
    message = _classad2_message(lambda: ClassAd("[a = " + text + "\n]"))
    if message:
        after = _AFTER_EXPR_RE.match(message)
        if after:
            # The same, found by the parser: the token that follows a complete expression.
            word = _lex_word(after.group(1)).removeprefix("a ").removeprefix("an ")
            return f"unexpected {word} after a complete expression (trailing text or a missing operator)"
        return _explain(message) + _nesting_hint(text)
    return _NO_DETAIL + _nesting_hint(text)


def _diagnose_new(text: str) -> str:
    body = text.strip(_WS)
    if not body:
        return "empty input"
    if not body.startswith(("[", "/")):  # "/": classad2 skips comments before the ad
        return "a new-syntax ClassAd must start with '['"
    end = _first_ad_end(text)
    if end is not None and text[end:].strip(_WS) and _parse_whole_ad(text[:end]) is not None:
        return "unexpected text after the closing ']' of the ad"
    if len(text) <= _PROBE_LIMIT:
        for suffix, reason in _AD_PROBES:
            if _parse_to_end(body + suffix) is not None:
                return reason
    message = _classad2_message(lambda: ClassAd(text))
    if message:
        return _explain(message) + _nesting_hint(text)
    return _NO_DETAIL + _nesting_hint(text)


def _syntax_error(text: str) -> ClassAdError:
    reason = _diagnose_new(text)
    if reason.startswith("unexpected text after"):
        end = _first_ad_end(text)
        return ClassAdError(reason, text[end:].strip(_WS))  # quote what follows the ad
    return ClassAdError(reason, text)


# ---------------------------------------------------------------------------------------------
# Looking at text without parsing it: literals, brackets and operators
# ---------------------------------------------------------------------------------------------

# String literals, quoted names and comments, found so that brackets and operators inside them
# are not taken for code.  This matches classad2's lexer on text it accepts; where it cannot
# agree (an unterminated string or comment) the text after it is looked at as code, which
# only ever makes the counts below bigger and the pieces below fail to parse.
_LITERALS_RE = re.compile(r'("[^"\\]*(?:\\.[^"\\]*)*"' r"|'[^'\\]*(?:\\.[^'\\]*)*')|//[^\n]*|/\*.*?\*/", re.S)
_STRUCTURE_RE = re.compile(r"[\[\](){};]")


def _blank(match: re.Match[str]) -> str:
    # A literal becomes '#'s (an operand that no ClassAd character looks like), a comment
    # becomes white space, as the lexer treats it; lengths stay, so offsets still match.
    return ("#" if match.group(1) else " ") * len(match.group(0))


def _blank_literals(text: str) -> str:
    """``text`` with every literal and comment blanked out, offsets unchanged."""
    if '"' not in text and "'" not in text and "/" not in text:
        return text  # nothing to blank: skip the (slow) regular expression
    return _LITERALS_RE.sub(_blank, text)


_BRACKETS_RE = re.compile(r"[\[\](){}]")


# classad2's parser gives up long before brackets nest this deep (at about 165 levels), so
# scans stop here: nothing after that point is ever parsed.
_NESTING_GIVE_UP: Final = 2 * _PARSER_RECURSION


def _ad_ends(code: str) -> Iterator[int]:
    """Offsets just after each ']' that closes an outermost bracket in blanked text."""
    depth = 0
    for mark in _BRACKETS_RE.finditer(code):
        char = mark.group(0)
        if char in "[({":
            depth += 1
            if depth > _NESTING_GIVE_UP:
                return
        else:
            depth = max(depth - 1, 0)
            if depth == 0 and char == "]":
                yield mark.end()


def _first_ad_end(text: str) -> int | None:
    return next(_ad_ends(_blank_literals(text)), None)


# A conservative count of the operators in ClassAd text, used only for text longer than
# _SAFE_LENGTH, *before* classad2 sees it, to bound the depth of the tree classad2 would build.
# Nothing depends on it being exact, only on it never counting too few (a property test checks
# that on generated chains).  Unary operators, brackets, calls and ?: are left out: classad2's
# parser recurses for those and stops at about 500 levels (_PARSER_RECURSION covers them).
# What it counts are the chains the parser builds in a loop: binary operators, '.' selection
# (but not the '.' of a number) and '[' subscripts.  A '+' or '-' counts as binary when it
# follows a whole name, number, literal or closing bracket, so neither the "-" of "-1.5" in a
# long list of numbers nor the "+" of "1e+5" does: the atomic group keeps a number whole, and
# the lookbehind stops a match from starting inside a name or number ("x1e+5" still counts).
_WORD_OPS_RE = re.compile(r"(?<![A-Za-z_])[iI][sS](?:[nN][tT])?(?![A-Za-z0-9_])")
_BINARY_SIGN_RE = re.compile(
    r"(?:(?<![A-Za-z0-9_#])(?>[A-Za-z_][A-Za-z0-9_]*|[0-9][0-9.]*(?:[eE][+-]?[0-9]+)?|#+)|[)\]}])"
    r"[ \t\n\r\v\f]*[-+]"
)
_SYMBOL_OPS_RE = re.compile(r"==|!=|[*/%&|^<>?:\[]|\.(?![0-9])")
_MAX_OPERATORS: Final = MAX_TREE_DEPTH - _PARSER_RECURSION


def _count_operators(code: str, cap: int = _MAX_OPERATORS) -> int:
    """Operators in blanked text, counting no further than just past ``cap``."""
    total = 0
    for pattern in (_SYMBOL_OPS_RE, _BINARY_SIGN_RE, _WORD_OPS_RE):
        total += sum(1 for _ in itertools.islice(pattern.finditer(code), cap - total + 1))
        if total > cap:
            break
    return total


_DOT_DIGIT_RE = re.compile(rb"\.[0-9]")  # the '.' of a number: a selection is never followed by a digit
# A sign right after these is unary: they end an operator (or start a list) and an operand
# follows.  Most likely first ("Name = -1", lists of negative numbers): we stop once under.
_UNARY_SIGNS: Final = tuple(
    f"{before}{space}{sign}".encode() for sign in "-+" for before in "=,{([" for space in (" ", "")
)


def _quick_operator_bound(code: str) -> int:
    """An upper bound of _count_operators from C-speed counting alone, ten times faster on
    big ads: every symbol, every sign but the obviously unary ones, every "is" in a word."""
    data = code.encode("utf-8", "surrogatepass")
    total = len(data) - len(data.translate(None, b"*/%&|^<>?:["))
    total += data.count(b"==") + data.count(b"!=") + code.lower().count("is")
    total += data.count(b".") - len(_DOT_DIGIT_RE.findall(data))
    signs = data.count(b"+") + data.count(b"-")
    for unary in _UNARY_SIGNS:  # each pattern costs a pass over the text: only while needed
        if total + signs <= _MAX_OPERATORS:
            break
        signs -= data.count(unary)
    return total + signs


def _too_many_operators(code: str) -> bool:
    if _quick_operator_bound(code) <= _MAX_OPERATORS:
        return False
    return _count_operators(code) > _MAX_OPERATORS


def _check_depth(text: str, depth: int = 0, *, lines: bool = True) -> None:
    """Refuse text that could parse to a tree deeper than MAX_TREE_DEPTH.

    Call it before handing the text to classad2: parsing a deep enough chain already crashes.
    Operators are counted per attribute, so that a big ad (or a listing of many ads) is not
    refused for its total: the text is cut at each ';' that separates attributes of an outer
    ad and after each outer ad's ']' (bracket depth ``depth`` at the start: 0 for ads, 1 for
    an expression, which classad2 sees inside our "[a = ...]").  Brackets are matched outside
    literals only; up to classad2's first syntax error its nesting and ours agree, and it
    builds nothing after that error.
    """
    if len(text) <= _SAFE_LENGTH:
        return
    code = _blank_literals(text)
    if not _too_many_operators(code):
        return  # few enough in total: no need to find the attribute they belong to
    start = 0
    for mark in _STRUCTURE_RE.finditer(code):
        char = mark.group(0)
        if char in "[({":
            depth += 1
            if depth > _NESTING_GIVE_UP:  # classad2 stops parsing before this point
                _check_piece(text, code, start, mark.start(), lines)
                return
        elif char == ";":
            if depth == 1:
                _check_piece(text, code, start, mark.start(), lines)
                start = mark.end()
        else:
            depth = max(depth - 1, 0)
            if depth == 0 and char == "]":
                _check_piece(text, code, start, mark.end(), lines)
                start = mark.end()
    _check_piece(text, code, start, len(code), lines)


def _check_piece(text: str, code: str, start: int, end: int, lines: bool) -> None:
    if end - start <= _SAFE_LENGTH or not _too_many_operators(code[start:end]):
        return
    piece = text[start:end]
    first = start + len(piece) - len(piece.lstrip(_WS))
    raise ClassAdError(
        f"too complex: more than {_MAX_OPERATORS} operators in one attribute could build an expression "
        f"tree deeper than {MAX_TREE_DEPTH} levels, which classad2 cannot handle without crashing",
        piece.strip(_WS),
        line=text.count("\n", 0, first) + 1 if lines else None,
    )


# ---------------------------------------------------------------------------------------------
# Checks on text and on parsed ads
# ---------------------------------------------------------------------------------------------

# classad2 reads "\ooo" octal escapes in strings and names; they can spell bytes that are not
# UTF-8, and classad2 then raises UnicodeDecodeError (or SystemError, for a name) whenever the
# value is read.  Its printer writes every non-ASCII character that way, so escapes are common
# and must be cheap to accept.
_OCTAL_RUN_RE = re.compile(r"(?:\\(?:[0-3][0-7]{0,2}|[4-7][0-7]?))+")
_OCTAL_ONE_RE = re.compile(r"\\([0-3][0-7]{0,2}|[4-7][0-7]?)")


def _octal_runs_are_utf8(text: str) -> bool:
    # Raw text is valid UTF-8 already, so bad bytes can only come from a run of escapes; a run
    # that is valid UTF-8 by itself stays valid next to anything valid.  Escaped backslashes
    # ("\\303") can make a run look bad; that only sends us to the exact check.
    for run in _OCTAL_RUN_RE.finditer(text):
        raw = bytes(int(digits, 8) & 0xFF for digits in _OCTAL_ONE_RE.findall(run.group(0)))
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return False
    return True


def _check_values_utf8(ad: ClassAd) -> None:
    """Read every name and literal value once so that classad2's decoding errors surface now."""
    for key in list(ad):
        stack = [ad[key]]
        while stack:
            item = stack.pop()
            if isinstance(item, ClassAd):
                _check_values_utf8(item)
            elif isinstance(item, list):
                stack.extend(item)


def _check_utf8(ad: ClassAd, text: str) -> None:
    if "\\" not in text or _octal_runs_are_utf8(text):
        return
    try:
        _check_values_utf8(ad)
    except (UnicodeDecodeError, SystemError):  # SystemError: classad2 listing an undecodable name
        raise ClassAdError("an escape sequence makes a string or name that is not valid UTF-8", text) from None


def _check_text(text: str) -> None:
    if "\x00" in text:
        raise ClassAdError(f"NUL character at position {text.index(chr(0))} (ClassAd text cannot contain NUL)", text)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ClassAdError(f"not valid Unicode text ({e.reason} at position {e.start})", text) from None


# ---------------------------------------------------------------------------------------------
# Public parsing API
# ---------------------------------------------------------------------------------------------


def parse_expr(text: str) -> ExprTree:
    """One ClassAd expression, e.g. ``TARGET.Memory >= 2048 && regexp("^cms", Owner)``.

    Strict: empty text, text after the expression and anything classad2 cannot parse raise
    :class:`ClassAdError`.
    """
    if not isinstance(text, str):
        raise TypeError(f"expression must be str, not {type(text).__name__}")
    if not text.strip(_WS):
        raise ClassAdError("empty expression", text)
    _check_text(text)
    _check_depth(text, depth=1)
    expr = _try_parse_expr(text + "\n")  # the newline ends a trailing // comment
    if expr is None:
        raise ClassAdError(f"invalid expression: {_diagnose_expr(text + chr(10))}", text)
    return expr


def _parse_new_checked(text: str) -> ClassAd:
    """One new-syntax ad from text that passed _check_text and _check_depth."""
    ad = _parse_whole_ad(text)
    if ad is None:
        raise _syntax_error(text)
    _check_utf8(ad, text)
    return ad


def parse_new(text: str) -> ClassAd:
    """One new-syntax ad, ``[Name = "slot1"; Cpus = 4]``; nothing but white space may follow it."""
    if not isinstance(text, str):
        raise TypeError(f"ClassAd text must be str, not {type(text).__name__}")
    _check_text(text)
    _check_depth(text)
    return _parse_new_checked(text)


def _old_to_new_escaping(expr: str) -> str:
    """Rewrite an old-syntax right-hand side with new-syntax string escaping.

    Old ClassAds (condor_status -long, job files) write a backslash literally, except that
    ``\\"`` is a quote inside the string.  This is HTCondor's ConvertEscapingOldToNew
    (compat_classad.cpp), which its own old-syntax reader applies before handing the text to
    the new-syntax parser: double every backslash unless it escapes a quote, and a ``\\"``
    that ends the line is a literal backslash followed by the closing quote ("C:\\dir\\").
    The tests check that it agrees with classad2's own old-syntax parser.
    """
    if "\\" not in expr:
        return expr
    out: list[str] = []
    i, n = 0, len(expr)
    while True:
        j = expr.find("\\", i)
        if j < 0:
            out.append(expr[i:])
            return "".join(out)
        out.append(expr[i:j])
        out.append("\\")
        i = j + 1
        if i >= n or expr[i] != '"' or i + 1 >= n or expr[i + 1] in "\r\n":  # HTCondor's IsStringEnd
            out.append("\\")


def _assemble(entries: list[tuple[int, str, str, str]], names: Iterable[str]) -> ClassAd | None:
    """Parse old-syntax entries as one new-syntax ad under the given attribute names.

    Each expression sits on its own line so that a // comment ends before our ';'.  The names
    are quoted so that names the new syntax reserves (``error = 1``) still work, as they do in
    HTCondor's old syntax.  The end marker catches a line that closes the ad early ("a = 1]").
    """
    body = "[\n" + "\n;\n".join(f"'{name}' = {expr}" for (_, _, expr, _), name in zip(entries, names))
    _check_depth(body + "\n]", lines=False)  # the whole text: a bracket may carry a chain across lines
    return _parse_to_end(body)


def _parse_old_lines(lines: Iterable[tuple[int, str]]) -> ClassAd | None:
    """An ad from (line number, line) pairs of old syntax; None if there is no attribute line."""
    entries: list[tuple[int, str, str, str]] = []
    for number, line in lines:
        stripped = line.strip(_WS)
        if not stripped or stripped.startswith("#"):
            continue
        name, equals, rhs = stripped.partition("=")
        name = name.rstrip(_WS)
        rhs = rhs.strip(_WS)
        if not equals:
            raise ClassAdError("expected 'Name = expression'", line, line=number)
        if not name:
            raise ClassAdError("missing attribute name before '='", line, line=number)
        if len(name) > 2 and name[0] == name[-1] == "'" and _NAME_RE.fullmatch(name[1:-1]):
            name = name[1:-1]  # classad2's old-syntax printer quotes reserved words: 'IS' = 0
        if not _NAME_RE.fullmatch(name):
            raise ClassAdError(
                f"invalid attribute name {name!r} (names are letters, digits and '_', not starting with a digit)",
                line,
                line=number,
            )
        if not rhs:
            raise ClassAdError(f"missing value after '=' for {name}", line, line=number)
        entries.append((number, name, _old_to_new_escaping(rhs), line))
    if not entries:
        return None

    # Parse all lines at once (one or two classad2 calls rather than two per line), then make
    # sure no line leaked into another attribute: the keys must be exactly the names we wrote.
    ad = _assemble(entries, (name for _, name, _, _ in entries))
    try:  # reading names can fail if a line smuggled in '\377' = 1
        if ad is not None and {k.lower() for k in ad} != {name.lower() for _, name, _, _ in entries}:
            ad = None
        if ad is not None and any(";" in expr for _, _, expr, _ in entries):
            # "a = 1; b = 2" next to a real line "b = 3" passes the check above; under names no
            # line can contain ('#' is not allowed in a name) the injected b shows up.
            check = _assemble(entries, (f"#{i}" for i in range(len(entries))))
            if check is None or set(check) != {f"#{i}" for i in range(len(entries))}:
                ad = None
    except (UnicodeDecodeError, SystemError):
        ad = None
    if ad is None:
        for number, name, expr, line in entries:
            if _try_parse_expr(expr + "\n") is None:
                raise ClassAdError(f"invalid expression for {name}: {_diagnose_expr(expr + chr(10))}", line, line=number)
        first = entries[0][0]
        raise ClassAdError("these lines do not form one ad (a comment or string spanning lines?)", entries[0][3], line=first)
    _check_utf8(ad, "\n".join(expr for _, _, expr, _ in entries))
    return ad


def parse_old(text: str) -> ClassAd:
    """One old-syntax ad: a ``Name = expression`` per line, as condor_status -long prints.

    Blank lines and lines starting with '#' are ignored.  Names are HTCondor attribute names
    (letters, digits, '_', not starting with a digit); each expression must parse completely
    with classad2.  Strings use old-syntax escaping (see :func:`_old_to_new_escaping`).  A bad
    line raises :class:`ClassAdError` naming its line number.  A later line for the same name
    (any case) replaces an earlier one, as in HTCondor.
    """
    if not isinstance(text, str):
        raise TypeError(f"ClassAd text must be str, not {type(text).__name__}")
    _check_text(text)
    ad = _parse_old_lines(enumerate(text.split("\n"), start=1))
    if ad is None:
        raise ClassAdError("empty input: no 'Name = expression' line", text)
    return ad


def parse_ad(text: str) -> ClassAd:
    """One ad in either syntax: new if the first non-space character is '[', else old."""
    if not isinstance(text, str):
        raise TypeError(f"ClassAd text must be str, not {type(text).__name__}")
    if not text.strip(_WS):
        raise ClassAdError("empty input", text)
    if text.lstrip(_WS).startswith("["):
        return parse_new(text)
    return parse_old(text)


def parse_ads(text: str) -> list[ClassAd]:
    """Several ads: new-syntax ads back to back (white space between them), or old-syntax ads
    separated by blank lines (condor_status -long output).  Empty text gives an empty list."""
    if not isinstance(text, str):
        raise TypeError(f"ClassAd text must be str, not {type(text).__name__}")
    _check_text(text)
    body = text.lstrip(_WS)
    if not body:
        return []
    ads: list[ClassAd] = []
    if body.startswith("["):
        _check_depth(text)
        # Cut the text after each outermost ']' (outside literals), then parse every piece
        # strictly: if our cut disagreed with classad2, a piece would not be exactly one ad.
        start = 0
        ends = list(_ad_ends(_blank_literals(text)))
        if text[ends[-1] if ends else 0 :].strip(_WS):
            ends.append(len(text))  # trailing text: let classad2 say what is wrong with it
        for end in ends:
            piece = text[start:end]
            try:
                ads.append(_parse_new_checked(piece))
            except ClassAdError as e:
                line = text.count("\n", 0, start + len(piece) - len(piece.lstrip(_WS))) + 1
                raise ClassAdError(f"ad {len(ads) + 1}: {e.reason}", e.text, line=line) from None
            start = end
        return ads
    block: list[tuple[int, str]] = []
    for number, line in enumerate([*text.split("\n"), ""], start=1):
        if line.strip(_WS):
            block.append((number, line))
        elif block:
            ad = _parse_old_lines(block)
            if ad is not None:  # a block of comments only is not an ad
                ads.append(ad)
            block = []
    return ads


# ---------------------------------------------------------------------------------------------
# Wire form
# ---------------------------------------------------------------------------------------------

# classad2 prints every nonzero real as "%.15E" (16 significant digits: 0.1 + 0.2 comes back as
# 0.3) and infinities/NaN as real("INF"); a NUL it prints as \000, which it cannot read back.
# The pattern starts with a literal '.' so that re can scan for it quickly: a pattern starting
# with [0-9] cost 20 us on a typical slot ad full of digits, more than printing it.
_REAL_RE = re.compile(r"\.[0-9]{15}E")


def _printer_is_exact(text: str) -> bool:
    return _REAL_RE.search(text) is None and "real(" not in text and "\\000" not in text


@functools.lru_cache(maxsize=4096)  # the same few hundred attribute names recur in every ad
def _encode_name(name: str) -> str:
    if _NAME_RE.fullmatch(name) and name.lower() not in _RESERVED:
        return name
    return "'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote(value: str) -> str:
    """``value`` as a ClassAd string literal, for building expressions without injection:
    ``f"GLIDEIN_Site == {quote(site)}"``.  Newlines and non-ASCII text are kept as they are."""
    if "\x00" in value:
        raise ClassAdError("NUL character (ClassAd strings cannot contain NUL)", value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unparse(value: object) -> str:
    """classad2's own text for a literal we do not write ourselves (absolute times)."""
    holder = ClassAd()
    holder["v"] = value
    return repr(holder.lookup("v"))


def _encode_value(value: object) -> str:
    kind = type(value)
    if kind is str:
        return quote(value)  # type: ignore[arg-type]
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        if math.isfinite(value):  # type: ignore[arg-type]
            return repr(value)  # shortest text that reads back as the same double
        return 'real("NaN")' if math.isnan(value) else ('real("INF")' if value > 0 else 'real("-INF")')  # type: ignore[operator]
    if isinstance(value, Value):  # an IntEnum: test before anything int-like
        return "undefined" if value is Value.Undefined else "error"
    if isinstance(value, ExprTree):
        return repr(value)  # an expression: classad2's printer (reals inside keep 16 digits)
    if isinstance(value, ClassAd):
        return _encode_ad_text(value)
    if isinstance(value, list):
        return "{" + ", ".join(_encode_value(item) for item in value) + "}"
    return _unparse(value)


def _encode_ad_text(ad: ClassAd) -> str:
    return "[" + "; ".join(f"{_encode_name(name)} = {_encode_value(ad[name])}" for name in ad) + "]"


def encode(ad: ClassAd) -> bytes:
    """The wire form of ``ad``: compact new-syntax text in UTF-8, read back by :func:`decode`.

    Round-trips exactly: strings (quotes, backslashes, newlines, any Unicode except NUL, which
    ClassAds cannot hold), lists, nested ads, UNDEFINED/ERROR, expressions, and literal reals
    bit for bit.  Reals *inside expressions* keep classad2's 16 significant digits, and a
    literal infinity or NaN comes back as the expression ``real("INF")``, as in HTCondor.
    """
    if not isinstance(ad, ClassAd):
        raise TypeError(f"expected a ClassAd, not {type(ad).__name__}")
    text = repr(ad)  # classad2's compact printer: the fast path when it is exact
    if _printer_is_exact(text):
        return text.encode("utf-8")
    try:
        return _encode_ad_text(ad).encode("utf-8")
    except UnicodeDecodeError as e:
        raise ClassAdError(f"the ad holds a string that is not valid UTF-8 ({e.reason})") from None


def decode(data: bytes) -> ClassAd:
    """The ad :func:`encode` wrote, or any single new-syntax ad in UTF-8.

    Strict: invalid UTF-8, NUL, a syntax error, anything but white space after the ad, and
    expressions too deep for classad2 raise :class:`ClassAdError` (and nothing else does).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, not {type(data).__name__}")
    data = bytes(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ClassAdError(f"not valid UTF-8 (byte {e.start}: {e.reason})", data) from None
    if "\x00" in text:
        raise ClassAdError(f"NUL byte at offset {data.index(0)} (ClassAd text cannot contain NUL)", data)
    _check_depth(text)
    return _parse_new_checked(text)


# ---------------------------------------------------------------------------------------------
# Matchmaking scope: unscoped names fall through to the target, as in HTCondor
# ---------------------------------------------------------------------------------------------

# In HTCondor's matchmaking an unscoped reference (``Memory``, not ``MY.Memory``) that the ad
# evaluating it does not define is looked up in the other ad: classad::AttributeReference
# consults ClassAd::alternateScope, which the negotiator, condor_q -better-analyze and
# MatchClassAd set to the match partner when old-ClassAd semantics are on (as in every HTCondor
# daemon).  classad2 has that switch too, but it is process-wide and turned on as a side effect:
# the first time classad2 converts a nested ad to Python (``ad["Nested"]``, ``name in ad``, an
# expression whose value is an ad) it imports htcondor2, whose configuration code flips it
# (along with other old-ClassAd differences: HTCondor's extra functions such as
# stringListMember appear, MY works without a target, leading-zero integers stop parsing).  So
# plain classad2 gives either answer depending on what the process did before.  We do not
# depend on it: expressions get explicit ``TARGET.`` prefixes (HTCondor's AddExplicitTargetRefs
# idea) so that both states give HTCondor's answer, and this module avoids converting values
# where it only needs to know whether a name is defined (_defines).
#
# How, without parsing ClassAds ourselves: classad2 prints the expression; a small token scan
# of that canonical text finds the references that are unscoped; ``TARGET.`` is inserted before
# those the ad does not define; classad2 parses the result, and it is used only if classad2
# prints it back unchanged and its own externalRefs shows exactly the intended change.
# Otherwise the expression is evaluated as it is (no fall-through), never differently.
#
# What falls through, exactly as AttributeReference::FindExpr does it: a bare name (not after a
# '.', not a function name) that is undefined in the ad *and* in the scope chain classad2's
# match ad puts above it (the names below).  Inside a nested ad literal (``[a = Foo].a``) the
# current ad is the nested one, which has no alternate scope: nothing there falls through.
# Attributes reached by reference (``Requirements = START``; START refers to the job's
# RequestMemory) are evaluated in their own ad with the same rule, so they are rewritten too:
# see _prepare.
#
# Limits (all rare in Requirements/START/Rank): names built at run time by eval() do not fall
# through; nothing is rewritten inside the expression arguments of evalInEachContext(),
# evaluateInContext() and countMatches(), whose scoping we cannot reproduce statically; an
# expression classad2 cannot print back faithfully (e.g. a literal infinity) is left alone.
# Reals in a rewritten expression are the 16 significant digits classad2 prints, as for every
# expression that crossed the wire.

# Names an unscoped reference finds in the scope chain of classad2's match ad before any
# fall-through: classad2's special scopes and the attributes of its MatchClassAd and of the
# per-side context ad ([ad = .LEFT; my = .LEFT; other = .RIGHT; target = .RIGHT]).
_OWN_SCOPES: Final = frozenset({"my", "self", "toplevel", "root", "parent", "ad"})
_OTHER_SCOPES: Final = frozenset({"target", "other"})
_MATCH_AD_NAMES: Final = frozenset({
    "lctx", "rctx", "left", "right", "leftrankvalue", "rightrankvalue",
    "symmetricmatch", "leftmatchesright", "rightmatchesleft",
})
_NEVER_FALL_THROUGH: Final = _OWN_SCOPES | _OTHER_SCOPES | _MATCH_AD_NAMES
_KEYWORDS: Final = frozenset({"true", "false", "undefined", "error", "is", "isnt"})
# Functions that evaluate an argument in other ads' contexts (HTCondor's compat library).
_CONTEXT_FUNCTIONS: Final = frozenset({"evalineachcontext", "evaluateincontext", "countmatches"})
# Functions that build references at run time from strings.
_DYNAMIC_FUNCTIONS: Final = frozenset({"eval"}) | _CONTEXT_FUNCTIONS

# One token of classad2's printed text.  Only the canonical printer output is ever scanned, so
# this needs no error handling: anything unexpected shows up in the checks after rewriting.
# Strings and quoted names are whole tokens (their contents are never code); a number is one
# token including its exponent (so the E of 1.5E+03 is not a name); the multi-character
# operators are listed so that the '?' of "=?=" or the '&' of "&&" are not read alone.
_TOKEN_RE = re.compile(
    r"""(?P<ws>[ \t\n\r\v\f]+)
      | (?P<str>"(?:[^"\\]|\\.)*")
      | (?P<qname>'(?:[^'\\]|\\.)*')
      | (?P<num>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<op>=\?=|=!=|&&|\|\||==|!=|<=|>=|>>>|>>|<<|\?:|.)""",
    re.DOTALL | re.VERBOSE,
)


class _Token:
    __slots__ = ("end", "kind", "start", "text")

    def __init__(self, kind: str, start: int, end: int, text: str) -> None:
        self.kind = kind
        self.start = start
        self.end = end
        self.text = text

    def name(self) -> str:
        """The attribute name of a name or quoted-name token."""
        return self.text[1:-1] if self.kind == "qname" else self.text

    def ends_operand(self) -> bool:
        # What can stand just before a subscript '[' (anything else makes '[' open an ad).
        if self.kind in ("str", "qname", "num"):
            return True
        if self.kind == "name":
            return self.text.lower() not in ("is", "isnt")
        return self.text in (")", "]", "}")


def _tokens(text: str) -> list[_Token]:
    return [_Token(m.lastgroup or "op", m.start(), m.end(), m.group(0))
            for m in _TOKEN_RE.finditer(text) if m.lastgroup != "ws"]


class _Scan:
    """What the token scan of one printed expression found (cached by text)."""

    __slots__ = ("all_other", "all_own", "dynamic", "nested", "ok", "other", "own", "probe", "probe_names",
                 "site_names", "sites", "text", "variants")

    def __init__(self, text: str) -> None:
        self.text = text
        self.ok = False  # the text reads back as the same tree: offsets can be rewritten
        self.sites: tuple[tuple[int, str], ...] = ()  # (offset, lower-case name): references that can fall through
        self.site_names: dict[str, str] = {}  # lower-case -> spelling, for every site name
        self.probe: dict[str, str] = {}  # lower-case -> spelling: every name whose definition matters
        self.probe_names: tuple[str, ...] = ()  # the spellings, sorted: asked of the owner ad
        self.nested: tuple[str, ...] = ()  # unscoped names inside nested ads (no fall-through there)
        self.own: tuple[str, ...] = ()  # MY.x and friends: attributes of the owner ad
        self.other: tuple[str, ...] = ()  # TARGET.x: attributes of the other ad
        self.dynamic = False  # eval(), a context function or an escaped name: references we cannot see
        self.all_own = False  # a bare scope (MY["x"], parent, ...): any attribute of the owner may matter
        self.all_other = False  # the same for the other ad (TARGET["x"], ...)
        self.variants: dict[tuple[frozenset[str], bool], _Variant] = {}


class _Variant:
    """The expression as evaluated in one owner ad (for one set of undefined names)."""

    __slots__ = ("expr", "other", "own")

    def __init__(self, expr: ExprTree | None, own: tuple[str, ...], other: tuple[str, ...]) -> None:
        self.expr = expr  # the rewritten tree, or None: evaluate the expression as it is
        self.own = own  # names of the owner's attributes it refers to (defined ones)
        self.other = other  # names of the other ad's attributes it refers to


def _scan_text(text: str) -> _Scan:
    scan = _Scan(text)
    tokens = _tokens(text)
    sites: list[tuple[int, str]] = []
    own: dict[str, str] = {}
    other: dict[str, str] = {}
    nested: dict[str, str] = {}
    # Open brackets: "ad" for a nested ad literal, "ctx" for the arguments of a context
    # function, else the bracket itself.  Nothing inside an "ad" or "ctx" frame falls through.
    stack: list[str] = []
    opaque = 0  # how many "ad"/"ctx" frames are open
    for i, token in enumerate(tokens):
        kind = token.kind
        if kind == "op":
            char = token.text
            if char == "[":
                opens = "[" if i and tokens[i - 1].ends_operand() else "ad"
            elif char == "(":
                before = tokens[i - 1] if i else None
                is_context = before is not None and before.kind == "name" and before.text.lower() in _CONTEXT_FUNCTIONS
                opens = "ctx" if is_context else "("
            elif char == "{":
                opens = "{"
            else:
                if char in ")]}" and stack and stack.pop() in ("ad", "ctx"):
                    opaque -= 1
                continue
            stack.append(opens)
            if opens in ("ad", "ctx"):
                opaque += 1
            continue
        if kind not in ("name", "qname"):
            continue
        if kind == "qname" and "\\" in token.text:
            scan.dynamic = True  # an escaped quoted name: we do not decode escapes ourselves
            continue
        name = token.name()
        low = name.lower()
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if kind == "name":
            if low in _KEYWORDS:
                continue
            if following is not None and following.text == "(":
                if low in _DYNAMIC_FUNCTIONS:
                    scan.dynamic = True
                continue  # a function name, not an attribute
        previous = tokens[i - 1] if i else None
        if previous is not None and previous.kind == "op" and previous.text == ".":
            # A selection "x.name" or an absolute ".name".  Only a scope word before the '.'
            # makes it a reference to an ad's attribute; after anything else "name" is looked
            # up in whatever x evaluates to, never in MY or TARGET directly.
            head = tokens[i - 2] if i >= 2 else None
            if head is None or not head.ends_operand():
                own.setdefault(low, name)  # ".name": the root scope
            elif head.kind in ("name", "qname") and not (i >= 3 and tokens[i - 3].text == "."):
                scope = head.name().lower()
                if scope in _OTHER_SCOPES:
                    other.setdefault(low, name)
                elif scope == "parent" or scope in _MATCH_AD_NAMES:
                    scan.all_own = scan.all_other = True  # classad2's match ad: not an attribute we can name
                elif scope in _OWN_SCOPES:
                    own.setdefault(low, name)
            continue
        if low in _NEVER_FALL_THROUGH:
            if following is None or following.text != ".":  # a bare scope, not the head of "MY.x"
                if low in _OTHER_SCOPES:
                    scan.all_other = True
                elif low in _OWN_SCOPES and low != "parent":
                    scan.all_own = True
                else:
                    scan.all_own = scan.all_other = True
            continue
        if opaque:
            if following is not None and following.text == "=" and stack[-1] == "ad":
                continue  # "name = ..." defines an attribute of the nested ad
            nested.setdefault(low, name)  # found in the nested ad, through its parents, or not at all
            continue
        sites.append((token.start, low))
        scan.site_names.setdefault(low, name)
    scan.sites = tuple(sites)
    scan.nested = tuple(nested.values())
    scan.own = tuple(own.values())
    scan.other = tuple(other.values())
    probe = dict(scan.site_names)
    for table in (nested, own):
        for low, name in table.items():
            probe.setdefault(low, name)
    if sites and "target" not in probe:
        # Whether the ad has an attribute of its own named TARGET decides if a "TARGET."
        # prefix would reach the other ad: ask in the same classad2 call.
        probe["target"] = "TARGET"
    scan.probe = probe
    scan.probe_names = tuple(sorted(probe.values()))
    return scan


@functools.lru_cache(maxsize=4096)
def _names_list(names: tuple[str, ...]) -> ExprTree:
    """``{a, b, ...}``: a list of references, for asking classad2 which an ad defines."""
    return parse_expr("{" + ", ".join(_encode_name(name) for name in names) + "}")


def _raw_refs(expr: ExprTree) -> set[str] | None:
    """classad2's names for the references in ``expr``, as written (an ad with no attributes
    reports every reference as external); None if classad2 cannot list them (it refuses
    circular definitions, even inside a nested ad: ``[x = x].x``)."""
    try:
        return {ref for ref in _NO_ATTRIBUTES.externalRefs(expr) if ref}
    except (ClassAdException, ValueError):
        return None


_NO_ATTRIBUTES: Final = ClassAd()
_SCANS: dict[str, _Scan] = {}
_SCANS_MAX: Final = 20_000


def _scan(expr: ExprTree, text: str | None = None) -> _Scan:
    if text is None:
        text = repr(expr)
    scan = _SCANS.get(text)
    if scan is not None:
        return scan
    scan = _scan_text(text)
    try:
        # Offsets in the printed text are only meaningful if that text reads back as the tree
        # (classad2's printer is not always faithful: A.'b c' comes out as A.b c).
        again = parse_expr(text)
        scan.ok = repr(again) == text and again == expr
    except ClassAdError:
        scan.ok = False
    if len(_SCANS) >= _SCANS_MAX:
        _SCANS.clear()  # pathological input only: a cold cache costs time, not correctness
    _SCANS[text] = scan
    return scan


def _with_target_prefix(scan: _Scan, names: frozenset[str]) -> ExprTree | None:
    """The expression with ``TARGET.`` before each site naming one of ``names``, checked by
    classad2; None if the check fails."""
    text = scan.text
    pieces: list[str] = []
    last = 0
    for offset, low in scan.sites:
        if low in names:
            pieces.append(text[last:offset])
            pieces.append("TARGET.")
            last = offset
    new_text = "".join(pieces) + text[last:]
    try:
        new = parse_expr(new_text)
    except ClassAdError:
        return None
    if repr(new) != new_text:
        return None  # classad2 read our text as something else
    # classad2's own view of the references (it lists each name once, ignoring case): every
    # rewritten name now appears as TARGET.name (TARGET.name.more for a chain), and every new
    # reference is an old one with TARGET. inserted: nothing else changed.
    raw_before, raw_after = _raw_refs(parse_expr(text)), _raw_refs(new)
    if raw_before is None or raw_after is None:
        return None
    before = {ref.lower() for ref in raw_before}
    after = {ref.lower() for ref in raw_after}
    if any(_TARGET_PREFIX_RE.sub("", ref) not in before for ref in after - before):
        return None
    for low in names:
        inserted = re.compile(_TARGET_PREFIX_RE.pattern + re.escape(low) + r"(?![A-Za-z0-9_])")
        if not any(inserted.search(ref) for ref in after):
            return None
    return new


# "target." where a reference starts in classad2's names for references ("target.memory",
# "(target.memory).x"), not inside a longer name ("mytarget.x").
_TARGET_PREFIX_RE = re.compile(r"(?<![A-Za-z0-9_.'])target\.")


_NO_NAMES: Final = frozenset[str]()
_NO_REFS: Final = [""]  # what classad2's externalRefs returns when there are none
_ONLY_TARGET: Final = ["TARGET"]
_TARGET_MISSING: Final = frozenset({"target"})


def _lookup_refs(ad: ClassAd, names: tuple[str, ...], deeper: bool = True) -> tuple[frozenset[str], list[str] | None]:
    """Which of ``names`` ``ad`` lacks (lower case), and the references classad2 finds by
    following the ones it has through ``ad`` (its externalRefs: unscoped ones transitively);
    None for those if classad2 cannot tell (it refuses ads with circular references).

    We ask classad2 rather than ``name in ad``: that converts the value to Python, and
    converting a nested ad flips classad2's process-wide semantics (see above).
    """
    try:
        refs = ad.externalRefs(_names_list(names))
    except (ClassAdException, ValueError):
        return frozenset(name.lower() for name in names if not _defines(ad, name)), None
    if refs == _NO_REFS:
        return _NO_NAMES, []  # the usual answer: all defined, nothing further
    if refs == _ONLY_TARGET:
        return _TARGET_MISSING, []  # the same, for a probe that asks about TARGET too
    listed = _lower_set(names)
    missing = frozenset(low for low in (ref.lower() for ref in refs) if low in listed)
    if not missing:
        return missing, refs
    if missing <= _NEVER_FALL_THROUGH or not deeper:
        return missing, refs  # e.g. TARGET: deeper references to it do not matter either
    # A listed name the ad lacks may also be referred to further down; ask again about the
    # defined ones alone so that such references are not mistaken for the listed name.
    defined = tuple(name for name in names if name.lower() not in missing)
    if not defined:
        return missing, []
    try:
        return missing, [ref for ref in ad.externalRefs(_names_list(defined)) if ref]
    except (ClassAdException, ValueError):
        return missing, None


@functools.lru_cache(maxsize=4096)
def _lower_set(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(name.lower() for name in names)


def _variant(scan: _Scan, ad: ClassAd, missing: frozenset[str]) -> _Variant:
    """The expression as ``ad`` evaluates it, given the probe names ``ad`` lacks."""
    if not missing:
        key: tuple[frozenset[str], bool] = (_NO_NAMES, False)
    else:
        falls = frozenset(low for low in scan.site_names if low in missing)
        # TARGET.x means the other ad only if the ad has no attribute of its own named TARGET
        # (the probe asks about TARGET whenever there are sites: see _scan_text).
        key = (falls, bool(falls) and "target" in missing)
    variant = scan.variants.get(key)
    if variant is not None:
        return variant
    falls, target_free = key
    rewritten = _with_target_prefix(scan, falls) if falls and target_free and scan.ok else None
    own = tuple(name for low, name in scan.probe.items() if low not in missing and low != "target")
    other = scan.other
    if rewritten is not None:
        other = other + tuple(scan.site_names[low] for low in sorted(falls))
    variant = _Variant(rewritten, own, tuple(sorted(set(other))))
    scan.variants[key] = variant
    return variant


# How _may_fall_through takes one of classad2's reference names (cached: the same few recur).
_IGNORE, _UNSCOPED, _OWN, _OTHER, _UNKNOWN = range(5)
_REF_KINDS: dict[str, tuple[int, str]] = {}


def _ref_kind(ref: str) -> tuple[int, str]:
    kind = _REF_KINDS.get(ref)
    if kind is not None:
        return kind
    head, dot, rest = ref.partition(".")
    scope = head.strip("'").lower()
    member = rest.partition(".")[0].partition("[")[0]
    if not dot:
        kind = (_IGNORE, "") if scope in _NEVER_FALL_THROUGH else (_UNSCOPED, scope)
    elif scope in _OWN_SCOPES:
        kind = (_OWN, member) if member else (_IGNORE, "")
    elif scope in _OTHER_SCOPES:
        kind = (_OTHER, member) if member else (_IGNORE, "")
    elif scope in _MATCH_AD_NAMES:
        kind = (_IGNORE, "")
    else:
        kind = (_UNKNOWN, "")  # "a.b" with a missing, "(x).y", ...: let the exact walk decide
    if len(_REF_KINDS) >= _SCANS_MAX:
        _REF_KINDS.clear()
    _REF_KINDS[ref] = kind
    return kind


def _may_fall_through(refs: list[str] | None, side: int, pending: tuple[set[str], set[str]]) -> bool:
    """Sort classad2's reference names found in the ad of ``side``: MY.x and TARGET.x go to
    ``pending`` (x is looked at next, in that ad); True if one is an unscoped name the ad
    lacks (an expression of that ad may need rewriting), a form we do not know, or if
    classad2 could not list them."""
    if refs is None:
        return True
    for ref in refs:
        kind, member = _ref_kind(ref)
        if kind == _OWN:
            pending[side].add(member)
        elif kind == _OTHER:
            pending[1 - side].add(member)
        elif kind != _IGNORE:
            return True
    return False


Install = tuple[ClassAd, str, ExprTree, ExprTree]


def _prepare(expr: ExprTree, scan: _Scan, my: ClassAd, target: ClassAd) -> tuple[ExprTree, list[Install]]:
    """What to evaluate for ``expr`` with MY = my and TARGET = target under the scope rule:
    the (possibly rewritten) expression, and attributes of either ad that must be replaced by
    rewritten versions while it is evaluated.

    Attributes are looked at in batches, one classad2 call per batch: externalRefs follows an
    ad's own unscoped references in C++, so an empty or clean answer settles a whole batch
    and everything below it.  In the usual case that is two calls (the job's own names, the
    slot's names the job refers to).  Only a batch whose answer shows an unscoped name its ad
    lacks is looked at attribute by attribute (_expand).
    """
    if scan.probe_names:
        missing, refs = _lookup_refs(my, scan.probe_names)
    else:
        missing, refs = _NO_NAMES, []
    variant = _variant(scan, my, missing)
    top = expr if variant.expr is None else variant.expr
    ads = (my, target)
    installs: list[Install] = []
    # Names to look at next per side (0: my, 1: target), and names already looked at.
    pending: tuple[set[str], set[str]] = (set(), set())
    seen: tuple[set[str], set[str]] = ({name.lower() for name in variant.own}, set())
    if _may_fall_through(refs, 0, pending):
        _expand(ads, 0, variant.own, pending, installs)
    if variant.other:
        seen[1].update(name.lower() for name in variant.other)
        missing, refs = _lookup_refs(target, variant.other)
        if _may_fall_through(refs, 1, pending):
            _expand(ads, 1, tuple(name for name in variant.other if name.lower() not in missing), pending, installs)
    while pending[0] or pending[1]:
        side = 1 if pending[1] else 0
        names = tuple(sorted(name for name in pending[side] if name.lower() not in seen[side]))
        pending[side].clear()
        if not names:
            continue
        seen[side].update(name.lower() for name in names)
        missing, refs = _lookup_refs(ads[side], names)
        if _may_fall_through(refs, side, pending):
            _expand(ads, side, tuple(name for name in names if name.lower() not in missing), pending, installs)
    return top, installs


def _expand(ads: tuple[ClassAd, ClassAd], side: int, names: Iterable[str], pending: tuple[set[str], set[str]],
            installs: list[Install]) -> None:
    """Look at attributes ``names`` of ``ads[side]`` one by one: note those that evaluate
    rewritten, and queue what each refers to."""
    ad = ads[side]
    for name in names:
        try:
            expr = ad.lookup(name)
        except KeyError:
            continue
        scan = _scan(expr)
        missing = _lookup_refs(ad, scan.probe_names, deeper=False)[0] if scan.probe_names else _NO_NAMES
        sub = _variant(scan, ad, missing)
        if sub.expr is not None:
            installs.append((ad, name, expr, sub.expr))
        pending[side].update(sub.own)
        pending[1 - side].update(sub.other)


def _eval_match(expr: ExprTree, my: ClassAd | None, target: ClassAd | None, scan: _Scan | None = None) -> object:
    """classad2's value of ``expr`` with MY = my and TARGET = target, with HTCondor's scope rule."""
    if _NATIVE_FALL_THROUGH or my is None or target is None or target is my:
        return _eval(expr, my, target)  # no partner to fall through to
    if scan is None:
        scan = _scan(expr)
    try:
        top, installs = _prepare(expr, scan, my, target)
    except (ClassAdException, UnicodeDecodeError, SystemError, ValueError):
        # classad2 could not list an ad's references (e.g. an undecodable name): evaluate
        # as it is, which is what classad2 alone would do.
        return _eval(expr, my, target)
    if not installs:
        return _eval(top, my, target)
    done: list[Install] = []
    try:
        for install in installs:  # one thread at a time (module docstring): nobody sees these
            ad, name, _original, rewritten = install
            ad[name] = rewritten
            done.append(install)
        return _eval(top, my, target)
    finally:
        for ad, name, original, _rewritten in reversed(done):
            ad[name] = original


def references(expr: ExprTree) -> frozenset[str]:
    """The attributes ``expr`` refers to: ``"MY.Name"``, ``"TARGET.Name"`` and unscoped
    ``"Name"`` (which in matchmaking means the ad's own attribute if it has one, else the other
    ad's).  Names keep their spelling; only the first attribute of a chain is given
    (``TARGET.a.b`` gives ``"TARGET.a"``); ``self.x`` and ``.x`` count as ``MY.x``.  ``"MY"``
    or ``"TARGET"`` alone means any attribute of that ad may matter: a bare ``MY["x"]``,
    ``parent``, names built by eval(), or a reference classad2 reports that we cannot name.

    The scopes come from the token scan of classad2's printed text, because classad2's own
    externalRefs reports ``MY.x`` as ``MY.x`` or as ``x`` depending on its process-wide mode
    (see "Matchmaking scope"); its names are used as a check: any name it reports that the
    scan did not find makes the answer "anything" (``"MY"`` and ``"TARGET"``).
    """
    text = repr(expr)
    cached = _REFERENCES.get(text)
    if cached is not None:
        return cached
    scan = _scan(expr, text)
    found = set(scan.site_names.values()) | set(scan.nested)
    found.update("MY." + name for name in scan.own)
    found.update("TARGET." + name for name in scan.other)
    if scan.dynamic or scan.all_own:
        found.add("MY")
    if scan.dynamic or scan.all_other:
        found.add("TARGET")
    known = {ref.rpartition(".")[2].lower() for ref in found}
    raw = _raw_refs(expr)
    if raw is None or any(name is not None and name.lower() not in known for name in map(_ref_attribute, raw)):
        found.update(("MY", "TARGET"))
    result = frozenset(found)
    if len(_REFERENCES) >= _SCANS_MAX:
        _REFERENCES.clear()
    _REFERENCES[text] = result
    return result


def _ref_attribute(ref: str) -> str | None:
    """The attribute one of classad2's reference names is about (``TARGET.a.b``, ``my.a``,
    ``a.b`` -> ``a``); None for forms that name none (``(x).y``, a bare ``MY``)."""
    if ref.startswith("("):
        return None
    head, _dot, rest = ref.partition(".")
    head = head.partition("[")[0].strip("'")
    if head.lower() in ("my", "target"):
        member = rest.partition(".")[0].partition("[")[0]
        return member or None
    return head or None


_REFERENCES: dict[str, frozenset[str]] = {}


def conjuncts(expr: ExprTree) -> list[ExprTree]:
    """The top-level ``&&`` clauses of ``expr`` (one clause if it is not a conjunction), each
    parsed by classad2; parenthesised conjunctions are split too, so HTCondor's
    ``(A) && (B && C)`` gives A, B and C.  The split is made on classad2's printed text at
    ``&&`` tokens outside brackets, strings and quoted names, and only where no ``||`` or
    ``?:`` binds more loosely; redundant parentheses around a clause are dropped.  If any piece
    does not parse back, ``[expr]`` is returned."""
    pieces = _split_and(repr(expr))
    if len(pieces) == 1:
        return [expr]
    try:
        return [parse_expr(piece) for piece in pieces]
    except ClassAdError:
        return [expr]


def _split_and(text: str) -> list[str]:
    text = text.strip(_WS)
    tokens = _tokens(text)
    depth = 0
    cuts: list[_Token] = []
    for token in tokens:
        if token.kind != "op":
            continue
        if token.text in "([{":
            depth += 1
        elif token.text in ")]}":
            depth -= 1
        elif depth == 0:
            if token.text == "&&":
                cuts.append(token)
            elif token.text in ("||", "?", "?:"):
                return _unwrap(text, tokens)  # && binds tighter: the top is not a conjunction
    if not cuts:
        return _unwrap(text, tokens)
    pieces: list[str] = []
    start = 0
    for cut in cuts:
        pieces.extend(_split_and(text[start:cut.start]))
        start = cut.end
    pieces.extend(_split_and(text[start:]))
    return pieces


def _unwrap(text: str, tokens: list[_Token]) -> list[str]:
    """``(X)`` split as X if X is a conjunction; anything else is one clause."""
    if len(tokens) >= 2 and tokens[0].text == "(" and tokens[-1].text == ")":
        depth = 0
        for token in tokens[:-1]:
            if token.kind == "op" and token.text in "([{":
                depth += 1
            elif token.kind == "op" and token.text in ")]}":
                depth -= 1
                if depth == 0:
                    return [text]  # the first '(' closes before the end: "(a) + (b)"
        # The parentheses are redundant around a whole clause: HTCondor's condor_submit writes
        # (TARGET.Arch == "X86_64") && ..., and the clause is TARGET.Arch == "X86_64".
        return _split_and(text[tokens[0].end:tokens[-1].start])
    return [text]


# ---------------------------------------------------------------------------------------------
# Evaluation and matching
# ---------------------------------------------------------------------------------------------


def _is_true(value: object) -> bool:
    """HTCondor's test of a constraint or Requirements value (classad::Value::IsBooleanValueEquiv
    with the old-ClassAd semantics its daemons run with, as condor_q -constraint and the
    matchmaker use): a boolean is itself, a nonzero integer or real is true, anything else
    (UNDEFINED, ERROR, strings, lists, ads) is false."""
    kind = type(value)  # exact types: bool is an int, and classad2's Value is an IntEnum
    if kind is bool:
        return value  # type: ignore[return-value]
    if kind is int or kind is float:
        return value != 0  # NaN != 0, as in C: HTCondor counts NaN as true
    return False


def _eval(expr: ExprTree, scope: ClassAd | None, target: ClassAd | None) -> object:
    """classad2's value; ERROR if classad2 itself fails (e.g. its evaluation depth limit) or
    produces a string that is not UTF-8."""
    try:
        return expr.eval(scope, target)
    except (ClassAdException, UnicodeDecodeError):
        return Value.Error


class Constraint:
    """A constraint parsed once and evaluated many times: ``Constraint.matches(ad)``.

    No text (None, or only white space) matches every ad.  Otherwise the result is true only if
    the expression evaluates, with MY = the ad (and TARGET = ``target`` if given), to true or
    to a nonzero number, as condor_q -constraint and condor_status -constraint count it.
    UNDEFINED, ERROR and other values are false.  With a target, unscoped names the ad lacks
    are looked up in the target, as in HTCondor's matchmaking.
    """

    __slots__ = ("_scan", "expr", "text")

    def __init__(self, text: str | None, expr: ExprTree | None) -> None:
        self.text = text
        self.expr = expr
        self._scan: _Scan | None = None  # the matchmaking scan of expr, made on first use

    def matches(self, ad: ClassAd, target: ClassAd | None = None) -> bool:
        if self.expr is None:
            return True
        if target is None:
            return _is_true(_eval(self.expr, ad, None))
        if self._scan is None:
            self._scan = _scan(self.expr)  # printed once here, not at every evaluation
        return _is_true(_eval_match(self.expr, ad, target, self._scan))

    __call__ = matches

    def __repr__(self) -> str:
        return f"Constraint({self.text!r})"


_MATCH_ALL: Final = Constraint(None, None)


@functools.lru_cache(maxsize=512)
def _compile_cached(text: str) -> Constraint:
    # The collector is handed the same few constraint strings over and over.
    return Constraint(text, parse_expr(text))


def compile_constraint(text: str | None) -> Constraint:
    """Parse a constraint once (see :class:`Constraint`); a bad one raises :class:`ClassAdError`."""
    if text is None:
        return _MATCH_ALL
    if not isinstance(text, str):
        raise TypeError(f"constraint must be str or None, not {type(text).__name__}")
    if not text.strip(_WS):
        return _MATCH_ALL
    return _compile_cached(text)


def evaluate_constraint(constraint: ExprTree | str | Constraint | None, ad: ClassAd,
                        target: ClassAd | None = None) -> bool:
    """Whether ``ad`` satisfies ``constraint`` (see :class:`Constraint` for what counts as true),
    with TARGET = ``target`` if given (and then HTCondor's matchmaking scope rule: an unscoped
    name ``ad`` lacks is looked up in ``target``).

    A string is compiled (and cached); an unparsable one raises :class:`ClassAdError` rather than
    quietly matching nothing.
    """
    if isinstance(constraint, Constraint):
        return constraint.matches(ad, target)
    if isinstance(constraint, ExprTree):
        return _is_true(_eval_match(constraint, ad, target))
    return compile_constraint(constraint).matches(ad, target)


def requirements_met(ad: ClassAd, other: ClassAd, attribute: str = "Requirements") -> bool:
    """Whether ``ad``'s expression ``attribute`` (Requirements, or e.g. a slot's START) holds
    with MY = ad and TARGET = other, under the matchmaking scope rule.  A missing attribute
    counts as true: no conditions on the other side."""
    try:
        expr = ad.lookup(attribute)
    except KeyError:
        return True
    return _is_true(_eval_match(expr, ad, other))


def symmetric_match(a: ClassAd, b: ClassAd) -> bool:
    """Matchmaking: ``a``'s Requirements hold with MY = a and TARGET = b, and ``b``'s hold the
    other way round.  As in HTCondor, an unscoped name an ad lacks (``Memory >= 1024`` in a
    job) is looked up in the other ad; ``MY.name`` never is.  A missing Requirements counts as
    true (classad2's own symmetricMatch counts it as false); UNDEFINED and ERROR count as false."""
    return requirements_met(a, b) and requirements_met(b, a)


def rank(a: ClassAd, b: ClassAd) -> float:
    """``a``'s Rank evaluated with MY = a and TARGET = b (and the scope rule), as a float.

    A boolean counts as 1.0/0.0, as HTCondor's EvalFloat does (``Rank = Owner == "x"`` is common).
    A missing Rank, UNDEFINED, ERROR, NaN and any other non-number give 0.0.
    """
    try:
        expr = a.lookup("Rank")
    except KeyError:
        return 0.0
    value = _eval_match(expr, a, b)
    kind = type(value)
    if kind is bool or kind is int or kind is float:
        result = float(value)  # type: ignore[arg-type]
        return 0.0 if math.isnan(result) else result
    return 0.0


def _names(attributes: Iterable[str]) -> set[str]:
    if isinstance(attributes, str):  # a lone name would otherwise be taken letter by letter
        raise TypeError("attributes must be an iterable of names, not a single str")
    return {name.lower() for name in attributes}


def project(ad: ClassAd, attributes: Iterable[str]) -> ClassAd:
    """A new ad with only ``attributes`` (matched ignoring case, as ClassAds do; names keep the
    ad's spelling); names the ad lacks are skipped."""
    wanted = _names(attributes)
    result = ClassAd()
    for name in ad:
        if name.lower() in wanted:
            result[name] = ad.lookup(name)  # classad2 copies the tree
    return result


def without(ad: ClassAd, attributes: Iterable[str]) -> ClassAd:
    """A copy of ``ad`` without ``attributes`` (ignoring case), e.g. to hide private ones."""
    hidden = _names(attributes)
    result = ClassAd()
    for name in ad:
        if name.lower() not in hidden:
            result[name] = ad.lookup(name)
    return result


def evaluate(ad: ClassAd, attribute: str, target: ClassAd | None = None) -> object:
    """The value of ``attribute`` with MY = ad (and TARGET = ``target``, with the matchmaking
    scope rule), expressions evaluated.

    Missing or UNDEFINED gives None; ERROR gives :data:`ERROR` (false, prints as "error").
    Other values are classad2's: bool, int, float, str, list, ClassAd, datetime.
    """
    try:
        expr = ad.lookup(attribute)
    except KeyError:
        return None
    value = _eval_match(expr, ad, target)
    if isinstance(value, Value):
        return None if value is Value.Undefined else ERROR
    return value


# ---------------------------------------------------------------------------------------------
# Output for people and scripts
# ---------------------------------------------------------------------------------------------


def _expr_marker(text: str) -> str:
    return f"/Expr({text})/"


def _to_json_value(value: object) -> object:
    kind = type(value)
    if kind is str or kind is bool or kind is int:
        return value
    if kind is float:
        return value if math.isfinite(value) else _expr_marker(_encode_value(value))  # type: ignore[arg-type]
    if isinstance(value, Value):
        return None if value is Value.Undefined else _expr_marker("error")
    if isinstance(value, ExprTree):
        return _expr_marker(repr(value))
    if isinstance(value, ClassAd):
        return to_python(value)
    if isinstance(value, list):
        return [_to_json_value(item) for item in value]
    return _expr_marker(_unparse(value))


def to_python(ad: ClassAd) -> dict[str, object]:
    """The ad as JSON-ready Python values, the way condor_q -json writes it.

    Literals become JSON values (UNDEFINED is null, nested ads are objects, lists are arrays).
    Anything else keeps its ClassAd text inside HTCondor's marker, ``"/Expr(TARGET.Cpus > 1)/"``
    (condor_q prints the slashes JSON-escaped, "\\/Expr(...)\\/", which is the same string):
    so a reader can tell an expression from a string, and classad2's JSON parser reads it back.
    ERROR is ``"/Expr(error)/"``; absolute times and non-finite reals are expressions too.
    """
    try:
        return {name: _to_json_value(ad[name]) for name in ad}
    except UnicodeDecodeError as e:
        raise ClassAdError(f"the ad holds a string that is not valid UTF-8 ({e.reason})") from None


def format_old(ad: ClassAd, sort: bool = True) -> str:
    """``Name = value`` lines sorted by name (ignoring case), as condor_status -long prints.

    The lines are classad2's old-syntax printer's, so they use old-syntax escaping and read
    back with :func:`parse_old`; like HTCondor's, a string containing a newline is printed
    with that newline in it. ``sort=False`` keeps classad2's order and is ~20 times cheaper
    (for files programs read, such as a job's .job.ad, not for people).
    """
    if not sort:
        return ad.printOld()
    lines = []
    for name in sorted(ad, key=str.lower):
        single = ClassAd()
        single[name] = ad.lookup(name)
        lines.append(single.printOld().rstrip("\n"))
    return "".join(line + "\n" for line in lines)
