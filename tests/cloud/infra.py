"""The cloud stage's plumbing: databases, a broker vhost, processes, waits.

Everything it creates is named after one run id (databases
``evr_cloud_<id>_*`` on the machine's MariaDB, the vhost ``evr_cloud_<id>``
on the machine's RabbitMQ) and removed by ``teardown``; every process it
starts is its own child, stopped by its pid.
"""

import os
import signal
import socket
import subprocess
import time
import urllib.request

MYSQL_SOCKET = "/run/mysqld/mysqld.sock"


def wait_until(predicate, timeout, what, interval=0.2):
    end = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except SystemExit:
            raise
        except Exception:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def port_open(port, host="127.0.0.1"):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500


class Infra:
    def __init__(self, run_id, workdir, venv):
        self.run_id = run_id
        self.workdir = workdir
        self.venv = venv
        self.procs = {}
        self.databases = []
        self.vhost = f"evr_cloud_{run_id}"

    # --- MariaDB -----------------------------------------------------------------
    def database(self, name):
        db = f"evr_cloud_{self.run_id}_{name}"
        self._mysql(f"CREATE DATABASE `{db}` CHARACTER SET utf8mb4")
        self.databases.append(db)
        return (f"mysql+pymysql://root@localhost/{db}"
                f"?unix_socket={MYSQL_SOCKET}&charset=utf8mb4")

    def _mysql(self, sql):
        subprocess.run(["mysql", "-uroot", "-e", sql], check=True, timeout=60)

    # --- RabbitMQ ----------------------------------------------------------------
    def broker_url(self):
        return f"rabbit://guest:guest@127.0.0.1:5672/{self.vhost}"

    def amqp_url(self):
        return f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}"

    def create_vhost(self):
        self._ctl("add_vhost", self.vhost)
        self._ctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")

    def _ctl(self, *args, check=True):
        subprocess.run(["rabbitmqctl", "-q", *args], check=check, timeout=120,
                       stdout=subprocess.DEVNULL)

    # --- processes -----------------------------------------------------------------
    def start(self, name, argv, env=None):
        log = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        full_env = dict(os.environ, **(env or {}))
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                env=full_env, cwd=self.workdir,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def stop(self, name, timeout=20):
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def alive(self, name):
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def log(self, name):
        try:
            with open(os.path.join(self.workdir, f"{name}.log"), "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def run(self, argv, env=None, timeout=600):
        done = subprocess.run(argv, env=dict(os.environ, **(env or {})),
                              cwd=self.workdir, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout

    def bin(self, name):
        return os.path.join(self.venv, "bin", name)

    def uwsgi(self, name, port, module, env, processes=1, threads=4):
        return self.start(name, [
            self.bin("uwsgi"), "--http-socket", f"127.0.0.1:{port}",
            "--module", module, "--master", "--processes", str(processes),
            "--threads", str(threads), "--need-app", "--die-on-term",
            "--lazy-apps", "--buffer-size", "65535",
            # Clients reuse connections; plain http-socket mode does not.
            "--add-header", "Connection: close", "--hook-master-start",
            "unix_signal:15 gracefully_kill_them_all", "--thunder-lock",
            "--enable-threads"], env=env)

    # --- the end -------------------------------------------------------------------
    def teardown(self):
        for name in list(self.procs)[::-1]:
            try:
                self.stop(name)
            except Exception as exc:
                print(f"[cloud] stopping {name}: {exc}")
        for db in self.databases:
            try:
                self._mysql(f"DROP DATABASE IF EXISTS `{db}`")
            except Exception as exc:
                print(f"[cloud] dropping {db}: {exc}")
        self._ctl("delete_vhost", self.vhost, check=False)
