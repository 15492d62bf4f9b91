"""The test harness's users get the permissions written for them, to the
character: a pattern's backslash and a password's quote survive the trip
through rabbitmqctl (whose Debian wrapper goes through `sh -c`). Before, a
pattern ^a\\.b$ arrived as ^a.b$, and every least-privilege test whose
patterns escape a dot was looser than it read."""

import uuid

import amqp
import pytest

from tests.functional.rabbitmq_users import BrokerUsers


def test_patterns_and_passwords_arrive_as_written():
    vhost = f"users-{uuid.uuid4().hex[:8]}"
    password = 'p"w\\x$(id)`'
    users = BrokerUsers(vhost, {f"{vhost}-u": (password, r"^a\.b$", "", "")})
    try:
        conn = amqp.Connection("127.0.0.1:5672", userid=f"{vhost}-u",
                               password=password, virtual_host=vhost)
        conn.connect()
        try:
            conn.channel().exchange_declare("a.b", "topic", auto_delete=True)
            with pytest.raises(amqp.exceptions.AccessRefused):
                conn.channel().exchange_declare("aXb", "topic", auto_delete=True)
        finally:
            conn.collect()
    finally:
        users.remove()
