"""The one image the stage boots, served as Glance's v2 API serves it.

The issue's cloud has no Glance; Nova reads an image's metadata (and the
client its schema) before it schedules, and the fake hypervisor never
downloads it. Run: ``python -m tests.cloud.image_stub PORT``.
"""

import json
import sys
import wsgiref.simple_server

IMAGE_ID = "8f2d1a3c-5b7e-4c6d-9e0f-1a2b3c4d5e6f"
IMAGE = {
    "id": IMAGE_ID, "name": "cirros", "status": "active", "visibility": "public",
    "protected": False, "os_hidden": False, "min_ram": 0, "min_disk": 0,
    "size": 1024, "virtual_size": 1024, "disk_format": "qcow2",
    "container_format": "bare", "checksum": "0" * 32, "owner": None,
    "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
    "tags": [], "file": f"/v2/images/{IMAGE_ID}/file", "self": f"/v2/images/{IMAGE_ID}",
    "schema": "/v2/schemas/image",
}
SCHEMA = {"name": "image", "properties": {k: {} for k in IMAGE},
          "additionalProperties": {"type": "string"}, "links": []}
VERSIONS = {"versions": [{"id": "v2.16", "status": "CURRENT",
                          "links": [{"rel": "self", "href": "/v2/"}]}]}


def app(environ, start_response):
    path = environ.get("PATH_INFO", "").rstrip("/")
    routes = {"": VERSIONS, "/v2": VERSIONS, "/v2/images": {"images": [IMAGE]},
              f"/v2/images/{IMAGE_ID}": IMAGE, "/v2/schemas/image": SCHEMA}
    if path in routes:
        body, status = json.dumps(routes[path]).encode(), "200 OK"
    else:
        body, status = b'{"message": "not found"}', "404 Not Found"
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]


if __name__ == "__main__":
    server = wsgiref.simple_server.make_server("127.0.0.1", int(sys.argv[1]), app)
    server.serve_forever()
