pytest_plugins = [
    "tests.support.servers",
    "tests.support.hub_fixtures",
    "tests.support.stage_fixtures",
    "tests.support.late_run",
]
