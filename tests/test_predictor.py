"""The predictor: rules files, their refusals, first-match order, inheritance, clamps, speed of lookup."""

import dataclasses
import fnmatch
import json
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reqapi
from reqapi import DEFAULT_RULES, Prediction, RulesError, load_rules, named_workloads, parse_rules
from test_quantities import LABEL_MESSAGE, SUBDOMAIN_MESSAGE

MI = 2**20
GI = 2**30
# ---------------------------------------------------------------------------------------
# Rules: the example file from the brief
# ---------------------------------------------------------------------------------------

EXAMPLE = {
    "defaults": {"cpu": "100m", "memory": "100Mi"},
    "min": {"cpu": "10m", "memory": "16Mi"},
    "max": {"cpu": "16", "memory": "64Gi"},
    "rules": [
        {"id": "prod-api", "namespace": "prod-*", "name": "*-api", "cpu": "500m", "memory": "512Mi"},
        {"id": "jobs", "name": "*-job", "memory": "2Gi"},
        {"id": "checkout", "namespace": "shop", "name": "checkout", "cpu": "2", "memory": "3Gi"},
    ],
}


def rules_of(document, source="rules.json"):
    return parse_rules(json.loads(json.dumps(document)), source)


def test_example_file_predictions():
    rules = rules_of(EXAMPLE)
    assert rules.predict("prod-eu", "web-api") == Prediction("500m", "512Mi", "prod-api")
    assert rules.predict("prod-eu", "nightly-job") == Prediction("100m", "2Gi", "jobs")   # cpu from defaults
    assert rules.predict("shop", "checkout") == Prediction("2", "3Gi", "checkout")
    assert rules.predict("shop", "checkout-2") == Prediction("100m", "100Mi", "default")
    assert rules.predict("staging", "web-api") == Prediction("100m", "100Mi", "default")
    assert rules.source == "rules.json"
    assert rules.defaults == reqapi.Amounts(100, 100)
    assert rules.min == reqapi.Amounts(10, 16)
    assert rules.max == reqapi.Amounts(16000, 65536)
    assert [rule.id for rule in rules.rules] == ["prod-api", "jobs", "checkout"]
    assert rules.rules[1].namespace == "*" and rules.rules[1].cpu is None
    assert named_workloads(rules) == [("shop", "checkout")]


def test_default_rules():
    assert DEFAULT_RULES.predict("any", "thing") == Prediction("100m", "100Mi", "default")
    assert DEFAULT_RULES.source == "built-in default"
    assert DEFAULT_RULES.rules == ()
    assert DEFAULT_RULES.min == reqapi.Amounts(None, None) == DEFAULT_RULES.max
    assert named_workloads(DEFAULT_RULES) == []
    assert DEFAULT_RULES.digest == parse_rules({}, "elsewhere").digest
    assert len(DEFAULT_RULES.digest) == 64 and int(DEFAULT_RULES.digest, 16) >= 0


def test_first_match_wins_in_file_order():
    rules = rules_of({"rules": [
        {"id": "specific", "namespace": "prod", "name": "web", "cpu": "1"},
        {"id": "broad", "namespace": "prod", "cpu": "2"},
        {"id": "everything", "cpu": "3"},
        {"id": "never", "namespace": "prod", "name": "web", "cpu": "4"},   # shadowed by "specific"
    ]})
    assert rules.predict("prod", "web").rule == "specific"
    assert rules.predict("prod", "api").rule == "broad"
    assert rules.predict("dev", "web").rule == "everything"
    reordered = rules_of({"rules": [{"id": "everything", "cpu": "3"},
                                    {"id": "specific", "namespace": "prod", "name": "web", "cpu": "1"}]})
    assert reordered.predict("prod", "web").rule == "everything"


def test_order_holds_across_exact_and_glob_namespaces():
    # An earlier glob-namespace rule beats a later exact-namespace rule and vice versa.
    rules = rules_of({"rules": [
        {"id": "glob-first", "namespace": "pr*", "name": "a*", "cpu": "1"},
        {"id": "exact", "namespace": "prod", "name": "*", "cpu": "2"},
        {"id": "glob-late", "namespace": "*", "name": "*-api", "cpu": "3"},
    ]})
    assert rules.predict("prod", "abc").rule == "glob-first"
    assert rules.predict("prod", "x-api").rule == "exact"
    assert rules.predict("dev", "x-api").rule == "glob-late"


def test_inheritance_from_defaults():
    rules = rules_of({"defaults": {"cpu": "250m"},
                      "rules": [{"id": "cpu-only", "name": "a", "cpu": "1"},
                                {"id": "mem-only", "name": "b", "memory": "1Gi"}]})
    assert rules.predict("ns", "a") == Prediction("1", "100Mi", "cpu-only")      # memory: built-in default
    assert rules.predict("ns", "b") == Prediction("250m", "1Gi", "mem-only")     # cpu: file default
    assert rules.predict("ns", "c") == Prediction("250m", "100Mi", "default")


def test_clamps_on_both_sides():
    rules = rules_of({
        "defaults": {"cpu": "5m", "memory": "100Gi"},           # outside [min, max]: accepted, clamped
        "min": {"cpu": "50m", "memory": "64Mi"},
        "max": {"cpu": "4", "memory": "8Gi"},
        "rules": [
            {"id": "tiny", "name": "tiny", "cpu": "1m", "memory": "1Mi"},
            {"id": "huge", "name": "huge", "cpu": "64", "memory": "1Ti"},
            {"id": "inside", "name": "inside", "cpu": "250m", "memory": "256Mi"},
            {"id": "edges", "name": "edges", "cpu": "50m", "memory": "8Gi"},
        ]})
    assert rules.predict("ns", "tiny") == Prediction("50m", "64Mi", "tiny")
    assert rules.predict("ns", "huge") == Prediction("4", "8Gi", "huge")
    assert rules.predict("ns", "inside") == Prediction("250m", "256Mi", "inside")
    assert rules.predict("ns", "edges") == Prediction("50m", "8Gi", "edges")
    assert rules.predict("ns", "other") == Prediction("50m", "8Gi", "default")
    assert rules.defaults == reqapi.Amounts(5, 102400)                            # stored unclamped


