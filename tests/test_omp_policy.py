"""The OpenMP wait policy chosen before torch loads: sleep only when other work fills the cores."""
import subprocess
import sys

from chatpager.omp_policy import choose_wait_policy, threads_beside_a_front_end


def test_free_cores_keep_libgomps_default():
    env = {}
    assert choose_wait_policy(env, load=0.7, cores=2) is None
    assert "OMP_WAIT_POLICY" not in env


def test_busy_cores_make_threads_sleep():
    env = {}
    assert choose_wait_policy(env, load=2.0, cores=2) == "PASSIVE"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"


def test_the_users_policy_wins_whatever_the_load():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert choose_wait_policy(env, load=9.0, cores=2) == "ACTIVE"
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_cli_chooses_before_torch_is_imported():
    code = ("import sys; calls = []; "
            "import chatpager.cli as c; "
            "c.choose_wait_policy = lambda: calls.append('torch' in sys.modules); "
            "c.main(['--model', '/nonexistent/model']); print(calls)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[False]", out.stdout + out.stderr


def test_an_engine_beside_the_tui_leaves_it_a_core_unless_the_user_chose():
    assert [threads_beside_a_front_end({}, cores=n) for n in (1, 2, 8)] == [1, 1, 7]
    assert threads_beside_a_front_end({"OMP_NUM_THREADS": "2"}, cores=2) is None
