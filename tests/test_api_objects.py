"""API objects and documents: the pure data builders, checked without a server."""

from __future__ import annotations

import json

import pytest

import reqapi


@pytest.mark.parametrize("seconds,shown", [
    (-5, "<invalid>"), (-1, "0s"), (0, "0s"), (45, "45s"), (119, "119s"), (120, "2m"), (150, "2m30s"),
    (599, "9m59s"), (600, "10m"), (12 * 60, "12m"), (179 * 60, "179m"), (3 * 3600, "3h"), (3 * 3600 + 60, "3h1m"),
    (8 * 3600, "8h"), (47 * 3600, "47h"), (48 * 3600, "2d"), (5 * 86400, "5d"), (5 * 86400 + 3600, "5d1h"),
    (8 * 86400, "8d"), (400 * 86400, "400d"), (730 * 86400, "2y"), (731 * 86400, "2y1d"), (3000 * 86400, "8y"),
])
def test_human_age_matches_kubectl(seconds, shown):
    assert reqapi.human_age(seconds) == shown


def test_uid_is_a_function_of_namespace_and_name():
    assert reqapi.object_uid("a", "b") == reqapi.object_uid("a", "b")
    assert len({reqapi.object_uid("a", "b"), reqapi.object_uid("a", "c"), reqapi.object_uid("ab", ""),
                reqapi.object_uid("a", "b.c")}) == 4


def test_resource_version_is_decimal_and_never_zero():
    version = reqapi.resource_version_of("ab" * 32)
    assert version.isdigit() and version != "0"
    assert reqapi.resource_version_of("0" * 64) == "1"


def test_status_has_go_key_order_and_omits_empty_details():
    document = reqapi.status(404, "NotFound", "x not found", {"name": "x"})
    assert list(document) == ["kind", "apiVersion", "metadata", "status", "message", "reason", "details", "code"]
    assert "details" not in reqapi.status(400, "BadRequest", "bad")
    assert reqapi.status(503, "ServiceUnavailable", "later", retry_after=5)["details"] == {"retryAfterSeconds": 5}


def test_object_and_table_row():
    prediction = reqapi.Prediction("500m", "512Mi", "prod-api")
    obj = reqapi.requests_object("prod-eu", "pay-api", prediction, "42", 1_700_000_000)
    assert obj["metadata"]["creationTimestamp"] == "2023-11-14T22:13:20Z"
    assert obj["metadata"]["annotations"] == {"k8s.wujiuye.com/rule": "prod-api"}
    row = reqapi.table_row(obj, "Metadata", 1_700_000_045, 1_700_000_000)
    assert row["cells"] == ["pay-api", "500m", "512Mi", "prod-api", "45s"]
    assert row["object"] == {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": obj["metadata"]}
    assert "object" not in reqapi.table_row(obj, "None", 0, 0)
    assert reqapi.table_row(obj, "Object", 0, 0)["object"] is obj


def test_discovery_documents_are_consistent():
    v2 = reqapi.aggregated_discovery("v2")
    resource = v2["items"][0]["versions"][0]["resources"][0]
    legacy = reqapi.api_resource()
    assert (resource["resource"], resource["singularResource"], resource["verbs"]) == (
        legacy["name"], legacy["singularName"], legacy["verbs"])
    assert resource["scope"] == "Namespaced" and legacy["namespaced"] is True
    assert reqapi.aggregated_discovery("v2beta1")["apiVersion"] == "apidiscovery.k8s.io/v2beta1"


def test_openapi_refs_resolve_in_both_documents():
    for document, prefix, key in ((reqapi.openapi_v3_document(), "#/components/schemas/", ("components", "schemas")),
                                  (reqapi.openapi_v2_document(), "#/definitions/", ("definitions",))):
        schemas = document
        for part in key:
            schemas = schemas[part]
        text = json.dumps(document)
        refs = {piece.split('"')[0] for piece in text.split('"$ref": "')[1:]}
        assert refs and all(ref.startswith(prefix) and ref[len(prefix):] in schemas for ref in refs)
