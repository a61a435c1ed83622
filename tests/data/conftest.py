"""The shared/ folder fixtures (tests/shared_folder.py) for these tests."""

from tests.shared_folder import _no_user_overrides, no_shared, shared  # noqa: F401
