"""`make up`'s program, end to end: migrations, every service, the real sample imported through the API, the
first model trained on the Celery worker, and the prediction the printed curl makes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from shared.local_services import free_port


def _smoke(env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "shared.devstack", "up", "--smoke", "--epochs", "2"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_make_up_trains_the_first_model_and_serves_predictions(database_url: str, redis_url: str) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "INDICATORS_PORT": str(free_port()),
        "PREDICTOR_PORT": str(free_port()),
        "TRAINER_PORT": str(free_port()),
        # a queue of this test's own on the shared Redis
        "TRAINER_QUEUE": f"make-up-{os.getpid()}",
        "AICASH_SAMPLE_SYMBOL": "SPXUP",
    }
    env.pop("API_KEYS", None)
    proc = _smoke(env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SPXUP D1: 5031 inserted" in " ".join((proc.stdout + proc.stderr).split())
    assert "'symbol': 'SPXUP'" in proc.stdout
    assert "'ts': '2018-12-31T00:00:00Z'" in proc.stdout
    assert "rsi_14" in proc.stdout
    assert "curl" in proc.stdout
    # the first model was trained through the worker and the predictor serves it
    assert "'model_version':" in proc.stdout
    assert "'signal':" in proc.stdout
    # the verdict (validated walk-forward and weighted) follows the first signal; it is whatever the data say
    out = " ".join(proc.stdout.split())
    assert "gate passed" in out or "gate failed" in out, proc.stdout[-3000:]
    assert "/validation" in out
    # the prediction itself carries the model's verdict
    assert re.search(r"'quality': \{ ?'gate': '(passed|failed)'", out), proc.stdout[-3000:]
    # the first signal came before the verdict, from a model not yet validated
    assert out.index("first signal:") < out.index("gate failed" if "gate failed" in out else "gate passed")

    # A second start on what the first left: nothing imported or trained again, the first signal served before
    # the trainer's processes start (they are not needed for it), the verdict already there.
    again = _smoke(env, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out2 = " ".join(again.stdout.split())
    assert "SPXUP D1: the sample's 5031 bars are already stored" in out2, out2[-3000:]
    assert "training the first model" not in out2
    assert out2.index("first signal:") < out2.index("started trainer-api"), out2[-3000:]
    assert re.search(r"first signal: SPXUP D1 (BUY|SELL|HOLD) .* gate (passed|failed)", out2), out2[-3000:]
    assert re.search(r"'quality': \{ ?'gate': '(passed|failed)'", out2), out2[-3000:]


def test_ctrl_c_in_a_terminal_stops_make_up_with_exit_0_and_leaves_no_process(
    database_url: str, tmp_path: Path
) -> None:
    """`make up` in a real terminal (a pty, so that ^C is the terminal's SIGINT to the foreground group, make
    included), up with no model to train, then ^C: make exits 0 and none of the processes it started remain."""
    import os
    import pty
    import select
    import time

    ports = {name: free_port() for name in ("INDICATORS", "PREDICTOR", "TRAINER")}
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "COLUMNS": "200",
        "AICASH_SAMPLE_SYMBOL": "SPXCTRLC",
        "AICASH_VAR_DIR": str(tmp_path / "var"),
        **{f"{name}_PORT": str(port) for name, port in ports.items()},
    }
    for name in ("REDIS_URL", "CELERY_BROKER_URL", "API_KEYS", "TRAINER_QUEUE"):
        env.pop(name, None)  # an embedded Redis of its own: its workers meet no other test's queues
    root = Path(__file__).resolve().parent.parent
    pid, fd = pty.fork()
    if pid == 0:  # the child: make, in the pty's session as a terminal user runs it
        os.chdir(root)
        os.execvpe("make", ["make", "up", "UP_ARGS=--no-train"], env)
    out = b""

    def read(timeout: float) -> bool:
        nonlocal out
        ready, _, _ = select.select([fd], [], [], timeout)
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:  # the pty closed: make is gone
                return False
        return True

    def started() -> list[int]:
        """Processes whose command line names one of this stack's ports (the services, its devstack)."""
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            if any(f"--port {p}" in cmd for p in ports.values()) or b"AICASH_SAMPLE_SYMBOL=SPXCTRLC" in environ:
                found.append(int(proc.name))
        return found

    status = None
    try:
        deadline = time.monotonic() + 300
        while b"Ctrl-C stops everything" not in out and time.monotonic() < deadline and read(1.0):
            pass
        assert b"Ctrl-C stops everything" in out, out.decode(errors="replace")[-3000:]
        assert b"/ui" in out and b"key:" in out  # the console's URL and the key to log in with
        assert started(), "found none of the stack's processes while it was up: the check below would be blind"
        os.write(fd, b"\x03")  # ^C, through the terminal's line discipline
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            read(0.5)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
        else:
            status = None
    finally:
        if status is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert status is not None, "make up did not stop within 60 s of ^C: " + text[-2000:]
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]
    assert "Error" not in text.split("Ctrl-C stops everything")[-1], text[-2000:]
    time.sleep(0.5)
    assert not started(), f"processes left after make up stopped: {started()}"
