"""Loading backends by URL or name through their entry points."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import discovery_core as dc
from discovery_core import backend as backend_module


def test_built_in_backends_are_listed() -> None:
    assert {"memory", "consul"} <= set(dc.available_backends())


def test_url_and_name_forms_load_the_memory_backend() -> None:
    with dc.connect("memory://") as by_url, dc.connect("memory") as by_name:
        assert type(by_url) is type(by_name)
        assert by_url.name == "memory"
        assert by_url is not by_name


def test_unknown_backend_lists_the_installed_ones() -> None:
    with pytest.raises(dc.BackendNotFound) as raised:
        dc.connect("zookeeper://127.0.0.1:2181")
    assert raised.value.name == "zookeeper"
    assert "memory" in str(raised.value)
    assert "consul" in str(raised.value)


@pytest.mark.parametrize(
    ("target", "options", "named"),
    [("memory://?bogus=1", {}, "bogus"), ("memory", {"adress": "x"}, "adress"), ("memory://somehost", {}, "url")],
)
def test_bad_options_raise_invalid_config_naming_them(target: str, options: dict[str, str], named: str) -> None:
    with pytest.raises(dc.InvalidConfig) as raised:
        dc.connect(target, **options)
    assert raised.value.option == named


def test_unset_discovery_url_falls_back_to_memory_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("DISCOVERY_URL", raising=False)
    monkeypatch.setattr(backend_module, "_warned_default", False)
    with caplog.at_level(logging.WARNING, logger="discovery_core"):
        dc.connect().close()
        dc.connect().close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "discovery_core"]
    assert len(warnings) == 1
    assert "stay in this process" in warnings[0]


def test_discovery_url_is_used_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCOVERY_URL", "zookeeper://x")
    with pytest.raises(dc.BackendNotFound):
        dc.connect()


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)


def test_importing_the_package_imports_no_backend() -> None:
    result = run_python(
        "import sys, discovery_core\n"
        "loaded = [m for m in ('consul', 'discovery_consul', 'discovery_memory', 'requests') if m in sys.modules]\n"
        "print(loaded)"
    )
    assert result.stdout.strip() == "[]", result.stderr


def test_a_backend_missing_its_dependency_says_which_extra_to_install() -> None:
    result = run_python(
        "import sys; sys.modules['consul'] = None\n"
        "import discovery_core as dc\n"
        "try:\n    dc.connect('consul://127.0.0.1:8500')\n"
        "except dc.BackendNotFound as e:\n    print(e)\n"
    )
    assert "pip install 'discovery-core[consul]'" in result.stdout, result.stderr


@pytest.mark.parametrize(
    "target",
    [
        "consul://user:s3cr3t-token@127.0.0.1:8500",
        "consul://s3cr3t-token@127.0.0.1:8500",
        "consul://127.0.0.1:8500/x?token=s3cr3t-token",
        "memory://user:s3cr3t-token@somehost",
    ],
)
def test_a_credential_in_a_url_is_never_shown(target: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(dc.InvalidConfig) as raised:
        dc.connect(target)
    shown = [str(raised.value), repr(raised.value), repr(raised.value.value), caplog.text]
    assert not [text for text in shown if "s3cr3t-token" in text]
    assert raised.value.option == "url"


@pytest.mark.parametrize("target", ["consul:/x", "consul:", "consul:127.0.0.1:8500", "memory//"])
def test_a_malformed_url_is_called_malformed_not_a_missing_backend(target: str) -> None:
    with pytest.raises(dc.InvalidConfig) as raised:
        dc.connect(target)
    assert raised.value.option == "target"
    assert "name://" in str(raised.value)


def test_a_missing_token_file_shows_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-token"
    with pytest.raises(dc.InvalidConfig) as raised:
        dc.connect("consul", address="127.0.0.1:1", token_file=str(missing))
    assert str(missing) in str(raised.value)
    with pytest.raises(dc.InvalidConfig) as raised:
        dc.connect("consul", address="127.0.0.1:1", token="")
    assert "'***'" in str(raised.value)


@pytest.mark.parametrize("package", ["discovery_core", "discovery_consul", "discovery_memory"])
def test_the_package_loggers_print_nothing_by_themselves(package: str) -> None:
    """A library adds a NullHandler: without one, logging's last resort writes its
    warnings to stderr of an application that configured no logging."""
    result = run_python(
        f"import logging, {package}\n"
        f"logging.getLogger({package!r}).warning('a warning')\n"
        f"logging.getLogger({package + '.sub'!r}).error('an error')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_the_unset_discovery_url_warning_reaches_no_stderr() -> None:
    result = run_python(
        "import os; os.environ.pop('DISCOVERY_URL', None)\nimport discovery_core as dc\ndc.connect().close()"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