def test_clamps_compare_in_canonical_units():
    # "1.5m" is 2m after rounding up; "1e6" bytes is 1Mi. Equal after rounding means no clamp change.
    rules = rules_of({"min": {"cpu": "1.5m", "memory": "1e6"}, "max": {"cpu": "2m", "memory": "1Mi"},
                      "rules": [{"id": "r", "cpu": "1m", "memory": "1"}]})
    assert rules.predict("a", "b") == Prediction("2m", "1Mi", "r")


def test_zero_minimum_means_no_minimum():
    with_zero = rules_of({"min": {"cpu": "0", "memory": "0Mi"}, "rules": [{"id": "r", "cpu": "1m"}]})
    without = rules_of({"rules": [{"id": "r", "cpu": "1m"}]})
    assert with_zero.min == reqapi.Amounts(None, None)
    assert with_zero.digest == without.digest
    assert with_zero.predict("a", "b") == Prediction("1m", "100Mi", "r")


def test_partial_sections():
    rules = rules_of({"defaults": {"memory": "1Gi"}, "min": {"memory": "2Gi"}, "max": {"cpu": "1"},
                      "rules": [{"id": "r", "name": "big", "cpu": "8"}]})
    assert rules.predict("a", "x") == Prediction("100m", "2Gi", "default")
    assert rules.predict("a", "big") == Prediction("1", "2Gi", "r")


def test_min_equal_to_max_is_fine():
    rules = rules_of({"min": {"cpu": "1"}, "max": {"cpu": "1000m"}})
    assert rules.predict("a", "b").cpu == "1"


def test_values_are_rounded_up_to_canonical_units():
    rules = rules_of({"rules": [{"id": "s", "name": "s", "cpu": "3.14159", "memory": "1.1Gi"},
                                {"id": "r", "cpu": "0.1m", "memory": "129e6"}]})
    assert rules.predict("a", "s") == Prediction("3142m", "1127Mi", "s")
    assert rules.predict("a", "b") == Prediction("1m", "124Mi", "r")


def test_empty_rules_list_and_no_sections():
    assert rules_of({"rules": []}).predict("a", "b") == Prediction("100m", "100Mi", "default")
    assert rules_of({}).predict("a", "b") == Prediction("100m", "100Mi", "default")


# ---------------------------------------------------------------------------------------
# Rules: globs
# ---------------------------------------------------------------------------------------

def one_rule(namespace="*", name="*"):
    return rules_of({"rules": [{"id": "r", "namespace": namespace, "name": name, "cpu": "1"}]})


@pytest.mark.parametrize("glob, matches, misses", [
    ("web-?", ["web-1", "web-a"], ["web-", "web-12", "web"]),
    ("web-[a-c]", ["web-a", "web-b", "web-c"], ["web-d", "web-", "web-ab"]),
    ("web-[!x]", ["web-a", "web-1", "web-."], ["web-x", "web-", "web-ab"]),
    ("web-[!a-c]*", ["web-d", "web-dz", "web-1"], ["web-a", "web-cz", "web-"]),
    ("[ab]*", ["a", "b-x", "bcd"], ["c", "x-a"]),
    ("*", ["a", "a.b", "x-y-z"], []),
    ("**", ["a", "a.b"], []),
    ("a*b", ["ab", "a-b", "a.x.b"], ["a", "b", "ba"]),
    ("*.example.com", ["www.example.com", "a.b.example.com"], ["example.com", "www.example.org"]),
    ("web", ["web"], ["web-1", "we", "Web"]),
    ("*-api", ["x-api", "a-b-api"], ["api", "x-apix"]),
    ("[0-9]*", ["1a", "9"], ["a1"]),
    ("[-a]?", ["ab", "-b"], ["bb"]),            # "-" first in a class is literal (fnmatch)
    ("a[.-]b", ["a.b", "a-b"], ["ab", "axb"]),
])
def test_name_glob_features(glob, matches, misses):
    rules = one_rule(name=glob)
    for name in matches:
        assert rules.predict("ns", name).rule == "r", name
        assert fnmatch.fnmatchcase(name, glob)
    for name in misses:
        assert rules.predict("ns", name).rule == "default", name
        assert not fnmatch.fnmatchcase(name, glob)


@pytest.mark.parametrize("glob, matches, misses", [
    ("prod-*", ["prod-eu", "prod-"], ["prod", "dev-prod-eu"]),
    ("team-?", ["team-a"], ["team-ab"]),
    ("*-[!d]*", ["x-prod", "a-b-c"], ["x-dev"]),
    ("kube-system", ["kube-system"], ["kube-system2"]),
])
def test_namespace_glob_features(glob, matches, misses):
    rules = one_rule(namespace=glob)
    for namespace in matches:
        assert rules.predict(namespace, "w").rule == "r", namespace
    for namespace in misses:
        assert rules.predict(namespace, "w").rule == "default", namespace


def test_globs_are_case_sensitive_and_separate_namespace_from_name():
    rules = one_rule(namespace="a*", name="*b")
    assert rules.predict("a", "b").rule == "r"
    assert rules.predict("ab", "x").rule == "default"      # the namespace glob cannot eat into the name
    assert rules.predict("a\x00x", "b").rule == "default"   # a separator smuggled into an argument
    assert rules.predict("A", "b").rule == "default"


def test_predict_refuses_non_strings():
    for namespace, name in ((None, "a"), ("a", None), (b"a", "b")):
        with pytest.raises(TypeError):
            one_rule().predict(namespace, name)


