"""The test roles and database that the `postgres` fixture creates; import these instead of repeating literals.

On a server given by PGMUX_TEST_DSN the fixture creates the roles but cannot edit
pg_hba.conf: add the `hba_line()` of each role in HBA_OVERRIDES before its
scram-sha-256 host lines there, or md5user/plainuser logins will fail.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PgUser:
    name: str
    password: str
    # What pg_hba.conf asks this role for over TCP.
    auth_method: str
    # What password_encryption stores; md5 auth needs an md5 hash, not a SCRAM verifier.
    stored_as: str

    def hba_line(self, address: str) -> str:
        return f"host all {self.name} {address} {self.auth_method}"


APP_DATABASE = "app"

APP = PgUser(name="app", password="app-secret", auth_method="scram-sha-256", stored_as="scram-sha-256")
MD5 = PgUser(name="md5user", password="md5-secret", auth_method="md5", stored_as="md5")
PLAIN = PgUser(name="plainuser", password="plain-secret", auth_method="password", stored_as="scram-sha-256")

ALL_USERS: tuple[PgUser, ...] = (APP, MD5, PLAIN)
# Roles that need their own pg_hba line ahead of the default scram-sha-256 ones.
HBA_OVERRIDES: tuple[PgUser, ...] = tuple(user for user in ALL_USERS if user.auth_method != "scram-sha-256")
