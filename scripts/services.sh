#!/usr/bin/env bash
# Make sure PostgreSQL and RabbitMQ answer; start whichever is stopped. Exit 1 if one cannot start.
set -euo pipefail

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q; }
rabbit_up() { rabbitmqctl -q status >/dev/null 2>&1 && (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

wait_for() {  # name, check, seconds
  local name=$1 check=$2 seconds=$3
  for _ in $(seq 1 "$seconds"); do
    if $check; then echo "$name: up"; return 0; fi
    sleep 1
  done
  echo "$name: did not come up in ${seconds}s" >&2
  return 1
}

if ! pg_up; then
  echo "PostgreSQL: stopped, starting it"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
wait_for PostgreSQL pg_up 60

if ! rabbit_up; then
  echo "RabbitMQ: stopped, starting it"
  rabbitmq-server -detached || true
fi
wait_for RabbitMQ rabbit_up 120
