"""Fixtures live in fix_*.py modules: the database, in-process apps, the real stack."""

pytest_plugins = [
    "tests.fix_secrets", "tests.fix_db", "tests.fix_apps", "tests.fix_stack", "tests.fix_proxy",
]
