#!/bin/bash
# Run under flock /tmp/bench.lock. py-spy on an idle echosvc serve --workers 6 (no connections: the idle cost is per process).
cd "$(dirname "$0")/.."
.venv/bin/python -m echosvc serve --port 29871 --workers 6 --log-format json --log-level warning > /tmp/idle-srv.log 2>&1 &
SUP=$!
sleep 4
W=$(cat /proc/$SUP/task/*/children | tr ' ' '\n' | head -1)
cat /proc/$SUP/schedstat /proc/$W/schedstat
.venv/bin/py-spy record -p $SUP -d 20 -r 997 --format raw -o /tmp/sup-idle.txt --nonblocking > /tmp/pyspy-sup.log 2>&1 &
A=$!
.venv/bin/py-spy record -p $W -d 20 -r 997 --format raw -o /tmp/worker-idle.txt --nonblocking > /tmp/pyspy-w.log 2>&1 &
B=$!
wait $A $B
cat /proc/$SUP/schedstat /proc/$W/schedstat
kill -TERM $SUP; wait $SUP
