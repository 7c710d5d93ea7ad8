"""Optional API tokens for research-data providers: sent only to the hosts the operator
configured for that provider, and never to where its downloads redirect."""

from __future__ import annotations

from tests.test_content_providers import (  # noqa: F401  (fixtures)
    PID,
    content_server,
    serve_ckan,
    serve_dataverse,
    serve_zenodo,
    server,
    settings_for,
)

from binderbox.config import Settings
from binderbox.providers import content_source, source_for
from binderbox.providers.ckan import CkanSource
from binderbox.providers.dataverse import DataverseSource
from binderbox.providers.figshare import FigshareSource
from binderbox.providers.hydroshare import HydroshareSource
from binderbox.providers.zenodo import ZenodoSource


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


def test_the_ckan_token_goes_only_to_ckan_hosts(server, tmp_path):  # noqa: F811
    # A host that answers status_show is a CKAN site for fetching, but it is the user's
    # choice, not the operator's: the token stays home.
    serve_ckan(server)
    settings = settings_for(server, ckan_token="s3cret", ckan_hosts="http://127.0.0.3:9/ckan")
    source = source_for(f"{server.base}/ckan/dataset/binder-demo", settings=settings)
    source.fetch(tmp_path / "checkout")
    assert "/ckan/api/3/action/status_show" in server.paths
    assert len(server.requests) == 4  # status_show, package_show, two files
    assert all("authorization" not in headers for _, headers in server.requests)


def test_the_ckan_token_reaches_a_configured_ckan_host(server, tmp_path):  # noqa: F811
    serve_ckan(server)
    settings = settings_for(server, ckan_token="s3cret", ckan_hosts=f"{server.base}/ckan")
    source = source_for(f"{server.base}/ckan/dataset/binder-demo", settings=settings)
    source.fetch(tmp_path / "checkout")
    assert len(server.requests) == 3  # no status_show for a configured site
    assert all(headers.get("authorization") == "s3cret" for _, headers in server.requests)


def test_the_dataverse_token_goes_only_to_dataverse_hosts(server, tmp_path):  # noqa: F811
    serve_dataverse(server)
    url = f"{server.base}/dataverse/dataset.xhtml?persistentId={PID}"
    configured = settings_for(server, dataverse_token="k3y")
    content_source("dataverse", url, configured).fetch(tmp_path / "one")
    assert server.requests
    assert all(headers.get("x-dataverse-key") == "k3y" for _, headers in server.requests)

    # The same installation, known some other way than dataverse_hosts (as the well-known
    # ones are): its datasets are fetched, the token is not sent.
    server.requests.clear()
    site = f"{server.base}/dataverse"
    other = settings_for(server, dataverse_token="k3y", dataverse_hosts="https://dv.example")
    source = DataverseSource(other, site, PID)
    source.fetch(tmp_path / "two")
    assert server.requests
    assert all("x-dataverse-key" not in headers for _, headers in server.requests)


def test_tokens_go_to_operator_set_hosts_not_to_built_in_lists():
    settings = Settings(ca_bundle="", dataverse_hosts="", zenodo_hosts="https://rdm.example")
    assert DataverseSource.token_sites(settings) == []  # the well-known list gets none
    assert [s.base for s in ZenodoSource.token_sites(settings)] == [
        "https://zenodo.org",
        "https://rdm.example",
    ]  # not sandbox.zenodo.org, whose accounts are separate
    assert [s.base for s in FigshareSource.token_sites(settings)] == ["https://api.figshare.com/v2"]
    assert [s.base for s in HydroshareSource.token_sites(settings)] == [
        "https://www.hydroshare.org"
    ]
    assert CkanSource.token_sites(settings) == []
