"""The model library without Qt: the catalog's sizes against its shapes, the planner's fit verdicts, and downloads
end to end against a fake hub on 127.0.0.1 (progress, cancel, resume, offline, a missing package, a wrong id)."""

from __future__ import annotations

import hashlib
import os
import sys
import threading

import pytest

from cakep2p.library import catalog, download, fit
from cakep2p.library.download import Cancelled, DownloadError
from tests.fake_hub import fake_hub
from tests.kit import free_port

pytest.importorskip("huggingface_hub", reason="downloads need the optional huggingface_hub package")

REPO = "acme/Tiny-GGUF"
WEIGHTS = os.urandom(3 * download.CHUNK_BYTES + 12345)
FILES = {"Tiny-Q4_K_M.gguf": WEIGHTS, "Tiny-Q8_0.gguf": b"not this one" * 200, "README.md": b"# tiny"}


@pytest.fixture
def hub(node_home, monkeypatch):
    with fake_hub({REPO: FILES, "acme/Tiny": {"config.json": b"{}", "model.safetensors": WEIGHTS[:5000]}}) as served:
        monkeypatch.setenv("HF_ENDPOINT", served.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield served


# ---- the catalog -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", catalog.CATALOG, ids=lambda entry: entry.key)
def test_catalog_sizes_agree_with_the_shapes_they_come_with(entry):
    """A 16-bit safetensors download is about 2 bytes per weight of its config; a Q4_K_M file about a third of it."""
    safetensors, gguf = entry.variant("safetensors"), entry.variant("gguf")
    spec = fit.spec_of(entry, safetensors)
    weights = sum(spec.layer_bytes) + spec.embedding_bytes + spec.head_bytes
    assert 0.9 < safetensors.approx_bytes / weights < 1.12, (safetensors.approx_bytes, weights)
    assert 0.22 < gguf.approx_bytes / weights < 0.45, (gguf.approx_bytes, weights)


def test_every_catalog_entry_has_both_formats_and_a_readable_config():
    for entry in catalog.CATALOG:
        assert {variant.format for variant in entry.variants} == {"gguf", "safetensors"}
        assert fit.args_of(entry).num_layers > 0
    assert catalog.entry("qwen2.5-1.5b").title == "Qwen2.5 1.5B Instruct"


# ---- fit ---------------------------------------------------------------------------------------------------------

def budgets(*offers_gib: float) -> fit.Budgets:
    from cakep2p.planner import NodeBudget

    return fit.Budgets(tuple(NodeBudget(f"node-{index}", f"machine-{index}", int(offer * 2**30))
                             for index, offer in enumerate(offers_gib)))


@pytest.mark.parametrize("offers, fits, used, words", [
    ((0.1,), False, 0, "too big: needs"),
    ((16,), True, 1, "fits on this machine"),
    ((2.5, 2.5), True, 2, "fits over 2 of 2 machines"),
    ((2.5, 0.01), False, 0, "too big"),
])
def test_a_catalog_model_fits_the_budgets_the_planner_can_use(offers, fits, used, words):
    verdict = fit.catalog_fit(catalog.entry("llama3.2-3b"), catalog.entry("llama3.2-3b").variant("gguf"),
                              budgets(*offers))
    assert (verdict.fits, verdict.nodes_used) == (fits, used) and verdict.text.startswith(words)
    assert verdict.offered_bytes == sum(int(offer * 2**30) for offer in offers)


def test_the_own_offer_can_be_tried_before_it_applies():
    entry = catalog.entry("qwen2.5-1.5b")
    roomy = budgets(16, 2)
    assert fit.catalog_fit(entry, entry.variant("gguf"), roomy).nodes_used == 2
    assert not fit.catalog_fit(entry, entry.variant("gguf"), roomy.with_own_offer(0)).fits


# ---- downloads against the fake hub ------------------------------------------------------------------------------

def test_a_download_reports_progress_and_keeps_only_the_matching_file(hub):
    seen = []
    path = download.download(REPO, catalog.GGUF_Q4_K_M, on_progress=lambda done, total, name: seen.append(done))
    assert path == download.target_dir(REPO) / "Tiny-Q4_K_M.gguf" == download.downloaded(REPO)
    assert path.read_bytes() == WEIGHTS
    assert sorted(item.name for item in path.parent.iterdir()) == [download.MARKER, "Tiny-Q4_K_M.gguf"]
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == len(WEIGHTS) and len(seen) >= 4


def test_a_cancelled_download_resumes_where_it_stopped(hub):
    cancel = threading.Event()

    def stop_after_the_first_chunk(done: int, _total: int, _name: str) -> None:
        if done > 0:
            cancel.set()

    with pytest.raises(Cancelled, match="kept to continue"):
        download.download(REPO, catalog.GGUF_Q4_K_M, on_progress=stop_after_the_first_chunk, cancel=cancel)
    kept = download.partial_bytes(REPO)
    assert 0 < kept < len(WEIGHTS) and download.downloaded(REPO) is None
    seen = []
    path = download.download(REPO, catalog.GGUF_Q4_K_M, on_progress=lambda done, total, name: seen.append(done))
    assert hub.ranges()[-1] == f"bytes={kept}-"
    assert seen[0] == kept and seen[-1] == len(WEIGHTS)
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(WEIGHTS).digest()


def test_a_folder_model_downloads_every_file_and_is_found_again(hub):
    path = download.download("acme/Tiny", catalog.SAFETENSORS_FILES)
    assert path == download.target_dir("acme/Tiny") and (path / "model.safetensors").stat().st_size == 5000
    assert download.downloaded("acme/Tiny") == path and download.partial_bytes("acme/Tiny") == 0


def test_offline_the_message_says_the_hub_cannot_be_reached(node_home, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")   # nothing listens there
    with pytest.raises(DownloadError) as failure:
        download.download(REPO, catalog.GGUF_Q4_K_M)
    message = str(failure.value)
    assert message.startswith("could not reach 127.0.0.1:") and "offline" in message
    assert "huggingface_hub" not in message and "\n" not in message


def test_a_hub_that_goes_away_mid_download_gives_the_offline_message_and_keeps_nothing_wrong(node_home, monkeypatch):
    with fake_hub({REPO: FILES}) as served:
        monkeypatch.setenv("HF_ENDPOINT", served.url)
        files = download.list_files(REPO, catalog.GGUF_Q4_K_M)
    with pytest.raises(DownloadError, match="could not reach"):
        download._fetch(download._url(served.url, REPO, files[0].name), download.target_dir(REPO) / files[0].name,
                        files[0], {}, lambda count: None, None, REPO, served.url)


def test_without_huggingface_hub_the_message_names_the_package(node_home, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(DownloadError, match="needs the huggingface_hub package: pip install huggingface_hub"):
        download.download(REPO, catalog.GGUF_Q4_K_M)


def test_an_unknown_repository_or_a_malformed_id_is_named(hub):
    with pytest.raises(DownloadError, match="has no model acme/Nothing"):
        download.download("acme/Nothing", catalog.GGUF_Q4_K_M)
    with pytest.raises(DownloadError, match="not a hub id"):
        download.download("just-a-name", catalog.GGUF_Q4_K_M)
    with pytest.raises(DownloadError, match="no files matching"):
        download.download("acme/Tiny", catalog.GGUF_Q4_K_M)
