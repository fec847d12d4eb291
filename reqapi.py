#!/usr/bin/env python3
"""reqapi — a Kubernetes aggregated API server that answers one question:
what CPU and memory requests should workload NAME in namespace NS get?

It serves the API group ``k8s.wujiuye.com/v1beta1``, namespaced resource ``requests``
(kind ``Requests``), read-only (get, list, watch), behind kube-apiserver's aggregation
layer (an ``APIService``).  Answers come from ordered static rules (``--rules FILE``).

Run it::

    python3 reqapi.py --cert FILE --key FILE           # serve on :8443 (the deployment's way)
    python3 reqapi.py                                  # laptop: throwaway self-signed certificate
    python3 reqapi.py --cert tls.crt --key tls.key --rules rules.json
    curl -k https://127.0.0.1:8443/apis/k8s.wujiuye.com/v1beta1/namespaces/default/requests/web
    python3 reqapi.py --rules rules.json --check        # validate rules (exit 0 or 2)
    python3 reqapi.py --rules rules.json --predict shop/checkout

Standard library only; one file, meant to be copied into a distroless Python image.

The map.  The module reads like a book, top to bottom; each section starts with a header
comment ``# N. Title`` and builds only on the sections above it:

 1. Quantities and names        pure: Kubernetes quantities, DNS-1123 names
 2. Rules and prediction        pure: a rules file in, an immutable Rules out; Rules.predict;
                                the history estimator and predict_with_history
 3. Kubernetes documents        pure: objects, lists, tables, Status, WatchEvent, discovery,
                                OpenAPI, and the one JSON encoder of response bodies
 4. HTTP messages               pure: Request (parsed once), Response, HTTPError, parse_head,
                                and ResponseEncoder, the one place response bytes are made
 5. Request options             pure: names from the path, the Accept header, typed list and
                                watch options (selectors, limit, continue, resourceVersion...)
 6. Storage                     state, no I/O: the rules history (generations, which answer a
                                get, and the change condition) and the storage's list and watch
 7. Identity                    authentication and authorization behind one object, Access
 8. Observability               the logger, metrics (gauges are registered callables), and
                                Health, the one owner of readiness, shutdown and refusals
 9. History refresher          with --prometheus-url: the PromQL, the metrics engine's client,
                                the completed days read in the background, their cache
10. API                         thin endpoints, the route table, the response memo, and one
                                pipeline, Api.handle(request, peer)
11. Transport                   TLS, and one event loop (ReqapiServer) over non-blocking
                                connections (Connection): heads, answers, watches, deadlines
12. Runtime                     a frozen Config built once from the flags, the reloader,
                                start / wait / drain, interpreter tuning
13. Command line                flags, --check, --predict, main()

Three rules keep the map true (tests/test_layers.py checks them by parsing this file and by
tracing one GET of an object):

(a) A section uses only the sections above it: no forward references, no cycles, and no
    callbacks registered upwards except the gauges that section 8 reads (a gauge is a plain
    callable returning a number, so Metrics imports nothing below it).
(b) Every piece of mutable state has exactly one owner, and is changed only through that
    owner's methods (other sections may read its public attributes).  RulesHistory owns
    the generations, Access the authentication configuration, Health readiness and refusals,
    Metrics the counters, Api the response memo, ReqapiServer the registry of connections and
    watches and the TLS context, each Connection its own buffers and phase (used by the loop's
    thread only), Reloader the file signatures.
(c) Response bytes are produced in exactly one place: bodies by dumps() (section 3), heads,
    chunks and whole responses by ResponseEncoder (section 4).

So a GET of an object goes down the map and back: transport -> parse_head -> Api.handle ->
Access.admit -> object_options (names, Accept) -> the memo, or the storage, the rules and the
document -> ResponseEncoder -> record_request.  Traced, it crosses 7 section boundaries when
the memo answers and 10 the first time a name is asked, every call going downwards.
"""

from __future__ import annotations

import signal

# Signals from the first instruction.  A SIGHUP (a rules reload, e.g. from a ConfigMap reloader)
# that arrives while the rest of this file is imported and the rules are read would otherwise
# kill the process (SIGHUP's default action), and a SIGTERM would be lost or kill it half-started.
# They are noted here, and run() acts on them once it can (--check and --predict restore the
# defaults).  A module-level list, appended to by this handler only and read by run().
_early_signals: list[int] = []
if __name__ == "__main__":
    for _signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(_signum, lambda signum, frame: _early_signals.append(signum))

import argparse
import array
import base64
import binascii
import bisect
import dataclasses
import difflib
import fractions
import functools
import gc
import hashlib
import http
import json
import math
import os
import queue
import random
import re
import select
import selectors
import socket
import socketserver
import ssl
import sys
import threading
import time
import types
import urllib.parse
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, NoReturn, Optional, Sequence, Union
# Imported where they are used, not here, since a start without them is measurably faster (the
# first answer comes sooner): urllib.request, urllib.error and http.client (only in a cluster or
# with usage history), tempfile and subprocess (the history cache, a throwaway certificate):
# ~30 ms of every start by -X importtime on the development VM.  (email.utils, for one date
# format, cost 28 ms: see http_date.)

__version__ = "0.1.0"

# ---------------------------------------------------------------------------
# 1. Quantities and names (pure functions)
# ---------------------------------------------------------------------------
#
# What the API is called, then parse_quantity and the DNS-1123 name checks.

GROUP = "k8s.wujiuye.com"
VERSION = "v1beta1"
GROUP_VERSION = f"{GROUP}/{VERSION}"
RESOURCE = "requests"
SINGULAR = "request"
KIND = "Requests"
LIST_KIND = "RequestsList"
SHORT_NAMES = ["req"]
CATEGORIES = ["wujiuye"]
RULE_ANNOTATION = f"{GROUP}/rule"
SOURCE_ANNOTATION = f"{GROUP}/source"      # with --prometheus-url: rules, history or blend
QUALIFIED_RESOURCE = f"{RESOURCE}.{GROUP}"

#
# parse_quantity follows kubernetes/apimachinery pkg/api/resource ParseQuantity:
#   <quantity> ::= <sign>? <number> <suffix>
#   <number>   ::= digits | digits.digits | digits. | .digits
#   <suffix>   ::= "" | n u m k M G T P E | Ki Mi Gi Ti Pi Ei | (e|E) <sign>? digits
# and returns the value Go would store: non-zero values finer than 1n are rounded away from
# zero to 1n (Go: "0.9n" -> 1n, "1e-10" -> 1n). This never changes cpu_millicores or
# memory_mebibytes, which round up to a coarser unit anyway.
# Deliberate, documented differences from Go (all are pathological inputs):
#   - ".", "+", "-" (no digit at all) are refused; Go's scanner reads them as 0 although the
#     documented grammar does not allow them.
#   - |value| >= 2**63 is refused: Go caps binary values and lets decimal ones overflow Value().
#   - exponents outside int32 are refused: Go silently wraps them ("1e4294967296" == 1).
#   - inputs longer than 512 characters are refused: keeps parsing cheap and clear of
#     Python's int/str conversion limit (which can be lowered to 640 digits by the environment).

QUANTITY_MAX_CHARS = 512
_INT64_LIMIT = 2**63          # Go stores quantities in int64; at or above this it overflows
_INT32_MAX = 2**31 - 1
_NANO = 10**9
_MEBI = 2**20
_QUANTITY_EXAMPLES = '"500m", "2", "1.5Gi", "512Mi" or "129e6"'

_QUANTITY_RE = re.compile(
    r"(?P<sign>[+-]?)(?P<int>[0-9]*)(?:\.(?P<frac>[0-9]*))?"
    r"(?:(?P<exp>[eE][+-]?[0-9]+)|(?P<bin>[KMGTPE]i)|(?P<dec>[numkMGTPE]))?"
)
_DECIMAL_SUFFIX_EXPONENT = types.MappingProxyType(
    {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18})
_BINARY_SUFFIX_SHIFT = types.MappingProxyType({"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60})
# Suffix typos people actually make, mapped to what they most likely meant.
_SUFFIX_HINTS = (
    ("K", 'suffixes are case-sensitive, so write "k" for x1000 or "Ki" for x1024'),
    ("ki", 'suffixes are case-sensitive, so write "Ki" for x1024 or "k" for x1000'),
    ("i", 'a lone "i" is not a suffix; the binary suffixes are Ki, Mi, Gi, Ti, Pi and Ei'),
)


class QuantityError(ValueError):
    """A string that is not a Kubernetes quantity. `reason` says what is wrong, without examples."""

    def __init__(self, text: str, reason: str, suggestion: str | None = None) -> None:
        self.text = text
        self.reason = reason
        self.suggestion = suggestion   # a corrected quantity when the fix is unambiguous
        super().__init__(
            f"{_quote(text)} is not a valid Kubernetes quantity: {reason}; "
            f"valid quantities look like {_QUANTITY_EXAMPLES}"
        )


def _quote(text: str) -> str:
    # JSON quoting shows stray whitespace and control characters to the reader.
    return json.dumps(text, ensure_ascii=False)


def log_value(value: Any) -> str:
    """A value of a `key=value` log line, JSON-quoted only when it has to be (empty, spaces, quotes,
    '=' or a newline), so that a log line always splits back into its fields."""
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text


def parse_quantity(text: str) -> fractions.Fraction:
    """Parse a Kubernetes quantity exactly as ParseQuantity does (see the section comment)."""
    if not isinstance(text, str):
        raise QuantityError(str(text), f"expected a string, got {type(text).__name__}")
    if len(text) > QUANTITY_MAX_CHARS:
        raise QuantityError(text[:40] + "...", f"it is longer than {QUANTITY_MAX_CHARS} characters")
    m = _QUANTITY_RE.fullmatch(text)
    if m is None or not (m["int"] or m["frac"]):
        raise QuantityError(text, _diagnose_quantity(text), _suggest_quantity(text))
    digits = (m["int"] + (m["frac"] or "")).lstrip("0")
    scale = -len(m["frac"] or "")        # value = int(digits) * 10**scale * 2**shift
    shift = 0
    if m["exp"]:
        exp_text = m["exp"][1:].lstrip("+-").lstrip("0")
        if len(exp_text) > 10 or int(exp_text or "0") > _INT32_MAX:
            raise QuantityError(text, f"the exponent {_quote(m['exp'])} is out of range "
                                      "(Kubernetes allows 32-bit exponents)")
        scale += int(m["exp"][1:])
    elif m["bin"]:
        shift = _BINARY_SUFFIX_SHIFT[m["bin"]]
    elif m["dec"]:
        scale += _DECIMAL_SUFFIX_EXPONENT[m["dec"]]
    if not digits:
        return fractions.Fraction(0)
    sign = -1 if m["sign"] == "-" else 1
    # Bound the magnitude before building 10**scale: the exponent can be huge.
    if len(digits) + scale > 20:   # >= 10**19 > 2**63
        raise QuantityError(text, _too_large_reason())
    if len(digits) + scale < -9:   # < 1e-10: Go rounds it up to 1n
        return fractions.Fraction(sign, _NANO)
    value = fractions.Fraction(int(digits) << shift) * fractions.Fraction(10) ** scale
    nanos = -((-value * _NANO) // 1)     # ceil: Go rounds away from zero at nano precision
    value = fractions.Fraction(nanos, _NANO)
    if value >= _INT64_LIMIT:
        raise QuantityError(text, _too_large_reason())
    return sign * value


def _too_large_reason() -> str:
    return ("it is 2^63 or more; Kubernetes keeps quantities in 64-bit integers, so the largest is "
            "9223372036854775807 (just under 8Ei)")


def _diagnose_quantity(text: str) -> str:
    """Explain why `text` failed the grammar, with a concrete fix where one is obvious."""
    if text == "":
        return "it is empty"
    if text != text.strip():
        return "it has leading or trailing whitespace" + _then(text.strip())
    if any(c.isspace() for c in text):
        return "it contains whitespace; write the number and suffix together" + _then("".join(text.split()))
    if "," in text:
        return "',' is not a decimal separator; use '.', e.g. \"1.5\""
    if "_" in text:
        return "'_' digit separators are not allowed; write the digits without them, e.g. \"1000\""
    if re.fullmatch(r"[+-]?0(?:[xX][0-9a-fA-F]+|[oO][0-7]+|[bB][01]+)", text):
        return "only decimal numbers are allowed (no hexadecimal, octal or binary literals)"
    head = re.match(r"[+-]?[0-9]*(?:\.[0-9]*)?", text)
    number, suffix = head.group(), text[head.end():]
    if not re.search(r"[0-9]", number):
        return "it must start with a number, optionally signed, e.g. \"2\", \"0.5\" or \".5\""
    if suffix.startswith(".") or number.count(".") > 1:
        return "it has more than one '.'"
    exp = re.fullmatch(r"([eE][+-]?[0-9]*)(.*)", suffix)
    if exp and exp.group(2).startswith("."):
        return "the exponent must be a whole number, e.g. \"15e2\" rather than \"1.5e3\""
    if exp and exp.group(2) and exp.group(1)[-1:].isdigit():
        return (f"an exponent ({_quote(exp.group(1))}) cannot be combined with the unit suffix "
                f"{_quote(exp.group(2))}; use one or the other, e.g. \"1e3\" or \"1k\"")
    if exp and not exp.group(2) and not exp.group(1)[-1:].isdigit() and len(exp.group(1)) > 1:
        return f"the exponent {_quote(suffix)} has no digits; write e.g. \"1e3\" or \"5e-1\""
    if suffix in ("e",):
        return 'a lone "e" is not a suffix (it would need digits, e.g. "1e3"); exa is a capital "E"'
    for bad, hint in _SUFFIX_HINTS:
        if suffix == bad:
            return f"unknown suffix {_quote(suffix)}: {hint}"
    unit = re.fullmatch(r"([kKmMgGtTpPeE]?)i?[bB]", suffix)
    if unit:
        letter = unit.group(1).upper()
        if not letter:
            return 'unknown suffix "B": there are no byte units; a plain number is bytes, e.g. "1048576" or "1Mi"'
        decimal = "k" if letter == "K" else letter
        return (f"unknown suffix {_quote(suffix)}: there are no byte units in Kubernetes quantities; "
                f"use {_quote(decimal)} (powers of 1000) or {_quote(letter + 'i')} (powers of 1024)")
    for good in (*_BINARY_SUFFIX_SHIFT, *_DECIMAL_SUFFIX_EXPONENT):
        if suffix.lower() == good.lower() and suffix != good:
            return f"unknown suffix {_quote(suffix)}: suffixes are case-sensitive, so write {_quote(good)}"
    return (f"unknown suffix {_quote(suffix)}: use one of n u m k M G T P E (powers of 1000), "
            f"Ki Mi Gi Ti Pi Ei (powers of 1024), or an exponent such as e3")


def _suggest_quantity(text: str) -> str | None:
    """The obvious fix (whitespace, ',' or '_', wrong case of a binary suffix) if it parses."""
    candidate = "".join(text.split()).replace(",", ".").replace("_", "")
    unit = re.fullmatch(r"(.*?[0-9.])([kmgtpe]i|[KMGTPE]I|[kmgtpe]I)", candidate)
    if unit:
        candidate = unit.group(1) + unit.group(2)[0].upper() + "i"
    if candidate == text:
        return None
    try:
        parse_quantity(candidate)
    except QuantityError:
        return None
    return candidate


def _then(fixed: str) -> str:
    # After the whitespace fix, either the value is right or there is a second problem to name.
    try:
        parse_quantity(fixed)
    except QuantityError as e:
        return f"; without it, {_quote(fixed)} still fails: {e.reason}"
    return f", e.g. {_quote(fixed)}"


def cpu_millicores(q: fractions.Fraction | int) -> int:
    """ceil(q * 1000), as Go's MilliValue (negative values round away from zero, like Go)."""
    return _ceil_away(fractions.Fraction(q) * 1000)


def memory_mebibytes(q: fractions.Fraction | int) -> int:
    """ceil(q / 2**20): bytes to whole Mi, rounding up so a request is never shrunk."""
    return _ceil_away(fractions.Fraction(q) / _MEBI)


def _ceil_away(value: fractions.Fraction) -> int:
    whole = -(-abs(value) // 1)
    return int(whole) if value >= 0 else -int(whole)


_DECIMAL_SI_SUFFIXES = (("E", 21), ("P", 18), ("T", 15), ("G", 12), ("M", 9), ("k", 6), ("", 3))
_BINARY_SI_SUFFIXES = (("Ei", 40), ("Pi", 30), ("Ti", 20), ("Gi", 10), ("Mi", 0))


def format_cpu(millicores: int) -> str:
    """Go's canonical DecimalSI form of NewMilliQuantity(m): 500 -> "500m", 2000 -> "2", 2000000 -> "2k".

    Meant for |millicores| < 2**63 (what Go's int64 can hold); rules never produce more.
    """
    if millicores == 0:
        return "0"
    sign, m = ("-" if millicores < 0 else ""), abs(millicores)
    # Largest power-of-1000 suffix with an integer mantissa, as CanonicalizeBytes does.
    for suffix, power in _DECIMAL_SI_SUFFIXES:
        if m % 10**power == 0:
            return f"{sign}{m // 10**power}{suffix}"
    return f"{sign}{m}m"


def format_memory(mebibytes: int) -> str:
    """Go's canonical BinarySI form of mebibytes * 2**20 bytes: 1024 -> "1Gi", 1536 -> "1536Mi".

    Meant for |mebibytes| < 2**43 (bytes below 2**63); rules never produce more.
    """
    if mebibytes == 0:
        return "0"
    sign, mi = ("-" if mebibytes < 0 else ""), abs(mebibytes)
    for suffix, bits in _BINARY_SI_SUFFIXES:
        if mi % (1 << bits) == 0:
            return f"{sign}{mi >> bits}{suffix}"
    return f"{sign}{mi}Mi"   # unreachable: the Mi row always divides


# Texts copied from kubernetes/apimachinery pkg/util/validation/validation.go (RegexError
# wording, including its double space after "my-name',"), so clients see familiar messages.
DNS1123_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_LABEL_MAX_LENGTH = 63
DNS1123_SUBDOMAIN_FMT = DNS1123_LABEL_FMT + r"(\." + DNS1123_LABEL_FMT + ")*"
DNS1123_SUBDOMAIN_MAX_LENGTH = 253
_DNS1123_LABEL_RE = re.compile(DNS1123_LABEL_FMT)
_DNS1123_SUBDOMAIN_RE = re.compile(DNS1123_SUBDOMAIN_FMT)
_DNS1123_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
    "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
    "validation is '" + DNS1123_LABEL_FMT + "')"
)
_DNS1123_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
    "validation is '" + DNS1123_SUBDOMAIN_FMT + "')"
)


def _dns_problem(segment: str, pattern: re.Pattern[str], max_length: int, message: str) -> str | None:
    problems = []
    # Go's len() counts bytes; surrogatepass keeps odd input from raising here.
    if len(segment.encode("utf-8", "surrogatepass")) > max_length:
        problems.append(f"must be no more than {max_length} characters")
    if pattern.fullmatch(segment) is None:   # explicit ASCII classes; fullmatch, not "$"
        problems.append(message)
    return "; ".join(problems) or None


def namespace_problem(segment: str) -> str | None:
    """None if `segment` is a valid namespace (DNS-1123 label), else Kubernetes' message(s)."""
    return _dns_problem(segment, _DNS1123_LABEL_RE, DNS1123_LABEL_MAX_LENGTH, _DNS1123_LABEL_MSG)


def name_problem(segment: str) -> str | None:
    """None if `segment` is a valid object name (DNS-1123 subdomain), else Kubernetes' message(s)."""
    return _dns_problem(segment, _DNS1123_SUBDOMAIN_RE, DNS1123_SUBDOMAIN_MAX_LENGTH, _DNS1123_SUBDOMAIN_MSG)


def workload_problems(namespace: str, name: str) -> tuple[str | None, str | None]:
    """namespace_problem and name_problem of one workload, in one call."""
    return (_dns_problem(namespace, _DNS1123_LABEL_RE, DNS1123_LABEL_MAX_LENGTH, _DNS1123_LABEL_MSG),
            _dns_problem(name, _DNS1123_SUBDOMAIN_RE, DNS1123_SUBDOMAIN_MAX_LENGTH, _DNS1123_SUBDOMAIN_MSG))


# ---------------------------------------------------------------------------
# 2. Rules and prediction (pure: rules in, prediction out)
# ---------------------------------------------------------------------------
#
# A rules file (JSON) is validated and compiled once by parse_rules/load_rules into an
# immutable Rules; Rules.predict() is then a dict lookup and a few precompiled regex matches
# (see "Why lanes" below), with every answer precomputed per rule.
# Decisions (documented for users of the rules file):
#   - Values are kept in canonical units: CPU in whole millicores, memory in whole Mi, each
#     rounded UP at load ("0.1m" -> 1m, "1" byte -> 1Mi) so nobody gets less than they asked for.
#   - A default outside [min, max] is accepted and clamped, like every other value: min/max are
#     the platform's guard rails, defaults are just one more input to them.
#   - "min": {"cpu": "0"} means the same as no minimum and compiles to None.
#   - The rule id "default" is reserved: predictions report rule="default" when no rule matched.
#   - Only the first problem is reported (one RulesError), in document order.

BUILTIN_DEFAULT_CPU_MILLICORES = 100
BUILTIN_DEFAULT_MEMORY_MEBIBYTES = 100
NO_RULE = "default"
_MILLICORES_LIMIT = 2**63                 # Go's MilliValue() is an int64
_MEBIBYTES_LIMIT = 2**63 // _MEBI         # Mi * 2**20 bytes must stay below 2**63
_DIGEST_FORMAT = "reqapi.rules/v1"        # bump if the digest's canonical form changes
_TOP_KEYS = ("defaults", "min", "max", "rules")
_RESOURCE_KEYS = ("cpu", "memory")
_RULE_KEYS = ("id", "namespace", "name", "cpu", "memory", "history")
# A rule's "history" (with --prometheus-url): "on" (usage history answers), "shadow" (computed and
# shown, the rule answers), "off" (pinned to the rule); absent = --history-mode's global setting.
_HISTORY_MODES = ("on", "shadow", "off")
_EXAMPLE_DOCUMENT = ('{"defaults": {"cpu": "100m", "memory": "100Mi"}, '
                     '"rules": [{"id": "web", "name": "web-*", "cpu": "250m", "memory": "256Mi"}]}')
_EXAMPLE_RULE = '{"id": "prod-api", "namespace": "prod-*", "name": "*-api", "cpu": "500m", "memory": "512Mi"}'
_EXAMPLE_SECTION = types.MappingProxyType({
    "defaults": '"defaults": {"cpu": "100m", "memory": "100Mi"}',
    "min": '"min": {"cpu": "10m", "memory": "16Mi"}',
    "max": '"max": {"cpu": "16", "memory": "64Gi"}',
})
_EXAMPLE_QUANTITY = types.MappingProxyType({
    ("defaults", "cpu"): "100m", ("defaults", "memory"): "100Mi",
    ("min", "cpu"): "10m", ("min", "memory"): "16Mi",
    ("max", "cpu"): "16", ("max", "memory"): "64Gi",
    ("rules", "cpu"): "500m", ("rules", "memory"): "512Mi",
})


# What a rules file costs, estimated before it is compiled, and what reqapi accepts.  Measured with
# tracemalloc on CPython 3.11, 3.12 and 3.13 (`python3 tests/bench.py --memory` prints the figures):
# a compiled rule keeps 500-720 bytes (its Rule, its Prediction, its branch of a lane, its entry
# among the named workloads) plus 4.6-6.1 bytes per character of its id and globs, and a rules
# file a few KB whatever its size.  RULE_BYTES, RULE_CHAR_BYTES and RULES_BASE_BYTES are above every
# shape measured (exact names, prefixes, suffixes, several "*", classes; 1 to 10,500 rules; short
# and 250-character names): the rules keep 44-94 % of the estimate.
# Loading takes more for a moment: the decoded JSON (~6 bytes per byte of the file), the checked
# rules and up to ~6 MB to compile one lane.  A load's peak measured 1.7-2.4x the estimate near
# the limit (10,500 rules), up to ~7x for 1,000 rules where compiling a lane counts most; the
# tests hold it below 3x the estimate + 4 MiB.  The rules that serve stay while a new file loads.
# RULES_MAX_BYTES admits ~11,000 rules of the usual shape (~750 bytes estimated: a 10-character id,
# globs such as "team-a-*"): serving them keeps at most 8 MiB, and a reload at the limit needs
# up to ~19 MiB more for a moment.  RULES_MAX_FILE_BYTES refuses a file before it is decoded: 4 MiB of
# compact JSON holds ~40,000 short rules, far above the limit, so no file it refuses could fit.
RULE_BYTES = 550
RULE_CHAR_BYTES = 7
RULES_BASE_BYTES = 64 * 1024
RULES_MAX_BYTES = 8 * 1024 * 1024
RULES_MAX_FILE_BYTES = 4 * 1024 * 1024


def rules_memory(count: int, characters: int) -> int:
    """Estimated bytes that `count` rules with `characters` characters of ids and globs keep."""
    return RULES_BASE_BYTES + count * RULE_BYTES + characters * RULE_CHAR_BYTES


def size_text(size: int) -> str:
    """A size for people: "512 KiB", "8.0 MiB"."""
    return f"{size / 1024:.0f} KiB" if size < 1024 * 1024 else f"{size / (1024 * 1024):.1f} MiB"


class RulesError(ValueError):
    """A refused rules file. str(e) = "<file>: <json path>: <what was wrong>; for example <right value>"."""

    def __init__(self, source: str, path: str, problem: str, example: str) -> None:
        self.source = source
        self.path = path or "(top level)"
        self.problem = problem
        self.example = example
        super().__init__(f"{source}: {self.path}: {problem}; for example {example}")


@dataclass(frozen=True, slots=True)
class Prediction:
    cpu: str      # canonical quantity, e.g. "500m"
    memory: str   # canonical quantity, e.g. "512Mi"
    rule: str     # id of the rule that decided, or "default"
    # Only with --prometheus-url (otherwise "" and None, and the object is as without history):
    source: str = ""                                 # rules, history or blend
    explanation: Optional["Explanation"] = None      # how history was used (see predict_with_history)


@dataclass(frozen=True, slots=True)
class Amounts:
    cpu: int | None      # whole millicores; None = not set
    memory: int | None   # whole Mi; None = not set


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    namespace: str       # glob, "*" when absent in the file
    name: str            # glob, "*" when absent in the file
    cpu: int | None      # millicores; None = take the default
    memory: int | None   # Mi; None = take the default
    history: str = ""    # "on", "shadow", "off"; "" = the global --history-mode (see _HISTORY_MODES)


@dataclass(frozen=True)
class Rules:
    defaults: Amounts    # always both set (built-in 100m / 100Mi fill gaps)
    min: Amounts         # None = no lower clamp
    max: Amounts         # None = no upper clamp
    rules: tuple[Rule, ...]
    source: str          # file path or "built-in default"
    digest: str          # sha256 hex of the canonical meaning (see _digest)
    memory: int = dataclasses.field(compare=False)   # estimated bytes they keep (rules_memory)
    # Precompiled lookup (see _build_lanes): lanes for rules with an exact namespace, by
    # namespace, and lanes for the rest. _predictions[k] is the clamped answer of rules[k].
    _by_namespace: types.MappingProxyType = dataclasses.field(repr=False, compare=False)
    _wild: tuple["_Lane", ...] = dataclasses.field(repr=False, compare=False)
    _predictions: tuple[Prediction, ...] = dataclasses.field(repr=False, compare=False)
    _fallback: Prediction = dataclasses.field(repr=False, compare=False)
    _compiled: bool = dataclasses.field(default=True, repr=False, compare=False)   # False: no lanes, see without_lanes

    def predict(self, namespace: str, name: str) -> Prediction:
        """Requests for workload `name` in `namespace`: pure, no parsing, a few regex matches."""
        if not (isinstance(namespace, str) and isinstance(name, str)):
            # f-strings below would turn None into "None", which a "*" glob happily matches.
            raise TypeError(f"Rules.predict() needs str namespace and name, got {type(namespace).__name__} "
                            f"and {type(name).__name__}")
        if not self._compiled:
            return self._scan(namespace, name)
        best = -1
        for lanes in (self._by_namespace.get(namespace, ()), self._wild):
            for lane in lanes:
                if best != -1 and lane.first > best:
                    break      # lanes are in order of their first rule: none from here on can win
                match = lane.pattern.fullmatch(_lane_key(lane.layout, namespace, name))
                if match is not None:
                    index = lane.indexes[match.lastindex - 1]
                    if best == -1 or index < best:
                        best = index
        return self._fallback if best == -1 else self._predictions[best]

    def without_lanes(self) -> "Rules":
        """The same rules without their compiled lanes, for a rules generation that no longer serves
        (RulesHistory keeps it for continue tokens and watches): predict() then tries the rules one
        by one with glob_match, slower but needing no memory of its own."""
        return dataclasses.replace(self, _by_namespace=types.MappingProxyType({}), _wild=(), _compiled=False)

    def _scan(self, namespace: str, name: str) -> Prediction:
        for index, rule in enumerate(self.rules):
            if glob_match(rule.namespace, namespace) and glob_match(rule.name, name):
                return self._predictions[index]
        return self._fallback


class _JSONObject(dict):
    """A decoded JSON object that remembers keys it saw twice (json.loads silently keeps the last)."""

    duplicate_keys: tuple[str, ...] = ()

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, object]]) -> "_JSONObject":
        obj = cls(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            dups: list[str] = []
            for key, _ in pairs:
                if key in seen and key not in dups:
                    dups.append(key)
                seen.add(key)
            obj.duplicate_keys = tuple(dups)
        return obj


def _child(path: str, key: str) -> str:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def _describe(value: object) -> str:
    """Name a JSON value the way a reader of the file would."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return f"the string {_quote(value if len(value) <= 60 else value[:57] + '...')}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if isinstance(value, (int, float)):
        return f"the number {json.dumps(value)}"
    return f"a {type(value).__name__}"


def _fail(source: str, path: str, problem: str, example: str) -> NoReturn:
    raise RulesError(source, path, problem, example)


def _check_object(source: str, value: object, path: str, what: str, allowed: tuple[str, ...],
                  example: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(source, path, f"{what} must be a JSON object, got {_describe(value)}", example)
    for key in getattr(value, "duplicate_keys", ()):
        _fail(source, _child(path, key), f"the key {_quote(key)} appears more than once in {what} "
              "(JSON would silently keep only the last one); keep one", example)
    for key in value:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {_quote(close[0])}?)" if close else ""
            _fail(source, _child(path, key),
                  f"unknown key {_quote(key)} in {what}{hint}; the allowed keys are "
                  + ", ".join(_quote(k) for k in allowed), example)
    return value


def _quantity(source: str, value: object, path: str, section: str, resource: str) -> int | None:
    """Validate one quantity field and return it in canonical units (millicores or Mi)."""
    good = _EXAMPLE_QUANTITY[(section, resource)]
    example = f'"{resource}": "{good}"'
    if not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            as_text = json.dumps(value)
            if resource == "memory":
                extra = f' (a bare number means bytes: "{as_text}" is {as_text} bytes)'
            else:
                extra = ""
                try:
                    if parse_quantity(as_text) > 0:
                        example = f'"{resource}": "{as_text}"'   # their own value, quoted
                except QuantityError:
                    pass   # NaN, Infinity, 1e+400...: keep the generic example
            problem = (f"{resource} must be a quoted string, got {_describe(value)}; quote it so it is "
                       f"read exactly as Kubernetes reads quantities{extra}")
        else:
            problem = f"{resource} must be a quoted Kubernetes quantity, got {_describe(value)}"
        _fail(source, path, problem, example)
    try:
        amount = parse_quantity(value)
    except QuantityError as e:
        if e.suggestion is not None:
            example = f'"{resource}": {_quote(e.suggestion)}'
        _fail(source, path, f"{_quote(value)} is not a valid Kubernetes quantity: {e.reason}", example)
    if amount < 0:
        _fail(source, path, f"{_quote(value)} is negative; {resource} must be greater than zero", example)
    if amount == 0:
        if section != "min":
            _fail(source, path, f"{_quote(value)} is zero; {resource} must be greater than zero "
                  '(only "min" may be "0")', example)
        return None   # a zero minimum clamps nothing
    if resource == "cpu":
        units = cpu_millicores(amount)
        if units >= _MILLICORES_LIMIT:
            _fail(source, path, f"{_quote(value)} is too large: Kubernetes counts CPU in 64-bit "
                  f'millicores, so CPU must be below "{format_cpu(_MILLICORES_LIMIT)}"', example)
    else:
        units = memory_mebibytes(amount)
        if units >= _MEBIBYTES_LIMIT:
            _fail(source, path, f"{_quote(value)} is too large: rounded up to whole Mi it no longer fits "
                  f'Kubernetes\' 64-bit byte count; the largest memory is "{format_memory(_MEBIBYTES_LIMIT - 1)}"',
                  example)
    return units


@dataclass(frozen=True)
class _NameKind:
    key: str                # "namespace" or "name"
    noun: str               # how the message names it
    chars: str              # characters a valid value can contain
    chars_text: str         # the same, for humans
    max_length: int
    example: str
    problem: Callable[[str], str | None]   # namespace_problem or name_problem


_NAMESPACE_KIND = _NameKind("namespace", "namespace", "abcdefghijklmnopqrstuvwxyz0123456789-",
                            "lowercase letters, digits and '-'", DNS1123_LABEL_MAX_LENGTH, "prod-*",
                            namespace_problem)
_NAME_KIND = _NameKind("name", "workload name", "abcdefghijklmnopqrstuvwxyz0123456789-.",
                       "lowercase letters, digits, '-' and '.'", DNS1123_SUBDOMAIN_MAX_LENGTH, "*-api",
                       name_problem)


class _GlobProblem(Exception):
    def __init__(self, message: str, suggestion: str | None = None) -> None:
        super().__init__(message)
        self.suggestion = suggestion   # a corrected glob when the fix is unambiguous


def _bad_char_reason(glob: str, char: str, position: int, kind: _NameKind) -> str:
    where = f"{_quote(char)} at position {position + 1}"
    if "A" <= char <= "Z":
        why = f"Kubernetes {kind.noun}s are lowercase and globs are case-sensitive"
    elif char == "_":
        why = f"'_' is not allowed in Kubernetes {kind.noun}s (they use '-')"
    elif char == "/" and kind is _NAME_KIND:
        why = 'put the namespace in "namespace" and only the workload name in "name"'
    elif char.isspace():
        why = f"Kubernetes {kind.noun}s contain no whitespace"
    elif char == "." and kind is _NAMESPACE_KIND:
        why = "namespaces cannot contain '.'"
    elif char in "^$+()|\\{}" or ".*" in glob:
        why = "globs are shell-style, not regular expressions: '*' matches any run of characters, '?' one character"
    else:
        why = f"Kubernetes {kind.noun}s contain only {kind.chars_text}"
    return f"the glob {_quote(glob)} can never match a valid {kind.noun}: {where}; {why}"


@dataclass(frozen=True, slots=True)
class _Glob:
    text: str                 # a valid glob: its tokens are _glob_tokens(text)
    exact: bool               # no wildcard at all
    lead: int                 # literal/class tokens before the first wildcard: how well the
    trail: int                # start (end) of a key can reject this glob on its first character


def _glob_tokens(glob: str) -> list[str]:
    """The tokens of a glob that _parse_glob accepted: "*" ("**" is one: it matches the same
    names), "?", a class as written ("[a-c]", "[!x]"), or a literal character."""
    tokens: list[str] = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if c == "[":
            close = glob.index("]", i + 2)        # a valid class holds at least one character
            tokens.append(glob[i:close + 1])
            i = close + 1
            continue
        if c != "*" or not tokens or tokens[-1] != "*":
            tokens.append(c)
        i += 1
    return tokens


def _parse_glob(glob: str, kind: _NameKind) -> _Glob:
    """Split a shell glob into its tokens, validated.

    Refuses globs that are malformed or can never match a valid Kubernetes name: that is
    always a typo, and silently never matching is the worst way to find out.
    """
    if glob == "":
        raise _GlobProblem(f"the {kind.key} glob is empty, which matches no {kind.noun}; "
                           f'leave "{kind.key}" out (or write "*") to match every {kind.noun}')
    tokens: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            if not tokens or tokens[-1] != "*":   # "**" == "*"
                tokens.append("*")
            i += 1
        elif c == "?":
            tokens.append("?")
            i += 1
        elif c == "[":
            start = i + 1
            negate = start < n and glob[start] == "!"
            if negate:
                start += 1
            close = glob.find("]", start)
            if close == -1:
                raise _GlobProblem(f"the glob {_quote(glob)} has a '[' at position {i + 1} that is never "
                                   "closed by ']'")
            body = glob[start:close]
            if not body:
                raise _GlobProblem(f"the glob {_quote(glob)} has an empty character class "
                                   f"{_quote(glob[i:close + 1])} at position {i + 1}, which matches nothing")
            k = 0
            while k < len(body):
                if k + 2 < len(body) and body[k + 1] == "-":
                    lo, hi = body[k], body[k + 2]
                    for offset, ch in ((k, lo), (k + 2, hi)):
                        if ch not in kind.chars:
                            raise _GlobProblem(_bad_char_reason(glob, ch, start + offset, kind))
                    if lo > hi:
                        at = start + k
                        raise _GlobProblem(f"the glob {_quote(glob)} has the reversed range "
                                           f"{_quote(lo + '-' + hi)}, which matches nothing; write "
                                           f"{_quote(hi + '-' + lo)}", glob[:at] + hi + "-" + lo + glob[at + 3:])
                    k += 3
                else:
                    if body[k] not in kind.chars:
                        raise _GlobProblem(_bad_char_reason(glob, body[k], start + k, kind))
                    k += 1
            tokens.append(glob[i:close + 1])
            i = close + 1
        else:
            if c not in kind.chars:
                raise _GlobProblem(_bad_char_reason(glob, c, i, kind))
            tokens.append(c)
            i += 1
    exact = not any(t in ("*", "?") or len(t) > 1 for t in tokens)
    if exact:
        problem = kind.problem(glob)
        if problem:
            raise _GlobProblem(f"{_quote(glob)} is not a valid {kind.noun}, so it can never match: {problem}")
        return _Glob(glob, True, len(tokens), len(tokens))
    fixed = sum(1 for t in tokens if t != "*")
    if fixed > kind.max_length:
        raise _GlobProblem(f"the glob {_quote(glob)} needs at least {fixed} characters but a Kubernetes "
                           f"{kind.noun} has at most {kind.max_length}")
    for end, token in (("start", tokens[0]), ("end", tokens[-1])):
        if token in ("-", "."):
            raise _GlobProblem(f"the glob {_quote(glob)} can never match: a Kubernetes {kind.noun} must "
                               f"{end} with a lowercase letter or digit, not {_quote(token)}")
    if kind is _NAME_KIND:
        for a, b in zip(tokens, tokens[1:]):
            if a + b in ("..", ".-", "-."):
                raise _GlobProblem(f"the glob {_quote(glob)} can never match: {_quote(a + b)} never occurs "
                                   f"in a valid {kind.noun} (each dot-separated part must start and end "
                                   "with a letter or digit)")
    wild = [t in ("*", "?") for t in tokens]
    lead = next((i for i, w in enumerate(wild) if w), len(wild))
    trail = next((i for i, w in enumerate(reversed(wild)) if w), len(wild))
    return _Glob(glob, False, lead, trail)


def glob_match(glob: str, text: str) -> bool:
    """Whether a valid glob matches `text`, decided as Go's path.Match decides it, in linear time
    (see "Why atomic groups" below): the head where the text starts, each chunk between two "*"
    where it first fits, the chunk after the last "*" where the text ends.  How rules without
    their lanes predict (Rules.without_lanes)."""
    if "*" not in glob and "?" not in glob and "[" not in glob:
        return glob == text
    chunks: list[list[str]] = [[]]       # the head, then one chunk per "*"
    for token in _glob_tokens(glob):
        if token == "*":
            chunks.append([])
        else:
            chunks[-1].append(token)
    head = chunks[0]
    if len(chunks) == 1:
        return len(head) == len(text) and _chunk_fits(head, text, 0)
    if not _chunk_fits(head, text, 0):
        return False
    at = len(head)
    for chunk in chunks[1:-1]:
        while not _chunk_fits(chunk, text, at):
            at += 1
            if at + len(chunk) > len(text):
                return False
        at += len(chunk)
    last = chunks[-1]
    return len(text) - len(last) >= at and _chunk_fits(last, text, len(text) - len(last))


def _chunk_fits(chunk: list[str], text: str, at: int) -> bool:
    if at + len(chunk) > len(text):
        return False
    return all(_token_matches(token, text[at + k]) for k, token in enumerate(chunk))


def _token_matches(token: str, char: str) -> bool:
    """Does one glob token other than "*" (a literal character, "?" or a class) match `char`?"""
    if len(token) == 1:
        return token == "?" or token == char
    negate = token[1] == "!"
    body = token[2:-1] if negate else token[1:-1]
    k = 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            if body[k] <= char <= body[k + 2]:
                return not negate
            k += 3
        else:
            if body[k] == char:
                return not negate
            k += 1
    return negate


def _glob_suggestion(glob: str, kind: _NameKind, problem: _GlobProblem) -> str:
    """A corrected glob for the error message if an obvious fix exists, else the generic example."""
    if problem.suggestion is not None:
        return f'"{kind.key}": {_quote(problem.suggestion)}'
    candidate = glob.strip().replace(".*", "*").strip("^$").lower().replace("_", "-").replace(" ", "")
    if kind is _NAME_KIND and "/" in candidate:
        candidate = candidate.rsplit("/", 1)[1]
    try:
        _parse_glob(candidate, kind)
    except _GlobProblem:
        candidate = kind.example
    return f'"{kind.key}": {_quote(candidate)}'


def _glob(source: str, value: object, path: str, kind: _NameKind) -> _Glob:
    if not isinstance(value, str):
        extra = " (one glob per rule; write one rule per pattern)" if isinstance(value, list) else ""
        _fail(source, path, f"{kind.key} must be a string glob, got {_describe(value)}{extra}",
              f'"{kind.key}": "{kind.example}"')
    try:
        return _parse_glob(value, kind)
    except _GlobProblem as e:
        _fail(source, path, str(e), _glob_suggestion(value, kind, e))


def _section(source: str, document: dict[str, Any], key: str) -> tuple[int | None, int | None]:
    if key not in document:
        return None, None
    body = _check_object(source, document[key], key, f'"{key}"', _RESOURCE_KEYS, _EXAMPLE_SECTION[key])
    cpu = _quantity(source, body["cpu"], _child(key, "cpu"), key, "cpu") if "cpu" in body else None
    memory = _quantity(source, body["memory"], _child(key, "memory"), key, "memory") if "memory" in body else None
    return cpu, memory


def _clamp(value: int, low: int | None, high: int | None) -> int:
    if low is not None and value < low:
        value = low
    if high is not None and value > high:
        value = high
    return value


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _digest(defaults: Amounts, low: Amounts, high: Amounts, rules: tuple[Rule, ...]) -> str:
    # Hash the compiled meaning (canonical units, resolved defaults), never the file's text:
    # reformatting, key order, "0.5" vs "500m" and absent-vs-built-in defaults do not change it.
    # The hashed text is the canonical JSON of {"format", "defaults", "min", "max", "rules": [...]},
    # written rule by rule ("rules" sorts last) so that a large file is never one big string.
    head = _canonical_json({"format": _DIGEST_FORMAT, "defaults": dataclasses.asdict(defaults),
                            "min": dataclasses.asdict(low), "max": dataclasses.asdict(high), "rules": []})
    digest = hashlib.sha256(head[:-len(b"]}")])
    for number, rule in enumerate(rules):
        meaning = {"id": rule.id, "namespace": rule.namespace, "name": rule.name, "cpu": rule.cpu,
                   "memory": rule.memory}
        if rule.history:
            # A rule without "history" hashes as before the key existed: old resourceVersions stay valid.
            meaning["history"] = rule.history
        digest.update(b"," if number else b"")
        digest.update(_canonical_json(meaning))
    digest.update(b"]}")
    return digest.hexdigest()


# Why lanes: re tries the alternatives of a regex in order and returns the first that
# matches, which is exactly first-match-wins, and it skips an alternative after one
# character when that alternative starts with a literal or a character class. So each rule
# goes into the lane whose key starts with the most literal part of that rule: its name read
# forwards ("web-*"), its name read backwards ("*-api"), or its namespace either way;
# rules with an exact namespace are first looked up by namespace in a dict. "\x00" cannot
# occur in names, so it separates the two halves of a key unambiguously. Rules.predict() takes the
# lowest rule index over the lanes that match. Globs with wildcards at both ends of both
# halves (e.g. "*a*") land in a scanning lane, which costs about 0.05 us per such rule.
#
# Why atomic groups: re backtracks.  Written as "[^\x00]*" each, the stars of "*.*.*.*.*-svc" made
# re try every way of splitting a name among them before giving up: one crafted 253-character
# name held the GIL ~1 s.  So a glob is matched as Go's path.Match matches it.  What follows a
# "*" up to the next "*" is a chunk of fixed width (literal characters, "?" and classes); a chunk
# goes where it first fits after the previous one (the earliest place leaves the most room for
# the rest, so if that place fails every later one fails too), except the chunk after the last
# "*", which must end where the half of the key ends and so goes where it last fits (it has a
# fixed width: the last place it fits is the only one that can end there).  Each "*" and its
# chunk are one atomic group, "(?>[^\x00]*?CHUNK)" or "(?>[^\x00]*CHUNK)": once it matched, re never
# goes back into it.  A chunk followed only by a final "*" may be anywhere after the previous one,
# so it too is found from the right, which re does ~3x faster than from the left (it scans back
# for the chunk's first character); a final "*" is "[^\x00]*+", which never gives back.  A branch
# of a lane then costs at most (key length) x (chunk width) steps, whatever the name;
# test_predictor checks that every compiled lane has this shape.
#
# Why lanes of at most LANE_MAX_RULES rules and LANE_MAX_CHARS characters of regex: re.compile
# needs ~90 bytes per character of the pattern while it parses (measured: 11 MB for a lane of
# 1,024 rules with 100-character names, 112 MB for one of 30,000 short rules), the peak of a
# load; and a successful match costs re ~1.7 ns per capturing group of the lane (1.75 us with
# 1,024 groups, 8.9 us with 5,000).  So a lane compiles with at most ~6 MB of scratch memory and
# matches in a few microseconds; a lookup tries one more lane per 1,024 rules of the same kind.
_KEY_NS_NAME, _KEY_NAME_NS, _KEY_RNAME_NS, _KEY_RNS_NAME, _KEY_NAME, _KEY_RNAME = range(6)
_ANY = "[^\\x00]"                  # one character of a name: anything but the separator of a lane's key
_SEPARATOR = "\x00"
LANE_MAX_RULES = 1024
LANE_MAX_CHARS = 65536
_RULE_MARK = re.compile("\x01([0-9]+)\x02")   # ends each branch while a lane is built: the rule's index


@dataclass(frozen=True, slots=True)
class _Lane:
    layout: int                   # which _KEY_* builds the string this pattern matches
    pattern: re.Pattern[str]      # alternation; capturing group k+1 <=> rule indexes[k]
    indexes: array.array          # rule index per capturing group ("I": 4 bytes a rule)
    first: int                    # lowest rule index in this lane


def _lane_key(layout: int, namespace: str, name: str) -> str:
    if layout == _KEY_NAME:
        return name
    if layout == _KEY_RNAME:
        return name[::-1]
    if layout == _KEY_NAME_NS:
        return f"{name}\x00{namespace}"
    if layout == _KEY_RNAME_NS:
        return f"{name[::-1]}\x00{namespace}"
    if layout == _KEY_RNS_NAME:
        return f"{namespace[::-1]}\x00{name}"
    return f"{namespace}\x00{name}"


# A lane token is one character of a key, as it is (the separator included), or a regex fragment
# of more than one character: "?", a class, or a "*" with its chunk.
_LaneTokens = tuple[str, ...]
_FACTOR_DEPTH = 40    # max nested groups from _alternation; keeps re's recursive parser far from its limits


def _class_regex(token: str) -> str:
    """A glob class ("[a-c.]", "[!x]") as a regex class; a negated one never takes the separator."""
    negate = token[1] == "!"
    body = token[2:-1] if negate else token[1:-1]
    items, k = [], 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            items.append(f"{re.escape(body[k])}-{re.escape(body[k + 2])}")
            k += 3
        else:
            items.append(re.escape(body[k]))
            k += 1
    return ("[^\\x00" if negate else "[") + "".join(items) + "]"


def _token_regex(token: str) -> str:
    """The regex of one glob token other than "*"."""
    if len(token) > 1:
        return _class_regex(token)
    return _ANY if token == "?" else re.escape(token)


def _lane_regex(token: str) -> str:
    return re.escape(token) if len(token) == 1 else token


def _half(tokens: Iterable[str]) -> list[str]:
    """The lane tokens of one glob, one half of a key: the characters before its first "*" as they
    are, then each "*" with its chunk as one atomic group (see "Why atomic groups")."""
    head: list[str] = []
    chunks: list[list[str]] = []         # one per "*": the tokens after it, up to the next "*"
    for token in tokens:
        if token == "*":
            chunks.append([])
        elif chunks:
            chunks[-1].append(token)
        else:
            head.append(token if len(token) == 1 and token != "?" else _token_regex(token))
    for number, chunk in enumerate(chunks):
        body = "".join(map(_token_regex, chunk))
        if number == len(chunks) - 1 and not chunk:
            head.append(f"{_ANY}*+")                     # a final "*": the rest of the half, possessively
        elif number == len(chunks) - 1 or (number == len(chunks) - 2 and not chunks[-1]):
            head.append(f"(?>{_ANY}*{body})")            # where it last fits
        else:
            head.append(f"(?>{_ANY}*?{body})")           # where it first fits
    return head


def _rule_layout(namespace: _Glob, name: _Glob) -> int:
    """The layout whose key starts with this rule's longest literal run."""
    if namespace.exact:   # the dict lookup already matched the namespace
        return _KEY_RNAME if name.trail > name.lead else _KEY_NAME
    choices = ((name.lead, _KEY_NAME_NS), (name.trail, _KEY_RNAME_NS),
               (namespace.lead, _KEY_NS_NAME), (namespace.trail, _KEY_RNS_NAME))
    score, layout = max(choices, key=lambda choice: choice[0])   # first of equals wins
    return _KEY_NS_NAME if score == 0 else layout


def _lane_tokens(layout: int, namespace: _Glob, name: _Glob) -> _LaneTokens:
    """What a rule's branch matches, in the order of the layout's key."""
    ns, nm = _glob_tokens(namespace.text), _glob_tokens(name.text)
    if layout == _KEY_NAME:
        halves = (_half(nm),)
    elif layout == _KEY_RNAME:
        halves = (_half(reversed(nm)),)
    elif layout == _KEY_NAME_NS:
        halves = (_half(nm), [_SEPARATOR], _half(ns))
    elif layout == _KEY_RNAME_NS:
        halves = (_half(reversed(nm)), [_SEPARATOR], _half(ns))
    elif layout == _KEY_RNS_NAME:
        halves = (_half(reversed(ns)), [_SEPARATOR], _half(nm))
    else:
        halves = (_half(ns), [_SEPARATOR], _half(nm))
    return tuple(token for half in halves for token in half)


def _alternation(alternatives: list[_LaneTokens], at: int = 0, depth: int = 0) -> list[str]:
    """Order-preserving prefix factoring of the alternatives' tokens from index `at` on: the
    branches of the returned alternation.

    re skips a branch after one character when it starts with a literal, but it still visits
    every branch. Grouping consecutive branches by their first literal character ("9" of
    "team9-*", "team90-*", ...) turns the list into a trie, so a lookup visits only a few
    branches. Branches that start with different characters can never match the same string,
    so regrouping them cannot change which rule matches first; anything else keeps its order.
    Every alternative of one call has consumed the same number of tokens, so `at` is shared (and
    no call copies the alternatives' tokens: long common prefixes stay cheap to factor).
    """
    if len(alternatives) == 1:
        return ["".join(map(_lane_regex, alternatives[0][at:]))]
    head = alternatives[0][at]
    if depth < _FACTOR_DEPTH and all(tokens[at] == head for tokens in alternatives):
        # All branches start with the same token (e.g. a class): factor it out.  An atomic group
        # ("*" and its chunk) can be factored too: it matches in one place only, whatever follows.
        return [_lane_regex(head) + _group(_alternation(alternatives, at + 1, depth + 1))]
    branches: list[str] = []
    i = 0
    while i < len(alternatives):
        if len(alternatives[i][at]) > 1 or depth >= _FACTOR_DEPTH:
            branches.append("".join(map(_lane_regex, alternatives[i][at:])))
            i += 1
            continue
        j = i
        while j < len(alternatives) and len(alternatives[j][at]) == 1:
            j += 1
        by_first: dict[str, list[_LaneTokens]] = {}
        for tokens in alternatives[i:j]:
            by_first.setdefault(tokens[at], []).append(tokens)
        for first, group in by_first.items():
            # depth counts nested groups, and only several alternatives can need one.
            inner = _alternation(group, at + 1, depth + 1 if len(group) > 1 else depth)
            branches.append(re.escape(first) + _group(inner))
        i = j
    return branches


def _group(branches: list[str]) -> str:
    return branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"


def _build_lanes(globs: list[tuple[_Glob, _Glob]]) -> tuple[types.MappingProxyType, tuple[_Lane, ...]]:
    grouped: dict[tuple[str | None, int], list[int]] = {}
    for index, (namespace, name) in enumerate(globs):
        bucket = namespace.text if namespace.exact else None
        grouped.setdefault((bucket, _rule_layout(namespace, name)), []).append(index)
    by_namespace: dict[str, list[_Lane]] = {}
    wild: list[_Lane] = []
    for (bucket, layout), indexes in grouped.items():
        alternatives: list[_LaneTokens] = []
        size = 0
        for number, index in enumerate(indexes):
            # Each branch ends with its rule's mark, later an empty capturing group: lastindex then
            # says which rule matched, and the branch still starts with its literal.
            tokens = _lane_tokens(layout, *globs[index]) + (f"\x01{index}\x02",)
            alternatives.append(tokens)
            size += sum(map(len, tokens))
            if number + 1 == len(indexes) or len(alternatives) == LANE_MAX_RULES or size >= LANE_MAX_CHARS:
                text = "|".join(_alternation(alternatives))
                order = array.array("I", (int(found) for found in _RULE_MARK.findall(text)))
                lane = _Lane(layout, re.compile(_RULE_MARK.sub("()", text)), order, min(order))
                (wild if bucket is None else by_namespace.setdefault(bucket, [])).append(lane)
                alternatives, size = [], 0
    # re keeps the last 512 patterns it compiled in a cache of its own: the lanes of rules that a
    # reload replaced would live on there.  (Other code compiles its small patterns again, once.)
    re.purge()
    # Lanes in order of their first rule, so predict() can stop at a lane that cannot win.
    ordered = {bucket: tuple(sorted(lanes, key=lambda lane: lane.first))
               for bucket, lanes in by_namespace.items()}
    return types.MappingProxyType(ordered), tuple(sorted(wild, key=lambda lane: lane.first))


def parse_rules(document: object, source: str) -> Rules:
    """Validate a decoded rules document and compile it. Raises RulesError for the first problem."""
    top = _check_object(source, document, "", "the rules file", _TOP_KEYS, _EXAMPLE_DOCUMENT)
    default_cpu, default_memory = _section(source, top, "defaults")
    min_cpu, min_memory = _section(source, top, "min")
    max_cpu, max_memory = _section(source, top, "max")
    for resource, low, high, fmt in (("cpu", min_cpu, max_cpu, format_cpu),
                                     ("memory", min_memory, max_memory, format_memory)):
        if low is not None and high is not None and low > high:
            _fail(source, f"min.{resource}", f'min.{resource} ("{fmt(low)}") is above max.{resource} '
                  f'("{fmt(high)}"); lower min.{resource} or raise max.{resource}',
                  f'"min": {{"{resource}": "{fmt(high)}"}}')
    defaults = Amounts(BUILTIN_DEFAULT_CPU_MILLICORES if default_cpu is None else default_cpu,
                       BUILTIN_DEFAULT_MEMORY_MEBIBYTES if default_memory is None else default_memory)
    low, high = Amounts(min_cpu, min_memory), Amounts(max_cpu, max_memory)

    raw_rules = top.get("rules", [])
    if not isinstance(raw_rules, list):
        _fail(source, "rules", f'"rules" must be a JSON array of rule objects, got {_describe(raw_rules)}',
              f'"rules": [{_EXAMPLE_RULE}]')
    # The memory the rules will keep, estimated before anything is compiled (see RULE_BYTES).
    characters = sum(len(value) for raw in raw_rules if isinstance(raw, dict)
                     for value in (raw.get("id"), raw.get("namespace", "*"), raw.get("name", "*"))
                     if isinstance(value, str))
    estimate = rules_memory(len(raw_rules), characters)
    if estimate > RULES_MAX_BYTES:
        _fail(source, "rules", f"{len(raw_rules):,} rules would keep about {size_text(estimate)} of memory "
              f"(estimated: {RULE_BYTES} bytes a rule and {RULE_CHAR_BYTES} a character of their ids and globs), "
              f"more than the {size_text(RULES_MAX_BYTES)} reqapi allows its rules so that it stays within its "
              "memory limit (about 11,000 rules of the usual shape); merge rules that give the same requests "
              "into one rule with a glob, e.g. one rule for a team's namespace instead of one per workload",
              '{"id": "team-a", "namespace": "team-a", "cpu": "500m", "memory": "512Mi"}')
    rules: list[Rule] = []
    globs: list[tuple[_Glob, _Glob]] = []
    first_index: dict[str, int] = {}
    # Rules repeat their globs and amounts: each distinct one is checked once and kept once.
    checked: dict[str, dict[Any, Any]] = {"namespace": {}, "name": {}, "cpu": {}, "memory": {}}

    def glob(value: object, path: str, kind: _NameKind) -> _Glob:
        seen = checked[kind.key]
        found = seen.get(value) if isinstance(value, str) else None
        if found is None:
            found = seen[value] = _glob(source, value, path, kind)
        return found

    def amount(value: object, path: str, resource: str) -> int | None:
        seen = checked[resource]
        if not isinstance(value, str) or value not in seen:
            units = _quantity(source, value, path, "rules", resource)
            if not isinstance(value, str):
                return units
            seen[value] = units
        return seen[value]
    for index, raw in enumerate(raw_rules):
        path = f"rules[{index}]"
        label = f"rule {path}"
        if isinstance(raw, dict) and isinstance(raw.get("id"), str) and raw["id"].strip():
            label += f" ({_quote(raw['id'])})"   # readers know their rules by id, not by position
        body = _check_object(source, raw, path, label, _RULE_KEYS, _EXAMPLE_RULE)
        if "id" not in body:
            _fail(source, path, f'rule {path} has no "id"; every rule needs a unique, non-empty id '
                  "(it is reported with each prediction)", f'"id": "rule-{index}"')
        rule_id = body["id"]
        id_path = _child(path, "id")
        if not isinstance(rule_id, str):
            _fail(source, id_path, f"id must be a string, got {_describe(rule_id)}", f'"id": "rule-{index}"')
        if not rule_id.strip():
            _fail(source, id_path, "id must be a non-empty string", f'"id": "rule-{index}"')
        if rule_id == NO_RULE:
            _fail(source, id_path, f'the id "{NO_RULE}" is reserved: predictions report it when no rule '
                  "matched", f'"id": "{NO_RULE}-workloads"')
        if rule_id in first_index:
            _fail(source, id_path, f"duplicate id {_quote(rule_id)}: rules[{first_index[rule_id]}] already "
                  "uses it; ids must be unique", f'"id": {_quote(rule_id + "-" + str(index))}')
        first_index[rule_id] = index
        namespace = glob(body.get("namespace", "*"), _child(path, "namespace"), _NAMESPACE_KIND)
        name = glob(body.get("name", "*"), _child(path, "name"), _NAME_KIND)
        cpu = amount(body["cpu"], _child(path, "cpu"), "cpu") if "cpu" in body else None
        memory = amount(body["memory"], _child(path, "memory"), "memory") if "memory" in body else None
        history = body.get("history", "")
        if history != "" and history not in _HISTORY_MODES:
            _fail(source, _child(path, "history"), f"history must be one of {', '.join(map(_quote, _HISTORY_MODES))} "
                  f"(on: usage history answers; shadow: shown, the rule answers; off: the rule only), got "
                  f"{_describe(history)}", '"history": "shadow"')
        if cpu is None and memory is None and not history:
            _fail(source, path, f"rule {_quote(rule_id)} sets neither cpu nor memory, so it would only "
                  "repeat the defaults; set one or both",
                  json.dumps({"id": rule_id, **{k: v for k, v in body.items() if k != "id"},
                              "cpu": "250m", "memory": "256Mi"}, ensure_ascii=False))
        rules.append(Rule(rule_id, namespace.text, name.text, cpu, memory, history))
        globs.append((namespace, name))

    answers: dict[tuple[int | None, int | None], tuple[str, str]] = {}   # one pair of strings per distinct answer

    def decide(cpu: int | None, memory: int | None, rule: str) -> Prediction:
        answer = answers.get((cpu, memory))
        if answer is None:
            answer = answers[(cpu, memory)] = (
                format_cpu(_clamp(defaults.cpu if cpu is None else cpu, low.cpu, high.cpu)),
                format_memory(_clamp(defaults.memory if memory is None else memory, low.memory, high.memory)))
        return Prediction(cpu=answer[0], memory=answer[1], rule=rule)

    frozen_rules = tuple(rules)
    by_namespace, wild = _build_lanes(globs)
    return Rules(
        defaults=defaults, min=low, max=high, rules=frozen_rules, source=source,
        digest=_digest(defaults, low, high, frozen_rules), memory=estimate,
        _by_namespace=by_namespace,
        _wild=wild,
        _predictions=tuple(decide(r.cpu, r.memory, r.id) for r in frozen_rules),
        _fallback=decide(None, None, NO_RULE),
    )


def _json_hint(text: str, error: json.JSONDecodeError) -> str:
    """Name the usual cause of a JSON syntax error (hand-edited files in CI)."""
    if not text.strip():
        return ' (the file is empty; the smallest rules file is "{}")'
    here = text[error.pos:error.pos + 1]
    before = text[:error.pos].rstrip()[-1:]
    if here in ("/", "#"):
        return " (JSON does not allow comments)"
    if here == "'":
        return " (JSON strings need double quotes)"
    if before == "," and here in ("}", "]"):
        return " (JSON does not allow a trailing comma)"
    return ""


def load_rules(path: str) -> Rules:
    """Read a UTF-8 JSON rules file and compile it; every failure is a RulesError."""
    try:
        with open(path, "rb") as handle:
            pieces, size = [], 0              # (read(RULES_MAX_FILE_BYTES + 1) would allocate 4 MiB at once)
            while size <= RULES_MAX_FILE_BYTES and (piece := handle.read(65536)):
                pieces.append(piece)
                size += len(piece)
            raw = b"".join(pieces)
    except OSError as e:
        _fail(path, "(file)", f"cannot read the rules file: {e.strerror or e}",
              f"a readable JSON file such as {_EXAMPLE_DOCUMENT}")
    if len(raw) > RULES_MAX_FILE_BYTES:
        # Refused before it is decoded: decoding takes ~6 bytes of memory per byte of JSON.
        _fail(path, "(file)", f"the file is larger than {size_text(RULES_MAX_FILE_BYTES)}, the most reqapi reads "
              f"for rules (the rules it serves may keep at most {size_text(RULES_MAX_BYTES)} of memory, about "
              "11,000 rules of the usual shape); merge rules that give the same requests into one rule with a glob",
              '{"id": "team-a", "namespace": "team-a", "cpu": "500m", "memory": "512Mi"}')
    try:
        text = raw.decode("utf-8-sig")   # tolerate a BOM some editors add
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        _fail(path, f"line {line} column {column}", f"the file is not valid UTF-8 (byte 0x{raw[e.start]:02x})",
              "the same file saved as UTF-8")
    try:
        strings: dict[str, str] = {}     # rules repeat their values: keep one string of each while loading

        def decode_object(pairs: list[tuple[str, object]]) -> _JSONObject:
            return _JSONObject.from_pairs([(key, strings.setdefault(value, value) if type(value) is str else value)
                                           for key, value in pairs])
        document = json.loads(text, object_pairs_hook=decode_object)
    except json.JSONDecodeError as e:
        _fail(path, f"line {e.lineno} column {e.colno}", f"invalid JSON: {e.msg}{_json_hint(text, e)}",
              _EXAMPLE_DOCUMENT)
    except RecursionError:
        _fail(path, "(top level)", "the JSON is nested too deeply", _EXAMPLE_DOCUMENT)
    return parse_rules(document, path)


def named_workloads(rules: Rules) -> list[tuple[str, str]]:
    """(namespace, name) of every rule naming one exact workload, unique and sorted."""
    return sorted({(r.namespace, r.name) for r in rules.rules
                   if not any(c in "*?[" for c in r.namespace + r.name)})


DEFAULT_RULES: Rules = parse_rules({}, "built-in default")


# ---- The history estimator (pure) -----------------------------------------------------------
#
# What requests a container should get from its completed days of usage (issue 13; the algorithm,
# its constants and their evaluation are in docs/history-estimator.md).  No I/O, no clock: the
# caller passes `today` (a UTC day number), so two replicas that hold the same completed days and
# the same rules agree byte for byte, and an answer can change at most when a day completes.
# tests/evaluation scores exactly this code (tests/evaluation/estimator.py imports it from here).
#
# Units are reqapi's: CPU in millicores, memory in Mi (2**20 bytes). Inputs are floats as a
# metrics engine returns them; answers are whole numbers, rounded up so a request never shrinks
# below what was computed.
#
# The algorithm (constants in `Params`, chosen on the evaluation's tuning seeds, see
# docs/history-estimator.md):
#
# * CPU: per completed day, the p95 of the CPU rate (`rate(...[2m])` sampled each minute: the
#   evaluation found a 5-minute rate smooths bursts away and under-requests bursty workloads),
#   max over the workload's pods. A day on which a CPU limit visibly capped usage (throttled in
#   more than 5% of CFS periods - so the p95 of demand lies above the limit - and the day's p99
#   at the limit) counts as `limit x (1 + throttle_raise)` instead of its p95: usage cannot show
#   demand above the limit, and the smoothed p95 sits below it. Over the days, a recency-weighted
#   quantile (weights halve every `cpu_half_life_days`, times the day's sample count), then
#   `x (1 + cpu_margin)`.
# * Memory: the largest daily working-set peak of the window `x (1 + memory_margin)` - the max,
#   not a percentile, because a missed memory peak is an OOM kill, not a slow request. If the
#   container was OOM-killed, at least VPA's bump applied to the limit it was killed at:
#   `max(limit x 1.2, limit + 100Mi)` (VPA's OOMBumpUpRatio and OOMMinBumpUp in
#   vertical-pod-autoscaler pkg/recommender/model/aggregations_config.go; VPA bumps the observed
#   usage, we bump the limit because usage at the moment of the kill is never observed).
#   A peak that grows day after day is flagged as a leak, not chased.
# * Confidence `min(1, days / full_confidence_days)`. The answer moves from the rule toward the
#   history value as confidence grows, but never below the history value:
#   `max(history, w x history + (1 - w) x rule)`. With too little history (no completed day, or
#   fewer than `min_samples` samples) the rule answers.
# * Then the rules' min/max clamp. The max wins even over "never below observed usage"; the basis
#   says so (`max_clamp_beat_usage`).

SOURCE_RULES = "rules"
SOURCE_HISTORY = "history"
SOURCE_BLEND = "blend"

REASON_NO_HISTORY = "NoHistory"                    # no completed day with usage
REASON_INSUFFICIENT = "InsufficientSamples"        # fewer samples than Params.min_samples
REASON_PINNED = "PinnedToRules"                    # the rule says: rules only


@dataclass(frozen=True)
class DayUsage:
    """One container's usage on one completed UTC day, aggregated over the workload's pods."""
    day: int                               # UTC day number: days since 1970-01-01
    samples: int                           # usage samples behind the day (all pods)
    cpu_p95_m: float                       # p95 of the CPU rate (Params.cpu_rate), millicores, max over pods
    cpu_p99_m: float                       # p99 of the same, millicores (detects usage at the limit)
    memory_peak_mi: float                  # working-set peak, Mi, max over pods
    oom_kills: int = 0                     # OOM kills that day, all pods
    cpu_limit_m: float | None = None       # CPU limit in force (max over pods); None = no limit
    cpu_throttled_ratio: float = 0.0       # throttled / total CFS periods, max over pods
    memory_limit_mi: float | None = None   # memory limit in force (max over pods); None = no limit


@dataclass(frozen=True)
class RuleAnswer:
    """What the static rules say for the workload, and their guard rails."""
    cpu_m: int                      # the rule's answer (already clamped into min/max by the rules)
    memory_mi: int
    min_cpu_m: int | None = None    # None = no lower clamp
    min_memory_mi: int | None = None
    max_cpu_m: int | None = None    # None = no upper clamp
    max_memory_mi: int | None = None
    rules_only: bool = False        # the rule pins the workload to the rules' answer


@dataclass(frozen=True)
class Params:
    """The estimator's constants. Defaults are the values chosen by tests/evaluation (tuning seeds)."""
    window_days: int = 14              # history window, completed days (krr's default history)
    cpu_rate: str = "2m"               # the rate window of the daily CPU percentiles (for the basis text)
    min_samples: int = 100             # krr's points_required: fewer samples than this is no history
    cpu_day_quantile: float = 0.9      # quantile over the days of the daily p95s
    cpu_half_life_days: float = 1.0    # a day's weight halves every this many days of age
    cpu_margin: float = 0.05           # on top of a p95 that is already a high statistic
    throttle_threshold: float = 0.05   # > 5% of periods throttled: demand's p95 is above the limit
    throttle_at_limit: float = 0.95    # the day's p99 reached 95% of the limit: usage was capped
    throttle_raise: float = 0.25       # a capped day counts as limit x (1 + this)
    memory_margin: float = 0.15        # krr's and VPA's 15%
    oom_bump_ratio: float = 1.2        # VPA DefaultOOMBumpUpRatio
    oom_min_bump_mi: float = 100.0     # VPA DefaultOOMMinBumpUp (100 MiB)
    full_confidence_days: float = 7.0  # days of history at which history fully replaces the rule
    leak_days: int = 4                 # a leak needs this many comparable pairs of days...
    leak_share: float = 0.75           # ...this share of which rose...
    leak_min_growth: float = 0.02      # ...by at least 2% from one day to the next


DEFAULT_PARAMS = Params()


@dataclass(frozen=True)
class ResourceBasis:
    """How one resource's answer was reached (one line of the object's explanation)."""
    statistic: str                 # what was measured, in words
    observed: float                # the statistic's value before margin (millicores or Mi)
    margin: float                  # the margin fraction applied
    history: int                   # the usage-based value: statistic, margin, raises and bumps
    rule: int                      # the rule's answer
    blended: int                   # after moving from the rule toward history (never < history)
    answer: int                    # after the rules' min/max clamp
    clamped: str                   # "", "min" or "max"
    max_clamp_beat_usage: bool     # the max clamp pulled the answer below `history`
    capped_days: int = 0           # CPU: days on which a CPU limit visibly capped usage
    oom_kills: int = 0             # memory: OOM kills in the window
    oom_limit_mi: float | None = None  # memory: the limit the container was killed at
    leak: bool = False             # memory: daily peaks grew day after day


@dataclass(frozen=True)
class Basis:
    window_days: int               # the history window asked for
    days: int                      # completed days with usage inside it
    samples: int                   # samples behind those days
    first_day: int | None          # UTC day numbers of the oldest and newest day used
    last_day: int | None
    confidence: float              # 0..1: how far the answer moved from the rule toward history
    reason: str                    # why the rules answered, "" when history did
    cpu: ResourceBasis | None      # None when there is no usable history
    memory: ResourceBasis | None


@dataclass(frozen=True)
class Recommendation:
    cpu_m: int
    memory_mi: int
    source: str                    # SOURCE_RULES, SOURCE_HISTORY or SOURCE_BLEND
    confidence: float
    basis: Basis


def _finite_nonnegative(value: float | None) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def usable_days(days: Iterable[DayUsage], today: int, window_days: int) -> tuple[DayUsage, ...]:
    """Completed days inside the window, one per day number, oldest first.

    A metrics engine can return NaN, negative or infinite values: such a day is dropped rather
    than trusted. If two entries share a day (a caller merging sources), the one with more
    samples wins, then the larger values - a choice that does not depend on input order.
    """
    best: dict[int, DayUsage] = {}
    for d in days:
        if not (today - window_days <= d.day < today):
            continue   # today is not complete; older days are outside the window
        if d.samples <= 0 or not all(_finite_nonnegative(v) for v in (
                d.cpu_p95_m, d.cpu_p99_m, d.memory_peak_mi, d.cpu_throttled_ratio)):
            continue
        if d.oom_kills < 0 or (d.cpu_limit_m is not None and not _finite_nonnegative(d.cpu_limit_m)) or (
                d.memory_limit_mi is not None and not _finite_nonnegative(d.memory_limit_mi)):
            continue
        old = best.get(d.day)
        if old is None or _rank(d) > _rank(old):
            best[d.day] = d
    return tuple(best[k] for k in sorted(best))


def _rank(d: DayUsage) -> tuple:
    return (d.samples, d.cpu_p95_m, d.cpu_p99_m, d.memory_peak_mi, d.oom_kills, d.cpu_throttled_ratio,
            d.cpu_limit_m or 0.0, d.memory_limit_mi or 0.0)


def weighted_quantile(values: Sequence[float], weights: Sequence[float], q: float) -> float:
    """The smallest value whose cumulative weight reaches q of the total (values need not be sorted).

    Ties in value are broken by position only through sorting on (value, weight), so the result
    is the same for any order of the same pairs.
    """
    pairs = sorted(zip(values, weights))
    total = math.fsum(w for _, w in pairs)
    threshold = q * total
    running = 0.0
    for value, weight in pairs:
        running += weight
        if running >= threshold:
            return value
    return pairs[-1][0]


def cpu_day_value(d: DayUsage, p: Params) -> tuple[float, bool]:
    """The day's CPU statistic, and whether a CPU limit visibly capped it (then raised)."""
    capped = (d.cpu_limit_m is not None and d.cpu_limit_m > 0
              and d.cpu_throttled_ratio > p.throttle_threshold
              and d.cpu_p99_m >= p.throttle_at_limit * d.cpu_limit_m)
    if capped:
        return max(d.cpu_p95_m, d.cpu_limit_m * (1.0 + p.throttle_raise)), True
    return d.cpu_p95_m, False


def is_leak(days: Sequence[DayUsage], p: Params) -> bool:
    """Daily peaks that grow day after day: of the pairs of consecutive days in the window, at
    least `leak_days` are comparable and `leak_share` of them rose by `leak_min_growth` or more.

    A day with an OOM kill is not comparable with its neighbours: the kill restarts the container,
    so a leak that is killed every few days shows a sawtooth, not a staircase - its rising
    kill-free stretches are the signal.
    """
    pairs = [(a, b) for a, b in zip(days, days[1:])
             if b.day == a.day + 1 and not a.oom_kills and not b.oom_kills]
    if len(pairs) < p.leak_days:
        return False
    rising = sum(b.memory_peak_mi >= a.memory_peak_mi * (1.0 + p.leak_min_growth) for a, b in pairs)
    return rising >= p.leak_share * len(pairs)


def _ceil(value: float) -> int:
    # Round up, but forgive float noise so 100.00000000001 (from 87 x 1.15) is 100, not 101.
    return int(math.ceil(value - 1e-9))


def _clamp_where(value: int, low: int | None, high: int | None) -> tuple[int, str]:
    # Min first, then max: when the two disagree the max wins, like reqapi's rules.
    clamped = ""
    if low is not None and value < low:
        value, clamped = low, "min"
    if high is not None and value > high:
        value, clamped = high, "max"
    return value, clamped


def _resource(statistic: str, observed: float, margin: float, history: float, rule: int, weight: float,
              low: int | None, high: int | None, **extra: object) -> ResourceBasis:
    history_whole = _ceil(history)
    blended = max(history_whole, _ceil(weight * history + (1.0 - weight) * rule))
    answer, clamped = _clamp_where(blended, low, high)
    return ResourceBasis(statistic=statistic, observed=observed, margin=margin, history=history_whole,
                         rule=rule, blended=blended, answer=answer, clamped=clamped,
                         max_clamp_beat_usage=answer < history_whole, **extra)


def recommend(days: Iterable[DayUsage], rule: RuleAnswer, today: int,
              params: Params = DEFAULT_PARAMS) -> Recommendation:
    """The requests for one container, from its completed days before `today` (a UTC day number)."""
    p = params
    kept = usable_days(days, today, p.window_days)
    samples = sum(d.samples for d in kept)
    rule_cpu, _ = _clamp_where(rule.cpu_m, rule.min_cpu_m, rule.max_cpu_m)
    rule_memory, _ = _clamp_where(rule.memory_mi, rule.min_memory_mi, rule.max_memory_mi)
    if not kept or samples < p.min_samples:
        basis = Basis(window_days=p.window_days, days=len(kept), samples=samples,
                      first_day=kept[0].day if kept else None, last_day=kept[-1].day if kept else None,
                      confidence=0.0, reason=REASON_PINNED if rule.rules_only else (
                          REASON_INSUFFICIENT if kept else REASON_NO_HISTORY),
                      cpu=None, memory=None)
        return Recommendation(cpu_m=rule_cpu, memory_mi=rule_memory, source=SOURCE_RULES,
                              confidence=0.0, basis=basis)

    confidence = min(1.0, len(kept) / p.full_confidence_days)
    weight = confidence

    # CPU: a recency-weighted quantile of the daily values.
    newest = today - 1
    values: list[float] = []
    weights: list[float] = []
    capped_days = 0
    for d in kept:
        value, capped = cpu_day_value(d, p)
        capped_days += capped
        values.append(value)
        weights.append(d.samples * 2.0 ** (-(newest - d.day) / p.cpu_half_life_days))
    cpu_observed = weighted_quantile(values, weights, p.cpu_day_quantile)
    cpu = _resource(
        f"p{round(p.cpu_day_quantile * 100)} over days (half-life {p.cpu_half_life_days:g}d) of the daily "
        f"p95 of the {p.cpu_rate} CPU rate" + (", capped days at limit x" + f"{1 + p.throttle_raise:g}" if capped_days else ""),
        cpu_observed, p.cpu_margin, cpu_observed * (1.0 + p.cpu_margin), rule_cpu, weight,
        rule.min_cpu_m, rule.max_cpu_m, capped_days=capped_days)

    # Memory: the largest daily peak, the margin, and the OOM bump on the limit that killed it.
    memory_observed = max(d.memory_peak_mi for d in kept)
    memory_history = memory_observed * (1.0 + p.memory_margin)
    oom_kills = sum(d.oom_kills for d in kept)
    oom_limit: float | None = None
    if oom_kills:
        # The kill happened at the limit; without a known limit the day's peak is the best bound.
        oom_limit = max((d.memory_limit_mi if d.memory_limit_mi is not None else d.memory_peak_mi)
                        for d in kept if d.oom_kills)
        memory_history = max(memory_history, oom_limit * p.oom_bump_ratio, oom_limit + p.oom_min_bump_mi)
    memory = _resource(
        "max daily working-set peak", memory_observed, p.memory_margin, memory_history, rule_memory, weight,
        rule.min_memory_mi, rule.max_memory_mi, oom_kills=oom_kills, oom_limit_mi=oom_limit,
        leak=is_leak(kept, p))

    if rule.rules_only:
        # A pinned workload's explanation still shows what history would answer (shadow), but
        # the rule answers.
        source, reason = SOURCE_RULES, REASON_PINNED
        cpu_m, memory_mi = rule_cpu, rule_memory
    else:
        source, reason = (SOURCE_HISTORY if confidence >= 1.0 else SOURCE_BLEND), ""
        cpu_m, memory_mi = cpu.answer, memory.answer
    basis = Basis(window_days=p.window_days, days=len(kept), samples=samples, first_day=kept[0].day,
                  last_day=kept[-1].day, confidence=weight, reason=reason, cpu=cpu, memory=memory)
    return Recommendation(cpu_m=cpu_m, memory_mi=memory_mi, source=source, confidence=weight, basis=basis)


def main_container(workload: str, answers: dict[str, Recommendation]) -> str:
    """The container whose answer is the object's `resources`: the one named like the workload,
    else the largest (memory, then CPU, then name - so the choice never depends on dict order)."""
    if workload in answers:
        return workload
    return max(sorted(answers), key=lambda name: (answers[name].memory_mi, answers[name].cpu_m))


# ---- History snapshots and answers (pure) -------------------------------------------------------
#
# The refresher (section 9) reads completed days from the metrics engine and hands the storage an
# immutable HistorySnapshot; an answer is predict_with_history(rules, modes, snapshot, ns, name),
# a pure function of the rules and the snapshot, i.e. of the completed days' aggregates.
#
# Decisions (docs/history-estimator.md, "Serving"):
#   - Kinds sharing a name in a namespace (a Deployment `web` and a CronJob `web`): a Requests
#     object is named like its workload, so one answers, by HISTORY_KIND_ORDER (long-running
#     controllers first); the explanation names the kinds left out.
#   - Containers: every container cAdvisor reported (sidecars included) gets its own answer from
#     its own days, the rule being every container's prior; `resources` is the main container's
#     (named like the workload, else the largest).  Init containers run minutes a day: under the
#     estimator's 100 samples they get the rule's answer and are never the largest.
#   - A leak (peaks growing day after day) is flagged in the basis, not chased.
#   - A workload scaled by an HPA on CPU or memory utilisation (a percentage of the request):
#     changing that request moves the HPA's scaling, so that resource keeps the rule's answer, as
#     krr and VPA leave such workloads alone; the other resource still follows history.  The
#     HPAs are those of the newest completed day (kube-state-metrics' HPA series).
REASON_HPA = "HPAScaled"                      # every resource is under an HPA's utilisation target

HISTORY_KIND_ORDER = ("Deployment", "StatefulSet", "DaemonSet", "CronJob", "Job", "ReplicaSet", "Pod")
HISTORY_FRESH, HISTORY_PENDING, HISTORY_STALE = "fresh", "pending", "stale"
REASON_SHADOW = "Shadow"                      # shadow mode: history shown, the rule answers
REASON_PENDING = "HistoryPending"             # no refresh has succeeded yet
REASON_STALE = "HistoryStale"                 # the last good history is older than the stated limit
_HISTORY_DIGEST_FORMAT = "reqapi.history/v1"  # bump if the snapshot digest's canonical form changes


@dataclass(frozen=True)
class WorkloadUsage:
    """One workload's completed days: per container (sorted by name) its days, oldest first."""
    kind: str
    containers: tuple[tuple[str, tuple[DayUsage, ...]], ...]


@dataclass(frozen=True)
class HistorySnapshot:
    """What the refresher knows, as of `today` (a UTC day number: the days before it are complete).

    `workloads` maps (namespace, name) to its kinds' usage in HISTORY_KIND_ORDER.  `digest` covers
    everything an answer depends on, so it is what the resourceVersion derives from."""
    status: str                     # HISTORY_FRESH, HISTORY_PENDING or HISTORY_STALE
    mode: str                       # the global mode: "on" or "shadow"
    today: int
    window_days: int
    workloads: types.MappingProxyType = dataclasses.field(repr=False, compare=False)
    digest: str = ""
    # (namespace, kind, name) -> resources ("cpu", "memory") an HPA scales on by utilisation.
    hpa: types.MappingProxyType = dataclasses.field(repr=False, compare=False,
                                                    default_factory=lambda: types.MappingProxyType({}))


@dataclass(frozen=True)
class Explanation:
    """How an answer used history: the object's annotation, Table column, containers and basis."""
    mode: str                       # on, shadow or off (the rule or the global setting)
    reason: str                     # why the rules answered the workload ("" when history did)
    kind: str                       # the workload kind whose history was used ("" when none)
    other_kinds: tuple[str, ...]    # kinds of the same name not used (see HISTORY_KIND_ORDER)
    main: str                       # the container whose answer is `resources`
    containers: tuple[tuple[str, Recommendation], ...]
    today: int
    window_days: int
    hpa: tuple[str, ...] = ()       # resources kept at the rule's answer: an HPA scales on them


def history_snapshot(state: str, mode: str, today: int, window_days: int,
                     usage: Iterable[tuple[tuple[str, str, str, str], Iterable[DayUsage]]],
                     hpa: Iterable[tuple[tuple[str, str, str], Iterable[str]]] = ()) -> HistorySnapshot:
    """Build a snapshot from ((namespace, kind, name, container), days) pairs, in any order.

    Only days inside the window before `today` are kept, so the digest (and every answer) changes
    only when a day completes; floats enter the digest as repr(), exact across replicas."""
    grouped: dict[tuple[str, str], dict[str, dict[str, tuple[DayUsage, ...]]]] = {}
    for (namespace, kind, name, container), days in usage:
        kept = tuple(sorted((d for d in days if today - window_days <= d.day < today), key=lambda d: d.day))
        if kept:
            grouped.setdefault((namespace, name), {}).setdefault(kind, {})[container] = kept
    order = {kind: i for i, kind in enumerate(HISTORY_KIND_ORDER)}
    workloads: dict[tuple[str, str], tuple[WorkloadUsage, ...]] = {}
    for key in sorted(grouped):
        kinds = sorted(grouped[key], key=lambda k: (order.get(k, len(order)), k))
        workloads[key] = tuple(WorkloadUsage(k, tuple(sorted(grouped[key][k].items()))) for k in kinds)
    digest = hashlib.sha256()
    digest.update(f"{_HISTORY_DIGEST_FORMAT}\0{state}\0{mode}\0{today}\0{window_days}\n".encode())
    for (namespace, name), kinds in workloads.items():
        for w in kinds:
            for container, days in w.containers:
                digest.update(f"{namespace}\0{name}\0{w.kind}\0{container}\0".encode())
                # Fields spelled out: dataclasses.astuple deep-copies and cost 5 s for 2,000 workloads.
                digest.update(repr([(d.day, d.samples, d.cpu_p95_m, d.cpu_p99_m, d.memory_peak_mi, d.oom_kills,
                                     d.cpu_limit_m, d.cpu_throttled_ratio, d.memory_limit_mi) for d in days]).encode())
                digest.update(b"\n")
    scaled = {key: tuple(sorted(set(resources))) for key, resources in sorted(hpa)}
    scaled = {key: resources for key, resources in scaled.items() if resources}
    if scaled:
        digest.update(repr(sorted(scaled.items())).encode())
    return HistorySnapshot(state, mode, today, window_days, types.MappingProxyType(workloads), digest.hexdigest(),
                           types.MappingProxyType(scaled))


def combined_digest(rules_digest: str, snapshot: HistorySnapshot) -> str:
    """The digest a resourceVersion derives from when history is configured: the rules' and the
    snapshot's, so replicas with the same rules and the same completed days agree."""
    return hashlib.sha256(f"{rules_digest}\0{snapshot.digest}".encode()).hexdigest()


def history_workloads(snapshot: HistorySnapshot) -> list[tuple[str, str]]:
    """(namespace, name) of every workload with history: the list holds them (and the rules' named ones)."""
    return list(snapshot.workloads)


def predict_with_history(rules: Rules, modes: dict[str, str], snapshot: HistorySnapshot, namespace: str,
                         name: str, params: Params = DEFAULT_PARAMS) -> Prediction:
    """The answer with history configured: the rules' prediction, moved toward usage per the
    estimator unless the workload is in shadow mode, pinned to the rules, or has no usable history."""
    base = rules.predict(namespace, name)
    mode = modes.get(base.rule) or snapshot.mode
    kinds: tuple[WorkloadUsage, ...] = snapshot.workloads.get((namespace, name), ())
    if snapshot.status != HISTORY_FRESH or not kinds:
        reason = {HISTORY_PENDING: REASON_PENDING, HISTORY_STALE: REASON_STALE}.get(snapshot.status, REASON_NO_HISTORY)
        return dataclasses.replace(base, source=SOURCE_RULES, explanation=Explanation(
            mode, reason, "", (), "", (), snapshot.today, snapshot.window_days))
    rule = RuleAnswer(cpu_m=cpu_millicores(parse_quantity(base.cpu)),
                      memory_mi=memory_mebibytes(parse_quantity(base.memory)),
                      min_cpu_m=rules.min.cpu, min_memory_mi=rules.min.memory,
                      max_cpu_m=rules.max.cpu, max_memory_mi=rules.max.memory, rules_only=mode == "off")
    params = dataclasses.replace(params, window_days=snapshot.window_days)
    used = kinds[0]
    answers = {container: recommend(days, rule, snapshot.today, params) for container, days in used.containers}
    main_name = main_container(name, answers)
    scaled = snapshot.hpa.get((namespace, used.kind, name), ())
    if scaled and mode != "off":
        answers = {container: _hpa_kept(answer, rule, scaled) for container, answer in answers.items()}
    chosen = answers[main_name]
    explanation = Explanation(mode, "", used.kind, tuple(k.kind for k in kinds[1:]), main_name,
                              tuple(sorted(answers.items())), snapshot.today, snapshot.window_days, scaled)
    if mode == "shadow":
        return dataclasses.replace(base, source=SOURCE_RULES,
                                   explanation=dataclasses.replace(explanation, reason=REASON_SHADOW))
    if chosen.source == SOURCE_RULES:
        return dataclasses.replace(base, source=SOURCE_RULES,
                                   explanation=dataclasses.replace(explanation, reason=chosen.basis.reason))
    return Prediction(cpu=format_cpu(chosen.cpu_m), memory=format_memory(chosen.memory_mi), rule=base.rule,
                      source=chosen.source, explanation=explanation)


def _hpa_kept(answer: Recommendation, rule: RuleAnswer, scaled: tuple[str, ...]) -> Recommendation:
    """The answer with the resources an HPA scales on put back to the rule's (clamped) value."""
    if answer.source == SOURCE_RULES:
        return answer
    cpu_m = _clamp_where(rule.cpu_m, rule.min_cpu_m, rule.max_cpu_m)[0] if "cpu" in scaled else answer.cpu_m
    memory_mi = (_clamp_where(rule.memory_mi, rule.min_memory_mi, rule.max_memory_mi)[0] if "memory" in scaled
                 else answer.memory_mi)
    if "cpu" in scaled and "memory" in scaled:
        return dataclasses.replace(answer, cpu_m=cpu_m, memory_mi=memory_mi, source=SOURCE_RULES,
                                   basis=dataclasses.replace(answer.basis, reason=REASON_HPA))
    return dataclasses.replace(answer, cpu_m=cpu_m, memory_mi=memory_mi)


# ---------------------------------------------------------------------------
# 3. Kubernetes documents (pure data builders)
# ---------------------------------------------------------------------------
# Everything here returns plain dicts shaped exactly as kube-apiserver shapes them: key
# order as Go writes it, metav1.Status for every error, the discovery documents kubectl
# caches and the OpenAPI documents `kubectl explain` reads.  dumps() is the one encoder of
# response bodies.  Nothing here does I/O.

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DISCOVERY_TYPE = "application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList"
TABLE_TYPE = "application/json;as=Table;v={version};g=meta.k8s.io"


Document = dict[str, Any]      # a JSON object, as json.loads returns it and dumps() writes it


def dumps(document: Any) -> bytes:
    """Compact UTF-8 JSON, as Go's encoding/json writes it (no spaces, non-ASCII kept)."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, GROUP)


def object_uid(namespace: str, name: str) -> str:
    """A uid that every replica computes alike for the same namespace/name."""
    return str(uuid.uuid5(_UID_NAMESPACE, f"{namespace}/{name}"))


def resource_version_of(rules_digest: str) -> str:
    """The resourceVersion of a rules generation: derived from the rules' content, never from a
    counter or the clock, so that replicas with the same rules agree and a watch can resume
    on either of them.  Decimal digits, like kube-apiserver's, and never "0" (which means "any")."""
    return str(int(rules_digest[:15], 16) or 1)


def rfc3339(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def human_age(seconds: float) -> str:
    """kubectl's AGE column (k8s.io/apimachinery/pkg/util/duration.HumanDuration)."""
    total = int(seconds)
    if total < -1:
        return "<invalid>"
    if total < 0:
        return "0s"
    if total < 120:
        return f"{total}s"
    minutes = total // 60
    if minutes < 10:
        rest = total % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = total // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d{rest}h" if rest else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        years, days = hours // 24 // 365, (hours // 24) % 365
        return f"{years}y{days}d" if days else f"{years}y"
    return f"{hours // 24 // 365}y"


def requests_object(namespace: str, name: str, prediction: Prediction, resource_version: str,
                    created: float) -> Document:
    """One Requests object.  The prediction is computed when asked, so — like metrics-server's
    PodMetrics — its creationTimestamp is the time of the answer."""
    obj: Document = {
        "kind": KIND,
        "apiVersion": GROUP_VERSION,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": object_uid(namespace, name),
            "resourceVersion": resource_version,
            "creationTimestamp": rfc3339(created),
            "annotations": {RULE_ANNOTATION: prediction.rule},
        },
        "resources": {"cpu": prediction.cpu, "memory": prediction.memory},
    }
    if prediction.source:
        explain_history(obj, prediction)
    return obj


def explain_history(obj: Document, prediction: Prediction) -> None:
    """With history configured, the object explains itself: the source annotation, the
    per-container list (multi-container workloads) and the basis (added in this key order)."""
    obj["metadata"]["annotations"][SOURCE_ANNOTATION] = prediction.source
    explanation = prediction.explanation
    if explanation is None:
        return
    answers = dict(explanation.containers)
    shadow_or_pinned = prediction.source == SOURCE_RULES
    if len(answers) > 1:
        obj["containers"] = [
            {"name": container, "source": SOURCE_RULES if shadow_or_pinned else answer.source,
             "resources": ({"cpu": prediction.cpu, "memory": prediction.memory} if shadow_or_pinned else
                           {"cpu": format_cpu(answer.cpu_m), "memory": format_memory(answer.memory_mi)})}
            for container, answer in explanation.containers]
    basis: Document = {"mode": explanation.mode, "window": f"{explanation.window_days}d",
                       "asOf": _day_text(explanation.today)}
    if explanation.reason:
        basis["reason"] = explanation.reason
    if explanation.kind:
        basis["kind"] = explanation.kind
    if explanation.other_kinds:
        basis["otherKinds"] = list(explanation.other_kinds)
    if explanation.hpa:
        basis["hpaScaled"] = list(explanation.hpa)
    if explanation.main:
        basis["container"] = explanation.main
        basis.update(_recommendation_basis(answers[explanation.main]))
        if len(answers) > 1:
            basis["containers"] = [{"name": c, **_recommendation_basis(a)} for c, a in explanation.containers]
    obj["basis"] = basis


def _day_text(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86400))


def _recommendation_basis(answer: Recommendation) -> Document:
    """One container's basis: what the history held, and per resource how the answer was reached
    (what history would say is shown even when the rule answers: shadow mode, a pinned rule)."""
    b = answer.basis
    out: Document = {"source": answer.source, "confidence": round(answer.confidence, 3), "days": b.days,
                     "samples": b.samples}
    if b.first_day is not None and b.last_day is not None:
        out["firstDay"], out["lastDay"] = _day_text(b.first_day), _day_text(b.last_day)
    if b.reason:
        out["reason"] = b.reason
    for key, resource, fmt in (("cpu", b.cpu, format_cpu), ("memory", b.memory, format_memory)):
        if resource is None:
            continue
        entry: Document = {"statistic": resource.statistic, "observed": fmt(_ceil(resource.observed)),
                           "margin": resource.margin, "history": fmt(resource.history), "rule": fmt(resource.rule),
                           "blended": fmt(resource.blended), "clamped": fmt(resource.answer)}
        if resource.clamped:
            entry["clampedBy"] = resource.clamped
        if resource.max_clamp_beat_usage:
            entry["maxClampBelowUsage"] = True
        if key == "cpu" and resource.capped_days:
            entry["cappedDays"] = resource.capped_days
        if key == "memory":
            entry["oomKills"] = resource.oom_kills
            if resource.oom_limit_mi is not None:
                entry["oomLimit"] = fmt(_ceil(resource.oom_limit_mi))
            if resource.leak:
                entry["leak"] = True
        out[key] = entry
    return out


def requests_object_json(namespace: str, name: str, prediction: Prediction, resource_version: str,
                         created: float) -> bytes:
    """The encoded Requests object: what a GET of one object answers."""
    return dumps(requests_object(namespace, name, prediction, resource_version, created))


def list_metadata(resource_version: str, continue_token: str = "", remaining: Optional[int] = None) -> Document:
    """metav1.ListMeta of a list or a Table: remainingItemCount only on a page that has a next one."""
    metadata: dict[str, Any] = {"resourceVersion": resource_version}
    if continue_token:
        metadata["continue"] = continue_token
        if remaining is not None:
            metadata["remainingItemCount"] = remaining
    return metadata


def requests_list(items: list[Document], resource_version: str, continue_token: str = "",
                  remaining: Optional[int] = None) -> Document:
    return {"kind": LIST_KIND, "apiVersion": GROUP_VERSION,
            "metadata": list_metadata(resource_version, continue_token, remaining), "items": items}


TABLE_COLUMNS = [
    {"name": "Name", "type": "string", "format": "name",
     "description": "Name of the workload the prediction is for.", "priority": 0},
    {"name": "CPU", "type": "string", "format": "",
     "description": "Predicted CPU request (whole millicores).", "priority": 0},
    {"name": "Memory", "type": "string", "format": "",
     "description": "Predicted memory request (whole mebibytes).", "priority": 0},
    {"name": "Rule", "type": "string", "format": "",
     "description": "The rule that decided the prediction, or 'default'.", "priority": 0},
    {"name": "Age", "type": "string", "format": "",
     "description": "Time since the prediction was made.", "priority": 0},
]
# With --prometheus-url, a Source column before Age (without it the Table is as it always was).
TABLE_COLUMNS_HISTORY = TABLE_COLUMNS[:4] + [
    {"name": "Source", "type": "string", "format": "",
     "description": "What answered: rules, history, or blend (history while its confidence grows).",
     "priority": 0}] + TABLE_COLUMNS[4:]

def partial_object_metadata(obj: Document, version: str = "v1") -> Document:
    """The object's metadata alone (metav1.PartialObjectMetadata), as k8s.io/apiserver answers
    `as=PartialObjectMetadata` for any resource (client-go's metadata client and informers)."""
    return {"kind": "PartialObjectMetadata", "apiVersion": f"meta.k8s.io/{version}", "metadata": obj["metadata"]}


def partial_object_metadata_list(items: list[Document], version: str, resource_version: str,
                                 continue_token: str = "", remaining: Optional[int] = None) -> Document:
    return {"kind": "PartialObjectMetadataList", "apiVersion": f"meta.k8s.io/{version}",
            "metadata": list_metadata(resource_version, continue_token, remaining),
            "items": [partial_object_metadata(item, version) for item in items]}


def table_row(obj: Document, include_object: str, now: float, created: float) -> Document:
    row: Document = {"cells": [obj["metadata"]["name"], obj["resources"]["cpu"], obj["resources"]["memory"],
                           obj["metadata"]["annotations"][RULE_ANNOTATION], human_age(now - created)]}
    source = obj["metadata"]["annotations"].get(SOURCE_ANNOTATION)
    if source is not None:
        row["cells"].insert(4, source)
    if include_object == "Object":
        row["object"] = obj
    elif include_object == "Metadata":
        row["object"] = partial_object_metadata(obj)
    return row


def table(rows: list[Document], resource_version: str, table_version: str = "v1", with_columns: bool = True,
          continue_token: str = "", remaining: Optional[int] = None) -> Document:
    document: dict[str, Any] = {"kind": "Table", "apiVersion": f"meta.k8s.io/{table_version}",
                                "metadata": list_metadata(resource_version, continue_token, remaining)}
    history = bool(rows) and len(rows[0]["cells"]) == len(TABLE_COLUMNS_HISTORY)   # rows with a Source cell
    document["columnDefinitions"] = (TABLE_COLUMNS_HISTORY if history else TABLE_COLUMNS) if with_columns else []
    document["rows"] = rows
    return document


def watch_event(event_type: str, obj: Document) -> Document:
    return {"type": event_type, "object": obj}


def bookmark(resource_version: str, initial_events_end: bool = False) -> Document:
    """The object of a BOOKMARK event; with initial_events_end, the end of sendInitialEvents."""
    metadata: dict[str, Any] = {"resourceVersion": resource_version}
    if initial_events_end:
        metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
    return {"kind": KIND, "apiVersion": GROUP_VERSION, "metadata": metadata}


def status(code: int, reason: str, message: str, details: Optional[Document] = None,
           retry_after: Optional[int] = None) -> Document:
    """A metav1.Status, keys in the order Go writes them."""
    document: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason}
    if details is not None or retry_after is not None:
        document["details"] = dict(details or {})
        if retry_after is not None:
            document["details"]["retryAfterSeconds"] = retry_after
    document["code"] = code
    return document


def resource_details(name: str = "") -> Document:
    details = {"name": name} if name else {}
    details.update({"group": GROUP, "kind": RESOURCE})
    return details


def api_resource() -> Document:
    return {"name": RESOURCE, "singularName": SINGULAR, "namespaced": True, "kind": KIND,
            "verbs": ["get", "list", "watch"], "shortNames": SHORT_NAMES, "categories": CATEGORIES}


def api_resource_list() -> Document:
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": GROUP_VERSION,
            "resources": [api_resource()]}


def api_group() -> Document:
    version = {"groupVersion": GROUP_VERSION, "version": VERSION}
    return {"kind": "APIGroup", "apiVersion": "v1", "name": GROUP, "versions": [version],
            "preferredVersion": version}


def api_group_list() -> Document:
    group = api_group()
    del group["kind"], group["apiVersion"]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}


def aggregated_discovery(discovery_version: str) -> Document:
    """apidiscovery.k8s.io/v2 (or v2beta1, whose JSON is identical but for apiVersion)."""
    resource = {"resource": RESOURCE,
                "responseKind": {"group": GROUP, "version": VERSION, "kind": KIND},
                "scope": "Namespaced", "singularResource": SINGULAR, "verbs": ["get", "list", "watch"],
                "shortNames": SHORT_NAMES, "categories": CATEGORIES}
    return {"kind": "APIGroupDiscoveryList", "apiVersion": f"apidiscovery.k8s.io/{discovery_version}",
            "metadata": {},
            "items": [{"metadata": {"name": GROUP},
                       "versions": [{"version": VERSION, "resources": [resource], "freshness": "Current"}]}]}


def version_info() -> Document:
    major, minor = __version__.split(".")[:2]
    return {"major": major, "minor": minor, "gitVersion": f"v{__version__}", "gitCommit": "",
            "gitTreeState": "", "buildDate": "", "goVersion": "",
            "compiler": f"{sys.implementation.name} {sys.version.split()[0]}",
            "platform": f"{sys.platform}/{os.uname().machine if hasattr(os, 'uname') else ''}"}


def root_paths() -> Document:
    return {"paths": ["/apis", "/apis/", f"/apis/{GROUP}", f"/apis/{GROUP_VERSION}", "/healthz", "/livez",
                      "/metrics", "/openapi/v2", "/openapi/v3", "/readyz", "/version"]}


# OpenAPI: kubectl explain finds the resource through a path operation's
# x-kubernetes-group-version-kind object and the schema through its x-kubernetes-group-version-kind list.
_DEF = "com.wujiuye.k8s.v1beta1."
_META = "io.k8s.apimachinery.pkg.apis.meta.v1."
_GVK = {"group": GROUP, "version": VERSION, "kind": KIND}


def _schemas(ref_prefix: str, history: bool = False) -> Document:
    def ref(name: str) -> Document:
        return {"$ref": ref_prefix + name}

    def described_ref(name: str, description: str) -> Document:
        # OpenAPI 3 ignores siblings of $ref; kube-openapi wraps the ref in allOf to keep the description.
        if ref_prefix.startswith("#/components"):
            return {"description": description, "allOf": [ref(name)]}
        return {"description": description, **ref(name)}

    string = {"type": "string"}
    schemas = {
        _DEF + KIND: {
            "description": ("Requests is reqapi's prediction of the CPU and memory requests that the workload "
                            "named by metadata.namespace and metadata.name should get.  It is computed from the "
                            "platform team's ordered rules when asked; the annotation k8s.wujiuye.com/rule "
                            "names the rule that decided ('default' when none matched)."),
            "type": "object",
            "properties": {
                "apiVersion": {**string, "description": (
                    "APIVersion defines the versioned schema of this representation of an object. "
                    "Always k8s.wujiuye.com/v1beta1.")},
                "kind": {**string, "description": (
                    "Kind is a string value representing the REST resource this object represents. Always Requests.")},
                "metadata": described_ref(_META + "ObjectMeta", (
                    "Standard object's metadata: the workload's namespace and name, a uid stable for that "
                    "namespace/name, the resourceVersion of the rules that produced the answer, and the "
                    "annotation k8s.wujiuye.com/rule.")),
                "resources": described_ref(_DEF + "ResourceRequests", (
                    "The requests to set on the workload's containers, in canonical Kubernetes quantities.")),
                **({} if not history else {
                    "containers": {"type": "array", "items": ref(_DEF + "ContainerRequests"), "description": (
                        "Per container, for a workload with several (sidecars included); resources is the "
                        "main container's (see basis.container).")},
                    "basis": described_ref(_DEF + "Basis", (
                        "How the answer was reached from the workload's usage history (with --prometheus-url); "
                        "the annotation k8s.wujiuye.com/source says rules, history or blend."))}),
            },
            "x-kubernetes-group-version-kind": [dict(_GVK)],
        },
        _DEF + "ResourceRequests": {
            "description": "CPU and memory requests in canonical Kubernetes quantities.",
            "type": "object",
            "required": ["cpu", "memory"],
            "properties": {
                "cpu": {**string, "description": (
                    "CPU request in whole millicores, written the Kubernetes way: '500m' is half a core, "
                    "'2' is two cores. Rounded up from the rule's value and clamped into the rules' min/max.")},
                "memory": {**string, "description": (
                    "Memory request rounded up to whole mebibytes and written in the largest binary unit that "
                    "keeps it whole: '512Mi', '3Gi'. Clamped into the rules' min/max.")},
            },
        },
        _DEF + LIST_KIND: {
            "description": "RequestsList is a list of Requests: one per workload that the rules name exactly.",
            "type": "object",
            "required": ["items"],
            "properties": {
                "apiVersion": {**string, "description": "Always k8s.wujiuye.com/v1beta1."},
                "kind": {**string, "description": "Always RequestsList."},
                "metadata": described_ref(_META + "ListMeta", "Standard list metadata."),
                "items": {"type": "array", "description": "The predictions.", "items": ref(_DEF + KIND)},
            },
            "x-kubernetes-group-version-kind": [{"group": GROUP, "version": VERSION, "kind": LIST_KIND}],
        },
        _META + "ObjectMeta": {
            "description": "ObjectMeta is metadata that all persisted resources must have.",
            "type": "object",
            "properties": {
                "name": {**string, "description": "Name of the workload (a DNS-1123 subdomain)."},
                "namespace": {**string, "description": "Namespace of the workload (a DNS-1123 label)."},
                "uid": {**string, "description": "UID derived from namespace and name; the same on every replica."},
                "resourceVersion": {**string, "description": (
                    "An opaque value that changes whenever the rules change; derived from the rules' content.")},
                "creationTimestamp": {**string, "format": "date-time",
                                      "description": "When this prediction was computed (RFC 3339, UTC)."},
                "labels": {"type": "object", "additionalProperties": string,
                           "description": "Map of string keys and values (unused by reqapi)."},
                "annotations": {"type": "object", "additionalProperties": string, "description": (
                    "k8s.wujiuye.com/rule: the id of the rule that decided, or 'default'.")},
            },
        },
        _META + "ListMeta": {
            "description": "ListMeta describes metadata that synthetic resources must have.",
            "type": "object",
            "properties": {
                "resourceVersion": {**string, "description": "Identifies the rules generation of this list."},
                "continue": {**string, "description": "Set when more items are available; pass it as ?continue=."},
                "remainingItemCount": {"type": "integer", "format": "int64",
                                       "description": "Number of items after this page."},
            },
        },
    }
    if history:
        schemas.update(_history_schemas(ref, described_ref))
    return schemas


def _history_schemas(ref: Callable[[str], Document], described_ref: Callable[[str, str], Document]) -> Document:
    """The fields an object has with --prometheus-url, for `kubectl explain` (served only then)."""
    string, number, integer, boolean = ({"type": "string"}, {"type": "number", "format": "double"},
                                        {"type": "integer", "format": "int64"}, {"type": "boolean"})

    def text(kind: Document, description: str) -> Document:
        return {**kind, "description": description}

    resource_basis = {
        "description": "How one resource's answer was reached from the container's usage history.",
        "type": "object",
        "properties": {
            "statistic": text(string, "What was measured, in words (e.g. the p90 over days of the daily p95 "
                                      "of the 2m CPU rate; the max daily working-set peak)."),
            "observed": text(string, "The statistic's value, before the margin."),
            "margin": text(number, "The margin added on top of the statistic (0.05 = 5%)."),
            "history": text(string, "The usage-based value: statistic, margin, CPU-limit raise and OOM bump."),
            "rule": text(string, "The rule's answer."),
            "blended": text(string, "Moved from the rule toward history by the confidence; never below history."),
            "clamped": text(string, "After the rules' min/max: the container's answer."),
            "clampedBy": text(string, "'min' or 'max' when a rules' clamp changed the value."),
            "maxClampBelowUsage": text(boolean, "True when the rules' max is below observed usage: the max wins."),
            "cappedDays": text(integer, "CPU: days on which a CPU limit visibly capped usage (counted at limit x 1.25)."),
            "oomKills": text(integer, "Memory: OOM kills seen in the window."),
            "oomLimit": text(string, "Memory: the limit the container was OOM-killed at (bumped x1.2, at least +100Mi)."),
            "leak": text(boolean, "Memory: the daily peaks grew day after day (flagged, not chased)."),
        },
    }
    container_basis_properties = {
        "source": text(string, "rules, history or blend (history while its confidence grows)."),
        "confidence": text(number, "0 to 1: days of history / 7, how far the answer moved from the rule."),
        "days": text(integer, "Completed UTC days of usage inside the window."),
        "samples": text(integer, "Usage samples behind those days (fewer than 100: the rule answers)."),
        "firstDay": text(string, "The oldest completed day used (YYYY-MM-DD, UTC)."),
        "lastDay": text(string, "The newest completed day used (YYYY-MM-DD, UTC)."),
        "reason": text(string, "Why the rule answered: NoHistory, InsufficientSamples, PinnedToRules, Shadow, "
                               "HistoryPending, HistoryStale."),
        "cpu": described_ref(_DEF + "ResourceBasis", "How the CPU answer was reached."),
        "memory": described_ref(_DEF + "ResourceBasis", "How the memory answer was reached."),
    }
    return {
        _DEF + "ResourceBasis": resource_basis,
        _DEF + "ContainerBasis": {"description": "One container's basis.", "type": "object",
                                  "properties": {"name": text(string, "The container."), **container_basis_properties}},
        _DEF + "Basis": {
            "description": ("How the answer was reached: the history mode, the window, the workload kind, and the "
                            "main container's basis (the other containers' under containers)."),
            "type": "object",
            "properties": {
                "mode": text(string, "on (history answers), shadow (shown, the rule answers) or off (pinned to "
                                     "the rule): the rule's \"history\" or the global --history-mode."),
                "window": text(string, "The history window, in days (e.g. 14d)."),
                "asOf": text(string, "Days before this UTC date are complete and used (YYYY-MM-DD)."),
                "kind": text(string, "The workload kind whose pods' usage was used."),
                "otherKinds": {"type": "array", "items": string, "description": (
                    "Other kinds with the same name in the namespace, not used (Deployment, StatefulSet, "
                    "DaemonSet, CronJob, Job, ReplicaSet, Pod: the first one answers).")},
                "container": text(string, "The main container: named like the workload, else the largest."),
                "hpaScaled": {"type": "array", "items": string, "description": (
                    "Resources an HPA scales the workload on by utilisation (a share of the request): they keep "
                    "the rule's answer, since changing the request would move the HPA.")},
                **container_basis_properties,
                "containers": {"type": "array", "items": ref(_DEF + "ContainerBasis"),
                               "description": "Every container's basis (multi-container workloads)."},
            },
        },
        _DEF + "ContainerRequests": {
            "description": "One container's requests.", "type": "object",
            "properties": {"name": text(string, "The container's name."),
                           "source": text(string, "rules, history or blend."),
                           "resources": described_ref(_DEF + "ResourceRequests", "The container's requests.")},
        },
    }


def _operations(openapi3: bool) -> Document:
    """The paths block: list (cluster-wide and namespaced), get, and the query parameters kubectl uses."""
    def param(name: str, where: str, description: str, kind: str = "string", required: bool = False) -> Document:
        spec = {"name": name, "in": where, "description": description}
        if required:
            spec["required"] = True
        if openapi3:
            spec["schema"] = {"type": kind, "uniqueItems": True}
        else:
            spec["type"] = kind
            spec["uniqueItems"] = True
        return spec

    def response(schema_name: str) -> Document:
        prefix = "#/components/schemas/" if openapi3 else "#/definitions/"
        schema = {"$ref": prefix + schema_name}
        if openapi3:
            return {"200": {"description": "OK", "content": {"application/json": {"schema": schema}}},
                    "401": {"description": "Unauthorized"}}
        return {"200": {"description": "OK", "schema": schema}, "401": {"description": "Unauthorized"}}

    list_params = [
        param("labelSelector", "query", "A selector to restrict the list of returned objects by their labels."),
        param("fieldSelector", "query", "metadata.name=X or metadata.namespace=X (also != and ==)."),
        param("limit", "query", "Maximum number of items to return; use metadata.continue for the rest.", "integer"),
        param("continue", "query", "The continue token of the previous page."),
        param("resourceVersion", "query", "With watch: where to start; 0 or absent sends the current items first."),
        param("timeoutSeconds", "query", "Timeout for the list/watch call.", "integer"),
        param("watch", "query", "Watch for changes and return them as a stream of WatchEvents.", "boolean"),
    ]
    namespace = param("namespace", "path", "object name and auth scope, such as for teams and projects",
                      required=True)
    name = param("name", "path", "name of the Requests (the workload)", required=True)

    def operation(action: str, operation_id: str, schema_name: str, params: list[Document]) -> Document:
        op = {"description": f"{action} {KIND}", "operationId": operation_id, "tags": ["k8sWujiuyeCom_v1beta1"],
              "parameters": params, "responses": response(schema_name),
              "x-kubernetes-action": action, "x-kubernetes-group-version-kind": dict(_GVK)}
        if not openapi3:
            op["produces"] = ["application/json"]
            op["schemes"] = ["https"]
        return op

    base = f"/apis/{GROUP_VERSION}"
    return {
        f"{base}/{RESOURCE}": {"get": operation(
            "list", "listK8sWujiuyeComV1beta1RequestsForAllNamespaces", _DEF + LIST_KIND, list_params)},
        f"{base}/namespaces/{{namespace}}/{RESOURCE}": {"get": operation(
            "list", "listK8sWujiuyeComV1beta1NamespacedRequests", _DEF + LIST_KIND, [namespace] + list_params)},
        f"{base}/namespaces/{{namespace}}/{RESOURCE}/{{name}}": {"get": operation(
            "get", "readK8sWujiuyeComV1beta1NamespacedRequests", _DEF + KIND, [namespace, name])},
    }


def openapi_v3_document(history: bool = False) -> Document:
    return {"openapi": "3.0.0",
            "info": {"title": "reqapi", "version": __version__,
                     "description": "CPU and memory request predictions (k8s.wujiuye.com/v1beta1)."},
            "paths": _operations(openapi3=True),
            "components": {"schemas": _schemas("#/components/schemas/", history)}}


def openapi_v2_document(history: bool = False) -> Document:
    return {"swagger": "2.0",
            "info": {"title": "reqapi", "version": __version__},
            "paths": _operations(openapi3=False),
            "definitions": _schemas("#/definitions/", history)}


def openapi_v3_root(document_hash: str) -> Document:
    # Only our group version: kube-aggregator merges these keys unfiltered into the cluster's root.
    return {"paths": {f"apis/{GROUP_VERSION}": {
        "serverRelativeURL": f"/openapi/v3/apis/{GROUP_VERSION}?hash={document_hash}"}}}


def content_hash(body: bytes) -> str:
    """kube-openapi and the discovery endpoint both use the upper-case hex SHA-512 of the JSON."""
    return hashlib.sha512(body).hexdigest().upper()


class StaticDocument(NamedTuple):
    """A document built once at start-up, encoded, with the ETag of its content."""
    body: bytes
    etag: str
    content_type: str


def static_document(document: Document, content_type: str = JSON) -> StaticDocument:
    body = dumps(document)
    return StaticDocument(body, f'"{content_hash(body)}"', content_type)


def build_static_documents(history: bool = False) -> dict[str, StaticDocument]:
    v3 = static_document(openapi_v3_document(history))
    return {
        "apis:v2": static_document(aggregated_discovery("v2"), DISCOVERY_TYPE.format(version="v2")),
        "apis:v2beta1": static_document(aggregated_discovery("v2beta1"), DISCOVERY_TYPE.format(version="v2beta1")),
        "apis:legacy": static_document(api_group_list()),
        "group": static_document(api_group()),
        "resources": static_document(api_resource_list()),
        "openapi:v2": static_document(openapi_v2_document(history)),
        "openapi:v3": v3,
        "openapi:v3:root": static_document(openapi_v3_root(v3.etag.strip('"'))),
        "version": static_document(version_info()),
        "root": static_document(root_paths()),
    }


# ---------------------------------------------------------------------------
# 4. HTTP messages (pure: bytes in, Request out; Response in, bytes out)
# ---------------------------------------------------------------------------
# A small bytes parser instead of http.client's email-based one: http.server's header parsing
# goes through email.parser and took 57% of the GIL time in a profile; parsing a head here
# costs 7.6 µs against 23.5 µs.  Each response leaves in one write (ResponseEncoder.encode):
# a head and a body in two writes make a keep-alive client's delayed ACK stall every response
# by ~44 ms (Nagle), 340 instead of 7,600 req/s at 16 connections.

MAX_REQUEST_LINE = 8192
# The head is bounded by its size only, never by its number of lines: kube-apiserver forwards one
# X-Remote-Group line per group of the caller (and one X-Remote-Extra-* line per extra value), so a
# user in a few hundred groups sends hundreds of lines, which k8s.io/apiserver backends accept.
MAX_HEAD_BYTES = 65536
MAX_CONTENT_LENGTH_DIGITS = 18     # below 2**63, as Go's ParseInt(s, 10, 64) requires
REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_COMMON_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
_COMMON_HEADERS = frozenset((      # header names as clients spell them, known to be valid tokens
    "Host", "Accept", "User-Agent", "Accept-Encoding", "Authorization", "authorization", "Connection",
    "Content-Type", "Content-Length", "Kubectl-Command", "Kubectl-Session", "Audit-Id", "If-None-Match",
    "X-Remote-User", "X-Remote-Group", "X-Remote-Uid", "X-Forwarded-For", "Cache-Control", "Traceparent"))
# Control characters other than tab, and CR or LF outside a CRLF pair: refused anywhere in a
# request head (as Go does), so nothing can be smuggled into a log line or an echoed header.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")
# What Go's net/http answers a plain-HTTP client on a TLS port, instead of a reset.
PLAIN_HTTP_ON_TLS_PORT = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                          b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
LAST_CHUNK = b"0\r\n\r\n"


@dataclasses.dataclass(slots=True)
class Request:
    """A parsed request head.  Everything a later step needs is decided here, once."""
    method: str
    path: str
    segments: list[str]
    query: dict[str, list[str]]      # name -> [values]
    headers: dict[str, str]          # lower-case name -> value (repeated headers joined with ", ")
    header_items: list[tuple[str, str]]   # [(lower-case name, value)] in order, for multi-valued headers
    version: str = "HTTP/1.1"
    audit_id: str = ""
    keep_alive: bool = True          # False: Connection: close, or HTTP/1.0 without keep-alive
    has_body: bool = False           # a Content-Length above 0, or a Transfer-Encoding
    watch: bool = False              # ?watch= anything but 0/false (see Request.flag), or the /watch/ prefix
    websocket: bool = False          # Upgrade: websocket with Connection: upgrade (a WebSocket watch)
    trusted: bool = False            # the caller authenticated (or authentication is off): set by Api.handle
    params: dict[str, str] = dataclasses.field(default_factory=dict)   # path parameters, set by routing

    def arg(self, name: str, default: str = "") -> str:
        """The first value of a query parameter, as kube-apiserver's query conversion takes it
        (apimachinery's runtime.Convert_Slice_string_To_string)."""
        values = self.query.get(name)
        return values[0] if values else default

    def flag(self, name: str) -> bool:
        """A boolean query parameter, as kube-apiserver converts it: false when absent or when its
        first value is "0" or "false" in any case, true for anything else, even "t" or nothing
        (apimachinery's runtime.Convert_Slice_string_To_bool)."""
        return query_flag(self.query.get(name))


def query_flag(values: Optional[list[str]]) -> bool:
    """See Request.flag."""
    return bool(values) and values[0] != "0" and values[0].lower() != "false"


class Response(NamedTuple):
    code: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()        # extra (name, value) pairs


class WebSocketUpgrade(NamedTuple):
    """An accepted WebSocket handshake: the Sec-WebSocket-Accept value and the one protocol echoed."""
    accept: str
    protocol: str


class WatchStream(NamedTuple):
    content_type: str
    events: Iterator[Optional[bytes]]   # encoded JSON documents; None about once a second meanwhile
    upgrade: Optional[WebSocketUpgrade] = None      # sent as WebSocket frames instead of chunks


class HTTPError(Exception):
    """An error answer: becomes a metav1.Status response.  Build it with a named constructor."""

    def __init__(self, code: int, reason: str, message: str, details: Optional[Document] = None,
                 headers: tuple[tuple[str, str], ...] = (), retry_after: Optional[int] = None):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details, self.headers, self.retry_after = details, headers, retry_after

    def response(self) -> Response:
        headers = self.headers
        if self.retry_after is not None:
            headers = headers + (("Retry-After", str(self.retry_after)),)
        return Response(self.code, dumps(status(self.code, self.reason, self.message, self.details,
                                                self.retry_after)), JSON, headers)

    @classmethod
    def bad_request(cls, message: str) -> "HTTPError":
        return cls(400, "BadRequest", message)

    @classmethod
    def unauthorized(cls, message: str) -> "HTTPError":
        return cls(401, "Unauthorized", message)

    @classmethod
    def forbidden(cls, message: str, details: Document) -> "HTTPError":
        return cls(403, "Forbidden", message, details, (("X-Content-Type-Options", "nosniff"),))

    @classmethod
    def not_found(cls, message: str = "the server could not find the requested resource") -> "HTTPError":
        return cls(404, "NotFound", message, {})

    @classmethod
    def method_not_allowed(cls, message: str) -> "HTTPError":
        return cls(405, "MethodNotAllowed", message, {}, (("Allow", "GET, HEAD"),))

    @classmethod
    def not_acceptable(cls, media_types: str) -> "HTTPError":
        return cls(406, "NotAcceptable", f"only the following media types are accepted: {media_types}")

    @classmethod
    def expired(cls, message: str) -> "HTTPError":
        return cls(410, "Expired", message)

    @classmethod
    def internal(cls, message: str, details: Optional[Document] = None) -> "HTTPError":
        return cls(500, "InternalError", f"Internal error occurred: {message}", details)

    @classmethod
    def unavailable(cls, message: str, retry_after: int) -> "HTTPError":
        return cls(503, "ServiceUnavailable", message, retry_after=retry_after)

    @classmethod
    def too_many_requests(cls, message: str, retry_after: int) -> "HTTPError":
        return cls(429, "TooManyRequests", message, retry_after=retry_after)


class BadRequest(HTTPError):
    """A request head that cannot be parsed: answered, then the connection is closed."""


def parse_head(head: bytes) -> Request:
    """Parse a request head (without the final blank line)."""
    text = head.decode("latin-1")
    # isprintable() is a fast pre-check (it is False for tabs and for any CR/LF left by the
    # split below); the exact rule is the regular expression.
    if not text.replace("\r\n", "").isprintable() and _CONTROL.search(text):
        raise BadRequest(400, "BadRequest", "the request head contains a control character (or a bare CR or "
                         "LF); header lines end with CRLF and values hold no control characters")
    lines = text.split("\r\n")
    request_line = lines[0]
    # The path is bounded by itself; the query only by the head's size, as Go bounds it (long label
    # and field selectors are legitimate: kube-apiserver forwards what its clients send).
    path_end = request_line.find("?")
    if (path_end if path_end >= 0 else len(request_line)) > MAX_REQUEST_LINE:
        raise BadRequest(414, "RequestURITooLong", f"the request line is longer than {MAX_REQUEST_LINE} bytes "
                         f"before its query")
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise BadRequest(400, "BadRequest", f"malformed request line {request_line[:100]!r}: expected "
                         f"'METHOD /path HTTP/1.1'")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise BadRequest(505, "HTTPVersionNotSupported", f"{version[:20]} is not supported; reqapi speaks "
                             f"HTTP/1.1 (negotiated with ALPN)")
        raise BadRequest(400, "BadRequest", f"malformed request line {request_line[:100]!r}")
    if method not in _COMMON_METHODS and not _TOKEN.fullmatch(method):
        raise BadRequest(400, "BadRequest", f"malformed method {method[:20]!r}")
    headers: dict[str, str] = {}
    items: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or (name not in _COMMON_HEADERS and not _TOKEN.fullmatch(name)):
            raise BadRequest(400, "BadRequest", f"malformed header line {line[:100]!r}")
        name = name.lower()
        value = value.strip(" \t")
        if not value.isascii():
            # Values are UTF-8, as kube-apiserver writes identities (张三@example.com) and Go keeps
            # them as bytes; the head was decoded as Latin-1 only to split it.  Bytes that are not
            # UTF-8 become U+FFFD, as Go's JSON encoding of a SubjectAccessReview would make them.
            value = value.encode("latin-1").decode("utf-8", "replace")
        items.append((name, value))
        if name in headers:
            if name in ("content-length", "host", "transfer-encoding"):
                raise BadRequest(400, "BadRequest", f"duplicate {name} header")
            if name != "audit-id":          # the request's Audit-Id is its first, as kube-apiserver reads it
                headers[name] += ", " + value
        else:
            headers[name] = value
    if not target.startswith("/") or not target.isascii():
        if target.startswith(("http://", "https://")) and target.isascii():
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        else:
            raise BadRequest(400, "BadRequest", f"the request target must be an ASCII path starting with '/', "
                             f"not {target[:100]!r}")
    path, _, query_text = target.partition("?")
    path = path.partition("#")[0]
    segments = path.split("/")[1:]
    if segments and segments[-1] == "":
        segments.pop()
    if "%" in path:
        try:
            segments = [urllib.parse.unquote(s, errors="strict") if "%" in s else s for s in segments]
        except UnicodeDecodeError:
            raise BadRequest(400, "BadRequest", "a path segment is not valid UTF-8 after percent-decoding; "
                             "names are DNS-1123 (lower-case ASCII)") from None
    query = urllib.parse.parse_qs(query_text, keep_blank_values=True) if query_text else {}
    return Request(method, path, segments, query, headers, items, version,
                   audit_id=headers.get("audit-id", ""),         # whole, as kube-apiserver keeps it
                   keep_alive=_keep_alive(headers.get("connection", ""), version),
                   has_body=_content_length(headers.get("content-length")) > 0 or "transfer-encoding" in headers,
                   watch=query_flag(query.get("watch")) or segments[3:4] == ["watch"],
                   websocket=headers.get("upgrade", "").lower() == "websocket" and
                   "upgrade" in {token.strip() for token in headers.get("connection", "").lower().split(",")})


def _keep_alive(connection: str, version: str) -> bool:
    """HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes unless told to keep it."""
    connection = connection.lower()
    if "," in connection:                               # e.g. "keep-alive, Upgrade"
        tokens = {token.strip() for token in connection.split(",")}
        connection = "close" if "close" in tokens else "keep-alive" if "keep-alive" in tokens else ""
    return not (connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive"))


def _content_length(text: Optional[str]) -> int:
    """The Content-Length in bytes; refused unless it is 1 to 18 ASCII digits.  (str.isdigit()
    alone accepts "²" and numbers that int() refuses: over 4,300 digits by default.)"""
    if text is None:
        return 0
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_CONTENT_LENGTH_DIGITS):
        raise BadRequest(400, "BadRequest", f"invalid Content-Length {text[:20]!r}: it must be a decimal "
                         f"number of at most {MAX_CONTENT_LENGTH_DIGITS} digits")
    return int(text)


# The answer memo (section 11) keys an answer by the bytes of its request head.  kube-apiserver
# gives every request it forwards a new Audit-Id (a UUID, echoed in the answer), so that one value
# is cut out of the key and put back into the answer.  Only the plain form is cut: a single
# Audit-Id line, spelled as Go's http.Header spells it, whose value is 1-64 letters, digits and
# '-'; any other head is its own key, whole.
_AUDIT_ID_LINE = b"\r\nAudit-Id: "
_AUDIT_ID_VALUE = re.compile(rb"[0-9A-Za-z-]{1,64}")


def head_without_audit_id(head: bytes) -> tuple[bytes, Optional[str]]:
    """(the head without its Audit-Id line, the Audit-Id), or (the head, None) when it has none
    in the plain form."""
    start = head.find(_AUDIT_ID_LINE)
    if start < 0:
        return head, None
    end = head.find(b"\r\n", start + len(_AUDIT_ID_LINE))
    if end < 0:
        end = len(head)
    value = head[start + len(_AUDIT_ID_LINE):end]
    if not _AUDIT_ID_VALUE.fullmatch(value) or head.lower().count(b"audit-id") != 1:
        return head, None
    return head[:start] + head[end:], value.decode("ascii")


# WebSocket watches, as k8s.io/apiserver serves them. It answers a watch that asks for
# `Upgrade: websocket` through golang.org/x/net/websocket's Handler: GET only, a
# Sec-WebSocket-Key and Sec-WebSocket-Version 13 (else 400, naming version 13), an Origin header
# (its handshake check refuses a "null origin" with 403), at most one offered
# Sec-WebSocket-Protocol, echoed back (several are refused).  Then each watch event travels as one
# unmasked text frame holding the event's JSON (the JSON serializer "encodes as text"; the
# base64.binary.k8s.io protocol name changes nothing for a watch), the server reads what the
# client sends only to notice a close, and ends with a close frame (1000) when the watch ends.
# Through kube-apiserver this is the only answer that works: its proxy turns anything but a
# 101 (or an error of 400 or more) into "503 invalid upgrade response".
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"      # RFC 6455 section 1.3
WS_TEXT, WS_CLOSE, WS_PING, WS_PONG = 0x1, 0x8, 0x9, 0xA
WS_NORMAL_CLOSURE = 1000


def websocket_upgrade(request: Request) -> WebSocketUpgrade:
    """Check a WebSocket watch's handshake as golang.org/x/net/websocket does; HTTPError if refused."""
    headers = request.headers
    if request.method != "GET":
        raise HTTPError.method_not_allowed(f"a WebSocket watch is a GET, not {request.method}")
    key = headers.get("sec-websocket-key", "").strip()
    if not key:
        raise HTTPError.bad_request("a WebSocket watch needs a Sec-WebSocket-Key header (RFC 6455)")
    if headers.get("sec-websocket-version", "").strip() != "13":
        raise HTTPError(400, "BadRequest", "unsupported Sec-WebSocket-Version: reqapi speaks version 13 "
                        "(RFC 6455)", headers=(("Sec-WebSocket-Version", "13"),))
    if not headers.get("origin", "").strip():
        raise HTTPError.forbidden("a WebSocket watch needs an Origin header (Kubernetes API servers refuse a "
                                  "WebSocket handshake without one); browsers send it, other clients must "
                                  "set it", {})
    offered = [name.strip() for name in headers.get("sec-websocket-protocol", "").split(",") if name.strip()]
    if len(offered) > 1:
        raise HTTPError.bad_request(f"offer one Sec-WebSocket-Protocol, not {len(offered)} "
                                    f"({', '.join(offered)[:200]}), as Kubernetes API servers require")
    accept = base64.b64encode(hashlib.sha1(key.encode() + WEBSOCKET_GUID).digest()).decode()   # the bytes sent
    return WebSocketUpgrade(accept, offered[0] if offered else "")


def websocket_unmask(payload: bytes, mask: bytes) -> bytes:
    """The payload XOR the 4-byte mask repeated (RFC 6455 section 5.3), as one big-integer XOR:
    a loop over the bytes took ~5 ms of the loop's time for a 60 KB frame."""
    size = len(payload)
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


def websocket_client_frames(buffer: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The complete frames at the front of what a WebSocket client sent, [(opcode, unmasked
    payload)], and the bytes left over (a frame not complete yet)."""
    frames: list[tuple[int, bytes]] = []
    position = 0
    while len(buffer) - position >= 2:
        first, second = buffer[position], buffer[position + 1]
        size, offset = second & 0x7F, position + 2
        if size >= 126:
            width = 2 if size == 126 else 8
            if len(buffer) - offset < width:
                break
            size, offset = int.from_bytes(buffer[offset:offset + width], "big"), offset + width
        mask = b""
        if second & 0x80:                     # clients always mask (RFC 6455 section 5.3)
            if len(buffer) - offset < 4:
                break
            mask, offset = buffer[offset:offset + 4], offset + 4
        if len(buffer) - offset < size:
            break
        payload = buffer[offset:offset + size]
        if mask:
            payload = websocket_unmask(payload, mask)
        frames.append((first & 0x0F, payload))
        position = offset + size
    return frames, buffer[position:]


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(seconds: float) -> str:
    """An HTTP date (RFC 9110's IMF-fixdate: "Wed, 02 Dec 2026 03:00:00 GMT"), in English
    whatever the locale, as email.utils.formatdate(usegmt=True) writes it."""
    t = time.gmtime(seconds)
    return (f"{_WEEKDAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


class ResponseEncoder:
    """The one place response bytes are made: status line, headers and body, in the order the
    server has always sent them.  It owns the Date header, formatted once a second.

    Heads are encoded as UTF-8: the values a request's headers bring back (its Audit-Id, the
    Sec-WebSocket-Protocol it offered) leave as the bytes the client sent, since parse_head read
    them as UTF-8 (bytes that were not UTF-8 come back as U+FFFD).  Everything else in a head is
    ASCII."""

    def __init__(self) -> None:
        self._date_second = -1
        self._date = ""

    def http_date(self) -> str:
        second = int(time.time())
        if second != self._date_second:
            self._date, self._date_second = http_date(second), second
        return self._date

    def encode(self, response: Response, close: bool, method: str, audit_id: str = "") -> bytes:
        """A whole response, to be sent with one write.  A HEAD and a 304 carry no body."""
        body = b"" if method == "HEAD" or response.code == 304 else response.body
        extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
        if response.code != 304:
            extra = f"Content-Length: {len(response.body)}\r\n{extra}"
        if audit_id:
            extra += f"Audit-Id: {audit_id}\r\n"
        if close:
            extra += "Connection: close\r\n"
        return self.head(response.code, response.content_type, extra) + body

    def reusable(self, response: Response, method: str) -> tuple[bytes, bytes]:
        """A keep-alive answer in two parts, for the answer memo: its head without the closing
        blank line (where each reuse adds its own Audit-Id, as encode() would) and its body."""
        whole = self.encode(response, False, method)
        body = b"" if method == "HEAD" or response.code == 304 else response.body
        return whole[:len(whole) - len(body) - 2], body

    @staticmethod
    def reuse(head: bytes, body: bytes, audit_id: str) -> bytes:
        """An answer from the memo's two parts: the same bytes encode() makes for `audit_id`."""
        if audit_id:
            return b"%sAudit-Id: %s\r\n\r\n%s" % (head, audit_id.encode(), body)
        return b"%s\r\n%s" % (head, body)

    def watch_head(self, content_type: str, audit_id: str) -> bytes:
        """The head of a chunked watch response; the events follow as chunks."""
        return self.head(200, content_type, "Cache-Control: no-cache, private\r\nTransfer-Encoding: chunked\r\n"
                         + (f"Audit-Id: {audit_id}\r\n" if audit_id else ""))

    def head(self, code: int, content_type: str, fields: str) -> bytes:
        """A response head: the status line, Date, Content-Type, then `fields` (CRLF-terminated lines)."""
        return (f"HTTP/1.1 {code} {REASONS.get(code, 'Unknown')}\r\nDate: {self.http_date()}\r\n"
                f"Content-Type: {content_type}\r\n{fields}\r\n").encode()

    @staticmethod
    def chunk(event: bytes) -> bytes:
        """One watch event as one chunk of newline-delimited JSON."""
        line = event + b"\n"
        return b"%x\r\n%s\r\n" % (len(line), line)

    @staticmethod
    def websocket_head(upgrade: WebSocketUpgrade) -> bytes:
        """The 101 answer to a WebSocket handshake, with the fields golang.org/x/net/websocket sends."""
        protocol = f"Sec-WebSocket-Protocol: {upgrade.protocol}\r\n" if upgrade.protocol else ""
        return (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {upgrade.accept}\r\n{protocol}\r\n").encode()

    @staticmethod
    def websocket_frame(payload: bytes, opcode: int = WS_TEXT) -> bytes:
        """One final, unmasked frame from the server (RFC 6455 section 5.2)."""
        size = len(payload)
        if size < 126:
            return bytes((0x80 | opcode, size)) + payload
        if size < 65536:
            return bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big") + payload
        return bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big") + payload


# ---------------------------------------------------------------------------
# 5. Request options (pure: what the client asked for, validated once)
# ---------------------------------------------------------------------------
# Names from the path, the media type from the Accept header, and the typed options of a get,
# a list or a watch, built from the query once and refused with a 400 (406 for Accept) that
# says what a valid value looks like.  Storage and endpoints take these objects, never the
# raw query.

ACCEPTED_TYPES = f"{JSON}, {TABLE_TYPE.format(version='v1')}, {TABLE_TYPE.format(version='v1beta1')}"
INCLUDE_OBJECT_CHOICES = ("None", "Metadata", "Object")      # ?includeObject= of a Table


def checked_namespace(segment: str) -> str:
    problem = namespace_problem(segment)
    if problem:
        raise invalid_namespace(segment, problem)
    return segment


def checked_workload(namespace: str, name: str) -> tuple[str, str]:
    """The namespace and name of one object's path, or a 400 for the first that is not valid."""
    namespace_error, name_error = workload_problems(namespace, name)
    if namespace_error:
        raise invalid_namespace(namespace, namespace_error)
    if name_error:
        raise HTTPError.bad_request(f"Name parameter invalid: {name!r}: {_segment_problem(name) or name_error}; "
                                    f"workload names are DNS-1123 subdomains, e.g. 'checkout' or 'web.v2'")
    return namespace, name


def invalid_namespace(segment: str, problem: str) -> HTTPError:
    return HTTPError.bad_request(f"namespace {segment!r} is not valid: {_segment_problem(segment) or problem}; "
                                 f"namespaces are DNS-1123 labels, e.g. 'default' or 'shop-prod'")


def _segment_problem(segment: str) -> Optional[str]:
    # For the usual path tricks (dot segments, an encoded '/' or '%', a NUL) a plainer reason
    # than the DNS-1123 regular expression that they also fail.
    if segment in (".", ".."):
        return f"may not be '{segment}'"
    for char, label in (("/", "'/'"), ("%", "'%'"), ("\x00", "a NUL byte")):
        if char in segment:
            return f"may not contain {label}"
    return None


# The Accept header

class MediaRange(NamedTuple):
    mime: str
    params: dict[str, str]
    quality: float


def parse_accept(header: str) -> list[MediaRange]:
    """Media ranges of an Accept header, best first (stable for equal q, as Go's negotiation is)."""
    ranges = []
    for part in header.split(","):
        pieces = part.split(";")
        mime = pieces[0].strip().lower()
        if not mime:
            continue
        params, quality = {}, 1.0
        for piece in pieces[1:]:
            key, _, value = piece.partition("=")
            key, value = key.strip().lower(), value.strip().strip('"')
            if key == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
            elif key:
                params[key] = value
        if quality > 0:
            ranges.append(MediaRange(mime, params, quality))
    ranges.sort(key=lambda r: -r.quality)
    return ranges


def _json_range(media: MediaRange) -> bool:
    return media.mime in (JSON, "application/*", "*/*")


class Output(NamedTuple):
    """The representation a resource endpoint answers with: plain JSON, a meta.k8s.io Table, or
    the metadata alone (PartialObjectMetadata, ...List for a list)."""
    table_version: str = ""      # "" = not a Table; else "v1" or "v1beta1"
    include_object: str = ""     # tables only: None, Metadata or Object (?includeObject=)
    content_type: str = JSON
    partial_version: str = ""    # "" = not metadata alone; else "v1" or "v1beta1"


JSON_OUTPUT = Output()


def negotiate_object(request: Request, partial_kind: str = "PartialObjectMetadata") -> Output:
    """Plain JSON, a Table or the metadata alone (v1 or v1beta1) for resource endpoints, by the
    Accept header; 406 otherwise.  partial_kind is the metadata kind this request may get: a list
    gets PartialObjectMetadataList, an object or a watch's events PartialObjectMetadata; a media
    range asking for the other one is passed over, as k8s.io/apiserver does."""
    accept = request.headers.get("accept", "")
    if not accept or accept == JSON:       # the common cases, without parsing (1.5 µs of a GET's ~16)
        return JSON_OUTPUT
    for media in parse_accept(accept):
        if not _json_range(media):
            continue
        as_kind = media.params.get("as")
        if as_kind is None:
            return JSON_OUTPUT
        if media.params.get("g") != "meta.k8s.io" or media.params.get("v") not in ("v1", "v1beta1"):
            continue
        version = media.params["v"]
        if as_kind == "Table":
            return Output(version, include_object_of(request), TABLE_TYPE.format(version=version))
        if as_kind == partial_kind:
            return Output(content_type=f"{JSON};as={as_kind};g=meta.k8s.io;v={version}", partial_version=version)
    raise HTTPError.not_acceptable(f"{ACCEPTED_TYPES}, {JSON};as={partial_kind};g=meta.k8s.io;v=v1, "
                                   f"{JSON};as={partial_kind};g=meta.k8s.io;v=v1beta1")


def include_object_of(request: Request) -> str:
    include = request.arg("includeObject", "Metadata") or "Metadata"
    if include not in INCLUDE_OBJECT_CHOICES:
        raise HTTPError.bad_request(f"includeObject must be one of None, Metadata or Object, not {include!r}")
    return include


def negotiate_plain_json(request: Request) -> None:
    accept = request.headers.get("accept", "")
    if accept and not any(_json_range(m) and "as" not in m.params for m in parse_accept(accept)):
        raise HTTPError.not_acceptable(JSON)


def negotiate_discovery(request: Request) -> str:
    """"v2", "v2beta1" (aggregated discovery) or "" (legacy APIGroupList), by the client's offer."""
    accept = request.headers.get("accept", "")
    if not accept:
        return ""
    for media in parse_accept(accept):
        if not _json_range(media):
            continue
        if media.params.get("g") == "apidiscovery.k8s.io" and media.params.get("as") == "APIGroupDiscoveryList":
            if media.params.get("v") in ("v2", "v2beta1"):
                return media.params["v"]
            continue
        if "as" not in media.params:
            return ""
    raise HTTPError.not_acceptable(f"{DISCOVERY_TYPE.format(version='v2')}, "
                                   f"{DISCOVERY_TYPE.format(version='v2beta1')}, {JSON}")


# Selectors: kube-apiserver's label selector grammar, and the two field selectors this resource has.

class SelectorError(ValueError):
    """A label or field selector reqapi cannot evaluate."""


class Requirement(NamedTuple):
    key: str
    operator: str          # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...]


_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_SET_REQUIREMENT = re.compile(r"\s*(\S+?)\s+(in|notin)\s*\(([^()]*)\)\s*")


def _split_selector(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_label_selector(text: str) -> tuple[Requirement, ...]:
    """Parse `a=b,c!=d,e in (f,g),h notin (i),j,!k` as kube-apiserver does."""
    requirements = []
    if not text.strip():
        return ()
    for part in _split_selector(text):
        part = part.strip()
        set_match = _SET_REQUIREMENT.fullmatch(part)
        if set_match:
            key, operator, values = set_match.group(1), set_match.group(2), set_match.group(3)
            values = tuple(v.strip() for v in values.split(",")) if values.strip() else ()
        elif part.startswith("!"):
            key, operator, values = part[1:].strip(), "!", ()
        else:
            for symbol in ("!=", "==", "="):
                if symbol in part:
                    key, value = part.split(symbol, 1)
                    key, operator, values = key.strip(), "!=" if symbol == "!=" else "=", (value.strip(),)
                    break
            else:
                key, operator, values = part, "exists", ()
        if not key or not _LABEL_KEY.fullmatch(key):
            raise SelectorError(f"unable to parse requirement: invalid label key {key!r} in labelSelector "
                                f"{text!r}; use key=value, key!=value, key in (a,b), key notin (a,b), key or !key")
        for value in values:
            if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
                raise SelectorError(f"unable to parse requirement: invalid label value {value!r} in labelSelector "
                                    f"{text!r}; values are at most 63 characters of [A-Za-z0-9-_.]")
        if operator in ("in", "notin") and not values:
            raise SelectorError(f"unable to parse requirement: for 'in', 'notin' operators, values set can't be "
                                f"empty in labelSelector {text!r}")
        requirements.append(Requirement(key, operator, values))
    return tuple(requirements)


def labels_match(requirements: tuple[Requirement, ...], labels: dict[str, str]) -> bool:
    for req in requirements:
        present = req.key in labels
        value = labels.get(req.key)
        if req.operator == "exists" and not present:
            return False
        if req.operator == "!" and present:
            return False
        if req.operator in ("=", "in") and value not in req.values:
            return False
        if req.operator in ("!=", "notin") and present and value in req.values:
            return False
    return True


FIELD_SELECTOR_FIELDS = ("metadata.name", "metadata.namespace")


def parse_field_selector(text: str) -> tuple[Requirement, ...]:
    """Field selectors of this resource: metadata.name and metadata.namespace with =, == or !=."""
    requirements = []
    if not text.strip():
        return ()
    for part in text.split(","):
        for symbol in ("!=", "==", "="):
            if symbol in part:
                field, value = part.split(symbol, 1)
                field = field.strip()
                break
        else:
            raise SelectorError(f"invalid field selector {part!r}: expected FIELD=VALUE or FIELD!=VALUE, "
                                f"e.g. fieldSelector=metadata.name=checkout")
        if field not in FIELD_SELECTOR_FIELDS:
            raise SelectorError(f"field label not supported: {field}; {RESOURCE} can be selected by "
                                f"metadata.name and metadata.namespace only")
        requirements.append(Requirement(field, "!=" if symbol == "!=" else "=", (value.strip(),)))
    return tuple(requirements)


def fields_match(requirements: tuple[Requirement, ...], namespace: str, name: str) -> bool:
    for req in requirements:
        actual = name if req.key == "metadata.name" else namespace
        if (actual == req.values[0]) != (req.operator == "="):
            return False
    return True


def exact_field(requirements: tuple[Requirement, ...], field: str) -> Optional[str]:
    """The value a field selector pins a field to with '=', if any."""
    for req in requirements:
        if req.key == field and req.operator == "=":
            return req.values[0]
    return None


def encode_continue(resource_version: str, after: tuple[str, str]) -> str:
    token = json.dumps({"rv": resource_version, "start": list(after)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def decode_continue(token: str) -> tuple[str, tuple[str, str]]:
    if len(token) > 4096:
        raise SelectorError("continue key is not valid: too long; pass metadata.continue of the previous page "
                            "unchanged, or start again without continue")
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        namespace, name = data["start"]
        return str(data["rv"]), (str(namespace), str(name))
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeError, RecursionError) as error:
        raise SelectorError(f"continue key is not valid: {type(error).__name__}; pass metadata.continue of the previous "
                            f"page unchanged, or start again without continue") from None


# Typed options of a get, a list and a watch

class ObjectOptions(NamedTuple):
    """A GET of one object: its validated namespace and name, and the representation asked for."""
    namespace: str
    name: str
    output: Output


class ListOptions(NamedTuple):
    """A list or a watch of the collection, validated once (see list_options)."""
    namespace: Optional[str]                 # None: all namespaces
    fields: tuple[Requirement, ...]          # ?fieldSelector=
    labels: tuple[Requirement, ...]          # ?labelSelector=
    output: Output
    watch: bool = False
    # lists
    limit: Optional[int] = None              # ?limit= (0 or absent: everything)
    continue_version: str = ""               # resourceVersion of the ?continue= token...
    continue_after: Optional[tuple[str, str]] = None   # ...and the last (namespace, name) it returned
    exact_version: str = ""                  # ?resourceVersion=X&resourceVersionMatch=Exact
    # watches
    resource_version: str = ""               # ?resourceVersion=: where the watch starts ("" or "0": now)
    timeout_seconds: Optional[int] = None    # ?timeoutSeconds=
    send_initial_events: bool = False        # ?sendInitialEvents=true
    allow_bookmarks: bool = False            # ?allowWatchBookmarks=true


def count_argument(request: Request, name: str) -> Optional[int]:
    """A non-negative integer query parameter, or None when absent."""
    text = request.arg(name)
    if not text:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 12):
        raise HTTPError.bad_request(f"{name} must be a non-negative integer (at most 12 digits), not {text[:40]!r}")
    return int(text)


def object_options(request: Request) -> Union[ObjectOptions, ListOptions]:
    """A GET of /namespaces/{namespace}/requests/{name}: ObjectOptions, or the ListOptions of the
    deprecated watch of one object by name (the same as a field-selected collection watch)."""
    namespace, name = checked_workload(request.params["namespace"], request.params["name"])
    if request.watch:
        return _watch_options(request, namespace, (Requirement("metadata.name", "=", (name,)),), ())
    return ObjectOptions(namespace, name, negotiate_object(request))


def list_option_problems(request: Request) -> list[tuple[str, str, str]]:
    """What kube-apiserver's ValidateListOptions refuses in a list's options (not a watch's):
    (field, cause reason, the error's text after its field), in its order."""
    problems = []
    forbidden = "FieldValueForbidden"
    match, version = request.arg("resourceVersionMatch"), request.arg("resourceVersion")
    if match:
        if not version:
            problems.append(("resourceVersionMatch", forbidden,
                             "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided"))
        if request.arg("continue"):
            problems.append(("resourceVersionMatch", forbidden,
                             "Forbidden: resourceVersionMatch is forbidden when continue is provided"))
        if match not in ("Exact", "NotOlderThan"):
            problems.append(("resourceVersionMatch", "FieldValueNotSupported",
                             f'Unsupported value: {json.dumps(match, ensure_ascii=False)}: supported values: '
                             f'"Exact", "NotOlderThan", ""'))
        if match == "Exact" and version == "0":
            problems.append(("resourceVersionMatch", forbidden,
                             'Forbidden: resourceVersionMatch "exact" is forbidden for resourceVersion "0"'))
    if "sendInitialEvents" in request.query:
        problems.append(("sendInitialEvents", forbidden, "Forbidden: sendInitialEvents is forbidden for list"))
    return problems


def invalid_list_options(problems: list[tuple[str, str, str]]) -> HTTPError:
    """422 Invalid, worded and detailed as kube-apiserver's errors.NewInvalid for ListOptions."""
    texts = [f"{field}: {text}" for field, _, text in problems]
    listed = texts[0] if len(texts) == 1 else f"[{', '.join(texts)}]"
    return HTTPError(422, "Invalid", f'ListOptions.meta.k8s.io "" is invalid: {listed}',
                     {"group": "meta.k8s.io", "kind": "ListOptions",
                      "causes": [{"reason": reason, "message": text, "field": field}
                                 for field, reason, text in problems]})


def list_options(request: Request) -> ListOptions:
    """A GET of the collection, in a namespace or in all: its selectors, then list or watch options."""
    namespace = checked_namespace(request.params["namespace"]) if "namespace" in request.params else None
    try:
        fields = parse_field_selector(request.arg("fieldSelector"))
        labels = parse_label_selector(request.arg("labelSelector"))
    except SelectorError as error:
        raise HTTPError.bad_request(str(error)) from None
    if request.watch:
        return _watch_options(request, namespace, fields, labels)
    problems = list_option_problems(request)
    if problems:
        raise invalid_list_options(problems)
    output = negotiate_object(request, "PartialObjectMetadataList")
    continue_version, after = "", None
    exact_version = ""
    token = request.arg("continue")
    if token:
        try:
            continue_version, after = decode_continue(token)
        except SelectorError as error:
            raise HTTPError.bad_request(str(error)) from None
    elif request.arg("resourceVersionMatch") == "Exact" and request.arg("resourceVersion") not in ("", "0"):
        exact_version = request.arg("resourceVersion")
    return ListOptions(namespace, fields, labels, output, limit=count_argument(request, "limit"),
                       continue_version=continue_version, continue_after=after, exact_version=exact_version)


def _watch_options(request: Request, namespace: Optional[str], fields: tuple[Requirement, ...],
                   labels: tuple[Requirement, ...]) -> ListOptions:
    output = negotiate_object(request)
    return ListOptions(namespace, fields, labels, output, watch=True,
                       resource_version=request.arg("resourceVersion"),
                       timeout_seconds=count_argument(request, "timeoutSeconds"),
                       send_initial_events=request.flag("sendInitialEvents"),
                       allow_bookmarks=request.flag("allowWatchBookmarks"))


# ---------------------------------------------------------------------------
# 6. Storage (state, no I/O): the rules history and the requests storage
# ---------------------------------------------------------------------------
# Shaped like metrics-server's storage: get, list and watch over objects that are computed
# when asked, never stored.  A Generation is one loaded set of rules; RulesHistory keeps the
# last ones (a continue token or a watch may name an older resourceVersion) and is the one
# owner of "the rules changed", a condition that watches wait on.

# The memo of predictions is bounded by bytes, not entries: 200,000 distinct 250-character names
# reached 124 MB under an entry bound.  An entry keeps its key (a tuple of the request's two
# strings) and a slot of the dict: measured with tracemalloc, 190 bytes beyond the two names'
# characters (the Prediction is the rules' own).  At PREDICTION_MEMO_BYTES it is emptied: at most
# 4 MiB, ~19,000 names of 20 characters.
PREDICTION_MEMO_BYTES = 4 * 1024 * 1024
PREDICTION_ENTRY_BYTES = 190
# A rules generation that no longer serves keeps what continue tokens and watch resumption need:
# its named workloads' predictions, and its rules without lanes (for the one workload a field
# selector pins); measured 320-420 bytes a rule plus ~1 a character of its id and globs.
RETIRED_RULE_BYTES = 450
RETIRED_CHAR_BYTES = 1
# With history its named workloads are every workload with history, each with its explanation:
# 4.6 MiB for 2,000 two-container workloads (RulesHistory.HISTORY_LENGTH's measurement), an upper
# figure for a memoised answer too (one without usage data explains less).
HISTORY_NAMED_BYTES = 2400
SELECTION_MEMO_LIMIT = 16   # namespaces whose unfiltered selection a generation keeps (each at most all items)
CHANGES_MEMO_LIMIT = 16     # (from, to, namespace) differences the storage keeps for watches


def remember(memo: dict[Any, Any], key: Any, value: Any, limit: int) -> Any:
    """Store in a memo that is emptied when full: a bound on memory, with no bookkeeping per hit."""
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value
    return value


class Generation:
    """One loaded set of rules and what follows from it.  Immutable once built, except for its
    memos (pure functions of the rules, so safe to share between threads) and retire(), which
    RulesHistory calls when newer rules serve."""

    def __init__(self, rules: Rules, history: Optional[HistorySnapshot] = None):
        self.rules = rules
        self.resource_version = resource_version_of(rules.digest)
        self.named: dict[tuple[str, str], Prediction] = {
            (ns, name): rules.predict(ns, name) for ns, name in named_workloads(rules)}
        self.memory = rules.memory           # estimated bytes it keeps: the rules' estimate, then retire()'s
        self.retired = False
        self._predictions: dict[tuple[str, str], Prediction] = {}
        self._predictions_bytes = 0          # approximate under races: a bound, not an account
        self._selections: dict[Optional[str], dict[tuple[str, str], Prediction]] = {}
        # With --prometheus-url: the history snapshot answers with the rules, the resourceVersion
        # covers both, and lists hold every workload with history too (bounded by the refresher's
        # HISTORY_MAX_SERIES).  Built here, in the thread that installs, never on a GET.
        self.history = history
        self._modes = {rule.id: rule.history for rule in rules.rules if rule.history}
        if history is not None:
            self.resource_version = resource_version_of(combined_digest(rules.digest, history))
            self.named = {key: self._predict(*key) for key in sorted(set(self.named) |
                                                                      set(history_workloads(history)))}

    def _predict(self, namespace: str, name: str) -> Prediction:
        return predict_with_history(self.rules, self._modes, self.history, namespace, name)

    def prediction(self, namespace: str, name: str) -> Prediction:
        key = (namespace, name)
        found = self._predictions.get(key)
        if found is None:
            found = (self.rules.predict(namespace, name) if self.history is None
                     else self._predict(namespace, name))
            if not self.retired:
                # (With history an answer is its own, explanation included, not one of the rules'.)
                size = PREDICTION_ENTRY_BYTES + len(namespace) + len(name) + (
                    0 if self.history is None else HISTORY_NAMED_BYTES)
                if self._predictions_bytes + size > PREDICTION_MEMO_BYTES:
                    self._predictions, self._predictions_bytes = {}, 0
                self._predictions[key] = found
                self._predictions_bytes += size
        return found

    def retire(self) -> None:
        """Newer rules serve: keep what a continue token or a resumed watch needs of this generation
        (its named workloads, and its rules without their compiled lanes, for a pinned name) and
        drop the rest.  Its answers stay the same; a pinned name not among the named ones costs a
        scan of the rules (glob_match), not a lane lookup, and nothing is memoised any more."""
        self.retired = True
        self.rules = self.rules.without_lanes()
        self._predictions, self._predictions_bytes = {}, 0
        self._selections = {}
        characters = sum(len(rule.id) + len(rule.namespace) + len(rule.name) for rule in self.rules.rules)
        self.memory = len(self.rules.rules) * RETIRED_RULE_BYTES + characters * RETIRED_CHAR_BYTES
        if self.history is not None:
            self.memory += len(self.named) * HISTORY_NAMED_BYTES

    def select(self, namespace: Optional[str], fields: tuple[Requirement, ...],
               labels: tuple[Requirement, ...]) -> dict[tuple[str, str], Prediction]:
        """The items a list or watch holds: the workloads the rules name exactly, filtered by
        namespace and selectors; plus the one workload a field selector pins by namespace and name
        (every valid name has a prediction, so `kubectl get requests NAME --watch` works for any NAME).
        Without selectors the answer is memoised per namespace: 500 watches resuming after a change
        of 10,000 named workloads select once, not 500 times.  (The dict is shared: read it only.)"""
        if fields or labels or self.retired:
            return self._select(namespace, fields, labels)
        found = self._selections.get(namespace)
        if found is None:
            found = remember(self._selections, namespace, self._select(namespace, (), ()), SELECTION_MEMO_LIMIT)
        return found

    def _select(self, namespace: Optional[str], fields: tuple[Requirement, ...],
                labels: tuple[Requirement, ...]) -> dict[tuple[str, str], Prediction]:
        if not labels_match(labels, {}):
            return {}
        items = {key: prediction for key, prediction in self.named.items()
                 if (namespace is None or key[0] == namespace) and fields_match(fields, key[0], key[1])}
        pinned_name = exact_field(fields, "metadata.name")
        pinned_namespace = namespace or exact_field(fields, "metadata.namespace")
        if pinned_name and pinned_namespace and workload_problems(pinned_namespace, pinned_name) == (None, None) \
                and fields_match(fields, pinned_namespace, pinned_name):
            items[(pinned_namespace, pinned_name)] = self.prediction(pinned_namespace, pinned_name)
        return items


class RulesHistory:
    """The current Generation and the last ones, by resourceVersion; the one owner of the
    condition that wakes watches when the rules change or the server drains."""

    LENGTH = 64      # generations remembered for watch resumption and continue tokens
    # With history, a generation holds a prediction per workload with history (measured with
    # tracemalloc: 4.6 MiB at 2,000 two-container workloads, 21.5 MiB at 10,000), so only this
    # many are remembered; a watch or continue token from an older one gets 410 Expired and relists.
    HISTORY_LENGTH = 3
    # ...and at most this many estimated bytes of past generations, besides the current one (each
    # retired: see Generation.retire).  A reload under traffic added 88 MB when past generations kept
    # their memos and lanes; now the past generations of a 10,000-rule file keep at most 8 MiB (one
    # of them, at ~4.8 MB each), of a 100-rule file all 63 (~48 KB each, 3 MB).
    MAX_BYTES = 8 * 1024 * 1024

    def __init__(self, rules: Rules = DEFAULT_RULES, history: Optional[HistorySnapshot] = None):
        self._changed = threading.Condition()
        self.current = Generation(rules, history)  # read freely; replaced only by install()
        self.history_configured = history is not None     # --prometheus-url: set once, here
        # The reloader installs rules and the history refresher snapshots, each from its thread:
        # one at a time, so neither builds on a generation the other is replacing.
        self._installing = threading.Lock()
        self._history: OrderedDict[str, Generation] = OrderedDict([(self.current.resource_version, self.current)])
        self.closed = False                       # set only by close(): no more changes, watches end

    def install(self, rules: Rules) -> bool:
        """Serve new rules from the next request on; wake watches.  False if nothing changed."""
        with self._installing:
            if rules.digest == self.current.rules.digest and rules.source == self.current.rules.source:
                return False
            return self._publish(Generation(rules, self.current.history))

    def install_history(self, snapshot: HistorySnapshot) -> bool:
        """Serve a new history snapshot with the current rules; wake watches.  False if nothing
        changed (a refresh that found no new completed day), so a watch sees MODIFIED at most
        once a day in steady state."""
        with self._installing:
            current = self.current
            if current.history is not None and current.history.digest == snapshot.digest:
                return False
            return self._publish(Generation(current.rules, snapshot))

    def _publish(self, generation: Generation) -> bool:
        with self._changed:
            previous = self.current
            self._history[generation.resource_version] = generation
            self._history.move_to_end(generation.resource_version)
            self.current = generation
            self._changed.notify_all()
        previous.retire()
        self._forget_beyond_bounds()
        return True

    def _forget_beyond_bounds(self) -> None:
        """Forget the oldest generations while more than LENGTH (HISTORY_LENGTH with history) are
        kept or the past ones are estimated above MAX_BYTES (the current one, the newest, stays)."""
        with self._changed:
            length = self.LENGTH if self.current.history is None else self.HISTORY_LENGTH
            past = sum(generation.memory for generation in self._history.values() if generation is not self.current)
            while len(self._history) > 1 and (len(self._history) > length or past > self.MAX_BYTES):
                _, oldest = self._history.popitem(last=False)
                past -= oldest.memory

    def at(self, resource_version: str) -> Optional[Generation]:
        with self._changed:
            return self._history.get(resource_version)

    def wait_for_change(self, seen: Generation, timeout: float) -> Optional[Generation]:
        """Block until the rules change, the history closes, or the timeout passes."""
        with self._changed:
            self._changed.wait_for(lambda: self.current is not seen or self.closed, timeout)
            if self.closed or self.current is seen:
                return None
            return self.current

    def close(self) -> None:
        """The server drains: wake every watch so that it ends."""
        with self._changed:
            self.closed = True
            self._changed.notify_all()


class Change(NamedTuple):
    """One event of a watch, before it is encoded: ADDED, MODIFIED, DELETED, BOOKMARK
    (INITIAL_END: the end of sendInitialEvents) or EXPIRED (the start is unknown here)."""
    type: str
    key: tuple[str, str]
    prediction: Optional[Prediction]
    resource_version: str


class Page(NamedTuple):
    """One page of a list: the generation it comes from, its (key, prediction) items in key order,
    and, when more follow, the continue token and how many items are left after it."""
    generation: Generation
    items: list[tuple[tuple[str, str], Prediction]]
    continue_token: str = ""
    remaining: Optional[int] = None


class RequestsStorage:
    """get, list and watch of Requests objects over the rules history."""

    def __init__(self, history: RulesHistory):
        self.history = history
        self._changes: dict[tuple[str, str, Optional[str]], tuple[Change, ...]] = {}

    def list(self, options: ListOptions) -> Page:
        """The page the options ask for.  A continue token or an exact resourceVersion that the
        history no longer holds is a 410 Expired, as in kube-apiserver."""
        generation = self.history.current
        if options.continue_version:
            generation = self.history.at(options.continue_version)
            if generation is None:
                raise HTTPError.expired("The provided continue parameter is too old to display a consistent "
                                        "list result. You can start a new list without the continue parameter.")
        elif options.exact_version:
            generation = self.history.at(options.exact_version)
            if generation is None:
                raise HTTPError.expired(f"too old resource version: {options.exact_version} "
                                        f"({self.history.current.resource_version}); list without "
                                        f"resourceVersion for the current one")
        items = sorted(generation.select(options.namespace, options.fields, options.labels).items())
        if options.continue_after is not None:
            items = [item for item in items if item[0] > options.continue_after]
        continue_token, remaining = "", None
        if options.limit is not None and 0 < options.limit < len(items):
            remaining = len(items) - options.limit
            items = items[:options.limit]
            continue_token = encode_continue(generation.resource_version, items[-1][0])
        return Page(generation, items, continue_token, remaining)

    def watch(self, options: ListOptions, timeout: float) -> Iterator[Optional[Change]]:
        """The changes a watch sees, for `timeout` seconds or until the history closes; None when
        there is nothing new now.  It never waits: the caller asks again when the rules may have
        changed (the transport: at once when they do, and a few times a second for the timeout).

        resourceVersion absent or "0" starts with an ADDED event per current item; a resourceVersion
        this server knows (the rules are content-addressed, so any replica with the same rules knows
        it) starts with the difference since then; anything else is one EXPIRED change."""
        deadline = time.monotonic() + timeout
        generation = self.history.current
        current = generation.select(options.namespace, options.fields, options.labels)
        start = options.resource_version
        if start in ("", "0") or options.send_initial_events:
            for key, prediction in sorted(current.items()):
                yield Change("ADDED", key, prediction, generation.resource_version)
            if options.send_initial_events:
                yield Change("INITIAL_END", ("", ""), None, generation.resource_version)
        else:
            past = self.history.at(start)
            if past is None:
                yield Change("EXPIRED", ("", ""), None, generation.resource_version)
                return
            yield from _differences(past.select(options.namespace, options.fields, options.labels), current,
                                    generation.resource_version)
        while True:
            if time.monotonic() >= deadline or self.history.closed:
                break
            newer = self.history.current
            if newer is generation:
                yield None
                continue
            following = newer.select(options.namespace, options.fields, options.labels)
            yield from self.changes(generation, newer, options, current, following)
            generation, current = newer, following
        if options.allow_bookmarks:
            yield Change("BOOKMARK", ("", ""), None, generation.resource_version)


    def changes(self, before: Generation, after: Generation, options: ListOptions,
                old: dict[tuple[str, str], Prediction], new: dict[tuple[str, str], Prediction]) -> Iterable[Change]:
        """The changes between two generations' selections; memoised when no selector filters them
        (every watch of a namespace, or of all, sees the same list)."""
        if options.fields or options.labels:
            return _differences(old, new, after.resource_version)
        key = (before.resource_version, after.resource_version, options.namespace)
        found = self._changes.get(key)
        if found is None:
            found = remember(self._changes, key, tuple(_differences(old, new, after.resource_version)),
                             CHANGES_MEMO_LIMIT)
        return found


def _differences(before: dict[tuple[str, str], Prediction], after: dict[tuple[str, str], Prediction],
                 resource_version: str) -> Iterator[Change]:
    for key in sorted(set(before) | set(after)):
        if key not in after:
            yield Change("DELETED", key, before[key], resource_version)
        elif key not in before:
            yield Change("ADDED", key, after[key], resource_version)
        elif before[key] != after[key]:
            yield Change("MODIFIED", key, after[key], resource_version)


# ---------------------------------------------------------------------------
# 7. Identity: authentication and authorization, behind one object (Access)
# ---------------------------------------------------------------------------
# kube-apiserver proxies with its front-proxy client certificate and names the user in
# X-Remote-* headers (the names come from the extension-apiserver-authentication ConfigMap).
# Those headers are believed only when the connection's certificate chains to the
# requestheader CA and its CN is allowed.  Authorization is AlwaysAllow (kube-apiserver
# already checked RBAC before proxying) or Delegated (a SubjectAccessReview per request).

@dataclasses.dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...] = ()
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()          # ((key, (values...)), ...)
    method: str = "none"       # "front-proxy", "client-cert" or "none"
    uid: str = ""

    @functools.cached_property
    def log_text(self) -> str:
        """`user=... auth=...` for the request log, quoted only when it has to be."""
        return f"user={log_value(self.user)} auth={self.method}"


ANONYMOUS = Identity("system:anonymous", ("system:unauthenticated",), (), "none")


def pem_certificates(pem: str) -> list[bytes]:
    """The PEM blocks of a CA bundle, each as DER bytes."""
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
    return [ssl.PEM_cert_to_DER_cert(block) for block in blocks]


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    """Who may call reqapi: the CA bundles and header names, from flags or from the
    kube-system/extension-apiserver-authentication ConfigMap."""
    source: str = "off"
    requestheader_ca: str = ""
    allowed_names: tuple[str, ...] = ()
    username_headers: tuple[str, ...] = ("x-remote-user",)
    group_headers: tuple[str, ...] = ("x-remote-group",)
    extra_prefixes: tuple[str, ...] = ("x-remote-extra-",)
    uid_headers: tuple[str, ...] = ()
    client_ca: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.requestheader_ca or self.client_ca)

    @property
    def requestheader_ders(self) -> frozenset[bytes]:
        return frozenset(pem_certificates(self.requestheader_ca))

    @property
    def client_ders(self) -> frozenset[bytes]:
        return frozenset(pem_certificates(self.client_ca))


def auth_config_from_configmap(data: dict[str, str]) -> AuthConfig:
    """Read extension-apiserver-authentication's data the way k8s.io/apiserver does (JSON string arrays)."""
    def strings(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        raw = data.get(key)
        if raw in (None, ""):
            return default
        try:
            values = json.loads(raw)
        except ValueError:
            raise ValueError(f"configmap key {key} is not a JSON array of strings: {raw!r}") from None
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"configmap key {key} is not a JSON array of strings: {raw!r}")
        return tuple(values)

    config = AuthConfig(
        source="configmap kube-system/extension-apiserver-authentication",
        requestheader_ca=data.get("requestheader-client-ca-file", "") or "",
        allowed_names=strings("requestheader-allowed-names", ()),
        username_headers=tuple(h.lower() for h in strings("requestheader-username-headers", ())),
        group_headers=tuple(h.lower() for h in strings("requestheader-group-headers", ())),
        extra_prefixes=tuple(h.lower() for h in strings("requestheader-extra-headers-prefix", ())),
        uid_headers=tuple(h.lower() for h in strings("requestheader-uid-headers", ())),
        client_ca=data.get("client-ca-file", "") or "")
    for label, pem in (("requestheader-client-ca-file", config.requestheader_ca),
                       ("client-ca-file", config.client_ca)):
        if pem and not pem_certificates(pem):
            raise ValueError(f"configmap key {label} holds no PEM certificate")
    if not config.enabled:
        raise ValueError("the configmap has neither requestheader-client-ca-file nor client-ca-file: "
                         "kube-apiserver runs without --requestheader-client-ca-file (the aggregation layer "
                         "is not configured); see https://kubernetes.io/docs/tasks/extend-kubernetes/"
                         "configure-aggregation-layer/")
    return config


# A certificate subject as ssl's getpeercert() gives it: relative distinguished names, each a
# tuple of (attribute, value) pairs, e.g. ((("commonName", "alice"),), (("organizationName", "dev"),)).
Subject = tuple[tuple[tuple[str, str], ...], ...]


class PeerCertificate(NamedTuple):
    """What the TLS layer proved about the client: its certificate and the CA it chains to."""
    anchor: bytes              # DER of the trust anchor the chain was verified against
    common_name: str
    organizations: tuple[str, ...]


def subject_values(subject: Subject, key: str) -> list[str]:
    """The values of one attribute (e.g. commonName) in a subject as ssl's getpeercert() gives it."""
    return [value for rdn in subject for (name, value) in rdn if name == key]


class AuthFailure(NamedTuple):
    message: str


def _unescape_extra_key(key: str) -> str:
    return urllib.parse.unquote(key.lower())


def authenticate(config: AuthConfig, peer: Optional[PeerCertificate], header_items: list[tuple[str, str]],
                 requestheader_ders: frozenset[bytes] = frozenset(),
                 client_ders: frozenset[bytes] = frozenset()) -> Union[Identity, "AuthFailure"]:
    """Identify the caller the way k8s.io/apiserver's delegating authenticator does.

    Returns an Identity, or an AuthFailure whose message tells the operator what to fix.
    Identity headers count only on a connection whose certificate chains to the
    requestheader CA; everywhere else they are ignored."""
    if not config.enabled:
        return ANONYMOUS
    problems = []
    if peer is not None and peer.anchor in requestheader_ders:
        if config.allowed_names and peer.common_name not in config.allowed_names:
            problems.append(f"the front-proxy client certificate CN={peer.common_name!r} is not in "
                            f"--requestheader-allowed-names {list(config.allowed_names)}")
        else:
            user, uid = "", ""
            groups: list[str] = []
            extra: dict[str, list[str]] = {}
            for name, value in header_items:
                if name in config.username_headers and not user and value:
                    user = value
                elif name in config.uid_headers and not uid and value:
                    uid = value
                elif name in config.group_headers and value:
                    groups.append(value)
                else:
                    for prefix in config.extra_prefixes:
                        if name.startswith(prefix) and len(name) > len(prefix):
                            extra.setdefault(_unescape_extra_key(name[len(prefix):]), []).append(value)
                            break
            if user:
                # As k8s.io/apiserver's AuthenticatedGroupAdder: never for system:anonymous, nor
                # when the groups already say authenticated or unauthenticated.
                if user != "system:anonymous" and not {"system:authenticated", "system:unauthenticated"} & set(groups):
                    groups.append("system:authenticated")
                return Identity(user, tuple(groups), tuple((k, tuple(v)) for k, v in sorted(extra.items())),
                                "front-proxy", uid)
            problems.append(f"the front-proxy client certificate came without a user header "
                            f"({', '.join(config.username_headers) or 'none configured'})")
    if peer is not None and peer.anchor in client_ders and not peer.common_name:
        problems.append("the client certificate has no CN (common name), which would be the user name")
    elif peer is not None and peer.anchor in client_ders:
        groups = tuple(peer.organizations) + ("system:authenticated",)
        return Identity(peer.common_name, groups, (), "client-cert")
    if peer is None:
        problems.append("the request carried no client certificate")
    elif not problems:
        problems.append(f"the client certificate CN={peer.common_name!r} is signed by a CA that is neither "
                        f"the requestheader CA nor the client CA")
    return AuthFailure(
        "Unauthorized: this request did not come through kube-apiserver and named no trusted client "
        f"certificate ({'; '.join(problems)}). Call reqapi through kube-apiserver "
        f"(kubectl get --raw /apis/{GROUP_VERSION}/...), or present a certificate signed by the CA in "
        "--client-ca-file; for kube-apiserver's own proxy, reqapi trusts --requestheader-client-ca-file "
        "(read from kube-system/extension-apiserver-authentication in a cluster).")


class AuthorizationDecision(NamedTuple):
    allowed: bool
    reason: str
    attributes: dict[str, Any]      # what was asked: the SubjectAccessReview's attributes


def forbidden_message(identity: Identity, verb: str, namespace: str, name: str, path: str, resource: bool) -> str:
    """kube-apiserver's wording for a denial: 'requests.k8s.wujiuye.com "web" is forbidden: User "u" cannot
    get resource "requests" in API group "k8s.wujiuye.com" in the namespace "shop"', and for
    non-resource paths 'forbidden: User "u" cannot get path "/metrics"' (user name HTML-escaped, as Go's
    authorization error does)."""
    user = identity.user.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if not resource:
        return f'forbidden: User "{user}" cannot {verb} path "{path}"'
    subject = f'{QUALIFIED_RESOURCE} "{name}"' if name else QUALIFIED_RESOURCE
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    return (f'{subject} is forbidden: User "{user}" cannot {verb} resource "{RESOURCE}" '
            f'in API group "{GROUP}" {scope}')


class KubeClient:
    """The few calls reqapi makes to kube-apiserver, with the pod's ServiceAccount (urllib)."""

    def __init__(self, url: str, token_file: str, ca_file: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token_file = token_file
        self.timeout = timeout
        # A plain client context: Python 3.13's create_default_context() adds VERIFY_X509_STRICT,
        # which rejects cluster CAs without the Authority Key Identifier extension (some older
        # kubeadm and cloud CAs).
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.load_verify_locations(cafile=ca_file)

    def call(self, method: str, path: str, body: Optional[Document] = None) -> Document:
        with open(self.token_file, encoding="utf-8") as handle:   # re-read: projected tokens rotate
            token = handle.read().strip()
        data = json.dumps(body).encode() if body is not None else None
        import urllib.request         # here: see the imports at the top
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {token}", "Accept": "application/json",
            "Content-Type": "application/json", "User-Agent": f"reqapi/{__version__}"})
        with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as response:
            return json.loads(response.read())


def describe_http_error(error: Exception) -> str:
    import urllib.error
    if isinstance(error, urllib.error.HTTPError):
        try:
            body = json.loads(error.read())
            return f"{error.code} {body.get('reason', '')}: {body.get('message', '')}"
        except (ValueError, AttributeError, OSError):
            return f"{error.code} {error.reason}"
    return str(getattr(error, "reason", error))


class DelegatedAuthorizer:
    """--authorization-mode=Delegated: a SubjectAccessReview per request, decisions cached 10 s
    (k8s.io/apiserver's defaults).  system:masters is always allowed."""

    ALWAYS_ALLOW_GROUPS = ("system:masters",)
    TTL = 10.0

    def __init__(self, client: KubeClient, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.clock = clock
        self._cache: dict[str, tuple[float, AuthorizationDecision]] = {}
        self._lock = threading.Lock()

    def authorize(self, identity: Identity, request: Request, resource_route: bool) -> AuthorizationDecision:
        attributes = request_attributes(request, resource_route)
        if any(group in self.ALWAYS_ALLOW_GROUPS for group in identity.groups):
            return AuthorizationDecision(True, "", attributes)
        spec: dict[str, Any] = dict(attributes)
        spec.update({"user": identity.user, "groups": list(identity.groups)})
        if identity.uid:
            spec["uid"] = identity.uid
        if identity.extra:
            spec["extra"] = {key: list(values) for key, values in identity.extra}
        key = json.dumps(spec, sort_keys=True)
        now = self.clock()
        with self._lock:
            cached = self._cache.get(key)
            if cached and cached[0] > now:
                return cached[1]
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}
        answer = self.client.call("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
        result = answer.get("status", {})
        allowed = bool(result.get("allowed")) and not result.get("denied")
        decision = AuthorizationDecision(allowed, str(result.get("reason", "")), attributes)
        with self._lock:
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[key] = (now + self.TTL, decision)
        return decision


class AlwaysAllow:
    """--authorization-mode=AlwaysAllow: kube-apiserver already checked RBAC before proxying."""

    ALLOWED = AuthorizationDecision(True, "", {})

    def authorize(self, identity: Identity, request: Request, resource_route: bool) -> AuthorizationDecision:
        return self.ALLOWED


Authorizer = Union[AlwaysAllow, DelegatedAuthorizer]


_WRITE_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def request_attributes(request: Request, resource_route: bool) -> Document:
    """SubjectAccessReview attributes, as k8s.io/apiserver's RequestInfo derives them: a resource
    request names verb, group, version, resource, namespace and name (a list or watch pinned to
    one name by fieldSelector=metadata.name=X names it too); anything else is a non-resource path."""
    if not resource_route:
        return {"nonResourceAttributes": {"path": request.path, "verb": request.method.lower()}}
    name = request.params.get("name", "")
    if request.method not in ("GET", "HEAD"):
        # Refused by reqapi (read-only) after this check, but asked as kube-apiserver would ask it.
        verb = _WRITE_VERBS.get(request.method, request.method.lower())
        if verb == "delete" and not name:
            verb = "deletecollection"
    elif name:
        verb = "watch" if request.watch else "get"
    else:
        verb = "watch" if request.watch else "list"
        name = exact_field(_field_selector_or_none(request.arg("fieldSelector")), "metadata.name") or ""
    attributes = {"verb": verb, "group": GROUP, "version": VERSION, "resource": RESOURCE}
    if request.params.get("namespace"):
        attributes["namespace"] = request.params["namespace"]
    if name:
        attributes["name"] = name
    return {"resourceAttributes": attributes}


def _field_selector_or_none(text: str) -> tuple[Requirement, ...]:
    # An invalid selector is refused later, by the endpoint; authorization then names no object.
    try:
        return parse_field_selector(text)
    except SelectorError:
        return ()


class Access:
    """Who is calling, and may they: the one owner of the authentication configuration (with its
    decoded CA certificates) and of the reason it cannot authenticate yet, and the authorizer."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer
        # One tuple, replaced in one assignment, so that a request never pairs one configuration's
        # header names with another's CA certificates.
        self._state: tuple[AuthConfig, frozenset[bytes], frozenset[bytes]] = (AuthConfig(), frozenset(), frozenset())
        self.config = AuthConfig()               # read freely; replaced only by configure()
        self.enabled = False                     # config.enabled, kept as a plain attribute for the hot path
        # Whether authorizing may wait on the network (a SubjectAccessReview): then the transport
        # answers requests that need it in a worker thread, never in its event loop.
        self.may_block = not isinstance(authorizer, AlwaysAllow)
        self.problem: Optional[str] = None       # why requests cannot be authenticated yet; None = fine

    def configure(self, config: AuthConfig) -> None:
        self._state = (config, config.requestheader_ders, config.client_ders)
        self.config, self.enabled, self.problem = config, config.enabled, None

    def cannot_authenticate(self, problem: str) -> None:
        """No configuration could be loaded: requests get 503 until one is (unless one is already set)."""
        self.problem = problem

    def caller(self, request: Request, peer: Optional[PeerCertificate], route_kind: Optional[str]) -> Identity:
        """Who is calling: authenticated unless the route is public (or, when no route matched,
        always: a stranger learns nothing, not even which paths exist).  Raises HTTPError 401 or 503."""
        if route_kind == "public":
            return self.identify_if_possible(peer, request)
        return self.identify(request, peer)

    def admit(self, identity: Identity, request: Request, route_kind: Optional[str]) -> None:
        """May the caller: authorized unless the route is public.  Raises HTTPError 403 or 500."""
        if route_kind != "public":
            # Authorized even when the request is refused next (404, 405, 400): as in kube-apiserver,
            # whose authorization filter runs before routing, a caller without rights gets 403 and
            # learns nothing about which paths and methods exist.  (AlwaysAllow asks nobody.)
            self.authorize(identity, request, route_kind == "resource")

    def identify_if_possible(self, peer: Optional[PeerCertificate], request: Request) -> Identity:
        """Who calls a public path (health, version), if they say so; ANONYMOUS otherwise, never a
        refusal.  A kubelet probe has no certificate and costs nothing here."""
        if peer is None or not self.enabled:
            return ANONYMOUS
        try:
            return self.identify(request, peer)
        except HTTPError:
            return ANONYMOUS

    def identify(self, request: Request, peer: Optional[PeerCertificate]) -> Identity:
        config, requestheader_ders, client_ders = self._state
        if self.problem is not None and not config.enabled:
            raise HTTPError.unavailable(f"reqapi cannot authenticate requests yet: {self.problem}", retry_after=10)
        result = authenticate(config, peer, request.header_items, requestheader_ders, client_ders)
        if isinstance(result, AuthFailure):
            raise HTTPError.unauthorized(result.message)
        return result

    def authorize(self, identity: Identity, request: Request, resource_route: bool) -> None:
        try:
            decision = self._authorizer.authorize(identity, request, resource_route)
        except (OSError, ValueError) as error:
            raise HTTPError.internal(f"authorization with a SubjectAccessReview failed: "
                                     f"{describe_http_error(error)}; reqapi's ServiceAccount needs the ClusterRole "
                                     f"system:auth-delegator") from None
        if not decision.allowed:
            resource = decision.attributes.get("resourceAttributes", {})
            verb = resource.get("verb") or decision.attributes.get("nonResourceAttributes", {}).get("verb", "get")
            message = forbidden_message(identity, verb, resource.get("namespace", ""), resource.get("name", ""),
                                        request.path, bool(resource))
            if decision.reason:
                message += f": {decision.reason}"
            raise HTTPError.forbidden(message, resource_details(resource.get("name", "")) if resource else {})


# ---------------------------------------------------------------------------
# 8. Observability: the logger, metrics and Health
# ---------------------------------------------------------------------------
# Nothing here knows the sections below: Metrics reads gauges through plain callables that
# their owners register, and Health reads the rules history and Access (sections 6 and 7).

class Logger:
    """One line per event to a file descriptor (stderr), as text or JSON.

    While the server runs, lines are queued and a background thread writes them every
    FLUSH_INTERVAL (100 ms) in one os.write: a request then costs no system call and no GIL
    hand-off for its log line."""

    LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
    FLUSH_INTERVAL = 0.1
    # A bound on what waits for stderr: when nobody reads it (a stuck log collector), lines beyond
    # it are dropped and counted instead of growing memory (~8 KB a request was measured without
    # it: 478 MB after 40k requests).  4 MiB holds ~25,000 request lines, many seconds of traffic.
    MAX_QUEUED_BYTES = 4 * 1024 * 1024

    def __init__(self, fmt: str = "text", level: str = "info", fd: int = 2) -> None:
        self.json = fmt == "json"
        self.threshold = self.LEVELS[level]
        self.fd = fd
        self._second = -1
        self._stamp = ""
        self.queue: Optional[deque[str]] = None
        self._queued = 0                     # bytes in the queue (approximate under races: a bound)
        self.dropped = 0                     # lines dropped: queue full, or stderr stuck at a deadline
        self._writing = threading.Lock()     # one writer at a time, so that lines never interleave

    def start_background_writer(self) -> None:
        self.queue = deque()
        threading.Thread(target=self._write_queued, name="log-writer", daemon=True).start()

    def _write_queued(self) -> None:
        while True:
            time.sleep(self.FLUSH_INTERVAL)
            self.flush()

    def flush(self, deadline: Optional[float] = None) -> None:
        """Write what is queued.  With a deadline (time.monotonic()), give up when it passes, so
        that a stderr nobody reads never holds up shutdown; without one (the writer thread), wait."""
        queue = self.queue
        if not queue:
            return
        wait = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._writing.acquire(timeout=wait):
            return
        try:
            lines, size = [], 0
            while queue:
                line = queue.popleft()              # deque.popleft/append are atomic
                lines.append(line)
                size += len(line)
            self._queued -= size
            self._write_now("".join(lines), deadline)
        finally:
            self._writing.release()

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._stamp, self._second = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)), second
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def log(self, level: str, message: str, **fields: Any) -> None:
        if self.LEVELS[level] < self.threshold:
            return
        if self.json:
            record = {"time": self._timestamp(), "level": level, "msg": message}
            record.update(fields)
            line = json.dumps(record, ensure_ascii=False, default=str)
        else:
            extra = "".join(f" {key}={log_value(value)}" for key, value in fields.items())
            line = f"{self._timestamp()} {level.upper():<7} {message}{extra}"
        self.write(line)

    def write(self, line: str) -> None:
        if self.queue is not None:
            self._enqueue(line + "\n")
        else:
            self._write_now(line + "\n")

    def _enqueue(self, line: str) -> None:
        if self._queued + len(line) > self.MAX_QUEUED_BYTES:
            self.dropped += 1
            return
        self._queued += len(line)
        self.queue.append(line)

    def _write_now(self, text: str, deadline: Optional[float] = None) -> None:
        data = text.encode("utf-8", "replace")
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        # With a deadline, write no more than a pipe takes without blocking once it says "writable".
        piece = 65536 if deadline is None else select.PIPE_BUF
        try:
            while data:
                wait = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
                if not poller.poll(wait):
                    self.dropped += data.count(b"\n")
                    return
                data = data[os.write(self.fd, data[:piece]):]
        except OSError:
            pass

    def request(self, method: str, path: str, code: int, seconds: float, identity: Identity,
                remote: str, audit_id: str) -> None:
        if self.threshold > 20:
            return
        if self.json:
            record = {"time": self._timestamp(), "level": "info", "msg": "request", "method": method,
                      "path": path, "status": code, "duration_ms": round(seconds * 1000, 3),
                      "user": identity.user, "groups": list(identity.groups), "auth": identity.method,
                      "remote": remote}
            if identity.extra:
                record["extra"] = {key: list(values) for key, values in identity.extra}
            if audit_id:
                record["audit_id"] = audit_id
            self.write(json.dumps(record, ensure_ascii=False))
        else:
            # The hot path of logging: one f-string, the timestamp cached per second.
            now = time.time()
            if int(now) != self._second:
                self._timestamp()
            if audit_id and not audit_id.replace("-", "").isalnum():     # (a UUID is left as it is, quickly)
                audit_id = log_value(audit_id)      # spaces or '=' in it must not make fields of their own
            line = (f"{self._stamp}.{int((now - self._second) * 1000):03d}Z INFO    {method} {path} {code} "
                    f"{seconds * 1000:.2f}ms {identity.log_text} remote={remote}"
                    f"{' audit_id=' + audit_id if audit_id else ''}\n")
            if self.queue is not None:
                self._enqueue(line)
            else:
                self._write_now(line)


def traceback_text() -> str:
    """The current exception's traceback, for an error log line (imported only when needed)."""
    import traceback
    return traceback.format_exc()


class Metrics:
    """Prometheus counters, a latency histogram and registered gauges.  Labels never carry
    namespaces or names (their number would grow without bound)."""

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
    COUNTERS = (("connections_rejected_total", "Connections closed at once because --max-connections was reached "
                                               "by connections with work in progress."),
                ("connections_evicted_total", "Idle or half-open connections closed to make room for a new one at "
                                              "--max-connections."),
                ("watches_rejected_total", "Watches answered 429 because --max-watches were open."),
                ("slow_readers_cut_total", "Connections closed because the answers they left unread held more "
                                           "than the transport's queue limit, or to make room for a new one at "
                                           "--max-connections."),
                ("tls_handshake_failures_total", "Connections whose TLS handshake failed or timed out."))

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = {}
        self._histogram: dict[str, list[float]] = {}
        self._counters: dict[str, int] = {name: 0 for name, _ in self.COUNTERS}
        self._reloads: dict[tuple[str, str], int] = {}
        self._gauges: list[tuple[str, str, Callable[[], float]]] = []
        self.started = time.time()

    # Every label takes few values: a method outside these is counted as "other", as
    # k8s.io/apiserver's metrics do (each distinct method, even 8 KB long and answered 401, made
    # series that were never freed: 100k requests added 45 MB).  Resources are "" or "requests";
    # codes are the few reqapi answers with.
    VERBS = frozenset(("GET", "HEAD", "LIST", "WATCH", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT",
                       "TRACE", "UNKNOWN"))

    def observe(self, verb: str, resource: str, code: int, seconds: float) -> None:
        if verb not in self.VERBS:
            verb = "other"
        key = (verb, resource, code)
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1
            if verb != "WATCH":
                buckets = self._histogram.get(verb)
                if buckets is None:
                    buckets = self._histogram[verb] = [0] * (len(self.BUCKETS) + 2)
                buckets[bisect.bisect_left(self.BUCKETS, seconds)] += 1
                buckets[-1] += seconds

    def increment(self, counter: str) -> None:
        with self._lock:
            self._counters[counter] += 1

    def reloaded(self, what: str, result: str) -> None:
        with self._lock:
            self._reloads[(what, result)] = self._reloads.get((what, result), 0) + 1

    def register_gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read from its owner when /metrics is scraped."""
        with self._lock:
            self._gauges.append((name, help_text, read))

    def render(self) -> str:
        with self._lock:
            requests, histogram = dict(self._requests), {k: list(v) for k, v in self._histogram.items()}
            counters, reloads, gauges = dict(self._counters), dict(self._reloads), list(self._gauges)
        lines = [
            "# HELP reqapi_build_info reqapi's version.", "# TYPE reqapi_build_info gauge",
            f'reqapi_build_info{{version="{__version__}",python="{sys.version.split()[0]}"}} 1',
            "# HELP reqapi_requests_total Requests answered, by verb, resource and HTTP code.",
            "# TYPE reqapi_requests_total counter"]
        for (verb, resource, code), value in sorted(requests.items()):
            lines.append(f'reqapi_requests_total{{verb="{verb}",resource="{resource}",code="{code}"}} {value}')
        lines += ["# HELP reqapi_request_duration_seconds Time to answer a request (watches excluded).",
                  "# TYPE reqapi_request_duration_seconds histogram"]
        for verb, buckets in sorted(histogram.items()):
            cumulative = 0
            for bound, count in zip(self.BUCKETS, buckets):
                cumulative += count
                lines.append(f'reqapi_request_duration_seconds_bucket{{verb="{verb}",le="{bound}"}} {cumulative}')
            cumulative += buckets[len(self.BUCKETS)]
            lines.append(f'reqapi_request_duration_seconds_bucket{{verb="{verb}",le="+Inf"}} {cumulative}')
            lines.append(f'reqapi_request_duration_seconds_sum{{verb="{verb}"}} {buckets[-1]:.6f}')
            lines.append(f'reqapi_request_duration_seconds_count{{verb="{verb}"}} {cumulative}')
        for name, help_text in self.COUNTERS:
            lines += [f"# HELP reqapi_{name} {help_text}", f"# TYPE reqapi_{name} counter",
                      f"reqapi_{name} {counters[name]}"]
        lines += ["# HELP reqapi_reloads_total Reloads of rules, certificates and CAs, by result.",
                  "# TYPE reqapi_reloads_total counter"]
        for (what, result), value in sorted(reloads.items()):
            lines.append(f'reqapi_reloads_total{{what="{what}",result="{result}"}} {value}')
        for name, help_text, read in gauges:
            value = read()
            shown = f"{value:.0f}" if isinstance(value, float) else str(value)
            lines += [f"# HELP reqapi_{name} {help_text}", f"# TYPE reqapi_{name} gauge", f"reqapi_{name} {shown}"]
        lines += ["# HELP process_start_time_seconds Start time of the process since the Unix epoch.",
                  "# TYPE process_start_time_seconds gauge",
                  f"process_start_time_seconds {self.started:.3f}"]
        return "\n".join(lines) + "\n"


def record_request(log: Logger, metrics: Metrics, request: Request, identity: Identity, verb: str, resource: str,
                   code: int, seconds: float, remote: str) -> None:
    """The two traces of an answered request: its metrics and its log line."""
    record_answer(log, metrics, request.method, request.path, request.audit_id, identity, verb, resource, code,
                  seconds, remote)


def record_answer(log: Logger, metrics: Metrics, method: str, path: str, audit_id: str, identity: Identity,
                  verb: str, resource: str, code: int, seconds: float, remote: str) -> None:
    """record_request for an answer whose Request is gone (one kept by the transport's answer memo)."""
    metrics.observe(verb, resource, code, seconds)
    log.request(method, path, code, seconds, identity, remote, audit_id)


class Health:
    """The one owner of readiness: shutting down (SIGTERM: /readyz fails at once), draining (the
    listener is closed, watches end, keep-alive answers say Connection: close), and the newest
    rules or TLS files refused (the last good ones keep serving).  The authentication problem is
    Access's, and the rules being served are the history's: Health reads both."""

    def __init__(self, history: RulesHistory, access: Access, metrics: Metrics) -> None:
        self._history = history
        self._access = access
        self.shutting_down = False               # each flag: read freely, set only by the methods below
        self.draining = False
        self.rules_refused: Optional[str] = None
        self.tls_refused: Optional[str] = None
        metrics.register_gauge("rules_last_reload_refused", "1 if the newest rules file was refused.",
                               lambda: 1 if self.rules_refused else 0)
        # With --prometheus-url (section 9 sets these through the methods below): readiness waits
        # for the first refresh until this monotonic deadline (--history-warmup), then is ready on
        # the rules whatever the metrics engine does; a problem with history is a warning only.
        self.history_deadline: Optional[float] = None
        self.history_settled = False
        self.history_problem: Optional[str] = None

    def wait_for_history(self, warmup: float) -> None:
        self.history_deadline = time.monotonic() + warmup

    def history_refreshed(self, problem: Optional[str]) -> None:
        """A refresh ended: settled either way (the warm-up is over), with its problem or None."""
        self.history_settled = True
        self.history_problem = problem

    def shut_down(self) -> None:
        self.shutting_down = True

    def drain(self) -> None:
        self.shutting_down = True
        self.draining = True
        self._history.close()

    def refuse_rules(self, problem: str) -> None:
        self.rules_refused = problem

    def accept_rules(self) -> None:
        self.rules_refused = None

    def refuse_tls(self, problem: str) -> None:
        self.tls_refused = problem

    def accept_tls(self) -> None:
        self.tls_refused = None

    def checks(self, root: str) -> list[tuple[str, bool, str]]:
        """(name, ok, detail) of each check of /healthz, /livez or /readyz."""
        checks = [("ping", True, ""), ("log", True, "")]
        if root == "readyz":
            problem = self._access.problem
            checks.append(("rules", True, ""))
            checks.append(("authentication", problem is None, problem or ""))
            checks.append(("shutdown", not self.shutting_down, "process is shutting down"))
            if self.history_deadline is not None:
                waiting = not self.history_settled and time.monotonic() < self.history_deadline
                checks.append(("history", not waiting, "waiting for the first history refresh (at most "
                               "--history-warmup; then the rules answer until history arrives)"))
        return checks

    def warnings(self, root: str) -> list[str]:
        if root != "readyz":
            return []
        generation = self._history.current
        warnings = [f"rules: serving {generation.rules.source} (resourceVersion {generation.resource_version})"]
        if self.rules_refused:
            warnings.append(f"rules: the newest rules file was refused, the last good rules keep serving: "
                            f"{self.rules_refused}")
        if self.tls_refused:
            warnings.append(f"tls: the newest certificate was refused, the previous one keeps serving: "
                            f"{self.tls_refused}")
        if self.history_problem:
            warnings.append(f"history: {self.history_problem}")
        elif self.history_deadline is not None and not self.history_settled:
            warnings.append("history: the first refresh is under way; the rules answer meanwhile")
        config = self._access.config
        if not config.enabled and self._access.problem is None:
            warnings.append("authentication is off: every caller is served; set --requestheader-client-ca-file "
                            "(and --client-ca-file) or run in a pod to read kube-system/"
                            "extension-apiserver-authentication")
        else:
            warnings.append(f"authentication: {config.source}")
        return warnings


# ---------------------------------------------------------------------------
# 9. History refresher: usage history from the metrics engine (I/O, off the GET path)
# ---------------------------------------------------------------------------
# With --prometheus-url, a background thread reads each completed UTC day's per pod-container
# aggregates through the Prometheus HTTP API subset that Prometheus, Thanos, Mimir and
# VictoriaMetrics share (/api/v1/query, POSTed as a form), maps pods to workloads from
# kube-state-metrics, keeps the completed days (and, with --history-cache-dir, writes them to disk),
# and installs an immutable HistorySnapshot into the rules history (section 6).  A GET never waits
# for it: it reads the generation installed last.
#
# The PromQL, its cost and its chunking were measured against Prometheus 2.42 and VictoriaMetrics
# 1.79 (docs/history-estimator.md, "Reading the history"); the design rule the measurements gave:
# aggregate per pod-container in PromQL, join pods to workloads in Python (a join inside a
# subquery is evaluated at every inner step and cost 10-20x more).  Every aggregate of completed
# day `d` is an instant query at the midnight that ends `d`, over `[1d]`:
#
# * memory peak  `max by (ns, pod, container) (max_over_time(container_memory_working_set_bytes{SEL}[1d]))`
# * samples      `sum by (...) (count_over_time(container_cpu_usage_seconds_total{SEL}[1d]))`
# * CPU p95, p99 `quantile_over_time(q, max by (...) (rate(container_cpu_usage_seconds_total{SEL}[2m]))[1d:1m])`
#   - the `max by` sits inside the subquery so that an OOM-restarted container (a new cAdvisor `id`,
#     a new series) is one series per minute.
# * throttled    `sum by (...) (increase(throttled[1d])) / clamp_min(sum by (...) (increase(periods[1d])), 1)`
# * OOM kills    `max_over_time(last_terminated_reason{reason="OOMKilled"}[1d]) * increase(restarts_total[1d])`
#   (kube-state-metrics keeps only the *last* reason: mixed restarts on one day are over-counted)
# * limits       `max by (..., resource) (max_over_time(kube_pod_container_resource_limits{...}[1d]))`
# * owners       `last_over_time(kube_pod_owner[1d])`, `kube_replicaset_owner`, `kube_job_owner` at
#   the same midnight: each day maps its own pods, so a cached day never changes.
#
# `SEL` = `job="kubelet", metrics_path="/metrics/cadvisor", container!="", container!="POD", image!=""`
# plus --prometheus-matcher (e.g. `cluster="prod"`): it drops the pod-level cgroup (which double
# counts its containers) and the pause container.
#
# Cost and chunking.  The CPU subquery materialises every inner point at once: Prometheus's
# stats=all measured a peak of 2 x 1441 samples per container and day (the inner rate() matrix
# and the `max by` over it; 2.x ranges include both ends).  Prometheus refuses a query above
# --query.max-samples (default 50,000,000): a 14-day query_range at 10,000 containers would hold
# 432M.  One instant query per day holds 10,000 x 2,882 = 28.8M; plan_chunks keeps each query
# under half the limit (8,674 containers), so 10,000 single-container pods over 14 days take
# 14 x 2 quantiles x 2 chunks = 56 subqueries.  The other queries stream one series at a time.
# VictoriaMetrics' -search.maxSamplesPerQuery (default 1e9) counts raw samples read: 10,000
# containers x 14 days at one a minute are 201.6M, inside it.

SECONDS_PER_DAY = 86400
MIB = float(1 << 20)
DEFAULT_MAX_SAMPLES = 50_000_000        # Prometheus --query.max-samples default
POINTS_PER_DAY = 1441                   # a [1d:1m] subquery: both ends included in Prometheus 2.x
# What Prometheus holds at the peak of one day's CPU subquery, per container: the inner rate()
# matrix and the `max by` matrix over it, 1441 points each (measured with stats=all).
SUBQUERY_SAMPLES_PER_SERIES = 2 * POINTS_PER_DAY
BY = "namespace, pod, container"

# Workload kinds after resolving owners.
DEPLOYMENT, STATEFULSET, DAEMONSET, JOB, CRONJOB, REPLICASET, POD = (
    "Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet", "Pod")


class PromQueryError(Exception):
    """The engine answered with an error, or an answer that is not a Prometheus API result."""


@dataclass(frozen=True)
class Selectors:
    """Where the series come from: scrape jobs and extra matchers (e.g. ('cluster="prod"',))."""
    cadvisor_job: str = "kubelet"
    ksm_job: str = "kube-state-metrics"
    extra: tuple[str, ...] = ()
    cpu_rate: str = "2m"                # the estimator's rate window (needs a scrape every minute or less)
    step: str = "1m"                    # the subquery's resolution: the CPU percentile is over per-minute rates

    def cadvisor(self, *more: str) -> str:
        parts = [f'job="{_esc(self.cadvisor_job)}"', 'metrics_path="/metrics/cadvisor"',
                 'container!=""', 'container!="POD"', 'image!=""', *self.extra, *more]
        return ", ".join(p for p in parts if p)

    def ksm(self, *more: str) -> str:
        return ", ".join(p for p in (f'job="{_esc(self.ksm_job)}"', *self.extra, *more) if p)


def _esc(value: str) -> str:
    """A PromQL double-quoted string's content."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def regex_alternatives(values: Iterable[str]) -> str:
    """A PromQL regex string content matching exactly these values (PromQL anchors regexes)."""
    return _esc("|".join(re.escape(v) for v in sorted(set(values))))


# ---- the queries --------------------------------------------------------------------------------

def q_memory_peak(s: Selectors, chunk: str = "") -> str:
    return f"max by ({BY}) (max_over_time(container_memory_working_set_bytes{{{s.cadvisor(chunk)}}}[1d]))"


def q_samples(s: Selectors, chunk: str = "") -> str:
    return f"sum by ({BY}) (count_over_time(container_cpu_usage_seconds_total{{{s.cadvisor(chunk)}}}[1d]))"


def q_cpu_quantile(s: Selectors, q: float, chunk: str = "") -> str:
    return (f"quantile_over_time({q}, max by ({BY}) (rate(container_cpu_usage_seconds_total"
            f"{{{s.cadvisor(chunk)}}}[{s.cpu_rate}]))[1d:{s.step}])")


def q_throttled(s: Selectors, chunk: str = "") -> str:
    sel = s.cadvisor(chunk)
    return (f"sum by ({BY}) (increase(container_cpu_cfs_throttled_periods_total{{{sel}}}[1d]))"
            f" / clamp_min(sum by ({BY}) (increase(container_cpu_cfs_periods_total{{{sel}}}[1d])), 1)")


def q_oom_kills(s: Selectors, chunk: str = "") -> str:
    reason = s.ksm('reason="OOMKilled"', chunk)
    return (f"max by ({BY}) (max_over_time(kube_pod_container_status_last_terminated_reason{{{reason}}}[1d]))"
            f" * on ({BY}) max by ({BY}) (increase(kube_pod_container_status_restarts_total{{{s.ksm(chunk)}}}[1d]))")


def q_limits(s: Selectors, chunk: str = "") -> str:
    sel = s.ksm('resource=~"cpu|memory"', chunk)
    return f"max by ({BY}, resource) (max_over_time(kube_pod_container_resource_limits{{{sel}}}[1d]))"


def q_hpa_targets(s: Selectors) -> str:
    """HPAs and the resources they scale on by utilisation (a share of the request): changing that
    request would move the HPA.  Joined here on the HPA's own name (a join without a subquery)."""
    targets = s.ksm('metric_name=~"cpu|memory"', 'metric_target_type=~"(?i)utilization"')
    return (f"max by (namespace, horizontalpodautoscaler, metric_name, scaletargetref_kind, scaletargetref_name) "
            f"(last_over_time(kube_horizontalpodautoscaler_spec_target_metric{{{targets}}}[1d])"
            f" * on (namespace, horizontalpodautoscaler) group_left (scaletargetref_kind, scaletargetref_name) "
            f"max by (namespace, horizontalpodautoscaler, scaletargetref_kind, scaletargetref_name) "
            f"(last_over_time(kube_horizontalpodautoscaler_info{{{s.ksm()}}}[1d])))")


def hpa_scaled(answer: Any) -> dict[tuple[str, str, str], set[str]]:
    """(namespace, target kind, target name) -> the resources an HPA scales it on."""
    out: dict[tuple[str, str, str], set[str]] = {}
    for labels, _ in parse_result(answer):
        key = (labels.get("namespace", ""), labels.get("scaletargetref_kind", ""), labels.get("scaletargetref_name", ""))
        out.setdefault(key, set()).add(labels.get("metric_name", ""))
    return out


def q_pod_owner(s: Selectors, window_days: int) -> str:
    return (f"max by (namespace, pod, owner_kind, owner_name, owner_is_controller) "
            f"(last_over_time(kube_pod_owner{{{s.ksm()}}}[{window_days}d]))")


def q_replicaset_owner(s: Selectors, window_days: int) -> str:
    return (f"max by (namespace, replicaset, owner_kind, owner_name) "
            f"(last_over_time(kube_replicaset_owner{{{s.ksm()}}}[{window_days}d]))")


def q_job_owner(s: Selectors, window_days: int) -> str:
    return (f"max by (namespace, job_name, owner_kind, owner_name) "
            f"(last_over_time(kube_job_owner{{{s.ksm()}}}[{window_days}d]))")


def day_end(day: int) -> int:
    """Unix seconds of the midnight that ends UTC day number `day` (days since 1970-01-01)."""
    return (day + 1) * SECONDS_PER_DAY


def instant_params(query: str, day: int, timeout_s: float = 60.0) -> dict[str, str]:
    """/api/v1/query parameters reading day `day`: evaluated at the midnight that ends it."""
    return {"query": query, "time": str(day_end(day)), "timeout": f"{timeout_s:g}s"}


def range_params(query: str, first_day: int, last_day: int, timeout_s: float = 60.0) -> dict[str, str]:
    """/api/v1/query_range parameters for days [first_day, last_day]: one point per ending midnight.

    Only for the queries without a subquery: a subquery in a range query materialises the inner
    points of the whole range at once (see the module's cost note)."""
    return {"query": query, "start": str(day_end(first_day)), "end": str(day_end(last_day)),
            "step": str(SECONDS_PER_DAY), "timeout": f"{timeout_s:g}s"}


# ---- chunking -----------------------------------------------------------------------------------

def max_series_per_query(max_samples: int = DEFAULT_MAX_SAMPLES, share: float = 0.5,
                         samples_per_series: int = SUBQUERY_SAMPLES_PER_SERIES) -> int:
    """Containers one day's CPU subquery may cover: `share` of the engine's sample limit.

    `samples_per_series` is what the engine charges a series: Prometheus 2 x 1441 points (the
    inner rate() and the `max by` matrices); VictoriaMetrics (whose -search.maxSamplesPerQuery counts the raw samples of every
    storage block a query reads, not the points it keeps) the series' samples in those blocks."""
    return max(1, int(max_samples * share) // samples_per_series)


def plan_chunks(containers: Mapping[tuple[str, str], int], max_series: int) -> list[str]:
    """Label matchers splitting (namespace, pod) -> container count into queries of <= max_series.

    Whole namespaces are packed together (first fit, largest first: a short matcher); a namespace
    larger than the budget is split by pod names. A single pod larger than the budget gets its
    own query (it cannot be split by these labels). The result is deterministic."""
    per_ns: dict[str, dict[str, int]] = {}
    for (ns, pod), n in containers.items():
        per_ns.setdefault(ns, {})[pod] = per_ns.get(ns, {}).get(pod, 0) + max(0, n)
    bins: list[tuple[int, list[str]]] = []          # (series, namespaces)
    chunks: list[str] = []
    for ns in sorted(per_ns, key=lambda k: (-sum(per_ns[k].values()), k)):
        total = sum(per_ns[ns].values())
        if total > max_series:
            group: list[str] = []
            size = 0
            for pod in sorted(per_ns[ns]):
                n = per_ns[ns][pod]
                if group and size + n > max_series:
                    chunks.append(f'namespace="{_esc(ns)}", pod=~"{regex_alternatives(group)}"')
                    group, size = [], 0
                group.append(pod)
                size += n
            if group:
                chunks.append(f'namespace="{_esc(ns)}", pod=~"{regex_alternatives(group)}"')
            continue
        for i, (size, names) in enumerate(bins):
            if size + total <= max_series:
                bins[i] = (size + total, names + [ns])
                break
        else:
            bins.append((total, [ns]))
    chunks = [f'namespace=~"{regex_alternatives(names)}"' for _, names in bins] + chunks
    return chunks


# ---- parsing ------------------------------------------------------------------------------------

Key = tuple[str, str, str]          # (namespace, pod, container)


def parse_result(answer: Any) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
    """A Prometheus HTTP API answer -> [(labels, [(unix seconds, value)])], vector or matrix.

    Values arrive as strings ("NaN", "+Inf" included) and are returned as floats; the caller
    decides what to trust. Anything that is not a success answer raises PromQueryError."""
    if not isinstance(answer, dict):
        raise PromQueryError(f"not a Prometheus API answer: {type(answer).__name__}")
    if answer.get("status") != "success":
        raise PromQueryError(f"{answer.get('errorType', 'error')}: {answer.get('error', answer.get('status'))}")
    data = answer.get("data")
    if not isinstance(data, dict) or data.get("resultType") not in ("vector", "matrix"):
        raise PromQueryError(f"unexpected result type: {data.get('resultType') if isinstance(data, dict) else data!r}")
    out: list[tuple[dict[str, str], list[tuple[float, float]]]] = []
    for item in data.get("result") or []:
        if not isinstance(item, dict) or not isinstance(item.get("metric"), dict):
            raise PromQueryError("malformed series in result")
        pairs = item.get("values") if data["resultType"] == "matrix" else [item.get("value")]
        points: list[tuple[float, float]] = []
        for pair in pairs or []:
            if not isinstance(pair, list) or len(pair) != 2:
                raise PromQueryError("malformed sample in result")
            try:
                points.append((float(pair[0]), float(pair[1])))
            except (TypeError, ValueError) as e:
                raise PromQueryError(f"malformed sample value {pair!r}") from e
        out.append(({str(k): str(v) for k, v in item["metric"].items()}, points))
    return out


def by_container(answer: Any) -> dict[Key, float]:
    """An instant answer keyed by (namespace, pod, container)."""
    out: dict[Key, float] = {}
    for labels, points in parse_result(answer):
        if points:
            out[(labels.get("namespace", ""), labels.get("pod", ""), labels.get("container", ""))] = points[-1][1]
    return out


def by_container_day(answer: Any) -> dict[tuple[Key, int], float]:
    """A query_range answer (step=1d) keyed by ((namespace, pod, container), day it ends)."""
    out: dict[tuple[Key, int], float] = {}
    for labels, points in parse_result(answer):
        key = (labels.get("namespace", ""), labels.get("pod", ""), labels.get("container", ""))
        for t, v in points:
            out[(key, int(round(t)) // SECONDS_PER_DAY - 1)] = v
    return out


# ---- pods -> workloads --------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkloadRef:
    namespace: str
    kind: str
    name: str


def resolve_owners(pod_owner: Any, replicaset_owner: Any, job_owner: Any) -> dict[tuple[str, str], WorkloadRef]:
    """(namespace, pod) -> its workload, from the three owner answers.

    ReplicaSet -> its Deployment (a ReplicaSet without one stays a ReplicaSet), Job -> its CronJob
    (a bare Job stays a Job), StatefulSet and DaemonSet as they are, any other controller by its
    kind; a pod without a controller (bare, or a static pod owned by its Node) is its own workload
    of kind Pod. When the window saw a pod with several owner rows (owner references changed),
    the controller row wins, then the lexically smallest: deterministic."""
    rs: dict[tuple[str, str], tuple[str, str]] = {}
    for labels, _ in parse_result(replicaset_owner):
        if labels.get("owner_kind") and labels.get("owner_kind") != "<none>":
            rs[(labels.get("namespace", ""), labels.get("replicaset", ""))] = (labels["owner_kind"], labels.get("owner_name", ""))
    jobs: dict[tuple[str, str], tuple[str, str]] = {}
    for labels, _ in parse_result(job_owner):
        if labels.get("owner_kind") and labels.get("owner_kind") != "<none>":
            jobs[(labels.get("namespace", ""), labels.get("job_name", ""))] = (labels["owner_kind"], labels.get("owner_name", ""))
    rows: dict[tuple[str, str], list[tuple[int, str, str]]] = {}
    for labels, _ in parse_result(pod_owner):
        ns, pod = labels.get("namespace", ""), labels.get("pod", "")
        rank = 0 if labels.get("owner_is_controller") == "true" else 1
        rows.setdefault((ns, pod), []).append((rank, labels.get("owner_kind", ""), labels.get("owner_name", "")))
    out: dict[tuple[str, str], WorkloadRef] = {}
    for (ns, pod), candidates in rows.items():
        rank, kind, name = min(candidates)
        if rank != 0 or kind in ("", "<none>", "Node"):
            out[(ns, pod)] = WorkloadRef(ns, POD, pod)
        elif kind == REPLICASET and (ns, name) in rs and rs[(ns, name)][0] == DEPLOYMENT:
            out[(ns, pod)] = WorkloadRef(ns, DEPLOYMENT, rs[(ns, name)][1])
        elif kind == JOB and (ns, name) in jobs and jobs[(ns, name)][0] == CRONJOB:
            out[(ns, pod)] = WorkloadRef(ns, CRONJOB, jobs[(ns, name)][1])
        else:
            out[(ns, pod)] = WorkloadRef(ns, kind, name)
    return out


# ---- per pod-container day -> per workload-container day ----------------------------------------

@dataclass(frozen=True)
class PodDay:
    """One pod-container's aggregates for one completed UTC day, as read from the engine."""
    day: int
    samples: int
    cpu_p95_m: float
    cpu_p99_m: float
    memory_peak_mi: float
    oom_kills: int
    cpu_limit_m: float | None
    cpu_throttled_ratio: float
    memory_limit_mi: float | None


def pod_days(day: int, memory: Any, samples: Any, p95: Sequence[Any], p99: Sequence[Any], throttled: Any,
             ooms: Any, limits: Any) -> dict[Key, PodDay]:
    """Assemble one day's answers (p95/p99: one answer per chunk) into per pod-container days.

    A container counts when it has a memory peak (it ran that day). Missing CPU quantiles are NaN
    (the estimator drops such a day rather than trust it); missing throttling or OOM rows mean 0."""
    mem = by_container(memory)
    cnt = by_container(samples)
    q95: dict[Key, float] = {}
    for a in p95:
        q95.update(by_container(a))
    q99: dict[Key, float] = {}
    for a in p99:
        q99.update(by_container(a))
    thr = by_container(throttled)
    oom = by_container(ooms)
    lim: dict[tuple[Key, str], float] = {}
    for labels, points in parse_result(limits):
        if points:
            key = (labels.get("namespace", ""), labels.get("pod", ""), labels.get("container", ""))
            lim[(key, labels.get("resource", ""))] = points[-1][1]
    out: dict[Key, PodDay] = {}
    nan = float("nan")
    for key, peak in mem.items():
        cpu_limit = lim.get((key, "cpu"))
        mem_limit = lim.get((key, "memory"))
        n = cnt.get(key, 0.0)
        kills = oom.get(key, 0.0)
        out[key] = PodDay(
            day=day, samples=int(round(n)) if math.isfinite(n) else 0,
            cpu_p95_m=q95.get(key, nan) * 1000.0, cpu_p99_m=q99.get(key, nan) * 1000.0,
            memory_peak_mi=peak / MIB,
            # increase() extrapolates to the range's edges in Prometheus: a count is a whole number.
            oom_kills=int(round(kills)) if math.isfinite(kills) else 0,
            cpu_limit_m=None if cpu_limit is None else cpu_limit * 1000.0,
            cpu_throttled_ratio=thr.get(key, 0.0),
            memory_limit_mi=None if mem_limit is None else mem_limit / MIB)
    return out


def workload_days(days: Iterable[Mapping[Key, PodDay]], owners: Mapping[tuple[str, str], WorkloadRef]
                  ) -> dict[tuple[WorkloadRef, str], dict[int, PodDay]]:
    """Per (workload, container) and day: samples and OOM kills summed over the workload's pods,
    everything else the max over them (the estimator's DayUsage definition). A pod without a known
    owner is its own workload (kind Pod)."""
    out: dict[tuple[WorkloadRef, str], dict[int, PodDay]] = {}
    for one_day in days:
        for (ns, pod, container), d in sorted(one_day.items()):
            ref = owners.get((ns, pod), WorkloadRef(ns, POD, pod))
            slot = out.setdefault((ref, container), {})
            old = slot.get(d.day)
            slot[d.day] = d if old is None else PodDay(
                day=d.day, samples=old.samples + d.samples,
                cpu_p95_m=_max(old.cpu_p95_m, d.cpu_p95_m), cpu_p99_m=_max(old.cpu_p99_m, d.cpu_p99_m),
                memory_peak_mi=_max(old.memory_peak_mi, d.memory_peak_mi), oom_kills=old.oom_kills + d.oom_kills,
                cpu_limit_m=_max_opt(old.cpu_limit_m, d.cpu_limit_m),
                cpu_throttled_ratio=_max(old.cpu_throttled_ratio, d.cpu_throttled_ratio),
                memory_limit_mi=_max_opt(old.memory_limit_mi, d.memory_limit_mi))
    return out


def _max(a: float, b: float) -> float:
    # NaN-aware: a pod without a value does not hide its sibling's.
    if a != a:
        return b
    if b != b:
        return a
    return max(a, b)


def _max_opt(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else _max(a, b)


# ---- driving the queries ------------------------------------------------------------------------

Fetch = Callable[[str, Mapping[str, str]], Any]      # (API path, form parameters) -> decoded JSON


def read_day(fetch: Fetch, day: int, s: Selectors = Selectors(),
             max_samples: int = DEFAULT_MAX_SAMPLES) -> dict[Key, PodDay]:
    """Every aggregate of one completed day; the CPU subqueries chunked under `max_samples`."""
    def q(query: str) -> Any:
        return fetch("/api/v1/query", instant_params(query, day))
    memory = q(q_memory_peak(s))
    # The day's containers (from the cheap memory answer) decide the CPU chunks.
    inventory: dict[tuple[str, str], int] = {}
    for ns, pod, _ in by_container(memory):
        inventory[(ns, pod)] = inventory.get((ns, pod), 0) + 1
    chunks = plan_chunks(inventory, max_series_per_query(max_samples))
    p95 = [q(q_cpu_quantile(s, 0.95, c)) for c in chunks]
    p99 = [q(q_cpu_quantile(s, 0.99, c)) for c in chunks]
    return pod_days(day, memory, q(q_samples(s)), p95, p99, q(q_throttled(s)), q(q_oom_kills(s)), q(q_limits(s)))


def read_owners(fetch: Fetch, last_day: int, window_days: int, s: Selectors = Selectors()
                ) -> dict[tuple[str, str], WorkloadRef]:
    """The pod -> workload mapping over the window ending with day `last_day`."""
    def q(query: str) -> Any:
        return fetch("/api/v1/query", instant_params(query, last_day))
    return resolve_owners(q(q_pod_owner(s, window_days)), q(q_replicaset_owner(s, window_days)),
                          q(q_job_owner(s, window_days)))


# ---- talking to the engine ----------------------------------------------------------------------

HISTORY_QUERIES_IN_FLIGHT = 2            # at most two queries at once: the engine serves dashboards too
HISTORY_MAX_RESPONSE = 64 * 1024 * 1024  # bytes of one answer (10,000 containers: ~1.2 MB per statistic)
HISTORY_MAX_SERIES = 100_000             # workload-containers kept per day (more are dropped, logged)
HISTORY_MAX_CPU_M = 10_000_000.0         # 10,000 cores: a larger CPU value is not a measurement
HISTORY_MAX_MEMORY_MI = float(1 << 30)   # 1 PiB: a larger working set is not a measurement
HISTORY_SETTLE = 900.0                   # a day is read 15 min after its midnight (late scrapes, remote-write lag)
_HISTORY_CACHE_FORMAT = "reqapi.history-day/v1"


@dataclass(frozen=True)
class HistorySettings:
    """What --prometheus-url and its companion flags say (validated by Config.from_args)."""
    url: str
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    token_file: Optional[str] = None          # re-read when it changes (a projected token rotates)
    username: Optional[str] = None            # basic auth, with password_file
    password_file: Optional[str] = None
    headers: tuple[tuple[str, str], ...] = ()  # e.g. (("X-Scope-OrgID", "tenant-1"),)
    matchers: tuple[str, ...] = ()            # extra label matchers, e.g. ('cluster="prod"',)
    window_days: int = 14
    refresh: float = 3600.0
    warmup: float = 120.0
    max_age: float = 2 * 86400.0
    cache_dir: Optional[str] = None
    mode: str = "on"                          # "on" or "shadow"
    timeout: float = 30.0
    max_samples: int = DEFAULT_MAX_SAMPLES
    as_of: Optional[int] = None               # replay: a fixed UTC day number as "today"


def prometheus_ssl_context(settings: HistorySettings) -> Optional[ssl.SSLContext]:
    """The TLS context for an https URL (CA file, client certificate); raises OSError/ssl.SSLError."""
    if not settings.url.startswith("https://"):
        return None
    context = ssl.create_default_context(cafile=settings.ca_file)
    if settings.cert_file:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


class PrometheusClient:
    """POST /api/v1/query with the configured authentication; JSON in, PromQueryError for every
    failure the engine or the network can produce.  One retry for what may pass (a connection
    error, a timeout, HTTP 5xx or 429); none for a refused query (4xx: the same query fails again)."""

    def __init__(self, settings: HistorySettings, context: Optional[ssl.SSLContext]) -> None:
        self.settings = settings
        self.context = context
        self._token: tuple[Optional[tuple[int, int, int]], str] = (None, "")   # (file signature, token)
        self._lock = threading.Lock()

    def _bearer(self) -> str:
        path = self.settings.token_file
        if not path:
            return ""
        try:
            info = os.stat(path)
        except OSError as error:
            raise PromQueryError(f"--prometheus-token-file {path}: {error.strerror}") from None
        signature = (info.st_ino, info.st_size, info.st_mtime_ns)
        with self._lock:
            if self._token[0] != signature:
                try:
                    with open(path, encoding="utf-8") as handle:
                        self._token = (signature, handle.read().strip())
                except (OSError, UnicodeDecodeError) as error:
                    raise PromQueryError(f"--prometheus-token-file {path}: {error}") from None
            return self._token[1]

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json",
                   "User-Agent": f"reqapi/{__version__}"}
        headers.update(self.settings.headers)
        token = self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif self.settings.username is not None:
            try:
                with open(self.settings.password_file or "", encoding="utf-8") as handle:
                    password = handle.read().rstrip("\n")
            except (OSError, UnicodeDecodeError) as error:
                raise PromQueryError(f"--prometheus-password-file: {error}") from None
            pair = f"{self.settings.username}:{password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        return headers

    def fetch(self, path: str, params: Mapping[str, str]) -> Any:
        """The decoded answer; retried once when the failure may pass."""
        try:
            return self._fetch_once(path, params)
        except _Transient:
            pass
        try:
            return self._fetch_once(path, params)
        except _Transient as error:
            raise PromQueryError(str(error)) from None

    def _fetch_once(self, path: str, params: Mapping[str, str]) -> Any:
        import http.client            # here: see the imports at the top
        import urllib.error
        import urllib.request
        body = urllib.parse.urlencode(dict(params)).encode()
        request = urllib.request.Request(self.settings.url.rstrip("/") + path, data=body, method="POST",
                                         headers=self.headers())
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout, context=self.context) as response:
                return _decode_answer(response.headers.get("Content-Type", ""), response.read(HISTORY_MAX_RESPONSE + 1))
        except urllib.error.HTTPError as error:
            payload = error.read(HISTORY_MAX_RESPONSE + 1)
            if error.code >= 500 or error.code == 429:
                raise _Transient(f"HTTP {error.code} from the metrics engine: {_snippet(payload)}") from None
            try:
                answer = _decode_answer(error.headers.get("Content-Type", ""), payload)
            except PromQueryError:
                raise PromQueryError(f"HTTP {error.code} from the metrics engine: {_snippet(payload)}") from None
            parse_result(answer)       # raises with the engine's own message
            raise PromQueryError(f"HTTP {error.code} from the metrics engine") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            raise _Transient(f"cannot reach the metrics engine at {self.settings.url}: {reason}") from None


class _Transient(Exception):
    """A failure that may pass: retried once."""


def _snippet(payload: bytes) -> str:
    return repr(payload[:200].decode("utf-8", "replace"))


def _decode_answer(content_type: str, payload: bytes) -> Any:
    if len(payload) > HISTORY_MAX_RESPONSE:
        raise PromQueryError(f"the answer is larger than {HISTORY_MAX_RESPONSE} bytes; narrow it with "
                             f"--prometheus-matcher")
    if "json" not in content_type.lower():
        raise PromQueryError(f"the metrics engine answered {content_type or 'no Content-Type'}, not JSON "
                             f"(is --prometheus-url the engine's API root?): {_snippet(payload)}")
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as error:
        raise PromQueryError(f"the metrics engine's answer is not valid JSON: {error}") from None


class WorkloadDay(NamedTuple):
    """One completed day as the refresher keeps it."""
    usage: dict[tuple[str, str, str, str], DayUsage]     # (namespace, kind, name, container) -> usage
    hpa: dict[tuple[str, str, str], set[str]]             # (namespace, kind, name) -> resources an HPA scales on
    refused: int                                          # pod-days refused as implausible


def map_in_threads(function: Callable[[Any], Any], items: list[Any], width: int) -> list[Any]:
    """function(item) for each item, `width` at a time in plain threads; the results in order, or the
    first error raised.  (Not concurrent.futures: its executors refuse work once the main thread has
    finished, and `python3 reqapi.py` serves after that.)"""
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []
    indexes = iter(range(len(items)))
    lock = threading.Lock()

    def work() -> None:
        while not errors:
            with lock:
                index = next(indexes, None)
            if index is None:
                return
            try:
                results[index] = function(items[index])
            except BaseException as error:        # re-raised below, in the caller's thread
                errors.append(error)

    threads = [threading.Thread(target=work, name="history-query", daemon=True)
               for _ in range(max(1, min(width, len(items))))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def read_workload_day(fetch: Fetch, day: int, s: Selectors, max_samples: int, in_flight: int = 1) -> WorkloadDay:
    """One completed day per (namespace, kind, name, container), the HPAs of that day, and the
    number of pod-days refused as implausible (negative, infinite, or beyond HISTORY_MAX_*)."""
    def q(query: str) -> Any:
        return fetch("/api/v1/query", instant_params(query, day))

    def ask(queries: list[str]) -> list[Any]:
        if in_flight <= 1:
            return [q(text) for text in queries]
        return map_in_threads(q, queries, in_flight)

    memory, samples, throttled, ooms, limits, pod_owner, rs_owner, job_owner, hpa = ask([
        q_memory_peak(s), q_samples(s), q_throttled(s), q_oom_kills(s), q_limits(s),
        q_pod_owner(s, 1), q_replicaset_owner(s, 1), q_job_owner(s, 1), q_hpa_targets(s)])
    inventory: dict[tuple[str, str], int] = {}
    for ns, pod, _ in by_container(memory):
        inventory[(ns, pod)] = inventory.get((ns, pod), 0) + 1
    chunks = plan_chunks(inventory, max_series_per_query(max_samples)) if inventory else []
    cpu = ask([q_cpu_quantile(s, quantile, chunk) for quantile in (0.95, 0.99) for chunk in chunks])
    pods = pod_days(day, memory, samples, cpu[:len(chunks)], cpu[len(chunks):], throttled, ooms, limits)
    refused = 0
    for key in sorted(pods):
        if not _plausible(pods[key]):
            del pods[key]
            refused += 1
    owners = resolve_owners(pod_owner, rs_owner, job_owner)
    out: dict[tuple[str, str, str, str], DayUsage] = {}
    for (ref, container), days in workload_days([pods], owners).items():
        for d in days.values():
            out[(ref.namespace, ref.kind, ref.name, container)] = DayUsage(
                day=d.day, samples=d.samples, cpu_p95_m=d.cpu_p95_m, cpu_p99_m=d.cpu_p99_m,
                memory_peak_mi=d.memory_peak_mi, oom_kills=d.oom_kills, cpu_limit_m=d.cpu_limit_m,
                cpu_throttled_ratio=d.cpu_throttled_ratio, memory_limit_mi=d.memory_limit_mi)
    return WorkloadDay(out, hpa_scaled(hpa), refused)


def _plausible(d: PodDay) -> bool:
    """A pod-day an engine could have measured.  NaN is kept (a missing quantile: the estimator
    drops that day); a negative, infinite or absurd value refuses the pod-day."""
    def ok(value: Optional[float], bound: float) -> bool:
        return value is None or value != value or (0.0 <= value <= bound)
    return (ok(d.cpu_p95_m, HISTORY_MAX_CPU_M) and ok(d.cpu_p99_m, HISTORY_MAX_CPU_M)
            and ok(d.memory_peak_mi, HISTORY_MAX_MEMORY_MI) and ok(d.cpu_limit_m, HISTORY_MAX_CPU_M)
            and ok(d.memory_limit_mi, HISTORY_MAX_MEMORY_MI) and ok(d.cpu_throttled_ratio, 1.0)
            and 0 <= d.samples <= 10**9 and 0 <= d.oom_kills <= 10**6)


def utc_day(unix: float) -> int:
    return int(unix // SECONDS_PER_DAY)


class HistoryRefresher:
    """The one owner of the completed days read from the metrics engine and of the refresh state
    (last success, errors).  Its thread refreshes every --history-refresh; each refresh asks only
    for completed days it does not hold (from memory, then --history-cache-dir, then the engine),
    and installs the snapshot into the rules history.  Bounded: --history-window days of at most
    HISTORY_MAX_SERIES workload-containers each."""

    def __init__(self, settings: HistorySettings, history: RulesHistory, health: Health, metrics: Metrics,
                 log: Logger, context: Optional[ssl.SSLContext] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings, self.history, self.health, self.log = settings, history, health, log
        self.client = PrometheusClient(settings, context)
        self.selectors = Selectors(extra=settings.matchers)
        self.clock = clock
        self.stop = threading.Event()
        self.wake = threading.Event()
        self._days: dict[int, WorkloadDay] = {}
        self.last_success: Optional[float] = None        # clock() of the last refresh that read every day
        self.last_success_monotonic: Optional[float] = None
        self.last_duration = 0.0
        self.query_errors = 0
        self.refreshes = 0
        self.workloads = 0
        self.last_error = ""
        self._cache_key = hashlib.sha256(json.dumps(
            [settings.url, sorted(dict(settings.headers).items()), list(settings.matchers), self.selectors.cpu_rate,
             _HISTORY_CACHE_FORMAT]).encode()).hexdigest()[:16]
        metrics.register_gauge("history_last_success_timestamp_seconds",
                               "When the last refresh of usage history read every completed day (0: never).",
                               lambda: float(self.last_success or 0))
        metrics.register_gauge("history_refresh_duration_milliseconds", "How long the last history refresh took.",
                               lambda: float(round(self.last_duration * 1000)))
        metrics.register_gauge("history_query_errors", "Queries to the metrics engine that failed since start "
                               "(after their retry).", lambda: self.query_errors)
        metrics.register_gauge("history_workloads", "Workloads with usage history in the served snapshot.",
                               lambda: self.workloads)

    def today(self) -> int:
        """The first day not complete: days before it are read (15 minutes after their midnight)."""
        if self.settings.as_of is not None:
            return self.settings.as_of
        return utc_day(self.clock() - HISTORY_SETTLE)

    def start(self) -> None:
        self.health.wait_for_history(self.settings.warmup)
        threading.Thread(target=self.run, name="history", daemon=True).start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.refresh()
            except Exception as error:  # never let the refresher die: log, keep the last good history
                self.query_errors += 1
                self.log.log("error", "history refresh failed", traceback=traceback_text())
                self.health.history_refreshed(f"the last refresh failed with an internal error ({error!r}); "
                                              f"see reqapi's log")
            self.wake.wait(self.settings.refresh)
            self.wake.clear()

    def refresh(self) -> bool:
        """Read the missing completed days and install the snapshot.  True if every day was read."""
        started = time.monotonic()
        today, window = self.today(), self.settings.window_days
        wanted = range(today - window, today)
        for day in list(self._days):
            if day not in wanted:
                del self._days[day]          # older than the window: forgotten (memory stays bounded)
        missing = [day for day in wanted if day not in self._days and not self._load(day)]
        failed, refused = "", 0
        if not missing:
            # Nothing new to read: one trivial query still proves the engine answers, so that
            # "stale" (--history-max-age) means "the engine has not answered for that long".
            try:
                parse_result(self.client.fetch("/api/v1/query", instant_params("vector(1)", today - 1)))
            except PromQueryError as error:
                self.query_errors += 1
                failed = str(error)
        if missing:
            for day in reversed(missing):        # newest first: it weighs most
                try:
                    read = read_workload_day(self.client.fetch, day, self.selectors, self.settings.max_samples,
                                             HISTORY_QUERIES_IN_FLIGHT)
                except PromQueryError as error:
                    self.query_errors += 1
                    failed = str(error)
                    break
                refused += read.refused
                if len(read.usage) > HISTORY_MAX_SERIES:
                    self.log.log("warning", "history: too many workload-containers in a day; the rest are "
                                 "dropped", day=_day_text(day), kept=HISTORY_MAX_SERIES, seen=len(read.usage))
                    read = WorkloadDay(dict(sorted(read.usage.items())[:HISTORY_MAX_SERIES]), read.hpa,
                                       read.refused)
                self._days[day] = read
                self._save(day, read)
        self.last_duration = time.monotonic() - started
        self.refreshes += 1
        if refused:
            self.log.log("warning", "history: pod-days with impossible values (negative, infinite or beyond "
                         "10,000 cores / 1 PiB) were ignored", pod_days=refused)
        if failed:
            self.last_error = failed
            self.log.log("error", "history refresh failed; " + (
                "the last good history keeps answering" if self.last_success is not None else
                "the rules answer until a refresh succeeds"), error=failed, days_read=len(self._days), days_wanted=window,
                         seconds=f"{self.last_duration:.3f}")
            self._check_stale()
            return False
        self.last_error = ""
        self.last_success = self.clock()
        self.last_success_monotonic = time.monotonic()
        snapshot = self.snapshot(today)
        changed = self.history.install_history(snapshot)
        self.workloads = len(snapshot.workloads)
        self.health.history_refreshed(None)
        generation = self.history.current
        sources: dict[str, int] = {}
        shadowed = 0
        for (namespace, name), prediction in generation.named.items():
            sources[prediction.source] = sources.get(prediction.source, 0) + 1
            explanation = prediction.explanation
            if changed and explanation is not None and explanation.reason == REASON_SHADOW:
                # Shadow mode: what history would answer, logged (and shown in the object's basis).
                would = dict(explanation.containers)[explanation.main]
                shadowed += 1
                self.log.log("info", "history shadow", namespace=namespace, name=name, rule=prediction.rule,
                             serving=f"{prediction.cpu}/{prediction.memory}",
                             history=f"{format_cpu(would.cpu_m)}/{format_memory(would.memory_mi)}",
                             source=would.source)
        self.log.log("info", "history refreshed", days=len(self._days), new_days=len(missing),
                     workloads=self.workloads, as_of=_day_text(today), seconds=f"{self.last_duration:.3f}",
                     resourceVersion=generation.resource_version, changed=changed,
                     answers=",".join(f"{k}:{v}" for k, v in sorted(sources.items())))
        return True

    def snapshot(self, today: int) -> HistorySnapshot:
        per_key: dict[tuple[str, str, str, str], list[DayUsage]] = {}
        for day in sorted(self._days):
            for key, usage in self._days[day].usage.items():
                per_key.setdefault(key, []).append(usage)
        newest = self._days[max(self._days)].hpa if self._days else {}
        return history_snapshot(HISTORY_FRESH, self.settings.mode, today, self.settings.window_days,
                                per_key.items(), newest.items())

    def _check_stale(self) -> None:
        """After a failed refresh: warn, and once the last good history is older than --history-max-age,
        answer from the rules (the object says HistoryStale)."""
        age = None if self.last_success_monotonic is None else time.monotonic() - self.last_success_monotonic
        if age is not None and age > self.settings.max_age:
            stale = history_snapshot(HISTORY_STALE, self.settings.mode, self.today(), self.settings.window_days, ())
            if self.history.install_history(stale):
                self.workloads = 0
                self.log.log("warning", "history is stale: the rules answer until a refresh succeeds",
                             last_success=rfc3339(self.last_success or 0), max_age=f"{self.settings.max_age:g}s")
            self.health.history_refreshed(f"stale: no successful refresh since {rfc3339(self.last_success or 0)} "
                                          f"(over --history-max-age); the rules answer: {self.last_error}")
        elif age is not None:
            self.health.history_refreshed(f"the last refresh failed, history from {rfc3339(self.last_success or 0)} "
                                          f"keeps answering: {self.last_error}")
        else:
            self.health.history_refreshed(f"no refresh has succeeded yet; the rules answer: {self.last_error}")

    # The cache directory: one JSON file per completed day, written atomically; a file written for
    # another URL, tenant or matchers (the cache key) is not used.
    def _path(self, day: int) -> str:
        return os.path.join(self.settings.cache_dir or "", f"day-{_day_text(day)}-{self._cache_key}.json")

    def _load(self, day: int) -> bool:
        if not self.settings.cache_dir:
            return False
        try:
            with open(self._path(day), encoding="utf-8") as handle:
                document = json.load(handle)
            if document.get("format") != _HISTORY_CACHE_FORMAT or document.get("day") != day:
                return False
            usage = {tuple(row[:4]): DayUsage(day, *row[4:]) for row in document["rows"][:HISTORY_MAX_SERIES]}
            hpa = {tuple(row[:3]): set(row[3]) for row in document["hpa"]}
        except FileNotFoundError:
            return False
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            self.log.log("warning", "history cache file ignored", file=self._path(day), error=str(error))
            return False
        self._days[day] = WorkloadDay(usage, hpa, 0)
        return True

    def _save(self, day: int, read: WorkloadDay) -> None:
        if not self.settings.cache_dir:
            return
        rows = [[*key, u.samples, u.cpu_p95_m, u.cpu_p99_m, u.memory_peak_mi, u.oom_kills, u.cpu_limit_m,
                 u.cpu_throttled_ratio, u.memory_limit_mi] for key, u in sorted(read.usage.items())]
        hpa = [[*key, sorted(resources)] for key, resources in sorted(read.hpa.items())]
        path = self._path(day)
        import tempfile               # here: see the imports at the top
        try:
            with tempfile.NamedTemporaryFile("w", dir=self.settings.cache_dir, delete=False, suffix=".tmp",
                                             encoding="utf-8") as handle:
                json.dump({"format": _HISTORY_CACHE_FORMAT, "day": day, "rows": rows, "hpa": hpa}, handle)
            os.replace(handle.name, path)
            for name in os.listdir(self.settings.cache_dir):      # days that left the window
                if name.startswith("day-") and name.endswith(".json") and name[4:14] < _day_text(
                        self.today() - self.settings.window_days):
                    os.unlink(os.path.join(self.settings.cache_dir, name))
        except OSError as error:
            self.log.log("warning", "history cache not written", file=path, error=str(error))


# ---------------------------------------------------------------------------
# 10. API: endpoints, the route table, and one pipeline (Api.handle)
# ---------------------------------------------------------------------------
# An endpoint takes the Api and a parsed Request and returns a Response, or a WatchStream for
# watches; it raises HTTPError for every refusal.  Api.handle routes, authenticates,
# authorizes and calls; the transport below only moves bytes.

def serve_static(request: Request, document: StaticDocument, cache_control: str = "public") -> Response:
    """A discovery or OpenAPI document with an ETag; 304 when If-None-Match names it."""
    headers = (("ETag", document.etag), ("Vary", "Accept"), ("Cache-Control", cache_control))
    wanted = request.headers.get("if-none-match", "")
    if wanted and document.etag in [tag.strip().removeprefix("W/") for tag in wanted.split(",")]:
        return Response(304, b"", document.content_type, headers)
    return Response(200, document.body, document.content_type, headers)


NO_CACHE = (("Cache-Control", "no-cache, private"),)
Endpoint = Callable[["Api", Request], Union[Response, WatchStream]]


# Non-resource endpoints

def document_endpoint(key: str) -> Endpoint:
    """An endpoint serving one of the documents built at start-up, as JSON, with its ETag."""
    def endpoint(api: Api, request: Request) -> Response:
        negotiate_plain_json(request)
        return serve_static(request, api.documents[key])
    endpoint.__name__ = f"document_{key}"
    return endpoint


def endpoint_core_api(api: Api, request: Request) -> Response:
    # No core group here; client-go's discovery treats a 404 on /api as "this server has no
    # legacy core group" and goes on to /apis.
    raise HTTPError.not_found(f"the server could not find the requested resource: reqapi serves only "
                              f"/apis/{GROUP_VERSION}, there is no core (/api) group")


def endpoint_apis(api: Api, request: Request) -> Response:
    variant = negotiate_discovery(request)
    return serve_static(request, api.documents[f"apis:{variant or 'legacy'}"])


def endpoint_openapi_v3(api: Api, request: Request) -> Response:
    negotiate_plain_json(request)
    document = api.documents["openapi:v3"]
    # Always the current document, whatever the hash: a redirect would become a 502 in kube-apiserver.
    if request.arg("hash") and request.arg("hash") == document.etag.strip('"'):
        expires = http_date(time.time() + 365 * 86400)
        response = serve_static(request, document, "public, immutable")
        return response._replace(headers=response.headers + (("Expires", expires),))
    return serve_static(request, document, "no-cache, private")


def endpoint_health(api: Api, request: Request) -> Response:
    root = request.segments[0]
    only = request.params.get("check")
    checks = api.health.checks(root)
    excluded = set(request.query.get("exclude", []))
    # Why a check failed (a rules path, the text of a refused rules file, the ServiceAccount) is
    # told only to a caller who authenticated, or when authentication is off; probes and strangers
    # get the status, as k8s.io/apiserver's "reason withheld" (reqapi's log has every reason).
    withheld = not request.trusted
    if only is not None:
        for name, ok, detail in checks:
            if name == only:
                reason = "reason withheld" if withheld else detail
                return Response(200 if ok else 503, b"ok" if ok else f"internal server error: {reason}".encode(),
                                TEXT, (("X-Content-Type-Options", "nosniff"),))
        raise HTTPError.not_found()
    lines, healthy = [], True
    for name, ok, detail in checks:
        if name in excluded:
            lines.append(f"[+]{name} excluded: ok")
        elif ok:
            lines.append(f"[+]{name} ok")
        else:
            healthy = False
            lines.append(f"[-]{name} failed: {'reason withheld' if withheld else detail}")
    for name in sorted(excluded - {name for name, _, _ in checks}):
        lines.append(f'warn: some health checks cannot be excluded: no matches for "{name}"')
    if not withheld:
        lines.extend(f"warn: {warning}" for warning in api.health.warnings(root))
    verbose = "verbose" in request.query
    code = 200 if healthy else (503 if root == "readyz" else 500)
    if healthy and not verbose:
        body = "ok"
    else:
        body = "\n".join(lines) + f"\n{root} check {'passed' if healthy else 'failed'}\n"
    return Response(code, body.encode(), TEXT, (("X-Content-Type-Options", "nosniff"),
                                                ("Cache-Control", "no-cache, private")))


def endpoint_metrics(api: Api, request: Request) -> Response:
    return Response(200, api.metrics.render().encode(), METRICS_TYPE)


# Resource endpoints

def endpoint_get(api: Api, request: Request) -> Union[Response, WatchStream]:
    options = object_options(request)
    if isinstance(options, ListOptions):
        return api.watch(options, websocket_upgrade(request) if request.websocket else None)
    output = options.output
    if not output.table_version and not output.partial_version:
        return Response(200, api.object_json(options.namespace, options.name), JSON, NO_CACHE)
    now = time.time()
    generation = api.storage.history.current
    obj = requests_object(options.namespace, options.name, generation.prediction(options.namespace, options.name),
                          generation.resource_version, int(now))
    if output.partial_version:
        return Response(200, dumps(partial_object_metadata(obj, output.partial_version)), output.content_type,
                        NO_CACHE)
    document = table([table_row(obj, options.output.include_object, now, int(now))], generation.resource_version,
                     options.output.table_version)
    return Response(200, dumps(document), options.output.content_type, NO_CACHE)


def endpoint_list(api: Api, request: Request) -> Union[Response, WatchStream]:
    options = list_options(request)
    if options.watch:
        return api.watch(options, websocket_upgrade(request) if request.websocket else None)
    return api.list_response(options)


class Route(NamedTuple):
    pattern: tuple[str, ...]   # literal segments and "{parameter}" placeholders
    endpoint: Endpoint
    kind: str                  # "public" (no authentication), "discovery" or "resource"


ROUTES = (
    Route((), document_endpoint("root"), "discovery"),
    Route(("healthz",), endpoint_health, "public"),
    Route(("livez",), endpoint_health, "public"),
    Route(("readyz",), endpoint_health, "public"),
    Route(("healthz", "{check}"), endpoint_health, "public"),
    Route(("livez", "{check}"), endpoint_health, "public"),
    Route(("readyz", "{check}"), endpoint_health, "public"),
    Route(("metrics",), endpoint_metrics, "public"),
    Route(("version",), document_endpoint("version"), "discovery"),
    Route(("api",), endpoint_core_api, "discovery"),
    Route(("apis",), endpoint_apis, "discovery"),
    Route(("apis", GROUP), document_endpoint("group"), "discovery"),
    Route(("apis", GROUP, VERSION), document_endpoint("resources"), "discovery"),
    Route(("apis", GROUP, VERSION, RESOURCE), endpoint_list, "resource"),
    Route(("apis", GROUP, VERSION, "namespaces", "{namespace}", RESOURCE), endpoint_list, "resource"),
    Route(("apis", GROUP, VERSION, "namespaces", "{namespace}", RESOURCE, "{name}"), endpoint_get, "resource"),
    Route(("apis", GROUP, VERSION, "watch", RESOURCE), endpoint_list, "resource"),
    Route(("apis", GROUP, VERSION, "watch", "namespaces", "{namespace}", RESOURCE), endpoint_list, "resource"),
    Route(("openapi", "v2"), document_endpoint("openapi:v2"), "discovery"),
    Route(("openapi", "v3"), document_endpoint("openapi:v3:root"), "discovery"),
    Route(("openapi", "v3", "apis", GROUP, VERSION), endpoint_openapi_v3, "discovery"),
)


def route_index(routes: Iterable[Route]) -> dict[int, list[Route]]:
    """Routes grouped by segment count, so a lookup compares a handful of patterns at most."""
    index: dict[int, list[Route]] = {}
    for route in routes:
        index.setdefault(len(route.pattern), []).append(route)
    return index


def match_route(index: dict[int, list[Route]], segments: list[str]) -> Optional[tuple[Route, dict[str, str]]]:
    for route in index.get(len(segments), ()):
        params = {}
        for expected, actual in zip(route.pattern, segments):
            if expected[0] == "{":
                params[expected[1:-1]] = actual
            elif expected != actual:
                break
        else:
            return route, params
    return None


class Outcome(NamedTuple):
    """What the pipeline made of a request: the answer, who asked, and the verb and resource
    that metrics and logs name it by (as apiserver_request_total does)."""
    result: Union[Response, WatchStream]
    identity: Identity
    verb: str
    resource: str
    # Whether the same request would get the same answer until the rules generation, the
    # authentication configuration or the second changes: true of the discovery documents and of
    # gets and lists (not of health, metrics or watches).  The transport may then keep the answer.
    reusable: bool = False


def refusal_of(request: Request, found: Optional[tuple[Route, dict[str, str]]]) -> Optional[HTTPError]:
    """What refuses a request whoever sends it: a body (reqapi is read-only; the connection is then
    closed), a path with no route, a method other than GET or HEAD.  None if nothing does."""
    if request.has_body:
        if request.method in ("GET", "HEAD"):
            return HTTPError.bad_request(f"{request.method} requests must not have a body; "
                                         f"reqapi's API is read-only and takes no request bodies")
        return HTTPError.method_not_allowed("the server does not allow this method on the requested resource: "
                                            "reqapi is read-only and takes no request bodies")
    if found is None:
        return HTTPError.not_found()
    if request.method not in ("GET", "HEAD"):
        return HTTPError.method_not_allowed(
            f"the server does not allow this method on the requested resource: reqapi is read-only "
            f"({request.method} is not allowed; use GET: get, list, watch)")
    return None


class Api:
    """The API: the route table, the documents built at start-up, and the response memo.

    The memo holds encoded answers that are a function of the rules generation, what the request
    selects and the second (their timestamps have whole seconds): kubectl, controllers and the
    deploy service ask the same questions often.  It holds one generation's answers of one second:
    when the rules change or a new second starts, it starts empty.  Measured in-process on the
    2-core development machine: building and encoding an object costs ~19 µs, a memo hit 0.4 µs,
    and parse_head plus Api.handle of a whole GET ~16 µs on a hit."""

    # The object and list memos are bounded by bytes, not entries (1,020 lists with junk query strings
    # reached 713 MB when they were bounded by entries and keyed by the raw options).  An entry costs
    # its body and, measured with tracemalloc, an object ~330 bytes besides its name's characters
    # (key, strings, timestamp, dict slot), a list ~450 besides its continue token and 8 a row (its
    # key holds the page's keys).
    # At the limit a memo is emptied: at most 4 MiB of objects (~6,000 answers for short names, one
    # second's worth: a new second empties it) and 8 MiB of lists (a list larger is not kept).
    OBJECT_MEMO_BYTES = 4 * 1024 * 1024
    OBJECT_ENTRY_BYTES = 330
    LIST_MEMO_BYTES = 8 * 1024 * 1024
    LIST_ENTRY_BYTES = 450
    EVENTS_MEMO_BYTES = 4 * 1024 * 1024     # encoded watch events kept for other watches (then emptied)

    def __init__(self, storage: RequestsStorage, access: Access, health: Health, metrics: Metrics, log: Logger,
                 watch_timeout: float) -> None:
        self.storage = storage
        self.access = access
        self.health = health
        self.metrics = metrics
        self.log = log
        self.watch_timeout = watch_timeout
        self.routes = route_index(ROUTES)
        self.documents = build_static_documents(storage.history.history_configured)
        self._memo_generation: Optional[Generation] = None
        self._memo_second = -1
        self._objects: dict[tuple[str, str], tuple[int, bytes]] = {}
        self._objects_bytes = 0              # approximate under races: a bound, not an account
        self._lists: dict[tuple[Any, ...], Response] = {}
        self._lists_bytes = 0
        self._events: dict[tuple[Any, ...], bytes] = {}
        self._events_bytes = 0

    def handle(self, request: Request, peer: Optional[PeerCertificate]) -> Outcome:
        """Route, authenticate, authorize and call: the whole life of a request but its bytes.
        Authentication comes first, so that a stranger learns nothing, not even which paths exist."""
        identity, kind = ANONYMOUS, ""
        try:
            found = match_route(self.routes, request.segments)
            if found is not None and not request.has_body:
                # Routed (a request with a body is refused before routing, and counted as unrouted):
                # authorization names the namespace and name, metrics the resource.
                request.params, kind = found[1], found[0].kind
            refusal = refusal_of(request, found)
            route_kind = None if found is None else found[0].kind
            identity = self.access.caller(request, peer, route_kind)
            self.access.admit(identity, request, route_kind)     # (a refusal is logged with who asked)
            request.trusted = identity is not ANONYMOUS or not self.access.enabled
            if refusal is not None:
                raise refusal
            result = found[0].endpoint(self, request)
        except HTTPError as error:
            result = error.response()
        except Exception as error:      # a bug: answer 500 without a traceback, log it with one
            self.log.log("error", "internal error", path=request.path, error=repr(error),
                         traceback=traceback_text())
            result = HTTPError.internal(f"{type(error).__name__}: see reqapi's log for the details",
                                        {"causes": [{"message": type(error).__name__}]}).response()
        if kind != "resource":
            return Outcome(result, identity, request.method, "", kind == "discovery")
        if request.watch:
            return Outcome(result, identity, "WATCH", RESOURCE)
        return Outcome(result, identity, request.method if "name" in request.params else "LIST", RESOURCE, True)

    def may_block(self, request: Request) -> bool:
        """Whether answering may wait on the network: authorization by SubjectAccessReview, which
        every route but the public ones (health, metrics) asks for.  Public paths never wait, so the
        kubelet's probes are answered even when kube-apiserver hangs."""
        if not self.access.may_block:
            return False
        found = match_route(self.routes, request.segments)
        return found is None or found[0].kind != "public"

    def _event_json(self, change: Change, output: Output, with_columns: bool) -> bytes:
        """One encoded watch event, memoised: every watch that sees a change in the same second and
        representation shares one encoding (500 watches of a 10,000-workload change encode it once)."""
        now = int(time.time())
        key = (change.type, change.key, change.resource_version, output, with_columns, now)
        found = self._events.get(key)
        if found is not None:
            return found
        obj = requests_object(change.key[0], change.key[1], change.prediction, change.resource_version, now)
        if output.partial_version:
            obj = partial_object_metadata(obj, output.partial_version)
        elif output.table_version:
            obj = table([table_row(obj, output.include_object, now, now)], change.resource_version,
                        output.table_version, with_columns)
        encoded = dumps(watch_event(change.type, obj))
        if self._events_bytes > self.EVENTS_MEMO_BYTES:
            self._events, self._events_bytes = {}, 0
        self._events[key] = encoded
        self._events_bytes += len(encoded) + 200     # + the key and the dict slot, roughly
        return encoded

    def _memo_for(self, generation: Generation, second: int) -> None:
        # Called before each memo use: a new generation or a new second empties the memos, since
        # nothing in them can be served again (an answer carries its generation and its second).
        if generation is not self._memo_generation or second != self._memo_second:
            self._objects, self._objects_bytes = {}, 0
            self._lists, self._lists_bytes = {}, 0
            self._memo_generation, self._memo_second = generation, second

    def object_json(self, namespace: str, name: str) -> bytes:
        """The encoded object, memoised per generation and second."""
        generation = self.storage.history.current
        now = int(time.time())
        if generation is not self._memo_generation or now != self._memo_second:
            self._memo_for(generation, now)
        key = (namespace, name)
        cached = self._objects.get(key)
        if cached is not None and cached[0] == now:     # (a thread still in the previous second may store)
            return cached[1]
        body = requests_object_json(namespace, name, generation.prediction(namespace, name),
                                    generation.resource_version, now)
        # Emptied when full, as the other memos are; written out here because a call into section 6
        # would add a section crossing to every first GET of a name (test_layers).
        size = len(body) + self.OBJECT_ENTRY_BYTES + len(namespace) + len(name)
        if self._objects_bytes + size > self.OBJECT_MEMO_BYTES:
            self._objects, self._objects_bytes = {}, 0
        self._objects[key] = (now, body)
        self._objects_bytes += size
        return body

    def list_response(self, options: ListOptions) -> Response:
        """A list or a Table of the collection, memoised per generation and second by what decides
        its bytes: the page (the generation it comes from and its items, the continue token and
        the count left) and the representation.  The raw query does not count: selectors that
        select the same items, a limit above their number, continue tokens that start at the same
        place give the same answer, which is built once."""
        generation = self.storage.history.current
        now = int(time.time())
        if generation is not self._memo_generation or now != self._memo_second:
            self._memo_for(generation, now)
        whole = not (options.fields or options.labels or options.limit or options.continue_version
                     or options.exact_version)
        if whole:
            # All of the current generation's items (of a namespace), the common case: looked up
            # before anything is selected (nothing else decides the bytes), and kept under both keys.
            response = self._lists.get((options.namespace, options.output, now))
            if response is not None:
                return response
        page = self.storage.list(options)     # selects and sorts the items; building them costs ~20x more
        keys = tuple(item for item, _ in page.items)
        key = (page.generation.resource_version, options.output, keys, page.continue_token, page.remaining, now)
        response = self._lists.get(key)
        if response is None:
            response = self._list(page, options.output, now)
            size = len(response.body) + self.LIST_ENTRY_BYTES + 8 * len(keys) + len(page.continue_token)
            if size > self.LIST_MEMO_BYTES:
                return response
            if self._lists_bytes + size > self.LIST_MEMO_BYTES:
                self._lists, self._lists_bytes = {}, 0
            self._lists[key] = response
            self._lists_bytes += size
        if whole and self._lists_bytes + self.LIST_ENTRY_BYTES <= self.LIST_MEMO_BYTES:
            self._lists[(options.namespace, options.output, now)] = response
            self._lists_bytes += self.LIST_ENTRY_BYTES
        return response

    def _list(self, page: Page, output: Output, now: int) -> Response:
        generation, items, continue_token, remaining = page
        objects = [requests_object(ns, name, prediction, generation.resource_version, now)
                   for (ns, name), prediction in items]
        if output.partial_version:
            document = partial_object_metadata_list(objects, output.partial_version, generation.resource_version,
                                                    continue_token, remaining)
            return Response(200, dumps(document), output.content_type, NO_CACHE)
        if not output.table_version:
            document = requests_list(objects, generation.resource_version, continue_token, remaining)
            return Response(200, dumps(document), JSON, NO_CACHE)
        rows = [table_row(obj, output.include_object, now, now) for obj in objects]
        document = table(rows, generation.resource_version, output.table_version, True, continue_token, remaining)
        return Response(200, dumps(document), output.content_type, NO_CACHE)

    def watch(self, options: ListOptions, upgrade: Optional[WebSocketUpgrade] = None) -> WatchStream:
        """A watch: WatchEvents, each object encoded as the list would encode it (a Table sends its
        column definitions once, with the first row); newline-delimited, or one WebSocket frame each."""
        return WatchStream(options.output.content_type, self._watch_events(options, self.watch_length(options)),
                           upgrade)

    def watch_length(self, options: ListOptions) -> float:
        """How long a watch lasts.  Without timeoutSeconds (or with 0), as kube-apiserver: the base
        length (--watch-timeout, 30 minutes like its --min-request-timeout) times 1 to 2 at random,
        so that watches begun together do not all end, and come back, together.  A timeoutSeconds
        above twice the base is cut to twice the base: no watch holds its slot for longer."""
        if not options.timeout_seconds:
            return self.watch_timeout * (1.0 + random.random())
        return min(float(options.timeout_seconds), 2 * self.watch_timeout)

    def _watch_events(self, options: ListOptions, timeout: float) -> Iterator[Optional[bytes]]:
        output = options.output
        columns_sent = False
        for change in self.storage.watch(options, timeout):
            if change is None:
                yield None
            elif change.type == "EXPIRED":
                yield dumps(watch_event("ERROR", status(
                    410, "Expired", f"too old resource version: {options.resource_version} "
                    f"({change.resource_version}); list again to get the current resourceVersion")))
            elif change.type in ("INITIAL_END", "BOOKMARK"):
                if change.type == "BOOKMARK" and output.table_version:
                    continue
                marker = bookmark(change.resource_version, initial_events_end=change.type == "INITIAL_END")
                if output.partial_version:
                    marker = partial_object_metadata(marker, output.partial_version)
                yield dumps(watch_event("BOOKMARK", marker))
            else:
                yield self._event_json(change, output, not columns_sent and bool(output.table_version))
                columns_sent = True


# ---------------------------------------------------------------------------
# 11. Transport: TLS, connections, deadlines, the server
# ---------------------------------------------------------------------------
# One event loop over non-blocking TLS sockets (ReqapiServer): an idle keep-alive connection or
# an open watch costs its TLS state and no thread, and a request on an open connection is read,
# answered and written without a hand-off between threads.  The TLS handshake runs in the loop,
# never in accept() with a blocking wrap of the listening socket (one silent client would stop
# every new connection).  Every phase of a connection has a deadline that the loop enforces.

class ConfigError(Exception):
    """Configuration that must not be served: the message names the file, the place and the fix."""


# Two CPython APIs outside ssl's documented surface are needed, and are looked up once, at
# start-up (require_tls_introspection), so that a Python without them refuses to start instead
# of quietly trusting no client certificate or reporting a certificate expiry of 0:
#  - the verified chain of a client certificate, to know which CA bundle vouched for it:
#    SSLSocket.get_verified_chain() is public since Python 3.13; before, the same method exists
#    (since 3.10) on the socket's internal _sslobj and returns certificate objects, not DER;
#  - the fields of the serving certificate (SANs, notAfter) for the start-up log and the expiry
#    metric: ssl._ssl._test_decode_cert, which ssl's own test suite uses; ssl has no public
#    parser of a certificate file.

class TLSIntrospection(NamedTuple):
    verified_chain: Callable[[ssl.SSLSocket], list[bytes]]
    decode_certificate: Callable[[str], dict[str, Any]]


def require_tls_introspection() -> TLSIntrospection:
    """The two lookups above, or ConfigError naming what this Python lacks."""
    missing = []
    if hasattr(ssl.SSLSocket, "get_verified_chain"):
        def verified_chain(tls: ssl.SSLSocket) -> list[bytes]:
            return [_der(certificate) for certificate in tls.get_verified_chain() or []]
    elif hasattr(getattr(ssl, "_ssl", None), "_SSLSocket") and hasattr(ssl._ssl._SSLSocket, "get_verified_chain"):
        def verified_chain(tls: ssl.SSLSocket) -> list[bytes]:
            return [_der(certificate) for certificate in tls._sslobj.get_verified_chain() or []]
    else:
        missing.append("SSLSocket.get_verified_chain (public since Python 3.13; on the internal _sslobj "
                       "since 3.10)")
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        missing.append("ssl._ssl._test_decode_cert (reads the serving certificate's SANs and expiry)")
    if missing:
        raise ConfigError(f"this Python ({sys.version.split()[0]}) lacks {' and '.join(missing)}; reqapi needs "
                          f"them to tell which CA vouched for a client and when its certificate expires: "
                          f"run it on CPython 3.11 to 3.13")
    return TLSIntrospection(verified_chain, decode)


def _der(certificate: Any) -> bytes:
    # 3.13's public method gives DER bytes; the internal one gives _ssl.Certificate objects,
    # whose public_bytes() default is PEM (converted here with ssl's public helper).
    if isinstance(certificate, bytes):
        return certificate
    return ssl.PEM_cert_to_DER_cert(certificate.public_bytes())


def peer_certificate(tls_socket: ssl.SSLSocket, introspection: TLSIntrospection) -> Optional[PeerCertificate]:
    """The verified client certificate of a connection, or None if the client sent none."""
    leaf = tls_socket.getpeercert()
    if not leaf:
        return None
    chain = introspection.verified_chain(tls_socket)
    anchor = chain[-1] if chain else b""      # no verified chain (e.g. a resumed session): trust nothing
    subject = leaf.get("subject", ())
    names = subject_values(subject, "commonName")
    # Go's pkix.Name keeps the last CN when a subject has several; so does kube-apiserver.
    return PeerCertificate(anchor, names[-1] if names else "", tuple(subject_values(subject, "organizationName")))


class CertificateSummary(NamedTuple):
    sans: list[str]            # "DNS:name" and "IP Address:..." entries
    not_after: float           # expiry, seconds since the epoch
    subject: str               # the common name


def certificate_summary(cert_file: str) -> CertificateSummary:
    """SANs, subject and expiry of a PEM certificate file (for start-up lines and the expiry metric)."""
    introspection = require_tls_introspection()
    try:
        decoded = introspection.decode_certificate(cert_file)
        not_after = float(ssl.cert_time_to_seconds(decoded["notAfter"]))
    except (ssl.SSLError, OSError, ValueError, KeyError) as error:
        raise ConfigError(f"--cert {cert_file}: cannot read its expiry and names ({error}); give a PEM "
                          f"certificate (./gen_certs.sh makes one)") from None
    sans = [f"{kind}:{value}" for kind, value in decoded.get("subjectAltName", ())]
    names = subject_values(decoded.get("subject", ()), "commonName")
    return CertificateSummary(sans, not_after, names[0] if names else "")


def build_tls_context(cert_file: str, key_file: str, auth: AuthConfig) -> ssl.SSLContext:
    """A server context: TLS 1.2+, AEAD ciphers, ALPN http/1.1, client certificates asked for
    (never required: kubelet probes have none) when a CA is configured."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    context.set_alpn_protocols(["http/1.1"])
    # A client that closes its side without a TLS close_notify (a bare TCP FIN after its request)
    # still gets its answer: without this option OpenSSL 3 makes that EOF a fatal error, and the
    # answer leaves as a decode_error alert instead.
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    try:
        context.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as error:
        raise ConfigError(f"{error.filename}: no such file; pass --cert and --key of a PEM certificate and its "
                          f"private key (./gen_certs.sh makes them)") from None
    except PermissionError as error:
        raise ConfigError(f"{error.filename}: permission denied; the files must be readable by "
                          f"uid {os.getuid()}") from None
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(f"--cert {cert_file} / --key {key_file}: cannot be used together ({error}); the key must "
                          f"be the private key of the certificate, both PEM (./gen_certs.sh makes a matching "
                          f"pair)") from None
    bundle = (auth.requestheader_ca + "\n" + auth.client_ca).strip()
    if bundle:
        try:
            context.load_verify_locations(cadata=bundle)
        except ssl.SSLError as error:
            raise ConfigError(f"{auth.source}: the CA bundle cannot be loaded ({error}); it must hold PEM "
                              f"certificates") from None
        context.verify_mode = ssl.CERT_OPTIONAL
        # A chain ends at the first certificate of a bundle, as in Go, even when that is an
        # intermediate CA: the anchor then tells which bundle vouched for the client.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        # A resumed TLS session carries no verified chain to tell which CA vouched for the client,
        # so sessions are not resumed when client certificates matter (kube-apiserver keeps its
        # connections open anyway).
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
    return context


@dataclass(frozen=True)
class TransportSettings:
    """The limits of connections, from the flags of the same names."""
    max_connections: int
    max_watches: int
    tls_handshake_timeout: float
    read_header_timeout: float
    idle_timeout: float
    write_timeout: float


# Flow control.  A connection's output queue may grow to HIGH_WATER bytes before the loop stops
# taking its next pipelined request; a watch's to WATCH_HIGH_WATER before it stops taking events
# from its stream (the events wait, unencoded, in the stream).  All the queues together stay under
# QUEUED_LIMIT, give or take a small answer per connection: an answer over SMALL_ANSWER that would
# pass it is refused with 429 and Retry-After (client-go retries it), and while the queues are over
# it a connection with answers still queued takes no request and a watch no event.  Health checks,
# objects and discovery are small: they are answered whatever the queues hold.  (Without the global
# check a burst of 300 clients asking for a 1.3 MB list queued 400 MB within one turn of the loop.)
# A client that has read nothing for STALL_GRACE, while the queues hold more than half the limit,
# is cut off, the one stalled longest first, until they hold less; and one that reads nothing for
# --write-timeout is cut off in any case.  A client that keeps reading, however slowly, is never
# cut for others: the grace is what tells the two apart (the moment a burst arrives, a steady
# reader between two writes looks no different from a client that will never read).
HIGH_WATER = 256 * 1024
WATCH_HIGH_WATER = 32 * 1024
QUEUED_LIMIT = 8 * 1024 * 1024
SMALL_ANSWER = 4 * 1024          # health, objects, Status errors, discovery: 1,600 of them are 6.25 MiB
STALL_GRACE = 2.0                 # seconds without taking a WRITE_SLICE: a reader slower than 8 KB/s
SEND_BUFFER = 64 * 1024           # SO_SNDBUF (Linux doubles it: 128 KiB of kernel memory at most)
# The most one TLS write takes.  OpenSSL takes a write whole or not at all (after WANT_WRITE the same
# bytes are retried), so progress, which ends a stall (see STALL_GRACE and --write-timeout), is seen
# once a write completes: a 1.3 MB list written at once looked stalled from the first full socket
# buffer to its last byte, and a client reading it steadily was cut off as if it had stopped.
WRITE_SLICE = 16 * 1024          # one TLS record
READ_SIZE = 65536                 # one recv(): four TLS records at most
MAX_INBOX = 4 * MAX_HEAD_BYTES    # unparsed bytes read ahead of the request being answered
LINGER_SECONDS = 1.0
LINGER_BYTES = 16 * MAX_HEAD_BYTES
RETRY_AFTER_WATCHES = 5           # seconds a client refused a watch is told to wait (Retry-After)
EVENTS_PER_TURN = 256             # watch events taken from one stream before the loop turns to others

# The phases of a connection.  Exactly one at a time; "writing" is not a phase (an answer can
# still be leaving in any of them).
HANDSHAKE, IDLE, HEAD, BUSY, WATCH, CLOSING, LINGER = "handshake", "idle", "head", "busy", "watch", "closing", "linger"


class MemoEntry(NamedTuple):
    """A kept answer: its two parts from ResponseEncoder.reusable, and what its log line and
    metrics say (the Audit-Id is the request's when the head was keyed whole)."""
    head: bytes
    body: bytes
    method: str
    path: str
    audit_id: str
    identity: Identity
    verb: str
    resource: str


# An answer memo key: the client certificate, the request head (less a plain Audit-Id), and
# whether an Audit-Id was cut out of it.
MemoKey = tuple[Optional[PeerCertificate], bytes, bool]


class AnswerMemo:
    """Answers kept for requests asked again within the same second: a hit is sent without parsing
    the head, routing, authenticating or encoding.  The key is the request head's bytes (less a
    plain Audit-Id, see head_without_audit_id) and the client certificate, so a hit is exactly the
    answer the head would get: the identity comes from the headers and the certificate, and
    authorization is AlwaysAllow (with Delegated the memo is off, since a SubjectAccessReview's
    decision can change from one request to the next).  Only 200 answers to keep-alive requests
    are kept, of what Api.handle calls reusable.  A new second (answers carry their Date and
    timestamps to the second), a new rules generation or a new authentication configuration
    empties it, and so does reaching MAX_BYTES: 4 MiB.

    Why: parsing, routing, authenticating, answering and encoding a GET of an object cost ~45 µs
    of this loop's ~110 µs a request (measured on one core of the 2-core development VM, wrk at
    16 connections), and a hit ~3 µs; the deploy service, kubectl and controllers ask the same
    questions again and again.  Used by the loop's thread only."""

    MAX_BYTES = 4 * 1024 * 1024
    ENTRY_BYTES = 450             # the entry, its key and its dict slot besides the heads, body and path (tracemalloc: ~400)

    def __init__(self) -> None:
        self._entries: dict[MemoKey, MemoEntry] = {}
        self._bytes = 0
        self._state: tuple[Any, ...] = ()

    def get(self, state: tuple[Any, ...], key: MemoKey) -> Optional[MemoEntry]:
        """The answer kept for `key`, if it was kept in this `state` (generation, second, ...)."""
        if state != self._state:
            self._entries, self._bytes, self._state = {}, 0, state
            return None
        return self._entries.get(key)

    def put(self, state: tuple[Any, ...], key: MemoKey, entry: MemoEntry) -> None:
        """Keep an answer made in `state` (taken before it was made: an answer is never older)."""
        if state != self._state:
            return                  # the world changed while it was made: the next get() empties the memo
        size = len(key[1]) + len(entry.head) + len(entry.body) + len(entry.path) + self.ENTRY_BYTES
        if self._bytes + size > self.MAX_BYTES:
            self._entries, self._bytes = {}, 0
        self._entries[key] = entry
        self._bytes += size


class OpenWatch:
    """A watch being streamed: the stream, how its events are framed, and what its log line and
    metrics will say when it ends."""

    __slots__ = ("events", "frame", "ending", "websocket", "request", "outcome", "started", "close")

    def __init__(self, stream: WatchStream, encoder: ResponseEncoder, request: Request, outcome: Outcome,
                 started: float, close: bool) -> None:
        self.events = stream.events
        self.websocket = stream.upgrade is not None
        if self.websocket:
            self.frame = encoder.websocket_frame
            self.ending = encoder.websocket_frame(WS_NORMAL_CLOSURE.to_bytes(2, "big"), WS_CLOSE)
        else:
            self.frame, self.ending = encoder.chunk, LAST_CHUNK
        self.request, self.outcome, self.started, self.close = request, outcome, started, close

    def stop(self) -> None:
        close = getattr(self.events, "close", None)
        if close is not None:
            close()


class Connection:
    """One client connection: its TLS socket, what it has read and not yet parsed, the answers
    waiting to leave, its phase and deadlines.  Used by the event loop's thread only (a worker
    answering a request gets the Request, never the Connection).

    The life of a connection: handshake -> idle -> head (bytes of a request arrived) -> busy
    (answering) -> idle again, or -> watch (streaming events) -> idle again after a chunked
    watch; closing (the last answer leaves) and linger (after an error answer: read and drop
    what the client still sends, so that its TCP stack does not reset the answer away)."""

    __slots__ = ("server", "sock", "fd", "tls", "remote", "peer", "verifies", "phase", "inbox", "scanned",
                 "outbox", "outbox_bytes", "frozen", "deadline", "stalled_since", "idle_since", "linger_after",
                 "read_closed", "interest", "watch", "lingered", "open")

    def __init__(self, server: "ReqapiServer", sock: socket.socket, remote: str, now: float) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.tls: Optional[ssl.SSLSocket] = None
        self.remote = remote
        self.peer: Optional[PeerCertificate] = None
        self.verifies = False             # was a client certificate asked for in this handshake?
        self.phase = HANDSHAKE
        self.inbox = bytearray()          # bytes read and not yet parsed (bytearray: del [:n] is O(1))
        self.scanned = 0                  # how far the inbox was searched for a head's end (no rescans)
        self.outbox: deque[bytes] = deque()
        self.outbox_bytes = 0
        self.frozen = False               # outbox[0] must be retried as is (OpenSSL's rule after WANT_WRITE)
        # The phase's deadline bounds how long the client may take to send (its handshake, its next
        # request, the rest of a head, a lingering close).  It does not run while the server answers
        # (busy, watch) or while answers wait to leave: then only --write-timeout applies, to a
        # client that stops reading, and the phase's clock starts again once the client has them all.
        self.deadline = now + server.settings.tls_handshake_timeout
        self.stalled_since = math.inf     # when the client last stopped taking what is written to it
        self.idle_since = now
        self.linger_after = False         # after the last byte: read and drop what the client still sends
        self.read_closed = False          # the client closed its side (its last request is still answered)
        self.interest = 0                 # the selector events registered now
        self.watch: Optional[OpenWatch] = None
        self.lingered = 0
        self.open = True

    @property
    def evictable(self) -> bool:
        """Holds a slot without work in progress: a handshake or a head not finished, waiting for a
        request, or lingering.  Such a connection is closed first when a new one needs its slot."""
        return self.phase in (HANDSHAKE, IDLE, HEAD, LINGER) and not self.outbox

    def want(self, interest: int) -> None:
        """Register the events this connection waits for now (only when they change: a system call)."""
        if interest == self.interest or not self.open:
            return
        selector = self.server.selector
        if self.interest == 0:
            selector.register(self.fd, interest, self)
        elif interest == 0:
            selector.unregister(self.fd)
        else:
            selector.modify(self.fd, interest, self)
        self.interest = interest

    def ready(self, events: int) -> None:
        """The selector says the socket is readable or writable."""
        if self.phase == HANDSHAKE:
            self.handshake()
            return
        if events & selectors.EVENT_WRITE:
            self.flush()
        if self.open and events & selectors.EVENT_READ:
            self.pump()

    def expire(self, now: float) -> None:
        """Called by the sweep: enforce the phase's deadline and the write deadline."""
        if self.stalled_since + self.server.settings.write_timeout <= now:
            self.cut_off(f"its client read nothing for {self.server.settings.write_timeout:g}s (--write-timeout)")
        elif self.deadline <= now and not self.outbox:
            if self.phase == HEAD and self.tls is not None:
                self.refuse(BadRequest(408, "Timeout", f"the request head did not arrive within "
                                                       f"{self.server.settings.read_header_timeout:g}s"))
            else:
                if self.phase == HANDSHAKE:
                    self.server.metrics.increment("tls_handshake_failures_total")
                self.close()

    # -- the handshake ---------------------------------------------------------------------------

    def handshake(self) -> None:
        """The TLS handshake, a step each time the socket is ready, within --tls-handshake-timeout."""
        server = self.server
        if self.tls is None:
            try:
                first = self.sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                first = b""
            if first != b"\x16":
                if first:
                    server.metrics.increment("tls_handshake_failures_total")
                    if first.isalpha():
                        try:
                            self.sock.send(PLAIN_HTTP_ON_TLS_PORT)
                        except OSError:
                            pass
                    server.log.log("debug", "not a TLS client", remote=self.remote)
                self.close()
                return
            try:
                self.tls = server.tls_context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            except (ssl.SSLError, OSError):
                self.close()
                return
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self.want(selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self.want(selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as error:
            self.handshake_failed(error)
            return
        try:
            self.peer = peer_certificate(self.tls, server.introspection)
        except (ValueError, ssl.SSLError):
            self.peer = None
        self.verifies = self.tls.context.verify_mode != ssl.CERT_NONE
        self.become_idle(time.monotonic())
        self.pump()                           # a request may have come with the handshake's last flight

    def handshake_failed(self, error: Exception) -> None:
        server = self.server
        server.metrics.increment("tls_handshake_failures_total")
        text, log, remote = str(error), server.log, self.remote
        if "certificate verify failed" in text or "CERTIFICATE_VERIFY_FAILED" in text:
            log.log("warning", "TLS handshake failed: the client's certificate is not signed by a CA "
                        "reqapi trusts (requestheader or client CA); if this is kube-apiserver, reqapi has "
                        "the wrong --requestheader-client-ca-file", remote=remote, error=text)
        elif "alert unknown ca" in text or "alert bad certificate" in text or "alert certificate" in text:
            log.log("warning", "TLS handshake failed: the client does not trust reqapi's serving "
                        "certificate; if this is kube-apiserver, the APIService's caBundle is not the CA that "
                        "signed --cert, or the certificate lacks the SAN <service>.<namespace>.svc",
                    remote=remote, error=text)
        else:
            log.log("debug", "TLS handshake failed", remote=remote, error=text)
        self.close()

    # -- reading and answering -------------------------------------------------------------------

    def become_idle(self, now: float) -> None:
        self.phase, self.idle_since = IDLE, now
        # A draining server still gives a request already on its way a short last chance.
        self.deadline = now + (0.5 if self.server.health.draining else self.server.settings.idle_timeout)

    def start_head(self) -> None:
        self.phase = HEAD
        self.deadline = time.monotonic() + self.server.settings.read_header_timeout

    def become_busy(self) -> None:
        """Answering a request (then, perhaps, streaming a watch): no phase deadline runs."""
        self.phase, self.deadline = BUSY, math.inf

    def pump(self) -> None:
        """Read what the client sent, answer the complete requests among it (in order), and write:
        until the client has nothing more for now, or the answers wait for it to read.  The socket
        is read once a call (see read()); select() says when it has more."""
        unread = True
        while self.open:
            if self.phase == LINGER:
                self.drop_input()
                return
            if self.phase in (IDLE, HEAD) and self.scanned < len(self.inbox) and self.may_take_request():
                self.take_requests()
                continue
            if self.phase == WATCH and self.inbox:
                self.watch_input()
                if not self.open or self.phase != WATCH:
                    continue
            # Read more only when it can be used: not while a worker answers, nor past the high water.
            reading = unread and self.phase in (IDLE, HEAD, WATCH) and self.outbox_bytes < HIGH_WATER \
                and len(self.inbox) < MAX_INBOX and not self.read_closed
            if not reading or not self.read():
                break
            unread = False
        if self.open:
            self.server.flush_later(self)

    def too_big_for_the_queues(self, size: int) -> bool:
        """An answer that must be refused now (see SMALL_ANSWER)."""
        return size > SMALL_ANSWER and self.server.queued + size > QUEUED_LIMIT

    def may_take_request(self) -> bool:
        """Room for another answer: under HIGH_WATER, and while the queues are over QUEUED_LIMIT,
        only with nothing queued (its own answers leave first; its flush takes the next request)."""
        return self.outbox_bytes < HIGH_WATER and (self.server.queued < QUEUED_LIMIT or not self.outbox)

    def read(self) -> bool:
        """One recv() (a TLS record: OpenSSL reads its header and its body from the socket), and
        the rest of the record if OpenSSL holds some.  True if bytes arrived; a close by the client
        is handled here.  The socket is not read again until select() says it is readable: reading
        on until it is empty took a third system call per request, which failed (EAGAIN) and raised
        SSLWantReadError (measured with wrk at 16 connections: ~38 against ~29 µs a request)."""
        try:
            data = self.tls.recv(READ_SIZE)
            while data and self.tls.pending():
                data += self.tls.recv(READ_SIZE)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
            return False
        except (OSError, ssl.SSLError):
            self.close()
            return False
        if not data:
            # The client closed its side: answer what it sent (a client may send its request and
            # shut its write side), then close.  An idle connection closes now.
            self.read_closed = True
            if self.phase == WATCH:
                self.end_watch(False)
            elif self.phase == HEAD or (self.phase == IDLE and not self.outbox):
                self.close()                  # half a head will never be completed
            elif self.phase == IDLE:
                self.phase = CLOSING
            return False
        if self.phase == IDLE:
            self.start_head()
        self.inbox += data
        return True

    def take_requests(self) -> None:
        """Answer the complete heads in the inbox, in order, while the answers fit under the high
        water; the start of an unfinished one waits for more bytes within --read-header-timeout."""
        inbox = self.inbox
        while self.open and self.phase in (IDLE, HEAD) and self.may_take_request():
            start = 0
            while inbox.startswith(b"\r\n", start):    # tolerated between pipelined requests (RFC 9112 §2.2)
                start += 2
            if start:
                del inbox[:start]
                self.scanned = max(0, self.scanned - start)
            if not inbox:
                self.become_idle(time.monotonic())
                return
            if self.phase == IDLE:
                self.start_head()
            # Search only what was not searched before (3 bytes back: the end may straddle reads),
            # so a head trickled a byte at a time costs linear time, not quadratic.
            end = inbox.find(b"\r\n\r\n", max(0, self.scanned - 3))
            try:
                if end > MAX_HEAD_BYTES or (end < 0 and len(inbox) > MAX_HEAD_BYTES):
                    raise BadRequest(431, "RequestHeaderFieldsTooLarge",
                                     f"the request head is larger than {MAX_HEAD_BYTES} bytes")
                if end < 0:
                    if len(inbox) > MAX_REQUEST_LINE and inbox.find(b"\r\n", 0, MAX_REQUEST_LINE + 2) < 0 and \
                            inbox.find(b"?", 0, MAX_REQUEST_LINE) < 0:
                        raise BadRequest(414, "RequestURITooLong",
                                         f"the request line is longer than {MAX_REQUEST_LINE} bytes before its query")
                    since = max(0, self.scanned - 2)
                    if inbox.find(b"\n\n", since) >= 0 or inbox.find(b"\n\r\n", since) >= 0:
                        # A head whose lines end with a bare LF would never end: refuse it now, not at
                        # the read-header timeout.
                        raise BadRequest(400, "BadRequest", "request head lines must end with CRLF, not a bare LF")
                    self.scanned = len(inbox)
                    if self.read_closed:
                        self.close()
                    return
                head = bytes(inbox[:end])
                del inbox[:end + 4]
                self.scanned = 0
                self.answer(head)
                if not inbox:
                    return                  # the answer set the phase (idle, closing, busy or watch)
            except BadRequest as error:
                self.refuse(error)
                return

    def refuse(self, error: BadRequest) -> None:
        """Answer a request that cannot be parsed or did not arrive in time; close after lingering."""
        server = self.server
        self.inbox.clear()
        self.send(server.encoder.encode(error.response(), True, "GET"))
        server.metrics.observe("UNKNOWN", "", error.code, 0.0)
        server.log.log("info", "bad request", status=error.code, remote=self.remote)
        self.phase, self.linger_after = CLOSING, True
        self.flush()

    def answer(self, head: bytes) -> None:
        """Parse and handle one request: from the answer memo, here, or in a worker when it may
        wait on the network."""
        server = self.server
        started = time.perf_counter()
        memo_key: Optional[MemoKey] = None
        state: tuple[Any, ...] = ()
        if not server.delegated and not server.health.draining and (self.verifies or not server.access.enabled):
            key_head, audit_id = head_without_audit_id(head)
            memo_key = (self.peer, key_head, audit_id is not None)
            state = server.memo_state()
            entry = server.memo.get(state, memo_key)
            if entry is not None and not self.too_big_for_the_queues(len(entry.body)):
                self.become_busy()
                audit_id = entry.audit_id if audit_id is None else audit_id
                self.send(ResponseEncoder.reuse(entry.head, entry.body, audit_id))
                record_answer(server.log, server.metrics, entry.method, entry.path, audit_id, entry.identity,
                              entry.verb, entry.resource, 200, time.perf_counter() - started, self.remote)
                self.after_answer(False)
                return
        request = parse_head(head)
        close = not request.keep_alive
        if request.has_body:
            # reqapi takes no bodies; closing is the only safe way to skip one we will not read.
            close = True
            self.linger_after = True
        if not self.verifies and server.access.enabled:
            close = True            # opened before client certificates were asked for: reconnect
        self.become_busy()
        if server.delegated and server.api.may_block(request):
            if server.busy < server.max_busy:
                server.answer_in_worker(self, request, close, started)
                return
            refusal = HTTPError.too_many_requests(
                f"{server.busy} requests are waiting for kube-apiserver to authorize them (SubjectAccessReviews), "
                f"the most reqapi lets wait; try again later", 1)
            self.deliver(request, Outcome(refusal.response(), ANONYMOUS, request.method, ""), close, started)
            return
        self.deliver(request, server.api.handle(request, self.peer), close, started, memo_key, state)

    def handed_back(self, request: Request, outcome: Outcome, close: bool, started: float) -> None:
        """A worker's answer, back in the loop."""
        if not self.open:
            if isinstance(outcome.result, WatchStream):
                getattr(outcome.result.events, "close", lambda: None)()
            return
        self.deliver(request, outcome, close, started)
        self.pump()

    def deliver(self, request: Request, outcome: Outcome, close: bool, started: float,
                memo_key: Optional[MemoKey] = None, state: tuple[Any, ...] = ()) -> None:
        """Send an answer (kept in the answer memo when it may be: see AnswerMemo), or start a watch."""
        server = self.server
        if server.health.draining:
            close = True
        result = outcome.result
        if isinstance(result, WatchStream):
            self.start_watch(request, outcome, result, close, started)
            return
        if self.too_big_for_the_queues(len(result.body)):
            result = HTTPError.too_many_requests(
                f"reqapi's send queues are full ({QUEUED_LIMIT // 2**20} MiB of answers wait for clients that read "
                f"slowly or not at all): a {len(result.body)}-byte answer must wait; try again later", 1).response()
        if memo_key is not None and outcome.reusable and not close and result.code == 200:
            head, body = server.encoder.reusable(result, request.method)
            server.memo.put(state, memo_key, MemoEntry(head, body, request.method, request.path, request.audit_id,
                                                       outcome.identity, outcome.verb, outcome.resource))
            self.send(ResponseEncoder.reuse(head, body, request.audit_id))
        else:
            self.send(server.encoder.encode(result, close, request.method, request.audit_id))
        record_request(server.log, server.metrics, request, outcome.identity, outcome.verb, outcome.resource,
                       result.code, time.perf_counter() - started, self.remote)
        self.after_answer(close)

    def after_answer(self, close: bool) -> None:
        if close:
            self.phase = CLOSING
            self.inbox.clear()
        elif self.inbox:
            self.start_head()
        else:
            self.become_idle(time.monotonic())

    # -- watches ---------------------------------------------------------------------------------

    def start_watch(self, request: Request, outcome: Outcome, stream: WatchStream, close: bool,
                    started: float) -> None:
        server = self.server
        encoder = server.encoder
        if not server.watch_opened(self):
            # As kube-apiserver's inflight limit: 429 with Retry-After, and the client tries again.
            getattr(stream.events, "close", lambda: None)()
            error = HTTPError.too_many_requests(
                f"too many open watches ({server.settings.max_watches}, --max-watches); try again later",
                RETRY_AFTER_WATCHES)
            self.send(encoder.encode(error.response(), close, request.method, request.audit_id))
            record_request(server.log, server.metrics, request, outcome.identity, outcome.verb, outcome.resource,
                           429, time.perf_counter() - started, self.remote)
            self.after_answer(close)
            return
        self.watch = OpenWatch(stream, encoder, request, outcome, started, close)
        self.phase = WATCH
        if stream.upgrade is not None:
            self.send(encoder.websocket_head(stream.upgrade))
        else:
            self.send(encoder.watch_head(stream.content_type, request.audit_id))
        if request.method == "HEAD":
            self.end_watch(True, ending=False)   # a HEAD answer has no body, not even a last chunk

    def feed_watch(self) -> int:
        """Take the events the stream has now, up to the watch's high water (the rest waits in the
        stream, unencoded, until the client reads).  How many were taken."""
        watch = self.watch
        taken = 0
        while self.outbox_bytes < WATCH_HIGH_WATER and taken < EVENTS_PER_TURN and self.server.queued < QUEUED_LIMIT:
            try:
                event = next(watch.events)
            except StopIteration:
                self.end_watch(True)
                return taken + 1
            if event is None:
                break                             # nothing more now
            self.send(watch.frame(event))
            taken += 1
        return taken

    def watch_input(self) -> None:
        """Bytes from a watching client.  Over a chunked watch they are its next request, kept for
        when the watch ends (too many, and the client is cut off).  Over a WebSocket they are frames:
        pings and closes are answered (RFC 6455 section 5.5), other frames dropped, as
        k8s.io/apiserver does."""
        if not self.watch.websocket:
            if len(self.inbox) > MAX_HEAD_BYTES:
                self.end_watch(False)
            return
        frames, rest = websocket_client_frames(bytes(self.inbox))
        self.inbox = bytearray(rest)
        encoder = self.server.encoder
        for opcode, payload in frames:
            if opcode == WS_CLOSE:
                self.send(encoder.websocket_frame(payload[:2], WS_CLOSE))
                self.end_watch(True, ending=False)
                return
            if opcode == WS_PING:
                self.send(encoder.websocket_frame(payload[:125], WS_PONG))
        if len(self.inbox) > MAX_HEAD_BYTES:
            self.end_watch(False)

    def end_watch(self, ok: bool, ending: bool = True) -> None:
        """The watch is over: its last chunk or close frame, its log line and metrics; the connection
        carries another request only after a complete chunked watch."""
        server, watch = self.server, self.watch
        self.watch = None
        server.watch_closed(self)
        watch.stop()
        if ok and ending and watch.request.method != "HEAD":
            self.send(watch.ending)
        request, outcome = watch.request, watch.outcome
        record_request(server.log, server.metrics, request, outcome.identity, outcome.verb, outcome.resource,
                       101 if watch.websocket else 200, time.perf_counter() - watch.started, self.remote)
        if not ok:
            self.close()
            return
        self.after_answer(watch.close or watch.websocket or self.read_closed or server.health.draining)

    # -- writing and closing ---------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue bytes (a big answer in WRITE_SLICE pieces, views of it); flush() writes them."""
        if data:
            if len(data) > WRITE_SLICE:
                view = memoryview(data)
                self.outbox.extend(view[start:start + WRITE_SLICE] for start in range(0, len(data), WRITE_SLICE))
            else:
                self.outbox.append(data)
            self.outbox_bytes += len(data)
            self.server.queue(len(data))

    def flush(self) -> None:
        """Write what the client can take now; a watch then takes more events, a few rounds at most
        before the loop turns to other connections.  Then wait for what the connection needs next."""
        rounds = 0
        while True:
            if self.outbox and not self.write():
                return                                  # closed
            if self.outbox or self.phase != WATCH or rounds == 4:
                break
            rounds += 1
            if self.feed_watch() == 0 or not self.open:
                break                                   # the stream has nothing now
        if not self.open:
            return
        if self.outbox:
            self.want(selectors.EVENT_WRITE | (selectors.EVENT_READ if self.phase == WATCH else 0))
            return
        if rounds == 4 and self.phase == WATCH:
            self.server.hand(self.flush_if_open)        # more now: after the others had a turn
        if self.phase == CLOSING:
            if self.linger_after:
                self.start_linger()
            else:
                self.close()
            return
        if self.phase in (IDLE, HEAD, WATCH) and self.scanned < len(self.inbox):
            # Requests that waited for the answers before them to leave (the socket will not
            # signal them again; read() leaves nothing in OpenSSL).
            self.server.hand(self.pump_if_open)
        wants_input = self.phase in (IDLE, HEAD, WATCH, LINGER) and not self.read_closed \
            and len(self.inbox) < MAX_INBOX
        self.want(selectors.EVENT_READ if wants_input else 0)

    def flush_if_open(self) -> None:
        if self.open:
            self.flush()

    def pump_if_open(self) -> None:
        if self.open:
            self.pump()

    def write(self) -> bool:
        """Send the queued bytes until the socket takes no more.  Small answers queued together
        (pipelined requests, watch events) leave in one write of up to ~WRITE_SLICE; a TLS write
        cut short is retried with the same bytes.  False if the connection broke (it is closed)."""
        outbox = self.outbox
        stalled = self.stalled_since < math.inf
        while outbox:
            if not self.frozen and len(outbox) > 1 and len(outbox[0]) < WRITE_SLICE:
                joined, size = [], 0
                while outbox and size < WRITE_SLICE:
                    piece = outbox.popleft()
                    joined.append(piece)
                    size += len(piece)
                outbox.appendleft(b"".join(joined))
            data = outbox[0]
            try:
                self.tls.send(data)        # without SSL_MODE_ENABLE_PARTIAL_WRITE: all of it, or WANT_WRITE
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                self.frozen = True
                if self.stalled_since == math.inf:
                    self.stalled_since = time.monotonic()
                return True
            except (OSError, ssl.SSLError):
                self.close()
                return False
            self.frozen = False
            outbox.popleft()
            self.outbox_bytes -= len(data)
            self.server.queue(-len(data))
            self.stalled_since = math.inf    # progress: a stall counts from the next one
        if stalled:
            # The client has every answer only now: the wait for its next request starts now.
            if self.phase == IDLE:
                self.become_idle(time.monotonic())
            elif self.phase == HEAD:
                self.start_head()
        return True

    def start_linger(self) -> None:
        """Close after an error answer without losing it: a client still sending (a body we will
        not read, an oversized head) would otherwise get a TCP reset that can discard the answer
        before it reads it.  Send FIN, then read and drop what comes, for a second at most."""
        try:
            self.tls.shutdown(socket.SHUT_WR)      # the TLS layer is done; what follows is TCP
        except OSError:
            self.close()
            return
        self.phase, self.deadline = LINGER, time.monotonic() + LINGER_SECONDS
        self.want(selectors.EVENT_READ)
        self.drop_input()

    def drop_input(self) -> None:
        while self.lingered < LINGER_BYTES:
            try:
                data = self.tls.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except OSError:
                break
            if not data:
                break
            self.lingered += len(data)
        self.close()

    def cut_off(self, why: str) -> None:
        """Close a connection whose client stopped reading, saying so: what it was sent was cut short."""
        self.server.log.log("info", "connection closed with answers unsent", remote=self.remote,
                            unsent_bytes=self.outbox_bytes, reason=why)
        self.close()

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        if self.interest:
            try:
                self.server.selector.unregister(self.fd)
            except (KeyError, ValueError):
                pass
            self.interest = 0
        if self.watch is not None:
            watch, self.watch = self.watch, None
            self.server.watch_closed(self)
            watch.stop()
            request, outcome = watch.request, watch.outcome
            record_request(self.server.log, self.server.metrics, request, outcome.identity, outcome.verb,
                           outcome.resource, 101 if watch.websocket else 200, time.perf_counter() - watch.started,
                           self.remote)
        for sock in (self.tls, self.sock):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self.server.queue(-self.outbox_bytes)
        self.outbox.clear()
        self.outbox_bytes = 0
        self.inbox = bytearray()
        self.server.forget(self)


class ReqapiServer(socketserver.TCPServer):
    """The one server object: the listening socket, one event loop over every connection, the
    registry of open connections and watches, and the current TLS context (swapped on rotation;
    each connection takes the one current at its handshake).

    Of the standard library it uses socketserver.TCPServer for what it really does — create the
    socket, SO_REUSEADDR, bind, listen, and accept (get_request) — plus selectors (epoll), ssl's
    non-blocking SSLSocket, and worker threads for the one kind of work that blocks.  Not
    used: TCPServer's serve_forever/process_request and its handler classes (a call per
    connection), http.server.HTTPServer (it adds only a reverse-DNS lookup of the bind address to
    TCPServer) and BaseHTTPRequestHandler (its email-based header parsing cost 23.5 µs a head
    against parse_head's 7.6 µs, and it writes a head and a body in two sends: a ~44 ms
    delayed-ACK stall per keep-alive response).

    Why one loop and not a thread per connection (what reqapi had first): measured on one core
    with wrk at 16 TLS keep-alive connections, threads served 16-17.5k GETs/s at a p99 of 5-10 ms,
    most of each ~58 µs request spent handing the GIL between threads; and each connection held a
    thread and ~93 KB.  In this loop a request on an open connection is read, answered and written
    by one thread without a hand-off, and an idle connection or an open watch costs only its TLS
    state (tests/bench.py prints the figures beside Go/gin).

    What else a request costs, and what was cut (each measured on one core with wrk at 16
    connections; a GET of an object took ~165 µs of CPU in this loop at first, beside gin's ~45):
    - the answer memo (AnswerMemo): a head asked again within the second is answered from the
      kept bytes, without parsing, routing, identity or encoding (~45 µs of Python);
    - one read of the socket per readiness (see Connection.read: a third system call and an
      exception per request went);
    - answers written at the end of the loop's turn, after every ready connection was read: the
      client wakes once for several answers (a write that wakes a sleeping peer costs the most of
      all, in the kernel).
    Memory BIOs (ssl.MemoryBIO, one recv() per request instead of OpenSSL's two) were tried and
    dropped: no faster than the above, and each keeps the size of the largest record that passed
    through it for the connection's life (~20 KiB a connection, where OpenSSL frees its own buffers).

    Threads other than the loop's: none for TLS handshakes (they run in the loop, a step per
    readable socket: cheaper than a hand-off to a thread and back); a request that may wait on
    the network — authorization by SubjectAccessReview when --authorization-mode=Delegated — is
    answered by a worker (WORKERS of them), and the answer handed back to the loop.  At most
    max_busy such requests wait at once (WORKERS answering, 64 more queued, and never more than a
    quarter of --max-connections): more are answered 429 at once.  Without that bound, a
    kube-apiserver that stopped answering held every slot in a queue 10 s a review deep, and the
    kubelet's probes found none."""

    allow_reuse_address = True
    WORKERS = 8

    def __init__(self, address: tuple[str, int], settings: TransportSettings, tls_context: ssl.SSLContext,
                 introspection: TLSIntrospection, api: Api, log: Logger) -> None:
        self.settings = settings
        self.tls_context = tls_context        # read at each handshake; replaced only by use_tls_context()
        self.introspection = introspection
        self.api = api
        self.access, self.health, self.metrics, self.log = api.access, api.health, api.metrics, log
        self.encoder = ResponseEncoder()
        self.memo = AnswerMemo()
        # Connections whose answers are written once every ready connection has been read: the
        # client then wakes once for several answers, not once per answer (measured on one core
        # with wrk at 16 connections: ~80 instead of ~97 µs a request, and a lower p99).
        self._unflushed: list[Connection] = []
        self.request_queue_size = min(4096, max(128, settings.max_connections))
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        # The registry, changed by the loop thread only (through accept, evict and forget).
        self.connections: dict[int, Connection] = {}
        self.watches: set[Connection] = set()
        self.busy = 0                      # requests handed to a worker and not yet answered
        self.max_busy = self.WORKERS + min(64, settings.max_connections // 4)
        self.queued = 0                    # bytes waiting in every connection's outbox
        self.accepted = 0                  # len(connections), for other threads to read
        self.accepting = True
        # Whether a request may wait on the network (read once: a plain attribute on the hot path).
        self.delegated = api.access.may_block
        # Work for the worker threads; None tells one to end.  (Not a ThreadPoolExecutor: it refuses
        # new work once the main thread has finished, and `python3 reqapi.py` serves after that.)
        self._work_queue: queue.SimpleQueue[Optional[Callable[[], None]]] = queue.SimpleQueue()
        self._generation = api.storage.history.current    # the rules the watches have seen
        self._next_sweep = 0.0
        self._sweep_interval = max(0.05, min(0.25, settings.tls_handshake_timeout / 8,
                                             settings.read_header_timeout / 8))
        # Work handed to the loop (answers from workers, drain steps, a watch's next turn), and the
        # socket pair whose one byte wakes the loop's select() when another thread hands it work.
        self._handed: deque[Callable[[], None]] = deque()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._stopped = threading.Event()
        self._drained = threading.Event()
        self.selector = selectors.DefaultSelector()
        for index, (name, help_text) in enumerate((("requests_in_flight", "Requests being answered by a worker now."),
                                                   ("watches_open", "Watches open now."),
                                                   ("connections_open", "TLS connections open now."))):
            self.metrics.register_gauge(name, help_text, functools.partial(self._connection_state, index))
        super().__init__(address, None)   # type: ignore[arg-type]  # no handler class: the loop handles
        self.socket.setblocking(False)

    def memo_state(self) -> tuple[Any, ...]:
        """What the answers in the memo were made for: the rules generation, the authentication
        configuration (and whether one could be loaded) and the second."""
        access = self.access
        return self.api.storage.history.current, access.config, access.problem, int(time.time())

    # -- what other threads may call -------------------------------------------------------

    def use_tls_context(self, context: ssl.SSLContext) -> None:
        """New handshakes use `context`; connections already open keep theirs."""
        self.tls_context = context

    def wake(self) -> None:
        """Make the loop look at the world now (new rules for the watches, a drain)."""
        try:
            self._wake_writer.send(b"\0")
        except OSError:
            pass                            # a wake-up is already pending (or the loop is gone)

    def hand(self, work: Callable[[], None]) -> None:
        """Run `work` in the loop's thread, at its next turn."""
        self._handed.append(work)           # deque.append is atomic: the loop pops from the other end
        if threading.current_thread() is not self._loop_thread:
            self.wake()

    def stop_accepting(self) -> None:
        self.hand(self._stop_accepting)

    def wait_until_drained(self, timeout: float) -> bool:
        return self._drained.wait(timeout)

    def stop(self) -> None:
        """End the loop (after a drain); connections still open are closed."""
        self._stopped.set()
        self.wake()

    def connection_states(self) -> tuple[int, int, int]:
        """(open, busy, watching) connections."""
        return self.accepted, self.busy, len(self.watches)

    def _connection_state(self, index: int) -> int:
        # Gauges are read in this order: requests_in_flight (busy), watches_open, connections_open.
        open_, busy, watching = self.connection_states()
        return (busy, watching, open_)[index]

    # -- the loop ----------------------------------------------------------------------------

    _loop_thread: Optional[threading.Thread] = None

    def serve_forever(self, poll_interval: float = 0.5) -> None:   # (TCPServer's signature; not used)
        """The event loop: runs in one thread until stop()."""
        self._loop_thread = threading.current_thread()
        selector = self.selector
        selector.register(self.socket.fileno(), selectors.EVENT_READ, None)
        selector.register(self._wake_reader.fileno(), selectors.EVENT_READ, self._wake_reader)
        if self.delegated:
            for index in range(self.WORKERS):
                threading.Thread(target=self._worker, name=f"worker-{index}", daemon=True).start()
        history = self.api.storage.history
        try:
            while not self._stopped.is_set():
                for key, events in selector.select(0 if self._handed or self._unflushed else self._sweep_interval):
                    conn = key.data
                    if conn is None:
                        self._accept()
                    elif conn is self._wake_reader:
                        self._woken()
                    else:
                        self._contained(conn, conn.ready, events)
                self._flush_unflushed()
                for _ in range(len(self._handed)):      # work handed during this turn waits for the next
                    work = self._handed.popleft()
                    try:
                        work()
                    except Exception:           # a bug: logged; the loop goes on serving
                        self.log.log("error", "transport work failed", traceback=traceback_text())
                self._flush_unflushed()
                if history.current is not self._generation or history.closed:
                    self._generation = history.current
                    self._resume_watches()
                now = time.monotonic()
                if now >= self._next_sweep:
                    self._next_sweep = now + self._sweep_interval
                    self._sweep(now)
        finally:
            for conn in list(self.connections.values()):
                conn.close()
            for _ in range(self.WORKERS if self.delegated else 0):
                self._work_queue.put(None)
            selector.close()

    def _woken(self) -> None:
        try:
            while self._wake_reader.recv(4096):
                pass
        except OSError:
            pass

    def _stop_accepting(self) -> None:
        if self.accepting:
            # Take what already waits in the backlog first: those clients finished their TCP
            # handshake and will send a request, which closing the listener would reset.
            while len(self.connections) < self.settings.max_connections and self._accept():
                pass
            self.accepting = False
            self.selector.unregister(self.socket.fileno())
            self.socket.close()
            self._check_drained()

    def _check_drained(self) -> None:
        if not self.accepting and not self.connections:
            self._drained.set()

    def _accept(self) -> bool:
        """Take the connections waiting in the backlog (64 at most per turn).  False once it is empty."""
        now = time.monotonic()
        for _ in range(64):
            try:
                sock, address = self.get_request()
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as error:          # EMFILE, ENFILE, ENOBUFS: try again at the next turn
                self.log.log("warning", "accept failed", error=str(error))
                self.metrics.increment("connections_rejected_total")
                return False
            if len(self.connections) >= self.settings.max_connections and not self._evict():
                # Full of connections with work in progress: close the new one at once rather than
                # grow memory without bound.
                self.metrics.increment("connections_rejected_total")
                sock.close()
                continue
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # The kernel's send buffer grows to 4 MiB a socket by default, and a cgroup is charged
                # for it: a client that stops reading must not park megabytes there either.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
                # TCP keep-alive finds peers that vanished without a FIN (a watch writes nothing for long).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
                    if hasattr(socket, option):
                        sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
            except OSError:
                sock.close()                  # reset before we got to it
                continue
            conn = Connection(self, sock, f"{address[0]}:{address[1]}", now)
            self.connections[conn.fd] = conn
            self.accepted = len(self.connections)
            conn.want(selectors.EVENT_READ)
        return True

    def _evict(self) -> bool:
        """Make room for a new connection by closing the one that has waited longest without work
        in progress (an unfinished handshake or head, or an idle keep-alive); failing that, the one
        whose client has left its answers unread longest (else such clients, one per slot, would
        keep the kubelet's probes out until --write-timeout; one stalled for less than STALL_GRACE may
        be a client that keeps reading).  False if none can go."""
        oldest: Optional[Connection] = None
        stalled: Optional[Connection] = None
        since = time.monotonic() - STALL_GRACE
        for conn in self.connections.values():
            if conn.evictable:
                if oldest is None or conn.idle_since < oldest.idle_since:
                    oldest = conn
            elif conn.stalled_since <= since and (stalled is None or conn.stalled_since < stalled.stalled_since):
                stalled = conn
        if oldest is not None:
            self.metrics.increment("connections_evicted_total")
            oldest.close()
        elif stalled is not None:
            self.metrics.increment("slow_readers_cut_total")
            stalled.cut_off("a new connection needed its slot at --max-connections, and its client had stopped "
                            "reading longest")
        return oldest is not None or stalled is not None

    def queue(self, size: int) -> None:
        """Bytes queued in an outbox (or, negative, written or dropped)."""
        self.queued += size

    def _cut_slow_readers(self, now: float) -> None:
        """The queues hold more than half QUEUED_LIMIT: close the connections whose clients have
        taken nothing for STALL_GRACE, stalled longest first, until they hold less.  Connections
        whose clients keep reading are left alone."""
        stalled = sorted((conn for conn in self.connections.values() if conn.stalled_since <= now - STALL_GRACE),
                         key=lambda conn: conn.stalled_since)
        for conn in stalled:
            if self.queued <= QUEUED_LIMIT // 2:
                break
            self.metrics.increment("slow_readers_cut_total")
            conn.cut_off(f"the answers waiting for slow clients held more than half the transport's queue limit, "
                         f"and its client had taken nothing for {now - conn.stalled_since:.1f}s")

    def flush_later(self, conn: Connection) -> None:
        """Write `conn`'s answers at the end of this turn of the loop (see _unflushed)."""
        self._unflushed.append(conn)

    def _flush_unflushed(self) -> None:
        unflushed, self._unflushed = self._unflushed, []
        for conn in unflushed:
            if conn.open:
                self._contained(conn, conn.flush)

    def _contained(self, conn: Connection, step: Callable[..., None], *args: Any) -> None:
        """Run one step of `conn`'s work; a bug in it closes that connection (logged with its
        traceback), and the others are served."""
        try:
            step(*args)
        except Exception:
            self.log.log("error", "connection handler failed", remote=conn.remote, traceback=traceback_text())
            conn.close()

    def forget(self, conn: Connection) -> None:
        """A connection closed: out of the registry."""
        if self.connections.get(conn.fd) is conn:
            del self.connections[conn.fd]
            self.accepted = len(self.connections)
        self._check_drained()

    def watch_opened(self, conn: Connection) -> bool:
        """Count a new watch, or False when --max-watches are open."""
        if len(self.watches) >= self.settings.max_watches:
            self.metrics.increment("watches_rejected_total")
            return False
        self.watches.add(conn)
        return True

    def watch_closed(self, conn: Connection) -> None:
        self.watches.discard(conn)

    def answer_in_worker(self, conn: Connection, request: Request, close: bool, started: float) -> None:
        self.busy += 1
        self._work_queue.put(functools.partial(self._work, conn, request, close, started))

    def _worker(self) -> None:
        while True:
            work = self._work_queue.get()
            if work is None:
                return
            work()

    def _work(self, conn: Connection, request: Request, close: bool, started: float) -> None:
        # In a worker thread: only Api.handle runs here; the Connection is touched in the loop alone.
        try:
            outcome = self.api.handle(request, conn.peer)
        except BaseException as error:          # Api.handle answers every error itself; this is a bug
            outcome = Outcome(HTTPError.internal(type(error).__name__).response(), ANONYMOUS, request.method, "")
        self.hand(functools.partial(self._handed_back, conn, request, outcome, close, started))

    def _handed_back(self, conn: Connection, request: Request, outcome: Outcome, close: bool, started: float) -> None:
        self.busy -= 1
        conn.handed_back(request, outcome, close, started)

    def _sweep(self, now: float) -> None:
        """Enforce every connection's deadlines (handshake, idle, request head, write, linger), a few
        times a second; during a drain, close connections idle for more than half a second."""
        draining = self.health.draining
        if draining and self.accepting:
            self._stop_accepting()
        write_timeout = self.settings.write_timeout
        for conn in list(self.connections.values()):
            if conn.stalled_since + write_timeout <= now or conn.deadline <= now:
                self._contained(conn, conn.expire, now)
            elif draining and conn.phase == IDLE and not conn.outbox and now - conn.idle_since > 0.5:
                conn.close()
        if self.queued > QUEUED_LIMIT // 2:
            self._cut_slow_readers(now)
        if self.watches:
            self._resume_watches()                  # their timeouts
        self._check_drained()

    def _resume_watches(self) -> None:
        """The rules changed, the server drains, or a watch's time may be up: every watch whose
        client keeps up takes what its stream has."""
        for conn in list(self.watches):
            if not conn.outbox:
                conn.flush()


# ---------------------------------------------------------------------------
# 12. Runtime: configuration, reloads, start / wait / drain
# ---------------------------------------------------------------------------
# A frozen Config is built once from the flags; Runtime builds every owner of state, hands
# each its collaborators, and runs start / wait / drain; run() adds signals and interpreter
# tuning.  The Reloader changes state only through its owners' methods.

@dataclass(frozen=True)
class Config:
    """Everything the flags say, validated and resolved once (Config.from_args): the serving
    certificate (a throwaway self-signed one when none is given), whether this runs in a pod,
    and the defaults that depend on it.  Nothing changes it afterwards."""
    cert: str
    key: str
    self_signed: bool                  # cert/key were made at start-up, for a first try on a laptop
    port: int
    bind_address: str
    max_connections: int
    max_watches: int
    rules: Optional[str]
    reload_interval: float
    requestheader_client_ca_file: Optional[str]
    requestheader_allowed_names: tuple[str, ...]
    requestheader_username_headers: tuple[str, ...]      # lower-case
    requestheader_group_headers: tuple[str, ...]         # lower-case
    requestheader_extra_headers_prefix: tuple[str, ...]  # lower-case
    client_ca_file: Optional[str]
    authorization_mode: str
    authentication_refresh: float
    service_account_dir: str
    kube_url: Optional[str]            # kube-apiserver's URL when running in a pod, else None
    shutdown_delay: float
    shutdown_timeout: float
    tls_handshake_timeout: float
    read_header_timeout: float
    idle_timeout: float
    write_timeout: float
    watch_timeout: float
    history: Optional[HistorySettings] = None   # --prometheus-url and its companions; None: rules only

    IN_POD_SHUTDOWN_DELAY = 10.0       # time for the endpoints controller and kube-proxy to drop the pod

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Optional[dict[str, str]] = None) -> "Config":
        """Validate the flags together and resolve what they leave open.  Raises ConfigError."""
        environ = dict(os.environ if environ is None else environ)
        if bool(args.cert) != bool(args.key):
            raise ConfigError("--cert and --key go together: give both (PEM certificate and its private key), or "
                              "neither for a throwaway localhost certificate")
        cert, key, self_signed = args.cert, args.key, False
        if not cert:
            cert, key = make_self_signed_certificate()
            self_signed = True
        # In a pod: the service environment variables and a mounted ServiceAccount token, decided here once.
        sa_dir = args.service_account_dir
        kube_url = None
        if environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(os.path.join(sa_dir, "token")):
            host = environ["KUBERNETES_SERVICE_HOST"]
            host = f"[{host}]" if ":" in host else host
            kube_url = f"https://{host}:{environ.get('KUBERNETES_SERVICE_PORT', '443')}"
        if args.authorization_mode == "Delegated" and kube_url is None:
            raise ConfigError("--authorization-mode=Delegated sends SubjectAccessReviews to kube-apiserver and so "
                              "needs to run in a pod (KUBERNETES_SERVICE_HOST and a ServiceAccount token in "
                              f"{sa_dir}); use --authorization-mode=AlwaysAllow outside a cluster")

        def names(text: str, lower: bool = False) -> tuple[str, ...]:
            parts = (part.strip() for part in text.split(","))
            return tuple((part.lower() if lower else part) for part in parts if part)

        shutdown_delay = args.shutdown_delay
        if shutdown_delay is None:
            shutdown_delay = cls.IN_POD_SHUTDOWN_DELAY if kube_url else 0.0
        return cls(
            cert=cert, key=key, self_signed=self_signed, port=args.port, bind_address=args.bind_address,
            max_connections=args.max_connections, max_watches=args.max_watches, rules=args.rules, reload_interval=args.reload_interval,
            requestheader_client_ca_file=args.requestheader_client_ca_file,
            requestheader_allowed_names=names(args.requestheader_allowed_names),
            requestheader_username_headers=names(args.requestheader_username_headers, lower=True),
            requestheader_group_headers=names(args.requestheader_group_headers, lower=True),
            requestheader_extra_headers_prefix=names(args.requestheader_extra_headers_prefix, lower=True),
            client_ca_file=args.client_ca_file, authorization_mode=args.authorization_mode,
            authentication_refresh=args.authentication_refresh, service_account_dir=sa_dir, kube_url=kube_url,
            shutdown_delay=shutdown_delay, shutdown_timeout=args.shutdown_timeout,
            tls_handshake_timeout=args.tls_handshake_timeout, read_header_timeout=args.read_header_timeout,
            idle_timeout=args.idle_timeout, write_timeout=args.write_timeout, watch_timeout=args.watch_timeout,
            history=history_settings_from_args(args))


_MATCHER = re.compile(r'[A-Za-z_][A-Za-z0-9_]*\s*(=~|!~|!=|=)\s*"(?:[^"\\\n]|\\.)*"')
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def history_settings_from_args(args: argparse.Namespace) -> Optional[HistorySettings]:
    """The history flags, validated: None without --prometheus-url.  Raises ConfigError naming
    the flag, what is wrong and the fix."""
    url = getattr(args, "prometheus_url", None)
    companions = [flag for flag, value in (
        ("--prometheus-ca-file", args.prometheus_ca_file), ("--prometheus-client-cert", args.prometheus_client_cert),
        ("--prometheus-token-file", args.prometheus_token_file), ("--prometheus-username", args.prometheus_username),
        ("--history-cache-dir", args.history_cache_dir), ("--prometheus-matcher", args.prometheus_matcher),
        ("--prometheus-header", args.prometheus_header)) if value]
    if not url:
        if companions:
            raise ConfigError(f"{companions[0]} configures usage history, which needs --prometheus-url URL (the "
                              f"Prometheus-compatible API root, e.g. http://prometheus.monitoring:9090)")
        return None
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"--prometheus-url {url!r}: not an http(s) URL with a host; give the API root, e.g. "
                          f"http://prometheus.monitoring:9090 or https://mimir.example/prometheus")
    for flag, path in (("--prometheus-ca-file", args.prometheus_ca_file),
                       ("--prometheus-client-cert", args.prometheus_client_cert),
                       ("--prometheus-client-key", args.prometheus_client_key),
                       ("--prometheus-token-file", args.prometheus_token_file),
                       ("--prometheus-password-file", args.prometheus_password_file)):
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{flag} {path}: cannot be read; give a readable file (mounted from a Secret)")
    if bool(args.prometheus_client_cert) != bool(args.prometheus_client_key):
        raise ConfigError("--prometheus-client-cert and --prometheus-client-key go together: give both or neither")
    if bool(args.prometheus_username) != bool(args.prometheus_password_file):
        raise ConfigError("--prometheus-username and --prometheus-password-file go together (basic auth): give both")
    if args.prometheus_token_file and args.prometheus_username:
        raise ConfigError("--prometheus-token-file and --prometheus-username are two ways to authenticate: give one")
    headers = []
    for text in args.prometheus_header or []:
        name, sep, value = text.partition("=")
        if not sep or not _HEADER_NAME.fullmatch(name.strip()) or "\n" in value or "\r" in value:
            raise ConfigError(f"--prometheus-header {text!r}: expected NAME=VALUE, e.g. --prometheus-header "
                              f"X-Scope-OrgID=tenant-1")
        headers.append((name.strip(), value.strip()))
    matchers = tuple(text.strip() for text in args.prometheus_matcher or [])
    for text in matchers:
        if not _MATCHER.fullmatch(text):
            raise ConfigError(f"--prometheus-matcher {text!r}: not a PromQL label matcher; expected e.g. "
                              f"--prometheus-matcher 'cluster=\"prod\"' (=, !=, =~ or !~ and a double-quoted value)")
    as_of = None
    if args.history_as_of:
        try:
            as_of = utc_day(calendar_seconds(args.history_as_of)) + 1
        except ValueError:
            raise ConfigError(f"--history-as-of {args.history_as_of!r}: expected a UTC date YYYY-MM-DD (the last "
                              f"completed day to use)") from None
    if args.history_cache_dir and not (os.path.isdir(args.history_cache_dir) and
                                       os.access(args.history_cache_dir, os.W_OK)):
        raise ConfigError(f"--history-cache-dir {args.history_cache_dir}: not a writable directory; create it "
                          f"(an emptyDir or a PersistentVolume) or leave the flag out")
    if args.history_max_age < args.history_refresh:
        raise ConfigError(f"--history-max-age ({args.history_max_age:g}s) is shorter than --history-refresh "
                          f"({args.history_refresh:g}s): history would go stale between two refreshes; raise it")
    settings = HistorySettings(
        url=url, ca_file=args.prometheus_ca_file, cert_file=args.prometheus_client_cert,
        key_file=args.prometheus_client_key, token_file=args.prometheus_token_file,
        username=args.prometheus_username, password_file=args.prometheus_password_file, headers=tuple(headers),
        matchers=matchers, window_days=args.history_window, refresh=args.history_refresh,
        warmup=args.history_warmup, max_age=args.history_max_age, cache_dir=args.history_cache_dir,
        mode=args.history_mode, timeout=args.prometheus_timeout, max_samples=args.prometheus_max_samples,
        as_of=as_of)
    try:
        prometheus_ssl_context(settings)
    except (OSError, ssl.SSLError, ValueError) as error:
        raise ConfigError(f"--prometheus-ca-file/--prometheus-client-cert: {error}; give PEM files (the CA "
                          f"bundle that signed the engine's certificate, the client certificate and its key)") from None
    return settings


def calendar_seconds(date: str) -> float:
    """Unix seconds of a UTC date YYYY-MM-DD; ValueError if it is not one."""
    import calendar
    return float(calendar.timegm(time.strptime(date, "%Y-%m-%d")))


def pending_history(settings: HistorySettings) -> HistorySnapshot:
    """The snapshot served before the first refresh: the rules answer, the object says HistoryPending."""
    today = settings.as_of if settings.as_of is not None else utc_day(time.time() - HISTORY_SETTLE)
    return history_snapshot(HISTORY_PENDING, settings.mode, today, settings.window_days, ())


def read_ca_file(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            pem = handle.read()
    except OSError as error:
        raise ConfigError(f"{flag} {path}: {error.strerror}; give a readable PEM CA bundle") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {path}: not a PEM file (binary content); give a PEM CA bundle") from None
    try:
        if not pem_certificates(pem):
            raise ValueError
    except ValueError:
        raise ConfigError(f"{flag} {path}: holds no PEM certificate (-----BEGIN CERTIFICATE-----); give the "
                          f"CA bundle, e.g. /etc/kubernetes/pki/front-proxy-ca.crt") from None
    return pem


def auth_config_from_flags(config: Config) -> AuthConfig:
    """The authentication configuration the flags give (the CA files are read now)."""
    requestheader_ca = client_ca = ""
    if config.requestheader_client_ca_file:
        requestheader_ca = read_ca_file(config.requestheader_client_ca_file, "--requestheader-client-ca-file")
    if config.client_ca_file:
        client_ca = read_ca_file(config.client_ca_file, "--client-ca-file")
    return AuthConfig(source="flags", requestheader_ca=requestheader_ca,
                      allowed_names=config.requestheader_allowed_names,
                      username_headers=config.requestheader_username_headers,
                      group_headers=config.requestheader_group_headers,
                      extra_prefixes=config.requestheader_extra_headers_prefix,
                      client_ca=client_ca)


def service_account_name(token_file: str) -> str:
    """NS:NAME of the pod's ServiceAccount, read from its token's claims (no verification needed:
    it only fills in the hint printed when RBAC is missing)."""
    try:
        with open(token_file, encoding="utf-8") as handle:
            payload = handle.read().strip().split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        parts = claims.get("sub", "").split(":")
        if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
            return f"{parts[2]}:{parts[3]}"
    except (OSError, IndexError, ValueError, binascii.Error, UnicodeError, AttributeError):
        pass
    return "YOUR_NS:YOUR_SA"


def make_self_signed_certificate() -> tuple[str, str]:
    """A throwaway certificate for localhost/127.0.0.1, for a first try on a laptop."""
    import subprocess                 # here: see the imports at the top
    import tempfile
    directory = tempfile.mkdtemp(prefix="reqapi-")
    cert, key = os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key")
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
               "-days", "365", "-subj", "/CN=localhost", "-keyout", key, "-out", cert,
               "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
               "-addext", "basicConstraints=critical,CA:FALSE",
               "-addext", "keyUsage=critical,digitalSignature", "-addext", "extendedKeyUsage=serverAuth"]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=30)
    except FileNotFoundError:
        raise ConfigError("no --cert/--key given and the openssl command is not installed to make a throwaway "
                          "certificate: make a CA and serving certificate with ./gen_certs.sh --local and pass "
                          "--cert certs/apiservice.pem --key certs/apiservice-key.pem") from None
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        stderr = getattr(error, "stderr", b"") or b""
        raise ConfigError(f"openssl could not make a throwaway certificate ({stderr.decode(errors='replace').strip()}); "
                          f"use ./gen_certs.sh --local and pass --cert/--key") from None
    return cert, key


def file_signature(path: str) -> Optional[tuple[str, int, int, int, int]]:
    """What changes when a file is replaced — also through a ConfigMap/Secret volume's symlink swap."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (os.path.realpath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def file_digest(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return None


class Reloader:
    """Re-reads the rules, the serving certificate and the CA files when their content changes
    (polled every --reload-interval seconds, or at once on SIGHUP), and the in-cluster
    authentication ConfigMap every --authentication-refresh seconds.  A bad new file is refused
    and the last good one keeps serving."""

    def __init__(self, config: Config, server: ReqapiServer, storage: RequestsStorage, access: Access,
                 health: Health, metrics: Metrics, log: Logger, kube: Optional[KubeClient]) -> None:
        self.config = config
        self.server, self.history, self.access, self.health = server, storage.history, access, health
        self.metrics, self.log = metrics, log
        self.kube = kube                       # set: the authentication ConfigMap is read through it
        self.wake = threading.Event()
        self.stop = threading.Event()
        self._signatures: dict[str, tuple[Optional[tuple[str, int, int, int, int]], Optional[str]]] = {}
        self._next_auth_refresh = 0.0
        self.certificate = certificate_summary(config.cert)   # replaced only by reload_tls()
        metrics.register_gauge("serving_certificate_expiry_timestamp_seconds",
                               "notAfter of the serving certificate.", lambda: self.certificate.not_after)

    def start(self) -> None:
        for path in self.watched_files():
            self._signatures[path] = (file_signature(path), file_digest(path))
        threading.Thread(target=self.run, name="reloader", daemon=True).start()

    def watched_files(self) -> list[str]:
        config = self.config
        files = [config.rules] if config.rules else []
        files += [config.cert, config.key]
        files += [f for f in (config.requestheader_client_ca_file, config.client_ca_file) if f]
        return files

    def run(self) -> None:
        forced = False
        while not self.stop.is_set():
            try:
                self.check(forced)
            except Exception:          # never let the reloader die: log and try again next time
                self.log.log("error", "reload failed", traceback=traceback_text())
            forced = self.wake.wait(self.config.reload_interval)
            # Cleared before the files are read: a SIGHUP from now on wakes the next round.
            self.wake.clear()

    def changed(self, path: str, forced: bool) -> bool:
        """Has the file's content changed?  The cheap signature is compared first; the content
        only when the signature moved or a SIGHUP asked (so touching a file reloads nothing)."""
        signature = file_signature(path)
        old_signature, old_digest = self._signatures.get(path, (None, None))
        if signature == old_signature and not forced:
            return False
        digest = file_digest(path)
        self._signatures[path] = (signature, digest)
        return digest != old_digest

    def check(self, forced: bool = False) -> None:
        rules = self.config.rules
        if rules and self.changed(rules, forced):
            self.reload_rules()
        # Every TLS file is looked at (changed() records each one's new signature), not just
        # the files up to the first that changed.
        tls_changed = False
        for path in self.watched_files():
            if path != rules and self.changed(path, forced):
                tls_changed = True
        new_auth = None
        if self.kube is not None and (forced or time.monotonic() >= self._next_auth_refresh):
            new_auth = self.fetch_in_cluster_auth()
        elif tls_changed and self.access.config.source == "flags":
            try:
                new_auth = auth_config_from_flags(self.config)
            except ConfigError as error:
                self.refuse_tls(str(error))
                return
        if tls_changed or new_auth is not None:
            self.reload_tls(new_auth)

    def reload_rules(self) -> None:
        path = self.config.rules
        try:
            rules = load_rules(path)
        except RulesError as error:
            self.health.refuse_rules(str(error))
            self.metrics.reloaded("rules", "refused")
            self.log.log("error", "rules refused; the last good rules keep serving", error=str(error),
                         resourceVersion=self.history.current.resource_version)
            return
        self.health.accept_rules()
        if self.history.install(rules):
            self.server.wake()                  # the watches send the changes now
            self.metrics.reloaded("rules", "success")
            self.log.log("info", "rules reloaded", file=path, rules=len(rules.rules),
                         resourceVersion=self.history.current.resource_version, memory=size_text(rules.memory))

    def reload_tls(self, auth: Optional[AuthConfig] = None) -> None:
        """A new TLS context from the current files (and a new authentication configuration, if
        given).  Both take effect together, or neither does."""
        try:
            context = build_tls_context(self.config.cert, self.config.key, auth or self.access.config)
            summary = certificate_summary(self.config.cert)
        except ConfigError as error:
            self.refuse_tls(str(error))
            return
        if auth is not None:
            self.access.configure(auth)
            self.log.log("info", "authentication configuration loaded", source=auth.source,
                         allowed_names=",".join(auth.allowed_names) or "(any)",
                         username_headers=",".join(auth.username_headers), client_ca=bool(auth.client_ca))
        self.server.use_tls_context(context)
        self.health.accept_tls()
        self.certificate = summary
        self.metrics.reloaded("tls", "success")
        self.log.log("info", "TLS configuration reloaded: new handshakes use it", sans=",".join(summary.sans),
                     not_after=rfc3339(summary.not_after), authentication=self.access.config.source)

    def refuse_tls(self, message: str) -> None:
        self.health.refuse_tls(message)
        self.metrics.reloaded("tls", "refused")
        self.log.log("error", "TLS files refused; the previous certificate and CAs keep serving", error=message)

    def fetch_in_cluster_auth(self) -> Optional[AuthConfig]:
        """Read kube-system/extension-apiserver-authentication: the configuration if it changed."""
        try:
            answer = self.kube.call("GET", "/api/v1/namespaces/kube-system/configmaps/"
                                    "extension-apiserver-authentication")
            config = auth_config_from_configmap(answer.get("data") or {})
        except (OSError, ValueError) as error:
            self._next_auth_refresh = time.monotonic() + min(10.0, self.config.authentication_refresh)
            problem = f"Unable to get configmap/extension-apiserver-authentication in kube-system ({describe_http_error(error)})."
            if getattr(error, "code", None) in (401, 403):     # urllib.error.HTTPError
                problem += ("  Usually fixed by 'kubectl create rolebinding -n kube-system ROLEBINDING_NAME "
                            "--role=extension-apiserver-authentication-reader --serviceaccount="
                            f"{service_account_name(self.kube.token_file)}'")
            if not self.access.enabled:
                self.access.cannot_authenticate(problem)
                self.log.log("error", "not ready: no authentication configuration; identity headers are never "
                             "trusted without it", problem=problem)
            else:
                self.log.log("warning", "could not refresh the authentication configuration; the last one keeps "
                             "serving", problem=problem)
            return None
        self._next_auth_refresh = time.monotonic() + self.config.authentication_refresh
        return None if config == self.access.config else config


class Runtime:
    """A running reqapi: built and bound by the constructor (ConfigError if it cannot be), then
    start() starts its threads, and drain() shuts it down gracefully.  Signals and interpreter
    tuning are run()'s business, so a test can start and drain a Runtime in its own process."""

    def __init__(self, config: Config, log: Logger, rules: Rules) -> None:
        self.config, self.log = config, log
        introspection = require_tls_introspection()
        self.metrics = Metrics()
        self.metrics.register_gauge("log_lines_dropped", "Log lines dropped since start because stderr did not "
                                    "take them (nobody reading it, or too slowly).", lambda: log.dropped)
        history = None if config.history is None else pending_history(config.history)
        self.storage = RequestsStorage(RulesHistory(rules, history))
        kube = None
        if config.kube_url is not None:
            kube = KubeClient(config.kube_url, os.path.join(config.service_account_dir, "token"),
                              os.path.join(config.service_account_dir, "ca.crt"))
        self.access = Access(DelegatedAuthorizer(kube) if config.authorization_mode == "Delegated" and kube
                             else AlwaysAllow())
        kube_for_auth = None
        if config.requestheader_client_ca_file or config.client_ca_file:
            self.access.configure(auth_config_from_flags(config))
        elif kube is not None:
            self.access.cannot_authenticate("loading kube-system/extension-apiserver-authentication")
            kube_for_auth = kube
        self.health = Health(self.storage.history, self.access, self.metrics)
        self.api = Api(self.storage, self.access, self.health, self.metrics, log, config.watch_timeout)
        context = build_tls_context(config.cert, config.key, self.access.config)
        settings = TransportSettings(config.max_connections, config.max_watches, config.tls_handshake_timeout,
                                     config.read_header_timeout, config.idle_timeout, config.write_timeout)
        try:
            self.server = ReqapiServer((config.bind_address, config.port), settings, context, introspection,
                                       self.api, log)
        except OSError as error:
            raise ConfigError(f"cannot listen on {config.bind_address}:{config.port}: {error.strerror}; choose "
                              f"another --port or --bind-address") from None
        self.reloader = Reloader(config, self.server, self.storage, self.access, self.health, self.metrics, log,
                                 kube_for_auth)
        self.refresher: Optional[HistoryRefresher] = None
        if config.history is not None:
            self.refresher = HistoryRefresher(config.history, self.storage.history, self.health, self.metrics, log,
                                              prometheus_ssl_context(config.history))
        if kube_for_auth is not None:
            loaded = self.reloader.fetch_in_cluster_auth()
            if loaded is not None:
                self.reloader.reload_tls(loaded)
        self._log_start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return host, port

    def _log_start(self) -> None:
        config, log = self.config, self.log
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        log.log("info", f"reqapi {__version__} serving {GROUP_VERSION} on https://{shown}:{port}",
                python=sys.version.split()[0], max_connections=config.max_connections,
                max_watches=config.max_watches)
        summary = self.reloader.certificate
        log.log("info", "serving certificate", file=config.cert, sans=",".join(summary.sans) or "(none)",
                not_after=rfc3339(summary.not_after))
        if summary.not_after - time.time() < 30 * 86400:
            log.log("warning", "the serving certificate expires within 30 days", not_after=rfc3339(summary.not_after))
        generation = self.storage.history.current
        log.log("info", "rules", source=generation.rules.source, rules=len(generation.rules.rules),
                named_workloads=len(generation.named), resourceVersion=generation.resource_version,
                memory=f"{size_text(generation.rules.memory)} of at most {size_text(RULES_MAX_BYTES)}")
        if config.self_signed:
            local = "localhost" if host in ("0.0.0.0", "::", "127.0.0.1", "::1") else shown
            log.log("info", f"no --cert/--key: made a throwaway self-signed certificate for localhost in "
                    f"{os.path.dirname(config.cert)}; try: curl --cacert {config.cert} "
                    f"https://{local}:{port}/apis/{GROUP_VERSION}/namespaces/default/requests/web")
        auth = self.access.config
        if auth.enabled:
            log.log("info", "authentication on", source=auth.source,
                    allowed_names=",".join(auth.allowed_names) or "(any CN from the requestheader CA)",
                    client_ca=bool(auth.client_ca))
        elif self.access.problem is None:
            log.log("warning", "authentication is off: every caller is served and identity headers are ignored. "
                    "In a cluster reqapi reads kube-system/extension-apiserver-authentication by itself; elsewhere "
                    "set --requestheader-client-ca-file and/or --client-ca-file")

    def start(self) -> None:
        """Accept connections, enforce their deadlines, and watch the files."""
        threading.Thread(target=self.server.serve_forever, name="transport", daemon=True).start()
        self.reloader.start()
        if self.refresher is not None:
            settings = self.refresher.settings
            self.log.log("info", "usage history on", url=settings.url, mode=settings.mode,
                         window=f"{settings.window_days}d", refresh=f"{settings.refresh:g}s",
                         warmup=f"{settings.warmup:g}s", max_age=f"{settings.max_age:g}s",
                         matchers=",".join(settings.matchers) or "(none)", cache_dir=settings.cache_dir or "(none)")
            self.refresher.start()

    def drain(self) -> bool:
        """Graceful shutdown: /readyz already fails; keep serving for --shutdown-delay while the
        endpoints drop this pod, stop accepting, end watches and keep-alives, and wait for what is
        in flight for --shutdown-timeout.  True if every connection closed in time."""
        config, log = self.config, self.log
        self.health.shut_down()
        log.log("info", "shutting down: /readyz now fails; still serving", delay=f"{config.shutdown_delay:g}s")
        if config.shutdown_delay > 0:
            threading.Event().wait(config.shutdown_delay)
        self.server.stop_accepting()
        self.health.drain()                 # watches end, keep-alive responses say Connection: close
        self.server.wake()                  # (the loop sees it now, not at its next sweep)
        self.reloader.stop.set()
        self.reloader.wake.set()
        if self.refresher is not None:
            self.refresher.stop.set()
            self.refresher.wake.set()
        # Idle keep-alive connections notice the drain within a second and close themselves (after one
        # short last wait for a request already on its way); busy ones answer with Connection: close.
        drained = self.server.wait_until_drained(config.shutdown_timeout)
        open_connections = self.server.accepted
        self.server.stop()                  # the loop ends; what is still open is closed
        log.log("info", "stopped" if drained else "stopped with connections still open after --shutdown-timeout",
                open_connections=open_connections)
        log.flush(deadline=time.monotonic() + 2.0)
        return drained


def tune_interpreter() -> None:
    """Interpreter settings for a long-running server, each measured."""
    # The event loop should keep the GIL while it has work: the other threads (the log writer, the
    # reloader, workers waiting on kube-apiserver) have little to do and can wait their turn.
    sys.setswitchinterval(0.005)
    # Everything alive now lives as long as the process: keep the cyclic garbage collector from
    # walking it again and again (full collections were a source of p99 latency), and collect the
    # young generation less often — a request's objects are freed by reference counting anyway.
    gc.freeze()
    gc.set_threshold(20000, 50, 50)
    return_free_memory()


def return_free_memory() -> None:
    """Give the memory that start-up or a reload freed back to the system.  Compiling this file
    (a script is compiled at every start, never read from a .pyc) and building the first rules
    leave ~10 MB of freed but fragmented heap that glibc keeps; malloc_trim releases it (measured:
    idle RSS 39 -> 28 MB).  Nothing happens on a C library without malloc_trim (musl)."""
    try:
        import ctypes          # here, not at the top: only glibc systems use it, and only now
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run(config: Config, log: Logger, rules: Rules, after_script: bool = False) -> int:
    """Serve until SIGTERM or SIGINT, then drain.  SIGHUP re-reads the files at once; a second
    SIGTERM exits at once.  Returns the exit code.

    after_script (python3 reqapi.py): start serving, then return at once, while a thread named
    "serve" waits for the signal and drains.  The script then ends, and CPython frees the syntax
    tree of this file, which it keeps until a script's last statement has run (measured: 12 MB,
    a third of the idle RSS); the interpreter waits for the "serve" thread before it exits, and
    runs the signal handlers in the main thread meanwhile."""
    runtime = Runtime(config, log, rules)
    stop = threading.Event()
    # Signals must reach the main thread, which runs the handlers: a signal taken by another thread
    # only sets a flag, and the main thread might not look at it for long.  So every thread started
    # from here on inherits a mask that blocks them.
    handled = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    log.start_background_writer()
    tune_interpreter()

    def terminate(signum: int, frame: Any) -> None:
        if stop.is_set():
            log.log("warning", "second signal: exiting now", signal=signal.Signals(signum).name)
            log.flush(deadline=time.monotonic() + 0.5)
            os._exit(1)
        runtime.health.shut_down()          # /readyz fails from this moment
        stop.set()

    def reload(signum: int, frame: Any) -> None:
        runtime.reloader.wake.set()

    def serve() -> None:
        if not stop.wait(1.0) and after_script:
            return_free_memory()        # the script has ended by now: its syntax tree is freed
        while not stop.wait(1.0):       # short waits: in the main thread, signal handlers run between them
            pass
        runtime.drain()

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    signal.signal(signal.SIGHUP, reload)
    # Signals that came during start-up: a SIGTERM or SIGINT stops it before anything is served
    # (nothing to drain, exit 0); a SIGHUP says the files may have changed since they were read,
    # so they are read again now, before serving.  (Waking the reloader would not do: it takes the
    # files as they are when it starts as the ones already loaded, and so would miss the change.)
    stopping = next((signum for signum in _early_signals if signum != signal.SIGHUP), None)
    if stopping is not None:
        log.log("info", f"{signal.Signals(stopping).name} during start-up: stopped before serving")
        runtime.server.server_close()
        log.flush(deadline=time.monotonic() + 1.0)
        return 0
    if signal.SIGHUP in _early_signals:
        log.log("info", "SIGHUP during start-up: reading the rules and certificates again before serving")
        runtime.reloader.check(forced=True)
    runtime.start()
    if after_script:
        threading.Thread(target=serve, name="serve").start()   # not a daemon: the interpreter waits for it
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        return 0
    signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
    serve()
    return 0


# ---------------------------------------------------------------------------
# 13. Command line
# ---------------------------------------------------------------------------

def duration(text: str) -> float:
    """Seconds from "10s", "500ms", "2m", "1h" or a plain number."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 10s, 500ms, 2m)")
    value = float(match.group(1))
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]


def days_count(text: str) -> int:
    """Whole days from "14d" or "14", 1 to 90 (a metrics engine rarely keeps more)."""
    match = re.fullmatch(r"\s*(\d+)\s*d?\s*", text)
    if not match or not 1 <= int(match.group(1)) <= 90:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days from 1d to 90d (e.g. 14d)")
    return int(match.group(1))


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


class _HelpFormatter(argparse.HelpFormatter):
    """Show a flag's default only when it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, "", argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reqapi.py",
        description=f"reqapi {__version__}: a Kubernetes aggregated API server ({GROUP_VERSION}, resource "
                    f"'{RESOURCE}') that predicts the CPU and memory requests of workload NAME in namespace NS.",
        formatter_class=_HelpFormatter,
        epilog="Durations accept 500ms, 10s, 2m or plain seconds.  Send SIGHUP to re-read the rules and "
               "certificates at once; SIGTERM shuts down gracefully (a second one exits at once).")
    serving = parser.add_argument_group("serving")
    serving.add_argument("--cert", metavar="FILE", help="PEM serving certificate (chain). Its SANs must include "
                         "<service>.<namespace>.svc for kube-apiserver. Without --cert/--key a throwaway "
                         "self-signed certificate for localhost is made (needs openssl). Re-read on change.")
    serving.add_argument("--key", metavar="FILE", help="PEM private key of --cert. Re-read on change.")
    serving.add_argument("--port", type=int, default=8443, help="TCP port to listen on")
    serving.add_argument("--bind-address", default="0.0.0.0", help="address to listen on ('::' for IPv6)")
    serving.add_argument("--max-connections", type=positive_int, default=1600,
                         help="open connections; at the cap a new one takes the slot of the connection idle "
                              "longest (an unfinished handshake or request head, a keep-alive between "
                              "requests), else of the one whose client has left its answers unread longest; it "
                              "is closed at once only when every other connection is being answered and read. "
                              "The default holds 1,000 idle keep-alives beside 500 watches and fits the memory "
                              "budget of k8s/ (~16 KB a connection measured; see the README)")
    serving.add_argument("--max-watches", type=positive_int, default=500,
                         help="open watches; one more is answered 429 with Retry-After, as kube-apiserver's "
                              "inflight limit does (keep it below --max-connections so that probes and "
                              "GETs always find a slot)")
    rules = parser.add_argument_group("rules")
    rules.add_argument("--rules", metavar="FILE", help="JSON rules file (see README). Re-read when its content "
                       "changes; a bad new file is refused and the last good rules keep serving. Without it "
                       "every workload gets 100m CPU / 100Mi memory.")
    rules.add_argument("--check", action="store_true", help="validate --rules and exit: 0 if good, 2 if not")
    rules.add_argument("--predict", metavar="NS/NAME", help="print the object the server would serve for "
                       "workload NAME in namespace NS, and exit")
    rules.add_argument("--reload-interval", type=duration, default="2s",
                       help="how often to look for changed rules, certificate and CA files")
    auth = parser.add_argument_group("authentication and authorization (who may call reqapi)")
    auth.add_argument("--requestheader-client-ca-file", metavar="FILE", help="CA of kube-apiserver's "
                      "front-proxy client certificate (--proxy-client-cert-file). Requests with a certificate "
                      "from it are authenticated as the user in the username header. In a pod, read from "
                      "kube-system/extension-apiserver-authentication when no CA flag is given.")
    auth.add_argument("--requestheader-allowed-names", default="", metavar="CN,CN",
                      help="common names allowed for the front-proxy certificate; empty = any from the CA")
    auth.add_argument("--requestheader-username-headers", default="X-Remote-User", metavar="H,H",
                      help="headers that name the user (first non-empty wins)")
    auth.add_argument("--requestheader-group-headers", default="X-Remote-Group", metavar="H,H",
                      help="headers that name the user's groups (every line counts)")
    auth.add_argument("--requestheader-extra-headers-prefix", default="X-Remote-Extra-", metavar="P,P",
                      help="header prefixes of extra user attributes")
    auth.add_argument("--client-ca-file", metavar="FILE", help="CA of client certificates for direct callers: "
                      "user = CN, groups = O (as kube-apiserver treats client certificates)")
    auth.add_argument("--authorization-mode", choices=("AlwaysAllow", "Delegated"), default="AlwaysAllow",
                      help="AlwaysAllow: trust kube-apiserver's RBAC check; Delegated: also ask kube-apiserver "
                           "with a SubjectAccessReview per request (cached 10s)")
    auth.add_argument("--authentication-refresh", type=duration, default="5m",
                      help="in a pod: how often to re-read kube-system/extension-apiserver-authentication")
    auth.add_argument("--service-account-dir", default="/var/run/secrets/kubernetes.io/serviceaccount",
                      help="where the pod's ServiceAccount token and ca.crt are (change only for testing)")
    lifecycle = parser.add_argument_group("connections and shutdown")
    lifecycle.add_argument("--shutdown-delay", type=duration, default=None,
                           help="after SIGTERM, keep serving this long with /readyz failing, so endpoints are "
                                "removed before the listener closes (default: 10s in a pod, 0s elsewhere)")
    lifecycle.add_argument("--shutdown-timeout", type=duration, default="15s",
                           help="then wait this long for in-flight requests and watches to end")
    lifecycle.add_argument("--tls-handshake-timeout", type=duration, default="10s",
                           help="time a new connection has to complete its TLS handshake")
    lifecycle.add_argument("--read-header-timeout", type=duration, default="30s",
                           help="time a request head has to arrive once its first byte has")
    lifecycle.add_argument("--idle-timeout", type=duration, default="90s",
                           help="keep-alive connections idle this long after their last answer left are closed")
    lifecycle.add_argument("--write-timeout", type=duration, default="30s",
                           help="time a client has to take each write of a response; the only limit on an answer "
                                "or a watch being written")
    lifecycle.add_argument("--watch-timeout", type=duration, default="30m",
                           help="a watch without ?timeoutSeconds= ends after this long times 1 to 2 at random, "
                                "as kube-apiserver's; a longer timeoutSeconds is cut to twice this")
    history = parser.add_argument_group(
        "usage history (optional: answers from what workloads really use, read from a Prometheus-compatible API)")
    history.add_argument("--prometheus-url", metavar="URL", help="API root of Prometheus, Thanos, Mimir or "
                         "VictoriaMetrics (e.g. http://prometheus.monitoring:9090); turns usage history on. Reads "
                         "cAdvisor and kube-state-metrics series; see docs/history-estimator.md")
    history.add_argument("--prometheus-ca-file", metavar="FILE", help="CA bundle of an https engine")
    history.add_argument("--prometheus-client-cert", metavar="FILE", help="client certificate (PEM) for mTLS")
    history.add_argument("--prometheus-client-key", metavar="FILE", help="its private key (PEM)")
    history.add_argument("--prometheus-token-file", metavar="FILE", help="bearer token file, re-read when it changes")
    history.add_argument("--prometheus-username", metavar="USER", help="basic auth user (with --prometheus-password-file)")
    history.add_argument("--prometheus-password-file", metavar="FILE", help="basic auth password file")
    history.add_argument("--prometheus-header", action="append", metavar="NAME=VALUE",
                         help="a header sent with every query, e.g. a tenant: X-Scope-OrgID=tenant-1 (repeatable)")
    history.add_argument("--prometheus-matcher", action="append", metavar="MATCHER",
                         help="a label matcher added to every selector, e.g. 'cluster=\"prod\"' (repeatable)")
    history.add_argument("--prometheus-timeout", type=duration, default="30s",
                         help="time one query may take (then retried once)")
    history.add_argument("--prometheus-max-samples", type=positive_int, default=DEFAULT_MAX_SAMPLES,
                         help="the engine's --query.max-samples: CPU subqueries are chunked to half of it")
    history.add_argument("--history-window", type=days_count, default="14d", help="completed days of history used")
    history.add_argument("--history-refresh", type=duration, default="1h",
                         help="how often to look for newly completed days")
    history.add_argument("--history-warmup", type=duration, default="2m",
                         help="at start, /readyz waits this long at most for the first refresh; then ready on rules")
    history.add_argument("--history-max-age", type=duration, default="48h",
                         help="the last good history answers this long after the last successful refresh; then "
                              "the rules answer")
    history.add_argument("--history-cache-dir", metavar="DIR", help="keep completed days here (one JSON file a "
                         "day) so a restart reads only new days")
    history.add_argument("--history-mode", choices=("on", "shadow"), default="on",
                         help="on: history answers; shadow: history is computed, logged and shown in the object, "
                              "the rules answer (a rule's \"history\" overrides this)")
    history.add_argument("--history-as-of", metavar="YYYY-MM-DD", help="replay: use the completed days up to this "
                         "UTC date, as if it were the day after (reproduce an answer; tests)")
    logging_group = parser.add_argument_group("logging")
    logging_group.add_argument("--log-format", choices=("text", "json"), default="text",
                               help="one line per request and event, as text or JSON")
    logging_group.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                               help="'warning' drops the per-request lines")
    return parser


def predict_from_history(settings: HistorySettings, rules: Rules, namespace: str, name: str, log: Logger) -> Document:
    """--predict with --prometheus-url: one refresh, then the object the server would serve."""
    history = RulesHistory(rules, pending_history(settings))
    metrics = Metrics()
    refresher = HistoryRefresher(settings, history, Health(history, Access(AlwaysAllow()), metrics), metrics, log,
                                 prometheus_ssl_context(settings))
    if not refresher.refresh():
        print(f"warning: history could not be read ({refresher.last_error}); the rules answer", file=sys.stderr)
    generation = history.current
    return requests_object(namespace, name, generation.prediction(namespace, name), generation.resource_version,
                           int(time.time()))


def main(argv: Optional[list[str]] = None, after_script: bool = False) -> int:
    """The command line; after_script: called by `python3 reqapi.py` (see run())."""
    args = build_parser().parse_args(argv)
    if args.check or args.predict:
        # One-shot commands are interrupted and killed as any command is: the default handlers, and
        # a signal noted during the import acts now.
        for signum, default in ((signal.SIGHUP, signal.SIG_DFL), (signal.SIGTERM, signal.SIG_DFL),
                                (signal.SIGINT, signal.default_int_handler)):
            signal.signal(signum, default)
        for signum in _early_signals:
            signal.raise_signal(signum)
    log = Logger(args.log_format, args.log_level)
    rules = DEFAULT_RULES
    try:
        if args.rules:
            rules = load_rules(args.rules)
        elif args.check:
            raise ConfigError("--check validates a rules file: give it with --rules FILE")
        if args.check:
            print(f"{args.rules}: OK: {len(rules.rules)} rules, {len(named_workloads(rules))} named workloads, "
                  f"resourceVersion {resource_version_of(rules.digest)}, memory about {size_text(rules.memory)} "
                  f"(at most {size_text(RULES_MAX_BYTES)})")
            return 0
        if args.predict:
            namespace, slash, name = args.predict.partition("/")
            problem = (None if slash else "expected NS/NAME, e.g. --predict shop/checkout") or \
                next((found for found in workload_problems(namespace, name) if found), None)
            if problem:
                raise ConfigError(f"--predict {args.predict}: {problem}")
            settings = history_settings_from_args(args)
            if settings is None:
                obj = requests_object(namespace, name, rules.predict(namespace, name),
                                      resource_version_of(rules.digest), int(time.time()))
            else:
                obj = predict_from_history(settings, rules, namespace, name, log)
            print(json.dumps(obj, indent=2))
            return 0
        return run(Config.from_args(args), log, rules, after_script)
    except (RulesError, ConfigError) as error:
        # Refused configuration: the message names the file, the place and the fix; exit code 2.
        if args.check or args.predict:
            print(f"error: {error}", file=sys.stderr)
        else:
            log.log("error", str(error))
        return 2


if __name__ == "__main__":
    sys.exit(main(after_script=True))