def test_predict_is_pure():
    rules = rules_of(EXAMPLE)
    before = (repr(rules), rules._by_namespace.copy(), rules._wild, rules._predictions)
    for _ in range(3):
        assert rules.predict("prod-eu", "web-api") is rules.predict("prod-eu", "web-api")
        rules.predict("nope", "nope")
    assert (repr(rules), rules._by_namespace.copy(), rules._wild, rules._predictions) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules.source = "x"
    with pytest.raises(TypeError):
        rules._by_namespace["new"] = ()


# Differential test: the compiled lanes must agree with the obvious reference (fnmatch, in order).
name_tokens = st.sampled_from(["a", "b", "1", "-", ".", "*", "?", "[ab]", "[!a]", "[a-b]", "[.-]"])
namespace_tokens = st.sampled_from(["a", "b", "1", "-", "*", "?", "[ab]", "[!a]", "[0-9]"])


def glob_of(tokens, limit):
    return st.lists(tokens, min_size=1, max_size=limit).map("".join)


def valid_glob(glob, kind):
    try:
        reqapi._parse_glob(glob, kind)
    except reqapi._GlobProblem:
        return False
    return True


ns_globs = glob_of(namespace_tokens, 4).filter(lambda g: valid_glob(g, reqapi._NAMESPACE_KIND))
name_globs = glob_of(name_tokens, 5).filter(lambda g: valid_glob(g, reqapi._NAME_KIND))
rule_lists = st.lists(st.tuples(st.one_of(st.just("*"), st.sampled_from(["a", "ab", "b1"]), ns_globs),
                                st.one_of(st.just("*"), name_globs)), min_size=1, max_size=25)
queries = st.lists(st.tuples(st.text("ab1-", min_size=1, max_size=4), st.text("ab1-.", min_size=1, max_size=5)),
                   min_size=1, max_size=30)


def reference(pairs, namespace, name):
    for index, (namespace_glob, name_glob) in enumerate(pairs):
        if fnmatch.fnmatchcase(namespace, namespace_glob) and fnmatch.fnmatchcase(name, name_glob):
            return f"r{index}"
    return "default"


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(rule_lists, queries)
def test_predict_agrees_with_reference(pairs, asked):
    rules = rules_of({"rules": [{"id": f"r{i}", "namespace": ns, "name": n, "cpu": f"{i + 1}m"}
                                for i, (ns, n) in enumerate(pairs)]})
    for namespace, name in asked + [(ns, n) for ns, n in pairs if "*" not in ns + n and "?" not in ns + n
                                    and "[" not in ns + n]:
        expected = reference(pairs, namespace, name)
        got = rules.predict(namespace, name)
        assert got.rule == expected, (namespace, name)
        if expected != "default":
            assert got.cpu == f"{int(expected[1:]) + 1}m"


def test_predict_agrees_with_reference_on_a_large_deterministic_set():
    import random
    generator = random.Random(7)
    pairs = []
    for i in range(600):
        shape = i % 6
        if shape == 0:
            pairs.append((f"team{i % 40}", f"svc{i}-*"))
        elif shape == 1:
            pairs.append(("*", f"*-w{i}"))
        elif shape == 2:
            pairs.append((f"t[a-c]{i % 9}-*", f"*{i % 13}?"))
        elif shape == 3:
            pairs.append((f"*-{i % 17}", f"job-{i % 50}*"))
        elif shape == 4:
            pairs.append((f"team{i % 40}", f"svc{i % 23}"))
        else:
            pairs.append(("*", f"*{i % 31}*"))
    rules = rules_of({"rules": [{"id": f"r{i}", "namespace": ns, "name": n, "cpu": "1"}
                                for i, (ns, n) in enumerate(pairs)]})
    namespaces = [f"team{k}" for k in range(45)] + ["ta3-x", "tb8-prod", "x-5", "dev-16", "other"]
    for _ in range(3000):
        namespace = generator.choice(namespaces)
        name = generator.choice([f"svc{generator.randrange(700)}-api", f"x-w{generator.randrange(700)}",
                                 f"a{generator.randrange(30)}b", f"job-{generator.randrange(60)}x",
                                 f"svc{generator.randrange(30)}", "zzz"])
        assert rules.predict(namespace, name).rule == reference(pairs, namespace, name), (namespace, name)


# ---------------------------------------------------------------------------------------
# Rules: refusals (every message names the file, the JSON path and an example)
# ---------------------------------------------------------------------------------------

