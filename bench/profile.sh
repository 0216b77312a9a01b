#!/bin/bash
# py-spy profiles of echosvc under rr50, rr1 and short50: the server pinned to CPU 0,
# the load generator (bench/.build/loadgen, built by harness.py) to CPU 1. Run under
# `flock /tmp/bench.lock` on a shared machine. Writes bench/results/profiles/.
cd "$(dirname "$0")/.."
out=bench/results/profiles; mkdir -p $out
for sc in rr50 rr1 short50; do
  case $sc in
    rr50) args="-conns 50" ;;
    rr1) args="-conns 1" ;;
    short50) args="-short -conns 50" ;;
  esac
  taskset -c 0 .venv/bin/python -m echosvc serve --port 7711 --log-format json --log-level warning --max-connections 20000 > /dev/null 2>&1 &
  SRV=$!; sleep 1.5
  taskset -c 1 bench/.build/loadgen -addr 127.0.0.1:7711 $args -size 64 -duration 14 -warmup 1 -json > $out/$sc-loadgen.json &
  LG=$!; sleep 2
  .venv/bin/py-spy record -p $SRV -d 10 -r 200 --format raw -o $out/$sc.txt --nonblocking > /dev/null 2>&1
  wait $LG; kill $SRV; wait $SRV
  .venv/bin/python bench/profile_summary.py $out/$sc.txt --top 30 > $out/$sc-summary.txt
done
