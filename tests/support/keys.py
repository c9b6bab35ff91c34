"""API keys of the test run: one per role, in the `API_KEYS` format the services read."""

from __future__ import annotations

ADMIN_KEY = "test-admin-secret-0001"
WRITE_KEY = "test-write-secret-0001"
READ_KEY = "test-read-secret-00001"
API_KEYS = f"admin:admin:{ADMIN_KEY},writer:write:{WRITE_KEY},reader:read:{READ_KEY}"