def refused(document, path, *fragments, example=None, source="rules.json"):
    with pytest.raises(RulesError) as info:
        parse_rules(document, source)
    error = info.value
    message = str(error)
    assert message.startswith(f"{source}: {path}: "), message
    assert error.source == source and error.path == path
    assert "; for example " in message
    if example is not None:
        assert message.endswith(f"; for example {example}"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert isinstance(error, ValueError)
    return message


REFUSALS = [
    # (document, path, fragments, example)
    ([], "(top level)", ["must be a JSON object", "got an array"], None),
    ("rules", "(top level)", ['got the string "rules"'], None),
    (None, "(top level)", ["got null"], None),
    ({"default": {}}, "default", ['unknown key "default"', 'did you mean "defaults"?',
                                  '"defaults", "min", "max", "rules"'], None),
    ({"version": 1}, "version", ['unknown key "version"', "allowed keys"], None),
    ({"defaults": []}, "defaults", ['"defaults" must be a JSON object'],
     '"defaults": {"cpu": "100m", "memory": "100Mi"}'),
    ({"min": None}, "min", ["got null"], '"min": {"cpu": "10m", "memory": "16Mi"}'),
    ({"max": "16"}, "max", ['got the string "16"'], '"max": {"cpu": "16", "memory": "64Gi"}'),
    ({"defaults": {"cpus": "1"}}, "defaults.cpus", ['did you mean "cpu"?', '"cpu", "memory"'], None),
    ({"max": {"ram": "1Gi"}}, "max.ram", ['unknown key "ram"', '"cpu", "memory"'], None),
    ({"defaults": {"cpu": 0.5}}, "defaults.cpu", ["quoted string", "the number 0.5"], '"cpu": "0.5"'),
    ({"defaults": {"cpu": 2}}, "defaults.cpu", ["the number 2"], '"cpu": "2"'),
    ({"defaults": {"memory": 512}}, "defaults.memory", ["bare number means bytes"], '"memory": "100Mi"'),
    ({"min": {"cpu": True}}, "min.cpu", ["the boolean true"], '"cpu": "10m"'),
    ({"min": {"cpu": None}}, "min.cpu", ["got null"], '"cpu": "10m"'),
    ({"defaults": {"cpu": "0"}}, "defaults.cpu", ["is zero", 'only "min" may be "0"'], '"cpu": "100m"'),
    ({"max": {"memory": "0Gi"}}, "max.memory", ["is zero"], '"memory": "64Gi"'),
    ({"min": {"cpu": "-1"}}, "min.cpu", ["negative"], '"cpu": "10m"'),
    ({"max": {"cpu": "1K"}}, "max.cpu", ['"1K" is not a valid Kubernetes quantity', '"k"'], '"cpu": "16"'),
    ({"max": {"memory": "1gi"}}, "max.memory", ['"Gi"'], '"memory": "1Gi"'),
    ({"max": {"memory": "1 Gi"}}, "max.memory", ["whitespace"], '"memory": "1Gi"'),
    ({"defaults": {"memory": "1MB"}}, "defaults.memory", ["no byte units"], '"memory": "100Mi"'),
    ({"max": {"memory": "8Ei"}}, "max.memory", ["2^63"], '"memory": "64Gi"'),
    ({"max": {"memory": "9223372036854775807"}}, "max.memory", ["too large", '"8796093022207Mi"'], None),
    ({"max": {"cpu": "9223372036854775807"}}, "max.cpu", ["too large", "millicores"], '"cpu": "16"'),
    ({"min": {"cpu": "2"}, "max": {"cpu": "1"}}, "min.cpu", ['min.cpu ("2") is above max.cpu ("1")'],
     '"min": {"cpu": "1"}'),
    ({"min": {"memory": "1.5Gi"}, "max": {"memory": "1Gi"}}, "min.memory",
     ['min.memory ("1536Mi") is above max.memory ("1Gi")'], '"min": {"memory": "1Gi"}'),
    ({"rules": {}}, "rules", ['"rules" must be a JSON array', "got an object"], None),
    ({"rules": "prod-*"}, "rules", ['got the string "prod-*"'], None),
    ({"rules": [{"id": "a", "cpu": "1"}, ["b"]]}, "rules[1]", ["rule rules[1] must be a JSON object"], None),
    ({"rules": [{"namespace": "a", "cpu": "1"}]}, "rules[0]", ['has no "id"'], '"id": "rule-0"'),
    ({"rules": [{"id": 3, "cpu": "1"}]}, "rules[0].id", ["id must be a string", "the number 3"], None),
    ({"rules": [{"id": "", "cpu": "1"}]}, "rules[0].id", ["non-empty"], '"id": "rule-0"'),
    ({"rules": [{"id": "  ", "cpu": "1"}]}, "rules[0].id", ["non-empty"], None),
    ({"rules": [{"id": "default", "cpu": "1"}]}, "rules[0].id", ["reserved"], None),
    ({"rules": [{"id": "web", "cpu": "1"}, {"id": "db", "cpu": "1"}, {"id": "web", "cpu": "2"}]}, "rules[2].id",
     ['duplicate id "web"', "rules[0] already uses it"], '"id": "web-2"'),
    ({"rules": [{"id": "lonely", "namespace": "shop"}]}, "rules[0]", ['rule "lonely" sets neither cpu nor memory'],
     '{"id": "lonely", "namespace": "shop", "cpu": "250m", "memory": "256Mi"}'),
    ({"rules": [{"id": "a", "mem": "1Gi"}]}, "rules[0].mem",
     ['unknown key "mem" in rule rules[0] ("a")', 'did you mean "memory"?'], None),
    ({"rules": [{"id": "a", "cpu": "1", "labels": {}}]}, "rules[0].labels",
     ['"id", "namespace", "name", "cpu", "memory"'], None),
    ({"rules": [{"id": "a", "cpu": "500"}, {"id": "b", "cpu": 1}]}, "rules[1].cpu", ["the number 1"],
     '"cpu": "1"'),
    ({"rules": [{"id": "a", "cpu": "1.2.3"}]}, "rules[0].cpu", ["more than one '.'"], '"cpu": "500m"'),
    ({"rules": [{"id": "a", "memory": "-1Gi"}]}, "rules[0].memory", ["negative"], '"memory": "512Mi"'),
    ({"rules": [{"id": "a", "cpu": "0"}]}, "rules[0].cpu", ["is zero"], None),
    # globs
    ({"rules": [{"id": "a", "name": "Web-*", "cpu": "1"}]}, "rules[0].name",
     ['"W" at position 1', "lowercase", "can never match"], '"name": "web-*"'),
    ({"rules": [{"id": "a", "namespace": "Prod", "cpu": "1"}]}, "rules[0].namespace", ["lowercase"],
     '"namespace": "prod"'),
    ({"rules": [{"id": "a", "name": "web_api", "cpu": "1"}]}, "rules[0].name", ["'_' is not allowed"],
     '"name": "web-api"'),
    ({"rules": [{"id": "a", "name": "prod/web", "cpu": "1"}]}, "rules[0].name", ['put the namespace in "namespace"'],
     '"name": "web"'),
    ({"rules": [{"id": "a", "name": "web *", "cpu": "1"}]}, "rules[0].name", ["whitespace"], '"name": "web*"'),
    ({"rules": [{"id": "a", "name": "^web-.*$", "cpu": "1"}]}, "rules[0].name", ["not regular expressions"],
     '"name": "web-*"'),
    ({"rules": [{"id": "a", "namespace": "prod.eu", "cpu": "1"}]}, "rules[0].namespace",
     ["namespaces cannot contain '.'"], None),
    ({"rules": [{"id": "a", "name": "web-[abc", "cpu": "1"}]}, "rules[0].name", ["never closed"], None),
    ({"rules": [{"id": "a", "name": "web-[]", "cpu": "1"}]}, "rules[0].name", ['empty character class "[]"'], None),
    ({"rules": [{"id": "a", "name": "web-[!]x]", "cpu": "1"}]}, "rules[0].name", ['"[!]"'], None),
    ({"rules": [{"id": "a", "name": "web-[z-a]", "cpu": "1"}]}, "rules[0].name", ['reversed range "z-a"'],
     '"name": "web-[a-z]"'),
    ({"rules": [{"id": "a", "name": "web-[A-Z]", "cpu": "1"}]}, "rules[0].name", ['"A"', "lowercase"], None),
    ({"rules": [{"id": "a", "name": "web-[!_]", "cpu": "1"}]}, "rules[0].name", ['"_"'], None),
    ({"rules": [{"id": "a", "name": "-web*", "cpu": "1"}]}, "rules[0].name", ['must start with', 'not "-"'], None),
    ({"rules": [{"id": "a", "name": "web*.", "cpu": "1"}]}, "rules[0].name", ['must end with', 'not "."'], None),
    ({"rules": [{"id": "a", "name": "a*.-b", "cpu": "1"}]}, "rules[0].name", ['".-" never occurs'], None),
    ({"rules": [{"id": "a", "name": "", "cpu": "1"}]}, "rules[0].name", ["empty", 'leave "name" out'], None),
    ({"rules": [{"id": "a", "namespace": "", "cpu": "1"}]}, "rules[0].namespace", ["empty"], None),
    ({"rules": [{"id": "a", "namespace": "x" * 64, "cpu": "1"}]}, "rules[0].namespace",
     ["not a valid namespace", "must be no more than 63 characters"], None),
    ({"rules": [{"id": "a", "namespace": "?" * 64, "cpu": "1"}]}, "rules[0].namespace",
     ["needs at least 64 characters", "at most 63"], None),
    ({"rules": [{"id": "a", "name": "a" * 254, "cpu": "1"}]}, "rules[0].name",
     ["must be no more than 253 characters"], None),
    ({"rules": [{"id": "a", "namespace": "-bad", "cpu": "1"}]}, "rules[0].namespace", [LABEL_MESSAGE], None),
    ({"rules": [{"id": "a", "name": "a..b", "cpu": "1"}]}, "rules[0].name", [SUBDOMAIN_MESSAGE], None),
    ({"rules": [{"id": "a", "namespace": ["a", "b"], "cpu": "1"}]}, "rules[0].namespace",
     ["must be a string glob", "got an array", "one rule per pattern"], '"namespace": "prod-*"'),
    ({"rules": [{"id": "a", "name": None, "cpu": "1"}]}, "rules[0].name", ["got null"], '"name": "*-api"'),
    ({"rules": [{"id": "a", "name": "web\\d", "cpu": "1"}]}, "rules[0].name", ['"\\\\"'], None),
]


@pytest.mark.parametrize("document, path, fragments, example", REFUSALS,
                         ids=[f"{i}-{row[1]}" for i, row in enumerate(REFUSALS)])
def test_refusals(document, path, fragments, example):
    refused(document, path, *fragments, example=example)


def test_refusal_uses_the_given_source_and_quotes_odd_keys():
    message = refused({"rules": [{"id": "a", "cpu": "1", "weird key": 1}]}, 'rules[0]["weird key"]',
                      source="/etc/reqapi/rules.json")
    assert message.startswith('/etc/reqapi/rules.json: rules[0]["weird key"]: unknown key "weird key"')


def test_the_first_problem_in_document_order_is_reported():
    refused({"defaults": {"cpu": "x"}, "rules": [{"cpu": "1"}]}, "defaults.cpu")
    refused({"rules": [{"id": "a", "cpu": "bad"}, {"id": "a", "cpu": "1"}]}, "rules[0].cpu")


# ---------------------------------------------------------------------------------------
# load_rules: files
# ---------------------------------------------------------------------------------------

def write(tmp_path, content, name="rules.json"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def refused_file(path, where, *fragments):
    with pytest.raises(RulesError) as info:
        load_rules(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {where}: "), message
    assert "; for example " in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_load_rules_round_trip(tmp_path):
    path = write(tmp_path, json.dumps(EXAMPLE, indent=2))
    rules = load_rules(path)
    assert rules.source == path
    assert rules.predict("shop", "checkout") == Prediction("2", "3Gi", "checkout")
    assert rules.digest == rules_of(EXAMPLE).digest


def test_load_rules_json_syntax_errors_name_line_and_column(tmp_path):
    # Python 3.13's json names the comma itself ("Illegal trailing comma"); older ones the "]".
    trailing = write(tmp_path, '{"rules": [\n  {"id": "a", "cpu": "1"},\n]}')
    where = "line 2 column 26" if sys.version_info >= (3, 13) else "line 3 column 1"
    refused_file(trailing, where, "invalid JSON", "trailing comma")
    refused_file(write(tmp_path, '{\n  // platform defaults\n}'), "line 2 column 3", "comments")
    refused_file(write(tmp_path, "{'rules': []}"), "line 1 column 2", "double quotes")
    refused_file(write(tmp_path, '{"rules": [}'), "line 1 column 12", "invalid JSON")
    refused_file(write(tmp_path, ""), "line 1 column 1", "the file is empty")
    refused_file(write(tmp_path, "[" * 100_000), "(top level)", "nested too deeply")


def test_load_rules_refuses_duplicate_keys(tmp_path):
    refused_file(write(tmp_path, '{"rules": [], "rules": [{"id": "a", "cpu": "1"}]}'), "rules",
                 'the key "rules" appears more than once')
    refused_file(write(tmp_path, '{"rules": [{"id": "a", "cpu": "1", "cpu": "2"}]}'), "rules[0].cpu",
                 'the key "cpu" appears more than once in rule rules[0] ("a")')


def test_load_rules_encoding(tmp_path):
    assert load_rules(write(tmp_path, b'\xef\xbb\xbf{"rules": []}')).rules == ()     # BOM tolerated
    refused_file(write(tmp_path, b'{"rules": [\n{"id": "\xff"}]}'), "line 2 column 9", "not valid UTF-8")
    rules = load_rules(write(tmp_path, '{"rules": [{"id": "caf\u00e9", "cpu": "1"}]}'))
    assert rules.predict("a", "b").rule == "caf\u00e9"


def test_load_rules_missing_file(tmp_path):
    path = str(tmp_path / "absent.json")
    refused_file(path, "(file)", "cannot read the rules file")


def test_load_rules_validation_errors_carry_the_path(tmp_path):
    path = write(tmp_path, '{"rules": [{"id": "x", "name": "Web", "cpu": "1"}]}')
    refused_file(path, "rules[0].name", "lowercase")


# ---------------------------------------------------------------------------------------
# Digest and named workloads
# ---------------------------------------------------------------------------------------

def test_digest_ignores_formatting_and_spelling(tmp_path):
    compact = load_rules(write(tmp_path, json.dumps(EXAMPLE, separators=(",", ":")), "a.json"))
    spread = load_rules(write(tmp_path, json.dumps(EXAMPLE, indent=4, sort_keys=True), "b.json"))
    reordered = {"rules": [dict(reversed(list(rule.items()))) for rule in EXAMPLE["rules"]],
                 "max": EXAMPLE["max"], "min": EXAMPLE["min"], "defaults": EXAMPLE["defaults"]}
    respelled = json.loads(json.dumps(EXAMPLE))
    respelled["defaults"] = {"cpu": "0.1", "memory": "104857600"}     # same amounts
    respelled["max"]["cpu"] = "16000m"
    respelled["rules"][0]["cpu"] = "0.5"
    respelled["rules"][1]["namespace"] = "*"                          # explicit default glob
    digests = {compact.digest, spread.digest, rules_of(reordered).digest, rules_of(respelled).digest,
               rules_of(EXAMPLE, source="other.json").digest}
    assert len(digests) == 1
    no_defaults = {key: value for key, value in EXAMPLE.items() if key != "defaults"}
    assert rules_of(no_defaults).digest == compact.digest             # built-in defaults are the same


@pytest.mark.parametrize("change", [
    lambda d: d["rules"][0].update(cpu="501m"),
    lambda d: d["rules"][0].update(id="prod-apis"),
    lambda d: d["rules"][0].update(name="*-apis"),
    lambda d: d["rules"][1].update(namespace="prod"),
    lambda d: d["rules"].reverse(),
    lambda d: d["rules"].pop(),
    lambda d: d["min"].pop("cpu"),
    lambda d: d["max"].update(memory="65Gi"),
    lambda d: d["defaults"].update(cpu="200m"),
    lambda d: d["rules"][1].update(cpu="100m"),      # same value as the default, but now explicit
])
def test_digest_changes_with_meaning(change):
    document = json.loads(json.dumps(EXAMPLE))
    change(document)
    assert rules_of(document).digest != rules_of(EXAMPLE).digest


def test_named_workloads():
    rules = rules_of({"rules": [
        {"id": "a", "namespace": "shop", "name": "checkout", "cpu": "1"},
        {"id": "b", "namespace": "shop", "name": "checkout", "cpu": "2"},     # duplicate pair
        {"id": "c", "namespace": "bank", "name": "ledger.v2", "cpu": "1"},
        {"id": "d", "name": "checkout", "cpu": "1"},                          # any namespace: not exact
        {"id": "e", "namespace": "shop", "cpu": "1"},                         # any name: not exact
        {"id": "f", "namespace": "shop", "name": "web-?", "cpu": "1"},
        {"id": "g", "namespace": "shop", "name": "web-[ab]", "cpu": "1"},
        {"id": "h", "namespace": "ab", "name": "z", "cpu": "1"},
    ]})
    assert named_workloads(rules) == [("ab", "z"), ("bank", "ledger.v2"), ("shop", "checkout")]


# ---------------------------------------------------------------------------------------
# Speed: a guard against accidental linear-scan or backtracking regressions.  It compares two
# timings taken side by side (a machine's load slows both alike) instead of a wall-clock threshold.
# ---------------------------------------------------------------------------------------

def thousand_rules(shape):
    rules = []
    for i in range(1000):
        if shape == "prefix":
            rule = {"namespace": f"team{i}-*", "name": f"svc{i}-*"}
        elif shape == "suffix":
            rule = {"name": f"*-svc{i}"}
        else:
            rule = {"namespace": f"t[a-c]{i}-*", "name": f"*-w{i}?[!x]"}
        rules.append({"id": f"r{i}", "cpu": f"{i + 1}m", **rule})
    return parse_rules({"rules": rules}, shape)


def seconds_per_call(rules, namespace: str, name: str, calls: int = 2000) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        rules.predict(namespace, name)
    return (time.perf_counter() - start) / calls


@pytest.mark.parametrize("shape", ["prefix", "suffix", "mixed"])
def test_a_thousand_rules_cost_about_what_one_rule_costs(shape):
    rules = thousand_rules(shape)
    one = parse_rules({"rules": [{"id": "r0", "cpu": "1m", "name": "svc0-*"}]}, "one")
    cases = {"prefix": [("team990-prod", "svc990-api"), ("other", "thing")],
             "suffix": [("payments", "billing-svc990"), ("payments", "billing-worker")],
             "mixed": [("tb990-prod", "billing-w990ab"), ("payments", "billing-worker")]}[shape]
    assert rules.predict(*cases[0]).rule == "r990"
    assert rules.predict(*cases[1]).rule == "default"
    for namespace, name in cases:
        # Interleaved, best of five: a scan over the 1,000 rules would be hundreds of times slower
        # than one rule (a naive scan measured ~1,000x); the lanes keep it within a small factor (1-8 here).
        ratios = [seconds_per_call(rules, namespace, name) / seconds_per_call(one, namespace, name)
                  for _ in range(5)]
        assert min(ratios) < 40, (shape, namespace, name, ratios)


# ---------------------------------------------------------------------------------------
# Matching in linear time (issue 12, item 6): a glob with several "*" must not let re backtrack
# through every way of splitting a name among the stars.  Checked by the shape of what is
# compiled and by counting the Python matcher's steps, never by a clock.
# ---------------------------------------------------------------------------------------

from re import _constants as sre, _parser as sre_parser   # noqa: E402  (the stdlib's own regex parser)

ONE_CHARACTER = (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN)
REPEATS = (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT)


def one_character_repeat(op, value) -> bool:
    return op in REPEATS and value[1] == sre.MAXREPEAT and len(value[2]) == 1 and list(value[2])[0][0] in ONE_CHARACTER


def repeats_outside_atomic_chunks(subpattern) -> list:
    """Every repeat of the parsed pattern but a possessive one of one character, or one that is the
    first item of an atomic group holding one repeat of one character followed by single characters
    only: the shapes whose match at one place is found or refused by one scan (re never goes back
    into them), so that a branch costs at most (key length) x (chunk width) steps."""
    problems = []
    for op, value in subpattern:
        if op == sre.POSSESSIVE_REPEAT and one_character_repeat(op, value):
            continue
        if op == sre.ATOMIC_GROUP:
            items = list(value)
            head, rest = items[0], items[1:]
            shaped = one_character_repeat(*head) and all(op in ONE_CHARACTER for op, _ in rest)
            if not shaped:
                problems.append(("atomic group of another shape", items))
        elif op in REPEATS:
            problems.append(("repeat outside an atomic group", value))
        elif op == sre.BRANCH:
            for branch in value[1]:
                problems += repeats_outside_atomic_chunks(branch)
        elif op == sre.SUBPATTERN:
            problems += repeats_outside_atomic_chunks(value[-1])
        else:
            assert op in ONE_CHARACTER, (op, value)
    return problems


def lanes_of(rules):
    return [lane for lanes in rules._by_namespace.values() for lane in lanes] + list(rules._wild)


MULTI_STAR_RULES = {"rules": [
    {"id": "svc", "name": "*.*.*.*.*-svc", "cpu": "1"},
    {"id": "prod-svc", "namespace": "prod-*", "name": "*.*.*.*.*-svc", "cpu": "2"},
    {"id": "shop-svc", "namespace": "shop", "name": "*a*b*c*d*e*f*g*h*", "cpu": "3"},
    {"id": "classes", "namespace": "*[a-c]*[!x]*", "name": "*-?[0-9]*[a-f]?*.*", "cpu": "4"},
    {"id": "both", "namespace": "*-*-*-*", "name": "*-*-*-*-*-*", "cpu": "5"},
]}


@pytest.mark.parametrize("document", [EXAMPLE, MULTI_STAR_RULES], ids=["example", "multi-star"])
def test_every_compiled_lane_has_the_linear_shape(document):
    rules = rules_of(document)
    for lane in lanes_of(rules):
        assert repeats_outside_atomic_chunks(sre_parser.parse(lane.pattern.pattern)) == [], lane.pattern.pattern


def test_the_shape_check_can_fail():
    # The backtracking form reqapi compiled before: each "*" a free repeat.
    assert repeats_outside_atomic_chunks(sre_parser.parse(r"[^\x00]*\.[^\x00]*\-svc()"))
    assert repeats_outside_atomic_chunks(sre_parser.parse(r"(?>(?:ab)*x)"))
    assert repeats_outside_atomic_chunks(sre_parser.parse(r"(?:ab)*+x"))
    assert not repeats_outside_atomic_chunks(sre_parser.parse(r"(?>[^\x00]*?\.)[^\x00]*+"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(rule_lists)
def test_every_lane_of_any_accepted_rules_has_the_linear_shape(pairs):
    rules = rules_of({"rules": [{"id": f"r{i}", "namespace": ns, "name": n, "cpu": "1"}
                                for i, (ns, n) in enumerate(pairs)]})
    for lane in lanes_of(rules):
        assert repeats_outside_atomic_chunks(sre_parser.parse(lane.pattern.pattern)) == [], lane.pattern.pattern


# Names of the maximum length that make a backtracking matcher try every split among the stars.
CRAFTED = [
    ("prod-x", "a." * 126 + "a"),                          # 253 characters, dots everywhere, no "-svc"
    ("prod-x", "a." * 124 + "a-svx"),
    ("prod-x", "a" * 248 + "-svc"),                        # ends right, has no dot
    ("prod-x", ("a." * 126)[:249] + "-svc"),               # every star has a place: it matches
    ("shop", "abcdefg" + "h" * 246),
    ("shop", "abcdefgh" * 31 + "abcde"),
    ("a-b-c-" + "d" * 57, "-".join(["x"] * 127)),
    ("a" * 63, "x-1a" * 63 + "z"),
]


def test_names_of_the_maximum_length_against_many_stars_agree_with_fnmatch():
    rules = rules_of(MULTI_STAR_RULES)
    pairs = [(rule["namespace"] if "namespace" in rule else "*", rule["name"]) for rule in MULTI_STAR_RULES["rules"]]
    for namespace, name in CRAFTED:
        assert len(namespace) <= 63 and len(name) <= 253
        expected = next((rule["id"] for rule, (ns, n) in zip(MULTI_STAR_RULES["rules"], pairs)
                         if fnmatch.fnmatchcase(namespace, ns) and fnmatch.fnmatchcase(name, n)), "default")
        assert rules.predict(namespace, name).rule == expected, (namespace, name)
        assert rules.without_lanes().predict(namespace, name).rule == expected, (namespace, name)


def count_token_comparisons(monkeypatch) -> list:
    calls = [0]
    compare = reqapi._token_matches

    def counting(token, char):
        calls[0] += 1
        return compare(token, char)
    monkeypatch.setattr(reqapi, "_token_matches", counting)
    return calls


@pytest.mark.parametrize("glob", ["*.*.*.*.*-svc", "*a*b*c*d*e*f*g*h*", "*-?[0-9]*[a-f]?*.*", "*-*-*-*-*-*",
                                  "*" + "a*" * 40 + "b"])
def test_glob_match_compares_each_character_at_most_once_per_token(monkeypatch, glob):
    calls = count_token_comparisons(monkeypatch)
    tokens = [token for token in reqapi._glob_tokens(glob) if token != "*"]
    for _, name in CRAFTED:
        calls[0] = 0
        assert reqapi.glob_match(glob, name) == fnmatch.fnmatchcase(name, glob), (glob, name)
        # The chunk algorithm: each chunk tried at each place at most once, each try at most its width.
        assert calls[0] <= len(name) * len(tokens), (glob, name, calls[0])


glob_texts = st.lists(st.sampled_from(["a", "b", "-", ".", "*", "?", "[ab]", "[!a]", "[a-b]", "[.-]"]),
                      min_size=1, max_size=8).map("".join)


@settings(max_examples=2000, deadline=None)
@given(glob_texts, st.text("ab-.", min_size=0, max_size=12))
def test_glob_match_agrees_with_fnmatch(glob, text):
    # Any well-formed glob, valid as a rule or not: glob_match is the chunk algorithm, whatever the shape.
    assert reqapi.glob_match(glob, text) == fnmatch.fnmatchcase(text, glob), (glob, text)


# ---------------------------------------------------------------------------------------
# Memory (issue 12, item 7): what rules keep is small, the estimate reqapi reports and enforces
# is above it, and a load's peak stays within a few times the estimate.  Counted in bytes with
# tracemalloc, the same on any machine.
# ---------------------------------------------------------------------------------------

from bench import shaped_rules, traced  # noqa: E402  (tests/bench.py --memory measures the same way)


@pytest.mark.parametrize("shape", ["exact", "prefix", "suffix", "multi", "classes"])
@pytest.mark.parametrize("length", [0, 100])
def test_the_estimate_is_above_what_rules_keep_and_a_load_peaks_within_a_few_times_it(tmp_path, shape, length):
    count = 1000
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(shaped_rules(count, shape, length)))
    # A generation of rules is the rules and their named workloads (section 6).
    (rules, generation), kept, peak = traced(lambda: (lambda r: (r, reqapi.Generation(r)))(load_rules(str(path))))
    characters = sum(len(r.id) + len(r.namespace) + len(r.name) for r in rules.rules)
    assert rules.memory == reqapi.rules_memory(count, characters)
    print(f"{shape} +{length}: kept {kept / count:.0f} B/rule, peak {peak / count:.0f} B/rule, "
          f"estimate {rules.memory / count:.0f} B/rule")
    assert kept <= rules.memory, (kept, rules.memory)
    assert peak <= 3 * rules.memory + 4 * MI, (peak, rules.memory)


def test_a_rule_of_the_usual_shape_keeps_less_than_700_bytes(tmp_path):
    # Measured before: ~980 bytes for the same rules (a dict per Rule and Prediction, a named group
    # per rule in the regex), and a load of 30,000 such rules left the process 116 MB larger.
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(shaped_rules(2000, "prefix")))
    rules, kept, _ = traced(lambda: load_rules(str(path)))
    assert kept / 2000 < 700, kept / 2000


def test_rules_above_the_memory_limit_are_refused_before_they_are_compiled():
    characters = len("rule-00000") + len("team-00000") + len("*")
    per_rule = reqapi.rules_memory(1, characters) - reqapi.rules_memory(0, 0)
    count = (reqapi.RULES_MAX_BYTES - reqapi.rules_memory(0, 0)) // per_rule + 1
    assert 10_000 < count < 12_000         # the README's "about 11,000 rules"
    document = {"rules": [{"id": f"rule-{i:05d}", "namespace": f"team-{i:05d}", "cpu": "1"} for i in range(count)]}
    with pytest.raises(RulesError) as refused:
        parse_rules(document, "big.json")
    message = str(refused.value)
    assert message.startswith("big.json: rules: ") and f"{count:,} rules would keep about" in message
    assert "8.0 MiB" in message and "merge rules that give the same requests into one rule with a glob" in message
    assert refused.value.example.startswith('{"id": "team-a"')
    document["rules"].pop()           # one rule less fits
    assert len(parse_rules(document, "big.json").rules) == count - 1


def test_a_file_larger_than_reqapi_reads_is_refused_before_it_is_decoded(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text('{"rules": []' + " " * reqapi.RULES_MAX_FILE_BYTES + "}")
    with pytest.raises(RulesError) as refused:
        load_rules(str(path))
    assert refused.value.path == "(file)" and "larger than 4.0 MiB" in str(refused.value)


def test_the_digest_is_the_canonical_json_of_the_meaning():
    # Replicas of different versions must give the same resourceVersion for the same rules: the
    # digest, now hashed rule by rule, is still the sha256 of the whole canonical document.
    import hashlib
    document = shaped_rules(50, "classes")
    document["rules"][7]["history"] = "shadow"
    rules = rules_of(document)
    # A rule without "history" is hashed without the key, as before the key existed.
    meaning = {"format": "reqapi.rules/v1", "defaults": {"cpu": 100, "memory": 100}, "min": {"cpu": None, "memory": None},
               "max": {"cpu": None, "memory": None},
               "rules": [{k: v for k, v in dataclasses.asdict(rule).items() if k != "history" or v}
                         for rule in rules.rules]}
    text = json.dumps(meaning, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert rules.digest == hashlib.sha256(text.encode()).hexdigest()
    # The example rules hash as they did before the digest was written rule by rule:
    assert rules_of(EXAMPLE).digest == "11b543c58f231c5c4f3d30a06eaf2cfcb66535fa9f12435f5bb013ddcc16f6de"
