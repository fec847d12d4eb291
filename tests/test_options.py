"""Request options (section 5): selectors, continue tokens, the Accept header, and the typed
options of a get, a list and a watch, each built from a parsed request without a server."""

from __future__ import annotations

from typing import Optional

import pytest

import reqapi

GV = "/apis/k8s.wujiuye.com/v1beta1"


def request_for(target: str, accept: str = "", params: Optional[dict] = None) -> reqapi.Request:
    head = f"GET {target} HTTP/1.1\r\nHost: x" + (f"\r\nAccept: {accept}" if accept else "")
    request = reqapi.parse_head(head.encode())
    request.params = params or {}
    return request


@pytest.mark.parametrize("text,labels,expected", [
    ("", {}, True), ("app=web", {"app": "web"}, True), ("app==web", {"app": "db"}, False),
    ("app!=web", {}, True), ("app in (a,b)", {"app": "b"}, True), ("app notin (a,b)", {"app": "a"}, False),
    ("app", {}, False), ("!app", {}, True), ("a=1,b=2", {"a": "1", "b": "2"}, True),
    ("example.com/tier in (gold, silver),x", {"example.com/tier": "gold", "x": ""}, True),
])
def test_label_selectors(text, labels, expected):
    assert reqapi.labels_match(reqapi.parse_label_selector(text), labels) is expected


@pytest.mark.parametrize("text", ["Bad Key=x", "a=b c", "x in ()", "=x", "a=" + "v" * 64, "a in (x,y"])
def test_bad_label_selectors(text):
    with pytest.raises(reqapi.SelectorError):
        reqapi.parse_label_selector(text)


def test_field_selectors():
    fields = reqapi.parse_field_selector("metadata.name=web,metadata.namespace!=kube-system")
    assert reqapi.fields_match(fields, "default", "web")
    assert not reqapi.fields_match(fields, "kube-system", "web")
    assert reqapi.exact_field(fields, "metadata.name") == "web"
    for bad in ("spec.cpu=1", "metadata.name", "status.phase!=x"):
        with pytest.raises(reqapi.SelectorError):
            reqapi.parse_field_selector(bad)


def test_continue_tokens_round_trip_and_refuse_garbage():
    token = reqapi.encode_continue("123", ("shop", "checkout"))
    assert reqapi.decode_continue(token) == ("123", ("shop", "checkout"))
    for garbage in ("!!!", "e30", reqapi.encode_continue("1", ("a", "b"))[:-3] + "xyz"):
        with pytest.raises(reqapi.SelectorError):
            reqapi.decode_continue(garbage)


@pytest.mark.parametrize("accept,expected", [
    ("", ("json", "")), ("application/json", ("json", "")), ("*/*", ("json", "")),
    ("application/json;as=Table;v=v1;g=meta.k8s.io,application/json", ("table", "v1")),
    ("application/json;as=Table;v=v1beta1;g=meta.k8s.io", ("table", "v1beta1")),
    ("application/json;as=Table;v=v2;g=meta.k8s.io,application/json", ("json", "")),
    ("application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io,application/json", ("partial", "v1")),
    ("application/json;as=PartialObjectMetadata;v=v1beta1;g=meta.k8s.io", ("partial", "v1beta1")),
    ("application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io,application/json", ("json", "")),
    ("application/yaml;q=1,application/json;q=0.5", ("json", "")),
])
def test_object_negotiation(accept, expected):
    output = reqapi.negotiate_object(request_for("/", accept))
    kind = "table" if output.table_version else "partial" if output.partial_version else "json"
    assert (kind, output.table_version or output.partial_version) == expected
    if kind == "partial":
        assert output.content_type == f"application/json;as=PartialObjectMetadata;g=meta.k8s.io;v={expected[1]}"
    else:
        assert output.content_type == (reqapi.TABLE_TYPE.format(version=expected[1]) if expected[1] else reqapi.JSON)


@pytest.mark.parametrize("accept,expected", [
    ("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json", "v2"),
    ("application/json;as=APIGroupDiscoveryList;v=v2beta1;g=apidiscovery.k8s.io", "v2beta1"),
    ("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList;profile=nopeer,"
     "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json", "v2"),
    ("application/json, */*", ""),
])
def test_discovery_negotiation(accept, expected):
    assert reqapi.negotiate_discovery(request_for("/apis", accept)) == expected


def list_request(query: str) -> reqapi.Request:
    return reqapi.parse_head(f"GET /apis/{reqapi.GROUP}/{reqapi.VERSION}/requests?{query} HTTP/1.1\r\nHost: a".encode())


@pytest.mark.parametrize("query", ["", "resourceVersion=0", "resourceVersionMatch=NotOlderThan&resourceVersion=0",
                                   "resourceVersionMatch=Exact&resourceVersion=12", "limit=5&continue=x"])
def test_list_options_kube_apiserver_accepts_are_not_refused(query):
    assert reqapi.list_option_problems(list_request(query)) == []


def test_several_refused_list_options_are_listed_as_kube_apiserver_lists_them():
    error = reqapi.invalid_list_options(reqapi.list_option_problems(list_request("resourceVersionMatch=Bogus")))
    assert (error.code, error.reason) == (422, "Invalid")
    assert error.message == ('ListOptions.meta.k8s.io "" is invalid: [resourceVersionMatch: Forbidden: '
                             'resourceVersionMatch is forbidden unless resourceVersion is provided, '
                             'resourceVersionMatch: Unsupported value: "Bogus": supported values: "Exact", '
                             '"NotOlderThan", ""]')
    assert [cause["reason"] for cause in error.details["causes"]] == ["FieldValueForbidden", "FieldValueNotSupported"]
