"""Regenerate the initial migration from the models (development only).

Until the first release there is exactly one migration, 0001, rebuilt from
storage.models whenever the schema changes; ``tests/test_storage_db.py``
fails if the two disagree. After the first release, changes get new
revisions instead. Run: ``.venv/bin/python -m storage.make_migration``.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from alembic import command

from storage.db import Database
from storage.migrate import MIGRATIONS, alembic_config


def main() -> None:
    target = MIGRATIONS / "versions" / "0001_initial_schema.py"
    target.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'gen.db'}")
        command.revision(alembic_config(db), message="initial schema", autogenerate=True,
                         rev_id="0001")
        db.dispose()
    text = target.read_text()
    text = re.sub(r"storage\.models\.UTCDateTime\(timezone=True\)", "sa.DateTime(timezone=True)",
                  text)
    text = re.sub(r"(?m)^Create Date: .*$", "Create Date: (regenerated)", text)
    text = re.sub(r"(?m)^Revises: $", "Revises: (none)", text)
    if "storage." in text:
        raise SystemExit("the migration refers to storage.* types; map them to sa types here")
    target.write_text(text)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
