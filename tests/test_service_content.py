"""Research-data records through the service: a Zenodo-style record served on 127.0.0.1
with recorded API responses, launched as /build/zenodo/<DOI>."""

from __future__ import annotations

import uuid

import pytest
from tests.test_content_providers import (  # noqa: F401  (fixtures)
    REPO_FILES,
    ContentServer,
    content_server,
    serve_zenodo,
    server,
    settings_for,
    zip_bytes,
)
from tests.test_service_build import Service, phases

pytestmark = pytest.mark.docker

CONTENT_SETTINGS = ["doi_resolver", "zenodo_url", "figshare_url", "figshare_api_url"]
CONTENT_SETTINGS += ["dataverse_hosts", "hydroshare_url"]


def service_for(server, **overrides) -> Service:  # noqa: F811
    settings = settings_for(server)
    values = {name: getattr(settings, name) for name in CONTENT_SETTINGS}
    return Service(build_only_enabled=True, **values, **overrides)


def test_a_zenodo_doi_builds_through_the_service(server, base_image, built_images):  # noqa: F811
    serve_zenodo(server)
    prefix = f"binderbox-svc-{uuid.uuid4().hex[:6]}-"
    svc = service_for(server, allowed_hosts="127.0.0.1", image_prefix=prefix)
    try:
        events, _ = svc.events("/build/zenodo/10.5281/zenodo.3242074?build_only=true")
    finally:
        svc.stop()
    ready = events[-1]
    assert ready["phase"] == "ready", ready
    assert "building" in phases(events)
    built_images.add(ready["image"])
    assert ready["image"].startswith(prefix)
    assert ready["repo_url"] == f"{server.base}/zenodo/records/3242074"
    assert ready["binder_persistent_request"] == "v2/zenodo/10.5281/zenodo.3242074"


def test_records_on_a_private_address_are_refused_without_the_allow_list(server, base_image):  # noqa: F811
    serve_zenodo(server)
    svc = service_for(server)
    try:
        events, _ = svc.events("/build/zenodo/10.5281/zenodo.3242074?build_only=true")
    finally:
        svc.stop()
    assert [e["phase"] for e in events][-1] == "failed"
    assert "local or private network" in events[-1]["message"]
    # Nothing was fetched: the resolver on 127.0.0.1 was refused before any request.
    assert server.requests == []


def test_a_record_download_redirected_to_a_private_host_fails_in_one_sentence(server, tmp_path):  # noqa: F811
    serve_zenodo(server)
    private = ContentServer("127.0.0.2")
    private.thread.start()
    try:
        private.file("/secret.zip", zip_bytes(REPO_FILES))
        content = "/zenodo/api/records/3242074/files/binder-demo-1.0.zip/content"
        server.redirect(content, f"{private.base}/secret.zip")
        svc = service_for(server, allowed_hosts="127.0.0.1")
        try:
            events, _ = svc.events("/build/zenodo/10.5281/zenodo.3242074?build_only=true")
        finally:
            svc.stop()
    finally:
        private.httpd.shutdown()
        private.httpd.server_close()
    failed = events[-1]
    assert failed["phase"] == "failed", events
    assert "local or private network (127.0.0.2)" in failed["message"], failed
    assert "Traceback" not in failed["message"]
    assert content in server.paths  # the record was read and its download asked for
    assert private.requests == []
