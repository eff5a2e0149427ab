"""`cakep2p code`: show, set and renew the pairing code headless machines pair with; never logged."""

from __future__ import annotations

import io
import json
import logging

import pytest

from cakep2p import cli, security

pytestmark = pytest.mark.usefixtures("node_home")


@pytest.fixture(autouse=True)
def code_command(monkeypatch):
    """The `code` subcommand registered with the CLI (as the lead's cli.py lists it), no code from the environment."""
    monkeypatch.setitem(cli.SUBCOMMANDS, "code", "show or change this machine's cluster pairing code")
    monkeypatch.delenv(security.CODE_ENV_VAR, raising=False)


def run_code(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(["code", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def stored_code() -> str:
    return security.code_path().read_text().strip()


def test_code_prints_only_the_stored_code_and_the_same_one_next_time(capsys):
    status, out, _ = run_code(capsys)
    assert status == 0 and out == f"{stored_code()}\n"
    assert run_code(capsys)[1] == out


def test_code_json_has_the_code_and_its_fingerprint(capsys):
    status, out, _ = run_code(capsys, "--json")
    data = json.loads(out)
    assert status == 0 and data == {"code": stored_code(), "fingerprint": security.derive_keys(stored_code()).fingerprint}


def test_set_stores_another_clusters_code_as_typed_by_a_person(capsys):
    other = security.new_code()
    typed = other.upper().replace("-", " ")
    status, out, err = run_code(capsys, "--set", typed)
    assert status == 0 and out == f"{other}\n" and stored_code() == other
    assert security.derive_keys(other).fingerprint in err and other not in err


def test_set_from_stdin_keeps_the_code_out_of_the_arguments(capsys, monkeypatch):
    other = security.new_code()
    monkeypatch.setattr("sys.stdin", io.StringIO(other + "\n"))
    assert run_code(capsys, "--set", "-")[0] == 0 and stored_code() == other


def test_malformed_code_is_one_line_error_that_keeps_the_stored_code(capsys):
    before = run_code(capsys)[1].strip()
    malformed = "amber-falcon-river-tulip-maple-notaword-048213"
    status, out, err = run_code(capsys, "--set", malformed)
    assert status == 2 and out == "" and stored_code() == before
    assert err.startswith("cakep2p: error: malformed cluster code") and "`cakep2p code`" in err
    assert err.count("\n") == 1 and malformed not in err


def test_new_makes_a_fresh_code_and_says_other_machines_must_be_paired_again(capsys):
    before = run_code(capsys)[1].strip()
    status, out, err = run_code(capsys, "--new")
    assert status == 0 and out.strip() == stored_code() != before
    assert "paired again" in err and "cakep2p code --set" in err and out.strip() not in err


def test_set_and_new_together_are_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["code", "--new", "--set", security.new_code()])


def test_no_code_reaches_the_log(capsys, caplog):
    other = security.new_code()
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="cakep2p.mesh.curve"):
        run_code(capsys)
        run_code(capsys, "--new")
        run_code(capsys, "--set", other)
        run_code(capsys, "--json")
    assert "created a new cluster pairing code" in caplog.text   # the log was captured
    assert other not in caplog.text and stored_code() not in caplog.text
