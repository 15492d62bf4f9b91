"""A vhost of a test's own with users in it, on the shared broker.

Made with one rabbitmqctl call and removed with one: every rabbitmqctl call
boots an Erlang VM (3-4 s on the test machine), so a vhost plus users and
their permissions, one command each, would cost half a minute per test.
``rabbitmqctl eval`` runs the broker's own vhost and user functions (those
of RabbitMQ 3.8 to 3.13) in a single call instead.
"""

import subprocess

ACTOR = "evrouter-tests"


def _bin(text):
    # An Erlang binary of the text's bytes, as numbers: the Debian wrapper of
    # rabbitmqctl hands its arguments to `sh -c`, which would read a quoted
    # string's backslashes and quotes once before Erlang does (a permission
    # pattern ^a\.b$ arrived as ^a.b$: any character where a dot was meant).
    return "<<" + ",".join(str(b) for b in text.encode()) + ">>"


def _eval(calls):
    expression = "[" + ", ".join(calls) + "]."
    done = subprocess.run(["rabbitmqctl", "eval", expression],
                          capture_output=True, text=True, timeout=120)
    return done


class BrokerUsers:
    """`vhost` with guest allowed everything in it, and `users`:
    {name: (password, configure, write, read)} with those permissions."""

    def __init__(self, vhost, users):
        self.vhost = vhost
        self.users = dict(users)
        v = _bin(vhost)
        calls = [f"rabbit_vhost:add({v}, {_bin(ACTOR)})",
                 self._permit("guest", ".*", ".*", ".*")]
        for user, (password, configure, write, read) in self.users.items():
            calls.append(f"rabbit_auth_backend_internal:add_user("
                         f"{_bin(user)}, {_bin(password)}, {_bin(ACTOR)})")
            calls.append(self._permit(user, configure, write, read))
        done = _eval(calls)
        if done.returncode != 0 or done.stdout.strip() != \
                "[" + ",".join(["ok"] * len(calls)) + "]":
            self.remove()
            raise RuntimeError(f"rabbitmqctl eval failed: {done.stdout} "
                               f"{done.stderr}")

    def _permit(self, user, configure, write, read):
        return (f"rabbit_auth_backend_internal:set_permissions({_bin(user)}, "
                f"{_bin(self.vhost)}, {_bin(configure)}, {_bin(write)}, "
                f"{_bin(read)}, {_bin(ACTOR)})")

    def url(self, user, port=5672):
        password = self.users[user][0]
        return f"amqp://{user}:{password}@127.0.0.1:{port}/{self.vhost}"

    def remove(self):
        """The vhost (and everything declared in it) and the users."""
        calls = [f"(catch rabbit_vhost:delete({_bin(self.vhost)}, "
                 f"{_bin(ACTOR)}))"]
        calls += [f"(catch rabbit_auth_backend_internal:delete_user("
                  f"{_bin(user)}, {_bin(ACTOR)}))" for user in self.users]
        _eval(calls)
