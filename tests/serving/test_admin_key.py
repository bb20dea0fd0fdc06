"""Where the admin key of the restricted Triton APIs comes from."""

import pytest

from pagetron.backend.serving.launcher import LaunchError, TritonServer, resolve_admin_key


def test_env_key_wins_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGETRON_ADMIN_KEY", "s3cret-Key_1")
    monkeypatch.setenv("PAGETRON_ADMIN_KEY_FILE", str(tmp_path / "ignored"))
    assert resolve_admin_key(tmp_path / "generated") == ("s3cret-Key_1", None)
    assert not (tmp_path / "generated").exists()


def test_key_file(tmp_path, monkeypatch):
    monkeypatch.delenv("PAGETRON_ADMIN_KEY", raising=False)
    (tmp_path / "key").write_text("from-a-file\n")
    monkeypatch.setenv("PAGETRON_ADMIN_KEY_FILE", str(tmp_path / "key"))
    assert resolve_admin_key(tmp_path / "generated") == ("from-a-file", None)


@pytest.mark.parametrize(
    "setup, message",
    [
        ({"PAGETRON_ADMIN_KEY": "a,b"}, "may not contain"),
        ({"PAGETRON_ADMIN_KEY": "a=b"}, "may not contain"),
        ({"PAGETRON_ADMIN_KEY_FILE": "{tmp}/missing"}, "cannot read"),
        ({"PAGETRON_ADMIN_KEY_FILE": "{tmp}/empty"}, "is empty"),
    ],
)
def test_bad_keys_are_clear_errors(tmp_path, monkeypatch, setup, message):
    monkeypatch.delenv("PAGETRON_ADMIN_KEY", raising=False)
    (tmp_path / "empty").write_text("  \n")
    for name, value in setup.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    with pytest.raises(LaunchError, match=message):
        resolve_admin_key(tmp_path / "generated")


def test_generated_key_is_random_owner_only_and_reaches_the_command(tmp_path, monkeypatch):
    monkeypatch.delenv("PAGETRON_ADMIN_KEY", raising=False)
    monkeypatch.delenv("PAGETRON_ADMIN_KEY_FILE", raising=False)
    key, path = resolve_admin_key(tmp_path / "k")
    again, _ = resolve_admin_key(tmp_path / "k2")
    assert path == tmp_path / "k" and path.read_text() == key + "\n" and len(key) >= 32 and key != again
    assert path.stat().st_mode & 0o777 == 0o600
    server = TritonServer(tmp_path / "repo", admin_key=key)
    cmd = server.command(tmp_path / "backends")
    apis = "model-repository,shared-memory,trace,logging"
    assert f"--http-restricted-api={apis}:admin-key={key}" in cmd
    assert f"--grpc-restricted-protocol={apis}:admin-key={key}" in cmd
    assert "--http-address=127.0.0.1" in cmd and "--grpc-address=127.0.0.1" in cmd
