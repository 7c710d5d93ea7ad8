"""Optional API tokens for research-data providers: sent to the provider's own hosts, and
never to where its downloads redirect."""

from __future__ import annotations

from tests.test_content_providers import (  # noqa: F401  (fixtures)
    content_server,
    serve_zenodo,
    server,
    settings_for,
)

from binderbox.providers import source_for


def test_the_zenodo_token_goes_to_zenodo_only(server, tmp_path):  # noqa: F811
    serve_zenodo(server)
    api_file = "/zenodo/api/records/3242074/files/binder-demo-1.0.zip/content"
    archive = server._body(api_file)
    # Zenodo hands the download to storage on another host (here: "localhost").
    storage = server.base.replace("127.0.0.1", "localhost") + "/storage/demo.zip"
    server.redirect(api_file, storage)
    server.file("/storage/demo.zip", archive)

    settings = settings_for(server, zenodo_token="s3cret")
    source = source_for(f"{server.base}/zenodo/records/3242074", settings=settings)
    source.fetch(tmp_path / "checkout")

    seen = {path: headers.get("authorization") for path, headers in server.requests}
    assert seen["/zenodo/api/records/3242074"] == "Bearer s3cret"
    assert seen[api_file] == "Bearer s3cret"
    assert seen["/storage/demo.zip"] is None
    assert (tmp_path / "checkout" / "requirements.txt").exists()


def test_without_a_token_nothing_is_sent(server, tmp_path):  # noqa: F811
    serve_zenodo(server)
    source = source_for(f"{server.base}/zenodo/records/3242074", settings=settings_for(server))
    source.fetch(tmp_path / "checkout")
    assert all("authorization" not in headers for _, headers in server.requests)
