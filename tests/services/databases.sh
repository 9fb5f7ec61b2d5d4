#!/usr/bin/env bash
# Install (Debian/Ubuntu, as root) and start the PostgreSQL and MariaDB servers the
# tests use, and make their URLs work:
#
#   postgresql://postgres:postgres@127.0.0.1:5432/test
#   mysql://root:root@127.0.0.1:3306/test
#
# Idempotent: run it again and it only checks. Used by `make services`, by
# .ci/run, and by the test set-up when a server does not answer.
set -euo pipefail
cd /  # su postgres below must be able to enter the working directory

say() { echo "services: $*" >&2; }
die() { say "$*"; exit 1; }

missing=()
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
[ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    die "install ${missing[*]} (Debian/Ubuntu: sudo apt-get install -y ${missing[*]}), or run the tests with a Docker engine"
  fi
  say "installing ${missing[*]} from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ "$(id -u)" = 0 ] || die "starting the servers needs root (or start PostgreSQL and MariaDB yourself and set EXACTLYONCE_TEST_POSTGRES_URL / EXACTLYONCE_TEST_MYSQL_URL)"

# --- PostgreSQL ---------------------------------------------------------------
version=$(ls /usr/lib/postgresql | sort -V | tail -1)
if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -qx "$version main"; then
  pg_createcluster "$version" main >/dev/null
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
fi
for _ in $(seq 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
pg_isready -q -h 127.0.0.1 -p 5432 || die "PostgreSQL $version did not start (see /var/log/postgresql/)"
su postgres -c "psql -qAtc \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null
if ! su postgres -c "psql -qAtc \"SELECT 1 FROM pg_database WHERE datname = 'test'\"" | grep -q 1; then
  su postgres -c "createdb test"
fi

# --- MariaDB ------------------------------------------------------------------
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
if ! mariadb-admin --protocol=socket -u root ping >/dev/null 2>&1; then
  start-stop-daemon --start --oknodo --background --chuid mysql --exec /usr/sbin/mariadbd
  for _ in $(seq 60); do mariadb-admin --protocol=socket -u root ping >/dev/null 2>&1 && break; sleep 0.5; done
fi
mariadb-admin --protocol=socket -u root ping >/dev/null 2>&1 || die "MariaDB did not start (see /var/log/mysql/)"
# root keeps socket authentication and gains a password for TCP from 127.0.0.1.
mariadb --protocol=socket -u root <<'SQL'
CREATE DATABASE IF NOT EXISTS test;
ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD('root');
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY 'root';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
FLUSH PRIVILEGES;
SQL

say "PostgreSQL at postgresql://postgres:postgres@127.0.0.1:5432/test, MariaDB at mysql://root:root@127.0.0.1:3306/test"
