"""The app starts against the sandbox and accepts a valid order."""

from flask.testing import FlaskClient

from tests.web.conftest import valid_order


def test_a_valid_order_is_accepted(client: FlaskClient) -> None:
    response = client.post("/orders", json=valid_order())
    assert response.status_code == 202
    assert response.headers["Location"] == f"/orders/{response.json['order_id']}"
