"""The quiet console: what the parent relays from the launcher's output, and the one line for a failed job."""
import io

from launch.launcher import ConsoleRelay, describe_failure, error_file

WORKER_OUTPUT = (
    "/venv/paddle/utils/cpp_extension/extension_utils.py:712: UserWarning: No ccache found.\n"
    "LAUNCH INFO 2026-12-01 11:00:00,000 -----------  Configuration  ----------------------\n"
    "LAUNCH INFO 2026-12-01 11:00:00,000 devices: None\n"
    "======================= Modified FLAGS detected =======================\n"
    "FLAGS(name='FLAGS_enable_pir_in_executor', current_value=True, default_value=False)\n"
    "I1201 11:00:00.000000   789 tcp_store.cc:336] create libuv server at port: 46682\n"
    "[11:00:00 rank0 INFO] parallelized: mesh ['dp', 'mp'] [2, 1]\n"
    "\rtrain:   0%|          | 0/2 [00:00<?, ?it/s]"
    "\rtrain:  50%|#####     | 1/2 [00:01<00:01,  1.8s/it, loss=11.8][11:00:01 rank0 INFO] memory per rank\n"
    "[11:00:01 rank1 INFO] a line of another rank (its own log keeps it)\n"
    "\rtrain: 100%|##########| 2/2 [00:03<00:00,  1.5s/it, loss=11.5]LAUNCH INFO 2026-12-01 Pod failed\n"
    "[11:00:04 rank0 INFO] loss curve: out/loss.png\n"
)


def relayed(tmp_path, verbose, chunks=(WORKER_OUTPUT,)):
    log, out = tmp_path / "launcher.log", io.StringIO()
    relay = ConsoleRelay(log, verbose, out)
    log.write_text("")
    for chunk in chunks:
        with open(log, "a", newline="") as f:
            f.write(chunk)
        relay()
    return out.getvalue()


def test_only_rank0_log_lines_and_the_progress_bar_reach_the_console(tmp_path):
    assert relayed(tmp_path, False) == (
        "[11:00:00 rank0 INFO] parallelized: mesh ['dp', 'mp'] [2, 1]\n"
        "\rtrain:   0%|          | 0/2 [00:00<?, ?it/s]"
        "\rtrain:  50%|#####     | 1/2 [00:01<00:01,  1.8s/it, loss=11.8]\n"
        "[11:00:01 rank0 INFO] memory per rank\n"
        "\rtrain: 100%|##########| 2/2 [00:03<00:00,  1.5s/it, loss=11.5]\n"
        "[11:00:04 rank0 INFO] loss curve: out/loss.png\n")
    # lines split across reads are judged whole
    halves = (WORKER_OUTPUT[:300], WORKER_OUTPUT[300:])
    assert relayed(tmp_path, False, halves) == relayed(tmp_path, False)


def test_verbose_relays_everything(tmp_path):
    text = relayed(tmp_path, True)
    for line in ("No ccache found", "Configuration", "tcp_store", "FLAGS_enable_pir_in_executor", "rank1 INFO"):
        assert line in text


def test_failure_line_prefers_a_worker_error_then_names_the_signal(tmp_path):
    (tmp_path / "workerlog.1").write_text("[11:00:05 rank1 INFO] step 3\n[11:00:06 rank1 ERROR] allocating 9 GiB\n")
    launcher = ("LAUNCH INFO Container failed !!!\nContainer rank 1 status failed cmd ['python', 'worker.py'] "
                f"code -9 log {tmp_path}/workerlog.1\n")
    assert describe_failure(tmp_path, launcher, 247) == (
        "rank 1 was killed by SIGKILL (out of memory?); its last log line: [11:00:06 rank1 ERROR] allocating 9 GiB")
    assert describe_failure(tmp_path, "", 247) == "a worker was killed by SIGKILL (out of memory?)"
    error_file(tmp_path, 1).write_text("ann.json, record 7: unreadable media x.png: truncated\n")
    assert describe_failure(tmp_path, launcher, 241) == "rank 1: ann.json, record 7: unreadable media x.png: truncated"


def test_a_signal_kill_wins_over_the_connection_errors_of_its_peers(tmp_path):
    error_file(tmp_path, 0).write_text("RuntimeError: gloo pair.cc: Connection reset by peer\n")  # written first
    error_file(tmp_path, 1).write_text("was killed by SIGKILL (out of memory?); its last log line: step 1\n")
    assert describe_failure(tmp_path, "", 137) == (
        "rank 1 was killed by SIGKILL (out of memory?); its last log line: step 1")


def test_a_launched_rank_exits_with_its_code_its_output_flushed_and_no_teardown(tmp_path):
    """`exit_launched`: a piped (block-buffered) stdout still arrives; atexit hooks, where Paddle's CPU build can
    abort while destroying its communication context, do not run."""
    import subprocess
    import sys

    from launch.launcher import REPO

    script = ("import atexit; atexit.register(lambda: print('teardown ran'))\n"
              "from launch.launcher import exit_launched\n"
              "print('result written'); exit_launched(3)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (3, "result written\n"), proc.stderr
