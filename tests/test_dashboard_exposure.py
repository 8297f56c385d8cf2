"""Who can reach the dashboards: this machine only by default; another address needs --allow-remote, warns,
and accepts websockets only from pages it served; no dashboard input names a file outside the given runs."""

import subprocess

import param
import pytest

from m2f import cli


class _Served(Exception):
    """Raised by the stand-in for Popen: the command line `m2f dashboard` would start."""


@pytest.fixture()
def served(monkeypatch):
    def capture(command, **kwargs):
        raise _Served(command)

    monkeypatch.setattr(subprocess, "Popen", capture)

    def serve(*argv):
        with pytest.raises(_Served) as served_info:
            cli.main(["dashboard", *argv])
        return served_info.value.args[0]
    return serve


def test_default_is_this_machine_only(served, capsys):
    command = served()
    assert command[command.index("--address") + 1] == "127.0.0.1"
    assert "--allow-websocket-origin=127.0.0.1:5006" in command
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("address", ["10.1.2.3", "my-workstation.lab"])
def test_another_address_needs_the_flag(address, capsys, served):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["dashboard", "--address", address])
    assert exit_info.value.code == 2
    assert f"--address {address} would serve the dashboards" in capsys.readouterr().err
    command = served("--address", address, "--port", "5100", "--allow-remote")
    assert f"--allow-websocket-origin={address}:5100" in command  # only pages served here may connect
    assert [c for c in command if c.startswith("--allow-websocket-origin")] == [f"--allow-websocket-origin={address}:5100"]
    assert f"warning: serving on {address}, reachable from other machines" in capsys.readouterr().err


@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
def test_every_interface_is_refused_even_with_the_flag(address, capsys):
    with pytest.raises(SystemExit):
        cli.main(["dashboard", "--address", address, "--allow-remote"])
    assert "listens on every interface" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "RUN/../../other"])
def test_run_choices_cannot_name_other_files(path, tmp_path):
    """The runs are fixed when the server starts (command line); a browser can only pick among them. A
    value sent by a hand-made websocket message is refused by the parameter, before any file is read."""
    from dashboards.attention import AttentionExplorer
    from dashboards.layer_metrics import LayerMetrics
    from dashboards.proposals import ProposalsExplorer

    run = str(tmp_path / "run")
    path = path.replace("RUN", run)
    for explorer in (AttentionExplorer(runs=[run]), ProposalsExplorer(runs=[run])):
        with pytest.raises(ValueError, match=r"not in the Selector.s list of objects|does not accept"):
            explorer.run = path
        assert explorer.run == run
    with pytest.raises(ValueError):
        LayerMetrics(runs=[run]).runs = [path]
    with pytest.raises(ValueError):
        AttentionExplorer(runs=[run]).compare_run = path
    assert isinstance(AttentionExplorer.param.run, param.Selector)
