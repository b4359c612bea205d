"""The README's configuration reference cannot drift from the code."""
import os
import re

from pipeline.config import OPTIONS, options_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_config_reference_matches_code():
    m = re.search(r"<!-- options-table:start -->\n(.*?)\n<!-- options-table:end -->", _readme(), re.S)
    assert m, "README lacks the options table markers"
    assert m.group(1) == options_table(), "README table is stale: regenerate with python -m pipeline.config"


def test_every_option_documented_once_and_every_documented_option_exists():
    readme = _readme()
    documented = re.findall(r"^\| `([a-z_]+)` \| `--", readme, re.M)
    assert sorted(documented) == sorted(o.name for o in OPTIONS)
    assert len(documented) == len(set(documented))


def test_readme_shows_the_two_commands():
    readme = _readme()
    assert "./run_local.sh\n" in readme or "./run_local.sh " in readme
    assert "./run_local.sh test" in readme


def test_readme_shows_the_postgres_map_ddl_that_init_runs():
    from pipeline.stores.postgres_map import ddl_text

    m = re.search(r"<!-- postgres-ddl:start -->\n\s*```sql\n(.*?)\n\s*```\n\s*<!-- postgres-ddl:end -->", _readme(), re.S)
    assert m, "README lacks the PostgreSQL DDL markers"
    shown = [line.strip() for line in m.group(1).splitlines()]
    assert shown == ddl_text().replace('"', "").splitlines(), "README DDL is stale: shardmove init --print-sql"
